"""Time per benchmark task on the dense model (CPU), and its scores against chance.

    python experiments/task_timing.py --limit 50 --threads 1

Each task runs through :func:`svdcompress.tasks.evaluate_tasks` on its first ``--limit`` items
(the data files are shuffled once, so this is a fixed random subset); the seconds per item and the
time the whole task would take are reported. Each finished task is saved at once
(``timing.json``), so a rerun skips it; ``timing.md`` is rewritten at the end.

    python experiments/task_timing.py --compare-prefix-sharing --limit 20 --threads 1 \
        --tasks truthfulqa_mc2,mmlu,arc_style

times lm-eval's plain ``HFLM`` against :class:`~svdcompress.tasks.prefix_sharing.PrefixSharingHFLM`
(``evaluate_tasks``' default) on the same items, interleaved in one process: per task and round
both variants run back to back, the order flipping each round (HFLM first in round 0), so a change
in the load of a shared machine hits both alike. Wall and CPU seconds (this process) are kept; the
ratio is HFLM / prefix sharing. Saved per task in ``prefix_sharing.json`` / ``prefix_sharing.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from svdcompress.provenance import write_results
from svdcompress.tasks import PRIMARY_METRIC, evaluate_tasks, known_tasks
from svdcompress.tasks.data import load_rows

_DATA = {"mmlu_cloze": "mmlu"}


def table(results: dict) -> str:
    lines = ["| task | metric | score | chance | items scored | s / item | items in task | "
             "whole task (est.) |", "|---|---|---|---|---|---|---|---|"]
    for name, task in results["tasks"].items():
        per_item = task["elapsed_s"] / task["n"]
        total = task["n_total"] * per_item
        lines.append(
            f"| {name} | {task['metric']} | {task['score']:.1%} ± {task['stderr'] or 0:.1%} | "
            f"{task['chance']:.1%} | {task['n']} | {per_item:.2f} | {task['n_total']} | "
            f"{total / 60:.1f} min |"
        )
    return "\n".join(lines)


def _timed_run(model, tokenizer, name: str, args, prefix_sharing: bool) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    task = evaluate_tasks(model, tokenizer, [name], limit=args.limit, batch_size=args.batch_size,
                          prefix_sharing=prefix_sharing)["tasks"][name]
    return {"wall_s": round(time.perf_counter() - wall, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
            "load_average_1min": os.getloadavg()[0], "score": task["score"], "items": task["items"]}


def _compare_task(model, tokenizer, name: str, args) -> dict:
    """Both variants on one task, ``args.rounds`` times, order flipped each round."""
    runs: dict[str, list[dict]] = {"hflm": [], "prefix_sharing": []}
    for round_index in range(args.rounds):
        order = [False, True] if round_index % 2 == 0 else [True, False]
        for prefix_sharing in order:
            run = _timed_run(model, tokenizer, name, args, prefix_sharing)
            runs["prefix_sharing" if prefix_sharing else "hflm"].append(run)
    metric = PRIMARY_METRIC.get(name, "acc")
    plain, shared = runs["hflm"][0]["items"], runs["prefix_sharing"][0]["items"]
    differences = [abs(a[metric] - b[metric]) for a, b in zip(plain, shared, strict=True)]
    total = {variant: {unit: sum(r[unit] for r in done) for unit in ("wall_s", "cpu_s")}
             for variant, done in runs.items()}
    return {
        "metric": metric, "n": len(plain),
        "score_hflm": runs["hflm"][0]["score"],
        "score_prefix_sharing": runs["prefix_sharing"][0]["score"],
        "max_item_difference": max(differences),
        "speedup_wall": round(total["hflm"]["wall_s"] / total["prefix_sharing"]["wall_s"], 2),
        "speedup_cpu": round(total["hflm"]["cpu_s"] / total["prefix_sharing"]["cpu_s"], 2),
        "runs": {variant: [{k: v for k, v in r.items() if k != "items"} for r in done]
                 for variant, done in runs.items()},
    }


def comparison_table(results: dict) -> str:
    lines = ["| task | items | score HFLM / prefix sharing | max item diff | "
             "HFLM s/item (wall, cpu) | prefix sharing s/item (wall, cpu) | speed-up wall | "
             "speed-up cpu |",
             "|---|---|---|---|---|---|---|---|"]
    for name, task in results["tasks"].items():
        per_item = {variant: [sum(r[unit] for r in runs) / len(runs) / task["n"]
                              for unit in ("wall_s", "cpu_s")]
                    for variant, runs in task["runs"].items()}
        plain, shared = per_item["hflm"], per_item["prefix_sharing"]
        lines.append(
            f"| {name} | {task['n']} | {task['score_hflm']:.4f} / "
            f"{task['score_prefix_sharing']:.4f} | {task['max_item_difference']:.1e} "
            f"| {plain[0]:.2f}, {plain[1]:.2f} | {shared[0]:.2f}, {shared[1]:.2f} "
            f"| {task['speedup_wall']:.1f}x | {task['speedup_cpu']:.1f}x |"
        )
    return "\n".join(lines)


def compare_prefix_sharing(args, names: list[str]) -> None:
    from svdcompress import load_model

    path = args.out / "prefix_sharing.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("provenance", None)
    settings = {"model": args.model, "limit": args.limit, "batch_size": args.batch_size,
                "threads": args.threads, "rounds": args.rounds}
    if results and results.get("settings") != settings:
        raise SystemExit(f"{path} was made with other settings {results['settings']}; move it away")
    results.setdefault("settings", settings)
    results.setdefault("tasks", {})
    model, tokenizer = load_model(args.model)
    for name in names:
        if name not in results["tasks"]:
            results["tasks"][name] = _compare_task(model, tokenizer, name, args)
            write_results(path, results)
    (args.out / "prefix_sharing.md").write_text(comparison_table(results) + "\n")
    print(comparison_table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/tasks"))
    parser.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false",
                        help="time lm-eval's plain HFLM (how timing.json was first made)")
    parser.add_argument("--compare-prefix-sharing", action="store_true",
                        help="time HFLM against prefix sharing, interleaved (prefix_sharing.json)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compare-prefix-sharing: runs of each variant per task")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    names = known_tasks() if args.tasks == "all" else args.tasks.split(",")
    if args.compare_prefix_sharing:
        compare_prefix_sharing(args, names)
        return
    from svdcompress import load_model

    path = args.out / "timing.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("provenance", None)
    if results and results.get("settings", {}).get("limit") != args.limit:
        raise SystemExit(f"{path} was made with another --limit; move it away first")
    # A file without the entry predates prefix sharing, so it was timed with plain HFLM.
    if results and results["settings"].get("prefix_sharing", False) != args.prefix_sharing:
        made_with = "off" if args.prefix_sharing else "on"
        raise SystemExit(f"{path} was made with prefix sharing {made_with}; move it away first")
    results.setdefault("settings", {"model": args.model, "limit": args.limit,
                                    "batch_size": args.batch_size, "threads": args.threads,
                                    "prefix_sharing": args.prefix_sharing})
    results.setdefault("tasks", {})
    model, tokenizer = load_model(args.model)
    for name in names:
        if name in results["tasks"]:
            continue
        task = evaluate_tasks(model, tokenizer, [name], limit=args.limit,
                              batch_size=args.batch_size,
                              prefix_sharing=args.prefix_sharing)["tasks"][name]
        task["n_total"] = len(load_rows(_DATA.get(name, name)))
        task["load_average_1min"] = os.getloadavg()[0]
        results["tasks"][name] = task
        write_results(path, results)
    (args.out / "timing.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
