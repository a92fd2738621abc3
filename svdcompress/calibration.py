"""Calibration statistics gathered block by block, so memory stays bounded by one decoder block.

The pipeline (as in llm-compressor's sequential pipeline): capture what the first decoder block
receives for each calibration batch, then for each block in turn gather statistics of its target
layers' inputs, let the caller compress that block, and feed the block's *compressed* outputs to the
next one — so each layer is fitted to the inputs it will actually see, and errors do not compound.

When ``track_original`` is set, a second stream carries the original model's hidden states, and
each target also accumulates the cross-product of original and compressed inputs, which the
closed-form left-factor update uses to pull outputs back towards the original model's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from svdcompress import distributed
from svdcompress.errors import CalibrationError
from svdcompress.linalg import symmetrize_
from svdcompress.targets import Target, decoder_blocks, linear_shape

__all__ = [
    "BlockCall",
    "Calibration",
    "ModuleStats",
    "capture_block_inputs",
    "forward_hooks",
    "gather_block_stats",
    "run_block",
    "run_sequential",
]

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Token windows (n, seq_len) plus a description of where they came from."""

    windows: torch.Tensor
    source: str = "custom token windows"

    def __post_init__(self) -> None:
        if self.windows.ndim != 2 or self.windows.numel() == 0:
            raise CalibrationError(
                f"calibration windows must be a non-empty (n, seq_len) tensor of token ids, got "
                f"shape {tuple(self.windows.shape)}."
            )
        if self.windows.dtype not in (torch.int64, torch.int32):
            raise CalibrationError(f"calibration windows must hold token ids, got {self.windows.dtype}")

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.windows.split(batch_size))

    @property
    def n_tokens(self) -> int:
        return self.windows.numel()


@dataclass
class SharedInput:
    """What targets fed the same tensor (q/k/v, gate/up) share beyond their sums: values derived
    from the one Gram matrix, computed for the first of them and dropped after the last took it."""

    users: int = 1
    memo: dict = field(default_factory=dict)  # key -> [Gram version, value, users served]


@dataclass
class ModuleStats:
    """Sums over the calibration tokens a target layer received in the compressed model."""

    gram: torch.Tensor  # Σ x' x'ᵀ (in, in), float64
    abs_sum: torch.Tensor  # Σ |x'| per input channel (in,), float64
    cross: torch.Tensor | None = None  # Σ x x'ᵀ with x the original model's input
    original_gram: torch.Tensor | None = None  # Σ x xᵀ, with cross (refinement needs ‖W X‖²)
    n_tokens: int = 0
    extra: dict = field(default_factory=dict)
    shared: SharedInput = field(default_factory=SharedInput, repr=False, compare=False)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n_tokens, 1)

    def from_gram(self, key: str, compute: Callable[[torch.Tensor], object], *,
                  needed: bool = True) -> object:
        """``compute(gram)``, once for all the targets sharing this Gram matrix (q/k/v's
        eigendecomposition is one, not three). Kept until each sharer has asked once, then dropped,
        so it does not outlive them; recomputed if the Gram matrix changed in place meanwhile. A
        sharer that does without it asks with ``needed=False`` (None back, nothing computed), so
        that the value still goes after the last sharer."""
        memo = self.shared.memo
        entry = memo.get(key)
        if entry is None or entry[0] != self.gram._version:
            entry = memo[key] = [self.gram._version, None, 0]
        if needed and entry[1] is None:
            entry[1] = compute(self.gram)
            entry[0] = self.gram._version  # compute may symmetrise the Gram in place
        entry[2] += 1
        if entry[2] >= self.shared.users:
            del memo[key]
        return entry[1] if needed else None


@contextlib.contextmanager
def forward_hooks(hooks: dict[nn.Module, Callable], *, pre: bool = False) -> Iterator[None]:
    """Register hooks and always remove them, even when the forward pass raises."""
    handles = []
    try:
        for module, hook in hooks.items():
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook, with_kwargs=pre))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _BlockInputsCaptured(Exception):
    """Raised by the capture hook: the rest of the model need not run (llm-compressor does the same)."""


class _BlockStatisticsComplete(Exception):
    """Raised once every target of a block has seen its input in this batch: the statistics pass
    needs nothing after that (in a Llama block, not down_proj's product nor the residual add)."""


@dataclass
class BlockCall:
    """One batch's call of a decoder block: its hidden states and the other arguments the model passed."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list) -> list[BlockCall]:
    """Run the model on each batch up to ``block`` and record how ``block`` is called (then stop)."""
    calls: list[BlockCall] = []

    def capture(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calls.append(BlockCall(hidden, tuple(args[1:]), dict(kwargs)))
        raise _BlockInputsCaptured

    device = next(model.parameters()).device
    with forward_hooks({block: capture}, pre=True), torch.no_grad():
        for batch in batches:
            with contextlib.suppress(_BlockInputsCaptured):
                model(input_ids=batch.to(device), use_cache=False)
    return calls


def run_block(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    """``block``'s output hidden states for ``hidden``, called as the model called it in ``call``."""
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _flat_input(args: tuple) -> torch.Tensor:
    x = args[0]
    return x.reshape(-1, x.shape[-1]).float()


def _add_gram_lower_(gram: torch.Tensor, x: torch.Tensor, columns: int = 256) -> None:
    """Add xᵀx's lower triangle (and diagonal blocks) to ``gram``, a band of columns at a time.

    About half the products of x.T @ x (42 % fewer for a 1536-wide input; :func:`symmetrize_` fills
    the upper triangle once all batches are in), and the float32 product of a wide input (TinyLlama's
    down_proj: 5632² = 121 MiB) is never whole. Each band is added to the float64 sum exactly.
    """
    for start in range(0, x.shape[1], columns):
        stop = start + columns
        gram[start:, start:stop] += x[:, start:].T @ x[:, start:stop]


def gather_block_stats(
    block: nn.Module,
    modules: dict[str, nn.Module],
    calls: list[BlockCall],
    compressed: list[torch.Tensor],
    original: list[torch.Tensor] | None,
    *,
    keep_outputs: bool = False,
) -> tuple[dict[str, ModuleStats], list[torch.Tensor] | None]:
    """One pass over the batches: statistics for each target, and the original stream's next state.

    Targets fed the same tensor (q/k/v, gate/up) share one Gram matrix and one absolute sum
    (the same ``torch.Tensor`` objects in their ``ModuleStats``): computed once, held once.
    ``keep_outputs`` (one-pass calibration, without an original stream): the whole block runs and
    its outputs on ``compressed`` are returned in place of the original stream's next state;
    otherwise the pass stops once every target has seen its input.
    """
    if keep_outputs and original is not None:
        raise ValueError("keep_outputs returns the outputs of the one stream; an original stream is given")
    stats: dict[str, ModuleStats] = {}
    original_inputs: dict[str, torch.Tensor] = {}
    next_original: list[torch.Tensor] | None = [] if original is not None or keep_outputs else None
    batch_cache: dict[tuple, tuple] = {}
    added: dict[int, tuple] = {}  # id of a shared Gram -> the input added to it in this batch
    seen: set[str] = set()
    fed: dict[tuple, int] = {}  # input key -> how many of its sharers took it in this batch
    sharing_known = False  # after the first batch: each shared input's number of sharers

    def remember_original(name):
        def hook(_module, args, _output):
            original_inputs[name] = _flat_input(args)
        return hook

    def accumulate(name):
        def hook(_module, args, _kwargs):
            x = _flat_input(args)  # (tokens, in)
            # x is kept in the cache so its memory cannot be freed and reused by a later input of
            # the same shape within this batch: a reused address would hit a stale entry.
            key = (x.data_ptr(), tuple(x.shape))
            sharer = batch_cache.setdefault(key, (name, x))[0]
            if name not in stats:  # the first batch decides who shares with whom
                if sharer == name:
                    stats[name] = _empty_stats(modules[name])
                else:
                    first = stats[sharer]
                    first.shared.users += 1
                    stats[name] = ModuleStats(gram=first.gram, abs_sum=first.abs_sum, shared=first.shared)
            entry = stats[name]
            previous = added.get(id(entry.gram))
            if previous is None:  # the first of its sharers in this batch adds the input, once
                added[id(entry.gram)] = key
                _add_gram_lower_(entry.gram, x)
                entry.abs_sum += x.abs().sum(0)
            elif previous != key:
                raise CalibrationError(
                    f"{name} shares its input statistics with other targets (they were fed the same "
                    "tensor in the first calibration batch) but was fed another tensor in a later one."
                )
            entry.n_tokens += x.shape[0]
            fed[key] = fed.get(key, 0) + 1
            if sharing_known and fed[key] == entry.shared.users:
                # Its last sharer has it: no later input can be mistaken for it, so let it go
                # (down_proj's statistics, the block's peak, then run without q/k/v's, o's and
                # gate/up's inputs held).
                batch_cache.pop(key, None)
            if name in original_inputs:
                x_orig = original_inputs[name]
                cross = (x_orig.T @ x).double()
                entry.cross = cross if entry.cross is None else entry.cross + cross
                # Σ x xᵀ of the original stream: the constant ‖W X‖² of the refinement objective.
                okey = ("original", x_orig.data_ptr(), tuple(x_orig.shape))
                if okey not in batch_cache:
                    batch_cache[okey] = (x_orig.T @ x_orig, x_orig)
                ogram = batch_cache[okey][0]
                entry.original_gram = ogram.double() if entry.original_gram is None else entry.original_gram + ogram
            seen.add(name)
            if len(seen) == len(modules) and not keep_outputs:
                raise _BlockStatisticsComplete
        return hook

    with torch.no_grad():
        for index, call in enumerate(calls):
            if original is not None:
                with forward_hooks({m: remember_original(n) for n, m in modules.items()}):
                    next_original.append(run_block(block, call, original[index]))
            batch_cache.clear()
            added.clear()
            seen.clear()
            fed.clear()
            # Pre-hooks: the statistics need each target's input, never its output.
            with forward_hooks({m: accumulate(n) for n, m in modules.items()}, pre=True), \
                    contextlib.suppress(_BlockStatisticsComplete):
                outputs = run_block(block, call, compressed[index])
                if keep_outputs:
                    next_original.append(outputs)
            _check_sharers_ran(stats, seen)
            original_inputs.clear()
            sharing_known = True
    for name, module in modules.items():  # a target no batch reached (never so in a dense block)
        stats.setdefault(name, _empty_stats(module))
    for gram in {id(entry.gram): entry.gram for entry in stats.values()}.values():
        # Exactly symmetric before anyone reads it: the whitening decomposes the Gram in its own
        # memory and leaves it so, and every rank and path must then see the same matrix.
        symmetrize_(gram)
    return {name: stats[name] for name in modules}, next_original


def _check_sharers_ran(stats: dict[str, ModuleStats], seen: set[str]) -> None:
    """A shared sum is right only if every target sharing it saw this batch's input too."""
    ran = {id(stats[name].gram) for name in seen}
    missing = [name for name, entry in stats.items() if id(entry.gram) in ran and name not in seen]
    if missing:
        raise CalibrationError(
            f"{', '.join(missing)} shared input statistics with targets that ran in a calibration "
            "batch where they did not."
        )


def _empty_stats(module: nn.Module) -> ModuleStats:
    _, in_features = linear_shape(module)
    device = next(module.parameters()).device
    return ModuleStats(
        gram=torch.zeros(in_features, in_features, dtype=torch.float64, device=device),
        abs_sum=torch.zeros(in_features, dtype=torch.float64, device=device),
    )


def run_sequential(
    model: nn.Module,
    targets: list[Target],
    calibration: Calibration,
    compress_block: Callable[[int, dict[str, ModuleStats]], None],
    *,
    batch_size: int = 4,
    track_original: bool = False,
    one_pass: bool = False,
) -> None:
    """Gather per-target statistics block by block and call ``compress_block`` for each block.

    ``compress_block(index, stats)`` must replace the block's targets in place; the block's new
    outputs then become the next block's inputs. ``one_pass``: the block's outputs *before*
    compression do (every statistic is then the original model's, as SVD-LLM calibrates; each block
    runs once instead of twice).
    """
    if one_pass and track_original:
        raise ValueError("one_pass calibration has no compressed stream to track beside the original")
    _, blocks = decoder_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for target in targets:
        by_block.setdefault(target.block, []).append(target)
    # Under torchrun each rank runs its share of the batches; reduce_stats sums what they saw.
    batches = distributed.shard_batches(calibration.batches(batch_size))
    calls = capture_block_inputs(model, blocks[0], batches)
    compressed = [call.hidden for call in calls]
    original = [call.hidden for call in calls] if track_original else None
    last_block = max(by_block)
    progress = tqdm(range(last_block + 1), desc="calibrating blocks", unit="block", leave=False)
    with torch.no_grad():
        for index in progress:
            block = blocks[index]
            outputs = None  # the block's outputs, when its statistics pass already made them
            if index in by_block:
                modules = {t.name: model.get_submodule(t.name) for t in by_block[index]}
                keep = one_pass and index < last_block
                stats, after = gather_block_stats(block, modules, calls, compressed, original, keep_outputs=keep)
                if keep:  # the inputs are done with: released before the factorizations
                    compressed = outputs = after
                else:
                    next_original = after
                distributed.reduce_stats(stats)
                compress_block(index, stats)
                del stats
            elif original is not None:
                next_original = [run_block(block, c, h) for c, h in zip(calls, original, strict=True)]
            if index < last_block:  # the last compressed block's outputs feed nothing we measure
                if outputs is None:
                    compressed = [run_block(block, c, h) for c, h in zip(calls, compressed, strict=True)]
                if original is not None:
                    original = next_original
    logger.info("calibrated %d blocks on %d tokens", last_block + 1, calibration.n_tokens)
