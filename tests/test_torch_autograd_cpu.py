"""bi_torch's autograd plumbing on CPU tensors: absent output gradients, grad_out of any strides,
what the backward saves, torch.compile(fullgraph=True), the inference-only in-place calls, RMSNorm.

Numeric assertions are bitwise, against bridge.reference.rms_norm_backward or between two calls
that must agree (test_torch_backward_cpu.py covers the numerics themselves).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bi_torch
import bi_torch.autograd
from torch_helpers import (assert_bits, backward_inputs, bi_backward, check_backward, ref_backward, seeded_rng,
                           to_numpy, to_torch)

# The interpreter evaluates special values (inf, NaN, overflowing squares) with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# --------------------------------------------------------------------------------------------
# Absent gradients, strides of grad_out, saved tensors, grad mode.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res_kind", ["same", "float32"])
def test_absent_gradients_equal_zeros(res_kind):
    """An unused new residual (None to the kernel) gives the bits of a zero g_r; an unused out, those
    of a zero g. Rows of signed-zero g make -0.0 in dv, which B6's + (+0.0) turns into +0.0."""
    x, w, g, r, g_r = (to_torch(a) for a in backward_inputs(seeded_rng("absent", res_kind), (5, 40), "bfloat16",
                                                            res_kind, True))
    g[1:3] = torch.tensor([0.0, -0.0], dtype=g.dtype).repeat(20)
    absent = bi_backward(x, w, g, 1e-6, r, None)
    zeros = bi_backward(x, w, g, 1e-6, r, torch.zeros_like(r))
    # Without B6's add these rows hold -0.0 (the reference without a residual, on z in D): the
    # +0.0 that an absent g_r counts as is really exercised.
    new_res = bi_torch.rms_norm(x, w, 1e-6, r)[1].to(x.dtype)
    assert (ref_backward(*(to_numpy(t) for t in (new_res, w, g)))[0][1:3].view(np.uint16) == 0x8000).any()
    assert not to_numpy(absent[0][1:3]).view(np.uint16).any(), "grad_x of zero-g rows: not all +0.0"
    only_res = bi_backward(x, w, None, 1e-6, r, g_r)
    zero_out = bi_backward(x, w, torch.zeros_like(x), 1e-6, r, g_r)
    for what, pair in (("g_r absent vs zeros", (absent, zeros)), ("g absent vs zeros", (only_res, zero_out))):
        for e, a in zip(*pair):
            assert_bits(e, a, what)
    args = [to_numpy(t) for t in (x, w, g, r)]
    assert_bits(ref_backward(*args[:3], 1e-6, args[3])[0], absent[0], "absent g_r: grad_x vs reference")
    assert_bits(ref_backward(*args[:2], np.zeros_like(args[2]), 1e-6, args[3], to_numpy(g_r))[0], only_res[0],
                "absent g: grad_x vs reference with g = 0")


def test_non_contiguous_grad_out():
    """Output gradients with any strides (a transposed loss, expand, sum()) give the contiguous bits:
    copied when their rows have no single stride, read in place when they do (expand: stride 0)."""
    shape = (2, 3, 24)
    x, w, g, r, g_r = (to_torch(a) for a in backward_inputs(seeded_rng("strides"), shape, "float16", "float32", True))
    layouts = {"every other column": lambda t: torch.stack([t, t], -1).flatten(-2)[..., ::2],
               "columns apart": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
               "leading dimensions swapped": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
               "expanded row": lambda t: t[:1, :1].expand(shape)}
    for what, layout in layouts.items():
        assert not layout(g).is_contiguous(), what
        want = bi_backward(x, w, layout(g).contiguous(), 1e-6, r, layout(g_r).contiguous())
        got = bi_backward(x, w, layout(g), 1e-6, r, layout(g_r))
        for e, a in zip(want, got):
            assert_bits(e, a, f"{what} grad_out")
    ones = torch.ones((), dtype=g.dtype).expand(shape)  # what out.sum().backward() passes: strides (0, 0, 0)
    for e, a in zip(bi_backward(x, w, ones.contiguous(), 1e-6), bi_backward(x, w, ones, 1e-6)):
        if e is not None:
            assert_bits(e, a, "sum()'s grad_out")


def test_saved_tensors_are_the_inputs():
    """The backward keeps x (or the new residual) and the weight themselves: no float32 copy."""
    x, w, _, r, _ = (to_torch(a) for a in backward_inputs(seeded_rng("saved"), (3, 16), "bfloat16", "float32", False))
    x, w, r = x.requires_grad_(), w.requires_grad_(), r.requires_grad_()
    for residual in (None, r):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            result = bi_torch.rms_norm(x, w, 1e-6, residual)
        z = x if residual is None else result[1]
        assert [(t.data_ptr(), t.dtype) for t in saved] == [(z.data_ptr(), z.dtype), (w.data_ptr(), w.dtype)]


def test_same_dtype_residual_grads_are_separate_fields():
    """With a same-dtype residual one buffer is both gradients (B6: the same bits); the leaves' .grad
    must still not share memory, or an optimizer stepping one would move the other."""
    x, w, g, r, _ = (to_torch(a) for a in backward_inputs(seeded_rng("same"), (3, 16), "float16", "same", False))
    x, w, r = x.requires_grad_(), w.requires_grad_(), r.requires_grad_()
    out, new_res = bi_torch.rms_norm(x, w, 1e-6, r)
    (out * g).sum().backward()
    assert_bits(x.grad, r.grad, "grad_residual vs grad_x")
    assert x.grad.data_ptr() != r.grad.data_ptr()
    x_before = x.grad.clone()
    r.grad.zero_()
    assert_bits(x_before, x.grad, "x.grad after zeroing residual.grad")


def test_forward_bits_do_not_depend_on_grad_mode():
    x, w, _, r, _ = (to_torch(a) for a in backward_inputs(seeded_rng("fwd"), (4, 100), "bfloat16", "float32", False))
    with torch.no_grad():
        want = bi_torch.rms_norm(x, w, 1e-6, r)
    got = bi_torch.rms_norm(x.requires_grad_(), w.requires_grad_(), 1e-6, r.requires_grad_())
    assert got[0].requires_grad and got[1].requires_grad
    for e, a in zip(want, got):
        assert_bits(e, a.detach(), "forward with grad vs under no_grad")


# --------------------------------------------------------------------------------------------
# torch.compile: forward and backward in one graph each, eager's bits.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def backward_launches(monkeypatch):
    """Counts the backward kernel launches (the custom op's body looks launch_backward up at call time)."""
    calls = []
    original = bi_torch.autograd.launch_backward
    monkeypatch.setattr(bi_torch.autograd, "launch_backward", lambda *a: calls.append(a[0].shape) or original(*a))
    return calls


@pytest.mark.parametrize("res_kind,with_gr", [(None, False), ("float32", True), ("same", False)])
def test_compile_forward_backward_equals_eager(res_kind, with_gr, fresh_dynamo, backward_launches):
    """Inductor on CPU: AOTAutograd traces the registered formula (fullgraph: any graph break raises),
    and the compiled backward runs the kernel once per backward, as eager does."""
    compiled = torch.compile(bi_torch.rms_norm, fullgraph=True, backend="inductor")
    for k, shape in enumerate(((5, 1000), (2, 3, 1000))):
        args = backward_inputs(seeded_rng("compile", res_kind, k), shape, "bfloat16", res_kind, with_gr, specials=True)
        eager = check_backward(args, 1e-6, "llama", 1.0, f"eager {shape}")
        got = check_backward(args, 1e-6, "llama", 1.0, f"compiled {shape}", fn=compiled)
        for e, a in zip(eager, got):
            if e is not None:
                assert_bits(e, a, f"compiled vs eager {shape}")
    assert len(backward_launches) == 4  # eager and compiled, two shapes each


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")  # aot_eager's own
def test_compiled_graphs_hold_one_custom_op_each(fresh_dynamo):
    """AOTAutograd's forward graph calls bi_norm::add_rms_norm, its backward graph bi_norm::rms_norm_backward,
    and nothing else computes: no decomposition, no float32 copy saved between them."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    x, w, g, r, _ = (to_torch(a) for a in backward_inputs(seeded_rng("graphs"), (4, 64), "bfloat16", "float32", False))
    got = bi_backward(x, w, g, 1e-6, r, None, fn=torch.compile(bi_torch.rms_norm, fullgraph=True, backend=backend))
    assert_bits(bi_backward(x, w, g, 1e-6, r, None)[0], got[0], "aot_eager grad_x vs eager")
    ops = [[str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
           for graph in (*backend.fw_graphs, *backend.bw_graphs)]
    computing = [[op for op in graph if not op.startswith(("aten.detach", "<built-in function getitem"))]
                 for graph in ops]
    assert computing == [["bi_norm.add_rms_norm.default"], ["bi_norm.rms_norm_backward.default"]], ops


def test_compile_rmsnorm_module(fresh_dynamo):
    x, w, _, r, _ = (to_torch(a) for a in backward_inputs(seeded_rng("module-compile"), (4, 64), "float16", "float32",
                                                          False))
    grads = []
    for compiled in (False, True):
        m = bi_torch.RMSNorm(64, eps=1e-5, mode="fp32", dtype=torch.float16)
        with torch.no_grad():
            m.weight.copy_(w)
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        f = torch.compile(m, fullgraph=True) if compiled else m
        out, new_res = f(xs, rs)
        (out.float().square().sum() + new_res.sum()).backward()
        grads.append((xs.grad, rs.grad, m.weight.grad))
    for e, a in zip(*grads):
        assert_bits(e, a, "compiled RMSNorm gradients vs eager")


# --------------------------------------------------------------------------------------------
# What trains and what is inference only.
# --------------------------------------------------------------------------------------------


def test_rmsnorm_trains():
    """RMSNorm(n)(x).sum().backward() populates weight.grad (and x.grad) with the reference's bits."""
    x, w, *_ = backward_inputs(seeded_rng("module"), (3, 5, 48), "bfloat16", None, False)
    m = bi_torch.RMSNorm(48, eps=1e-5, dtype=torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(to_torch(w))
    xt = to_torch(x).requires_grad_()
    m(xt).sum().backward()
    e_x, _, e_w = ref_backward(x, w, np.ones_like(x), 1e-5)
    assert_bits(e_w, m.weight.grad, "RMSNorm weight.grad")
    assert_bits(e_x, xt.grad, "RMSNorm x.grad")
    before = m.weight.detach().clone()
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    assert not torch.equal(before, m.weight.detach())


def test_drop_in_without_residual_trains():
    """rms_norm_batch_invariant(x, w, eps) is rms_norm(mode="fp32") out of place, gradients included."""
    args = backward_inputs(seeded_rng("drop-in"), (4, 96), "bfloat16", None, False)
    check_backward(args, 1e-5, "fp32", 0.0, "drop-in",
                   fn=lambda x, w, eps, r, mode, weight_offset: bi_torch.rms_norm_batch_invariant(x, w, eps))


@pytest.mark.parametrize("call", ["fused_add_rms_norm_", "rms_norm_batch_invariant"])
@pytest.mark.parametrize("name", ["x", "residual", "weight"])
def test_inplace_calls_refuse_grad(call, name):
    """The in-place calls overwrite what a backward needs: a clear error naming the tensor, nothing written."""
    x, w, _, r, _ = (to_torch(a) for a in backward_inputs(seeded_rng("inplace"), (3, 16), "bfloat16", "float32", False))
    tensors = {"x": x, "residual": r, "weight": w}
    tensors[name].requires_grad_()
    fn = getattr(bi_torch, call)
    before = {k: to_numpy(t) for k, t in tensors.items()}
    with pytest.raises(RuntimeError, match=rf"^{name}: requires grad.*bi_torch\.rms_norm\(x, weight, eps, residual\)"):
        fn(x, r, w, 1e-6) if call == "fused_add_rms_norm_" else fn(x, w, 1e-6, r)
    for k, t in tensors.items():
        assert_bits(before[k], t, f"{k} written by a refused call")
    want = bi_torch.rms_norm(*(t.detach() for t in (x, w)), 1e-6, r.detach(), mode="fp32")
    with torch.no_grad():
        fn(x, r, w, 1e-6, mode="fp32") if call == "fused_add_rms_norm_" else fn(x, w, 1e-6, r)
    assert_bits(want[0], x, "in place under no_grad: x")
    assert_bits(want[1], r, "in place under no_grad: residual")


# --------------------------------------------------------------------------------------------
# torch.library checks: schemas, fakes, the autograd registration, AOT dispatch.
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
@pytest.mark.parametrize("res_kind", [None, "same", "float32"])
def test_opcheck_with_grad(res_kind):
    x, w, g, r, g_r = (to_torch(a) for a in backward_inputs(seeded_rng("opcheck", res_kind), (3, 40), "float16",
                                                            res_kind, res_kind is not None))
    if res_kind is None:
        forward = (torch.ops.bi_norm.rms_norm.default, (x.requires_grad_(), w.requires_grad_(), 1e-6, "llama", 0.0))
        z = x.detach()
    else:
        forward = (torch.ops.bi_norm.add_rms_norm.default,
                   (x.requires_grad_(), r.requires_grad_(), w.requires_grad_(), 1e-5, "fp32", 1.0))
        z = bi_torch.rms_norm(x.detach(), w.detach(), 1e-5, r.detach())[1]
    torch.library.opcheck(*forward)
    torch.library.opcheck(torch.ops.bi_norm.rms_norm_backward.default,
                          (z, w.detach(), g, g_r, 1e-6, "llama", 0.0, res_kind is not None))
