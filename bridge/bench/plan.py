"""`bi-norm bench`'s plan: the shapes, dtypes, passes (forward, backward, fwd+bwd, and the FP8
output's fp8-static and fp8-group) and implementations, the bytes a case moves, the input sets
rotated per case, and the knobs the timing uses. No framework is imported here.

The package's imports go one way (bridge/bench/__init__.py lists them); plan imports none of them.
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
# What is timed: the forward; the backward alone (from what the forward saved); both, in one call
# (torch only: bi_jax's jitted loop would have to carry the forward's outputs to keep XLA from dropping them).
# The FP8 output (contract v1.2, float8_e4m3fn): a static scale, or per-token-group scales; opt-in.
FP8_PASSES = ("fp8-static", "fp8-group")
PASSES = ("forward", "backward", "fwd+bwd", *FP8_PASSES)
DEFAULT_PASSES = ("forward", "backward")
FP8_FORMAT = "float8_e4m3fn"
FP8_SCALE = 0.0175  # the static pass's scale: |u| up to 448 * 0.0175 = 7.84 is not saturated
FP8_GROUP_SIZE = 128
FP8_ULPS = 1  # a peer's FP8 codes may differ from the reference's by this many steps (it rounds differently)
_TORCH = ("forward", "backward", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "ours", "peer" or "copy"
    framework: str  # "torch" or "jax"
    fused_residual: bool  # False: the residual variant adds in a separate kernel ("add+norm")
    passes: Tuple[str, ...] = ("forward",)  # the passes it is timed in


# BENCHMARKS.md says what each one is and how it is configured.
IMPLS: Tuple[Impl, ...] = (
    Impl("bi-torch", "ours", "torch", True, PASSES),
    Impl("bi-jax", "ours", "jax", True, ("forward", "backward", *FP8_PASSES)),
    Impl("torch-eager", "peer", "torch", False, _TORCH),
    Impl("hf-eager", "peer", "torch", False, ("backward", "fwd+bwd", *FP8_PASSES)),
    Impl("hf-compiled", "peer", "torch", True, PASSES),
    Impl("liger", "peer", "torch", True, _TORCH),
    Impl("vllm-bi", "peer", "torch", False),
    # After the other torch FP8 peers: with a residual it updates the input sets' residuals in place.
    Impl("vllm-fp8", "peer", "torch", True, FP8_PASSES),
    Impl("xla", "peer", "jax", True, ("forward", "backward", *FP8_PASSES)),
    Impl("pallas-example", "peer", "jax", False),
    Impl("tokamax", "peer", "jax", False, ("backward",)),
    Impl("copy", "copy", "torch", True, PASSES),
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
CHECK_ELEMENTS = 1 << 18  # the backward's and FP8 checks' rows: about this many elements (the reference is numpy)
DETERMINISM_SHAPES = ((16384, 4096), (65536, 4096))  # backward cases whose grad_weight is checked run to run
DETERMINISM_RUNS = 20
LIGER_SITE = Path("/tmp/site")  # where scripts/gpu_suite.sh installs the carried wheels


@dataclasses.dataclass(frozen=True)
class Case:
    tokens: int
    hidden: int
    dtype: str
    residual: bool
    phase: str = "forward"  # one of PASSES

    @property
    def bytes_moved(self) -> int:
        """The fewest bytes any implementation must move (residual and gradients in x's dtype).

        forward: read x (+ residual) and the weight, write out (+ the new residual).
        backward: read what the forward normalised (x, or the new residual), grad_out (+ the new
        residual's gradient) and the weight, write grad_x and grad_weight. With a residual in x's
        dtype grad_residual has grad_x's bits, one tensor that two names can share (bi-torch,
        autograd and Liger return it twice), so it is not counted again; nor is anything an
        implementation saves or recomputes (Liger's rstd, partial sums of grad_weight).
        fwd+bwd: the two together.
        fp8-static, fp8-group: read x (+ residual) and the weight, write 1 byte per output element
        (+ the new residual), and fp8-group the scales (4 bytes per group of FP8_GROUP_SIZE).
        """
        tensor = self.tokens * self.hidden * ITEMSIZE[self.dtype]
        weight = self.hidden * ITEMSIZE[self.dtype]
        streams = 2 if self.residual else 1
        if self.phase in FP8_PASSES:
            elements = self.tokens * self.hidden
            scales = 4 * (elements // FP8_GROUP_SIZE) if self.phase == "fp8-group" else 0
            return streams * tensor + weight + elements + (tensor if self.residual else 0) + scales
        forward = 2 * streams * tensor + weight
        backward = (1 + streams) * tensor + tensor + 2 * weight
        return {"forward": forward, "backward": backward, "fwd+bwd": forward + backward}[self.phase]

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
class Determinism:
    """grad_weight of DETERMINISM_RUNS backward calls on the same inputs: how many bit patterns."""
    case: Case
    impl: str
    runs: int
    distinct: Optional[int]  # None: not run, see note
    note: str = ""


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
    phases = [p for p in PASSES if p in (args.passes or DEFAULT_PASSES)]
    ragged = [f"{t}x{h}" for t, h in shapes if h % FP8_GROUP_SIZE]
    if "fp8-group" in phases and ragged:
        raise UsageError(f"--pass fp8-group: groups of {FP8_GROUP_SIZE} must divide the hidden size; "
                         f"not in {', '.join(ragged)}")
    cases = [Case(t, h, d, r, p) for t, h in shapes for d in dtypes for r in residuals for p in phases]
    return Plan(cases, parse_peers(args.peers), args.out)


def runs_in(name: str, case: Case) -> bool:
    """Whether implementation `name` is timed at this case's pass."""
    return case.phase in IMPL_BY_NAME[name].passes


def check_rows(case: Case) -> int:
    """The rows the backward's and the FP8 checks compare with the reference: about CHECK_ELEMENTS elements."""
    return max(1, min(case.tokens, CHECK_ELEMENTS // case.hidden))


def checks_determinism(case: Case) -> bool:
    return case.phase == "backward" and (case.tokens, case.hidden) in DETERMINISM_SHAPES


class Skip(Exception):
    """A peer that cannot run here (not installed, no GPU for JAX): skipped for every case."""


def rotation_sets(case: Case, l2_bytes: int) -> int:
    """Input sets to rotate among so that one pass over them touches at least twice the L2."""
    footprint = case.bytes_moved - case.hidden * ITEMSIZE[case.dtype]  # the weight stays cached anyway
    per_role = case.tokens * case.hidden * ITEMSIZE[case.dtype]
    return max(1, min(math.ceil(2 * l2_bytes / footprint), MAX_SETS, POOL_BYTES // per_role))


# --dry-run's made-up bandwidths, GB/s per implementation: (forward, backward and fwd+bwd, FP8); None
# where the implementation is not timed, or (vllm-fp8) skipped as on the GPU image.
_SYNTHETIC_GBPS = {"copy": (3000, 3000, 3000), "bi-torch": (2850, 2600, 2800), "bi-jax": (2800, 2500, 2700),
                   "torch-eager": (2000, 900, None), "hf-eager": (None, 200, 500),
                   "hf-compiled": (2600, 1800, 2300), "liger": (2500, 1300, None), "vllm-bi": (1800, None, None),
                   "vllm-fp8": (None, None, None), "xla": (2400, 1700, 2200), "pallas-example": (2200, None, None),
                   "tokamax": (None, 1500, None)}
VLLM_MISSING = "vLLM is not installed (nor in the GPU image): its fused RMSNorm + FP8 kernels cannot run"


def _names(plan: Plan, case: Case) -> List[str]:
    return [name for name in ("bi-torch", "bi-jax", *plan.peers, "copy") if runs_in(name, case)]


def _synthetic(case: Case, name: str) -> Timing:
    gbps = _SYNTHETIC_GBPS[name][2 if case.phase in FP8_PASSES else int(case.phase != "forward")]
    if gbps is None:
        return Timing(case, name, None, f"synthetic: {VLLM_MISSING}")
    return Timing(case, name, 2.0 + case.bytes_moved / gbps / 1e3, "synthetic")


def synthetic_timings(plan: Plan) -> List[Timing]:
    """A made-up result (--dry-run) for the plan's first and last shapes: latency + bytes / a fixed bandwidth."""
    ends = {plan.cases[0].shape, plan.cases[-1].shape}
    return [_synthetic(case, name) for case in plan.cases if case.shape in ends for name in _names(plan, case)]


def synthetic_determinism(plan: Plan) -> List[Determinism]:
    """A made-up determinism result (--dry-run): one bit pattern for every implementation."""
    return [Determinism(case, name, DETERMINISM_RUNS, 1, "synthetic")
            for case in plan.cases if checks_determinism(case) for name in _names(plan, case) if name != "copy"]
