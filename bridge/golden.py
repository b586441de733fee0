"""The golden corpus: inputs and expected outputs generated from the reference, checked in.

Forward cases are made here, backward cases in `golden_backward` and FP8 cases in `golden_fp8` (on
this module's helpers); the manifest lists them apart ("cases", "backward_cases", "fp8_cases"), and
regenerate, check_regeneration and the loaders cover all three. Each case is one deterministic,
uncompressed zip (`<name>.npz`) of arrays stored as raw bit patterns (uint8/uint16/uint32, so
bfloat16 and FP8 need no pickle), plus a manifest with SHA-256 digests.
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
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import reference
from .contract import CONTRACT_VERSION, FP8_FORMATS
from .reference_fp8 import fp8_numpy_dtype

if TYPE_CHECKING:
    from .golden_backward import BackwardCase, BackwardSpec
    from .golden_fp8 import Fp8Case, Fp8Spec

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


def pattern_row(rng: np.random.Generator, pattern: str, n: int, dtype: str) -> np.ndarray:
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


def as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to float32, then to `dtype` (bfloat16 as ml_dtypes.bfloat16)."""
    with np.errstate(over="ignore"):
        return values.astype(np.float32).astype(reference.numpy_dtype(dtype))


def pattern_rows(rng: np.random.Generator, patterns: Tuple[str, ...], n: int, dtype: str, as_: str,
                 row: Callable[..., np.ndarray] = pattern_row) -> np.ndarray:
    """One row per pattern from `row(rng, pattern, n, dtype)`, scaled to `dtype`'s range, stored as `as_`."""
    return as_dtype(np.stack([row(rng, p, n, dtype) for p in patterns]), as_)


def random_weight(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """Weights around 1 with one -0.0 (a signed zero and, at times, negative weights)."""
    w = 1.0 + 0.25 * rng.standard_normal(n)
    w[rng.integers(0, n)] = -0.0
    return as_dtype(w, dtype)


def generate_case(spec: CaseSpec) -> GoldenCase:
    """Inputs from a generator seeded by the case name; expected outputs from the reference."""
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    x = pattern_rows(rng, spec.patterns, spec.n, spec.dtype, spec.dtype)
    weight = random_weight(rng, spec.n, spec.dtype)
    residual = None
    if spec.residual != "none":
        residual = pattern_rows(rng, spec.patterns, spec.n, spec.dtype, residual_dtype(spec.dtype, spec.residual))
    out, new_residual = {}, None
    for mode, offset in spec.outputs:
        result = reference.rms_norm(x, weight, spec.eps, residual, mode=mode, weight_offset=offset)
        if residual is None:
            out[(mode, offset)] = result
        else:
            out[(mode, offset)], new_residual = result
    return GoldenCase(spec, x, weight, residual, out, new_residual)


def residual_dtype(dtype: str, kind: str) -> Optional[str]:
    """R for a residual kind ("none", "same", "float32") of a case in dtype D; None without one."""
    return {"none": None, "same": dtype, "float32": "float32"}[kind]


def output_key(what: str, mode: str, offset: float) -> str:
    """The zip entry of one stored output, e.g. "out_llama_offset0" or "grad_x_fp32_offset1"."""
    return f"{what}_{mode}_offset{offset:g}"


def _arrays(case: GoldenCase) -> Dict[str, np.ndarray]:
    arrays = {"x": case.x, "weight": case.weight}
    if case.residual is not None:
        arrays["residual"] = case.residual
        arrays["new_residual"] = case.new_residual
    for (mode, offset), out in case.out.items():
        arrays[output_key("out", mode, offset)] = out
    return arrays


def _bits(a: np.ndarray) -> np.ndarray:
    """The stored bit patterns (reference.bits; FP8 as uint8 codes), shape () kept: reference.bits
    makes a 0-d array 1-d (np.ascontiguousarray)."""
    return reference.bits(a).reshape(a.shape)


def _numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype a stored array's bits are viewed as, by the manifest's dtype name."""
    return fp8_numpy_dtype(name) if name in FP8_FORMATS else reference.numpy_dtype(name)


def _zip_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            payload = io.BytesIO()
            np.lib.format.write_array(payload, _bits(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, payload.getvalue())
    return buf.getvalue()


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
    from . import golden_backward, golden_fp8  # built on this module's helpers: imported here, not at the top

    for spec in case_specs():
        yield (FORWARD,) + _rendered(spec, _arrays(generate_case(spec)))
    for spec in golden_backward.case_specs():
        yield (BACKWARD,) + _rendered(spec, golden_backward.arrays(golden_backward.generate_case(spec)),
                                      kind="backward")
    for spec in golden_fp8.case_specs():
        yield (FP8,) + _rendered(spec, golden_fp8.arrays(golden_fp8.generate_case(spec)), kind="fp8")


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
    from . import golden_backward

    return [golden_backward.case_from(entry, arrays)
            for entry, arrays in _load_entries(directory, BACKWARD, verify_digests)]


def load_fp8_corpus(directory: Path = DEFAULT_DIR, *, verify_digests: bool = True) -> List[Fp8Case]:
    """Every FP8 case of the checked-in corpus, digests verified against the manifest."""
    from . import golden_fp8

    return [golden_fp8.case_from(entry, arrays) for entry, arrays in _load_entries(directory, FP8, verify_digests)]
