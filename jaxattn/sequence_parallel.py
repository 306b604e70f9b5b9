"""Sequence-parallel attention: the key/value sequence split over a mesh axis.

Each device attends all queries to its own block of keys with ``flash_attention`` and keeps
the partial result with its log-sum-exp; the partial results are then gathered along the axis
and merged exactly. Only outputs move between devices ([B, T, N, Hv] and [B, T, N] per device,
never keys or values), which suits long key/value sequences and short-to-moderate queries
(prefill of a long context, decoding against a sharded cache). See docs/sharding.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxattn._sharding import match_varying
from jaxattn._validation import (
    as_array,
    check_attention_inputs,
    check_bool,
    check_lengths,
    check_scale,
)
from jaxattn.merge import merge_attention_states
from jaxattn.flash import flash_attention

Array = jax.Array


def _local_partial(query, key, value, q_lengths, kv_lengths, *, axis_name, is_causal, options):
    """This device's partial (out, lse): all queries against its block of keys."""
    block = key.shape[1]
    offset = jax.lax.axis_index(axis_name) * block
    batch = query.shape[0]
    if kv_lengths is None:
        local_lengths = jnp.full((batch,), block, jnp.int32)
    else:
        local_lengths = jnp.clip(kv_lengths - offset, 0, block).astype(jnp.int32)
    attend = partial(flash_attention, return_residual=True, **options)
    if not is_causal:
        return attend(query, key, value, query_seq_lengths=q_lengths,
                      key_value_seq_lengths=local_lengths)
    # Causal (query i sees keys j <= i, global positions): cut the queries into blocks of the
    # key block size. Against this device's keys, query block r is fully masked (r < device),
    # on the diagonal (r == device: causal within the block) or fully visible (r > device);
    # the device index is traced, so the case is chosen with lax.cond.
    device = jax.lax.axis_index(axis_name)
    # Cast the operands to varying here, outside the conds: the kernels' own cast of the
    # replicated query would otherwise sit inside the branches, and its transpose (a psum over
    # the axis) would be a different all-reduce in each branch, which devices taking different
    # branches never meet in (a hang on jax 0.12).
    query, key, value = match_varying([query, key, value])
    outs, lses = [], []
    for r, start in enumerate(range(0, query.shape[1], block)):
        stop = min(query.shape[1], start + block)
        q_block = query[:, start:stop]
        q_block_lengths = (None if q_lengths is None
                           else jnp.clip(q_lengths - start, 0, stop - start).astype(jnp.int32))
        hidden = jnp.where(r < device, 0, local_lengths).astype(jnp.int32)
        out, lse = jax.lax.cond(
            r == device,
            lambda: attend(q_block, key, value, is_causal=True, query_seq_lengths=q_block_lengths,
                           key_value_seq_lengths=local_lengths),
            lambda: attend(q_block, key, value, query_seq_lengths=q_block_lengths,
                           key_value_seq_lengths=hidden))
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def sequence_parallel_attention(
    query: Any,
    key: Any,
    value: Any,
    *,
    axis_name: str,
    mesh: Mesh | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Any | None = None,
    key_value_seq_lengths: Any | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
) -> Array | tuple[Array, Array]:
    """``flash_attention`` with the key/value sequence split over the mesh axis ``axis_name``.

    Equals ``flash_attention(query, key, value, ...)`` on the whole sequences (up to float
    rounding), forward and gradient.

    Two ways to call it:

    * ``mesh`` given: with global arrays. ``key``/``value`` are split along S over
      ``axis_name`` (S divisible by its size), ``query`` is replicated along it; other mesh
      axes stay automatic (a batch- or head-sharded input keeps running per shard). The
      result is replicated along ``axis_name``.
    * ``mesh`` None: inside ``jax.shard_map`` over ``axis_name``. ``key``/``value`` are this
      device's block ``[B, S / d, K, H]`` (block i on the device of axis index i), ``query``
      and the lengths are the same on every device of the axis.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]`` (or the local block, see above).
      value: ``[B, S, K, Hv]`` (or the local block).
      axis_name: the mesh axis that splits the key/value sequence.
      mesh: the mesh, to call it from outside ``shard_map``.
      scale, is_causal, query_seq_lengths, key_value_seq_lengths, logits_soft_cap,
      return_residual: as in ``flash_attention`` (positions are global: causal means query
        ``i`` sees keys ``j <= i`` of the whole sequence).

    Returns:
      ``[B, T, N, Hv]`` (and the lse ``[B, T, N]`` float32, float64 for float64 inputs, with
      ``return_residual``).
    """
    query, key, value = (as_array(x, name) for x, name in
                         ((query, "query"), (key, "key"), (value, "value")))
    check_attention_inputs(query, key, value)
    if query.ndim != 4:
        raise ValueError(f"query must have shape [B, T, N, H], got {query.shape}")
    is_causal = check_bool(is_causal, "is_causal")
    b = query.shape[0]
    q_lengths = None if query_seq_lengths is None else check_lengths(
        query_seq_lengths, "query_seq_lengths", b, False)
    kv_lengths = None if key_value_seq_lengths is None else check_lengths(
        key_value_seq_lengths, "key_value_seq_lengths", b, False)
    options = dict(scale=check_scale(scale, query.shape[3]),
                   logits_soft_cap=logits_soft_cap)
    local = partial(_sharded_attention, axis_name=axis_name, is_causal=is_causal,
                    options=options)
    if mesh is None:
        out, lse = local(query, key, value, q_lengths, kv_lengths)
    else:
        if axis_name not in mesh.axis_names:
            raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                             f"{mesh.axis_names}")
        parts = mesh.shape[axis_name]
        if key.shape[1] % parts:
            raise ValueError(f"the key/value length S={key.shape[1]} must be divisible by the "
                             f"size {parts} of mesh axis {axis_name!r}")
        split, whole = PartitionSpec(None, axis_name), PartitionSpec()
        out, lse = jax.shard_map(
            local, mesh=mesh, in_specs=(whole, split, split, whole, whole),
            out_specs=(whole, whole), axis_names={axis_name})(
                query, key, value, q_lengths, kv_lengths)
    return (out, lse) if return_residual else out


def _sharded_attention(query, key, value, q_lengths, kv_lengths, *, axis_name, is_causal,
                       options):
    out, lse = _local_partial(query, key, value, q_lengths, kv_lengths, axis_name=axis_name,
                              is_causal=is_causal, options=options)
    # Every device holds the partial result of its key block; gather them (the same array on
    # every device afterwards) and merge.
    # (A tiled gather along a new leading axis: an untiled one mis-types explicit shardings.)
    outs = jax.lax.all_gather(out[None], axis_name, tiled=True, to="invarying")
    lses = jax.lax.all_gather(lse[None], axis_name, tiled=True, to="invarying")
    return merge_attention_states(outs, lses)
