"""``compress_(model, config, calibration=None)``: replace targeted linear layers in place."""

from __future__ import annotations

import logging
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdcompress import distributed
from svdcompress._version import __version__
from svdcompress.calibration import Calibration, ModuleStats, run_sequential
from svdcompress.config import CompressionConfig
from svdcompress.errors import CalibrationError, ConfigError, require_finite
from svdcompress.hf_integration import attach_quantizer
from svdcompress.linalg import (
    Factors,
    break_even_rank,
    factored_params,
    least_squares_left,
    rank_for_param_ratio,
    relative_output_error,
    relative_weight_error,
)
from svdcompress.methods import get_method
from svdcompress.modules import LowRankLinear, dense_weight, fused_specs, stored_numbers
from svdcompress.quantize import check_outer, quantize_module, quantize_outer_
from svdcompress.refine import LayerObjective, RefineResult, RefineSettings, refine_factors
from svdcompress.targets import Target, find_targets

__all__ = [
    "CompressionReport",
    "Compressor",
    "ModuleReport",
    "as_calibration",
    "check_finite",
    "check_token_ids",
    "compress_",
    "compression_record",
    "excluded_targets",
    "quantize_tables_",
    "resolve_ranks",
]

logger = logging.getLogger(__name__)


@dataclass
class ModuleReport:
    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    storage: str
    params_before: int  # weight + bias
    params_after: int
    bytes_before: int
    bytes_after: int
    weight_error: float  # ‖W − W'‖ / ‖W‖
    output_error: float | None  # ‖(W − W')X‖ / ‖WX‖ on calibration inputs, when there are any
    notes: list[str] = field(default_factory=list)
    quant_bits: int | None = None  # int8 factors: bytes_after counts codes + float32 row scales
    # Refinement (refine_iters > 0): sqrt of Σ‖W x − A B x'‖² / Σ‖W x‖² before and after, with x
    # the original model's inputs when update=True tracked them (x = x' otherwise).
    refine_error_before: float | None = None
    refine_error_after: float | None = None
    refine_steps: int | None = None


@dataclass
class CompressionReport:
    method: str
    modules: list[ModuleReport]
    model_params_before: int
    model_params_after: int
    wall_seconds: float
    peak_rss_mb: float  # of the whole process, so it includes the loaded model
    calibration: str | None = None
    config: dict = field(default_factory=dict)
    # Modules the targets select but ``exclude`` leaves dense (e.g. by allocation): they count at
    # full size in ``selected_param_ratio``, the ratio a global budget such as --allocate's meets.
    excluded_modules: int = 0
    excluded_params: int = 0
    head: dict | None = None  # head_quant_bits: quantize_outer_'s summary (bytes, error, untied)
    embeddings: dict | None = None  # embedding_quant_bits: the same for the input embeddings

    def total(self, key: str) -> int:
        return sum(getattr(m, key) for m in self.modules)

    @property
    def target_param_ratio(self) -> float:
        return self.total("params_after") / max(self.total("params_before"), 1)

    @property
    def selected_param_ratio(self) -> float:
        before = self.total("params_before") + self.excluded_params
        return (self.total("params_after") + self.excluded_params) / max(before, 1)

    @property
    def model_param_ratio(self) -> float:
        return self.model_params_after / max(self.model_params_before, 1)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "modules": len(self.modules),
            "target_params_before": self.total("params_before"),
            "target_params_after": self.total("params_after"),
            "target_param_ratio": round(self.target_param_ratio, 4),
            "target_bytes_before": self.total("bytes_before"),
            "target_bytes_after": self.total("bytes_after"),
            "excluded_modules": self.excluded_modules,
            "excluded_params": self.excluded_params,
            "selected_param_ratio": round(self.selected_param_ratio, 4),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_param_ratio": round(self.model_param_ratio, 4),
            "wall_seconds": round(self.wall_seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            **{key: value for key, value in (("head", self.head), ("embeddings", self.embeddings))
               if value is not None},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "calibration": self.calibration,
            "config": self.config,
            "modules": [asdict(m) for m in self.modules],
        }


def _pattern_rank(config: CompressionConfig, target: Target) -> int | float | None:
    for pattern, value in config.rank_pattern.items():
        if re.search(pattern, target.name):
            return value
    return None


def _rank_for(config: CompressionConfig, target: Target) -> int:
    m, n = target.out_features, target.in_features
    override = _pattern_rank(config, target)
    if isinstance(override, int):
        rank = override
    elif isinstance(override, float):
        rank = max(1, round(override * min(m, n)))
    elif config.rank is not None:
        rank = config.rank
    elif config.rank_ratio is not None:
        rank = max(1, round(config.rank_ratio * min(m, n)))
    else:
        rank = rank_for_param_ratio(m, n, config.param_ratio, config.storage)
    if rank > min(m, n):
        raise ConfigError(f"{target.name}: rank {rank} exceeds min(out, in) = {min(m, n)}.")
    storage = config.storage
    if storage != "dense" and rank > break_even_rank(m, n, storage):
        raise ConfigError(
            f"{target.name} ({m}×{n}): rank {rank} stored {storage} holds "
            f"{factored_params(m, n, rank, storage):,} numbers, not fewer than the {m * n:,} of the "
            f"dense matrix (break-even rank {break_even_rank(m, n, storage)}). Lower the rank, "
            "exclude the module, or use storage='dense'."
        )
    return rank


def resolve_ranks(config: CompressionConfig, targets: list[Target]) -> dict[str, int]:
    """Each target's rank under the config; patterns in rank_pattern must match something."""
    int8 = [t.name for t in targets if any(re.search(p, t.name) for p in config.dense_int8)]
    if int8:  # compress_ takes them out first; a path that does not (streaming) must not factor them
        raise ConfigError(
            f"{int8[0]} is in dense_int8 (kept unfactored as INT8), which only in-memory "
            "compression supports; run without --stream, or drop dense_int8 from the config."
        )
    for pattern in config.rank_pattern:
        if not any(re.search(pattern, t.name) for t in targets):
            raise ConfigError(
                f"rank_pattern {pattern!r} matches none of the {len(targets)} targeted modules "
                f"(e.g. {targets[0].name!r})."
            )
    return {t.name: _rank_for(config, t) for t in targets}


def _quant_bits_for(config: CompressionConfig, name: str) -> int | None:
    for pattern, bits in config.quant_pattern.items():
        if re.search(pattern, name):
            return bits
    return config.quant_bits


def _split_dense_int8(config: CompressionConfig, targets: list[Target]) -> tuple[list, list]:
    """(targets kept dense as INT8, targets to factorize); every pattern must match a target."""
    for field_name, patterns, among in (("dense_int8", config.dense_int8, targets),
                                        ("quant_pattern", config.quant_pattern, targets)):
        for pattern in patterns:
            if not any(re.search(pattern, t.name) for t in among):
                raise ConfigError(f"{field_name} pattern {pattern!r} matches none of the "
                                  f"{len(among)} targeted modules; fix or drop it.")
    dense = [t for t in targets if any(re.search(p, t.name) for p in config.dense_int8)]
    return dense, [t for t in targets if t not in dense]


def check_finite(model: nn.Module, targets: list[Target]) -> None:
    """Refuse to compress a target whose weight holds NaN or inf."""
    for target in targets:
        require_finite({"its weight": dense_weight(model.get_submodule(target.name))}, module=target.name,
                       error=ConfigError, refusing="compress it", fix="the model's weights are broken")


def _bytes(params: int, dtype: torch.dtype) -> int:
    return params * dtype.itemsize


class Compressor:
    """Factorizes targets one at a time, swaps them in, and writes their report lines."""

    def __init__(self, model, config, ranks, method, extras):
        self.model, self.config, self.ranks = model, config, ranks
        self.method, self.extras = method, extras
        self.reports: list[ModuleReport] = []
        self.specs: dict[str, dict] = {}

    def compress_module(self, name: str, stats: ModuleStats | None) -> None:
        self.install(name, stats, *self.factorize(name, stats))

    def factorize(self, name: str, stats: ModuleStats | None) -> tuple[Factors, RefineResult | None]:
        """The expensive part, which under torch.distributed one rank computes for all of them."""
        weight = dense_weight(self.model.get_submodule(name)).detach()
        factors = self.method.factorize(weight, self.ranks[name], stats, self.extras.get(name), self.config)
        if self.config.update and stats is not None:
            left = least_squares_left(weight, factors.right, stats.gram, stats.cross)
            factors = Factors(left, factors.right, (*factors.notes, "left factor: least-squares update"))
        refined = _refine(name, weight, factors, stats, self.config)
        if refined is not None:
            factors = refined.factors
        require_finite({"the left factor": factors.left, "the right factor": factors.right}, module=name,
                       error=CalibrationError, refusing="install it",
                       fix="degenerate calibration statistics: more or other calibration windows")
        return factors, refined

    def install(self, name: str, stats: ModuleStats | None, factors: Factors,
                refined: RefineResult | None) -> None:
        """Swap in the low-rank module built from ``factors`` and write its report line."""
        module = self.model.get_submodule(name)
        weight = dense_weight(module).detach()
        dtype = weight.dtype
        factors = Factors(factors.left.to(dtype), factors.right.to(dtype), factors.notes)
        new = LowRankLinear.from_linear(module, factors, storage=self.config.storage)
        bits = _quant_bits_for(self.config, name)
        if bits is not None:
            # Last step, after anything that changes the float factors: quantize what is final.
            quantize_module(name, new, bits)
        self.reports.append(self._report(name, module, new, weight, stats, factors.notes))
        if refined is not None:
            _record_refinement(self.reports[-1], refined)
        self.specs[name] = new.spec()
        self.model.set_submodule(name, new)

    def install_dense_int8(self, name: str) -> None:
        """Keep ``name`` unfactored with its weight as per-row INT8 (``config.dense_int8``)."""
        module = self.model.get_submodule(name)
        weight = dense_weight(module).detach()
        new = quantize_module(name, LowRankLinear.full_rank_copy(module), 8)
        self.reports.append(self._report(name, module, new, weight, None, ("dense INT8, not factored",)))
        self.specs[name] = new.spec()
        self.model.set_submodule(name, new)

    def _report(self, name, old, new, weight, stats, notes) -> ModuleReport:
        approx = new.dense_weight().detach()
        bias = 0 if old.bias is None else old.bias.numel()
        before, after = weight.numel() + bias, new.num_stored() + bias
        return ModuleReport(
            name=name, shape=tuple(weight.shape), rank=new.rank, storage=new.storage,
            params_before=before, params_after=after,
            bytes_before=_bytes(before, weight.dtype),
            bytes_after=new.weight_bytes() + _bytes(bias, weight.dtype),
            weight_error=relative_weight_error(weight, approx),
            output_error=None if stats is None else relative_output_error(weight, approx, stats.gram),
            notes=list(notes), quant_bits=new.quant_bits,
        )


def _refine(name: str, weight, factors: Factors, stats: ModuleStats | None,
            config: CompressionConfig) -> RefineResult | None:
    """Gradient refinement of one module's factors on its calibration statistics, if asked."""
    if not config.refine_iters or stats is None:
        return None
    objective = LayerObjective.from_stats(weight, stats.gram, stats.cross, stats.original_gram)
    result = refine_factors(objective, factors, RefineSettings(config.refine_iters, config.refine_lr))
    if result.diverged:
        logger.warning("%s: %s", name, result.factors.notes[-2])
    return result


def _record_refinement(report: ModuleReport, result: RefineResult) -> None:
    report.refine_error_before = result.error_before
    report.refine_error_after = result.error_after
    report.refine_steps = result.iters_run


def as_calibration(calibration) -> Calibration | None:
    """``None``, a :class:`Calibration`, or token windows (n, seq_len) wrapped in one."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, torch.Tensor):
        return Calibration(calibration)
    raise CalibrationError(
        f"calibration must be a Calibration or an (n, seq_len) tensor of token ids, got "
        f"{type(calibration).__name__}."
    )


def check_token_ids(model: nn.Module, calibration: Calibration | None) -> None:
    """Token ids outside the vocabulary would end in an IndexError deep inside the embedding."""
    if calibration is None or calibration.windows.numel() == 0:
        return
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(calibration.windows.min()), int(calibration.windows.max())
    if low < 0 or high >= vocab:
        raise CalibrationError(
            f"calibration windows hold token id {high if high >= vocab else low}, outside the "
            f"model's vocabulary of {vocab}; tokenize the text with this model's tokenizer."
        )


def compress_(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Calibration | torch.Tensor | None = None,
    *,
    importance=None,
) -> CompressionReport:
    """Compress ``model`` in place according to ``config`` and return what was done.

    ``calibration``: token windows (n, seq_len); required by data-aware methods and by
    ``update=True``; when given to ``svd``, it is used to report output errors.
    ``importance``: scores from ``compute_importance`` for the ``importance`` method.
    """
    start = time.perf_counter()
    calibration = as_calibration(calibration)
    distributed.check_compression_inputs(model, config, calibration)  # under torchrun; first
    check_token_ids(model, calibration)
    targets = find_targets(model, config.targets, config.exclude)
    excluded = excluded_targets(model, config, targets)  # before the swap: afterwards a role may be gone
    check_finite(model, targets)
    check_outer(model, config.head_quant_bits, config.embedding_quant_bits)  # before any work
    int8_targets, targets = _split_dense_int8(config, targets)
    ranks = resolve_ranks(config, targets)
    if config.uses_calibration and calibration is None:
        raise CalibrationError(
            f"method {config.method!r}{' with update=True' if config.update else ''}"
            f"{' with refine_iters>0' if config.refine_iters else ''} needs "
            "calibration windows: compress_(model, config, calibration=token_windows(...))."
        )
    base = _base_model(model)  # before anything changes: what the original was, by name and weights
    params_before = stored_numbers(model)
    method = get_method(config)
    prepare = method.prepare if targets else None  # all dense INT8: nothing to factorize
    extras = prepare(model, targets, config, calibration, importance) if prepare else {}
    compressor = Compressor(model, config, ranks, method, extras)
    sizes = {t.name: t.out_features * t.in_features for t in targets}  # factorization cost
    for target in int8_targets:  # first, so the factorized blocks calibrate on their INT8 outputs
        compressor.install_dense_int8(target.name)
    if targets and calibration is None:
        for target in tqdm(targets, desc=f"{config.method} factorizing", leave=False):
            compressor.compress_module(target.name, None)
    elif targets:
        def compress_block(_index: int, stats: dict[str, ModuleStats]) -> None:
            # Under torchrun one rank factorizes each module and broadcasts it (distributed.py).
            distributed.spread_factorization(
                stats, lambda name: compressor.factorize(name, stats[name]),
                lambda name, factors, refined: compressor.install(name, stats[name], factors, refined),
                sizes)

        run_sequential(model, targets, calibration, compress_block,
                       batch_size=config.calib_batch_size, track_original=config.tracks_original,
                       one_pass=config.calibration_stream == "original")
    outer = quantize_tables_(model, config, compressor.specs)
    report = CompressionReport(
        method=config.method, modules=compressor.reports,
        model_params_before=params_before,
        model_params_after=stored_numbers(model),
        wall_seconds=time.perf_counter() - start,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        calibration=None if calibration is None else calibration.source,
        config=config.to_dict(),
        **excluded, **outer,
    )
    model.config.compression_config = compression_record(model, config, compressor.specs, report,
                                                         importance, base)
    attach_quantizer(model)  # model.save_pretrained then writes what from_pretrained reads
    logger.info("compressed %d modules: %s", len(targets), report.summary())
    return report


def quantize_tables_(model: nn.Module, config: CompressionConfig, specs: dict) -> dict[str, dict]:
    """The output head and input embeddings as int8 where ``config`` asks (``quantize_outer_``'s
    summaries), their layouts added to ``specs``. Last, as the factors' quantization: calibration
    ran on the float tables."""
    outer = quantize_outer_(model, head_bits=config.head_quant_bits, embedding_bits=config.embedding_quant_bits)
    specs.update({s["name"]: model.get_submodule(s["name"]).spec() for s in outer.values()})
    return outer


def compression_record(model: nn.Module, config: CompressionConfig, specs: dict,
                       report: CompressionReport, importance, base: dict) -> dict:
    """``config.compression_config`` of a model just compressed (streaming.py writes the same)."""
    return _merged_compression_config(model, {
        "config": config.to_dict(),
        "modules": specs,
        "fused": fused_specs(model),  # split fused projections (GPT-2 c_attn): load splits them again
        "calibration": report.calibration,
        "importance": None if importance is None else importance.source,
        "head": report.head,
        "embeddings": report.embeddings,
        "library_version": __version__,
        **base,
    })


def _base_model(model: nn.Module) -> dict[str, str]:
    """What is known of the original model: the spec it was loaded from (``load_model`` records it;
    otherwise the folder or hub id transformers read it from) and a fingerprint of its weights, so
    ``recover`` can check that the teacher it is given is that model. Nothing for a model that was
    already compressed (its first compression recorded the original)."""
    if getattr(model.config, "compression_config", None):
        return {}
    spec = getattr(model, "svdcompress_spec", None) or getattr(model.config, "_name_or_path", "")
    from svdcompress.analysis import model_fingerprint  # lazy: analysis imports half the package

    return {**({"base_model": str(spec)} if spec else {}),
            "base_fingerprint": model_fingerprint(model, strict=False)}


def _merged_compression_config(model: nn.Module, latest: dict) -> dict:
    """A second ``compress_`` on the same model keeps the first one's modules (the checkpoint must
    rebuild all of them), its base model, and moves its settings to ``history``."""
    previous = getattr(model.config, "compression_config", None)
    if not previous:
        return latest
    earlier = {k: v for k, v in previous.items() if k not in ("modules", "history")}
    base = {k: previous[k] for k in ("base_model", "base_fingerprint") if k in previous}
    return {**latest, **base, "modules": {**previous.get("modules", {}), **latest["modules"]},
            "history": [*previous.get("history", []), earlier]}


def excluded_targets(model: nn.Module, config: CompressionConfig, chosen: list[Target]) -> dict[str, int]:
    """How many modules (and parameters) the config's targets name but ``exclude`` leaves dense."""
    if not config.exclude:
        return {"excluded_modules": 0, "excluded_params": 0}
    names = {t.name for t in find_targets(model, config.targets)} - {t.name for t in chosen}
    params = sum(p.numel() for name in names for p in model.get_submodule(name).parameters())
    return {"excluded_modules": len(names), "excluded_params": params}
