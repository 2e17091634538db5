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
from enum import StrEnum
from typing import Annotated, Any

import typer

from dedup.config import EmbedModel, KeepPolicy, RunConfig, load_config
from dedup.errors import ConfigError, DedupError, printable

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

class ExecutorKind(StrEnum):
    LOCAL = "local"  # this machine: one process, or --workers processes
    RAY = "ray"  # a Ray cluster: a local one started on the spot, or --ray-address


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
    # Messages echo paths, URLs and names from the data: no terminal escapes, one line.
    typer.echo(f"Error: {printable(str(err))}", err=True)
    return typer.Exit(err.exit_code)


def _summary(result: Any) -> None:
    s = result.report["summary"]
    d = result.report["duplicate_count"]["all_samples"]
    typer.echo(
        f"{s['samples']} samples ({s['failed']} failed) · {s['duplicate_clusters']} duplicate clusters "
        f"(largest {s['largest_cluster']}) · {s['dropped']} removable ({s['share_removable']:.1%}) · "
        f"mean duplicate count {d['mean']:.2f}"
    )
    for name, sec in sorted((result.report.get("contamination") or {}).items()):
        typer.echo(f"contaminates {name}: {sec['dropped']} training samples dropped ({sec['direct']} direct)")
    out = result.out
    typer.echo(f"manifest: {out / 'manifest.parquet'}")
    typer.echo(f"keep list: {out / 'keep.parquet'}   removal list: {out / 'remove.parquet'}   report: {out / 'report.html'}")
    typer.echo(f"next: dedup apply {out} --to <folder>   (writes the kept samples in the input's own format)")


@app.command()
def run(
    sources: Annotated[list[str], typer.Argument(help="Shard folders, files or URLs (file://, s3://, gs://, http://).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder; rerunning into it resumes.")],
    preset: Annotated[str, typer.Option(help="Bundled preset: default, strict, aggressive, ci.")] = "default",
    config: Annotated[Path | None, typer.Option(help="A TOML file with only the settings you change (same layout as configs/*.toml), laid over --preset.", exists=False)] = None,
    threshold: Annotated[float | None, typer.Option(help="Embedding similarity that links two images directly (the preset's: default 0.9, strict and ci 0.95 = the paper's duplicate level). Pairs below it, down to the preset's search.verify_from (default 0.55), are linked only when their re-read images align.", min=-1.0, max=1.0)] = None,
    model: Annotated[EmbedModel | None, typer.Option(help="Embedding model.")] = None,
    model_path: Annotated[str | None, typer.Option(help="Model file for sscd-torchscript / clip, or your own ONNX export.")] = None,
    pdq_distance: Annotated[int | None, typer.Option(help="Max PDQ Hamming distance (-1: off).")] = None,
    phash_distance: Annotated[int | None, typer.Option(help="Max pHash Hamming distance (-1: off).")] = None,
    keep: Annotated[KeepPolicy | None, typer.Option(help="Which sample of a cluster to keep.")] = None,
    keep_column: Annotated[str | None, typer.Option(help="Metadata column for --keep column (highest wins), e.g. AESTHETIC_SCORE.")] = None,
    workers: Annotated[int | None, typer.Option(help="Shards processed at once (worker processes; threads of this process with --model none; config key pool).", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per model call (default: 8 on the CPU, 64 on a GPU).", min=1)] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Refuse images declaring more pixels than this, before decoding them (decompression bombs); such images are failed rows.", min=1)] = None,
    trust_model_code: Annotated[bool, typer.Option("--trust-model-code", help="Allow loading model files that run code when loaded: TorchScript (sscd-torchscript) and pickled .pt/.bin CLIP weights. Only for files you trust.")] = False,
    decisions: Annotated[list[Path] | None, typer.Option("--decisions", help="A decisions.parquet of `dedup review` (e.g. of another run over the same data) to honour besides OUT/decisions.parquet: different = never in one cluster, same = one cluster. Repeatable.")] = None,
    executor: Annotated[ExecutorKind, typer.Option(help="Where the per-shard work runs: local processes, or Ray (starts a local Ray; --ray-address joins a cluster). Ray needs: pip install 'dedup\\[ray]'.")] = ExecutorKind.LOCAL,
    ray_address: Annotated[str | None, typer.Option(help="The Ray cluster to join with --executor ray, e.g. auto or ray://head:10001.")] = None,
    against: Annotated[list[str] | None, typer.Option("--against", help="Decontaminate: an evaluation set's index (the --out folder of `dedup run EVAL`), as PATH or NAME=PATH; repeatable. Training samples that copy one of its images are dropped (reason contaminates:NAME) and report.html gets a section per set.", show_default=False)] = None,
    work: Annotated[Path | None, typer.Option("--work", help="Where the scratch files go: the per-shard checkpoints and the partitioned search's spill (default: OUT/.work). Another disk keeps OUT small; a rerun with the same --work resumes.", show_default=False)] = None,
    disk_check: Annotated[bool, typer.Option("--disk-check/--no-disk-check", help="Estimate the disk the run needs from its input and stop before starting when free space is short.")] = True,
    quiet: Quiet = False,
) -> None:
    """Deduplicate SOURCES into OUT: manifest.parquet, keep.parquet, report.json/html, index/.

    Example: dedup run laion-shards/ --out dedup-out/ --workers 2

    Decontaminate against evaluation sets (index them once with the same preset):
    dedup run eval-images/ --out eval-out/ ; dedup run train/ --out train-out/ --against eval-out/
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
                "embed.trust_code": True if trust_model_code else None,
                "fingerprint.max_pixels": max_pixels,
                "keep.policy": keep.value if keep else (KeepPolicy.COLUMN.value if keep_column else None),
                "keep.column": keep_column,
                "workers": workers,
            }
        )
        runner = _executor(executor, ray_address, workers)
        result = run_pipeline(
            sources, out, config=cfg, executor=runner, progress=_progress_factory(quiet), against=against or (),
            decisions=decisions or (),
            work=work, disk_check=disk_check,
        )  # fmt: skip
    except DedupError as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted: finished shards are kept; rerun the same command to resume.", err=True)
        raise typer.Exit(130) from None
    _summary(result)


def _executor(kind: ExecutorKind, address: str | None, workers: int | None) -> Any:
    """None for the local executor (the pipeline builds it from the config's workers)."""
    if kind is ExecutorKind.LOCAL:
        if address is not None:
            raise ConfigError("--ray-address needs --executor ray; hint: add --executor ray")
        return None
    from dedup.executors.ray import RayExecutor

    return RayExecutor(address=address, workers=workers or 0)  # 0: one actor per CPU of the cluster


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


@app.command()
def query(
    images: Annotated[list[Path], typer.Argument(help="Generated images: files or folders (searched recursively).", show_default=False)],
    index: Annotated[Path, typer.Option("--index", "-i", help="The --out folder of `dedup run` (or its index/ folder).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Training matches per image.", min=1)] = 5,
    flag_at: Annotated[float, typer.Option(help="Similarity at which a generation is flagged as a copy (the paper's SSCD level: 0.5).", min=-1.0, max=1.0)] = 0.5,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for matches.parquet and matches.html.")] = Path("query-out"),
    quiet: Quiet = False,
) -> None:
    """Find each generated image's closest training images, with the index's own model.

    Writes OUT/matches.parquet (one row per image and rank) and OUT/matches.html (side by side), and prints the share of generations flagged.

    Example: dedup query generations/ --index dedup-out/ --top-k 5
    """
    from dedup.query import query as run_query

    try:
        result = run_query(images, index, out=out, top_k=top_k, flag_at=flag_at, progress=_progress_factory(quiet))
    except DedupError as err:
        raise _fail(err) from None
    for name, error in result.failed:
        typer.echo(f"warning: {name}: {error}", err=True)
    typer.echo(
        f"{result.matched} generations · {result.flagged} flagged ({result.share_flagged:.2%}) at "
        f"{result.model} similarity ≥ {result.flag_at:g}"
        + (f" · {len(result.failed)} could not be read" if result.failed else "")
    )
    typer.echo(f"matches: {result.out / 'matches.parquet'}   page: {result.out / 'matches.html'}")


@app.command()
def check(
    source: Annotated[str, typer.Argument(help="The new drop: a folder, file or URL, as for `dedup run`.", show_default=False)],
    against: Annotated[Path, typer.Option("--against", "-a", help="The --out folder of the baseline's `dedup run` (its index/ is read, never written).")],
    preset: Annotated[str, typer.Option(help="Preset whose gate limits apply: default, strict, aggressive, ci.")] = "ci",
    config: Annotated[Path | None, typer.Option(help="A TOML file whose [gate] keys change the preset's limits (the keys it does not name stay the preset's).")] = None,
    max_baseline_share: Annotated[float | None, typer.Option(help="Most of the drop that may duplicate the baseline (a share, e.g. 0.05; negative: off).")] = None,
    max_internal_share: Annotated[float | None, typer.Option(help="Most of the drop that may be redundant copies within the drop (a share; negative: off).")] = None,
    max_cluster_size: Annotated[int | None, typer.Option(help="Largest cluster a drop sample may be in, baseline members included (negative: off).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (instead of the summary).")] = False,
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here: one testcase per limit.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Append a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY), with the worst offenders.")] = None,
    top: Annotated[int, typer.Option(help="Offenders listed (per kind) in --json and --markdown.", min=0)] = 20,
    update: Annotated[bool, typer.Option("--update", help="When the gate passes, add the drop to the baseline's index (as `dedup index add`).")] = False,
    work: Annotated[Path | None, typer.Option(help="Keep the drop's features here (default: a temporary folder); a rerun resumes from it.")] = None,
    disk_check: Annotated[bool, typer.Option("--disk-check/--no-disk-check", help="With --update: estimate the disk the add needs and stop before starting when free space is short.")] = True,
    workers: Annotated[int | None, typer.Option(help="Shards processed at once (worker processes; threads of this process with --model none; config key pool).", min=1)] = None,
    quiet: Quiet = False,
) -> None:
    """Gate a new drop on its duplicates: within itself and against a baseline index.

    Exit codes: 0 the drop passes every limit; 1 a limit is exceeded; 2 bad usage or unreadable input (no index at --against, a missing drop).

    The baseline is only read, never written, unless --update (which adds a passing drop to it).

    Example: dedup check new-drop/ --against baseline/ --junit gate.xml --markdown $GITHUB_STEP_SUMMARY
    """
    from dedup._io import atomic_write_text
    from dedup.check import check as run_check
    from dedup.check_report import summary_lines, to_json, to_junit, to_markdown
    from dedup.errors import OutputError

    try:
        gate = _config(preset, config).with_overrides(
            {
                "gate.max_share_duplicating_baseline": max_baseline_share,
                "gate.max_share_duplicated_within_drop": max_internal_share,
                "gate.max_cluster_size": max_cluster_size,
            }
        ).gate
        result = run_check(source, against, gate=gate, top=top, work=work, update=update, workers=workers, progress=_progress_factory(quiet or json_out), disk_check=disk_check)
        for target, render in ((junit, to_junit), (markdown, to_markdown)):
            if target is None:
                continue
            try:
                if target is junit:
                    atomic_write_text(target, render(result))
                else:  # appended: $GITHUB_STEP_SUMMARY may hold earlier steps' output
                    with open(target, "a", encoding="utf-8") as fh:
                        fh.write(render(result))
            except OSError as err:
                raise OutputError(f"cannot write {target}: {err.strerror or err}; hint: check the path and its folder") from None
    except DedupError as err:
        raise _fail(err) from None
    if json_out:
        typer.echo(to_json(result), nl=False)
    else:
        for line in summary_lines(result):
            typer.echo(line)
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def apply(
    out: Annotated[Path, typer.Argument(help="The --out folder of a finished `dedup run` (its manifest.parquet and index/ are read).", show_default=False)],
    to: Annotated[Path, typer.Option("--to", "-t", help="Where to write the kept samples: a new or empty folder, outside the input. Rerunning into it resumes.", show_default=False)],
    keep_failed: Annotated[bool, typer.Option("--keep-failed/--drop-failed", help="Also write the failed samples (download failures, undecodable images) as the input holds them; by default they are left out with the duplicates.")] = False,
    link: Annotated[bool, typer.Option("--link", help="Hard-link loose files (img2dataset files output, image folders) instead of copying them; --to must be on the input's file system. Tars and parquet files are always written anew.")] = False,
    quiet: Quiet = False,
) -> None:
    """Write the samples a run keeps into a new folder, in the input's own format.

    From the shards you already hold, so nothing is lost to link rot: webdataset .tar + sidecar .parquet + _stats.json (every member of each kept sample, in the original order, headers kept), img2dataset parquet and files output, image folders (the tree kept), Hugging Face save_to_disk folders. Duplicates are left out, and failed samples too unless --keep-failed.

    The input is only read. Each shard is written to temporary names, then marked done: after a kill, rerun the same command; finished shards are skipped and the result is byte-identical.

    To filter a dataset yourself instead, use OUT/remove.parquet (README: "Applying the result").

    Example: dedup apply dedup-out/ --to shards-dedup/
    """
    from dedup.apply import apply as run_apply

    try:
        result = run_apply(out, to, keep_failed=keep_failed, link=link, progress=_progress_factory(quiet))
    except DedupError as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        typer.echo("Interrupted: finished shards are kept; rerun the same command to resume.", err=True)
        raise typer.Exit(130) from None
    failed = "kept" if keep_failed else "left out"
    skipped = f" ({result.skipped_shards} already done)" if result.skipped_shards else ""
    typer.echo(
        f"{result.kept} of {result.samples} samples written · {result.dropped_duplicates} duplicates left out · "
        f"failed samples {failed}" + (f" ({result.dropped_failed})" if not keep_failed else "")
        + f" · {result.shards} shards{skipped}"
    )
    typer.echo(f"written to: {result.dest}")


index_app = typer.Typer(
    help="Grow a run's index: `dedup index add SOURCE... --index OUT` decodes only the new shards.",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")


@index_app.command("add")
def index_add(
    sources: Annotated[list[str], typer.Argument(help="Folders, files or URLs to add (new sources, or sources of the index that gained shards).", show_default=False)],
    index: Annotated[Path, typer.Option("--index", "-i", help="The --out folder of the `dedup run` whose index grows.")],
    workers: Annotated[int | None, typer.Option(help="Shards processed at once (worker processes; threads of this process with --model none; config key pool).", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per model call (default: 8 on the CPU, 64 on a GPU).", min=1)] = None,
    disk_check: Annotated[bool, typer.Option("--disk-check/--no-disk-check", help="Estimate the disk the add needs (new checkpoints, search scratch, rewritten outputs) and stop before starting when free space is short.")] = True,
    decisions: Annotated[list[Path] | None, typer.Option("--decisions", help="A decisions.parquet of `dedup review` (e.g. of another run over the same data) to honour besides OUT/decisions.parquet: different = never in one cluster, same = one cluster. Repeatable.")] = None,
    quiet: Quiet = False,
) -> None:
    """Add new shards to a run's index and update its manifest, keep list and report.

    Only the new shards are decoded and embedded, with the index's own settings; the result is
    the same as `dedup run` over the old and new sources together (see README: "Growing an index").

    Example: dedup index add drops/2024-06-03/ --index dedup-out/
    """
    from dedup.add import add

    try:
        added = add(sources, index, workers=workers, batch_size=batch_size, progress=_progress_factory(quiet), disk_check=disk_check, decisions=decisions or ())
    except DedupError as err:
        raise _fail(err) from None
    if added.result is None:
        typer.echo(f"nothing new: the index already holds every shard of {' '.join(sources)} ({added.known_shards})")
        return
    shards = "shard" if added.added_shards == 1 else "shards"
    typer.echo(f"added {added.added_shards} {shards} ({added.added_samples} samples)")
    _summary(added.result)


@app.command()
def review(
    out: Annotated[Path, typer.Argument(help="The --out folder of a finished `dedup run` (or `dedup demo`).", show_default=False)],
    sample: Annotated[int | None, typer.Option(help="First draw N accepted links, stratified by signal and similarity band, to measure precision (report.json/html then show it per band).", min=1)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --sample draw (the same run, N and seed give the same sample).")] = 0,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).", min=0, max=65535)] = 0,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the page in the default browser.")] = True,
) -> None:
    """Review the links of a run in a local page: same (s), different (d), skip (k).

    Walks the sample (with --sample), the weakest links of each signal, verified and partial links, the largest clusters and the clusters whose members disagree most. Each decision is saved at once to OUT/decisions.parquet; closing and reopening resumes. The next `dedup run` (or `dedup index add`) into OUT honours them: different cuts the cluster between the two, same joins them; the manifest's reason says `reviewed` where that changed what is kept.

    The page listens on 127.0.0.1 only, behind a secret token in its URL. Stop with Ctrl+C.

    Example: dedup review demo-out --sample 40
    """
    from dedup.review import ReviewServer, draw_sample, refresh_report

    try:
        if sample is not None:
            drawn = draw_sample(out, sample, seed=seed)
            strata = len(set(zip(drawn.column("signal").to_pylist(), drawn.column("band").to_pylist(), strict=True)))
            typer.echo(f"sample: {drawn.num_rows} links in {strata} strata (signal x similarity band): reviewed first")
        server = ReviewServer(out, port=port)
    except DedupError as err:
        raise _fail(err) from None
    except OSError as err:
        typer.echo(f"Error: cannot listen on 127.0.0.1:{port}: {printable(str(err))}; hint: pick another --port", err=True)
        raise typer.Exit(2) from None
    pending, decided = server.pending()
    typer.echo(f"{len(pending)} pairs to review ({decided} decided already) · decisions: {out / 'decisions.parquet'}")
    typer.echo(f"review page: {server.url}")
    typer.echo("keys: s same · d different · k skip · Ctrl+C to stop")
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    try:
        section = refresh_report(out)
    except DedupError as err:
        raise _fail(err) from None
    if section is not None:
        counts = section["decisions"]
        typer.echo(f"decided: {counts['same']} same · {counts['different']} different · {counts['skip']} skipped; next: dedup run ... --out {out}")
        for band in (section.get("precision") or {}).get("bands", []):
            if band["decided"]:
                typer.echo(f"  {band['signal']} {band['band']}: precision {band['precision']:.2f} [{band['ci_low']:.2f}, {band['ci_high']:.2f}] of {band['decided']}")


def _config(preset: str, path: Path | None) -> RunConfig:
    return load_config(preset, path)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
