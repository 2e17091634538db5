"""The ``dedup`` command: parse options, load a config, call the library, print a summary.

No logic lives here: every command is a thin call into ``dedup``; :class:`DedupError` is
caught once and becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from dedup.config import EmbedModel, KeepPolicy, RunConfig, load_config
from dedup.errors import DedupError

app = typer.Typer(
    name="dedup",
    help=(
        "Find and remove duplicate and near-duplicate images in training sets.\n\n"
        "Reads img2dataset output (webdataset .tar, parquet, files), plain image folders and "
        "LAION metadata parquet; links samples by exact bytes/pixels, PDQ and SSCD embeddings; "
        "writes a manifest (one row per sample: cluster, keep/drop, reason), a URL list of what "
        "to keep, and a duplication report.\n\n"
        "Start with:  dedup demo"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; only errors and the summary.")]


def _progress_factory(quiet: bool) -> Any:
    from tqdm import tqdm

    @contextmanager
    def factory(stage: str, total: int | None, unit: str) -> Iterator[Any]:
        bar = tqdm(total=total, desc=stage, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True, leave=True)
        try:
            yield bar
        finally:
            bar.close()

    return factory


def _fail(err: DedupError) -> typer.Exit:
    typer.echo(f"Error: {err}", err=True)
    return typer.Exit(err.exit_code)


def _summary(result: Any) -> None:
    s = result.report["summary"]
    d = result.report["duplicate_count"]["all_samples"]
    typer.echo(
        f"{s['samples']} samples ({s['failed']} failed) · {s['duplicate_clusters']} duplicate clusters "
        f"(largest {s['largest_cluster']}) · {s['dropped']} removable ({s['share_removable']:.1%}) · "
        f"mean duplicate count {d['mean']:.2f}"
    )
    out = result.out
    typer.echo(f"manifest: {out / 'manifest.parquet'}")
    typer.echo(f"keep list: {out / 'keep.parquet'}   report: {out / 'report.html'}")


@app.command()
def run(
    sources: Annotated[list[str], typer.Argument(help="Shard folders, files or URLs (file://, s3://, gs://, http://).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder; rerunning into it resumes.")],
    preset: Annotated[str, typer.Option(help="Bundled preset: default, strict, aggressive, ci.")] = "default",
    config: Annotated[Path | None, typer.Option(help="A TOML config file (overrides --preset).", exists=False)] = None,
    threshold: Annotated[float | None, typer.Option(help="Embedding similarity to call a duplicate (default 0.95: SSCD's duplicate level in the paper).", min=-1.0, max=1.0)] = None,
    model: Annotated[EmbedModel | None, typer.Option(help="Embedding model.")] = None,
    model_path: Annotated[str | None, typer.Option(help="Model file for sscd-torchscript / clip, or your own ONNX export.")] = None,
    pdq_distance: Annotated[int | None, typer.Option(help="Max PDQ Hamming distance (-1: off).")] = None,
    phash_distance: Annotated[int | None, typer.Option(help="Max pHash Hamming distance (-1: off).")] = None,
    keep: Annotated[KeepPolicy | None, typer.Option(help="Which sample of a cluster to keep.")] = None,
    keep_column: Annotated[str | None, typer.Option(help="Metadata column for --keep column (highest wins), e.g. AESTHETIC_SCORE.")] = None,
    workers: Annotated[int | None, typer.Option(help="Shards processed at once (processes).", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per model batch.", min=1)] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    quiet: Quiet = False,
) -> None:
    """Deduplicate SOURCES into OUT: manifest.parquet, keep.parquet, report.json/html, index/.

    Example: dedup run laion-shards/ --out dedup-out/ --workers 2
    """
    from dedup.pipeline import run as run_pipeline

    try:
        cfg = _config(preset, config).with_overrides(
            {
                "search.threshold": threshold,
                "search.pdq_distance": pdq_distance,
                "search.phash_distance": phash_distance,
                "embed.model": model.value if model else None,
                "embed.model_path": model_path,
                "embed.batch_size": batch_size,
                "embed.device": device,
                "keep.policy": keep.value if keep else (KeepPolicy.COLUMN.value if keep_column else None),
                "keep.column": keep_column,
                "workers": workers,
            }
        )
        result = run_pipeline(sources, out, config=cfg, progress=_progress_factory(quiet))
    except DedupError as err:
        raise _fail(err) from None
    _summary(result)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    quiet: Quiet = False,
) -> None:
    """Run the whole job on the bundled sample (public-domain clip art in img2dataset format)."""
    from dedup.pipeline import run as run_pipeline

    sample = Path(str(resources.files("dedup").joinpath("data", "sample")))
    typer.echo(f"sample: {sample}")
    try:
        result = run_pipeline([str(sample)], out, config=load_config("default"), progress=_progress_factory(quiet))
    except DedupError as err:
        raise _fail(err) from None
    _summary(result)


@app.command()
def download(
    metadata: Annotated[str, typer.Argument(help="LAION-style metadata parquet (or folder of them).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where img2dataset writes the shards.")],
    url_col: Annotated[str, typer.Option(help="URL column.")] = "URL",
    caption_col: Annotated[str, typer.Option(help="Caption column.")] = "TEXT",
    image_size: Annotated[int, typer.Option(help="img2dataset image_size.")] = 256,
    resize_mode: Annotated[str, typer.Option(help="img2dataset resize_mode (no, border, keep_ratio, center_crop).")] = "keep_ratio",
    processes: Annotated[int, typer.Option(help="Download processes.", min=1)] = max(1, (os.cpu_count() or 1)),
    threads: Annotated[int, typer.Option(help="Download threads per process.", min=1)] = 64,
    samples_per_shard: Annotated[int, typer.Option(help="Samples per shard.", min=1)] = 10000,
) -> None:
    """Download the images of LAION metadata with img2dataset, as webdataset shards for `dedup run`."""
    from dedup.download import download as run_download

    try:
        run_download(
            metadata,
            out,
            url_col=url_col,
            caption_col=caption_col,
            image_size=image_size,
            resize_mode=resize_mode,
            processes=processes,
            threads=threads,
            samples_per_shard=samples_per_shard,
        )
    except DedupError as err:
        raise _fail(err) from None
    typer.echo(f"shards: {out}   next: dedup run {out} --out <folder>")


@app.command()
def report(out: Annotated[Path, typer.Argument(help="The --out folder of a finished run.", show_default=False)]) -> None:
    """Re-render OUT/report.html from OUT/report.json."""
    from dedup.report import rerender

    try:
        path = rerender(out)
    except DedupError as err:
        raise _fail(err) from None
    typer.echo(f"report: {path}")


def _config(preset: str, path: Path | None) -> RunConfig:
    return load_config(preset, path)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
