"""Per-module ranks under a global budget, chosen from measured sensitivity.

Each targeted module picks one option — a rank on a grid, or staying dense — with a cost
(parameters or bytes) and a predicted loss (the analysis' KL with that module alone at that rank).
Minimising the summed predicted loss under a summed-cost budget is a multiple-choice knapsack; it is
solved exactly by dynamic programming over the cost counted in units of the greatest common divisor
of the options' cost differences (for SmolLM2's parameter counts, 1536), coarsened with costs
rounded *up* only if that would need too many states. So the budget is never exceeded and a bigger
budget never predicts a higher loss.

Why measured loss and not a proxy alone: weighting every module's whitened tail energy alike barely
beat uniform ranks on held-out text and cut the first and last blocks hardest, because it cannot
know how much each module's error matters to the output. The KL does.

The result is an ordinary config — ``rank_pattern`` (one anchored regex per module) plus ``exclude``
for modules left dense — that ``compress_`` consumes unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from svdcompress.analysis import Analysis, ModuleAnalysis, analyze
from svdcompress.calibration import Calibration
from svdcompress.config import CompressionConfig
from svdcompress.errors import ConfigError
from svdcompress.fetch import atomic_write_json
from svdcompress.linalg import break_even_rank, factored_params, rank_for_param_ratio
from svdcompress.provenance import provenance

if TYPE_CHECKING:
    from svdcompress.int8_analysis import Int8Sensitivity, ModuleInt8

__all__ = [
    "Allocation",
    "CostModel",
    "SpeedCaps",
    "allocate",
    "allocate_config",
    "predicted_curve",
    "uniform_ranks",
]

logger = logging.getLogger(__name__)

_MAX_STATES = 400_000  # DP cost states; beyond this the cost unit is coarsened (costs rounded up)


@dataclass(frozen=True)
class CostModel:
    """What one module costs, in ``unit``s. The default counts parameters (weights + bias).

    Bytes: ``dense_bytes`` per number of a dense weight or bias, ``factored_bytes`` per number of a
    factor, plus ``row_scale_bytes`` per row of each factor (int8 factors carry a float32 scale per
    row: ``out + rank`` of them), plus ``index_bytes`` per input column for ``pivoted`` storage
    (its int64 column permutation).

    ``storage``: how a factored module is held, ``factored`` (r·(out + in) numbers) or ``pivoted``
    (r·(out + in − r), the same product; see :func:`svdcompress.linalg.pivot_factors`).
    """

    dense_bytes: int = 1
    factored_bytes: int = 1
    row_scale_bytes: int = 0
    unit: str = "params"
    storage: str = "factored"
    index_bytes: int = 0

    def __post_init__(self) -> None:
        if self.storage not in ("factored", "pivoted"):
            raise ConfigError(f"allocation trades parameters of factored modules; storage="
                              f"{self.storage!r} is not one: use 'factored' or 'pivoted'.")

    @classmethod
    def for_bytes(cls, dtype: torch.dtype = torch.float32, quant_bits: int | None = None,
                  storage: str = "factored") -> CostModel:
        item = dtype.itemsize
        index = torch.int64.itemsize if storage == "pivoted" else 0
        if quant_bits is None:
            return cls(item, item, 0, "bytes", storage, index)
        return cls(item, math.ceil(quant_bits / 8), 4, "bytes", storage, index)

    def dense(self, module: ModuleAnalysis) -> int:
        return module.dense_params * self.dense_bytes

    def dense_int8(self, module: ModuleAnalysis) -> int:
        """Bytes of the weight as per-row INT8 codes + a float32 scale per row; the bias stays."""
        m, n = module.out_features, module.in_features
        return m * n + 4 * m + module.bias * self.dense_bytes

    def factored(self, module: ModuleAnalysis, rank: int) -> int:
        m, n = module.out_features, module.in_features
        numbers = factored_params(m, n, rank, self.storage)
        return (numbers * self.factored_bytes + (m + rank) * self.row_scale_bytes
                + n * self.index_bytes + module.bias * self.dense_bytes)


@dataclass
class Allocation:
    ranks: dict[str, int | None]  # module name -> rank; None: left dense
    cost_before: int  # every targeted module dense
    cost_after: int
    budget: int
    unit: str  # "params" or "bytes"
    predicted_kl: float  # sum of one-at-a-time predicted KLs (nats/token)
    settings: dict[str, Any] = field(default_factory=dict)
    # With INT8 options: module -> 8 where its factors (or, if dense, its weight) are INT8.
    bits: dict[str, int | None] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.cost_after / max(self.cost_before, 1)

    @property
    def dense(self) -> list[str]:
        return [name for name, rank in self.ranks.items() if rank is None]

    def to_config(self, base: CompressionConfig) -> CompressionConfig:
        """``base`` with these ranks as ``rank_pattern`` and the dense modules added to ``exclude``."""
        if base.rank_pattern:
            raise ConfigError("allocation chooses every rank itself; drop rank_pattern from the config.")
        pattern: dict[str, int | float] = {
            f"^{re.escape(name)}$": rank for name, rank in self.ranks.items() if rank is not None
        }
        dense_int8 = [f"^{re.escape(name)}$" for name in self.dense if self.bits.get(name)]
        if not pattern and not dense_int8:
            raise ConfigError(
                f"the budget ({self.budget:,} {self.unit}) keeps every module dense: nothing to "
                "compress. Lower the budget."
            )
        quant = {f"^{re.escape(name)}$": self.bits.get(name) for name, rank in self.ranks.items()
                 if self.bits and rank is not None and self.bits.get(name) != base.quant_bits}
        return base.replace(rank_pattern=pattern,
                            exclude=(*base.exclude, *(n for n in self.dense if not self.bits.get(n))),
                            quant_pattern={**base.quant_pattern, **quant},
                            dense_int8=(*base.dense_int8, *dense_int8))

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "budget": self.budget, "cost_before": self.cost_before,
                "cost_after": self.cost_after, "ratio": round(self.ratio, 6),
                "predicted_kl": self.predicted_kl, "dense": self.dense, "ranks": self.ranks,
                "settings": self.settings, **({"bits": self.bits} if self.bits else {})}


_CAPS_STORAGE = ("the speed caps in {source} were measured for {measured} storage, and storage={storage!r} "
                 "has other kernels: measure its own with `python experiments/kernel_bench.py "
                 "--break-even --break-even-storage {storage}`, or use --storage {measured}.")


@dataclass(frozen=True)
class SpeedCaps:
    """Measured speed break-even ranks per matrix shape (``experiments/kernel_bench.py
    --break-even``): above its cap a factored layer of that shape decodes slower than the dense
    one, so an allocation that should also be fast offers no rank above it. The parameter
    break-even (r·(m+n) = m·n) is higher: float factors stop paying at about 0.8 of it on our CPU.

    ``float_ranks`` / ``int8_ranks``: (out, in) -> the largest rank such that every rank up to it
    was faster than dense, at every thread count the file measured. ``storage``: the storage the
    file measured (``factored``, or ``pivoted`` with ``--break-even-storage pivoted``); caps apply
    to that storage only.
    """

    float_ranks: dict[tuple[int, int], int]
    int8_ranks: dict[tuple[int, int], int]
    source: str = ""
    storage: str = "factored"

    def check_storage(self, storage: str) -> None:
        if storage != self.storage:
            raise ConfigError(_CAPS_STORAGE.format(source=self.source or "the file", measured=self.storage,
                                                   storage=storage))

    @classmethod
    def load(cls, path: str | Path) -> SpeedCaps:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            rows, storage = data["rows"], data.get("storage", "factored")  # files before pivoted: factored
            measured = [(tuple(r["shape"]), r["break_even_float"], r["break_even_int8"]) for r in rows]
        except FileNotFoundError:
            raise ConfigError(f"speed caps: no file {path}; measure one with `python "
                              "experiments/kernel_bench.py --break-even`.") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"speed caps: {path} is not a break-even file ({err!r}); it is "
                              "experiments/results/speed/break_even.json's format, written by "
                              "`python experiments/kernel_bench.py --break-even`.") from None
        float_ranks: dict[tuple[int, int], int] = {}
        int8_ranks: dict[tuple[int, int], int] = {}
        for shape, float_rank, int8_rank in measured:  # the lowest over thread counts holds at all
            float_ranks[shape] = min(float_ranks.get(shape, float_rank), float_rank)
            int8_ranks[shape] = min(int8_ranks.get(shape, int8_rank), int8_rank)
        return cls(float_ranks, int8_ranks, str(path), storage)

    def cap(self, module: ModuleAnalysis, int8: bool) -> int | None:
        """The rank cap of ``module``'s shape; None where the file did not measure it."""
        return (self.int8_ranks if int8 else self.float_ranks).get((module.out_features, module.in_features))


# --------------------------------------------------------------------------------------------------
# Options and the knapsack


@dataclass
class _Options:
    ranks: list[int | None]
    costs: np.ndarray  # (k,) int64
    losses: np.ndarray  # (k,) float64
    bits: list[int | None] = field(default_factory=list)  # with INT8 options: 8 or None each


def _options(module: ModuleAnalysis, cost: CostModel, min_rank: int, rank_step: int,
             allow_dense: bool, cap: int | None = None) -> _Options:
    # Factored ranks stop at the break-even rank of the storage: compress_ refuses anything above it.
    top = break_even_rank(module.out_features, module.in_features, cost.storage)
    grid = sorted({min_rank, *range(rank_step * math.ceil(min_rank / rank_step), top + 1, rank_step)})
    ranks: list[int | None] = [r for r in grid if min_rank <= r <= top and (cap is None or r <= cap)]
    if allow_dense or not ranks:
        ranks.append(None)
    costs = [cost.dense(module) if r is None else cost.factored(module, r) for r in ranks]
    losses = [module.predicted_kl(r) for r in ranks]
    return _Options(ranks, np.asarray(costs, dtype=np.int64), np.asarray(losses, dtype=np.float64))


def _with_int8(opt: _Options, module: ModuleAnalysis, cost: CostModel, int8: ModuleInt8,
               allow_dense: bool, caps: SpeedCaps | None = None) -> _Options:
    """``opt``'s ranks as float and as INT8 factors (each up to its speed cap, if ``caps``), plus
    the module dense as INT8 (always: it is compressed) and dense float (if ``allow_dense``); each
    priced by ``cost``'s dtype."""
    ranks = [r for r in opt.ranks if r is not None]
    float_cap, int8_cap = (None, None) if caps is None else (caps.cap(module, False), caps.cap(module, True))
    float_cost = dataclasses.replace(cost, factored_bytes=cost.dense_bytes, row_scale_bytes=0)
    int8_cost = dataclasses.replace(cost, factored_bytes=1, row_scale_bytes=4)
    choices = [(r, None, float_cost.factored(module, r), module.predicted_kl(r))
               for r in ranks if float_cap is None or r <= float_cap]
    choices += [(r, 8, int8_cost.factored(module, r), int8.predicted_kl(module, r))
                for r in ranks if int8_cap is None or r <= int8_cap]
    choices.append((None, 8, cost.dense_int8(module), int8.predicted_kl(module, None)))
    if allow_dense:
        choices.append((None, None, cost.dense(module), 0.0))
    kept, bits, costs, losses = zip(*choices, strict=True)
    return _Options(list(kept), np.asarray(costs, dtype=np.int64),
                    np.asarray(losses, dtype=np.float64), list(bits))


def _cost_unit(options: list[_Options]) -> int:
    """GCD of every option's extra cost over its module's cheapest; coarser if too many states."""
    deltas = [int(d) for o in options for d in (o.costs - o.costs.min()) if d > 0]
    unit = math.gcd(*deltas) if deltas else 1
    span = sum(int(o.costs.max() - o.costs.min()) for o in options)
    return max(unit, math.ceil(span / _MAX_STATES))


def _knapsack(options: list[_Options], budget_units: int, unit: int) -> list[int]:
    """Index of the chosen option per module minimising Σ loss with Σ extra cost ≤ budget_units."""
    best = np.zeros(budget_units + 1)  # best[c]: least loss of the modules so far with cost ≤ c
    choices = []
    for opt in options:
        extra = np.ceil((opt.costs - opt.costs.min()) / unit).astype(np.int64)
        new = np.full(budget_units + 1, np.inf)
        choice = np.zeros(budget_units + 1, dtype=np.int16)
        for j in np.argsort(opt.losses, kind="stable"):  # deterministic tie-breaking
            if extra[j] > budget_units:
                continue
            candidate = best[: budget_units + 1 - extra[j]] + opt.losses[j]
            better = candidate < new[extra[j]:]
            new[extra[j]:][better] = candidate[better]
            choice[extra[j]:][better] = j
        best = new
        choices.append((choice, extra))
    picked, c = [], budget_units
    for choice, extra in reversed(choices):
        j = int(choice[c])
        picked.append(j)
        c -= int(extra[j])
    return picked[::-1]


def _budget(analysis: Analysis, cost: CostModel, param_ratio: float | None,
            byte_budget: int | None) -> int:
    if (param_ratio is None) == (byte_budget is None):
        raise ConfigError("give exactly one budget: param_ratio (of the targeted parameters) or bytes.")
    if param_ratio is not None:
        if not 0.0 < param_ratio <= 1.0:
            raise ConfigError(f"param_ratio={param_ratio} is outside (0, 1].")
        if cost.unit != "params":
            raise ConfigError("param_ratio counts parameters; use the default cost model with it.")
        return math.floor(param_ratio * sum(cost.dense(m) for m in analysis.modules))
    if byte_budget <= 0:
        raise ConfigError(f"byte budget {byte_budget} must be positive.")
    return int(byte_budget)


def _unreachable(minimum: int, budget: int, before: int, unit: str, min_rank: int) -> ConfigError:
    return ConfigError(
        f"the budget of {budget:,} {unit} ({budget / before:.3f} of the targeted modules' "
        f"{before:,}) cannot be met: even with every module at the minimum rank {min_rank} they "
        f"need {minimum:,} ({minimum / before:.3f}). Raise the budget or lower min_rank."
    )


def allocate(
    analysis: Analysis,
    *,
    param_ratio: float | None = None,
    byte_budget: int | None = None,
    cost: CostModel | None = None,
    min_rank: int = 8,
    rank_step: int = 8,
    allow_dense: bool = True,
    storage: str = "factored",
    int8: Int8Sensitivity | None = None,
    speed_caps: SpeedCaps | None = None,
    int8_factors: bool = False,
) -> Allocation:
    """Ranks minimising the predicted KL with total cost ≤ the budget.

    ``param_ratio``: kept / before over the targeted modules' parameters (weights and biases, as
    in ``CompressionReport.target_param_ratio``); or ``byte_budget`` with a byte ``cost`` model.
    Ranks are multiples of ``rank_step`` (plus ``min_rank``) up to each matrix's break-even rank;
    ``allow_dense`` lets a module stay uncompressed. ``storage`` (``factored`` or ``pivoted``)
    prices the ranks; a ``cost`` model given must have the same. The analysis serves both: the
    same rank gives the same product, so the same predicted KL.

    ``int8`` (:func:`svdcompress.int8_analysis.int8_sensitivity`, bytes budgets only, factored storage)
    adds per module: INT8 factors at every rank, and dense INT8; the result's ``bits`` says which.

    ``speed_caps`` (measured for ``storage``): no rank above the measured speed break-even of its shape —
    the INT8 one for INT8 factors (``int8`` options, or ``int8_factors`` when every factor will
    be INT8), the float one otherwise — so every factored module is faster than dense.
    """
    if min_rank < 1 or rank_step < 1:
        raise ConfigError(f"min_rank={min_rank} and rank_step={rank_step} must be ≥ 1.")
    if cost is not None and cost.storage != storage:
        raise ConfigError(f"the cost model prices storage={cost.storage!r} but storage={storage!r} "
                          "was asked; give one of them.")
    cost = cost or (CostModel(storage=storage) if byte_budget is None
                    else CostModel.for_bytes(storage=storage))
    budget = _budget(analysis, cost, param_ratio, byte_budget)
    if speed_caps is not None:
        speed_caps.check_storage(storage)

    def cap(module: ModuleAnalysis) -> int | None:
        return None if speed_caps is None or int8 is not None else speed_caps.cap(module, int8_factors)

    options = [_options(m, cost, min_rank, rank_step, allow_dense, cap(m)) for m in analysis.modules]
    if int8 is not None:
        if cost.unit != "bytes" or cost.storage != "factored":
            raise ConfigError("INT8 options are priced in bytes of factored storage; give a "
                              "byte_budget and storage='factored' with int8.")
        options = [_with_int8(o, m, cost, int8.modules[m.name], allow_dense, speed_caps)
                   for o, m in zip(options, analysis.modules, strict=True)]
    before = sum(cost.dense(m) for m in analysis.modules)
    minimum = sum(int(o.costs.min()) for o in options)
    if minimum > budget:
        raise _unreachable(minimum, budget, before, cost.unit, min_rank)
    unit = _cost_unit(options)
    picked = _knapsack(options, (budget - minimum) // unit, unit)
    ranks = {m.name: o.ranks[j] for m, o, j in zip(analysis.modules, options, picked, strict=True)}
    after = sum(int(o.costs[j]) for o, j in zip(options, picked, strict=True))
    settings = {"param_ratio": param_ratio, "byte_budget": byte_budget, "min_rank": min_rank,
                "rank_step": rank_step, "allow_dense": allow_dense, "storage": storage, "cost_unit": unit,
                "fingerprint": analysis.fingerprint,
                **({"speed_caps": speed_caps.source} if speed_caps is not None else {})}
    if int8 is None:
        return Allocation(ranks, before, after, budget, cost.unit, analysis.predicted_kl(ranks), settings)
    bits = {m.name: o.bits[j] for m, o, j in zip(analysis.modules, options, picked, strict=True)}
    predicted = float(sum(o.losses[j] for o, j in zip(options, picked, strict=True)))
    return Allocation(ranks, before, after, budget, cost.unit, predicted, {**settings, "int8": True}, bits)


def uniform_ranks(analysis: Analysis, param_ratio: float,
                  storage: str = "factored") -> dict[str, int | None]:
    """The ranks ``compress_`` gives every module for a plain ``param_ratio`` (for comparison)."""
    return {m.name: rank_for_param_ratio(m.out_features, m.in_features, param_ratio, storage)
            for m in analysis.modules}


def predicted_curve(analysis: Analysis, ratios: Sequence[float], **allocate_options: Any) -> list[dict]:
    """Predicted KL of allocated vs uniform ranks at each parameter ratio (no model runs)."""
    rows = []
    for ratio in ratios:
        allocation = allocate(analysis, param_ratio=ratio, **allocate_options)
        uniform = uniform_ranks(analysis, ratio, allocate_options.get("storage", "factored"))
        rows.append({"param_ratio": ratio, "allocated_kl": allocation.predicted_kl,
                     "uniform_kl": analysis.predicted_kl(uniform),
                     "allocated_ratio": allocation.ratio, "dense_modules": len(allocation.dense)})
    return rows


# --------------------------------------------------------------------------------------------------
# The compress --allocate path


def _cost_for(model: nn.Module, config: CompressionConfig, byte_budget: int | None) -> CostModel:
    if byte_budget is None:
        return CostModel(storage=config.storage)
    dtype = next(model.parameters()).dtype
    return CostModel.for_bytes(dtype, getattr(config, "quant_bits", None), config.storage)


def allocate_config(
    model: nn.Module,
    base_config: CompressionConfig,
    calibration: Calibration | torch.Tensor,
    *,
    analysis_dir: str | Path | None = None,
    byte_budget: int | None = None,
    min_rank: int = 8,
    rank_step: int = 8,
    allow_dense: bool = True,
    int8_options: bool = False,
    speed_caps: str | Path | SpeedCaps | None = None,
    **analysis_options: Any,
) -> CompressionConfig:
    """Analyse ``model`` (or reuse the cache in ``analysis_dir``) and return ``base_config`` with
    per-module ranks meeting its ``param_ratio`` (or ``byte_budget``) as a global budget.

    Call it on the uncompressed model, then ``compress_(model, returned_config, calibration)``.
    The sensitivity is measured with whitened truncation whatever ``base_config.method`` is.
    ``int8_options`` (with ``byte_budget``): each module may also be dense INT8 or hold INT8
    factors, priced and predicted from :func:`svdcompress.int8_analysis.int8_sensitivity` (cached in
    ``analysis_dir`` too). ``speed_caps`` (a break-even file or :class:`SpeedCaps` measured for the config's
    storage): no rank above the measured speed break-even of its shape (see :func:`allocate`).
    """
    if int8_options and byte_budget is None:
        raise ConfigError("INT8 options trade bytes: give a byte budget with them.")
    if base_config.storage not in ("factored", "pivoted"):
        raise ConfigError("allocation trades parameters; it needs storage='factored' or 'pivoted'.")
    if byte_budget is None and base_config.param_ratio is None:
        raise ConfigError("allocation needs a global budget: param_ratio or a byte budget.")
    if speed_caps is not None and not isinstance(speed_caps, SpeedCaps):
        speed_caps = SpeedCaps.load(speed_caps)  # before the analysis: a bad file fails at once
    if speed_caps is not None:
        speed_caps.check_storage(base_config.storage)
    analysis = analyze(model, calibration, analysis_dir, targets=base_config.targets,
                       exclude=base_config.exclude, **analysis_options)
    int8 = None
    if int8_options:
        from svdcompress.int8_analysis import int8_sensitivity  # lazy: it imports analysis

        int8 = int8_sensitivity(model, calibration, analysis, analysis_dir, min_rank=min_rank)
    allocation = allocate(
        analysis, param_ratio=None if byte_budget is not None else base_config.param_ratio,
        byte_budget=byte_budget, cost=_cost_for(model, base_config, byte_budget),
        min_rank=min_rank, rank_step=rank_step, allow_dense=allow_dense, storage=base_config.storage,
        int8=int8, speed_caps=speed_caps, int8_factors=getattr(base_config, "quant_bits", None) == 8,
    )
    config = allocation.to_config(base_config)
    if analysis_dir is not None:  # the same recipe `analyze` writes: `compress --recipe` reads it
        tag = f"p{base_config.param_ratio:.2f}" if byte_budget is None else f"b{byte_budget}"
        tag += "-pivoted" if base_config.storage == "pivoted" else ""
        tag += "-int8" if int8_options else ""
        tag += "-speedcaps" if speed_caps is not None else ""
        # Provenance: such a recipe can be a published result (experiments/results/allocation/).
        atomic_write_json(Path(analysis_dir) / f"allocation-{tag}.json",
                          {**config.to_dict(), "provenance": provenance()})
    logger.info("allocated %d modules (%d left dense): %.4f of %s, predicted KL %.4g",
                len(allocation.ranks), len(allocation.dense), allocation.ratio, allocation.unit,
                allocation.predicted_kl)
    return config
