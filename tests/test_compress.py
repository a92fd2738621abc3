"""compress_ on tiny models of each architecture: module swap, counts, ratios, errors."""

import pytest
import torch
from conftest import make_tiny_model
from transformers.pytorch_utils import Conv1D

import svdcompress as sc
from svdcompress.errors import CalibrationError, ConfigError
from svdcompress.modules import LowRankLinear, SlicedLinear
from svdcompress.targets import find_targets

ALL_METHODS = [
    sc.SVDConfig(param_ratio=0.6),
    sc.WhitenConfig(param_ratio=0.6),
    sc.ASVDConfig(param_ratio=0.6),
    sc.FisherConfig(param_ratio=0.6, fisher_windows=2),
]


def _logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


@pytest.mark.parametrize("config", ALL_METHODS, ids=lambda c: c.method)
def test_every_method_swaps_every_linear_with_honest_counts(tiny_model, tiny_windows, config):
    before = {t.name: t for t in find_targets(tiny_model, ("all-linear",))}
    report = sc.compress_(tiny_model, config, tiny_windows)
    assert len(report.modules) == len(before)
    for line in report.modules:
        module = tiny_model.get_submodule(line.name)
        assert isinstance(module, LowRankLinear) and module.storage == "factored"
        out, inp = before[line.name].out_features, before[line.name].in_features
        bias = out if module.bias is not None else 0
        assert line.params_after == line.rank * (out + inp) + bias
        assert line.params_before == out * inp + bias
        assert line.bytes_after == 4 * line.params_after
        assert 0 < line.output_error < 1 and 0 < line.weight_error < 1
    assert report.target_param_ratio <= 0.61
    assert report.model_params_before - report.model_params_after == (
        report.total("params_before") - report.total("params_after")
    )
    assert torch.isfinite(_logits(tiny_model, tiny_windows)).all()


def test_whitening_beats_plain_svd_on_calibration_outputs(tiny_windows):
    errors = {}
    for config in (sc.SVDConfig(param_ratio=0.5), sc.WhitenConfig(param_ratio=0.5)):
        model = make_tiny_model("llama")
        report = sc.compress_(model, config, tiny_windows)
        errors[config.method] = sum(m.output_error for m in report.modules)
    assert errors["whiten"] < errors["svd"]


def test_update_reduces_output_error_of_plain_svd(tiny_windows):
    plain = sc.compress_(make_tiny_model("llama"), sc.SVDConfig(param_ratio=0.5), tiny_windows)
    updated = sc.compress_(make_tiny_model("llama"), sc.SVDConfig(param_ratio=0.5, update=True), tiny_windows)
    assert sum(m.output_error for m in updated.modules) < sum(m.output_error for m in plain.modules)


def test_full_rank_dense_storage_leaves_logits_unchanged(tiny_model, tiny_windows):
    reference = _logits(tiny_model, tiny_windows)
    report = sc.compress_(tiny_model, sc.SVDConfig(rank_ratio=1.0, storage="dense"))
    assert report.target_param_ratio == 1.0
    torch.testing.assert_close(_logits(tiny_model, tiny_windows), reference, rtol=1e-4, atol=1e-4)


def test_gpt2_conv1d_is_replaced_per_slice_and_exports_back_to_conv1d():
    model = make_tiny_model("gpt2")
    sc.compress_(model, sc.SVDConfig(param_ratio=0.5, targets=("qkv_proj", "down_proj")))
    fused = model.get_submodule("transformer.h.0.attn.c_attn")  # [q | k | v]: one matrix per slice
    assert isinstance(fused, SlicedLinear) and fused.layout == "conv1d"
    for part in ("q_proj", "k_proj", "v_proj"):
        module = fused.get_submodule(part)
        assert isinstance(module, LowRankLinear) and (module.out_features, module.in_features) == (64, 64)
        assert module.rank == 16  # floor(0.5 · 64·64 / 128)
    down = model.get_submodule("transformer.h.0.mlp.c_proj")
    assert isinstance(down, LowRankLinear) and down.layout == "conv1d"
    assert isinstance(down.to_dense(), Conv1D) and isinstance(fused.to_fused(), Conv1D)
    assert isinstance(model.get_submodule("transformer.h.0.attn.c_proj"), Conv1D)  # o_proj untouched


def test_cf90_preset_targets_q_k_o_with_dense_storage(tiny_llama):
    report = sc.compress_(tiny_llama, sc.preset("cf90"))
    roles = {line.name.rsplit(".", 1)[-1] for line in report.modules}
    assert roles == {"q_proj", "k_proj", "o_proj"}
    assert all(line.storage == "dense" and line.params_after == line.params_before for line in report.modules)
    assert report.modules[0].rank == round(0.7 * 64)


def test_role_names_map_across_architectures():
    for arch, expected in [("gpt_neo", "out_proj"), ("opt", "out_proj"), ("gpt2", "c_proj")]:
        model = make_tiny_model(arch)
        names = [t.name for t in find_targets(model, ("o_proj",))]
        assert names and all(n.endswith(expected) for n in names)


def test_rank_pattern_and_exclude(tiny_llama):
    config = sc.SVDConfig(
        rank=8, targets=("attention",), exclude=(r"model\.layers\.1\..*",),
        rank_pattern={r"layers\.2\.self_attn\.q_proj": 16, r"layers\.0\.": 0.25},
    )
    report = sc.compress_(tiny_llama, config)
    ranks = {line.name: line.rank for line in report.modules}
    assert not any(".layers.1." in name for name in ranks)
    assert ranks["model.layers.2.self_attn.q_proj"] == 16
    assert ranks["model.layers.2.self_attn.k_proj"] == 8
    assert ranks["model.layers.0.self_attn.k_proj"] == 8  # 0.25 · min(32, 64)
    assert ranks["model.layers.0.self_attn.q_proj"] == 16  # 0.25 · 64
    # The excluded block's 4 attention linears count at full size in the selected ratio.
    summary = report.summary()
    assert summary["excluded_modules"] == 4
    kept = summary["target_params_after"] + summary["excluded_params"]
    assert summary["selected_param_ratio"] == round(
        kept / (summary["target_params_before"] + summary["excluded_params"]), 4)
    assert summary["target_param_ratio"] < summary["selected_param_ratio"] < 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"param_ratio": 1.5}, r"outside \(0, 1\]"),
        ({"rank_ratio": 0.0}, r"outside \(0, 1\]"),
        ({}, "exactly one of"),
        ({"rank": 4, "param_ratio": 0.5}, "exactly one of"),
        ({"param_ratio": 0.5, "storage": "dense"}, "saves no parameters"),
        ({"rank": 4, "rank_pattern": {"x": -1}}, "rank must be >= 1"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sc.SVDConfig(**kwargs)


def test_rank_that_saves_nothing_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="break-even"):
        sc.compress_(tiny_llama, sc.SVDConfig(rank_ratio=0.9))


def test_rank_above_min_dimension_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="exceeds min"):
        sc.compress_(tiny_llama, sc.SVDConfig(rank=65, storage="dense"))


def test_pattern_matching_nothing_lists_what_exists(tiny_llama):
    with pytest.raises(ConfigError, match=r"matches no linear layer.*q_proj"):
        sc.compress_(tiny_llama, sc.SVDConfig(rank=4, targets=("query",)))
    with pytest.raises(ConfigError, match="rank_pattern"):
        sc.compress_(tiny_llama, sc.SVDConfig(rank=4, rank_pattern={"nothing_here": 2}))


def test_method_needing_calibration_without_it(tiny_llama):
    with pytest.raises(CalibrationError, match="needs calibration"):
        sc.compress_(tiny_llama, sc.WhitenConfig(param_ratio=0.5))
    with pytest.raises(CalibrationError, match="needs scores"):
        sc.compress_(tiny_llama, sc.ImportanceConfig(rank_ratio=0.5, targets=("qko",), storage="dense"))


def test_nan_weight_is_refused_naming_the_module(tiny_llama):
    tiny_llama.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.up_proj.*NaN"):
        sc.compress_(tiny_llama, sc.SVDConfig(param_ratio=0.5))


FACTS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima"),
         ("Chad", "Ndjamena"), ("Cuba", "Havana")]


def _fact_gradients(model, tokenizer, facts, names):
    """∂(fact loss)/∂W for each named module, computed here independently of the library."""
    from svdcompress.methods.importance import fact_batches

    model.zero_grad()
    for ids, mask, labels in fact_batches(tokenizer, facts, 8):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = {n: model.get_submodule(n).weight.grad.detach().double().clone() for n in names}
    model.zero_grad()
    return grads


def test_importance_keeps_the_directions_the_facts_gradients_prefer(tiny_llama, char_tokenizer):
    from svdcompress.datasets import Fact
    from svdcompress.methods.importance import compute_importance
    from svdcompress.modules import dense_weight

    facts = [Fact(f"The capital of {country} is", city) for country, city in FACTS]
    names = [t.name for t in find_targets(tiny_llama, ("qko",))]
    original = {n: dense_weight(tiny_llama.get_submodule(n)).detach().double() for n in names}
    grads = _fact_gradients(tiny_llama, char_tokenizer, facts, names)
    scores = compute_importance(tiny_llama, char_tokenizer, facts, targets=("qko",), source="test")
    config = sc.ImportanceConfig(rank_ratio=0.5, targets=("qko",), storage="dense")
    sc.compress_(tiny_llama, config, importance=scores)
    assert tiny_llama.config.compression_config["importance"] == "test"
    not_sigma_order = 0
    for name in names:
        u, s, vh = torch.linalg.svd(original[name], full_matrices=False)
        # |σᵢ uᵢᵀ G vᵢ|: the first-order change of the fact loss when direction i is dropped
        expected = (s * (u * (grads[name] @ vh.T)).sum(dim=0)).abs()
        got = scores.taylor[name].double()
        assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.999, name
        rank = tiny_llama.get_submodule(name).rank
        keep = torch.topk(expected, rank).indices
        kept = (u[:, keep] * s[keep]) @ vh[keep]  # the directions the gradients prefer
        assert torch.allclose(dense_weight(tiny_llama.get_submodule(name)).double(), kept,
                              rtol=1e-4, atol=1e-6), name
        not_sigma_order += set(keep.tolist()) != set(range(rank))
    assert not_sigma_order > 0  # on these facts the choice is not plain truncated SVD


def test_recipe_round_trip(tmp_path):
    config = sc.ASVDConfig(param_ratio=0.7, alpha=0.25, rank_pattern={"layers\\.0\\.": 12}, exclude=("k_proj",))
    path = tmp_path / "recipe.json"
    import json

    path.write_text(json.dumps(config.to_dict()))
    from svdcompress.config import load_recipe

    assert load_recipe(path) == config
    (tmp_path / "bad.yaml").write_text("method: whiten\nparam_ratio: 0.8\nrnak: 3\n")
    with pytest.raises(ConfigError, match="unknown settings"):
        load_recipe(tmp_path / "bad.yaml")
