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


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    rows: int  # rows per program
    chunk: int  # columns per step, a power of two
    num_chunks: int  # steps per row (1: the whole row in registers)
    num_warps: int


def launch_config(n: int, n_rows: int) -> LaunchConfig:
    width = next_power_of_two(n)
    if width > MAX_WHOLE_ROW:
        return LaunchConfig(1, MAX_CHUNK, width // MAX_CHUNK, 16)
    rows = max(1, min(16, TARGET_BLOCK // width, next_power_of_two(max(n_rows, 1))))
    return LaunchConfig(rows, width, 1, max(1, min(16, rows * width // 512)))
