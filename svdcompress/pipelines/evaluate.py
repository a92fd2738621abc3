"""``svdcompress eval`` as a library call: load the model (and a reference) and measure both."""

from __future__ import annotations

import platform
import time
from typing import Any

__all__ = ["run_eval"]


def _check_tasks(tasks: str | None, limit: int | None) -> list[str]:
    """Task names to run, checked before any model is loaded (fail fast on a typo)."""
    from svdcompress.errors import TaskError

    if not tasks:
        if limit is not None:
            raise TaskError("--limit applies to --tasks; give --tasks too (e.g. --tasks mmlu)")
        return []
    from svdcompress.tasks import check_task_request

    return check_task_request(tasks, limit)


def _paired(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Per-item paired comparisons (model − reference) of the task scores and fact recall."""
    from svdcompress.stats import mcnemar_exact

    paired: dict[str, Any] = {}
    if "tasks" in result and "tasks" in reference:
        from svdcompress.tasks import compare_task_results

        paired.update(compare_task_results(result["tasks"], reference["tasks"]))
    if "facts" in result and "facts" in reference:
        hits = [[float(h["correct"]) for h in r["facts"]["hits"]] for r in (reference, result)]
        paired["facts"] = {"metric": "accuracy", **mcnemar_exact(*hits).to_dict()}
    return paired


def run_eval(
    model_spec: str,
    *,
    reference_spec: str | None = None,
    tasks: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    **settings: Any,
) -> dict[str, Any]:
    """Load the model (and reference) and run :func:`svdcompress.evaluate.evaluate_model`, plus the
    benchmark ``tasks`` (comma-separated, :func:`svdcompress.tasks.evaluate_tasks`) when given.

    With a reference, both are measured the same way and the per-item paired comparisons go to
    ``result["paired"]``. ``device``: where both models run (``auto``, ``cpu``, ``cuda``, ...).
    """
    import torch

    from svdcompress._version import __version__
    from svdcompress.datasets import check_window_request
    from svdcompress.devices import resolve_device
    from svdcompress.evaluate import evaluate_model
    from svdcompress.zoo import load_model

    task_names = _check_tasks(tasks, limit)
    device = resolve_device(device)
    # Everything that needs no model is checked first: fail before a minute of loading.
    check_window_request(settings.get("seq_len", 512), settings.get("n_samples", 64),
                         source=settings.get("data", "wiki"))
    if settings.get("second_domain"):
        check_window_request(settings.get("seq_len", 512), settings.get("n_samples", 64),
                             source=settings["second_domain"])
    started = time.perf_counter()
    model, tokenizer = load_model(model_spec, device=device)
    reference, reference_tokenizer = (load_model(reference_spec, device=device) if reference_spec
                                      else (None, None))
    result = evaluate_model(model, tokenizer, reference=reference, **settings)
    batch_size = settings.get("batch_size", 8)
    if task_names:
        from svdcompress.tasks import evaluate_tasks

        result["tasks"] = evaluate_tasks(
            model, tokenizer, task_names, limit=limit, batch_size=batch_size
        )
    if reference is not None:  # the same measurements of the original, for side-by-side columns
        result["reference"] = evaluate_model(reference, reference_tokenizer, **settings)
        if task_names:
            result["reference"]["tasks"] = evaluate_tasks(
                reference, reference_tokenizer, task_names, limit=limit, batch_size=batch_size
            )
        result["paired"] = _paired(result, result["reference"])
    result["run"] = {
        "model_spec": model_spec,
        "reference_spec": reference_spec,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "svdcompress": __version__,
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "machine": platform.machine(),
    }
    return result
