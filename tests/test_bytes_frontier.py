"""Byte allocation among dense float, dense INT8, low-rank float and low-rank INT8 options."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_model
from test_allocation import synthetic_analysis
from torch import nn

import svdcompress as sc
from svdcompress.allocation import CostModel, allocate
from svdcompress.analysis import analyze
from svdcompress.config import config_from_dict
from svdcompress.errors import AnalysisError, ConfigError
from svdcompress.int8_analysis import INT8_FILE, Int8Sensitivity, ModuleInt8, int8_sensitivity
from svdcompress.modules import LowRankLinear
from svdcompress.quantize import quantize_weights_
from svdcompress.recipe import recipe_text

COST = CostModel.for_bytes(torch.float32)


def synthetic_int8(analysis, dense_kl: float = 1e-6, extra: float = 1e-3) -> Int8Sensitivity:
    """INT8 factors add a fixed energy ``extra`` at every rank; dense INT8 costs ``dense_kl``."""
    modules = {}
    for m in analysis.modules:
        ranks = sorted({1, *(x.rank for x in m.measurements)})
        modules[m.name] = ModuleInt8(m.name, 1e-4, dense_kl,
                                     {r: m.tail_energy(r) + extra for r in ranks},
                                     {x.rank: x.kl * 1.01 for x in m.measurements})
    return Int8Sensitivity("synthetic", modules)


def _option_cost(m, rank, bits) -> int:
    if rank is None:
        return COST.dense(m) if bits is None else m.out_features * m.in_features + 4 * m.out_features
    if bits is None:
        return rank * (m.out_features + m.in_features) * 4
    return rank * (m.out_features + m.in_features) + 4 * (m.out_features + rank)


@pytest.mark.parametrize("fraction", [0.08, 0.15, 0.25, 0.3, 0.6, 1.0])
def test_budget_met_and_costs_add_up(fraction):
    analysis = synthetic_analysis(seed=7)
    int8 = synthetic_int8(analysis)
    before = sum(COST.dense(m) for m in analysis.modules)
    allocation = allocate(analysis, byte_budget=int(fraction * before), cost=COST, int8=int8,
                          min_rank=1, rank_step=1)
    assert allocation.cost_before == before
    spent = sum(_option_cost(m, allocation.ranks[m.name], allocation.bits[m.name])
                for m in analysis.modules)
    assert allocation.cost_after == spent <= int(fraction * before)
    expected = sum(int8.modules[m.name].predicted_kl(m, allocation.ranks[m.name])
                   if allocation.bits[m.name] else m.predicted_kl(allocation.ranks[m.name])
                   for m in analysis.modules)
    assert allocation.predicted_kl == pytest.approx(expected, rel=1e-12)


def test_dense_int8_everywhere_when_it_fits_and_is_cheap():
    analysis = synthetic_analysis(seed=8)
    int8 = synthetic_int8(analysis, dense_kl=1e-12)
    int8_all = sum(m.out_features * m.in_features + 4 * m.out_features for m in analysis.modules)
    allocation = allocate(analysis, byte_budget=int8_all, cost=COST, int8=int8)
    assert all(rank is None for rank in allocation.ranks.values())
    assert all(bits == 8 for bits in allocation.bits.values())
    full = allocate(analysis, byte_budget=sum(COST.dense(m) for m in analysis.modules), cost=COST,
                    int8=int8)
    assert full.predicted_kl == 0.0 and not any(full.bits.values())  # everything fits in float


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_more_options_never_predict_more_loss(fraction):
    analysis = synthetic_analysis(seed=9)
    budget = int(fraction * sum(COST.dense(m) for m in analysis.modules))
    floats = allocate(analysis, byte_budget=budget, cost=COST, min_rank=1, rank_step=1)
    mixed = allocate(analysis, byte_budget=budget, cost=COST, int8=synthetic_int8(analysis),
                     min_rank=1, rank_step=1)
    assert mixed.predicted_kl <= floats.predicted_kl


def test_low_rank_int8_when_its_noise_is_negligible():
    analysis = synthetic_analysis(seed=9)
    int8 = synthetic_int8(analysis, dense_kl=1.0, extra=1e-12)  # dense INT8 ruinous, factors free
    before = sum(COST.dense(m) for m in analysis.modules)
    allocation = allocate(analysis, byte_budget=int(0.1 * before), cost=COST, int8=int8,
                          min_rank=1, rank_step=1)
    assert all(rank is not None and bits == 8 for rank, bits in
               zip(allocation.ranks.values(), allocation.bits.values(), strict=True))


def test_bigger_budget_never_predicts_more_loss():
    analysis = synthetic_analysis(seed=10)
    int8 = synthetic_int8(analysis, dense_kl=3e-4)
    before = sum(COST.dense(m) for m in analysis.modules)
    losses = [allocate(analysis, byte_budget=int(f * before), cost=COST, int8=int8, min_rank=2,
                       rank_step=2).predicted_kl for f in np.linspace(0.08, 1.0, 24)]
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(losses))


def test_int8_options_need_a_byte_budget():
    analysis = synthetic_analysis()
    with pytest.raises(ConfigError, match="bytes"):
        allocate(analysis, param_ratio=0.5, int8=synthetic_int8(analysis))


def test_to_config_fields_and_recipe_round_trip():
    analysis = synthetic_analysis(seed=11)
    int8 = synthetic_int8(analysis, dense_kl=1e-5)
    before = sum(COST.dense(m) for m in analysis.modules)
    allocation = allocate(analysis, byte_budget=int(0.3 * before), cost=COST, int8=int8,
                          min_rank=1, rank_step=1)
    config = allocation.to_config(sc.WhitenConfig(param_ratio=0.5))
    assert len(config.rank_pattern) + len(config.dense_int8) + len(config.exclude) == len(analysis.modules)
    assert len(config.dense_int8) == sum(1 for n in allocation.dense if allocation.bits[n])
    assert set(config.quant_pattern.values()) <= {8}
    assert config_from_dict(config.to_dict()) == config
    text = recipe_text({"config": config.to_dict()})
    assert config_from_dict({k: v for k, v in yaml.safe_load(text).items()
                             if k not in ("base_model", "provenance")}) == config


@pytest.mark.parametrize(("settings", "match"), [
    ({"quant_pattern": {"q_proj": 4}}, "quant_pattern"),
    ({"quant_pattern": {"(": 8}}, "regular expression"),
    ({"dense_int8": ("[",)}, "regular expression"),
    ({"quant_pattern": ["q_proj"]}, "quant_pattern"),
])
def test_bad_config(settings, match):
    with pytest.raises(ConfigError, match=match):
        sc.WhitenConfig(param_ratio=0.5, **settings)


def test_dense_int8_pattern_must_match(tiny_llama, tiny_windows):
    with pytest.raises(ConfigError, match="dense_int8 pattern 'nothing'"):
        sc.compress_(tiny_llama, sc.WhitenConfig(param_ratio=0.5, dense_int8=("nothing",)), tiny_windows)


def test_all_dense_int8_is_the_int8_baseline(tiny_llama):
    baseline = make_tiny_model("llama")
    quantize_weights_(baseline)
    config = sc.SVDConfig(param_ratio=0.5, dense_int8=(".",))
    report = sc.compress_(tiny_llama, config)  # nothing to factorize: no calibration needed
    assert all(m.storage == "dense" and m.quant_bits == 8 for m in report.modules)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, baseline(ids).logits)


def test_quant_pattern_mixes_float_and_int8_factors(tiny_llama):
    config = sc.SVDConfig(param_ratio=0.5, quant_bits=8, quant_pattern={r"\.mlp\.": None})
    sc.compress_(tiny_llama, config)
    for name, module in tiny_llama.named_modules():
        if isinstance(module, LowRankLinear):
            assert module.quant_bits == (None if ".mlp." in name else 8), name


def test_measured_allocation_compresses_to_its_bytes(tiny_llama, tiny_windows, tmp_path):
    analysis = analyze(tiny_llama, tiny_windows, tmp_path, probe_samples=2, probe_len=16)
    int8 = int8_sensitivity(tiny_llama, tiny_windows, analysis, tmp_path, min_rank=2,
                            probe_factors=True)
    first = next(iter(int8.modules.values()))
    module = analysis.modules[0]
    assert first.dense_kl >= 0 and 0 < first.dense_energy < 1e-3
    assert set(first.factor_kl) == {m.rank for m in module.measurements}
    assert all(kl >= 0 for kl in first.factor_kl.values())
    for rank in range(2, module.full_rank, 3):  # INT8 factors never predicted better than float
        assert first.predicted_kl(module, rank) >= module.predicted_kl(rank)
    for rank, energy in first.factor_energy.items():  # INT8 factors err a little more than float
        assert module.tail_energy(rank) * 0.999 <= energy <= module.tail_energy(rank) + 0.01
    before = sum(COST.dense(m) for m in analysis.modules)
    allocation = allocate(analysis, byte_budget=int(0.2 * before), cost=COST, int8=int8,
                          min_rank=2, rank_step=2)
    config = allocation.to_config(sc.WhitenConfig(param_ratio=0.5))
    model = make_tiny_model("llama")
    sc.compress_(model, config, tiny_windows)
    stored = 0
    for name in allocation.ranks:
        layer = model.get_submodule(name)
        stored += layer.weight_bytes() if isinstance(layer, LowRankLinear) else layer.weight.numel() * 4
        if allocation.ranks[name] is not None:
            assert layer.rank == allocation.ranks[name]
        assert (layer.quant_bits if isinstance(layer, LowRankLinear) else None) == allocation.bits[name]
        assert isinstance(layer, LowRankLinear | nn.Linear)
    assert stored == allocation.cost_after <= math.floor(0.2 * before)
    sc.save(model, tmp_path / "ckpt")
    loaded, _ = sc.load(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_int8_sensitivity_resumes_and_refuses_other_windows(tiny_llama, tiny_windows, tmp_path,
                                                            monkeypatch):
    analysis = analyze(tiny_llama, tiny_windows, tmp_path, probe_samples=2, probe_len=16)
    first = int8_sensitivity(tiny_llama, tiny_windows, analysis, tmp_path)
    assert (tmp_path / INT8_FILE).is_file()
    import svdcompress.int8_analysis as int8_analysis

    monkeypatch.setattr(int8_analysis, "_measure_int8", lambda *a, **k: pytest.fail("not resumed"))
    again = int8_sensitivity(tiny_llama, tiny_windows, analysis, tmp_path)
    assert again.modules == first.modules
    # the time measuring them took is kept, not reset by a run that only read the cache
    saved = json.loads((tmp_path / INT8_FILE).read_text())["seconds"]
    assert 0 < saved <= first.seconds + 0.01 and again.seconds >= saved
    with pytest.raises(AnalysisError, match="calibration windows"):
        int8_sensitivity(tiny_llama, tiny_windows.flip(0), analysis, tmp_path)


def test_cli_int8_options(cli_folder, tmp_path):
    from typer.testing import CliRunner

    from svdcompress.cli import app

    runner = CliRunner()
    base = ["compress", str(cli_folder), "--method", "whiten", "--param-ratio", "0.5", "--windows",
            "4", "--seq-len", "32", "--analysis-dir", str(tmp_path / "analysis")]
    result = runner.invoke(app, [*base, "--allocate", "--int8-options", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--byte-budget" in result.output
    model = make_tiny_model("llama")
    fp32 = sum(m.weight.numel() * 4 for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".layers." in n)
    result = runner.invoke(app, [*base, "--allocate", "--byte-budget", str(fp32 // 5),
                                 "--int8-options", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    loaded, _ = sc.load(tmp_path / "b")
    stored = sum(m.weight_bytes() for m in loaded.modules() if isinstance(m, LowRankLinear))
    stored += sum(m.weight.numel() * 4 for n, m in loaded.named_modules()
                  if isinstance(m, nn.Linear) and ".layers." in n)
    assert 0 < stored <= fp32 // 5
    assert any(m.quant_bits == 8 for m in loaded.modules() if isinstance(m, LowRankLinear))
    assert (tmp_path / "analysis" / INT8_FILE).is_file()


def test_dense_kl_only_without_energies(tiny_llama, tiny_windows, tmp_path):
    analysis = analyze(tiny_llama, tiny_windows, tmp_path, probe_samples=2, probe_len=16)
    full = int8_sensitivity(tiny_llama, tiny_windows, analysis, None)
    quick = int8_sensitivity(tiny_llama, tiny_windows, analysis, tmp_path, energies=False)
    for name, entry in quick.modules.items():
        assert entry.dense_energy is None and not entry.factor_energy
        assert entry.dense_kl == pytest.approx(full.modules[name].dense_kl, rel=1e-6, abs=1e-12)
        module = analysis.module(name)
        assert entry.predicted_kl(module, 4) == module.predicted_kl(4)  # factors priced as float
    with pytest.raises(AnalysisError, match="energies"):
        int8_sensitivity(tiny_llama, tiny_windows, analysis, tmp_path)


def test_paths_that_factor_every_target_refuse_dense_int8(tiny_llama):
    from svdcompress.compress import resolve_ranks
    from svdcompress.targets import find_targets

    config = sc.SVDConfig(param_ratio=0.5, dense_int8=("q_proj",))
    with pytest.raises(ConfigError, match="only in-memory"):  # e.g. streaming's resolve_ranks call
        resolve_ranks(config, find_targets(tiny_llama, config.targets))
