"""bi_jax's gradients under jax.vmap and with a batch sharded over the 4 host devices, bit for bit.

- vmap of a gradient (per-example gradients): each example's gradients, grad_weight included,
  are those of an unbatched call on that example, weight batched or not.
- jax.grad of a vmapped loss with an unbatched weight: JAX's custom_vjp batching sums the
  per-example grad_weights (`.sum(0)` on rounded values; batching.py's _match_axes_and_sum), so
  the result is deterministic but not one tree over the folded rows. Tested as exactly that sum.
- Sharded rows: grad_x stays per shard (no gather of x; the only collective is an all-gather of
  one float32 row of partials per shard); grad_weight equals a single-device run for equal
  power-of-two shards, and is the contract's tree over the shards' trees otherwise.
"""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax_backward_helpers import assert_bits, assert_grads, expected, grads, random_rows, random_weight

import bi_jax
from bridge import reference

N = 100
EPS = 1e-6


def _seed(*parts) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def _loss(x, w, g, r=None):
    """sum(out * g): d loss / d out = g exactly; with a residual the new residual is unused."""
    out = bi_jax.rms_norm(x, w, EPS, r)
    out = out if r is None else out[0]
    return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# A) jax.vmap
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_batched", [False, True])
@pytest.mark.parametrize("kind", ["none", "float32"])
def test_vmap_of_the_gradient_is_per_example(weight_batched, kind):
    rng = np.random.default_rng(_seed("per-example", weight_batched, kind))
    xs, gs = random_rows(rng, (3, 4, N), "bfloat16"), random_rows(rng, (3, 4, N), "bfloat16")
    rs = None if kind == "none" else random_rows(rng, (3, 4, N), "float32")
    ws = np.stack([random_weight(rng, N, "bfloat16") for _ in range(3)])
    w_in = ws if weight_batched else ws[0]
    argnums = (0, 1) if rs is None else (0, 1, 3)
    f = jax.jit(jax.vmap(jax.grad(_loss, argnums=argnums), in_axes=(0, 0 if weight_batched else None, 0,
                                                                    None if rs is None else 0)))
    got = f(jnp.asarray(xs), jnp.asarray(w_in), jnp.asarray(gs), None if rs is None else jnp.asarray(rs))
    for i in range(3):
        w = ws[i] if weight_batched else ws[0]
        r = None if rs is None else rs[i]
        mine = tuple(a[i] for a in got)
        mine = mine if r is None else (mine[0], mine[2], mine[1])
        assert_grads(expected(xs[i], w, gs[i], EPS, r), mine, f"example {i} vs reference")
        assert_grads(grads(xs[i], w, gs[i], EPS, r), mine, f"example {i} vs unbatched")


def test_grad_of_a_vmapped_loss_with_a_batched_weight():
    rng = np.random.default_rng(_seed("grad-vmap-batched"))
    xs, gs = random_rows(rng, (3, 4, N), "float16"), random_rows(rng, (3, 4, N), "float16")
    ws = np.stack([random_weight(rng, N, "float16") for _ in range(3)])
    total = lambda x, w, g: jnp.sum(jax.vmap(_loss)(x, w, g))  # noqa: E731
    gx, gw = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(xs), jnp.asarray(ws), jnp.asarray(gs))
    for i in range(3):
        assert_grads(expected(xs[i], ws[i], gs[i], EPS), (gx[i], gw[i]), f"example {i}")


def test_grad_of_a_vmapped_loss_with_a_shared_weight_sums_per_example_grads():
    rng = np.random.default_rng(_seed("grad-vmap-shared"))
    xs, gs = random_rows(rng, (4, 4, N), "bfloat16"), random_rows(rng, (4, 4, N), "bfloat16")
    w = random_weight(rng, N, "bfloat16")
    total = lambda x, w_, g: jnp.sum(jax.vmap(_loss, in_axes=(0, None, 0))(x, w_, g))  # noqa: E731
    f = jax.jit(jax.grad(total, argnums=(0, 1)))
    gx, gw = f(jnp.asarray(xs), jnp.asarray(w), jnp.asarray(gs))
    per_example = [expected(xs[i], w, gs[i], EPS) for i in range(4)]
    for i in range(4):
        assert_bits(per_example[i][0], gx[i], f"grad_x of example {i}")
    summed = jnp.sum(jnp.stack([jnp.asarray(p[1]) for p in per_example]), axis=0)
    assert_bits(summed, gw, "grad_weight is JAX's sum of the per-example grad_weights")
    assert_bits(gw, f(jnp.asarray(xs), jnp.asarray(w), jnp.asarray(gs))[1], "and deterministic")
    # The same rows folded into one call give one tree over all 16 rows: other bits here, which
    # is why the README says to fold the batch rather than vmap the loss.
    folded = expected(xs.reshape(16, N), w, gs.reshape(16, N), EPS)[1]
    assert reference.bits(folded).tolist() != reference.bits(np.asarray(gw)).tolist()


# --------------------------------------------------------------------------------------------
# B) Rows sharded over the 4 host devices.
# --------------------------------------------------------------------------------------------

OTHER_COLLECTIVES = ("all-to-all", "all-reduce", "collective-permute", "reduce-scatter")


def _sharded_grads(mesh, spec, x, w, g, r):
    rows = NamedSharding(mesh, spec)
    put = lambda a, s: None if a is None else jax.device_put(a, s)  # noqa: E731
    args = (put(x, rows), put(w, NamedSharding(mesh, PartitionSpec())), put(g, rows), put(r, rows))
    f = jax.jit(jax.grad(_loss, argnums=(0, 1) if r is None else (0, 1, 3)))
    return f(*args), f.lower(*args).compile().as_text(), rows


def _check_collectives(hlo: str, shards: int, n: int) -> None:
    gathers = [line.strip() for line in hlo.splitlines() if " all-gather(" in line]
    assert gathers, "grad_weight's partials must be gathered"
    for line in gathers:  # only the float32 partials, one row per shard; never x or the gradients
        assert re.search(rf"= f32\[{shards},{n}\]\S* all-gather\(", line), line
    assert not [c for c in OTHER_COLLECTIVES if c in hlo]


@pytest.fixture(scope="module")
def devices():
    found = jax.devices()
    assert len(found) == 4, "tests/conftest.py sets --xla_force_host_platform_device_count=4"
    return np.array(found)


@pytest.mark.parametrize("kind", ["none", "float32"])
def test_equal_power_of_two_shards_give_single_device_bits(devices, kind):
    rng = np.random.default_rng(_seed("shards", kind))
    x, g = random_rows(rng, (16, N), "bfloat16"), random_rows(rng, (16, N), "bfloat16")
    w = random_weight(rng, N, "bfloat16")
    r = None if kind == "none" else random_rows(rng, (16, N), "float32")
    mesh = Mesh(devices, ("b",))
    got, hlo, rows = _sharded_grads(mesh, PartitionSpec("b", None), x, w, g, r)
    got = got if r is None else (got[0], got[2], got[1])
    assert_grads(expected(x, w, g, EPS, r), got, "4 shards of 4 rows vs reference")
    single = jax.jit(jax.grad(_loss, argnums=(0, 1) if r is None else (0, 1, 3)))(
        *(None if a is None else jax.device_put(a, devices[0]) for a in (x, w, g, r)))
    single = single if r is None else (single[0], single[2], single[1])
    assert_grads(single, got, "sharded vs one device")
    for a in got[:-1]:  # grad_x (and grad_residual) stay per shard
        assert a.sharding.is_equivalent_to(rows, 2), a.sharding
        assert {s.data.shape for s in a.addressable_shards} == {(4, N)}
    _check_collectives(hlo, 4, N)


def test_rows_over_two_mesh_axes(devices):
    rng = np.random.default_rng(_seed("two-axes"))
    x, g = random_rows(rng, (8, N), "float32"), random_rows(rng, (8, N), "float32")
    w = random_weight(rng, N, "float32")
    (gx, gw), hlo, _ = _sharded_grads(Mesh(devices.reshape(2, 2), ("a", "b")), PartitionSpec(("a", "b"), None),
                                      x, w, g, None)
    assert_grads(expected(x, w, g, EPS), (gx, gw), "rows over ('a', 'b')")
    _check_collectives(hlo, 4, N)


def test_unequal_tree_shards_are_the_tree_over_the_shards_trees(devices):
    """4 shards of 3 rows: each shard's tree pads its 3 rows to 4, then the 4 roots are combined
    pairwise: deterministic for this mesh, and not the single-device tree over 12 rows (NUMERICS.md)."""
    rng = np.random.default_rng(_seed("uneven"))
    x, g = random_rows(rng, (12, N), "float32"), random_rows(rng, (12, N), "float32")
    w = random_weight(rng, N, "float32")
    mesh = Mesh(devices, ("b",))
    (gx, gw), hlo, _ = _sharded_grads(mesh, PartitionSpec("b", None), x, w, g, None)
    single = expected(x, w, g, EPS)
    assert_bits(single[0], gx, "grad_x is per row, whatever the shards")
    # B7 per shard: p = g * h, h = rn(v * inv) (float32: both modes), the forward with a unit weight.
    h = reference.rms_norm(x, np.ones(N, np.float32), EPS).astype(np.float32)
    p = (g * h).reshape(4, 3, N)
    roots = np.stack([reference.pairwise_sum(np.ascontiguousarray(p[s].T)) for s in range(4)])
    want = reference.encode(reference.pairwise_sum(np.ascontiguousarray(roots.T)), "float32")
    assert_bits(want, gw, "the tree over the 4 shards' trees")
    assert reference.bits(want).tolist() != reference.bits(single[1]).tolist(), "the data must tell them apart"
    again = _sharded_grads(mesh, PartitionSpec("b", None), x, w, g, None)[0][1]
    assert_bits(gw, again, "deterministic for the mesh")
    _check_collectives(hlo, 4, N)
