"""svdcompress: low-rank (SVD) compression of Hugging Face causal language models."""

from __future__ import annotations

__version__ = "0.1.0"

import os

# Busy-waiting OpenMP threads made torch several times slower on a shared CPU (BENCHMARKS.md, "threads
# on a shared CPU"); passive waiting costs next to nothing on an idle one. It only takes effect
# before torch is first imported, and a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
from svdcompress.modules import LowRankLinear
from svdcompress.protect import (
    build_conflict_benchmark,
    compress_qko,
    compress_qko_importance,
    compute_importance,
    measure_knowledge,
)
from svdcompress.quantize import quantize_factors_, quantize_weights_
from svdcompress.runtime import set_runtime
from svdcompress.zoo import load_model

__all__ = [
    "ASVDConfig",
    "Calibration",
    "CompressionConfig",
    "CompressionReport",
    "FinetuneConfig",
    "FisherConfig",
    "ImportanceConfig",
    "LowRankLinear",
    "SVDConfig",
    "WhitenConfig",
    "__version__",
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
    "save",
    "set_runtime",
]
