"""One meaning for ``--device``: ``auto`` (a GPU when torch sees one), ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import torch

from svdcompress.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(choice: str | torch.device) -> torch.device:
    """The ``torch.device`` for a user's choice; an unknown name or a missing GPU is a ConfigError."""
    if isinstance(choice, torch.device):
        choice = str(choice)
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise ConfigError(f"unknown device {choice!r}: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {choice}: this machine has no CUDA device; use cpu or auto.")
    return device
