"""Exact float32 operations and the row layout for the Mosaic GPU forward (bi_jax/mosaic_kernel.py).

Mosaic GPU compiles `a / b` to div.full, lax.sqrt to sqrt.approx, and lets LLVM contract every
add with the multiply that feeds it (scripts/probes/probe_mosaic.py), so the kernel emits its own
MLIR inside one `plgpu.inline_mgpu` call: every float operation is one PTX instruction in inline
assembly (mul.rn, add.rn, div.rn, sqrt.rn, cvt.rn), which LLVM can neither fuse nor rewrite.

The kernel body is written once against the small interface both classes here implement:
`MosaicOps` emits the MLIR of one thread of a 128-thread warpgroup; `NumpyOps` runs the same
body on numpy for all 128 threads (and all rows) at once, with numpy's float32 arithmetic (one
rounding per operation, never fused: the PTX instructions' semantics). The emulation checks on a
CPU what the GPU cannot be asked without one: that the body's loads, masks, lane shuffles and
shared-memory exchange compute the contract's pairwise tree, node for node.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence

import ml_dtypes
import numpy as np

from bridge.numerics.contract import CANONICAL_NAN_BITS

THREADS = 128  # one warpgroup per program
WARP = 32
WARPS = THREADS // WARP
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}
_UINTS = {2: np.uint16, 4: np.uint32}


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Which columns of a row each thread holds: Mosaic's WG_STRIDED layout over the row, padded.

    Column c = reg * (128 * vec) + thread * vec + j sits in thread `thread`, register `reg`, slot j
    (WGStridedFragLayout.linear_thread_idxs in jax/experimental/mosaic/gpu/fragmented_array.py).
    Columns at or past n read as +0.0 and are never stored. Because vec divides n, a register's
    vector is either wholly inside the row or wholly past it, so one predicate per vector masks it.
    """

    n: int
    vec: int

    @property
    def regs(self) -> int:
        return -(-self.n // (THREADS * self.vec))

    def full(self, reg: int) -> bool:
        """Whether every thread's vector of register `reg` lies inside the row (no mask needed)."""
        return (reg + 1) * THREADS * self.vec <= self.n


def row_layout(n: int, itemsize: int) -> RowLayout:
    """16-byte vectors where n allows, else smaller: vec divides n, so no vector crosses the row's
    end and every row starts on a vector boundary (aligned vector loads)."""
    vec = 16 // itemsize
    while n % vec:
        vec //= 2
    return RowLayout(n, vec)


def pairwise(ops, values: List) -> object:
    """q = q[0::2] + q[1::2] until one is left, over a power-of-two list of one thread's values."""
    while len(values) > 1:
        values = [ops.add(values[i], values[i + 1]) for i in range(0, len(values), 2)]
    return values[0]


def row_tree(ops, lay: RowLayout, q: Sequence[Sequence]) -> object:
    """NUMERICS.md step 3 over a row held as q[reg][j] (RowLayout), the same value in every thread.

    Level by level the tree pairs aligned blocks of columns; in this layout an aligned block of
    2^k columns is, going up: slots of one thread's vector (k <= log2 vec), then the vectors of
    lanes t and t ^ 2^i of one warp (a butterfly shuffle, xor masks 1..16), then the 4 warps
    (shared memory), then registers: so the kernel computes the very nodes of the tree over
    regs_p * 128 * vec columns (regs_p the next power of two of regs). That is the contract's
    P padded with more +0.0 columns, which changes no bit: squares are never -0.0, so a + 0 = a.
    Each add is IEEE and commutative, so lanes t and t ^ m, each computing its own + its
    partner's, get the same bits.
    """
    partial = []
    for reg in range(lay.regs):
        s = pairwise(ops, list(q[reg]))
        for mask in (1, 2, 4, 8, 16):
            s = ops.add(s, ops.shfl_xor(s, mask))
        partial.append(s)
    sums = [pairwise(ops, list(w)) for w in ops.cross_warp(partial)]
    # The registers' sums, padded to a power of two: an empty subtree sums to +0.0 and adding it
    # changes nothing (see above), so a lone left sibling is carried up as it is.
    while len(sums) > 1:
        sums = [ops.add(sums[i], sums[i + 1]) if i + 1 < len(sums) else sums[i] for i in range(0, len(sums), 2)]
    return sums[0]


def _canonical(bits: np.ndarray, is_nan: np.ndarray, name: str) -> np.ndarray:
    return np.where(is_nan, bits.dtype.type(CANONICAL_NAN_BITS[name]), bits)


class NumpyOps:
    """The kernel body's operations on numpy: a value is a (rows, 128) array, one column per thread."""

    def __init__(self, lay: RowLayout, rows: int):
        self.lay, self.rows = lay, rows
        self.thread = np.arange(THREADS)

    def f32(self, value: float):
        return np.float32(value)

    def mul(self, a, b):
        return np.multiply(a, b, dtype=np.float32)

    def add(self, a, b):
        return np.add(a, b, dtype=np.float32)

    def sub(self, a, b):
        return np.subtract(a, b, dtype=np.float32)

    def div(self, a, b):
        return np.divide(a, b, dtype=np.float32)

    def sqrt(self, a):
        return np.sqrt(a, dtype=np.float32)

    def widen(self, e, name: str):
        return e.astype(np.float32)

    def encode(self, a, name: str):
        dt = NUMPY_DTYPES[name]
        bits = a.astype(dt).view(_UINTS[dt.itemsize])
        return _canonical(bits, a != a, name).view(dt)

    def round_to(self, a, name: str):
        return a.astype(NUMPY_DTYPES[name]).astype(np.float32)

    def shfl_xor(self, a, mask: int):
        return a[:, self.thread ^ mask]

    def cross_warp(self, values: List) -> List[List]:
        # Lane 0 of each warp writes, every thread reads all four after the barrier.
        return [[np.broadcast_to(v[:, w * WARP:w * WARP + 1], v.shape) for w in range(WARPS)] for v in values]

    def _columns(self, reg: int, j: int) -> np.ndarray:
        return reg * THREADS * self.lay.vec + self.thread * self.lay.vec + j

    def load(self, ref: np.ndarray, reg: int) -> List:
        """ref: (rows, n), or (n,) for the weight. Columns past n read as zeros."""
        out = []
        for j in range(self.lay.vec):
            cols = self._columns(reg, j)
            inside = cols < self.lay.n
            vals = np.broadcast_to(ref, (self.rows, self.lay.n))[:, np.where(inside, cols, 0)]
            out.append(np.where(inside, vals, np.zeros((), ref.dtype)))
        return out

    def store(self, ref: np.ndarray, reg: int, values: List) -> None:
        for j, v in enumerate(values):
            cols = self._columns(reg, j)
            inside = cols < self.lay.n
            ref[:, cols[inside]] = v[:, inside]


class MosaicOps:
    """The kernel body's operations as the MLIR of one thread of a warpgroup (inside inline_mgpu).

    A float value is an f32 SSA value; a stored element one of its dtype (bf16, f16, f32).
    """

    def __init__(self, lay: RowLayout, smem):
        # Imported here: jaxlib's MLIR bindings are only needed when a kernel is lowered.
        from jax.experimental.mosaic.gpu import utils
        from jaxlib.mlir import ir
        from jaxlib.mlir.dialects import arith, gpu, llvm, memref, vector
        self.ir, self.arith, self.llvm, self.memref, self.vector, self.utils = ir, arith, llvm, memref, vector, utils
        self.lay, self.smem = lay, smem
        self.f32t = ir.F32Type.get()
        self.i16, self.i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
        self.index = ir.IndexType.get()
        self.types = {"float32": self.f32t, "bfloat16": ir.BF16Type.get(), "float16": ir.F16Type.get()}
        self.thread = arith.remui(gpu.thread_id(gpu.Dimension.x), self._idx(THREADS))
        self.warp = arith.divui(self.thread, self._idx(WARP))
        self.lane0 = arith.cmpi(arith.CmpIPredicate.eq, arith.remui(self.thread, self._idx(WARP)), self._idx(0))

    def _idx(self, i: int):
        return self.arith.constant(self.index, i)

    def _asm(self, ty, asm: str, constraints: str, *args):
        # No side effects: LLVM may schedule or merge these, but never look inside.
        return self.llvm.inline_asm(ty, list(args), asm, constraints)

    def f32(self, value: float):
        return self.arith.constant(self.f32t, float(value))

    def mul(self, a, b):
        return self._asm(self.f32t, "mul.rn.f32 $0, $1, $2;", "=f,f,f", a, b)

    def add(self, a, b):
        return self._asm(self.f32t, "add.rn.f32 $0, $1, $2;", "=f,f,f", a, b)

    def sub(self, a, b):
        return self._asm(self.f32t, "sub.rn.f32 $0, $1, $2;", "=f,f,f", a, b)

    def div(self, a, b):
        return self._asm(self.f32t, "div.rn.f32 $0, $1, $2;", "=f,f,f", a, b)

    def sqrt(self, a):
        return self._asm(self.f32t, "sqrt.rn.f32 $0, $1;", "=f,f", a)

    def widen(self, e, name: str):
        """f32(e), exact: bf16 by its bits (<< 16), f16 by cvt.f32.f16 (no .ftz: subnormals kept)."""
        arith = self.arith
        if name == "float32":
            return e
        h = arith.bitcast(self.i16, e)
        if name == "float16":
            return self._asm(self.f32t, "cvt.f32.f16 $0, $1;", "=f,h", h)
        w = arith.shli(arith.extui(self.i32, h), arith.constant(self.i32, 16))
        return arith.bitcast(self.f32t, w)

    def encode(self, a, name: str):
        """rnD: cvt.rn (round to nearest even) to the dtype, and every NaN as its canonical NaN."""
        nan = CANONICAL_NAN_BITS[name]
        if name == "float32":
            return self._asm(self.f32t, f"{{ .reg .pred p; setp.nan.f32 p, $1, $1; selp.b32 $0, {nan:#x}, $1, p; }}",
                             "=f,f", a)
        cvt = "cvt.rn.bf16.f32" if name == "bfloat16" else "cvt.rn.f16.f32"
        h = self._asm(self.i16, f"{{ .reg .pred p; .reg .b16 h; {cvt} h, $1; setp.nan.f32 p, $1, $1; "
                                f"selp.b16 $0, {nan:#x}, h, p; }}", "=h,f", a)
        return self.arith.bitcast(self.types[name], h)

    def round_to(self, a, name: str):
        """rn to the dtype and back to f32 (llama's y); its NaN bits never reach memory."""
        return self.widen(self.encode(a, name), name)

    def shfl_xor(self, a, mask: int):
        return self.utils.shfl_bfly(a, mask)

    def cross_warp(self, values: List) -> List[List]:
        """Lane 0 of each warp writes its value per register to shared memory; after one barrier
        every thread reads the four warps' values of each register."""
        arith, memref = self.arith, self.memref
        with self.utils.when(self.lane0):
            for reg, v in enumerate(values):
                memref.store(v, self.smem, [arith.addi(self.warp, self._idx(reg * WARPS))])
        self.utils.warpgroup_barrier()
        return [[memref.load(self.smem, [self._idx(reg * WARPS + w)]) for w in range(WARPS)]
                for reg in range(len(values))]

    def _start(self, reg: int):
        """The first column of this thread's vector in register `reg`, and whether it is inside the row."""
        arith, vec = self.arith, self.lay.vec
        col = arith.addi(arith.muli(self.thread, self._idx(vec)), self._idx(reg * THREADS * vec))
        inside = None if self.lay.full(reg) else arith.cmpi(arith.CmpIPredicate.ult, col, self._idx(self.lay.n))
        return col, inside

    def load_vector(self, ref, reg: int, indices: Sequence = ()):
        """This thread's vector of register `reg` of a row of ref (indices: those before the row's,
        e.g. the row of a (rows, n) memref). Past n: zeros, read from column 0 instead."""
        arith, vector, ir = self.arith, self.vector, self.ir
        elem = ir.MemRefType(ref.type).element_type
        vec_ty = ir.VectorType.get((self.lay.vec,), elem)
        col, inside = self._start(reg)
        if inside is not None:
            col = arith.select(inside, col, self._idx(0))
        v = vector.load(vec_ty, ref, list(indices) + [col])
        if inside is not None:
            v = arith.select(inside, v, vector.broadcast(vec_ty, arith.constant(elem, 0.0)))
        return v

    def unpack(self, v) -> List:
        """A vector's elements."""
        return [self.vector.extract(v, dynamic_position=[], static_position=self.ir.DenseI64ArrayAttr.get([j]))
                for j in range(self.lay.vec)]

    def load(self, ref, reg: int) -> List:
        """ref: a (n,) memref (one row, or the weight): load_vector's elements."""
        return self.unpack(self.load_vector(ref, reg))

    def pack(self, values: List):
        """values (SSA scalars of one type) as one vector value."""
        vector, ir = self.vector, self.ir
        v = self.llvm.mlir_undef(ir.VectorType.get((len(values),), values[0].type))
        for j, e in enumerate(values):
            v = vector.insert(e, v, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([j]))
        return v

    def store_vector(self, ref, reg: int, v, indices: Sequence = (), valid=None) -> None:
        """v, one vector of this thread's register `reg`, to ref (indices as load_vector's); columns
        past n, and lanes where `valid` (an i1, or None) is false, store nothing."""
        col, inside = self._start(reg)
        pred = inside if valid is None else (valid if inside is None else self.arith.andi(valid, inside))
        if pred is None:
            self.vector.store(v, ref, list(indices) + [col])
        else:
            with self.utils.when(pred):
                self.vector.store(v, ref, list(indices) + [col])

    def store(self, ref, reg: int, values: List) -> None:
        self.store_vector(ref, reg, self.pack(values))
