"""Run one ``svdcompress`` command and SIGKILL it at a chosen point (used by test_kills.py).

    python tests/kill_driver.py POINT svdcompress-arguments...

POINT is ``none`` (run to the end) or ``WHERE:N`` — kill the process at the N-th time it reaches
WHERE (1-based):

- ``module``: compressing a module (inside ``compress_``, before anything is written);
- ``weights``: right after a safetensors file of a checkpoint was written (folder incomplete);
- ``rename``: just before a rename of ``atomic_folder`` (the old output moved aside, or the new
  one moved in);
- ``step``: the start of a recovery step;
- ``state``: while a recovery state is written (its model saved, its optimizer moments not yet).
- ``ftstep``: the start of a fine-tuning step (the Trainer's ``training_step``);
- ``ftstate``: while a fine-tuning state is written (model and optimizer saved, the Trainer's
  state file that marks it complete not yet).

No process is asked to exit: ``os.kill(os.getpid(), SIGKILL)`` is what a killed job, an
out-of-memory kill or a power cut looks like from the files' point of view.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _counting(function, n: int, before: bool = True, only=lambda *a, **k: True):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        if only(*args, **kwargs):
            calls["n"] += 1
            if before and calls["n"] == n:
                _die()
        result = function(*args, **kwargs)
        if not before and calls["n"] == n and only(*args, **kwargs):
            _die()
        return result

    return wrapper


def _is_atomic_rename(src, dst, *args, **kwargs) -> bool:
    names = (Path(src).name, Path(dst).name)
    return os.path.isdir(src) and any(".tmp-" in n or ".old-" in n for n in names)


def install(point: str) -> None:
    if point == "none":
        return
    where, _, count = point.partition(":")
    n = int(count or 1)
    if where == "module":
        from svdcompress import compress

        compress.Compressor.install = _counting(compress.Compressor.install, n)
    elif where == "weights":
        from transformers import modeling_utils

        modeling_utils.safe_save_file = _counting(modeling_utils.safe_save_file, n, before=False)
    elif where == "rename":
        os.replace = _counting(os.replace, n, only=_is_atomic_rename)
    elif where == "step":
        from svdcompress import recover

        original = recover._Run.step
        recover._Run.step = lambda self, step: _die() if step == n else original(self, step)
    elif where == "state":
        from svdcompress import recover

        recover.save_file = _counting(recover.save_file, n)
    elif where == "ftstep":
        from transformers import Trainer

        Trainer.training_step = _counting(Trainer.training_step, n)
    elif where == "ftstate":
        from transformers import Trainer

        Trainer._save_rng_state = _counting(Trainer._save_rng_state, n)
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def main() -> None:
    point, *args = sys.argv[1:]
    install(point)
    from svdcompress.cli import main as cli_main

    sys.argv = ["svdcompress", *args]
    cli_main()


if __name__ == "__main__":
    main()
