"""Registers and spills per thread of both kernels' launches at a shape, compiled for sm_90a without a GPU.

Triton: bi_torch's launchers run on CPU tensors with the kernels swapped for recorders, so each
launch's grid, arguments, constexprs and warps are the launcher's own; each is then compiled for
sm_90a with Triton's launch-time specialisation (16-byte aligned pointers, integers divisible by
16 marked so, 1 as a constant). Pallas: bi_jax's calls are lowered for CUDA on the CPU (jax's
cross-platform lowering), and each Pallas-Triton kernel's IR is compiled by the same local
Triton. ptxas -v (Triton's own) gives the registers and spill stores. This Triton is not the GPU
image's (nor the one inside XLA), so the numbers are indicative: a tile that spills here is
worth a look there (BENCHMARKS.md, "Backward changes not yet timed").
Usage: python3 scripts/kernel_resources.py [--shapes 16384x4096,4096x65536] [--residual] [--pass backward] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from jax._src.pallas.triton import lowering as pallas_lowering  # noqa: E402
from jax._src.lib.mlir import ir  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

import bi_jax  # noqa: E402
import bi_jax.ops  # noqa: E402
import bi_torch.launch  # noqa: E402
from bi_torch import triton_backward, triton_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DEVICE = "NVIDIA H200"  # the GPU whose launch rules (bridge.numerics.tiling.DEVICE_TILINGS) are compiled
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8"}


def ptxas_usage(ptx: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        Path(path).write_text(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    used, spilled = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    if not used:
        return f"ptxas failed: {log.strip()[-200:]}"
    return f"{int(used.group(1)):4d} registers, {int(spilled.group(1)) if spilled else 0:5d} bytes spilled"


class Recorder:
    """Stands in for a kernel module: kernel[grid](*args, **kwargs) records the launch."""

    def __init__(self, module: types.ModuleType, launches: list):
        self._module, self._launches = module, launches

    def __getattr__(self, name: str):
        return _Launcher(getattr(self._module, name), self._launches)


class _Launcher:
    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))


def compile_triton(kernel, args: tuple, kwargs: dict) -> str:
    options = {k: kwargs.pop(k) for k in ("num_warps", "enable_fp_fusion")}
    signature, constexprs, attrs = {}, dict(kwargs), {}
    for i, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or (isinstance(value, int) and value == 1):
            constexprs[name] = value
        elif isinstance(value, int):
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=TARGET, options=options).asm["ptx"]


def triton_launches(pass_: str, shape: tuple, residual: bool, dtype: str) -> list:
    launches: list = []
    bi_torch.launch.interpreted_kernels = lambda: Recorder(triton_kernel, launches)
    bi_torch.launch.interpreted_backward_kernels = lambda: Recorder(triton_backward, launches)
    bi_torch.launch.device_kind = lambda device: DEVICE  # the forward's launch rule for that GPU
    x, w = torch.zeros(shape, dtype=getattr(torch, dtype)), torch.zeros(shape[-1:], dtype=getattr(torch, dtype))
    r = torch.zeros_like(x) if residual else None
    if pass_ == "forward":
        bi_torch.launch.launch(x, w, torch.empty_like(x), 1e-6, r, torch.empty_like(x) if residual else None,
                               "llama", 0.0)
    else:
        bi_torch.launch.launch_backward(x, w, x, r, torch.empty_like(x), torch.empty_like(x) if residual else None,
                                        torch.empty_like(w), 1e-6, "llama", 0.0)
    return launches


def pallas_kernels(pass_: str, shape: tuple, residual: bool, dtype: str) -> list:
    """(name, grid, warps, TTIR text) of each Pallas-Triton kernel in bi_jax's call, lowered for CUDA."""
    bi_jax.ops.device_kind = lambda: DEVICE
    x, w = jnp.zeros(shape, dtype), jnp.zeros(shape[-1:], dtype)
    r = jnp.zeros(shape, dtype) if residual else None

    def out(a, b):
        y = bi_jax.rms_norm(a, b, 1e-6, r, interpret=False, pallas_backend="triton")
        return y[0] if isinstance(y, tuple) else y

    fn = out if pass_ == "forward" else lambda a, b: jax.vjp(out, a, b)[1](a)
    module = jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in inner.attributes:
                        config = {a.name: a.attr for a in inner.attributes["mhlo.backend_config"]}
                        if "ir" in config:
                            with pallas_lowering._new_ir_context():
                                text = str(ir.Module.parse(bytes(config["ir"].value_bytes)))
                            grid = tuple(ir.IntegerAttr(config[f"grid_{a}"]).value for a in "xyz")
                            found.append((str(config["name"]).strip('"'), grid,
                                          ir.IntegerAttr(config["num_warps"]).value, text))
                    walk(inner.operation)

    walk(module.operation)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="16384x4096,4096x8192,4096x16384,4096x65536", help="TOKENSxHIDDEN list")
    parser.add_argument("--residual", action="store_true")
    parser.add_argument("--pass", dest="pass_", choices=("forward", "backward"), default="backward")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="x's and the weight's")
    args = parser.parse_args()
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        print(f"== {text} {args.dtype} {args.pass_}{' +residual' if args.residual else ''}")
        for kernel, grid, call_args, kwargs in triton_launches(args.pass_, shape, args.residual, args.dtype):
            warps = kwargs["num_warps"]
            print(f"  triton {kernel.__name__:26s} grid {str(tuple(grid)):14s} {warps:2d} warps: "
                  f"{ptxas_usage(compile_triton(kernel, call_args, dict(kwargs)))}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, grid, warps, ttir) in enumerate(pallas_kernels(args.pass_, shape, args.residual,
                                                                         args.dtype)):
                path = os.path.join(tmp, f"{name}_{i}.ttir")
                Path(path).write_text(ttir)
                try:
                    ptx = triton.compile(path, target=TARGET, options={"num_warps": warps, "num_stages": 1,
                                                                       "enable_fp_fusion": False}).asm["ptx"]
                    usage = ptxas_usage(ptx)
                except RuntimeError as e:  # jaxlib's Triton dialect wrote something this Triton cannot read
                    usage = f"not compiled here: {e}"
                print(f"  pallas {name:26s} grid {str(grid):14s} {warps:2d} warps: {usage}", flush=True)


if __name__ == "__main__":
    main()
