"""Real English sentences for the search figures: WordNet 3.0's glosses and examples.

About 150k distinct definitions ("a small shop that sells ...") and usage
examples ("she leafed through the volume"), written by people, with the
common words, lengths and spread of topics of real text: unlike clustered
random vectors, their embeddings are not a few tidy clusters, and unlike a
made-up vocabulary, their words follow English's frequencies.

The text comes from Debian's ``wordnet-base`` package (WordNet 3.0 License:
use and redistribution for any purpose, with Princeton's notice), downloaded
once from deb.debian.org, checked against its SHA-256 and kept under
``~/.cache/nexus-bench``. Nothing of it is stored in the repository.
"""

from __future__ import annotations

import functools
import hashlib
import io
import lzma
import random
import re
import tarfile
import urllib.request
from pathlib import Path

from bench.core import BenchFailed, progress

PACKAGE_URL = "https://deb.debian.org/debian/pool/main/w/wordnet/wordnet-base_3.0-37_all.deb"
PACKAGE_SHA256 = "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"
CACHE = Path.home() / ".cache" / "nexus-bench"
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
MIN_WORDS, MAX_WORDS = 4, 30
QUOTED = re.compile(r'"([^"]+)"')


def _package() -> bytes:
    path = CACHE / PACKAGE_URL.rsplit("/", 1)[1]
    if not path.exists():
        progress(f"downloading {PACKAGE_URL}")
        try:
            with urllib.request.urlopen(PACKAGE_URL, timeout=60) as response:
                body = response.read()
        except OSError as exc:
            raise BenchFailed(f"corpus: cannot download {PACKAGE_URL}: {exc}") from exc
        if hashlib.sha256(body).hexdigest() != PACKAGE_SHA256:
            raise BenchFailed(f"corpus: {PACKAGE_URL} does not have the expected SHA-256")
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    body = path.read_bytes()
    if hashlib.sha256(body).hexdigest() != PACKAGE_SHA256:
        raise BenchFailed(f"corpus: {path} does not have the expected SHA-256; remove it to download it again")
    return body


def _ar_member(archive: bytes, name: str) -> bytes:
    """One member of a Debian package (an ar archive: a magic line, then 60-byte headers)."""
    offset = 8
    while offset + 60 <= len(archive):
        header = archive[offset:offset + 60]
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode())
        if member == name:
            return archive[offset + 60:offset + 60 + size]
        offset += 60 + size + size % 2
    raise BenchFailed(f"corpus: {name} not found in {PACKAGE_URL}")


def _sentences(data: str) -> list[str]:
    """A data file's glosses (up to the first ';') and its quoted examples, of 4-30 words."""
    found = []
    for line in data.splitlines():
        if line.startswith("  ") or " | " not in line:  # the license header, or no gloss
            continue
        gloss = line.split(" | ", 1)[1].strip()
        found.append(gloss.split(";", 1)[0])
        found.extend(QUOTED.findall(gloss))
    return [s.strip() for s in found if MIN_WORDS <= len(s.split()) <= MAX_WORDS]


@functools.cache
def sentences() -> list[str]:
    """The corpus's distinct sentences, in a fixed order (shuffled with a fixed seed)."""
    data = lzma.decompress(_ar_member(_package(), "data.tar.xz"))
    texts: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.name.rsplit("/", 1)[-1] in DATA_FILES:
                file = tar.extractfile(member)
                assert file is not None
                texts.update(_sentences(file.read().decode("latin-1")))
    ordered = sorted(texts)
    random.Random(7).shuffle(ordered)
    return ordered


def take(start: int, count: int) -> list[str]:
    """``count`` sentences from ``start`` of the corpus (negative: from its end)."""
    chosen = sentences()[start:][:count]
    if len(chosen) < count:
        raise BenchFailed(f"corpus: {len(sentences())} sentences, {count} wanted from {start}")
    return chosen
