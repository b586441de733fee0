"""How both kernels tile rows: one launch configuration, shared so the two kernels stay mirrors.

It may depend on n and the number of rows but never changes a row's bits (NUMERICS.md: any
aligned power-of-two chunk is a subtree of the row's pairwise tree, and rows are independent).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from .contract import next_power_of_two

# Rows up to this many elements (a power of two) are held in registers whole; longer rows are
# summed in chunks of this size and read twice (the second read mostly from L2: the kernels'
# eviction hints). Chunks of 16384 on 16 warps beat 8192 on 8 by 6-17 % at 4096 x 65536 (H100).
MAX_WHOLE_ROW = 16384
# Aim for about this many elements per program when rows are short.
TARGET_BLOCK = 4096
# Each of a warp's 32 lanes loads 16 bytes, so the first levels of a row's tree, down to one sum
# per 512-byte segment, stay inside a warp (registers, then shuffles). The remaining levels, on the
# segments' partial sums, split the pairs apart and add them: one exchange through shared memory
# for all of them, where a reduction over an axis of 2 costs two barriers per level across warps
# (Triton 3.6, sm_90: 8 -> 1 barriers at n = 4096 on 8 warps). Same adds, same bits.
SEGMENT_BYTES = 512
# Launches of at most this many programs leave each program an SM of its own (an H100 has 132).
SMALL_GRID = 128


@dataclasses.dataclass(frozen=True)
class DeviceTiling:
    """A kernel's forward knob on one GPU, for full grids: each thread holds bytes_per_thread bytes
    of inputs (x and the residual), at most max_elements elements, on at least min_warps warps."""
    bytes_per_thread: int
    max_elements: int
    min_warps: int


# Keyed by (a substring of the GPU's name: torch.cuda.get_device_name, jax's device_kind; the kernel).
# Measured with scripts/tune_launch.py on an H200, bf16 (BENCHMARKS.md): the Triton kernel wants
# fewer warps per row there, 64 elements per thread: 16384 x 4096 on 2 warps 68.2 us (97.9 % of copy)
# against 76.4 us (87.5 %) on the H100's 8; 16384 x 8192 on 4 warps 132.0 us (97.5 %) against
# 141.1 us (91.3 %). The Pallas kernel lost 2-3 points with fewer warps (85.6 % and 82.4 %), so it
# keeps the rule tuned on the H100, as does every other GPU. The FP8 outputs keep it too: with the
# knob (64 elements a thread, 2-4 warps) the H200 ran them at 64-84 % of copy without a residual
# (bench, 2026-12-06f: static 16384 x 4096 83.8 %, per group 64.4-67.0 %), where the H100's rule
# runs at 88-99 % on the H100. Their rule on the H200 is not yet measured.
DEVICE_TILINGS = {("H200", "triton"): DeviceTiling(bytes_per_thread=128, max_elements=64, min_warps=2)}


# The per-group FP8 output without a residual on a full grid, whole rows of this width: warps per
# row (H100, bf16, scripts/tune_launch.py --fp8 group, BENCHMARKS.md): rows of 8192 on 4 warps (64
# elements per thread) beat the default 8 by 2-18 % (4096 x 8192 49.7 -> 44.9 us, 16384 x 8192
# 184.1 -> 156.2, 1024 x 8192 14.6 -> 14.3); at 4096 the default 8 stay best (4 warps 80.2 us, 2
# warps 85.0, against 78.7). The group's amax and quotient lengthen each row's chain of work.
GROUP_FP8_WARPS = {8192: 4}


def device_tiling(device_kind: str, kernel: str) -> Optional[DeviceTiling]:
    """The knob for a GPU name and kernel ("triton" or "pallas"); None: the default rule."""
    return next((t for (key, k), t in DEVICE_TILINGS.items() if k == kernel and key in device_kind), None)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    rows: int  # rows per program
    chunk: int  # columns per step, a power of two
    num_chunks: int  # steps per row (1: the whole row in registers)
    num_warps: int
    split: int  # partial sums per chunk row left to the split tail, a power of two


def launch_config(n: int, n_rows: int, itemsize: int, residual_itemsize: int = 0,
                  device_kind: str = "", kernel: str = "triton", quant: str = "none") -> LaunchConfig:
    """The tiling for rows of n elements of itemsize bytes (x's dtype), with a residual of
    residual_itemsize bytes per element (0: none), for `kernel` on the GPU named device_kind
    ("": the interpreters, which take the default rule), storing `quant` ("none", or the FP8
    output's "static" or "group")."""
    width = next_power_of_two(n)
    input_bytes = itemsize + residual_itemsize
    if width > MAX_WHOLE_ROW:
        return LaunchConfig(1, MAX_WHOLE_ROW, width // MAX_WHOLE_ROW, _warps(MAX_WHOLE_ROW, n_rows, input_bytes),
                            split_width(MAX_WHOLE_ROW, itemsize))
    rows = max(1, min(16, TARGET_BLOCK // width, next_power_of_two(max(n_rows, 1))))
    programs = -(-max(n_rows, 1) // rows)
    warps = _warps(rows * width, programs, input_bytes)
    knob = device_tiling(device_kind, kernel)
    if knob is not None and programs > SMALL_GRID and quant == "none":
        # A full GPU: the device's own elements per thread (a power of two), same rows per program.
        per_thread = min(knob.max_elements, 1 << ((knob.bytes_per_thread // input_bytes).bit_length() - 1))
        warps = max(knob.min_warps, min(16, rows * width // (32 * per_thread)))
    if quant == "group" and residual_itemsize == 0 and device_kind and programs > SMALL_GRID:
        warps = GROUP_FP8_WARPS.get(width, warps)
    return LaunchConfig(rows, width, 1, warps, split_width(width, itemsize))


def split_width(chunk: int, itemsize: int) -> int:
    """Partial sums per row after the in-warp levels: one per 512-byte segment of the chunk."""
    return max(1, chunk * itemsize // SEGMENT_BYTES)


def _warps(block_elements: int, programs: int, input_bytes: int) -> int:
    # 16 elements per thread on at most 8 warps (more only where a thread would hold over 32):
    # more warps per row cost registers, hence resident programs (Pallas, float32, n = 8192,
    # 16 warps: 65 registers, one program per SM, 25 % slower). With fewer programs than an H100
    # has SMs each runs alone, and what counts is each thread's chain: at most 128 bytes of
    # inputs per thread (float32 with a float32 residual, n = 8192, 1-64 rows: 16 warps 3.5-4.8 µs,
    # 8 warps 4.5-5.8 µs; without a residual 16 warps were 3-6 % slower). scripts/tune_launch.py,
    # BENCHMARKS.md.
    warps = max(1, min(8, block_elements // 512), min(16, block_elements // 1024))
    if programs <= SMALL_GRID:
        warps = max(warps, min(16, next_power_of_two(max(1, block_elements * input_bytes // (128 * 32)))))
    return warps


# The backward's tile: rows summed by the tile's own tree before the binary counter takes over, at
# most BACKWARD_TILE_ROWS of them, BACKWARD_TILE_BYTES of z, BACKWARD_THREAD_BYTES of it per thread
# (at most 16 warps). A tile's float32 values, the next tile's prefetched loads and the counter's
# levels share a 16-warp program's 128 registers per thread (scripts/kernel_resources.py, sm_90a):
# bf16 2 rows of 4096 with 16 steps fit, 4 rows spilled 336 bytes per thread; float32 1 row of
# 4096 fits, 2 rows spilled 164.
BACKWARD_TILE_BYTES = 16384
BACKWARD_TILE_ROWS = 4
BACKWARD_THREAD_BYTES = 32
# A row whose z fits in BACKWARD_TILE_BYTES is whole in the backward's tile (bf16 up to 8192
# columns, float32 4096); a longer one takes inv and c from a stats pass (which reads z and the
# gradient once more), and the main kernel tiles it at most BACKWARD_LONG_CHUNK columns wide.
# Each counter level costs a register per column a thread owns: whole rows of bf16 16384 spilled
# 1220 bytes per thread, float32 8192 280 (540 with a residual), the 16384-wide tiles of long
# rows 1448, where the H200 measured 8.6 % of copy (scripts/kernel_resources.py).
BACKWARD_LONG_CHUNK = 4096
# At most 2**4 steps per block. Each counter level is a float32 row of the tile's width, spread
# over the program's threads; at most COUNTER_REGISTERS of them per thread (H100, bf16, 16 warps:
# 4096 wide, 8 a level, takes 4 levels; 8192 wide, 16 a level, 3: 16384 x 8192 took 382 us with 8
# steps, 485 us with 16, whose 64 registers spilled; scripts/tune_backward.py, BENCHMARKS.md).
MAX_BACKWARD_LEVELS = 4
COUNTER_REGISTERS = 48
# Aim for at least this many row blocks when there are rows enough; fewer rows per tile where even
# one row per tile leaves fewer (H100, bf16: 1024 x 4096 15.2 us with 128 blocks of 2 x 4 rows,
# 512 blocks of 2 rows over 17 us; 64 x 4096 7.4 us with blocks of 1 row, 8.4 with 2).
BACKWARD_PROGRAMS = 128
# Short batches, SLAB_MIN_ROWS to SLAB_MAX_ROWS rows (their z and gradient, at most 4 MB, stay in
# L2): the stats pass takes inv and c, then the main kernel takes slabs of columns (_slab_config).
# H100, bf16, rotated inputs (scripts/compare_backward_rules.py, BENCHMARKS.md): n = 4096, 32 rows
# 5.2 us against 6.7 in one-row blocks, 64 rows 5.1 against 5.8; 16 rows 7.2 against 5.5 and 128
# alike (7.6 / 7.4); 1024 rows 28.0 against 18.5 in 128 blocks of 8 rows; n = 8192, 32 rows 5.6
# against 8.1.
SLAB_MIN_ROWS = 32
SLAB_MAX_ROWS = 64
SLAB_ROW_BYTES = 64  # two 32-byte sectors of a row per slab
SLAB_TILE = 4096
# The tree over the blocks' partial sums, one launch per level: each program sums an aligned group
# of COLUMN_TREE_GROUP partial rows for COLUMN_TREE_TILE / group columns. Every level is a grid of
# its own, so the upper tree runs at the partials' bandwidth (one program per column slice,
# looping over the blocks, took 60 us for 512 x 4096 partials on an H200). Groups of 128 rather
# than 16 save launches: H100, bf16, 4096 x 8192 104.2 us against 111.5, 16384 x 4096 157.6 us
# against 161.5 (scripts/compare_backward_rules.py).
COLUMN_TREE_GROUP = 128
COLUMN_TREE_TILE = 4096


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    rows: int  # rows per tile (a power of two)
    steps: int  # tiles per block (a power of two): a block is rows * steps aligned rows
    blocks: int  # row blocks: partial sums of grad_weight, combined by the column tree
    chunk: int  # columns per tile, a power of two
    num_chunks: int  # column chunks (1: whole rows; more: long rows, inv and c from a stats pass)
    stats_chunk: int  # long rows: the stats pass's columns per step (0 for whole rows)
    num_warps: int
    split: int  # as LaunchConfig.split, for whichever kernel sums the rows (the stats pass for long rows)
    tree_groups: Tuple[int, ...]  # the column tree's group size per level; their product: blocks' power of two

    @property
    def block_rows(self) -> int:
        return self.rows * self.steps

    @property
    def counter_levels(self) -> int:
        """Levels of the kernels' binary counter over a block's steps: log2(steps), at least 1 (with
        one step, level 0 parks the only leaf, which is then the root)."""
        return max(1, self.steps.bit_length() - 1)

    @property
    def stats_chunks(self) -> int:
        """Long rows: the stats pass's steps per row."""
        return self.chunk * self.num_chunks // self.stats_chunk


def column_tree_groups(blocks: int) -> Tuple[int, ...]:
    """Group sizes of the column tree's levels, lowest first. A group never exceeds the power of two
    of what is left, so the levels pad to exactly the blocks' power of two (no +0.0 added on top)."""
    groups, left = [], blocks
    while left > 1:
        group = min(COLUMN_TREE_GROUP, next_power_of_two(left))
        groups.append(group)
        left = -(-left // group)
    return tuple(groups)


def column_tree_width(group: int, n: int) -> int:
    """Columns per program of a column-tree level whose groups have `group` rows."""
    return max(1, min(COLUMN_TREE_TILE // group, next_power_of_two(n)))


def backward_config(n: int, n_rows: int, itemsize: int) -> BackwardConfig:
    """The backward's tiling for rows of n elements, z (x, or the new residual) of itemsize bytes.
    A block is never larger than the row count's power of two: the row tree pads only to that (a
    larger padding would add +0.0 to a -0.0 sum). Never changes bits."""
    width = next_power_of_two(n)
    rows_pow2 = next_power_of_two(max(n_rows, 1))
    if width * itemsize <= BACKWARD_TILE_BYTES:
        if SLAB_MIN_ROWS <= rows_pow2 <= SLAB_MAX_ROWS and SLAB_ROW_BYTES < width * itemsize:
            return _slab_config(width, n_rows, rows_pow2, itemsize)
        chunk, stats_chunk = width, 0
    else:
        # inv and c come from the stats pass (the forward's chunks), so the main kernel may take
        # any aligned slice of columns: one within the tile's bytes, whose registers fit.
        chunk, stats_chunk = min(BACKWARD_LONG_CHUNK, BACKWARD_TILE_BYTES // itemsize), min(width, MAX_WHOLE_ROW)
    num_chunks = width // chunk
    rows = max(1, min(BACKWARD_TILE_ROWS, BACKWARD_TILE_BYTES // (chunk * itemsize), rows_pow2 // BACKWARD_PROGRAMS))
    rows = 1 << (rows.bit_length() - 1)  # a power of two: the tile's tree is a subtree
    warps = max(1, min(16, rows * chunk * itemsize // (32 * BACKWARD_THREAD_BYTES)))
    # The counter's levels fit its registers (a level per thread: chunk / threads floats).
    levels = min(MAX_BACKWARD_LEVELS, COUNTER_REGISTERS * 32 * warps // chunk)
    # A power of two (the block must be a subtree), rounded down: at least BACKWARD_PROGRAMS programs,
    # counting the long rows' column chunks.
    per_block = max(1, BACKWARD_PROGRAMS // num_chunks)
    steps = 1 << max(0, min(levels, (rows_pow2 // (rows * per_block)).bit_length() - 1))
    blocks = -(-max(n_rows, 1) // (rows * steps))
    return BackwardConfig(rows, steps, blocks, chunk, num_chunks, stats_chunk, warps,
                          split_width(stats_chunk or chunk, itemsize), column_tree_groups(blocks))


def _slab_config(width: int, n_rows: int, rows_pow2: int, itemsize: int) -> BackwardConfig:
    """A short batch, whose z and gradient stay in L2: the stats pass reads them from memory,
    then each program takes a slab of columns of every row (read again from L2) and sums its
    grad_weight columns over the whole batch itself: no partial sums, no column tree. A slab of
    SLAB_ROW_BYTES a row, tiles of SLAB_TILE elements (rows of the slab) on SLAB_TILE * itemsize
    bytes' warps."""
    chunk = min(width // 2, max(SLAB_ROW_BYTES // itemsize, width // next_power_of_two(BACKWARD_PROGRAMS)))
    rows = min(rows_pow2, max(1, SLAB_TILE // chunk))  # powers of two all
    steps = min(1 << MAX_BACKWARD_LEVELS, rows_pow2 // rows)
    blocks = -(-max(n_rows, 1) // (rows * steps))
    warps = max(1, min(16, rows * chunk * itemsize // (32 * BACKWARD_THREAD_BYTES)))
    return BackwardConfig(rows, steps, blocks, chunk, width // chunk, width, warps, split_width(width, itemsize),
                          column_tree_groups(blocks))


# The Mosaic GPU backward (bi_jax/mosaic_backward.py): one warpgroup per aligned block of `steps`
# rows, one row at a time, the binary counter's levels in shared memory (level k: one float32 per
# column of the padded row). Aim for about two programs per H100 SM (132): each has the next row's
# loads in flight while it reduces the current one, and fewer, longer blocks mean fewer float32
# partial rows for the tree over blocks (XLA adds outside the kernel). At most MOSAIC_COUNTER_BYTES
# of shared memory for the levels, so that two programs fit an SM (228 KiB): bf16 rows of 4096
# take up to 6 levels (64 steps), 8192 up to 3 (8 steps). On the H100 (BENCHMARKS.md) this gave 75 %
# of copy at 16384 and 65536 x 4096 bf16 (64 steps); other steps were not timed.
MOSAIC_BACKWARD_PROGRAMS = 256
MOSAIC_COUNTER_BYTES = 96 * 1024
MOSAIC_MAX_STEPS = 64
# Variants (scripts/probes/mosaic_backward.py --sweep; BENCHMARKS.md has the H100 sweep). Past this
# many floats per thread per row (regs * vec) B5 reloads z, g and w from global memory (L1/L2 hits)
# instead of holding xhat and a in registers across B4's tree: the H100 probe's hold form took 187
# registers at 32 floats (4096 bf16) and spilled at 64 (8192 bf16).
MOSAIC_BACKWARD_RELOAD_FLOATS = 32
# Warpgroups per program: 2 walks two rows at a time (one each), the pair's B7 leaves added first;
# one H100 sweep: no gain at 4096 columns, 6-9 % at 8192 only with a counter above the 96 KiB cap.
MOSAIC_BACKWARD_WARPGROUPS = 1


def mosaic_backward_steps(n_rows: int, row_floats: int, warpgroups: int = 1) -> int:
    """Rows per program of the Mosaic GPU backward, a power of two, never more than the row count's
    power of two (the block is then a subtree of B7's tree; never changes bits). row_floats: the
    floats of one counter level (the row's columns as the kernel's layout pads them). Two
    warpgroups need a pair of rows (0 when they cannot have one or their shared memory does not fit):
    their counter has one level fewer and they exchange leaves through two more rows of floats."""
    rows_pow2 = next_power_of_two(max(n_rows, 1))
    levels = MOSAIC_COUNTER_BYTES // (4 * row_floats) - (warpgroups - 1)  # log2(steps) levels
    if warpgroups > 1 and (rows_pow2 < 2 or levels < 1):
        return 0
    wanted = max(warpgroups, rows_pow2 // MOSAIC_BACKWARD_PROGRAMS)
    return min(wanted, 1 << min(levels, MOSAIC_MAX_STEPS.bit_length() - 1))


def mosaic_backward_variant(n_rows: int, thread_floats: int, pair_floats: int) -> Tuple[bool, int]:
    """(reload, warpgroups) of the Mosaic GPU backward: the launch rule over its variants (the
    same bits, other registers and occupancy). thread_floats: one row's floats per thread;
    pair_floats: a counter level's floats with two warpgroups (registers rounded up to even)."""
    warpgroups = MOSAIC_BACKWARD_WARPGROUPS
    if warpgroups > 1 and not mosaic_backward_steps(n_rows, pair_floats, warpgroups):
        warpgroups = 1
    return thread_floats > MOSAIC_BACKWARD_RELOAD_FLOATS, warpgroups
