"""``recipe.yaml``: the exact settings of a compression, saved beside its checkpoint.

``svdcompress compress BASE --recipe DIR/recipe.yaml --out NEW`` rebuilds the same tensors bit for
bit from the same base model. The file holds the config fields (as ``CompressionConfig.to_dict``),
and three sections that are not settings (:data:`svdcompress.config.RECIPE_SECTIONS`):

- ``data``: how the CLI chose its calibration windows (``source``, ``windows``, ``seq_len``, and
  ``facts`` for the importance method); they replace the defaults of flags not given.
- ``base_model``: the model it was made from (``spec``) and a fingerprint of its weights
  (``analysis.model_fingerprint``, as ``compress_`` records it); another model is refused.
- ``provenance``: the command line and the library version that wrote it.

A folder made by more than one step (compressed twice, recovered, fine-tuned) or by the INT8
baseline has no recipe: no single ``compress`` call reproduces it, and its card says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdcompress.config import config_from_dict, read_recipe_file
from svdcompress.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DATA_KEYS", "RECIPE_FILE", "check_base_model", "recipe_data", "recipe_text", "steps_after"]

RECIPE_FILE = "recipe.yaml"
DATA_KEYS = ("source", "windows", "seq_len", "facts")

_HEADER = """\
# svdcompress recipe: every setting of the compression that wrote the checkpoint beside it.
# Reproduce it bit for bit from the same base model:
#   svdcompress compress {base} --recipe recipe.yaml --out NEW_FOLDER
"""


def steps_after(compression: dict) -> list[str]:
    """What changed the weights after the last ``compress_`` (a reason there is no recipe)."""
    steps = [key for key in ("recovery", "finetune") if compression.get(key)]
    if compression.get("history"):
        steps.insert(0, f"{len(compression['history'])} earlier compression(s)")
    return steps


def recipe_text(compression: dict) -> str | None:
    """The ``recipe.yaml`` of a checkpoint's ``compression_config`` (``None``: no single recipe)."""
    import yaml

    try:
        config = config_from_dict(compression.get("config") or {})
    except ConfigError:  # the INT8 baseline (quantize_weights_) is not a compress_ method
        return None
    if steps_after(compression):
        return None
    recipe: dict[str, Any] = config.to_dict()
    if compression.get("data"):
        recipe["data"] = {k: v for k, v in compression["data"].items() if k in DATA_KEYS}
    base = {"spec": compression.get("base_model"), "fingerprint": compression.get("base_fingerprint")}
    recipe["base_model"] = {k: v for k, v in base.items() if v}
    recipe["provenance"] = {k: compression.get(k) for k in ("command", "calibration", "library_version")
                            if compression.get(k)}
    body = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    return _HEADER.format(base=compression.get("base_model") or "BASE_MODEL") + body


def recipe_data(path: str | Path, given: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """``given`` (data key -> value from the command line) with the recipe's recorded values in
    place of every flag the user did not give (``explicit``: the keys given)."""
    recorded = read_recipe_file(path).get("data") or {}
    return {key: value if key in explicit or key not in recorded else recorded[key]
            for key, value in given.items()}


def check_base_model(path: str | Path, model: nn.Module, spec: str) -> None:
    """Refuse to apply a recipe recorded for another base model (by weights, not by name)."""
    from svdcompress.analysis import model_fingerprint  # lazy: analysis imports half the package

    recorded = read_recipe_file(path).get("base_model") or {}
    if not recorded.get("fingerprint"):
        return
    found = model_fingerprint(model, strict=False)
    if found != recorded["fingerprint"]:
        made_for = recorded.get("spec") or "another model"
        raise ConfigError(
            f"recipe {path} was made for {made_for} (weights fingerprint {recorded['fingerprint']}), "
            f"not for {spec} (fingerprint {found}); it reproduces its checkpoint only from that "
            f"model. Compress {made_for} with it, or delete its base_model section to apply the "
            f"settings to {spec} anyway."
        )
