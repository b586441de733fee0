"""Helpers shared by the `bi-norm bench` test files: a plan from the command line, a forward case timed by hand."""

from __future__ import annotations

from bridge import bench
from bridge.cli import _parser


def _plan(*argv: str) -> bench.Plan:
    return bench.make_plan(_parser().parse_args(["bench", *argv]))


def _synthetic() -> list:
    """One case timed by hand: copy 10 µs, ours 10.5 and 12.5, fastest peer liger at 12 µs, fastest JAX peer 13."""
    case = bench.Case(4096, 8192, "bfloat16", True)
    return [
        bench.Timing(case, "bi-torch", 10.5),
        bench.Timing(case, "bi-jax", 12.5),
        bench.Timing(case, "torch-eager", 20.0),
        bench.Timing(case, "xla", 13.0),
        bench.Timing(case, "liger", 12.0),
        bench.Timing(case, "vllm-bi", None, "error: RuntimeError: boom"),
        bench.Timing(case, "copy", 10.0),
    ]
