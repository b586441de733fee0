"""bi_jax.RMSNorm, the flax.nnx module, on the CPU: bit for bit against bi_jax.rms_norm and bridge.reference.

Also: `import bi_jax` does not import flax. Tests that need flax skip without it.
"""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax_helpers import (JIT, JNP_DTYPES, N, _seed, assert_bits, assert_pair_bits, pair, random_rows, random_weight,
                         ref, residual_dtype)

import bi_jax


# --------------------------------------------------------------------------------------------
# J) The flax.nnx module.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nnx():
    return pytest.importorskip("flax.nnx", reason="flax is not installed")


def _load(module, array: np.ndarray) -> None:
    """Load a checkpoint array into the module's weight (set_value on flax >= 0.12, .value before)."""
    if hasattr(module.weight, "set_value"):
        module.weight.set_value(array)
    else:
        module.weight.value = array


def test_import_bi_jax_does_not_import_flax():
    # `import bi_jax` leaves flax alone; without flax, RMSNorm's ImportError names it.
    code = ("import sys; import bi_jax; assert 'flax' not in sys.modules, 'import bi_jax imported flax'\n"
            "sys.modules['flax'] = None; assert 'RMSNorm' in dir(bi_jax)\n"
            "try:\n    bi_jax.RMSNorm\nexcept ImportError as e:\n    print('ImportError', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ImportError" in done.stdout and "flax" in done.stdout


def test_flax_module_parameters(nnx):
    norm = bi_jax.RMSNorm(64)
    assert (norm.hidden_size, norm.eps, norm.mode, norm.weight_offset) == (64, 1e-6, "llama", 0.0)
    assert isinstance(norm.weight, nnx.Param)
    assert norm.weight[...].shape == (64,) and norm.weight[...].dtype == jnp.float32
    assert_bits(np.ones(64, np.float32), norm.weight[...])
    gemma = bi_jax.RMSNorm(64, 1e-5, mode="fp32", weight_offset=1.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert (gemma.eps, gemma.mode, gemma.weight_offset) == (1e-5, "fp32", 1.0)
    assert_bits(np.zeros(64, ml_dtypes.bfloat16), gemma.weight[...])
    assert set(nnx.state(gemma, nnx.Param).keys()) == {"weight"}  # HF-style parameter name


FLAX_COMBOS = [("bfloat16", "llama", 0.0, "none"), ("bfloat16", "fp32", 1.0, "float32"),
               ("float16", "llama", 1.0, "same"), ("float32", "fp32", 0.0, "float32")]


@pytest.mark.parametrize("dtype,mode,offset,kind", FLAX_COMBOS)
def test_flax_module_matches_the_function(nnx, dtype, mode, offset, kind):
    rng = np.random.default_rng(_seed("flax", dtype, mode, offset, kind))
    eps = 1e-5
    norm = bi_jax.RMSNorm(N, eps, mode=mode, weight_offset=offset, dtype=JNP_DTYPES[dtype])
    w = random_weight(rng, N, dtype)
    _load(norm, w)
    x = random_rows(rng, (2, 3, N), dtype)
    r = None if kind == "none" else random_rows(rng, (2, 3, N), residual_dtype(dtype, kind))
    jr = None if r is None else jnp.asarray(r)
    got = pair(norm(jnp.asarray(x), jr), r is not None)
    fn = pair(JIT(jnp.asarray(x), jnp.asarray(norm.weight[...]), eps, jr, mode=mode, weight_offset=offset),
              r is not None)
    assert_pair_bits(fn, got, "module vs bi_jax.rms_norm")
    assert_pair_bits(ref(x, w, eps, r, mode, offset), got, "module vs reference")


def test_flax_module_loads_a_checkpoint(nnx):
    rng = np.random.default_rng(_seed("checkpoint"))
    n, eps = N, 1e-6
    # An HF-style state dict as torch would hand it to numpy: bfloat16 through an int16 view.
    bits = random_weight(rng, n, "bfloat16").view(np.int16).copy()
    state_dict = {"model.layers.0.input_layernorm.weight": bits.view(ml_dtypes.bfloat16)}
    norm = bi_jax.RMSNorm(n, eps, dtype=jnp.bfloat16)
    _load(norm, state_dict["model.layers.0.input_layernorm.weight"])
    assert_bits(state_dict["model.layers.0.input_layernorm.weight"], norm.weight[...])
    x = random_rows(rng, (5, n), "bfloat16")
    r = random_rows(rng, (5, n), "bfloat16")
    out, new_res = norm(jnp.asarray(x), jnp.asarray(r))
    e_out, e_res = ref(x, state_dict["model.layers.0.input_layernorm.weight"], eps, r)
    assert_bits(e_out, out, "checkpoint out")
    assert_bits(e_res, new_res, "checkpoint new_residual")

    @nnx.jit
    def forward(module, a, b):
        return module(a, b)

    result = forward(norm, jnp.asarray(x), jnp.asarray(r))
    assert isinstance(result, tuple) and len(result) == 2
    assert_bits(e_out, result[0], "nnx.jit out")
    assert_bits(e_res, result[1], "nnx.jit new_residual")
    assert_bits(ref(x, state_dict["model.layers.0.input_layernorm.weight"], eps)[0],
                nnx.jit(lambda m, a: m(a))(norm, jnp.asarray(x)), "nnx.jit without residual")


def test_flax_module_rejects_a_checkpoint_of_another_dtype(nnx):
    norm = bi_jax.RMSNorm(N, dtype=jnp.bfloat16)
    _load(norm, np.ones(N, np.float32))  # no silent cast: the call names the weight
    with pytest.raises(TypeError, match="^weight:"):
        norm(jnp.ones((2, N), jnp.bfloat16))
