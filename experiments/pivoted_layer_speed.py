"""Issue 14: one layer's forward time, dense vs factored vs pivoted at the same parameter count.

SmolLM2-135M's three linear shapes (576 → 1536 gate/up, 1536 → 576 down, 576 → 576 q/o), each at
param_ratio 0.8: factored rank ⌊0.8·m·n/(m+n)⌋, pivoted the largest r with r(m+n−r) ≤ 0.8·m·n
(``linalg.rank_for_param_ratio``). Random weights (time does not depend on the values), float32,
no bias, batch of 1, 8 and 512 tokens; median of ``--rounds`` interleaved rounds of ``--reps``
calls each. Writes ``experiments/results/pivoted_speed/layers.json``.

    OMP_WAIT_POLICY=PASSIVE python experiments/pivoted_layer_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

# isort: off
import svdcompress  # noqa: F401  (first: its OpenMP default must be set before torch loads)
# isort: on
import torch
from torch import nn

from svdcompress.linalg import Factors, rank_for_param_ratio
from svdcompress.modules import LowRankLinear
from svdcompress.provenance import write_results

SHAPES = ((1536, 576), (576, 1536), (576, 576))  # (out, in)
TOKENS = {1: 2000, 8: 1000, 512: 20}  # tokens -> calls per round


def _seconds_per_call(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            module(x)
        start = time.perf_counter()
        for _ in range(reps):
            module(x)
    return (time.perf_counter() - start) / reps


def _modules(out_features: int, in_features: int, ratio: float) -> dict[str, nn.Module]:
    dense = nn.Linear(in_features, out_features, bias=False)
    u, s, vh = torch.linalg.svd(dense.weight.detach().double(), full_matrices=False)
    found: dict[str, nn.Module] = {"dense": dense}
    for storage in ("factored", "pivoted"):
        rank = rank_for_param_ratio(out_features, in_features, ratio, storage)
        root = s[:rank].sqrt()
        factors = Factors((u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float())
        found[storage] = LowRankLinear.from_linear(dense, factors, storage=storage)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/pivoted_speed/layers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for out_features, in_features in SHAPES:
        modules = _modules(out_features, in_features, args.ratio)
        for tokens, reps in TOKENS.items():
            x = torch.randn(tokens, in_features)
            times: dict[str, list[float]] = {name: [] for name in modules}
            for _ in range(args.rounds):  # interleaved, so a busy spell hits every variant alike
                for name, module in modules.items():
                    times[name].append(_seconds_per_call(module, x, reps))
            row = {"shape": [out_features, in_features], "tokens": tokens,
                   "ranks": {n: m.rank for n, m in modules.items() if isinstance(m, LowRankLinear)},
                   "microseconds": {n: round(1e6 * statistics.median(t), 1) for n, t in times.items()}}
            rows.append(row)
            print(row)
    write_results(args.out, {"threads": args.threads, "param_ratio": args.ratio,
                             "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
