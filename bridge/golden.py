"""The golden corpus: inputs and expected outputs generated from the reference, checked in.

Each case is one deterministic, uncompressed zip (`<name>.npz`) of arrays stored as raw bit
patterns (uint16/uint32, so bfloat16 needs no pickle), plus a manifest with SHA-256 digests.
Regenerating writes identical bytes on any machine: the data come from a seeded generator, the
expected outputs from `bridge.reference`, and the zip entries carry a fixed timestamp.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import reference
from .contract import CONTRACT_VERSION

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"
MANIFEST = "manifest.json"
# Each case stores two of the four (mode, weight_offset) outputs, alternating, so that every pair
# is covered across the corpus at half the size.
OUTPUT_SETS = ((("llama", 0.0), ("fp32", 1.0)), (("llama", 1.0), ("fp32", 0.0)))
SIZES = (1, 2, 3, 7, 64, 100, 127, 128, 129, 1000, 1023, 1024, 1025, 2048, 4096, 5120, 8192, 16384, 65536)
# Row patterns that stress rounding and the special values NUMERICS.md defines.
PATTERNS = ("normal", "wide_range", "outliers", "tiny", "zeros", "huge", "inf", "nan", "mixed")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    name: str
    dtype: str
    n: int
    residual: str  # "none", "same" (x's dtype) or "float32"
    patterns: Tuple[str, ...]  # one per row
    eps: float
    outputs: Tuple[Tuple[str, float], ...]  # the (mode, weight_offset) pairs stored


@dataclasses.dataclass
class GoldenCase:
    spec: CaseSpec
    x: np.ndarray
    weight: np.ndarray
    residual: Optional[np.ndarray]
    # (mode, weight_offset) -> out; new_residual is the same for every mode and offset.
    out: Dict[Tuple[str, float], np.ndarray]
    new_residual: Optional[np.ndarray]


def _rows_for(n: int) -> int:
    if n <= 129:
        return len(PATTERNS)
    if n <= 1025:
        return 3
    if n <= 2048:
        return 2
    return 1


def case_specs() -> List[CaseSpec]:
    """The corpus: every dtype x residual kind for each n, except the longest rows (one kind each)."""
    specs = []
    for d in DTYPES:
        kinds = ("none", "float32") if d == "float32" else ("none", "same", "float32")
        for i, n in enumerate(SIZES):
            rows = _rows_for(n)
            chosen = kinds if n <= 4096 else (kinds[i % len(kinds)],)
            for k, kind in enumerate(chosen):
                start = (i + k) % len(PATTERNS)
                pats = PATTERNS if rows == len(PATTERNS) else tuple(
                    "mixed" if rows == 1 else PATTERNS[(start + r) % len(PATTERNS)] for r in range(rows))
                eps = 1e-5 if (i + k) % 3 == 0 else 1e-6
                specs.append(CaseSpec(f"{d}-n{n}-res_{kind}", d, n, kind, pats, eps, OUTPUT_SETS[(i + k) % 2]))
    return specs


def _pattern_row(rng: np.random.Generator, pattern: str, n: int, dtype: str) -> np.ndarray:
    """One float64 row of the named pattern, scaled to the range of `dtype`."""
    f16 = dtype == "float16"
    sign = rng.choice([-1.0, 1.0], n)
    if pattern == "normal":
        return rng.standard_normal(n)
    if pattern == "wide_range":
        return sign * np.exp2(rng.uniform(-20, 15, n) if f16 else rng.uniform(-60, 60, n))
    if pattern == "outliers":
        row = rng.standard_normal(n)
        row[rng.integers(0, n, max(1, n // 64))] *= 300.0 if f16 else 3000.0
        return row
    if pattern == "tiny":  # float16 subnormals; float32 squares that underflow to subnormals
        return sign * np.exp2(rng.uniform(-24, -14, n) if f16 else rng.uniform(-70, -62, n))
    if pattern == "zeros":
        return np.zeros(n)
    if pattern == "huge":  # squares overflow float32 (float16 cannot: 65504^2 < 2^32)
        return sign * (np.exp2(rng.uniform(14, 15.9, n)) if f16 else np.exp2(rng.uniform(64, 70, n)))
    if pattern in ("inf", "nan"):
        row = rng.standard_normal(n)
        row[rng.integers(0, n)] = np.inf * rng.choice([-1.0, 1.0]) if pattern == "inf" else np.nan
        return row
    if pattern == "mixed":  # normal body, outlier channels and a tiny stretch in one long row
        row = rng.standard_normal(n)
        row[rng.integers(0, n, max(1, n // 256))] *= 300.0
        start = int(rng.integers(0, max(1, n - n // 8)))
        row[start:start + n // 8] *= 1e-3
        return row
    raise ValueError(f"unknown pattern {pattern!r}")


def _as(values: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        return values.astype(np.float32).astype(reference.numpy_dtype(dtype))


def generate_case(spec: CaseSpec) -> GoldenCase:
    """Inputs from a generator seeded by the case name; expected outputs from the reference."""
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    x = _as(np.stack([_pattern_row(rng, p, spec.n, spec.dtype) for p in spec.patterns]), spec.dtype)
    w = 1.0 + 0.25 * rng.standard_normal(spec.n)
    w[rng.integers(0, spec.n)] = -0.0  # a signed zero and a negative weight
    weight = _as(w, spec.dtype)
    residual = None
    if spec.residual != "none":
        r_dtype = spec.dtype if spec.residual == "same" else "float32"
        residual = _as(np.stack([_pattern_row(rng, p, spec.n, spec.dtype) for p in spec.patterns]), r_dtype)
    out, new_residual = {}, None
    for mode, offset in spec.outputs:
        result = reference.rms_norm(x, weight, spec.eps, residual, mode=mode, weight_offset=offset)
        if residual is None:
            out[(mode, offset)] = result
        else:
            out[(mode, offset)], new_residual = result
    return GoldenCase(spec, x, weight, residual, out, new_residual)


def _out_key(mode: str, offset: float) -> str:
    return f"out_{mode}_offset{offset:g}"


def _arrays(case: GoldenCase) -> Dict[str, np.ndarray]:
    arrays = {"x": case.x, "weight": case.weight}
    if case.residual is not None:
        arrays["residual"] = case.residual
        arrays["new_residual"] = case.new_residual
    for (mode, offset), out in case.out.items():
        arrays[_out_key(mode, offset)] = out
    return arrays


def _zip_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            payload = io.BytesIO()
            np.lib.format.write_array(payload, reference.bits(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, payload.getvalue())
    return buf.getvalue()


def _manifest_entry(spec: CaseSpec, case: GoldenCase, digest: str) -> dict:
    entry = dataclasses.asdict(spec)
    entry["patterns"] = list(spec.patterns)
    entry["outputs"] = [list(pair) for pair in spec.outputs]
    entry["file"] = f"{spec.name}.npz"
    entry["sha256"] = digest
    entry["dtypes"] = {k: reference.dtype_name(v.dtype) for k, v in sorted(_arrays(case).items())}
    return entry


def render() -> Iterator[Tuple[str, bytes, dict]]:
    """(file name, bytes, manifest entry) for every case, freshly generated."""
    for spec in case_specs():
        case = generate_case(spec)
        data = _zip_bytes(_arrays(case))
        yield f"{spec.name}.npz", data, _manifest_entry(spec, case, hashlib.sha256(data).hexdigest())


def _manifest_bytes(entries: List[dict]) -> bytes:
    doc = {"contract_version": CONTRACT_VERSION, "cases": entries}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def regenerate(directory: Path = DEFAULT_DIR) -> int:
    """Write every case file and the manifest; removes stale case files. Returns the case count."""
    directory.mkdir(parents=True, exist_ok=True)
    entries, names = [], set()
    for file_name, data, entry in render():
        (directory / file_name).write_bytes(data)
        entries.append(entry)
        names.add(file_name)
    for stale in directory.glob("*.npz"):
        if stale.name not in names:
            stale.unlink()
    (directory / MANIFEST).write_bytes(_manifest_bytes(entries))
    return len(entries)


def check_regeneration(directory: Path = DEFAULT_DIR) -> List[str]:
    """Regenerate in memory and list every file whose bytes differ from the checked-in corpus."""
    problems, entries, names = [], [], set()
    for file_name, data, entry in render():
        entries.append(entry)
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
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"golden corpus manifest not found at {path}; run `bi-norm golden --regenerate`")
    return json.loads(path.read_text())


def load_corpus(directory: Path = DEFAULT_DIR, *, verify_digests: bool = True) -> List[GoldenCase]:
    """Every case of the checked-in corpus, digests verified against the manifest."""
    cases = []
    for entry in load_manifest(directory)["cases"]:
        data = (directory / entry["file"]).read_bytes()
        if verify_digests and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"golden corpus: {entry['file']} does not match its SHA-256 in the manifest")
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            arrays = {
                name[:-4]: np.lib.format.read_array(io.BytesIO(zf.read(name))).view(
                    reference.numpy_dtype(entry["dtypes"][name[:-4]]))
                for name in zf.namelist()
            }
        outputs = tuple((m, float(o)) for m, o in entry["outputs"])
        spec = CaseSpec(entry["name"], entry["dtype"], entry["n"], entry["residual"], tuple(entry["patterns"]),
                        entry["eps"], outputs)
        out = {pair: arrays[_out_key(*pair)] for pair in outputs}
        cases.append(GoldenCase(spec, arrays["x"], arrays["weight"], arrays.get("residual"), out,
                                arrays.get("new_residual")))
    return cases
