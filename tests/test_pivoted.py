"""Pivoted (PIFA) storage: the same rank-r product as two factors, in r·(out + in − r) numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

import svdcompress as sc
from svdcompress.allocation import CostModel, allocate, allocate_config
from svdcompress.analysis import Analysis, Measurement, ModuleAnalysis
from svdcompress.checkpoint import densify_
from svdcompress.errors import ConfigError
from svdcompress.linalg import (
    break_even_rank,
    factored_params,
    pivot_factors,
    rank_for_param_ratio,
)
from svdcompress.modules import LowRankLinear, tensor_layout
from svdcompress.runtime import available_kernels, set_runtime


def _random_factors(out: int, inp: int, rank: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(out, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, inp, generator=generator, dtype=torch.float64)
    return left, right


@pytest.mark.parametrize(("out", "inp", "rank"), [(40, 24, 7), (24, 40, 23), (16, 16, 1)])
def test_pivot_factors_reproduce_the_product_in_fewer_numbers(out, inp, rank):
    left, right = _random_factors(out, inp, rank)
    pivoted = pivot_factors(left, right)
    assert pivoted.left.shape == (out, rank) and pivoted.coupling.shape == (rank, inp - rank)
    assert sorted(pivoted.permutation.tolist()) == list(range(inp))
    assert torch.allclose(pivoted.product(), left @ right, atol=1e-10 * (left @ right).abs().max())
    stored = pivoted.left.numel() + pivoted.coupling.numel()
    assert stored == factored_params(out, inp, rank, "pivoted") == rank * (out + inp - rank)
    assert stored < factored_params(out, inp, rank) and stored < out * inp


def test_pivot_factors_handle_a_rank_deficient_right_factor():
    left, right = _random_factors(30, 20, 6)
    right[2] = 0.0  # a zero singular value (whitening of a dead direction)
    pivoted = pivot_factors(left, right)
    assert torch.isfinite(pivoted.coupling).all()
    assert torch.allclose(pivoted.product(), left @ right, atol=1e-10)


def test_pivoting_keeps_the_coupling_bounded():
    # Column pivoting makes R₁ the best-conditioned greedy choice: the coupling stays O(1) even
    # when a few input columns are tiny, which is what keeps its int8 codes accurate.
    left, right = _random_factors(64, 48, 12)
    right[:, :30] *= 1e-3
    assert pivot_factors(left, right).coupling.abs().max() < 10


def test_rank_for_param_ratio_solves_the_storage_cost():
    # The example of the issue: a 576×576 module at 80 % of its parameters.
    assert rank_for_param_ratio(576, 576, 0.8) == 230
    assert rank_for_param_ratio(576, 576, 0.8, "pivoted") == 318
    for m, n, ratio in [(576, 1536, 0.6), (192, 576, 0.9), (64, 96, 0.3)]:
        rank = rank_for_param_ratio(m, n, ratio, "pivoted")
        assert factored_params(m, n, rank, "pivoted") <= ratio * m * n
        assert factored_params(m, n, rank + 1, "pivoted") > ratio * m * n
    assert break_even_rank(576, 576, "pivoted") == 575 and break_even_rank(576, 576) == 287


def _compressed(storage: str, **config):
    model = make_tiny_model("llama")
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    report = sc.compress_(model, sc.WhitenConfig(storage=storage, **config), calibration)
    return model, report


def test_pivoted_model_gives_the_factored_logits_at_the_same_rank(tiny_windows):
    factored, _ = _compressed("factored", rank=12)
    pivoted, report = _compressed("pivoted", rank=12)
    with torch.no_grad():
        expected, got = factored(tiny_windows).logits, pivoted(tiny_windows).logits
    assert (got - expected).abs().max() < 1e-5
    module = pivoted.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(module, LowRankLinear) and module.storage == "pivoted"
    assert {n for n, _ in module.named_parameters()} == {"left", "coupling"}
    assert module.num_stored() == 12 * (64 + 64 - 12)
    assert module.weight_bytes() == 4 * 12 * (64 + 64 - 12) + 8 * 64  # + the int64 permutation
    assert report.modules[0].storage == "pivoted"
    assert report.target_param_ratio < _compressed("factored", rank=12)[1].target_param_ratio


def test_pivoted_param_ratio_buys_a_higher_rank_at_the_same_budget():
    _, factored = _compressed("factored", param_ratio=0.6)
    _, pivoted = _compressed("pivoted", param_ratio=0.6)
    assert pivoted.target_param_ratio <= 0.6 and factored.target_param_ratio <= 0.6
    assert all(p.rank > f.rank for p, f in zip(pivoted.modules, factored.modules, strict=True))


def test_pivoted_refuses_full_rank_and_factored_refuses_past_break_even():
    with pytest.raises(ConfigError, match=r"stored pivoted.*break-even rank 31"):
        _compressed("pivoted", rank=32)
    _compressed("pivoted", rank=30)  # above factored's break-even (21 for the 32×64 k_proj)
    with pytest.raises(ConfigError, match="stored factored"):
        _compressed("factored", rank=30)


def test_pivoted_checkpoint_and_from_pretrained_round_trip(tmp_path, tiny_windows):
    model, _ = _compressed("pivoted", param_ratio=0.7)
    folder = sc.save(model, tmp_path / "pivoted")
    loaded, _ = sc.load(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        expected = model(tiny_windows).logits
        assert torch.equal(loaded(tiny_windows).logits, expected)
        assert torch.equal(theirs(tiny_windows).logits, expected)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(loaded.get_submodule(name).permutation, model.get_submodule(name).permutation)
    dense = densify_(copy.deepcopy(model))  # what export-dense and model.dequantize() give
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    with torch.no_grad():
        assert (dense(tiny_windows).logits - expected).abs().max() < 1e-5


@pytest.mark.parametrize("kernel", [k for k in ("dequant", "float_cache", "int_mm", "fbgemm")
                                    if k in available_kernels()])
def test_int8_pivoted_factors_follow_the_dequantized_matrices(tmp_path, tiny_windows, kernel):
    model, _ = _compressed("pivoted", param_ratio=0.7, quant_bits=8)
    module = model.get_submodule("model.layers.0.mlp.up_proj")
    assert module.quant_bits == 8 and module.coupling_q.dtype == torch.int8
    layout = tensor_layout(module.spec())
    assert layout["permutation"] == ((64,), torch.int64) and "coupling_scale" in layout
    x = torch.randn(3, 5, 64)
    reference = (x @ module.dense_weight().T).detach()
    set_runtime(model, kernel)
    tolerance = 1e-5 if kernel in ("dequant", "float_cache") else 0.05
    err = (module(x) - reference).norm() / reference.norm()
    assert err < tolerance
    folder = sc.save(model, tmp_path / "int8")
    loaded, _ = sc.load(folder)
    with torch.no_grad():
        set_runtime(model, "dequant")
        assert torch.equal(loaded(tiny_windows).logits, model(tiny_windows).logits)


def _module(name: str, out: int, inp: int) -> ModuleAnalysis:
    values = [float(0.97**i) for i in range(min(out, inp))]
    module = ModuleAnalysis(name, 0, None, out, inp, 0, values, values)
    module.measurements = [Measurement(r, module.tail_energy(r), 0.1 * module.tail_energy(r), 0.0)
                           for r in (8, 24)]
    return module


def test_allocation_prices_pivoted_ranks_and_reaches_past_factored_break_even():
    analysis = Analysis("fp", {}, [_module("a", 64, 64), _module("b", 32, 64)], 0.0)
    assert CostModel(storage="pivoted").factored(analysis.modules[0], 40) == 40 * (128 - 40)
    assert CostModel.for_bytes(storage="pivoted").factored(analysis.modules[1], 8) == (
        4 * 8 * (96 - 8) + 8 * 64)
    pivoted = allocate(analysis, param_ratio=0.8, storage="pivoted", min_rank=4, rank_step=4)
    factored = allocate(analysis, param_ratio=0.8, min_rank=4, rank_step=4)
    assert pivoted.cost_after <= pivoted.budget and pivoted.settings["storage"] == "pivoted"
    assert pivoted.ranks["a"] > factored.ranks["a"]
    assert pivoted.predicted_kl < factored.predicted_kl
    generous = allocate(analysis, param_ratio=0.97, storage="pivoted", min_rank=4, rank_step=4)
    assert generous.ranks["a"] > break_even_rank(64, 64)  # factored storage could not reach it
    with pytest.raises(ConfigError, match="cost model prices"):
        allocate(analysis, param_ratio=0.8, storage="pivoted", cost=CostModel())
    with pytest.raises(ConfigError, match="'factored' or 'pivoted'"):
        CostModel(storage="dense")


def test_allocate_config_writes_a_pivoted_recipe_beside_the_factored_one(tmp_path, tiny_windows):
    model = make_tiny_model("llama")
    for storage in ("factored", "pivoted"):
        config = allocate_config(model, sc.WhitenConfig(param_ratio=0.7, storage=storage), tiny_windows,
                                 analysis_dir=tmp_path, probe_samples=1, probe_len=16,
                                 min_rank=4, rank_step=4)
        assert config.storage == storage
    assert (tmp_path / "allocation-p0.70.json").is_file()
    assert (tmp_path / "allocation-p0.70-pivoted.json").is_file()
    report = sc.compress_(model, config, tiny_windows)
    assert report.selected_param_ratio <= 0.7 + 1e-9


def test_analyze_writes_pivoted_recipes_that_compress_reads(tmp_path, tiny_windows):
    from svdcompress.config import load_recipe
    from svdcompress.pipelines.analyze import run_analyze

    model = make_tiny_model("llama")
    summary = run_analyze(model, None, tiny_windows, tmp_path, probe_samples=1, probe_len=16,
                          ratios=(0.7,), min_rank=4, rank_step=4, diagnose=(), storage="pivoted")
    assert summary["allocations"]["allocation-p0.70-pivoted"]["settings"]["storage"] == "pivoted"
    recipe = load_recipe(tmp_path / "allocation-p0.70-pivoted.json")
    assert recipe.storage == "pivoted"
    report = sc.compress_(model, recipe, tiny_windows)
    assert report.selected_param_ratio <= 0.7 + 1e-9
    assert {m.storage for m in report.modules} == {"pivoted"}
