"""Registers the C++ custom-call targets with XLA and defines one JAX primitive per target.

Every primitive has an abstract evaluation, a lowering through ``jax.ffi.ffi_lowering`` and a
batching rule. The kernels read each operand at batch index ``b % operand_batch``, so the
batching rule folds a vmapped axis into the leading batch axis of the mapped operands in one
call and leaves unmapped operands as they are (shared K/V are never copied).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir, xla

from jaxattn import _jaxattn, _sharding
from jaxattn._validation import lse_dtype

TARGETS: dict[str, object] = _jaxattn.registrations()
for _name, _capsule in TARGETS.items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
    # Every handler accepts the shard views of _sharding.py (cc/ffi/shard_views.cc wraps
    # them all).
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)


def kernel_isa() -> str:
    """The kernel set the kernels run with in this process.

    One of ``available_kernel_isas()``: the best one for this CPU, or the one that the
    environment variable ``JAXATTN_ISA`` names when this CPU can run it (read once per
    process; an unknown name or one this CPU cannot run is ignored). ``kernel_isas()`` lists
    every kernel set compiled in.
    """
    return _jaxattn.kernel_isa()


def kernel_isas() -> tuple[str, ...]:
    """Every kernel set compiled into this build, whether or not this CPU can run it.

    The names ``JAXATTN_ISA`` accepts; the list comes from the kernel tables in
    ``cc/dispatch.cc``, so it is never out of date.
    """
    return tuple(_jaxattn.kernel_isas())


def available_kernel_isas() -> tuple[str, ...]:
    """The kernel sets this CPU can run (a subset of ``kernel_isas()``, in the same order)."""
    return tuple(name for name, runs in _jaxattn.kernel_isas().items() if runs)


if os.environ.get("JAXATTN_ISA") == "amx" and kernel_isa() != "amx":
    raise RuntimeError(
        "JAXATTN_ISA=amx, but the amx kernels cannot run here: the CPU lacks AMX-BF16 "
        "(amx_tile, amx_bf16) or AVX-512 with BF16, or Linux refused this process the AMX tile "
        "state (arch_prctl ARCH_REQ_XCOMP_PERM). Unset JAXATTN_ISA to use the best kernel set "
        f"this CPU has ({kernel_isa()}).")


def _leading_batch(aval) -> int:
    """Batch size of an operand whose leading axis is a batch axis; 1 for absent (empty) ones."""
    return aval.shape[0] if aval.size else 1


def _operand_axes(axes: str) -> tuple[str, ...]:
    """The axes of each operand in an ``axes`` string (``"btnh,Bbtnd,...->btnd"``)."""
    return tuple(axes.replace(" ", "").split("->")[0].split(","))


def _fold_batch_rule(prim: Primitive, operand_axes: Sequence[str], args: Sequence[jax.Array],
                     dims: Sequence[int | None], **params):
    """Folds the vmapped axis into the leading batch axis of every mapped operand.

    With V the vmapped size and B the operands' own batch, a mapped operand becomes
    [V*B, ...] (index v*B + b) and an unmapped one stays [B, ...] or [1, ...]: the kernels'
    ``b % operand_batch`` indexing reads the right element for both. A mapped operand of batch
    1 (a broadcast bias or mask) is broadcast to B first so that the modulo still holds.

    What each operand is comes from its axes (``operand_axes``, see ``_define``): those with
    axes ``B...`` (the backward's out, lse, dout, dlse, which the kernels read at the output's
    batch index) are broadcast to [V*B, ...] even when unmapped (vmap of grad hands in an
    unmapped zero cotangent for an unused lse); those without a leading batch axis (the
    block-sparse tables) are per call and must not be mapped.
    """
    batched = [i for i, a in enumerate(operand_axes) if a[:1] in ("b", "B")]
    if any(dims[i] is not None for i in range(len(args)) if i not in batched):
        raise ValueError(f"{prim.name}: the block-sparse mask tables cannot be vmapped; "
                         "vmap over query/key/value with one BlockSparseMask")
    # Positions among the batched operands.
    full_batch = tuple(k for k, i in enumerate(batched) if operand_axes[i].startswith("B"))

    def bind(*folded, **p):
        operands = list(args)
        for i, a in zip(batched, folded):
            operands[i] = a
        return prim.bind(*operands, **p)

    return _fold(bind, prim.multiple_results, [args[i] for i in batched],
                 [dims[i] for i in batched], full_batch, **params)


def _fold(bind: Callable, multiple_results: bool, args: Sequence[jax.Array],
          dims: Sequence[int | None], full_batch: Sequence[int], **params):
    folded, size = _fold_operands(args, dims, full_batch)
    return _unfold_results(multiple_results, bind(*folded, **params), size)


def _fold_operands(args: Sequence[jax.Array], dims: Sequence[int | None],
                   full_batch: Sequence[int] = ()) -> tuple[list[jax.Array], int]:
    """The folding of ``_fold_batch_rule``: (operands with the vmapped axis folded, its size)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    inner = 1
    for a, d in zip(args, dims):
        if a.size:
            own_shape = [s for i, s in enumerate(a.shape) if i != d]
            inner = max(inner, own_shape[0])
    folded = []
    for i, (a, d) in enumerate(zip(args, dims)):
        if d is None and a.size and i in full_batch:
            a = jnp.broadcast_to(a, (size, inner) + a.shape[1:])
            folded.append(a.reshape((size * inner,) + a.shape[2:]))
            continue
        if d is None or a.size == 0:
            folded.append(a if d is None else jnp.take(a, 0, axis=d))
            continue
        a = jnp.moveaxis(a, d, 0)
        if a.shape[1] != inner:
            a = jnp.broadcast_to(a, (size, inner) + a.shape[2:])
        folded.append(a.reshape((size * inner,) + a.shape[2:]))
    return folded, size


def _unfold_results(multiple_results: bool, outs, size: int):
    """Splits the folded leading axis of the results back into (vmapped, batch)."""
    unfold = lambda x: x.reshape((size, x.shape[0] // size) + x.shape[1:])
    if multiple_results:
        return [unfold(x) for x in outs], [0] * len(outs)
    return unfold(outs), 0


class _Primitive(Primitive):
    """A kernel primitive: operands are first cast to one set of varying manual axes.

    A _v3 flash or block-sparse primitive (``dropout_arity``: its number of operands) may be
    bound without the trailing dropout seeds and ``dropout_threshold``, as the _v2 layout
    was: they default to no dropout.
    """

    dropout_arity: int | None = None

    def bind(self, *args, **params):
        if self.dropout_arity is not None:
            if len(args) == self.dropout_arity - 1:
                args = (*args, no_dropout_seeds())
            params.setdefault("dropout_threshold", np.int64(0))
        return super().bind(*_sharding.match_varying(args), **params)


def _define(name: str, target: str, abstract_eval: Callable, axes: str,
            batch_rule: Callable | None = None, partition: str = "bh",
            aliases: dict[int, int] | None = None, dropout: bool = False) -> Primitive:
    """One primitive for one FFI target.

    ``axes`` names each operand's and result's axes, ``"btnh,bskh,...->btnd,btn"``: ``b``
    batch, ``n`` query heads, ``k`` kv heads, other letters unpartitioned; ``B`` a batch axis
    that the kernel reads at the output's batch index (the backward's out, lse, dout, dlse). A
    sharded jit runs the call on each device's shard of batch and heads (``partition``:
    ``"bh"``, ``"b"`` or ``"h"``), see docs/sharding.md. The batching rule folds a vmapped
    axis into the operands with a leading batch axis (``b`` or ``B``) and rejects a vmapped
    operand without one (``_fold_batch_rule``), or is ``batch_rule(prim, operand_axes, args,
    dims, **params)``, a rule of the primitive's own.
    ``aliases`` {operand: result}: buffers the kernel may update in place, see
    ``_sharding.partitionable_lowering``.
    ``dropout``: a _v3 flash or block-sparse target, whose last operand is the dropout seeds
    and whose attributes include ``dropout_threshold``; the primitive's ``dropout_arity`` (its
    number of operands, from ``axes``) lets it be bound without them (``_Primitive.bind``).
    """
    prim = _Primitive(name)
    prim.dropout_arity = len(_operand_axes(axes)) if dropout else None
    prim.multiple_results = True
    prim.def_impl(partial(xla.apply_primitive, prim))
    # For sharding, a B axis is a batch axis like any other.
    spec = _sharding.Axes.parse(axes.replace("B", "b"), partition)
    prim.def_abstract_eval(_sharding.with_sharding(abstract_eval, spec))
    mlir.register_lowering(prim, _sharding.partitionable_lowering(target, spec, aliases),
                           platform="cpu")
    batching.primitive_batchers[prim] = partial(batch_rule or _fold_batch_rule, prim,
                                                _operand_axes(axes))
    return prim


def _output_batch(*avals) -> int:
    return max(_leading_batch(a) for a in avals)


def _expect_ranks(primitive: str, **avals_by_name) -> None:
    """A clear error for operands the abstract evaluation cannot even shape (the kernels
    re-check everything else at run time)."""
    for name, (aval, rank) in avals_by_name.items():
        if aval.ndim != rank:
            raise ValueError(f"{primitive}: {name} must have rank {rank}, got shape {aval.shape}")


def _expect_qkv(primitive: str, q, k, v) -> None:
    _expect_ranks(primitive, query=(q, 4), key=(k, 4), value=(v, 4))


def _flash_fwd_abstract(q, k, v, bias, mask, q_lengths, kv_lengths, *tokens, **_):
    _expect_qkv("jaxattn_flash_fwd", q, k, v)
    b = _output_batch(q, k, v, bias, mask, q_lengths, kv_lengths, *tokens)
    _, t, n, _ = q.shape
    return (q.update(shape=(b, t, n, v.shape[3]), dtype=q.dtype),
            q.update(shape=(b, t, n), dtype=lse_dtype(q.dtype)))


def _flash_bwd_abstract(q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dout, dlse,
                        *tokens, **_):
    _expect_qkv("jaxattn_flash_bwd", q, k, v)
    b = _output_batch(q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dout, dlse, *tokens)
    return (q.update(shape=(b,) + q.shape[1:], dtype=q.dtype),
            k.update(shape=(b,) + k.shape[1:], dtype=k.dtype),
            v.update(shape=(b,) + v.shape[1:], dtype=v.dtype))


def _flash_dlogits_abstract(q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dout, dlse,
                            *tokens, **_):
    _expect_qkv("jaxattn_flash_dlogits", q, k, v)
    b = _output_batch(q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dout, dlse, *tokens)
    _, t, n, _ = q.shape
    return (q.update(shape=(b, n, t, k.shape[1]), dtype=lse_dtype(q.dtype)),)


# Operands: query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths, then
# (last, after the backward's out, lse, dout, dlse) the token operands query_positions [B,T],
# key_value_positions [B,S], query_segment_ids [B,T], key_value_segment_ids [B,S] (int32) and
# alibi_slopes [B,N] (float32), each of batch 1 or B (absent optional operands are empty
# arrays), and (the _v3 targets: not the tangent's) the dropout seeds [B,N,2] uint32
# (jaxattn/dropout.py); attributes: scale, soft_cap, is_causal, window_left, window_right, and
# for _v3 dropout_threshold (0: no dropout).
_FLASH_OPERANDS = "btnh,bskh,bskd,bnts,bnts,b,b"
_TOKEN_OPERANDS = "bt,bs,bt,bs,bn"
# The forward's out and lse and their cotangents dout, dlse: read at the output's batch (B).
_BACKWARD_OPERANDS = "Btnd,Btn,Btnd,Btn"
# The token operands of the _v3 targets: those above, then the dropout seeds [B, N, 2].
_V3_TOKEN_OPERANDS = f"{_TOKEN_OPERANDS},bnz"
flash_fwd_p = _define("jaxattn_flash_fwd", "jaxattn_flash_fwd_v3", _flash_fwd_abstract,
                      axes=f"{_FLASH_OPERANDS},{_V3_TOKEN_OPERANDS}->btnd,btn", dropout=True)
# ... plus out, lse, dout, dlse (before the token operands) -> dq, dk, dv
flash_bwd_p = _define("jaxattn_flash_bwd", "jaxattn_flash_bwd_v3", _flash_bwd_abstract,
                      axes=f"{_FLASH_OPERANDS},{_BACKWARD_OPERANDS},{_V3_TOKEN_OPERANDS}"
                           "->btnh,bskh,bskd", dropout=True)
# ... plus out, lse, dout, dlse -> d loss / d logits [B, N, T, S] (for a bias gradient), float32
# (float64 for float64 inputs, as the lse: lse_dtype)
flash_dlogits_p = _define("jaxattn_flash_dlogits", "jaxattn_flash_dlogits_v3",
                          _flash_dlogits_abstract,
                          axes=f"{_FLASH_OPERANDS},{_BACKWARD_OPERANDS},{_V3_TOKEN_OPERANDS}"
                               "->bnts", dropout=True)


def _flash_jvp_abstract(q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dq, dk, dv,
                        dbias, *tokens, **_):
    _expect_qkv("jaxattn_flash_jvp", q, k, v)
    b = _output_batch(q, k, v, bias, mask, q_lengths, kv_lengths, out, lse, dq, dk, dv, dbias,
                      *tokens)
    _, t, n, _ = q.shape
    return (q.update(shape=(b, t, n, v.shape[3]), dtype=q.dtype),
            q.update(shape=(b, t, n), dtype=lse_dtype(q.dtype)))


# ... plus out, lse and the tangents dq, dk, dv, dbias (empty: none), then the token operands
# -> the tangents of out and lse (forward-mode AD; linear in the tangents, transposed by
# flash_bwd_p/flash_dlogits_p)
flash_jvp_p = _define("jaxattn_flash_jvp", "jaxattn_flash_jvp_v1", _flash_jvp_abstract,
                      axes=f"{_FLASH_OPERANDS},Btnd,Btn,btnh,bskh,bskd,bnts,{_TOKEN_OPERANDS}"
                           "->btnd,btn")


def no_tokens() -> tuple[jax.Array, ...]:
    """The five absent token operands of the flash targets."""
    ints = jnp.zeros((0,), jnp.int32)
    return (ints, ints, ints, ints, jnp.zeros((0,), jnp.float32))


def no_dropout_seeds() -> jax.Array:
    """The absent dropout seeds operand of the _v3 flash and block-sparse targets."""
    return jnp.zeros((0,), jnp.uint32)


def _decode_abstract(q, k, v, kv_lengths, *tokens, **_):
    b = _output_batch(q, k, v, kv_lengths, *tokens)
    _, t, n, _ = q.shape
    return (q.update(shape=(b, t, n, v.shape[3]), dtype=q.dtype),
            q.update(shape=(b, t, n), dtype=lse_dtype(q.dtype)))


def _paged_decode_abstract(q, key_pages, value_pages, block_tables, kv_lengths, *tokens, **_):
    b = _output_batch(q, block_tables, kv_lengths, *tokens)  # the pages have no batch axis
    _, t, n, _ = q.shape
    return (q.update(shape=(b, t, n, value_pages.shape[3]), dtype=q.dtype),
            q.update(shape=(b, t, n), dtype=lse_dtype(q.dtype)))


def _paged_decode_batch_rule(prim: Primitive, operand_axes: Sequence[str],
                             args: Sequence[jax.Array], dims: Sequence[int | None], **params):
    """Folds the vmapped axis into the batch of the batched operands (query, block_tables,
    kv_lengths, token operands).

    The operands without a batch axis (axes ``p...``) are page pools (pages, and the scales of
    quantized pages; an empty one is absent). Shared (unmapped) pools are left alone. When any
    pool is mapped (one pool per vmapped instance), every pool is concatenated into one of V*P
    pages and instance v's page ids (the block tables, axes ``bm``) are shifted by v*P;
    out-of-range ids stay out of range (-1) so that the kernel still rejects them.
    """
    args, dims = list(args), list(dims)
    pools = [i for i, a in enumerate(operand_axes) if a.startswith("p")]
    batched = [i for i in range(len(args)) if i not in pools]
    tables = operand_axes.index("bm")
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if any(dims[i] is not None for i in pools):
        def mapped(x, d):
            if x.size == 0 and d is None:
                return x, None
            x = jnp.moveaxis(x, d, 0) if d is not None else jnp.broadcast_to(x, (size,) + x.shape)
            return x.reshape((-1,) + x.shape[2:]), x.shape[1]
        num_pages = None
        for i in pools:
            args[i], pages = mapped(args[i], dims[i])
            num_pages = pages if num_pages is None else num_pages
        block_tables = args[tables]
        if dims[tables] is None:
            block_tables = jnp.broadcast_to(block_tables, (size,) + block_tables.shape)
        else:
            block_tables = jnp.moveaxis(block_tables, dims[tables], 0)
        offset = (jnp.arange(size, dtype=jnp.int32) * num_pages)[:, None, None]
        valid = (block_tables >= 0) & (block_tables < num_pages)
        args[tables], dims[tables] = jnp.where(valid, block_tables + offset, -1), 0
    folded, _ = _fold_operands([args[i] for i in batched], [dims[i] for i in batched])
    for i, a in zip(batched, folded):
        args[i] = a
    outs = prim.bind(*args, **params)
    return _unfold_results(prim.multiple_results, outs, size)


def _quant_decode_abstract(q, k, v, key_scale, value_scale, kv_lengths, *tokens, **_):
    return _decode_abstract(q, k, v, kv_lengths, *tokens)


def _quant_paged_decode_abstract(q, key_pages, value_pages, key_scale, value_scale,
                                 block_tables, kv_lengths, *tokens, **_):
    return _paged_decode_abstract(q, key_pages, value_pages, block_tables, kv_lengths, *tokens)


def _quant_decode_batch_rule(prim: Primitive, operand_axes: Sequence[str],
                             args: Sequence[jax.Array], dims: Sequence[int | None], **params):
    """The folding rule, with the caches and their scales (the operands with the caches' axes
    ``sk``) mapped together: the kernel reads them all at one batch index, so when one is
    mapped the others are broadcast alike."""
    args, dims = list(args), list(dims)
    cache = [i for i, a in enumerate(operand_axes) if "sk" in a and args[i].size]
    mapped = [i for i in cache if dims[i] is not None]
    if mapped and len(mapped) < len(cache):
        size = args[mapped[0]].shape[dims[mapped[0]]]
        for i in cache:
            if dims[i] is None:
                args[i], dims[i] = jnp.broadcast_to(args[i], (size,) + args[i].shape), 0
    return _fold_batch_rule(prim, operand_axes, args, dims, **params)


# Operands: query [B,T,N,H], key_cache [B,Smax,K,H], value_cache [B,Smax,K,Hv] (key and value
# caches may differ in batch: a vmap mapping one of them), kv_lengths [B] int32, then
# query_positions [B,T], key_value_positions [B,Smax] (int32), alibi_slopes [B,N] (float32)
# and query_lengths [B] (int32), each of batch 1 or B or empty (absent); attributes: scale,
# soft_cap, window_left, strict_lengths. Results: out [B,T,N,Hv], lse [B,T,N] f32 (f64 for
# f64 inputs). Any T (beyond 16 tokens the kernel runs the flash tiles over the cache).
decode_fwd_p = _define("jaxattn_decode_fwd", "jaxattn_decode_fwd_v3", _decode_abstract,
                       axes="btnh,bskh,bskd,b,bt,bs,bn,b->btnd,btn")
# Operands: query, key_pages [P,page,K,H], value_pages [P,page,K,Hv], block_tables
# [B,max_pages] int32, kv_lengths [B] int32, then the token operands as decode_fwd_p
# (key_value_positions [B, max_pages * page]); attributes and results as decode_fwd_p.
paged_decode_fwd_p = _define("jaxattn_paged_decode_fwd", "jaxattn_paged_decode_fwd_v3",
                             _paged_decode_abstract, batch_rule=_paged_decode_batch_rule,
                             axes="btnh,pskh,pskd,bm,b,bt,bj,bn,b->btnd,btn",
                             partition="h")  # P is no batch


def no_decode_tokens() -> tuple[jax.Array, ...]:
    """The four absent token operands of the decode targets."""
    ints = jnp.zeros((0,), jnp.int32)
    return (ints, ints, jnp.zeros((0,), jnp.float32), ints)


# Quantized caches (int8, float8_e4m3fn, float8_e5m2): the operands above plus key_scale and
# value_scale after the caches, float32 [B,Smax,K] / [P,page,K] or empty (scale 1).
quant_decode_fwd_p = _define("jaxattn_quant_decode_fwd", "jaxattn_quant_decode_fwd_v2",
                             _quant_decode_abstract, batch_rule=_quant_decode_batch_rule,
                             axes="btnh,bskh,bskd,bsk,bsk,b,bt,bs,bn,b->btnd,btn")
quant_paged_decode_fwd_p = _define(
    "jaxattn_quant_paged_decode_fwd", "jaxattn_quant_paged_decode_fwd_v2",
    _quant_paged_decode_abstract, batch_rule=_paged_decode_batch_rule,
    axes="btnh,pskh,pskd,psk,psk,bm,b,bt,bj,bn,b->btnd,btn", partition="h")


def decode_attrs(scale: float, soft_cap: float | None, window_left: int | None,
                 strict_lengths: bool = False) -> dict:
    """The FFI attributes of the decode targets, typed as the C++ handlers expect."""
    return dict(scale=np.float32(scale), soft_cap=np.float32(soft_cap or 0.0),
                window_left=np.int64(-1 if window_left is None else window_left),
                strict_lengths=bool(strict_lengths))


def attention_attrs(scale: float, soft_cap: float | None, is_causal: bool,
                    window: tuple[int, int] | None) -> dict:
    """The FFI attributes shared by the flash targets, typed as the C++ handlers expect."""
    left, right = window if window is not None else (-1, -1)
    return dict(scale=np.float32(scale), soft_cap=np.float32(soft_cap or 0.0),
                is_causal=bool(is_causal), window_left=np.int64(left),
                window_right=np.int64(right))


def dropout_attrs(threshold: int) -> dict:
    """The dropout attribute of the _v3 flash and block-sparse targets (0: no dropout)."""
    return dict(dropout_threshold=np.int64(threshold))


def _sparse_fwd_abstract(q, k, v, q_indptr, q_entries, masks, *tokens, **_):
    b = _output_batch(q, k, v, *tokens)
    _, t, n, _ = q.shape
    return (q.update(shape=(b, t, n, v.shape[3]), dtype=q.dtype),
            q.update(shape=(b, t, n), dtype=lse_dtype(q.dtype)))


def _sparse_bwd_abstract(q, k, v, out, lse, dout, dlse, *tables_and_tokens, **_):
    tokens = tables_and_tokens[6:]
    b = _output_batch(q, k, v, out, lse, dout, dlse, *tokens)
    return (q.update(shape=(b,) + q.shape[1:], dtype=q.dtype),
            k.update(shape=(b,) + k.shape[1:], dtype=k.dtype),
            v.update(shape=(b,) + v.shape[1:], dtype=v.dtype))


# Block-sparse attention. Operands: query, key, value, then the mask's tables for the kernels'
# tiling (unbatched): q_indptr, q_entries, masks, then the token operands of the _v3 flash
# targets (batched; empty when absent: the five tokens and the dropout seeds); attributes:
# scale, soft_cap, dropout_threshold (0: no dropout).
_SPARSE_FWD_AXES = f"btnh,bskh,bskd,x,xy,xyz,{_V3_TOKEN_OPERANDS}->btnd,btn"
sparse_fwd_p = _define("jaxattn_sparse_fwd", "jaxattn_sparse_fwd_v3", _sparse_fwd_abstract,
                       axes=_SPARSE_FWD_AXES, dropout=True)
# query, key, value, out, lse, dout, dlse (batched), then q_indptr, q_entries, k_indptr,
# k_entries, masks, masks_t, then the token operands (with the dropout seeds, as the flash _v3
# targets; attribute dropout_threshold) -> dq, dk, dv
_SPARSE_BWD_AXES = (f"btnh,bskh,bskd,{_BACKWARD_OPERANDS},x,xy,x,xy,xyz,xyz,"
                    f"{_V3_TOKEN_OPERANDS}->btnh,bskh,bskd")
sparse_bwd_p = _define("jaxattn_sparse_bwd", "jaxattn_sparse_bwd_v3", _sparse_bwd_abstract,
                       axes=_SPARSE_BWD_AXES, dropout=True)
# The same targets for a per-head mask, whose tables are indexed by kv head: a sharded jit may
# split the batch only (tables shared by all heads, above, allow batch and heads).
sparse_fwd_per_head_p = _define("jaxattn_sparse_fwd_per_head", "jaxattn_sparse_fwd_v3",
                                _sparse_fwd_abstract, axes=_SPARSE_FWD_AXES, partition="b",
                                dropout=True)
sparse_bwd_per_head_p = _define("jaxattn_sparse_bwd_per_head", "jaxattn_sparse_bwd_v3",
                                _sparse_bwd_abstract, axes=_SPARSE_BWD_AXES, partition="b",
                                dropout=True)


def block_sparse_tiling(group: int) -> tuple[int, int, int, int]:
    """The kernels' tile for GQA group size ``group``: (query positions, rows, keys, rows
    rounded up to whole vectors)."""
    return tuple(_jaxattn.block_sparse_tiling(int(group)))


def _gla_fwd_abstract(q, k, v, log_gate, initial_state, **_):
    _expect_ranks("jaxattn_gla_fwd", query=(q, 4), key=(k, 4), value=(v, 4),
                  log_gate=(log_gate, 4))
    b = _output_batch(q, k, v, log_gate, initial_state)
    _, t, n, hk = q.shape
    hv = v.shape[3]
    return (q.update(shape=(b, t, n, hv), dtype=q.dtype),
            q.update(shape=(b, n, hk, hv), dtype=jnp.float32))


def _gla_bwd_abstract(q, k, v, log_gate, initial_state, dout, dfinal_state, **_):
    _expect_ranks("jaxattn_gla_bwd", query=(q, 4), key=(k, 4), value=(v, 4),
                  log_gate=(log_gate, 4))
    b = _output_batch(q, k, v, log_gate, initial_state, dout, dfinal_state)
    _, t, n, hk = q.shape
    hv = v.shape[3]
    # dkey, dvalue and dlog_gate per query head: the caller sums each kv head's group.
    return (q.update(shape=(b, t, n, hk), dtype=q.dtype),
            k.update(shape=(b, t, n, hk), dtype=k.dtype),
            v.update(shape=(b, t, n, hv), dtype=v.dtype),
            log_gate.update(shape=(b, t, n, log_gate.shape[3]), dtype=log_gate.dtype),
            q.update(shape=(b, n, hk, hv), dtype=jnp.float32))


# Gated linear attention. Operands: query [B,T,N,Hk], key [B,T,K,Hk], value [B,T,K,Hv],
# log_gate [B,T,K,Hk] or [B,T,K,1] (one gate per head and step), initial_state [B,N,Hk,Hv]
# float32 (empty: none), K dividing N (grouped heads); attribute: scale.
# Results: out [B,T,N,Hv], final_state [B,N,Hk,Hv] float32, aliased to initial_state where
# the shapes agree: a decoding step updates a donated (or loop-carried) state in place, the
# state read and written once (the kernels read every element before writing it).
_GLA_OPERANDS = "btnh,btkh,btkd,btkh,bnhd"
gla_fwd_p = _define("jaxattn_gla_fwd", "jaxattn_gla_fwd_v1", _gla_fwd_abstract,
                    axes=f"{_GLA_OPERANDS}->btnd,bnhd", aliases={4: 1})
# ... plus dout, dfinal_state (empty: none) -> dquery, dkey, dvalue, dlog_gate, dinitial_state,
# dkey, dvalue and dlog_gate per query head ([B,T,N,...]: the caller sums each group).
gla_bwd_p = _define("jaxattn_gla_bwd", "jaxattn_gla_bwd_v1", _gla_bwd_abstract,
                    axes=f"{_GLA_OPERANDS},Btnd,Bnhd->btnh,btnh,btnd,btnh,bnhd")


# Cache writes. Operands: pool [P, L, ...] (any dtype), rows [B, T, ...] of the pool's dtype
# and trailing shape, pages and slots [B, T] int32 (out of range: the row is skipped). Result:
# the pool, aliased to operand 0, so that XLA updates a donated cache in place. (XLA's own
# scatter widens bfloat16 and float8 operands to float32 and back on the CPU: two conversions
# of the whole cache per write.)
cache_write_p = Primitive("jaxattn_cache_write")
cache_write_p.def_impl(partial(xla.apply_primitive, cache_write_p))
cache_write_p.def_abstract_eval(lambda pool, rows, pages, slots: pool.update(
    shape=pool.shape, dtype=pool.dtype))
mlir.register_lowering(cache_write_p, jax.ffi.ffi_lowering(
    "jaxattn_cache_write_v1", operand_output_aliases={0: 0}), platform="cpu")


def _cache_write_batch_rule(args, dims):
    """One pool of V*P pages: instance v's page ids are shifted by v*P (out-of-range ids stay
    out of range); an unmapped pool is broadcast first (each instance writes its own copy)."""
    pool, rows, pages, slots = args
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    move = lambda x, d: (jnp.moveaxis(x, d, 0) if d is not None
                         else jnp.broadcast_to(x, (size,) + x.shape))
    pool, rows, pages, slots = (move(x, d) for x, d in zip(args, dims))
    num_pages = pool.shape[1]
    offset = (jnp.arange(size, dtype=jnp.int32) * num_pages)[:, None, None]
    pages = jnp.where((pages >= 0) & (pages < num_pages), pages + offset, -1)
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    out = cache_write_p.bind(flat(pool), flat(rows), flat(pages), flat(slots))
    return out.reshape(pool.shape), 0


batching.primitive_batchers[cache_write_p] = _cache_write_batch_rule
