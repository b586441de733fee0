"""One-run GPU check of bi_jax/mosaic_kernel.py, the Mosaic GPU forward (issue 26, stage 1).

(c) ptx  : one kernel's PTX (MOSAIC_GPU_DUMP_PTX) with its float32 instructions counted, and
           ptxas's register and spill lines (MOSAIC_GPU_DUMP_PTXAS); first, as a smoke test.
(a) bits : the kernel against bridge.numerics.reference.rms_norm bit for bit, n = 1 ... 20000 and
           1 to 300 rows (mostly not powers of two): every n x dtype x residual (none / x's dtype /
           float32), mode and weight offset rotating; then at n = 1000 (the last register masked)
           and 5120 (5 registers, a padded tree) every mode x offset too. Rows take the golden
           corpus's patterns (zeros, huge, inf, NaN, tiny, ...). The first set's cases without a
           residual are also compared with bi_jax's Pallas-Triton kernel (while under 60 % of the
           budget). One line per case; a failing one gives the first differing [row, col] and the
           bits (integer views) of the output, the reference, x and the residual there. No new
           case starts after --budget seconds; the rest are counted as skipped.
(b) speed: 16384 x 4096 and 4096 x 8192 bf16 (llama, no residual) against an XLA copy of x and
           against the Pallas-Triton kernel (us and % of the copy's time); and with a bf16
           residual, both kernels chained in a loop (probe_timing.chained_seconds, with XLA's
           array copies counted) against a copy of x and the residual.

Without a GPU each case's kernel is lowered for CUDA under both lowering semantics (Mosaic's own
MLIR: a lowering error shows here), its module is inspected (every float op must be inline PTX),
and the kernel body runs on numpy (bi_jax.mosaic_kernel.rms_norm_emulated) against the reference:
that checks the body's tree, masks and steps, not the GPU's bits, which are not checked.
Run: python3 scripts/probes/mosaic_forward.py [--budget SECONDS] [--semantics Warpgroup|Lane]
(H100: about 2 minutes at most)
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bi_jax import mosaic_kernel as mk  # noqa: E402
from bridge.golden.forward import PATTERNS, as_dtype, pattern_row, random_weight  # noqa: E402
from bridge.numerics import reference as ref  # noqa: E402
# scripts/probes/ is on sys.path when this runs as a script.
from probe_timing import chained_seconds, elapsed, say, seconds  # noqa: E402

GPU = jax.default_backend() == "gpu"
NS = (1, 2, 3, 7, 64, 100, 1000, 4096, 5120, 8192, 16384, 20000)
ROWS = (1, 3, 300, 2, 17, 255, 5, 100, 33, 7, 256, 129)
DTYPES = ("bfloat16", "float16", "float32")
MODES = (("llama", 0.0), ("fp32", 1.0), ("fp32", 0.0), ("llama", 1.0))
SPEED_SHAPES = ((16384, 4096), (4096, 8192))
SEMANTICS = [mk.SEMANTICS]  # the kernel's lowering semantics on the GPU (--semantics)
PTX_OPS = ("fma.rn.f32", "div.full.f32", "div.approx", "rcp.", "sqrt.approx", "rsqrt.approx", "mul.rn.f32",
           "add.rn.f32", "div.rn.f32", "sqrt.rn.f32", "mul.f32", "add.f32", "cvt.rn.bf16.f32", "cvt.rn.f16.f32",
           "cvt.f32.f16", "shfl.sync.bfly", "bar.sync", "ld.global.v4", "st.global.v4", "ld.local", "st.local")
FLOAT_OPS = re.compile(r'"(?:stable_mosaic_gpu\.)?(arith\.(?:add|sub|mul|div|neg|rem|max|min|cmp|trunc|ext)f|'
                       r'arith\.(?:maximumf|minimumf|truncf|extf|sitofp|uitofp)|math\.[a-z_.]+|llvm\.f[a-z]+|'
                       r'llvm\.intr\.(?:fma|fmuladd)|vector\.(?:fma|reduction))"')


def residual_kinds(d: str):
    return ("none", "same", "float32") if d != "float32" else ("none", "float32")


def case_list():
    cases, seen = [], set()

    def add(n, d, res, mode, off, triton):
        if (n, d, res, mode, off) not in seen:
            seen.add((n, d, res, mode, off))
            i = len(cases)
            cases.append(dict(n=n, rows=ROWS[i % len(ROWS)], dtype=d, res=res, mode=mode, off=off,
                              eps=(1e-6, 1e-5)[i % 2], seed=i, triton=triton and res == "none"))
    # First every n x dtype x residual kind, the mode and offset rotating (most coverage if the
    # budget runs out), then every mode x offset at n = 1000 and 5120.
    k = 0
    for n in NS:
        for d in DTYPES:
            for res in residual_kinds(d):
                add(n, d, res, *MODES[k % len(MODES)], True)
                k += 1
    for n in (1000, 5120):
        for d in DTYPES:
            for res in residual_kinds(d):
                for mode, off in MODES:
                    add(n, d, res, mode, off, False)
    return cases


def inputs(c):
    """x from the golden corpus's row patterns, a weight with a -0.0, a residual mostly normal."""
    rng = np.random.default_rng(c["seed"])
    n, d, rows = c["n"], c["dtype"], c["rows"]
    x = as_dtype(np.stack([pattern_row(rng, PATTERNS[(c["seed"] + i) % len(PATTERNS)], n, d) for i in range(rows)]), d)
    w = random_weight(rng, n, d)
    r = None
    if c["res"] != "none":
        pats = [PATTERNS[(c["seed"] + 3 * i) % len(PATTERNS)] if i % 4 == 3 else "normal" for i in range(rows)]
        r = as_dtype(np.stack([pattern_row(rng, p, n, d) for p in pats]), d if c["res"] == "same" else "float32")
    return x, w, r


def label(c) -> str:
    return (f"n={c['n']} rows={c['rows']} {c['dtype']} res={c['res']} {c['mode']} off={c['off']:g} "
            f"eps={c['eps']:g}")


def first_diff(name: str, got, want, x, r):
    """None if the bits agree, else one line: how many differ and the first [row, col]'s bits."""
    g, e = ref.bits(np.asarray(got)), ref.bits(np.asarray(want))
    bad = g != e
    if not bad.any():
        return None
    i, j = (int(a) for a in np.argwhere(bad)[0])
    hx = lambda a: f"{int(ref.bits(a)[i, j]):#0{2 + 2 * a.dtype.itemsize}x}"  # noqa: E731
    more = f", residual {hx(r)}" if r is not None else ""
    return (f"{name}: {int(bad.sum())}/{bad.size} differ, first [{i},{j}]: got {hx(np.asarray(got))}"
            f" want {hx(np.asarray(want))}, x {hx(x)}{more}")


def expected(c, x, w, r):
    out = ref.rms_norm(x, w, c["eps"], r, mode=c["mode"], weight_offset=c["off"])
    return out if r is not None else (out,)


def mosaic_fn(c, semantics=None):
    semantics = semantics or SEMANTICS[0]
    return jax.jit(lambda x, w, r: mk.rms_norm(x, w, c["eps"], r, mode=c["mode"], weight_offset=c["off"],
                                               semantics=semantics))


def check_on_cpu(c, x, w, r, want) -> str:
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) if a is not None else None for a in (x, w, r)]
    problems, ptx = [], 0
    for semantics in ("Warpgroup", "Lane"):
        text = "\n".join(mk.mosaic_modules(mosaic_fn(c, semantics).trace(*args).lower(lowering_platforms=("cuda",))))
        stray = collections.Counter(FLOAT_OPS.findall(text))
        ptx = sum(1 for a in re.findall(r'asm_string = "([^"]*)"', text) if re.search(r"\.(f32|bf16|f16)\b", a))
        problems += [f"{semantics}: float ops outside PTX {dict(stray)}"] if stray else []
    got = mk.rms_norm_emulated(x, w, c["eps"], r, mode=c["mode"], weight_offset=c["off"])
    got = got if r is not None else (got,)
    problems += [d for d in (first_diff(f"emulated {k}", g, e, x, r)
                             for k, g, e in zip(("out", "new_residual"), got, want)) if d]
    if problems:
        return "FAIL " + "; ".join(problems)
    return (f"ok: lowered for cuda (Warpgroup, Lane); {ptx} float ops, all inline PTX; emulated body =="
            f" reference; kernel bits not checked")


def check_on_gpu(c, x, w, r, want, budget: float) -> str:
    import bi_jax
    dev = [None if a is None else jnp.asarray(a) for a in (x, w, r)]
    got = mosaic_fn(c)(*dev)
    got = got if r is not None else (got,)
    diffs = [d for d in (first_diff(k, g, e, x, r) for k, g, e in zip(("out", "new_residual"), got, want)) if d]
    note = "== reference"
    if c["triton"] and elapsed() < 0.6 * budget:  # each Pallas-Triton compile costs about a second
        tri = jax.jit(lambda x, w: bi_jax.rms_norm(x, w, c["eps"], mode=c["mode"], weight_offset=c["off"],
                                                   interpret=False))(dev[0], dev[1])
        d = first_diff("vs pallas-triton out", got[0], tri, x, r)
        diffs += [d] if d else []
        note += ", == pallas-triton"
    return ("FAIL " + "; ".join(diffs)) if diffs else f"ok ({note})"


def bits_section(budget: float):
    counts = collections.Counter()
    for c in case_list():
        if elapsed() > budget:
            counts["skipped (budget)"] += 1
            continue
        try:
            x, w, r = inputs(c)
            want = expected(c, x, w, r)
            line = check_on_gpu(c, x, w, r, want, budget) if GPU else check_on_cpu(c, x, w, r, want)
        except Exception as e:  # noqa: BLE001 - one line per failing case, and go on
            line = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:400]}"
        counts["fail" if line.startswith("FAIL") else "ok"] += 1
        say(f"[bits {label(c)}] {line}")
    say(f"[bits summary] {dict(counts)}" + ("" if GPU else " (no GPU: bits of the kernel not checked)"))


def speed_section():
    import bi_jax
    for rows, n in SPEED_SHAPES:
        try:
            k1, k2, k3 = jax.random.split(jax.random.key(rows + n), 3)
            x = jax.random.normal(k1, (rows, n), jnp.bfloat16)
            r = jax.random.normal(k3, (rows, n), jnp.bfloat16)
            w = (1.0 + 0.1 * jax.random.normal(k2, (n,))).astype(jnp.bfloat16)
            mos = jax.jit(lambda x, w: mk.rms_norm(x, w, 1e-6, semantics=SEMANTICS[0]))
            tri = jax.jit(lambda x, w: bi_jax.rms_norm(x, w, 1e-6, interpret=False))
            t_copy = seconds(jax.jit(lambda x: x.copy()), x)
            t_mos, t_tri = seconds(mos, x, w), seconds(tri, x, w)
            same = bool(jnp.all(jax.lax.bitcast_convert_type(mos(x, w), jnp.uint16)
                                == jax.lax.bitcast_convert_type(tri(x, w), jnp.uint16)))
            gb = 2 * x.size * 2 / 1e9
            say(f"[speed {rows}x{n} bf16] copy {t_copy * 1e6:.1f} us ({gb / t_copy:.0f} GB/s); mosaic"
                f" {t_mos * 1e6:.1f} us = {100 * t_copy / t_mos:.0f} % of copy; pallas-triton {t_tri * 1e6:.1f} us"
                f" = {100 * t_copy / t_tri:.0f} % of copy; mosaic bits == pallas-triton: {same}")
            # With a residual, chained in a loop (out and the new residual are the next call's x and
            # residual), so that a kernel writing in place is timed without XLA's defensive copies.
            t_copy2 = seconds(jax.jit(lambda x, r: (x.copy(), r.copy())), x, r)
            line = f"[speed {rows}x{n} bf16 + bf16 residual, chained] copy of x and residual {t_copy2 * 1e6:.1f} us"
            for name, kernel in (("mosaic", lambda x, r, w: mk.rms_norm(x, w, 1e-6, r, semantics=SEMANTICS[0])),
                                 ("pallas-triton", lambda x, r, w: bi_jax.rms_norm(x, w, 1e-6, r, interpret=False,
                                                                                   pallas_backend="triton"))):
                t, copies = chained_seconds(kernel, (x.copy(), r.copy()), w)
                line += f"; {name} {t * 1e6:.1f} us = {100 * t_copy2 / t:.0f} % of copy ({copies} array copies)"
            say(line)
        except Exception as e:  # noqa: BLE001
            say(f"[speed {rows}x{n}] FAIL {type(e).__name__}: {' '.join(str(e).split())[:300]}")


def ptx_section():
    """Compile and run two fresh kernels with their PTX and ptxas output dumped (to fd 1, captured)."""
    for c in (dict(n=4096, rows=8, dtype="bfloat16", res="float32", mode="llama", off=1.0, eps=1e-6, seed=1),
              dict(n=20000, rows=8, dtype="float32", res="float32", mode="fp32", off=0.0, eps=1e-6, seed=2)):
        try:
            x, w, r = inputs(c)
            sys.stdout.flush()
            saved, tmp = os.dup(1), tempfile.TemporaryFile()
            os.environ.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1")
            os.dup2(tmp.fileno(), 1)
            try:
                got = jax.block_until_ready(mosaic_fn(c)(*(jnp.asarray(a) for a in (x, w, r))))
            finally:
                sys.stdout.flush()
                os.dup2(saved, 1)
                os.close(saved)
                for k in ("MOSAIC_GPU_DUMP_PTX", "MOSAIC_GPU_DUMP_PTXAS"):
                    os.environ.pop(k)
            tmp.seek(0)
            dump = tmp.read().decode(errors="replace")
            counts = {op: dump.count(op) for op in PTX_OPS if op in dump}
            ptxas = [ln.strip() for ln in dump.splitlines() if re.search(r"registers|spill", ln)]
            bad = [d for d in (first_diff(k, g, e, x, r) for k, g, e in zip(("out", "new_residual"), got,
                                                                             expected(c, x, w, r))) if d]
            say(f"[ptx {label(c)}] {'FAIL ' + '; '.join(bad) if bad else 'bits ok'}; ptx {counts or '(no dump)'};"
                f" ptxas {ptxas[:4] or '(no lines)'}")
        except Exception as e:  # noqa: BLE001
            say(f"[ptx {label(c)}] FAIL {type(e).__name__}: {' '.join(str(e).split())[:300]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0 if GPU else 600.0,
                        help="seconds after which no new bit-check case starts")
    parser.add_argument("--semantics", choices=("Warpgroup", "Lane"), default=mk.SEMANTICS,
                        help="Mosaic GPU lowering semantics of the kernel on the GPU (the CPU lowers both)")
    args = parser.parse_args()
    SEMANTICS[0] = args.semantics
    say(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}; kernel semantics "
        f"{SEMANTICS[0]}")
    if GPU:
        ptx_section()
    bits_section(args.budget)
    if GPU:
        speed_section()
    else:
        say("[speed] no GPU: not timed")


if __name__ == "__main__":
    main()
