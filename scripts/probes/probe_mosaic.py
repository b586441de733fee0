"""One-run probe of the Pallas Mosaic GPU backend for bi-norm (issue 15, item 2).

Answers, one line each, then a summary table:
  1 entry : can a Mosaic GPU kernel be built (plgpu.kernel; pl.pallas_call + plgpu.CompilerParams)?
  2 bw    : GB/s and % of an XLA copy for (16384, 4096) bf16 row kernels (x*2, a naive RMSNorm):
            rows GMEM -> registers -> GMEM directly, and an emit_pipeline (TMA via SMEM) version.
  3a div  : is `a / b` IEEE (div.rn) or approximate (div.full)?   3b fma: is `a*b + c` fused?
  3c sum  : does sum(reshape(.., 2), -1) lower? which order does jnp.sum over a row use (numpy
            pairwise tree / sequential / an emulation of Mosaic's WG_STRIDED reduction)?
  3d sqrt : does lax.sqrt lower with sqrt.rn bits (and what does lax.rsqrt give)?
  3e      : can plgpu.inline_mgpu run div.rn / sqrt.rn / mul.rn+add.rn PTX, with IEEE bits?
On the GPU each small kernel's PTX is dumped (MOSAIC_GPU_DUMP_PTX=1) and its f32 ops counted.
Run: python3 scripts/probes/probe_mosaic.py   (H200, jax 0.11.x: well under a minute). Without a GPU every
kernel is lowered for CUDA (which catches Mosaic lowering errors) and then run in Mosaic GPU
interpret mode, whose bits are CPU bits, not evidence. A failing probe prints one line; the run goes on.
"""
import logging, os, sys, tempfile, time, warnings

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # bridge, for probe_timing
from probe_timing import seconds  # scripts/probes/, on sys.path when run as a script

GPU = jax.default_backend() == "gpu"
T0, RESULTS, F32 = time.time(), [], np.float32
INTERPRETING = [False]  # the interpreter has no layout_cast rule: cast() is a no-op there
logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)  # interpreter failures: 1 line
PTX_OPS = ("div.full.f32", "div.rn.f32", "div.approx", "rcp.", "fma.rn.f32", "mul.rn.f32",
           "add.rn.f32", "mul.f32", "add.f32", "sqrt.rn.f32", "sqrt.approx", "rsqrt.approx")

class InterpretFailed(Exception):
    pass

def probe(name):  # runs the decorated function at once; one line out, whatever happens
    def deco(fn):
        try:
            ans = "skipped: past 50 s" if GPU and time.time() - T0 > 50 else fn()
        except InterpretFailed as e:
            ans = f"lowers for cuda; cpu interpret failed: {str(e).strip().splitlines()[-1][:200]}"
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            ans = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        print(f"[{name}] ({time.time() - T0:.1f} s) {ans}", flush=True)
        RESULTS.append((name, ans))
    return deco

def cast(x, layout):
    return x if INTERPRETING[0] else plgpu.layout_cast(x, layout)

def kernel(body, out, **kw):  # out_type= since jax 0.10; out_shape= before (deprecated since)
    try:
        return plgpu.kernel(body, out_type=out, **kw)
    except TypeError:
        return plgpu.kernel(body, out_shape=out, **kw)

def run(make, *args):
    """make(interpret) -> kernel. GPU: run it with its PTX dumped (Mosaic's C++ writes the dump to
    fd 1, sent to a file meanwhile) and count f32 ops. CPU: lower it for cuda, then interpret it."""
    if GPU:
        sys.stdout.flush()
        os.environ["MOSAIC_GPU_DUMP_PTX"], saved, tmp = "1", os.dup(1), tempfile.TemporaryFile()
        os.dup2(tmp.fileno(), 1)
        try:
            out = jax.block_until_ready(make(None)(*args))
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1), os.close(saved), os.environ.pop("MOSAIC_GPU_DUMP_PTX")
        tmp.seek(0)
        ptx = tmp.read().decode(errors="replace")
        return out, f" ptx{ {op: ptx.count(op) for op in PTX_OPS if op in ptx} }" if ptx.strip() else " (no PTX dump)"
    jax.jit(make(None)).trace(*args).lower(lowering_platforms=("cuda",))
    INTERPRETING[0] = True
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        return jax.block_until_ready(make(InterpretGPUParams())(*args)), " [cpu interpret bits]"
    except Exception as e:  # noqa: BLE001
        raise InterpretFailed(f"{type(e).__name__}: {e}") from None
    finally:
        INTERPRETING[0] = False

def agree(got, ref):
    g, r = (np.asarray(v, F32).view(np.uint32) for v in (got, ref))
    return f"{int((g == r).sum())}/{r.size}"

def tree(s):  # pairwise over the last axis (a power of two long)
    while s.shape[-1] > 1:
        s = (s[..., 0::2] + s[..., 1::2]).astype(F32)
    return s[..., 0]

def pairwise(q):  # NUMERICS.md step 3: zero-pad to a power of two, then the tree
    p = 1 << (q.shape[-1] - 1).bit_length()
    return tree(np.concatenate([q, np.zeros(q.shape[:-1] + (p - q.shape[-1],), F32)], -1))

def sequential(q):
    return np.add.accumulate(q, axis=-1, dtype=F32)[..., -1]

def mosaic_strided(q, vec):
    """FragmentedArray.reduce of a WG_STRIDED array (same code in jax 0.10.2 and main): element
    r*128*vec + t*vec + j sits in thread t, register r, slot j. Sequential over r, then over j, then
    a butterfly over a warp's 32 threads (a pairwise tree), then ((w0 + w1) + (w2 + w3))."""
    a = q.reshape(q.shape[:-1] + (-1, 4, 32, vec))
    acc = a[..., 0, :, :, :]
    for r in range(1, a.shape[-4]):
        acc = (acc + a[..., r, :, :, :]).astype(F32)
    s = acc[..., 0]
    for j in range(1, vec):
        s = (s + acc[..., j]).astype(F32)
    return tree(tree(s))

N, VEC, ROWS = 4096, 2, 8  # small kernels: one warpgroup, (N,) f32 in WG_STRIDED(vec_size=2)
rng = np.random.default_rng(15)
A = (rng.standard_normal(N) * 2.0 ** rng.integers(-8, 9, N)).astype(F32)
B = (rng.standard_normal(N) + np.sign(rng.standard_normal(N)) * 0.5).astype(F32)
C = np.where(np.arange(N) % 2 == 0, -(A * B), rng.standard_normal(N)).astype(F32)  # half cancel
POS = np.abs(A) + F32(1e-3)
X = (rng.standard_normal((ROWS, N)) * 2.0 ** rng.integers(-6, 7, (ROWS, N))).astype(F32)
SEP, FUSED = (A * B).astype(F32) + C, (A.astype(np.float64) * B + C).astype(F32)

def strided(shape, vec=VEC):
    return plgpu.Layout.WG_STRIDED(shape, vec_size=vec)

def elementwise(fn, n_in):  # kernel: o = fn(*inputs) on (N,) f32 GMEM refs
    def body(*refs):
        refs[n_in][...] = fn(*[cast(r[...], strided(r.shape)) for r in refs[:n_in]])
    return lambda i: kernel(body, jax.ShapeDtypeStruct((N,), jnp.float32), interpret=i)

def inline_ptx(instr, *xs):  # plgpu.inline_mgpu + private FragmentedArray helpers: PTX per element
    from jax.experimental.mosaic import gpu as mgpu
    lay, lift = strided((N,)), mgpu.FragmentedArray._lift_fast_instr
    @plgpu.inline_mgpu(arg_types=(lay,) * len(xs),
                       return_type=plgpu.ShapeDtypeStruct((N,), jnp.float32, lay))
    def f(ctx, a, *rest):
        if instr == "mul.rn+add.rn":
            return a._pointwise(lift("mul.rn.f32"), rest[0])._pointwise(lift("add.rn.f32"), rest[1])
        return a._pointwise(lift(instr), *rest)
    return f(*xs)

try:
    from jax.experimental.pallas import triton as _  # noqa: F401
    TRITON = "importable"
except Exception as e:  # noqa: BLE001
    TRITON = f"not importable ({type(e).__name__})"
print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}; Pallas-Triton"
      f" {TRITON}; plgpu has " + ", ".join(f"{a}: {hasattr(plgpu, a)}" for a in ("kernel", "inline_mgpu")))

@probe("1 entry pl.pallas_call+CompilerParams")
def _():
    def body(x_ref, o_ref):  # default BlockSpecs: the whole (32, 128) array staged in SMEM
        o_ref[...] = x_ref[...] + 1.0
    def make(i):
        return pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct((32, 128), jnp.float32),
                              compiler_params=plgpu.CompilerParams(),
                              **({"interpret": i} if i is not None else {}))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out, _ = run(make, A.reshape(32, 128))
    ok = np.array_equal(np.asarray(out).ravel(), A + F32(1))
    return (f"runs, {'correct' if ok else 'WRONG'}; warnings:"
            f" {[f'{x.category.__name__}: {str(x.message)[:100]}' for x in w] or 'none'}")

for name, fn, args, refs in (
        ("1 entry plgpu.kernel", lambda a: a + 1.0, (A,), {"a+1": A + F32(1)}),
        ("3a div a/b", lambda a, b: a / b, (A, B), {"IEEE a/b": A / B}),
        ("3b fma a*b+c", lambda a, b, c: a * b + c, (A, B, C),
         {"rn(rn(a*b)+c)": SEP, "fma": FUSED, f"(inputs that tell them apart: {int((SEP != FUSED).sum())})": None}),
        ("3d lax.sqrt", lax.sqrt, (POS,), {"sqrt.rn": np.sqrt(POS)}),
        ("3d lax.rsqrt", lax.rsqrt, (POS,), {"rn(1/rn(sqrt))": (F32(1) / np.sqrt(POS)).astype(F32)}),
        ("3e inline_mgpu div.rn.f32", lambda a, b: inline_ptx("div.rn.f32", a, b), (A, B), {"IEEE a/b": A / B}),
        ("3e inline_mgpu sqrt.rn.f32", lambda a: inline_ptx("sqrt.rn.f32", a), (POS,), {"sqrt.rn": np.sqrt(POS)}),
        ("3e inline_mgpu mul.rn+add.rn", lambda a, b, c: inline_ptx("mul.rn+add.rn", a, b, c), (A, B, C),
         {"rn(rn(a*b)+c)": SEP, "fma": FUSED})):
    @probe(name)
    def _():
        out, ptx = run(elementwise(fn, len(args)), *args)
        return ", ".join(k if r is None else f"agrees with {k} {agree(out, r)}" for k, r in refs.items()) + ptx

@probe("3c reshape(8,W/2,2).sum(-1) WG_STRIDED")
def _():
    def body(x_ref, o_ref):
        o_ref[...] = jnp.sum(cast(x_ref[...], strided((8, N // 8))).reshape(8, N // 16, 2), -1)
    x = A.reshape(8, N // 8)
    out, _ = run(lambda i: kernel(body, jax.ShapeDtypeStruct((8, N // 16), jnp.float32), interpret=i), x)
    return f"lowers; agrees with numpy {agree(out, x.reshape(8, N // 16, 2).sum(-1, dtype=F32))}"

@probe("3c reshape(64,32,2).sum(-1) WGMMA")
def _():
    def body(o_ref):  # a tiled (WGMMA layout) array, made in registers
        x = (lax.broadcasted_iota(jnp.float32, (64, 64), 1) if INTERPRETING[0] else
             plgpu.broadcasted_iota(jnp.float32, (64, 64), 1, layout=plgpu.Layout.WGMMA))
        o_ref[...] = jnp.sum(x.reshape(64, 32, 2), axis=-1)
    out, _ = run(lambda i: kernel(body, jax.ShapeDtypeStruct((64, 32), jnp.float32), interpret=i))
    return f"lowers; agrees {agree(out, np.broadcast_to(np.arange(32) * 4 + 1, (64, 32)))}"

for square in (False, True):  # ROWS rows of N f32 -> one jnp.sum each, stored broadcast to 128
    @probe("3c jnp.sum(v*v) over rows (squares fused?)" if square else "3c jnp.sum(v) over rows: order")
    def _():
        def body(x_ref, o_ref):
            for r in range(ROWS):
                v = cast(x_ref[r], strided((N,)))
                o_ref[r] = jnp.broadcast_to(jnp.sum(v * v if square else v), (128,))
        out, ptx = run(lambda i: kernel(body, jax.ShapeDtypeStruct((ROWS, 128), jnp.float32),
                                        interpret=i), X)
        got, q = np.asarray(out)[:, 0], ((X * X).astype(F32) if square else X)
        return (f"rows agree{' with rn squares summed' if square else ''}: pairwise {agree(got, pairwise(q))},"
                f" sequential {agree(got, sequential(q))}, mosaic-strided emulation"
                f" {agree(got, mosaic_strided(q, VEC))}{ptx}")

# 2. bandwidth: (R, W) bf16 in and out, one warpgroup per block, a row in WG_STRIDED(vec_size=8)
R, W, EPS = (16384, 4096, 1e-6) if GPU else (64, 1024, 1e-6)
XB = jax.random.normal(jax.random.key(0), (R, W), jnp.bfloat16)
WB = (1.0 + 0.1 * jax.random.normal(jax.random.key(1), (W,))).astype(jnp.bfloat16)
GB, COPY = 2 * R * W * 2 / 1e9, {}

def row_op(kind, x, w, mean):  # x*2, or a llama-mode RMSNorm with jnp ops (not the contract's)
    f = x.astype(jnp.float32)
    if kind == "x*2":
        return (f * 2.0).astype(jnp.bfloat16)
    y = (f * lax.rsqrt(mean(f * f) + EPS)).astype(jnp.bfloat16)
    return (y.astype(jnp.float32) * w.astype(jnp.float32)).astype(jnp.bfloat16)

def bw_direct(kind, rb):  # R/rb blocks; each moves rb rows GMEM -> registers -> GMEM (ld/st.global)
    lay = strided((W,), 8)
    def body(x_ref, w_ref, o_ref):
        w, base = cast(w_ref[...], lay), lax.axis_index("b") * rb
        for r in range(rb):
            o_ref[base + r] = row_op(kind, cast(x_ref[base + r], lay), w, lambda q: jnp.sum(q) / W)
    return lambda i: kernel(body, jax.ShapeDtypeStruct((R, W), jnp.bfloat16), grid=(R // rb,),
                            grid_names=("b",), interpret=i)

def bw_pipeline(kind, rb, blocks, stages):
    """`blocks` blocks, each an emit_pipeline over its rows, rb rows (GMEM -> SMEM by TMA) a step.
    A TMA box has <= 256 elements a dimension: rows are viewed as (W/256, 256), a free reshape."""
    lay, steps, shp = strided((W // 256, 256), 8), R // (rb * blocks), (R, W // 256, 256)
    def body(x_ref, w_ref, o_ref):
        w, b = cast(w_ref[...], lay), lax.axis_index("b")
        def step(_, x_smem, o_smem):
            for r in range(rb):
                o_smem[r] = row_op(kind, cast(x_smem[r], lay), w, lambda q: jnp.sum(q) / W)
        spec = plgpu.BlockSpec((rb, W // 256, 256), lambda s: (b * steps + s, 0, 0))
        plgpu.emit_pipeline(step, grid=(steps,), in_specs=[spec], out_specs=[spec],
                            max_concurrent_steps=stages)(x_ref, o_ref)
    def make(i):
        k = kernel(body, jax.ShapeDtypeStruct(shp, jnp.bfloat16), grid=(blocks,), grid_names=("b",),
                   interpret=i)
        return lambda x, w: k(x.reshape(shp), w.reshape(W // 256, 256)).reshape(R, W)
    return make

REF = {k: jax.jit(lambda x, w, k=k: row_op(k, x, w, lambda q: jnp.mean(q, -1, keepdims=True)))
       for k in ("x*2", "rms")}  # the same ops through XLA

@probe("2 bw xla copy")
def _():
    if not GPU:
        return "no GPU: not timed"
    COPY["t"] = t = seconds(jax.jit(lambda x: x.copy()), XB)
    t2, t3 = (seconds(REF[k], XB, WB) for k in ("x*2", "rms"))
    return (f"copy {t * 1e6:.1f} us = {GB / t:.0f} GB/s; XLA x*2 {GB / t2:.0f} GB/s ({100 * t / t2:.0f} %);"
            f" XLA jnp rmsnorm {GB / t3:.0f} GB/s ({100 * t / t3:.0f} %)")

for label, make in (("direct rb=1", lambda k: bw_direct(k, 1)),
                    ("direct rb=4", lambda k: bw_direct(k, 4)),
                    ("pipeline rb=2 stages=4", lambda k: bw_pipeline(k, 2, 128 if GPU else 4, 4)),
                    ("pipeline rb=4 stages=2", lambda k: bw_pipeline(k, 4, 128 if GPU else 4, 2))):
    for kind in ("x*2", "rms"):
        @probe(f"2 bw {label} {kind}")
        def _():
            f = jax.jit(make(kind)(None)) if GPU else None
            out, note = (jax.block_until_ready(f(XB, WB)), "") if GPU else run(make(kind), XB, WB)
            diff = jnp.abs(out.astype(F32) - REF[kind](XB, WB).astype(F32))
            err = f"max|err| vs XLA {float(jnp.max(diff)):.3g}"
            if not GPU:
                return f"{err}{note}; not timed"
            t = seconds(f, XB, WB)
            return f"{t * 1e6:.1f} us = {GB / t:.0f} GB/s = {100 * COPY.get('t', np.nan) / t:.0f} % of copy; {err}"

print(f"\n=== summary ({time.time() - T0:.1f} s, jax {jax.__version__}, {jax.default_backend()}) ===")
for name, ans in RESULTS:
    print(f"{name:<44} | {ans[:160]}")
