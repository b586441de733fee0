"""bi_jax inside a loop over layers, Mosaic GPU vs Pallas-Triton: the array copies XLA keeps and the time.

Both kernel bodies write the residual and grad_x in place (the Mosaic GPU one through
bi_jax/mosaic_call.py's input_output_aliases). This times jax.grad of a
jax.lax.scan over LAYERS layers of `x, r = rms_norm(x, w, residual=r)` (the usual pre-norm
residual stream), jitted, and counts the copies of whole arrays in the optimized HLO.
Run: python3 scripts/probes/layer_loop.py   (a GPU of compute capability 9.0 or later)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bi_jax  # noqa: E402
from bridge.bench.timing import array_copies  # noqa: E402
from probe_timing import seconds  # noqa: E402

LAYERS = 8


def step(backend: str):
    def loss(x, r, ws):
        def layer(carry, w):
            out, new_r = bi_jax.rms_norm(carry[0], w, 1e-6, carry[1], pallas_backend=backend)
            return (out, new_r), None
        (out, new_r), _ = jax.lax.scan(layer, (x, r), ws)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(new_r.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    for t, n in ((16384, 4096), (4096, 8192)):
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (t, n), jnp.bfloat16)
        r = jax.random.normal(keys[1], (t, n), jnp.bfloat16)
        ws = (1 + 0.1 * jax.random.normal(keys[2], (LAYERS, n))).astype(jnp.bfloat16)
        results = {}
        for backend in ("triton", "mosaic"):
            fn = step(backend)
            copies = len(array_copies(fn.lower(x, r, ws).compile().as_text()))
            results[backend] = fn(x, r, ws)
            print(f"{t}x{n} bf16, {LAYERS} layers, grad of a scan: {backend:6s} "
                  f"{seconds(fn, x, r, ws) * 1e6:8.1f} us, {copies} array copies in the optimized HLO", flush=True)
        same = all(bool(jnp.all(jax.lax.bitcast_convert_type(a, jnp.uint16) == jax.lax.bitcast_convert_type(b, jnp.uint16)))
                   for a, b in zip(results["triton"], results["mosaic"]))
        print(f"{t}x{n}: Mosaic's gradients == Pallas-Triton's bit for bit: {same}", flush=True)


if __name__ == "__main__":
    main()
