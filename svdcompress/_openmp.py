"""The OpenMP setting torch's runtime starts with: svdcompress's default, and what was in effect.

Imported by the package before anything that loads torch (libgomp reads its variables once, when
torch loads it).
"""

from __future__ import annotations

import os
import sys

__all__ = ["OPENMP_ENVIRONMENT"]

# How long an idle OpenMP thread spins before it sleeps (BENCHMARKS.md, "threads on a shared CPU").
# libgomp's default, 300,000 spins, made torch several times slower on a shared CPU; no spin at all
# (OMP_WAIT_POLICY=PASSIVE, our default until 2026-12-07) made 2-thread runs 1.1-1.5x slower on an
# idle one (the INT8 models' prefill most), each parallel region waiting for its sleeping worker, and
# was 1.1-1.7x faster than a short spin beside one competing thread. A few thousand spins
# bridge the gap between two ops and then give the core back. Only before torch is first imported;
# a value the user set (either variable) wins.
_OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
_torch_loaded_first = "torch" in sys.modules
_before = {name: os.environ.get(name) for name in _OPENMP_VARIABLES}
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "3000"
# What torch's OpenMP runtime read (or will read) at its start; every results file records it.
OPENMP_ENVIRONMENT = dict(_before if _torch_loaded_first else
                          {name: os.environ.get(name) for name in _OPENMP_VARIABLES},
                          torch_loaded_first=_torch_loaded_first)

