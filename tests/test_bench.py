"""`bi-norm bench` on CPU: argument parsing, the report writer on a synthetic result, the no-GPU
exit, and the backward's checks and glue (the cheap implementations on small CPU inputs). The
timing itself needs a GPU and is never a test."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bridge import bench
from bridge.cli import _parser, main


def _plan(*argv: str) -> bench.Plan:
    return bench.make_plan(_parser().parse_args(["bench", *argv]))


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


def test_report_csv(tmp_path: Path) -> None:
    bench.write_report(_synthetic(), tmp_path, "test device")
    with (tmp_path / "bench.csv").open() as f:
        rows = {r["impl"]: r for r in csv.DictReader(f)}
    assert list(rows["bi-torch"]) == list(bench.CSV_COLUMNS)
    nbytes = 4 * 4096 * 8192 * 2 + 8192 * 2
    ours = rows["bi-torch"]
    assert (ours["tokens"], ours["hidden"], ours["dtype"], ours["residual"]) == ("4096", "8192", "bfloat16", "1")
    assert {r["pass"] for r in rows.values()} == {"forward"}
    assert ours["kind"] == "ours" and ours["residual_add"] == "fused" and ours["bytes"] == str(nbytes)
    assert float(ours["us"]) == 10.5
    assert float(ours["gbps"]) == pytest.approx(nbytes / 10.5e-6 / 1e9, abs=0.06)
    assert float(ours["frac_copy"]) == pytest.approx(10 / 10.5, abs=1e-4)
    assert float(ours["ratio_fastest_peer"]) == pytest.approx(10.5 / 12, abs=1e-4)
    assert float(rows["bi-jax"]["ratio_fastest_peer"]) == pytest.approx(12.5 / 12, abs=1e-4)
    assert float(ours["ratio_framework_peer"]) == pytest.approx(10.5 / 12, abs=1e-4)
    assert float(rows["bi-jax"]["ratio_framework_peer"]) == pytest.approx(12.5 / 13, abs=1e-4)
    assert rows["torch-eager"]["residual_add"] == "separate" and rows["liger"]["ratio_fastest_peer"] == "1.0000"
    assert rows["copy"]["kind"] == "copy" and rows["copy"]["frac_copy"] == "1.0000"
    failed = rows["vllm-bi"]
    assert failed["us"] == failed["gbps"] == failed["ratio_fastest_peer"] == ""
    assert failed["note"] == "error: RuntimeError: boom"


def test_report_table(tmp_path: Path) -> None:
    table = bench.write_report(_synthetic(), tmp_path, "test device")
    assert (tmp_path / "bench-table.txt").read_text() == table
    assert table.startswith("# test device\n")
    [line] = [ln for ln in table.splitlines() if ln.lstrip().startswith("4096x8192")]
    assert "bfloat16" in line and " yes " in line
    assert "95.2%" in line and "80.0%" in line  # % of copy: 10/10.5 and 10/12.5
    assert "liger" in line and "0.88" in line and "1.04" in line  # ratios 10.5/12 and 12.5/12
    assert line.rstrip().endswith("0.88    0.96")  # same framework: 10.5/12 (liger), 12.5/13 (xla)
    assert "targets bi-torch: copy >= 95% at >= 512 MB 0/0; copy >= 90% at >= 64 MB 1/1; ratio <= 1.00 1/1" in table
    assert "targets bi-jax:" in table and "ratio <= 1.00 0/1" in table


def test_table_labels_unfused_residual_peers(tmp_path: Path) -> None:
    case = bench.Case(1, 4096, "float32", True)
    timings = [bench.Timing(case, "bi-torch", 3.0), bench.Timing(case, "torch-eager", 2.5),
               bench.Timing(case, "copy", 2.0)]
    table = bench.write_report(timings, tmp_path, "test device")
    assert "torch-eager (add+norm)" in table and "1.20" in table and "bi-jax" in table


def test_png_written_when_matplotlib_imports(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    bench.write_report(_synthetic(), tmp_path, "test device")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_writes_the_report(tmp_path: Path, capsys) -> None:
    assert main(["bench", "--dry-run", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "bench-table.txt").read_text()
    assert out.endswith(table) and "synthetic" in table  # the table comes last
    assert table.index("## forward") < table.index("targets bi-jax:") < table.index("## backward") \
        < table.index("targets bi-jax backward:") < table.index("grad_weight run to run")
    with (tmp_path / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["pass"], r["impl"]) for r in rows} == \
        {(p, impl.name) for impl in bench.IMPLS for p in impl.passes if p in bench.DEFAULT_PASSES}
    assert all(float(r["us"]) > 0 and float(r["gbps"]) > 0 for r in rows)
    # The quick plan's one determinism shape, each dtype and residual variant, every backward implementation.
    counted = bench.read_determinism_csv(tmp_path / bench.DETERMINISM_CSV)
    assert {(d.case.shape, d.case.dtype, d.case.residual) for d in counted} == \
        {("65536x4096", d, r) for d in bench.DTYPES for r in (False, True)}
    assert {d.impl for d in counted} == {i.name for i in bench.IMPLS if "backward" in i.passes and i.kind != "copy"}


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


def test_report_renders_again_from_its_csv(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["bench", "--dry-run", "--quick", "--out", str(first)]) == 0
    assert main(["bench", "--from-csv", str(first / "bench.csv"), "--out", str(second)]) == 0

    def measured(path: Path) -> list:  # derived columns are recomputed from the rounded times
        with path.open() as f:
            return [(r["tokens"], r["hidden"], r["dtype"], r["residual"], r["pass"], r["impl"], r["us"], r["note"])
                    for r in csv.DictReader(f)]

    assert measured(second / "bench.csv") == measured(first / "bench.csv") != []
    # The determinism counts beside the CSV come along.
    assert (second / bench.DETERMINISM_CSV).read_text() == (first / bench.DETERMINISM_CSV).read_text() != ""
    table = (second / "bench-table.txt").read_text().splitlines()
    assert table[0] == "# re-rendered from bench.csv"
    assert [line.split("|")[0] for line in table[1:]] == \
        [line.split("|")[0] for line in (first / "bench-table.txt").read_text().splitlines()[1:]]


def test_small_token_target_compares_within_a_framework(tmp_path: Path) -> None:
    case = bench.Case(8, 4096, "bfloat16", False)
    timings = [bench.Timing(case, "bi-torch", 3.0), bench.Timing(case, "liger", 2.9),
               bench.Timing(case, "bi-jax", 2.0), bench.Timing(case, "xla", 1.5), bench.Timing(case, "copy", 1.0)]
    table = bench.write_report(timings, tmp_path, "test device")
    # bi-torch: 3.0 / 2.9 (liger) meets it although xla is faster; bi-jax: 2.0 / 1.5 (xla) does not.
    assert "targets bi-torch:" in table and "same-framework ratio <= 1.10 at <= 64 tokens 1/1" in table
    assert "ratio <= 1.00 0/1; same-framework ratio <= 1.10 at <= 64 tokens 0/1" in table.split("targets bi-jax:")[1]


def test_copy_plot_written_through_the_dry_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert main(["bench", "--dry-run", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "bench-copy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert {"plan", "timing", "measuring", "peers", "backward", "backward_peers", "report", "__init__"} <= set(graph)
    for name in ("plan", "timing", "measuring", "peers", "backward", "backward_peers"):
        assert "report" not in graph[name], f"{name} imports the report"
    assert not graph["plan"] and graph["report"] <= {"plan"} and graph["peers"] <= {"plan", "timing"}
    assert graph["backward"] <= {"plan", "timing", "backward_peers"} and graph["backward_peers"] <= {"plan", "peers"}
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


def _synthetic_backward() -> list:
    """Two backward cases timed by hand. 16384x4096 bf16 (403 MB): copy 100 µs, bi-torch 110 (90.9 %), bi-jax 125
    (80 %), fastest peer xla 115, tokamax skipped. 1024x4096 (25 MB): bi-torch ties liger at 20 µs."""
    big, small = (bench.Case(t, 4096, "bfloat16", False, "backward") for t in (16384, 1024))
    return [bench.Timing(big, "bi-torch", 110.0), bench.Timing(big, "bi-jax", 125.0), bench.Timing(big, "liger", 120.0),
            bench.Timing(big, "xla", 115.0), bench.Timing(big, "tokamax", None, "tokamax not installed"),
            bench.Timing(big, "copy", 100.0),
            bench.Timing(small, "bi-torch", 20.0), bench.Timing(small, "liger", 20.0),
            bench.Timing(small, "copy", 15.0)]


def test_backward_report(tmp_path: Path) -> None:
    table = bench.write_report(_synthetic() + _synthetic_backward(), tmp_path, "test device")
    with (tmp_path / "bench.csv").open() as f:
        rows = {(r["pass"], r["tokens"], r["impl"]): r for r in csv.DictReader(f)}
    ours = rows["backward", "16384", "bi-torch"]
    assert ours["bytes"] == str(3 * 16384 * 4096 * 2 + 2 * 4096 * 2) and ours["residual_add"] == ""
    assert float(ours["frac_copy"]) == pytest.approx(100 / 110, abs=1e-4)
    assert float(ours["ratio_fastest_peer"]) == pytest.approx(110 / 115, abs=1e-4)  # xla: the fastest peer
    assert rows["backward", "16384", "tokamax"]["note"] == "tokamax not installed"
    assert rows["forward", "4096", "bi-torch"]["us"] == "10.500"  # the forward's rows beside them
    forward, backward = table.split("## backward")
    assert "16384x4096" not in forward and "4096x8192" not in backward
    [line] = [ln for ln in backward.splitlines() if ln.lstrip().startswith("16384x4096")]
    assert "90.9%" in line and "80.0%" in line and "xla" in line and "0.96    1.09" in line
    # >= 256 MB: the big case only; >= 1024 tokens: both, and a tie with the fastest peer is not faster.
    assert "targets bi-torch backward: copy >= 85% at >= 256 MB 1/1; ratio < 1.00 at >= 1024 tokens 1/2" in backward
    assert "targets bi-jax backward: copy >= 85% at >= 256 MB 0/1; ratio < 1.00 at >= 1024 tokens 0/1" in backward
    assert "targets bi-torch: copy >= 95%" in forward


def test_determinism_report(tmp_path: Path) -> None:
    case = bench.Case(16384, 4096, "bfloat16", True, "backward")
    counted = [bench.Determinism(case, "bi-torch", 20, 1), bench.Determinism(case, "liger", 20, 3),
               bench.Determinism(case, "xla", 20, None, "error: RuntimeError: boom")]
    table = bench.write_report(_synthetic_backward(), tmp_path, "test device", counted)
    assert table.rstrip().splitlines()[-2:] == [
        "## backward, grad_weight run to run: distinct bit patterns in 20 calls on the same inputs (1 = deterministic)",
        " 16384x4096 bfloat16 yes | bi-torch 1, liger 3, xla -"]
    with (tmp_path / bench.DETERMINISM_CSV).open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["impl"], r["runs"], r["distinct_grad_weight"]) for r in rows] == \
        [("bi-torch", "20", "1"), ("liger", "20", "3"), ("xla", "20", "")]
    assert rows[2]["note"] == "error: RuntimeError: boom" and rows[0]["residual"] == "1"
    assert bench.read_determinism_csv(tmp_path / bench.DETERMINISM_CSV) == counted
    bench.write_report(_synthetic_backward(), tmp_path / "none", "test device")
    assert not (tmp_path / "none" / bench.DETERMINISM_CSV).exists()


def test_a_csv_from_before_the_backward_reads_as_forward(tmp_path: Path) -> None:
    path = tmp_path / "bench.csv"
    path.write_text("tokens,hidden,dtype,residual,impl,us,note,wall_s\n8,4096,float32,1,liger,2.5,,0.3\n")
    assert bench.read_csv(path) == [bench.Timing(bench.Case(8, 4096, "float32", True), "liger", 2.5, "", 0.3)]


def test_determinism_counts_distinct_bit_patterns() -> None:
    case = bench.Case(16384, 4096, "bfloat16", False, "backward")
    assert bench.checks_determinism(case) and not bench.checks_determinism(dataclasses.replace(case, phase="forward"))
    assert not bench.checks_determinism(bench.Case(4096, 4096, "bfloat16", False, "backward"))
    results = iter([b"a", b"b", b"a"] + [b"c"] * (bench.DETERMINISM_RUNS - 3))
    counted = bench.count_patterns(case, "liger", lambda: next(results))
    assert (counted.runs, counted.distinct, counted.note) == (bench.DETERMINISM_RUNS, 3, "")
    assert next(results, None) is None  # every run was made

    def broken() -> bytes:
        raise RuntimeError("boom")

    assert bench.count_patterns(case, "xla", broken).note == "error: RuntimeError: boom"


def test_backward_check_rows_and_tolerance() -> None:
    assert [bench.check_rows(bench.Case(t, h, "bfloat16", False, "backward"))
            for t, h in ((65536, 4096), (1, 4096), (65536, 128), (4096, 65536))] == [64, 1, 2048, 4]
    rng = np.random.default_rng(1)
    case = bench.Case(8, 64, "float32", True, "backward")
    grad_x, grad_weight = rng.standard_normal((8, 64)), rng.standard_normal(64)
    want = (grad_x[:3], grad_x[:3], grad_weight)
    past = grad_x.copy()
    past[3:] = np.nan  # rows past the check's are not compared
    bench.check_grads(case, (past * (1 + 1e-6), None, grad_weight), want, 3, np.asarray)  # None: grad_x's tensor
    for got, name in (((grad_x[::-1], None, grad_weight), "grad_x"),
                      ((grad_x, 2 * grad_x, grad_weight), "grad_residual"),
                      ((grad_x, None, grad_weight * 1.01), "grad_weight")):
        with pytest.raises(ValueError, match=f"{name} differs from the reference"):
            bench.check_grads(case, got, want, 3, np.asarray)
    bench.check_grads(dataclasses.replace(case, residual=False), (grad_x, None, grad_weight),
                      (grad_x[:3], grad_weight), 3, np.asarray)


def test_backward_loop_op_feeds_the_gradients_back() -> None:
    # time_jax's set: (z, g[, gr], grad_weight); the next call's g is this call's grad_x.
    op = bench.loop_op(lambda z, g, gr, w: (g + 1, None if gr is None else gr + 10, w * 2), residual=True)
    assert op("z", 1, 5, "old dw", 3) == ("z", 2, 15, 6)
    op = bench.loop_op(lambda z, g, gr, w: (g + 1, None, w * 2), residual=True)
    assert op("z", 1, 5, "old dw", 3) == ("z", 2, 5, 6)  # grad_x is the residual's gradient too: gr kept
    op = bench.loop_op(lambda z, g, gr, w: (g + 1, gr, w * 2), residual=False)
    assert op("z", 1, "old dw", 3) == ("z", 2, 6)


def test_backward_implementations_match_the_plan() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    from bridge.bench import backward_peers

    def timed(phase: str, framework: str) -> set:
        return {i.name for i in bench.IMPLS if phase in i.passes and i.kind != "copy" and i.framework == framework}

    assert set(backward_peers.TORCH_BACKWARD) == timed("backward", "torch")
    assert set(backward_peers.JAX_BACKWARD) == timed("backward", "jax")
    assert set(backward_peers.TORCH_FWD_BWD) == timed("fwd+bwd", "torch") and not timed("fwd+bwd", "jax")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("residual", [False, True])
def test_eager_torch_backwards_match_the_reference(dtype: str, residual: bool) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from bi_torch import to_numpy
    from bridge import reference
    from bridge.bench import backward_peers

    case = bench.Case(16, 64, dtype, residual, "backward")
    g = torch.Generator().manual_seed(0)
    xs, rs, gs, grs = (bench.torch_sets(2, (16, 64), getattr(torch, dtype), g, device="cpu") for _ in range(4))
    if not residual:
        rs = grs = [None, None]
    weight = (1 + 0.1 * torch.randn(64, generator=g)).to(getattr(torch, dtype))
    extra = (to_numpy(rs[1]), to_numpy(grs[1])) if residual else ()
    want = reference.rms_norm_backward(to_numpy(xs[1]), to_numpy(weight), to_numpy(gs[1]), bench.EPS, *extra)
    for factories in (backward_peers.TORCH_BACKWARD, backward_peers.TORCH_FWD_BWD):
        for name in ("torch-eager", "hf-eager"):
            made = factories[name](weight, bench.EPS, residual, xs, rs)
            for _ in range(2):  # a retained graph differentiates again
                bench.check_grads(case, made.fn(1, gs[1], grs[1]), want, 16, lambda t: t.float().numpy())


@pytest.mark.parametrize("residual", [False, True])
def test_xla_backward_matches_the_reference_and_loops(residual: bool, monkeypatch) -> None:
    jax = pytest.importorskip("jax")
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    import jax.numpy as jnp

    from bridge import reference
    from bridge.bench import backward_peers, timing

    case = bench.Case(8, 128, "float32", residual, "backward")
    z, g, gr = (jax.random.normal(k, (8, 128), jnp.float32) for k in jax.random.split(jax.random.key(0), 3))
    gr = gr if residual else None
    weight = 1 + 0.1 * jax.random.normal(jax.random.key(1), (128,), jnp.float32)
    host = [None if a is None else np.asarray(a) for a in (z, g, gr, weight)]
    x, r = (np.zeros_like(host[0]), host[0]) if residual else (host[0], None)  # z = 0 + the residual
    want = reference.rms_norm_backward(x, host[3], host[1], bench.EPS, r, host[2])
    grads = backward_peers.xla_backward(bench.EPS, residual)
    bench.check_grads(case, jax.jit(grads)(z, g, gr, weight), want, 8, np.asarray)
    # time_jax compiles the loop over backward sets (on XLA:CPU it may then fall back to unrolled calls,
    # for copies it keeps): a short loop, to check the sets' structure, not a time.
    monkeypatch.setattr(timing, "JAX_CALL_S", 1e-4)
    sets = [(z + i, g, *([gr] if residual else []), jnp.zeros((128,), jnp.float32)) for i in range(2)]
    us, _ = bench.time_jax(bench.loop_op(grads, residual), sets, weight, case)
    assert us > 0
