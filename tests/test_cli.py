"""`bi-norm` through bridge.cli.main: exit codes, the JSON report, and failures that must be caught."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bridge import golden
from bridge.cli import main
from bridge.verify.backends import Backend
from bridge.verify.report import Unavailable
from bridge.verify.run import BACKEND_BY_NAME

REPORT_KEYS = {"backend", "status", "reason", "forward", "backward", "fp8"}
PASS_KEYS = {"status", "reason", "cases", "checks", "mismatches", "invariance_checks", "invariance_mismatches",
             "first_mismatch", "seconds", "flushed"}
# Cases that --quick still runs (n <= 1025) and the invariance sweeps use (n = 128).
VICTIM = "bfloat16-n128-res_none"
BACKWARD_VICTIM = "bwd-bfloat16-n128-r7-res_same"
FP8_VICTIM = "fp8-bfloat16-n1024-r3-res_same-g64"  # scales of shape (3, 16): element (2, 5) is there


@pytest.fixture
def corpus_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "golden"
    shutil.copytree(golden.DEFAULT_DIR, directory)
    return directory


def _flip_expected_bit(directory: Path, case: str, output: str = "out_") -> str:
    """Flip the lowest bit of element (2, 5) of one stored output (the first whose name starts with
    `output`) and re-sign the file in the manifest, so that digests pass and only the bitwise
    comparison can notice. Returns the output's key."""
    path = directory / f"{case}.npz"
    with zipfile.ZipFile(path) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    key = next(name for name in sorted(entries) if name.startswith(output))
    array = np.lib.format.read_array(io.BytesIO(entries[key]))
    array[2, 5] ^= 1
    payload = io.BytesIO()
    np.lib.format.write_array(payload, array, allow_pickle=False)
    entries[key] = payload.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())
    manifest = json.loads((directory / golden.MANIFEST).read_text())
    for entry in manifest["cases"] + manifest["backward_cases"] + manifest["fp8_cases"]:
        if entry["name"] == case:
            entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (directory / golden.MANIFEST).write_text(json.dumps(manifest))
    return key[:-len(".npy")]


def test_verify_reference_json(capsys) -> None:
    assert main(["verify", "--backend", "reference", "--quick", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["contract_version"] == "1.2" and doc["ok"] is True
    [report] = doc["backends"]
    assert set(report) == REPORT_KEYS and report["backend"] == "reference" and report["status"] == "ok"
    for direction in ("forward", "backward", "fp8"):
        result = report[direction]
        assert set(result) == PASS_KEYS and result["status"] == "ok", direction
        assert result["cases"] > 0 and result["checks"] >= 2 * result["cases"] and result["invariance_checks"] > 0
        assert result["mismatches"] == result["invariance_mismatches"] == result["flushed"] == 0
        assert result["first_mismatch"] == ""
    # --quick keeps to n <= 1025 in every pass: fewer cases than the whole corpus.
    assert report["backward"]["cases"] < len(golden.load_backward_corpus())
    assert report["fp8"]["cases"] == sum(c.spec.n <= 1025 for c in golden.load_fp8_corpus())
    # The FP8 sweep: a static and a per-group case, each row alone vs in batches of 255 and 300 rows.
    assert report["fp8"]["invariance_checks"] >= 2 * 2


def test_verify_table(capsys) -> None:
    assert main(["verify", "--backend", "reference", "--quick", "--dtype", "float16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    forward = next(line for line in lines if line.startswith("reference"))
    backward, fp8 = lines[lines.index(forward) + 1:lines.index(forward) + 3]
    assert forward.split()[1:3] == ["forward", "ok"] and backward.split()[:2] == ["backward", "ok"]
    assert fp8.split()[:2] == ["fp8", "ok"]
    # --dtype float16: the float16 backward (and FP8) cases with n <= 1025 only.
    count = sum(c.spec.dtype == "float16" and c.spec.n <= 1025 for c in golden.load_backward_corpus())
    assert int(backward.split()[2]) == count
    assert int(fp8.split()[2]) == sum(c.spec.dtype == "float16" and c.spec.n <= 1025 for c in golden.load_fp8_corpus())
    assert lines[-1] == "OK: every available backend matches the golden corpus bit for bit."


@pytest.mark.parametrize("argv", [
    [],  # no subcommand
    ["verify", "--backend", "no-such-backend"],
    ["verify", "--dtype", "float64"],
    ["golden"],  # neither --regenerate nor --check
    ["golden", "--regenerate", "--check"],
])
def test_misuse_exits_2(argv: list) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_missing_corpus_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["verify", "--backend", "reference", "--corpus", str(tmp_path / "nowhere")]) == 2
    assert "bi-norm golden --regenerate" in capsys.readouterr().err


def test_verify_catches_a_flipped_expected_bit(corpus_copy: Path, capsys) -> None:
    key = _flip_expected_bit(corpus_copy, VICTIM)
    assert main(["verify", "--backend", "reference", "--quick", "--json", "--corpus", str(corpus_copy)]) == 1
    doc = json.loads(capsys.readouterr().out)
    [report] = doc["backends"]
    forward = report["forward"]
    assert doc["ok"] is False and report["status"] == forward["status"] == "mismatch" and forward["mismatches"] == 1
    mode, offset = key[len("out_"):].split("_offset")
    assert forward["first_mismatch"].startswith(f"{VICTIM} {mode}/{offset} out: 1 of ")
    assert "first at index (2, 5)" in forward["first_mismatch"]
    # The invariance sweep recomputes from the inputs, which are intact; the backward is untouched.
    assert forward["invariance_mismatches"] == 0 and report["backward"]["status"] == "ok"

    assert main(["verify", "--backend", "reference", "--quick", "--corpus", str(corpus_copy)]) == 1
    table = capsys.readouterr().out
    assert f"{VICTIM} {mode}/{offset} out" in table and "FAILED: reference" in table


def test_verify_catches_a_flipped_expected_gradient_bit(corpus_copy: Path, capsys) -> None:
    key = _flip_expected_bit(corpus_copy, BACKWARD_VICTIM, "grad_x_")
    assert main(["verify", "--backend", "reference", "--quick", "--json", "--corpus", str(corpus_copy)]) == 1
    [report] = json.loads(capsys.readouterr().out)["backends"]
    backward = report["backward"]
    assert report["status"] == backward["status"] == "mismatch" and report["forward"]["status"] == "ok"
    assert backward["mismatches"] == 1 and backward["invariance_mismatches"] == 0
    mode, offset = key[len("grad_x_"):].split("_offset")
    assert backward["first_mismatch"].startswith(f"{BACKWARD_VICTIM} {mode}/{offset} grad_x: 1 of ")
    assert "first at index (2, 5)" in backward["first_mismatch"]
    assert main(["golden", "--check", "--dir", str(corpus_copy)]) == 1
    assert f"differs from regeneration: {BACKWARD_VICTIM}.npz" in capsys.readouterr().out


def test_verify_catches_a_flipped_expected_fp8_bit(corpus_copy: Path, capsys) -> None:
    for output in ("out_", "scales_"):
        key = _flip_expected_bit(corpus_copy, FP8_VICTIM, output)
        assert main(["verify", "--backend", "reference", "--quick", "--json", "--corpus", str(corpus_copy)]) == 1
        [report] = json.loads(capsys.readouterr().out)["backends"]
        fp8 = report["fp8"]
        assert report["status"] == fp8["status"] == "mismatch" and report["forward"]["status"] == "ok"
        assert fp8["mismatches"] == 1 and fp8["invariance_mismatches"] == 0
        mode, offset = key[len(output):].split("_offset")
        assert fp8["first_mismatch"].startswith(f"{FP8_VICTIM} {mode}/{offset} {output[:-1]}: 1 of "), output
        assert "first at index (2, 5)" in fp8["first_mismatch"]
        _flip_expected_bit(corpus_copy, FP8_VICTIM, output)  # back as it was
    assert main(["verify", "--backend", "reference", "--quick", "--corpus", str(corpus_copy)]) == 0


def _fp8_reference_returning(shape: str):
    """The reference's FP8 runner, but returning a result of another shape than the spec's."""
    from bridge import reference
    from bridge.numerics.contract import split_fp8

    def run(x, w, eps, r, mode, offset, quantization):
        result = reference.rms_norm(x, w, eps, r, mode=mode, weight_offset=offset, **quantization)
        if shape == "tuple":  # (out,) instead of out
            result = result if isinstance(result, tuple) else (result,)
        elif shape == "no scales" and "group_size" in quantization:
            result = result[0] if r is None else (result[0], result[2])
        return split_fp8(result, "group_size" in quantization, r is not None)

    return run


@pytest.mark.parametrize("shape,message", [("tuple", "FP8 call returned a tuple of 1; the spec's result is out"),
                                           ("no scales", "FP8 call returned one array; the spec's result is "
                                                         "(out, scales)")])
def test_an_fp8_result_of_the_wrong_shape_is_an_error(monkeypatch, capsys, shape: str, message: str) -> None:
    reference = BACKEND_BY_NAME["reference"]
    monkeypatch.setitem(BACKEND_BY_NAME, "reference", dataclasses.replace(
        reference, make_fp8_runner=lambda: _fp8_reference_returning(shape)))
    assert main(["verify", "--backend", "reference", "--quick", "--dtype", "float32", "--jobs", "1", "--json"]) == 1
    [report] = json.loads(capsys.readouterr().out)["backends"]
    assert report["status"] == report["fp8"]["status"] == "error"
    assert report["fp8"]["reason"] == f"ValueError: {message}"


def test_an_fp8_pass_not_available_is_reported_never_passed(monkeypatch, capsys) -> None:
    def no_fp8():
        raise Unavailable("bi_norm.rms_norm has no out_dtype argument (FP8 output, contract v1.2)")

    reference = BACKEND_BY_NAME["reference"]
    monkeypatch.setitem(BACKEND_BY_NAME, "reference", dataclasses.replace(reference, make_fp8_runner=no_fp8))
    argv = ["verify", "--backend", "reference", "--quick", "--dtype", "bfloat16", "--jobs", "1"]
    assert main(argv + ["--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)["backends"]
    assert report["status"] == "ok" and report["forward"]["status"] == report["backward"]["status"] == "ok"
    assert report["fp8"]["status"] == "not available" and report["fp8"]["checks"] == 0
    assert report["fp8"]["reason"] == "bi_norm.rms_norm has no out_dtype argument (FP8 output, contract v1.2)"
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["fp8", "not", "available"] and line.endswith("contract v1.2)") for line in lines)
    assert lines[-1] == "FP8 not available (not compared, not a failure): reference"


def test_a_backward_not_implemented_is_reported_and_not_a_failure(monkeypatch, capsys) -> None:
    def no_backward(*args):
        raise NotImplementedError("no backward yet")

    reference = BACKEND_BY_NAME["reference"]
    monkeypatch.setitem(BACKEND_BY_NAME, "reference", Backend(
        "reference", "the reference without a backward", reference.probe, reference.make_runner, lambda: no_backward,
        make_fp8_runner=reference.make_fp8_runner))
    argv = ["verify", "--backend", "reference", "--quick", "--dtype", "float16", "--jobs", "1"]
    assert main(argv + ["--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)["backends"]
    assert report["status"] == report["forward"]["status"] == "ok" and report["forward"]["checks"] > 0
    assert report["backward"]["status"] == "not implemented" and report["backward"]["checks"] == 0
    assert report["backward"]["reason"] == "NotImplementedError: no backward yet"
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["backward", "not"] and line.endswith("NotImplementedError: no backward yet")
               for line in lines)
    assert lines[-1] == "Backward not implemented (not a failure): reference"


def _flushing_reference(corrupt_elsewhere: bool):
    """The reference's backward with XLA:CPU's flushing imitated (flushed rows and columns zeroed),
    and optionally one more element changed outside them."""
    from bridge.numerics import reference, subnormals

    def run(x, w, g, eps, r, gr, mode, offset):
        grads = [a.copy() for a in reference.rms_norm_backward(x, w, g, eps, r, gr, mode=mode, weight_offset=offset)]
        rows, cols = subnormals.flushed(x, w, g, eps, r, gr, mode, offset)
        for a in grads[:-1]:
            a[rows] = 0
        grads[-1][cols] = 0
        if corrupt_elsewhere and (~rows).any():
            grads[0][np.flatnonzero(~rows)[0], 0] = 1
        return grads

    return run


@pytest.mark.parametrize("corrupt_elsewhere", [False, True])
def test_a_flushing_backend_is_compared_outside_flushed_subnormals(monkeypatch, capsys, corrupt_elsewhere) -> None:
    reference = BACKEND_BY_NAME["reference"]
    monkeypatch.setitem(BACKEND_BY_NAME, "reference", Backend(
        "reference", "a backward that flushes subnormals", reference.probe, reference.make_runner,
        lambda: _flushing_reference(corrupt_elsewhere), flushes_subnormals=True,
        make_fp8_runner=reference.make_fp8_runner))
    argv = ["verify", "--backend", "reference", "--quick", "--dtype", "float32", "--jobs", "1", "--json"]
    assert main(argv) == (1 if corrupt_elsewhere else 0)
    [report] = json.loads(capsys.readouterr().out)["backends"]
    assert report["backward"]["flushed"] > 0
    assert (report["backward"]["mismatches"] > 0) == corrupt_elsewhere


def _without_seconds(report: dict) -> dict:
    return {k: _without_seconds(v) if isinstance(v, dict) else v for k, v in report.items() if k != "seconds"}


def test_verify_in_worker_processes_reports_like_one_process(corpus_copy: Path, capsys) -> None:
    _flip_expected_bit(corpus_copy, VICTIM)
    argv = ["verify", "--backend", "reference", "--backend", "triton-interpret", "--quick", "--dtype", "bfloat16",
            "--json", "--corpus", str(corpus_copy)]
    assert main(argv + ["--jobs", "1"]) == 1
    alone = json.loads(capsys.readouterr().out)["backends"]
    assert main(argv + ["--jobs", "2"]) == 1
    side_by_side = json.loads(capsys.readouterr().out)["backends"]
    assert [r["backend"] for r in side_by_side] == ["reference", "triton-interpret"]
    for one, two in zip(alone, side_by_side):
        assert _without_seconds(two) == _without_seconds(one)
        assert two["forward"]["mismatches"] == 1 and VICTIM in two["forward"]["first_mismatch"]


def test_verify_jobs_must_be_positive() -> None:
    with pytest.raises(SystemExit) as info:
        main(["verify", "--jobs", "0"])
    assert info.value.code == 2


def test_golden_check(corpus_copy: Path, capsys) -> None:
    assert main(["golden", "--check", "--dir", str(corpus_copy)]) == 0
    assert "reproduces bit for bit" in capsys.readouterr().out
    _flip_expected_bit(corpus_copy, VICTIM)
    assert main(["golden", "--check", "--dir", str(corpus_copy)]) == 1
    out = capsys.readouterr().out
    assert f"differs from regeneration: {VICTIM}.npz" in out and f"differs from regeneration: {golden.MANIFEST}" in out


def test_golden_regenerate_restores_a_corrupted_corpus(corpus_copy: Path, capsys) -> None:
    _flip_expected_bit(corpus_copy, VICTIM)
    (corpus_copy / "stale-case.npz").write_bytes(b"left over")
    assert main(["golden", "--regenerate", "--dir", str(corpus_copy)]) == 0
    assert not (corpus_copy / "stale-case.npz").exists()
    for path in golden.DEFAULT_DIR.iterdir():
        assert (corpus_copy / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("command", ["verify", "golden", "bench"])
def test_every_command_prints_its_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: bi-norm" in capsys.readouterr().out
