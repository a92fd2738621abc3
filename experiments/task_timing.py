"""Time per benchmark task on the dense model (CPU), and its scores against chance.

    python experiments/task_timing.py --limit 50 --threads 1

Each task runs through :func:`svdcompress.tasks.evaluate_tasks` on its first ``--limit`` items
(the data files are shuffled once, so this is a fixed random subset); the seconds per item and the
time the whole task would take are reported. Each finished task is saved at once
(``results.json``), so a rerun skips it; ``table.md`` is rewritten at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from svdcompress.provenance import write_results
from svdcompress.tasks import evaluate_tasks, known_tasks
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/tasks"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from svdcompress import load_model

    path = args.out / "timing.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.pop("provenance", None)
    if results and results.get("settings", {}).get("limit") != args.limit:
        raise SystemExit(f"{path} was made with another --limit; move it away first")
    results.setdefault("settings", {"model": args.model, "limit": args.limit,
                                    "batch_size": args.batch_size, "threads": args.threads})
    results.setdefault("tasks", {})
    model, tokenizer = load_model(args.model)
    names = known_tasks() if args.tasks == "all" else args.tasks.split(",")
    for name in names:
        if name in results["tasks"]:
            continue
        task = evaluate_tasks(model, tokenizer, [name], limit=args.limit,
                              batch_size=args.batch_size)["tasks"][name]
        task["n_total"] = len(load_rows(_DATA.get(name, name)))
        task["load_average_1min"] = os.getloadavg()[0]
        results["tasks"][name] = task
        write_results(path, results)
    (args.out / "timing.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
