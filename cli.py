"""The Typer app, as the design card asks for a top-level ``cli.py``.

The app itself lives in ``dedup/cli.py`` so that installing the package does not put a
top-level module named ``cli`` into site-packages; this file lets ``python cli.py ...`` work
from a checkout.
"""

from dedup.cli import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
