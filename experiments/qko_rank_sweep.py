"""Issue 11, claim 1: Q/K/O rank sweep, standard SVD vs importance-guided directions.

    python experiments/qko_rank_sweep.py --threads 1 --seeds 0 1 2

The seeds' claims: at rank ratio 0.5 standard SVD keeps 46.7 % fact accuracy and importance-guided
SVD 73.3 %; "compression improves accuracy 66.7 % → 80 %"; "SVD90 +1.4 % average"; TruthfulQA
"keeps rising to 70 %". Here: SmolLM2-135M, the Q, K and O projections of every block kept at rank
ratio 0.9 / 0.8 / 0.7 / 0.5 with dense storage (the seeds' denoising use, as the ``cf90`` preset),
directions chosen by plain truncated SVD (``svd``, deterministic) or by importance on
``--importance-facts`` qa_wikidata facts of the *calib* split (``importance``, Fisher mode; one run
per ``--seeds`` value, which draws the facts). Each model is scored on the same items:

- fact recall: ``--facts`` qa_wikidata facts of the *eval* split (never the importance facts),
  greedy, per item;
- TruthfulQA MC2 (:mod:`svdcompress.tasks`, lm-eval), the first ``--mc2-limit`` questions, per item;
- held-out Wikipedia perplexity, ``--ppl-samples`` windows of 512 tokens.

Paired statistics against dense on the same items (:mod:`svdcompress.stats`): exact McNemar for
facts, paired t for MC2 (Wilcoxon too). Every finished run is saved at once in ``results.json``
(a rerun skips it); ``table.md`` and ``sweep.png`` are rewritten at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import svdcompress as sc
from svdcompress.datasets import load_facts
from svdcompress.evaluate import evaluate_model
from svdcompress.provenance import write_results
from svdcompress.stats import mcnemar_exact, paired_t, wilcoxon
from svdcompress.tasks import evaluate_tasks

RATIOS = (0.5, 0.9, 0.7, 0.8)  # run order: the claims at 0.5 and 0.9 first


def measure(model, tokenizer, args) -> dict:
    result = evaluate_model(model, tokenizer, data="wiki", seq_len=512, n_samples=args.ppl_samples,
                            second_domain=None, facts=args.facts)
    tasks = evaluate_tasks(model, tokenizer, ["truthfulqa_mc2"], limit=args.mc2_limit)
    return {"perplexity": result["perplexity"]["perplexity"],
            "facts": {"accuracy": result["facts"]["accuracy"],
                      "correct": [float(h["correct"]) for h in result["facts"]["hits"]]},
            "mc2": {"score": tasks["tasks"]["truthfulqa_mc2"]["score"],
                    "items": tasks["tasks"]["truthfulqa_mc2"]["items"]}}


def run_names(seeds: list[int], ratios: list[float]) -> list[str]:
    """Ratio by ratio (in the order given), standard SVD then importance for every seed."""
    return [name for r in ratios
            for name in (f"svd@{r}", *(f"importance@{r}/seed{s}" for s in seeds))]


def compress(base, tokenizer, name: str, args, importance_cache: dict) -> tuple:
    method, rest = name.split("@")
    ratio = float(rest.split("/")[0])
    model = copy.deepcopy(base)
    config = sc.preset("cf90", method, rank_ratio=ratio)
    started = time.perf_counter()
    importance = None
    if method == "importance":
        seed = int(rest.split("seed")[1])
        if seed not in importance_cache:
            facts = load_facts(args.importance_facts, seed=seed, split="calib")
            importance_cache[seed] = sc.compute_importance(
                base, tokenizer, facts, targets=config.targets,
                source=f"qa_wikidata calib {len(facts)} facts, seed {seed}")
        importance = importance_cache[seed]
    sc.compress_(model, config, None, importance=importance)
    return model, {"method": method, "rank_ratio": ratio, "targets": "qko", "storage": "dense",
                   "compress_s": round(time.perf_counter() - started, 1)}


def compare(dense: dict, run: dict) -> dict:
    mc2_dense = [i["mc2"] for i in dense["mc2"]["items"]]
    mc2_run = [i["mc2"] for i in run["mc2"]["items"]]
    return {"facts": mcnemar_exact(dense["facts"]["correct"], run["facts"]["correct"]).to_dict(),
            "mc2_t": paired_t(mc2_dense, mc2_run).to_dict(),
            "mc2_wilcoxon": wilcoxon(mc2_dense, mc2_run).to_dict()}


def difference_cell(cmp: dict, scale: float = 100) -> str:
    return (f"{scale * cmp['difference']:+.1f} [{scale * cmp['ci_low']:+.1f}, "
            f"{scale * cmp['ci_high']:+.1f}] p={cmp['p_value']:.2g}")


def table(results: dict) -> str:
    runs = results["runs"]
    dense = runs["dense"]
    lines = ["| run | fact recall | Δ facts vs dense, pts [95 % CI] McNemar p | TruthfulQA MC2 | "
             "Δ MC2 vs dense, pts [95 % CI] paired-t p | wiki ppl | × dense |",
             "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        cmp = run.get("vs_dense")
        lines.append(
            f"| {name} | {run['facts']['accuracy']:.1%} | {difference_cell(cmp['facts']) if cmp else ''} | "
            f"{run['mc2']['score']:.1%} | {difference_cell(cmp['mc2_t']) if cmp else ''} | "
            f"{run['perplexity']:.2f} | {run['perplexity'] / dense['perplexity']:.3f} |")
    return "\n".join(lines)


def head_to_head(results: dict) -> str:
    """Importance vs standard SVD at the same rank ratio, on the same items."""
    runs = results["runs"]
    lines = ["| rank ratio | run | facts: importance − svd, pts [95 % CI] McNemar p | "
             "MC2: importance − svd, pts [95 % CI] paired-t p |", "|---|---|---|---|"]
    for name, run in runs.items():
        if not name.startswith("importance@"):
            continue
        ratio = run["compression"]["rank_ratio"]
        svd = runs.get(f"svd@{ratio}")
        if svd is None:
            continue
        facts = mcnemar_exact(svd["facts"]["correct"], run["facts"]["correct"]).to_dict()
        mc2 = paired_t([i["mc2"] for i in svd["mc2"]["items"]],
                       [i["mc2"] for i in run["mc2"]["items"]]).to_dict()
        lines.append(f"| {ratio} | {name} | {difference_cell(facts)} | {difference_cell(mc2)} |")
    return "\n".join(lines)


def correlations(results: dict) -> str:
    """Spearman rank correlation across all models of the sweep: perplexity vs each accuracy."""
    from scipy.stats import spearmanr

    runs = list(results["runs"].values())
    if len(runs) < 3:
        return ""
    ppl = [r["perplexity"] for r in runs]
    lines = [f"Spearman correlation across the {len(runs)} models (dense included):", ""]
    for label, values in (("fact recall", [r["facts"]["accuracy"] for r in runs]),
                          ("TruthfulQA MC2", [r["mc2"]["score"] for r in runs])):
        rho, p = spearmanr(ppl, values)
        lines.append(f"- perplexity vs {label}: rho = {rho:+.2f}, p = {p:.2g}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    runs = results["runs"]
    dense = runs["dense"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("fact recall", lambda r: r["facts"]["accuracy"]),
              ("TruthfulQA MC2", lambda r: r["mc2"]["score"]),
              ("wiki perplexity / dense", lambda r: r["perplexity"] / dense["perplexity"])]
    for ax, (label, value) in zip(axes, panels, strict=True):
        for method in ("svd", "importance"):
            points = sorted((run["compression"]["rank_ratio"], value(run))
                            for name, run in runs.items() if name.startswith(method + "@"))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", ls="" if method == "importance"
                        and len(points) > len(RATIOS) else "-", label=method)
        ax.axhline(value(dense), color="grey", lw=0.8, ls="--", label="dense")
        ax.set_xlabel("rank ratio kept in Q, K, O")
        ax.set_title(label)
        ax.invert_xaxis()
    axes[0].legend()
    fig.suptitle("SmolLM2-135M: Q/K/O rank sweep, standard vs importance-guided SVD")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/qko_sweep"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--importance-facts", type=int, default=256)
    parser.add_argument("--mc2-limit", type=int, default=20)
    parser.add_argument("--ppl-samples", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite table.md and sweep.png from results.json, run nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("facts", "importance_facts", "mc2_limit",
                                              "ppl_samples")}
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"settings": settings, "runs": {}}
    results.pop("provenance", None)
    if results["settings"] != settings:
        raise SystemExit(f"{path} was made with other settings {results['settings']}; "
                         "use another --out")
    if not args.report_only:
        run_all(results, path, args)
    text = f"{table(results)}\n\n{head_to_head(results)}\n\n{correlations(results)}\n"
    (args.out / "table.md").write_text(text)
    plot(results, args.out / "sweep.png")
    print(text)


def run_all(results: dict, path: Path, args) -> None:
    """Measure dense, then every run not yet in ``results``, saving after each one."""
    base, tokenizer = sc.load_model("smollm2-135m")
    if "dense" not in results["runs"]:
        results["runs"]["dense"] = {"compression": {"method": "dense", "rank_ratio": 1.0},
                                    **measure(base, tokenizer, args)}
        write_results(path, results)
    importance_cache: dict = {}
    for name in run_names(args.seeds, args.ratios):
        if name in results["runs"]:
            continue
        logging.info("run %s", name)
        started = time.perf_counter()
        model, compression = compress(base, tokenizer, name, args, importance_cache)
        run = {"compression": compression, **measure(model, tokenizer, args)}
        run["vs_dense"] = compare(results["runs"]["dense"], run)
        run["wall_s"] = round(time.perf_counter() - started, 1)
        results["runs"][name] = run
        write_results(path, results)
        logging.info("%s done in %.0f s", name, run["wall_s"])


if __name__ == "__main__":
    main()
