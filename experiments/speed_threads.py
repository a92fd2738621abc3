"""Issue 14: decode and prefill speed of an INT8 factored model against dense, per thread count.

One process loads the dense model and the compressed checkpoints once, then, for each round, for
each thread count (``torch.set_num_threads``), measures every variant in turn: dense float32, and
each int8 checkpoint with each ``--kernels`` entry (``runtime.set_runtime`` switches the same
model). Variants and thread counts are interleaved inside each round, so all of them share the
machine's background load, and each ratio to dense is taken within one round and one thread
count. The timing functions are ``svdcompress.bench``'s (prefill = one forward of
``--prefill-tokens`` tokens keeping the last logits; decode = greedy ``generate``, steps after
the first). ``--profile`` adds, per thread count, ``torch.profiler`` self time per operator over
``--profile-steps`` greedy steps at batch 1 for every variant: where the time goes.

    python experiments/speed_threads.py smollm2-135m runs/speed/w06-int8 --threads 1 2 \\
        --kernels dequant float_cache --rounds 3 --profile --out experiments/results/speed
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

# isort: off
import svdcompress  # noqa: F401  (first: its OpenMP default must be set before torch loads)
# isort: on
import torch

from svdcompress.bench import _decode_rate, _load, _prefill_rate, _token_ids, weight_bytes
from svdcompress.modules import LowRankLinear
from svdcompress.provenance import write_results
from svdcompress.runtime import set_runtime

logger = logging.getLogger("speed_threads")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense")
    parser.add_argument("compressed", nargs="+", help="int8 checkpoints (several: each is a variant per kernel)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--kernels", nargs="+", default=["dequant", "float_cache"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2, help="timed runs per quantity and round")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/speed"))
    return parser.parse_args()


def _measure(model, args) -> dict[str, list[float]]:
    """One round of every quantity for one variant: a warm-up run, then ``--runs`` timed runs."""
    out = {}
    ids = _token_ids(model, 1, args.prefill_tokens, 0)
    out["prefill"] = [_prefill_rate(model, ids) for _ in range(args.runs + 1)][1:]
    for batch in args.batch_sizes:
        ids = _token_ids(model, batch, args.prompt_tokens, batch)
        out[f"decode_b{batch}"] = [_decode_rate(model, ids, args.new_tokens)
                                   for _ in range(args.runs + 1)][1:]
    return out


def _profile(model, steps: int) -> dict:
    ids = _token_ids(model, 1, 32, 1)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "do_sample": False,
              "max_new_tokens": steps, "min_new_tokens": steps, "pad_token_id": 0}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model.generate(**kwargs)
        wall = time.perf_counter() - start
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        totals[event.key] = totals.get(event.key, 0.0) + event.self_cpu_time_total / 1e6
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    return {"wall_s": wall, "ops_s": sum(totals.values()),
            "top": [{"op": k, "self_s": v, "share": v / wall} for k, v in top]}


def _variants(dense, compressed: dict, kernels):
    """(name, model) pairs: dense, then every checkpoint with every kernel (``folder/kernel`` when
    there are several checkpoints)."""
    yield "dense", dense
    for label, model in compressed.items():
        for kernel in kernels:
            set_runtime(model, kernel)
            yield (kernel if len(compressed) == 1 else f"{label}/{kernel}"), model


def _summary(samples: dict, ratios: dict) -> list[dict]:
    rows = []
    for (threads, variant, quantity), values in sorted(samples.items()):
        ratio = ratios.get((threads, variant, quantity), [])
        rows.append({"threads": threads, "variant": variant, "quantity": quantity,
                     "tokens_per_s": values, "median": statistics.median(values),
                     "vs_dense_per_round": ratio,
                     "vs_dense_median": statistics.median(ratio) if ratio else None,
                     "vs_dense_min": min(ratio) if ratio else None,
                     "vs_dense_max": max(ratio) if ratio else None})
    return rows


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = _args()
    dense = _load(args.dense)
    compressed = {Path(c).name: _load(c) for c in args.compressed}
    samples: dict[tuple, list[float]] = {}
    ratios: dict[tuple, list[float]] = {}
    loads = [os.getloadavg()[0]]
    with torch.inference_mode():
        for _ in range(max(1, len(args.kernels))):  # warm-up: builds any kernel's caches
            for _name, model in _variants(dense, compressed, args.kernels):
                model(input_ids=_token_ids(model, 1, 8, 0))
        for round_ in range(args.rounds):
            for threads in args.threads:
                torch.set_num_threads(threads)
                medians = {}
                for name, model in _variants(dense, compressed, args.kernels):
                    for quantity, values in _measure(model, args).items():
                        samples.setdefault((threads, name, quantity), []).extend(values)
                        medians[(name, quantity)] = statistics.median(values)
                for (name, quantity), value in medians.items():
                    ratios.setdefault((threads, name, quantity), []).append(
                        value / medians[("dense", quantity)])
                logger.info("round %d threads %d: %s", round_, threads, {
                    f"{n}/{q}": round(v, 2) for (n, q), v in medians.items()})
            loads.append(os.getloadavg()[0])
        profiles = {}
        if args.profile:
            for threads in args.threads:
                torch.set_num_threads(threads)
                for name, model in _variants(dense, compressed, args.kernels):
                    profiles[f"{name}@{threads}"] = _profile(model, args.profile_steps)
    cache_bytes = sum(m._packs.nbytes() for model in compressed.values() for m in model.modules()
                      if isinstance(m, LowRankLinear))
    result = {
        "dense": args.dense, "compressed": args.compressed, "threads": args.threads,
        "kernels": args.kernels, "rounds": args.rounds, "runs": args.runs,
        "prefill_tokens": args.prefill_tokens, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "loadavg_1min_per_round": loads,
        "weight_bytes": {"dense": weight_bytes(dense),
                         **{label: weight_bytes(model) for label, model in compressed.items()}},
        "float_cache_bytes": cache_bytes,
        "rows": _summary(samples, ratios), "profiles": profiles,
    }
    path = write_results(args.out / "speed_threads.json", result)
    for row in result["rows"]:
        ratio = "" if row["variant"] == "dense" else (
            f"  ×{row['vs_dense_median']:.2f} [{row['vs_dense_min']:.2f}, {row['vs_dense_max']:.2f}]")
        print(f"threads={row['threads']} {row['variant']:28s} {row['quantity']:10s} "
              f"{row['median']:8.1f} tok/s{ratio}")
    print(f"load average per round: {[round(x, 2) for x in loads]}; float cache {cache_bytes / 2**20:.1f} MiB; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
