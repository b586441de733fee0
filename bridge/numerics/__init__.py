"""The numerics contract, the bottom of bridge: every other part builds on it, it imports none.

- contract: contract v1.2's constants and argument rules (NUMERICS.md is the prose);
- reference, reference_fp8: the executable contract in numpy float32, forward, backward and FP8;
- tiling: the launch configurations both kernels share (a row's bits never depend on them);
- subnormals: which gradient bits XLA:CPU's flush-to-zero changes.

numpy and ml_dtypes only: never torch or jax.
"""
