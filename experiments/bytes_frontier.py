"""Issue 14: the memory frontier — quality versus bytes of the decoder linears, low rank vs RTN.

Per byte budget (a fraction of the float32 bytes of every decoder linear), the byte allocator
chooses per module among dense float, dense INT8 (per-row), low-rank float and low-rank INT8
factors at a grid of ranks (:func:`svdcompress.allocation.allocate` with ``int8``), minimising the
predicted KL measured on calibration windows (``wiki/calib``, 64×512) only. Against it, at their own
bytes: INT8 alone (per-row symmetric, ``quantize_weights_``) and 4-bit round-to-nearest with groups
of 128 and 32 (asymmetric min-max, fp16 scale and zero point per group, ``rtn_quantize_``; fake
quantization, bytes counted analytically). The allocator is also run at exactly the baselines'
bytes. Every model: held-out ``wiki/eval`` and ``sotu/eval`` perplexity (32×512 windows, seed 0)
and fact recall (``load_facts(300, seed=0)``), dense measured in the same run.

Each finished row is written to ``OUT/results.json`` at once; a rerun skips it. Writes
``OUT/table.md`` and ``OUT/bytes_frontier.png``.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python experiments/bytes_frontier.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import math
from collections import Counter
from pathlib import Path

import torch
from allocation_benchmark import Results, _data, _evaluate, calibration_windows, start_run

from svdcompress import WhitenConfig, compress_, load_model
from svdcompress.allocation import CostModel, allocate
from svdcompress.analysis import analyze
from svdcompress.calibration import Calibration
from svdcompress.int8_analysis import int8_sensitivity
from svdcompress.modules import LowRankLinear, dense_weight
from svdcompress.provenance import write_results
from svdcompress.quantize import quantize_weights_, rtn_quantize_
from svdcompress.targets import find_targets

logger = logging.getLogger("bytes_frontier")

BASELINES = {  # row name -> (bits, group size); None: per-row INT8
    "int8-rtn": None,
    "rtn4-g128": (4, 128),
    "rtn4-g32": (4, 32),
}
GGUF_NOTE = ("SmolLM2-135M here is dequantized from a 4-bit GGUF (its weights already lie near a "
             "4-bit grid), which flatters 4-bit round-to-nearest.")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/bytes_frontier"))
    parser.add_argument("--analysis-dir", type=Path,
                        default=Path("experiments/results/allocation/analysis"),
                        help="the Issue 5 sensitivity analysis (reused; computed there if absent)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.30, 0.20, 0.10, 0.15, 0.25],
                        help="fractions of the decoder linears' float32 bytes")
    parser.add_argument("--no-matched", action="store_true",
                        help="skip the allocations at exactly the baselines' bytes")
    parser.add_argument("--calib-samples", type=int, default=64,
                        help="calibration windows of the allocation (the Issue 5 analysis)")
    parser.add_argument("--compress-windows", type=int, default=16,
                        help="the first N of those windows calibrate compress_ (time: one thread)")
    parser.add_argument("--int8-energies", action="store_true",
                        help="also measure INT8 factors' whitened error (a calibration pass + SVDs)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--min-rank", type=int, default=8)
    parser.add_argument("--rank-step", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--outputs-only", action="store_true", help="rewrite table and plot only")
    parser.add_argument("--checks-only", action="store_true",
                        help="only record the Q4_1 grid check and the allocator's plans (no runs)")
    return parser.parse_args()


def linear_bytes(model, names: list[str]) -> int:
    """Bytes of the decoder linears ``names`` as stored now (INT8: codes + scales; + biases)."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
        if isinstance(module, LowRankLinear):
            total += module.weight_bytes() + bias
        else:
            weight = dense_weight(module)
            total += weight.numel() * weight.element_size() + bias
    return total


def _q4_1_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q4_1: per block of 32, x ≈ d·q + m with q in 0..15, d = (max − min)/15, m = min
    (no zero point, range not widened to 0). Exact here if the weights came from a Q4_1 GGUF."""
    blocks = weight.double().reshape(weight.shape[0], -1, 32)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = ((high - low) / 15).clamp_min(1e-30)
    return (torch.round((blocks - low) / step) * step + low).reshape(weight.shape)


def gguf_grid_check(model) -> dict:
    """How far each decoder linear lies from a Q4_1 grid (SQNR of the Q4_1 round trip; exact
    reproduction gives ~3000 dB in float64) and from our RTN g32 (for contrast)."""
    from svdcompress.linalg import quantize_groupwise, sqnr_db

    q4_1, ours = [], []
    for name in _names(model):
        weight = dense_weight(model.get_submodule(name)).detach()
        q4_1.append(sqnr_db(weight, _q4_1_round_trip(weight)))
        ours.append(sqnr_db(weight, quantize_groupwise(weight, 4, 32)[0]))
    return {"modules": len(q4_1), "q4_1_sqnr_db_min": min(q4_1), "q4_1_sqnr_db_median": sorted(q4_1)[len(q4_1) // 2],
            "rtn4_g32_sqnr_db_median": sorted(ours)[len(ours) // 2]}


def _names(model) -> list[str]:
    return [t.name for t in find_targets(model, ("all-linear",))]


def _baseline(name: str, original, tokenizer, data, fp32_bytes: int) -> dict:
    model = copy.deepcopy(original)
    spec = BASELINES[name]
    if spec is None:
        summary = quantize_weights_(model, 8)
        stored = linear_bytes(model, _names(original))  # real INT8 storage: count it
        assert stored == summary["target_bytes_after"], (stored, summary)
    else:
        summary = rtn_quantize_(model, spec[0], spec[1])
        stored = summary["target_bytes_after"]  # fake quantization: the analytic count
    entry = {"kind": "baseline", "bytes": stored, "byte_ratio": stored / fp32_bytes,
             "summary": summary, **_evaluate(model, tokenizer, data)}
    del model
    gc.collect()
    return entry


def _plan(budget: int, analysis, int8, fp32_bytes: int, args) -> dict:
    """What the allocator chooses at ``budget`` and the loss it predicts (no model run)."""
    allocation = allocate(analysis, byte_budget=budget, cost=CostModel.for_bytes(torch.float32),
                          int8=int8, min_rank=args.min_rank, rank_step=args.rank_step)
    kinds = Counter(("dense" if rank is None else "low-rank")
                    + (" INT8" if allocation.bits[name] else " float")
                    for name, rank in allocation.ranks.items())
    low_rank = [m for m in analysis.modules if allocation.ranks[m.name] is not None]
    kept = sum(m.factored_params(allocation.ranks[m.name]) for m in low_rank)
    return {"budget_fraction": budget / fp32_bytes, "byte_ratio": allocation.ratio,
            "predicted_kl": allocation.predicted_kl, "modules_by_kind": dict(kinds),
            "low_rank_param_ratio": kept / max(sum(m.dense_params for m in low_rank), 1)}


def _allocated(budget: int, original, tokenizer, calibration, data, analysis, int8,
               fp32_bytes: int, args) -> dict:
    cost = CostModel.for_bytes(torch.float32)
    allocation = allocate(analysis, byte_budget=budget, cost=cost, int8=int8,
                          min_rank=args.min_rank, rank_step=args.rank_step)
    # The base ratio is never used: rank_pattern names every factored module.
    config = allocation.to_config(WhitenConfig(param_ratio=0.5))
    model = copy.deepcopy(original)
    report = compress_(model, config, calibration)
    stored = linear_bytes(model, _names(original))
    kinds = Counter(("dense" if rank is None else "low-rank")
                    + (" INT8" if allocation.bits[name] else " float")
                    for name, rank in allocation.ranks.items())
    entry = {"kind": "allocated", "budget_fraction": budget / fp32_bytes, "bytes": stored,
             "byte_ratio": stored / fp32_bytes, "allocated_bytes": allocation.cost_after,
             "predicted_kl": allocation.predicted_kl, "modules_by_kind": dict(kinds),
             "compress_seconds": round(report.wall_seconds, 1),
             **_evaluate(model, tokenizer, data),
             "ranks": allocation.ranks, "bits": allocation.bits}
    del model
    gc.collect()
    return entry


def main() -> None:
    args = _args()
    start_run(args)
    results = Results(args.out / "results.json")
    if args.outputs_only:
        _write_outputs(results.data, args.out)
        return
    model, tokenizer = load_model(args.model)
    data = _data(tokenizer, args)
    fp32_bytes = sum(dense_weight(model.get_submodule(t.name)).numel() * 4
                     for t in find_targets(model, ("all-linear",)))
    results.data["fp32_linear_bytes"] = fp32_bytes
    if "gguf_grid_check" not in results.data:
        results.data["gguf_grid_check"] = gguf_grid_check(model)
        logger.info("GGUF grid check: %s", results.data["gguf_grid_check"])
    if "dense" not in results:
        results.add("dense", {"kind": "dense", "bytes": linear_bytes(model, _names(model)),
                              "byte_ratio": linear_bytes(model, _names(model)) / fp32_bytes,
                              **_evaluate(model, tokenizer, data)})
    for name in BASELINES:
        if name not in results:
            results.add(name, _baseline(name, model, tokenizer, data, fp32_bytes))
            logger.info("%s: %s", name, results.data["runs"][name])
            _write_outputs(results.data, args.out)
    calibration = calibration_windows(tokenizer, args)
    windows = calibration.windows
    analysis = analyze(model, calibration, args.analysis_dir)
    int8 = int8_sensitivity(model, calibration, analysis, args.out, min_rank=args.min_rank,
                            energies=args.int8_energies)
    compress_calibration = Calibration(windows[: args.compress_windows],
                                       f"wiki:calib seq_len={args.seq_len} first {args.compress_windows} of "
                                       f"n={args.calib_samples} seed=0")
    # The baselines' exact bytes, then the grid; most telling first (each row takes many minutes).
    matched = [] if args.no_matched else [(f"allocated@{b}", results.data["runs"][b]["bytes"])
                                          for b in ("rtn4-g128", "int8-rtn", "rtn4-g32")]
    grid = [(f"allocated@{f:.0%}", math.floor(f * fp32_bytes)) for f in args.budgets]
    rows = [*matched[:2], *grid[:2], *matched[2:], *grid[2:]]
    results.data["plans"] = {name: _plan(budget, analysis, int8, fp32_bytes, args) for name, budget in rows}
    if args.checks_only:
        write_results(results.path, results.data)
        _write_outputs(results.data, args.out)
        return
    for name, budget in rows:
        if name not in results:
            results.add(name, _allocated(budget, model, tokenizer, compress_calibration, data, analysis,
                                         int8, fp32_bytes, args))
            logger.info("%s: %s", name, {k: v for k, v in results.data["runs"][name].items()
                                         if k not in ("ranks", "bits")})
            _write_outputs(results.data, args.out)
    _write_outputs(results.data, args.out)


# --------------------------------------------------------------------------------------------------
# Table and plot

_LABELS = {"dense": "dense fp32", "int8-rtn": "INT8 alone (per-row RTN)",
           "rtn4-g128": "4-bit RTN, groups of 128", "rtn4-g32": "4-bit RTN, groups of 32"}


def _label(name: str, run: dict) -> str:
    if run["kind"] != "allocated":
        return _LABELS[name]
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(run["modules_by_kind"].items()))
    return f"allocated, budget {run['budget_fraction']:.1%} ({kinds})"


def table(data: dict) -> str:
    runs = sorted(data["runs"].items(), key=lambda item: item[1]["byte_ratio"])
    dense = data["runs"].get("dense", {})
    lines = ["| variant | bytes vs fp32 | wiki ppl (ratio) | sotu ppl (ratio) | fact recall |",
             "|---|---|---|---|---|"]
    for name, run in runs:
        wiki = run["wiki_ppl"] / dense["wiki_ppl"] if dense else float("nan")
        sotu = run["sotu_ppl"] / dense["sotu_ppl"] if dense else float("nan")
        lines.append(f"| {_label(name, run)} | {run['byte_ratio']:.1%} | {run['wiki_ppl']:.2f} "
                     f"({wiki:.3f}) | {run['sotu_ppl']:.2f} ({sotu:.3f}) | {run['fact_recall']:.1%} |")
    plans = sorted(data.get("plans", {}).items(), key=lambda item: item[1]["budget_fraction"])
    if plans:
        lines += ["", "What the allocator chooses (predicted from calibration-window sensitivity; no "
                  "model run):", "",
                  "| budget | bytes vs fp32 | dense float | dense INT8 | low-rank float | low-rank INT8 "
                  "| low-rank modules' param ratio | predicted Σ KL |", "|---|---|---|---|---|---|---|---|"]
        for name, plan in plans:
            kinds = plan["modules_by_kind"]
            lines.append(f"| {name} | {plan['byte_ratio']:.1%} | {kinds.get('dense float', 0)} | "
                         f"{kinds.get('dense INT8', 0)} | {kinds.get('low-rank float', 0)} | "
                         f"{kinds.get('low-rank INT8', 0)} | {plan['low_rank_param_ratio']:.2f} | "
                         f"{plan['predicted_kl']:.3g} |")
    check = data.get("gguf_grid_check")
    note = GGUF_NOTE
    if check:
        note += (f" Every 32-weight block lies on a Q4_1 grid: a Q4_1-style round trip reproduces all "
                 f"{check['modules']} decoder linears exactly (SQNR ≥ {check['q4_1_sqnr_db_min']:.0f} dB "
                 f"in float64), against a median {check['rtn4_g32_sqnr_db_median']:.1f} dB for the "
                 "RTN g32 baseline here, whose grid (range widened to 0, integer zero point) does not "
                 "line up with it.")
    return "\n".join(lines) + f"\n\n{note}\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    runs = data["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, key, title in zip(axes, ("wiki_ppl", "sotu_ppl"), ("wiki/eval", "sotu/eval"), strict=True):
        allocated = sorted((r["byte_ratio"], r[key]) for r in runs.values() if r["kind"] == "allocated")
        if allocated:
            ax.plot([100 * x for x, _ in allocated], [y for _, y in allocated], "o-",
                    label="low-rank allocator (dense/INT8/low-rank float/low-rank INT8)")
        for name, marker in (("int8-rtn", "s"), ("rtn4-g128", "^"), ("rtn4-g32", "v")):
            if name in runs:
                ax.plot(100 * runs[name]["byte_ratio"], runs[name][key], marker, markersize=9,
                        label=_LABELS[name])
        if "dense" in runs:
            ax.axhline(runs["dense"][key], color="gray", linestyle="--", label="dense fp32 (100 %)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("bytes of the decoder linears, % of float32")
        ax.set_ylabel(f"perplexity, {title} (32×512)")
        ax.set_title(f"SmolLM2-135M, {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.text(0.5, 0.005, GGUF_NOTE, ha="center", fontsize=7.5, style="italic")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _write_outputs(data: dict, out: Path) -> None:
    if not data.get("runs"):
        return
    (out / "table.md").write_text(table(data))
    plot(data, out / "bytes_frontier.png")


if __name__ == "__main__":
    main()
