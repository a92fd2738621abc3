"""Text splits, token windows and facts: deterministic, disjoint, and loud about bad requests."""

from __future__ import annotations

import pytest
import torch

from svdcompress import datasets
from svdcompress.errors import DatasetError

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _fake_corpus(n_docs: int = 40, words: int = 60) -> list[dict[str, str]]:
    return [
        {
            "title": f"doc-{i:03d}",
            "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)),
        }
        for i in range(n_docs)
    ]


@pytest.fixture
def fake_corpus(monkeypatch):
    corpus = _fake_corpus()
    monkeypatch.setattr(datasets, "load_corpus", lambda name: corpus)
    return corpus


def test_splits_are_disjoint_deterministic_and_one_in_four():
    titles = [f"title {i}" for i in range(400)]
    splits = datasets.assign_splits(titles)
    assert splits == datasets.assign_splits(list(reversed(titles)))
    held_out = [t for t in titles if splits[t] == "eval"]
    assert len(held_out) == 100 and set(splits.values()) == {"calib", "eval"}


def test_duplicate_titles_cannot_be_split():
    with pytest.raises(DatasetError, match="unique"):
        datasets.assign_splits(["a", "a"])


def test_load_documents_partitions_the_corpus(fake_corpus):
    calib = datasets.load_documents("wiki", "calib")
    held_out = datasets.load_documents("wiki", "eval")
    assert len(calib) + len(held_out) == len(fake_corpus) and len(held_out) == 10
    assert sorted(calib + held_out) == sorted(d["text"] for d in fake_corpus)


def test_windows_are_deterministic_non_overlapping_slices(fake_corpus, char_tokenizer):
    kwargs = {"seq_len": 50, "n_samples": 12, "seed": 3}
    windows = datasets.token_windows(char_tokenizer, "wiki", "eval", **kwargs)
    assert windows.shape == (12, 50) and windows.dtype == torch.long
    assert torch.equal(windows, datasets.token_windows(char_tokenizer, "wiki", "eval", **kwargs))
    other_seed = datasets.token_windows(
        char_tokenizer, "wiki", "eval", seq_len=50, n_samples=12, seed=4
    )
    assert not torch.equal(windows, other_seed)
    stream = datasets._token_stream(char_tokenizer, datasets.load_documents("wiki", "eval"))
    starts = [
        next(k for k in range(0, len(stream) - 49, 50) if stream[k : k + 50] == row.tolist())
        for row in windows
    ]
    assert len(set(starts)) == len(starts)  # distinct aligned slices: no overlap


def test_a_mixture_takes_an_equal_share_of_windows_from_each_source(monkeypatch, char_tokenizer):
    corpora = {"wiki": _fake_corpus(), "news": [{"title": f"n{i}", "text": "x" * 400} for i in range(40)]}
    monkeypatch.setattr(datasets, "load_corpus", lambda name: corpora[name])
    kwargs = {"seq_len": 50, "n_samples": 7, "seed": 3}
    mixed = datasets.token_windows(char_tokenizer, "wiki+news", "calib", **kwargs)
    assert torch.equal(mixed, datasets.token_windows(char_tokenizer, "wiki+news", "calib", **kwargs))
    x_id = char_tokenizer("x", add_special_tokens=False)["input_ids"][0]
    from_news = [bool((row == x_id).all()) for row in mixed]
    assert sum(from_news) == 3 and len(mixed) == 7  # wiki takes the odd window
    assert from_news != sorted(from_news, reverse=True)  # shuffled together, not concatenated
    wiki_only = datasets.token_windows(char_tokenizer, "wiki", "calib", seq_len=50, n_samples=4, seed=3)
    assert {tuple(r.tolist()) for r in wiki_only} == {tuple(r.tolist()) for r, n in zip(mixed, from_news, strict=True) if not n}


@pytest.mark.parametrize("source", ["wiki+", "wiki+wiki", "wiki+poems"])
def test_bad_mixtures_are_explained(source):
    with pytest.raises(DatasetError, match="wiki, sotu, news"):
        datasets.check_window_request(64, 4, source=source)


def test_documents_are_joined_with_a_blank_line(char_tokenizer):
    stream = datasets._token_stream(char_tokenizer, ["ab", "cd"])
    assert char_tokenizer.decode(stream) == "ab\n\ncd"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_samples": 0}, r"n_samples \(--samples\) must be at least 1"),
        ({"n_samples": -3}, "must be at least 1"),
        ({"seq_len": 0}, r"seq_len \(--seq-len\) must be a positive"),
        ({"seq_len": 300, "max_positions": 256}, "longer than the model's context of 256"),
        ({"n_samples": 10_000}, r"has \d+ tokens, i\.e\. \d+ windows of 64.*at most \d+ samples"),
    ],
)
def test_bad_window_requests_are_explained(fake_corpus, char_tokenizer, kwargs, message):
    request = {"seq_len": 64, "n_samples": 4, **kwargs}
    with pytest.raises(DatasetError, match=message):
        datasets.token_windows(char_tokenizer, "wiki", "eval", **request)


def test_unknown_dataset_and_split_are_named():
    with pytest.raises(DatasetError, match=r"unknown text dataset 'wikipedia'.*wiki, sotu, news"):
        datasets.load_corpus("wikipedia")
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        datasets.load_documents("wiki", "test")


def test_speech_cleaning_drops_stage_directions():
    text = "We will win. [Applause] Thank you. [Laughter]\n\n[Audience members cheered.] Next [2d] item"
    assert datasets._clean_speech(text) == "We will win. Thank you.\nNext [2d] item"


def test_wikitext_cleaning_keeps_prose_and_drops_markup():
    long_line = "The aardvark is a medium-sized burrowing nocturnal mammal native to Africa"
    wikitext = (
        f"{{{{Infobox animal|name=x}}}}\n== Biology ==\n[[File:A.jpg|thumb|caption]]\n"
        f"{long_line}.<ref>Some citation that must go away entirely</ref>\n"
        "It weighs between {{convert|60|and|80|kg}} and is about {{convert|1|m}} long when grown up.\n"
        "Short line here.\n[[Category:Mammals]]"
    )
    assert datasets._strip_wikitext(wikitext).splitlines() == [
        f"{long_line}.",
        "It weighs between 60 and 80 kg and is about 1 m long when grown up.",
    ]


def test_fact_answers_match_any_alias():
    fact = datasets.Fact("The genre of X is", "comedy", ("parody",))
    assert fact.answers == ("comedy", "parody")
    assert fact.to_dict() == {"prompt": "The genre of X is", "answers": ["comedy", "parody"]}
