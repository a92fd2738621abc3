"""Issue 10: does compress + freeze (CF90) protect facts from contradicting fine-tuning data?

    OMP_NUM_THREADS=2 python experiments/knowledge_protection.py \
        --runs-dir runs/knowledge_protection --out experiments/results/knowledge_protection

One conflicting-facts benchmark (``svdcompress.protect``: 200 retention facts the base model
recalls, each with a contradicting statement that is the fine-tuning data, and 200 control facts),
then every condition x regime x seed is fine-tuned from the same start with the Hugging Face
Trainer (``svdcompress.finetune``) and measured on the same items:

- conditions: none, freeze50/75/90, compress (Q/K/O SVD at rank_ratio 0.7, dense storage, the
  ``cf90`` preset), cf90 (compress + freeze 75 %), cf90-90 (compress + freeze 90 %), lora8 and
  lora16 (peft adapters on Q/K/O, alpha = 2r, merged);
- lora8-lr10x and lora16-lr10x: the same adapters at 10x the regime's learning rate (LoRA's usual
  range; at 1e-5 the adapters barely move);
- regimes: gentle (1 epoch, lr 1e-5, batch 4) and aggressive (3 epochs, lr 2e-5, batch 4);
- seeds: the Trainer's seed (data order); the benchmark and the compression are deterministic.

Experiment D (``--int8``): after gentle fine-tuning of none, cf90 and cf90-90, every decoder linear
is quantized to INT8 (per-channel RTN, ``quantize_weights_``) and measured again.

Every finished run is written at once to ``<out>/results.LANE[.shardK].json`` (one file per
process; a rerun skips every run found in any of them), so the grid resumes after an interruption
and several processes can share it (``--shard K/N``, or different ``--lane``s for different runs). ``--report`` (also run at the end) recomputes the statistics, the
markdown table (``table.md``) and the plot from ``results.json`` alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import svdcompress as sc
from svdcompress.bench import PeakRSS
from svdcompress.finetune import FinetuneConfig, finetune_
from svdcompress.protect import (
    ConflictBenchmark,
    build_conflict_benchmark,
    heldout_windows,
    measure_knowledge,
)
from svdcompress.provenance import write_results
from svdcompress.stats import paired_t, wilcoxon

CONDITIONS: dict[str, dict] = {
    "none": {},
    "freeze50": {"freeze": 0.5},
    "freeze75": {"freeze": 0.75},
    "freeze90": {"freeze": 0.9},
    "compress": {"compress": True},
    "cf90": {"compress": True, "freeze": 0.75},
    "cf90-90": {"compress": True, "freeze": 0.9},
    "lora8": {"lora_rank": 8},
    "lora16": {"lora_rank": 16},
    # LoRA at the brief's learning rate barely moves (adapters start at zero): the same adapters at
    # the 10x larger learning rate LoRA is usually run with, so the baseline is not a straw man.
    "lora8-lr10x": {"lora_rank": 8, "lr_scale": 10.0},
    "lora16-lr10x": {"lora_rank": 16, "lr_scale": 10.0},
}
REGIMES = {"gentle": {"epochs": 1.0, "lr": 1e-5}, "aggressive": {"epochs": 3.0, "lr": 2e-5}}
INT8_CONDITIONS = ("none", "cf90", "cf90-90")

# (claim, condition A, condition B, regime[, stage]): the brief's comparisons, tested pairwise on
# the same facts and seeds; stage "after_int8" compares the models after Experiment D's INT8.
COMPARISONS = [
    ("CF90 retains more than freezing alone (75 % vs 60 %; 5 seeds 71 % vs 63 %, p = 0.0072)",
     "cf90", "freeze75", "gentle"),
    ("CF90 retains more than unprotected fine-tuning (75 % vs 5 %)", "cf90", "none", "gentle"),
    ("CF90 retains more than LoRA r=8 (73 % vs 68 %)", "cf90", "lora8", "gentle"),
    ("CF90 retains more than LoRA r=16 (73 % vs 67 %)", "cf90", "lora16", "gentle"),
    ("CF90 retains more than LoRA r=8 at a 10x learning rate", "cf90", "lora8-lr10x", "gentle"),
    ("CF90 retains more than LoRA r=16 at a 10x learning rate", "cf90", "lora16-lr10x", "gentle"),
    ("freeze 90 % + compress beats freeze 75 % + compress (79-80 % vs 75 %)", "cf90-90", "cf90", "gentle"),
    ("freeze 90 % + compress beats freeze 90 % alone", "cf90-90", "freeze90", "gentle"),
    ("compression alone protects (vs none)", "compress", "none", "gentle"),
    ("aggressive fine-tuning: compression hurts retention (freeze 75 % alone above CF90)",
     "freeze75", "cf90", "aggressive"),
    ("aggressive fine-tuning: CF90 vs none", "cf90", "none", "aggressive"),
    ("aggressive fine-tuning: freeze 90 % + compress vs freeze 90 % alone", "cf90-90", "freeze90",
     "aggressive"),
    ("aggressive fine-tuning: CF90 vs LoRA r=16 (same lr)", "cf90", "lora16", "aggressive"),
    ("compression alone protects under aggressive fine-tuning (vs none)", "compress", "none",
     "aggressive"),
    ("after INT8, CF90-90 keeps more than unprotected (72 % vs 58 %)", "cf90-90", "none", "gentle",
     "after_int8"),
    ("after INT8, CF90 keeps more than unprotected", "cf90", "none", "gentle", "after_int8"),
]

logger = logging.getLogger("knowledge_protection")


def run_key(condition: str, regime: str, seed: int) -> str:
    return f"{condition}/{regime}/seed{seed}"


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_all_results(out: Path) -> dict:
    """Every process's ``results.*.json``, merged (no two processes run the same entry)."""
    merged: dict = {}
    for path in sorted(out.glob("results*.json")):
        merged.update({k: v for k, v in load_results(path).items() if k != "provenance"})
    return merged


def save_results(path: Path, results: dict) -> None:
    write_results(path, {k: v for k, v in results.items() if k != "provenance"})


# --------------------------------------------------------------------------------------------------
# Running


def benchmark_for(model, tokenizer, args) -> ConflictBenchmark:
    cached = args.runs_dir / f"benchmark-r{args.n_retention}-c{args.n_control}-s{args.bench_seed}.json"
    if cached.is_file():
        return ConflictBenchmark.from_dict(json.loads(cached.read_text()))
    bench = build_conflict_benchmark(model, tokenizer, n_retention=args.n_retention,
                                     n_control=args.n_control, seed=args.bench_seed, progress=False)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(bench.to_dict(), indent=1))
    return bench


def measure(model, tokenizer, bench, windows, setting, args) -> dict:
    start = time.perf_counter()
    result = measure_knowledge(model, tokenizer, bench, ppl_windows=windows, ppl_setting=setting,
                               generation_tokens=args.generation_tokens, progress=False)
    return {**result.to_dict(), "measure_seconds": time.perf_counter() - start}


def int8_copy(model):
    """Every decoder linear as INT8 (dense-stored low-rank matrices are exported dense first)."""
    quantized = copy.deepcopy(model)
    for name, module in list(quantized.named_modules()):
        if isinstance(module, sc.LowRankLinear):
            quantized.set_submodule(name, module.to_dense())
    if hasattr(quantized.config, "compression_config"):
        del quantized.config.compression_config
    sc.quantize_weights_(quantized, 8)
    return quantized


def run_grid(args) -> None:
    shard, n_shards = args.shard
    # One file per process: processes running at once never write the same file.
    results_path = args.out / f"results.{args.lane}{f'.shard{shard}' if n_shards > 1 else ''}.json"
    results = load_results(results_path)
    done = load_all_results(args.out)
    base, tokenizer = sc.load_model(args.model)
    bench = benchmark_for(base, tokenizer, args)
    records = bench.training_records()
    windows, setting = heldout_windows(tokenizer, base, seq_len=args.ppl_seq_len,
                                       n_samples=args.ppl_samples)
    results["benchmark"] = {
        "digest": bench.digest(), "n_retention": len(bench.retention), "n_control": len(bench.control),
        "n_scanned": bench.n_scanned, "n_recalled": bench.n_recalled, "seed": bench.seed,
        "notes": bench.notes, "examples": [
            {"prompt": f.prompt, "original": f.answers[0], "contradiction": f.new_answer}
            for f in bench.retention[:5]],
    }
    compressed = copy.deepcopy(base)
    n_compressed = sc.compress_qko(compressed, 0.7)
    starts = {"base": base, "compressed": compressed}
    for name, model in starts.items():
        if f"start/{name}" not in done and shard == 0:
            results[f"start/{name}"] = {"condition": name, "knowledge": measure(
                model, tokenizer, bench, windows, setting, args)}
            if name == "compressed":
                results[f"start/{name}"]["matrices_compressed"] = n_compressed
            save_results(results_path, results)
            logger.info("start %s: %s", name, _short(results[f"start/{name}"]["knowledge"]))
    grid = [(regime, seed, condition) for regime in args.regimes for seed in args.seeds
            for condition in args.conditions]
    for index, (regime, seed, condition) in enumerate(grid):
        key = run_key(condition, regime, seed)
        if index % n_shards != shard or key in done:
            continue
        spec = CONDITIONS[condition]
        model = copy.deepcopy(compressed if spec.get("compress") else base)
        regime_settings = REGIMES[regime]
        config = FinetuneConfig(
            epochs=regime_settings["epochs"], lr=regime_settings["lr"] * spec.get("lr_scale", 1.0),
            batch_size=4, seq_len=64, seed=seed, freeze=spec.get("freeze", 0.0),
            lora_rank=spec.get("lora_rank"), device="cpu")
        with PeakRSS() as memory:
            model, ft = finetune_(model, tokenizer, records, config, progress=False)
        row = {
            "condition": condition, "regime": regime, "seed": seed,
            "finetune": {k: v for k, v in ft.to_dict().items() if k != "losses"},
            "loss_curve": [round(e["loss"], 4) for e in ft.losses],
            "peak_rss_growth_mb": memory.growth_mb,
            "knowledge": measure(model, tokenizer, bench, windows, setting, args),
        }
        if args.int8 and regime == "gentle" and condition in INT8_CONDITIONS:
            row["after_int8"] = measure(int8_copy(model), tokenizer, bench, windows,
                                        setting, args)
        results[key] = row
        save_results(results_path, results)
        logger.info("%s: %s (%.0f s fine-tuning)", key, _short(row["knowledge"]),
                    ft.wall_seconds)
        del model


def run_truthfulqa(args) -> None:
    """TruthfulQA MC1/MC2 of the base model, the CF90-compressed model before fine-tuning, and
    CF90 and freeze-75 after gentle fine-tuning (``--tqa-seeds``), all on the same questions."""
    from svdcompress.tasks import evaluate_tasks

    results_path = args.out / "truthfulqa.json"
    results = load_results(results_path)
    limits = {r["limit"] for k, r in results.items() if k != "provenance"}
    if limits - {args.tqa_limit}:
        raise SystemExit(f"{results_path} holds models scored with --tqa-limit {sorted(limits, key=str)}; "
                         "rerun with that limit, or move the file away to start over")
    base, tokenizer = sc.load_model(args.model)
    bench = benchmark_for(base, tokenizer, args)
    models = [("base", None, None), ("compressed", None, None)]
    models += [(f"{c}/gentle/seed{s}", c, s) for s in args.tqa_seeds for c in ("cf90", "freeze75")]
    for name, condition, seed in models:
        if name in results:
            continue
        spec = CONDITIONS.get(condition, {"compress": name == "compressed"})
        model = copy.deepcopy(base)
        if spec.get("compress"):
            sc.compress_qko(model, 0.7)
        if condition is not None:
            config = FinetuneConfig(**REGIMES["gentle"], batch_size=4, seq_len=64, seed=seed,
                                    freeze=spec.get("freeze", 0.0), device="cpu")
            model, _ = finetune_(model, tokenizer, bench.training_records(), config, progress=False)
        results[name] = evaluate_tasks(model, tokenizer, ["truthfulqa_mc1", "truthfulqa_mc2"],
                                       limit=args.tqa_limit)
        save_results(results_path, results)
        logger.info("truthfulqa %s: mc2 %.4f", name, results[name]["tasks"]["truthfulqa_mc2"]["score"])


def truthfulqa_summary(out: Path) -> dict | None:
    from svdcompress.tasks import compare_task_results

    results = {k: v for k, v in load_results(out / "truthfulqa.json").items() if k != "provenance"}
    if "base" not in results:
        return None
    summary = {}
    for name, result in results.items():
        scores = {task: r["score"] for task, r in result["tasks"].items()}
        summary[name] = {"scores": scores, "n": result["tasks"]["truthfulqa_mc2"]["n"]}
        if name != "base":
            summary[name]["vs_base"] = compare_task_results(result, results["base"])
    means = {}
    for condition in ("cf90", "freeze75"):
        runs = [r for k, r in results.items() if k.startswith(f"{condition}/gentle/seed")]
        if len(runs) >= 2:
            means[condition] = _seed_mean(runs)
            summary[f"{condition}, mean of {len(runs)} seeds"] = {
                "scores": {t: r["score"] for t, r in means[condition]["tasks"].items()},
                "n": runs[0]["tasks"]["truthfulqa_mc2"]["n"],
                "vs_base": compare_task_results(means[condition], results["base"])}
    if len(means) == 2:
        summary["cf90 − freeze75, seed means"] = {"vs": compare_task_results(means["cf90"], means["freeze75"])}
    return summary


def _seed_mean(runs: list[dict]) -> dict:
    """One result whose every item's metric is its mean over ``runs`` (the same questions), so a
    paired test over questions sees the fine-tuning seeds averaged out."""
    tasks = {}
    for task, first in runs[0]["tasks"].items():
        metric = first["metric"]
        per_run = [{i["id"]: i[metric] for i in run["tasks"][task]["items"]} for run in runs]
        items = [{"id": i, metric: sum(r[i] for r in per_run) / len(per_run)} for i in per_run[0]]
        tasks[task] = {"metric": metric, "items": items,
                       "score": sum(i[metric] for i in items) / len(items)}
    return {"tasks": tasks}


def _short(knowledge: dict) -> str:
    return (f"retention {knowledge['retention']:.3f} collateral {knowledge['collateral_retention']:.3f} "
            f"learning {knowledge['learning']:.3f} ppl {knowledge['perplexity']:.2f}")


# --------------------------------------------------------------------------------------------------
# Statistics and report


def _rows(results: dict, condition: str, regime: str) -> dict[int, dict]:
    return {r["seed"]: r for k, r in results.items()
            if isinstance(r, dict) and r.get("condition") == condition and r.get("regime") == regime}


def _bits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")


def summarize(results: dict) -> dict:
    metrics = ("retention", "collateral_retention", "learning", "perplexity", "repetition_rate",
               "distinct_2")
    summary: dict = {}
    for regime in REGIMES:
        for condition in CONDITIONS:
            rows = _rows(results, condition, regime)
            if not rows:
                continue
            entry = {"seeds": sorted(rows)}
            for metric in metrics:
                values = [r["knowledge"][metric] for r in rows.values()]
                entry[metric] = {"mean": float(np.mean(values)),
                                 "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
            entry["wall_seconds"] = float(np.mean([r["finetune"]["wall_seconds"] for r in rows.values()]))
            entry["trainable_params"] = next(iter(rows.values()))["finetune"]["trainable_params"]
            entry["peak_rss_growth_mb"] = float(max(r["peak_rss_growth_mb"] for r in rows.values()))
            int8 = [r["after_int8"] for r in rows.values() if "after_int8" in r]
            if int8:
                entry["after_int8"] = {m: float(np.mean([x[m] for x in int8]))
                                       for m in ("retention", "collateral_retention", "learning",
                                                 "perplexity", "repetition_rate")}
            summary[f"{condition}/{regime}"] = entry
    return summary


def compare(results: dict, a: str, b: str, regime: str, metric_bits: str = "retained",
            stage: str = "knowledge") -> dict | None:
    """A vs B on the same facts and seeds: paired t over seeds (per-seed shares) and Wilcoxon
    signed-rank over facts (each fact's share of seeds in which it was kept)."""
    rows_a = {s: r for s, r in _rows(results, a, regime).items() if stage in r}
    rows_b = {s: r for s, r in _rows(results, b, regime).items() if stage in r}
    seeds = sorted(set(rows_a) & set(rows_b))
    if len(seeds) < 2:
        return None
    per_seed_a = [_bits(rows_a[s][stage][metric_bits]).mean() for s in seeds]
    per_seed_b = [_bits(rows_b[s][stage][metric_bits]).mean() for s in seeds]
    per_fact_a = np.mean([_bits(rows_a[s][stage][metric_bits]) for s in seeds], axis=0)
    per_fact_b = np.mean([_bits(rows_b[s][stage][metric_bits]) for s in seeds], axis=0)
    # The stats module reports mean(second) - mean(first): B goes first so the difference is A - B.
    seeds_test = paired_t(per_seed_b, per_seed_a).to_dict()
    facts_test = wilcoxon(per_fact_b, per_fact_a).to_dict()
    return {
        "a": a, "b": b, "regime": regime, "metric": metric_bits, "stage": stage, "seeds": seeds,
        "mean_a": float(np.mean(per_seed_a)), "mean_b": float(np.mean(per_seed_b)),
        "difference": float(np.mean(per_seed_a) - np.mean(per_seed_b)),
        "paired_t_over_seeds": seeds_test, "wilcoxon_over_facts": facts_test,
    }


def verdict(test: dict | None, learning: dict | None = None) -> str:
    """Holds when A retains more than B with both tests below 0.05; "with a caveat" when A also
    learned the new facts at least 10 points less (its retention is bought by not learning)."""
    if test is None:
        return "not measured yet"
    diff, p_seed = test["difference"], test["paired_t_over_seeds"]["p_value"]
    p_fact = test["wilcoxon_over_facts"]["p_value"]
    significant = p_seed < 0.05 and p_fact < 0.05
    if diff > 0 and significant:
        if learning is not None and learning["difference"] <= -0.10:
            return (f"holds with a caveat: A learns {-100 * learning['difference']:.0f} points "
                    "less of the new data")
        return "holds"
    if diff > 0:
        return "same direction, not significant"
    if significant:
        return "does not hold (significant the other way)"
    return "does not hold"


def report(args) -> None:
    results = load_all_results(args.out)
    if not results:
        raise SystemExit(f"no results in {args.out}")
    summary = summarize(results)
    tests = []
    for claim, a, b, regime, *stage in COMPARISONS:
        test = compare(results, a, b, regime, "retained", *stage)
        learning = compare(results, a, b, regime, "learned", *stage)
        collateral = compare(results, a, b, regime, "control_retained", *stage)
        tests.append({"claim": claim, "retention": test, "learning": learning,
                      "collateral": collateral,
                      "verdict": verdict(test, learning)})
    all_pairs = {}
    for regime in REGIMES:
        for a, b in combinations(CONDITIONS, 2):
            test = compare(results, a, b, regime)
            if test is not None:
                all_pairs[f"{a} vs {b} ({regime})"] = {
                    "difference": test["difference"],
                    "p_seeds": test["paired_t_over_seeds"]["p_value"],
                    "p_facts": test["wilcoxon_over_facts"]["p_value"]}
    truthfulqa = truthfulqa_summary(args.out)
    stats = {"summary": summary, "claims": tests, "all_pairs_retention": all_pairs,
             "truthfulqa": truthfulqa,
             "tests": "paired t-test over seeds on per-seed retention; Wilcoxon signed-rank over "
                      "facts on each fact's share of seeds retained (same facts, same seeds)"}
    write_results(args.out / "stats.json", stats)
    (args.out / "table.md").write_text(markdown(results, summary, tests) + tqa_markdown(truthfulqa))
    plot(summary, args.out / "retention_vs_learning.png")


def _fmt(entry: dict, metric: str, pct: bool = True) -> str:
    m, s = entry[metric]["mean"], entry[metric]["std"]
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.2f} ± {s:.2f}"


def markdown(results: dict, summary: dict, tests: list[dict]) -> str:
    bench = results.get("benchmark", {})
    lines = [
        f"Benchmark: {bench.get('n_retention')} retention + {bench.get('n_control')} control facts "
        f"recalled by the base model ({bench.get('n_recalled')} of {bench.get('n_scanned')} scanned), "
        f"digest {bench.get('digest')}.",
        "",
    ]
    for name in ("base", "compressed"):
        start = results.get(f"start/{name}")
        if start:
            k = start["knowledge"]
            lines.append(f"- before fine-tuning, {name}: retention {100 * k['retention']:.1f} %, "
                         f"control {100 * k['collateral_retention']:.1f} %, learning "
                         f"{100 * k['learning']:.1f} %, ppl {k['perplexity']:.2f}, repetition "
                         f"{k['repetition_rate']:.3f}, distinct-2 {k['distinct_2']:.3f}")
    lines += ["", "| condition | regime | seeds | retention % | collateral % | learning % | ppl | "
              "repetition | distinct-2 | trainable params | FT s/run |", "|" + "---|" * 11]
    for key, e in summary.items():
        condition, regime = key.split("/")
        lines.append(
            f"| {condition} | {regime} | {len(e['seeds'])} | {_fmt(e, 'retention')} | "
            f"{_fmt(e, 'collateral_retention')} | {_fmt(e, 'learning')} | {_fmt(e, 'perplexity', False)} | "
            f"{e['repetition_rate']['mean']:.3f} | {e['distinct_2']['mean']:.3f} | "
            f"{e['trainable_params'] / 1e6:.1f}M | {e['wall_seconds']:.0f} |")
    runs = [r for r in results.values() if isinstance(r, dict) and "finetune" in r]
    measured = [r["knowledge"]["measure_seconds"] for r in runs]
    measured += [r["after_int8"]["measure_seconds"] for r in runs if "after_int8" in r]
    lines += ["", f"{len(runs)} fine-tuning runs: {sum(r['finetune']['wall_seconds'] for r in runs) / 60:.0f} "
              f"min of fine-tuning and {sum(measured) / 60:.0f} min of measuring (one torch thread "
              "each, two runs at a time on 2 shared cores); a measurement takes "
              f"{np.median(measured):.0f} s (median)."]
    int8 = [(k, e) for k, e in summary.items() if "after_int8" in e]
    if int8:
        lines += ["", "Experiment D (gentle fine-tuning, then INT8 of every decoder linear):", "",
                  "| condition | retention before → after INT8 | collateral | learning | ppl | repetition |",
                  "|---|---|---|---|---|---|"]
        for key, e in int8:
            q = e["after_int8"]
            lines.append(
                f"| {key.split('/')[0]} | {100 * e['retention']['mean']:.1f} → {100 * q['retention']:.1f} | "
                f"{100 * e['collateral_retention']['mean']:.1f} → {100 * q['collateral_retention']:.1f} | "
                f"{100 * e['learning']['mean']:.1f} → {100 * q['learning']:.1f} | "
                f"{e['perplexity']['mean']:.2f} → {q['perplexity']:.2f} | "
                f"{e['repetition_rate']['mean']:.3f} → {q['repetition_rate']:.3f} |")
    lines += ["", "| claim | A − B retention (points) | p (t, seeds) | p (Wilcoxon, facts) | "
              "A − B learning (points) | A − B collateral (points, p t/Wilcoxon) | verdict |",
              "|---|---|---|---|---|---|---|"]
    for t in tests:
        r, learn, coll = t["retention"], t["learning"], t["collateral"]
        if r is None:
            lines.append(f"| {t['claim']} | – | – | – | – | – | {t['verdict']} |")
            continue
        lines.append(
            f"| {t['claim']} | {100 * r['difference']:+.1f} ({len(r['seeds'])} seeds) | "
            f"{r['paired_t_over_seeds']['p_value']:.2g} | {r['wilcoxon_over_facts']['p_value']:.2g} | "
            f"{100 * learn['difference']:+.1f} | {100 * coll['difference']:+.1f} "
            f"({coll['paired_t_over_seeds']['p_value']:.2g} / {coll['wilcoxon_over_facts']['p_value']:.2g}) | "
            f"{t['verdict']} |")
    return "\n".join(lines) + "\n"


def _tqa_diff(c: dict | None) -> str:
    if c is None:
        return "–"
    return f"{100 * c['difference']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}], p={c['p_value']:.2g}"


def tqa_markdown(truthfulqa: dict | None) -> str:
    if not truthfulqa:
        return ""
    lines = ["", "TruthfulQA (BIG-bench truthful_qa through lm-eval; paired on the same questions, "
             "difference vs base, 95 % CI, McNemar for MC1, paired t for MC2):", "",
             "| model | MC1 | MC2 | MC1 − base | MC2 − base |", "|---|---|---|---|---|"]
    for name, entry in truthfulqa.items():
        if "scores" not in entry:  # a head-to-head of two conditions, below the table
            continue
        scores, vs = entry["scores"], entry.get("vs_base", {})
        lines.append(f"| {name} | {100 * scores['truthfulqa_mc1']:.1f} | {100 * scores['truthfulqa_mc2']:.1f} | "
                     f"{_tqa_diff(vs.get('truthfulqa_mc1'))} | {_tqa_diff(vs.get('truthfulqa_mc2'))} |")
    for name, entry in truthfulqa.items():
        if "vs" in entry:
            lines += ["", f"{name}: MC1 {_tqa_diff(entry['vs'].get('truthfulqa_mc1'))}, "
                          f"MC2 {_tqa_diff(entry['vs'].get('truthfulqa_mc2'))} (paired over questions)"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {c: plt.cm.tab20(i / len(CONDITIONS)) for i, c in enumerate(CONDITIONS)}
    for key, e in summary.items():
        condition, regime = key.split("/")
        ax.errorbar(100 * e["learning"]["mean"], 100 * e["retention"]["mean"],
                    xerr=100 * e["learning"]["std"], yerr=100 * e["retention"]["std"],
                    fmt="o" if regime == "gentle" else "s", color=colors[condition], capsize=3,
                    label=condition if regime == "gentle" else None)
        ax.annotate(condition, (100 * e["learning"]["mean"], 100 * e["retention"]["mean"]),
                    fontsize=7, xytext=(4, -8 if regime == "aggressive" else 3),
                    textcoords="offset points", color=colors[condition])
    ax.legend(fontsize=7, loc="center right")
    ax.set_xlabel("learning: contradicting answer produced (%)")
    ax.set_ylabel("retention: original answer still produced (%)")
    ax.set_title("SmolLM2-135M, 200 conflicting facts (o gentle, s aggressive; mean ± std over seeds)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _shard(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: write K/N with 0 <= K < N, e.g. 0/2")
    return int(k), int(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/knowledge_protection"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/knowledge_protection"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    parser.add_argument("--n-retention", type=int, default=200)
    parser.add_argument("--n-control", type=int, default=200)
    parser.add_argument("--bench-seed", type=int, default=0)
    parser.add_argument("--ppl-samples", type=int, default=8)
    parser.add_argument("--ppl-seq-len", type=int, default=256)
    parser.add_argument("--generation-tokens", type=int, default=48)
    parser.add_argument("--no-int8", dest="int8", action="store_false")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--truthfulqa", action="store_true",
                        help="run the TruthfulQA MC1/MC2 stage instead of the grid")
    parser.add_argument("--tqa-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tqa-limit", type=int, default=None)
    parser.add_argument("--lane", default="main",
                        help="name of this process's results file (results.LANE.json): give "
                             "processes that run at the same time different lanes")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="K/N",
                        help="run only every N-th grid entry starting at K (parallel processes)")
    parser.add_argument("--report", action="store_true", help="only rebuild stats, table and plot")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.truthfulqa:
        run_truthfulqa(args)
    elif not args.report:
        run_grid(args)
    report(args)


if __name__ == "__main__":
    main()
