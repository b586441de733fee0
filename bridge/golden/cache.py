"""Where the corpus is: tests/golden/ in a checkout; where bi-norm is installed from a wheel, which
ships only the digests (corpus.DIGESTS, about 20 KB against the corpus's 15 MB), a cache that
regeneration fills from the reference and that is used only once every file matches its digest."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

from .corpus import DEFAULT_DIR, DIGESTS, MANIFEST, corpus_files


class CorpusError(Exception):
    """Regeneration here does not give the bytes whose digests the package ships."""


def corpus_dir() -> Path:
    """DEFAULT_DIR where it holds a corpus (a checkout), else the cache (cached_corpus)."""
    return DEFAULT_DIR if (DEFAULT_DIR / MANIFEST).exists() else cached_corpus()


def cache_root() -> Path:
    """$XDG_CACHE_HOME/bi-norm, else ~/.cache/bi-norm."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bi-norm"


def _digests(text: str) -> Dict[str, str]:
    return {name: digest for digest, name in (line.split("  ", 1) for line in text.splitlines())}


def cached_corpus(root: Optional[Path] = None) -> Path:
    """The corpus under root (default cache_root()), in a directory named by DIGESTS' own digest (a
    new bi-norm gets a new one). A directory whose manifest matches its digest is used as it is (the
    loaders check every case against the manifest); otherwise the corpus is regenerated (about a
    second), checked file by file against DIGESTS (CorpusError if any differs: nothing is written)
    and moved into place whole, so that a concurrent run sees all of it or none."""
    shipped = DIGESTS.read_bytes()
    expected = _digests(shipped.decode())
    directory = (root or cache_root()) / f"golden-{hashlib.sha256(shipped).hexdigest()[:16]}"
    manifest = directory / MANIFEST
    if manifest.exists() and hashlib.sha256(manifest.read_bytes()).hexdigest() == expected.get(MANIFEST):
        return directory
    files = corpus_files()
    got = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    differ = sorted(name for name in expected.keys() | got.keys() if expected.get(name) != got.get(name))
    if differ:
        raise CorpusError(f"golden corpus: regenerated here, {len(differ)} file(s) differ from the SHA-256 digests "
                          f"in {DIGESTS} (first: {differ[0]}); this numpy or ml_dtypes does not reproduce the "
                          f"committed corpus")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{directory.name}.", dir=directory.parent))
    for name, data in files.items():
        (staging / name).write_bytes(data)
    shutil.rmtree(directory, ignore_errors=True)  # an incomplete or damaged one
    try:
        os.replace(staging, directory)
    except OSError:  # a concurrent run moved its (identical) corpus there first
        shutil.rmtree(staging)
    return directory
