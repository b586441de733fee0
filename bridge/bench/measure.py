"""`bi-norm bench`: time both kernels against peers and a device-to-device copy on a GPU.

BENCHMARKS.md describes the method. This module holds the plan (shapes, dtypes, peers), the
timing loops (CUDA-graph replay for torch, a jitted on-GPU loop for JAX) and the report
writer (bench.csv, bench-table.txt, bench.png). torch and jax are imported inside functions
only, so that `import bridge` stays framework-free and `--dry-run` works without either.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TOKENS = (1, 8, 64, 256, 1024, 4096, 16384, 65536)
HIDDEN = (4096, 8192)
DEFAULT_SHAPES: Tuple[Tuple[int, int], ...] = tuple((t, h) for t in TOKENS for h in HIDDEN) + ((65536, 128),
                                                                                               (4096, 65536))
QUICK_SHAPES: Tuple[Tuple[int, int], ...] = ((1, 4096), (256, 4096), (4096, 8192), (65536, 4096))
DTYPES = ("bfloat16", "float32")
ITEMSIZE = {"bfloat16": 2, "float32": 4}
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "ours", "peer" or "copy"
    framework: str  # "torch" or "jax"
    fused_residual: bool  # False: the residual variant adds in a separate kernel ("add+norm")


# BENCHMARKS.md says what each one is and how it is configured.
IMPLS: Tuple[Impl, ...] = (
    Impl("bi-torch", "ours", "torch", True),
    Impl("bi-jax", "ours", "jax", True),
    Impl("torch-eager", "peer", "torch", False),
    Impl("hf-compiled", "peer", "torch", True),
    Impl("liger", "peer", "torch", True),
    Impl("vllm-bi", "peer", "torch", False),
    Impl("xla", "peer", "jax", True),
    Impl("pallas-example", "peer", "jax", False),
    Impl("copy", "copy", "torch", True),
)
IMPL_BY_NAME: Dict[str, Impl] = {impl.name: impl for impl in IMPLS}
PEER_NAMES = tuple(impl.name for impl in IMPLS if impl.kind == "peer")

# Timing knobs: the default plan's timing (not its compiles) takes about 2 minutes on an H100.
MEASURE_S = 0.05  # timed GPU work per measurement, after warm-up
MIN_REPS, MAX_REPS = 5, 200
MAX_SETS = 1024  # input sets rotated per measurement (each one op call in the graph / jit)
POOL_BYTES = 4 << 30  # at most this much of rotated input sets per tensor role
JAX_SETS = 16  # K: input sets carried through the JAX timing loop
JAX_CALL_S = 0.02  # GPU work per jitted call, so its dispatch (~50 µs) is under 0.5%
CHECK_ROWS = 4096  # rows compared against our kernel before a peer is timed
CHECK_TOL = {"bfloat16": 2e-2, "float32": 1e-4}  # max ||peer - ours|| / ||ours||
SMALL_TOKENS = 64  # "small-token latency" rows for the targets
LIGER_SITE = Path("/tmp/site")  # where scripts/gpu_suite.sh installs the carried wheels


@dataclasses.dataclass(frozen=True)
class Case:
    tokens: int
    hidden: int
    dtype: str
    residual: bool

    @property
    def bytes_moved(self) -> int:
        """Read x (+ residual) and the weight, write out (+ the new residual); residual in x's dtype."""
        tensor = self.tokens * self.hidden * ITEMSIZE[self.dtype]
        streams = 2 if self.residual else 1
        return 2 * streams * tensor + self.hidden * ITEMSIZE[self.dtype]

    @property
    def shape(self) -> str:
        return f"{self.tokens}x{self.hidden}"


@dataclasses.dataclass
class Timing:
    case: Case
    impl: str
    us: Optional[float]  # None: skipped or failed, see note
    note: str = ""
    wall_s: float = 0.0  # host seconds spent on it: building, checking, compiling, timing


@dataclasses.dataclass
class Plan:
    cases: List[Case]
    peers: Tuple[str, ...]
    out: Path


class UsageError(ValueError):
    """Bad arguments: `bi-norm bench` exits 2."""


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    shapes = []
    for item in (s.strip() for s in text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise UsageError(f"--shapes: {item!r} is not TOKENSxHIDDEN with positive integers (e.g. 4096x8192)")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def parse_peers(text: Optional[str]) -> Tuple[str, ...]:
    if text is None:
        return PEER_NAMES
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PEER_NAMES]
    if unknown:
        raise UsageError(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEER_NAMES)}")
    return names


def make_plan(args: argparse.Namespace) -> Plan:
    shapes = parse_shapes(args.shapes) if args.shapes else list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    dtypes = [d for d in DTYPES if not args.dtype or d in args.dtype]
    residuals = [False] if args.no_residual else [True] if args.residual_only else [False, True]
    cases = [Case(t, h, d, r) for t, h in shapes for d in dtypes for r in residuals]
    return Plan(cases, parse_peers(args.peers), args.out)


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


def _no_gpu_reason() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = ("tokens", "hidden", "dtype", "residual", "impl", "kind", "residual_add", "bytes", "us", "gbps",
               "frac_copy", "ratio_fastest_peer", "ratio_framework_peer", "wall_s", "note")


@dataclasses.dataclass
class Row:
    timing: Timing
    gbps: Optional[float]
    frac_copy: Optional[float]  # copy time / this time: the fraction of copy bandwidth reached
    ratio: Optional[float]  # this time / the fastest peer's time at this case
    # this time / the fastest time of a peer in the same framework (torch under CUDA graphs, JAX in a
    # jitted loop): the small-token latency target compares like with like
    framework_ratio: Optional[float]


def label(impl_name: str, case: Case) -> str:
    """The impl's name, marked "(add+norm)" where its residual variant is an unfused add then the norm."""
    impl = IMPL_BY_NAME[impl_name]
    return f"{impl_name} (add+norm)" if case.residual and not impl.fused_residual else impl_name


def summarize(timings: Sequence[Timing]) -> Dict[Case, Dict[str, Row]]:
    by_case: Dict[Case, Dict[str, Timing]] = {}
    for t in timings:
        by_case.setdefault(t.case, {})[t.impl] = t
    summary: Dict[Case, Dict[str, Row]] = {}
    for case, group in by_case.items():
        copy = group.get("copy")
        copy_us = copy.us if copy else None
        peers = [t for t in group.values() if IMPL_BY_NAME[t.impl].kind == "peer" and t.us]
        fastest = min((t.us for t in peers), default=None)
        by_framework = {fw: min((t.us for t in peers if IMPL_BY_NAME[t.impl].framework == fw), default=None)
                        for fw in ("torch", "jax")}

        def ratio(us: Optional[float], peer_us: Optional[float]) -> Optional[float]:
            return us / peer_us if us and peer_us else None

        summary[case] = {
            name: Row(t,
                      case.bytes_moved / t.us / 1e3 if t.us else None,
                      copy_us / t.us if t.us and copy_us else None,
                      ratio(t.us, fastest), ratio(t.us, by_framework[IMPL_BY_NAME[name].framework]))
            for name, t in group.items()}
    return summary


def fastest_peer(rows: Dict[str, Row]) -> Optional[Row]:
    peers = [r for r in rows.values() if IMPL_BY_NAME[r.timing.impl].kind == "peer" and r.timing.us]
    return min(peers, key=lambda r: r.timing.us) if peers else None


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_csv(summary: Dict[Case, Dict[str, Row]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for case, rows in summary.items():
            for name, row in rows.items():
                impl = IMPL_BY_NAME[name]
                residual_add = "" if not case.residual else "fused" if impl.fused_residual else "separate"
                writer.writerow([case.tokens, case.hidden, case.dtype, int(case.residual), name, impl.kind,
                                 residual_add, case.bytes_moved, _fmt(row.timing.us, ".3f"), _fmt(row.gbps, ".1f"),
                                 _fmt(row.frac_copy, ".4f"), _fmt(row.ratio, ".4f"), _fmt(row.framework_ratio, ".4f"),
                                 f"{row.timing.wall_s:.1f}",
                                 row.timing.note])


def read_csv(path: Path) -> List[Timing]:
    """The timings a bench.csv holds (one a cut-off run left, say), to write its report again."""
    with path.open(newline="") as f:
        return [Timing(Case(int(r["tokens"]), int(r["hidden"]), r["dtype"], r["residual"] == "1"), r["impl"],
                       float(r["us"]) if r["us"] else None, r["note"], float(r["wall_s"]))
                for r in csv.DictReader(f)]


def format_table(summary: Dict[Case, Dict[str, Row]], device: str) -> str:
    """One line per case: our GB/s and % of copy, the fastest peer, our time over the peer's."""
    def ours(rows: Dict[str, Row], name: str) -> str:
        row = rows.get(name)
        gbps = _fmt(row and row.gbps, "13.0f") or f"{'-':>13}"
        pct = _fmt(row and row.frac_copy and 100 * row.frac_copy, "5.1f")
        return f"{gbps} {pct + '%' if pct else '-':>6}"

    head = (f"{'shape':>11} {'dtype':<8} {'res':<3} | {'bi-torch GB/s':>13} {'%copy':>6} | {'bi-jax GB/s':>13} "
            f"{'%copy':>6} | {'fastest peer':<26} {'GB/s':>6} | {'ratio t':>7} {'ratio j':>7} | {'t/torch':>7} "
            f"{'j/jax':>7}")
    lines = [f"# {device}", "# GB/s = (bytes read + bytes written) / time; ratio = our time / fastest peer's time;",
             "# t/torch, j/jax: our time / the fastest peer's of the same framework",
             head, "-" * len(head)]
    for case, rows in summary.items():
        peer = fastest_peer(rows)
        peer_text = f"{label(peer.timing.impl, case):<26} {peer.gbps:6.0f}" if peer else f"{'(none timed)':<26} {'':>6}"
        ratios = [_fmt(rows[n].ratio if n in rows else None, "7.2f") or f"{'-':>7}" for n in ("bi-torch", "bi-jax")]
        same = [_fmt(rows[n].framework_ratio if n in rows else None, "7.2f") or f"{'-':>7}"
                for n in ("bi-torch", "bi-jax")]
        lines.append(f"{case.shape:>11} {case.dtype:<8} {'yes' if case.residual else 'no':<3} | "
                     f"{ours(rows, 'bi-torch')} | {ours(rows, 'bi-jax')} | {peer_text} | {ratios[0]} {ratios[1]} | "
                     f"{same[0]} {same[1]}")
    lines += ["", *target_lines(summary)]
    return "\n".join(lines) + "\n"


def target_lines(summary: Dict[Case, Dict[str, Row]]) -> List[str]:
    """How many cases meet each of issue 6's targets, per kernel."""
    lines = []
    for name in ("bi-torch", "bi-jax"):
        rows = [(case, rs[name]) for case, rs in summary.items() if name in rs and rs[name].timing.us]
        checks = [
            ("copy >= 95% at >= 512 MB", [r.frac_copy >= 0.95 for c, r in rows
                                          if c.bytes_moved >= 512e6 and r.frac_copy is not None]),
            ("copy >= 90% at >= 64 MB", [r.frac_copy >= 0.90 for c, r in rows
                                         if c.bytes_moved >= 64e6 and r.frac_copy is not None]),
            ("ratio <= 1.00", [r.ratio <= 1.0 for c, r in rows if r.ratio is not None]),
            (f"same-framework ratio <= 1.10 at <= {SMALL_TOKENS} tokens",
             [r.framework_ratio <= 1.10 for c, r in rows if c.tokens <= SMALL_TOKENS and r.framework_ratio is not None]),
        ]
        lines.append(f"targets {name}: " + "; ".join(f"{text} {sum(ok)}/{len(ok)}" for text, ok in checks))
    return lines


def write_plot(summary: Dict[Case, Dict[str, Row]], path: Path) -> Optional[str]:
    """GB/s per shape, one panel per dtype and residual; returns why not when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    panels = sorted({(c.dtype, c.residual) for c in summary})
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for ax, (dtype, residual) in zip(axes[:, 0], panels):
        cases = sorted((c for c in summary if (c.dtype, c.residual) == (dtype, residual)), key=lambda c: c.bytes_moved)
        names = [impl.name for impl in IMPLS if any(impl.name in summary[c] for c in cases)]
        for name in names:
            ys = [summary[c][name].gbps if name in summary[c] and summary[c][name].gbps else math.nan for c in cases]
            style = dict(color="black", linestyle="--") if name == "copy" else dict(marker="o", markersize=3)
            ax.plot(range(len(cases)), ys, label=name, linewidth=2.2 if IMPL_BY_NAME[name].kind == "ours" else 1,
                    **style)
        ax.set_xticks(range(len(cases)), [c.shape for c in cases], rotation=45, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s (read + write)")
        ax.set_title(f"{dtype}, {'with' if residual else 'no'} residual")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(timings: Sequence[Timing], out: Path, device: str) -> str:
    """bench.csv, bench-table.txt and bench.png (when matplotlib imports) under out; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(timings)
    write_csv(summary, out / "bench.csv")
    table = format_table(summary, device)
    (out / "bench-table.txt").write_text(table)
    why_not = write_plot(summary, out / "bench.png")
    print(f"wrote {out / 'bench.csv'}, {out / 'bench-table.txt'}"
          + (f"; no bench.png: {why_not}" if why_not else f", {out / 'bench.png'}"))
    return table


def synthetic_timings(plan: Plan) -> List[Timing]:
    """A made-up result (--dry-run) for the plan's first and last shapes: latency + bytes / a fixed bandwidth."""
    gbps = {"copy": 3000, "bi-torch": 2850, "bi-jax": 2800, "torch-eager": 2000, "hf-compiled": 2600,
            "liger": 2500, "vllm-bi": 1800, "xla": 2400, "pallas-example": 2200}
    ends = {plan.cases[0].shape, plan.cases[-1].shape}
    names = ["bi-torch", "bi-jax", *plan.peers, "copy"]
    return [Timing(case, name, 2.0 + case.bytes_moved / gbps[name] / 1e3, "synthetic")
            for case in plan.cases if case.shape in ends for name in names]


# ---------------------------------------------------------------------------------------------
# Measuring (GPU only)
# ---------------------------------------------------------------------------------------------

def rotation_sets(case: Case, l2_bytes: int) -> int:
    """Input sets to rotate among so that one pass over them touches at least twice the L2."""
    footprint = case.bytes_moved - case.hidden * ITEMSIZE[case.dtype]  # the weight stays cached anyway
    per_role = case.tokens * case.hidden * ITEMSIZE[case.dtype]
    return max(1, min(math.ceil(2 * l2_bytes / footprint), MAX_SETS, POOL_BYTES // per_role))


def _reps(estimate_s: float) -> int:
    return max(MIN_REPS, min(MAX_REPS, int(MEASURE_S / max(estimate_s, 1e-6))))


def time_torch(fn: Callable, sets: Sequence[tuple]) -> Tuple[float, str]:
    """Median µs per call: fn over every set, captured in one CUDA graph, timed by events around replays."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants: compiles, autotunes
        for args in sets[:2]:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    note = ""
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: JAX's runtime threads may call CUDA while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for args in sets:
                fn(*args)
        replay = graph.replay
    except Exception as e:  # a peer that cannot be captured is still timed, launches included
        torch.cuda.synchronize()
        note = f"no CUDA graph ({type(e).__name__}): eager launches"

        def replay() -> None:
            for args in sets:
                fn(*args)
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    replay()
    end.record()
    end.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(_reps(start.elapsed_time(end) / 1e3))]
    for a, b in events:
        a.record()
        replay()
        b.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(a.elapsed_time(b) for a, b in events) * 1e3 / len(sets), note


def time_jax(op: Callable, sets: Sequence[tuple], weight, case: Case) -> Tuple[float, str]:
    """Median µs per call of op over K = min(sets, JAX_SETS) input sets, looped on the GPU.

    The loop runs op on all K sets rotated by one, then on those results rotated back, into the
    carry: each call consumes an earlier call's output, so XLA can neither hoist nor drop one, a
    buffer written in place (the residual) ends in the carry slot it came from, and no slice of
    a stacked array (which XLA would copy before a Pallas call) is needed. The
    carry is donated and fed back; one dispatch covers ~JAX_CALL_S of GPU work. Should XLA keep
    a copy in the loop (extra bytes), the unrolled scheme (time_jax_unrolled) is used instead.
    """
    import jax
    import jax.numpy as jnp

    k = min(len(sets), JAX_SETS)
    guess_s = 2e-6 + case.bytes_moved / 2.5e12  # sizes the loop only
    iterations = max(1, math.ceil(JAX_CALL_S / (2 * k * guess_s)))
    barrier = jax.lax.optimization_barrier

    def as_set(result) -> tuple:
        return tuple(result) if case.residual else (result, None)

    def loop(carry, w):
        def body(_, sets_in):
            # The barriers keep XLA from fusing two norms into one pass, and order every first-pass
            # call before any second-pass write, so the carry's buffers can be reused in place.
            mid = barrier([as_set(op(*sets_in[(i + 1) % k], w)) for i in range(k)])
            return [barrier(as_set(op(*mid[(i - 1) % k], w))) for i in range(k)]
        return jax.lax.fori_loop(0, iterations, body, carry)

    carry = jax.tree.map(jnp.copy, [tuple(s) for s in sets[:k]])
    compiled = jax.jit(loop, donate_argnums=0).lower(carry, weight).compile()
    copies = len(_ARRAY_COPY.findall(compiled.as_text()))
    if copies:
        us, note = time_jax_unrolled(op, sets, weight)
        return us, f"unrolled: XLA kept {copies} array copies in the loop; {note}".rstrip("; ")
    t0 = time.perf_counter()
    carry = jax.block_until_ready(compiled(carry, weight))  # warm-up
    warm_s = time.perf_counter() - t0
    if warm_s > 10 * JAX_CALL_S:  # far slower than guessed: one timed call (never the warm-up,
        t0 = time.perf_counter()  # whose first run of a big case can include allocations)
        carry = jax.block_until_ready(compiled(carry, weight))
        return (time.perf_counter() - t0) / (iterations * 2 * k) * 1e6, "one sample"
    samples = []
    for _ in range(MIN_REPS):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(compiled(carry, weight))
        samples.append((time.perf_counter() - t0) / (iterations * 2 * k))
    return statistics.median(samples) * 1e6, ""


# A copy of a non-scalar array in optimized HLO text, e.g. "%copy.3 = bf16[256,4096]{1,0} copy(%p)".
_ARRAY_COPY = re.compile(r"= \(?\w+\[[^\]]+\][^=]*? copy(?:-start)?\(")


def time_jax_unrolled(op: Callable, sets: Sequence[tuple], weight) -> Tuple[float, str]:
    """Median µs per call of a jitted function that runs op on K separate input sets (no loop).

    Every output is returned, so nothing is dropped and nothing extra is read; calls cycle over
    groups of K sets, dispatched back to back. At small shapes dispatch can outlast the GPU work:
    such a time is noted as host-bound, an upper bound.
    """
    import jax

    k = min(len(sets), JAX_SETS)
    groups = [tuple(sets[i:i + k]) for i in range(0, len(sets) - k + 1, k)]
    many = jax.jit(lambda calls, w: [op(*args, w) for args in calls])
    jax.block_until_ready(many(groups[0], weight))
    t0 = time.perf_counter()
    jax.block_until_ready(many(groups[-1], weight))
    calls = max(2, _reps(time.perf_counter() - t0) // MIN_REPS)
    samples, dispatch_share = [], []
    for _ in range(MIN_REPS):
        t0 = time.perf_counter()
        for i in range(calls):
            result = many(groups[i % len(groups)], weight)
        dispatched = time.perf_counter()
        jax.block_until_ready(result)
        elapsed = time.perf_counter() - t0
        samples.append(elapsed / (calls * k))
        dispatch_share.append((dispatched - t0) / elapsed)
    host_bound = statistics.median(dispatch_share) > 0.9
    return statistics.median(samples) * 1e6, "host-bound: an upper bound" if host_bound else ""


def _rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 on numpy arrays; inf when either is not finite."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_close(case: Case, got, want, to_numpy: Callable) -> None:
    """Raise unless each output (out, and the new residual) is within CHECK_TOL of ours."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    if len(got) != len(want):
        raise ValueError(f"returned {len(got)} outputs, expected {len(want)}")
    for name, g, w in zip(("out", "new residual"), got, want):
        err = _rel_err(to_numpy(g[:CHECK_ROWS]), to_numpy(w[:CHECK_ROWS]))
        if not err <= CHECK_TOL[case.dtype]:
            raise ValueError(f"{name} differs from ours: relative error {err:.2e} > {CHECK_TOL[case.dtype]:.0e}")


class Skip(Exception):
    """A peer that cannot run here (not installed, no GPU for JAX): skipped for every case."""


def measure(plan: Plan, checkpoint: Callable[[List[Timing]], None]) -> Tuple[List[Timing], str]:
    """Time every case; checkpoint(timings so far) runs after each, so a cut-off run leaves its CSV."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the GPU
    if LIGER_SITE.is_dir() and str(LIGER_SITE) not in sys.path:
        sys.path.append(str(LIGER_SITE))  # appended: the wheels there must not shadow the image's torch
    import torch

    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
    jax_why = _jax_unavailable()
    device = f"{torch.cuda.get_device_name(0)}, L2 {l2_bytes / 1e6:.0f} MB; {', '.join(package_versions())}"
    unavailable: Dict[str, str] = {}
    if jax_why:
        unavailable.update({impl.name: jax_why for impl in IMPLS if impl.framework == "jax"})
    timings: List[Timing] = []
    started = time.perf_counter()
    for i, case in enumerate(plan.cases, 1):
        n_sets = rotation_sets(case, l2_bytes)
        with torch.inference_mode():
            case_timings = _measure_torch(case, n_sets, plan.peers, unavailable)
        torch.cuda.empty_cache()  # let JAX's allocator have the memory
        if not jax_why:
            case_timings += _measure_jax(case, n_sets, plan.peers, unavailable)
        for name, why in unavailable.items():
            if name in ("bi-torch", "bi-jax") or name in plan.peers:
                case_timings.append(Timing(case, name, None, why))
        _flag_faster_than_copy(case_timings)
        timings += case_timings
        # Host seconds shown where they are large: compiles dominate the run's length.
        done = ", ".join(f"{t.impl} {t.us:.1f}" + (f" [{t.wall_s:.0f} s]" if t.wall_s >= 2 else "")
                         for t in case_timings if t.us is not None)
        print(f"[{i}/{len(plan.cases)} {time.perf_counter() - started:5.0f}s] {case.shape} {case.dtype}"
              f"{' +res' if case.residual else ''} ({n_sets} sets) µs: {done}", flush=True)
        checkpoint(timings)
    return timings, device


def package_versions() -> List[str]:
    """What a reader needs to reproduce a run: torch, triton, jax and Liger-Kernel, those installed."""
    found = []
    for dist, label in (("torch", "torch"), ("triton", "triton"), ("jax", "jax"), ("liger-kernel", "Liger-Kernel")):
        try:
            found.append(f"{label} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def _flag_faster_than_copy(case_timings: List[Timing]) -> None:
    """Note times under 90% of the copy's: no RMSNorm moves its bytes faster than a copy does."""
    copy_us = next((t.us for t in case_timings if t.impl == "copy"), None)
    for t in case_timings:
        if copy_us and t.us and t.impl != "copy" and t.us < 0.9 * copy_us:
            t.note = "; ".join(filter(None, [t.note, "suspect: faster than the copy ceiling"]))


def _jax_unavailable() -> Optional[str]:
    try:
        import jax
    except ImportError:
        return "jax is not installed"
    return None if jax.default_backend() == "gpu" else "JAX sees no GPU"


def _peers_module(framework: str, peers: Sequence[str], unavailable: Dict[str, str]):
    """bridge.bench_peers, or None (its peers marked unavailable) when it fails to import."""
    try:
        from . import bench_peers
    except Exception as e:  # triton broken, say: our kernels and the copy still run
        for name in peers:
            if IMPL_BY_NAME[name].framework == framework:
                unavailable.setdefault(name, f"bridge.bench_peers failed to import: {e}")
        return None
    return bench_peers


def _run_impl(case: Case, name: str, make: Callable, check: Callable, timer: Callable,
              unavailable: Dict[str, str]) -> Optional[Timing]:
    """Build, check and time one impl; a failure becomes a skipped row with the reason, never a crash."""
    if name in unavailable:
        return None
    started = time.perf_counter()
    try:
        fn = make()
        check(fn)
        us, note = timer(fn)
        return Timing(case, name, us, note, time.perf_counter() - started)
    except Skip as e:
        unavailable[name] = str(e)
        print(f"  {name}: skipped for every case: {e}", flush=True)
        return None
    except Exception as e:  # one impl's failure must not end the run
        why = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        print(f"  {name} at {case.shape} {case.dtype}{' +res' if case.residual else ''}: {why}", flush=True)
        return Timing(case, name, None, why, time.perf_counter() - started)


def _measure_torch(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str]) -> List[Timing]:
    import torch

    import bi_torch

    bench_peers = _peers_module("torch", peers, unavailable)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[case.dtype]
    g = torch.Generator(device="cuda").manual_seed(case.tokens * 7919 + case.hidden)
    shape = (case.tokens, case.hidden)
    xs = torch_sets(n_sets, shape, dtype, g)
    rs = torch_sets(n_sets, shape, dtype, g) if case.residual else [None] * n_sets
    weight = (1 + 0.1 * torch.randn(case.hidden, generator=g, device="cuda")).to(dtype)
    sets = list(zip(xs, rs))

    def ours(x, r):
        return bi_torch.rms_norm(x, weight, EPS, r)

    want = []  # our output on the first set, once our kernel has run

    def check(fn):
        result = fn(*sets[0])
        if fn is ours:
            want.append(result)
        elif want:
            check_close(case, result, want[0], lambda t: t.float().cpu().numpy())

    timings = [_run_impl(case, "bi-torch", lambda: ours, check, lambda fn: time_torch(fn, sets), unavailable)]
    for name in peers:
        if IMPL_BY_NAME[name].framework == "torch" and bench_peers is not None:
            make = bench_peers.TORCH_PEERS[name]
            timings.append(_run_impl(case, name, lambda: make(weight, EPS, case.residual), check,
                                     lambda fn: time_torch(fn, sets), unavailable))
    _note_unchecked(timings, want, "bi-torch")
    del xs, rs, sets, want
    # The ceiling: copies moving the op's bytes, half read and half written, over as many sets.
    words = (-(-case.bytes_moved // 8),)  # half the bytes, in 4-byte words
    copies = list(zip(torch_sets(n_sets, words, torch.int32, g), torch_sets(n_sets, words, torch.int32, g)))
    candidates = {"memcpy": lambda s, d: d.copy_(s)}
    if bench_peers is not None:
        candidates["triton copy"] = bench_peers.sm_copy
    timings.append(_run_impl(case, "copy", lambda: candidates, lambda fns: None,
                             lambda fns: time_copy(fns, copies), unavailable))
    return [t for t in timings if t is not None]


def torch_sets(n_sets: int, shape: Tuple[int, ...], dtype, g, device: str = "cuda") -> list:
    """n_sets random tensors, views of one allocation, each starting on a 256-byte boundary: Triton
    specializes kernels on pointer alignment, and a compile cannot happen inside a graph capture."""
    import torch

    numel = math.prod(shape)
    per_set = -(-numel * dtype.itemsize // 256) * 256 // dtype.itemsize
    pool = torch.empty((n_sets, per_set), dtype=dtype, device=device)
    if dtype.is_floating_point:
        pool.normal_(generator=g)
    else:
        pool.random_(generator=g)
    return [pool[i, :numel].view(shape) for i in range(n_sets)]


def time_copy(candidates: Dict[str, Callable], copies: Sequence[tuple]) -> Tuple[float, str]:
    """The fastest of the copy candidates (dst.copy_(src), a Triton copy), named in the note."""
    times = {how: time_torch(fn, copies)[0] for how, fn in candidates.items()}
    best = min(times, key=times.get)
    return times[best], f"{best} ({', '.join(f'{how} {us:.2f} µs' for how, us in times.items())})"


def _measure_jax(case: Case, n_sets: int, peers: Sequence[str], unavailable: Dict[str, str]) -> List[Timing]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bi_jax

    bench_peers = _peers_module("jax", peers, unavailable)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[case.dtype]
    normal = jax.jit(lambda key: jax.random.normal(key, (case.tokens, case.hidden), dtype))
    keys = jax.random.split(jax.random.key(case.tokens * 7919 + case.hidden), 2 * n_sets + 1)
    weight = (1 + 0.1 * jax.random.normal(keys[-1], (case.hidden,), jnp.float32)).astype(dtype)
    sets = [(normal(keys[2 * i]), normal(keys[2 * i + 1]) if case.residual else None) for i in range(n_sets)]

    def ours(x, r, w):
        return bi_jax.rms_norm(x, w, EPS, r)

    want = []  # our output on the first set, once our kernel has run

    def check(op):
        result = jax.jit(op)(*sets[0], weight)
        if op is ours:
            want.append(result)
        elif want:
            check_close(case, result, want[0], lambda a: np.asarray(a.astype(jnp.float32)))

    timings = [_run_impl(case, "bi-jax", lambda: ours, check, lambda op: time_jax(op, sets, weight, case),
                         unavailable)]
    for name in peers:
        if IMPL_BY_NAME[name].framework == "jax" and bench_peers is not None:
            make = bench_peers.JAX_PEERS[name]
            timings.append(_run_impl(case, name, lambda: make(EPS, case.residual), check,
                                     lambda op: time_jax(op, sets, weight, case), unavailable))
    _note_unchecked(timings, want, "bi-jax")
    return [t for t in timings if t is not None]


def _note_unchecked(timings: List[Optional[Timing]], want: list, ours: str) -> None:
    """Where our kernel failed, the peers' outputs had nothing to be checked against: say so."""
    for t in timings:
        if not want and t is not None and t.impl != ours and t.us is not None:
            t.note = "; ".join(filter(None, [t.note, f"unchecked: {ours} failed"]))
