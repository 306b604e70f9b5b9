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
    check_bool,
    check_lengths,
    check_scale,
    check_soft_cap,
    normalize_window,
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
def _flash(options: _Options, q, k, v, bias, mask, q_lengths, kv_lengths):
    out, lse = _ffi.flash_fwd_p.bind(q, k, v, bias, mask, q_lengths, kv_lengths,
                                     **options.attrs())
    return out, lse


def _flash_fwd(options, q, k, v, bias, mask, q_lengths, kv_lengths):
    out, lse = _flash(options, q, k, v, bias, mask, q_lengths, kv_lengths)
    return (out, lse), (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse)


def _flash_bwd(options, residuals, cotangents):
    q, k, v, bias, mask, q_lengths, kv_lengths, out, lse = residuals
    dout, dlse = cotangents
    operands = (q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dout.astype(out.dtype),
                dlse.astype(jnp.float32))
    dq, dk, dv = _ffi.flash_bwd_p.bind(*operands, **options.attrs())
    if bias.size:
        (dlogits,) = _ffi.flash_dlogits_p.bind(*operands, **options.attrs())
        broadcast_axes = tuple(i for i in range(4) if bias.shape[i] == 1 and dlogits.shape[i] != 1)
        dbias = dlogits.sum(axis=broadcast_axes, keepdims=True).astype(bias.dtype)
    else:
        dbias = jnp.zeros_like(bias)
    return dq, dk, dv, dbias, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


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
) -> Array | tuple[Array, Array]:
    """Scaled dot-product attention with fused, memory-linear C++ kernels.

    A drop-in for ``jax.nn.dot_product_attention`` on the CPU, plus ``logits_soft_cap``.

    Args:
      query: ``[B, T, N, H]`` (or unbatched ``[T, N, H]``), float32, bfloat16 or float16.
      key: ``[B, S, K, H]`` with ``N % K == 0``; query head ``n`` uses kv head ``n // (N // K)``.
      value: ``[B, S, K, Hv]``; ``Hv`` may differ from ``H``.
      bias: optional, broadcastable to ``[B, N, T, S]``; added to the scaled logits.
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
    full = (b, n, t, s)

    if bias is not None:
        bias = as_array(bias, "bias")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be a floating array, got dtype {bias.dtype}")
        bias = _to_rank4(bias.astype(query.dtype), "bias", full)
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
        operands = match_varying((query, key, kernel_value, bias, mask, q_lengths, kv_lengths))
        out, lse = _flash(options, *operands)
        if not hv:
            out = out[..., :0]
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out
