"""`bi-norm bench` on CPU, the backward: its report and determinism counts, its checks against the
reference and its glue (the cheap implementations on small CPU inputs)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bench_helpers import _synthetic
from bridge import bench


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
    # >= 64 MB: the big case only (1024 x 4096 moves 25 MB); no long rows; >= 1024 tokens: both, and a
    # tie with the fastest peer is not faster; no case of <= 64 tokens.
    assert ("targets bi-torch backward: copy >= 85% at >= 64 MB 1/1; copy >= 75% on long rows 0/0; "
            "ratio < 1.00 at >= 1024 tokens 1/2; same-framework ratio <= 1.05 at <= 64 tokens 0/0") in backward
    assert ("targets bi-jax backward: copy >= 85% at >= 64 MB 0/1; copy >= 75% on long rows 0/0; "
            "ratio < 1.00 at >= 1024 tokens 0/1") in backward
    assert "targets bi-torch: copy >= 97%" in forward


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


def test_backward_loop_op_feeds_every_output_back() -> None:
    # time_jax's set: (z, g[, gr], grad_weight). The next call's z is this call's grad_x (written over g),
    # its g this call's z (only read), its gr this call's grad_residual (written over gr), its weight this
    # call's grad_weight: nothing a call computes is dead, no two calls share z, nothing overwritten is kept.
    op = bench.loop_op(lambda z, g, gr, w: (g + 1, None if gr is None else gr + 10, w * 2), residual=True)
    assert op("z", 1, 5, 7, "unused w") == (2, "z", 15, 14)
    op = bench.loop_op(lambda z, g, gr, w: (g + 1, None, w * 2), residual=True)
    assert op("z", 1, 5, 7, "unused w") == (2, "z", 5, 14)  # grad_x is the residual's gradient too: gr kept
    op = bench.loop_op(lambda z, g, gr, w: (g + 1, gr, w * 2), residual=False)
    assert op("z", 1, 7, "unused w") == (2, "z", 14)


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
