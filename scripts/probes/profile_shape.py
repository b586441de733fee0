"""Run both kernels' forward or backward a few times at one shape, for ncu (scripts/gpu_suite.sh profile).

Kernel names: rms_norm_kernel and rms_norm_backward_kernel (Triton), bi_norm_rms_norm and
bi_norm_rms_norm_backward (Pallas), column_tree_kernel / bi_norm_column_tree, the long rows' stats passes.
fp8-group: bi_torch's forward with FP8 output, a scale per token and 128 channels (torch only; issue 24).
Usage: python3 scripts/probes/profile_shape.py forward|backward|fp8-group [16384x4096] [--residual]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import bi_jax  # noqa: E402
import bi_torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pass_", choices=("forward", "backward", "fp8-group"), metavar="pass")
    parser.add_argument("shape", nargs="?", default="16384x4096", help="TOKENSxHIDDEN")
    parser.add_argument("--residual", action="store_true")
    args = parser.parse_args()
    t, n = (int(v) for v in args.shape.split("x"))
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, g, w = torch.randn(t, n, **bf16), torch.randn(t, n, **bf16), torch.randn(n, **bf16)
    r = torch.randn(t, n, **bf16) if args.residual else None
    jx, jg, jw = (jnp.asarray(bi_torch.to_numpy(a)) for a in (x, g, w))
    jr = None if r is None else jnp.asarray(bi_torch.to_numpy(r))

    def first(out):  # out, or out of (out, new_residual): the backward takes out's gradient only
        return out[0] if isinstance(out, tuple) else out

    # Pallas-Triton's forward: scripts/gpu_suite.sh's ncu filter names its kernel (bi_norm_rms_norm).
    forward = lambda a, b, res: first(bi_jax.rms_norm(a, b, 1e-6, res, pallas_backend="triton"))  # noqa: E731
    if args.pass_ == "fp8-group":
        run_torch = lambda: bi_torch.rms_norm(x, w, 1e-6, r, out_dtype=torch.float8_e4m3fn, group_size=128)  # noqa: E731
        run_jax = lambda: None  # noqa: E731
    elif args.pass_ == "forward":
        run_torch = lambda: bi_torch.rms_norm(x, w, 1e-6, r)  # noqa: E731
        jitted = jax.jit(forward)
        run_jax = lambda: jitted(jx, jw, jr)  # noqa: E731
    else:
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        run_torch = lambda: torch.autograd.grad(first(bi_torch.rms_norm(xg, wg, 1e-6, r)), (xg, wg), g)  # noqa: E731
        jitted = jax.jit(lambda a, b, res, c: jax.vjp(lambda a, b: forward(a, b, res), a, b)[1](c))
        run_jax = lambda: jitted(jx, jw, jr, jg)  # noqa: E731
    for _ in range(3):
        run_torch()
    torch.cuda.synchronize()
    for _ in range(3):
        jax.block_until_ready(run_jax())
    print(f"{args.pass_} {t}x{n}{' +residual' if r is not None else ''}: 3 calls each, done")


if __name__ == "__main__":
    main()
