"""FWSVD: Fisher-weighted SVD with per-row importance from squared gradients on calibration text."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from svdcompress.config import FisherConfig
from svdcompress.errors import CalibrationError
from svdcompress.linalg import fisher_weighted_svd
from svdcompress.methods import register
from svdcompress.methods.gradients import target_gradients, windows_as_batches


def row_fisher(model, targets, config, calibration, importance=None) -> dict[str, torch.Tensor]:
    """Σ over windows of Σ_j (∂L/∂W_ij)²: one window per backward pass, so each is one sample."""
    if calibration is None:
        raise CalibrationError("method 'fisher' needs calibration text for its gradients.")
    windows = calibration.windows[: config.fisher_windows]
    names = [t.name for t in targets]
    totals: dict[str, torch.Tensor] = {}
    batches = windows_as_batches(windows, 1)
    for grads in tqdm(target_gradients(model, names, batches), total=len(batches),
                      desc="fisher gradients", leave=False):
        for name, grad in grads.items():
            rows = grad.double().pow(2).sum(1)
            totals[name] = rows if name not in totals else totals[name] + rows
    return totals


def factorize(weight, rank, stats, extra, config):
    return fisher_weighted_svd(weight, extra, rank)


register(FisherConfig, factorize, prepare=row_fisher)
