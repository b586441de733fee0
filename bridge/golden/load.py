"""The golden corpus read back: the manifest and every case of one kind, digests checked; from
`directory`, by default where cache.corpus_dir() finds the corpus (tests/golden/ in a checkout)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import backward, fp8
from .backward import BackwardCase
from .cache import corpus_dir
from .corpus import BACKWARD, FORWARD, FP8, MANIFEST
from .forward import CaseSpec, GoldenCase
from .fp8 import Fp8Case
from .storage import _numpy_dtype, output_key


def load_manifest(directory: Optional[Path] = None) -> dict:
    """The manifest: "cases" lists the forward cases, "backward_cases" the backward ones, "fp8_cases" the FP8 ones."""
    path = (corpus_dir() if directory is None else directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"golden corpus manifest not found at {path}; run `bi-norm golden --regenerate`")
    return json.loads(path.read_text())


def _load_entries(directory: Optional[Path], section: str,
                  verify_digests: bool) -> Iterator[Tuple[dict, Dict[str, np.ndarray]]]:
    """(manifest entry, arrays by name) for every case in one of the manifest's lists."""
    directory = corpus_dir() if directory is None else directory
    manifest = load_manifest(directory)
    if section not in manifest:
        raise ValueError(f"golden corpus: the manifest has no {section!r}; run `bi-norm golden --regenerate`")
    for entry in manifest[section]:
        data = (directory / entry["file"]).read_bytes()
        if verify_digests and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"golden corpus: {entry['file']} does not match its SHA-256 in the manifest")
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            yield entry, {
                name[:-4]: np.lib.format.read_array(io.BytesIO(zf.read(name))).view(
                    _numpy_dtype(entry["dtypes"][name[:-4]]))
                for name in zf.namelist()
            }


def load_corpus(directory: Optional[Path] = None, *, verify_digests: bool = True) -> List[GoldenCase]:
    """Every forward case of the corpus, digests verified against the manifest."""
    cases = []
    for entry, arrays in _load_entries(directory, FORWARD, verify_digests):
        outputs = tuple((m, float(o)) for m, o in entry["outputs"])
        spec = CaseSpec(entry["name"], entry["dtype"], entry["n"], entry["residual"], tuple(entry["patterns"]),
                        entry["eps"], outputs)
        out = {pair: arrays[output_key("out", *pair)] for pair in outputs}
        cases.append(GoldenCase(spec, arrays["x"], arrays["weight"], arrays.get("residual"), out,
                                arrays.get("new_residual")))
    return cases


def load_backward_corpus(directory: Optional[Path] = None, *, verify_digests: bool = True) -> List[BackwardCase]:
    """Every backward case of the corpus, digests verified against the manifest."""
    return [backward.case_from(entry, arrays)
            for entry, arrays in _load_entries(directory, BACKWARD, verify_digests)]


def load_fp8_corpus(directory: Optional[Path] = None, *, verify_digests: bool = True) -> List[Fp8Case]:
    """Every FP8 case of the corpus, digests verified against the manifest."""
    return [fp8.case_from(entry, arrays) for entry, arrays in _load_entries(directory, FP8, verify_digests)]
