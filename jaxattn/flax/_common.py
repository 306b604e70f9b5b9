"""Pieces shared by the nnx and linen ``FlashSelfAttention`` modules (framework-free)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn._validation import check_soft_cap, normalize_window
from jaxattn.flash import flash_attention

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Validated, hashable options of a ``FlashSelfAttention`` layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    is_causal: bool
    window: tuple[int, int] | None
    soft_cap: float | None
    use_rope: bool
    rope_theta: float


def fold_batch(x: Array | None, batch_shape: tuple[int, ...], name: str) -> Array | None:
    """Folds the leading ``batch...`` dims of a ``[batch..., N, T, S]`` operand into one.

    Operands with at most 3 dims carry no batch dims (they broadcast over all of them) and pass
    through unchanged; batch dims of size 1 stay 1 so that nothing is materialised needlessly.
    """
    if x is None or x.ndim <= 3:
        return x
    nb = len(batch_shape)
    if x.ndim > nb + 3:
        raise ValueError(f"{name} of shape {x.shape} has more dims than [batch..., N, T, S] "
                         f"with batch dims {batch_shape}")
    x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
    lead = x.shape[:nb]
    if all(d == 1 for d in lead):
        return x.reshape((1,) + x.shape[nb:])
    x = jnp.broadcast_to(x, batch_shape + x.shape[nb:])
    return x.reshape((math.prod(batch_shape),) + x.shape[nb:])


def make_config(num_heads: int, num_kv_heads: int | None, head_dim: int, *, is_causal: bool,
                local_window_size: Any, logits_soft_cap: Any, use_rope: bool,
                rope_theta: float) -> AttentionConfig:
    """Checks the constructor arguments once, with errors that name the argument."""
    for value, name in ((num_heads, "num_heads"), (head_dim, "head_dim")):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_kv_heads is None:
        num_kv_heads = num_heads
    if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must be a positive divisor of num_heads={num_heads}, "
                         f"got {num_kv_heads!r}")
    if use_rope and head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
        raise ValueError(f"rope_theta must be a positive float, got {rope_theta!r}")
    return AttentionConfig(num_heads, num_kv_heads, head_dim, bool(is_causal),
                           normalize_window(local_window_size), check_soft_cap(logits_soft_cap),
                           bool(use_rope), float(rope_theta))


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding (rotate-half form, as GPT-NeoX / Llama) on ``[B, T, heads, H]``.

    ``positions``: int ``[T]``, absolute positions of the T tokens. Computed in float32.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, H/2]
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _common_dtype(q: Array, k: Array, v: Array) -> Any:
    return jnp.result_type(q, k, v)


IMPLEMENTATIONS = ("jaxattn", "xla")


def check_implementation(implementation: str, cfg: AttentionConfig) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                         f"{implementation!r}")
    if implementation == "xla" and cfg.soft_cap is not None:
        raise ValueError("implementation='xla' (jax.nn.dot_product_attention) has no "
                         "logits_soft_cap")
    return implementation


def _attend(implementation: str, q: Array, k: Array, v: Array, mask: Array | None, *,
            is_causal: bool, window: tuple[int, int] | None,
            soft_cap: float | None, segment_ids: Array | None = None,
            dropout: dict | None = None) -> Array:
    """One attention call through jaxattn's kernels or, for comparisons, XLA's.

    ``segment_ids``: int ``[B, T]`` of a self-attention call (packed sequences), or None.
    ``dropout``: ``flash_attention``'s dropout keywords, or None.
    """
    if implementation == "xla":
        if dropout:
            raise NotImplementedError("implementation='xla' has no attention dropout; use "
                                      "implementation='jaxattn' or deterministic=True")
        if segment_ids is not None:  # the same visibility as a dense mask
            same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
            mask = same if mask is None else mask & same
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                            local_window_size=window, implementation="xla")
    return flash_attention(q, k, v, mask=mask, is_causal=is_causal, local_window_size=window,
                           logits_soft_cap=soft_cap, query_segment_ids=segment_ids,
                           key_value_segment_ids=segment_ids, **(dropout or {}))


def fold_segment_ids(segment_ids: Any, batch_shape: tuple[int, ...], length: int,
                     decode: bool) -> Array | None:
    """Packed-sequence ids ``[batch..., T]`` (or ``[T]``) as int ``[B, T]`` with the batch dims
    folded (``[1, T]`` when shared), or None."""
    if segment_ids is None:
        return None
    if decode:
        raise ValueError("segment_ids is not supported with decode=True: the KV cache holds one "
                         "sequence per batch row (pack sequences for training and prefill, "
                         "decode them as separate rows)")
    segment_ids = jnp.asarray(segment_ids)
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be an integer array, got dtype {segment_ids.dtype}")
    if segment_ids.shape == (length,):
        return segment_ids[None]
    if segment_ids.shape != batch_shape + (length,):
        raise ValueError(f"segment_ids must have shape [batch..., T] = "
                         f"{batch_shape + (length,)} or [T], got {segment_ids.shape}")
    return segment_ids.reshape(-1, length)


def layer_sparse_mask(cfg: AttentionConfig, sparse_mask: Any) -> Any:
    """The layer's whole mask as one ``BlockSparseMask``: ``sparse_mask`` AND the causal and
    window masks of ``cfg`` (built on the same blocks), checked against the layer's heads."""
    if sparse_mask is None:
        return None
    if not isinstance(sparse_mask, jaxattn.BlockSparseMask):
        raise TypeError(f"sparse_mask must be a jaxattn.BlockSparseMask, got "
                        f"{type(sparse_mask).__name__}")
    return _combined_mask(cfg, sparse_mask)


@functools.lru_cache(maxsize=32)  # one object per layer config: its kernel tables are cached
def _combined_mask(cfg: AttentionConfig, m: Any) -> Any:
    if m.q_len != m.kv_len:
        raise ValueError(f"sparse_mask of a self-attention layer must be square, got "
                         f"{m.q_len} queries x {m.kv_len} keys")
    if m.num_heads not in (1, cfg.num_heads):
        raise ValueError(f"sparse_mask has {m.num_heads} heads; the layer has "
                         f"num_heads={cfg.num_heads} (use 1 for a mask shared by all heads)")
    blocks = dict(block_q=m.block_q, block_kv=m.block_kv)
    if cfg.is_causal:
        m = m & jaxattn.masks.causal(m.q_len, m.kv_len, **blocks)
    if cfg.window is not None:
        m = m & jaxattn.masks.local(m.q_len, m.kv_len, window=cfg.window, **blocks)
    return m


def full_attention(cfg: AttentionConfig, q: Array, k: Array, v: Array,
                   mask: Array | None, implementation: str = "jaxattn",
                   sparse_mask: Any | None = None, segment_ids: Array | None = None,
                   dropout: dict | None = None) -> Array:
    """Self-attention over the whole input: q ``[B, T, N, H]``, k/v ``[B, T, K, H]``.

    ``sparse_mask``: the layer's complete mask from ``layer_sparse_mask`` (causality and window
    included), or None. ``segment_ids``: int ``[B or 1, T]`` (``fold_segment_ids``): packed
    sequences, token ``i`` attends to ``j`` only where their ids are equal. ``dropout``:
    ``flash_attention``'s dropout keywords (``dropout_layer_options``), or None.
    """
    if cfg.use_rope:
        positions = jnp.arange(q.shape[1])
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
    dtype = _common_dtype(q, k, v)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if sparse_mask is not None:
        if mask is not None:
            raise ValueError("mask cannot be combined with the layer's sparse_mask")
        if segment_ids is not None:
            raise ValueError("segment_ids cannot be combined with the layer's sparse_mask")
        if q.shape[1] != sparse_mask.q_len:
            raise ValueError(f"the layer's sparse_mask is for {sparse_mask.q_len} tokens, got "
                             f"an input of {q.shape[1]}")
        if implementation == "xla":  # the same mask, dense, for comparisons
            dense = jnp.asarray(sparse_mask.to_dense())[None]
            return _attend("xla", q, k, v, dense, is_causal=False, window=None, soft_cap=None,
                           dropout=dropout)
        return jaxattn.block_sparse_attention(q, k, v, sparse_mask,
                                              logits_soft_cap=cfg.soft_cap, **(dropout or {}))
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            mask = mask.astype(jnp.bool_)
    if segment_ids is not None and segment_ids.shape[0] != q.shape[0]:
        segment_ids = jnp.broadcast_to(segment_ids, (q.shape[0], segment_ids.shape[1]))
    return _attend(implementation, q, k, v, mask, is_causal=cfg.is_causal, window=cfg.window,
                   soft_cap=cfg.soft_cap, segment_ids=segment_ids, dropout=dropout)


def dropout_layer_options(rate: float, broadcast: bool, deterministic: bool | None,
                          default_deterministic: bool | None, make_rng: Any) -> dict | None:
    """The dropout keywords of one layer call (None: no dropout), as Flax's attention layers
    decide: ``deterministic`` from the call, else the layer's, required when ``rate > 0``;
    ``make_rng()`` gives the key."""
    if not rate:
        return None
    if deterministic is None:
        deterministic = default_deterministic
    if deterministic is None:
        raise ValueError("this layer has dropout_rate > 0: pass deterministic=True or False "
                         "(to the call or the constructor)")
    if deterministic:
        return None
    return dict(dropout_rate=rate, dropout_rng=make_rng(), dropout_broadcast=bool(broadcast))


def _overflow_message(current: int, steps: int, max_length: int) -> str:
    return (f"KV cache overflow: {current} tokens cached + {steps} new > max_length="
            f"{max_length}; call init_cache with a larger max_length")


def check_cache_room(index: Array, steps: int, max_length: int) -> bool:
    """Raises when a concrete cache index would overflow; returns False for a traced index,
    which only a run-time check can catch (see ``cached_attention``)."""
    try:
        current = int(index)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return False
    if current + steps > max_length:
        raise ValueError(_overflow_message(current, steps, max_length))
    return True


def _checked_index_at_run_time(index: Array, steps: int, max_length: int) -> Array:
    """``index``, passed through a host check that fails the computation (JaxRuntimeError)
    when the cache would overflow: for the steps that do not run the decode kernel, whose
    ``strict_lengths`` check does this in the kernel."""

    def check(current):
        current = int(current)
        if current < 0 or current + steps > max_length:
            raise ValueError(_overflow_message(current, steps, max_length))
        return np.asarray(current, np.int32)

    return jax.pure_callback(check, jax.ShapeDtypeStruct((), jnp.int32),
                             index.astype(jnp.int32), vmap_method="sequential")


def cached_attention(cfg: AttentionConfig, q: Array, k: Array, v: Array, cached_key: Array,
                     cached_value: Array, index: Array, implementation: str = "jaxattn",
                     scales: tuple[Array, Array] | None = None
                     ) -> tuple[Array, Array, Array, tuple[Array, Array] | None]:
    """One decode step: writes the new K/V at ``index`` and attends over the cache.

    q ``[B, T, N, H]``, k/v ``[B, T, K, H]`` for the tokens at absolute positions
    ``index .. index + T - 1``; caches ``[B, Smax, K, H]``; ``scales`` (key, value) float32
    ``[B, Smax, K]`` for a quantized (int8 / float8) cache, else None. Returns (out
    ``[B, T, N, H]`` in the cache dtype, or the query's for a quantized cache, new key cache,
    new value cache, new scales).
    """
    if not cfg.is_causal:
        raise ValueError("decode=True needs a causal layer (is_causal=True): a token cannot "
                         "attend to tokens that have not been generated yet")
    batch, steps = q.shape[:2]
    max_length = cached_key.shape[1]
    if k.shape[0] != cached_key.shape[0]:
        raise ValueError(f"decode input has batch size {k.shape[0]} but the cache was made for "
                         f"batch_size={cached_key.shape[0]}")
    checked = check_cache_room(index, steps, max_length)
    # decode_attention takes any number of new tokens (a whole prompt prefill included);
    # the XLA reference implementation attends over the cache with an explicit mask.
    uses_decode_kernel = implementation == "jaxattn"
    if not checked and not uses_decode_kernel:
        # Under jit the index is traced: an overflowing write would be clamped by
        # dynamic_update_slice and attended to as if it were right. Fail at run time instead.
        index = _checked_index_at_run_time(index, steps, max_length)
    if cfg.use_rope:
        positions = index + jnp.arange(steps)
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
    # update_kv_cache writes in place (XLA's dynamic_update_slice widens a bfloat16 cache to
    # float32 and back on every step) and drops rows past the cache; a quantized cache gets a
    # scale per new row.
    scale_kwargs = {} if scales is None else dict(key_scale=scales[0], value_scale=scales[1])
    cached_key, cached_value, *new_scales = jaxattn.update_kv_cache(
        cached_key, cached_value, k, v, jnp.full((batch,), index, jnp.int32), **scale_kwargs)
    if scales is not None:  # the query keeps its dtype
        scales = tuple(new_scales)
        scale_kwargs = dict(key_scale=scales[0], value_scale=scales[1])
    else:
        q = q.astype(cached_key.dtype)
    if uses_decode_kernel:
        # strict_lengths: under jit, a step past max_length (whose rows were not written)
        # fails in the kernel (JaxRuntimeError) instead of attending to a wrong cache.
        lengths = jnp.full((batch,), index + steps, jnp.int32)
        out = jaxattn.decode_attention(q, cached_key, cached_value, lengths,
                                       local_window_size=cfg.window,
                                       logits_soft_cap=cfg.soft_cap, strict_lengths=True,
                                       **scale_kwargs)
    else:
        # Query i sits at absolute position index + i: sees keys j <= index + i (causal, which
        # also hides the unwritten rest of the cache) and, with a window, j >= pos - left.
        pos = index + jnp.arange(steps)[:, None]
        cols = jnp.arange(max_length)[None, :]
        visible = cols <= pos
        if cfg.window is not None:
            visible &= cols >= pos - cfg.window[0]
        keys, values = cached_key, cached_value
        if scales is not None:  # a prefill chunk: the dequantised cache in the query dtype
            keys = jaxattn.dequantize_kv(cached_key, scales[0], q.dtype)
            values = jaxattn.dequantize_kv(cached_value, scales[1], q.dtype)
        out = _attend(implementation, q, keys, values, visible[None, None],
                      is_causal=False, window=None, soft_cap=cfg.soft_cap)
    return out, cached_key, cached_value, scales


def check_kv_cache_dtype(kv_cache_dtype: Any) -> Any:
    """None, or a quantized cache dtype (int8, float8_e4m3fn, float8_e5m2)."""
    if kv_cache_dtype is None:
        return None
    return jaxattn.cache.quantized_dtype(kv_cache_dtype, "kv_cache_dtype")


def cache_arrays(cfg: AttentionConfig, batch_size: int, max_length: int, dtype: Any
                 ) -> dict[str, Array]:
    """Empty cache arrays by name: cached_key, cached_value and cache_index, plus
    cached_key_scale and cached_value_scale (float32 ``[B, Smax, K]``) for a quantized
    ``dtype``."""
    shape = cache_shapes(cfg, batch_size, max_length)
    arrays = {"cached_key": jnp.zeros(shape, dtype), "cached_value": jnp.zeros(shape, dtype),
              "cache_index": jnp.array(0, jnp.int32)}
    if jaxattn.cache.is_quantized(dtype):
        arrays["cached_key_scale"] = jnp.zeros(shape[:3], jnp.float32)
        arrays["cached_value_scale"] = jnp.zeros(shape[:3], jnp.float32)
    return arrays


def cache_shapes(cfg: AttentionConfig, batch_size: int, max_length: int) -> tuple[int, ...]:
    """The ``[B, Smax, K, H]`` shape of each of the key and value caches."""
    for value, name in ((batch_size, "batch_size"), (max_length, "max_length")):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
