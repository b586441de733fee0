"""One-run GPU check of bi_jax/mosaic_backward.py, the Mosaic GPU backward (issue 26, stage 2).

(a) bits : the kernel (bi_jax.mosaic_backward.rms_norm_backward) against
           bridge.numerics.reference.rms_norm_backward bit for bit: n = 1 ... 20000, 1 to 300 rows
           (mostly not powers of two), every dtype x residual kind (none / x's dtype / float32, with
           and without the new residual's gradient), mode and offset (a negative one too) rotating,
           x from the golden corpus's row patterns, g with -0.0 columns. One line per case; a
           failing one names the output, the count and the first differing index with both bits.
(b) speed: the Mosaic backward vs the Pallas-Triton backward (bi_jax.backward.backward_rows,
           kernel="triton") vs XLA's jax.grad of a plain jnp RMSNorm, bf16: 16384x4096, 4096x8192,
           1024x4096, 65536x4096 without a residual, 16384x4096 with a bf16 residual; each as % of
           XLA moving the same bytes (z + g [and z - g]: read z and g, write grad_x [and
           grad_residual]; the partials are not counted), timed by
           probe_timing.seconds. The Mosaic and Pallas-Triton results are compared bit for bit.
(c) ptxas: registers and spills of the 4096 and 8192 bf16 kernels (MOSAIC_GPU_DUMP_PTXAS).

--sweep instead: the variants (reload x warpgroups, bi_jax.mosaic_backward._kernel) x steps in
SWEEP_STEPS whose shared memory fits an H100 block, on SWEEP_SHAPES (bf16, no residual): per
combination ptxas registers/spills, shared memory, time as % of copy, and grad_x / grad_weight
bit-equal to the launch rule's choice. Stops starting combinations after --budget seconds.

Without a GPU it says so and exits 1 after checking the emulated body on two cases.
Run: python3 scripts/probes/mosaic_backward.py [--budget SECONDS]   (H100: about 1-2 minutes)
     python3 scripts/probes/mosaic_backward.py --sweep [--budget 160]   (H100: about 3 minutes)
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bi_jax import backward, mosaic_backward  # noqa: E402
from bi_jax.mosaic_backward_pairs import level_floats  # noqa: E402
from bi_jax.mosaic_ops import row_layout  # noqa: E402
from bridge.golden.forward import PATTERNS, as_dtype, pattern_row, random_weight  # noqa: E402
from bridge.numerics import reference as ref  # noqa: E402
from probe_timing import elapsed, say, seconds  # noqa: E402  (scripts/probes/, on sys.path when run as a script)

GPU = jax.default_backend() == "gpu"
NS = (1, 3, 7, 100, 1000, 2048, 4096, 5120, 8192, 20000)
ROWS = (1, 3, 300, 2, 17, 255, 5, 100, 33, 7, 256, 129)
DTYPES = ("bfloat16", "float16", "float32")
MODES = (("llama", 0.0), ("fp32", 1.0), ("fp32", -0.5), ("llama", 1.0))
SPEED = ((16384, 4096, False), (4096, 8192, False), (1024, 4096, False), (65536, 4096, False), (16384, 4096, True))
SWEEP_SHAPES = ((16384, 4096), (4096, 8192), (65536, 4096))  # the last has the first's registers: last
SWEEP_STEPS = (8, 16, 32, 64)
VARIANTS = ((False, 1), (True, 1), (False, 2), (True, 2))  # (reload, warpgroups)
SMEM_LIMIT = 227 * 1024  # an H100 block's shared memory


def case_list():
    cases, k = [], 0
    for n in NS:
        for d in DTYPES:
            for res, gr in (("none", False), ("same", False), ("same", True), ("float32", True)):
                if d == "float32" and res == "same":
                    continue
                cases.append(dict(n=n, rows=ROWS[k % len(ROWS)], dtype=d, res=res, gr=gr, mode=MODES[k % 4][0],
                                  off=MODES[k % 4][1], seed=k))
                k += 1
    return cases


def inputs(c):
    rng = np.random.default_rng(c["seed"])
    n, d, rows = c["n"], c["dtype"], c["rows"]
    x = as_dtype(np.stack([pattern_row(rng, PATTERNS[(c["seed"] + i) % len(PATTERNS)], n, d) for i in range(rows)]), d)
    w = random_weight(rng, n, d)
    g = rng.standard_normal((rows, n)).astype(np.float32)
    g[:, ::5] = -0.0
    g = as_dtype(g, d)
    rd = d if c["res"] == "same" else "float32"
    r = None if c["res"] == "none" else as_dtype(rng.standard_normal((rows, n)).astype(np.float32), rd)
    gr = as_dtype(rng.standard_normal((rows, n)).astype(np.float32), rd) if c["gr"] else None
    return x, w, g, r, gr


def first_diff(name, got, want):
    g, e = ref.bits(np.asarray(got)), ref.bits(np.asarray(want))
    bad = g != e
    if not bad.any():
        return None
    i = tuple(int(a) for a in np.argwhere(bad)[0])
    return f"{name}: {int(bad.sum())}/{bad.size} differ, first {list(i)}: got {int(g[i]):#x} want {int(e[i]):#x}"


def bits_section(budget: float):
    counts = collections.Counter()
    for c in case_list():
        if elapsed() > budget:
            counts["skipped (budget)"] += 1
            continue
        label = (f"n={c['n']} rows={c['rows']} {c['dtype']} res={c['res']} gr={c['gr']} {c['mode']} "
                 f"off={c['off']:g}")
        try:
            x, w, g, r, gr = inputs(c)
            want = ref.rms_norm_backward(x, w, g, 1e-6, r, gr, mode=c["mode"], weight_offset=c["off"])
            z = x if r is None else ref.rms_norm(x, w, 1e-6, r)[1]
            fn = jax.jit(functools.partial(mosaic_backward.rms_norm_backward, eps=1e-6, mode=c["mode"],
                                           weight_offset=c["off"], has_residual=r is not None))
            got = [a for a in fn(*(None if a is None else jnp.asarray(a) for a in (z, w, g, gr))) if a is not None]
            names = ("grad_x", "grad_residual", "grad_weight") if r is not None else ("grad_x", "grad_weight")
            diffs = [d for d in (first_diff(k, a, e) for k, a, e in zip(names, got, want)) if d]
            line = ("FAIL " + "; ".join(diffs)) if diffs else "ok (== reference)"
        except Exception as e:  # noqa: BLE001 - one line per failing case, and go on
            line = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:400]}"
        counts["fail" if line.startswith("FAIL") else "ok"] += 1
        say(f"[bits {label}] {line}")
    say(f"[bits summary] {dict(counts)}")


def xla_grad(eps: float):
    """jax.grad of a plain jnp RMSNorm (float32 inside, llama's rounding), XLA's own fusion."""
    def norm(x, w):
        v = x.astype(jnp.float32)
        y = (v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)).astype(x.dtype)
        return y * w

    def vjp(x, w, g):
        return jax.vjp(norm, x, w)[1](g)
    return jax.jit(vjp)


def speed_section():
    for rows, n, with_res in SPEED:
        try:
            k1, k2, k3 = jax.random.split(jax.random.key(rows + n), 3)
            z = jax.random.normal(k1, (rows, n), jnp.bfloat16)
            g = jax.random.normal(k3, (rows, n), jnp.bfloat16)
            w = (1.0 + 0.1 * jax.random.normal(k2, (n,))).astype(jnp.bfloat16)
            kw = dict(eps=1e-6, mode="llama", weight_offset=0.0, interpret=False, has_residual=with_res)
            mos = jax.jit(functools.partial(backward.backward_rows, kernel="mosaic", **kw))
            tri = jax.jit(functools.partial(backward.backward_rows, kernel="triton", **kw))
            # The same bytes moved by XLA: read z and g, write grad_x (and grad_residual).
            copy = jax.jit(lambda z, g: (z + g, z - g) if with_res else z + g)
            t_copy = seconds(copy, z, g)
            t_mos, t_tri = seconds(mos, z, w, g, None), seconds(tri, z, w, g, None)
            a, b = mos(z, w, g, None), tri(z, w, g, None)
            same = all(bool(jnp.all(jax.lax.bitcast_convert_type(p, jnp.uint16) == jax.lax.bitcast_convert_type(
                q, jnp.uint16))) for p, q in zip(a, b) if p is not None)
            line = (f"copy {t_copy * 1e6:.1f} us; mosaic {t_mos * 1e6:.1f} us = {100 * t_copy / t_mos:.0f} % of copy; "
                    f"pallas-triton {t_tri * 1e6:.1f} us = {100 * t_copy / t_tri:.0f} %")
            if not with_res:
                t_xla = seconds(xla_grad(1e-6), z, w, g)
                line += f"; xla jax.grad {t_xla * 1e6:.1f} us = {100 * t_copy / t_xla:.0f} %"
            steps = mosaic_backward._plan(rows, n, 2, None)[1]
            say(f"[speed {rows}x{n} bf16{' + bf16 residual' if with_res else ''}, steps {steps}] {line}; "
                f"mosaic bits == pallas-triton: {same}")
        except Exception as e:  # noqa: BLE001
            say(f"[speed {rows}x{n}] FAIL {type(e).__name__}: {' '.join(str(e).split())[:300]}")


def ptxas_lines(fn, *args):
    """Calls fn (its first call compiles) with Mosaic's ptxas report captured from stdout."""
    sys.stdout.flush()
    saved, tmp = os.dup(1), tempfile.TemporaryFile()
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    os.dup2(tmp.fileno(), 1)
    try:
        out = jax.block_until_ready(fn(*args))
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.environ.pop("MOSAIC_GPU_DUMP_PTXAS")
    tmp.seek(0)
    lines = [ln.strip() for ln in tmp.read().decode(errors="replace").splitlines()
             if re.search(r"registers|spill|smem", ln)]
    return out, lines


def ptxas_section():
    for rows, n in ((1024, 4096), (1024, 8192)):
        try:
            z = jnp.ones((rows, n), jnp.bfloat16)
            _, lines = ptxas_lines(functools.partial(mosaic_backward.rms_norm_backward, eps=1e-6, mode="fp32",
                                                     weight_offset=0.0, has_residual=False, steps=8), z, z[0], z)
            say(f"[ptxas {rows}x{n} bf16 steps 8] {lines[:4] or '(no lines)'}")
        except Exception as e:  # noqa: BLE001
            say(f"[ptxas {rows}x{n}] FAIL {type(e).__name__}: {' '.join(str(e).split())[:300]}")


def smem_bytes(n: int, steps: int, warpgroups: int) -> int:
    """The counter's levels and, with two warpgroups, the pair exchange's two rows (bf16 layout)."""
    floats = level_floats(row_layout(n, 2), warpgroups)
    return 4 * floats * ((steps // warpgroups).bit_length() - 1 + (2 if warpgroups == 2 else 0))


def sweep_section(budget: float) -> None:
    bits = jax.jit(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16))
    for rows, n in SWEEP_SHAPES:
        k1, k2, k3 = jax.random.split(jax.random.key(rows + n), 3)
        z, g = (jax.random.normal(k, (rows, n), jnp.bfloat16) for k in (k1, k3))
        w = (1.0 + 0.1 * jax.random.normal(k2, (n,))).astype(jnp.bfloat16)
        t_copy = seconds(jax.jit(lambda z, g: z + g), z, g)
        _, steps0, _, reload0, wgs0 = mosaic_backward._plan(rows, n, 2, None)
        default = None
        for steps, (reload, wgs) in [(None, (None, None))] + [(s, v) for v in VARIANTS for s in SWEEP_STEPS]:
            label = (f"[sweep {rows}x{n} bf16 "
                     + (f"rule: reload={reload0} warpgroups={wgs0} steps={steps0}]" if steps is None else
                        f"reload={reload} warpgroups={wgs} steps={steps} smem={smem_bytes(n, steps, wgs) // 1024} KiB]"))
            if steps is not None and smem_bytes(n, steps, wgs) > SMEM_LIMIT:
                continue
            if elapsed() > budget:
                say(f"{label} skipped (budget)")
                continue
            try:
                fn = jax.jit(functools.partial(mosaic_backward.rms_norm_backward, eps=1e-6, mode="llama",
                                               weight_offset=0.0, has_residual=False, steps=steps, reload=reload,
                                               warpgroups=wgs))
                (dx, _, dw), lines = ptxas_lines(fn, z, w, g)
                t = seconds(fn, z, w, g)
                if default is None:
                    default, same = (bits(dx), bits(dw)), "(the reference)"
                else:
                    same = f"bits == rule's: {bool(jnp.all(bits(dx) == default[0]) & jnp.all(bits(dw) == default[1]))}"
                regs = "; ".join(ln for ln in lines if "Used" in ln or "spill stores" in ln) or "(no ptxas lines)"
                say(f"{label} {t * 1e6:.1f} us = {100 * t_copy / t:.0f} % of copy ({t_copy * 1e6:.1f} us); {same}; {regs}")
            except Exception as e:  # noqa: BLE001 - one line per failing combination, and go on
                say(f"{label} FAIL {type(e).__name__}: {' '.join(str(e).split())[:300]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which no new bit-check case (or sweep combination) starts; 50 (160)")
    parser.add_argument("--sweep", action="store_true", help="time the variants x steps instead (see above)")
    args = parser.parse_args()
    say(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    if not GPU:
        for c in [c for c in case_list() if c["res"] == "none"][:2]:
            x, w, g, r, gr = inputs(c)
            want = ref.rms_norm_backward(x, w, g, 1e-6, r, gr, mode=c["mode"], weight_offset=c["off"])
            got = mosaic_backward.rms_norm_backward_emulated(x, w, g, None, eps=1e-6, mode=c["mode"],
                                                             weight_offset=c["off"], has_residual=False)
            bad = [d for d in (first_diff("emulated", a, e) for a, e in zip((got[0], got[2]), want)) if d]
            say(f"[emulated n={c['n']} {c['dtype']}] {'FAIL ' + '; '.join(bad) if bad else 'ok (== reference)'}")
        say("no GPU: this probe needs a Hopper GPU (jax's default backend is not 'gpu'); nothing timed")
        return 1
    if args.sweep:
        sweep_section(160.0 if args.budget is None else args.budget)
        return 0
    ptxas_section()
    bits_section(50.0 if args.budget is None else args.budget)
    speed_section()
    return 0


if __name__ == "__main__":
    sys.exit(main())
