"""The golden corpus: reproducible from the reference, digest-checked, and covering the contract."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge import golden


def test_regeneration_reproduces_identical_bytes() -> None:
    assert golden.check_regeneration() == []


def test_load_corpus_rejects_a_changed_file(tmp_path: Path) -> None:
    corpus_dir = tmp_path / "golden"
    shutil.copytree(golden.DEFAULT_DIR, corpus_dir)
    assert len(golden.load_corpus(corpus_dir)) == len(golden.case_specs())  # the copy loads as it is
    victim = corpus_dir / "float16-n128-res_same.npz"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="float16-n128-res_same.npz does not match its SHA-256"):
        golden.load_corpus(corpus_dir)


def test_corpus_covers_the_contract(corpus) -> None:
    specs = [case.spec for case in corpus]
    assert {s.dtype for s in specs} == {"float32", "bfloat16", "float16"}
    # Every (mode, weight_offset) pair for every dtype, not just somewhere in the corpus.
    pairs = {(s.dtype, mode, offset) for s in specs for mode, offset in s.outputs}
    assert pairs == {(d, m, o) for d in golden.DTYPES for m in ("llama", "fp32") for o in (0.0, 1.0)}
    assert {s.residual for s in specs} == {"none", "same", "float32"}
    assert {s.n for s in specs} == set(golden.SIZES)
    assert {p for s in specs for p in s.patterns} == set(golden.PATTERNS)
    for case in corpus:  # each case holds what its spec says
        assert case.x.shape == (len(case.spec.patterns), case.spec.n)
        assert (case.residual is None) == (case.spec.residual == "none") == (case.new_residual is None)
        assert set(case.out) == set(case.spec.outputs)


def test_manifest_lists_every_case_loaded(corpus) -> None:
    # The kernel tests parametrise over the manifest's names: this keeps them covering every case.
    names = [entry["name"] for entry in golden.load_manifest()["cases"]]
    assert [c.spec.name for c in corpus] == names
    assert len(names) > 100


def test_corpus_size() -> None:
    total = sum(p.stat().st_size for p in golden.DEFAULT_DIR.iterdir())
    assert total < 8 * 2**20, f"golden corpus is {total / 2**20:.1f} MiB"


def test_import_bridge_needs_no_framework() -> None:
    # A subprocess: this test session may already have torch or jax loaded.
    code = ("import sys, bridge, bridge.golden, bridge.verify, bridge.cli; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
