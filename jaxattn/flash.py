"""Flash attention: ``jax.nn.dot_product_attention``'s signature, fused C++ kernels on the CPU."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.interpreters import ad

from jaxattn import _ffi
from jaxattn._autodiff import check_reverse_mode_only, forbid_second_derivatives
from jaxattn._sharding import match_varying
from jaxattn._validation import (
    any_zero,
    as_array,
    check_attention_inputs,
    check_alibi_slopes,
    check_bool,
    check_lengths,
    check_scale,
    check_soft_cap,
    fold_scale,
    lse_dtype,
    normalize_window,
    check_token_ids,
)
from jaxattn.dropout import check_dropout, dropout_seeds, dropout_threshold

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of one call (hashable: a custom_vjp non-differentiable argument)."""

    scale: float
    soft_cap: float | None
    is_causal: bool
    window: tuple[int, int] | None
    dropout_threshold: int = 0  # 0: no dropout (jaxattn/dropout.py)

    def attrs(self) -> dict:
        """The attributes of the tangent target (which has no dropout)."""
        return _ffi.attention_attrs(self.scale, self.soft_cap, self.is_causal, self.window)

    def attrs_v3(self) -> dict:
        """The attributes of the forward, backward and dlogits targets."""
        return {**self.attrs(), **_ffi.dropout_attrs(self.dropout_threshold)}


def _empty(dtype) -> Array:
    return jnp.zeros((0,), dtype)


# Differentiation: a custom JVP whose tangent is one fused kernel (flash_jvp_p), linear in
# the tangents, with the backward kernels as its transpose. Forward mode (jvp, linearize,
# jacfwd) runs the tangent kernel; reverse mode (grad, vjp) transposes it, so it runs the
# forward kernel and then the two-pass backward, as a custom VJP would.
@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash(options: _Options, q, k, v, bias, mask, q_lengths, kv_lengths, tokens):
    # tokens: query_positions, key_value_positions, query_segment_ids, key_value_segment_ids,
    # alibi_slopes (absent ones empty); no dropout on this path (see _flash_dropout)
    out, lse = _ffi.flash_fwd_p.bind(q, k, v, bias, mask, q_lengths, kv_lengths, *tokens,
                                     **options.attrs())
    return out, lse


@_flash.defjvp
def _flash_jvp(options, primals, tangents):
    q, k, v, bias, mask, q_lengths, kv_lengths, tokens = primals
    # Mask, lengths and token ids are not differentiable; the ALiBi slopes get no derivative
    # (documented, as in reverse mode).
    dq, dk, dv, dbias = tangents[:4]
    out, lse = _flash(options, *primals)
    # A bias tangent of an absent bias is empty, which the kernel reads as none.
    dout, dlse = _ffi.flash_jvp_p.bind(q, k, v, bias, mask, q_lengths, kv_lengths, out, lse,
                                       dq.astype(q.dtype), dk.astype(k.dtype),
                                       dv.astype(v.dtype), dbias, *tokens, **options.attrs())
    return (out, lse), (dout, dlse)


def _flash_jvp_transpose(cotangents, q, k, v, bias, mask, q_lengths, kv_lengths, out, lse,
                         dq, dk, dv, dbias, *tokens, **attrs):
    """The transpose of the tangent map: the backward pass, with the cotangents of (out, lse)
    as (dout, dlse)."""
    # zeros_like keeps the residuals' shardings (explicit mesh axes).
    dout, dlse = (jnp.zeros_like(x) if type(c) is ad.Zero else c
                  for c, x in zip(cotangents, (out, lse)))
    operands = (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dout, dlse, *tokens,
                _ffi.no_dropout_seeds())
    tangents = (dq, dk, dv, dbias)
    linear = [ad.is_undefined_primal(x) for x in tangents]
    shapes = [(x.aval.shape, x.aval.dtype) for x in tangents]
    grads = _backward(operands, {**attrs, **_ffi.dropout_attrs(0)}, linear, shapes)
    # None for the 7 flash operands, out and lse before the tangents, and the tokens after.
    return (None,) * 9 + tuple(grads) + (None,) * len(tokens)


def _backward(operands: tuple, attrs: dict, wanted: list[bool],
              shapes: list[tuple[tuple[int, ...], Any]]) -> list[Array | None]:
    """Gradients of query, key, value and bias (None where not ``wanted``) from the backward
    kernels' operands (the forward's operands, out, lse, dout, dlse, the token operands and
    the dropout seeds), summed onto ``shapes`` (shape, dtype) of the primal operands."""
    out, lse, dout, dlse = operands[7:11]
    operands = (*operands[:9], dout.astype(out.dtype), dlse.astype(lse.dtype),
                *operands[11:])
    bias = operands[3]
    grads = [None] * 4
    if any(wanted[:3]):
        grads[:3] = _ffi.flash_bwd_p.bind(*operands, **attrs)
    if wanted[3] and bias.size:
        (grads[3],) = _ffi.flash_dlogits_p.bind(*operands, **attrs)
    # The kernels write gradients at the output's batch; an operand of a smaller batch (one
    # not mapped by vmap, read at b % its batch) gets the sum over the rows it fed.
    return [None if not want else
            jnp.zeros(shape, dtype) if g is None else _sum_to_shape(g, shape).astype(dtype)
            for g, want, (shape, dtype) in zip(grads, wanted, shapes)]


# With dropout: a custom VJP (the tangent kernel has no dropout; forward mode raises in
# flash_attention). tokens: the five token operands and the dropout seeds.
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_dropout(options: _Options, q, k, v, bias, mask, q_lengths, kv_lengths, tokens):
    return _ffi.flash_fwd_p.bind(q, k, v, bias, mask, q_lengths, kv_lengths, *tokens,
                                 **options.attrs_v3())


def _flash_dropout_fwd(options, q, k, v, bias, mask, q_lengths, kv_lengths, tokens):
    out, lse = _flash_dropout(options, q, k, v, bias, mask, q_lengths, kv_lengths, tokens)
    return (out, lse), (q, k, v, bias, mask, q_lengths, kv_lengths, tokens, out, lse)


def _flash_dropout_bwd(options, residuals, cotangents):
    q, k, v, bias, mask, q_lengths, kv_lengths, tokens, out, lse = residuals
    dout, dlse = cotangents
    operands = (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dout, dlse, *tokens)
    primals = (q, k, v, bias)
    dq, dk, dv, dbias = _backward(operands, options.attrs_v3(), [True] * 4,
                                  [(x.shape, x.dtype) for x in primals])
    # The slopes get no gradient (as without dropout); integer operands none at all.
    dtokens = tuple(jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else None
                    for x in tokens)
    return dq, dk, dv, dbias, None, None, None, dtokens


_flash_dropout.defvjp(_flash_dropout_fwd, _flash_dropout_bwd)


ad.primitive_transposes[_ffi.flash_jvp_p] = _flash_jvp_transpose


# The backward and tangent kernels are derivatives already: differentiating them again is
# what second derivatives do (a clear error, see _autodiff.py).
for _primitive in (_ffi.flash_bwd_p, _ffi.flash_dlogits_p, _ffi.flash_jvp_p):
    forbid_second_derivatives(_primitive, "jaxattn.flash_attention")


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` onto ``shape``, in a fixed order: an axis of size 1 in ``shape`` takes the
    sum over that axis of ``x``; a leading (batch) axis of size ``d`` dividing ``x``'s takes
    the sums over the indices ``b`` with ``b % d`` equal (the kernels read an operand of
    batch ``d`` at ``b % d``).

    A pairwise tree of elementwise adds over the summed slices, so that every element is
    rounded the same way whatever the thread count: XLA's own reductions may split their work
    by threads and round differently on 1 and 2 cores.
    """
    if x.shape == tuple(shape):
        return x
    if x.shape[0] != shape[0]:  # fold the batch first: [B, ...] -> [B // d, d, ...]
        x = x.reshape((x.shape[0] // shape[0], shape[0]) + x.shape[1:])
        x = _pairwise_sum(x)
    axes = tuple(i for i, (got, want) in enumerate(zip(x.shape, shape)) if want == 1 and got != 1)
    if not axes:
        return x.reshape(shape)
    kept = tuple(i for i in range(x.ndim) if i not in axes)
    parts = jnp.transpose(x, axes + kept).reshape((-1,) + tuple(x.shape[i] for i in kept))
    return _pairwise_sum(parts).reshape(shape)


def _pairwise_sum(parts: Array) -> Array:
    """The sum over the leading axis as a fixed tree of elementwise adds."""
    while parts.shape[0] > 1:
        half = parts.shape[0] // 2
        paired = parts[:half] + parts[half:2 * half]
        parts = jnp.concatenate([paired, parts[2 * half:]]) if parts.shape[0] % 2 else paired
    return parts[0]


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


def _batch_mask_to_rank4(mask: Array, full_shape: tuple[int, int, int, int]) -> Array:
    """A rank-3 mask ``[X, T, S]`` of a batched call: ``[N, T, S]`` (NumPy broadcasting, as
    jax.nn and ``BlockSparseMask.to_dense()``) when X is N or 1, else ``[B, T, S]`` shared over
    heads (what Flax and gemma pass) when X is the batch B."""
    b, n = full_shape[:2]
    x = mask.shape[0]
    return mask[:, None] if x == b and x not in (n, 1) else mask


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
    dropout_rate: float = 0.0,
    dropout_rng: Any | None = None,
    dropout_broadcast: bool = False,
) -> Array | tuple[Array, Array]:
    """Scaled dot-product attention with fused, memory-linear C++ kernels.

    A drop-in for ``jax.nn.dot_product_attention`` on the CPU, plus ``logits_soft_cap``.

    Args:
      query: ``[B, T, N, H]`` (or unbatched ``[T, N, H]``), float32, bfloat16 or float16, or
        float64 under ``jax_enable_x64`` (then computed and accumulated in float64,
        forward, backward and forward mode; see docs/semantics.md section 7).
      key: ``[B, S, K, H]`` with ``N % K == 0``; query head ``n`` uses kv head ``n // (N // K)``.
      value: ``[B, S, K, Hv]``; ``Hv`` may differ from ``H``.
      bias: optional, broadcastable to ``[B, N, T, S]``, float32, bfloat16 or float16 (its
        own dtype, independent of the inputs'); added to the scaled float32 logits in float32.
        Its gradient is summed over the broadcast axes in float32, in a fixed order. With
        float64 inputs the bias is float64 (any float bias is converted) and so is its
        gradient.
      mask: optional bool, broadcastable to ``[B, N, T, S]``; True means attend. A rank-3
        mask ``[X, T, S]`` is ``[N, T, S]`` (NumPy broadcasting, shared over the batch) when
        ``X`` is N or 1, and ``[B, T, S]`` shared over heads (as Flax and gemma pass it) when
        ``X`` is the batch B != N. When ``B == N`` write the heads axis (``mask[:, None]``)
        to share a ``[B, T, S]`` mask over heads.
      scale: logit scale, default ``1 / sqrt(H)``.
      is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned, as ``jax.nn``).
      query_seq_lengths: optional int ``[B]``; rows ``i >= len`` output 0.
      key_value_seq_lengths: optional int ``[B]``; keys ``j >= len`` are masked.
      local_window_size: ``(left, right)`` or ``w`` for ``(w, w)``: query ``i`` sees keys
        ``i - left <= j <= i + right``.
      logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)`` (after the bias,
        before the masks).
      return_residual: also return the log-sum-exp of the logits, ``[B, T, N]`` float32
        (float64 for float64 inputs).
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
      dropout_rate: dropout on the attention weights, in ``[0, 1)``: each normalised weight
        is dropped with this probability inside the kernels and the kept ones are scaled by
        ``1 / (1 - rate)``; the backward regenerates the same mask. The mask is a hash of
        ``(dropout_rng, batch, head, query, key)`` (``jaxattn.dropout_mask`` computes it):
        the same for a key whatever the thread count, different for different keys. The lse
        is that of the undropped weights. Reverse-mode gradients only (forward mode raises
        ``NotImplementedError``).
      dropout_rng: a JAX PRNG key (``jax.random.key``), required when ``dropout_rate > 0``.
      dropout_broadcast: one ``[T, S]`` dropout mask shared by the batch and the heads
        (Flax's ``broadcast_dropout=True``); default a mask per batch row and head.

    Returns:
      ``[B, T, N, Hv]`` in the input dtype (and the lse when ``return_residual``). A row that
      sees no key outputs 0 with lse ``-inf`` and gets zero gradients.

    The contract (the order of scale, bias, soft cap and masks; rows that see no key; the
    differences from ``jax.nn``): docs/semantics.md, section 1.
    """
    query, key, value = (as_array(x, name) for x, name in
                         ((query, "query"), (key, "key"), (value, "value")))
    unbatched = query.ndim == 3
    check_attention_inputs(query, key, value)
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    b, t, n, h = query.shape
    s = key.shape[1]
    hv = value.shape[3]
    scale = check_scale(scale, h)
    soft_cap = check_soft_cap(logits_soft_cap)
    window = normalize_window(local_window_size)
    is_causal = check_bool(is_causal, "is_causal")
    return_residual = check_bool(return_residual, "return_residual")
    dropout_rate, dropout_rng = check_dropout(dropout_rate, dropout_rng)
    dropout_broadcast = check_bool(dropout_broadcast, "dropout_broadcast")
    full = (b, n, t, s)

    if bias is not None:
        bias = as_array(bias, "bias")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be a floating array, got dtype {bias.dtype}")
        if query.dtype == jnp.float64:
            bias = bias.astype(jnp.float64)  # the float64 kernels add it in float64
        elif bias.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
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
        if mask.ndim == 3 and not unbatched:
            mask = _batch_mask_to_rank4(mask, full)
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

    if any_zero(b, t, n, s):  # nothing to compute or nothing to attend to
        out = jnp.zeros((b, t, n, hv), query.dtype)
        lse = jnp.full((b, t, n), -jnp.inf, lse_dtype(query.dtype))
    else:
        query, scale = fold_scale(query, scale)
        options = _Options(float(scale), soft_cap, bool(is_causal), window,
                           dropout_threshold(dropout_rate))
        # Hv = 0: the output is empty but the lse still depends on the logits; the kernels
        # need Hv >= 1, so attend to a zero value of width 1 and drop it.
        kernel_value = value if hv else jnp.zeros(value.shape[:3] + (1,), value.dtype)
        if dropout_rng is not None:
            check_reverse_mode_only(
                "jaxattn.flash_attention", query, key, value, bias, message=(
                    "jaxattn.flash_attention: forward-mode differentiation (jax.jvp, "
                    "jax.linearize, jax.jacfwd, jax.hessian) with dropout_rate > 0 is not "
                    "implemented; use reverse mode (jax.grad, jax.vjp, jax.jacrev), or "
                    "dropout_rate=0 for forward mode."))
            tokens = (*tokens, dropout_seeds(dropout_rng, b, n, dropout_broadcast))
        # In shard_map, a replicated operand is cast to varying here, outside the custom_vjp,
        # so that autodiff sums its gradient over the devices (the transpose of the cast).
        operands = match_varying((query, key, kernel_value, bias, mask, q_lengths, kv_lengths,
                                  *tokens))
        attention = _flash if dropout_rng is None else _flash_dropout
        out, lse = attention(options, *operands[:7], tuple(operands[7:]))
        if not hv:
            out = out[..., :0]
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out
