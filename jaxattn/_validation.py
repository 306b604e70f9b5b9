"""Trace-time checks shared by the public functions: every error names the argument."""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# float64 arrays exist only with jax_enable_x64 (otherwise JAX makes them float32); the
# float64 kernels (cc/attention_f64.h) compute and accumulate in float64.
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                    jnp.dtype(jnp.float64))
_FLOAT64 = jnp.dtype(jnp.float64)
MAX_HEAD_DIM = 1024
# A window side wider than any sequence bounds nothing; clamping keeps `position + window` far
# from int64 overflow in the kernels (which also re-clamp).
MAX_WINDOW = 2**62
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT32 = np.iinfo(np.int32)


def as_array(x: Any, name: str) -> jax.Array:
    """``x`` as a JAX array (tracers pass through); TypeError naming ``name`` otherwise."""
    if isinstance(x, jax.Array) or hasattr(x, "aval"):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e


def any_zero(*dims: Any) -> bool:
    """Whether any dimension is 0; symbolic dimensions (``jax.export``), which are >= 1, are
    not (``min`` of symbolic dims can be undecidable)."""
    return any(isinstance(d, int) and d == 0 for d in dims)


def check_dtype(x: jax.Array, name: str, float64: bool = True) -> None:
    """TypeError naming ``name`` unless ``x`` has a dtype the kernels take (``float64``:
    whether the op has float64 kernels; gated linear attention has none)."""
    if not float64 and x.dtype not in SUPPORTED_DTYPES[:3]:
        note = " (this op has no float64 kernels)" if x.dtype == _FLOAT64 else ""
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}{note}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64 (with "
                        f"jax_enable_x64), got {x.dtype}")


def lse_dtype(dtype: Any) -> Any:
    """The dtype of the log-sum-exp for inputs of ``dtype``: float64 for float64 inputs,
    float32 otherwise."""
    return jnp.float64 if jnp.dtype(dtype) == _FLOAT64 else jnp.float32


def fold_scale(query: jax.Array, scale: float) -> tuple[jax.Array, float]:
    """``(query, scale)`` as the kernels take them: for float64 inputs the scale multiplies
    the query in float64 and the kernels get 1 (their scale attribute is float32, and
    ``1 / sqrt(H)`` rounded to float32 would cost float64 results 8 digits); otherwise
    unchanged. Differentiable: the query's gradient gets the scale from JAX."""
    if query.dtype != _FLOAT64 or scale == 1.0:
        return query, scale
    return query * jnp.asarray(scale, jnp.float64), 1.0


def check_attention_inputs(query: jax.Array, key: jax.Array, value: jax.Array,
                           batched_rank: int = 4) -> None:
    """Checks query [B,T,N,H] (or unbatched), key [B,S,K,H], value [B,S,K,Hv]."""
    ranks = (batched_rank - 1, batched_rank)
    if query.ndim not in ranks:
        raise ValueError(f"query must have shape [B, T, N, H] or [T, N, H], got {query.shape}")
    for x, name in ((key, "key"), (value, "value")):
        if x.ndim != query.ndim:
            raise ValueError(f"{name} must have the rank of query ({query.ndim}), got shape "
                             f"{x.shape} (query {query.shape})")
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        check_dtype(x, name)
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, "
                        f"{key.dtype}, {value.dtype}")
    q, k, v = (x.shape if x.ndim == batched_rank else (1,) + x.shape for x in (query, key, value))
    if not q[0] == k[0] == v[0]:
        raise ValueError(f"query, key and value must share the batch size, got shapes "
                         f"{query.shape}, {key.shape}, {value.shape}")
    if k[1] != v[1]:
        raise ValueError(f"key and value must have the same length S, got {key.shape} and "
                         f"{value.shape}")
    if k[2] != v[2]:
        raise ValueError(f"key and value must have the same number of heads K, got "
                         f"{key.shape} and {value.shape}")
    if q[3] != k[3]:
        raise ValueError(f"query and key must have the same head dim H, got {query.shape} and "
                         f"{key.shape}")
    if k[2] == 0 or q[2] % k[2] != 0:
        raise ValueError(f"the number of query heads N={q[2]} must be a multiple of the "
                         f"number of kv heads K={k[2]}")
    if q[3] == 0:
        raise ValueError(f"head dim H must be positive, got query shape {query.shape}")
    if q[3] > MAX_HEAD_DIM or v[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dims above {MAX_HEAD_DIM} are not supported, got H={q[3]}, "
                         f"Hv={v[3]}")


def check_lengths(lengths: Any, name: str, batch: int, unbatched: bool) -> jax.Array:
    """Per-sequence lengths as int32 [B]; an empty array when None.

    Any integer value is accepted: the kernels clamp each length to [0, T] or [0, S] at run
    time. Values outside int32 are saturated first, so that (say) an int64 ``2**40`` still
    means "everything" instead of wrapping around.
    """
    if lengths is None:
        return jnp.zeros((0,), jnp.int32)
    if not (isinstance(lengths, jax.Array) or hasattr(lengths, "aval")):
        # Host values (numpy, lists, ints): saturate before JAX converts them (without x64,
        # jnp.asarray would wrap int64 values to int32).
        try:
            host = np.asarray(lengths)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an integer array, got {type(lengths).__name__}") from e
        if host.dtype.kind in "iu":
            host = np.clip(host, _INT32.min, _INT32.max).astype(np.int32)
        lengths = host
    lengths = as_array(lengths, name)
    if not jnp.issubdtype(lengths.dtype, jnp.integer) or lengths.dtype == jnp.bool_:
        raise TypeError(f"{name} must be an integer array, got dtype {lengths.dtype}")
    if unbatched and lengths.ndim == 0:
        lengths = lengths[None]
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = ({batch},), got {lengths.shape}")
    if jnp.issubdtype(lengths.dtype, jnp.unsignedinteger):
        lengths = jnp.minimum(lengths, _INT32.max)
    elif lengths.dtype.itemsize > 4:
        lengths = jnp.clip(lengths, _INT32.min, _INT32.max)
    return lengths.astype(jnp.int32)


def _is_real_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(
        x, (bool, np.bool_))


def _concrete_real_scalar(x: Any, name: str) -> Any:
    """A Python/NumPy real scalar, or a concrete 0-d NumPy/JAX array of a real dtype, as a
    NumPy scalar; TypeError naming ``name`` otherwise (a traced value cannot be an attribute
    of the kernels, which is fixed when the call is traced)."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a concrete number, got a traced value ({x.aval}): it is fixed when "
            f"the call is traced. Pass it as a Python or NumPy scalar (or a static argument of "
            f"jax.jit), or fold a traced factor into the query instead")
    if isinstance(x, (jax.Array, np.ndarray)) and x.ndim == 0:
        if x.dtype == np.bool_ or not (jnp.issubdtype(x.dtype, jnp.integer)
                                       or jnp.issubdtype(x.dtype, jnp.floating)):
            raise TypeError(f"{name} must be a real number, got a 0-d array of dtype {x.dtype}")
        return np.asarray(x)[()]
    return x


def check_scale(scale: Any, head_dim: int) -> float:
    """The logit scale as a Python float; ``1 / sqrt(head_dim)`` when None.

    Any concrete real scalar is accepted: Python, NumPy, or a 0-d NumPy or JAX array (a
    traced one is a TypeError). Zero and negative scales are valid (uniform or reversed
    attention); NaN, inf and values that overflow float32 (the kernels' attribute type) are
    not.
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = _concrete_real_scalar(scale, "scale")
    if not _is_real_number(scale):
        raise TypeError(f"scale must be a real number (Python, NumPy or a concrete 0-d array) "
                        f"or None, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not (math.isfinite(scale) and abs(scale) <= _FLOAT32_MAX):
        raise ValueError(f"scale must be finite and within float32 range, got {scale}")
    return float(scale)


def check_bool(value: Any, name: str) -> bool:
    """A static flag: Python or NumPy bool only (a traced or array value is a TypeError)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_soft_cap(cap: Any) -> float | None:
    """None or a positive float that stays positive and finite in float32."""
    if cap is None:
        return None
    if not _is_real_number(cap):
        raise TypeError(f"logits_soft_cap must be a positive float or None, got {cap!r}")
    # The kernels take the cap as float32, where 0 means "off" and inf makes every logit NaN.
    if not (cap > 0 and math.isfinite(cap) and cap <= _FLOAT32_MAX and np.float32(cap) > 0):
        raise ValueError(f"logits_soft_cap must be positive and finite (in float32), got {cap}")
    return float(cap)


def _window_side(x: Any, name: str) -> int:
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"local_window_size {name} must be an int, got {x!r}")
    try:
        value = operator.index(x)
    except TypeError as e:
        raise TypeError(f"local_window_size {name} must be an int, got {x!r}") from e
    if value < 0:
        raise ValueError(f"local_window_size {name} must be >= 0, got {value}")
    return min(value, MAX_WINDOW)


def normalize_window(window: Any) -> tuple[int, int] | None:
    """None, w or (left, right) -> None or (left, right) with 0 <= each <= MAX_WINDOW."""
    if window is None:
        return None
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"local_window_size must be an int or (left, right), got {window!r}")
        return _window_side(window[0], "left"), _window_side(window[1], "right")
    w = _window_side(window, "size")
    return w, w


def check_token_ids(ids: Any, name: str, batch: int, length: int,
                    unbatched: bool) -> jax.Array:
    """Token positions or segment ids as int32 ``[B, L]`` or ``[1, L]``; empty when None.

    Accepts ``[B, L]``, or ``[L]`` shared by the batch (the only form for unbatched inputs).
    Values outside int32 are saturated (the kernels clamp positions to ``[-2**30, 2**30]``).
    """
    if ids is None:
        return jnp.zeros((0,), jnp.int32)
    if not (isinstance(ids, jax.Array) or hasattr(ids, "aval")):
        try:
            host = np.asarray(ids)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an integer array, got {type(ids).__name__}") from e
        if host.dtype.kind in "iu":
            host = np.clip(host, _INT32.min, _INT32.max).astype(np.int32)
        ids = host
    ids = as_array(ids, name)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.dtype == jnp.bool_:
        raise TypeError(f"{name} must be an integer array, got dtype {ids.dtype}")
    if ids.ndim == 1 and ids.shape[0] == length:
        ids = ids[None]
    if unbatched or ids.shape != (batch, length):
        if ids.shape != (1, length):
            want = f"[{length}]" if unbatched else f"[B, {length}] = ({batch}, {length}) or [{length}]"
            raise ValueError(f"{name} must have shape {want}, got {ids.shape}")
    if jnp.issubdtype(ids.dtype, jnp.unsignedinteger):
        ids = jnp.minimum(ids, _INT32.max)
    elif ids.dtype.itemsize > 4:
        ids = jnp.clip(ids, _INT32.min, _INT32.max)
    return ids.astype(jnp.int32)


def check_alibi_slopes(slopes: Any, batch: int, num_heads: int, unbatched: bool) -> jax.Array:
    """ALiBi slopes as float32 ``[B, N]`` or ``[1, N]``; empty when None.

    Accepts ``[N]`` (shared by the batch; the only form for unbatched inputs) or ``[B, N]``.
    """
    if slopes is None:
        return jnp.zeros((0,), jnp.float32)
    slopes = as_array(slopes, "alibi_slopes")
    if not jnp.issubdtype(slopes.dtype, jnp.floating):
        raise TypeError(f"alibi_slopes must be a floating array, got dtype {slopes.dtype}")
    if slopes.ndim == 1 and slopes.shape[0] == num_heads:
        slopes = slopes[None]
    if unbatched or slopes.shape != (batch, num_heads):
        if slopes.shape != (1, num_heads):
            want = f"[{num_heads}]" if unbatched else (
                f"[N] = ({num_heads},) or [B, N] = ({batch}, {num_heads})")
            raise ValueError(f"alibi_slopes must have shape {want}, got {slopes.shape}")
    return slopes.astype(jnp.float32)
