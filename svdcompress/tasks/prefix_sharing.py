"""lm-eval's ``HFLM`` with each shared context run once: multiple-choice scoring without the waste.

A multiple-choice item sends one log-likelihood request per answer choice, all with the same
context (TruthfulQA: a 6-shot preamble plus the question, ~300 tokens) and a short continuation
(~10 tokens). ``HFLM`` runs context + continuation for every choice, so the context is computed
once per choice. :class:`PrefixSharingHFLM` runs the context once with ``use_cache=True`` and
scores every continuation of it in one batch on top of that key/value cache::

    context pass     c0 c1 ... cN            -> logits at cN predict the continuation's 1st token
    continuation     [cache c0..cN] k0 k1 .. -> logits at k_i predict k_{i+1} (one row per choice)

Continuations are right-padded; padding comes after every real token, so under the causal mask it
changes nothing that is read, and position ids continue from the cache length on every row. The
numbers equal HFLM's to float rounding (tests/test_prefix_sharing.py).

Only ``_loglikelihood_tokens``'s model calls change; lm-eval still builds requests, tokenises and
scores. Requests HFLM would left-truncate (context + continuation over ``max_length + 1`` tokens),
contexts with a single continuation, and seq2seq models go through HFLM's own code unchanged.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from svdcompress.errors import TaskError

__all__ = ["PrefixSharingHFLM"]

# (request key for the cache hook, context token ids, continuation token ids), as lm-eval sends them
Request = tuple[tuple[str, str] | None, list[int], list[int]]
Answer = tuple[float, bool]  # (log-likelihood of the continuation, is it the greedy decoding)

# Continuations scored in one model call on a copy of the context's cache; caps memory (the
# logits are rows x longest continuation x vocabulary) for items with very many choices.
MAX_CONTINUATIONS_PER_CALL = 64


class PrefixSharingHFLM(HFLM):
    """``HFLM`` whose log-likelihood requests sharing a context compute that context once."""

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[Answer]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        shared = self._shared_context_groups(requests)
        answers: list[Answer | None] = [None] * len(requests)
        in_shared = {index for indices in shared.values() for index in indices}
        rest = [index for index in range(len(requests)) if index not in in_shared]
        if rest:  # HFLM's own path (batched, truncating, calls the cache hook itself)
            plain = super()._loglikelihood_tokens([requests[i] for i in rest], True, override_bs)
            for index, answer in zip(rest, plain, strict=True):
                answers[index] = answer
        progress = tqdm(total=len(in_shared), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests (shared contexts)")
        for context, indices in shared.items():
            scored = self._score_continuations(list(context), [requests[i][2] for i in indices])
            for index, answer in zip(indices, scored, strict=True):
                answers[index] = answer
                if requests[index][0] is not None:  # None: loglikelihood_rolling caches itself
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
            progress.update(len(indices))
        progress.close()
        return answers  # type: ignore[return-value]  (every slot is filled above)

    def _shared_context_groups(
        self, requests: Sequence[Request]
    ) -> dict[tuple[int, ...], list[int]]:
        """Request indices by context, for contexts with 2+ continuations that HFLM won't cut.

        HFLM feeds ``(context + continuation)[-(max_length + 1):][:-1]``: nothing is cut when the
        two together are at most ``max_length + 1`` tokens, and then the model sees exactly the
        context followed by the continuation minus its last token, which is what we compute.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if context and continuation and len(context) + len(continuation) <= self.max_length + 1:
                groups.setdefault(tuple(context), []).append(index)
        return {context: indices for context, indices in groups.items() if len(indices) > 1}

    def _score_continuations(
        self, context: list[int], continuations: list[list[int]]
    ) -> list[Answer]:
        """(log-likelihood, is_greedy) of each continuation after ``context``, context run once."""
        with torch.no_grad(), self._autocast():
            ids = torch.tensor([context], dtype=torch.long, device=self.device)  # (1, C)
            output = self.model(ids, use_cache=True, **self._last_logits_only())
            context_cache = output.get(self._cache_name())
            if context_cache is None:
                raise TaskError(f"{type(self.model).__name__} returned no key/value cache; "
                                "score it with prefix_sharing=False")
            # The last context position predicts the first continuation token.
            first = F.log_softmax(output.logits[0, -1], dim=-1, dtype=self.softmax_dtype)  # (V,)
            answers = []
            for start in range(0, len(continuations), MAX_CONTINUATIONS_PER_CALL):
                chunk = continuations[start : start + MAX_CONTINUATIONS_PER_CALL]
                later = self._continuation_log_probs(context_cache, chunk)
                for row, continuation in enumerate(chunk):
                    tail = later[row, : len(continuation) - 1] if later is not None else first[:0]
                    answers.append(_answer(torch.cat([first[None], tail]), continuation))
        return answers

    def _continuation_log_probs(self, context_cache, continuations: list[list[int]]):
        """Log-probs (B, L, V) after each continuation's tokens but its last, on the context cache.

        None when every continuation is one token long (the context pass already scored them).
        """
        width = max(len(continuation) for continuation in continuations) - 1
        if width == 0:
            return None
        ids = torch.zeros((len(continuations), width), dtype=torch.long, device=self.device)
        for row, continuation in enumerate(continuations):  # right-padded with 0, like HFLM
            ids[row, : len(continuation) - 1] = torch.tensor(continuation[:-1], dtype=torch.long)
        # The forward pass appends to the cache in place, and the next chunk needs it untouched.
        cache = copy.deepcopy(context_cache)
        cache.batch_repeat_interleave(len(continuations))  # (1, H, C, D) -> (B, H, C, D) per layer
        logits = self.model(ids, use_cache=True, **{self._cache_name(): cache}).logits  # (B, L, V)
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)

    def _autocast(self):
        # Same precision as HFLM._model_call, so both paths compute in the same dtype.
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    def _last_logits_only(self) -> dict[str, int]:
        """``logits_to_keep=1`` where the model takes it: skips the LM head on the context."""
        accepts = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return {"logits_to_keep": 1} if accepts else {}

    def _cache_name(self) -> str:
        """The key/value cache's argument and output name (else ``past_key_values``)."""
        takes_cache = "cache" in inspect.signature(self.model.forward).parameters
        return "cache" if takes_cache else "past_key_values"


def _answer(log_probs: torch.Tensor, continuation: list[int]) -> Answer:
    """HFLM's answer from the (len(continuation), V) log-probs that predict ``continuation``."""
    targets = torch.tensor(continuation, dtype=torch.long, device=log_probs.device)
    greedy = bool((log_probs.argmax(dim=-1) == targets).all())
    return float(log_probs.gather(1, targets[:, None]).sum()), greedy
