"""Pinned offline data sources: archives from PyPI and Debian's package archive, nothing else.

No model or data hub is reachable from where mergeflow runs, but package registries are. Every
source is one archive pinned by file name and sha256; the few files the tasks need are extracted
into a cache (`MERGEFLOW_DATA_DIR`, default `~/.cache/mergeflow/data`) on first use:

    <cache>/downloads/<archive>        the archive as fetched (or placed there by hand)
    <cache>/<name>-<version>/<file>    the extracted files that `source_path(name)` points at

Both are written under a temporary name and renamed into place when complete, so an interrupted
fetch leaves nothing that looks finished.
"""

from __future__ import annotations

import fnmatch
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mergeflow.errors import DataError
from mergeflow.hashing import file_sha256
from mergeflow.storage import locate

DEBIAN_MIRROR = "https://deb.debian.org/debian"
WORDNET_POS = ("noun", "verb", "adj", "adv")


@dataclass(frozen=True)
class Source:
    name: str
    registry: Literal["pypi", "debian"]
    package: str
    version: str
    filename: str  # the archive's name in <cache>/downloads; for Debian, the pool's name
    sha256: str
    prefix: str  # folder inside the archive that the extracted files are taken from
    files: tuple[str, ...]  # fnmatch patterns relative to prefix; each must match a member
    description: str
    licence: str
    nested: str = ""  # a tarball inside the archive that holds prefix/files (vader's data)
    pip_args: tuple[str, ...] = ()
    pool_path: str = ""  # Debian: the archive's folder under pool/

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.version.split(':')[-1]}"  # no Debian epoch: a colon in a path is trouble


SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        Source(
            name="vader",
            registry="pypi",
            package="vaderSentiment",
            version="3.3.2",
            filename="vaderSentiment-3.3.2.tar.gz",
            sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            nested="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
            prefix="hutto_ICWSM_2014/",
            files=(
                "amazonReviewSnippets_GroundTruth.txt",
                "movieReviewSnippets_GroundTruth.txt",
                "nytEditorialSnippets_GroundTruth.txt",
                "tweets_GroundTruth.txt",
            ),
            description="VADER's human-rated sentences (Hutto & Gilbert, ICWSM 2014): "
            "movie and product reviews, tweets, NYT editorials, each with a mean rating in [-4, 4]",
            licence="MIT (vaderSentiment)",
            # The data is only in the sdist; pip builds the sdist's metadata to download it.
            pip_args=("--no-binary", ":all:"),
        ),
        Source(
            name="chatterbot",
            registry="pypi",
            package="chatterbot-corpus",
            version="1.3.3",
            filename="chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
            sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
            prefix="chatterbot_corpus/data/english/",
            files=("*.yml",),
            description="ChatterBot's English dialogue corpus: question and answer pairs by topic",
            licence="BSD-3-Clause (chatterbot-corpus)",
            pip_args=("--only-binary", ":all:"),
        ),
        Source(
            name="chatterbot-languages",
            registry="pypi",
            package="chatterbot-corpus",
            version="1.3.3",
            filename="chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
            sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
            prefix="chatterbot_corpus/data/",
            # The four languages in Latin script with at least 500 distinct utterances.
            files=("italian/*.yml", "spanish/*.yml", "portuguese/*.yml", "dutch/*.yml"),
            description="ChatterBot's dialogue corpora in Italian, Spanish, Portuguese and Dutch",
            licence="BSD-3-Clause (chatterbot-corpus)",
            pip_args=("--only-binary", ":all:"),
        ),
        Source(
            name="gensim",
            registry="pypi",
            package="gensim",
            version="4.4.0",
            filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
            prefix="gensim/test/test_data/",
            files=(
                "questions-words.txt",
                "wordsim353.tsv",
                "simlex999.txt",
                "head500.noblanks.cor",
                "lee_background.cor",
                "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
            ),
            description="gensim's test data: word2vec analogies, WordSim-353, SimLex-999, "
            "a Lee news corpus and a shortened English Wikipedia dump (the package is never imported)",
            licence="LGPL-2.1 (gensim); the word lists carry their authors' terms",
            # One fixed wheel on any host: the data is the same in every wheel, the name is not.
            pip_args=(
                "--only-binary",
                ":all:",
                "--platform",
                "manylinux_2_28_x86_64",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
            ),
        ),
        Source(
            name="wordnet",
            registry="debian",
            package="wordnet-base",
            version="1:3.0-37",
            filename="wordnet-base_3.0-37_all.deb",
            sha256="61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
            pool_path="main/w/wordnet",
            prefix="usr/share/wordnet/",
            files=tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in WORDNET_POS),
            description="WordNet 3.0 database files: synsets with glosses, examples and relations",
            licence="WordNet 3.0 licence (permissive, keep the notice)",
        ),
        Source(
            name="fortunes",
            registry="debian",
            package="fortunes",
            version="1:1.99.1-7.3",
            filename="fortunes_1.99.1-7.3_all.deb",
            sha256="41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
            pool_path="main/f/fortune-mod",
            prefix="usr/share/games/fortunes/",
            # The categories the tasks read (mergeflow/eval/tasks/text.py), not the .dat indexes.
            files=(
                *("computers", "politics", "science", "food", "love", "sports", "law", "education"),
                *("wisdom", "people", "platitudes", "humorists", "miscellaneous", "work", "men-women"),
            ),
            description="BSD fortune cookies by category (quotes and jokes), texts separated by '%' lines",
            licence="BSD fortune-mod data, Debian's non-offensive set",
        ),
    )
}


def data_dir() -> Path:
    return Path(os.environ.get("MERGEFLOW_DATA_DIR", Path.home() / ".cache" / "mergeflow" / "data"))


def source_path(name: str) -> Path:
    """The folder of `name`'s extracted files, fetching and extracting the archive on first use."""
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    root = data_dir()
    dest = root / source.folder
    if dest.is_dir():
        return dest
    archive = _archive(source, root / "downloads")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{source.folder}-", dir=root))
    try:
        _extract(source, archive, staging)
        try:
            staging.rename(dest)
        except OSError:
            # Another process finished the same extraction first; its copy is as good as ours.
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _archive(source: Source, downloads: Path) -> Path:
    """The verified archive: the one in downloads/ if present, else fetched from the registry."""
    archive = downloads / source.filename
    if archive.exists():
        _verify(source, archive, f"delete it, or replace it with {source.package} {source.version}")
        return archive
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=downloads) as tmp:
        fetched = _fetch(source, Path(tmp))
        _verify(source, fetched, "the registry served a different file than the one pinned")
        os.replace(fetched, archive)
    return archive


def _verify(source: Source, path: Path, advice: str) -> None:
    actual = file_sha256(locate(str(path)))
    if actual != source.sha256:
        raise DataError(
            f"{path}: sha256 mismatch for {source.package} {source.version}: "
            f"expected {source.sha256}, got {actual} ({advice})"
        )


def _fetch(source: Source, tmp: Path) -> Path:
    try:
        if source.registry == "pypi":
            return _fetch_pypi(source, tmp)
        return _fetch_debian(source, tmp)
    except (OSError, subprocess.SubprocessError, DataError) as error:
        why = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise DataError(
            f"could not fetch {source.registry} package {source.package} {source.version} ({why}); "
            f"without network, put {source.filename} (sha256 {source.sha256}) "
            f"at {data_dir() / 'downloads' / source.filename}"
        ) from None


def _fetch_pypi(source: Source, tmp: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
        "--dest", str(tmp), *source.pip_args, f"{source.package}=={source.version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise DataError(result.stderr.strip() or f"pip download exited with {result.returncode}")
    fetched = tmp / source.filename
    if not fetched.exists():
        got = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
        raise DataError(f"pip download gave {got}, not {source.filename}")
    return fetched


def _fetch_debian(source: Source, tmp: Path) -> Path:
    """apt-get download where apt works (it uses the host's mirror and proxy), else the pool URL."""
    fetched = tmp / source.filename
    if shutil.which("apt-get"):
        result = subprocess.run(
            ["apt-get", "download", "-q", f"{source.package}={source.version}"],
            cwd=tmp, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        debs = list(tmp.glob("*.deb"))
        if result.returncode == 0 and len(debs) == 1:
            debs[0].rename(fetched)  # apt names it with the epoch (pkg_1%3a...); the pool does not
            return fetched
        for deb in debs:
            deb.unlink()
    url = f"{DEBIAN_MIRROR}/pool/{source.pool_path}/{source.filename}"
    with urllib.request.urlopen(url, timeout=60) as response, open(fetched, "wb") as out:
        shutil.copyfileobj(response, out)
    return fetched


def _extract(source: Source, archive: Path, dest: Path) -> None:
    """Write prefix/files of the archive (or of its nested tarball) into dest, prefix removed."""
    where = f"{archive}" + (f" ({source.nested})" if source.nested else "")

    def wanted(name: str) -> bool:
        return name.startswith(source.prefix) or name == source.nested

    try:
        members = _read_members(archive, wanted)
        if source.nested:
            if source.nested not in members:
                raise DataError(f"{archive}: no member {source.nested}")
            with tarfile.open(fileobj=io.BytesIO(members[source.nested])) as inner:
                members = _tar_members(inner, wanted)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise DataError(f"{where}: cannot read archive ({error})") from None
    names = sorted(m[len(source.prefix) :] for m in members if m.startswith(source.prefix))
    for pattern in source.files:
        # fnmatch's '*' also matches '/': a pattern matches members exactly as deep as itself.
        depth = pattern.count("/")
        matched = [n for n in names if n.count("/") == depth and fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise DataError(f"{where}: no member {source.prefix}{pattern}")
        for relative in matched:
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            (dest / relative).write_bytes(members[source.prefix + relative])


def _read_members(archive: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The wanted regular-file members of a wheel, sdist or .deb, by path ('./' removed)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir() and wanted(i.filename)}
    if archive.suffix == ".deb":
        with tarfile.open(fileobj=io.BytesIO(_deb_data_tar(archive))) as tf:
            return _tar_members(tf, wanted)
    with tarfile.open(archive) as tf:
        return _tar_members(tf, wanted)


def _tar_members(tf: tarfile.TarFile, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    members = {}
    for info in tf:
        name = info.name.removeprefix("./")
        if info.isfile() and wanted(name):
            extracted = tf.extractfile(info)
            assert extracted is not None  # isfile() members always have contents
            members[name] = extracted.read()
    return members


def _deb_data_tar(archive: Path) -> bytes:
    """The data.tar.* member of a .deb (an ar archive), read in Python: no dpkg-deb needed, so
    one code path works on any host. tarfile then reads the xz inside."""
    blob = archive.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DataError(f"{archive}: not a Debian package (no ar header)")
    offset = 8
    while offset + 60 <= len(blob):
        header = blob[offset : offset + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[offset + 60 : offset + 60 + size]
        if len(body) < size:
            raise DataError(f"{archive}: truncated in ar member {name}")
        if name.startswith("data.tar"):
            return body
        offset += 60 + size + (size % 2)  # ar pads members to even offsets
    raise DataError(f"{archive}: no data.tar member")
