"""bi_jax on the CPU under JAX's transformations, bit for bit (the Pallas kernel in interpret mode).

Calls that must agree do, bitwise: jit vs eager, vmap vs per slice, a row alone vs in a batch,
sharded over the 4 host devices (tests/conftest.py sets XLA_FLAGS) vs one device, donated vs not;
each also against bridge.reference. The corpus and argument checks: test_jax_corpus_cpu.py.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from jax_helpers import (JIT, N, _seed, assert_bits, assert_pair_bits, pair, random_rows, random_weight, ref,
                         residual_dtype)

import bi_jax


# --------------------------------------------------------------------------------------------
# C) jax.jit equals eager.
# --------------------------------------------------------------------------------------------

JIT_COMBOS = [("float32", "none", "llama", 0.0), ("bfloat16", "float32", "fp32", 1.0),
              ("float16", "same", "llama", 1.0)]


@pytest.mark.parametrize("dtype,kind,mode,offset", JIT_COMBOS)
def test_jit_matches_eager(dtype, kind, mode, offset):
    rng = np.random.default_rng(_seed("jit", dtype, kind, mode, offset))
    x = random_rows(rng, (3, 5, N), dtype)
    w = random_weight(rng, N, dtype)
    r = None if kind == "none" else random_rows(rng, (3, 5, N), residual_dtype(dtype, kind))
    eps = 1e-5
    jr = None if r is None else jnp.asarray(r)
    eager = pair(bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w), eps, jr, mode=mode, weight_offset=offset),
                 r is not None)
    jitted = pair(JIT(jnp.asarray(x), jnp.asarray(w), eps, jr, mode=mode, weight_offset=offset), r is not None)
    assert_pair_bits(eager, jitted, "jit vs eager")
    assert_pair_bits(ref(x, w, eps, r, mode, offset), jitted, "jit vs reference")
    # interpret=True is what interpret=None picked.
    interpreted = jax.jit(functools.partial(bi_jax.rms_norm, interpret=True),
                          static_argnames=("eps", "mode", "weight_offset"))
    explicit = pair(interpreted(jnp.asarray(x), jnp.asarray(w), eps, jr, mode=mode, weight_offset=offset),
                    r is not None)
    assert_pair_bits(jitted, explicit, "interpret=True vs default")


# --------------------------------------------------------------------------------------------
# D) jax.vmap: a batched call equals the unbatched call on each slice.
# --------------------------------------------------------------------------------------------


def _vmap_inputs(kind: str, dtype: str = "bfloat16"):
    rng = np.random.default_rng(_seed("vmap", kind, dtype))
    x = random_rows(rng, (3, 4, N), dtype)
    r = None if kind == "none" else random_rows(rng, (3, 4, N), residual_dtype(dtype, kind))
    ws = np.stack([random_weight(rng, N, dtype) for _ in range(3)])
    return x, r, ws


@pytest.mark.parametrize("kind", ["none", "float32", "same"])
@pytest.mark.parametrize("axis", [0, 1])
def test_vmap_over_an_axis(axis, kind):
    x, r, ws = _vmap_inputs(kind)
    w, eps, has_r = ws[0], 1e-6, r is not None
    jw = jnp.asarray(w)
    if has_r:
        f = jax.vmap(lambda a, b: bi_jax.rms_norm(a, jw, eps, b), in_axes=(axis, axis), out_axes=axis)
        batched = pair(f(jnp.asarray(x), jnp.asarray(r)), True)
    else:
        f = jax.vmap(lambda a: bi_jax.rms_norm(a, jw, eps), in_axes=axis, out_axes=axis)
        batched = pair(f(jnp.asarray(x)), False)
    assert batched[0].shape == x.shape
    assert_pair_bits(ref(x, w, eps, r), batched, f"vmap axis {axis} vs reference")
    for i in range(x.shape[axis]):
        xi = np.take(x, i, axis=axis)
        ri = None if r is None else jnp.asarray(np.take(r, i, axis=axis))
        single = pair(JIT(jnp.asarray(xi), jw, eps, ri), has_r)
        sliced = tuple(None if b is None else np.take(np.asarray(b), i, axis=axis) for b in batched)
        assert_pair_bits(single, sliced, f"vmap axis {axis}, slice {i} vs unbatched")


@pytest.mark.parametrize("kind", ["none", "float32"])
def test_vmap_with_a_batched_weight(kind):
    x, r, ws = _vmap_inputs(kind)
    eps, mode, offset, has_r = 1e-5, "fp32", 1.0, r is not None
    fn = functools.partial(bi_jax.rms_norm, eps=eps, mode=mode, weight_offset=offset)
    if has_r:
        batched = pair(jax.vmap(lambda a, w, b: fn(a, w, residual=b), in_axes=(0, 0, 0))(
            jnp.asarray(x), jnp.asarray(ws), jnp.asarray(r)), True)
    else:
        batched = pair(jax.vmap(fn, in_axes=(0, 0))(jnp.asarray(x), jnp.asarray(ws)), False)
    for i in range(3):
        ri = None if r is None else r[i]
        single = pair(JIT(jnp.asarray(x[i]), jnp.asarray(ws[i]), eps, None if ri is None else jnp.asarray(ri),
                          mode=mode, weight_offset=offset), has_r)
        sliced = tuple(None if b is None else b[i] for b in batched)
        assert_pair_bits(single, sliced, f"batched weight, slice {i} vs unbatched")
        assert_pair_bits(ref(x[i], ws[i], eps, ri, mode, offset), sliced, f"batched weight, slice {i} vs reference")


def test_vmap_with_only_the_weight_batched():
    x, _, ws = _vmap_inputs("none")
    eps = 1e-6
    batched = jax.vmap(lambda w: bi_jax.rms_norm(jnp.asarray(x[0]), w, eps))(jnp.asarray(ws))
    assert batched.shape == (3, 4, N)
    for i in range(3):
        assert_bits(JIT(jnp.asarray(x[0]), jnp.asarray(ws[i]), eps), batched[i], f"weight {i} vs unbatched")
        assert_bits(ref(x[0], ws[i], eps)[0], batched[i], f"weight {i} vs reference")


def test_nested_vmap_under_jit():
    x, r, ws = _vmap_inputs("float32")
    eps, w = 1e-6, jnp.asarray(ws[1])
    f = jax.jit(jax.vmap(jax.vmap(lambda a, b: bi_jax.rms_norm(a, w, eps, b))))
    got = pair(f(jnp.asarray(x), jnp.asarray(r)), True)
    assert_pair_bits(ref(x, ws[1], eps, r), got, "jit(vmap(vmap)) vs reference")


# --------------------------------------------------------------------------------------------
# E) Batch invariance: a row alone vs the same row in batches, anywhere, among random rows.
# --------------------------------------------------------------------------------------------

# n = 16385 takes the chunked path (rows longer than MAX_WHOLE_ROW: one row per program, 2 chunks).
INVARIANCE_COMBOS = [("float32", "none", "llama", 0.0, N), ("bfloat16", "float32", "llama", 0.0, N),
                     ("float16", "same", "fp32", 1.0, N), ("bfloat16", "float32", "fp32", 1.0, 16385)]


@pytest.mark.parametrize("dtype,kind,mode,offset,n", INVARIANCE_COMBOS)
def test_batch_invariance(dtype, kind, mode, offset, n):
    rng = np.random.default_rng(_seed("invariance", dtype, kind, mode, offset, n))
    eps, has_r, rdt = 1e-6, kind != "none", residual_dtype(dtype, kind)
    w = jnp.asarray(random_weight(rng, n, dtype))
    row = random_rows(rng, (n,), dtype)
    res_row = None if not has_r else random_rows(rng, (n,), rdt)

    def call(xs, rs):
        return pair(JIT(jnp.asarray(xs), w, eps, None if rs is None else jnp.asarray(rs), mode=mode,
                        weight_offset=offset), has_r)

    alone = call(row, res_row)  # a 1-D x: one row
    assert_pair_bits(ref(row[None], np.asarray(w), eps, None if res_row is None else res_row[None], mode, offset),
                     tuple(None if a is None else a[None] for a in alone), "alone vs reference")
    for batch in (1, 2, 5, 33):
        for lead in ((batch,), (2, batch)):
            for pos in sorted({0, batch // 2, batch - 1}):
                index = (lead[0] - 1, pos) if len(lead) == 2 else (pos,)
                xs = random_rows(rng, lead + (n,), dtype)
                xs[index] = row
                rs = None
                if has_r:
                    rs = random_rows(rng, lead + (n,), rdt)
                    rs[index] = res_row
                got = call(xs, rs)
                what = f"row at {index} of {lead + (n,)}"
                assert_pair_bits(alone, tuple(None if g is None else g[index] for g in got), what)


# --------------------------------------------------------------------------------------------
# F) A batch sharded over the 4 host devices runs the kernel per shard, without a gather.
# --------------------------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")


@pytest.mark.parametrize("kind", ["none", "float32"])
def test_sharded_rows(mesh, kind):
    rng = np.random.default_rng(_seed("sharded", kind))
    dtype, eps, has_r = "bfloat16", 1e-6, kind != "none"
    x = random_rows(rng, (8, N), dtype)
    w = random_weight(rng, N, dtype)
    r = random_rows(rng, (8, N), "float32") if has_r else None
    rows = NamedSharding(mesh, PartitionSpec("b", None))
    replicated = NamedSharding(mesh, PartitionSpec())
    args = [jax.device_put(x, rows), jax.device_put(w, replicated)]
    if has_r:
        args.append(jax.device_put(r, rows))
    f = jax.jit(lambda a, b, *c: bi_jax.rms_norm(a, b, eps, *c))
    got = pair(f(*args), has_r)

    single = pair(f(*(jax.device_put(a, jax.devices()[0]) for a in (x, w) + ((r,) if has_r else ()))), has_r)
    assert_pair_bits(single, got, "sharded vs one device")
    assert_pair_bits(ref(x, w, eps, r), got, "sharded vs reference")
    for out in got:
        if out is None:
            continue
        assert out.sharding.is_equivalent_to(rows, out.ndim), out.sharding
        assert {s.data.shape for s in out.addressable_shards} == {(2, N)}
    hlo = f.lower(*args).compile().as_text()
    assert not [c for c in COLLECTIVES if c in hlo], "the kernel must run on each shard's rows"


def test_sharded_leading_axis_of_3d_input(mesh):
    rng = np.random.default_rng(_seed("sharded3d"))
    x, w, eps = random_rows(rng, (4, 3, N), "float32"), random_weight(rng, N, "float32"), 1e-6
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("b", None, None)))
    ws = jax.device_put(w, NamedSharding(mesh, PartitionSpec()))
    f = jax.jit(lambda a, b: bi_jax.rms_norm(a, b, eps))
    got = f(xs, ws)
    assert_bits(ref(x, w, eps)[0], got, "3-D sharded vs reference")
    assert_bits(f(jax.device_put(x, jax.devices()[0]), jax.device_put(w, jax.devices()[0])), got,
                "3-D sharded vs one device")
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("b", None, None)), 3), got.sharding
    hlo = f.lower(xs, ws).compile().as_text()
    assert not [c for c in COLLECTIVES if c in hlo]


def test_sharded_columns_still_give_the_same_bits(mesh):
    # Rows split across columns must be gathered first; whatever XLA does, the bits are the row's.
    rng = np.random.default_rng(_seed("sharded-cols"))
    x, w, eps = random_rows(rng, (6, 128), "bfloat16"), random_weight(rng, 128, "bfloat16"), 1e-6
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "b")))
    ws = jax.device_put(w, NamedSharding(mesh, PartitionSpec("b")))
    got = jax.jit(lambda a, b: bi_jax.rms_norm(a, b, eps))(xs, ws)
    assert_bits(ref(x, w, eps)[0], got, "column-sharded vs reference")


# --------------------------------------------------------------------------------------------
# G) Donating x and the residual: out is written in x's buffer and the new residual in the
#    residual's, with the same bits (jax.jit pairs x with `out`, the residual with the new one).
# --------------------------------------------------------------------------------------------


def _alias_map(compiled_text: str) -> str:
    match = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", compiled_text)
    return match.group(1) if match else ""


DONATE = [("bfloat16", "float32"), ("float16", "float32"), ("float32", "float32"), ("bfloat16", "bfloat16"),
          ("float16", "float16")]


@pytest.mark.parametrize("dtype,rdtype", DONATE)
def test_donated_residual(dtype, rdtype):
    rng = np.random.default_rng(_seed("donate", dtype, rdtype))
    x, w, r = random_rows(rng, (8, N), dtype), random_weight(rng, N, dtype), random_rows(rng, (8, N), rdtype)
    fn = lambda a, b, c: bi_jax.rms_norm(a, b, 1e-6, c)  # noqa: E731
    plain = jax.jit(fn)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(r))
    donating = jax.jit(fn, donate_argnums=(0, 2))
    jx, jw, jr = jnp.asarray(x), jnp.asarray(w), jnp.asarray(r)
    # Entry output 0 (out) may alias parameter 0 (x), output 1 (the new residual) parameter 2.
    aliases = _alias_map(donating.lower(jx, jw, jr).compile().as_text())
    assert re.search(r"\{0\}: \(0, \{\}, (may|must)-alias\)", aliases), aliases
    assert re.search(r"\{1\}: \(2, \{\}, (may|must)-alias\)", aliases), aliases
    pointers = [jx.unsafe_buffer_pointer(), jr.unsafe_buffer_pointer()]
    got = donating(jx, jw, jr)
    assert jx.is_deleted() and jr.is_deleted()
    assert [g.unsafe_buffer_pointer() for g in got] == pointers, f"outputs not in the donated buffers; {aliases}"
    assert_pair_bits(tuple(plain), tuple(got), "donated vs not")
    assert_pair_bits(ref(x, w, 1e-6, r), tuple(got), "donated vs reference")
    # The residual is left alone when it is not donated (jitted or eager).
    kept = jnp.asarray(r)
    jx = jnp.asarray(x)
    jax.block_until_ready(jax.jit(fn)(jx, jw, kept))
    jax.block_until_ready(fn(jx, jw, kept))
    assert not kept.is_deleted()
    assert_bits(r, kept, "a residual that was not donated is unchanged")
