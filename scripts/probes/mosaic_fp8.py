"""One-run GPU check of the Mosaic GPU forward's FP8 output (bi_jax/mosaic_fp8.py, issue 26, stage 3).

(a) bits : bi_jax.rms_norm(pallas_backend="mosaic", out_dtype=float8_e4m3fn) against
           bridge.reference bit for bit (codes, scales, new residual) on ~60 cases: n = 64 ... 20480
           x dtype x static / group 64 / group 128 x residual, with the FP8 tests' rows (specials,
           an inf u, a zero group); one line per case, the first difference named.
(b) speed: static and group 128 at 16384 x 4096 and 4096 x 8192 bf16, without and with a bf16
           residual: Mosaic and Pallas-Triton FP8, in us and as % of the time of an XLA copy moving the
           same bytes (read x [and the residual], write 1 byte per element [+ the new residual]
           [+ the scales]; the copy reads and writes half their sum each).

Without a GPU it checks the kernel body's numpy emulation against the reference on 2 cases,
says that the GPU's bits and speed were not measured, and exits 1.
Run: python3 scripts/probes/mosaic_fp8.py   (H100: well under 2 minutes)
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax_fp8_helpers import expected, fp8_rows, fp8_weight, quant_kwargs  # noqa: E402  (tests/)
from probe_timing import say, seconds  # noqa: E402  (scripts/probes/, on sys.path when run as a script)

import bi_jax  # noqa: E402
from bi_jax import mosaic_kernel as mk  # noqa: E402
from bi_jax.pallas_fp8 import Quant  # noqa: E402
from bridge.verify.compare import first_mismatch  # noqa: E402

GPU = jax.default_backend() == "gpu"
NS = (64, 128, 1024, 4096, 5120, 8192, 16384, 20480)
DTYPES = ("bfloat16", "float16", "float32")
QUANTS = ("static", "group64", "group128")
SPEED_SHAPES = ((16384, 4096), (4096, 8192))
STATIC = ("eps", "mode", "weight_offset", "out_dtype", "group_size")


def cases():
    """n x quant, dtype and residual kind (none / x's dtype / float32) rotating: 24 + 36 cases."""
    out, k = [], 0
    for n in NS:
        for q in QUANTS:
            if q.startswith("group") and n % int(q[5:]):
                continue  # a group size must divide n
            out.append((n, DTYPES[k % 3], q, ("none", "same", "float32")[k % 3], ("llama", "fp32")[k % 2]))
            k += 1
    for n in (4096, 5120):
        for d in DTYPES:
            for q in QUANTS:
                for res in ("none", "float32"):
                    out.append((n, d, q, res, ("llama", "fp32")[k % 2]))
                    k += 1
    return out


def inputs(n, d, res, seed):
    rng = np.random.default_rng(seed)
    rows = 37 if n <= 5120 else 5
    x = fp8_rows(rng, (rows, n), d)
    x[-1] = rng.standard_normal(n)
    x[-1, 3] = 8.0  # an inf u where the weight is 3e38
    x[-2, :64] = 0.0  # a zero group
    r = None if res == "none" else fp8_rows(rng, (rows, n), d if res == "same" else "float32", specials=False)
    return x, fp8_weight(rng, n, d), r


def check(run, case, seed) -> bool:
    n, d, q, res, mode = case
    x, w, r = inputs(n, d, res, seed)
    kwargs = quant_kwargs(q, np.float32(0.0123))
    want = expected(x, w, r, mode=mode, **kwargs)
    got = run(x, w, r, mode, kwargs)
    bad = [f"result {i}: {p}" for i, (e, g) in enumerate(zip(want, got))
           if (p := first_mismatch(np.asarray(e), np.asarray(g))) is not None]
    say(f"{'ok  ' if not bad else 'FAIL'} n={n} {d} {q} res={res} {mode} {'; '.join(bad)}")
    return not bad


def emulated(x, w, r, mode, kwargs):
    quant = Quant.fp8("static", "float8_e4m3fn") if "scale" in kwargs else \
        Quant.fp8("group", "float8_e4m3fn", kwargs["group_size"])
    scale = np.asarray(kwargs["scale"], np.float32).reshape(1) if "scale" in kwargs else None
    got = mk.rms_norm_emulated(x, w, 1e-6, r, mode=mode, quant=quant, scale=scale)
    return got if isinstance(got, tuple) else (got,)


def speed() -> None:
    fns = {b: jax.jit(functools.partial(bi_jax.rms_norm, interpret=False, pallas_backend=b), static_argnames=STATIC)
           for b in ("mosaic", "triton")}
    for rows, n in SPEED_SHAPES:
        rng = np.random.default_rng(rows)
        x = jnp.asarray(rng.standard_normal((rows, n)), jnp.bfloat16)
        w = jnp.asarray(1 + 0.25 * rng.standard_normal(n), jnp.bfloat16)
        r = jnp.asarray(rng.standard_normal((rows, n)), jnp.bfloat16)
        for res in (None, r):
            for q in ("static", "group128"):
                kwargs = quant_kwargs(q, jnp.float32(0.02))
                # The kernel's bytes: read x [and r], write codes [+ new residual] [+ scales].
                read = 2 * rows * n * (1 if res is None else 2)
                write = rows * n + (0 if res is None else 2 * rows * n) + (4 * rows * n // 128 if q != "static" else 0)
                # A copy moving the same bytes: (read + write) / 2 read and as many written (float32
                # elements: a uint8 add does not run at the copy's bandwidth).
                copy = seconds(jax.jit(lambda a: a + 1), jnp.zeros(((read + write) // 8,), jnp.float32))
                times = {b: seconds(lambda a, b=b: fn(a, w, 1e-6, res, **kwargs), x) for b, fn in fns.items()}
                say(f"{rows}x{n} bf16 {q} res={'bf16' if res is not None else 'none'}: copy {copy * 1e6:.1f} us; "
                    + "; ".join(f"{b} {t * 1e6:.1f} us ({100 * copy / t:.1f} % of copy)" for b, t in times.items()))


def main() -> int:
    if not GPU:
        ok = all(check(emulated, c, i) for i, c in enumerate(cases()[:2]))
        say(f"no GPU: the kernel body's numpy emulation {'matches' if ok else 'DOES NOT match'} the reference on "
            f"2 cases; the compiled kernel's bits and speed were not measured (run this on a Hopper GPU)")
        return 1
    fn = jax.jit(functools.partial(bi_jax.rms_norm, interpret=False, pallas_backend="mosaic"), static_argnames=STATIC)

    def mosaic(x, w, r, mode, kwargs):
        kwargs = {k: jnp.asarray(v) if k == "scale" else v for k, v in kwargs.items()}
        got = fn(jnp.asarray(x), jnp.asarray(w), 1e-6, None if r is None else jnp.asarray(r), mode=mode, **kwargs)
        return got if isinstance(got, tuple) else (got,)

    results = [check(mosaic, c, i) for i, c in enumerate(cases())]
    say(f"bits: {sum(results)} of {len(results)} cases equal to the reference")
    speed()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
