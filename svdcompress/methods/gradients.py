"""Per-batch gradients of the loss with respect to target weights, as (out, in) matrices."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["LabelledBatch", "target_gradients"]

LabelledBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels


@contextlib.contextmanager
def _only_these_require_grad(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


def target_gradients(
    model: nn.Module, names: list[str], batches: list[LabelledBatch]
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, per batch, the gradient of the mean token loss for each named linear weight."""
    modules = {name: model.get_submodule(name) for name in names}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: gradients of the model as it will be used
    try:
        with _only_these_require_grad(model, [m.weight for m in modules.values()]):
            for input_ids, attention_mask, labels in batches:
                loss = model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    labels=labels.to(device), use_cache=False,
                ).loss
                loss.backward()
                grads = {}
                for name, module in modules.items():
                    grad = module.weight.grad.detach()
                    grads[name] = grad.T if isinstance(module, Conv1D) else grad
                    module.weight.grad = None
                yield grads
    finally:
        model.train(was_training)


def windows_as_batches(windows: torch.Tensor, batch_size: int) -> list[LabelledBatch]:
    """Language-modelling batches from token windows: every token is a label."""
    return [(w, torch.ones_like(w), w) for w in windows.split(batch_size)]
