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

from jaxattn import _ffi

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


# ------------------------------------------------------------------------------------ writes


def _token_positions(positions: Any, batch: int, q_len: int) -> Array:
    """Absolute positions [B, T] int32 from ``positions`` [B] (the first) or [B, T]."""
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be an integer array, got dtype {positions.dtype}")
    if positions.shape == (batch,):
        return positions.astype(jnp.int32)[:, None] + jnp.arange(q_len, dtype=jnp.int32)
    if positions.shape == (batch, q_len):
        return positions.astype(jnp.int32)
    raise ValueError(f"positions must have shape [B] (the first position of each sequence's new "
                     f"tokens) or [B, T] with B={batch}, T={q_len}, got {list(positions.shape)}")


def _check_new(cache: Array, new: Any, name: str, cache_name: str, batch: int | None) -> Array:
    new = jnp.asarray(new)
    if new.ndim != 4:
        raise ValueError(f"{name} must have shape [B, T, K, H], got {new.shape}")
    if not jnp.issubdtype(new.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {new.dtype}")
    if new.shape[2:] != cache.shape[2:]:
        raise ValueError(f"{name} {new.shape} must match {cache_name} {cache.shape} in the kv "
                         f"heads and head dim (the last two axes)")
    if batch is not None and new.shape[0] != batch:
        raise ValueError(f"{name} batch {new.shape[0]} must equal the cache batch {batch}")
    return new


def _check_cache(key_cache: Any, value_cache: Any, key_scale: Any, value_scale: Any,
                 names: tuple[str, str]) -> tuple[Array, Array, Array | None, Array | None]:
    key_cache, value_cache = jnp.asarray(key_cache), jnp.asarray(value_cache)
    for x, name in zip((key_cache, value_cache), names):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4, got shape {x.shape}")
        if not (jnp.issubdtype(x.dtype, jnp.floating) or x.dtype in QUANTIZED_CACHE_DTYPES):
            raise TypeError(f"{name} must be a float or quantized (int8, float8) array, got "
                            f"{x.dtype}")
    if key_cache.shape[:3] != value_cache.shape[:3]:
        raise ValueError(f"{names[0]} {key_cache.shape} and {names[1]} {value_cache.shape} "
                         f"must agree on all but the last axis")
    quantized = key_cache.dtype in QUANTIZED_CACHE_DTYPES
    if quantized != (value_cache.dtype in QUANTIZED_CACHE_DTYPES):
        raise TypeError(f"{names[0]} and {names[1]} must both be quantized or neither, got "
                        f"{key_cache.dtype} and {value_cache.dtype}")
    scales = []
    for x, name in ((key_scale, "key_scale"), (value_scale, "value_scale")):
        if not quantized:
            if x is not None:
                raise ValueError(f"{name} is only for quantized caches, but {names[0]} is "
                                 f"{key_cache.dtype}")
            scales.append(None)
            continue
        if x is None:
            raise ValueError(f"a quantized cache needs {name} (float32 "
                             f"{list(key_cache.shape[:3])}): writes quantize each new row with "
                             f"a scale of its own")
        x = jnp.asarray(x)
        if x.shape != key_cache.shape[:3] or x.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32 {list(key_cache.shape[:3])}, got "
                             f"{x.dtype} {list(x.shape)}")
        scales.append(x)
    return key_cache, value_cache, scales[0], scales[1]


def _scatter_rows(pool: Array, index: tuple[Array, Array], rows: Array) -> Array:
    """``pool.at[index].set(rows)`` (out-of-range rows dropped), in place when the pool is
    donated: a custom call aliasing its result to the pool (see _ffi.cache_write_p)."""
    pages, slots = (jnp.broadcast_to(i, rows.shape[:2]).astype(jnp.int32) for i in index)
    return _ffi.cache_write_p.bind(pool, rows.astype(pool.dtype), pages, slots)


def _write(cache: Array, scale: Array | None, new: Array, index: tuple[Array, Array]):
    """Scatters rows ``new`` [B, T, K, H] at ``index`` (two [B, T] arrays into the first two
    cache axes; out-of-range rows are dropped), quantizing them for a quantized cache."""
    if scale is None:
        return _scatter_rows(cache, index, new), None
    values, scales = quantize_kv(new, cache.dtype)
    return _scatter_rows(cache, index, values), _scatter_rows(scale, index, scales)


def _result(key_cache, value_cache, key_scale, value_scale):
    if key_scale is None:
        return key_cache, value_cache
    return key_cache, value_cache, key_scale, value_scale


def update_kv_cache(
    key_cache: Any,
    value_cache: Any,
    key: Any,
    value: Any,
    positions: Any,
    *,
    key_scale: Any = None,
    value_scale: Any = None,
) -> tuple[Array, ...]:
    """Writes new tokens' keys and values into a contiguous KV cache.

    Token ``t`` of sequence ``b`` goes to cache row ``positions[b] + t`` (or
    ``positions[b, t]``). A scatter: under ``jax.jit(..., donate_argnums=...)`` of the caches
    XLA updates them in place (no copy of the cache). Rows at positions outside
    ``[0, Smax)`` are dropped (check lengths before writing: nothing raises under jit).

    Args:
      key_cache: ``[B, Smax, K, H]``, float or quantized (int8 / float8).
      value_cache: ``[B, Smax, K, Hv]``.
      key: new keys ``[B, T, K, H]``, any float dtype (cast, or quantized per row with
        ``quantize_kv`` for a quantized cache).
      value: new values ``[B, T, K, Hv]``.
      positions: int ``[B]`` (the position of each sequence's first new token, e.g. its
        length before the write) or ``[B, T]``.
      key_scale, value_scale: quantized caches only (then required): float32 ``[B, Smax, K]``.

    Returns:
      ``(key_cache, value_cache)``, or ``(key_cache, value_cache, key_scale, value_scale)`` for
      a quantized cache.
    """
    key_cache, value_cache, key_scale, value_scale = _check_cache(
        key_cache, value_cache, key_scale, value_scale, ("key_cache", "value_cache"))
    batch = key_cache.shape[0]
    key = _check_new(key_cache, key, "key", "key_cache", batch)
    value = _check_new(value_cache, value, "value", "value_cache", batch)
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must hold the same tokens, got {key.shape} and "
                         f"{value.shape}")
    pos = _token_positions(positions, batch, key.shape[1])
    index = (jnp.arange(batch, dtype=jnp.int32)[:, None], pos)
    key_cache, key_scale = _write(key_cache, key_scale, key, index)
    value_cache, value_scale = _write(value_cache, value_scale, value, index)
    return _result(key_cache, value_cache, key_scale, value_scale)


def update_paged_kv_cache(
    key_pages: Any,
    value_pages: Any,
    key: Any,
    value: Any,
    block_tables: Any,
    positions: Any,
    *,
    key_scale: Any = None,
    value_scale: Any = None,
) -> tuple[Array, ...]:
    """Writes new tokens' keys and values into a paged KV cache (the layout of
    ``paged_decode_attention``).

    Token ``t`` of sequence ``b`` at position ``p = positions[b] + t`` (or ``positions[b, t]``)
    goes to row ``p % page_size`` of page ``block_tables[b, p // page_size]``. In place under
    buffer donation, as ``update_kv_cache``. Rows whose position is negative or past the
    table, or whose page id is outside ``[0, P)``, are dropped. Sequences sharing a page (a
    common prefix) must not write into it.

    Args:
      key_pages: ``[P, page_size, K, H]``, float or quantized.
      value_pages: ``[P, page_size, K, Hv]``.
      key, value: ``[B, T, K, H]`` / ``[B, T, K, Hv]``.
      block_tables: int ``[B, max_pages]``.
      positions: int ``[B]`` or ``[B, T]``.
      key_scale, value_scale: quantized pages only (then required): float32
        ``[P, page_size, K]``.

    Returns:
      As ``update_kv_cache``: the pages (and scales).
    """
    key_pages, value_pages, key_scale, value_scale = _check_cache(
        key_pages, value_pages, key_scale, value_scale, ("key_pages", "value_pages"))
    block_tables = jnp.asarray(block_tables)
    if block_tables.ndim != 2 or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must be an integer array [B, max_pages], got "
                         f"{block_tables.dtype} {list(block_tables.shape)}")
    batch, max_pages = block_tables.shape
    key = _check_new(key_pages, key, "key", "key_pages", batch)
    value = _check_new(value_pages, value, "value", "value_pages", batch)
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must hold the same tokens, got {key.shape} and "
                         f"{value.shape}")
    num_pages, page_size = key_pages.shape[:2]
    pos = _token_positions(positions, batch, key.shape[1])
    slot = jnp.clip(pos // page_size, 0, max_pages - 1)
    page = jnp.take_along_axis(block_tables.astype(jnp.int32), slot, axis=1)
    valid = (pos >= 0) & (pos < max_pages * page_size) & (page >= 0) & (page < num_pages)
    index = (jnp.where(valid, page, num_pages), pos % page_size)  # num_pages: dropped
    key_pages, key_scale = _write(key_pages, key_scale, key, index)
    value_pages, value_scale = _write(value_pages, value_scale, value, index)
    return _result(key_pages, value_pages, key_scale, value_scale)
