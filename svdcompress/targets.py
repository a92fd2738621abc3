"""Finding the decoder blocks and the linear layers a config targets, by structure first.

No per-architecture code. The decoder blocks are the largest ``nn.ModuleList`` of identical
modules that hold linear layers (the one whose length is the config's layer count, when there is
one). Linear layers are ``nn.Linear`` or GPT-2's ``Conv1D``; roles give the Llama names
(``q_proj``, ``o_proj``, ``up_proj``, ...) their GPT-2 / GPT-Neo / OPT / Phi equivalents.

Fused projections compute several logical matrices in one: GPT-2's ``c_attn`` ([q | k | v]),
Phi-3's ``qkv_proj`` and ``gate_up_proj``. They are recognised by their shape against the config
(``q + 2·kv`` or ``2 · intermediate`` outputs from the hidden size, where the block has no separate
projection of those roles) and targeted per logical slice: ``qko``, ``cf90`` and ``k-only`` select
the same matrices with or without fusion. A fused module holding a selected slice is split in
place into a :class:`~svdcompress.modules.SlicedLinear` (the same function), so every target's
name is a real submodule.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from svdcompress.errors import ConfigError
from svdcompress.modules import LowRankLinear, SlicedLinear, split_fused_

__all__ = [
    "GROUPS",
    "ROLE_NAMES",
    "Target",
    "block_linears",
    "decoder_blocks",
    "find_targets",
    "fused_slices",
    "is_linear",
    "linear_shape",
    "module_role",
]

logger = logging.getLogger(__name__)

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
    "gate_up_proj": ("gate_up_proj",),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj", "gate_up_proj"),
    "qko": ("q_proj", "k_proj", "o_proj"),
}
ALL_LINEAR = "all-linear"
# GPT-NeoX, Falcon and Bloom interleave q, k and v head by head in ``query_key_value``: its slices
# are not contiguous row ranges, so it is left whole (role ``qkv_proj``) rather than split wrongly.
_INTERLEAVED = ("query_key_value",)


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


def _holds_linear(module: nn.Module) -> bool:
    return any(is_linear(m) or isinstance(m, LowRankLinear | SlicedLinear) for m in module.modules())


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks and its qualified name.

    Found by structure: ``nn.ModuleList``s of identical modules that hold linear layers; among
    them those as long as the config's layer count (when it has one), and of those the one with
    the most parameters (an expert list inside a block is never the decoder stack).
    """
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
        and len({type(m) for m in module}) == 1 and _holds_linear(module[0])
    ]
    exact = [c for c in candidates if len(c[1]) == n_layers] or candidates
    if not exact:
        raise ConfigError(
            f"could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
            f"identical modules holding linear layers (num_hidden_layers={n_layers})."
        )
    return max(exact, key=lambda c: sum(p.numel() for p in c[1].parameters()))


@dataclass(frozen=True)
class Target:
    name: str  # qualified module name in the model
    block: int  # index of the decoder block that holds it
    role: str | None
    out_features: int
    in_features: int
    fused: str | None = None  # the fused projection this is a slice of (e.g. GPT-2's c_attn)


def _attention_widths(config) -> tuple[int | None, int | None]:
    """Output widths of the query and of the key (= value) projections, from the config."""
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not hidden or not heads:
        return None, None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads * head_dim, kv_heads * head_dim


def fused_slices(config, name: str, module: nn.Module, block_roles: set) -> dict[str, int] | None:
    """``{slice name: out_features}`` when ``module`` is a fused projection, else ``None``.

    A fused QKV maps the hidden size to ``q + 2·kv`` outputs ([q | k | v]); a fused gate/up to
    ``2 · intermediate_size`` ([gate | up]). Only where the block has no separate projection of
    those roles, so an ordinary layer that happens to have such a shape is never split.
    """
    role, short = module_role(name), name.rsplit(".", 1)[-1]
    out_features, in_features = linear_shape(module)
    if in_features != getattr(config, "hidden_size", None) or short in _INTERLEAVED:
        return None
    if role in (None, "qkv_proj") and not block_roles & {"q_proj", "k_proj", "v_proj"}:
        q, kv = _attention_widths(config)
        if q and out_features == q + 2 * kv:
            return {"q_proj": q, "k_proj": kv, "v_proj": kv}
    if role in (None, "gate_up_proj") and not block_roles & {"gate_proj", "up_proj"}:
        intermediate = getattr(config, "intermediate_size", None)
        if intermediate and out_features == 2 * intermediate:
            return {"gate_proj": intermediate, "up_proj": intermediate}
    if role in ("qkv_proj", "gate_up_proj"):
        logger.info("%s (%d×%d) is named like a fused projection but its shape does not match the "
                    "config; it is treated as one matrix", name, out_features, in_features)
    return None


def _block_targets(config, prefix: str, index: int, block: nn.Module) -> list[Target]:
    linears = [(f"{prefix}.{sub}", m) for sub, m in block.named_modules() if is_linear(m)]
    sliced = {f"{prefix}.{sub}" for sub, m in block.named_modules() if isinstance(m, SlicedLinear)}
    roles = {module_role(name) for name, _ in linears}
    found = []
    for name, module in linears:
        parent = name.rpartition(".")[0]
        slices = None if parent in sliced else fused_slices(config, name, module, roles)
        if slices is None:
            found.append(Target(name, index, module_role(name), *linear_shape(module),
                                fused=parent if parent in sliced else None))
            continue
        in_features = linear_shape(module)[1]
        found.extend(Target(f"{name}.{part}", index, part, size, in_features, fused=name)
                     for part, size in slices.items())
    return found


def block_linears(model: nn.Module) -> list[Target]:
    """Every linear layer inside a decoder block, in model order; fused ones as their slices."""
    blocks_name, blocks = decoder_blocks(model)
    found = []
    for index, block in enumerate(blocks):
        found.extend(_block_targets(model.config, f"{blocks_name}.{index}", index, block))
    return found


def _matches_name(pattern: str, name: str, role: str | None) -> bool:
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


def _matches(pattern: str, target: Target) -> bool:
    """A slice is selected by its own name and role, or by those of the fused module it is part
    of (``c_attn`` or ``qkv_proj`` select all three of GPT-2's q, k, v)."""
    if _matches_name(pattern, target.name, target.role):
        return True
    return target.fused is not None and _matches_name(pattern, target.fused, module_role(target.fused))


def _no_match_error(kind: str, pattern: str, candidates: list[Target]) -> ConfigError:
    suffixes = sorted({t.name.split(".", 3)[-1] for t in candidates})
    return ConfigError(
        f"{kind} pattern {pattern!r} matches no linear layer in the decoder blocks. Layers per block: "
        f"{suffixes}; e.g. {candidates[0].name!r}. Groups: {[ALL_LINEAR, *GROUPS]}; roles: "
        f"{list(ROLE_NAMES)}."
    )


def _split_selected(model: nn.Module, candidates: list[Target], chosen: list[Target]) -> None:
    """Split the fused modules that hold a chosen slice, so its name is a real submodule."""
    wanted = {t.fused for t in chosen if t.fused is not None}
    slices: dict[str, dict[str, int]] = {}
    for t in candidates:
        if t.fused in wanted and not isinstance(model.get_submodule(t.fused), SlicedLinear):
            slices.setdefault(t.fused, {})[t.name.rsplit(".", 1)[-1]] = t.out_features
    split = split_fused_(model, slices)
    if split:
        logger.info("split %d fused projections into per-slice linears (e.g. %s: %s)",
                    len(split), split[0], list(slices[split[0]]))


def find_targets(
    model: nn.Module, targets: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> list[Target]:
    """Targets selected by ``targets`` minus ``exclude``; a pattern that matches nothing is an error.

    A fused projection holding a selected slice is split in place (same function, see
    :class:`~svdcompress.modules.SlicedLinear`) so ``model.get_submodule(target.name)`` works.
    """
    candidates = block_linears(model)
    if not candidates:
        raise ConfigError(
            "the model's decoder blocks hold no nn.Linear or Conv1D layers left to compress (is it "
            "already compressed? Then compress the original model, or recover/quantize this one)."
        )
    for kind, patterns in (("target", targets), ("exclude", exclude)):
        for pattern in patterns:
            if not any(_matches(pattern, t) for t in candidates):
                raise _no_match_error(kind, pattern, candidates)
    chosen = [
        t for t in candidates
        if any(_matches(p, t) for p in targets) and not any(_matches(p, t) for p in exclude)
    ]
    if not chosen:
        raise ConfigError(f"targets {targets} minus exclude {exclude} leave nothing to compress.")
    _split_selected(model, candidates, chosen)
    return chosen
