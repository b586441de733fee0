"""The golden corpus: reproducible from the reference, digest-checked, and covering the contract."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bridge import golden, reference
from bridge.golden import backward as golden_backward
from bridge.golden import forward as golden_forward
from bridge.golden import fp8 as golden_fp8
from bridge.numerics.contract import GROUP_AMAX_FLOOR, GROUP_SIZES, next_power_of_two


def test_regeneration_reproduces_identical_bytes() -> None:
    assert golden.check_regeneration() == []


@pytest.mark.parametrize("load,specs,victim", [
    (golden.load_corpus, golden_forward.case_specs, "float16-n128-res_same"),
    (golden.load_backward_corpus, golden_backward.case_specs, "bwd-float16-n129-r7-res_same"),
    (golden.load_fp8_corpus, golden_fp8.case_specs, "fp8-float16-n192-r7-res_float32-g64"),
])
def test_load_rejects_a_changed_file(tmp_path: Path, load, specs, victim: str) -> None:
    corpus_dir = tmp_path / "golden"
    shutil.copytree(golden.DEFAULT_DIR, corpus_dir)
    assert len(load(corpus_dir)) == len(specs())  # the copy loads as it is
    path = corpus_dir / f"{victim}.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{victim}.npz does not match its SHA-256"):
        load(corpus_dir)


def test_corpus_covers_the_contract(corpus) -> None:
    specs = [case.spec for case in corpus]
    assert {s.dtype for s in specs} == {"float32", "bfloat16", "float16"}
    # Every (mode, weight_offset) pair for every dtype, not just somewhere in the corpus.
    pairs = {(s.dtype, mode, offset) for s in specs for mode, offset in s.outputs}
    assert pairs == {(d, m, o) for d in golden_forward.DTYPES for m in ("llama", "fp32") for o in (0.0, 1.0)}
    assert {s.residual for s in specs} == {"none", "same", "float32"}
    assert {s.n for s in specs} == set(golden_forward.SIZES)
    assert {p for s in specs for p in s.patterns} == set(golden_forward.PATTERNS)
    for case in corpus:  # each case holds what its spec says
        assert case.x.shape == (len(case.spec.patterns), case.spec.n)
        assert (case.residual is None) == (case.spec.residual == "none") == (case.new_residual is None)
        assert set(case.out) == set(case.spec.outputs)


@pytest.fixture(scope="module")
def fp8_corpus():
    return golden.load_fp8_corpus()


def test_manifest_lists_every_case_loaded(corpus, backward_corpus, fp8_corpus) -> None:
    # The kernel tests parametrise over the manifest's names: this keeps them covering every case.
    manifest = golden.load_manifest()
    names = [entry["name"] for entry in manifest["cases"]]
    assert [c.spec.name for c in corpus] == names
    assert len(names) > 100
    # Backward cases in a list of their own, so that callers of "cases" see only forward cases.
    backward = manifest["backward_cases"]
    assert [entry["name"] for entry in backward] == list(backward_corpus) and len(backward) > 50
    assert all(entry["kind"] == "backward" for entry in backward)
    assert not {e["file"] for e in backward} & {e["file"] for e in manifest["cases"]}
    # FP8 cases (v1.2) in a third list, exactly golden_fp8's specs.
    fp8 = manifest["fp8_cases"]
    assert [entry["name"] for entry in fp8] == [c.spec.name for c in fp8_corpus] == [
        s.name for s in golden_fp8.case_specs()]
    assert all(entry["kind"] == "fp8" for entry in fp8) and len(fp8) > 30
    assert not {e["file"] for e in fp8} & {e["file"] for e in manifest["cases"] + backward}
    assert manifest["contract_version"] == "1.2"


def test_corpus_size() -> None:
    sizes = {p.name: p.stat().st_size for p in golden.DEFAULT_DIR.iterdir()}
    backward = sum(size for name, size in sizes.items() if name.startswith("bwd-"))
    fp8 = sum(size for name, size in sizes.items() if name.startswith("fp8-"))
    forward = sum(sizes.values()) - backward - fp8
    assert forward < 8 * 2**20, f"forward corpus is {forward / 2**20:.1f} MiB"
    assert backward < 7 * 2**20, f"backward corpus is {backward / 2**20:.1f} MiB"
    assert fp8 < 2 * 2**20, f"FP8 corpus is {fp8 / 2**20:.1f} MiB"


def test_backward_corpus_covers_the_contract(backward_corpus) -> None:
    cases = list(backward_corpus.values())
    specs = [c.spec for c in cases]
    pairs = {(s.dtype, mode, offset) for s in specs for mode, offset in s.outputs}
    # Every pair for every dtype, and the sign cases' negative offset, which makes a masked column's
    # a = 0 * offset a -0.0 (golden_backward.EDGE_CASES): exactly these.
    assert pairs == ({(d, m, o) for d in golden_forward.DTYPES for m in ("llama", "fp32") for o in (0.0, 1.0)}
                     | {(d, "fp32", -0.5) for d in golden_forward.DTYPES})
    # Every residual kind with and without grad_new_residual, per dtype (float32's "same" is float32).
    variants = {(s.dtype, s.residual, s.grad_new_residual) for s in specs}
    assert variants == {(d, r, g) for d in golden_forward.DTYPES for r, g in golden_backward.VARIANTS
                        if not (d == "float32" and r == "same")}
    assert {s.n for s in specs} >= {1, 3, 127, 128, 129, 1000, 4096, 5120, 8192, 16384, 65536}
    assert {p for s in specs for p in s.x_patterns} == set(golden_forward.PATTERNS) | {"positive"}
    assert {p for s in specs for p in s.g_patterns} == set(golden_backward.G_PATTERNS) | {"mixed", "negative_zeros"}
    rows = {len(s.x_patterns) for s in specs}
    # Row counts whose +0.0 padding is several power-of-two blocks (65: 63 = 32+16+...), and one row.
    assert {1, 3, 7, 33, 65, 100} <= rows
    assert max(len(s.x_patterns) for s in specs if s.n >= 4096) <= 3  # interpreters run these in CI
    assert sum(len(s.x_patterns) * s.n for s in specs) < 400_000
    for case in cases:  # each case holds what its spec says
        shape = (len(case.spec.x_patterns), case.spec.n)
        assert case.x.shape == case.grad_out.shape == shape and len(case.spec.g_patterns) == shape[0]
        assert (case.residual is None) == (case.spec.residual == "none")
        assert (case.grad_new_residual is not None) == case.spec.grad_new_residual
        assert set(case.expected) == set(case.spec.outputs)
        for outputs in case.expected.values():
            assert [a.shape for a in outputs] == [shape] * (len(outputs) - 1) + [(case.spec.n,)]


def _quant(spec) -> str:
    return "static" if spec.scale is not None else "group"


def test_fp8_corpus_covers_the_contract(fp8_corpus) -> None:
    specs = [c.spec for c in fp8_corpus]
    # Both scalings, every (mode, offset) pair and every residual kind, for every dtype.
    pairs = {(s.dtype, _quant(s), m, o) for s in specs for m, o in s.outputs}
    assert pairs == {(d, q, m, o) for d in golden_forward.DTYPES for q in ("static", "group")
                     for m in ("llama", "fp32") for o in (0.0, 1.0)}
    kinds = {(s.dtype, _quant(s), s.residual) for s in specs}
    assert kinds == {(d, q, r) for d in golden_forward.DTYPES for q in ("static", "group")
                     for r in ("none", "same", "float32") if not (d == "float32" and r == "same")}
    groups = {(s.dtype, s.group_size) for s in specs if s.group_size}
    assert groups == {(d, g) for d in golden_forward.DTYPES for g in GROUP_SIZES}
    assert {s.out_dtype for s in specs} == {"float8_e4m3fn"}
    assert {p for s in specs for p in s.patterns} == set(golden_fp8.PATTERNS)
    assert {s.weight for s in specs} == set(golden_fp8.WEIGHTS)
    # n from 64 to past one 16384-element chunk for both scalings; a static n that is no multiple of 64.
    assert min(s.n for s in specs) == 64 and {_quant(s) for s in specs if s.n > 16384} == {"static", "group"}
    assert any(s.n % 64 for s in specs if s.scale is not None)
    assert max(len(s.patterns) for s in specs if s.n > 4096) <= 2  # interpreters run these in CI
    rows = {len(s.patterns) for s in specs}
    assert {3, 5, 7, 9, 12} <= rows
    assert sum(len(s.patterns) * s.n for s in specs) < 150_000
    assert {c.scale.shape for c in fp8_corpus if c.scale is not None} == {(), (1,)}
    for case in fp8_corpus:  # each case holds what its spec says
        shape = (len(case.spec.patterns), case.spec.n)
        assert case.x.shape == shape and (case.residual is None) == (case.spec.residual == "none")
        assert (case.new_residual is None) == (case.residual is None)
        assert set(case.out) == set(case.spec.outputs)
        assert all(out.dtype.name == "float8_e4m3fn" and out.shape == shape for out in case.out.values())
        if case.spec.scale is None:
            assert case.scale is None and set(case.scales) == set(case.spec.outputs)
            assert all(s.dtype == np.float32 and s.shape == (shape[0], shape[1] // case.spec.group_size)
                       for s in case.scales.values())
        else:
            assert case.scale.dtype == np.float32 and float(case.scale.reshape(())) == case.spec.scale
            assert case.scales == {}


def test_fp8_corpus_reaches_the_special_values(fp8_corpus) -> None:
    """Per dtype: rows that saturate almost entirely and rows mostly among FP8's subnormals (static),
    subnormals per group, NaN (0x7F), +-0, +-448; the floor's scale and an infinite one."""
    floor = np.float32(np.float32(GROUP_AMAX_FLOOR) / np.float32(448))
    for d in golden_forward.DTYPES:
        cases = [c for c in fp8_corpus if c.spec.dtype == d]
        codes = {int(v) for c in cases for out in c.out.values() for v in np.unique(out.view(np.uint8))}
        assert {0x00, 0x80, 0x7F, 0x7E, 0xFE} | set(range(1, 8)) | set(range(0x81, 0x88)) <= codes, d
        assert 0xFF not in codes  # the one NaN is 0x7F

        def most(quant: str, pick, share: float) -> bool:
            return any(np.mean(pick(row.view(np.uint8) & 0x7F)) > share for c in cases if _quant(c.spec) == quant
                       for out in c.out.values() for row in out)

        assert most("static", lambda a: a == 0x7E, 0.75), d
        assert most("static", lambda a: (a > 0) & (a < 8), 0.5), d
        assert most("group", lambda a: (a > 0) & (a < 8), 0.1), d
        assert any(np.any(s == floor) for c in cases for s in c.scales.values()), d
    assert any(np.any(np.isinf(s)) for c in fp8_corpus for s in c.scales.values())


def test_fp8_corpus_has_groups_whose_clamp_matters(fp8_corpus) -> None:
    """s = rn(amax / 448) rounded down makes rn(amax / s) > 448 for the group's largest value: the
    clamp, not the scale, keeps it in range. Seen on the float32 cases, where u is the forward's out."""
    seen = 0
    for case in fp8_corpus:
        if case.spec.dtype != "float32" or case.spec.group_size is None:
            continue
        for (mode, offset), scales in case.scales.items():
            u = reference.rms_norm(case.x, case.weight, case.spec.eps, case.residual, mode=mode, weight_offset=offset)
            u = u if case.residual is None else u[0]
            groups = u.reshape(u.shape[0], -1, case.spec.group_size)
            amax = np.where(np.isnan(groups), np.float32(0), np.abs(groups)).max(axis=-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                seen += int(np.sum(np.isfinite(amax) & (amax > 0) & (amax / scales > np.float32(448))))
    assert seen > 10


def _single_row_leaves(case, mode: str, offset: float) -> np.ndarray:
    """p = rn(g * h) of every row, as rnD(p): a one-row call's grad_weight is its row's leaf."""
    return np.stack([reference.rms_norm_backward(
        case.x[i:i + 1], case.weight, case.grad_out[i:i + 1], case.spec.eps,
        None if case.residual is None else case.residual[i:i + 1], mode=mode, weight_offset=offset)[-1]
        for i in range(case.x.shape[0])])


NEG_ZERO = {"float32": 0x80000000, "bfloat16": 0x8000, "float16": 0x8000}


def test_backward_corpus_has_columns_of_negative_zero_leaves(backward_corpus) -> None:
    """Columns whose every leaf p is -0.0: their tree is -0.0 without padding and +0.0 with the
    contract's +0.0 padding, which catches -0.0 padding, padding too far and a missing one."""
    seen = set()
    for case in backward_corpus.values():
        rows = case.x.shape[0]
        if rows > 7:
            continue  # 2^-rows of the columns at most: none in practice
        for (mode, offset), outputs in case.expected.items():
            # A zero g makes p exactly ±0 (h is finite there), so rnD(p) = -0.0 means p = -0.0.
            leaves = _single_row_leaves(case, mode, offset)
            column = np.all((reference.bits(leaves) == NEG_ZERO[case.spec.dtype]) & (case.grad_out == 0), axis=0)
            if not column.any():
                continue
            padded = next_power_of_two(rows) != rows
            want = 0 if padded else NEG_ZERO[case.spec.dtype]
            assert np.all(reference.bits(outputs[-1])[column] == want), case.spec.name
            seen.add((case.spec.dtype, padded))
    assert seen == {(d, p) for d in golden_forward.DTYPES for p in (False, True)}


def test_backward_corpus_has_negative_zero_dv_with_absent_grad_new_residual(backward_corpus) -> None:
    """dz = dv + 0.0 turns a -0.0 dv into +0.0: some cases must have such a dv, for every dtype."""
    dtypes = set()
    for case in backward_corpus.values():
        # A float32 residual, so that grad_residual is dz itself (rnR rounds nothing in float32).
        if case.spec.residual != "float32" or case.grad_new_residual is not None:
            continue
        for (mode, offset), (grad_x, grad_residual, _) in case.expected.items():
            # With g_r = -0.0 everywhere, dz = dv + (-0.0) is dv itself, so grad_residual shows dv.
            minus_zero = np.full(case.residual.shape, -0.0, np.float32)
            dv = reference.rms_norm_backward(case.x, case.weight, case.grad_out, case.spec.eps, case.residual,
                                             minus_zero, mode=mode, weight_offset=offset)[1]
            negative = reference.bits(dv) == NEG_ZERO["float32"]
            if negative.any():
                assert np.all(reference.bits(grad_residual)[negative] == 0), case.spec.name
                assert np.all(reference.bits(grad_x)[negative] == 0), case.spec.name
                dtypes.add(case.spec.dtype)
    assert dtypes == set(golden_forward.DTYPES)


def test_import_bridge_needs_no_framework() -> None:
    # A subprocess: this test session may already have torch or jax loaded.
    code = ("import sys, bridge, bridge.golden, bridge.numerics.subnormals, bridge.verify.run, bridge.cli; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
