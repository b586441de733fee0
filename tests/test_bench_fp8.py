"""`bi-norm bench` on CPU, the FP8 passes (fp8-static, fp8-group): the plan, the bytes, the checks
against the reference, the report and --dry-run. The implementations on small CPU inputs are in
test_bench_fp8_impls.py; the timing itself needs a GPU and is never a test."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bench_helpers import _plan
from bridge import bench
from bridge.cli import main

FP8_NP = np.dtype(ml_dtypes.float8_e4m3fn)


def _codes(*values: int) -> np.ndarray:
    return np.array(values, np.uint8).view(FP8_NP)


def test_fp8_passes_are_opt_in() -> None:
    assert not {c.phase for c in _plan().cases} & set(bench.FP8_PASSES)
    plan = _plan("--quick", "--pass", "fp8-group", "--pass", "fp8-static")
    assert [c.phase for c in plan.cases[:2]] == ["fp8-static", "fp8-group"]  # PASSES order, not the flags'
    assert {c.phase for c in plan.cases} == set(bench.FP8_PASSES) and len(plan.cases) == 4 * 2 * 2 * 2
    for phase in bench.PASSES:  # the command line offers every pass of the plan
        assert {c.phase for c in _plan("--quick", "--pass", phase).cases} == {phase}


def test_fp8_group_needs_hidden_divisible_by_128(capsys) -> None:
    assert main(["bench", "--dry-run", "--shapes", "8x4096,8x100", "--pass", "fp8-group"]) == 2
    err = capsys.readouterr().err
    assert "--pass fp8-group" in err and "8x100" in err and "8x4096" not in err
    assert len(_plan("--shapes", "8x100", "--pass", "fp8-static").cases) == 4  # a static scale fits any width


def test_fp8_implementations() -> None:
    def timed(phase: str) -> set:
        return {i.name for i in bench.IMPLS if phase in i.passes}

    expected = {"bi-torch", "bi-jax", "hf-eager", "hf-compiled", "vllm-fp8", "xla", "copy"}
    assert timed("fp8-static") == timed("fp8-group") == expected
    assert "vllm-fp8" in bench.PEER_NAMES and not bench.runs_in("vllm-fp8", bench.Case(8, 4096, "bfloat16", False))
    # vllm-fp8 updates residuals in place: the other torch FP8 peers come before it.
    torch_peers = [n for n in bench.PEER_NAMES if bench.IMPL_BY_NAME[n].framework == "torch"
                   and "fp8-static" in bench.IMPL_BY_NAME[n].passes]
    assert torch_peers[-1] == "vllm-fp8"


def test_fp8_bytes_moved() -> None:
    # Read x (and the residual) and the weight; write 1 byte per element (and the new residual).
    assert bench.Case(4, 256, "bfloat16", False, "fp8-static").bytes_moved == 4 * 256 * 2 + 256 * 2 + 4 * 256
    assert bench.Case(4, 256, "float32", True, "fp8-static").bytes_moved == 2 * 4 * 256 * 4 + 256 * 4 + 4 * 256 \
        + 4 * 256 * 4
    # fp8-group also writes the scales: 4 bytes per token and group of 128.
    assert bench.Case(4, 256, "bfloat16", True, "fp8-group").bytes_moved == \
        bench.Case(4, 256, "bfloat16", True, "fp8-static").bytes_moved + 4 * 4 * 2


def test_fp8_steps() -> None:
    got = _codes(0x00, 0x80, 0x01, 0x81, 0x38, 0x7F, 0xFF, 0x7F, 0x7E)
    want = _codes(0x80, 0x01, 0x81, 0x00, 0x3A, 0xFF, 0x7F, 0x7E, 0x7F)
    # +0 / -0; 0 and the smallest subnormal; across zero; two steps; NaN twice; NaN against 448.
    assert bench.fp8_steps(got, want).tolist() == [0, 1, 2, 1, 2, 0, 0, 255, 255]


def _parts(case: bench.Case, rows: int = 4) -> tuple:
    rng = np.random.default_rng(0)
    out = rng.integers(0, 0x7E, (rows, case.hidden), dtype=np.uint8).view(FP8_NP)
    scales = rng.random((rows, case.hidden // 128), dtype=np.float32) if case.phase == "fp8-group" else None
    new_residual = rng.standard_normal((rows, case.hidden)).astype(np.float32) if case.residual else None
    return out, scales, new_residual


def test_check_fp8_ours_bit_for_bit() -> None:
    case = bench.Case(8, 256, "float32", True, "fp8-group")
    want = _parts(case)
    assert bench.check_fp8(case, tuple(a.copy() for a in want), want, exact=True) == ""
    for i, name in enumerate(("out", "scales", "new residual")):
        got = [a.copy() for a in want]
        got[i].view(np.uint8)[0, 0] ^= 1  # one bit of one element
        with pytest.raises(ValueError, match=f"{name} differs from the reference at 1 of"):
            bench.check_fp8(case, tuple(got), want, exact=True)
    with pytest.raises(ValueError, match="scales: got None"):
        bench.check_fp8(case, (want[0], None, want[2]), want, exact=True)


def test_check_fp8_peers_within_one_step() -> None:
    case = bench.Case(8, 256, "bfloat16", False, "fp8-static")
    out, _, _ = _parts(case)
    near = out.copy()
    near.view(np.uint8)[:, :3] += 1  # one step on 3 columns of 4 rows
    assert bench.check_fp8(case, (near, None, None), (out, None, None), exact=False) == \
        "FP8 codes: 12 of 1024 one step from the reference's"
    assert bench.check_fp8(case, (out, None, None), (out, None, None), exact=False) == ""
    far = out.copy()
    far.view(np.uint8)[1, 5] += 2
    with pytest.raises(ValueError, match="by 2 FP8 steps at 1 of 1024 elements"):
        bench.check_fp8(case, (far, None, None), (out, None, None), exact=False)
    with pytest.raises(ValueError, match="out differs"):
        bench.check_fp8(case, (_codes(*[0x7F] * 4).reshape(1, 4),) + (None, None),
                        (_codes(0x10, 0x7F, 0x7F, 0x7F).reshape(1, 4), None, None), exact=False)


def test_check_fp8_peers_scales_and_residual_tolerance() -> None:
    case = bench.Case(8, 256, "bfloat16", True, "fp8-group")
    out, scales, new_residual = _parts(case)
    assert bench.check_fp8(case, (out, scales * (1 + 1e-3), new_residual), (out, scales, new_residual),
                           exact=False) == ""
    with pytest.raises(ValueError, match="scales differ from the reference"):
        bench.check_fp8(case, (out, scales * 1.05, new_residual), (out, scales, new_residual), exact=False)
    with pytest.raises(ValueError, match="new residual differs"):
        bench.check_fp8(case, (out, scales, -new_residual), (out, scales, new_residual), exact=False)


def _fp8_dry_run(tmp_path: Path, *argv: str) -> str:
    assert main(["bench", "--dry-run", "--quick", "--pass", "forward", "--pass", "fp8-static", "--pass", "fp8-group",
                 "--out", str(tmp_path), *argv]) == 0
    return (tmp_path / "bench-table.txt").read_text()


def test_dry_run_covers_the_fp8_passes(tmp_path: Path) -> None:
    table = _fp8_dry_run(tmp_path)
    assert table.index("## forward") < table.index("## fp8-static: FP8 output") < table.index("## fp8-group: FP8 ") \
        < table.index("targets bi-jax fp8-group:")
    assert "targets bi-torch fp8-static: copy >= 90% at >= 64 MB" in table
    assert "targets bi-jax fp8-group: copy >= 85% at >= 64 MB" in table
    with (tmp_path / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    fp8_rows = [r for r in rows if r["pass"] in bench.FP8_PASSES]
    assert {(r["pass"], r["impl"]) for r in fp8_rows} == \
        {(p, i.name) for i in bench.IMPLS for p in bench.FP8_PASSES if p in i.passes}
    skipped = [r for r in fp8_rows if r["impl"] == "vllm-fp8"]
    assert skipped and all(r["us"] == "" and "vLLM is not installed" in r["note"] for r in skipped)
    assert all(float(r["us"]) > 0 for r in fp8_rows if r["impl"] != "vllm-fp8")
    first = next(r for r in fp8_rows if r["pass"] == "fp8-group" and r["impl"] == "bi-torch")
    case = bench.Case(int(first["tokens"]), int(first["hidden"]), first["dtype"], first["residual"] == "1", "fp8-group")
    assert int(first["bytes"]) == case.bytes_moved
    # The peers are marked "(add+norm)" where they add the residual in a separate kernel: hf-eager.
    case = dataclasses.replace(case, residual=True)
    assert bench.label("hf-eager", case) == "hf-eager (add+norm)" and bench.label("xla", case) == "xla"


def test_fp8_report_renders_again_from_its_csv(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _fp8_dry_run(first, "--dtype", "bfloat16")
    assert main(["bench", "--from-csv", str(first / "bench.csv"), "--out", str(second)]) == 0
    def cases(path: Path) -> list:  # the derived columns are recomputed from the rounded times
        return [line.split("|")[0] for line in (path / "bench-table.txt").read_text().splitlines()[1:]]

    assert cases(second) == cases(first) and any("fp8-group" in line for line in cases(second))
    with (second / "bench.csv").open() as f:
        assert {r["pass"] for r in csv.DictReader(f)} == {"forward", *bench.FP8_PASSES}
