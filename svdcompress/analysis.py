"""Where low-rank compression hurts a model: spectra, measured sensitivity, policy diagnostics.

Three questions, answered from one calibration pass over the original model:

1. *How compressible is each matrix?* The singular values of W (plain) and of W·S, with S Sᵀ the
   calibration Gram matrix (whitened). The whitened tail energy Σ_{i≥r} s_i² is exactly the squared
   output error ‖(W − W_r)X‖² of the best rank-r approximation on the calibration inputs.
2. *How much does that error cost the model?* The tail energy cannot say: the same output error is
   harmless in one layer and ruinous in another. So each module is compressed alone at a few ranks
   and the KL divergence of the next-token distribution from the original's is measured on a small
   probe batch, running only from the module's block to the end (every block's probe input is
   cached once). Between and beyond the measured ranks the KL is interpolated in log-log against the
   tail energy: the proxy supplies the shape of each curve, the measurement its height.
3. *Where does a whole policy go wrong?* See :mod:`svdcompress.diagnostics`.

Results are cached in an analysis folder (one JSON, rewritten atomically after every block) with a
fingerprint of the model and of the settings: an interrupted run resumes where it stopped, and a
folder made for another model or with other settings is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from svdcompress.calibration import (
    BlockCall,
    Calibration,
    ModuleStats,
    capture_block_inputs,
    forward_hooks,
    run_block,
    run_sequential,
)
from svdcompress.diagnostics import (  # re-exported: policy diagnostics began here
    LayerDrift,
    PolicyDiagnostics,
    diagnose_policy,
    layer_drift,
)
from svdcompress.errors import AnalysisError
from svdcompress.evaluate import kl_divergence
from svdcompress.fetch import atomic_write_json
from svdcompress.linalg import whitening
from svdcompress.modules import dense_weight, unsplit_state_dict
from svdcompress.provenance import provenance
from svdcompress.targets import Target, decoder_blocks, find_targets

__all__ = [
    "ANALYSIS_FILE",
    "DEFAULT_FRACTIONS",
    "Analysis",
    "LayerDrift",
    "Measurement",
    "ModuleAnalysis",
    "PolicyDiagnostics",
    "Probe",
    "analysis_settings",
    "analyze",
    "build_probe",
    "diagnose_policy",
    "effective_rank",
    "energy_rank",
    "interpolate_kl",
    "layer_drift",
    "load_analysis",
    "model_fingerprint",
    "probe_ranks",
    "weight_replaced",
]

logger = logging.getLogger(__name__)

ANALYSIS_FILE = "sensitivity.json"
FORMAT_VERSION = 1
# Parameter fractions (of each dense matrix) at which the KL is measured: one mild, one harsh, so
# the interpolation spans the ranks a 0.6-0.9 global budget actually hands out.
DEFAULT_FRACTIONS = (0.7, 0.35)
_KL_FLOOR = 1e-9  # below this a measured KL is float noise on a probe of ~1k tokens
_HEAD_CHUNK = 512  # token rows per lm_head call: bounds the (rows, vocab) temporaries


# --------------------------------------------------------------------------------------------------
# Pure helpers


def model_fingerprint(model: nn.Module, *, strict: bool = True,
                      samples: Iterable[tuple[str, tuple[int, ...], torch.Tensor]] | None = None) -> str:
    """A short hash of the architecture, config and a strided sample of every tensor.

    Sampling (≤1024 values per tensor) keeps it fast on large models while any real change of
    weights — another checkpoint, a compressed copy — changes the hash. ``strict=False`` leaves
    out what says how the weights were loaded or saved rather than what they are (the dtype:
    samples are compared as float32; ``architectures``, which ``save_pretrained`` fills in), so the
    same model built in memory, saved and reloaded, or loaded in bfloat16 matches: how
    ``compress_`` records the original model for ``recover``. ``samples`` gives ``(name, shape,
    float32 sample)`` per tensor from elsewhere (streaming reads them from the shards of a model
    held on the meta device); by default they are taken from the model's own tensors.
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    config = model.config.to_dict()
    ignored = ("_name_or_path", "transformers_version", "compression_config")
    for key in ignored if strict else (*ignored, "dtype", "torch_dtype", "architectures"):
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, shape, sample in _tensor_samples(model) if samples is None else samples:
        digest.update(f"{name}{tuple(shape)}".encode())
        digest.update(sample.contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def _tensor_samples(model: nn.Module) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
    # A split fused projection (modules.SlicedLinear) shows as the layer it was: same weights, same hash.
    for name, tensor in unsplit_state_dict(model).items():
        flat = tensor.detach().reshape(-1)
        yield name, tuple(tensor.shape), flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu()


def effective_rank(values: Sequence[float]) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    s = np.asarray(values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def energy_rank(values: Sequence[float], share: float = 0.9) -> int:
    """Smallest rank keeping ``share`` of Σσ² (for whitened values: of the output energy)."""
    energy = np.cumsum(np.asarray(values, dtype=np.float64) ** 2)
    if energy.size == 0 or energy[-1] <= 0:
        return 0
    return int(np.searchsorted(energy, share * energy[-1]) + 1)


def probe_ranks(out_features: int, in_features: int, fractions: Sequence[float]) -> list[int]:
    """Ranks holding each fraction of the dense parameters (compress_'s param_ratio rounding)."""
    m, n = out_features, in_features
    ranks = {max(1, math.floor(f * m * n / (m + n))) for f in fractions}
    return sorted((r for r in ranks if r < min(m, n)), reverse=True)


def interpolate_kl(energy: float, points: Sequence[tuple[float, float]]) -> float:
    """Predicted KL at a relative tail energy from measured (energy, KL) points.

    Piecewise linear in log-log between points; below the smallest measured energy KL ∝ energy
    (a small output error δ costs ½δᵀFδ, quadratic in δ, i.e. linear in energy); above the largest
    the last segment's slope, clipped to [0.5, 2]. Measured KLs are made non-decreasing in energy
    first, because a tiny probe can rank two close points the wrong way round.
    """
    if energy <= 0:
        return 0.0
    pts = sorted((e, k) for e, k in points if e > 0 and math.isfinite(k))
    if not pts:
        return 0.0
    xs, ys, running = [], [], _KL_FLOOR
    for e, k in pts:
        if xs and math.log(e) <= xs[-1]:
            continue
        running = max(running, k)
        xs.append(math.log(e))
        ys.append(math.log(running))
    x = math.log(energy)
    if x <= xs[0]:
        return math.exp(ys[0] + (x - xs[0]))
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 1.0
        return math.exp(ys[-1] + (x - xs[-1]) * min(max(slope, 0.5), 2.0))
    return math.exp(float(np.interp(x, xs, ys)))


def _round(values: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in values.tolist()]


# --------------------------------------------------------------------------------------------------
# Records


@dataclass
class Measurement:
    rank: int
    energy: float  # relative whitened tail energy ‖(W − W_r)X‖² / ‖WX‖² on calibration inputs
    kl: float  # mean KL(original ‖ this module alone at rank r) per probe token, nats
    delta_nll: float  # change of the probe's next-token loss, nats/token (noisy; for reference)


@dataclass
class ModuleAnalysis:
    name: str
    block: int
    role: str | None
    out_features: int
    in_features: int
    bias: int  # bias parameters: unchanged by compression, counted in parameter totals
    singular_values: list[float]  # of W, descending
    whitened_values: list[float]  # of W·S / √tokens, descending (RMS output scale)
    measurements: list[Measurement] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features + self.bias

    def factored_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features) + self.bias

    @functools.cached_property
    def _tail(self) -> np.ndarray:
        energy = np.asarray(self.whitened_values, dtype=np.float64) ** 2
        tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # tail[r] = Σ_{i≥r}
        return tail / max(tail[0], 1e-300)

    def tail_energy(self, rank: int) -> float:
        """Relative output error energy of the best (whitened) rank-r approximation."""
        return float(self._tail[min(max(rank, 0), len(self._tail) - 1)])

    def predicted_kl(self, rank: int | None) -> float:
        """Predicted KL with only this module at ``rank``; ``None`` (left dense) costs nothing."""
        if rank is None or rank >= self.full_rank:
            return 0.0
        points = [(m.energy, m.kl) for m in self.measurements]
        return interpolate_kl(self.tail_energy(rank), points)

    def rank_for_fraction(self, fraction: float) -> int:
        m, n = self.out_features, self.in_features
        return max(1, math.floor(fraction * m * n / (m + n)))

    def summary(self) -> dict[str, Any]:
        return {
            "effective_rank": round(effective_rank(self.singular_values), 2),
            "effective_rank_whitened": round(effective_rank(self.whitened_values), 2),
            "rank90": energy_rank(self.singular_values, 0.9),
            "rank90_whitened": energy_rank(self.whitened_values, 0.9),
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_tail", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModuleAnalysis:
        data = dict(data)
        data["measurements"] = [Measurement(**m) for m in data.get("measurements", [])]
        return cls(**data)


@dataclass
class Analysis:
    """Spectra and measured sensitivity of every targeted module of one model."""

    fingerprint: str
    settings: dict[str, Any]
    modules: list[ModuleAnalysis]
    seconds: float = 0.0  # wall time of the measurement, summed over resumed runs

    def module(self, name: str) -> ModuleAnalysis:
        for entry in self.modules:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def predicted_kl(self, ranks: dict[str, int | None]) -> float:
        """Sum of one-at-a-time predicted KLs: the additive model the allocation minimises."""
        return sum(m.predicted_kl(ranks[m.name]) for m in self.modules)

    def sensitivity(self, fraction: float = 0.5) -> list[dict[str, Any]]:
        """Per module, most sensitive first: predicted KL with the module alone at ``fraction``
        of its dense parameters, and that KL per parameter saved (what allocation trades)."""
        rows = []
        for m in self.modules:
            rank = m.rank_for_fraction(fraction)
            kl = m.predicted_kl(rank)
            saved = max(m.dense_params - m.factored_params(rank), 1)
            rows.append({"name": m.name, "block": m.block, "role": m.role, "rank": rank,
                         "kl": kl, "kl_per_mparam_saved": kl / saved * 1e6})
        return sorted(rows, key=lambda r: -r["kl"])

    def role_summary(self, fraction: float = 0.5) -> dict[str, dict[str, float]]:
        """Per role (q_proj, v_proj, ...) at the same parameter fraction: median and max KL, and
        median KL per million parameters saved (small matrices save little, so this is the fair
        comparison across roles)."""
        by_role: dict[str, list[dict]] = {}
        for row in self.sensitivity(fraction):
            by_role.setdefault(row["role"] or "other", []).append(row)
        return {role: {"median_kl": float(np.median([r["kl"] for r in rows])),
                       "max_kl": float(np.max([r["kl"] for r in rows])),
                       "median_kl_per_mparam": float(np.median([r["kl_per_mparam_saved"] for r in rows])),
                       "n": len(rows)}
                for role, rows in by_role.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                "settings": self.settings, "seconds": round(self.seconds, 2),
                "modules": {m.name: m.to_dict() for m in self.modules}}


# --------------------------------------------------------------------------------------------------
# The analysis folder


def _read_store(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AnalysisError(f"cannot read {path}: {err}; delete it to start the analysis over.") from err
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise AnalysisError(f"{path} is not a version-{FORMAT_VERSION} svdcompress analysis file.")
    return data


def load_analysis(folder: str | Path) -> Analysis:
    """The analysis cached in ``folder`` (as written by :func:`analyze`), without a model."""
    path = Path(folder) / ANALYSIS_FILE
    if not path.is_file():
        raise AnalysisError(f"{folder} holds no {ANALYSIS_FILE}; run `svdcompress analyze` first.")
    data = _read_store(path)
    modules = [ModuleAnalysis.from_dict(m) for m in data["modules"].values()]
    return Analysis(data["fingerprint"], data["settings"], modules, data.get("seconds", 0.0))


class _Store:
    """The cache file of one analysis folder: checked on open, rewritten atomically."""

    def __init__(self, folder: Path, fingerprint: str, settings: dict[str, Any]) -> None:
        self.path = folder / ANALYSIS_FILE
        self.fingerprint, self.settings = fingerprint, settings
        self.modules: dict[str, ModuleAnalysis] = {}
        self.seconds = 0.0
        self._provenance: dict | None = None  # taken once, at the first save: it asks git
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = _read_store(self.path)
        if data["fingerprint"] != self.fingerprint:
            raise AnalysisError(
                f"{self.path.parent} holds an analysis of a different model (fingerprint "
                f"{data['fingerprint']}, this model {self.fingerprint}); choose another folder."
            )
        changed = sorted(k for k in self.settings.keys() | data["settings"].keys()
                         if self.settings.get(k) != data["settings"].get(k))
        if changed:
            raise AnalysisError(
                f"{self.path.parent} holds an analysis made with other settings ({', '.join(changed)}"
                "); choose another folder or delete it to start over."
            )
        self.modules = {k: ModuleAnalysis.from_dict(v) for k, v in data["modules"].items()}
        self.seconds = data.get("seconds", 0.0)
        logger.info("resuming analysis in %s: %d modules cached", self.path.parent, len(self.modules))

    def save(self, seconds: float) -> None:
        analysis = Analysis(self.fingerprint, self.settings, list(self.modules.values()), seconds)
        if self._provenance is None:
            self._provenance = provenance()
        atomic_write_json(self.path, {**analysis.to_dict(), "provenance": self._provenance})


# --------------------------------------------------------------------------------------------------
# Running the model from one block to the end


def _find_tail(model: nn.Module, blocks: nn.ModuleList, head: nn.Module, ids: torch.Tensor) -> list:
    """The modules run between the last block and the head (final norm, projections), in order.

    Found by watching one forward pass rather than by name, so no architecture is special-cased.
    """
    clock = itertools.count()
    spans: dict[nn.Module, list[int]] = {}
    inside = {id(m) for m in blocks.modules()}
    watched = [m for m in model.modules() if id(m) not in inside and m is not model and m is not head]

    def start(module, _args, _kwargs):
        spans[module] = [next(clock), -1]

    def end(module, _args, _output):
        spans[module][1] = next(clock)

    with forward_hooks({m: start for m in [*watched, blocks[-1], head]}, pre=True), \
            forward_hooks({m: end for m in [*watched, blocks[-1]]}), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    after, before = spans[blocks[-1]][1], spans[head][0]
    found = [(s, e, m) for m, (s, e) in spans.items() if m not in (head, blocks[-1])
             and s > after and 0 <= e < before]
    return [m for s, e, m in sorted(found, key=lambda t: t[0])
            if not any(s2 < s and e < e2 for s2, e2, _ in found)]


@dataclass
class Probe:
    """The original model's state on a small batch, for measuring one changed module cheaply."""

    blocks: nn.ModuleList
    call: BlockCall
    inputs: list[torch.Tensor]  # what each block receives, (B, T, d)
    tail: list[nn.Module]
    head: nn.Module
    ref_logp: torch.Tensor  # (B·T, V) original log-probabilities
    labels: torch.Tensor  # (B·T,) next token, -100 where there is none
    ref_nll: float  # summed over labelled positions

    def logp_chunks(self, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        for module in self.tail:
            hidden = module(hidden)
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (B·T, d)
        for begin in range(0, hidden.shape[0], _HEAD_CHUNK):
            rows = slice(begin, begin + _HEAD_CHUNK)
            yield rows, self.head(hidden[rows]).float().log_softmax(-1)

    @torch.no_grad()
    def measure(self, index: int) -> tuple[float, float]:
        """(KL to the original, Δ next-token loss), per token, running from block ``index``."""
        hidden = self.inputs[index]
        for block in self.blocks[index:]:
            hidden = run_block(block, self.call, hidden)
        kl, nll = 0.0, 0.0
        for rows, logp in self.logp_chunks(hidden):
            ref = self.ref_logp[rows]
            kl += float(kl_divergence(ref, logp).sum())
            nll += float(F.nll_loss(logp, self.labels[rows], ignore_index=-100, reduction="sum"))
        n_labels = int((self.labels >= 0).sum())
        return max(kl, 0.0) / self.labels.numel(), (nll - self.ref_nll) / n_labels


@torch.no_grad()
def build_probe(model: nn.Module, windows: torch.Tensor) -> Probe:
    _, blocks = decoder_blocks(model)
    head = model.get_output_embeddings()
    if head is None:
        raise AnalysisError(f"{type(model).__name__} has no output embeddings (lm_head) to probe.")
    device = next(model.parameters()).device
    windows = windows.to(device)
    tail = _find_tail(model, blocks, head, windows[:1, : min(8, windows.shape[1])])
    call = capture_block_inputs(model, blocks[0], [windows])[0]
    inputs, hidden = [], call.hidden
    for block in blocks:
        inputs.append(hidden)
        hidden = run_block(block, call, hidden)
    labels = torch.cat([windows[:, 1:], torch.full_like(windows[:, :1], -100)], 1).reshape(-1)
    probe = Probe(blocks, call, inputs, tail, head, torch.empty(0), labels, 0.0)
    probe.ref_logp = torch.cat([logp for _, logp in probe.logp_chunks(hidden)])
    probe.ref_nll = float(F.nll_loss(probe.ref_logp, labels, ignore_index=-100, reduction="sum"))
    _check_probe(model, windows, probe.ref_logp)
    return probe


def _check_probe(model: nn.Module, windows: torch.Tensor, ref_logp: torch.Tensor) -> None:
    # Block by block plus the discovered tail must reproduce the model; if a model adds something
    # we did not see (logit scaling, soft-capping), measuring from the middle would be wrong.
    logp = model(input_ids=windows, use_cache=False).logits.float().log_softmax(-1)
    gap = (logp.reshape(ref_logp.shape) - ref_logp).abs().max().item()
    if not gap < 1e-2:
        raise AnalysisError(
            f"{type(model).__name__}: running the decoder blocks and the final layers one by one "
            f"does not reproduce the model's output (max log-prob gap {gap:.3g}); its forward pass "
            "does something between the blocks that sensitivity probing cannot replay."
        )


@contextlib.contextmanager
def weight_replaced(module: nn.Module, approx: torch.Tensor) -> Iterator[None]:
    """Temporarily run ``module`` with an (out, in) weight; the original is always put back."""
    original = module.weight.data
    new = approx.T if isinstance(module, Conv1D) else approx
    module.weight.data = new.to(original.dtype).contiguous()
    try:
        yield
    finally:
        module.weight.data = original


# --------------------------------------------------------------------------------------------------
# The analysis


def _analyze_module(
    model: nn.Module, target: Target, stats: ModuleStats, probe: Probe, fractions: Sequence[float]
) -> ModuleAnalysis:
    start = time.perf_counter()
    module = model.get_submodule(target.name)
    weight = dense_weight(module).detach().double()  # (out, in)
    white = whitening(stats.gram / max(stats.n_tokens, 1))
    u, s, vh = torch.linalg.svd(weight @ white.s, full_matrices=False)
    total = float((s**2).sum())
    measurements = []
    for rank in probe_ranks(target.out_features, target.in_features, fractions):
        approx = (u[:, :rank] * s[:rank]) @ (vh[:rank] @ white.s_inv)  # best rank-r in ‖·X‖
        with weight_replaced(module, approx):
            kl, delta_nll = probe.measure(target.block)
        energy = float((s[rank:] ** 2).sum()) / max(total, 1e-300)
        measurements.append(Measurement(rank, energy, kl, delta_nll))
    bias = getattr(module, "bias", None)
    return ModuleAnalysis(
        name=target.name, block=target.block, role=target.role,
        out_features=target.out_features, in_features=target.in_features,
        bias=0 if bias is None else bias.numel(),
        singular_values=_round(torch.linalg.svdvals(weight)), whitened_values=_round(s),
        measurements=measurements, seconds=round(time.perf_counter() - start, 3),
    )


def analysis_settings(targets: list[Target], calibration: Calibration, fractions, probe_samples,
              probe_len) -> dict[str, Any]:
    windows = calibration.windows.contiguous().cpu().to(torch.int64)
    return {
        "targets": [t.name for t in targets],
        "fractions": [float(f) for f in fractions],
        "probe_samples": probe_samples,
        "probe_len": probe_len,
        "calibration": calibration.source,
        "calibration_shape": list(windows.shape),
        "calibration_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:20],
    }


def _check_fractions(fractions: Sequence[float]) -> None:
    if not fractions or not all(0.0 < f < 1.0 for f in fractions):
        raise AnalysisError(f"fractions {list(fractions)} must be non-empty and each in (0, 1).")


def analyze(
    model: nn.Module,
    calibration: Calibration | torch.Tensor,
    out_dir: str | Path | None = None,
    *,
    targets: Sequence[str] = ("all-linear",),
    exclude: Sequence[str] = (),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    probe_samples: int = 2,
    probe_len: int = 256,
    batch_size: int = 4,
) -> Analysis:
    """Spectra and measured sensitivity of every targeted module; the model is left unchanged.

    Cost: one calibration pass (as in ``compress_``), one SVD per module, and per module
    ``len(fractions)`` forward passes of the probe batch (``probe_samples × probe_len`` tokens of the
    calibration windows) from the module's block to the end. With ``out_dir`` the results are cached
    there after each block and a rerun resumes.
    """
    if isinstance(calibration, torch.Tensor):
        calibration = Calibration(calibration)
    _check_fractions(fractions)
    if probe_samples < 1 or probe_len < 2:
        raise AnalysisError(f"probe of {probe_samples}×{probe_len} tokens: need ≥1 window of ≥2.")
    found = find_targets(model, tuple(targets), tuple(exclude))
    settings = analysis_settings(found, calibration, fractions, probe_samples, probe_len)
    fingerprint = model_fingerprint(model)
    store = _Store(Path(out_dir), fingerprint, settings) if out_dir is not None else None
    done: dict[str, ModuleAnalysis] = store.modules if store else {}
    seconds = store.seconds if store else 0.0
    todo = [t for t in found if t.name not in done]
    if todo:
        seconds = _measure(model, calibration, todo, done, store, seconds, fractions,
                           calibration.windows[:probe_samples, :probe_len], batch_size)
    return Analysis(fingerprint, settings, [done[t.name] for t in found], seconds)


def _measure(model, calibration, todo, done, store, seconds, fractions, probe_windows, batch_size):
    start = time.perf_counter()
    by_name = {t.name: t for t in todo}
    probe = build_probe(model, probe_windows)
    logger.info("analysing %d modules: probe %s tokens, fractions %s",
                len(todo), tuple(probe_windows.shape), list(fractions))

    def per_block(index: int, stats: dict[str, ModuleStats]) -> None:
        for name, module_stats in stats.items():
            done[name] = _analyze_module(model, by_name[name], module_stats, probe, fractions)
        if store is not None:
            store.save(seconds + time.perf_counter() - start)
        logger.info("block %d analysed (%.0f s so far)", index, time.perf_counter() - start)

    run_sequential(model, todo, calibration, per_block, batch_size=batch_size)
    return seconds + time.perf_counter() - start
