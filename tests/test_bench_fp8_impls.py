"""`bi-norm bench`'s FP8 implementations on small CPU inputs, checked as a GPU run checks them:
ours (bi_torch under Triton's interpreter, bi_jax in interpret mode) bit for bit against
bridge.reference, the peers (HF's norm then quantization in torch, the XLA one in JAX) within
one FP8 step; vllm-fp8's glue over bi_torch's vLLM-shaped drop-ins (vLLM is not installed here,
nor on the GPU image); hf-compiled by Inductor on the CPU; the JAX loop's glue. The timing needs a GPU."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bridge import bench

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from bi_torch import to_numpy  # noqa: E402
from bridge.bench import fp8, fp8_peers, timing  # noqa: E402

CASES = [(phase, dtype, residual) for phase in bench.FP8_PASSES for dtype in ("float32", "bfloat16")
         for residual in (False, True)]
TOKENS, HIDDEN = 16, 256


def _torch_inputs(case: bench.Case):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case.dtype)
    xs, rs = (bench.torch_sets(2, (TOKENS, HIDDEN), dtype, g, device="cpu") for _ in range(2))
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype)
    return xs, rs if case.residual else [None, None], weight


def _want(case: bench.Case, x, r, weight) -> tuple:
    return fp8.reference_parts(case, to_numpy(x), None if r is None else to_numpy(r), to_numpy(weight))


def _torch_parts(result, case: bench.Case) -> tuple:
    return tuple(None if a is None else to_numpy(a) for a in fp8.split(result, case))


@pytest.mark.parametrize("phase,dtype,residual", CASES)
def test_torch_fp8_implementations_match_the_reference(phase: str, dtype: str, residual: bool) -> None:
    import bi_torch
    from bi_torch import vllm_fp8

    case = bench.Case(TOKENS, HIDDEN, dtype, residual, phase)
    xs, rs, weight = _torch_inputs(case)
    want = _want(case, xs[1], rs[1], weight)
    kw = fp8.quant_args(case, torch.tensor(bench.FP8_SCALE, dtype=torch.float32))
    ours = bi_torch.rms_norm(xs[1], weight, bench.EPS, rs[1], out_dtype=torch.float8_e4m3fn, **kw)
    assert fp8.check_fp8(case, _torch_parts(ours, case), want, exact=True) == ""
    hf = fp8_peers.hf_eager(weight, bench.EPS, residual, kw.get("scale"), kw.get("group_size"))
    note = fp8.check_fp8(case, _torch_parts(hf(xs[1], rs[1]), case), want, exact=False)
    if dtype == "bfloat16":  # HF multiplies by the weight in bfloat16: some codes one step off
        assert note.startswith("FP8 codes: "), note
    # vllm-fp8 over bi_torch's drop-ins, which have vLLM's signatures and the contract's bits.
    r = None if rs[1] is None else rs[1].clone()
    make = fp8_peers.vllm_with(vllm_fp8, vllm_fp8)
    result = make(weight, bench.EPS, residual, kw.get("scale"), kw.get("group_size"))(xs[1], r)
    assert fp8.check_fp8(case, _torch_parts(result, case), want, exact=True) == ""
    if residual:  # updated in place, as vLLM's kernels do
        assert torch.equal(r.view(torch.int16 if dtype == "bfloat16" else torch.int32),
                           fp8.split(ours, case)[2].view(torch.int16 if dtype == "bfloat16" else torch.int32))


@pytest.fixture
def kept_recompile_limit():
    """The factory raises dynamo's recompile limit; put it back by assignment afterwards
    (monkeypatch's undo deletes the attribute of torch's config module, which hides it for good)."""
    import torch._dynamo

    saved = torch._dynamo.config.recompile_limit
    yield
    torch._dynamo.config.recompile_limit = saved


def test_hf_compiled_fp8_matches_the_reference(fresh_dynamo, kept_recompile_limit) -> None:
    """Inductor on the CPU (a C++ compiler): the same function as on the GPU, four graphs."""
    for phase, dtype, residual in CASES:
        if dtype == "bfloat16":
            case = bench.Case(TOKENS, HIDDEN, dtype, residual, phase)
            xs, rs, weight = _torch_inputs(case)
            kw = fp8.quant_args(case, torch.tensor(bench.FP8_SCALE, dtype=torch.float32))
            fn = fp8_peers.hf_compiled(weight, bench.EPS, residual, kw.get("scale"), kw.get("group_size"))
            note = fp8.check_fp8(case, _torch_parts(fn(xs[1], rs[1]), case), _want(case, xs[1], rs[1], weight),
                                 exact=False)
            assert note.startswith("FP8 codes: "), note


def test_vllm_fp8_is_skipped_without_vllm(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, installed or not
    with pytest.raises(bench.Skip, match="vLLM is not installed"):
        fp8_peers.vllm_fp8(torch.ones(128), bench.EPS, False, torch.tensor(1.0), None)


def test_check_and_time_notes_checks_and_skips() -> None:
    import bi_torch

    case = bench.Case(TOKENS, HIDDEN, "bfloat16", True, "fp8-static")
    xs, rs, weight = _torch_inputs(case)
    rows = 3
    want = _want(case, xs[0][:rows], rs[0][:rows], weight)
    scale = torch.tensor(bench.FP8_SCALE, dtype=torch.float32)

    def factory(name: str):
        if name == "bi-torch":
            return lambda: lambda x, r: bi_torch.rms_norm(x, weight, bench.EPS, r, out_dtype=torch.float8_e4m3fn,
                                                          scale=scale)
        if name == "hf-eager":
            return lambda: fp8_peers.hf_eager(weight, bench.EPS, True, scale, None)
        if name == "xla":  # a peer whose output is wrong: an error row, not a crash
            return lambda: lambda x, r: (fp8_peers.quantize_static(-x, scale), x + r)
        return lambda: fp8_peers.vllm_fp8(weight, bench.EPS, True, scale, None)

    unavailable = {}
    timings = fp8._check_and_time(case, ["bi-torch", "hf-eager", "xla", "vllm-fp8"], factory,
                                  lambda fn: fn(xs[0], rs[0]), to_numpy, want, lambda fn: (1.5, "timed"),
                                  unavailable)
    by_name = {t.impl: t for t in timings}
    assert by_name["bi-torch"].us == 1.5 and by_name["bi-torch"].note == "timed"
    assert by_name["hf-eager"].us == 1.5 and by_name["hf-eager"].note.startswith("FP8 codes: ")
    assert by_name["hf-eager"].note.endswith("one step from the reference's; timed")
    assert by_name["xla"].us is None and "out differs from the reference" in by_name["xla"].note
    if "vllm-fp8" not in by_name:  # vLLM not installed: skipped for every case of the pass
        assert "vLLM is not installed" in unavailable["vllm-fp8"]


def test_fp8_implementations_match_the_plan() -> None:
    def timed(framework: str) -> set:
        return {i.name for i in bench.IMPLS if "fp8-static" in i.passes and i.kind == "peer"
                and i.framework == framework}

    assert set(fp8_peers.TORCH_FP8) == timed("torch") and set(fp8_peers.JAX_FP8) == timed("jax")


@pytest.mark.parametrize("phase,residual", [(p, r) for p in bench.FP8_PASSES for r in (False, True)])
def test_jax_fp8_implementations_match_the_reference_and_time(phase: str, residual: bool, monkeypatch) -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import bi_jax

    case = bench.Case(8, HIDDEN, "bfloat16", residual, phase)
    keys = jax.random.split(jax.random.key(0), 3)
    x, r = (jax.random.normal(k, (8, HIDDEN), jnp.bfloat16) for k in keys[:2])
    r = r if residual else None
    weight = (1 + 0.1 * jax.random.normal(keys[2], (HIDDEN,))).astype(jnp.bfloat16)
    want = fp8.reference_parts(case, np.asarray(x), None if r is None else np.asarray(r), np.asarray(weight))
    kw = fp8.quant_args(case, jnp.asarray(bench.FP8_SCALE, jnp.float32))

    def ours(x, r, w):
        return bi_jax.rms_norm(x, w, bench.EPS, r, out_dtype=jnp.float8_e4m3fn, **kw)

    peer = fp8_peers.xla_fp8(bench.EPS, residual, kw.get("scale"), kw.get("group_size"))
    monkeypatch.setattr(timing, "JAX_CALL_S", 1e-4)  # a short loop: its structure, not a time
    for op, exact in ((ours, True), (peer, False)):
        got = tuple(None if a is None else np.asarray(a) for a in fp8.split(jax.jit(op)(x, r, weight), case))
        fp8.check_fp8(case, got, want, exact=exact)
        us, note = fp8.time_jax_fp8(op, [(x + i, r) for i in range(2)], weight, case)
        assert us > 0 and ("unrolled: no output in x's dtype" in note) == (not residual)


@pytest.mark.parametrize("phase", bench.FP8_PASSES)
def test_jax_fp8_loop_keeps_every_call(phase: str) -> None:
    """With a residual, each of the loop's 2K calls per iteration survives XLA (here XLA:CPU):
    none hoisted, merged or dropped as dead code, and no array copy."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    case = bench.Case(8, 128, "float32", True, phase)
    k = 3
    x = jax.random.normal(jax.random.key(0), (8, 128), jnp.float32)
    kw = fp8.quant_args(case, jnp.asarray(bench.FP8_SCALE, jnp.float32))
    peer = fp8_peers.xla_fp8(bench.EPS, True, kw.get("scale"), kw.get("group_size"))
    outs = [jnp.zeros((8, 128), jnp.float8_e4m3fn)] * 2
    outs += [jnp.zeros((8, 1), jnp.float32)] * 2 if phase == "fp8-group" else []
    sets = [(x + i, x - i, *outs) for i in range(k)]
    compiled, _, calls = timing.compile_jax_loop(fp8.fp8_loop_op(peer, case), sets, jnp.ones(128), case)
    text = compiled.as_text()
    assert calls % (2 * k) == 0 and text.count(" rsqrt(") == 2 * k
    assert not timing.array_copies(text)
