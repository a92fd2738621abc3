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

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

__all__ = [
    "SUPPORTED_QUANT_BITS",
    "Factors",
    "PivotedFactors",
    "Whitening",
    "balance_factors",
    "blended_target",
    "break_even_rank",
    "dequantize",
    "factored_params",
    "fisher_weighted_svd",
    "gram_eigen",
    "least_squares_left",
    "needs_gram_eigen",
    "pivot_factors",
    "quantize_groupwise",
    "quantize_symmetric",
    "rank_for_param_ratio",
    "relative_output_error",
    "relative_weight_error",
    "scaled_svd",
    "select_by_importance",
    "sqnr_db",
    "symmetrize_",
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


def factored_params(out_features: int, in_features: int, rank: int, storage: str = "factored") -> int:
    """Numbers held by a rank-r factorization of an (out, in) matrix, bias excluded.

    ``factored``: two factors, r·(out + in). ``pivoted`` (:func:`pivot_factors`): r·(out + in − r),
    since r of the input columns are the identity and need not be stored.
    """
    if storage == "pivoted":
        return rank * (out_features + in_features - rank)
    return rank * (out_features + in_features)


def break_even_rank(out_features: int, in_features: int, storage: str = "factored") -> int:
    """Largest rank whose factorization holds fewer numbers than the dense matrix.

    Pivoted storage saves (out − r)(in − r) numbers, so every rank below full rank saves some.
    """
    if storage == "pivoted":
        return min(out_features, in_features) - 1
    return (out_features * in_features - 1) // (out_features + in_features)


def rank_for_param_ratio(out_features: int, in_features: int, ratio: float,
                         storage: str = "factored") -> int:
    """Largest rank (at least 1) whose stored numbers are at most ``ratio`` of the dense matrix."""
    m, n = out_features, in_features
    if storage == "pivoted":  # r(m + n − r) ≤ ratio·m·n: the smaller root of the quadratic
        rank = math.floor(((m + n) - math.sqrt((m + n) ** 2 - 4 * ratio * m * n)) / 2 + 1e-9)
    else:
        rank = math.floor(ratio * m * n / (m + n))
    return max(1, rank)


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


@dataclass
class PivotedFactors:
    """``left @ right`` stored as PIFA pivoted factors: the same product in r·(out + in − r) numbers.

    With ``head = permutation[:r]`` (the pivot input columns) and ``tail = permutation[r:]``,
    ``W[:, head] = left`` and ``W[:, tail] = left @ coupling``: ``W x = left (x_head + coupling x_tail)``.
    """

    left: torch.Tensor  # (out, r): the factorization's product at the pivot columns
    coupling: torch.Tensor  # (r, in − r): the other columns as combinations of the pivot ones
    permutation: torch.Tensor  # (in,) int64: the r pivot input columns first, then the rest

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def product(self) -> torch.Tensor:
        columns = torch.cat([self.left, self.left @ self.coupling], dim=1)  # (out, in) permuted
        return columns[:, torch.argsort(self.permutation)]


def _scipy_threads():
    """scipy's LAPACK on as many threads as torch uses: its own OpenBLAS ignores
    ``torch.set_num_threads`` and, on a busy 2-core machine, spun two threads at 8× the CPU time
    of one (BENCHMARKS.md, issue 12 compression time)."""
    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


def pivot_factors(left: torch.Tensor, right: torch.Tensor) -> PivotedFactors:
    """PIFA (Zhao et al. 2025): the same product as ``left @ right`` with r input columns pivoted.

    Column-pivoted QR of ``right`` (r, in) picks r columns R₁ that span its row space as well as
    any greedy choice can, so R₁ is well conditioned; the other columns R₂ = R₁ C with C = R₁⁻¹R₂,
    and ``left @ right`` = [L R₁ | L R₁ C] up to the column order. Computed in float64 (returned
    so). A rank-deficient ``right`` (a zero singular value) gets the least-squares C, which still
    reproduces the product because R₂'s columns lie in R₁'s span.
    """
    rank = right.shape[0]
    left64, right64 = left.double().cpu(), right.double().cpu()
    with _scipy_threads():
        triangle, pivots = scipy.linalg.qr(right64.numpy(), mode="r", pivoting=True)  # R P = Q T
        # R₁⁻¹R₂ = T₁⁻¹T₂, since R₁ = Q T₁ and R₂ = Q T₂: one triangular solve, no Q needed.
        diagonal = np.abs(np.diag(triangle[:, :rank]))
        if diagonal.min() > 1e-12 * max(diagonal.max(), 1e-300):
            coupling = scipy.linalg.solve_triangular(triangle[:, :rank], triangle[:, rank:])
        else:
            coupling = scipy.linalg.lstsq(triangle[:, :rank], triangle[:, rank:], lapack_driver="gelsd")[0]
    permutation = torch.from_numpy(pivots.astype(np.int64))
    return PivotedFactors(
        (left64 @ right64[:, permutation[:rank]]).to(left.device),
        torch.from_numpy(np.ascontiguousarray(coupling)).to(left.device),
        permutation.to(left.device),
    )


def blended_target(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, blend: float,
                   damping: float = 1e-6) -> torch.Tensor:
    """``W((1−β)I + β·C·G⁻¹)``: the unconstrained least-squares map from drifted inputs x' to
    the blended target W((1−β)x' + βx), with G = Σ x'x'ᵀ and C = Σ x x'ᵀ.

    Whitened truncation of it is then the best rank-r fit of that target (the residual of the
    unconstrained fit is orthogonal to every map of x'). G is damped as in :func:`least_squares_left`.
    """
    weight, gram, cross = weight.double(), gram.double(), cross.double()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    damped = gram + damping * gram.diagonal().mean().clamp_min(1e-30) * eye
    towards_original = torch.linalg.solve(damped, (weight @ cross).T).T  # W C G⁻¹ (G symmetric)
    return (1 - blend) * weight + blend * towards_original


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


@dataclass
class _GramEigen:
    """G ≈ Q Λ Qᵀ with Λ clamped: ``S = Q·diag(root)`` and ``S⁻¹ = diag(1/root)·Qᵀ``, never built."""

    eigvecs: torch.Tensor  # Q (in, in)
    root: torch.Tensor  # Λ^½ after clamping (in,)
    n_clamped: int


def symmetrize_(gram: torch.Tensor, rows: int = 512) -> None:
    """Make G exactly symmetric in place: its strict lower triangle copied onto its upper one, a band
    of rows at a time (no n×n temporary). Idempotent."""
    for start in range(0, gram.shape[0], rows):
        stop = start + rows
        square = gram[start:stop, start:stop]
        square.copy_(square.tril() + square.tril(-1).T)
        gram[start:stop, stop:] = gram[stop:, start:stop].T


def _gram_eigen(gram: torch.Tensor, rel_floor: float) -> _GramEigen:
    """Eigendecomposition of a Gram matrix, clamped so that it never fails.

    ``gram`` is made exactly symmetric in place (its upper triangle the mirror of its lower one: the
    two triangles of a blocked XᵀX can differ in the last bit, and LAPACK reads one). On the CPU a
    contiguous float64 Gram is then decomposed in its own memory: LAPACK's ``syevr`` (scipy,
    ``driver="evr"``, O(n) workspace) overwrites one triangle and the diagonal, which are restored
    from the other afterwards, so besides the Gram only the eigenvectors are held. ``torch.linalg.eigh``
    (``syevd``) would hold a copy and a 2n² workspace more: 0.75 GB on TinyLlama's 5632-wide
    down_proj Gram (BENCHMARKS.md, issue 12).
    """
    if gram.device.type != "cpu":
        symmetrize_(gram)
        eigvals, eigvecs = torch.linalg.eigh(gram.double())
    else:
        own = gram.dtype == torch.float64 and gram.is_contiguous()
        work = gram if own else gram.double().contiguous()
        symmetrize_(work)
        diagonal = work.diagonal().clone()
        try:  # a symmetric C-ordered matrix is the Fortran-ordered array LAPACK works on in place
            with _scipy_threads():
                eigvals, eigvecs = scipy.linalg.eigh(work.numpy().T, lower=True, driver="evr",
                                                     overwrite_a=True, check_finite=False)
        finally:
            symmetrize_(work)  # the strict lower triangle was not touched
            work.diagonal().copy_(diagonal)
        eigvals, eigvecs = torch.from_numpy(eigvals), torch.from_numpy(eigvecs)
    floor = max(eigvals.max().item(), 1e-30) * rel_floor
    n_clamped = int((eigvals < floor).sum())
    return _GramEigen(eigvecs, eigvals.clamp_min(floor).sqrt(), n_clamped)


def whitening(gram: torch.Tensor, rel_floor: float = 1e-6) -> Whitening:
    """Symmetric square root of a Gram matrix that never fails on singular or indefinite input.

    Cholesky (as in SVD-LLM) fails when a channel is never active or rounding makes G indefinite;
    an eigendecomposition with eigenvalues clamped to ``rel_floor · λ_max`` always succeeds and the
    clamped directions are ones the calibration data never excites, so their error does not matter.
    ``gram`` is symmetrised in place (see :func:`_gram_eigen`).
    """
    eigen = _gram_eigen(gram, rel_floor)
    s_inv = (eigen.eigvecs / eigen.root).T  # Λ^-½ Qᵀ
    s = eigen.eigvecs.mul_(eigen.root)  # Q Λ^½ in Q's memory, so S Sᵀ = Q Λ Qᵀ
    return Whitening(s, s_inv, eigen.n_clamped)


def _rows_times(weight: torch.Tensor, matrix: torch.Tensor, rows: int = 512) -> torch.Tensor:
    # W·M in float64 a band of W's rows at a time: no float64 copy of the whole weight.
    out = torch.empty(weight.shape[0], matrix.shape[1], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        torch.matmul(weight[start:start + rows].double(), matrix, out=out[start:start + rows])
    return out


def _top_eigen(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest eigenpairs of (W·S)(W·S)ᵀ or (W·S)ᵀ(W·S): vectors, σ^½ and σ^-½ with σ
    the singular values of W·S, descending. Squaring σ costs nothing that is kept: directions below
    1e-7·σ₁, where σ² would reach rounding, get σ^-½ = 0 and so zero factors."""
    sigma2, vectors = torch.linalg.eigh(matrix)  # ascending
    vectors, sigma = vectors[:, -rank:].flip(1), sigma2[-rank:].flip(0).clamp_min(0).sqrt()
    kept = sigma > 1e-7 * sigma[0].clamp_min(1e-300)
    root = torch.where(kept, sigma.sqrt(), torch.zeros_like(sigma))
    inv_root = torch.where(kept, 1 / sigma.sqrt().clamp_min(1e-300), torch.zeros_like(sigma))
    return vectors, root, inv_root


def gram_eigen(gram: torch.Tensor) -> _GramEigen:
    """The clamped eigendecomposition :func:`whitened_svd` starts from, for targets that share one
    Gram matrix to compute once (``ModuleStats.from_gram``)."""
    return _gram_eigen(gram, 1e-6)


def needs_gram_eigen(shape: tuple[int, int]) -> bool:
    """Whether :func:`whitened_svd` decomposes the Gram matrix for a weight of this (out, in) shape:
    only when it has at least as many rows as columns; a wider one needs W·G·Wᵀ alone."""
    return shape[0] >= shape[1]


def _largest_eigenvalue(gram: torch.Tensor, iterations: int = 30) -> float:
    """λ_max of a positive semi-definite matrix by power iteration from a fixed start (a few n²
    products: the clamping floor needs its order of magnitude, not its digits)."""
    vector = torch.full((gram.shape[0],), gram.shape[0] ** -0.5, dtype=gram.dtype, device=gram.device)
    value = 0.0
    for _ in range(iterations):
        product = gram @ vector
        value = float(product.norm())
        if value == 0.0:
            return 0.0
        vector = product / value
    return value


def _wide_whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> Factors:
    # (W S)(W S)ᵀ = W G Wᵀ: with fewer rows than columns the whitening matrix S is never needed,
    # only the out×out product. The clamp of G's small eigenvalues that the tall path applies is
    # replaced by the ridge G + δI, δ = 1e-6·λ_max: the same floor where it matters (directions
    # the data never excites still carry W's own energy) without an n×n eigendecomposition.
    ridge = 1e-6 * _largest_eigenvalue(gram)
    weight_gram = _rows_times(weight, gram)  # W G (out, in)
    for start in range(0, weight.shape[0], 512):
        weight_gram[start:start + 512].add_(weight[start:start + 512].double(), alpha=ridge)
    product = torch.empty(weight.shape[0], weight.shape[0], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], 512):  # (W G + δW) Wᵀ, a band of W's rows at a time
        torch.matmul(weight_gram, weight[start:start + 512].double().T, out=product[:, start:start + 512])
    del weight_gram
    u, root, inv_root = _top_eigen(product, rank)
    del product
    return Factors(u * root, (u * inv_root).T @ weight.double())


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int, *,
                 eigen: _GramEigen | None = None) -> Factors:
    """Truncation-aware data whitening (SVD-LLM): minimises ‖(W − W')X‖ over rank-r W'.

    With S = QΛ^½ from the Gram matrix G = XXᵀ and W·S = U Σ Vᵀ, the factors are U_r Σ_r^½ and
    Σ_r^½ V_rᵀ S⁻¹ = Σ_r^-½ U_rᵀ W. U (or V) and Σ come from the eigendecomposition of the smaller
    of (W·S)(W·S)ᵀ = W G Wᵀ (out × out) and (W·S)ᵀ(W·S) = S ᵀ(WᵀW)S (in × in) rather than from an
    SVD of W·S. A wide weight (fewer rows than columns: k/v, down_proj) needs only W G Wᵀ, so
    G is never decomposed (:func:`needs_gram_eigen`; its small eigenvalues get a ridge instead of
    the clamp, :func:`_wide_whitened_svd`); a tall or square one decomposes G (clamped, see
    :func:`_gram_eigen`, which symmetrises ``gram`` in place) unless ``eigen``, its
    :func:`gram_eigen` computed beforehand, is given.
    """
    if not needs_gram_eigen(weight.shape):
        return _wide_whitened_svd(weight, gram, rank)
    eigen = gram_eigen(gram) if eigen is None else eigen
    notes = (f"gram: {eigen.n_clamped} eigenvalues clamped to 1e-6·λmax",) if eigen.n_clamped else ()
    s = eigen.eigvecs * eigen.root  # S (in, in)
    wtw = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], 512):  # WᵀW, a band of rows at a time
        rows = weight[start:start + 512].double()
        wtw += rows.T @ rows
    v, root, inv_root = _top_eigen(s.T @ wtw @ s, rank)
    del wtw
    left = _rows_times(weight, s @ (v * inv_root))  # W S V_r Σ_r^-½ = U_r Σ_r^½ (out, r)
    right = ((v * root).T / eigen.root) @ eigen.eigvecs.T  # Σ_r^½ V_rᵀ Λ^-½ Qᵀ (r, in)
    return Factors(left, right, notes)


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


# The two errors below go a band of rows at a time: whole float64 copies of a large weight, its
# approximation and their difference were the peak of a streaming block (issue 12).
_ERROR_COLUMNS = 1024  # relative_output_error: float32 Gram columns at a time
_ERROR_ROWS = 512


def relative_weight_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """‖W − W'‖_F / ‖W‖_F."""
    num = den = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], _ERROR_ROWS):
        rows = weight[start:start + _ERROR_ROWS].double()
        num = num + (rows - approx[start:start + _ERROR_ROWS].double()).pow(2).sum()
        den = den + rows.pow(2).sum()
    return (num.sqrt() / den.sqrt().clamp_min(1e-30)).item()


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − W')X‖_F / ‖W X‖_F computed from the Gram matrix G = XᵀX alone.

    The products run in float32 (half the time of float64; it is a report), on a difference formed
    in float64 first, so their rounding is relative to the error itself, not to W; sums in float64.
    The Gram is taken in float32 a band of columns at a time: a whole float32 copy of a wide one
    (TinyLlama's down_proj: 127 MB) would add to the peak of streaming compression.
    """
    num = den = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], _ERROR_ROWS):
        rows = weight[start:start + _ERROR_ROWS].double()
        diff = (rows - approx[start:start + _ERROR_ROWS].double()).float()
        rows = rows.float()
        for column in range(0, gram.shape[1], _ERROR_COLUMNS):
            band = gram[:, column:column + _ERROR_COLUMNS].float()
            stop = column + band.shape[1]
            num = num + ((diff @ band) * diff[:, column:stop]).sum(dtype=torch.float64)
            den = den + ((rows @ band) * rows[:, column:stop]).sum(dtype=torch.float64)
    return (num.clamp_min(0) / den.clamp_min(1e-30)).sqrt().item()


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


def quantize_groupwise(weight: torch.Tensor, bits: int = 4, group_size: int = 128, *,
                       symmetric: bool = False) -> tuple[torch.Tensor, int]:
    """Round-to-nearest with one fp16 scale (and zero point) per ``group_size`` inputs of each row.

    Returns the dequantized weight (``weight``'s dtype) and the bytes it would take to store:
    ``bits`` per code, plus per group an fp16 scale and, when asymmetric, an fp16 zero point — the
    common RTN baseline convention (GPTQ's ``Quantizer``, AWQ): asymmetric min-max over the group
    with the range widened to include 0, integer zero point, codes in [0, 2^bits − 1]. Symmetric:
    codes in [−(2^(bits−1) − 1), 2^(bits−1) − 1], scale = max|x| / that bound. A row length that
    ``group_size`` does not divide ends with a shorter group (counted as a whole group of scales).
    The scale is rounded to fp16 before use, so the result is what the stored bytes reproduce.
    """
    if weight.ndim != 2:
        raise ValueError(f"quantize_groupwise takes an (out, in) matrix, got shape {tuple(weight.shape)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: use a whole number of bits from 2 to 8 (e.g. 4).")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive whole number (e.g. 128).")
    if not torch.isfinite(weight).all():
        raise ValueError("cannot quantize a tensor holding NaN or inf")
    work = weight.detach().double()
    out = torch.empty_like(work)
    for start in range(0, work.shape[1], group_size):
        group = work[:, start:start + group_size]  # (out, g)
        out[:, start:start + group_size] = _rtn_group(group, bits, symmetric)
    groups = work.shape[0] * math.ceil(work.shape[1] / group_size)
    nbytes = math.ceil(work.numel() * bits / 8) + groups * (2 if symmetric else 4)
    return out.to(weight.dtype), nbytes


def _rtn_group(group: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize each row of ``group`` (float64) with its own fp16 scale."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _fp16(group.abs().amax(1, keepdim=True) / qmax)
        return torch.round(group / scale).clamp_(-qmax, qmax) * scale
    levels = 2**bits - 1
    low = group.amin(1, keepdim=True).clamp(max=0.0)
    high = group.amax(1, keepdim=True).clamp(min=0.0)
    scale = _fp16((high - low) / levels)
    zero = torch.round(-low / scale)
    return (torch.round(group / scale + zero).clamp_(0, levels) - zero) * scale


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero group gets scale 1 (codes 0); fp16 rounding keeps only what would be stored.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(2.0**-24, 65504.0)
    return scale.half().double()
