"""`bi-norm verify`'s rows of bi_jax's Pallas GPU backends, on the CPU: pallas-triton-gpu and
pallas-mosaic-gpu (issue 26, stages 1 and 2) by name, unavailable here with the reason, and the
Mosaic row's passes with stand-in runners: the forward, the backward and the FP8 output (stage 3)
up to the kernels' widest row (wider cases counted in the notes)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bi_jax import mosaic_kernel
from bridge.cli import main
from bridge.numerics import reference
from bridge.verify import backends
from bridge.verify.run import BACKEND_BY_NAME, INVARIANCE_SIZES


def test_each_pallas_gpu_backend_has_its_row():
    names = [b.name for b in backends.BACKENDS]
    assert names == ["reference", "triton-interpret", "triton-gpu", "pallas-interpret", "pallas-triton-gpu",
                     "pallas-mosaic-gpu"]
    assert BACKEND_BY_NAME["pallas-mosaic-gpu"].max_n() == mosaic_kernel.MAX_N
    assert BACKEND_BY_NAME["pallas-triton-gpu"].max_n is None


def test_the_old_name_is_gone(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--backend", "pallas-gpu"])
    assert exit_.value.code == 2 and "invalid choice: 'pallas-gpu'" in capsys.readouterr().err


def test_both_rows_are_unavailable_without_a_gpu(capsys):
    assert main(["verify", "--backend", "pallas-triton-gpu", "--backend", "pallas-mosaic-gpu", "--quick", "--jobs",
                 "1", "--json"]) == 1  # a named backend that is unavailable fails
    reports = json.loads(capsys.readouterr().out)["backends"]
    assert [(r["backend"], r["status"], r["reason"]) for r in reports] == [
        ("pallas-triton-gpu", "unavailable", "no GPU visible to JAX"),
        ("pallas-mosaic-gpu", "unavailable", "no GPU visible to JAX")]


def test_the_jax_runners_name_their_kernel_body():
    """pallas-interpret runs the Pallas-Triton body in interpret mode, named explicitly."""
    rng = np.random.default_rng(26)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    w = (1 + 0.25 * rng.standard_normal(64)).astype(np.float32)
    got = backends._jax_runner(True, "triton")(x, w, 1e-6, None, "fp32", 1.0)
    assert (reference.bits(got) == reference.bits(reference.rms_norm(x, w, 1e-6, mode="fp32",
                                                                     weight_offset=1.0))).all()


def test_the_mosaic_row_with_a_stand_in_forward(monkeypatch, capsys, corpus):
    """The Mosaic row as a GPU would run it, its runners the reference's (no GPU here)."""
    mosaic, ref = BACKEND_BY_NAME["pallas-mosaic-gpu"], BACKEND_BY_NAME["reference"]
    monkeypatch.setitem(BACKEND_BY_NAME, "pallas-mosaic-gpu", dataclasses.replace(
        mosaic, probe=lambda: None, make_runner=ref.make_runner, make_backward_runner=ref.make_backward_runner,
        make_fp8_runner=ref.make_fp8_runner))
    argv = ["verify", "--backend", "reference", "--backend", "pallas-mosaic-gpu", "--dtype", "float32", "--jobs", "1"]
    assert main(argv + ["--json"]) == 0
    ref_report, report = json.loads(capsys.readouterr().out)["backends"]
    forward, full = report["forward"], ref_report["forward"]
    assert report["status"] == forward["status"] == "ok" and forward["mismatches"] == 0
    # The corpus's float32 cases and sweeps at n = 65536 are past the kernel's 32768 columns.
    assert 0 < forward["cases"] < full["cases"] and 0 < forward["invariance_checks"] < full["invariance_checks"]
    wide = [c for c in corpus if c.spec.dtype == "float32" and c.spec.n > mosaic_kernel.MAX_N]
    swept = [c for c in wide if c.spec.n in INVARIANCE_SIZES and c.spec.residual in ("none", "float32")]
    assert full["cases"] - forward["cases"] == len(wide)
    left = len(wide) + len(swept)
    assert forward["reason"] == f"{left} corpus and sweep cases with n > 32768 not run: the kernel's widest row"
    backward, full_backward = report["backward"], ref_report["backward"]
    assert backward["status"] == "ok" and backward["mismatches"] == 0
    assert 0 < backward["cases"] <= full_backward["cases"]
    fp8, full_fp8 = report["fp8"], ref_report["fp8"]
    # Every FP8 case is within the kernel's widest row (n <= 20480).
    assert fp8["status"] == "ok" and fp8["mismatches"] == 0 and fp8["cases"] == full_fp8["cases"] > 0
    assert fp8["invariance_checks"] == full_fp8["invariance_checks"] > 0 and not fp8.get("reason")
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith(("Backward not implemented", "FP8 not available")) for line in lines)


def test_the_mosaic_row_runs_the_fp8_output_through_mosaic(monkeypatch):
    """Its FP8 runner is bi_jax.rms_norm compiled with pallas_backend='mosaic' (stage 3)."""
    made = []
    monkeypatch.setattr(backends, "_jax_fp8_runner", lambda interpret, pallas_backend: made.append(
        (interpret, pallas_backend)))
    BACKEND_BY_NAME["pallas-mosaic-gpu"].make_fp8_runner()
    assert made == [(False, "mosaic")]
