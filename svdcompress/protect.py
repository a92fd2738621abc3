"""Knowledge protection (the Intelligent SVD system): what a model keeps when new data contradicts it.

**The conflicting-facts benchmark** (:func:`build_conflict_benchmark`) is made from BIG-bench
``qa_wikidata`` prompts ("The capital of Afghanistan is" → "Kabul"), never from the 300 evaluation
facts that ``svdcompress eval --facts`` scores. It scans facts in a fixed seeded order — first the
``eval`` split without those 300, then, only if that is not enough, the ``calib`` split — and keeps
the ones the *base model* answers correctly (greedy, :func:`~svdcompress.evaluate.fact_recall`):

- a **retention set**: recalled facts whose relation (the prompt without its subject: "The capital
  of … is") has other answers; each gets a **contradicting statement**, the same prompt completed
  with the answer of another item of the same relation ("The capital of Afghanistan is" → "Lima").
  The statements are the fine-tuning data (prompt/completion records: loss on the answer only);
- a **control set**: other recalled facts, never trained on.

After fine-tuning, :func:`measure_knowledge` reports **retention** (retention prompts still answered
with the original answer), **collateral retention** (control set), **learning** (retention prompts
now answered with the contradicting answer: protection that blocks all learning is no
protection, so both numbers always appear together), held-out perplexity, and the repetition rate
and distinct-2 of greedy generations.

The brief's API names live here too, as thin wrappers over the engine: :func:`compress_qko`,
:func:`compress_qko_importance`, :func:`compute_importance`, and :func:`freeze_layers` (from
:mod:`svdcompress.finetune`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdcompress.datasets import Fact, all_facts, load_facts, token_windows
from svdcompress.errors import DatasetError
from svdcompress.evaluate import (
    answer_matches,
    context_length,
    fact_recall,
    generation_quality,
    greedy_continuations,
    perplexity,
)
from svdcompress.finetune import freeze_layers

__all__ = [
    "ConflictBenchmark",
    "ConflictFact",
    "KnowledgeResult",
    "build_conflict_benchmark",
    "compress_qko",
    "compress_qko_importance",
    "compute_importance",
    "freeze_layers",
    "measure_knowledge",
    "relation_of",
]

logger = logging.getLogger(__name__)

FACT_TOKENS = 8  # greedy tokens generated per fact prompt (the answers are a few tokens long)
STANDARD_FACTS = (300, 0)  # (n, seed) of load_facts: the evaluation facts the benchmark never uses

_RELATION = re.compile(r"^(The .+?) (of|by|for) ")


# --------------------------------------------------------------------------------------------------
# Relations and contradictions


def relation_of(prompt: str, known: set[str] | None = None) -> str:
    """The prompt with its subject cut out: "The capital of Afghanistan is" → "The capital of … is".

    qa_wikidata prompts read "The <relation> of|by|for <subject> is". Relations can hold those
    words themselves ("The country of citizenship of …"), so among the cut points the longest
    prefix that is in ``known`` (relations seen in the data set) wins; without ``known`` the first.
    """
    cuts = [m.end() for m in re.finditer(r" (of|by|for) ", prompt)]
    if not prompt.startswith("The ") or not cuts or not prompt.endswith(" is"):
        return prompt
    candidates = [prompt[:end].rstrip() + " … is" for end in cuts]
    if known:
        matching = [c for c in candidates if c in known]
        if matching:
            return max(matching, key=len)
    return candidates[0]


def _relations(facts: Sequence[Fact]) -> dict[str, list[Fact]]:
    """Facts grouped by relation. A candidate prefix counts as a relation when it is shared by at
    least 5 prompts (so a subject's own "of", as in "Confederation of the Rhine", is not cut)."""
    counts: dict[str, int] = defaultdict(int)
    for fact in facts:
        cuts = [m.end() for m in re.finditer(r" (of|by|for) ", fact.prompt)]
        for end in cuts:
            counts[fact.prompt[:end].rstrip() + " … is"] += 1
    known = {relation for relation, count in counts.items() if count >= 5}
    groups: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        groups[relation_of(fact.prompt, known)].append(fact)
    return groups


def _contradiction(fact: Fact, same_relation: list[Fact], rng: random.Random) -> str | None:
    """The answer of another item of the same relation that the fact's answers do not accept."""
    others = [f.answer for f in same_relation if f.prompt != fact.prompt]
    rng.shuffle(others)
    for answer in others:
        if not answer_matches(answer, fact.answers) and not any(
                answer_matches(a, (answer,)) for a in fact.answers):
            return answer
    return None


# --------------------------------------------------------------------------------------------------
# The benchmark


@dataclass(frozen=True)
class ConflictFact:
    """A fact the base model recalls, and the contradicting answer the fine-tuning data teaches."""

    prompt: str
    answers: tuple[str, ...]
    new_answer: str
    relation: str


@dataclass
class ConflictBenchmark:
    retention: list[ConflictFact]
    control: list[Fact]
    n_scanned: int  # facts whose recall was checked to find these
    n_recalled: int  # of which the base model answered correctly
    seed: int
    base_model: str
    notes: list[str] = field(default_factory=list)

    def training_records(self) -> list[dict[str, str]]:
        """The contradicting statements as prompt/completion records (loss on the answer only)."""
        return [{"prompt": f.prompt, "completion": " " + f.new_answer} for f in self.retention]

    def write_training_data(self, path: str | Path) -> Path:
        """The statements as JSONL for ``svdcompress finetune --data``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.training_records()))
        return path

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "retention": [dataclasses.asdict(f) for f in self.retention],
            "control": [f.to_dict() for f in self.control],
            "n_scanned": self.n_scanned, "n_recalled": self.n_recalled, "seed": self.seed,
            "base_model": self.base_model, "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConflictBenchmark:
        retention = [ConflictFact(f["prompt"], tuple(f["answers"]), f["new_answer"], f["relation"])
                     for f in data["retention"]]
        control = [Fact(f["prompt"], f["answers"][0], tuple(f["answers"][1:])) for f in data["control"]]
        return cls(retention, control, data["n_scanned"], data["n_recalled"], data["seed"],
                   data["base_model"], list(data.get("notes", [])))


def _scan_order(seed: int) -> list[tuple[Fact, str]]:
    """Every fact but the standard evaluation ones: the eval split first, then calib, each shuffled."""
    standard = {f.prompt for f in load_facts(*STANDARD_FACTS)}
    order = []
    for split in ("eval", "calib"):
        facts = [(f, s) for f, s in all_facts() if s == split and f.prompt not in standard]
        random.Random(f"{seed}:{split}").shuffle(facts)
        order += facts
    return order


def build_conflict_benchmark(
    model: nn.Module,
    tokenizer: Any,
    *,
    n_retention: int = 200,
    n_control: int = 200,
    seed: int = 0,
    chunk: int = 512,
    batch_size: int = 64,
    progress: bool = True,
) -> ConflictBenchmark:
    """Scan facts until ``n_retention`` + ``n_control`` recalled ones are found (module docstring).

    Recalled facts alternate between the two sets as found (retention first) while both need
    more, so neither set is "the easy facts". Raises :class:`DatasetError` when all facts are
    scanned without enough.
    """
    if n_retention < 1 or n_control < 0:
        raise DatasetError(f"n_retention={n_retention}, n_control={n_control}: ask for at least one "
                           "retention fact and a non-negative control set.")
    everything = [fact for fact, _ in all_facts()]
    groups = _relations(everything)
    relation_by_prompt = {f.prompt: r for r, facts in groups.items() for f in facts}
    order = _scan_order(seed)
    rng = random.Random(seed)
    retention: list[ConflictFact] = []
    control: list[Fact] = []
    scanned = recalled = calib_scanned = 0
    for start in range(0, len(order), chunk):
        facts = [fact for fact, _ in order[start : start + chunk]]
        calib_scanned += sum(split == "calib" for _, split in order[start : start + chunk])
        result = fact_recall(model, tokenizer, facts, max_new_tokens=FACT_TOKENS,
                             batch_size=batch_size, progress=progress)
        scanned += len(facts)
        for fact, hit in zip(facts, result.hits, strict=True):
            if not hit["correct"]:
                continue
            recalled += 1
            relation = relation_by_prompt[fact.prompt]
            wants_retention = len(retention) < n_retention and (
                len(control) >= n_control or len(retention) <= len(control))
            new_answer = _contradiction(fact, groups[relation], rng) if wants_retention else None
            if new_answer is not None:
                retention.append(ConflictFact(fact.prompt, fact.answers, new_answer, relation))
            elif len(control) < n_control:
                control.append(fact)
        logger.info("conflict benchmark: scanned %d facts, %d recalled (%d retention, %d control)",
                    scanned, recalled, len(retention), len(control))
        if len(retention) >= n_retention and len(control) >= n_control:
            break
    if len(retention) < n_retention or len(control) < n_control:
        raise DatasetError(
            f"only {recalled} of {scanned} facts are recalled by this model: {len(retention)} "
            f"retention and {len(control)} control facts, {n_retention} and {n_control} asked for. "
            "Ask for fewer (n_retention, n_control).")
    notes = []
    if calib_scanned:
        notes.append(f"the eval split ran out: {calib_scanned} facts of the calib split were scanned.")
    return ConflictBenchmark(retention, control, scanned, recalled, seed,
                             str(getattr(model, "name_or_path", "")), notes)


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class KnowledgeResult:
    """Retention, collateral retention and learning (shares in [0, 1]) with per-item outcomes as
    0/1 strings in benchmark order (for paired tests), and generation quality."""

    retention: float
    collateral_retention: float
    learning: float
    n_retention: int
    n_control: int
    retained: str  # "1" where retention fact i is still answered as before
    learned: str  # "1" where retention fact i is answered with the contradicting answer
    control_retained: str
    perplexity: float | None
    perplexity_setting: str | None
    repetition_rate: float | None
    distinct_2: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_knowledge(
    model: nn.Module,
    tokenizer: Any,
    benchmark: ConflictBenchmark,
    *,
    ppl_windows: torch.Tensor | None = None,
    ppl_setting: str | None = None,
    generation_tokens: int = 48,
    batch_size: int = 64,
    progress: bool = True,
) -> KnowledgeResult:
    """Score ``model`` on the benchmark (module docstring). ``ppl_windows`` (held-out token
    windows) adds perplexity; ``generation_tokens`` > 0 adds repetition rate and distinct-2 of greedy
    continuations of :data:`~svdcompress.evaluate.DEFAULT_PROMPTS`."""
    prompts = [f.prompt for f in benchmark.retention] + [f.prompt for f in benchmark.control]
    generated = greedy_continuations(model, tokenizer, prompts, max_new_tokens=FACT_TOKENS,
                                     batch_size=batch_size, progress=progress)
    outputs = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    n = len(benchmark.retention)
    retained = [answer_matches(o, f.answers) for f, o in zip(benchmark.retention, outputs[:n], strict=True)]
    learned = [answer_matches(o, (f.new_answer,)) for f, o in zip(benchmark.retention, outputs[:n], strict=True)]
    control = [answer_matches(o, f.answers) for f, o in zip(benchmark.control, outputs[n:], strict=True)]
    ppl = perplexity(model, ppl_windows, progress=progress).perplexity if ppl_windows is not None else None
    gen = generation_quality(model, tokenizer, max_new_tokens=generation_tokens,
                             progress=progress) if generation_tokens else None

    def bits(values: list[bool]) -> str:
        return "".join("1" if v else "0" for v in values)

    def share(values: list[bool]) -> float:
        return sum(values) / len(values) if values else float("nan")

    return KnowledgeResult(
        retention=share(retained), collateral_retention=share(control), learning=share(learned),
        n_retention=n, n_control=len(control), retained=bits(retained), learned=bits(learned),
        control_retained=bits(control), perplexity=ppl,
        perplexity_setting=ppl_setting if ppl_windows is not None else None,
        repetition_rate=gen.repetition_rate if gen else None,
        distinct_2=gen.distinct_2 if gen else None,
    )


def heldout_windows(tokenizer: Any, model: nn.Module, *, data: str = "wiki", seq_len: int = 256,
                    n_samples: int = 8, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Held-out windows for :func:`measure_knowledge`'s perplexity, and their description."""
    windows = token_windows(tokenizer, data, "eval", seq_len=seq_len, n_samples=n_samples,
                            seed=seed, max_positions=context_length(model))
    return windows, f"{data}:eval {n_samples}x{seq_len} seed={seed}"


# --------------------------------------------------------------------------------------------------
# The brief's API names: thin wrappers over compress_


def compress_qko(model: nn.Module, ratio: float = 0.7, *, storage: str = "dense") -> int:
    """CF90's compression step: truncated SVD of every Q, K and O projection keeping ``ratio`` of
    the singular values (rank_ratio), in place. Dense storage by default, as the seeds (denoising:
    no parameter is saved). Returns the number of matrices compressed."""
    from svdcompress.compress import compress_
    from svdcompress.config import SVDConfig

    report = compress_(model, SVDConfig(targets=("qko",), rank_ratio=ratio, storage=storage))
    return len(report.modules)


def compute_importance(model: nn.Module, tokenizer: Any, facts: Sequence[Fact] | None = None, *,
                       n_facts: int = 256, seed: int = 0, **kwargs: Any):
    """Importance of each singular direction of Q/K/O for answering facts (the gradient score of
    :func:`svdcompress.compute_importance`). Without ``facts``, ``n_facts`` facts of the
    ``calib`` split, so the evaluation facts are never used to choose directions."""
    from svdcompress.methods.importance import compute_importance as engine_importance

    facts = list(facts) if facts is not None else load_facts(n_facts, seed, split="calib")
    return engine_importance(model, tokenizer, facts, **kwargs)


def compress_qko_importance(model: nn.Module, importance, ratio: float = 0.5, *,
                            storage: str = "dense") -> int:
    """Like :func:`compress_qko`, keeping the ``ratio`` most *important* singular directions
    (scores from :func:`compute_importance`) instead of the largest. Returns matrices compressed."""
    from svdcompress.compress import compress_
    from svdcompress.config import ImportanceConfig

    config = ImportanceConfig(targets=("qko",), rank_ratio=ratio, storage=storage)
    return len(compress_(model, config, importance=importance).modules)
