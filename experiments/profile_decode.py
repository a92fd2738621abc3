"""Issue 4: where decode time goes, per operator, for each model given (greedy, batch 1).

For each model: warm up, then profile ``--steps`` greedy decode steps (``torch.profiler``, CPU) and
print the operators with the most self time, their share of the wall time, and what is left
outside operators (Python and framework overhead). Models are profiled one after another in this
process, so run it with few threads on a quiet machine and compare shares, not absolute times.

    python experiments/profile_decode.py smollm2-135m runs/issue4/whiten-p06-int8 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# isort: off
import svdcompress  # noqa: F401  (first: its OpenMP default must be set before torch loads)
# isort: on
import torch

from svdcompress.bench import _load, _token_ids
from svdcompress.provenance import write_results


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def profile(spec: str, steps: int) -> dict:
    model = _load(spec)
    ids = _token_ids(model, 1, 32, seed=1)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "do_sample": False,
              "max_new_tokens": steps, "min_new_tokens": steps, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(**{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up, packing
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            model.generate(**kwargs)
            wall = time.perf_counter() - start
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    in_ops = sum(e.self_cpu_time_total for e in ops) / 1e6
    rows = [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in ops]
    return {"spec": spec, "wall_s": wall, "in_ops_s": in_ops, "steps": steps, "ops": rows}


def report(result: dict, top: int) -> str:
    wall = result["wall_s"]
    lines = [f"## {result['spec']}: {result['steps']} decode steps in {wall:.2f} s "
             f"({result['steps'] / wall:.1f} tok/s under the profiler)",
             "| operator | calls | self s | share of wall |", "|---|---|---|---|"]
    for row in result["ops"][:top]:
        lines.append(f"| {row['op']} | {row['calls']} | {row['self_s']:.3f} | {row['self_s'] / wall:.1%} |")
    outside = wall - result["in_ops_s"]
    lines.append(f"| (outside operators: Python, generate, module calls) | | {outside:.3f} | "
                 f"{outside / wall:.1%} |")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    results = [profile(spec, args.steps) for spec in args.models]
    for result in results:
        print(report(result, args.top), end="\n\n")
    if args.json:
        write_results(args.json, {"runs": results})


if __name__ == "__main__":
    main()
