"""Property tests (issue 15) of the pure parts: rank arithmetic, allocation, INT8, windows, splits."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_allocation import SHAPES, _module

from svdcompress import datasets
from svdcompress.allocation import allocate, uniform_ranks
from svdcompress.analysis import Analysis
from svdcompress.compress import resolve_ranks
from svdcompress.config import SVDConfig
from svdcompress.errors import ConfigError, DatasetError
from svdcompress.linalg import break_even_rank, dequantize, factored_params, quantize_symmetric
from svdcompress.targets import Target

FAST = settings(max_examples=60, deadline=None)
dims = st.integers(min_value=1, max_value=4096)
ratios = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


# --- ratio and rank arithmetic ---------------------------------------------------------------------


@FAST
@given(dims, dims)
def test_break_even_rank_is_the_last_rank_that_saves(m, n):
    r = break_even_rank(m, n)
    assert factored_params(m, n, r) < m * n or r == 0
    assert factored_params(m, n, r + 1) >= m * n


@FAST
@given(dims, dims, ratios)
def test_param_ratio_rank_keeps_at_most_that_fraction(m, n, ratio):
    target = Target("layers.0.x", 0, None, m, n)
    try:
        rank = resolve_ranks(SVDConfig(param_ratio=ratio), [target])[target.name]
    except ConfigError as err:  # only when the rank asked for would save nothing: refused, named
        assert max(1, math.floor(ratio * m * n / (m + n))) > break_even_rank(m, n), err
        assert "break-even rank" in str(err)
        return
    assert 1 <= rank <= min(m, n) and rank <= break_even_rank(m, n)
    # floor: never more than asked, unless rank 1 is already more than asked
    assert factored_params(m, n, rank) <= ratio * m * n or rank == 1
    # and the next rank up would be more than asked (floor, not a rounding that wastes budget)
    assert factored_params(m, n, rank + 1) > ratio * m * n


@FAST
@given(dims, dims, ratios)
def test_rank_ratio_is_a_fraction_of_min_dimension(m, n, ratio):
    target = Target("layers.0.x", 0, None, m, n)
    config = SVDConfig(rank_ratio=ratio, storage="dense")  # dense: any rank is allowed
    rank = resolve_ranks(config, [target])[target.name]
    assert rank == max(1, round(ratio * min(m, n))) and 1 <= rank <= min(m, n)


# --- allocation ------------------------------------------------------------------------------------


@st.composite
def analyses(draw):
    n = draw(st.integers(min_value=1, max_value=6))
    modules = []
    for i in range(n):
        out, inp = draw(st.sampled_from(SHAPES))
        gain = draw(st.floats(min_value=1e-3, max_value=1e3))
        decay = draw(st.floats(min_value=0.01, max_value=0.5))
        modules.append(_module(i, out, inp, gain, decay))
    return Analysis("property", {}, modules)


@FAST
@given(analyses(), st.floats(min_value=0.05, max_value=1.0))
def test_allocation_never_exceeds_the_budget_and_never_loses_to_uniform(analysis, ratio):
    try:
        allocation = allocate(analysis, param_ratio=ratio, min_rank=1, rank_step=1)
    except ConfigError as err:
        assert "cannot be met" in str(err)
        return
    assert allocation.cost_after <= allocation.budget
    uniform = uniform_ranks(analysis, ratio)  # the ranks compress_ gives every module alike
    uniform_cost = sum(m.factored_params(uniform[m.name]) for m in analysis.modules)
    assume(uniform_cost <= allocation.budget)
    assert allocation.predicted_kl <= analysis.predicted_kl(uniform) + 1e-12


@FAST
@given(analyses(), st.floats(min_value=0.2, max_value=0.9), st.floats(min_value=0.01, max_value=0.1))
def test_a_bigger_budget_never_predicts_a_higher_loss(analysis, ratio, more):
    try:
        small = allocate(analysis, param_ratio=ratio, min_rank=2, rank_step=2)
    except ConfigError:
        return
    large = allocate(analysis, param_ratio=min(ratio + more, 1.0), min_rank=2, rank_step=2)
    assert large.predicted_kl <= small.predicted_kl + 1e-12


# --- INT8 round trip -------------------------------------------------------------------------------


@FAST
@given(st.integers(1, 16), st.integers(1, 64), st.floats(1e-6, 1e6), st.integers(0, 2**31 - 1))
def test_int8_round_trip_error_is_at_most_half_a_step(rows, cols, magnitude, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    x[0, 0] = 0.0
    if rows > 1:
        x[1] = 0.0  # an all-zero row
    q, scale = quantize_symmetric(x, dim=1)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and scale.shape == (rows,)
    back = dequantize(q, scale, dim=1)
    bound = scale.unsqueeze(1).double() / 2 * (1 + 1e-6)
    assert bool(((back.double() - x.double()).abs() <= bound).all())
    nonzero = x.abs().amax(dim=1) > 0
    assert bool((q.abs().amax(dim=1)[nonzero] == 127).all())  # the row maximum uses the full range
    assert bool((back[~nonzero] == 0).all())


def test_int8_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        quantize_symmetric(torch.tensor([[1.0, float("nan")]]))


# --- window splitter and document split ------------------------------------------------------------


class _Tokens:
    """A tokenizer stand-in: one id per character."""

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) for c in texts]}
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


@FAST
@given(st.lists(st.text(alphabet="abcdefgh ", min_size=0, max_size=80), min_size=1, max_size=12),
       st.integers(1, 40), st.integers(1, 20), st.integers(0, 1000))
def test_windows_are_distinct_aligned_slices_of_the_stream(texts, seq_len, n, seed):
    tokenizer = _Tokens()
    stream = datasets._token_stream(tokenizer, texts)
    with mock.patch.object(datasets, "load_documents", lambda name, split: texts):
        try:
            windows = datasets.token_windows(tokenizer, "wiki", "eval", seq_len=seq_len, n_samples=n, seed=seed)
        except DatasetError as err:
            assert n > len(stream) // seq_len and "ask for at most" in str(err)
            return
        again = datasets.token_windows(tokenizer, "wiki", "eval", seq_len=seq_len, n_samples=n, seed=seed)
    assert windows.shape == (n, seq_len) and torch.equal(windows, again)
    aligned = [stream[i:i + seq_len] for i in range(0, len(stream) // seq_len * seq_len, seq_len)]
    starts, position = [], -1
    for row in windows.tolist():  # each window is a later aligned slice than the one before
        position = next(i for i in range(position + 1, len(aligned)) if aligned[i] == row)
        starts.append(position)
    assert len(set(starts)) == n and starts == sorted(starts)  # non-overlapping, in stream order


@FAST
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60, unique=True))
def test_document_split_is_a_partition_with_one_in_four_held_out(titles):
    splits = datasets.assign_splits(titles)
    assert set(splits) == set(titles) and set(splits.values()) <= {"calib", "eval"}
    held_out = sum(v == "eval" for v in splits.values())
    assert held_out == (len(titles) + 3) // 4
    # the split depends on the titles alone, not on the order the corpus lists them in
    assert datasets.assign_splits(list(reversed(titles))) == splits
