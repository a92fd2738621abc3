"""Pure tensor-in/tensor-out linear algebra for low-rank compression.

Nothing here knows what a model is. Conventions: a weight ``W`` is (out, in) as in ``nn.Linear``;
a factorization is ``W ≈ left @ right`` with ``left`` (out, r) and ``right`` (r, in); a Gram matrix
``G = Xᵀ X`` is (in, in) over calibration inputs ``X`` (tokens, in). Work is done in float64 for
stability and returned in that dtype; callers cast.

Integer quantization (:func:`quantize_symmetric`) is symmetric round-to-nearest with one float32
scale per slice: ``x ≈ q · scale`` with ``q`` in [-(2^(b-1) - 1), 2^(b-1) - 1] (−127..127 for 8 bits;
−128 is never used so that negation is exact and the grid is symmetric around zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SUPPORTED_QUANT_BITS",
    "Factors",
    "Whitening",
    "balance_factors",
    "break_even_rank",
    "dequantize",
    "factored_params",
    "fisher_weighted_svd",
    "least_squares_left",
    "quantize_symmetric",
    "relative_output_error",
    "relative_weight_error",
    "scaled_svd",
    "select_by_importance",
    "sqnr_db",
    "truncated_svd",
    "whitened_svd",
    "whitening",
]


@dataclass
class Factors:
    """``left @ right`` approximates the weight; ``notes`` says what numerical fixes were applied."""

    left: torch.Tensor  # (out, r)
    right: torch.Tensor  # (r, in)
    notes: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def product(self) -> torch.Tensor:
        return self.left @ self.right


def factored_params(out_features: int, in_features: int, rank: int) -> int:
    """Numbers held by a rank-r factorization of an (out, in) matrix, bias excluded."""
    return rank * (out_features + in_features)


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factorization holds fewer numbers than the dense matrix."""
    return (out_features * in_features - 1) // (out_features + in_features)


def _split_sqrt(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple:
    # Splitting sqrt(σ) to both sides keeps the two factors on the same scale, which matters once
    # they are quantized or optimised by gradient descent.
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def balance_factors(left: torch.Tensor, right: torch.Tensor) -> Factors:
    """The same product ``left @ right`` as ``U√Σ, √ΣVᵀ`` (its SVD split evenly), in float64.

    Data-aware methods leave the two factors on very different scales (whitening puts S⁻¹ into
    ``right``), so one optimiser step size would be huge for one factor and tiny for the other.
    Costs O((out + in)·r²): QR of each factor, then an SVD of the r×r core.
    """
    q_left, r_left = torch.linalg.qr(left.double())  # (out, r), (r, r)
    q_right, r_right = torch.linalg.qr(right.double().T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)  # core (r, r)
    root = s.sqrt()
    return Factors((q_left @ u) * root, root[:, None] * (vh @ q_right.T))


def truncated_svd(weight: torch.Tensor, rank: int) -> Factors:
    """Best rank-r approximation in Frobenius norm (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    left, right = _split_sqrt(u, s, vh, rank)
    return Factors(left, right)


def select_by_importance(weight: torch.Tensor, scores: torch.Tensor, rank: int) -> Factors:
    """Keep the ``rank`` singular directions with the largest ``scores`` instead of the largest σ.

    ``scores`` has one entry per singular value of ``weight`` in descending-σ order.
    """
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    if scores.shape != s.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} != singular values {tuple(s.shape)}")
    keep = torch.topk(scores.double(), rank).indices.sort().values
    root = s[keep].sqrt()
    return Factors(u[:, keep] * root, root[:, None] * vh[keep])


@dataclass
class Whitening:
    """``S`` with ``S Sᵀ = G`` (up to clamping) and its inverse, from an eigendecomposition of G."""

    s: torch.Tensor  # (in, in)
    s_inv: torch.Tensor  # (in, in)
    n_clamped: int  # eigenvalues raised to the floor: the Gram matrix was singular in those directions


def whitening(gram: torch.Tensor, rel_floor: float = 1e-6) -> Whitening:
    """Symmetric square root of a Gram matrix that never fails on singular or indefinite input.

    Cholesky (as in SVD-LLM) fails when a channel is never active or rounding makes G indefinite;
    an eigendecomposition with eigenvalues clamped to ``rel_floor · λ_max`` always succeeds and the
    clamped directions are ones the calibration data never excites, so their error does not matter.
    """
    gram = gram.double()
    gram = (gram + gram.T) / 2
    eigvals, eigvecs = torch.linalg.eigh(gram)
    floor = max(eigvals.max().item(), 1e-30) * rel_floor
    n_clamped = int((eigvals < floor).sum())
    root = eigvals.clamp_min(floor).sqrt()
    s = eigvecs * root  # Q Λ^½, so S Sᵀ = Q Λ Qᵀ
    s_inv = (eigvecs / root).T  # Λ^-½ Qᵀ
    return Whitening(s, s_inv, n_clamped)


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> Factors:
    """Truncation-aware data whitening (SVD-LLM): minimises ‖(W − W')X‖ over rank-r W'."""
    white = whitening(gram)
    u, s, vh = torch.linalg.svd(weight.double() @ white.s, full_matrices=False)
    left, right = _split_sqrt(u, s, vh, rank)
    notes = (f"gram: {white.n_clamped} eigenvalues clamped to 1e-6·λmax",) if white.n_clamped else ()
    return Factors(left, right @ white.s_inv, notes)


def scaled_svd(weight: torch.Tensor, scale: torch.Tensor, rank: int) -> Factors:
    """ASVD: SVD of W·diag(scale), mapped back; ``scale`` is per input channel, positive."""
    scale = scale.double().clamp_min(1e-8 * scale.max().clamp_min(1e-30))
    u, s, vh = torch.linalg.svd(weight.double() * scale, full_matrices=False)
    left, right = _split_sqrt(u, s, vh, rank)
    return Factors(left, right / scale)


def fisher_weighted_svd(weight: torch.Tensor, row_fisher: torch.Tensor, rank: int) -> Factors:
    """FWSVD: SVD of diag(√I)·W with I the per-output-row Fisher information, mapped back."""
    weights = row_fisher.double().clamp_min(0).sqrt()
    weights = weights / weights.mean().clamp_min(1e-30)
    weights = weights.clamp_min(1e-6)  # a row with no gradient still needs a finite inverse
    u, s, vh = torch.linalg.svd(weights[:, None] * weight.double(), full_matrices=False)
    left, right = _split_sqrt(u, s, vh, rank)
    return Factors(left / weights[:, None], right)


def least_squares_left(
    weight: torch.Tensor,
    right: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor | None = None,
    damping: float = 1e-6,
) -> torch.Tensor:
    """Closed-form left factor for a fixed right factor (SVD-LLM's parameter update).

    Minimises Σ‖W x − A B x'‖² over A, where x are the original model's inputs and x' the inputs
    seen by the compressed model: A = W C Bᵀ (B G' Bᵀ)⁻¹ with C = Σ x x'ᵀ and G' = Σ x' x'ᵀ.
    Without ``cross`` (x = x') this is A = W G' Bᵀ (B G' Bᵀ)⁻¹.
    """
    weight, right, gram = weight.double(), right.double(), gram.double()
    cross = gram if cross is None else cross.double()
    inner = right @ gram @ right.T  # (r, r)
    inner = inner + damping * inner.diagonal().mean().clamp_min(1e-30) * torch.eye(
        inner.shape[0], dtype=inner.dtype, device=inner.device
    )
    rhs = weight @ cross @ right.T  # (out, r)
    return torch.linalg.solve(inner, rhs.T).T


def relative_weight_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − W'‖_F / ‖W‖_F."""
    weight = weight.double()
    return ((weight - approx.double()).norm() / weight.norm().clamp_min(1e-30)).item()


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − W')X‖_F / ‖W X‖_F computed from the Gram matrix G = XᵀX alone."""
    weight, gram = weight.double(), gram.double()
    diff = weight - approx.double()
    num = torch.einsum("oi,ij,oj->", diff, gram, diff).clamp_min(0)
    den = torch.einsum("oi,ij,oj->", weight, gram, weight).clamp_min(1e-30)
    return (num / den).sqrt().item()


# Bit widths the storage format and the kernels handle. 4 needs packing two values per byte and
# its own kernels; adding it means adding it here, in modules.py and in runtime.py.
SUPPORTED_QUANT_BITS = (8,)


def quantize_symmetric(
    x: torch.Tensor, bits: int = 8, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization with one scale per slice, the max taken along ``dim``.

    For a 2-D ``x`` and ``dim=1`` that is one scale per row: ``q`` (int8, same shape as ``x``) and
    ``scale`` (float32, ``x.shape`` without ``dim``) with ``x ≈ q * scale.unsqueeze(dim)``. An
    all-zero slice gets scale 1 (its codes are 0). NaN or inf input raises ``ValueError``.
    """
    if bits not in SUPPORTED_QUANT_BITS:
        raise ValueError(f"bits={bits} is not supported; supported: {SUPPORTED_QUANT_BITS}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor holding NaN or inf")
    qmax = 2 ** (bits - 1) - 1
    work = x.detach().double()  # float64 so the rounding decision does not depend on x's dtype
    amax = work.abs().amax(dim=dim, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).float()
    q = torch.round(work / scale.double()).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale.squeeze(dim)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dim: int = -1,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_symmetric`: ``q * scale`` with the scale broadcast along ``dim``."""
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(dim)).to(dtype)


def sqnr_db(x: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(‖x‖² / ‖x − x'‖²) in dB."""
    x = x.double()
    noise = (x - approx.double()).pow(2).sum().clamp_min(1e-300)
    return (10 * torch.log10(x.pow(2).sum().clamp_min(1e-300) / noise)).item()
