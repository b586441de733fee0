"""The `bi-norm` command: verify (the main job), golden (the corpus), bench (GPU timings)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from . import golden
from .numerics.contract import CONTRACT_VERSION, DTYPES
from .verify.backends import BACKENDS
from .verify.crossframework import CROSS_FRAMEWORK
from .verify.report import NOT_AVAILABLE, NOT_IMPLEMENTED, BackendReport, Progress
from .verify.run import QUICK_MAX_N, verify


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bi-norm", description="Batch-invariant RMSNorm: parity tooling.")
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="run the golden corpus and an invariance sweep through every backend")
    v.add_argument("--backend", action="append", choices=[b.name for b in BACKENDS] + [CROSS_FRAMEWORK],
                   help="only this backend (repeatable); default: all, unavailable ones listed with the reason")
    v.add_argument("--dtype", action="append", choices=DTYPES, help="only this dtype (repeatable)")
    v.add_argument("--quick", action="store_true", help=f"rows up to n={QUICK_MAX_N} and a short invariance sweep")
    v.add_argument("--json", action="store_true", help="print a JSON report instead of the table")
    v.add_argument("--corpus", type=Path, help="golden corpus directory (default: tests/golden/ in a checkout; "
                   "installed, a cache regenerated from the reference, checked against the digests it ships)")
    v.add_argument("--jobs", type=_positive_int, default=os.cpu_count() or 1,
                   help="backends run side by side, each in its own process (default: one per core)")

    g = sub.add_parser("golden", help="regenerate or check the golden corpus from the reference")
    action = g.add_mutually_exclusive_group(required=True)
    action.add_argument("--regenerate", action="store_true", help="write the corpus and its manifest")
    action.add_argument("--check", action="store_true", help="exit 1 unless regeneration gives identical bytes")
    g.add_argument("--dir", type=Path, help="corpus directory (default: tests/golden/ in a checkout; installed, "
                   "--check takes the cache verify uses)")

    b = sub.add_parser("bench", help="time both kernels against peers and a copy on a GPU (BENCHMARKS.md)")
    shapes = b.add_mutually_exclusive_group()
    shapes.add_argument("--quick", action="store_true", help="a handful of shapes")
    shapes.add_argument("--shapes", help='TOKENSxHIDDEN list, e.g. "1x4096,4096x8192"')
    b.add_argument("--dtype", action="append", choices=("bfloat16", "float32"), help="only this dtype (repeatable)")
    residual = b.add_mutually_exclusive_group()
    residual.add_argument("--no-residual", action="store_true", help="only the variant without a residual")
    residual.add_argument("--residual-only", action="store_true", help="only the fused residual-add variant")
    b.add_argument("--pass", dest="passes", action="append",
                   choices=("forward", "backward", "fwd+bwd", "fp8-static", "fp8-group"),
                   help="time this pass (repeatable); default: forward and backward; fwd+bwd: forward and backward "
                   "in one call, torch only; fp8-static, fp8-group: the forward with FP8 output (float8_e4m3fn), "
                   "a static scale or a scale per token and 128 channels")
    b.add_argument("--peers", help="comma-separated peers to time (default: all; our kernels and the copy always)")
    b.add_argument("--out", type=Path, default=Path("bench-out"), help="where bench.csv, bench-table.txt, "
                   "bench-determinism.csv, bench.png (GB/s) and bench-copy.png (%% of copy) go")
    source = b.add_mutually_exclusive_group()
    source.add_argument("--dry-run", action="store_true", help="no GPU: a synthetic result through the report writer")
    source.add_argument("--from-csv", type=Path, help="no GPU: write the report again from a bench.csv")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text}")
    return value


def terminal_progress(stream=None) -> Progress:
    """A one-line progress bar on a terminal; on a log, a line per quarter of each backend's work."""
    def show(backend: str, done: int, total: int) -> None:
        out = stream or sys.stderr
        if not out.isatty():
            if done == total or (4 * done) // total != (4 * (done - 1)) // total:
                out.write(f"{backend}: {done}/{total}\n")
            return
        width = 30
        filled = width * done // max(total, 1)
        out.write(f"\r{backend:<18} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            out.write("\r" + " " * (width + 40) + "\r")
        out.flush()
    return show


def format_table(reports: Sequence[BackendReport]) -> str:
    """A line per backend and pass (forward, backward, fp8); an unavailable backend gets one, with the reason."""
    header = (f"{'backend':<18} {'pass':<8} {'status':<15} {'cases':>5} {'checks':>6} {'mismatch':>8} "
              f"{'invariance':>10}  first mismatch / note")
    lines = [header, "-" * len(header)]
    for r in reports:
        if r.status == "unavailable" or (r.status == "error" and r.reason):
            lines.append(f"{r.backend:<18} {'':<8} {r.status:<15} {'':>5} {'':>6} {'':>8} {'':>10}  {r.reason}")
            continue
        for label, p in (("forward", r.forward), ("backward", r.backward), ("fp8", r.fp8)):
            if p is None:
                continue
            inv = f"{p.invariance_checks - p.invariance_mismatches}/{p.invariance_checks}"
            note = p.first_mismatch or p.reason or (f"{p.seconds:.1f}s" if p.status == "ok" else "")
            if p.flushed:
                note += f"; {p.flushed} gradient rows/columns not compared: float32 subnormals, which XLA:CPU flushes"
            name = r.backend if label == "forward" else ""
            lines.append(f"{name:<18} {label:<8} {p.status:<15} {p.cases:>5} {p.checks:>6} {p.mismatches:>8} "
                         f"{inv:>10}  {note}")
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> int:
    reports = verify(args.backend, args.dtype, args.quick, args.corpus, progress=terminal_progress(), jobs=args.jobs)
    failed = [r for r in reports if r.status in ("mismatch", "error") or (args.backend and r.status == "unavailable")]
    if args.json:
        doc = {"contract_version": CONTRACT_VERSION, "ok": not failed, "backends": [dataclasses.asdict(r) for r in reports]}
        print(json.dumps(doc, indent=2))
    else:
        print(format_table(reports))
        print("OK: every available backend matches the golden corpus bit for bit." if not failed
              else f"FAILED: {', '.join(r.backend for r in failed)}")
        lacking = [r.backend for r in reports if r.backward is not None and r.backward.status == NOT_IMPLEMENTED]
        if lacking:
            print(f"Backward not implemented (not a failure): {', '.join(lacking)}")
        no_fp8 = [r.backend for r in reports if r.fp8 is not None and r.fp8.status == NOT_AVAILABLE]
        if no_fp8:
            print(f"FP8 not available (not compared, not a failure): {', '.join(no_fp8)}")
    return 1 if failed else 0


def _golden(args: argparse.Namespace) -> int:
    if args.regenerate:
        directory = args.dir or golden.DEFAULT_DIR
        count = golden.regenerate(directory)
        print(f"wrote {count} cases and {golden.MANIFEST} to {directory}")
        return 0
    problems = golden.check_regeneration(args.dir or golden.corpus_dir())
    for name in problems:
        print(f"differs from regeneration: {name}")
    print("golden corpus reproduces bit for bit" if not problems else f"{len(problems)} file(s) differ")
    return 1 if problems else 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench  # lazily: it needs torch and jax (on a GPU) once it measures

    return bench.run(args)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)  # argparse exits with status 2 on misuse
    try:
        return {"verify": _verify, "golden": _golden, "bench": _bench}[args.command](args)
    except (FileNotFoundError, golden.CorpusError) as e:
        print(f"bi-norm: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
