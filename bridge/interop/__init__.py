"""bi_torch and bi_jax on each other's arrays, and their bits compared on the same device memory.

- dlpack: zero-copy hand-over between torch and JAX, with checks first, and the GPU memory policy
  (`from bridge import dlpack` imports it);
- device: what the cross-framework checks share (whether both kernels run here, the device, the
  first bit difference, found on the device);
- crossframework: each framework's kernel on the other's arrays, and the forward's check;
- backward, fp8: the gradients' and the FP8 output's checks.

Imports bridge.numerics only; torch, jax, bi_torch and bi_jax are imported inside functions.
"""
