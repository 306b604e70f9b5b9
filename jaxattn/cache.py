"""KV caches: quantization (int8, float8) and writing new tokens into contiguous or paged caches.

A quantized cache holds int8 or float8 elements and, per (token, kv head), a float32 scale: the
dequantised value of element ``x[..., h]`` is ``x[..., h] * scale[...]``. ``decode_attention``
and ``paged_decode_attention`` read such caches directly (dequantising in registers).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Cache element types decode reads besides the query's own dtype, with the largest magnitude
# each represents (symmetric absmax quantization maps a row's absmax there).
QUANTIZED_CACHE_DTYPES: dict[np.dtype, float] = {
    jnp.dtype(jnp.int8): 127.0,
    jnp.dtype(jnp.float8_e4m3fn): float(jnp.finfo(jnp.float8_e4m3fn).max),  # 448
    jnp.dtype(jnp.float8_e5m2): float(jnp.finfo(jnp.float8_e5m2).max),  # 57344
}


def quantized_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``dtype`` as one of QUANTIZED_CACHE_DTYPES; TypeError naming ``name`` otherwise."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name} must be int8, float8_e4m3fn or float8_e5m2, got {dtype!r}") from e
    if dt not in QUANTIZED_CACHE_DTYPES:
        raise TypeError(f"{name} must be int8, float8_e4m3fn or float8_e5m2, got {dt}")
    return dt


def is_quantized(dtype: Any) -> bool:
    """Whether ``dtype`` is a quantized cache element type."""
    return jnp.dtype(dtype) in QUANTIZED_CACHE_DTYPES


def quantize_kv(x: Any, dtype: Any) -> tuple[Array, Array]:
    """Symmetric absmax quantization per row of the last axis (per token and kv head).

    Args:
      x: keys or values ``[..., H]`` (e.g. ``[B, S, K, H]``), any float dtype; finite.
      dtype: ``jnp.int8``, ``jnp.float8_e4m3fn`` or ``jnp.float8_e5m2``.

    Returns:
      ``(values [..., H] in dtype, scales [...] float32)`` with ``values * scales[..., None]``
      approximating ``x``: ``scale = max|row| / M`` (M = 127 for int8, the largest finite
      float8 otherwise) so the row's largest element maps to ±M; int8 rounds to nearest (ties
      to even), float8 converts with round-to-nearest-even. An all-zero row has scale 0.
    """
    dt = quantized_dtype(dtype)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"x must have at least one axis (the head dim), got shape {x.shape}")
    xf = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(xf), axis=-1) if x.shape[-1] else jnp.zeros(x.shape[:-1],
                                                                          jnp.float32)
    scale = absmax / np.float32(QUANTIZED_CACHE_DTYPES[dt])
    scaled = xf / jnp.where(scale > 0, scale, 1.0)[..., None]
    if dt == jnp.dtype(jnp.int8):
        values = jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8)
    else:
        values = scaled.astype(dt)
    return values, scale


def dequantize_kv(values: Any, scales: Any, dtype: Any = jnp.float32) -> Array:
    """``values * scales[..., None]`` in ``dtype``: the cache ``quantize_kv`` stands for (for
    tests and for reading a quantized cache outside decode)."""
    values = jnp.asarray(values)
    scales = jnp.asarray(scales, jnp.float32)
    return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)
