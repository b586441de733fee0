"""`bi-norm verify`: every backend against the golden corpus, bit for bit, and a batch-invariance sweep.

- run: the plan (which cases and batches each pass takes) and running it, backends side by side;
- backends: each backend behind one numpy-in, numpy-out function per pass;
- checks: how a pass checks a runner (the corpus, the sweep);
- crossframework: the torch-jax-dlpack row (bridge.interop's checks);
- compare: bitwise comparison through integer views;
- report: what a pass and a backend report.

Imports bridge.numerics, bridge.golden and bridge.interop; the frameworks inside functions only.
"""
