"""Group-wise round-to-nearest: the 4-bit baseline's quantizer, its byte count and model pass."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model

import svdcompress as sc
from svdcompress.errors import ConfigError
from svdcompress.linalg import quantize_groupwise, sqnr_db
from svdcompress.modules import dense_weight
from svdcompress.quantize import rtn_quantize_
from svdcompress.targets import find_targets


def _weight(out=48, inp=96, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize(("group", "symmetric", "expected"), [
    (128, False, 48 * 96 // 2 + 48 * 1 * 4),  # one (short) group per row: codes + fp16 scale + zero
    (32, False, 48 * 96 // 2 + 48 * 3 * 4),
    (32, True, 48 * 96 // 2 + 48 * 3 * 2),  # symmetric: no zero point
    (40, False, 48 * 96 // 2 + 48 * 3 * 4),  # 96 = 40 + 40 + 16: the short last group counts whole
])
def test_byte_count(group, symmetric, expected):
    _, nbytes = quantize_groupwise(_weight(), 4, group, symmetric=symmetric)
    assert nbytes == expected


def test_smollm_shapes_give_the_quoted_ratios():
    # 4 bits + 4 bytes per group over 4 bytes per float32 weight: g128 13.28 %, g32 15.63 %.
    for group, ratio in ((128, 0.1328125), (32, 0.15625)):
        _, nbytes = quantize_groupwise(torch.zeros(576, 1536), 4, group)
        assert nbytes / (576 * 1536 * 4) == ratio


@pytest.mark.parametrize("symmetric", [False, True])
def test_at_most_2_to_the_bits_levels_per_group_and_error_bound(symmetric):
    w = _weight()
    approx, _ = quantize_groupwise(w, 4, 32, symmetric=symmetric)
    for start in range(0, 96, 32):
        for row in range(w.shape[0]):
            group, got = w[row, start:start + 32], approx[row, start:start + 32]
            assert got.unique().numel() <= 16
            low, high = min(group.min(), 0), max(group.max(), 0)
            step = (high - low) / 15 if not symmetric else 2 * group.abs().max() / 14
            # Half a step, plus the fp16 rounding of the scale carried over up to 15 steps.
            assert (group - got).abs().max() <= step * (0.5 + 15 * 2**-11) + 1e-7
    assert sqnr_db(w, approx) > 17


def test_more_bits_and_smaller_groups_are_more_accurate():
    w = _weight(seed=1)
    errs = {(b, g): sqnr_db(w, quantize_groupwise(w, b, g)[0]) for b in (4, 8) for g in (32, 128)}
    assert errs[(4, 32)] > errs[(4, 128)]
    assert errs[(8, 128)] > errs[(4, 32)] + 20
    assert errs[(8, 32)] > 40


def test_zero_is_exact_and_symmetric_is_odd():
    w = _weight(seed=2)
    w[:, ::7] = 0.0
    approx, _ = quantize_groupwise(w, 4, 32)
    assert torch.equal(approx[:, ::7], torch.zeros_like(approx[:, ::7]))
    plus, _ = quantize_groupwise(w, 4, 32, symmetric=True)
    minus, _ = quantize_groupwise(-w, 4, 32, symmetric=True)
    assert torch.equal(plus, -minus)
    zeros, _ = quantize_groupwise(torch.zeros(3, 8), 4, 4)
    assert torch.equal(zeros, torch.zeros(3, 8))


@pytest.mark.parametrize(("args", "match"), [
    ((torch.zeros(4, 8), 1, 4), "bits"),
    ((torch.zeros(4, 8), 9, 4), "bits"),
    ((torch.zeros(4, 8), 4, 0), "group_size"),
    ((torch.zeros(8), 4, 4), "matrix"),
    ((torch.full((2, 4), math.nan), 4, 4), "NaN"),
])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        quantize_groupwise(*args)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rtn_quantize_model(arch):
    model, original = make_tiny_model(arch), make_tiny_model(arch)
    summary = rtn_quantize_(model, 4, 32)
    targets = find_targets(original, ("all-linear",))
    assert summary["modules"] == len(targets)
    before = sum(dense_weight(original.get_submodule(t.name)).numel() * 4 for t in targets)
    assert summary["target_bytes_before"] == before
    for target in targets:
        expected, _ = quantize_groupwise(dense_weight(original.get_submodule(target.name)), 4, 32)
        assert torch.equal(dense_weight(model.get_submodule(target.name)), expected)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (model(ids).logits - original(ids).logits).abs().max()
    assert 0 < gap < 0.5


def test_rtn_refuses_a_compressed_model(tiny_llama):
    sc.compress_(tiny_llama, sc.SVDConfig(param_ratio=0.5))
    with pytest.raises(ConfigError, match="already compressed"):
        rtn_quantize_(tiny_llama, 4, 32)
