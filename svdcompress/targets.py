"""Finding the decoder blocks and the linear layers a config targets, by name and type.

No per-architecture code: the decoder blocks are the ``nn.ModuleList`` whose length is the
config's layer count, and linear layers are ``nn.Linear`` or GPT-2's ``Conv1D``. Roles give the
Llama names (``q_proj``, ``o_proj``, ``up_proj``, ...) their GPT-2 / GPT-Neo / OPT equivalents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from svdcompress.errors import ConfigError

__all__ = [
    "ROLE_NAMES",
    "Target",
    "decoder_blocks",
    "find_targets",
    "is_linear",
    "linear_shape",
    "module_role",
]

# Suffixes (after the last dots) that identify each role across architectures.
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "q_proj": ("q_proj",),
    "k_proj": ("k_proj",),
    "v_proj": ("v_proj",),
    "o_proj": ("o_proj", "out_proj", "attn.c_proj", "dense"),
    "qkv_proj": ("c_attn", "qkv_proj", "query_key_value", "Wqkv"),
    "gate_proj": ("gate_proj", "w1"),
    "up_proj": ("up_proj", "fc1", "mlp.c_fc", "fc_in", "dense_h_to_4h", "w3"),
    "down_proj": ("down_proj", "fc2", "mlp.c_proj", "fc_out", "dense_4h_to_h", "w2"),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "qko": ("q_proj", "k_proj", "o_proj"),
}
ALL_LINEAR = "all-linear"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of an ``nn.Linear`` or a ``Conv1D`` (whose weight is stored transposed)."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def module_role(name: str) -> str | None:
    for role, suffixes in ROLE_NAMES.items():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            return role
    return None


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks and its qualified name."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return name, module
    raise ConfigError(
        f"could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
        f"num_hidden_layers={n_layers} modules."
    )


@dataclass(frozen=True)
class Target:
    name: str  # qualified module name in the model
    block: int  # index of the decoder block that holds it
    role: str | None
    out_features: int
    in_features: int


def _matches(pattern: str, name: str, role: str | None) -> bool:
    if pattern == ALL_LINEAR:
        return True
    if pattern in GROUPS:
        return role in GROUPS[pattern]
    if pattern in ROLE_NAMES:
        return role == pattern
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as err:
        raise ConfigError(f"pattern {pattern!r} is neither a known name nor a valid regex: {err}") from err


def block_linears(model: nn.Module) -> list[Target]:
    """Every linear layer inside a decoder block, in model order."""
    blocks_name, blocks = decoder_blocks(model)
    found = []
    for index, block in enumerate(blocks):
        for sub_name, module in block.named_modules():
            if is_linear(module):
                name = f"{blocks_name}.{index}.{sub_name}"
                found.append(Target(name, index, module_role(name), *linear_shape(module)))
    return found


def _no_match_error(kind: str, pattern: str, candidates: list[Target]) -> ConfigError:
    suffixes = sorted({t.name.split(".", 3)[-1] for t in candidates})
    return ConfigError(
        f"{kind} pattern {pattern!r} matches no linear layer in the decoder blocks. Layers per block: "
        f"{suffixes}; e.g. {candidates[0].name!r}. Groups: {[ALL_LINEAR, *GROUPS]}; roles: "
        f"{list(ROLE_NAMES)}."
    )


def find_targets(
    model: nn.Module, targets: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> list[Target]:
    """Targets selected by ``targets`` minus ``exclude``; a pattern that matches nothing is an error."""
    candidates = block_linears(model)
    if not candidates:
        raise ConfigError(
            "the model's decoder blocks hold no nn.Linear or Conv1D layers left to compress (is it "
            "already compressed? Then compress the original model, or recover/quantize this one)."
        )
    for kind, patterns in (("target", targets), ("exclude", exclude)):
        for pattern in patterns:
            if not any(_matches(pattern, t.name, t.role) for t in candidates):
                raise _no_match_error(kind, pattern, candidates)
    chosen = [
        t for t in candidates
        if any(_matches(p, t.name, t.role) for p in targets)
        and not any(_matches(p, t.name, t.role) for p in exclude)
    ]
    if not chosen:
        raise ConfigError(f"targets {targets} minus exclude {exclude} leave nothing to compress.")
    return chosen
