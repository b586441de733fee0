"""`bi-norm verify`'s torch-jax-dlpack row itself (bridge.verify.crossframework.run_cross_framework)
on a few short golden cases of each pass, on the CPU: the row runs and every check agrees."""

from __future__ import annotations

from bridge.verify.crossframework import run_cross_framework


def test_cross_framework_row_runs_every_pass(corpus, backward_corpus, fp8_cases):
    forward = [c for c in corpus if c.spec.n == 100][:2]
    backward = [backward_corpus[name] for name in ("bwd-float32-n128-r3-res_none", "bwd-bfloat16-n127-r3-res_same")]
    fp8 = [c for c in fp8_cases.values() if c.spec.n <= 256][:2]
    assert len(forward) == len(backward) == len(fp8) == 2
    report = run_cross_framework(forward, backward, lambda *a: None, fp8)
    assert report.status == "ok", report.reason
    for name in ("forward", "backward", "fp8"):
        result = getattr(report, name)
        assert result is not None and result.mismatches == 0 and result.checks > 0, (name, result)
    assert report.forward.reason.startswith("on cpu")
