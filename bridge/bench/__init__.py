"""`bi-norm bench`: time both kernels against peers and a device-to-device copy on a GPU.

BENCHMARKS.md describes the method. The package's modules, imported one way only:

- plan: the shapes, dtypes, implementations, bytes counted per case, rotated sets, knobs;
- timing: the timing loops (CUDA-graph replay for torch, a jitted on-GPU loop for JAX);
- measuring: the loop over the plan's cases (GPU only); imports plan and timing, and peers lazily;
- peers: the peers timed against ours (torch and triton at import: a GPU run only);
- report: bench.csv, bench-table.txt, bench.png, bench-copy.png; imports plan only.

torch and jax are imported inside functions only, so that `import bridge` stays framework-free
and `--dry-run` works without either. The names below are re-exported for bridge.cli, the tests
and scripts/tune_launch.py (`bench.run`, `bench.Case`, `bench.time_torch`, ...).
"""

from __future__ import annotations

import argparse
import sys

from .measuring import measure, package_versions
from .measuring import _no_gpu_reason
from .plan import (CHECK_ROWS, CHECK_TOL, DEFAULT_SHAPES, DTYPES, EPS, HIDDEN, IMPL_BY_NAME, IMPLS, ITEMSIZE,
                   JAX_CALL_S, JAX_SETS, LIGER_SITE, MAX_REPS, MAX_SETS, MEASURE_S, MIN_REPS, PEER_NAMES,
                   POOL_BYTES, QUICK_SHAPES, SMALL_TOKENS, TOKENS, Case, Impl, Plan, Skip, Timing, UsageError,
                   make_plan, parse_peers, parse_shapes, rotation_sets, synthetic_timings)
from .report import (CSV_COLUMNS, Row, fastest_peer, format_table, label, read_csv, summarize, target_lines,
                     write_copy_plot, write_csv, write_plot, write_report)
from .timing import check_close, time_copy, time_jax, time_jax_unrolled, time_torch, torch_sets

__all__ = [
    "CHECK_ROWS", "CHECK_TOL", "DEFAULT_SHAPES", "DTYPES", "EPS", "HIDDEN", "IMPL_BY_NAME", "IMPLS", "ITEMSIZE",
    "JAX_CALL_S", "JAX_SETS", "LIGER_SITE", "MAX_REPS", "MAX_SETS", "MEASURE_S", "MIN_REPS", "PEER_NAMES",
    "POOL_BYTES", "QUICK_SHAPES", "SMALL_TOKENS", "TOKENS", "Case", "Impl", "Plan", "Skip", "Timing", "UsageError",
    "make_plan", "parse_peers", "parse_shapes", "rotation_sets", "synthetic_timings",
    "CSV_COLUMNS", "Row", "fastest_peer", "format_table", "label", "read_csv", "summarize", "target_lines",
    "write_copy_plot", "write_csv", "write_plot", "write_report",
    "check_close", "time_copy", "time_jax", "time_jax_unrolled", "time_torch", "torch_sets",
    "measure", "package_versions", "run",
]


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except UsageError as e:
        print(f"bi-norm bench: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        timings, device = synthetic_timings(plan), "synthetic (--dry-run): no GPU was used"
    elif args.from_csv:
        timings, device = read_csv(args.from_csv), f"re-rendered from {args.from_csv.name}"
    else:
        why = _no_gpu_reason()
        if why:
            print(f"bi-norm bench: needs a CUDA GPU ({why}); --dry-run exercises the report writer without one",
                  file=sys.stderr)
            return 2
        plan.out.mkdir(parents=True, exist_ok=True)
        timings, device = measure(plan, lambda so_far: write_csv(summarize(so_far), plan.out / "bench.csv"))
    table = write_report(timings, plan.out, device)
    print(table, end="")
    failed = [t for t in timings if IMPL_BY_NAME[t.impl].kind != "peer" and t.us is None]
    return 1 if failed else 0
