"""svdcompress: low-rank (SVD) compression of Hugging Face causal language models."""

from __future__ import annotations

import os

# How long an idle OpenMP thread spins before it sleeps (BENCHMARKS.md, "threads on a shared CPU").
# libgomp's default, 300,000 spins, made torch several times slower on a shared CPU; no spin at all
# (OMP_WAIT_POLICY=PASSIVE, our default until 2026-12-07) made a 2-thread prefill 1.3-1.6x slower
# on an idle one, each parallel region waiting ~60 µs for its sleeping worker. A few thousand spins
# bridge the gap between two ops and then give the core back. Only before torch is first imported;
# a value the user set (either variable) wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "3000"

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
