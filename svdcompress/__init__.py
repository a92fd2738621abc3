"""svdcompress: low-rank (SVD) compression of Hugging Face causal language models."""

from __future__ import annotations

__version__ = "0.1.0"

from svdcompress.calibration import Calibration  # noqa: E402
from svdcompress.checkpoint import export_dense, load, save  # noqa: E402
from svdcompress.compress import CompressionReport, compress_  # noqa: E402
from svdcompress.config import (  # noqa: E402
    ASVDConfig,
    CompressionConfig,
    FisherConfig,
    ImportanceConfig,
    SVDConfig,
    WhitenConfig,
    preset,
)
from svdcompress.methods.importance import compute_importance  # noqa: E402
from svdcompress.modules import LowRankLinear  # noqa: E402
from svdcompress.zoo import load_model  # noqa: E402

__all__ = [
    "ASVDConfig",
    "Calibration",
    "CompressionConfig",
    "CompressionReport",
    "FisherConfig",
    "ImportanceConfig",
    "LowRankLinear",
    "SVDConfig",
    "WhitenConfig",
    "__version__",
    "compress_",
    "compute_importance",
    "export_dense",
    "load",
    "load_model",
    "preset",
    "save",
]
