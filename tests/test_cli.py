"""`bi-norm` through bridge.cli.main: exit codes, the JSON report, and failures that must be caught."""

from __future__ import annotations

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

REPORT_KEYS = {"backend", "status", "cases", "checks", "mismatches", "invariance_checks", "invariance_mismatches",
               "first_mismatch"}
# A case that --quick still runs (n <= 1025) and the invariance sweep uses (n = 128, residual none).
VICTIM = "bfloat16-n128-res_none"


@pytest.fixture
def corpus_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "golden"
    shutil.copytree(golden.DEFAULT_DIR, directory)
    return directory


def _flip_expected_bit(directory: Path, case: str) -> str:
    """Flip the lowest bit of element (2, 5) of one stored output and re-sign the file in the manifest,
    so that digests pass and only the bitwise comparison can notice. Returns the output's key."""
    path = directory / f"{case}.npz"
    with zipfile.ZipFile(path) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    key = next(name for name in sorted(entries) if name.startswith("out_"))
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
    for entry in manifest["cases"]:
        if entry["name"] == case:
            entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (directory / golden.MANIFEST).write_text(json.dumps(manifest))
    return key[:-len(".npy")]


def test_verify_reference_json(capsys) -> None:
    assert main(["verify", "--backend", "reference", "--quick", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["contract_version"] == "1.1" and doc["ok"] is True
    [report] = doc["backends"]
    assert REPORT_KEYS <= set(report)
    assert report["backend"] == "reference" and report["status"] == "ok"
    assert report["cases"] > 0 and report["checks"] >= 2 * report["cases"] and report["invariance_checks"] > 0
    assert report["mismatches"] == report["invariance_mismatches"] == 0 and report["first_mismatch"] == ""


def test_verify_table(capsys) -> None:
    assert main(["verify", "--backend", "reference", "--quick", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "OK: every available backend matches" in out


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
    assert doc["ok"] is False and report["status"] == "mismatch" and report["mismatches"] == 1
    mode, offset = key[len("out_"):].split("_offset")
    assert report["first_mismatch"].startswith(f"{VICTIM} {mode}/{offset} out: 1 of ")
    assert "first at index (2, 5)" in report["first_mismatch"]
    # The invariance sweep recomputes from the inputs, which are intact.
    assert report["invariance_mismatches"] == 0

    assert main(["verify", "--backend", "reference", "--quick", "--corpus", str(corpus_copy)]) == 1
    table = capsys.readouterr().out
    assert f"{VICTIM} {mode}/{offset} out" in table and "FAILED: reference" in table


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
        del one["seconds"], two["seconds"]
        assert two == one and two["mismatches"] == 1 and VICTIM in two["first_mismatch"]


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
