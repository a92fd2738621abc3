"""Exceptions raised by svdcompress.

Every error a user can cause (bad model spec, missing file, unreachable registry, a dataset too small
for the request) is a :class:`SvdCompressError`; the CLI prints its message as one line and exits
with status 2 instead of showing a traceback. Messages name the problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "AnalysisError",
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "FetchError",
    "ModelLoadError",
    "ModelNotFoundError",
    "QuantizationError",
    "SvdCompressError",
    "TaskError",
    "require_finite",
]


class SvdCompressError(Exception):
    """Base class for every error svdcompress raises on purpose."""


class FetchError(SvdCompressError):
    """A package could not be downloaded from a registry, or the download was not valid."""


class ModelNotFoundError(SvdCompressError):
    """A model spec names nothing we can find: no such path, alias, or reachable hub repository."""


class ModelLoadError(SvdCompressError):
    """A model was found but could not be read (corrupt or unsupported file)."""


class DatasetError(SvdCompressError):
    """A dataset is unknown, broken, or too small for what was asked of it."""


class ConfigError(SvdCompressError, ValueError):
    """A compression setting is invalid or cannot be applied to this model."""


class CalibrationError(SvdCompressError):
    """Calibration data is missing, too small or unusable for the chosen method."""


class CheckpointError(SvdCompressError):
    """A checkpoint folder is missing, incomplete or inconsistent with its compression_config."""


class AnalysisError(SvdCompressError):
    """An analysis folder belongs to another model or other settings, or cannot be read."""


class QuantizationError(SvdCompressError, ValueError):
    """A matrix cannot be quantized (it holds NaN or inf); the message names the module."""


class TaskError(SvdCompressError):
    """An evaluation task is unknown, its settings are invalid, or lm-eval is not installed."""


def require_finite(tensors: dict, *, module: str, error: type[SvdCompressError], refusing: str,
                   fix: str) -> None:
    """Raise ``error`` when a tensor of ``tensors`` (what it is -> tensor) holds NaN or inf: the
    message names the module, the tensor and how many values, what is refused and the fix."""
    for what, tensor in tensors.items():
        bad = int((~tensor.isfinite()).sum())
        if bad:
            raise error(f"{module}: {what} holds {bad} NaN/inf values; refusing to {refusing} ({fix}).")
