"""What the Mosaic GPU backward (bi_jax/mosaic_backward.py) adds to mosaic_ops' interface.

A program walks a block of rows, so its body needs a loop over steps, conditions on the step's
bits (the binary counter), per-row loads and stores at a row index, the counter's levels in shared
memory, and B4's tree, which must stop at the contract's P exactly (`exact_row_tree`). As in
mosaic_ops, `MosaicBackwardOps` emits the MLIR of one thread and `NumpyBackwardOps` runs the same
body on numpy for every program (block) at once; there the step is a Python int, shared by all.
"""

from __future__ import annotations

import copy
from typing import Callable, List, Sequence

import numpy as np

from .mosaic_ops import THREADS, WARP, MosaicOps, NumpyOps, RowLayout, pairwise


def exact_row_tree(ops, lay: RowLayout, q: Sequence[Sequence], width: int) -> object:
    """The contract's pairwise tree over width = P columns (B4), every thread ending with the root.

    mosaic_ops.row_tree computes the tree over the layout's padded width and carries a lone
    register's sum up unadded: right for squares, never -0.0, wrong for b, whose sums can be -0.0,
    since the contract adds +0.0 padding up to P (a -0.0 subtree + the +0.0 one is +0.0) and
    nothing above P. So here columns past n must already be +0.0 leaves, the registers' absent
    subtrees inside P are added as +0.0, and the levels above P (lanes or warps of padding only)
    take the left sibling instead of adding.
    """
    partial = []
    for reg in range(lay.regs):
        s = pairwise(ops, list(q[reg]))
        for mask in (1, 2, 4, 8, 16):
            partner = ops.shfl_xor(s, mask)
            # Lanes t and t ^ mask cover 2 * mask * vec columns: inside P, their sum; above it the
            # lane whose half is the right one takes its partner's, the left sibling.
            s = ops.add(s, partner) if 2 * mask * lay.vec <= width else ops.lane_select(mask, partner, s)
        partial.append(s)
    warps = ops.cross_warp(partial)
    warp_cols = WARP * lay.vec
    sums = [pairwise(ops, list(w)) if width >= 4 * warp_cols else
            (ops.add(w[0], w[1]) if width >= 2 * warp_cols else w[0]) for w in warps]
    if width <= THREADS * lay.vec:
        return sums[0]  # one register: P is at most one warpgroup's width
    # P spans width / (128 * vec) registers, a power of two >= regs: the missing ones are +0.0.
    return pairwise(ops, sums + [ops.f32(0.0)] * (width // (THREADS * lay.vec) - lay.regs))


class NumpyBackwardOps(NumpyOps):
    """NumpyOps for a block walk: a row ref is a (blocks, steps, n) array, the step a Python int."""

    rows_per_step = 1

    def __init__(self, lay: RowLayout, blocks: int, steps: int, n_rows: int):
        super().__init__(lay, blocks)
        self.steps, self.n_rows = steps, n_rows
        self.levels = {}
        self.slots = lay.regs  # vectors of B7 leaves per thread and step (the counter's registers)

    def leaves(self, p: List, step) -> List:
        """The step's B7 leaves from the row's p[reg]: the row's own with one row per step."""
        return p

    def exchange(self, i: int) -> "NumpyBackwardOps":
        return self

    def lane_select(self, mask: int, partner, s):
        return np.where((self.thread & mask) != 0, partner, s)

    def loop(self, count: int, init, body: Callable):
        for step in range(count):
            init = body(step, init)
        return init

    def step_at(self, step: int) -> int:
        return step

    def add_step(self, step: int, k: int) -> int:
        return step + k

    def last_step(self) -> int:
        return self.steps // self.rows_per_step - 1

    def low_bits_ones(self, step: int, k: int) -> bool:
        return step & ((1 << k) - 1) == (1 << k) - 1

    def parks_at(self, step: int, k: int) -> bool:
        return self.low_bits_ones(step, k) and not (step >> k) & 1

    def cond(self, pred: bool, then: Callable, values: List) -> List:
        return then(values) if pred else values

    def when(self, pred: bool, then: Callable) -> None:
        if pred:
            then()

    def row_valid(self, step: int):
        """(blocks, 1): whether each block's row `step` is inside the batch; None when all are."""
        rows = np.arange(self.rows)[:, None] * self.steps + step
        return None if self.n_rows % self.steps == 0 else rows < self.n_rows

    def keep(self, valid, values: List) -> List:
        return values if valid is None else [np.where(valid, v, np.float32(0.0)) for v in values]

    def mask_cols(self, reg: int, values: List) -> List:
        return [np.where(self._columns(reg, j) < self.lay.n, v, np.float32(0.0)) for j, v in enumerate(values)]

    def load_row(self, ref: np.ndarray, step: int, reg: int):
        return self.load(ref[:, step], reg)

    def unpack(self, raw) -> List:
        return raw

    def store_row(self, ref: np.ndarray, step: int, reg: int, values: List, valid) -> None:
        self.store(ref[:, step], reg, values)  # rows past the batch land in padding, cropped after

    def store_block(self, ref: np.ndarray, reg: int, values: List) -> None:
        self.store(ref, reg, values)

    def level_load(self, k: int, reg: int) -> List:
        return self.levels[k, reg]

    def level_store(self, k: int, reg: int, values: List) -> None:
        self.levels[k, reg] = list(values)


class MosaicBackwardOps(MosaicOps):
    """MosaicOps for a block walk: row refs are (rows, n) memrefs, the step an index value.

    trees: two shared-memory buffers for the row trees' exchange, used in turn (inv's tree, then
    B4's), so that a thread's write for one tree never meets another thread's read of the previous
    one: each write follows a barrier every thread passed after reading that buffer. counter: the
    levels, each thread reading back only what it wrote (no barrier).
    """

    rows_per_step = 1

    def __init__(self, lay: RowLayout, trees, counter, steps: int, n_rows: int):
        super().__init__(lay, trees[0])
        from jaxlib.mlir.dialects import gpu, scf
        self.scf, self.trees, self.counter, self.steps, self.n_rows = scf, trees, counter, steps, n_rows
        # A one-dimensional grid is blockIdx.x (Pallas Mosaic GPU's lowering of axis_index).
        self.block = gpu.block_id(gpu.Dimension.x)
        self.first_row = self.arith.muli(self.block, self._idx(steps))
        self.slots = lay.regs

    def leaves(self, p: List, step) -> List:
        return p

    def exchange(self, i: int) -> "MosaicBackwardOps":
        ops = copy.copy(self)
        ops.smem = self.trees[i]
        return ops

    def lane_select(self, mask: int, partner, s):
        arith = self.arith
        bit = arith.andi(self.thread, self._idx(mask))
        return arith.select(arith.cmpi(arith.CmpIPredicate.ne, bit, self._idx(0)), partner, s)

    def loop(self, count: int, init: List, body: Callable) -> List:
        if count == 0:
            return init
        loop = self.scf.ForOp(self._idx(0), self._idx(count), self._idx(1), list(init))
        with self.ir.InsertionPoint(loop.body):
            self.scf.yield_(list(body(loop.induction_variable, list(loop.inner_iter_args))))
        return list(loop.results)

    def step_at(self, step: int):
        return self._idx(step)

    def add_step(self, step, k: int):
        return self.arith.addi(step, self._idx(k))

    def last_step(self):
        return self._idx(self.steps // self.rows_per_step - 1)

    def low_bits_ones(self, step, k: int):
        arith, ones = self.arith, self._idx((1 << k) - 1)
        return arith.cmpi(arith.CmpIPredicate.eq, arith.andi(step, ones), ones)

    def parks_at(self, step, k: int):
        arith, ones = self.arith, self._idx((1 << (k + 1)) - 1)
        return arith.cmpi(arith.CmpIPredicate.eq, arith.andi(step, ones), self._idx((1 << k) - 1))

    def cond(self, pred, then: Callable, values: List) -> List:
        try:
            op = self.scf.IfOp(pred, [v.type for v in values], has_else=True)
        except TypeError:  # older MLIR bindings spell it hasElse
            op = self.scf.IfOp(pred, [v.type for v in values], hasElse=True)
        with self.ir.InsertionPoint(op.then_block):
            self.scf.yield_(list(then(values)))
        with self.ir.InsertionPoint(op.else_block):
            self.scf.yield_(list(values))
        return list(op.results)

    def when(self, pred, then: Callable) -> None:
        with self.utils.when(pred):
            then()

    def _index(self, step):
        """The batch row this thread handles at `step`."""
        return self.arith.addi(self.first_row, step)

    def _row(self, step):
        """This thread's row at `step`, clamped to the last row (its loads stay inside the batch)."""
        row = self._index(step)
        return row if self.n_rows % self.steps == 0 else self.arith.minui(row, self._idx(self.n_rows - 1))

    def row_valid(self, step):
        if self.n_rows % self.steps == 0:
            return None
        row = self._index(step)
        return self.arith.cmpi(self.arith.CmpIPredicate.ult, row, self._idx(self.n_rows))

    def keep(self, valid, values: List) -> List:
        if valid is None:
            return values
        zero = self.f32(0.0)
        return [self.arith.select(valid, v, zero) for v in values]

    def mask_cols(self, reg: int, values: List) -> List:
        _, inside = self._start(reg)
        if inside is None:
            return values
        zero = self.f32(0.0)
        return [self.arith.select(inside, v, zero) for v in values]

    def load_row(self, ref, step, reg: int):
        """The raw vector of this thread's columns in register `reg` (the loop carries it)."""
        return self.load_vector(ref, reg, [self._row(step)])

    def store_row(self, ref, step, reg: int, values: List, valid) -> None:
        self.store_vector(ref, reg, self.pack(values), [self._row(step)], valid)

    def store_block(self, ref, reg: int, values: List) -> None:
        self.store_vector(ref, reg, self.pack(values), [self.block])

    def _level_index(self, k: int, reg: int):
        vec = self.lay.vec
        base = (k * self.lay.regs + reg) * THREADS * vec
        return self.arith.addi(self.arith.muli(self.thread, self._idx(vec)), self._idx(base))

    def level_load(self, k: int, reg: int) -> List:
        vec_ty = self.ir.VectorType.get((self.lay.vec,), self.f32t)
        return self.unpack(self.vector.load(vec_ty, self.counter, [self._level_index(k, reg)]))

    def level_store(self, k: int, reg: int, values: List) -> None:
        self.vector.store(self.pack(values), self.counter, [self._level_index(k, reg)])
