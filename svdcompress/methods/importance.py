"""The seeds' "intelligent SVD": keep singular directions by their importance to a fact set.

Dropping direction i of W = Σ σᵢ uᵢ vᵢᵀ changes the loss by about −σᵢ uᵢᵀ G vᵢ (first-order
Taylor, G = ∂L/∂W). ``taylor`` scores |Σ_batches σᵢ uᵢᵀ G_b vᵢ|; ``fisher`` scores
Σ_batches (σᵢ uᵢᵀ G_b vᵢ)², which does not let batches with opposite signs cancel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from svdcompress.config import ImportanceConfig
from svdcompress.errors import CalibrationError, ConfigError
from svdcompress.linalg import select_by_importance
from svdcompress.methods import register
from svdcompress.methods.gradients import LabelledBatch, target_gradients
from svdcompress.modules import dense_weight
from svdcompress.targets import find_targets

__all__ = ["ImportanceScores", "compute_importance", "importance_scores"]


@dataclass
class ImportanceScores:
    """Per-module scores, one per singular value of the (original) weight, in descending-σ order."""

    taylor: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]
    source: str
    n_items: int

    def for_mode(self, mode: str) -> dict[str, torch.Tensor]:
        return self.taylor if mode == "taylor" else self.fisher


def importance_scores(
    model, names: list[str], batches: list[LabelledBatch], *, source: str = "custom"
) -> ImportanceScores:
    """Scores for the named linear layers from labelled batches (loss only where labels != -100)."""
    bases = {}
    for name in names:
        u, s, vh = torch.linalg.svd(dense_weight(model.get_submodule(name)).detach().double(),
                                    full_matrices=False)
        bases[name] = (u, s, vh)
    signed = {name: torch.zeros_like(bases[name][1]) for name in names}
    squared = {name: torch.zeros_like(bases[name][1]) for name in names}
    for grads in tqdm(target_gradients(model, names, batches), total=len(batches),
                      desc="importance gradients", leave=False):
        for name, grad in grads.items():
            u, s, vh = bases[name]
            projection = s * torch.einsum("oi,oj,ji->i", u, grad.double(), vh.T)  # σᵢ uᵢᵀ G vᵢ
            signed[name] += projection
            squared[name] += projection.pow(2)
    n_items = sum(int((labels != -100).any(dim=1).sum()) for _, _, labels in batches)
    taylor = {name: value.abs() for name, value in signed.items()}
    return ImportanceScores(taylor, squared, source, n_items)


def fact_batches(tokenizer, facts, batch_size: int) -> list[LabelledBatch]:
    """Prompt + " answer", right-padded; the loss is taken on the answer tokens only."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for fact in facts:
        prompt_ids = tokenizer(fact.prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(" " + fact.answer.strip(), add_special_tokens=False).input_ids
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (tokens, targets) in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            labels[row, : len(targets)] = torch.tensor(targets)
        batches.append((ids, mask, labels))
    return batches


def compute_importance(
    model, tokenizer, facts, *, targets=("qko",), exclude=(), batch_size: int = 8,
    source: str | None = None,
) -> ImportanceScores:
    """Importance of every singular direction of the targeted weights for answering ``facts``.

    ``facts`` are objects with ``prompt`` and ``answer`` (see ``svdcompress.datasets.load_facts``).
    """
    facts = list(facts)
    if not facts:
        raise CalibrationError("compute_importance needs at least one fact (prompt, answer).")
    names = [t.name for t in find_targets(model, tuple(targets), tuple(exclude))]
    batches = fact_batches(tokenizer, facts, batch_size)
    return importance_scores(model, names, batches, source=source or f"{len(facts)} facts")


def prepare(model, targets, config, calibration, importance):
    if importance is None:
        raise CalibrationError(
            "method 'importance' needs scores: scores = svdcompress.compute_importance(model, "
            "tokenizer, facts, targets=config.targets), then compress_(model, config, importance=scores)."
        )
    scores = importance.for_mode(config.mode)
    missing = [t.name for t in targets if t.name not in scores]
    if missing:
        raise ConfigError(
            f"importance scores do not cover {len(missing)} targeted modules (e.g. {missing[0]}); "
            "compute them with the same targets and exclude as the config."
        )
    return {t.name: scores[t.name] for t in targets}


def factorize(weight, rank, stats, extra, config: ImportanceConfig):
    return select_by_importance(weight, extra, rank)


register(ImportanceConfig, factorize, prepare=prepare)
