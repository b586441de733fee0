"""The golden corpus: inputs and expected outputs generated from the reference, checked in.

Forward cases are made in `forward`, backward cases in `backward` and FP8 cases in
`fp8` (on forward's helpers); the manifest lists them apart ("cases",
"backward_cases", "fp8_cases"), and regenerate, check_regeneration and the loaders here cover all
three. Each case is one deterministic, uncompressed zip (`<name>.npz`; `storage`) of arrays
stored as raw bit patterns (uint8/uint16/uint32, so bfloat16 and FP8 need no pickle), plus a
manifest with SHA-256 digests.
Regenerating writes identical bytes on any machine: the data come from a seeded generator, the
expected outputs from `bridge.reference`, and the zip entries carry a fixed timestamp.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Tuple

import numpy as np

from ..numerics import reference
from ..numerics.contract import CONTRACT_VERSION
from . import backward, fp8
from .forward import CaseSpec, GoldenCase, case_specs, generate_case
from .storage import _numpy_dtype, _zip_bytes, output_key

if TYPE_CHECKING:
    from .backward import BackwardCase, BackwardSpec
    from .fp8 import Fp8Case, Fp8Spec

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "tests" / "golden"
MANIFEST = "manifest.json"


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


def regenerate(directory: Path = DEFAULT_DIR) -> int:
    """Write every case file and the manifest; removes stale case files. Returns the case count."""
    directory.mkdir(parents=True, exist_ok=True)
    entries: Dict[str, List[dict]] = {section: [] for section in SECTIONS}
    names = set()
    for section, file_name, data, entry in render():
        (directory / file_name).write_bytes(data)
        entries[section].append(entry)
        names.add(file_name)
    for stale in directory.glob("*.npz"):
        if stale.name not in names:
            stale.unlink()
    (directory / MANIFEST).write_bytes(_manifest_bytes(entries))
    return len(names)


def check_regeneration(directory: Path = DEFAULT_DIR) -> List[str]:
    """Regenerate in memory and list every file whose bytes differ from the checked-in corpus."""
    problems, names = [], set()
    entries: Dict[str, List[dict]] = {section: [] for section in SECTIONS}
    for section, file_name, data, entry in render():
        entries[section].append(entry)
        names.add(file_name)
        path = directory / file_name
        if not path.exists() or path.read_bytes() != data:
            problems.append(file_name)
    problems += sorted(p.name for p in directory.glob("*.npz") if p.name not in names)
    manifest = directory / MANIFEST
    if not manifest.exists() or manifest.read_bytes() != _manifest_bytes(entries):
        problems.append(MANIFEST)
    return problems


def load_manifest(directory: Path = DEFAULT_DIR) -> dict:
    """The manifest: "cases" lists the forward cases, "backward_cases" the backward ones, "fp8_cases" the FP8 ones."""
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"golden corpus manifest not found at {path}; run `bi-norm golden --regenerate`")
    return json.loads(path.read_text())


def _load_entries(directory: Path, section: str,
                  verify_digests: bool) -> Iterator[Tuple[dict, Dict[str, np.ndarray]]]:
    """(manifest entry, arrays by name) for every case in one of the manifest's lists."""
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


def load_corpus(directory: Path = DEFAULT_DIR, *, verify_digests: bool = True) -> List[GoldenCase]:
    """Every forward case of the checked-in corpus, digests verified against the manifest."""
    cases = []
    for entry, arrays in _load_entries(directory, FORWARD, verify_digests):
        outputs = tuple((m, float(o)) for m, o in entry["outputs"])
        spec = CaseSpec(entry["name"], entry["dtype"], entry["n"], entry["residual"], tuple(entry["patterns"]),
                        entry["eps"], outputs)
        out = {pair: arrays[output_key("out", *pair)] for pair in outputs}
        cases.append(GoldenCase(spec, arrays["x"], arrays["weight"], arrays.get("residual"), out,
                                arrays.get("new_residual")))
    return cases


def load_backward_corpus(directory: Path = DEFAULT_DIR, *, verify_digests: bool = True) -> List[BackwardCase]:
    """Every backward case of the checked-in corpus, digests verified against the manifest."""
    return [backward.case_from(entry, arrays)
            for entry, arrays in _load_entries(directory, BACKWARD, verify_digests)]


def load_fp8_corpus(directory: Path = DEFAULT_DIR, *, verify_digests: bool = True) -> List[Fp8Case]:
    """Every FP8 case of the checked-in corpus, digests verified against the manifest."""
    return [fp8.case_from(entry, arrays) for entry, arrays in _load_entries(directory, FP8, verify_digests)]
