"""Two warpgroups per program for the Mosaic GPU backward: rows walked two at a time.

Warpgroup w (0 or 1) takes row 2 * step + w of the block, so a program has two rows' loads in
flight with each warpgroup's registers those of one row. B7's tree pairs rows 2i and 2i + 1 at
its level 0, so the pair's leaves p0 + p1 are exact tree nodes: the counter then walks pairs, one
level fewer. The pair sum is split by registers so that both warpgroups do half of it (and of the
counter): in each pair of registers (2h, 2h + 1) warpgroup 0 keeps 2h and sends 2h + 1 through
shared memory, warpgroup 1 the reverse; a lone last register is paired with a +0.0 one, whose
columns are past n (never stored). Which register a thread keeps depends on its warpgroup, a
runtime value, so keep/send are selects and the counter's and partials' column is computed.
"""

from __future__ import annotations

from typing import List

import numpy as np

from .mosaic_backward_ops import MosaicBackwardOps, NumpyBackwardOps
from .mosaic_ops import THREADS, RowLayout


def pair_regs(lay: RowLayout) -> int:
    """The registers the pair exchange and the counter are laid out for: regs rounded up to even."""
    return lay.regs + lay.regs % 2


def level_floats(lay: RowLayout, warpgroups: int) -> int:
    """The floats of one counter level (a row of the pair exchange too) for 1 or 2 warpgroups."""
    return (pair_regs(lay) if warpgroups == 2 else lay.regs) * THREADS * lay.vec


def _pair_leaves(ops, p: List, step) -> List:
    """Slot h: p0 + p1 (the left row's leaf first) of register 2h + warpgroup, one vector per slot."""
    zero = [ops.f32(0.0)] * ops.lay.vec
    p = list(p) + [zero] * (pair_regs(ops.lay) - len(p))
    kept, sent = [], []
    for h in range(len(p) // 2):
        kept.append([ops.select_left(a, b) for a, b in zip(p[2 * h], p[2 * h + 1])])
        sent.append([ops.select_left(b, a) for a, b in zip(p[2 * h], p[2 * h + 1])])
    partner = ops.swap(sent, step)
    return [[ops.add(ops.select_left(k, q), ops.select_left(q, k)) for k, q in zip(kv, qv)]
            for kv, qv in zip(kept, partner)]


class NumpyPairOps(NumpyBackwardOps):
    """NumpyBackwardOps with two warpgroups: emulated row 2b + w is block b's warpgroup w."""

    rows_per_step = 2

    def __init__(self, lay: RowLayout, blocks: int, steps: int, n_rows: int):
        super().__init__(lay, 2 * blocks, steps, n_rows)
        self.left = (np.arange(2 * blocks) % 2 == 0)[:, None]
        self.slots = pair_regs(lay) // 2

    def select_left(self, a, b):
        return np.where(self.left, a, b)

    def swap(self, vectors: List[List], step: int) -> List[List]:
        return [[v.reshape(-1, 2, THREADS)[:, ::-1].reshape(-1, THREADS) for v in vals] for vals in vectors]

    def leaves(self, p: List, step: int) -> List:
        return _pair_leaves(self, p, step)

    def row_valid(self, step: int):
        rows = (np.arange(self.rows) // 2 * self.steps + 2 * step + np.arange(self.rows) % 2)[:, None]
        return None if self.n_rows % self.steps == 0 else rows < self.n_rows

    def load_row(self, ref: np.ndarray, step: int, reg: int):
        return self.load(ref[:, 2 * step:2 * step + 2].reshape(self.rows, -1), reg)

    def store_row(self, ref: np.ndarray, step: int, reg: int, values: List, valid) -> None:
        pair = ref[:, 2 * step:2 * step + 2].reshape(self.rows, -1)  # a copy unless steps == 2
        self.store(pair, reg, values)
        ref[:, 2 * step:2 * step + 2] = pair.reshape(-1, 2, pair.shape[-1])

    def store_block(self, ref: np.ndarray, slot: int, values: List) -> None:
        for w in (0, 1):
            self.store(ref, 2 * slot + w, [v[w::2] for v in values])


class MosaicPairOps(MosaicBackwardOps):
    """MosaicBackwardOps for a 256-thread program: trees (2, WARPS * regs) shared memory, one row
    per warpgroup; exchange (2, pair_regs * 128 * vec) float32, used in turn by the steps' parity
    so that one barrier per step orders every write after the partner's read of the last use."""

    rows_per_step = 2

    def __init__(self, lay: RowLayout, trees, counter, exchange, steps: int, n_rows: int):
        from jax.experimental.mosaic.gpu import utils
        from jaxlib.mlir import ir
        from jaxlib.mlir.dialects import arith, gpu
        wg = arith.divui(gpu.thread_id(gpu.Dimension.x), arith.constant(ir.IndexType.get(), THREADS))
        super().__init__(lay, [utils.memref_slice(t, wg) for t in trees], counter, steps, n_rows)
        self.gpu, self.wg, self.exchange_buf = gpu, wg, exchange
        self.is_left = arith.cmpi(arith.CmpIPredicate.eq, wg, self._idx(0))
        self.slots = pair_regs(lay) // 2

    def select_left(self, a, b):
        return self.arith.select(self.is_left, a, b)

    def _index(self, step):
        arith = self.arith
        return arith.addi(self.first_row, arith.addi(arith.muli(step, self._idx(2)), self.wg))

    def _column(self, reg):
        """This thread's first column in register `reg` (an index value)."""
        arith, vec = self.arith, self.lay.vec
        return arith.addi(arith.muli(reg, self._idx(THREADS * vec)), arith.muli(self.thread, self._idx(vec)))

    def _kept(self, slot: int):
        return self._column(self.arith.addi(self._idx(2 * slot), self.wg))

    def swap(self, vectors: List[List], step) -> List[List]:
        arith, vec_ty = self.arith, self.ir.VectorType.get((self.lay.vec,), self.f32t)
        parity = arith.andi(step, self._idx(1))
        for h, vals in enumerate(vectors):  # slot h sends register 2h + 1 - warpgroup
            col = self._column(arith.subi(self._idx(2 * h + 1), self.wg))
            self.vector.store(self.pack(vals), self.exchange_buf, [parity, col])
        self.gpu.barrier()  # all 256 threads (bar.sync 0)
        return [self.unpack(self.vector.load(vec_ty, self.exchange_buf, [parity, self._kept(h)]))
                for h in range(len(vectors))]

    def leaves(self, p: List, step) -> List:
        return _pair_leaves(self, p, step)

    def _level_index(self, k: int, slot: int):
        return self.arith.addi(self._kept(slot), self._idx(k * pair_regs(self.lay) * THREADS * self.lay.vec))

    def store_block(self, ref, slot: int, values: List) -> None:
        col = self._kept(slot)
        inside = self.arith.cmpi(self.arith.CmpIPredicate.ult, col, self._idx(self.lay.n))
        with self.utils.when(inside):
            self.vector.store(self.pack(values), ref, [self.block, col])
