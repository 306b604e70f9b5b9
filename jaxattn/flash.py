"""Flash attention: ``jax.nn.dot_product_attention``'s signature, fused C++ kernels on the CPU."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxattn import _ffi
from jaxattn._sharding import match_varying
from jaxattn._validation import (
    as_array,
    check_attention_inputs,
    check_alibi_slopes,
    check_bool,
    check_lengths,
    check_scale,
    check_soft_cap,
    normalize_window,
    check_token_ids,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of one call (hashable: a custom_vjp non-differentiable argument)."""

    scale: float
    soft_cap: float | None
    is_causal: bool
    window: tuple[int, int] | None

    def attrs(self) -> dict:
        return _ffi.attention_attrs(self.scale, self.soft_cap, self.is_causal, self.window)


def _empty(dtype) -> Array:
    return jnp.zeros((0,), dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(options: _Options, q, k, v, bias, mask, q_lengths, kv_lengths, tokens):
    # tokens: query_positions, key_value_positions, query_segment_ids, key_value_segment_ids,
    # alibi_slopes (absent ones empty)
    out, lse = _ffi.flash_fwd_p.bind(q, k, v, bias, mask, q_lengths, kv_lengths, *tokens,
                                     **options.attrs())
    return out, lse


def _flash_fwd(options, q, k, v, bias, mask, q_lengths, kv_lengths, tokens):
    out, lse = _flash(options, q, k, v, bias, mask, q_lengths, kv_lengths, tokens)
    return (out, lse), (q, k, v, bias, mask, q_lengths, kv_lengths, tokens, out, lse)


def _flash_bwd(options, residuals, cotangents):
    q, k, v, bias, mask, q_lengths, kv_lengths, tokens, out, lse = residuals
    dout, dlse = cotangents
    operands = (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dout.astype(out.dtype),
                dlse.astype(jnp.float32), *tokens)
    dq, dk, dv = _ffi.flash_bwd_p.bind(*operands, **options.attrs())
    if bias.size:
        (dlogits,) = _ffi.flash_dlogits_p.bind(*operands, **options.attrs())
        dbias = _sum_to_shape(dlogits, bias.shape).astype(bias.dtype)
    else:
        dbias = jnp.zeros_like(bias)
    # The slopes get no gradient (documented): zeros, like a constant.
    dtokens = (None, None, None, None, jnp.zeros_like(tokens[4]))
    return dq, dk, dv, dbias, None, None, None, dtokens


_flash.defvjp(_flash_fwd, _flash_bwd)


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` over the axes where ``shape`` is 1 (and ``x`` is not), in a fixed order.

    A pairwise tree of elementwise adds over the summed axes (flattened into one), so that
    every element is rounded the same way whatever the thread count: XLA's own reductions
    may split their work by threads and round differently on 1 and 2 cores.
    """
    axes = tuple(i for i, (got, want) in enumerate(zip(x.shape, shape)) if want == 1 and got != 1)
    if not axes:
        return x
    kept = tuple(i for i in range(x.ndim) if i not in axes)
    parts = jnp.transpose(x, axes + kept).reshape((-1,) + tuple(x.shape[i] for i in kept))
    while parts.shape[0] > 1:
        half = parts.shape[0] // 2
        paired = parts[:half] + parts[half:2 * half]
        parts = jnp.concatenate([paired, parts[2 * half:]]) if parts.shape[0] % 2 else paired
    return parts[0].reshape(shape)


def _to_rank4(x: Array, name: str, full_shape: tuple[int, int, int, int]) -> Array:
    """Reshapes an operand broadcastable to [B, N, T, S] to rank 4 without copying."""
    if x.ndim > 4:
        raise ValueError(f"{name} must have rank <= 4 (broadcastable to [B, N, T, S] = "
                         f"{list(full_shape)}), got shape {x.shape}")
    x4 = x.reshape((1,) * (4 - x.ndim) + x.shape)
    for axis, (got, want) in enumerate(zip(x4.shape, full_shape)):
        if got not in (1, want):
            raise ValueError(f"{name} of shape {x.shape} is not broadcastable to [B, N, T, S] = "
                             f"{list(full_shape)} (axis {axis}: {got} vs {want})")
    return x4


def flash_attention(
    query: Any,
    key: Any,
    value: Any,
    bias: Any | None = None,
    mask: Any | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Any | None = None,
    key_value_seq_lengths: Any | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    query_positions: Any | None = None,
    key_value_positions: Any | None = None,
    query_segment_ids: Any | None = None,
    key_value_segment_ids: Any | None = None,
    alibi_slopes: Any | None = None,
) -> Array | tuple[Array, Array]:
    """Scaled dot-product attention with fused, memory-linear C++ kernels.

    A drop-in for ``jax.nn.dot_product_attention`` on the CPU, plus ``logits_soft_cap``.

    Args:
      query: ``[B, T, N, H]`` (or unbatched ``[T, N, H]``), float32, bfloat16 or float16.
      key: ``[B, S, K, H]`` with ``N % K == 0``; query head ``n`` uses kv head ``n // (N // K)``.
      value: ``[B, S, K, Hv]``; ``Hv`` may differ from ``H``.
      bias: optional, broadcastable to ``[B, N, T, S]``, float32, bfloat16 or float16 (its
        own dtype, independent of the inputs'); added to the scaled float32 logits in float32.
        Its gradient is summed over the broadcast axes in float32, in a fixed order.
      mask: optional bool, broadcastable to ``[B, N, T, S]``; True means attend.
      scale: logit scale, default ``1 / sqrt(H)``.
      is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned, as ``jax.nn``).
      query_seq_lengths: optional int ``[B]``; rows ``i >= len`` output 0.
      key_value_seq_lengths: optional int ``[B]``; keys ``j >= len`` are masked.
      local_window_size: ``(left, right)`` or ``w`` for ``(w, w)``: query ``i`` sees keys
        ``i - left <= j <= i + right``.
      logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)`` (after the bias,
        before the masks).
      return_residual: also return the log-sum-exp of the logits, ``[B, T, N]`` float32.
      query_positions: optional int ``[B, T]`` (or ``[T]``, shared): the token position of
        each query. With either positions argument, ``is_causal`` means
        ``key_value_positions[j] <= query_positions[i]`` and the window is measured in
        positions (``qp - left <= kp <= qp + right``); an absent side is its index. Exact for
        left/right padding, gaps and prefill partway into a cache without a dense mask; tiles
        whose positions hide them are still skipped. Clamped to ``[-2**30, 2**30]``. The
        ``*_seq_lengths`` still count indices.
      key_value_positions: optional int ``[B, S]`` (or ``[S]``): the position of each key.
      query_segment_ids: optional int ``[B, T]`` (or ``[T]``): packed sequences; query ``i``
        sees key ``j`` only where ``query_segment_ids[i] == key_value_segment_ids[j]``,
        together with every other mask. Give both segment arguments or neither. Tiles in
        which no ids match are never computed.
      key_value_segment_ids: optional int ``[B, S]`` (or ``[S]``).
      alibi_slopes: optional float ``[N]`` or ``[B, N]``: ALiBi, adds
        ``-slope[n] * |qp - kp|`` to the logits of head ``n`` (positions as above, else
        indices), after the bias and before the soft cap, computed in the kernels. No
        gradient flows to the slopes (they are treated as constants).

    Returns:
      ``[B, T, N, Hv]`` in the input dtype (and the lse when ``return_residual``). A row that
      sees no key outputs 0 with lse ``-inf`` and gets zero gradients.
    """
    query, key, value = (as_array(x, name) for x, name in
                         ((query, "query"), (key, "key"), (value, "value")))
    unbatched = query.ndim == 3
    check_attention_inputs(query, key, value)
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    b, t, n, h = query.shape
    s, kv_heads = key.shape[1], key.shape[2]
    hv = value.shape[3]
    scale = check_scale(scale, h)
    soft_cap = check_soft_cap(logits_soft_cap)
    window = normalize_window(local_window_size)
    is_causal = check_bool(is_causal, "is_causal")
    return_residual = check_bool(return_residual, "return_residual")
    full = (b, n, t, s)

    if bias is not None:
        bias = as_array(bias, "bias")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be a floating array, got dtype {bias.dtype}")
        if bias.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            bias = bias.astype(jnp.float32)  # float64 (x64), float8: added in float32 anyway
        # The bias keeps its own dtype: the kernels add it to the float32 logits in float32
        # (as jax.nn does), so a float32 bias on bf16 inputs loses nothing.
        bias = _to_rank4(bias, "bias", full)
    else:
        bias = _empty(query.dtype)
    if mask is not None:
        mask = as_array(mask, "mask")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be a bool array (True = attend), got dtype {mask.dtype}")
        mask = _to_rank4(mask, "mask", full)
    else:
        mask = _empty(jnp.bool_)
    q_lengths = check_lengths(query_seq_lengths, "query_seq_lengths", b, unbatched)
    kv_lengths = check_lengths(key_value_seq_lengths, "key_value_seq_lengths", b, unbatched)
    if (query_segment_ids is None) != (key_value_segment_ids is None):
        raise ValueError("query_segment_ids and key_value_segment_ids must be given together "
                         "(both or neither)")
    tokens = (check_token_ids(query_positions, "query_positions", b, t, unbatched),
              check_token_ids(key_value_positions, "key_value_positions", b, s, unbatched),
              check_token_ids(query_segment_ids, "query_segment_ids", b, t, unbatched),
              check_token_ids(key_value_segment_ids, "key_value_segment_ids", b, s, unbatched),
              check_alibi_slopes(alibi_slopes, b, n, unbatched))

    if min(b, t, n, s) == 0:  # nothing to compute or nothing to attend to
        out = jnp.zeros((b, t, n, hv), query.dtype)
        lse = jnp.full((b, t, n), -jnp.inf, jnp.float32)
    else:
        options = _Options(float(scale), soft_cap, bool(is_causal), window)
        # Hv = 0: the output is empty but the lse still depends on the logits; the kernels
        # need Hv >= 1, so attend to a zero value of width 1 and drop it.
        kernel_value = value if hv else jnp.zeros(value.shape[:3] + (1,), value.dtype)
        # In shard_map, a replicated operand is cast to varying here, outside the custom_vjp,
        # so that autodiff sums its gradient over the devices (the transpose of the cast).
        operands = match_varying((query, key, kernel_value, bias, mask, q_lengths, kv_lengths,
                                  *tokens))
        out, lse = _flash(options, *operands[:7], tuple(operands[7:]))
        if not hv:
            out = out[..., :0]
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out
