"""Where an applied compression policy goes wrong: per-layer drift, logits fidelity, repetition.

The seeds found by hand that one layer (GPT-Neo's layer-4 K projection) alone made a model repeat
itself. :func:`diagnose_policy` does that hunt automatically: it runs the original and the
compressed model on the same windows, compares every decoder block's output (cosine, norm drift,
relative error), and names the first block whose output cosine falls below a threshold and the
block whose own step loses the most.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from svdcompress.calibration import forward_hooks
from svdcompress.targets import decoder_blocks

__all__ = ["LayerDrift", "PolicyDiagnostics", "diagnose_policy", "layer_drift"]


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class LayerDrift:
    layer: int
    cosine: float  # mean over tokens of cos(h', h) for the block's output
    norm_ratio: float  # mean over tokens of ‖h'‖ / ‖h‖
    rel_error: float  # ‖H' − H‖_F / ‖H‖_F over all tokens


@torch.no_grad()
def _block_outputs(model: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
    _, blocks = decoder_blocks(model)
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(blocks)

    def keep(index):
        def hook(_module, _args, output):
            outputs[index] = _block_output(output).detach().float()
        return hook

    with forward_hooks({b: keep(i) for i, b in enumerate(blocks)}):
        model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    return outputs


def layer_drift(original: nn.Module, compressed: nn.Module, windows: torch.Tensor,
                batch_size: int = 4) -> list[LayerDrift]:
    """Per decoder block: how far the compressed model's hidden states drift from the original's."""
    sums: np.ndarray | None = None
    n_tokens = 0
    for batch in windows.split(batch_size):
        ref, out = _block_outputs(original, batch), _block_outputs(compressed, batch)
        rows = []
        for h, g in zip(ref, out, strict=True):
            h, g = h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])  # (tokens, d)
            rows.append([float(F.cosine_similarity(g, h, dim=-1).sum()),
                         float((g.norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)).sum()),
                         float((g - h).pow(2).sum()), float(h.pow(2).sum())])
        sums = np.asarray(rows) if sums is None else sums + np.asarray(rows)
        n_tokens += batch.numel()
    assert sums is not None
    return [LayerDrift(i, s[0] / n_tokens, s[1] / n_tokens, math.sqrt(s[2] / max(s[3], 1e-30)))
            for i, s in enumerate(sums)]


@dataclass
class PolicyDiagnostics:
    layers: list[LayerDrift]
    logits: dict[str, Any]  # evaluate.FidelityResult as a dict: cosine, mse, kl, top1_agreement
    cosine_threshold: float
    first_bad_layer: int | None  # first block whose output cosine falls below the threshold
    largest_drop_layer: int  # block whose own step loses the most cosine
    perplexity: dict[str, float] = field(default_factory=dict)  # original / compressed, probe windows
    repetition: dict[str, Any] = field(default_factory=dict)  # original / compressed, greedy text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_bad(layers: list[LayerDrift], threshold: float) -> tuple[int | None, int]:
    first = next((d.layer for d in layers if d.cosine < threshold), None)
    previous = [1.0] + [d.cosine for d in layers[:-1]]
    drops = [p - d.cosine for p, d in zip(previous, layers, strict=True)]
    return first, int(np.argmax(drops))


def diagnose_policy(
    original: nn.Module,
    compressed: nn.Module,
    windows: torch.Tensor,
    *,
    tokenizer: Any = None,
    cosine_threshold: float = 0.95,
    max_new_tokens: int = 48,
) -> PolicyDiagnostics:
    """Compare a compressed model with its original on ``windows`` (and greedy text, given a
    tokenizer): per-layer drift, logits fidelity, perplexity, repetition, and where it breaks."""
    from svdcompress.evaluate import generation_quality, logits_fidelity, perplexity

    layers = layer_drift(original, compressed, windows)
    first, largest = _first_bad(layers, cosine_threshold)
    fidelity = logits_fidelity(compressed, original, windows, progress=False).to_dict()
    ppl = {"original": perplexity(original, windows, progress=False).perplexity,
           "compressed": perplexity(compressed, windows, progress=False).perplexity}
    repetition: dict[str, Any] = {}
    if tokenizer is not None:
        for label, model in (("original", original), ("compressed", compressed)):
            result = generation_quality(model, tokenizer, max_new_tokens=max_new_tokens, progress=False)
            repetition[label] = result.repetition_rate
            repetition[f"{label}_sample"] = result.continuations[0]
    return PolicyDiagnostics(layers, fidelity, cosine_threshold, first, largest, ppl, repetition)
