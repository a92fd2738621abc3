"""Any architecture by structure: the same policy selects the same logical matrices in every family.

Tiny random models built from config, one per family, including two with fused projections:
GPT-2 (``c_attn``, a Conv1D computing [q | k | v]) and Phi-3 (``qkv_proj`` and ``gate_up_proj``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, MistralConfig, Phi3Config
from transformers.pytorch_utils import Conv1D

import svdcompress as sc
from svdcompress.analysis import model_fingerprint
from svdcompress.modules import LowRankLinear, SlicedLinear, dense_weight
from svdcompress.targets import block_linears, decoder_blocks, find_targets

N_LAYERS = 3
# Fused projection (or None) and the suffix of the attention output projection, per family.
FAMILIES = {
    "llama": (None, "o_proj"),
    "qwen2": (None, "o_proj"),
    "mistral": (None, "o_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "gpt_neo": (None, "out_proj"),
    "opt": (None, "out_proj"),
    "phi3": ("self_attn.qkv_proj", "o_proj"),
}


def make_model(family: str) -> nn.Module:
    if family not in ("mistral", "phi3"):
        return make_tiny_model(family)
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    config = MistralConfig(**common) if family == "mistral" else Phi3Config(**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows, use_cache=False).logits


def _original_slices(model) -> dict[str, torch.Tensor]:
    """Every target's (out, in) weight before anything changes, fused ones cut into their slices."""
    weights, offsets = {}, {}
    for target in block_linears(model):
        if target.fused is None or isinstance(model.get_submodule(target.fused), SlicedLinear):
            weights[target.name] = dense_weight(model.get_submodule(target.name)).detach().clone()
            continue
        start = offsets.get(target.fused, 0)
        fused = dense_weight(model.get_submodule(target.fused)).detach()
        weights[target.name] = fused[start : start + target.out_features].clone()
        offsets[target.fused] = start + target.out_features
    return weights


@pytest.mark.parametrize("family", FAMILIES)
def test_qko_compresses_exactly_q_k_o_and_reloads(family, tiny_windows, tmp_path):
    model = make_model(family)
    fused, _ = FAMILIES[family]
    before = _original_slices(model)
    reference = _logits(model, tiny_windows)
    fingerprint = model_fingerprint(model, strict=False)

    report = sc.compress_(model, sc.SVDConfig(rank=8, targets=("qko",)))

    roles = [t.role for t in block_linears(make_model(family)) if t.role in ("q_proj", "k_proj", "o_proj")]
    assert len(roles) == 3 * N_LAYERS
    assert len(report.modules) == 3 * N_LAYERS and {m.rank for m in report.modules} == {8}
    compressed = {m.name for m in report.modules}
    after = _original_slices(model)  # what is still dense, slices of fused modules cut out likewise
    assert set(after) == set(before) - compressed
    for name, weight in before.items():
        if name in compressed:
            module = model.get_submodule(name)
            assert isinstance(module, LowRankLinear) and module.rank == 8
            assert not torch.equal(module.dense_weight(), weight)
        else:  # v, and the MLP: bitwise the weights they were
            assert torch.equal(after[name], weight), name
    if fused is not None:  # the fused module is split per slice, not compressed as one matrix
        for block in range(N_LAYERS):
            prefix = f"{decoder_blocks(model)[0]}.{block}.{fused}"
            assert isinstance(model.get_submodule(prefix), SlicedLinear)
            assert {n.rsplit(".", 1)[-1] for n in compressed if n.startswith(prefix)} == {"q_proj", "k_proj"}
    # The original is still recognised (recover checks its teacher by this fingerprint).
    assert model.config.compression_config["base_fingerprint"] == fingerprint
    assert not torch.equal(_logits(model, tiny_windows), reference)

    sc.save(model, tmp_path / "ckpt")
    loaded, _ = sc.load(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, tiny_windows), _logits(model, tiny_windows))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()  # the quantizer plug-in
    assert torch.equal(_logits(stock, tiny_windows), _logits(model, tiny_windows))


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_mean_the_same_in_every_family(family):
    model = make_model(family)
    # rank_ratio 0.25: the preset's 0.5 saves nothing on the square 64×64 K of some tiny models
    report = sc.compress_(model, sc.preset("k-only", rank_ratio=0.25))
    assert [m.name.rsplit(".", 1)[-1] for m in report.modules] == ["k_proj"] * N_LAYERS
    kv_width = report.modules[0].shape[0]  # 32 with 2 key/value heads, else 64
    assert {m.rank for m in report.modules} == {round(0.25 * min(kv_width, 64))}

    model = make_model(family)
    report = sc.compress_(model, sc.preset("cf90"))
    assert len(report.modules) == 3 * N_LAYERS
    assert all(m.storage == "dense" for m in report.modules)


def test_splitting_a_fused_projection_keeps_the_function(tiny_windows):
    for family in ("gpt2", "phi3"):
        model = make_model(family)
        reference = _logits(model, tiny_windows)
        targets = find_targets(model, ("all-linear",))
        assert {t.role for t in targets} >= {"q_proj", "k_proj", "v_proj", "up_proj"}
        assert any(isinstance(m, SlicedLinear) for m in model.modules())
        torch.testing.assert_close(_logits(model, tiny_windows), reference, rtol=1e-5, atol=1e-5)


def test_phi3_splits_qkv_by_head_counts_and_gate_up_in_halves():
    model = make_model("phi3")
    targets = {t.name.split(".", 3)[-1]: t for t in find_targets(model, ("all-linear",)) if t.block == 0}
    widths = {name: t.out_features for name, t in targets.items()}
    assert widths == {  # 4 query heads and 2 key/value heads of 16: q 64, k 32, v 32
        "self_attn.qkv_proj.q_proj": 64, "self_attn.qkv_proj.k_proj": 32,
        "self_attn.qkv_proj.v_proj": 32, "self_attn.o_proj": 64,
        "mlp.gate_up_proj.gate_proj": 96, "mlp.gate_up_proj.up_proj": 96, "mlp.down_proj": 64,
    }


def test_fused_name_selects_all_its_slices_and_rank_pattern_reaches_one():
    model = make_model("gpt2")
    config = sc.SVDConfig(rank=8, targets=("c_attn",), rank_pattern={r"c_attn\.v_proj": 4})
    report = sc.compress_(model, config)
    ranks = {m.name.split(".", 2)[-1]: m.rank for m in report.modules if ".h.0." in m.name}
    assert ranks == {"0.attn.c_attn.q_proj": 8, "0.attn.c_attn.k_proj": 8, "0.attn.c_attn.v_proj": 4}


def test_gpt2_exports_dense_to_a_stock_conv1d_model(tiny_windows, tmp_path):
    model = make_model("gpt2")
    sc.compress_(model, sc.SVDConfig(rank=8, targets=("qko",)))
    expected = _logits(model, tiny_windows)
    sc.export_dense(model, tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(_logits(plain, tiny_windows), expected, rtol=1e-4, atol=1e-4)


def test_a_plain_model_with_split_projections_saves_fused(tiny_windows, tmp_path):
    model = make_model("gpt2")
    find_targets(model, ("qko",))  # splits c_attn, as LoRA on q/k does
    sc.save(model, tmp_path / "plain")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert isinstance(stock.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(_logits(stock, tiny_windows), _logits(model, tiny_windows))


def test_decoder_blocks_ignore_a_decoy_list_of_the_same_length():
    model = make_model("llama")
    decoys = nn.ModuleList(nn.Sequential(nn.Linear(2, 2)) for _ in range(N_LAYERS))
    # Placed before the real blocks, so "the first ModuleList of num_hidden_layers" would take it.
    model.model._modules = {"decoys": decoys, **model.model._modules}
    assert next(n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)) == "model.decoys"
    name, blocks = decoder_blocks(model)
    assert name == "model.layers" and blocks is model.model.layers
