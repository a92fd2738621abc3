"""Many processes through ``torch.distributed``, as launched by ``torchrun``.

Compression under ``torchrun --nproc_per_node N`` is data-parallel calibration with one owner per
module:

- each rank runs its share of the calibration batches through the blocks (:func:`shard_batches`),
  so hidden states never cross processes;
- the per-module sums (Gram matrices, |x| sums, token counts) are all-reduced after each block
  (:func:`reduce_stats`), so every rank holds the statistics of all the windows;
- each module's factorization is computed by one rank, modules spread over ranks by size
  (:func:`assign_owners`), and the factors are broadcast (:func:`spread_factorization`), so every
  rank swaps in bitwise the same modules and the next block sees the same weights everywhere.

Whole batches are shared out rather than windows, so each batch's float32 Gram matrix is the very
one a single process computes; only the float64 sum over batches runs in another order. The
factors therefore match the single-process ones to float64 rounding of the statistics.

Without ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment and no initialised process group)
every function here is a no-op and the single-process code paths run unchanged. Recovery and
fine-tuning go through ``accelerate`` and the ``Trainer`` instead (see ``recover.py``), so FSDP
and DeepSpeed are a matter of the accelerate configuration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from svdcompress.errors import CalibrationError, ConfigError, SvdCompressError
from svdcompress.linalg import symmetrize_

__all__ = [
    "assign_owners",
    "barrier",
    "broadcast_factors",
    "check_agreement",
    "check_compression_inputs",
    "digest",
    "init_from_env",
    "is_distributed",
    "is_main",
    "launched",
    "local_device",
    "per_rank_batch",
    "rank",
    "reduce_stats",
    "shard_batches",
    "spread_factorization",
    "world_size",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Who we are


def launched() -> bool:
    """True when a launcher such as ``torchrun`` started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment; True when distributed.

    gloo carries CPU tensors; with GPUs present, NCCL carries CUDA tensors and gloo the CPU ones
    (a model compressed on the CPU of a GPU machine still reduces its statistics).
    """
    if not launched():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
        logger.info("rank %d of %d joined the process group (%s)", rank(), world_size(), backend)
    return is_distributed()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """The rank that writes files (all ranks when not distributed)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each rank takes its own GPU: ``cuda`` means ``cuda:LOCAL_RANK``."""
    if launched() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def per_rank_batch(global_batch: int, n_windows: int | None = None) -> int:
    """Windows each rank takes of a global batch: training under torchrun keeps ``batch_size``
    meaning the whole step's batch, so a run's loss curve does not depend on the process count."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if global_batch % world:
        raise ConfigError(
            f"batch size {global_batch} cannot be shared evenly by {world} processes: the global "
            f"batch is split across them, so give a multiple of {world}."
        )
    if n_windows is not None and n_windows < global_batch:
        raise ConfigError(f"{n_windows} training windows cannot fill one batch of {global_batch}.")
    return global_batch // world


# --------------------------------------------------------------------------------------------------
# Refusing ranks that disagree


def digest(value: Any) -> str:
    """A short hash of a JSON-able value or a tensor (its shape, dtype and bytes)."""
    hasher = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        hasher.update(json.dumps(value, sort_keys=True, default=str).encode())
    return hasher.hexdigest()[:16]


def check_agreement(**items: str) -> None:
    """Refuse to compute when the ranks were launched with different settings or inputs.

    ``items`` maps a name (``config``, ``model``, ...) to this rank's short digest of it. All ranks
    exchange theirs; any difference raises the same :class:`ConfigError` on every rank, naming what
    differs and which ranks hold which value, before any collective computation starts.
    """
    if not is_distributed():
        return
    gathered: list[dict[str, str]] = [{} for _ in range(world_size())]
    dist.all_gather_object(gathered, dict(items))
    problems = []
    for key in sorted({k for entry in gathered for k in entry}):
        values = [entry.get(key) for entry in gathered]
        if len(set(values)) > 1:
            by_value: dict[str | None, list[int]] = {}
            for index, value in enumerate(values):
                by_value.setdefault(value, []).append(index)
            held = "; ".join(f"ranks {ranks} have {value}" for value, ranks in by_value.items())
            problems.append(f"{key} ({held})")
    if problems:
        raise ConfigError(
            f"the {world_size()} ranks disagree on " + ", ".join(problems)
            + ". Launch every rank with the same command, model and data."
        )


def check_compression_inputs(model: torch.nn.Module, config, calibration) -> None:
    """``compress_``'s agreement check: settings, weights, calibration windows and versions."""
    if not is_distributed():
        return
    import transformers

    from svdcompress import __version__
    from svdcompress.analysis import model_fingerprint  # lazy: analysis imports half the package

    check_agreement(
        config=digest(config.to_dict()),
        model=model_fingerprint(model),
        calibration="none" if calibration is None else digest(calibration.windows),
        versions=f"svdcompress {__version__}, torch {torch.__version__}, "
                 f"transformers {transformers.__version__}",
    )


# --------------------------------------------------------------------------------------------------
# Data-parallel calibration


def shard_batches(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's share of the calibration batches: a contiguous run, sizes differing by at most 1."""
    if not is_distributed():
        return batches
    world = world_size()
    if len(batches) < world:
        raise CalibrationError(
            f"{len(batches)} calibration batches cannot be shared by {world} ranks: give at least "
            f"{world} batches (more windows, or a smaller calibration batch size)."
        )
    base, extra = divmod(len(batches), world)
    start = rank() * base + min(rank(), extra)
    return batches[start:start + base + (rank() < extra)]


def reduce_stats(stats: dict) -> None:
    """Sum every rank's statistics in place (``stats``: name -> ``ModuleStats``), in name order."""
    if not is_distributed():
        return
    reduced: set[int] = set()  # targets fed the same input share one Gram tensor: reduce it once
    for name in sorted(stats):
        entry = stats[name]
        for field in ("gram", "abs_sum", "cross", "original_gram"):
            tensor = getattr(entry, field)
            # The same fields are set on every rank: same code, same config.
            if tensor is not None and id(tensor) not in reduced:
                reduced.add(id(tensor))
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        # Beyond two ranks, (i, j) and (j, i) may be summed in different orders.
        symmetrize_(entry.gram)
        count = torch.tensor([entry.n_tokens], dtype=torch.float64, device=entry.gram.device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        entry.n_tokens = int(count.item())


# --------------------------------------------------------------------------------------------------
# One owner per module


def assign_owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Greedy longest-first: each module, largest first, goes to the least-loaded rank.

    ``sizes`` estimates each module's cost (out·in). The result depends only on ``sizes`` and
    ``world``, so every rank computes the same assignment without communicating.
    """
    load = [0] * world
    owners: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[name] = owner
        load[owner] += sizes[name]
    return owners


def broadcast_factors(result: tuple | None, src: int) -> tuple:
    """Send the owner's ``(Factors, RefineResult | None)`` to every rank; returns it everywhere.

    Tensors travel through ``dist.broadcast`` (bitwise, in their own dtype); the small rest
    (shapes, notes, refinement numbers) through ``broadcast_object_list``. When the owner's
    factorization failed (``result`` is the error), every rank raises that error.
    """
    from dataclasses import replace

    from svdcompress.linalg import Factors

    if rank() == src and isinstance(result, SvdCompressError):
        box = [{"error": result}]  # every rank raises the owner's error instead of waiting for it
        dist.broadcast_object_list(box, src=src)
        raise result
    if rank() == src:
        factors, refined = result
        meta = {
            "shapes": [tuple(factors.left.shape), tuple(factors.right.shape)],
            "dtypes": [factors.left.dtype, factors.right.dtype],
            "device": str(factors.left.device),
            "notes": factors.notes,
            "refined": None if refined is None else replace(refined, factors=None),
        }
        tensors = [factors.left.contiguous(), factors.right.contiguous()]
    box = [meta if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    meta = box[0]
    if "error" in meta:
        raise meta["error"]
    if rank() != src:
        device = torch.device(meta["device"])
        if device.type == "cuda":  # the owner's GPU index is not ours
            device = torch.device("cuda", torch.cuda.current_device())
        tensors = [torch.empty(shape, dtype=dtype, device=device)
                   for shape, dtype in zip(meta["shapes"], meta["dtypes"], strict=True)]
    for tensor in tensors:
        dist.broadcast(tensor, src=src)
    factors = Factors(tensors[0], tensors[1], tuple(meta["notes"]))
    refined = None if meta["refined"] is None else replace(meta["refined"], factors=factors)
    return factors, refined


def spread_factorization(
    names: Iterable[str],
    factorize: Callable[[str], tuple],
    install: Callable[[str, Any, Any], None],
    sizes: dict[str, int],
) -> None:
    """``install(name, *factorize(name))`` for each name, in order; the factorizations spread.

    Single process: one module at a time, exactly as before. Distributed: each rank factorizes the
    modules it owns (:func:`assign_owners`), then every module's factors are broadcast from its
    owner and installed on every rank in the given order.
    """
    names = list(names)
    if not is_distributed():
        for name in names:
            install(name, *factorize(name))
        return
    owners = assign_owners({name: sizes[name] for name in names}, world_size())
    mine = {}
    for name in names:
        if owners[name] == rank():
            try:
                mine[name] = factorize(name)
            except SvdCompressError as err:  # raised on every rank when this module's turn comes
                mine[name] = err
    for name in names:
        install(name, *broadcast_factors(mine.pop(name, None), src=owners[name]))
