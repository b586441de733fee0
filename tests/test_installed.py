"""bi-norm installed from a wheel, outside the checkout: every subpackage is in the wheel, and the
corpus (which the wheel does not carry) is regenerated into a cache and checked against the SHA-256
digests it does carry (bridge.golden.cache)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bridge import golden
from bridge.cli import main
from bridge.golden import cache, corpus

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("bridge", "bi_torch", "bi_jax")


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _pinned(name: str) -> str:
    """name==the version this test runs with, so that the fresh venv gets the same numerics."""
    return f"{name}=={importlib.metadata.version(name)}"


def test_an_installed_wheel_verifies_and_benches_outside_the_checkout(tmp_path: Path) -> None:
    # The wheel is built from a copy of what it packages, so that the checkout gets no build/.
    src = tmp_path / "src"
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    pip = (sys.executable, "-m", "pip")
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src))
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {p.parent.relative_to(REPO).as_posix() for top in PACKAGES for p in (REPO / top).rglob("__init__.py")}
    assert packages <= {n.rpartition("/")[0] for n in names}, "a subpackage is missing from the wheel"
    assert "bridge/golden/SHA256SUMS" in names and not any(n.startswith("tests/") for n in names)

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))  # pip runs from here, through --python
    _run(*pip, "--python", str(venv / "bin" / "python"), "install", "-q", str(wheel), _pinned("numpy"),
         _pinned("ml_dtypes"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bi_norm = str(venv / "bin" / "bi-norm")

    lines = _run(bi_norm, "verify", "--quick", "--backend", "reference", cwd=elsewhere, env=env).stdout.splitlines()
    assert lines[2].split()[:3] == ["reference", "forward", "ok"]
    assert [line.split()[:2] for line in lines[3:5]] == [["backward", "ok"], ["fp8", "ok"]]
    assert lines[-1] == "OK: every available backend matches the golden corpus bit for bit."
    assert len(list((tmp_path / "cache" / "bi-norm").glob(f"golden-*/{golden.MANIFEST}"))) == 1

    assert _run(bi_norm, "golden", "--check", cwd=elsewhere, env=env).stdout.splitlines()[-1] == \
        "golden corpus reproduces bit for bit"
    out = _run(bi_norm, "bench", "--dry-run", "--out", "bench-out", cwd=elsewhere, env=env).stdout
    assert "# synthetic (--dry-run): no GPU was used" in out and (elsewhere / "bench-out" / "bench.csv").is_file()
    where = _run(str(venv / "bin" / "python"), "-c", "import bridge; print(bridge.__file__)", cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), "the checkout's bridge ran, not the wheel's"


def test_the_cache_holds_the_committed_corpus_and_is_reused(tmp_path: Path, monkeypatch) -> None:
    directory = cache.cached_corpus(tmp_path)
    committed = sorted(golden.DEFAULT_DIR.iterdir())
    assert sorted(p.name for p in directory.iterdir()) == [p.name for p in committed]
    for path in committed:
        assert (directory / path.name).read_bytes() == path.read_bytes(), path.name
    monkeypatch.setattr(cache, "corpus_files", lambda: pytest.fail("regenerated a complete cache"))
    assert cache.cached_corpus(tmp_path) == directory


def test_a_damaged_cache_is_made_again(tmp_path: Path) -> None:
    directory = cache.cached_corpus(tmp_path)
    (directory / golden.MANIFEST).write_text("{}")
    assert cache.cached_corpus(tmp_path) == directory
    assert (directory / golden.MANIFEST).read_bytes() == (golden.DEFAULT_DIR / golden.MANIFEST).read_bytes()


def test_a_regeneration_that_misses_a_digest_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    lines = corpus.DIGESTS.read_text().splitlines()
    victim = lines[0].split("  ", 1)[1]
    digests = tmp_path / "SHA256SUMS"
    digests.write_text("\n".join(["0" * 64 + lines[0][64:]] + lines[1:]) + "\n")
    monkeypatch.setattr(cache, "DIGESTS", digests)
    with pytest.raises(golden.CorpusError, match=rf"1 file\(s\) differ .*\(first: {victim}\)"):
        cache.cached_corpus(tmp_path / "cache")
    assert not (tmp_path / "cache").exists(), "a corpus that failed its digests was written"
    # As installed (no tests/golden/), `bi-norm verify` reports it and exits 2.
    monkeypatch.setattr(cache, "DEFAULT_DIR", tmp_path / "no-checkout")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["verify", "--backend", "reference", "--quick"]) == 2
    assert "differ from the SHA-256 digests" in capsys.readouterr().err
