"""Gradient refinement of low-rank factors on a layer's calibration inputs (the seeds' GSVD).

The objective for one layer with weight ``W`` (out, in) and factors ``A`` (out, r), ``B`` (r, in) is

    L(A, B) = Σ‖W x − A B x'‖² / Σ‖W x‖²

over the calibration tokens, where ``x'`` is the input the layer sees in the already-compressed
model and ``x`` the input it saw in the original model (``x = x'`` when the original stream was not
tracked). It is a quadratic in ``M = A B``, so it is written exactly with second moments the
calibration pipeline already gathers:

    Σ‖W x − M x'‖² = tr(W Gₓ Wᵀ) − 2⟨W C, M⟩ + tr(M G' Mᵀ),   G' = Σ x'x'ᵀ, C = Σ x x'ᵀ, Gₓ = Σ x xᵀ.

Why full-batch on the Gram statistics rather than mini-batches of stored activations: the Gram
form is the exact sum over every calibration batch (the pipeline accumulates it batch by batch, so
memory is bounded by (in × in) per layer, not by the token count), each step costs
O(r·in² + out·in·r) whatever the number of tokens, and there is no sampling, so the result is
bit-for-bit deterministic. Mini-batch SGD on a quadratic only adds gradient noise.

The optimiser is Adam on (A, B) in float64 with a step size relative to each factor's RMS, so one
``lr`` suits layers of any scale. The best iterate is returned, so refinement never ends worse
than it started; a loss that turns NaN/inf or grows far above its start stops the run.

Which inputs: ``x = x'`` (the issue's objective) unless the caller passes cross statistics, which
:func:`svdcompress.compress_` gathers only with ``update=True``. Measured on SmolLM2-135M
(BENCHMARKS.md, issue 6), fitting every layer to the original model's outputs from drifted inputs
made held-out perplexity far worse even though each layer's calibration loss fell: a linear map
of x' explains little of the drift (at block 6, held-out ‖W x − A B x'‖/‖W x‖ went 0.70 -> 0.62
for o_proj) while moving the layer far from W on its own inputs (‖(W − A B) x'‖/‖W x'‖
0.17 -> 0.50), so the next blocks drift further and chase a larger, less predictable residual.
So the default objective stays on the compressed stream.

Note: the rank-r minimiser of this quadratic is known in closed form (reduced-rank regression,
:func:`optimal_factors`): starting from truncation-aware whitening with ``x = x'``, the start is
already optimal and refinement can only confirm it. Refinement earns its keep from other starts
(plain SVD, ASVD, Fisher, importance).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from svdcompress.linalg import Factors, whitening

__all__ = [
    "LayerObjective",
    "RefineResult",
    "RefineSettings",
    "optimal_factors",
    "refine_factors",
]

logger = logging.getLogger(__name__)

DIVERGENCE_FACTOR = 10.0  # a loss this many times its start means the step size is too large


@dataclass(frozen=True)
class RefineSettings:
    iters: int
    lr: float = 0.03  # Adam step size as a fraction of each factor's RMS
    patience: int = 25  # stop after this many iterations without a new best loss
    min_gain: float = 1e-6  # a new best must beat the old one by this relative amount


@dataclass
class RefineResult:
    factors: Factors
    error_before: float  # sqrt of the normalized loss at the start (comparable to output_error)
    error_after: float  # the same, for the returned (best) factors
    iters_run: int
    diverged: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerObjective:
    """Σ‖W x − A B x'‖² / Σ‖W x‖², held as second moments (float64)."""

    gram: torch.Tensor  # G' = Σ x'x'ᵀ (in, in)
    target: torch.Tensor  # P = W C (out, in); W G' when x = x'
    energy: float  # Σ‖W x‖² = tr(W Gₓ Wᵀ)

    @classmethod
    def from_stats(
        cls,
        weight: torch.Tensor,
        gram: torch.Tensor,
        cross: torch.Tensor | None = None,
        original_gram: torch.Tensor | None = None,
    ) -> LayerObjective:
        """``cross`` (Σ x x'ᵀ) needs ``original_gram`` (Σ x xᵀ) for the constant term."""
        weight, gram = weight.double(), gram.double()
        if cross is None:
            target = weight @ gram
            energy = (target * weight).sum()
        else:
            if original_gram is None:
                raise ValueError("cross statistics need original_gram for the loss's constant term")
            target = weight @ cross.double()
            energy = ((weight @ original_gram.double()) * weight).sum()
        return cls(gram, target, max(energy.item(), 1e-30))

    def value(self, left: torch.Tensor, right: torch.Tensor) -> float:
        return self.value_and_grads(left, right)[0]

    def value_and_grads(self, left: torch.Tensor, right: torch.Tensor):
        """Normalized loss and its gradients in O(r·in² + out·in·r), never forming A B."""
        right_gram = right @ self.gram  # (r, in)
        inner = right_gram @ right.T  # (r, r) = B G' Bᵀ
        left_gram = left.T @ left  # (r, r) = Aᵀ A
        left_target = left.T @ self.target  # (r, in) = Aᵀ P
        raw = (left_gram * inner).sum() - 2 * (left_target * right).sum() + self.energy
        scale = 2.0 / self.energy
        grad_left = scale * (left @ inner - self.target @ right.T)  # (out, r)
        grad_right = scale * (left_gram @ right_gram - left_target)  # (r, in)
        return (raw / self.energy).item(), grad_left, grad_right


def optimal_factors(objective: LayerObjective, rank: int) -> Factors:
    """The exact rank-r minimiser (reduced-rank regression): a reference for refinement.

    With G' = S Sᵀ, the loss is const + ‖(M − P G'⁻¹) S‖², minimised by the truncated SVD of
    P G'⁻¹ S = P S⁻ᵀ mapped back through S⁻¹.
    """
    white = whitening(objective.gram)
    u, s, vh = torch.linalg.svd(objective.target @ white.s_inv.T, full_matrices=False)
    root = s[:rank].sqrt()
    return Factors(u[:, :rank] * root, (root[:, None] * vh[:rank]) @ white.s_inv)


def _rms(tensor: torch.Tensor) -> float:
    return max(tensor.pow(2).mean().sqrt().item(), 1e-12)


def _is_divergent(loss: float, start: float) -> bool:
    return not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * max(start, 1e-12)


def _divergence_note(step: int, loss: float, best_step: int, lr: float) -> str:
    return (
        f"refinement diverged at step {step} (relative loss {loss:.3g}); kept the factors of "
        f"step {best_step}; lower refine_lr (now {lr:g})"
    )


def refine_factors(
    objective: LayerObjective, start: Factors, settings: RefineSettings
) -> RefineResult:
    """Adam on (A, B) from ``start``; returns the best factors seen (never worse than ``start``)."""
    left = start.left.detach().double().clone().requires_grad_(True)
    right = start.right.detach().double().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([
        {"params": [left], "lr": settings.lr * _rms(left)},
        {"params": [right], "lr": settings.lr * _rms(right)},
    ])
    best_left, best_right = left.detach().clone(), right.detach().clone()
    first = best = math.inf
    best_step, diverged, notes, step = 0, False, list(start.notes), 0
    for step in range(settings.iters + 1):  # the loss after `step` Adam steps
        loss, left.grad, right.grad = objective.value_and_grads(left.detach(), right.detach())
        first = loss if step == 0 else first
        if step > 0 and _is_divergent(loss, first):
            diverged = True
            notes.append(_divergence_note(step, loss, best_step, settings.lr))
            break
        if step == 0 or loss < best * (1 - settings.min_gain):
            best, best_step = loss, step
            best_left.copy_(left.detach())
            best_right.copy_(right.detach())
        if step == settings.iters or step - best_step >= settings.patience:
            break
        optimizer.step()
    notes.append(_summary_note(first, best, best_step, step))
    return RefineResult(
        factors=Factors(best_left, best_right, tuple(notes)),
        error_before=math.sqrt(max(first, 0.0)),
        error_after=math.sqrt(max(best, 0.0)),
        iters_run=step,
        diverged=diverged,
    )


def _summary_note(first: float, best: float, best_step: int, steps: int) -> str:
    if best_step == 0:
        return f"refinement: no improvement in {steps} steps; kept the starting factors"
    return (
        f"refinement: relative output loss {first:.4g} -> {best:.4g} "
        f"(best after step {best_step} of {steps})"
    )
