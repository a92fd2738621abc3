"""Issue 15: give results files written before ``svdcompress.provenance`` existed an honest one.

Every JSON file under ``experiments/results/`` must name the command that wrote it and the code
version (``tests/test_provenance.py`` checks). Files written since carry a ``provenance`` from
:func:`svdcompress.provenance.write_results`. For older ones this script adds a block that says it
was backfilled: the writer (the script or command documented in BENCHMARKS.md for that file), the
commit that added the file (from ``git log``) as the code version, and nothing it does not know
(no machine, no versions, no date of the run). Files that already carry a provenance are left
alone; the measured data are never touched. A file holding a bare list is wrapped as
``{"runs": [...]}`` (the form the script now writes).

    python experiments/backfill_provenance.py            # add what is missing
    python experiments/backfill_provenance.py --check    # list files without one, exit 1 if any
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from svdcompress.fetch import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("experiments/results")

_ISSUE6_COPY = ("copied by hand from the checkpoint folder that this command wrote (runs/ is not "
                "committed); the command is the one results.json records for the run")
# Relative path (or folder prefix) -> (command that wrote it, how it got here). From BENCHMARKS.md.
WRITERS: dict[str, tuple[str, str]] = {
    "engine_grid/results.json": (
        "python experiments/engine_grid.py --out runs/engine_grid --calib-samples 64 --eval-samples 32",
        "two processes with --runs splitting the grid, merged into this file (BENCHMARKS.md)"),
    "int8/int8_benchmarks.json": (
        "python experiments/int8_benchmarks.py --runs-dir runs/issue4 --out experiments/results/int8 "
        "--threads 1 --rounds 2 --runs 3", "written by the script"),
    "speed/bench_threads2.json": (
        "svdcompress bench runs/speed/w06-int8 --against smollm2-135m --threads 2 --rounds 2 --runs 2 "
        "--json experiments/results/speed/bench_threads2.json",
        "written by the command, whose --json did not yet record its provenance (fixed the same day)"),
    "speed/bench_threads1.json": (
        "svdcompress bench runs/speed/w06-int8 --against smollm2-135m --threads 1 --rounds 2 --runs 2 "
        "--json experiments/results/speed/bench_threads1.json",
        "written by the command, whose --json did not yet record its provenance (fixed the same day)"),
    "int8/profile_decode.json": (
        "python experiments/profile_decode.py smollm2-135m runs/issue4/whiten-p06-int8 --threads 1 "
        "--json runs/issue4/profile_decode.json",
        "copied by hand from runs/issue4/profile_decode.json; wrapped as {\"runs\": [...]}"),
    "kernels/kernels.json": (
        "python experiments/kernel_bench.py --threads 1 --rounds 7 --out experiments/results/kernels",
        "written by the script"),
    "seeds/seeds_k_only.json": (
        "python experiments/seeds_k_only.py --out runs/issue4/seeds --threads 1",
        "copied by hand from runs/issue4/seeds (BENCHMARKS.md)"),
    "allocation/results.json": (
        "python experiments/allocation_benchmark.py --out experiments/results/allocation --ablations",
        "written by the script"),
    "allocation/analysis/": (
        "python experiments/allocation_benchmark.py --out experiments/results/allocation --ablations",
        "written by the library (svdcompress.analysis.analyze / svdcompress analyze) that the "
        "script calls"),
    "issue6/allocated-recover-p60-recovery_report.json": (
        "svdcompress recover runs/issue6/allocated-p60 --steps 100 --lr 0.0001 --batch-size 4 "
        "--seq-len 256 --device cpu --out runs/issue6/allocated-recover-p60", _ISSUE6_COPY),
    "issue6/allocated-recover-p80-recovery_report.json": (
        "svdcompress recover runs/issue6/allocated-p80 --steps 200 --lr 0.0001 --batch-size 4 "
        "--seq-len 256 --device cpu --out runs/issue6/allocated-recover-p80", _ISSUE6_COPY),
    "issue6/svd-refine-p80-report.json": (
        "svdcompress compress smollm2-135m --method svd --param-ratio 0.8 --calib-samples 64 "
        "--seq-len 512 --refine-iters 50 --refine-lr 0.03 --out runs/issue6/svd-refine-p80",
        _ISSUE6_COPY + " (compression_report.json)"),
    "issue6/superseded-cross-refine-p80-report.json": (
        "svdcompress compress smollm2-135m --method whiten --param-ratio 0.8 --calib-samples 64 "
        "--seq-len 512 --refine-iters 50 --refine-lr 0.03 --out runs/issue6/refine-p80",
        "copied by hand (compression_report.json) from a run of a code state that no longer "
        "exists (see results.json 'superseded'); the same command today fits another objective"),
}


def _writer(relative: str) -> tuple[str, str] | None:
    if relative in WRITERS:
        return WRITERS[relative]
    return next((v for k, v in WRITERS.items() if k.endswith("/") and relative.startswith(k)), None)


def _commit_that_added(path: Path) -> str | None:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H", "--", str(path)],
        capture_output=True, text=True, check=False)
    commits = done.stdout.split()
    return commits[-1] if done.returncode == 0 and commits else None


def backfilled(path: Path, relative: str) -> dict:
    writer = _writer(relative)
    if writer is None:
        raise SystemExit(f"{path}: no known writer; add it to WRITERS or regenerate the file "
                         "with a script that uses svdcompress.provenance.write_results")
    command, how = writer
    commit = _commit_that_added(path)
    return {
        "command": command,
        "code_version": {"commit": commit, "package": None, "dirty": None,
                         "note": "the commit that added this file (git log --diff-filter=A); the "
                                 "run itself recorded no code version"},
        "backfilled": True,
        "how": how,
        "note": "backfilled by experiments/backfill_provenance.py: the file predates "
                "svdcompress.provenance; versions, machine and date of the run were not recorded",
    }


def missing(folder: Path) -> list[Path]:
    out = []
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text())
        block = data.get("provenance") if isinstance(data, dict) else None
        if not (isinstance(block, dict) and block.get("command") and block.get("code_version")):
            out.append(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=ROOT / RESULTS)
    parser.add_argument("--check", action="store_true", help="only list files without provenance")
    args = parser.parse_args()
    todo = missing(args.folder)
    if args.check:
        for path in todo:
            print(f"no provenance: {path}")
        sys.exit(1 if todo else 0)
    for path in todo:
        text = path.read_text()
        data = json.loads(text)
        if isinstance(data, list):
            data = {"runs": data}
        data["provenance"] = backfilled(path, path.relative_to(args.folder).as_posix())
        atomic_write_text(path, in_layout_of(text, data))
        print(f"backfilled {path}")


def in_layout_of(original: str, data: dict) -> str:
    """``data`` as JSON in the original file's indentation and escaping, so the file's diff shows
    only the added provenance."""
    lines = original.splitlines()
    second = lines[1] if len(lines) > 1 else ""
    indent = (len(second) - len(second.lstrip(" "))) or None
    ascii_only = "\\u" in original or all(ord(c) < 128 for c in original)
    return json.dumps(data, indent=indent, ensure_ascii=ascii_only) + ("\n" if original.endswith("\n") else "")


if __name__ == "__main__":
    main()
