"""svdcompress: low-rank (SVD) compression of Hugging Face causal language models."""

from __future__ import annotations

# isort: off
from svdcompress._openmp import OPENMP_ENVIRONMENT  # first: before anything loads torch
# isort: on
from svdcompress import api  # one call per CLI command: api.compress(...), api.evaluate(...), ...
from svdcompress._version import __version__
from svdcompress.allocation import allocate
from svdcompress.calibration import Calibration
from svdcompress.checkpoint import export_dense, load, save
from svdcompress.compress import CompressionReport, compress_
from svdcompress.config import (
    ASVDConfig,
    CompressionConfig,
    FisherConfig,
    ImportanceConfig,
    SVDConfig,
    WhitenConfig,
    preset,
)
from svdcompress.finetune import FinetuneConfig, finetune_, freeze_layers
from svdcompress.hf_integration import register as _register_with_transformers
from svdcompress.modules import LowRankLinear, SlicedLinear
from svdcompress.protect import (
    build_conflict_benchmark,
    compress_qko,
    compress_qko_importance,
    compute_importance,
    measure_knowledge,
)
from svdcompress.quantize import quantize_factors_, quantize_weights_
from svdcompress.recover import RecoverySettings, recover_
from svdcompress.runtime import set_runtime
from svdcompress.zoo import load_model

# AutoModelForCausalLM.from_pretrained reads svdcompress checkpoints once this package is imported.
_register_with_transformers()

__all__ = [
    "OPENMP_ENVIRONMENT",
    "ASVDConfig",
    "Calibration",
    "CompressionConfig",
    "CompressionReport",
    "FinetuneConfig",
    "FisherConfig",
    "ImportanceConfig",
    "LowRankLinear",
    "RecoverySettings",
    "SVDConfig",
    "SlicedLinear",
    "WhitenConfig",
    "__version__",
    "allocate",
    "api",
    "build_conflict_benchmark",
    "compress_",
    "compress_qko",
    "compress_qko_importance",
    "compute_importance",
    "export_dense",
    "finetune_",
    "freeze_layers",
    "load",
    "load_model",
    "measure_knowledge",
    "preset",
    "quantize_factors_",
    "quantize_weights_",
    "recover_",
    "save",
    "set_runtime",
]
