"""Rank allocation under a budget: exact knapsack, budget met, monotone, dense option, errors."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import svdcompress as sc
from svdcompress.allocation import (
    CostModel,
    SpeedCaps,
    allocate,
    allocate_config,
    predicted_curve,
    uniform_ranks,
)
from svdcompress.analysis import Analysis, Measurement, ModuleAnalysis, probe_ranks
from svdcompress.errors import ConfigError
from svdcompress.linalg import break_even_rank

SHAPES = [(48, 32), (16, 32), (64, 32), (32, 64)]  # (out, in), like q, k, up, down


def _module(index: int, out: int, inp: int, gain: float, decay: float) -> ModuleAnalysis:
    full = min(out, inp)
    whitened = [math.exp(-decay * i) for i in range(full)]
    m = ModuleAnalysis(f"layers.{index // 4}.m{index % 4}", index // 4, None, out, inp, 0,
                       singular_values=whitened, whitened_values=whitened)
    m.measurements = [Measurement(r, m.tail_energy(r), gain * m.tail_energy(r) ** 1.3, 0.0)
                      for r in probe_ranks(out, inp, (0.7, 0.35))]
    return m


def synthetic_analysis(n_modules: int = 12, seed: int = 0, sensitive: int | None = None) -> Analysis:
    """Modules with varied spectra and gains; ``sensitive`` gets a gain 10⁴ times the others'."""
    rng = np.random.default_rng(seed)
    modules = []
    for i in range(n_modules):
        out, inp = SHAPES[i % len(SHAPES)]
        gain = 1e4 if i == sensitive else float(rng.uniform(0.01, 1.0))
        modules.append(_module(i, out, inp, gain, float(rng.uniform(0.02, 0.2))))
    return Analysis("synthetic", {}, modules)


def _cost(analysis: Analysis, ranks: dict) -> int:
    return sum(m.dense_params if ranks[m.name] is None else m.factored_params(ranks[m.name])
               for m in analysis.modules)


@pytest.mark.parametrize("ratio", [0.3, 0.55, 0.8, 0.95, 1.0])
def test_budget_met_exactly_or_under(ratio):
    analysis = synthetic_analysis()
    allocation = allocate(analysis, param_ratio=ratio, min_rank=1, rank_step=1)
    before = sum(m.dense_params for m in analysis.modules)
    assert allocation.cost_after == _cost(analysis, allocation.ranks) <= math.floor(ratio * before)
    # The cost unit here is the gcd of the (out + in) sizes, so at most one unit is left unspent.
    assert allocation.budget - allocation.cost_after < 96
    assert allocation.cost_before == before


def test_bigger_budget_never_predicts_more_loss():
    analysis = synthetic_analysis(seed=1)
    losses = [allocate(analysis, param_ratio=r, min_rank=2, rank_step=2).predicted_kl
              for r in np.linspace(0.25, 1.0, 31)]
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(losses))
    assert losses[-1] == 0.0  # everything fits dense


def test_optimal_against_brute_force():
    analysis = synthetic_analysis(n_modules=3, seed=2)
    allocation = allocate(analysis, param_ratio=0.6, min_rank=4, rank_step=4)
    options = []
    for m in analysis.modules:
        ranks = [*range(4, break_even_rank(m.out_features, m.in_features) + 1, 4), None]
        options.append([(r, m.dense_params if r is None else m.factored_params(r), m.predicted_kl(r))
                        for r in ranks])
    best = min(sum(o[2] for o in combo) for combo in itertools.product(*options)
               if sum(o[1] for o in combo) <= allocation.budget)
    assert allocation.predicted_kl == pytest.approx(best, rel=1e-12)


def test_beats_uniform_ranks_on_predicted_loss():
    analysis = synthetic_analysis(seed=3)
    for ratio in (0.5, 0.8):
        allocation = allocate(analysis, param_ratio=ratio, min_rank=1, rank_step=1)
        assert allocation.predicted_kl <= analysis.predicted_kl(uniform_ranks(analysis, ratio))


def test_ranks_respect_min_rank_step_and_break_even():
    analysis = synthetic_analysis(seed=4)
    allocation = allocate(analysis, param_ratio=0.5, min_rank=3, rank_step=4, allow_dense=False)
    for m in analysis.modules:
        rank = allocation.ranks[m.name]
        assert rank is not None and 3 <= rank <= break_even_rank(m.out_features, m.in_features)
        assert rank == 3 or rank % 4 == 0


def test_sensitive_module_left_dense():
    analysis = synthetic_analysis(sensitive=5)
    allocation = allocate(analysis, param_ratio=0.7, min_rank=2, rank_step=2)
    assert allocation.ranks[analysis.modules[5].name] is None
    assert analysis.modules[5].name in allocation.dense
    strict = allocate(analysis, param_ratio=0.7, min_rank=2, rank_step=2, allow_dense=False)
    assert not strict.dense


def test_unreachable_budget_is_a_clear_error():
    analysis = synthetic_analysis()
    with pytest.raises(ConfigError, match=r"cannot be met.*minimum rank 8"):
        allocate(analysis, param_ratio=0.05, min_rank=8)
    with pytest.raises(ConfigError, match="exactly one budget"):
        allocate(analysis)


def test_byte_budget_with_int8_factors():
    analysis = synthetic_analysis(seed=5)
    cost = CostModel.for_bytes(torch.float32, quant_bits=8)
    before = sum(cost.dense(m) for m in analysis.modules)
    allocation = allocate(analysis, byte_budget=before // 4, cost=cost, min_rank=1, rank_step=1)
    assert allocation.unit == "bytes" and allocation.cost_after <= before // 4
    spent = sum(cost.dense(m) if allocation.ranks[m.name] is None else
                cost.factored(m, allocation.ranks[m.name]) for m in analysis.modules)
    assert spent == allocation.cost_after


def _break_even_file(tmp_path, rows, storage=None) -> str:
    path = tmp_path / f"break_even_{storage}.json"
    path.write_text(json.dumps({**({"storage": storage} if storage else {}),  # older files: no storage
                                "rows": [{"shape": list(shape), "threads": threads, "break_even_float": f,
                                          "break_even_int8": q} for shape, threads, f, q in rows]}))
    return str(path)


def test_speed_caps_bound_every_factored_rank_at_the_slowest_thread_count(tmp_path):
    # (64, 32) and (48, 32) capped; (16, 32) and (32, 64) not measured, so not capped.
    caps = SpeedCaps.load(_break_even_file(tmp_path, [((64, 32), 1, 12, 16), ((64, 32), 2, 8, 12),
                                                      ((48, 32), 1, 6, 9)]))
    assert caps.float_ranks == {(64, 32): 8, (48, 32): 6} and caps.int8_ranks == {(64, 32): 12, (48, 32): 9}
    analysis = synthetic_analysis(seed=6)
    free = allocate(analysis, param_ratio=0.6, min_rank=2, rank_step=2)
    capped = allocate(analysis, param_ratio=0.6, min_rank=2, rank_step=2, speed_caps=caps)
    quantized = allocate(analysis, param_ratio=0.6, min_rank=2, rank_step=2, speed_caps=caps, int8_factors=True)
    assert capped.settings["speed_caps"] == caps.source
    for m in analysis.modules:
        shape = (m.out_features, m.in_features)
        for allocation, limits in ((capped, caps.float_ranks), (quantized, caps.int8_ranks)):
            rank = allocation.ranks[m.name]
            assert rank is None or rank <= limits.get(shape, break_even_rank(*shape))
    assert any((r or 0) > caps.float_ranks[(64, 32)] for n, r in free.ranks.items() if ".m2" in n)  # it bound
    assert capped.predicted_kl >= free.predicted_kl and quantized.predicted_kl <= capped.predicted_kl


def test_speed_caps_apply_to_the_storage_they_were_measured_for_and_a_known_file(tmp_path):
    analysis = synthetic_analysis(seed=6)
    caps = SpeedCaps.load(_break_even_file(tmp_path, [((48, 32), 1, 12, 20)]))  # a file from before: factored
    assert caps.storage == "factored"
    with pytest.raises(ConfigError, match=r"measured for factored storage.*--break-even-storage pivoted"):
        allocate(analysis, param_ratio=0.8, storage="pivoted", speed_caps=caps)
    pivoted = SpeedCaps.load(_break_even_file(tmp_path, [((64, 32), 1, 10, 14)], storage="pivoted"))
    with pytest.raises(ConfigError, match="measured for pivoted storage"):
        allocate(analysis, param_ratio=0.8, speed_caps=pivoted)
    free = allocate(analysis, param_ratio=0.6, min_rank=2, rank_step=2, storage="pivoted")
    capped = allocate(analysis, param_ratio=0.6, min_rank=2, rank_step=2, storage="pivoted", speed_caps=pivoted)
    sixty_four = [n for n in analysis.modules if (n.out_features, n.in_features) == (64, 32)]
    assert any((free.ranks[m.name] or 0) > 10 for m in sixty_four)  # the cap binds where it was measured
    assert all(capped.ranks[m.name] is None or capped.ranks[m.name] <= 10 for m in sixty_four)
    with pytest.raises(ConfigError, match=r"no file .*kernel_bench\.py --break-even"):
        SpeedCaps.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": [{"shape": [4, 4]}]}))
    with pytest.raises(ConfigError, match="not a break-even file"):
        SpeedCaps.load(tmp_path / "other.json")


def test_predicted_curve_rows():
    rows = predicted_curve(synthetic_analysis(), [0.5, 0.9], min_rank=1, rank_step=1)
    assert [r["param_ratio"] for r in rows] == [0.5, 0.9]
    assert all(r["allocated_kl"] <= r["uniform_kl"] for r in rows)


def test_config_rejects_rank_pattern_and_all_dense():
    analysis = synthetic_analysis()
    allocation = allocate(analysis, param_ratio=0.8, min_rank=1, rank_step=1)
    with pytest.raises(ConfigError, match="rank_pattern"):
        allocation.to_config(sc.WhitenConfig(param_ratio=0.8, rank_pattern={"m0": 4}))
    everything_dense = allocate(analysis, param_ratio=1.0)
    with pytest.raises(ConfigError, match="every module dense"):
        everything_dense.to_config(sc.WhitenConfig(param_ratio=0.8))


def test_allocate_config_compresses_to_budget(tiny_llama, tiny_windows, tmp_path):
    original = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    base = sc.WhitenConfig(param_ratio=0.6)
    config = allocate_config(tiny_llama, base, tiny_windows, analysis_dir=tmp_path, min_rank=2,
                             rank_step=2, probe_samples=2, probe_len=16)
    assert all(torch.equal(v, original[k]) for k, v in tiny_llama.state_dict().items())
    targeted = sum(m.weight.numel() for m in tiny_llama.modules()
                   if isinstance(m, nn.Linear) and m is not tiny_llama.lm_head)
    params_before = sum(p.numel() for p in tiny_llama.parameters())
    report = sc.compress_(tiny_llama, config, tiny_windows)
    saved = params_before - report.model_params_after
    assert saved >= math.ceil(0.4 * targeted) - 1  # kept ≤ 0.6 of the targeted parameters
    for pattern, rank in config.rank_pattern.items():
        name = re.sub(r"\\(.)", r"\1", pattern.strip("^$"))
        assert tiny_llama.get_submodule(name).rank == rank
    for name in config.exclude:
        assert isinstance(tiny_llama.get_submodule(name), nn.Linear)
    assert (tmp_path / "allocation-p0.60.json").is_file()
