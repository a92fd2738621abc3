"""Issue 4: per-layer CPU kernels for low-rank int8 factors, at SmolLM2-135M's layer shapes.

For each linear shape of SmolLM2 (q/o 576×576, k/v 192×576, gate/up 1536×576, down 576×1536) at the
rank whitened SVD gives at ``--param-ratio``, and for decode (1 token) and prefill (512 tokens):
microseconds per call of

- ``dense``: the original fp32 ``nn.Linear`` (``F.linear``);
- ``float``: float32 factors, two ``F.linear`` calls;
- ``dequant``, ``int_mm``, ``fbgemm``, ``int8pack``: int8 factors with each kernel of
  :mod:`svdcompress.runtime`, run through the real ``LowRankLinear`` module;

and each kernel's relative error against the float factors (random Gaussian factors: the
activation-quantizing kernels add about 1%). Kernels are interleaved inside each round so they
share the machine's background load; the median over rounds is reported.

    python experiments/kernel_bench.py --threads 1 --out experiments/results/kernels

``--break-even`` (issue 14) measures instead, at one token (decode) and for each thread count of
``--break-even-threads``, dense against float factors and int8 factors (``--break-even-kernel``,
default ``auto``; the committed break_even.json was measured with ``dequant``) over a grid of
ranks, with **cold weights** (calls cycle through copies of the layer totalling 3× the L3 cache,
as at decode, where each layer's weights are read once per token), and reports per shape the
break-even rank: the largest rank of the grid below which the factored layer is faster than the
dense one (``float_cache`` runs the same two matmuls as float). ``--break-even-storage pivoted``
measures pivoted modules instead (ranks up to min(out, in) − 1, where pivoting still saves
numbers); the file records the storage, and the allocator applies its caps to that storage only.

    python experiments/kernel_bench.py --break-even --break-even-threads 1 2 --out experiments/results/speed
    python experiments/kernel_bench.py --break-even --break-even-storage pivoted --break-even-threads 1 2 \
        --out experiments/results/speed/break_even_pivoted
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import time
from pathlib import Path

# isort: off
import svdcompress  # noqa: F401  (first: its OpenMP default must be set before torch loads)
# isort: on
import torch
import torch.nn.functional as F

from svdcompress.linalg import Factors, break_even_rank
from svdcompress.modules import LowRankLinear
from svdcompress.provenance import write_results
from svdcompress.runtime import available_kernels

logger = logging.getLogger("kernel_bench")

SHAPES = {  # role: (out, in) of SmolLM2-135M
    "q_proj/o_proj": (576, 576),
    "k_proj/v_proj": (192, 576),
    "gate_proj/up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
PER_BLOCK = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--param-ratio", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/kernels"))
    parser.add_argument("--break-even", action="store_true")
    parser.add_argument("--break-even-threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--break-even-kernel", default="auto", help="the int8 factors' kernel")
    parser.add_argument("--break-even-storage", default="factored", choices=["factored", "pivoted"])
    parser.add_argument("--rank-step", type=int, default=16)
    return parser.parse_args()


def _time_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _modules(out_f: int, in_f: int, rank: int, storage: str = "factored") -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    factors = Factors(torch.randn(out_f, rank) / rank**0.5, torch.randn(rank, in_f) / in_f**0.5)
    float_module = LowRankLinear.from_linear(linear, factors, storage=storage)
    int8_module = LowRankLinear.from_linear(linear, factors, storage=storage).quantize_(8)
    return {"dense": linear, "float": float_module, "int8": int8_module}


def _callables(mods: dict, x: torch.Tensor) -> dict:
    weight = mods["dense"].weight
    calls = {"dense": lambda: F.linear(x, weight), "float": lambda: mods["float"](x)}

    def with_kernel(kernel):
        def call():
            mods["int8"].kernel = kernel
            return mods["int8"](x)
        return call

    for kernel in available_kernels():
        if kernel != "auto":
            calls[kernel] = with_kernel(kernel)
    return calls


def _errors(calls: dict) -> dict:
    reference = calls["float"]()
    return {name: ((fn() - reference).norm() / reference.norm()).item()
            for name, fn in calls.items() if name not in ("dense", "float")}


def bench_shape(role: str, out_f: int, in_f: int, args) -> list[dict]:
    rank = max(1, math.floor(args.param_ratio * out_f * in_f / (out_f + in_f)))
    mods, rows = _modules(out_f, in_f, rank), []
    for tokens in args.tokens:
        x = torch.randn(tokens, in_f)
        calls = _callables(mods, x)
        repeats = 200 if tokens == 1 else max(2, 2000 // tokens)
        for fn in calls.values():  # warm-up, and fbgemm packs its weights here
            fn()
        samples = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                slow = name == "int8pack" and tokens > 1  # ~1 s per call: once per round is plenty
                samples[name].append(_time_us(fn, 1 if slow else repeats))
        errors = _errors(calls)
        for name, values in samples.items():
            rows.append({"role": role, "shape": [out_f, in_f], "rank": rank, "tokens": tokens,
                         "kernel": name, "us_median": statistics.median(values),
                         "us_min": min(values), "us_max": max(values),
                         "rel_error_vs_float": errors.get(name, 0.0)})
        logger.info("%s tokens=%d done", role, tokens)
    return rows


def _per_block(rows: list[dict], tokens: int, kernel: str) -> float:
    return sum(r["us_median"] * PER_BLOCK[r["role"]] for r in rows
               if r["tokens"] == tokens and r["kernel"] == kernel)


def table(rows: list[dict], tokens_list: list[int]) -> str:
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    lines = ["| layer (out×in, rank) | tokens | " + " | ".join(kernels) + " |",
             "|---|---|" + "---|" * len(kernels)]
    for role, (out_f, in_f) in SHAPES.items():
        for tokens in tokens_list:
            cells = {r["kernel"]: r for r in rows if r["role"] == role and r["tokens"] == tokens}
            rank = next(iter(cells.values()))["rank"]
            lines.append(f"| {role} ({out_f}×{in_f}, r={rank}) | {tokens} | " + " | ".join(
                f"{cells[k]['us_median']:.0f}" for k in kernels) + " |")
    for tokens in tokens_list:
        lines.append(f"| **one block (7 layers)** | {tokens} | " + " | ".join(
            f"**{_per_block(rows, tokens, k):.0f}**" for k in kernels) + " |")
    errors = {k: max(r["rel_error_vs_float"] for r in rows if r["kernel"] == k) for k in kernels}
    lines.append("| max relative error vs float factors | | " + " | ".join(
        "–" if k in ("dense", "float") else f"{errors[k]:.4f}" for k in kernels) + " |")
    return "\n".join(lines)


COLD_BYTES = 96 * 2**20  # copies of a layer cycled per pass: 3× the 32 MiB L3, so weights come from DRAM


def _cold_us(module: torch.nn.Module, x: torch.Tensor, nbytes: int) -> float:
    """µs per call with weights cold, as at decode (each layer's weights are used once per token):
    calls cycle through enough copies of ``module`` to exceed the caches."""
    copies = [copy.deepcopy(module) for _ in range(min(4000, max(2, COLD_BYTES // nbytes)))]
    for m in copies[:2]:
        m(x)  # builds any kernel state
    start = time.perf_counter()
    for m in copies:
        m(x)
    return (time.perf_counter() - start) / len(copies) * 1e6


def _break_even_shape(out_f: int, in_f: int, args) -> dict:
    """µs per decode call (1 token, cold weights) of dense, float and int8 factors at each rank."""
    full = break_even_rank(out_f, in_f, args.break_even_storage)  # as many numbers as W
    top = min(out_f, in_f) - (args.break_even_storage == "pivoted")  # pivoted: a gather is left at full rank
    ranks = sorted({*range(args.rank_step, top + 1, args.rank_step), top})  # int8 can pass `full`
    x = torch.randn(1, in_f)
    samples: dict[str, list[float]] = {"dense@0": []}
    for _ in range(args.rounds):
        for r in ranks:
            mods = _modules(out_f, in_f, r, args.break_even_storage)
            mods["int8"].kernel = args.break_even_kernel
            samples["dense@0"].append(_cold_us(mods["dense"], x, 4 * out_f * in_f))
            samples.setdefault(f"float@{r}", []).append(_cold_us(mods["float"], x, mods["float"].weight_bytes()))
            samples.setdefault(f"int8@{r}", []).append(_cold_us(mods["int8"], x, mods["int8"].weight_bytes()))
    us = {key: statistics.median(v) for key, v in samples.items()}
    dense = us["dense@0"]
    result = {"shape": [out_f, in_f], "full_param_rank": full, "ranks": ranks, "us": us,
              "us_min": {key: min(v) for key, v in samples.items()}}
    for kind in ("float", "int8"):
        faster = [r for r in ranks if us[f"{kind}@{r}"] < dense]
        below = [r for r in ranks if all(us[f"{kind}@{s}"] < dense for s in ranks if s <= r)]
        result[f"break_even_{kind}"] = max(below) if below else 0
        result[f"faster_anywhere_{kind}"] = faster
    return result


def break_even(args) -> None:
    load_before, rows = os.getloadavg()[0], []
    with torch.inference_mode():
        for threads in args.break_even_threads:
            torch.set_num_threads(threads)
            for role, (o, i) in SHAPES.items():
                row = {"role": role, "threads": threads, **_break_even_shape(o, i, args)}
                rows.append(row)
                logger.info("%s threads=%d: dense %.1f µs, break-even float r=%d int8 r=%d (full %d)",
                            role, threads, row["us"]["dense@0"], row["break_even_float"],
                            row["break_even_int8"], row["full_param_rank"])
    result = {"storage": args.break_even_storage, "threads": args.break_even_threads,
              "int8_kernel": args.break_even_kernel,
              "rounds": args.rounds, "rank_step": args.rank_step,
              "torch": torch.__version__, "loadavg": [load_before, os.getloadavg()[0]], "rows": rows}
    write_results(args.out / "break_even.json", result)
    print(f"| layer (out×in) | full-param rank | threads | dense µs | break-even rank, float | int8 ({args.break_even_kernel}) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['role']} ({row['shape'][0]}×{row['shape'][1]}) | {row['full_param_rank']} | "
              f"{row['threads']} | {row['us']['dense@0']:.0f} | {row['break_even_float']} | "
              f"{row['break_even_int8']} |")
    print(f"load average {load_before:.2f}→{os.getloadavg()[0]:.2f}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = _args()
    if args.break_even:
        break_even(args)
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        rows = [row for role, (o, i) in SHAPES.items() for row in bench_shape(role, o, i, args)]
    result = {"param_ratio": args.param_ratio, "threads": args.threads, "rounds": args.rounds,
              "torch": torch.__version__, "loadavg": [load_before, os.getloadavg()[0]], "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out / "kernels.json", result)
    markdown = table(rows, args.tokens)
    (args.out / "kernels.md").write_text(markdown + "\n")
    print(markdown)
    print(f"threads={args.threads}, median µs per call over {args.rounds} rounds, "
          f"load average {load_before:.2f}→{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
