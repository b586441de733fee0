"""The golden corpus: cases generated from the reference, on disk with SHA-256 digests.

- forward, backward, fp8: each kind's case list, inputs and expected outputs (backward and fp8
  build on forward's row patterns and weights);
- storage: how one case is stored (a deterministic zip of bit patterns);
- corpus: the cases on disk: written, checked against regeneration, their digests (SHA256SUMS,
  shipped in the package);
- cache: where the corpus is: tests/golden/ in a checkout; installed from a wheel, regenerated
  into a cache and checked against SHA256SUMS;
- load: the cases read back, digests checked.

Imports bridge.numerics only. The loaders below are the package's interface (tests/conftest.py,
bridge.verify, the README).
"""

from .cache import CorpusError, corpus_dir
from .corpus import DEFAULT_DIR, MANIFEST, check_regeneration, regenerate
from .load import load_backward_corpus, load_corpus, load_fp8_corpus, load_manifest

__all__ = ["DEFAULT_DIR", "MANIFEST", "CorpusError", "check_regeneration", "corpus_dir", "load_backward_corpus",
           "load_corpus", "load_fp8_corpus", "load_manifest", "regenerate"]
