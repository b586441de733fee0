"""Sweep the backward's tiling constants (bridge.tiling) for the Triton backward on a GPU.

Each setting of (rows per tile, steps per block, warps) is checked bit for bit against the shipped
configuration's gradients before it is timed: a configuration never changes the bits (NUMERICS.md,
"How each backend keeps the contract"). Times are of whole launch_backward calls (the main kernel
and every column-tree level) replayed in a CUDA graph, so that host launch overhead is left out.
Usage: python3 scripts/tune_backward.py [--shapes 16384x4096,...] [--dtype bfloat16]
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
from bridge import tiling  # noqa: E402
from bridge.compare import assert_bitwise_equal  # noqa: E402

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


def sweep(n_rows: int, n: int, dtype: torch.dtype) -> None:
    z = torch.randn(n_rows, n, device="cuda", dtype=dtype)
    g, w = torch.randn_like(z), torch.randn(n, device="cuda", dtype=dtype)
    dx, dw = torch.empty_like(z), torch.empty_like(w)
    copy = torch.empty_like(z)
    copy_bw = 2 * z.nbytes / graph_time(lambda: copy.copy_(z))
    moved = 3 * z.nbytes + 2 * w.nbytes  # read z and grad_out, write grad_x; the weight and its grad
    run = lambda: bi_torch.launch.launch_backward(z, w, g, None, dx, None, dw, 1e-6, "llama", 0.0)  # noqa: E731
    run()
    expected = (dx.clone(), dw.clone())
    shipped = tiling.backward_config(n, n_rows, z.element_size())
    original = bi_torch.launch.backward_config
    results = []
    for rows, steps, warps in itertools.product((1, 2, 4), (1, 2, 4, 8, 16), (4, 8, 16)):
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
            assert_bitwise_equal(expected[0], dx, f"grad_x with {cfg}")
            assert_bitwise_equal(expected[1], dw, f"grad_weight with {cfg}")
            results.append((moved / graph_time(run) / copy_bw, cfg))
        finally:
            bi_torch.launch.backward_config = original
    results.sort(key=lambda r: -r[0])
    print(f"== {n_rows}x{n} {dtype}: copy {copy_bw / 1e9:.0f} GB/s; shipped rows={shipped.rows} "
          f"steps={shipped.steps} warps={shipped.num_warps}")
    for fraction, cfg in results[:6]:
        print(f"  {fraction:6.1%} of copy  rows={cfg.rows} steps={cfg.steps} warps={cfg.num_warps} blocks={cfg.blocks}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="TOKENSxHIDDEN list")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        n_rows, n = (int(v) for v in shape.split("x"))
        sweep(n_rows, n, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
