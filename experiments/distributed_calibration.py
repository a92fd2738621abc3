"""Issue 12: compression under torch.distributed (torchrun, gloo) against one process, on SmolLM2.

Compresses the real SmolLM2-135M with whiten at param_ratio 0.8 on ``--windows`` × ``--seq-len``
calibration tokens (wiki calib split) three times:

- one process with 2 torch threads (the machine's two cores), and one with 1 thread;
- ``torchrun --standalone --nproc_per_node 2`` with 1 thread per rank: each rank runs half of the
  calibration batches, the statistics are all-reduced, each module is factorized by one rank and
  broadcast (``svdcompress.distributed``).

It reports the wall time of ``compress_`` (model loading excluded) of each run and how far the
factors are apart: 2 processes against 1 process at the same 1 thread per process (what
distributing changes), and 2 threads against 1 (what the thread count alone changes, for scale).
Per module: ‖ΔW'‖/‖W'‖ of the product W' = left @ right (factors themselves are unique only up to
sign and rotation within nearly equal singular values), max |Δ| / max |factor| of each factor, and
the reported output errors. On a 2-core machine shared with other jobs the two ranks compete for
the cores the single process uses with 2 threads: this shows correctness, not speed-up.

    python experiments/distributed_calibration.py --out experiments/results/distributed
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from svdcompress.provenance import write_results

logger = logging.getLogger("distributed_calibration")

SCRIPT = Path(__file__).resolve()
RUNS = (  # name, ranks, torch threads per rank
    ("1 process, 2 threads", 1, 2),
    ("1 process, 1 thread", 1, 1),
    ("2 processes", 2, 1),
)


def _compress(windows: int, seq_len: int, param_ratio: float) -> tuple[dict, dict, float]:
    """(factors, report, seconds of compress_) for this process (one rank, or the only one)."""
    from svdcompress import WhitenConfig, compress_, load_model
    from svdcompress.calibration import Calibration
    from svdcompress.datasets import token_windows
    from svdcompress.modules import LowRankLinear

    model, tokenizer = load_model("smollm2-135m")
    tokens = token_windows(tokenizer, "wiki", "calib", seq_len=seq_len, n_samples=windows, seed=0)
    calibration = Calibration(tokens, source=f"wiki:calib seq_len={seq_len} n={windows} seed=0")
    start = time.perf_counter()
    report = compress_(model, WhitenConfig(param_ratio=param_ratio), calibration)
    seconds = time.perf_counter() - start
    factors = {f"{name}.{part}": getattr(module, part).detach().contiguous()
               for name, module in model.named_modules() if isinstance(module, LowRankLinear)
               for part in ("left", "right")}
    return factors, report.to_dict(), seconds


def _write_run(folder: Path, factors: dict, report: dict, seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(factors, str(folder / "factors.safetensors"))
    (folder / "run.json").write_text(json.dumps({"seconds": seconds, "report": report}))


def worker(args) -> None:
    """One rank under torchrun (or the single process): compress, write factors and timing."""
    from svdcompress import distributed

    torch.set_num_threads(args.threads)
    distributed.init_from_env()
    factors, report, seconds = _compress(args.windows, args.seq_len, args.param_ratio)
    if distributed.is_main():
        _write_run(Path(args.scratch), factors, report, seconds)
    distributed.barrier()


def _launch(args, scratch: Path, ranks: int, threads: int) -> float:
    """Run this script as a worker, under torchrun when ``ranks`` > 1; returns the wall seconds."""
    worker_args = [str(SCRIPT), "--worker", "--scratch", str(scratch), "--threads", str(threads),
                   "--windows", str(args.windows), "--seq-len", str(args.seq_len),
                   "--param-ratio", str(args.param_ratio)]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([*launcher, *worker_args], env=env, check=True)
    return time.perf_counter() - start


def _median(values) -> float:
    return sorted(values)[len(values) // 2]


def _agreement(reference: dict, other: dict, ref_report: dict, other_report: dict) -> dict:
    """How far two runs' factors are apart. Factors are unique only up to sign and rotation
    within (nearly) equal singular values, so the product left @ right is what must agree."""
    relative = {key: ((other[key] - value).abs().max() / value.abs().max()).item()
                for key, value in reference.items()}
    products = {}
    for key in (k.removesuffix(".left") for k in reference if k.endswith(".left")):
        mine = reference[f"{key}.left"].double() @ reference[f"{key}.right"].double()
        theirs = other[f"{key}.left"].double() @ other[f"{key}.right"].double()
        products[key] = ((theirs - mine).norm() / mine.norm()).item()
    ref_errors = {m["name"]: m["output_error"] for m in ref_report["modules"]}
    error_gaps = [abs(m["output_error"] - ref_errors[m["name"]]) / ref_errors[m["name"]]
                  for m in other_report["modules"]]
    worst = max(products, key=products.get)
    return {
        "modules": len(products),
        "same_keys_and_shapes": reference.keys() == other.keys()
        and all(reference[k].shape == other[k].shape for k in reference),
        "bitwise_equal_factor_tensors": sum(torch.equal(reference[k], other[k]) for k in reference),
        "factor_tensors": len(relative),
        "max_relative_product_difference": products[worst],
        "worst_module": worst,
        "median_relative_product_difference": _median(list(products.values())),
        "max_relative_factor_difference": max(relative.values()),
        "median_relative_factor_difference": _median(list(relative.values())),
        "max_relative_output_error_difference": max(error_gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/distributed"))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--param-ratio", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # worker's
    parser.add_argument("--skip-two-threads", action="store_true",
                        help="leave out the 1-process 2-thread run (a busy machine: ~12 min each)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="svdcompress-dist-") as tmp:
        runs = {}
        for name, ranks, threads in RUNS[1:] if args.skip_two_threads else RUNS:
            logger.info("compressing in %s", name)
            process_seconds = _launch(args, Path(tmp) / str(ranks), ranks, threads)
            run = json.loads((Path(tmp) / str(ranks) / "run.json").read_text())
            factors = load_file(str(Path(tmp) / str(ranks) / "factors.safetensors"))
            runs[name] = {"ranks": ranks, "threads_per_rank": threads, "factors": factors,
                          "report": run["report"], "compress_seconds": round(run["seconds"], 1),
                          "process_seconds": round(process_seconds, 1)}
        one, two = runs["1 process, 1 thread"], runs["2 processes"]
        # Like for like (1 thread per rank): what distributing changes. Against 2 threads: what
        # another thread count alone changes (float32 matmuls block differently).
        agreement = _agreement(one["factors"], two["factors"], one["report"], two["report"])
        threads = runs.get("1 process, 2 threads")
        thread_effect = threads and _agreement(one["factors"], threads["factors"], one["report"],
                                               threads["report"])
    summary = {name: {k: v for k, v in run.items() if k not in ("factors", "report")}
               | {"target_param_ratio": run["report"]["summary"]["target_param_ratio"]}
               for name, run in runs.items()}
    result = {
        "model": "smollm2-135m", "method": "whiten", "param_ratio": args.param_ratio,
        "calibration": f"wiki:calib {args.windows}x{args.seq_len} seed=0, batches of 4",
        "backend": "gloo", "runs": summary,
        "agreement_2_processes_vs_1_process_1_thread": agreement,
        "agreement_1_process_2_threads_vs_1_thread": thread_effect,
        "seconds_2_processes_over_1_process_1_thread": round(
            two["compress_seconds"] / one["compress_seconds"], 2),
        "note": "2 processes on a 2-core machine shared with other jobs: this checks correctness; "
                "it cannot show a speed-up (the single process already uses both cores).",
    }
    path = write_results(args.out / "smollm2_whiten08.json", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
