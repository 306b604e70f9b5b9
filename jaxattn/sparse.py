"""Block-sparse attention: ``flash_attention`` with a ``BlockSparseMask``, skipping empty blocks."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _ffi
from jaxattn._autodiff import check_reverse_mode_only, forbid_forward_mode
from jaxattn._sharding import match_varying
from jaxattn._validation import (
    any_zero,
    as_array,
    check_alibi_slopes,
    check_attention_inputs,
    check_bool,
    check_scale,
    fold_scale,
    lse_dtype,
    check_soft_cap,
    check_token_ids,
)
from jaxattn.dropout import check_dropout, dropout_seeds, dropout_threshold
from jaxattn.masks import BlockSparseMask

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of one call (hashable: a custom_vjp non-differentiable argument)."""

    scale: float
    soft_cap: float | None
    per_head: bool = False  # tables per kv head: a sharded jit may split the batch only
    dropout_threshold: int = 0  # 0: no dropout (jaxattn/dropout.py)

    def attrs(self) -> dict:
        return dict(scale=np.float32(self.scale), soft_cap=np.float32(self.soft_cap or 0.0),
                    **_ffi.dropout_attrs(self.dropout_threshold))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse(options: _Options, q, k, v, tables, tokens):
    # tokens: query_positions, key_value_positions, query_segment_ids, key_value_segment_ids,
    # alibi_slopes (absent ones empty), the dropout seeds (empty: none), as for flash attention
    q_indptr, q_entries, _, _, masks, _ = tables
    fwd_p = _ffi.sparse_fwd_per_head_p if options.per_head else _ffi.sparse_fwd_p
    out, lse = fwd_p.bind(q, k, v, q_indptr, q_entries, masks, *tokens, **options.attrs())
    return out, lse


def _sparse_fwd(options, q, k, v, tables, tokens):
    out, lse = _sparse(options, q, k, v, tables, tokens)
    return (out, lse), (q, k, v, tables, tokens, out, lse)


def _sparse_bwd(options, residuals, cotangents):
    q, k, v, tables, tokens, out, lse = residuals
    dout, dlse = cotangents
    bwd_p = _ffi.sparse_bwd_per_head_p if options.per_head else _ffi.sparse_bwd_p
    dq, dk, dv = bwd_p.bind(q, k, v, out, lse, dout.astype(out.dtype),
                            dlse.astype(lse.dtype), *tables, *tokens, **options.attrs())
    # The slopes get no gradient (as in flash_attention).
    dtokens = (None, None, None, None, jnp.zeros_like(tokens[4]), None)
    return dq, dk, dv, tuple(None for _ in tables), dtokens


_sparse.defvjp(_sparse_fwd, _sparse_bwd)
for _primitive in (_ffi.sparse_fwd_p, _ffi.sparse_bwd_p, _ffi.sparse_fwd_per_head_p,
                   _ffi.sparse_bwd_per_head_p):
    forbid_forward_mode(_primitive, "jaxattn.block_sparse_attention")


def prepare_tables(mask: BlockSparseMask, num_heads: int,
                   num_kv_heads: int) -> tuple[np.ndarray, ...]:
    """The kernel tables ``block_sparse_attention`` runs on for ``mask`` with N = ``num_heads``
    query heads and K = ``num_kv_heads`` kv heads (host arrays, compiled once per mask and
    GQA group size and cached on the mask; see ``jaxattn._mask_tables.kernel_tables``).
    Calling it ahead of time moves the compilation out of the first attention call."""
    group = num_heads // num_kv_heads
    positions, _, keys_per_tile, rows_padded = _ffi.block_sparse_tiling(group)
    groups = 1 if mask.num_heads == 1 else num_kv_heads
    return mask.kernel_tables(positions, keys_per_tile, group, groups, rows_padded)


def block_sparse_attention(
    query: Any,
    key: Any,
    value: Any,
    mask: BlockSparseMask,
    *,
    scale: float | None = None,
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
    """Attention restricted to a block-sparse mask; empty blocks are never computed.

    Equals ``flash_attention(query, key, value, mask=mask.to_dense(), scale=...,
    logits_soft_cap=...)`` forward and backward (bitwise, on the same kernels), at a cost that
    follows the mask's density: full blocks do no mask work, partial blocks apply their element
    mask. The mask is compiled once (per GQA group size) into tables for the kernels' tiling
    and cached on the mask, so reuse one mask object across calls.

    Args:
      query: ``[B, T, N, H]`` (or unbatched ``[T, N, H]``), float32, bfloat16 or float16.
      key: ``[B, S, K, H]`` with ``N % K == 0``; query head ``n`` uses kv head ``n // (N // K)``.
      value: ``[B, S, K, Hv]``.
      mask: a ``jaxattn.BlockSparseMask`` for ``T`` queries and ``S`` keys, shared by all
        heads or with ``N`` heads. It is static (host data): close over it or pass it as a
        static argument of ``jax.jit``; it cannot be a traced value.
      scale: logit scale, default ``1 / sqrt(H)``.
      logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)`` before masking.
      return_residual: also return the log-sum-exp of the logits, ``[B, T, N]`` float32.
      query_positions, key_value_positions: optional int ``[B, T]``, ``[B, S]`` (or ``[T]``,
        ``[S]``): the token positions ALiBi measures (there is no causal mask or window
        here: the block mask is the mask).
      query_segment_ids, key_value_segment_ids: optional int ``[B, T]``, ``[B, S]`` (both or
        neither): packed sequences, ANDed with the block mask; tiles whose ids do not match
        are skipped too.
      alibi_slopes: optional float ``[N]`` or ``[B, N]``: ALiBi, as in ``flash_attention``.
      dropout_rate, dropout_rng: dropout on the attention weights, as in ``flash_attention``
        (the same mask for the same key and shapes: ``jaxattn.dropout_mask``).
      dropout_broadcast: one ``[T, S]`` dropout mask shared by the batch and the heads
        (Flax's ``broadcast_dropout=True``); default a mask per batch row and head.

    Returns:
      ``[B, T, N, Hv]`` in the input dtype (and the lse when ``return_residual``). A row that
      sees no key outputs 0 with lse ``-inf`` and gets zero gradients.

    The contract: docs/semantics.md, section 3.
    """
    check_reverse_mode_only("jaxattn.block_sparse_attention", query, key, value)
    query, key, value = (as_array(x, name) for x, name in
                         ((query, "query"), (key, "key"), (value, "value")))
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a jaxattn.BlockSparseMask (see jaxattn.masks), got "
                        f"{type(mask).__name__}")
    unbatched = query.ndim == 3
    check_attention_inputs(query, key, value)
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    b, t, n, h = query.shape
    s, kv_heads = key.shape[1], key.shape[2]
    hv = value.shape[3]
    if (mask.q_len, mask.kv_len) != (t, s):
        raise ValueError(f"mask is for q_len={mask.q_len}, kv_len={mask.kv_len} but query has "
                         f"T={t} and key S={s}")
    if mask.num_heads not in (1, n):
        raise ValueError(f"mask has {mask.num_heads} heads; it must have 1 or N={n} (the "
                         f"query heads)")
    scale = check_scale(scale, h)
    soft_cap = check_soft_cap(logits_soft_cap)
    if (query_segment_ids is None) != (key_value_segment_ids is None):
        raise ValueError("query_segment_ids and key_value_segment_ids must be given together "
                         "(both or neither)")
    tokens = (check_token_ids(query_positions, "query_positions", b, t, unbatched),
              check_token_ids(key_value_positions, "key_value_positions", b, s, unbatched),
              check_token_ids(query_segment_ids, "query_segment_ids", b, t, unbatched),
              check_token_ids(key_value_segment_ids, "key_value_segment_ids", b, s, unbatched),
              check_alibi_slopes(alibi_slopes, b, n, unbatched))
    dropout_rate, dropout_rng = check_dropout(dropout_rate, dropout_rng)
    tokens = (*tokens, _ffi.no_dropout_seeds() if dropout_rng is None else
              dropout_seeds(dropout_rng, b, n, check_bool(dropout_broadcast,
                                                          "dropout_broadcast")))

    if any_zero(b, n, hv):  # nothing to compute
        out = jnp.zeros((b, t, n, hv), query.dtype)
        lse = jnp.full((b, t, n), -jnp.inf, lse_dtype(query.dtype))
    else:
        groups = 1 if mask.num_heads == 1 else kv_heads
        tables = tuple(jnp.asarray(x) for x in prepare_tables(mask, n, kv_heads))
        # shard_map: a replicated operand is cast to varying outside the custom_vjp, so that
        # its gradient is summed over the devices.
        query, key, value, *tokens = match_varying((query, key, value, *tokens))
        query, scale = fold_scale(query, scale)
        options = _Options(scale, soft_cap, groups > 1, dropout_threshold(dropout_rate))
        out, lse = _sparse(options, query, key, value, tables, tuple(tokens))
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out
