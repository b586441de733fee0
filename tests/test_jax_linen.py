"""bi_jax's flax modules against bi_torch, and the HF weight loader (CPU: interpret mode, Triton's interpreter).

A tiny model, norm -> norm with a residual, is built three ways (flax.linen, flax.nnx, torch) from
one torch state dict loaded by bi_jax.load_hf_weight; outputs and every gradient (x, residual,
both weights) must have the same bits, compared through integer views (bridge.verify.compare).
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import nnx

import bi_jax
import bi_torch
from bridge import reference
from bridge.verify.compare import assert_bitwise_equal

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter",
                                        "ignore::bi_torch.InterpreterWarning")

N, ROWS = 128, 3
DTYPES = ("float32", "bfloat16", "float16")


class LinenModel(nn.Module):
    dtype: str
    mode: str
    offset: float

    @nn.compact
    def __call__(self, x, residual):
        h = bi_jax.LinenRMSNorm(N, mode=self.mode, weight_offset=self.offset, dtype=self.dtype, name="norm1")(x)
        return bi_jax.LinenRMSNorm(N, mode=self.mode, weight_offset=self.offset, dtype=self.dtype,
                                   name="norm2")(h, residual)


class NnxModel(nnx.Module):
    def __init__(self, dtype: str, mode: str, offset: float) -> None:
        self.norm1 = bi_jax.RMSNorm(N, mode=mode, weight_offset=offset, dtype=dtype)
        self.norm2 = bi_jax.RMSNorm(N, mode=mode, weight_offset=offset, dtype=dtype)

    def __call__(self, x, residual):
        return self.norm2(self.norm1(x), residual)


def _np(a) -> np.ndarray:
    return bi_torch.to_numpy(a) if isinstance(a, torch.Tensor) else np.asarray(a)


def _torch_model(rng: np.random.Generator, dtype: str, mode: str, offset: float) -> torch.nn.ModuleDict:
    model = torch.nn.ModuleDict({k: bi_torch.RMSNorm(N, mode=mode, weight_offset=offset,
                                                     dtype=bi_torch.torch_dtype(dtype)) for k in ("norm1", "norm2")})
    with torch.no_grad():
        for norm in model.values():
            w = (offset + 1.0 + 0.25 * rng.standard_normal(N)).astype(np.float32)
            norm.weight.copy_(bi_torch.from_numpy(w.astype(reference.numpy_dtype(dtype))))
    return model


def _inputs(rng: np.random.Generator, dtype: str):
    """x, residual, the gradient of out, the gradient of the new residual."""
    shape, to = (4, ROWS, N), reference.numpy_dtype(dtype)
    return tuple((rng.standard_normal(shape) * 3).astype(np.float32).astype(to))


def _torch_run(model, x, r, g, gr):
    xt, rt = (bi_torch.from_numpy(a).requires_grad_() for a in (x, r))
    out, new_r = model["norm2"](model["norm1"](xt), rt)
    grads = torch.autograd.grad((out, new_r), (xt, rt, model["norm1"].weight, model["norm2"].weight),
                                (bi_torch.from_numpy(g), bi_torch.from_numpy(gr)))
    return [_np(a) for a in (out, new_r) + grads]


def _assert_all(expected, actual, labels) -> None:
    for e, a, label in zip(expected, actual, labels):
        assert_bitwise_equal(e, _np(a), label)


LABELS = ("out", "new_residual", "grad_x", "grad_residual", "grad_weight1", "grad_weight2")


@pytest.mark.parametrize("dtype,mode,offset", [("bfloat16", "llama", 0.0), ("float16", "fp32", 1.0)])
def test_linen_and_nnx_match_bi_torch(dtype, mode, offset):
    rng = np.random.default_rng(16)
    model = _torch_model(rng, dtype, mode, offset)
    x, r, g, gr = _inputs(rng, dtype)
    expected = _torch_run(model, x, r, g, gr)

    linen = LinenModel(dtype, mode, offset)
    params = {"params": {k: bi_jax.load_hf_weight(
        bi_jax.LinenRMSNorm(N, mode=mode, weight_offset=offset, dtype=dtype), model[k].weight)["params"]
        for k in ("norm1", "norm2")}}
    result, vjp = jax.vjp(lambda p, a, b: linen.apply(p, a, b), params, jnp.asarray(x), jnp.asarray(r))
    dp, dx, dr = vjp((jnp.asarray(g), jnp.asarray(gr)))
    _assert_all(expected, (*result, dx, dr, dp["params"]["norm1"]["weight"], dp["params"]["norm2"]["weight"]),
                [f"linen {label}" for label in LABELS])

    nnx_model = NnxModel(dtype, mode, offset)
    for k in ("norm1", "norm2"):
        bi_jax.load_hf_weight(getattr(nnx_model, k), model[k].state_dict()["weight"])
    graph, state = nnx.split(nnx_model)
    result, vjp = jax.vjp(lambda s, a, b: nnx.merge(graph, s)(a, b), state, jnp.asarray(x), jnp.asarray(r))
    ds, dx, dr = vjp((jnp.asarray(g), jnp.asarray(gr)))
    _assert_all(expected, (*result, dx, dr, ds["norm1"]["weight"][...], ds["norm2"]["weight"][...]),
                [f"nnx {label}" for label in LABELS])


def test_linen_param_matches_nnx_and_torch():
    for offset, init in ((0.0, 1.0), (1.0, 0.0)):
        linen = bi_jax.LinenRMSNorm(N, eps=1e-5, mode="fp32", weight_offset=offset, dtype=jnp.bfloat16)
        params = linen.init(jax.random.key(0), jnp.ones((ROWS, N), jnp.bfloat16))
        assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == {"params": {"weight": ((N,), jnp.bfloat16)}}
        nnx_weight = bi_jax.RMSNorm(N, weight_offset=offset, dtype=jnp.bfloat16).weight[...]
        torch_weight = bi_torch.RMSNorm(N, weight_offset=offset, dtype=torch.bfloat16).state_dict()["weight"]
        expected = np.full(N, init, reference.numpy_dtype("bfloat16"))
        for what, w in (("linen", params["params"]["weight"]), ("nnx", nnx_weight), ("torch", torch_weight)):
            assert_bitwise_equal(expected, _np(w), f"{what} init, offset {offset}")
        assert (linen.hidden_size, linen.eps, linen.mode, linen.weight_offset) == (N, 1e-5, "fp32", offset)


def test_import_without_flax():
    code = ("import sys; sys.modules['flax'] = None; import bi_jax; bi_jax.rms_norm\n"
            "try:\n    bi_jax.LinenRMSNorm\nexcept ImportError:\n    print('lazy')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "lazy", done.stderr


@pytest.mark.parametrize("dtype", DTYPES)
def test_loader_is_bit_exact(dtype):
    # -0.0, a NaN with a payload, the smallest subnormal, infinities: what a float cast could change.
    ints = {"float32": np.array([0x80000000, 0x7FC01234, 0x00000001, 0xFF800000], np.uint32),
            "bfloat16": np.array([0x8000, 0x7FC5, 0x0001, 0xFF80], np.uint16),
            "float16": np.array([0x8000, 0x7E05, 0x0001, 0xFC00], np.uint16)}[dtype]
    w = np.resize(ints, N).view(reference.numpy_dtype(dtype))
    for source in (w, bi_torch.from_numpy(w)):
        norm = bi_jax.RMSNorm(N, dtype=dtype)
        assert bi_jax.load_hf_weight(norm, source) is None
        assert_bitwise_equal(w, np.asarray(norm.weight[...]), f"nnx from {type(source).__name__}")
        params = bi_jax.load_hf_weight(bi_jax.LinenRMSNorm(N, dtype=dtype), source,
                                       {"params": {"weight": None, "other": 1}, "stats": 2})
        assert_bitwise_equal(w, np.asarray(params["params"]["weight"]), f"linen from {type(source).__name__}")
        assert (params["params"]["other"], params["stats"]) == (1, 2)


def test_loader_errors():
    linen, norm = bi_jax.LinenRMSNorm(N, dtype=jnp.bfloat16), bi_jax.RMSNorm(N, dtype=jnp.bfloat16)
    bf16 = np.ones(N, reference.numpy_dtype("bfloat16"))
    cases = [
        (linen, np.ones(N + 1, reference.numpy_dtype("bfloat16")), ValueError, r"weight: expected shape \(128,\)"),
        (norm, np.ones((1, N), reference.numpy_dtype("bfloat16")), ValueError, r"weight: .* got \(1, 128\)"),
        (linen, np.ones(N, np.float32), TypeError, "weight: expected dtype bfloat16 .* got float32"),
        (norm, torch.ones(N, dtype=torch.float16), TypeError, "weight: expected dtype bfloat16 .* got float16"),
        (norm, np.ones(N, np.float64), TypeError, "weight: expected float32, bfloat16 or float16; got numpy float64"),
        (linen, torch.ones(N, dtype=torch.float64), TypeError, "weight: .* got torch torch.float64"),
        (linen, [1.0] * N, TypeError, "weight: expected a torch.Tensor or numpy.ndarray; got list"),
        (object(), bf16, TypeError, "module: expected bi_jax.RMSNorm or bi_jax.LinenRMSNorm; got object"),
    ]
    for module, weight, error, match in cases:
        with pytest.raises(error, match=match):
            bi_jax.load_hf_weight(module, weight)
    with pytest.raises(TypeError, match="params: only for a linen module"):
        bi_jax.load_hf_weight(norm, bf16, {"params": {}})
