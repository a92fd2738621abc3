"""Where a published number came from: the command, the code version and the machine.

Every results file under ``experiments/results/`` carries a ``provenance`` entry made by
:func:`provenance` and is written with :func:`write_results` (atomically: a killed script never
leaves half a file that a later run would trust).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from svdcompress._openmp import OPENMP_ENVIRONMENT
from svdcompress._version import __version__
from svdcompress.fetch import atomic_write_text

__all__ = [
    "code_version",
    "model_digest",
    "provenance",
    "stamp_results",
    "tensor_digest",
    "write_results",
]


def code_version(repo: str | Path | None = None) -> dict[str, Any]:
    """The git commit of the source tree (and whether it had uncommitted changes), when known."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"package": __version__, "commit": commit,
            "dirty": None if status is None else bool(status)}


def command_line() -> str:
    """The running command as typed (the program by its name, not its path), e.g. for a model card."""
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """The command that is running, the code version, library versions and the machine."""
    import torch
    import transformers

    argv = list(sys.argv if argv is None else argv)
    return {
        "command": " ".join(shlex.quote(a) for a in argv),
        "code_version": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "openmp_environment": OPENMP_ENVIRONMENT,
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_results(path: str | Path, data: dict[str, Any], *, argv: list[str] | None = None) -> Path:
    """Write ``data`` with a fresh ``provenance`` entry as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # indent=2 and ASCII escapes, as the results files have always been written: a rewrite
    # then differs from the old file only where the data does.
    text = json.dumps({**data, "provenance": provenance(argv)}, indent=2)
    json.loads(text)
    atomic_write_text(path, text)
    return path


def stamp_results(path: str | Path, *, argv: list[str] | None = None) -> Path:
    """Add (or refresh) the ``provenance`` entry of a JSON results file that a library call wrote
    (an analysis cache, an allocation recipe), so the script that ran the call is named in it."""
    path = Path(path)
    data = json.loads(path.read_text())
    data.pop("provenance", None)
    return write_results(path, data, argv=argv)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors: names, shapes, dtypes and bytes, in name order."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        hasher.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """:func:`tensor_digest` of the model's whole state dict: equal only for identical weights."""
    return tensor_digest(dict(model.state_dict()))
