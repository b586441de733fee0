"""`bi-norm bench`'s plan: the shapes, dtypes and implementations, the bytes a case moves, the
input sets rotated per case, and the knobs the timing uses. No framework is imported here.

The package's imports go one way: plan <- timing <- measuring, plan <- peers (imported by measuring
on a GPU run only), plan <- report; the package's __init__ (run) uses all but peers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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


class Skip(Exception):
    """A peer that cannot run here (not installed, no GPU for JAX): skipped for every case."""


def rotation_sets(case: Case, l2_bytes: int) -> int:
    """Input sets to rotate among so that one pass over them touches at least twice the L2."""
    footprint = case.bytes_moved - case.hidden * ITEMSIZE[case.dtype]  # the weight stays cached anyway
    per_role = case.tokens * case.hidden * ITEMSIZE[case.dtype]
    return max(1, min(math.ceil(2 * l2_bytes / footprint), MAX_SETS, POOL_BYTES // per_role))


def synthetic_timings(plan: Plan) -> List[Timing]:
    """A made-up result (--dry-run) for the plan's first and last shapes: latency + bytes / a fixed bandwidth."""
    gbps = {"copy": 3000, "bi-torch": 2850, "bi-jax": 2800, "torch-eager": 2000, "hf-compiled": 2600,
            "liger": 2500, "vllm-bi": 1800, "xla": 2400, "pallas-example": 2200}
    ends = {plan.cases[0].shape, plan.cases[-1].shape}
    names = ["bi-torch", "bi-jax", *plan.peers, "copy"]
    return [Timing(case, name, 2.0 + case.bytes_moved / gbps[name] / 1e3, "synthetic")
            for case in plan.cases if case.shape in ends for name in names]
