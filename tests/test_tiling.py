"""bridge.tiling's backward rule: what the bits rely on, whatever the tuning constants are."""

from __future__ import annotations

import math

import pytest

from bridge import tiling
from bridge.contract import next_power_of_two


@pytest.mark.parametrize("programs", [1, 100, 256, 264, 1056])
@pytest.mark.parametrize("levels", [0, 2, 4])
@pytest.mark.parametrize("tile", [1024, 8192, 16384])
def test_backward_blocks_are_aligned_subtrees_of_the_row_tree(programs: int, levels: int, tile: int,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(tiling, "BACKWARD_PROGRAMS", programs)
    monkeypatch.setattr(tiling, "MAX_BACKWARD_LEVELS", levels)
    monkeypatch.setattr(tiling, "BACKWARD_TILE", tile)
    for n in (1, 3, 128, 129, 4096, 5120, 16384, 16385, 65536):
        for n_rows in (0, 1, 3, 7, 33, 100, 4096, 16384, 65537):
            cfg = tiling.backward_config(n, n_rows, 2)
            rows_pow2 = next_power_of_two(max(n_rows, 1))
            where = f"n={n} rows={n_rows}: {cfg}"
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
