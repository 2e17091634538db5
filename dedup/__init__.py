"""dedup: find and remove duplicate and near-duplicate images in training sets.

The library behind the ``dedup`` command::

    from dedup import run, load_config
    result = run(["shards/"], "out/", config=load_config("default"))
"""

from typing import TYPE_CHECKING, Any

from dedup._version import __version__  # noqa: E402
from dedup.config import RunConfig, load_config  # noqa: E402
from dedup.errors import DedupError  # noqa: E402

if TYPE_CHECKING:
    from dedup.pipeline import RunResult, run


def __getattr__(name: str) -> Any:
    # The pipeline pulls in faiss and ONNX Runtime: import it on first use, so that
    # `dedup --help` and config handling stay fast.
    if name in ("run", "RunResult"):
        from dedup import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'dedup' has no attribute {name!r}")


__all__ = ["DedupError", "RunConfig", "RunResult", "__version__", "load_config", "run"]
