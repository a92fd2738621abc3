"""Issue 14: training-free quality at the same parameter count, SmolLM2-135M, all decoder linears.

One row per variant × param_ratio, every row measured in the same run as the dense model on the
same held-out windows (wiki/eval and sotu/eval, 32 × 512 tokens; 300 facts of the eval split):

- ``allocated``: issue 5's sensitivity-allocated whitened ranks, two factors per module (re-measured
  here so the dense model is beside them);
- ``allocated-pivoted``: the same allocator pricing ranks for PIFA pivoted storage (r·(m+n−r)
  numbers for the same rank-r product), so the same budget buys higher ranks;
- ``uniform-pivoted`` (ablation, 0.8): every module at the same fraction, pivoted: pivoting without
  allocation;
- ``allocated-pivoted+blend`` (with ``--blend-grid``): the allocated pivoted ranks with
  ``WhitenConfig(error_blend=β)`` (cumulative-error-aware whitening, SAES-SVD's CEALC): β is chosen
  at each ratio separately by perplexity on other ``wiki/calib`` windows (seed 1; β = 0 is
  ``allocated-pivoted``), never on the held-out windows; only the chosen β is evaluated there (the
  model that won the selection is evaluated as it is, not compressed again).
- ``allocated-pivoted+one-pass`` (ablation): ``allocated-pivoted`` calibrated in one pass on the
  original model's activations (``calibration_stream="original"``, issue 12's faster calibration)
  instead of on the inputs of the model compressed so far.

Ranks are chosen on calibration text only (wiki/calib, 64 × 512, seed 0): the allocator reads the
sensitivity analysis that issue 5 cached in ``--analysis-dir`` (same model, same calibration
windows and settings; a mismatch is an error, never a silent re-analysis), which nothing here
rewrites. ``compress_seconds`` is ``compress_`` (calibration pass + factorizations),
``allocate_seconds`` the knapsack on the cached analysis; the one-off analysis time is
``analysis_seconds`` in the results file.

Each finished row is written to ``OUT/results.json`` at once, so an interrupted run resumes;
``OUT/table.md`` is rewritten after each row.

    python experiments/quality_frontier.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import time
from pathlib import Path

from allocation_benchmark import Results, _data, _evaluate, calibration_windows, start_run

from svdcompress import WhitenConfig, compress_, load_model
from svdcompress.allocation import allocate
from svdcompress.analysis import analyze
from svdcompress.datasets import token_windows
from svdcompress.evaluate import perplexity
from svdcompress.provenance import write_results

logger = logging.getLogger("quality_frontier")

# variant -> how its config is made: storage of the factors, ranks allocated or uniform
VARIANTS: dict[str, dict] = {
    "allocated": {"storage": "factored", "allocated": True},
    "allocated-pivoted": {"storage": "pivoted", "allocated": True},
    "uniform-pivoted": {"storage": "pivoted", "allocated": False, "ratios": (0.8,)},
    "allocated-pivoted+blend": {"storage": "pivoted", "allocated": True, "blend": "selected"},
    "allocated-pivoted+one-pass": {"storage": "pivoted", "allocated": True, "stream": "original"},
}


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/quality_frontier"))
    parser.add_argument("--analysis-dir", type=Path, default=Path("experiments/results/allocation/analysis"),
                        help="issue 5's cached sensitivity analysis (read only)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6, 0.9])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--probe-samples", type=int, default=2)
    parser.add_argument("--probe-len", type=int, default=256)
    parser.add_argument("--blend-grid", type=float, nargs="*", default=[],
                        help="error_blend values tried (besides 0) for allocated-pivoted+blend")
    parser.add_argument("--select-samples", type=int, default=8,
                        help="wiki/calib windows (seed 1) on which β is chosen")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def _config(variant: str, ratio: float, analysis, blend: float = 0.0) -> tuple[WhitenConfig, float]:
    """The variant's config at ``ratio`` and the seconds its rank choice took."""
    spec = VARIANTS[variant]
    base = WhitenConfig(param_ratio=ratio, storage=spec["storage"], error_blend=blend,
                        calibration_stream=spec.get("stream", "compressed"))
    if not spec["allocated"]:
        return base, 0.0
    start = time.perf_counter()
    allocation = allocate(analysis, param_ratio=ratio, storage=spec["storage"])
    return allocation.to_config(base), time.perf_counter() - start


def _compressed(variant: str, ratio: float, original, calibration, analysis,
                blend: float = 0.0) -> tuple[object, dict]:
    """A compressed copy of ``original`` and its row so far (everything but the held-out scores)."""
    config, allocate_seconds = _config(variant, ratio, analysis, blend)
    model = copy.deepcopy(original)
    report = compress_(model, config, calibration)
    # compress_'s report lists the factored modules only; modules left dense count at full size.
    dense = sum(p.numel() for n in config.exclude for p in original.get_submodule(n).parameters())
    return model, {
        "variant": variant, "storage": config.storage, "param_ratio": ratio,
        "param_ratio_all_linears": (report.total("params_after") + dense)
        / (report.total("params_before") + dense),
        "model_params": report.model_params_after, "dense_modules": len(config.exclude),
        "compress_seconds": round(report.wall_seconds, 1),
        "allocate_seconds": round(allocate_seconds, 2), "error_blend": blend,
        "ranks": {m.name: m.rank for m in report.modules},
    }


def _select_ppl(model, data) -> float:
    """Perplexity on other calibration-split windows: what β is selected on."""
    return perplexity(model, data["select"], progress=False).perplexity


def _finish(name: str, model, entry: dict, tokenizer, data, results: Results) -> None:
    if "select_ppl" not in entry:
        entry = {**entry, "select_ppl": _select_ppl(model, data)}
    entry = {**entry, **_evaluate(model, tokenizer, data)}
    results.add(name, entry)
    logger.info("%s: %s", name, {k: v for k, v in entry.items() if k != "ranks"})


def _run(name: str, variant: str, ratio: float, original, tokenizer, calibration, data, analysis,
         results: Results, blend: float = 0.0) -> None:
    model, entry = _compressed(variant, ratio, original, calibration, analysis, blend)
    _finish(name, model, entry, tokenizer, data, results)
    del model
    gc.collect()


def results_table(data: dict) -> str:
    """Markdown: one row per run, perplexities beside their ratio to the dense model's."""
    runs = data["runs"]
    dense = runs.get("dense")
    lines = ["| variant | target ratio | params kept (all linears) | wiki ppl (× dense) | "
             "sotu ppl (× dense) | fact recall | compress + allocate s |",
             "|---|---|---|---|---|---|---|"]

    def cell(run: dict, key: str) -> str:
        value = f"{run[key]:.2f}"
        return value if dense is None or run is dense else f"{value} ({run[key] / dense[key]:.3f}×)"

    order = sorted(runs.items(), key=lambda item: (-item[1]["param_ratio"], item[1]["variant"]))
    for _name, run in order:
        seconds = run.get("compress_seconds")
        timing = "" if seconds is None else f"{seconds:.0f} + {run.get('allocate_seconds', 0):.1f}"
        lines.append(
            f"| {run['variant']} | {run['param_ratio']} | {run['param_ratio_all_linears']:.4f} | "
            f"{cell(run, 'wiki_ppl')} | {cell(run, 'sotu_ppl')} | {run['fact_recall']:.3f} | {timing} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = _args()
    start_run(args)
    model, tokenizer = load_model(args.model)
    calibration = calibration_windows(tokenizer, args)
    analysis = analyze(model, calibration, args.analysis_dir,
                       probe_samples=args.probe_samples, probe_len=args.probe_len)
    results, data = Results(args.out / "results.json"), _data(tokenizer, args)
    data["select"] = token_windows(tokenizer, "wiki", "calib", seq_len=args.seq_len,
                                   n_samples=args.select_samples, seed=1)
    results.data["analysis_seconds"] = analysis.seconds
    if "dense" not in results:
        results.add("dense", {"variant": "dense", "param_ratio": 1.0, "param_ratio_all_linears": 1.0,
                              **_evaluate(model, tokenizer, data)})
    variants = [v for v in args.variants if "blend" not in VARIANTS[v]]
    for ratio in args.ratios:
        for variant in variants:
            name = f"{variant}@{ratio}"
            if ratio in VARIANTS[variant].get("ratios", (ratio,)) and name not in results:
                _run(name, variant, ratio, model, tokenizer, calibration, data, analysis, results)
                (args.out / "table.md").write_text(results_table(results.data))
    if args.blend_grid and "allocated-pivoted+blend" in args.variants:
        for ratio in args.ratios:
            if f"allocated-pivoted+blend@{ratio}" not in results:
                _blend_row(args, ratio, model, tokenizer, calibration, data, analysis, results)
                (args.out / "table.md").write_text(results_table(results.data))
    (args.out / "table.md").write_text(results_table(results.data))


def _blend_row(args, ratio: float, original, tokenizer, calibration, data, analysis,
               results: Results) -> None:
    """Choose β at ``ratio`` on the selection windows and evaluate the winner on the held-out ones.

    Each try is stored in ``results.data["blend_selection"][ratio]`` as it finishes (a rerun
    resumes); β = 0 is the ``allocated-pivoted`` row's own selection perplexity. No row is added
    when β = 0 wins: that row already exists."""
    tried = results.data.setdefault("blend_selection", {}).setdefault(str(ratio), {})
    tried.setdefault("0.0", results.data["runs"][f"allocated-pivoted@{ratio}"]["select_ppl"])
    winner = None  # (β, model, entry) of the best try made in this process
    for blend in map(float, args.blend_grid):
        if str(blend) in tried:
            continue
        model, entry = _compressed("allocated-pivoted+blend", ratio, original, calibration, analysis, blend)
        entry["select_ppl"] = tried[str(blend)] = _select_ppl(model, data)
        write_results(results.path, results.data)
        logger.info("error_blend %s at %s: selection perplexity %.3f", blend, ratio, entry["select_ppl"])
        if entry["select_ppl"] <= min(tried.values()):
            winner = (blend, model, entry)
        del model
        gc.collect()
    best = float(min(tried, key=tried.get))
    logger.info("selected error_blend %s at %s from %s", best, ratio, tried)
    if best == 0.0:
        return
    name = f"allocated-pivoted+blend@{ratio}"
    if winner is not None and winner[0] == best:
        _finish(name, winner[1], winner[2], tokenizer, data, results)
    else:
        _run(name, "allocated-pivoted+blend", ratio, original, tokenizer, calibration, data, analysis,
             results, best)


if __name__ == "__main__":
    main()
