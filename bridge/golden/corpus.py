"""The golden corpus: inputs and expected outputs generated from the reference, checked in.

Forward cases are made in `forward`, backward cases in `backward` and FP8 cases in `fp8` (on
forward's helpers); the manifest lists them apart ("cases", "backward_cases", "fp8_cases"), and
regenerate and check_regeneration here cover all three (`load` reads them back; `cache` makes them
where bi-norm is installed without tests/golden/, from the digests in DIGESTS). Each case is one
deterministic, uncompressed zip (`<name>.npz`; `storage`) of arrays stored as raw bit patterns
(uint8/uint16/uint32, so bfloat16 and FP8 need no pickle), plus a manifest with SHA-256 digests.
Regenerating writes identical bytes on any machine: the data come from a seeded generator, the
expected outputs from `bridge.reference`, and the zip entries carry a fixed timestamp.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Tuple

import numpy as np

from ..numerics import reference
from ..numerics.contract import CONTRACT_VERSION
from . import backward, fp8
from .forward import CaseSpec, GoldenCase, case_specs, generate_case
from .storage import _zip_bytes, output_key

if TYPE_CHECKING:
    from .backward import BackwardSpec
    from .fp8 import Fp8Spec

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "tests" / "golden"
MANIFEST = "manifest.json"
# Every file's SHA-256 (sha256sum's format), shipped in the package: a wheel carries no tests/golden/,
# so an installed bi-norm regenerates the corpus and checks it against these (bridge.golden.cache).
DIGESTS = Path(__file__).with_name("SHA256SUMS")


def _arrays(case: GoldenCase) -> Dict[str, np.ndarray]:
    arrays = {"x": case.x, "weight": case.weight}
    if case.residual is not None:
        arrays["residual"] = case.residual
        arrays["new_residual"] = case.new_residual
    for (mode, offset), out in case.out.items():
        arrays[output_key("out", mode, offset)] = out
    return arrays


def _rendered(spec: CaseSpec | BackwardSpec | Fp8Spec, arrays: Dict[str, np.ndarray],
              **extra) -> Tuple[str, bytes, dict]:
    """(file name, bytes, manifest entry) of one case: the spec's fields, `extra`, the file, its
    SHA-256 and the dtype of every stored array (the zip holds only bit patterns)."""
    data = _zip_bytes(arrays)
    entry = {**dataclasses.asdict(spec), **extra, "file": f"{spec.name}.npz",
             "sha256": hashlib.sha256(data).hexdigest(),
             "dtypes": {k: reference.dtype_name(v.dtype) for k, v in sorted(arrays.items())}}
    return entry["file"], data, entry


# The manifest's three lists: forward cases (the v1 corpus, unchanged), backward cases (v1.1) and
# FP8 cases (v1.2).
FORWARD, BACKWARD, FP8 = "cases", "backward_cases", "fp8_cases"
SECTIONS = (FORWARD, BACKWARD, FP8)


def render() -> Iterator[Tuple[str, str, bytes, dict]]:
    """(manifest list, file name, bytes, manifest entry) for every case: forward, backward, FP8."""
    for spec in case_specs():
        yield (FORWARD,) + _rendered(spec, _arrays(generate_case(spec)))
    for spec in backward.case_specs():
        yield (BACKWARD,) + _rendered(spec, backward.arrays(backward.generate_case(spec)),
                                      kind="backward")
    for spec in fp8.case_specs():
        yield (FP8,) + _rendered(spec, fp8.arrays(fp8.generate_case(spec)), kind="fp8")


def _manifest_bytes(entries: Dict[str, List[dict]]) -> bytes:
    doc = {"contract_version": CONTRACT_VERSION, **entries}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def corpus_files() -> Dict[str, bytes]:
    """Every file of the corpus by name, as regeneration writes it: the cases, then the manifest."""
    entries: Dict[str, List[dict]] = {section: [] for section in SECTIONS}
    files = {}
    for section, file_name, data, entry in render():
        entries[section].append(entry)
        files[file_name] = data
    files[MANIFEST] = _manifest_bytes(entries)
    return files


def sha256sums(files: Dict[str, bytes]) -> bytes:
    """The files' digests as DIGESTS holds them, sha256sum's format ("<hex>  <name>" a line, by name)."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items())).encode()


def regenerate(directory: Path = DEFAULT_DIR) -> int:
    """Write every case file and the manifest, and remove stale case files; for DEFAULT_DIR, DIGESTS
    too. Returns the case count."""
    directory.mkdir(parents=True, exist_ok=True)
    files = corpus_files()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    for stale in directory.glob("*.npz"):
        if stale.name not in files:
            stale.unlink()
    if directory.resolve() == DEFAULT_DIR:
        DIGESTS.write_bytes(sha256sums(files))
    return len(files) - 1


def check_regeneration(directory: Path = DEFAULT_DIR) -> List[str]:
    """Regenerate in memory and list every file whose bytes differ from the corpus in directory, and
    DIGESTS unless it holds the regenerated files' digests."""
    files = corpus_files()
    problems = [name for name, data in files.items()
                if name != MANIFEST and (not (directory / name).exists() or (directory / name).read_bytes() != data)]
    problems += sorted(p.name for p in directory.glob("*.npz") if p.name not in files)
    manifest = directory / MANIFEST
    if not manifest.exists() or manifest.read_bytes() != files[MANIFEST]:
        problems.append(MANIFEST)
    if not DIGESTS.exists() or DIGESTS.read_bytes() != sha256sums(files):
        problems.append(f"bridge/golden/{DIGESTS.name}")
    return problems
