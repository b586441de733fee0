"""Does the GPU's FP8 conversion give the contract's codes? One run, every float32 pattern.

The fused FP8 kernels spend about 28 instructions per element on rnFP8 done on the bit pattern
(BENCHMARKS.md, "FP8 output"); sm_89+ converts two float32 with one `cvt.rn.satfinite.e4m3x2.f32`.
Before a kernel may use it, this counts, over all 2**32 float32 patterns c, the elements where
the hardware's code of clamp_fp8(c) differs from encode_fp8(clamp_fp8(c)) (NUMERICS.md Q3-Q4,
the bit-pattern encoder both kernels compile today), and prints the first few. 0 everywhere is
the condition for switching the compiled kernels (the interpreters keep the bit pattern).
Usage: python3 scripts/probes/probe_fp8_cvt.py   (a GPU with sm_89 or later; about a second on an H200)
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bi_torch import triton_fp8  # noqa: E402
from bi_torch.launch import fp8_constexprs  # noqa: E402

# d's low byte is b's code (PTX ISA, cvt with an f8x2 destination: a to the upper byte).
CVT_E4M3 = tl.constexpr("{ .reg .b16 t; cvt.rn.satfinite.e4m3x2.f32 t, 0f00000000, $1; "
                        "cvt.u32.u16 $0, t; and.b32 $0, $0, 255; }")


@triton.jit
def compare_kernel(start, differ_ptr, first_ptr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                   MANTISSA_BITS: tl.constexpr, EXPONENT_BIAS: tl.constexpr, NAN_FP8: tl.constexpr):
    bits = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c = triton_fp8.clamp_fp8(bits.to(tl.uint32).to(tl.float32, bitcast=True), FP8_MAX)
    ours = triton_fp8.encode_fp8(c, MANTISSA_BITS, EXPONENT_BIAS, NAN_FP8).to(tl.int32)
    hardware = tl.inline_asm_elementwise(CVT_E4M3, "=r,r", [c], dtype=tl.int32, is_pure=True, pack=1)
    wrong = ours != hardware
    tl.store(differ_ptr + tl.program_id(0), tl.sum(wrong.to(tl.int32), 0))
    # The block's first differing pattern (or -1), for the report.
    tl.store(first_ptr + tl.program_id(0), tl.min(tl.where(wrong, bits, 1 << 40), 0))


def main() -> None:
    block, span = 4096, 1 << 30
    differ = torch.empty(span // block, dtype=torch.int32, device="cuda")
    first = torch.empty(span // block, dtype=torch.int64, device="cuda")
    total, examples = 0, []
    for start in range(0, 1 << 32, span):
        compare_kernel[(span // block,)](start, differ, first, BLOCK=block, **fp8_constexprs(),
                                         enable_fp_fusion=False)
        count = int(differ.sum())
        total += count
        if count and len(examples) < 8:
            examples += [int(b) for b in first[first < (1 << 40)][:8 - len(examples)].tolist()]
        print(f"patterns 0x{start:08x}-0x{start + span - 1:08x}: {count} codes differ", flush=True)
    print(f"total: {total} of 2**32 float32 patterns differ between cvt.rn.satfinite.e4m3x2.f32 and encode_fp8")
    for b in examples:
        print(f"  first in a block: 0x{b:08x} ({struct.unpack('<f', struct.pack('<I', b))[0]!r})")


if __name__ == "__main__":
    main()
