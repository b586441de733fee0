"""How one golden case is stored: a deterministic, uncompressed zip (`<name>.npz`) of arrays as raw
bit patterns (uint8/uint16/uint32, so bfloat16 and FP8 need no pickle) whose entries carry a fixed
timestamp, each output under `output_key`'s name, and the dtype a stored array's bits are viewed as.
`bridge.golden` writes the files and the manifest (which records every array's dtype) and reads them.
"""

from __future__ import annotations

import io
import zipfile
from typing import Dict

import numpy as np

from ..numerics import reference
from ..numerics.contract import FP8_FORMATS
from ..numerics.reference_fp8 import fp8_numpy_dtype


def output_key(what: str, mode: str, offset: float) -> str:
    """The zip entry of one stored output, e.g. "out_llama_offset0" or "grad_x_fp32_offset1"."""
    return f"{what}_{mode}_offset{offset:g}"


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
