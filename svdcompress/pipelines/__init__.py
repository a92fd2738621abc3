"""What each command does, as library functions: check what needs no model, load, compute, save.

One module per command (``compress``, ``analyze``, ``evaluate``, ``recover``, ``finetune``). The
command line (:mod:`svdcompress.commands`) maps its flags onto these, and :mod:`svdcompress.api`
gives them the CLI's vocabulary as one call per command; nothing here imports either, so the
library never depends on the CLI. The defaults below are the CLI's too (its vocabulary table).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_DEVICE",
    "DEFAULT_SEED",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_STORAGE",
    "DEFAULT_WINDOWS",
]

DEFAULT_DATA = "wiki"
DEFAULT_WINDOWS = 64
DEFAULT_SEQ_LEN = 512
DEFAULT_SEED = 0
DEFAULT_DEVICE = "auto"
# compress without a recipe or preset: the same rank-r product as two factors in r·(out+in−r)
# numbers, so a parameter budget buys higher ranks (BENCHMARKS.md, issue 14 quality frontier).
DEFAULT_STORAGE = "pivoted"
