"""`bi-norm bench`: time both kernels' forward, backward and FP8-output forward against peers and
a device-to-device copy on a GPU.

benchmarks/METHOD.md describes the method. The package's modules, imported one way only:

- plan: the shapes, dtypes, passes, implementations, bytes counted per case, rotated sets, knobs;
- timing: the timing loops (CUDA-graph replay for torch, a jitted on-GPU loop for JAX), the copy
  ceiling, one implementation's build-check-time step; imports plan;
- measuring: the loop over the plan's cases (GPU only), the forward's; imports plan, timing,
  backward and fp8, and peers lazily;
- backward: the backward's and fwd+bwd's cases, checked against bridge.reference, and the
  determinism counts; imports plan and timing, and backward_peers lazily;
- fp8: the FP8 passes' cases (fp8-static, fp8-group), checked against bridge.reference; imports
  plan and timing, and fp8_peers lazily;
- peers: the forward's peers (torch and triton at import: a GPU run only); imports plan;
- backward_peers: the backward's and fwd+bwd's implementations, ours too; imports plan and peers;
- fp8_peers: the FP8 passes' peers (a norm, then a separate quantization; vLLM's fused kernels);
  imports plan and peers;
- report: bench.csv, bench-table.txt, bench-determinism.csv, bench.png, bench-copy.png; imports plan.

torch and jax are imported inside functions only, so that `import bridge` stays framework-free
and `--dry-run` works without either. The names below are re-exported for bridge.cli, the tests
and scripts/tune_launch.py (`bench.run`, `bench.Case`, `bench.time_torch`, ...).
"""

from __future__ import annotations

import argparse
import sys
from typing import List

from .backward import check_grads, count_patterns, loop_op
from .fp8 import check_fp8, fp8_loop_op, fp8_steps
from .measuring import measure, package_versions
from .measuring import _no_gpu_reason
from .plan import (CHECK_ROWS, CHECK_TOL, DEFAULT_PASSES, DEFAULT_SHAPES, DETERMINISM_RUNS, DETERMINISM_SHAPES, DTYPES,
                   EPS, FP8_GROUP_SIZE, FP8_PASSES, FP8_SCALE, FP8_ULPS, HIDDEN, IMPL_BY_NAME, IMPLS, ITEMSIZE,
                   JAX_CALL_S, JAX_SETS, LIGER_SITE, MAX_REPS, MAX_SETS, MEASURE_S, MIN_REPS, PASSES, PEER_NAMES,
                   POOL_BYTES, QUICK_SHAPES, SMALL_TOKENS, TOKENS, Case, Determinism, Impl, Plan, Skip, Timing,
                   UsageError, check_rows, checks_determinism, make_plan, parse_peers, parse_shapes, rotation_sets,
                   runs_in, synthetic_determinism, synthetic_timings)
from .report import (CSV_COLUMNS, DETERMINISM_COLUMNS, DETERMINISM_CSV, Row, determinism_lines, fastest_peer,
                     format_table, label, read_csv, read_determinism_csv, summarize, target_lines, write_copy_plot,
                     write_csv, write_determinism_csv, write_plot, write_report)
from .timing import check_close, copy_timing, rel_err, run_impl, time_copy, time_jax, time_jax_unrolled, time_torch, \
    torch_sets

__all__ = [
    "check_grads", "count_patterns", "loop_op", "check_fp8", "fp8_loop_op", "fp8_steps", "CHECK_ROWS", "CHECK_TOL",
    "DEFAULT_PASSES", "DEFAULT_SHAPES", "DETERMINISM_RUNS", "DETERMINISM_SHAPES", "DTYPES", "EPS", "FP8_GROUP_SIZE",
    "FP8_PASSES", "FP8_SCALE", "FP8_ULPS", "HIDDEN", "IMPL_BY_NAME", "IMPLS", "ITEMSIZE", "JAX_CALL_S", "JAX_SETS",
    "LIGER_SITE", "MAX_REPS", "MAX_SETS", "MEASURE_S", "MIN_REPS", "PASSES", "PEER_NAMES", "POOL_BYTES",
    "QUICK_SHAPES", "SMALL_TOKENS", "TOKENS", "Case", "Determinism", "Impl", "Plan", "Skip", "Timing", "UsageError",
    "check_rows", "checks_determinism", "make_plan", "parse_peers", "parse_shapes", "rotation_sets", "runs_in",
    "synthetic_determinism", "synthetic_timings", "CSV_COLUMNS", "DETERMINISM_COLUMNS", "DETERMINISM_CSV", "Row",
    "determinism_lines", "fastest_peer", "format_table", "label", "read_csv", "read_determinism_csv", "summarize",
    "target_lines", "write_copy_plot", "write_csv", "write_determinism_csv", "write_plot", "write_report",
    "check_close", "copy_timing", "rel_err", "run_impl", "time_copy", "time_jax", "time_jax_unrolled", "time_torch",
    "torch_sets", "measure", "package_versions", "run",
]


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except UsageError as e:
        print(f"bi-norm bench: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        timings, determinism = synthetic_timings(plan), synthetic_determinism(plan)
        device = "synthetic (--dry-run): no GPU was used"
    elif args.from_csv:
        beside = args.from_csv.parent / DETERMINISM_CSV  # the determinism counts of the same run, if it wrote them
        timings, determinism = read_csv(args.from_csv), read_determinism_csv(beside) if beside.is_file() else []
        device = f"re-rendered from {args.from_csv.name}"
    else:
        why = _no_gpu_reason()
        if why:
            print(f"bi-norm bench: needs a CUDA GPU ({why}); --dry-run exercises the report writer without one",
                  file=sys.stderr)
            return 2
        plan.out.mkdir(parents=True, exist_ok=True)

        def checkpoint(so_far: List[Timing], counted: List[Determinism]) -> None:
            write_csv(summarize(so_far), plan.out / "bench.csv")
            if counted:
                write_determinism_csv(counted, plan.out / DETERMINISM_CSV)

        timings, determinism, device = measure(plan, checkpoint)
    table = write_report(timings, plan.out, device, determinism)
    print(table, end="")
    failed = [t for t in timings if IMPL_BY_NAME[t.impl].kind != "peer" and t.us is None]
    return 1 if failed else 0
