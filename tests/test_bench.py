"""`bi-norm bench` on CPU: argument parsing, the report writer on a synthetic result, and the
no-GPU exit. The timing itself needs a GPU and is never a test."""

from __future__ import annotations

import csv
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
    assert len(plan.cases) == 18 * 2 * 2  # shapes x dtypes x (residual or not)
    shapes = {(c.tokens, c.hidden) for c in plan.cases}
    assert shapes == set(bench.DEFAULT_SHAPES) and {(65536, 128), (4096, 65536), (1, 8192)} <= shapes
    assert {c.dtype for c in plan.cases} == {"bfloat16", "float32"}
    assert {c.residual for c in plan.cases} == {False, True}
    assert plan.peers == bench.PEER_NAMES and plan.out == Path("bench-out")


def test_quick_dtype_residual_peers_out(tmp_path: Path) -> None:
    plan = _plan("--quick", "--dtype", "bfloat16", "--residual-only", "--peers", "liger, xla", "--out", str(tmp_path))
    assert [(c.tokens, c.hidden) for c in plan.cases] == list(bench.QUICK_SHAPES)
    assert all(c.dtype == "bfloat16" and c.residual for c in plan.cases)
    assert plan.peers == ("liger", "xla") and plan.out == tmp_path
    assert all(not c.residual for c in _plan("--quick", "--no-residual").cases)


def test_shapes_parsing() -> None:
    assert bench.parse_shapes("1x4096, 65536X128") == [(1, 4096), (65536, 128)]
    plan = _plan("--shapes", "8x8192", "--dtype", "float32", "--no-residual")
    assert plan.cases == [bench.Case(8, 8192, "float32", False)]


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
])
def test_misuse_exits_2(argv: list) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_bytes_moved() -> None:
    # bf16: read x + weight, write out; with a residual, read and write two streams.
    assert bench.Case(4, 8, "bfloat16", False).bytes_moved == 2 * 4 * 8 * 2 + 8 * 2
    assert bench.Case(4, 8, "float32", True).bytes_moved == 4 * 4 * 8 * 4 + 8 * 4


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
    assert out.rstrip().splitlines()[-1].startswith("targets bi-jax:")  # the table comes last
    assert "synthetic" in (tmp_path / "bench-table.txt").read_text()
    with (tmp_path / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["impl"] for r in rows} == {impl.name for impl in bench.IMPLS}
    assert all(float(r["us"]) > 0 and float(r["gbps"]) > 0 for r in rows)


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
            return [(r["tokens"], r["hidden"], r["dtype"], r["residual"], r["impl"], r["us"], r["note"])
                    for r in csv.DictReader(f)]

    assert measured(second / "bench.csv") == measured(first / "bench.csv") != []
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
    assert {"plan", "timing", "measuring", "peers", "report", "__init__"} <= set(graph)
    for name in ("plan", "timing", "measuring", "peers"):
        assert "report" not in graph[name], f"{name} imports the report"
    assert not graph["plan"] and graph["report"] <= {"plan"} and graph["peers"] <= {"plan", "timing"}
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
