"""Loading a Hugging Face RMSNorm weight into bi_jax's flax modules, bit for bit.

The weight may be a torch tensor (a state_dict entry) or a numpy array (safetensors' numpy
loader; bfloat16 as ml_dtypes.bfloat16). Both go through integer views, which round nothing
(NaN payloads, -0.0, bfloat16 without a float32 detour), so the JAX array has the checkpoint's
bits. torch is imported only when a torch tensor is given.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bridge.numerics import reference

_INT_VIEWS = {"float32": np.int32, "bfloat16": np.int16, "float16": np.int16}


def _is_torch_tensor(value: Any) -> bool:
    # Checked by name so a numpy-only caller never imports torch.
    return any(c.__module__ == "torch" and c.__name__ == "Tensor" for c in type(value).__mro__)


def _numpy_bits(weight: Any, name: str) -> Tuple[np.ndarray, str]:
    """(integer view of weight's bits, contract dtype name); TypeError naming `name` otherwise."""
    if _is_torch_tensor(weight):
        import torch

        names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        if weight.dtype not in names:
            raise TypeError(f"{name}: expected float32, bfloat16 or float16; got torch {weight.dtype}")
        dtype = names[weight.dtype]
        ints_dtype = {np.int32: torch.int32, np.int16: torch.int16}[_INT_VIEWS[dtype]]
        ints = weight.detach().cpu().contiguous().view(ints_dtype).numpy().copy()
        return ints, dtype
    if isinstance(weight, np.ndarray):
        dtype = reference.dtype_name(weight.dtype)
        if dtype not in _INT_VIEWS:
            raise TypeError(f"{name}: expected float32, bfloat16 or float16; got numpy {weight.dtype}")
        return np.ascontiguousarray(weight).view(_INT_VIEWS[dtype]), dtype
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray; got {type(weight).__name__}")


def hf_weight_to_jax(weight: Any, *, hidden_size: int, dtype: Any, name: str = "weight") -> jax.Array:
    """weight as a jax.Array with its exact bits, after checking shape (hidden_size,) and dtype.

    A dtype mismatch is an error, not a cast: rounding a checkpoint would change every output bit.
    """
    ints, got = _numpy_bits(weight, name)
    want = jnp.dtype(dtype).name
    if ints.shape != (hidden_size,):
        raise ValueError(f"{name}: expected shape ({hidden_size},) (the module's hidden_size); got {tuple(ints.shape)}")
    if got != want:
        raise TypeError(f"{name}: expected dtype {want} (the module's weight dtype); got {got}. "
                        "Cast the checkpoint explicitly if that is intended.")
    return jax.lax.bitcast_convert_type(jnp.asarray(ints), jnp.dtype(dtype))


def load_hf_weight(module: Any, weight: Any, params: Optional[Mapping[str, Any]] = None
                   ) -> Optional[Dict[str, Any]]:
    """Load an HF RMSNorm weight into bi_jax.RMSNorm (nnx) or bi_jax.LinenRMSNorm.

    nnx: sets module.weight in place and returns None. linen (modules hold no state): returns
    {"params": {"weight": array}}, or a copy of `params` with ["params"]["weight"] replaced
    (`params` itself is not modified).
    """
    from .linen import RMSNorm as LinenRMSNorm
    from .module import RMSNorm as NnxRMSNorm

    if isinstance(module, NnxRMSNorm):
        if params is not None:
            raise TypeError("params: only for a linen module; an nnx module holds its own weight")
        module.weight.set_value(hf_weight_to_jax(weight, hidden_size=module.hidden_size,
                                                 dtype=module.weight[...].dtype))
        return None
    if isinstance(module, LinenRMSNorm):
        array = hf_weight_to_jax(weight, hidden_size=module.hidden_size, dtype=module.dtype)
        params = {} if params is None else dict(params)
        return {**params, "params": {**params.get("params", {}), "weight": array}}
    raise TypeError(f"module: expected bi_jax.RMSNorm or bi_jax.LinenRMSNorm; got {type(module).__name__}")
