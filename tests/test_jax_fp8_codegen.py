"""The Pallas kernel's FP8 paths lowered to Triton IR without a GPU (jax.export for "cuda").

What the GPU will compile, checked where no GPU is: every FP8 variant lowers (static, per group,
rows past MAX_WHOLE_ROW), rnFP8 is the device's FP8 conversion rounding to nearest even (to_fp8;
the bit-pattern encoder is interpret mode's only), no fused multiply-add, and every division is
the exact div.rn.f32 inline assembly (none lowered as arith.divf, which is approximate on the GPU):
static 1 / r, the mean and 1 / scale; per group also amax / 448 and u / s. The Triton module is
taken from JAX's Pallas-Triton lowering (a private function: skipped, with the reason, if JAX
renames it); ptxas is not run.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

import bi_jax
from bi_jax import ops

pytestmark = pytest.mark.codegen

try:
    from jax._src.pallas.triton import pallas_call_registration as _registration
    _LOWER = _registration.lowering.lower_jaxpr_to_triton_module
except (ImportError, AttributeError) as error:  # pragma: no cover - depends on the JAX version
    _registration, _LOWER, _WHY = None, None, f"JAX's Pallas-Triton lowering moved: {error}"


def _triton_module(fn, *args, monkeypatch) -> str:
    """The Triton IR (text) of the one pallas_call in fn(*args), lowered for CUDA on this CPU-only host."""
    if _LOWER is None:
        pytest.skip(_WHY)
    modules = []

    def capture(*a, **k):
        result = _LOWER(*a, **k)
        modules.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(_registration.lowering, "lower_jaxpr_to_triton_module", capture)
    monkeypatch.setattr(ops, "device_kind", lambda: "NVIDIA H200")  # no GPU to ask
    try:
        export.export(jax.jit(fn), platforms=["cuda"])(*args)
    except ValueError as error:  # the Triton custom call has no export compatibility guarantee
        assert "custom calls" in str(error), error
    assert len(modules) == 1, f"{len(modules)} Triton modules"
    return modules[0]


CASES = [  # (n, quant, divisions)
    (256, None, 2),
    (256, "static", 3),
    (256, 64, 4),
    (4096, 128, 4),
    (16512, 128, 4),  # two chunks: the groups in the second pass
    (16512, "static", 3),
]


@pytest.mark.parametrize("n,quant,divisions", CASES)
def test_fp8_kernel_lowers_to_exact_integer_work(n, quant, divisions, monkeypatch):
    x = jax.ShapeDtypeStruct((8, n), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((n,), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((8, n), jnp.float32)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    if quant is None:
        text = _triton_module(lambda a, b, c: bi_jax.rms_norm(a, b, 1e-6, c, interpret=False,
                                                              pallas_backend="triton"), x, w, r,
                              monkeypatch=monkeypatch)
    elif quant == "static":
        text = _triton_module(lambda a, b, c, d: bi_jax.rms_norm(a, b, 1e-6, c, out_dtype=jnp.float8_e4m3fn,
                                                                 scale=d, interpret=False, pallas_backend="triton"),
                              x, w, r, s,
                              monkeypatch=monkeypatch)
    else:
        text = _triton_module(lambda a, b, c: bi_jax.rms_norm(a, b, 1e-6, c, out_dtype=jnp.float8_e4m3fn,
                                                              group_size=quant, interpret=False,
                                                              pallas_backend="triton"), x, w, r,
                              monkeypatch=monkeypatch)
    if quant is None:
        assert not re.search(r"f8E4M3|tt\.fp_to_fp", text), "an FP8 conversion in the bf16 output's IR"
    else:  # to_fp8: the device's conversion, round to nearest even (cvt.rn.satfinite.e4m3x2.f32)
        assert re.search(r"tt\.fp_to_fp .*rounding = rtne.* -> tensor<[^>]*f8E4M3FN>", text), "no rtne FP8 conversion"
    assert not re.search(r"arith\.divf\b", text), "a division lowered as arith.divf (approximate on the GPU)"
    assert not re.search(r"math\.fma\b", text), "a fused multiply-add"
    assert len(re.findall(r"div\.rn\.f32", text)) == divisions
    # rnFP8 is the device's conversion: no unsigned shifts (the bit-pattern encoder's) in the GPU's IR.
    assert not re.search(r"\barith\.shrui\b", text), "the bit-pattern encoder is lowered for the GPU"
