"""`bi-norm bench` on CPU: argument parsing, the plan (passes, bytes, rotated sets), the timing
helpers that run without a GPU, the no-GPU exit and the package's import rules. The timing itself
needs a GPU and is never a test."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench_helpers import _plan
from bridge import bench
from bridge.cli import main


def test_default_plan() -> None:
    plan = _plan()
    assert len(plan.cases) == 18 * 2 * 2 * 2  # shapes x dtypes x (residual or not) x (forward, backward)
    shapes = {(c.tokens, c.hidden) for c in plan.cases}
    assert shapes == set(bench.DEFAULT_SHAPES) and {(65536, 128), (4096, 65536), (1, 8192)} <= shapes
    assert {c.dtype for c in plan.cases} == {"bfloat16", "float32"}
    assert {c.residual for c in plan.cases} == {False, True}
    forward = [c for c in plan.cases if c.phase == "forward"]
    backward = [c for c in plan.cases if c.phase != "forward"]
    assert [dataclasses.replace(c, phase="backward") for c in forward] == backward
    assert plan.peers == bench.PEER_NAMES and plan.out == Path("bench-out")


def test_quick_dtype_residual_peers_out(tmp_path: Path) -> None:
    plan = _plan("--quick", "--dtype", "bfloat16", "--residual-only", "--peers", "liger, xla", "--out", str(tmp_path))
    assert [(c.tokens, c.hidden) for c in plan.cases if c.phase == "forward"] == list(bench.QUICK_SHAPES)
    assert all(c.dtype == "bfloat16" and c.residual for c in plan.cases)
    assert plan.peers == ("liger", "xla") and plan.out == tmp_path
    assert all(not c.residual for c in _plan("--quick", "--no-residual").cases)


def test_shapes_parsing() -> None:
    assert bench.parse_shapes("1x4096, 65536X128") == [(1, 4096), (65536, 128)]
    plan = _plan("--shapes", "8x8192", "--dtype", "float32", "--no-residual", "--pass", "forward")
    assert plan.cases == [bench.Case(8, 8192, "float32", False)]


def test_pass_option() -> None:
    assert {c.phase for c in _plan("--quick", "--pass", "backward").cases} == {"backward"}
    plan = _plan("--shapes", "8x8192", "--dtype", "float32", "--no-residual", "--pass", "fwd+bwd", "--pass", "forward")
    assert [c.phase for c in plan.cases] == ["forward", "fwd+bwd"]  # in PASSES order, whatever the flags' order
    # Each pass times only the implementations that have it: no backward for vLLM's forward-only kernel.
    case = bench.Case(8, 8192, "float32", False, "backward")
    assert not bench.runs_in("vllm-bi", case) and bench.runs_in("tokamax", case) and bench.runs_in("copy", case)
    assert not bench.runs_in("bi-jax", dataclasses.replace(case, phase="fwd+bwd"))


@pytest.mark.parametrize("shapes", ["4096", "0x4096", "4096x", "ax4096", "1x2x3", "1x4096,", "-1x4096"])
def test_bad_shapes_exit_2(shapes: str, capsys) -> None:
    assert main(["bench", "--dry-run", f"--shapes={shapes}"]) == 2
    assert "--shapes" in capsys.readouterr().err


def test_bad_peers_exit_2(capsys) -> None:
    assert main(["bench", "--peers", "liger,no-such-peer", "--dry-run"]) == 2
    assert "unknown no-such-peer" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["bench", "--quick", "--shapes", "1x4096"],
    ["bench", "--no-residual", "--residual-only"],
    ["bench", "--dtype", "float64"],
    ["bench", "--pass", "sideways"],
])
def test_misuse_exits_2(argv: list) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_bytes_moved() -> None:
    # bf16: read x + weight, write out; with a residual, read and write two streams.
    assert bench.Case(4, 8, "bfloat16", False).bytes_moved == 2 * 4 * 8 * 2 + 8 * 2
    assert bench.Case(4, 8, "float32", True).bytes_moved == 4 * 4 * 8 * 4 + 8 * 4
    # backward: read z (x or the new residual), grad_out and the weight, write grad_x and grad_weight;
    # with a residual also read the new residual's gradient (grad_residual is grad_x: not counted twice).
    assert bench.Case(4, 8, "bfloat16", False, "backward").bytes_moved == 3 * 4 * 8 * 2 + 2 * 8 * 2
    assert bench.Case(4, 8, "float32", True, "backward").bytes_moved == 4 * 4 * 8 * 4 + 2 * 8 * 4
    both = bench.Case(4, 8, "bfloat16", True, "fwd+bwd")
    assert both.bytes_moved == sum(dataclasses.replace(both, phase=p).bytes_moved for p in ("forward", "backward"))


def test_rotation_sets_cover_twice_the_l2() -> None:
    l2 = 50 << 20
    small = bench.Case(256, 4096, "bfloat16", False)  # 4 MiB read and written per call
    n = bench.rotation_sets(small, l2)
    assert n * (small.bytes_moved - 4096 * 2) >= 2 * l2 and (n - 1) * (small.bytes_moved - 4096 * 2) < 2 * l2
    assert bench.rotation_sets(bench.Case(1, 4096, "bfloat16", False), l2) == bench.MAX_SETS
    assert bench.rotation_sets(bench.Case(65536, 8192, "float32", True), l2) == 1


def test_torch_sets_are_aligned_views() -> None:
    torch = pytest.importorskip("torch")
    sets = bench.torch_sets(3, (3, 5), torch.bfloat16, torch.Generator().manual_seed(0), device="cpu")
    base = sets[0].data_ptr()
    assert [t.shape for t in sets] == [(3, 5)] * 3 and all(t.is_contiguous() for t in sets)
    assert [t.data_ptr() - base for t in sets] == [0, 256, 512]  # 30 bytes each, 256-byte aligned
    assert all(t.untyped_storage().data_ptr() == sets[0].untyped_storage().data_ptr() for t in sets)
    assert not torch.equal(sets[0], sets[1])


def test_check_close_rejects_a_broken_peer() -> None:
    rng = np.random.default_rng(0)
    ours = rng.standard_normal((8, 64))
    case = bench.Case(8, 64, "bfloat16", True)
    bench.check_close(case, (ours * (1 + 1e-3), ours), (ours, ours), np.asarray)  # rounding-level: passes
    for broken in (ours[::-1], np.where(ours > 2, np.nan, ours)):
        with pytest.raises(ValueError, match="out differs from ours"):
            bench.check_close(case, (broken, ours), (ours, ours), np.asarray)
    with pytest.raises(ValueError, match="new residual differs"):
        bench.check_close(case, (ours, 2 * ours), (ours, ours), np.asarray)
    with pytest.raises(ValueError, match="returned 1 outputs, expected 2"):
        bench.check_close(case, ours, (ours, ours), np.asarray)


def test_bench_without_gpu_exits_2(tmp_path: Path, capsys) -> None:
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: `bi-norm bench` would measure")
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--dry-run" in err
    assert not (tmp_path / "bench.csv").exists()


def test_importing_bridge_bench_imports_no_framework() -> None:
    code = "import sys, bridge.bench, bridge.cli; print(sorted({'torch', 'jax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _bench_imports() -> dict:
    """{module: the bridge.bench modules it imports}, from the package's source by `ast`, any depth."""
    import ast

    package = Path(bench.__file__).parent
    names = {p.stem for p in package.glob("*.py")}
    graph = {}
    for path in package.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:  # from .plan import ...
                    found.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import peers
                    found.update(a.name for a in node.names)
                elif node.module and node.module.startswith("bridge.bench."):
                    found.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("bridge.bench."))
        graph[path.stem] = found & names
    return graph


def test_bench_package_imports_go_one_way() -> None:
    graph = _bench_imports()
    assert {"plan", "timing", "measuring", "peers", "backward", "backward_peers", "fp8", "fp8_peers", "report",
            "__init__"} <= set(graph)
    for name in ("plan", "timing", "measuring", "peers", "backward", "backward_peers", "fp8", "fp8_peers"):
        assert "report" not in graph[name], f"{name} imports the report"
    assert not graph["plan"] and graph["report"] <= {"plan"} and graph["peers"] <= {"plan", "timing"}
    assert graph["backward"] <= {"plan", "timing", "backward_peers"} and graph["backward_peers"] <= {"plan", "peers"}
    assert graph["fp8"] <= {"plan", "timing", "fp8_peers"} and graph["fp8_peers"] <= {"plan", "peers"}
    assert all("__init__" not in deps for deps in graph.values())

    def reaches(start: str) -> set:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    cycles = [name for name in graph if name in reaches(name)]
    assert not cycles, f"modules that import one that imports them back: {cycles}"
    assert not (set(Path(bench.__file__).parent.parent.glob("bench*.py"))), "bridge/bench*.py left beside the package"


def test_array_copies() -> None:
    """The HLO lines the bench's loop, the probes and the GPU copy tests count as XLA's extra bytes:
    a copy of an array, of a tuple or an asynchronous one's start; not a scalar's, nor other ops."""
    copies = ["%copy.3 = bf16[256,4096]{1,0} copy(bf16[256,4096]{1,0} %p.1)",
              "%copy.4 = f32[4096]{0} copy(f32[4096]{0} %w)",
              "%copy.5 = (bf16[8,128]{1,0}, f32[8]{0}) copy((bf16[8,128]{1,0}, f32[8]{0}) %t)",
              "%copy-start = (f32[64,64]{1,0}, f32[64,64]{1,0}, u32[]) copy-start(f32[64,64]{1,0} %a)"]
    others = ["%copy.6 = f32[] copy(f32[] %s)",
              "%copy-done = f32[64,64]{1,0} copy-done((f32[64,64]{1,0}, f32[64,64]{1,0}, u32[]) %copy-start)",
              "%add.1 = f32[64]{0} add(f32[64]{0} %copy.4, f32[64]{0} %b)",
              "%fusion = bf16[256,4096]{1,0} fusion(bf16[256,4096]{1,0} %copy.3), kind=kLoop, calls=%copy_fusion"]
    text = "\n".join("  " + line for line in others[:2] + copies + others[2:])
    assert bench.timing.array_copies(text) == copies
