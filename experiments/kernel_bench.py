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
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from svdcompress.linalg import Factors
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
    return parser.parse_args()


def _time_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _modules(out_f: int, in_f: int, rank: int) -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    factors = Factors(torch.randn(out_f, rank) / rank**0.5, torch.randn(rank, in_f) / in_f**0.5)
    float_module = LowRankLinear.from_linear(linear, factors)
    int8_module = LowRankLinear.from_linear(linear, factors).quantize_(8)
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = _args()
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
