"""Functions the task YAMLs name with ``!function hooks.<name>`` (lm-eval imports this file by path).

Keep this file thin: lm-eval executes it as a standalone module once per YAML it loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def load_dataset(data: str, **_: Any) -> Any:
    """The task's rows from our cached JSONL (built on first use) as a one-split ``DatasetDict``.

    lm-eval calls it with the YAML's ``dataset_kwargs`` (``data``: which builder) and its metadata.
    """
    import datasets

    from svdcompress.tasks.data import load_rows

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(load_rows(data))})


def process_mc2(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """TruthfulQA MC2: the probability mass on the true answers, normalised over all answers.

    ``results`` holds (log-likelihood, is_greedy) per choice; the first ``n_true`` are true.
    Same formula as lm-eval's truthfulqa_mc2, computed with a log-sum-exp for stability.
    """
    lls = np.array([ll for ll, _ in results], dtype=np.float64)
    probs = np.exp(lls - lls.max())
    return {"mc2": float(probs[: doc["n_true"]].sum() / probs.sum())}
