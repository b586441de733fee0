"""Time the backward's shipped launch rule against variants of bridge.numerics.tiling's constants, on a GPU.

Each variant (NAME:CONST=VALUE,...) is checked bit for bit against the shipped rule's gradients,
then timed as whole launch_backward calls (main kernel, stats pass, column tree) replayed in a
CUDA graph over input sets rotated so that together they exceed the L2 (as `bi-norm bench` does):
a rule that relies on L2 between its passes is measured with the batch coming from memory.
Usage: python3 scripts/compare_backward_rules.py --shapes 1024x4096,4096x8192 [--dtype float32] [--residual]
       --variant "old:BACKWARD_PROGRAMS=512,COUNTER_REGISTERS=4096,SLAB_MIN_ROWS=1048576" ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bi_torch.launch  # noqa: E402
from bi_torch import to_numpy  # noqa: E402
from bridge.numerics import tiling  # noqa: E402
from bridge.verify.compare import assert_bitwise_equal  # noqa: E402
from tune_backward import graph_time  # noqa: E402 (this folder is on sys.path when run)

ROTATE_BYTES = 256 << 20  # the input sets of one shape together: well past an H100's or H200's L2


def calls_time(calls: list, reps: int = 10) -> float:
    """Seconds per call of the calls, each replayed `reps` times in one CUDA graph."""
    return graph_time(lambda: [call() for call in calls], reps) / len(calls)


def parse_variant(text: str) -> tuple:
    name, _, assignments = text.partition(":")
    return name, {k: int(v) for k, v in (a.split("=") for a in assignments.split(",") if a)}


def compare(n_rows: int, n: int, dtype: torch.dtype, residual: bool, variants: list) -> None:
    per_set = (5 if residual else 3) * n_rows * n * dtype.itemsize
    sets = max(1, min(16, ROTATE_BYTES // per_set))
    w, dw = torch.randn(n, device="cuda", dtype=dtype), torch.empty(n, device="cuda", dtype=dtype)
    data = []
    for _ in range(sets):
        z = torch.randn(n_rows, n, device="cuda", dtype=dtype)
        g, dx = torch.randn_like(z), torch.empty_like(z)
        g_r, dr = (torch.randn_like(z), torch.empty_like(z)) if residual else (None, None)
        data.append((z, g, g_r, dx, dr))
    calls = [lambda d=d: bi_torch.launch.launch_backward(d[0], w, d[1], d[2], d[3], d[4], dw, 1e-6, "llama", 0.0)
             for d in data]
    src, dst = data[0][0], torch.empty_like(data[0][0])
    copy_bw = 2 * src.nbytes / calls_time([lambda: dst.copy_(src)], reps=50)
    moved = per_set + 2 * w.nbytes
    calls[0]()
    expected = (to_numpy(data[0][3]), to_numpy(dw))
    print(f"== {n_rows}x{n} {str(dtype).split('.')[-1]}{' +residual' if residual else ''}: {sets} input sets, "
          f"copy {copy_bw / 1e9:.0f} GB/s")
    for name, overrides in [("shipped", {})] + variants:
        saved = {k: getattr(tiling, k) for k in overrides}
        try:
            for k, v in overrides.items():
                setattr(tiling, k, v)
            cfg = tiling.backward_config(n, n_rows, dtype.itemsize)
            calls[0]()
            assert_bitwise_equal(expected[0], to_numpy(data[0][3]), f"grad_x, {name}")
            assert_bitwise_equal(expected[1], to_numpy(dw), f"grad_weight, {name}")
            seconds = calls_time(calls)
            print(f"  {name:10s} {moved / seconds / copy_bw:6.1%} of copy {seconds * 1e6:8.1f} us  rows={cfg.rows} "
                  f"steps={cfg.steps} blocks={cfg.blocks} chunk={cfg.chunk}x{cfg.num_chunks} warps={cfg.num_warps} "
                  f"tree={cfg.tree_groups}", flush=True)
        finally:
            for k, v in saved.items():
                setattr(tiling, k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", required=True, help="TOKENSxHIDDEN list")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--residual", action="store_true", help="with a residual and its gradient")
    parser.add_argument("--variant", action="append", default=[], help="NAME:CONST=VALUE,... (repeatable)")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    for shape in args.shapes.split(","):
        n_rows, n = (int(v) for v in shape.split("x"))
        compare(n_rows, n, getattr(torch, args.dtype), args.residual, variants)


if __name__ == "__main__":
    main()
