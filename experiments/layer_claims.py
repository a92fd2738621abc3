"""Issue 11, claims 5 and 7: SVD then INT8 vs INT8 alone, and which layer types tolerate low rank.

    python experiments/layer_claims.py --grid stacking --threads 1
    python experiments/layer_claims.py --grid safety --threads 1

**stacking** (claim 5; the brief: "SVD then INT8" composite 85.3 % vs INT8 alone 80.0 %). On
SmolLM2-135M: dense; INT8 alone (per-output-channel round-to-nearest of every decoder linear,
:func:`svdcompress.quantize_weights_`); plain SVD of Q, K and O at rank ratio 0.9 and 0.7 with dense
storage (the seeds' "SVD90" / CF90 denoising step); and each of those SVD models then INT8 (the
rank-r products quantized like every other linear). The composite is the mean of three accuracies
on fixed items: held-out fact recall (``--facts`` qa_wikidata eval facts), MMLU (the first
``--mmlu-limit`` questions) and the ARC-style science task (``--arc-limit``). Every step is
deterministic (no seeds): plain SVD and round-to-nearest draw nothing.

**safety** (claim 7; the brief: "V is safe only at rank ratio >= 0.90; MLP never"). V projections at
rank ratio 0.99 / 0.95 / 0.90 / 0.85, and all MLP projections (gate, up, down) at 0.99 / 0.98, each
with plain SVD and with whitening (SVD-LLM; ``--calib-samples`` windows of the *calib* split, one
draw per ``--calib-seeds`` value), dense storage so any rank is allowed. "Safe" is read on the same
items as dense: held-out perplexity of two domains (wiki and State of the Union, ``--ppl-samples``
windows each, never the calibration windows) and fact recall with exact McNemar.

Every finished model is saved at once in ``results.json`` under ``--out``/GRID (a rerun skips it);
``table.md`` and a plot are rewritten at the end.
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
from qko_rank_sweep import difference_cell

import svdcompress as sc
from svdcompress.calibration import Calibration
from svdcompress.checkpoint import densify_
from svdcompress.datasets import token_windows
from svdcompress.evaluate import evaluate_model
from svdcompress.provenance import write_results
from svdcompress.stats import mcnemar_exact, paired_t
from svdcompress.tasks import evaluate_tasks

STACKING_RUNS = ("dense", "int8", "svd0.9", "svd0.9+int8", "svd0.7", "svd0.7+int8")
V_RATIOS = (0.99, 0.95, 0.90, 0.85)
MLP_RATIOS = (0.99, 0.98)
SAFETY_TARGETS = {"v": ("v_proj",), "mlp": ("mlp",)}


def stacking_model(base, name: str):
    model = copy.deepcopy(base)
    svd, _, int8 = name.partition("+")
    if svd.startswith("svd"):
        sc.compress_(model, sc.preset("cf90", "svd", rank_ratio=float(svd[3:])))
        densify_(model)  # the SVD step baked into plain linears, which INT8 then quantizes
    if int8 or name == "int8":
        sc.quantize_weights_(model, 8)
    return model


def safety_runs(calib_seeds: list[int]) -> list[str]:
    names = ["dense"]
    for layer, ratios in (("v", V_RATIOS), ("mlp", MLP_RATIOS)):
        for ratio in ratios:
            names.append(f"{layer}@{ratio}/svd")
            names += [f"{layer}@{ratio}/whiten/seed{s}" for s in calib_seeds]
    return names


def safety_model(base, tokenizer, name: str, args, calibrations: dict):
    model = copy.deepcopy(base)
    if name == "dense":
        return model
    layer_ratio, method, *seed = name.split("/")
    layer, ratio = layer_ratio.split("@")
    config = sc.preset("cf90", method, rank_ratio=float(ratio), targets=SAFETY_TARGETS[layer])
    calibration = None
    if method == "whiten":
        calib_seed = int(seed[0].removeprefix("seed"))
        if calib_seed not in calibrations:
            windows = token_windows(tokenizer, "wiki", "calib", seq_len=512,
                                    n_samples=args.calib_samples, seed=calib_seed)
            calibrations[calib_seed] = Calibration(
                windows, f"wiki calib {args.calib_samples}x512, seed {calib_seed}")
        calibration = calibrations[calib_seed]
    sc.compress_(model, config, calibration)
    return model


def _task_items(result: dict, task: str) -> list[float]:
    entry = result["tasks"][task]
    return [float(item[entry["metric"]]) for item in entry["items"]]


def measure_stacking(model, tokenizer, args) -> dict:
    quality = evaluate_model(model, tokenizer, data="wiki", seq_len=512, n_samples=args.ppl_samples,
                             second_domain=None, facts=args.facts)
    tasks = {"mmlu": args.mmlu_limit, "arc_style": args.arc_limit}
    scores = {"facts": [float(h["correct"]) for h in quality["facts"]["hits"]]}
    for task, limit in tasks.items():
        scores[task] = _task_items(evaluate_tasks(model, tokenizer, [task], limit=limit), task)
    accuracies = {k: sum(v) / len(v) for k, v in scores.items()}
    return {"perplexity": quality["perplexity"]["perplexity"], "items": scores,
            "accuracy": accuracies, "composite": sum(accuracies.values()) / len(accuracies)}


def measure_safety(model, tokenizer, args) -> dict:
    quality = evaluate_model(model, tokenizer, data="wiki", seq_len=512, n_samples=args.ppl_samples,
                             second_domain="sotu", facts=args.facts)
    return {"perplexity": quality["perplexity"]["perplexity"],
            "perplexity_sotu": quality["second_domain"]["perplexity"],
            "items": {"facts": [float(h["correct"]) for h in quality["facts"]["hits"]]},
            "accuracy": {"facts": quality["facts"]["accuracy"]}}


def composite_items(run: dict) -> list[float]:
    """Per item, each component weighted by 1 / its size, so the mean over items is the composite
    (the mean of the component accuracies) and a paired test on them tests its difference."""
    items = run["items"]
    scale = len(items)
    return [value * sum(len(v) for v in items.values()) / (scale * len(values))
            for values in items.values() for value in values]


def compare(a: dict, b: dict) -> dict:
    """b − a on the same items: McNemar per 0/1 component, paired t on the composite's items."""
    out = {k: mcnemar_exact(a["items"][k], b["items"][k]).to_dict() for k in a["items"]}
    if len(a["items"]) > 1:
        out["composite"] = paired_t(composite_items(a), composite_items(b)).to_dict()
    return out


def stacking_table(runs: dict) -> str:
    lines = ["| model | facts | MMLU | ARC-style | composite | Δ composite vs dense, pts [95 % CI] p | "
             "Δ composite vs INT8 alone | wiki ppl |", "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        acc = run["accuracy"]
        vs_dense = difference_cell(compare(runs["dense"], run)["composite"]) if name != "dense" else ""
        vs_int8 = (difference_cell(compare(runs["int8"], run)["composite"])
                   if "int8" in runs and name not in ("dense", "int8") else "")
        lines.append(f"| {name} | {acc['facts']:.1%} | {acc['mmlu']:.1%} | {acc['arc_style']:.1%} | "
                     f"{run['composite']:.1%} | {vs_dense} | {vs_int8} | {run['perplexity']:.2f} |")
    return "\n".join(lines)


def safety_table(runs: dict) -> str:
    dense = runs["dense"]
    lines = ["| model | wiki ppl | × dense | sotu ppl | × dense | facts | Δ facts vs dense, pts "
             "[95 % CI] McNemar p |", "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        cmp = difference_cell(compare(dense, run)["facts"]) if name != "dense" else ""
        lines.append(f"| {name} | {run['perplexity']:.2f} | {run['perplexity'] / dense['perplexity']:.3f} | "
                     f"{run['perplexity_sotu']:.2f} | "
                     f"{run['perplexity_sotu'] / dense['perplexity_sotu']:.3f} | "
                     f"{run['accuracy']['facts']:.1%} | {cmp} |")
    return "\n".join(lines)


def plot_safety(runs: dict, path: Path) -> None:
    dense = runs["dense"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, layer in zip(axes, ("v", "mlp"), strict=True):
        for method in ("svd", "whiten"):
            points: dict[float, list[float]] = {}
            for name, run in runs.items():
                if name.startswith(f"{layer}@") and f"/{method}" in name:
                    ratio = float(name.split("@")[1].split("/")[0])
                    points.setdefault(ratio, []).append(run["perplexity"] / dense["perplexity"])
            ratios = sorted(points)
            ax.plot(ratios, [sum(points[r]) / len(points[r]) for r in ratios], marker="o", label=method)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{layer.upper()} projections" if layer == "v" else "MLP (gate, up, down)")
        ax.set_xlabel("rank ratio kept")
        ax.set_ylabel("held-out wiki perplexity / dense")
        ax.invert_xaxis()
        ax.legend()
    fig.suptitle("SmolLM2-135M: which layer types tolerate low rank (dense storage, no training)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def plot_stacking(runs: dict, path: Path) -> None:
    names = list(runs)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.2
    for i, part in enumerate(("facts", "mmlu", "arc_style")):
        ax.bar([x + i * width for x in range(len(names))], [runs[n]["accuracy"][part] for n in names],
               width, label=part)
    ax.bar([x + 3 * width for x in range(len(names))], [runs[n]["composite"] for n in names], width,
           label="composite", color="black")
    ax.set_xticks([x + 1.5 * width for x in range(len(names))], names, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: INT8 alone vs SVD (Q/K/O) then INT8")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def run_grid(results: dict, path: Path, args) -> None:
    base, tokenizer = sc.load_model("smollm2-135m")
    calibrations: dict = {}
    names = STACKING_RUNS if args.grid == "stacking" else safety_runs(args.calib_seeds)
    measure = measure_stacking if args.grid == "stacking" else measure_safety
    for name in names:
        if name in results["runs"]:
            continue
        logging.info("run %s", name)
        started = time.perf_counter()
        model = (stacking_model(base, name) if args.grid == "stacking"
                 else safety_model(base, tokenizer, name, args, calibrations))
        compress_s = time.perf_counter() - started
        run = measure(model, tokenizer, args)
        run["compress_s"], run["wall_s"] = round(compress_s, 1), round(time.perf_counter() - started, 1)
        results["runs"][name] = run
        write_results(path, results)
        logging.info("%s done in %.0f s", name, run["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=("stacking", "safety"), required=True)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/claims"))
    parser.add_argument("--facts", type=int, default=300)
    parser.add_argument("--mmlu-limit", type=int, default=100)
    parser.add_argument("--arc-limit", type=int, default=None, help="default: all 251 items")
    parser.add_argument("--ppl-samples", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    keys = (("facts", "mmlu_limit", "arc_limit", "ppl_samples") if args.grid == "stacking"
            else ("facts", "ppl_samples", "calib_samples"))
    settings = {k: getattr(args, k) for k in keys}
    out = args.out / args.grid
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"settings": settings, "runs": {}}
    results.pop("provenance", None)
    if results["settings"] != settings:
        raise SystemExit(f"{path} was made with other settings {results['settings']}; use another --out")
    if not args.report_only:
        run_grid(results, path, args)
    runs = results["runs"]
    text = stacking_table(runs) if args.grid == "stacking" else safety_table(runs)
    (out / "table.md").write_text(text + "\n")
    (plot_stacking if args.grid == "stacking" else plot_safety)(runs, out / f"{args.grid}.png")
    print(text)


if __name__ == "__main__":
    main()
