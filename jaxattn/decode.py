"""Decoding attention over KV caches (contiguous and paged) and merging partial attention.

``decode_attention`` and ``paged_decode_attention`` run a split-KV ("flash decoding") C++
kernel: the cache is cut into fixed-size partitions computed in parallel on XLA's CPU thread
pool and merged in a fixed order, so results are bitwise identical for any thread count.
(``merge_attention_states``, which combines attention over disjoint key sets, lives in
``jaxattn.merge``.)
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _ffi
from jaxattn._autodiff import check_reverse_mode_only, forbid_forward_mode
from jaxattn.cache import QUANTIZED_CACHE_DTYPES
from jaxattn._validation import (
    any_zero,
    as_array,
    check_alibi_slopes,
    check_bool,
    check_dtype,
    check_lengths,
    check_scale,
    fold_scale,
    lse_dtype,
    check_soft_cap,
    check_token_ids,
    normalize_window,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of one call (hashable: a custom_vjp non-differentiable argument)."""

    scale: float
    soft_cap: float | None
    window_left: int | None
    strict_lengths: bool = False

    def attrs(self) -> dict:
        return _ffi.decode_attrs(self.scale, self.soft_cap, self.window_left,
                                 self.strict_lengths)


_NOT_DIFFERENTIABLE = (
    "{name} is an inference kernel and has no gradient. To train through attention over a "
    "cache, use jaxattn.flash_attention with key_value_seq_lengths (and a mask for the causal "
    "offset of the newest tokens).")


# Decoding is an inference step; differentiating it raises instead of silently returning a
# gradient that misses the kernel (custom_vjp turns jax.grad into this error at trace time).
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(options: _Options, q, key_cache, value_cache, kv_lengths, tokens):
    return tuple(_ffi.decode_fwd_p.bind(q, key_cache, value_cache, kv_lengths, *tokens,
                                        **options.attrs()))


def _decode_fwd(options, q, key_cache, value_cache, kv_lengths, tokens):
    return _decode(options, q, key_cache, value_cache, kv_lengths, tokens), None


def _decode_bwd(options, residuals, cotangents):
    raise NotImplementedError(_NOT_DIFFERENTIABLE.format(name="jaxattn.decode_attention"))


_decode.defvjp(_decode_fwd, _decode_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _paged_decode(options: _Options, q, key_pages, value_pages, block_tables, kv_lengths,
                  tokens):
    return tuple(_ffi.paged_decode_fwd_p.bind(q, key_pages, value_pages, block_tables,
                                              kv_lengths, *tokens, **options.attrs()))


def _paged_decode_fwd(options, q, key_pages, value_pages, block_tables, kv_lengths, tokens):
    return _paged_decode(options, q, key_pages, value_pages, block_tables, kv_lengths,
                         tokens), None


def _paged_decode_bwd(options, residuals, cotangents):
    raise NotImplementedError(_NOT_DIFFERENTIABLE.format(name="jaxattn.paged_decode_attention"))


_paged_decode.defvjp(_paged_decode_fwd, _paged_decode_bwd)
forbid_forward_mode(_ffi.decode_fwd_p, "jaxattn.decode_attention")
forbid_forward_mode(_ffi.paged_decode_fwd_p, "jaxattn.paged_decode_attention")


def _inference_only(primitive, name: str):
    """``f(options, operands)`` binding ``primitive``, raising under ``jax.grad`` (as above)."""
    @partial(jax.custom_vjp, nondiff_argnums=(0,))
    def call(options: _Options, operands: tuple):
        return tuple(primitive.bind(*operands, **options.attrs()))

    def bwd(options, residuals, cotangents):
        raise NotImplementedError(_NOT_DIFFERENTIABLE.format(name=name))

    call.defvjp(lambda options, operands: (call(options, operands), None), bwd)
    return call


# Quantized caches: operands (q, key, value, key_scale, value_scale[, block_tables],
# kv_lengths, query_positions, key_value_positions, alibi_slopes).
_quant_decode = _inference_only(_ffi.quant_decode_fwd_p, "jaxattn.decode_attention")
_quant_paged_decode = _inference_only(_ffi.quant_paged_decode_fwd_p,
                                      "jaxattn.paged_decode_attention")
forbid_forward_mode(_ffi.quant_decode_fwd_p, "jaxattn.decode_attention")
forbid_forward_mode(_ffi.quant_paged_decode_fwd_p, "jaxattn.paged_decode_attention")


def _check_query(query: Array) -> None:
    if query.ndim != 4:
        raise ValueError(f"query must have shape [B, T, N, H], got {query.shape}")
    check_dtype(query, "query")
    if query.shape[1] < 1:
        raise ValueError(f"query must hold at least one token (T = query.shape[1]), got "
                         f"{query.shape}")
    if query.shape[2] == 0 or query.shape[3] == 0:
        raise ValueError(f"query must have N >= 1 heads and head dim H >= 1, got {query.shape}")


def _check_kv(query: Array, key: Array, value: Array, key_name: str, value_name: str,
              layout: str) -> None:
    """Checks key/value storage of layout [X, L, K, H] / [X, L, K, Hv] against the query.

    The storage has the query's dtype, or is a quantized cache (int8 / float8, keys and values
    alike) whatever the query's dtype."""
    for x, name in ((key, key_name), (value, value_name)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape {layout}, got {x.shape}")
        if x.dtype not in QUANTIZED_CACHE_DTYPES:
            check_dtype(x, name)
    if key.dtype in QUANTIZED_CACHE_DTYPES or value.dtype in QUANTIZED_CACHE_DTYPES:
        if query.dtype == jnp.float64:
            raise TypeError(f"a quantized {key_name} ({key.dtype}) takes a float32, bfloat16 or "
                            f"float16 query, got float64: dequantize the cache to float64 "
                            f"(jaxattn.dequantize_kv(..., dtype=jnp.float64)) or cast the "
                            f"query")
        if key.dtype != value.dtype:
            raise TypeError(f"a quantized {key_name} and {value_name} must share one dtype, got "
                            f"{key.dtype}, {value.dtype}")
    elif not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, {key_name} and {value_name} must share one dtype, got "
                        f"{query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"{key_name} {key.shape} and {value_name} {value.shape} must agree on "
                         f"all but the last axis")
    if key.shape[3] != query.shape[3]:
        raise ValueError(f"{key_name} head dim {key.shape[3]} must equal the query head dim "
                         f"{query.shape[3]}")
    kv_heads, heads = key.shape[2], query.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"the number of query heads N={heads} must be a multiple of the "
                         f"number of kv heads K={kv_heads} ({key_name} shape {key.shape})")
    if value.shape[3] == 0:
        raise ValueError(f"{value_name} head dim must be positive, got {value.shape}")
    if max(query.shape[3], value.shape[3]) > 1024:
        raise ValueError("head dims above 1024 are not supported")


def _check_scales(key: Array, key_scale: Any, value_scale: Any, key_name: str,
                  value_name: str) -> tuple[Array, Array] | None:
    """The scales of a quantized cache as float32 [X, L, K] (empty: 1), or None for a cache
    in the query's dtype (which takes no scales)."""
    names = ("key_scale", "value_scale")
    if key.dtype not in QUANTIZED_CACHE_DTYPES:
        for x, name in zip((key_scale, value_scale), names):
            if x is not None:
                raise ValueError(f"{name} is only for quantized caches (int8, float8), but "
                                 f"{key_name} is {key.dtype}")
        return None
    scales = []
    for x, name in zip((key_scale, value_scale), names):
        if x is None:
            if key.dtype == jnp.int8:
                raise ValueError(f"an int8 cache needs {name} (float32 {list(key.shape[:3])}, "
                                 f"from jaxattn.quantize_kv)")
            scales.append(jnp.zeros((0,), jnp.float32))
            continue
        x = as_array(x, name)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
        if x.shape != key.shape[:3]:
            raise ValueError(f"{name} must have the shape of {key_name} without its last axis, "
                             f"{list(key.shape[:3])}, got {list(x.shape)}")
        scales.append(x.astype(jnp.float32))
    return scales[0], scales[1]


def _check_kv_lengths(kv_lengths: Any, batch: int) -> Array:
    """kv_lengths as int32 [B] (values outside int32 saturate; the kernels clamp them)."""
    if kv_lengths is None:
        raise TypeError("kv_lengths must be an integer array of shape [B], got None")
    return check_lengths(kv_lengths, "kv_lengths", batch, unbatched=False)


def _check_block_tables(block_tables: Any, batch: int) -> Array:
    """block_tables as int32 [B, max_pages]; ids outside int32 saturate (and stay invalid)."""
    try:
        shape = tuple(np.shape(block_tables) if not hasattr(block_tables, "shape")
                      else block_tables.shape)
    except (TypeError, ValueError) as e:  # ragged nested lists
        raise TypeError(f"block_tables must be an integer array, got "
                        f"{type(block_tables).__name__}") from e
    if len(shape) != 2 or shape[0] != batch:
        raise ValueError(f"block_tables must have shape [B, max_pages] with B={batch}, got "
                         f"{list(shape)}")
    flat = block_tables.reshape(-1) if hasattr(block_tables, "reshape") else np.reshape(
        block_tables, -1)
    return check_lengths(flat, "block_tables", shape[0] * shape[1], unbatched=False).reshape(
        shape)


def _options(query: Array, scale: float | None, local_window_size: Any,
             logits_soft_cap: float | None, strict_lengths: Any) -> _Options:
    window = normalize_window(local_window_size)
    # Keys after a query's own position are never visible, so only the left side matters.
    return _Options(check_scale(scale, query.shape[3]), check_soft_cap(logits_soft_cap),
                    None if window is None else window[0],
                    check_bool(strict_lengths, "strict_lengths"))


def _tokens(query_positions: Any, key_value_positions: Any, alibi_slopes: Any,
            query_lengths: Any, batch: int, q_len: int, capacity: int,
            num_heads: int) -> tuple[Array, Array, Array, Array]:
    """The decode targets' token operands (absent ones empty)."""
    return (check_token_ids(query_positions, "query_positions", batch, q_len, False),
            check_token_ids(key_value_positions, "key_value_positions", batch, capacity, False),
            check_alibi_slopes(alibi_slopes, batch, num_heads, False),
            check_lengths(query_lengths, "query_lengths", batch, unbatched=False))


def _finish(out: Array, lse: Array, return_residual: bool):
    return (out, lse) if return_residual else out


def _empty_result(query: Array, value_dim: int, return_residual: bool):
    b, t, n, _ = query.shape
    out = jnp.zeros((b, t, n, value_dim), query.dtype)
    return _finish(out, jnp.full((b, t, n), -jnp.inf, lse_dtype(query.dtype)), return_residual)


def decode_attention(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    kv_lengths: Any,
    *,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    strict_lengths: bool = False,
    key_scale: Any = None,
    value_scale: Any = None,
    query_positions: Any | None = None,
    key_value_positions: Any | None = None,
    alibi_slopes: Any | None = None,
    query_lengths: Any | None = None,
) -> Array | tuple[Array, Array]:
    """Attention of the newest T tokens against a contiguous KV cache (split-KV decoding).

    Query token ``i`` of sequence ``b`` sits at absolute position ``kv_lengths[b] - T + i``
    (the T new tokens are already written to the cache) and sees cache keys ``j`` up to that
    position: causal among the new tokens, all of the older cache. Any T: one token
    (decoding), a few (speculative decoding), or a whole chunk of a prompt against its cached
    prefix (chunked prefill, prefix caching; beyond 16 tokens the flash kernels run over the
    cache).

    Args:
      query: ``[B, T, N, H]``, ``T >= 1``; float32, bfloat16 or float16, or float64 under
        ``jax_enable_x64`` (computed in float64, lse float64; the cache must then be float64
        too: a quantized cache with a float64 query is a ``TypeError``).
      key_cache: ``[B, Smax, K, H]`` in the query dtype, or a quantized cache (``int8``,
        ``float8_e4m3fn`` or ``float8_e5m2``, see ``jaxattn.quantize_kv``) whatever the query
        dtype; ``N % K == 0`` (query head ``n`` uses kv head ``n // (N // K)``; ``K = 1`` is
        multi-query attention).
      value_cache: ``[B, Smax, K, Hv]``, of the key cache's dtype.
      kv_lengths: int ``[B]``: the number of valid cache entries of each sequence, including
        the T new tokens. Values are clamped to ``[0, Smax]`` (never read out of bounds); a
        sequence shorter than T has query rows that see nothing (output 0, lse ``-inf``).
        Cache entries at or past the length are never read (they may hold anything, even NaN).
      scale: logit scale, default ``1 / sqrt(H)``.
      local_window_size: ``w`` or ``(left, right)``: a query at position ``p`` also needs
        ``j >= p - left`` (``right`` has no effect: keys after ``p`` are never visible).
      logits_soft_cap: logits become ``cap * tanh(logits / cap)`` before masking.
      return_residual: also return the log-sum-exp of the visible logits, ``[B, T, N]`` f32.
      strict_lengths: when True, a ``kv_lengths`` value outside ``[0, Smax]`` is an error at
        run time (``JaxRuntimeError``, also under ``jit``) instead of being clamped: a KV cache
        written past its end must never be attended to as if it were complete.
      key_scale, value_scale: quantized caches only: float32 ``[B, Smax, K]``, the scale of
        each (token, kv head) row: the cache stands for ``key_cache * key_scale[..., None]``
        (dequantised in registers while streaming, never copied). Required for int8;
        optional (default 1) for float8.
      query_positions: optional int ``[B, T]`` (or ``[T]``): the token positions of the
        queries (default ``kv_lengths[b] - T + i``).
      key_value_positions: optional int ``[B, Smax]`` (or ``[Smax]``): the position of each
        cache entry (default its index). With either, entry ``j < kv_lengths[b]`` is visible
        to query ``i`` when its position is ``<=`` the query's (and ``>=`` the query's minus
        the window's left side): a batched cache with gaps (shorter prompts of a batch) is
        exact when the gap entries get a position past every query, e.g. ``2**30``.
        Positions are clamped to ``[-2**30, 2**30]``.
      alibi_slopes: optional float ``[N]`` or ``[B, N]``: ALiBi, adds
        ``-slope[n] * |query position - key position|`` (the positions above) to the logits
        before the soft cap.
      query_lengths: optional int ``[B]``, ragged queries: sequence ``b`` has
        ``T_b = query_lengths[b]`` (clamped to ``[0, T]``) new tokens in query rows
        ``0 .. T_b - 1``, at positions ``kv_lengths[b] - T_b + i``; rows ``i >= T_b`` output 0
        (lse ``-inf``). Default: ``T`` each.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (and the lse when ``return_residual``). A row with
      no visible key outputs 0 and lse ``-inf``. The result is bitwise identical for any
      thread count. Not differentiable (raises NotImplementedError under ``jax.grad``).

    The contract (positions, clamping, windows): docs/semantics.md, section 2.
    """
    check_reverse_mode_only("jaxattn.decode_attention", query, key_cache, value_cache,
                            message=_NOT_DIFFERENTIABLE.format(name="jaxattn.decode_attention"))
    query = as_array(query, "query")
    key_cache = as_array(key_cache, "key_cache")
    value_cache = as_array(value_cache, "value_cache")
    _check_query(query)
    _check_kv(query, key_cache, value_cache, "key_cache", "value_cache", "[B, Smax, K, H]")
    b = query.shape[0]
    if key_cache.shape[0] != b:
        raise ValueError(f"key_cache batch {key_cache.shape[0]} must equal the query batch {b}")
    scales = _check_scales(key_cache, key_scale, value_scale, "key_cache", "value_cache")
    kv_lengths = _check_kv_lengths(kv_lengths, b)
    options = _options(query, scale, local_window_size, logits_soft_cap, strict_lengths)
    return_residual = check_bool(return_residual, "return_residual")
    tokens = _tokens(query_positions, key_value_positions, alibi_slopes, query_lengths, b,
                     query.shape[1],
                     key_cache.shape[1], query.shape[2])
    if any_zero(b, key_cache.shape[1]):
        return _empty_result(query, value_cache.shape[3], return_residual)
    if scales is not None:
        out, lse = _quant_decode(options, (query, key_cache, value_cache, *scales, kv_lengths,
                                           *tokens))
        return _finish(out, lse, return_residual)
    query, scale = fold_scale(query, options.scale)
    options = dataclasses.replace(options, scale=scale)
    out, lse = _decode(options, query, key_cache, value_cache, kv_lengths, tokens)
    return _finish(out, lse, return_residual)


def paged_decode_attention(
    query: Any,
    key_pages: Any,
    value_pages: Any,
    block_tables: Any,
    kv_lengths: Any,
    *,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    strict_lengths: bool = False,
    key_scale: Any = None,
    value_scale: Any = None,
    query_positions: Any | None = None,
    key_value_positions: Any | None = None,
    alibi_slopes: Any | None = None,
    query_lengths: Any | None = None,
) -> Array | tuple[Array, Array]:
    """``decode_attention`` over a paged (vLLM-style) KV cache.

    Sequence ``b``'s cache entry ``j`` is row ``j % page_size`` of page
    ``block_tables[b, j // page_size]``. Pages may be in any order and shared between
    sequences; any page size ``>= 1`` works.

    Args:
      query: ``[B, T, N, H]``, ``T >= 1`` (as in ``decode_attention``).
      key_pages: ``[P, page_size, K, H]``, the page pool, in the query dtype or quantized
        (as in ``decode_attention``).
      value_pages: ``[P, page_size, K, Hv]``, of the key pages' dtype.
      block_tables: int ``[B, max_pages]``: the page ids of each sequence, in order. Only the
        first ``ceil(kv_lengths[b] / page_size)`` entries are read; the rest may hold anything
        (for example -1). A page id outside ``[0, P)`` among the entries read is an error: the
        call raises ``JaxRuntimeError`` (nothing is read out of bounds).
      kv_lengths: int ``[B]``, clamped to ``[0, max_pages * page_size]`` (with
        ``strict_lengths``, a value outside that range is a run-time error).
      scale, local_window_size, logits_soft_cap, return_residual, strict_lengths,
        query_positions, alibi_slopes, query_lengths: as in ``decode_attention``.
      key_scale, value_scale: quantized pages only: float32 ``[P, page_size, K]`` (as in
        ``decode_attention``).
      key_value_positions: optional int ``[B, max_pages * page_size]``: the position of each
        logical cache entry ``j`` (default ``j``), as in ``decode_attention``.

    Returns:
      As ``decode_attention``: equal to it on the same data laid out contiguously.

    The contract (positions, page ids, clamping): docs/semantics.md, section 2.
    """
    check_reverse_mode_only(
        "jaxattn.paged_decode_attention", query, key_pages, value_pages,
        message=_NOT_DIFFERENTIABLE.format(name="jaxattn.paged_decode_attention"))
    query = as_array(query, "query")
    key_pages = as_array(key_pages, "key_pages")
    value_pages = as_array(value_pages, "value_pages")
    _check_query(query)
    _check_kv(query, key_pages, value_pages, "key_pages", "value_pages",
              "[P, page_size, K, H]")
    b = query.shape[0]
    scales = _check_scales(key_pages, key_scale, value_scale, "key_pages", "value_pages")
    block_tables = _check_block_tables(block_tables, b)
    kv_lengths = _check_kv_lengths(kv_lengths, b)
    options = _options(query, scale, local_window_size, logits_soft_cap, strict_lengths)
    return_residual = check_bool(return_residual, "return_residual")
    tokens = _tokens(query_positions, key_value_positions, alibi_slopes, query_lengths, b,
                     query.shape[1],
                     block_tables.shape[1] * key_pages.shape[1], query.shape[2])
    if any_zero(b, *key_pages.shape[:2], block_tables.shape[1]):
        return _empty_result(query, value_pages.shape[3], return_residual)
    if scales is not None:
        out, lse = _quant_paged_decode(options, (query, key_pages, value_pages, *scales,
                                                 block_tables, kv_lengths, *tokens))
        return _finish(out, lse, return_residual)
    query, scale = fold_scale(query, options.scale)
    options = dataclasses.replace(options, scale=scale)
    out, lse = _paged_decode(options, query, key_pages, value_pages, block_tables, kv_lengths,
                             tokens)
    return _finish(out, lse, return_residual)
