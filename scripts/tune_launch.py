"""Sweep the launch configuration (rows per program x warps) of both kernels on a GPU.

bridge.numerics.tiling picks one configuration per (n, rows); this script times the alternatives so that
the choice rests on numbers (BENCHMARKS.md, "changes tried"). A configuration never changes a
row's bits, and each one is checked against the shipped configuration's output before it is timed.
Usage: python3 scripts/tune_launch.py [--shapes 16384x8192,...] [--dtype bfloat16] [--residual] [--jax] [--splits]
       [--fp8 static|group]   (the FP8 output: the Triton kernel only, % of copy of the FP8 pass's bytes)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Iterator, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge import bench  # noqa: E402
from bridge.numerics import tiling  # noqa: E402
from bridge.verify.compare import assert_bitwise_equal  # noqa: E402

DEFAULT_SHAPES = "1x4096,8x8192,1024x8192,4096x8192,16384x4096,16384x8192,65536x4096"


@contextlib.contextmanager
def forced_config(cfg: tiling.LaunchConfig) -> Iterator[None]:
    """Make both kernels launch with cfg (their modules import launch_config by name)."""
    import bi_jax.ops
    import bi_torch.launch

    saved = bi_torch.launch.launch_config
    pick = lambda *_, **__: cfg  # noqa: E731
    bi_torch.launch.launch_config = bi_jax.ops.launch_config = pick
    _clear_jax_caches()
    try:
        yield
    finally:
        bi_torch.launch.launch_config = bi_jax.ops.launch_config = saved
        _clear_jax_caches()


def _clear_jax_caches() -> None:
    import jax

    import bi_jax.ops

    bi_jax.ops._rows_fn.cache_clear()
    jax.clear_caches()


def candidates(n: int, n_rows: int, itemsize: int, residual_itemsize: int, device_kind: str,
               splits: bool = False, quant: str = "none") -> List[tiling.LaunchConfig]:
    shipped = tiling.launch_config(n, n_rows, itemsize, residual_itemsize, device_kind, quant=quant)
    if splits:  # the shipped tiling with each other split width
        return [shipped] + [dataclasses.replace(shipped, split=1 << k) for k in range(shipped.chunk.bit_length())
                            if 1 << k != shipped.split]
    if shipped.num_chunks > 1:
        # Also the one-pass design: the whole long row in registers on 16 or 32 warps, read once.
        width = shipped.chunk * shipped.num_chunks
        whole = [tiling.LaunchConfig(1, width, 1, w, tiling.split_width(width, itemsize)) for w in (16, 32)]
        return [shipped] + [dataclasses.replace(shipped, num_warps=w) for w in (4, 8, 16)
                            if w != shipped.num_warps] + whole
    found = [shipped]
    for rows, warps in itertools.product((1, 2, 4, 8), (2, 4, 8, 16, 32)):
        per_thread = rows * shipped.chunk // (32 * warps)
        if rows <= max(1, n_rows) and 4 <= per_thread <= 64:
            cfg = dataclasses.replace(shipped, rows=rows, num_warps=warps)
            if cfg != shipped:
                found.append(cfg)
    return found


def _torch_op(args, w):
    """bi_torch's forward as the sweep times it: bf16/float32 output, or the FP8 output (--fp8)."""
    import torch

    import bi_torch

    if args.fp8 is None:
        return lambda x, r: bi_torch.rms_norm(x, w, bench.EPS, r)
    fp8 = dict(out_dtype=torch.float8_e4m3fn)
    fp8.update(group_size=bench.FP8_GROUP_SIZE) if args.fp8 == "group" else fp8.update(scale=bench.FP8_SCALE)
    return lambda x, r: bi_torch.rms_norm(x, w, bench.EPS, r, **fp8)


def _outputs(result) -> tuple:
    return tuple(result) if isinstance(result, tuple) else (result,)


def _time_config(cfg, args, w, sets, want, jsets, jw, case, copy_us):
    """Time one configuration of the Triton kernel (and the Pallas one with jsets), each checked
    bit for bit against the shipped configuration's output first."""
    import bi_jax
    import bi_torch

    with forced_config(cfg):
        fn = _torch_op(args, w)
        wants = _outputs(want)
        for a, b in zip(wants, _outputs(fn(*sets[0])), strict=True):
            assert_bitwise_equal(bi_torch.to_numpy(a), bi_torch.to_numpy(b), f"{cfg} vs shipped")
        us, _ = bench.time_torch(fn, sets)
        if jsets is None:
            return us, ""
        # Pallas-Triton: the launch configuration is its own (the Mosaic GPU forward has none).
        op = lambda x, r, w_: bi_jax.rms_norm(x, w_, bench.EPS, r, pallas_backend="triton")  # noqa: E731
        jgot = op(*jsets[0], jw)
        for a, b in zip(wants, jgot if args.residual else (jgot,)):
            assert_bitwise_equal(bi_torch.to_numpy(a), np.asarray(b), f"{cfg} (Pallas) vs shipped")
        jus, note = bench.time_jax(op, jsets, jw, case)
        return us, f"{jus:8.1f} {copy_us / jus:6.1%} {note[:30]}"


def main() -> int:
    import jax
    import jax.numpy as jnp
    import torch

    import bi_torch

    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--dtype", default="bfloat16", choices=bench.DTYPES)
    p.add_argument("--residual", action="store_true")
    p.add_argument("--jax", action="store_true", help="also time the Pallas kernel per configuration")
    p.add_argument("--splits", action="store_true", help="vary the split width instead of rows and warps")
    p.add_argument("--fp8", choices=("static", "group"), help="time the FP8 output (Triton only)")
    args = p.parse_args()
    if args.fp8 and args.jax:
        p.error("--fp8 times the Triton kernel only")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    kind = torch.cuda.get_device_name(0)  # the shipped rule is the one for this GPU
    dtype = getattr(torch, args.dtype)
    print(f"{'shape':>11} {'dtype':<8} res | rows warps split | {'torch µs':>8} {'%copy':>6} | {'jax µs':>8} {'%copy':>6}")
    for tokens, hidden in bench.parse_shapes(args.shapes):
        case = bench.Case(tokens, hidden, args.dtype, args.residual, f"fp8-{args.fp8}" if args.fp8 else "forward")
        n_sets = bench.rotation_sets(case, l2)
        g = torch.Generator(device="cuda").manual_seed(tokens + hidden)
        xs = bench.torch_sets(n_sets, (tokens, hidden), dtype, g)
        rs = bench.torch_sets(n_sets, (tokens, hidden), dtype, g) if args.residual else [None] * n_sets
        w = (1 + 0.1 * torch.randn(hidden, generator=g, device="cuda")).to(dtype)
        sets = list(zip(xs, rs))
        words = (-(-case.bytes_moved // 8),)
        copies = list(zip(bench.torch_sets(n_sets, words, torch.int32, g), bench.torch_sets(n_sets, words, torch.int32, g)))
        copy_us, _ = bench.time_copy({"memcpy": lambda s, d: d.copy_(s)}, copies)
        del copies
        if args.jax:
            jsets = [tuple(None if t is None else jnp.asarray(bi_torch.to_numpy(t)) for t in s)
                     for s in sets[:bench.JAX_SETS]]
            jw = jnp.asarray(bi_torch.to_numpy(w))
        want = _torch_op(args, w)(*sets[0])
        res_size = rs[0].element_size() if args.residual else 0
        quant = args.fp8 or "none"
        shipped = tiling.launch_config(hidden, tokens, xs[0].element_size(), res_size, kind, quant=quant)
        default = tiling.launch_config(hidden, tokens, xs[0].element_size(), res_size)
        for cfg in candidates(hidden, tokens, xs[0].element_size(), res_size, kind, args.splits, quant):
            try:
                us, jtext = _time_config(cfg, args, w, sets, want, jsets if args.jax else None,
                                         jw if args.jax else None, case, copy_us)
            except Exception as e:  # a configuration that does not compile is a result too
                us, jtext = float("nan"), f"failed: {type(e).__name__}: {str(e)[:80]}"
            print(f"{tokens:>5}x{hidden:<5} {args.dtype:<8} {'yes' if args.residual else 'no ':<3} | "
                  f"{cfg.rows:>4} {cfg.num_warps:>5} {cfg.split:>5} {cfg.chunk:>6}x{cfg.num_chunks:<2} | "
                  f"{us:8.1f} {copy_us / us:6.1%} | {jtext}"
                  f"{'  <- shipped' if cfg == shipped else ''}{'  <- default rule' if cfg == default else ''}",
                  flush=True)
        del xs, rs, sets
        torch.cuda.empty_cache()
        jax.clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
