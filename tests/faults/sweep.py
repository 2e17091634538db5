"""Run inside a process started with the ENOSPC shim preloaded (tests/faults/enospc.c): for each
k, a command whose k-th write under its output folder fails (and every later one: the disk
stays full), then the same command with room made; reports what each printed and whether the
outputs came back byte-identical to an uninterrupted run.

    python sweep.py SPEC.json RESULT.json

SPEC: {"cases": [{"name", "argv", "root", "outputs", "setup": [[src, dst], ...], "ks": [...]}],
"counter": path}. ``setup`` copies a prepared state (e.g. an index to add to) into place before
each attempt; ``outputs`` are compared with the same command's uninterrupted result.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from typer.testing import CliRunner

from dedup.cli import app


def invoke(argv: list[str]) -> tuple[int, str]:
    """The command in a forked child (warm imports, no state shared between attempts): its
    exit code and output; a child killed by a signal reports it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            result = CliRunner().invoke(app, argv)
            text = result.output
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                import traceback

                text += "".join(traceback.format_exception(result.exception))
            payload = json.dumps([result.exit_code, text]).encode()
        except BaseException as err:  # noqa: BLE001 - reported, never raised in the child
            payload = json.dumps([99, f"sweep child failed: {err!r}"]).encode()
        with os.fdopen(write, "wb") as fh:
            fh.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status), f"killed by signal {os.WTERMSIG(status)}"
    code, text = json.loads(data)
    return int(code), str(text)


def prepare(case: dict) -> None:
    for target in case.get("clear", []):
        shutil.rmtree(target, ignore_errors=True)
    for src, dst in case.get("setup", []):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, symlinks=True)


def snapshot(case: dict) -> dict[str, str]:
    out = {}
    for path in case["outputs"]:
        p = Path(path)
        if "@data" in p.parts:  # the index's current generation, as its meta.json names it
            index = Path(path.split("@data")[0])
            try:
                data = json.loads((index / "meta.json").read_text())["data"]
            except (OSError, ValueError, KeyError):
                data = "none"
            p = Path(path.replace("@data", data))
        out[path] = p.read_bytes().hex() if p.exists() else "missing"
    return out


_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9-]*-[0-9]+\.[A-Za-z0-9_]{8}\.tmp$")


def sites(paths: list[str]) -> dict[str, list[int]]:
    """Per kind of file written (temp names as the file they become, numbers as N: every
    shard's checkpoint is one kind, every cell's spill another): its first and last write (k)."""
    out: dict[str, list[int]] = {}
    for k, path in enumerate(paths, start=1):
        p = Path(path)
        m = _TEMP.match(p.name)
        name = re.sub(r"[0-9]+", "N", str(p.with_name(m["name"])) if m else path)
        first_last = out.setdefault(name, [k, k])
        first_last[1] = k
    return out


def main() -> int:
    import faulthandler

    faulthandler.enable()
    spec = json.loads(Path(sys.argv[1]).read_text())
    counter = Path(spec["counter"])
    results = []
    for case in spec["cases"]:
        root = case["root"]
        # the uninterrupted run, counting its writes under root
        prepare(case)
        counter.unlink(missing_ok=True)
        log = counter.with_suffix(".log")
        log.unlink(missing_ok=True)
        os.environ.update(DEDUP_FAULT_ROOT=root, DEDUP_FAULT_AT=str(1 << 60), DEDUP_FAULT_COUNTER=str(counter), DEDUP_FAULT_LOG=str(log))
        code, text = invoke(case["argv"])
        writes = counter.stat().st_size if counter.exists() else 0
        paths = log.read_text().splitlines() if log.exists() else []
        for name in ("DEDUP_FAULT_ROOT", "DEDUP_FAULT_AT", "DEDUP_FAULT_COUNTER", "DEDUP_FAULT_LOG"):
            os.environ.pop(name, None)
        clean = snapshot(case)
        entry = {"name": case["name"], "clean_code": code, "clean_text": text[-2000:], "writes": writes, "attempts": []}
        entry["files"] = files = sites(paths)
        if case.get("ks") == "every":
            ks = list(range(1, writes + 1))
        elif case.get("ks"):
            ks = case["ks"]
        elif case.get("ks") == "first-last":  # the first and the last write of each kind of file
            ks = sorted({k for first_last in files.values() for k in first_last})
        else:  # the first write of each kind of file
            ks = sorted({first for first, _ in files.values()})
        for k in ks:
            if k > writes:
                continue
            prepare(case)
            counter.unlink(missing_ok=True)
            os.environ.update(DEDUP_FAULT_ROOT=root, DEDUP_FAULT_AT=str(k), DEDUP_FAULT_COUNTER=str(counter))
            code, text = invoke(case["argv"])
            for name in ("DEDUP_FAULT_ROOT", "DEDUP_FAULT_AT", "DEDUP_FAULT_COUNTER"):
                os.environ.pop(name, None)
            again, again_text = invoke(case["argv"])
            got = snapshot(case)
            print(f"{case['name']}: k={k} exit {code} / rerun {again}", file=sys.stderr, flush=True)
            entry["attempts"].append(
                {
                    "k": k,
                    "code": code,
                    "text": text[-3000:],
                    "rerun_code": again,
                    "rerun_text": again_text[-2000:],
                    "differs": sorted(p for p in clean if got[p] != clean[p]),
                }
            )
        results.append(entry)
        Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
