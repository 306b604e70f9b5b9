"""Gated linear attention (GLA): chunked C++ kernels on the CPU, forward and backward.

The recurrence of flash-linear-attention's ``naive_recurrent_gla``, with a float32 state, per
batch element and head::

    S_0 = initial_state (float32 [Hk, Hv]) or 0
    S_t = diag(exp(log_gate_t)) S_{t-1} + key_t^T value_t      (outer product, Hk x Hv)
    out_t = (scale * query_t) S_t

Special cases: ``log_gate = 0`` everywhere is plain causal linear attention
(``out_t = scale * q_t sum_{s<=t} k_s^T v_s``); a constant per head, ``log(gamma_n)``
broadcast over time and the key dim, is RetNet's retention. A gate with one value per head and
step (``[B, T, N]``: Mamba-2, RetNet, flash-linear-attention's "simple GLA") runs kernels that
decay the chunk's score matrix instead of every query and key element. Key, value and gate may
have fewer heads than the query (grouped-query attention): each query head reads its group's.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _ffi
from jaxattn._sharding import match_varying
from jaxattn._validation import (
    MAX_HEAD_DIM,
    as_array,
    check_bool,
    check_dtype,
    check_scale,
)

Array = jax.Array


def _sum_groups(grad: Array, kv_heads: int) -> Array:
    """``[B, T, N, H]`` per query head -> ``[B, T, K, H]``: the sum over each kv head's group
    (in float32)."""
    b, t, n, h = grad.shape
    if n == kv_heads:
        return grad
    grouped = grad.reshape(b, t, kv_heads, n // kv_heads, h)
    return grouped.sum(axis=3, dtype=jnp.float32).astype(grad.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gla(scale: float, q, k, v, log_gate, initial_state):
    out, final_state = _ffi.gla_fwd_p.bind(q, k, v, log_gate, initial_state,
                                           scale=np.float32(scale))
    return out, final_state


def _gla_fwd(scale, q, k, v, log_gate, initial_state):
    return _gla(scale, q, k, v, log_gate, initial_state), (q, k, v, log_gate, initial_state)


def _gla_bwd(scale, residuals, cotangents):
    q, k, v, log_gate, initial_state = residuals
    dout, dfinal_state = cotangents
    dq, dk, dv, dg, dinit = _ffi.gla_bwd_p.bind(
        q, k, v, log_gate, initial_state, dout.astype(q.dtype),
        dfinal_state.astype(jnp.float32), scale=np.float32(scale))
    if not initial_state.size:
        dinit = jnp.zeros_like(initial_state)
    kv_heads = k.shape[2]
    return dq, _sum_groups(dk, kv_heads), _sum_groups(dv, kv_heads), \
        _sum_groups(dg, kv_heads), dinit


_gla.defvjp(_gla_fwd, _gla_bwd)


def gated_linear_attention(
    query: Any,
    key: Any,
    value: Any,
    log_gate: Any,
    *,
    scale: float | None = None,
    initial_state: Any | None = None,
    return_final_state: bool = False,
) -> Array | tuple[Array, Array]:
    """Gated linear attention: a decaying outer-product state instead of a softmax.

    Per batch element and query head, with a float32 state ``S`` of shape ``[Hk, Hv]``::

        S_t = diag(exp(log_gate_t)) S_{t-1} + key_t^T value_t,   out_t = (scale * query_t) S_t

    ``log_gate = 0`` is plain causal linear attention; a constant per head (``log(gamma)``,
    broadcast to ``[B, T, N]``) is RetNet's retention; ``log_gate = log_sigmoid(...)`` is
    GLA's forget gate. Training runs chunked kernels (within a chunk a masked quadratic
    product with the gates in log space, between chunks the state); ``T <= 4`` (decoding, with
    ``initial_state`` and ``return_final_state``) runs the recurrence step by step, reading and
    writing the state once: generation carries ``[B, N, Hk, Hv]`` instead of a KV cache.
    The kernel writes ``final_state`` into ``initial_state``'s buffer: donate the state
    (``jax.jit(step, donate_argnums=...)``) or carry it through ``lax.fori_loop``/``scan``
    and each step updates it in place; a state the caller keeps is copied first by XLA.

    **Scalar gates.** A ``log_gate`` of shape ``[B, T, K]`` (or ``[B, T, K, 1]``) is one gate
    per head and step, the same decay on every key dim (Mamba-2, RetNet, flash-linear-attention's
    ``chunk_simple_gla``). It equals the per-dimension gate broadcast to ``[B, T, K, Hk]`` (to
    rounding), runs faster kernels (a chunk's ``[C, C]`` score matrix is scaled by
    ``exp(G_i - G_j)`` instead of every query and key element) and its gradient is
    ``[B, T, K]``.

    **Grouped heads (GQA).** ``key``, ``value`` and ``log_gate`` may have ``K`` heads, ``K``
    dividing the ``N`` query heads: query head ``n`` reads kv head ``n // (N // K)`` (the
    layout of flash-linear-attention's GLA layer with ``num_kv_heads``, where key, value and
    gate are repeated over the group, without the repeat). The state stays per query head,
    ``[B, N, Hk, Hv]``, as after such a repeat; the gradients of key, value and log_gate are
    summed over each group.

    ``log_gate`` should be ``<= 0`` (the log of a forget gate in (0, 1]); ``-inf`` resets the
    state. Positive values are allowed and computed exactly, but make the state grow by
    ``exp(sum of the gates)`` without bound: once that leaves float32 range the results become
    ``inf``/``nan``. Use them only for small excursions (e.g. learned gates near 0).

    Args:
      query: ``[B, T, N, Hk]`` (or unbatched ``[T, N, Hk]``), float32, bfloat16 or float16.
      key: ``[B, T, K, Hk]``, the dtype of ``query``; ``K`` divides ``N`` (``K = N``: one kv
        head per query head).
      value: ``[B, T, K, Hv]``, the dtype of ``query``; ``Hv`` may differ from ``Hk``.
      log_gate: float32, bfloat16 or float16 (the cumulative gates are summed in float32 inside
        the kernels whatever this dtype), either per key dim, broadcastable to
        ``[B, T, K, Hk]``, or one per head and step: ``[B, T, K]`` (a gate of rank one less
        than ``query``, broadcastable to that) or any gate whose last dim is 1.
      scale: multiplies the query, default ``Hk ** -0.5``.
      initial_state: optional ``[B, N, Hk, Hv]`` (unbatched: ``[N, Hk, Hv]``), any float
        dtype, used as float32.
      return_final_state: also return ``S_T``, float32 ``[B, N, Hk, Hv]``.

    Returns:
      ``out [B, T, N, Hv]`` in the input dtype, and with ``return_final_state`` the tuple
      ``(out, final_state)``. Differentiable in query, key, value, log_gate and initial_state.
    """
    query, key, value, log_gate = (as_array(x, name) for x, name in (
        (query, "query"), (key, "key"), (value, "value"), (log_gate, "log_gate")))
    return_final_state = check_bool(return_final_state, "return_final_state")
    if query.ndim not in (3, 4):
        raise ValueError(f"query must have shape [B, T, N, Hk] or [T, N, Hk], got {query.shape}")
    unbatched = query.ndim == 3
    for x, name in ((key, "key"), (value, "value")):
        if x.ndim != query.ndim:
            raise ValueError(f"{name} must have the rank of query ({query.ndim}), got shape "
                             f"{x.shape} (query {query.shape})")
    for x, name in ((query, "query"), (key, "key"), (value, "value"), (log_gate, "log_gate")):
        check_dtype(x, name, float64=False)
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, "
                        f"{key.dtype}, {value.dtype}")
    if key.shape[:-2] != query.shape[:-2] or key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key must have shape {query.shape[:-2] + ('K', query.shape[-1])} "
                         f"(query {query.shape}), got {key.shape}")
    if value.shape[:-1] != key.shape[:-1]:
        raise ValueError(f"value must have shape {key.shape[:-1] + ('Hv',)} (key "
                         f"{key.shape}), got {value.shape}")
    heads, kv_heads = query.shape[-2], key.shape[-2]
    if (kv_heads == 0) != (heads == 0) or (kv_heads and heads % kv_heads):
        raise ValueError(f"key and value have {kv_heads} heads, which must divide the "
                         f"{heads} heads of query (grouped-query attention)")
    hk, hv = query.shape[-1], value.shape[-1]
    if not (1 <= hk <= MAX_HEAD_DIM and 1 <= hv <= MAX_HEAD_DIM):
        raise ValueError(f"head dims must be in [1, {MAX_HEAD_DIM}], got Hk={hk}, Hv={hv}")
    if log_gate.ndim == query.ndim - 1:  # [B, T, K]: one gate per head and step
        log_gate = log_gate[..., None]
    scalar_gate = log_gate.ndim == 0 or log_gate.shape[-1] == 1
    gate_shape = key.shape[:-1] + (1 if scalar_gate else hk,)
    try:
        log_gate = jnp.broadcast_to(log_gate, gate_shape)
    except ValueError as e:
        raise ValueError(
            f"log_gate of shape {log_gate.shape} is not broadcastable to {gate_shape} "
            f"([B, T, K, Hk] per key dim, or [B, T, K] / [B, T, K, 1] one per head and step; "
            f"key {key.shape})") from e
    scale = check_scale(scale, hk)
    state_shape = (() if unbatched else query.shape[:1]) + (query.shape[-2], hk, hv)
    if initial_state is not None:
        initial_state = as_array(initial_state, "initial_state")
        if not jnp.issubdtype(initial_state.dtype, jnp.floating):
            raise TypeError(f"initial_state must be a floating array, got dtype "
                            f"{initial_state.dtype}")
        if initial_state.shape != state_shape:
            raise ValueError(f"initial_state must have shape {list(state_shape)} ([B, N, Hk, "
                             f"Hv]), got {initial_state.shape}")
        initial_state = initial_state.astype(jnp.float32)
    if unbatched:
        query, key, value, log_gate = query[None], key[None], value[None], log_gate[None]
        if initial_state is not None:
            initial_state = initial_state[None]
    b, t, n, _ = query.shape

    if t == 0 or b == 0 or n == 0:
        out = jnp.zeros((b, t, n, hv), query.dtype)
        final_state = (initial_state if initial_state is not None
                       else jnp.zeros((b, n, hk, hv), jnp.float32))
    else:
        kernel_state = initial_state if initial_state is not None else jnp.zeros((0,), jnp.float32)
        operands = match_varying((query, key, value, log_gate, kernel_state))
        out, final_state = _gla(float(scale), *operands)
    if unbatched:
        out, final_state = out[0], final_state[0]
    if not return_final_state:
        return out
    return out, final_state


__all__ = ["gated_linear_attention"]
