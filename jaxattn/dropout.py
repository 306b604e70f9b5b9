"""Dropout on the attention weights: the keep mask the kernels generate, computed with jnp.

The kernels (cc/dropout.h) drop weight ``(b, n, t, s)`` by a counter-based hash of the key,
the batch index, the head, the query index and the key index, so the backward regenerates the
forward's mask and the result does not depend on the thread count. ``dropout_mask`` computes
the same hash here, bit for bit, so that a reference can apply the exact mask.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["dropout_mask"]

# Odd constants of the hash (lowbias32's multipliers and golden-ratio offsets); cc/dropout.h
# uses the same.
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B
_GOLDEN, _OFFSET_N, _OFFSET_SEED = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def _mix(x: Array) -> Array:
    """lowbias32: a bijection of uint32 words with good avalanche (as cc/dropout.h)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_MUL1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_MUL2)
    return x ^ (x >> 16)


def check_dropout(rate: Any, rng: Any) -> tuple[float, Array | None]:
    """Validates ``dropout_rate`` and ``dropout_rng``; returns (rate, key or None when off)."""
    if isinstance(rate, jax.core.Tracer):
        raise TypeError("dropout_rate must be a concrete Python or NumPy number (it is fixed "
                        "when the call is traced), got a traced value")
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (numbers.Real, np.ndarray,
                                                                    jax.Array)):
        raise TypeError(f"dropout_rate must be a real number in [0, 1), got {rate!r}")
    if isinstance(rate, (np.ndarray, jax.Array)):
        if np.shape(rate) != () or not np.issubdtype(np.asarray(rate).dtype, np.floating):
            raise TypeError(f"dropout_rate must be a real scalar in [0, 1), got {rate!r}")
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return 0.0, None
    if rng is None:
        raise ValueError(f"dropout_rng (a JAX PRNG key) is required when dropout_rate > 0 "
                         f"(got dropout_rate={rate})")
    rng = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"dropout_rng must be a single PRNG key (shape ()), got shape "
                             f"{rng.shape}; split it or vmap over it")
    elif rng.dtype != jnp.uint32 or rng.ndim != 1:
        raise TypeError(f"dropout_rng must be a JAX PRNG key (jax.random.key or "
                        f"jax.random.PRNGKey), got {rng.dtype}{list(rng.shape)}")
    return rate, rng


def dropout_threshold(rate: float) -> int:
    """The kernels' keep threshold: a weight is kept where its 32-bit hash is >= it."""
    if rate <= 0.0:
        return 0
    return int(min(max(round(rate * 2.0**32), 1), 2**32 - 1))


def dropout_seeds(rng: Array, batch: int, num_heads: int, broadcast: bool = False) -> Array:
    """The kernels' seeds operand ``[B, N, 2]`` uint32 (``[1, N, 2]`` with ``broadcast``:
    one mask shared by the batch and the heads), from the key, the batch index and the head."""
    base = jax.random.bits(rng, (2,), jnp.uint32)
    b = jnp.arange(1 if broadcast else batch, dtype=jnp.uint32)[:, None]
    n = jnp.arange(1 if broadcast else num_heads, dtype=jnp.uint32)[None, :]
    h = _mix((b * jnp.uint32(_GOLDEN)) ^ _mix(n + jnp.uint32(_OFFSET_N)))
    seeds = jnp.stack([_mix(base[0] ^ h), _mix(base[1] ^ _mix(h + jnp.uint32(_OFFSET_SEED)))],
                      axis=-1)
    return jnp.broadcast_to(seeds, (seeds.shape[0], num_heads, 2))


def _mask_from_seeds(seeds: Array, threshold: int, q_len: int, kv_len: int) -> Array:
    t = jnp.arange(q_len, dtype=jnp.uint32)
    s = jnp.arange(kv_len, dtype=jnp.uint32)
    seed0, seed1 = seeds[..., 0, None], seeds[..., 1, None]             # [B, N, 1]
    row0 = _mix(seed0 ^ _mix(t))                                         # [B, N, T]
    row1 = _mix(seed1 ^ _mix(t + jnp.uint32(_GOLDEN)))
    word = _mix(_mix(row0[..., None] ^ s) ^ row1[..., None])             # [B, N, T, S]
    return word >= jnp.uint32(threshold)


def dropout_mask(key: Any, rate: float, batch: int, num_heads: int, q_len: int, kv_len: int,
                 *, broadcast: bool = False) -> Array:
    """The keep mask that ``flash_attention`` / ``block_sparse_attention`` apply to the
    attention weights for ``dropout_rng=key, dropout_rate=rate``.

    Args:
      key: a JAX PRNG key.
      rate: the dropout rate, in [0, 1).
      batch, num_heads, q_len, kv_len: B, N, T, S of the call.
      broadcast: the mask of ``jaxattn.flax.attention_fn(..., broadcast_dropout=True)``, one
        ``[T, S]`` mask shared by the batch and the heads.

    Returns:
      bool ``[B, N, T, S]``: True where the weight is kept (and scaled by
      ``1 / (1 - rate)``). The attention output is ``(softmax(logits) * mask / (1 - rate)) @ V``.
    """
    rate, rng = check_dropout(rate, key)
    if rng is None:
        return jnp.ones((batch, num_heads, q_len, kv_len), jnp.bool_)
    seeds = dropout_seeds(rng, batch, num_heads, broadcast)
    mask = _mask_from_seeds(seeds, dropout_threshold(rate), q_len, kv_len)
    return jnp.broadcast_to(mask, (batch, num_heads, q_len, kv_len))
