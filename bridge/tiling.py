"""How both kernels tile rows: one launch configuration, shared so the two kernels stay mirrors.

It may depend on n and the number of rows but never changes a row's bits (NUMERICS.md: any
aligned power-of-two chunk is a subtree of the row's pairwise tree, and rows are independent).
"""

from __future__ import annotations

import dataclasses

from .contract import next_power_of_two

# Rows up to this many elements (a power of two) are held in registers whole; longer rows are
# summed in chunks of MAX_CHUNK and read twice.
MAX_WHOLE_ROW = 16384
MAX_CHUNK = 8192
# Aim for about this many elements per program when rows are short.
TARGET_BLOCK = 4096
# The last levels of each row's tree, on at most this many partial sums, add the two halves of a
# split instead of reducing an axis of 2. A reduction whose two elements lie in different warps
# costs two barriers; the split costs one exchange through shared memory for all these levels
# (Triton 3.6, sm_90: 8 -> 1 barriers at n = 4096 on 8 warps). Same adds, same bits.
SPLIT_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    rows: int  # rows per program
    chunk: int  # columns per step, a power of two
    num_chunks: int  # steps per row (1: the whole row in registers)
    num_warps: int


def launch_config(n: int, n_rows: int, itemsize: int) -> LaunchConfig:
    """The tiling for rows of n elements of itemsize bytes (x's dtype)."""
    width = next_power_of_two(n)
    if width > MAX_WHOLE_ROW:
        return LaunchConfig(1, MAX_CHUNK, width // MAX_CHUNK, _warps(MAX_CHUNK * itemsize))
    rows = max(1, min(16, TARGET_BLOCK // width, next_power_of_two(max(n_rows, 1))))
    return LaunchConfig(rows, width, 1, _warps(rows * width * itemsize))


def _warps(block_bytes: int) -> int:
    # About 64 bytes of x per thread (32 bf16 or 16 float32 elements): the best of 1-32 warps at
    # n = 4096 and 8192 in both kernels on an H100 (scripts/tune_launch.py, BENCHMARKS.md).
    return max(1, min(16, block_bytes // (64 * 32)))
