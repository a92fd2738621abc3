"""PrefixSharingHFLM gives lm-eval HFLM's numbers while running each shared context once.

Every test compares against plain ``HFLM`` on the same model: per-request log-likelihoods within
1e-4 (float32), identical is_greedy, identical task scores. Tiny random models of every family on
hand-made token requests (shared contexts, 1-token and longer continuations, a context HFLM must
left-truncate, a lone context); the tiny Llama and the real SmolLM2 on the task YAMLs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, make_char_tokenizer, make_tiny_model, tiny_config
from lm_eval.models.huggingface import HFLM
from test_tasks import fake_sources  # noqa: F401  (fixture: tiny BIG-bench files)
from transformers import AutoModelForCausalLM

from svdcompress.tasks import TASK_DIR, evaluate_tasks, prefix_sharing
from svdcompress.tasks.prefix_sharing import PrefixSharingHFLM

TOLERANCE = 1e-4  # float32 log-likelihoods; the two paths differ only in matmul shapes


def _tokens(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 100, (n,), generator=generator).tolist()


def _greedy(model, context: list[int], n: int) -> list[int]:
    """The model's own greedy continuation, so that some requests have is_greedy True."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context):]


def _requests(model) -> list:
    """Token requests covering every path; the tiny models take 256 tokens (HFLM max_length)."""
    generator = torch.Generator().manual_seed(1)
    shared, one_token, near_limit = (_tokens(generator, n) for n in (40, 7, 254))
    continuations = [_tokens(generator, n) for n in (1, 3, 5, 2)] + [_greedy(model, shared, 4)]
    requests = [(("shared", str(i)), shared, c) for i, c in enumerate(continuations)]
    requests += [(("one-token", str(i)), one_token, [10 + i]) for i in range(4)]  # MMLU-like
    requests += [(("one-token", "greedy"), one_token, _greedy(model, one_token, 1))]
    requests += [(("alone", "0"), _tokens(generator, 12), _tokens(generator, 4))]
    # 254 + 5 > 256 + 1: HFLM cuts 2 tokens off the left, so that one takes HFLM's path.
    requests += [(("near-limit", str(n)), near_limit, _tokens(generator, n)) for n in (2, 3, 5)]
    return requests


class RecordingHook:
    """Stands in for lm-eval's CacheHook: remembers what each request was answered."""

    def __init__(self):
        self.answers = {}

    def add_partial(self, attr, request, answer):
        assert attr == "loglikelihood"
        self.answers[request] = answer


def _both(model, requests, batch_size=4):
    tokenizer = make_char_tokenizer()
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    ours = PrefixSharingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    ours.set_cache_hook(RecordingHook())
    expected = reference._loglikelihood_tokens(requests, disable_tqdm=True)
    return expected, ours._loglikelihood_tokens(requests, disable_tqdm=True), ours.cache_hook


def _assert_same(expected, got):
    assert len(got) == len(expected)
    worst = max(abs(e[0] - g[0]) for e, g in zip(expected, got, strict=True))
    assert worst < TOLERANCE, worst
    assert [g[1] for g in got] == [e[1] for e in expected]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_answers_as_hflm_in_request_order(arch):
    model = make_tiny_model(arch)
    requests = _requests(model)
    expected, got, hook = _both(model, requests)
    _assert_same(expected, got)
    assert got[4][1] and got[9][1]  # the model's own greedy continuations
    assert hook.answers == {key: answer for (key, _, _), answer in zip(requests, got, strict=True)}


def test_same_answers_as_hflm_on_a_compressed_model():
    import svdcompress as sc
    from svdcompress.modules import LowRankLinear

    model = make_tiny_model("llama")
    sc.compress_(model, sc.SVDConfig(param_ratio=0.5))
    assert any(isinstance(module, LowRankLinear) for module in model.modules())
    expected, got, _ = _both(model, _requests(model))
    _assert_same(expected, got)


def test_each_shared_context_runs_once_and_chunks_agree(monkeypatch):
    model = make_tiny_model("llama")
    requests = [r for r in _requests(model) if r[0][0] == "shared"]  # 40 tokens, 5 continuations
    embedded = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(
        args[0].numel()))
    monkeypatch.setattr(prefix_sharing, "MAX_CONTINUATIONS_PER_CALL", 2)  # 3 calls of <= 2 rows
    expected, got, _ = _both(model, requests)
    _assert_same(expected, got)
    hflm_tokens, ours = sum(embedded[:-4]), embedded[-4:]
    # Context once (40 tokens), then each chunk right-padded to its longest continuation minus 1.
    assert ours == [40, 2 * 2, 2 * 4, 1 * 3]
    assert hflm_tokens >= 5 * 40


def _task_run(lm_class, model, tokenizer, task, **selection):
    """(per-request (log-likelihood, is_greedy) in doc order, task metrics) from lm-eval."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=8)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    result = simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True,
                             bootstrap_iters=100, **selection)
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    answers = [tuple(resp[0]) for s in samples for resp in s["resps"]]
    metrics = {k: v for k, v in result["results"][task].items() if "," in k}
    return answers, metrics


def _assert_same_task_results(model, tokenizer, task, **selection):
    expected, expected_metrics = _task_run(HFLM, model, tokenizer, task, **selection)
    got, metrics = _task_run(PrefixSharingHFLM, model, tokenizer, task, **selection)
    _assert_same(expected, got)
    assert metrics.keys() == expected_metrics.keys()
    for name, value in expected_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name
    return got


@pytest.mark.parametrize("task", ["truthfulqa_mc2", "arc_style"])
def test_same_task_results_as_hflm_on_tiny_llama(task, fake_sources):  # noqa: F811
    config = tiny_config("llama")
    config.max_position_embeddings = 1024  # the 6-shot TruthfulQA prompt is ~600 characters
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    answers = _assert_same_task_results(model, make_char_tokenizer(), task, limit=3)
    assert len(answers) == {"truthfulqa_mc2": 15, "arc_style": 8}[task]  # every choice scored


def test_evaluate_tasks_prefix_sharing_switch(fake_sources):  # noqa: F811
    model, tokenizer = make_tiny_model("llama"), make_char_tokenizer()
    shared = evaluate_tasks(model, tokenizer, ["arc_style"], limit=2, batch_size=4)
    plain = evaluate_tasks(model, tokenizer, ["arc_style"], limit=2, batch_size=4,
                           prefix_sharing=False)
    assert shared["tasks"]["arc_style"]["items"] == plain["tasks"]["arc_style"]["items"]
    assert shared.keys() == plain.keys() == {"harness", "limit", "tasks"}


@pytest.mark.real
def test_same_task_results_as_hflm_on_smollm2(smollm2, real_bigbench):
    model, tokenizer = smollm2
    # The 3 TruthfulQA questions with fewest choices (3, 2, 4), to keep HFLM's run short.
    mc2 = _assert_same_task_results(model, tokenizer, "truthfulqa_mc2",
                                    samples={"truthfulqa_mc2": [42, 47, 28]})
    arc = _assert_same_task_results(model, tokenizer, "arc_style", limit=3)
    assert len(mc2) == 9 and len(arc) == 12
