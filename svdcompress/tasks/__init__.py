"""Standard benchmark tasks, offline, through lm-evaluation-harness, on a model in memory.

The engine is lm-eval (``pip install 'svdcompress[tasks]'``): :func:`evaluate_tasks` wraps the
model in ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)`` and runs
``lm_eval.simple_evaluate`` with ``log_samples=True`` on the task YAMLs in this folder, loaded with
``TaskManager(include_path=<this folder>, include_defaults=False)``. Their data are local JSONL
files built from real sources into the cache (:mod:`svdcompress.tasks.data`); nothing touches
the hub. Every task is scored by log-likelihood of the answer choices (lm-eval's
``multiple_choice``), zero-shot, so results are deterministic.

Multiple-choice items share one context across their answer choices; by default the model is
wrapped in :class:`~svdcompress.tasks.prefix_sharing.PrefixSharingHFLM`, an ``HFLM`` that runs each
shared context once and scores the choices on its key/value cache (same numbers to float rounding,
several times faster on long few-shot prompts); ``prefix_sharing=False`` uses plain ``HFLM``.

Per-item scores come back with each task (``items``: the item's source ``id`` and every metric),
so two models can be compared on the same items with :func:`compare_task_results`
(:mod:`svdcompress.stats`: exact McNemar for 0/1 accuracies, paired t-test for TruthfulQA MC2).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from svdcompress.errors import TaskError

__all__ = [
    "PRIMARY_METRIC",
    "TASK_DIR",
    "check_task_request",
    "compare_task_results",
    "evaluate_tasks",
    "known_tasks",
    "parse_task_list",
]

logger = logging.getLogger(__name__)

TASK_DIR = Path(__file__).parent
_INSTALL_HINT = "install it with: pip install 'svdcompress[tasks]'"
# The headline metric of each task (lm-eval reports every metric of its YAML; see README).
PRIMARY_METRIC = {
    "truthfulqa_mc2": "mc2",
    "arc_style": "acc_norm",
    "hellaswag_style": "acc_norm",
    "mmlu_cloze": "acc_norm",
}


def known_tasks() -> list[str]:
    """Names of the tasks shipped with svdcompress (one YAML each in this folder)."""
    return sorted(path.stem for path in TASK_DIR.glob("*.yaml"))


def parse_task_list(spec: str | Sequence[str]) -> list[str]:
    """Task names from ``"a,b"`` (or a list), checked against :func:`known_tasks`; 'all' = every one."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    known = known_tasks()
    if names == ["all"]:
        return known
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        what = f"unknown task {', '.join(map(repr, unknown))}" if unknown else "no task given"
        raise TaskError(f"{what}; known tasks: {', '.join(known)} (or 'all')")
    return list(dict.fromkeys(names))  # de-duplicated, in the order given


def check_task_request(tasks: str | Sequence[str], limit: int | None = None) -> list[str]:
    """The task names of ``tasks``, after checking them, ``limit`` and that lm-eval is installed."""
    names = parse_task_list(tasks)
    if limit is not None and limit < 1:
        raise TaskError(f"--limit must be at least 1 item per task, got {limit}")
    _require_lm_eval()
    return names


def _require_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (fails early if broken)
    except ImportError as err:
        raise TaskError(f"the benchmark tasks need lm-eval ({err}); {_INSTALL_HINT}") from None
    return lm_eval


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every request build at INFO/WARNING; show it only when our caller is verbose."""
    lm_logger = logging.getLogger("lm_eval")
    previous = lm_logger.level
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        lm_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lm_logger.setLevel(previous)


def _chance(doc: dict[str, Any]) -> float:
    """Expected accuracy (or MC2) of a uniform guess on one item."""
    choices = doc.get("choices") or doc.get("options") or ("True", "False")  # misconceptions
    n_choices = len(choices)
    n_gold = len(doc["labels"]) if "labels" in doc else doc.get("n_true", 1)
    return n_gold / n_choices


def _task_result(name: str, results: dict[str, Any], elapsed: float) -> dict[str, Any]:
    summary = results["results"][name]
    samples = results["samples"][name]
    metrics = {key.split(",")[0]: value for key, value in summary.items()
               if "," in key and "_stderr" not in key}
    primary = PRIMARY_METRIC.get(name, "acc")
    items = [{"id": s["doc"]["id"], **{m: float(s[m]) for m in metrics if m in s}}
             for s in sorted(samples, key=lambda s: s["doc_id"])]
    stderr = summary.get(f"{primary}_stderr,none")  # "N/A" from lm-eval for a single item
    return {
        "metric": primary,
        "score": metrics[primary],
        "stderr": stderr if isinstance(stderr, int | float) else None,
        "n": len(items),
        "chance": sum(_chance(s["doc"]) for s in samples) / len(samples),
        "metrics": metrics,
        "elapsed_s": round(elapsed, 1),
        "items": items,
    }


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    prefix_sharing: bool = True,
) -> dict[str, Any]:
    """Score ``model`` (in memory, any svdcompress checkpoint or plain HF model) on ``tasks``.

    ``limit`` keeps the first ``limit`` items of each task (the data files are shuffled once, so
    this is a fixed random subset). Returns ``{"harness": ..., "limit": ..., "tasks": {name:
    {"metric", "score", "stderr", "n", "chance", "metrics", "elapsed_s", "items"}}}`` where
    ``items`` lists every item's source ``id`` and metric values, for paired comparisons.
    Each task runs in its own ``simple_evaluate`` call so that its wall time is measured.
    ``prefix_sharing`` computes each context shared by several answer choices once
    (:class:`~svdcompress.tasks.prefix_sharing.PrefixSharingHFLM`); False runs lm-eval's ``HFLM``
    as it is, for reference.
    """
    names = check_task_request(tasks, limit)
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from svdcompress.tasks.prefix_sharing import PrefixSharingHFLM

    with _quiet_lm_eval():
        lm_class = PrefixSharingHFLM if prefix_sharing else HFLM
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
        out: dict[str, Any] = {"harness": f"lm-eval {lm_eval.__version__}", "limit": limit,
                               "tasks": {}}
        for name in names:
            started = time.perf_counter()
            results = lm_eval.simple_evaluate(
                model=lm, tasks=[name], task_manager=manager, limit=limit, log_samples=True,
                bootstrap_iters=100, batch_size=batch_size,  # means: closed-form stderr
            )
            out["tasks"][name] = _task_result(name, results, time.perf_counter() - started)
            logger.info("%s: %s = %.4f on %d items (%.0f s)", name, out["tasks"][name]["metric"],
                        out["tasks"][name]["score"], out["tasks"][name]["n"],
                        out["tasks"][name]["elapsed_s"])
    return out


def compare_task_results(
    result: dict[str, Any], reference: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per task, ``result`` vs ``reference`` on the same items (by source id), primary metric.

    0/1 metrics get the exact McNemar test, continuous ones (MC2) the paired t-test; both with a
    95 % interval of the difference (see :mod:`svdcompress.stats`). Difference = result − reference.
    """
    from svdcompress.stats import compare_paired

    comparisons = {}
    for name, task in result["tasks"].items():
        other = reference["tasks"].get(name)
        if other is None:
            continue
        metric = task["metric"]
        ours = {item["id"]: item[metric] for item in task["items"]}
        theirs = {item["id"]: item[metric] for item in other["items"]}
        shared = sorted(ours.keys() & theirs.keys())
        if not shared:
            raise TaskError(f"{name}: the two results share no items; run both with the same --limit")
        paired = compare_paired([theirs[i] for i in shared], [ours[i] for i in shared])
        comparisons[name] = {"metric": metric, **paired.to_dict()}
    return comparisons
