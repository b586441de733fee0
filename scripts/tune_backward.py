"""Sweep the backward's tiling constants (bridge.numerics.tiling) for the Triton backward on a GPU.

Each setting of (rows per tile, steps per block, warps) is checked bit for bit against the shipped
configuration's gradients before it is timed: a configuration never changes the bits (NUMERICS.md,
"How each backend keeps the contract"). Times are of whole launch_backward calls (the main kernel
and every column-tree level) replayed in a CUDA graph, so that host launch overhead is left out.
Usage: python3 scripts/tune_backward.py [--shapes 16384x4096,...] [--dtype bfloat16] [--residual]
       [--rows 1,2,4] [--steps 1,2,4,8,16] [--warps 4,8,16]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bi_torch.launch  # noqa: E402
from bi_torch import to_numpy  # noqa: E402
from bridge.numerics import tiling  # noqa: E402
from bridge.verify.compare import assert_bitwise_equal  # noqa: E402

DEFAULT_SHAPES = "1024x4096,16384x1024,4096x8192,16384x4096,65536x4096"


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, replayed `reps` times in one CUDA graph."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e-3 / reps


def sweep(n_rows: int, n: int, dtype: torch.dtype, residual: bool, grid: tuple) -> None:
    z = torch.randn(n_rows, n, device="cuda", dtype=dtype)
    g, w = torch.randn_like(z), torch.randn(n, device="cuda", dtype=dtype)
    dx, dw = torch.empty_like(z), torch.empty_like(w)
    # With a residual: the new residual's gradient read, grad_residual written.
    g_r, dr = (torch.randn_like(z), torch.empty_like(z)) if residual else (None, None)
    copy = torch.empty_like(z)
    copy_bw = 2 * z.nbytes / graph_time(lambda: copy.copy_(z))
    # Read z and grad_out (and g_r), write grad_x (and grad_residual); the weight and its grad.
    moved = (5 if residual else 3) * z.nbytes + 2 * w.nbytes
    run = lambda: bi_torch.launch.launch_backward(z, w, g, g_r, dx, dr, dw, 1e-6, "llama", 0.0)  # noqa: E731
    run()
    expected = (dx.clone(), dw.clone())
    shipped = tiling.backward_config(n, n_rows, z.element_size())
    original = bi_torch.launch.backward_config
    results = []
    for rows, steps, warps in itertools.product(*grid):
        per_thread = rows * shipped.chunk // (32 * warps)
        if rows * shipped.chunk > 16384 or not 4 <= per_thread <= 32 or rows > tiling.next_power_of_two(n_rows):
            continue
        blocks = -(-n_rows // (rows * steps))
        cfg = dataclasses.replace(shipped, rows=rows, steps=steps, blocks=blocks, num_warps=warps,
                                  tree_groups=tiling.column_tree_groups(blocks))
        if cfg.block_rows > tiling.next_power_of_two(n_rows):
            continue
        bi_torch.launch.backward_config = lambda *_, cfg=cfg: cfg
        try:
            run()
            assert_bitwise_equal(to_numpy(expected[0]), to_numpy(dx), f"grad_x with {cfg}")
            assert_bitwise_equal(to_numpy(expected[1]), to_numpy(dw), f"grad_weight with {cfg}")
            seconds = graph_time(run)
            results.append((moved / seconds / copy_bw, seconds, cfg))
        finally:
            bi_torch.launch.backward_config = original
    results.sort(key=lambda r: -r[0])
    print(f"== {n_rows}x{n} {dtype}{' +residual' if residual else ''}: copy {copy_bw / 1e9:.0f} GB/s; "
          f"shipped rows={shipped.rows} steps={shipped.steps} warps={shipped.num_warps}")
    for fraction, seconds, cfg in results[:6]:
        print(f"  {fraction:6.1%} of copy {seconds * 1e6:8.1f} us  rows={cfg.rows} steps={cfg.steps} "
              f"warps={cfg.num_warps} blocks={cfg.blocks}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="TOKENSxHIDDEN list")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--residual", action="store_true", help="with a residual and its gradient")
    ints = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    parser.add_argument("--rows", type=ints, default=(1, 2, 4), help="rows per tile to try")
    parser.add_argument("--steps", type=ints, default=(1, 2, 4, 8, 16), help="steps per block to try")
    parser.add_argument("--warps", type=ints, default=(4, 8, 16), help="warps to try")
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        n_rows, n = (int(v) for v in shape.split("x"))
        sweep(n_rows, n, getattr(torch, args.dtype), args.residual, (args.rows, args.steps, args.warps))


if __name__ == "__main__":
    main()
