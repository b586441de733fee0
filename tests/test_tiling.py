"""bridge.numerics.tiling's backward rule: what the bits rely on, whatever the tuning constants are."""

from __future__ import annotations

import dataclasses

import itertools
import math

import pytest

from bridge.numerics import tiling
from bridge.numerics.contract import next_power_of_two


@pytest.mark.parametrize("programs", [1, 100, 256, 264, 1056])
@pytest.mark.parametrize("levels", [0, 2, 4])
@pytest.mark.parametrize("tile", [2048, 16384, 32768])
def test_backward_blocks_are_aligned_subtrees_of_the_row_tree(programs: int, levels: int, tile: int,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(tiling, "BACKWARD_PROGRAMS", programs)
    monkeypatch.setattr(tiling, "MAX_BACKWARD_LEVELS", levels)
    monkeypatch.setattr(tiling, "BACKWARD_TILE_BYTES", tile)
    for n, n_rows, itemsize in itertools.product((1, 3, 128, 129, 4096, 5120, 16384, 16385, 65536),
                                                 (0, 1, 3, 7, 33, 100, 4096, 16384, 65537), (2, 4)):
        cfg = tiling.backward_config(n, n_rows, itemsize)
        rows_pow2 = next_power_of_two(max(n_rows, 1))
        where = f"n={n} rows={n_rows} itemsize={itemsize}: {cfg}"
        # Powers of two: a block is a complete subtree, and so is a tile inside it.
        for value in (cfg.rows, cfg.steps, cfg.chunk, cfg.num_chunks) + cfg.tree_groups:
            assert value & (value - 1) == 0, where
        # Never padded past the row count's power of two: that would add +0.0 to a -0.0 sum.
        assert cfg.block_rows <= rows_pow2, where
        assert cfg.blocks * cfg.block_rows >= n_rows and (cfg.blocks - 1) * cfg.block_rows < max(n_rows, 1), where
        assert math.prod(cfg.tree_groups) == next_power_of_two(cfg.blocks), where
        assert all(g <= tiling.COLUMN_TREE_GROUP for g in cfg.tree_groups), where
        assert cfg.chunk * cfg.num_chunks == next_power_of_two(n), where
        assert cfg.steps <= 1 << levels, where
        # Long rows, and short batches' slabs: the stats pass sums each row in aligned chunks that
        # cover it exactly.
        slab = cfg.stats_chunk == next_power_of_two(n) and next_power_of_two(n) * itemsize <= tile
        assert (cfg.num_chunks > 1) == (next_power_of_two(n) * itemsize > tile or slab), where
        if slab:
            assert tiling.SLAB_MIN_ROWS <= rows_pow2 <= tiling.SLAB_MAX_ROWS, where
        if cfg.num_chunks > 1:
            assert cfg.stats_chunk & (cfg.stats_chunk - 1) == 0, where
            assert cfg.stats_chunk * cfg.stats_chunks == next_power_of_two(n), where
            assert cfg.split <= cfg.stats_chunk, where
        else:
            assert cfg.stats_chunk == 0 and cfg.split <= cfg.chunk, where


@pytest.mark.parametrize("kernel", ["triton", "pallas"])
@pytest.mark.parametrize("kind", ["", "NVIDIA H100 80GB HBM3", "NVIDIA H200"])
def test_forward_configs_are_valid_on_every_device(kind: str, kernel: str) -> None:
    for n in (1, 3, 128, 129, 1024, 4096, 5120, 8192, 16384, 16385, 65536):
        for n_rows in (0, 1, 3, 64, 128, 129, 1000, 16384, 65537):
            for itemsize, res in ((2, 0), (2, 2), (4, 4), (4, 0)):
                cfg = tiling.launch_config(n, n_rows, itemsize, res, kind, kernel)
                where = f"{kind!r} n={n} rows={n_rows} itemsize={itemsize}: {cfg}"
                for value in (cfg.rows, cfg.chunk, cfg.num_chunks, cfg.num_warps, cfg.split):
                    assert value & (value - 1) == 0, where
                assert cfg.chunk * cfg.num_chunks == next_power_of_two(n), where
                assert cfg.rows <= next_power_of_two(max(n_rows, 1)) and cfg.num_warps <= 16, where
                assert cfg.split <= cfg.chunk, where


def test_only_the_h200_triton_rule_differs_and_only_on_full_grids() -> None:
    h100 = "NVIDIA H100 80GB HBM3"
    changed = []
    for n in (128, 1024, 4096, 8192, 65536):
        for n_rows in (1, 64, 128, 4096, 65536):
            for itemsize, res in ((2, 0), (2, 2), (4, 0), (4, 4)):
                default = tiling.launch_config(n, n_rows, itemsize, res)
                assert tiling.launch_config(n, n_rows, itemsize, res, h100) == default
                assert tiling.launch_config(n, n_rows, itemsize, res, "NVIDIA H200", "pallas") == default
                h200 = tiling.launch_config(n, n_rows, itemsize, res, "NVIDIA H200", "triton")
                if h200 != default:
                    assert -(-n_rows // default.rows) > tiling.SMALL_GRID, f"n={n} rows={n_rows}: small grid changed"
                    assert (h200.rows, h200.chunk, h200.split) == (default.rows, default.chunk, default.split)
                    changed.append((n, n_rows, itemsize, res))
    # The measured cases (bf16): 4096 on 2 warps, 8192 on 4, instead of 8.
    for n, warps in ((4096, 2), (8192, 4)):
        cfg = tiling.launch_config(n, 16384, 2, 0, "NVIDIA H200", "triton")
        assert (cfg.rows, cfg.num_warps) == (1, warps) and (n, 4096, 2, 0) in changed


def test_the_group_fp8_rule_changes_warps_only_where_measured() -> None:
    """Per-group FP8 without a residual on a full GPU grid: rows of 8192 on 4 warps; nothing else
    moves (other widths, a residual, small grids, the interpreters, the static and bf16 outputs).
    The FP8 outputs take the default rule on every GPU (the H200's knob is the bf16 output's)."""
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        for kernel in ("triton", "pallas"):
            for n in (4096, 5120, 8192, 16384):
                for n_rows, res in ((16384, 0), (16384, 2), (64, 0)):
                    base = tiling.launch_config(n, n_rows, 2, res, "NVIDIA H100 80GB HBM3", kernel)
                    assert tiling.launch_config(n, n_rows, 2, res, kind, kernel, "static") == base
                    group = tiling.launch_config(n, n_rows, 2, res, kind, kernel, "group")
                    if tiling.next_power_of_two(n) == 8192 and res == 0 and n_rows > tiling.SMALL_GRID:
                        assert group == dataclasses.replace(base, num_warps=4), (kind, kernel, n, n_rows)
                    else:
                        assert group == base, (kind, kernel, n, n_rows, res)
    assert tiling.launch_config(8192, 16384, 2, 0, "", "triton", "group") == tiling.launch_config(8192, 16384, 2, 0)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_the_h200_rule_gives_the_default_rules_bits(framework: str, monkeypatch) -> None:
    """The kernels under the H200's tiling (forced here: the interpreters use the default) give the
    reference's bits, on a grid large enough that the H200 rule differs."""
    import numpy as np

    from bridge import reference
    from bridge.verify.compare import assert_bitwise_equal

    n, n_rows = 96, 16 * (tiling.SMALL_GRID + 5)
    assert tiling.launch_config(n, n_rows, 2, 2, "NVIDIA H200", "triton") != tiling.launch_config(n, n_rows, 2, 2)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n_rows, n), np.float32).astype(reference.numpy_dtype("bfloat16"))
    r = rng.standard_normal((n_rows, n), np.float32).astype(reference.numpy_dtype("bfloat16"))
    w = (1 + 0.1 * rng.standard_normal(n, np.float32)).astype(reference.numpy_dtype("bfloat16"))
    want = reference.rms_norm(x, w, 1e-6, r)
    def h200(n_: int, rows_: int, itemsize: int, residual_itemsize: int = 0, kind: str = "",
             kernel: str = "triton", quant: str = "none") -> tiling.LaunchConfig:
        return tiling.launch_config(n_, rows_, itemsize, residual_itemsize, "NVIDIA H200", "triton")

    if framework == "torch":
        import bi_torch
        import bi_torch.launch

        monkeypatch.setattr(bi_torch.launch, "launch_config", h200)
        got = bi_torch.rms_norm(bi_torch.from_numpy(x), bi_torch.from_numpy(w), 1e-6, bi_torch.from_numpy(r))
        got = tuple(bi_torch.to_numpy(t) for t in got)
    else:
        import jax
        import jax.numpy as jnp

        import bi_jax
        import bi_jax.ops

        monkeypatch.setattr(bi_jax.ops, "launch_config", h200)
        bi_jax.ops._rows_fn.cache_clear()
        jax.clear_caches()
        try:
            got = tuple(np.asarray(t) for t in bi_jax.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, jnp.asarray(r)))
        finally:
            bi_jax.ops._rows_fn.cache_clear()
            jax.clear_caches()
    for what, a, b in zip(("out", "new residual"), want, got):
        assert_bitwise_equal(a, b, f"{framework}, H200 tiling: {what}")

