"""Compression settings: one dataclass per method, one meaning per number.

- ``rank``: the number of singular values kept in one matrix.
- ``rank_ratio``: rank / min(out, in) — "keep 70% of singular values" is ``rank_ratio=0.7``.
- ``param_ratio``: parameters kept / parameters before, per targeted matrix (0.8 = 20% fewer).
  A factorized (out, in) matrix at rank r holds r·(out+in) numbers, so a rank at or above
  out·in/(out+in) saves nothing; such a rank is refused for ``storage="factored"``.

``storage="dense"`` keeps the rank-r product as an ordinary dense matrix (SVD as denoising, the
seeds' CF90 use): no parameters are saved and the report says so. ``storage="pivoted"`` (PIFA) holds
the same rank-r product as ``factored`` in r·(out+in−r) numbers, so every rank below min(out, in)
saves some and ``param_ratio`` buys a higher rank.

Exactly one of ``rank``, ``rank_ratio``, ``param_ratio`` sets the default rank; ``rank_pattern``
overrides it per module by regex (int = rank, float = rank_ratio), and ``exclude`` leaves modules
untouched — the shape that sensitivity analysis emits and ``compress`` consumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from svdcompress.errors import ConfigError
from svdcompress.linalg import SUPPORTED_QUANT_BITS

__all__ = [
    "STORAGES",
    "ASVDConfig",
    "CompressionConfig",
    "FisherConfig",
    "ImportanceConfig",
    "SVDConfig",
    "WhitenConfig",
    "check_quant_bits",
    "config_from_dict",
    "load_recipe",
    "preset",
    "read_recipe_file",
]

FORMAT_VERSION = 1
STORAGES = ("factored", "pivoted", "dense")
CALIBRATION_STREAMS = ("compressed", "original")
_ONE_STREAM = ("{what} fits each layer to the original model's outputs on the compressed model's "
               "inputs; calibration_stream='original' computes only the first. Use "
               "calibration_stream='compressed' (the default) with it.")
_CONFIG_TYPES: dict[str, type[CompressionConfig]] = {}


def _check_ratio(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigError(f"{name}={value!r} must be a number in (0, 1], e.g. 0.8.")
    if value is not None and not (0.0 < value <= 1.0 and math.isfinite(value)):
        raise ConfigError(f"{name}={value} is outside (0, 1]; it is a fraction of what is kept.")


@dataclass
class CompressionConfig:
    """Settings shared by every low-rank method; subclasses add their own."""

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    targets: tuple[str, ...] = field(
        default=("all-linear",),
        metadata={"help": "module groups (all-linear, attention, mlp, qko), roles (q_proj, o_proj, "
                  "...), name suffixes or full-name regexes, matched among decoder-block linears"},
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "patterns left uncompressed"})
    rank: int | None = field(default=None, metadata={"help": "singular values kept per matrix"})
    rank_ratio: float | None = field(default=None, metadata={"help": "rank / min(out, in)"})
    param_ratio: float | None = field(
        default=None, metadata={"help": "parameters kept / before, per targeted matrix"}
    )
    rank_pattern: dict[str, int | float] = field(
        default_factory=dict,
        metadata={"help": "regex -> rank (int) or rank_ratio (float); first match wins"},
    )
    storage: Literal["factored", "dense", "pivoted"] = field(
        default="factored",
        metadata={"help": "factored: two factors; pivoted: the same product in fewer numbers "
                  "(PIFA); dense: rank-r product"},
    )
    update: bool = field(
        default=False, metadata={"help": "closed-form least-squares update of the left factor"}
    )
    calib_batch_size: int = field(default=4, metadata={"help": "windows per calibration batch"})
    calibration_stream: Literal["compressed", "original"] = field(
        default="compressed",
        metadata={"help": "compressed: each block's statistics on the inputs the model compressed "
                  "so far feeds it (later blocks see, and adapt to, earlier blocks' errors); original: "
                  "on the original model's inputs, every block run once (SVD-LLM's protocol: faster)"},
    )
    seed: int = 0
    refine_iters: int = field(
        default=0,
        metadata={"help": "Adam steps refining each module's factors on its calibration output "
                  "loss (towards the original model's outputs when update=True) (0: none)"},
    )
    refine_lr: float = field(
        default=0.03, metadata={"help": "refinement step size, relative to each factor's RMS"}
    )
    quant_bits: int | None = field(
        default=None,
        metadata={"help": "store the factors as symmetric per-row integers of this width "
                  "(None: float; supported: 8)"},
    )
    quant_pattern: dict[str, int | None] = field(
        default_factory=dict,
        metadata={"help": "regex -> quant_bits for the factors of matching modules (None: float); "
                  "first match wins, quant_bits elsewhere"},
    )
    head_quant_bits: int | None = field(
        default=None,
        metadata={"help": "store the output head (lm_head) as symmetric per-row integers of this "
                  "width (None: as it was; supported: 8); a head tied to the input embeddings is "
                  "untied, the embeddings staying float"},
    )
    embedding_quant_bits: int | None = field(
        default=None,
        metadata={"help": "store the input embeddings as symmetric per-row integers of this width "
                  "(None: as they were; supported: 8); with a tied head, set head_quant_bits too"},
    )
    dense_int8: tuple[str, ...] = field(
        default=(),
        metadata={"help": "patterns of targeted modules kept unfactored and stored as symmetric "
                  "per-row INT8 (the INT8 baseline's quantizer), e.g. from a byte allocation"},
    )

    def __post_init__(self) -> None:
        self.targets = _as_tuple(self.targets, "targets")
        self.exclude = _as_tuple(self.exclude, "exclude")
        chosen = [n for n in ("rank", "rank_ratio", "param_ratio") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ConfigError(
                f"set exactly one of rank, rank_ratio, param_ratio (got {chosen or 'none'}); "
                "e.g. param_ratio=0.8 keeps 80% of each targeted matrix's parameters."
            )
        if self.rank is not None and (isinstance(self.rank, bool) or self.rank < 1):
            raise ConfigError(f"rank={self.rank} must be a positive integer.")
        _check_ratio("rank_ratio", self.rank_ratio)
        _check_ratio("param_ratio", self.param_ratio)
        if self.storage not in STORAGES:
            raise ConfigError(f"storage={self.storage!r}: use one of {', '.join(STORAGES)}.")
        if self.storage == "dense" and self.param_ratio is not None:
            raise ConfigError(
                "param_ratio with storage='dense' saves no parameters: a dense rank-r matrix "
                "holds as many numbers as before. Use rank or rank_ratio with dense storage."
            )
        for pattern, value in self.rank_pattern.items():
            _check_pattern_value(pattern, value)
        if self.calib_batch_size < 1:
            raise ConfigError(f"calib_batch_size={self.calib_batch_size} must be >= 1.")
        if self.calibration_stream not in CALIBRATION_STREAMS:
            raise ConfigError(f"calibration_stream={self.calibration_stream!r}: use one of "
                              f"{', '.join(CALIBRATION_STREAMS)}.")
        if self.update and self.calibration_stream == "original":
            raise ConfigError(_ONE_STREAM.format(what="update=True"))
        check_quant_bits(self.quant_bits)
        check_quant_bits(self.head_quant_bits, "head_quant_bits")
        check_quant_bits(self.embedding_quant_bits, "embedding_quant_bits")
        self.dense_int8 = _as_tuple(self.dense_int8, "dense_int8")
        _check_quant_pattern(self.quant_pattern, self.dense_int8)
        _check_refine(self.refine_iters, self.refine_lr)

    @property
    def uses_calibration(self) -> bool:
        return self.needs_calibration or self.update or self.refine_iters > 0

    @property
    def tracks_original(self) -> bool:
        """Calibration must also run the original model beside the compressed one (``cross``)."""
        return self.update

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["targets"], data["exclude"] = list(self.targets), list(self.exclude)
        data["dense_int8"] = list(self.dense_int8)
        return {"method": self.method, "format_version": FORMAT_VERSION, **dict(sorted(data.items()))}

    def replace(self, **changes: Any) -> CompressionConfig:
        """A copy with some fields changed, re-validated (ratio fields replace each other)."""
        if {"rank", "rank_ratio", "param_ratio"} & changes.keys():
            changes = {"rank": None, "rank_ratio": None, "param_ratio": None, **changes}
        return dataclasses.replace(self, **changes)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _CONFIG_TYPES[cls.method] = cls


def _as_tuple(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name} must be non-empty strings, got {value!r}")
    return value


def check_quant_bits(bits: Any, name: str = "quant_bits") -> None:
    """Refuse a ``quant_bits`` (or the setting ``name``) this version cannot store (``None``: float)."""
    if bits is None:
        return
    if isinstance(bits, bool) or bits not in SUPPORTED_QUANT_BITS:
        raise ConfigError(
            f"{name}={bits!r} is not supported; use None (float) or one of "
            f"{list(SUPPORTED_QUANT_BITS)} (int8 per-row)."
        )


def _check_quant_pattern(pattern: Any, dense_int8: tuple[str, ...]) -> None:
    if not isinstance(pattern, dict):
        raise ConfigError(f"quant_pattern={pattern!r} must map regexes to quant_bits (8 or None).")
    for regex in (*pattern, *dense_int8):
        try:
            re.compile(regex)
        except re.error as err:
            raise ConfigError(f"{regex!r} is not a valid regular expression ({err}).") from None
    for regex, bits in pattern.items():
        try:
            check_quant_bits(bits)
        except ConfigError as err:
            raise ConfigError(f"quant_pattern[{regex!r}]: {err}") from None


def _check_refine(iters: Any, lr: Any) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"refine_iters={iters!r} must be a whole number >= 0 (0: no refinement).")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (math.isfinite(lr) and lr > 0):
        raise ConfigError(
            f"refine_lr={lr!r} must be a positive finite step size (relative to each factor's "
            "RMS; 0.03 is a sensible start)."
        )


def _check_pattern_value(pattern: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"rank_pattern[{pattern!r}]={value!r}: use an int rank or a float ratio.")
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"rank_pattern[{pattern!r}]={value}: a rank must be >= 1.")
    if isinstance(value, float):
        _check_ratio(f"rank_pattern[{pattern!r}]", value)


@dataclass
class SVDConfig(CompressionConfig):
    """Plain truncated SVD: keep the largest singular values. Needs no data."""

    method: ClassVar[str] = "svd"


@dataclass
class WhitenConfig(CompressionConfig):
    """SVD-LLM truncation-aware whitening: SVD of W·S with S Sᵀ = XᵀX from calibration inputs.

    ``error_blend`` β (cumulative-error-aware whitening, as SAES-SVD's CEALC): each layer's rank-r
    product minimises Σ‖W((1−β)x' + βx) − W'x'‖² over the compressed model's inputs x' and the
    original model's x — 0 is plain whitening (match the layer's own weight on drifted inputs),
    1 the closed-form update's objective (match the original outputs, which issue 5 measured to
    hurt). Still a closed form: whitened truncation of W((1−β)I + β·C·G'⁻¹).
    """

    method: ClassVar[str] = "whiten"
    needs_calibration: ClassVar[bool] = True
    error_blend: float = field(
        default=0.0, metadata={"help": "0..1: how far each layer's target moves from its own "
                               "weight on drifted inputs towards the original model's outputs"})

    def __post_init__(self) -> None:
        super().__post_init__()
        blend = self.error_blend
        if isinstance(blend, bool) or not isinstance(blend, int | float) or not 0.0 <= blend <= 1.0:
            raise ConfigError(f"error_blend={blend!r} must be a number in [0, 1] (0: plain whitening).")
        if blend > 0 and self.calibration_stream == "original":
            raise ConfigError(_ONE_STREAM.format(what=f"error_blend={blend}"))

    @property
    def tracks_original(self) -> bool:
        return self.update or self.error_blend > 0


@dataclass
class ASVDConfig(CompressionConfig):
    """ASVD: scale input channels by mean|x|^alpha before the SVD."""

    method: ClassVar[str] = "asvd"
    needs_calibration: ClassVar[bool] = True
    alpha: float = field(default=0.5, metadata={"help": "exponent on mean |activation|"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 2.0:
            raise ConfigError(f"alpha={self.alpha} should lie in [0, 2] (ASVD uses 0.5).")


@dataclass
class FisherConfig(CompressionConfig):
    """FWSVD: weight rows by Fisher information (squared gradients on calibration text)."""

    method: ClassVar[str] = "fisher"
    needs_calibration: ClassVar[bool] = True
    fisher_windows: int = field(default=32, metadata={"help": "calibration windows for gradients"})


@dataclass
class ImportanceConfig(CompressionConfig):
    """The seeds' intelligent SVD: keep the singular directions that matter most for a fact set.

    The scores come from :func:`svdcompress.compute_importance` and are passed to ``compress_``.
    """

    method: ClassVar[str] = "importance"
    mode: Literal["taylor", "fisher"] = field(
        default="fisher", metadata={"help": "taylor: |Σ σ uᵀGv|; fisher: Σ (σ uᵀGv)² over batches"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("taylor", "fisher"):
            raise ConfigError(f"mode={self.mode!r}: use 'taylor' or 'fisher'.")


def config_from_dict(data: dict[str, Any]) -> CompressionConfig:
    """Inverse of ``to_dict``; unknown methods and fields are errors, not silently dropped."""
    data = dict(data)
    method = data.pop("method", None)
    data.pop("format_version", None)
    if method not in _CONFIG_TYPES:
        raise ConfigError(f"unknown method {method!r}; known: {sorted(_CONFIG_TYPES)}")
    cls = _CONFIG_TYPES[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown settings for method {method!r}: {unknown}; known: {sorted(known)}")
    return cls(**data)


def method_names() -> list[str]:
    return sorted(_CONFIG_TYPES)


# Sections of a recipe that are not settings: the text the windows came from, the model it is for,
# who wrote it (svdcompress.recipe writes them beside every checkpoint; provenance.py stamps files).
RECIPE_SECTIONS = ("data", "base_model", "provenance")


def load_recipe(path: str | Path) -> CompressionConfig:
    """A YAML or JSON file holding one config dict (with its ``method``)."""
    data = read_recipe_file(path)
    for section in RECIPE_SECTIONS:
        data.pop(section, None)
    return config_from_dict(data)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML or JSON recipe file holds, settings and sections alike."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist.")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"recipe {path} is not valid JSON ({err}); fix the file.") from None
    except Exception as err:  # yaml.YAMLError and friends
        reason = " ".join(str(err).split())
        raise ConfigError(f"recipe {path} is not valid YAML ({reason}); fix the file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def preset(name: str, method: str = "svd", **overrides: Any) -> CompressionConfig:
    """Named policies from the seed projects.

    - ``cf90``: Q, K, O projections at rank_ratio 0.7, dense storage (denoising, no saving).
    - ``k-only``: K projection only, factored (the Semantic LLM Compressor's policy).
    """
    presets: dict[str, dict[str, Any]] = {
        "cf90": {"targets": ("qko",), "rank_ratio": 0.7, "storage": "dense"},
        "k-only": {"targets": ("k_proj",), "rank_ratio": 0.5},
    }
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(presets)}")
    if method not in _CONFIG_TYPES:
        raise ConfigError(f"unknown method {method!r}; known: {sorted(_CONFIG_TYPES)}")
    settings = {**presets[name], **overrides}
    if {"rank", "param_ratio"} & overrides.keys():
        settings.pop("rank_ratio", None)
    return _CONFIG_TYPES[method](**settings)
