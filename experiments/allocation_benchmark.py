"""Issue 5: uniform whitened SVD vs sensitivity-allocated ranks (± closed-form update) on SmolLM2.

For each parameter ratio of all decoder linear layers: held-out Wikipedia perplexity, second-domain
(State of the Union) perplexity and fact recall, for

- ``uniform``: ``WhitenConfig(param_ratio=r)``, every matrix at the same fraction of its parameters;
- ``allocated``: per-module ranks from :func:`svdcompress.allocation.allocate_config` (measured KL);
- ``allocated+update``: the same ranks with the closed-form left-factor update;
- ``proxy`` (ablation, optional): ranks allocated by the whitened tail energy alone, every module
  weighted alike — the "cheap proxy" that the issue warns about;
- ``uniform+update`` (ablation, optional): uniform ranks with the update, to tell the update's own
  effect from its interaction with allocated ranks.

Every run's numbers are cached in ``OUT/results.json`` as soon as they exist, so an interrupted run
resumes. Writes ``OUT/table.md`` and ``OUT/perplexity_vs_params.png``.

    python experiments/allocation_benchmark.py --out experiments/results/allocation
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import time
from pathlib import Path

import torch

from svdcompress import WhitenConfig, compress_, load_model
from svdcompress.allocation import allocate, allocate_config
from svdcompress.analysis import Analysis, Measurement, analyze
from svdcompress.calibration import Calibration
from svdcompress.datasets import load_facts, token_windows
from svdcompress.diagnostics import diagnose_policy
from svdcompress.evaluate import fact_recall, perplexity
from svdcompress.provenance import write_results

logger = logging.getLogger("allocation_benchmark")

VARIANTS = ("uniform", "allocated", "allocated+update")
ABLATIONS = ("proxy", "uniform+update")  # at 0.8 only


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/allocation"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.9, 0.6])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--probe-samples", type=int, default=2)
    parser.add_argument("--probe-len", type=int, default=256)
    parser.add_argument("--ablations", action="store_true",
                        help="also proxy-only allocation and uniform+update, at 0.8")
    parser.add_argument("--analysis-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


class Results:
    """``results.json``: one entry per run, written atomically after each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"runs": {}}

    def __contains__(self, name: str) -> bool:
        return name in self.data["runs"]

    def add(self, name: str, entry: dict) -> None:
        self.data["runs"][name] = entry
        write_results(self.path, self.data)


def _evaluate(model, tokenizer, data: dict) -> dict:
    start = time.perf_counter()
    result = {
        "wiki_ppl": perplexity(model, data["wiki"], progress=False).perplexity,
        "sotu_ppl": perplexity(model, data["sotu"], progress=False).perplexity,
        "fact_recall": fact_recall(model, tokenizer, data["facts"], progress=False).accuracy,
    }
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    return result


def _proxy_analysis(analysis: Analysis) -> Analysis:
    """Each module's 'KL' replaced by its relative whitened tail energy: the proxy-only ablation."""
    modules = []
    for m in analysis.modules:
        clone = copy.deepcopy(m)
        clone.measurements = [Measurement(x.rank, x.energy, x.energy, 0.0) for x in m.measurements]
        modules.append(clone)
    return Analysis(analysis.fingerprint, analysis.settings, modules, analysis.seconds)


def _config(variant: str, ratio: float, model, calibration, analysis_dir: Path, analysis, args):
    base = WhitenConfig(param_ratio=ratio)
    if variant.startswith("uniform"):
        return base.replace(update=variant.endswith("+update"))
    if variant == "proxy":
        return allocate(_proxy_analysis(analysis), param_ratio=ratio).to_config(base)
    config = allocate_config(model, base, calibration, analysis_dir=analysis_dir,
                             probe_samples=args.probe_samples, probe_len=args.probe_len)
    return config.replace(update=True) if variant.endswith("+update") else config


def _run(name, variant, ratio, original, tokenizer, calibration, data, analysis, args, results):
    model = copy.deepcopy(original)
    config = _config(variant, ratio, original, calibration, args.out / "analysis", analysis, args)
    report = compress_(model, config, calibration)
    # compress_'s report lists the factored modules only; modules left dense count at full size.
    dense = sum(p.numel() for n in config.exclude for p in original.get_submodule(n).parameters())
    kept = report.total("params_after") + dense
    entry = {
        "variant": variant, "param_ratio": ratio,
        "param_ratio_all_linears": kept / (report.total("params_before") + dense),
        "param_ratio_factored_modules": report.target_param_ratio,
        "model_params": report.model_params_after, "dense_modules": len(config.exclude),
        "compress_seconds": round(report.wall_seconds, 1),
        **_evaluate(model, tokenizer, data),
    }
    diagnostics = diagnose_policy(original, model, data["wiki"][:4, :256], tokenizer=tokenizer)
    entry["diagnostics"] = diagnostics.to_dict()
    entry["ranks"] = {m.name: m.rank for m in report.modules}
    results.add(name, entry)
    logger.info("%s: %s", name, {k: v for k, v in entry.items() if k not in ("ranks", "diagnostics")})
    del model
    gc.collect()


def start_run(args) -> None:
    """Logging, ``--threads`` and the output folder, as every issue 5/14 script starts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)


def calibration_windows(tokenizer, args) -> Calibration:
    """``args.calib_samples`` wiki/calib windows (seed 0) under the source string `svdcompress
    compress` gives them, so the CLI and every script reuse one cached analysis folder."""
    windows = token_windows(tokenizer, "wiki", "calib", seq_len=args.seq_len,
                            n_samples=args.calib_samples, seed=0)
    return Calibration(windows, f"wiki:calib seq_len={args.seq_len} n={args.calib_samples} seed=0")


def _data(tokenizer, args) -> dict:
    windows = {name: token_windows(tokenizer, name, "eval", seq_len=args.seq_len,
                                   n_samples=args.eval_samples, seed=0) for name in ("wiki", "sotu")}
    return {**windows, "facts": load_facts(args.facts, seed=0, split="eval")}


def main() -> None:
    args = _args()
    start_run(args)
    model, tokenizer = load_model(args.model)
    calibration = calibration_windows(tokenizer, args)
    analysis = analyze(model, calibration, args.out / "analysis",
                       probe_samples=args.probe_samples, probe_len=args.probe_len)
    logger.info("analysis: %.0f s for %d modules", analysis.seconds, len(analysis.modules))
    if args.analysis_only:
        return
    results, data = Results(args.out / "results.json"), _data(tokenizer, args)
    results.data["analysis_seconds"] = analysis.seconds
    if "dense" not in results:
        results.add("dense", {"variant": "dense", "param_ratio": 1.0, "param_ratio_all_linears": 1.0,
                              "param_ratio_factored_modules": 1.0,
                              **_evaluate(model, tokenizer, data)})
    variants = (*VARIANTS, *ABLATIONS) if args.ablations else VARIANTS
    for ratio in args.ratios:
        for variant in variants:
            name = f"{variant}@{ratio}"
            if variant in ABLATIONS and ratio != 0.8:
                continue
            if name not in results:
                _run(name, variant, ratio, model, tokenizer, calibration, data, analysis, args, results)
    _write_outputs(results.data, args.out)


def _write_outputs(data: dict, out: Path) -> None:
    from svdcompress.report import benchmark_table, plot_benchmark, plot_drift

    (out / "table.md").write_text(benchmark_table(data))
    plot_benchmark(data, out / "perplexity_vs_params.png")
    for ratio in sorted({run["param_ratio"] for run in data["runs"].values()} - {1.0}):
        drift = {name: run["diagnostics"] for name, run in data["runs"].items()
                 if run["param_ratio"] == ratio and run.get("diagnostics")}
        plot_drift(drift, out / f"drift_p{ratio}.png")


if __name__ == "__main__":
    main()
