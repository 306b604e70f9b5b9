"""Block-sparse attention masks: ``BlockSparseMask`` and the builders of common patterns.

A mask says which (query, key) pairs attend, for sequences of ``q_len`` (T) queries and
``kv_len`` (S) keys, shared by all heads or given per head (N). It is cut into blocks of
``block_q`` x ``block_kv`` (R x C, any sizes >= 1; the last block row/column may be short).
Each block is *empty* (never computed), *full* (no mask work) or *partial* (an element mask is
applied); the element masks of partial blocks are stored once per distinct pattern.

Masks live on the host (NumPy) and are immutable and hashable, so they can be closed over or
passed as a static argument of ``jax.jit``. ``block_sparse_attention`` compiles a mask, once
per mask and GQA group size, into compact tables for the kernels' own tiling (as Pallas splash
attention keeps its mask apart from its "mask info"): per kernel query tile the non-empty
kernel key tiles, each full or partial with an index into a deduplicated pool of element masks,
and the transposed tables for the backward pass. That compilation lives in
``jaxattn._mask_tables``; ``jaxattn.sparse.prepare_tables`` runs it ahead of time.

Builders: ``causal``, ``local`` (sliding window), ``global_local`` (Longformer), ``strided``
(Sparse Transformer), ``random`` (BigBird's random blocks, seeded) and ``from_function``.
Masks combine with ``|`` and ``&``.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

__all__ = [
    "BlockSparseMask",
    "causal",
    "local",
    "global_local",
    "strided",
    "random",
    "from_function",
    "BLOCK_EMPTY",
    "BLOCK_FULL",
    "BLOCK_PARTIAL",
]

DEFAULT_BLOCK = 64
_FULL = -1  # block id of a full block; ids >= 0 index the pool of partial element masks
_STRIPE_ELEMENTS = 1 << 22  # dense elements materialised at a time while building masks


def _positive_int(x: Any, name: str) -> int:
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {x!r}")
    try:
        value = operator.index(x)
    except TypeError as e:
        raise TypeError(f"{name} must be an int, got {x!r}") from e
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _concrete(x: Any, name: str) -> np.ndarray:
    """A host array from x; a clear error for JAX tracers (masks are built on the host)."""
    try:
        return np.asarray(x)
    except Exception as e:  # jax raises TracerArrayConversionError, a TypeError subclass
        raise TypeError(f"{name} must be a concrete (host) array: block-sparse masks are "
                        "built once on the host, outside jit") from e


def _readonly(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    x.setflags(write=False)
    return x


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows in byte order, index of each row's distinct row) of a 2-D array, as
    ``np.unique(rows, axis=0, return_inverse=True)`` gives for uint8 rows, but sorting the rows
    as opaque byte strings (np.unique's axis=0 compares them one column at a time: 100x slower
    for element masks of 4096 bytes)."""
    rows = np.ascontiguousarray(rows)
    width = rows.shape[1] * rows.dtype.itemsize
    if rows.shape[0] == 0 or width == 0:
        return rows[:min(1, rows.shape[0])], np.zeros(rows.shape[0], np.int64)
    as_bytes = rows.view(np.dtype((np.void, width))).reshape(-1)
    unique, inverse = np.unique(as_bytes, return_inverse=True)
    return unique.view(rows.dtype).reshape(-1, rows.shape[1]), inverse.reshape(-1)


class BlockSparseMask:
    """An immutable block-sparse attention mask, bool ``[1 or N, T, S]`` in R x C blocks.

    Build it with ``from_dense``, ``from_block_indices`` or the builders of this module; do
    not call the constructor. Attributes: ``q_len`` (T), ``kv_len`` (S), ``block_q`` (R),
    ``block_kv`` (C), ``num_heads`` (1: shared by all heads, or N: one mask per query head).
    """

    __slots__ = ("q_len", "kv_len", "block_q", "block_kv", "num_heads", "_keys", "_ids",
                 "_pool", "_digest", "_tables")

    def __init__(self, *, _shape: tuple[int, int, int, int, int], _keys: np.ndarray,
                 _ids: np.ndarray, _pool: np.ndarray):
        # Private: the builders pass canonical blocks (see _canonical).
        init = partial(object.__setattr__, self)
        for name, value in zip(("q_len", "kv_len", "block_q", "block_kv", "num_heads"), _shape):
            init(name, int(value))
        init("_keys", _readonly(_keys))  # int64 [nnz]: (h * nbq + i) * nbk + j, increasing
        # int32 [nnz]: _FULL or a pool index (all _FULL may be a broadcast view: no memory)
        init("_ids", _ids if _ids.ndim == 1 and _ids.strides == (0,) else _readonly(_ids))
        init("_pool", _readonly(_pool))  # bool [P, R, C], distinct, False past the ends
        init("_digest", None)  # lazily: content hash
        init("_tables", {})  # lazily: kernel tables per tiling

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"BlockSparseMask is immutable (cannot set {name})")

    def __reduce__(self):
        shape = (self.q_len, self.kv_len, self.block_q, self.block_kv, self.num_heads)
        return _rebuild, (shape, np.array(self._keys), np.array(self._ids),
                          np.array(self._pool))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dense(cls, dense: Any, *, block_q: int = DEFAULT_BLOCK,
                   block_kv: int = DEFAULT_BLOCK) -> BlockSparseMask:
        """From a bool mask ``[T, S]`` (all heads) or ``[N, T, S]`` (per head), True = attend."""
        dense = _concrete(dense, "dense")
        if dense.dtype != np.bool_:
            raise TypeError(f"dense must be a bool array (True = attend), got dtype {dense.dtype}")
        if dense.ndim not in (2, 3):
            raise ValueError(f"dense must have shape [T, S] or [N, T, S], got {dense.shape}")
        if dense.ndim == 2:
            dense = dense[None]
        num_heads, q_len, kv_len = dense.shape
        shape = _check_shape(q_len, kv_len, block_q, block_kv, num_heads)
        if block_q == block_kv == 1:
            # Every attending element is a full block, and its flat index is its block key.
            keys = np.flatnonzero(dense)
            return BlockSparseMask(_shape=shape, _keys=keys, _ids=_all_full(keys.size),
                                   _pool=np.zeros((0, 1, 1), bool))
        return _from_stripes(shape, lambda t0, t1: dense[:, t0:t1])

    @classmethod
    def from_block_indices(cls, indptr: Any, indices: Any, q_len: int, kv_len: int,
                           block_q: int, block_kv: int) -> BlockSparseMask:
        """From block compressed sparse rows (BSR, named as in scipy and FlashInfer).

        Block row ``i`` (queries ``[i*R, (i+1)*R)``) attends, in full, to the key blocks
        ``indices[indptr[i]:indptr[i+1]]`` (keys ``[j*C, (j+1)*C)``), clipped to the sequence
        ends. ``indptr`` has ``ceil(T / R) + 1`` entries. Per head: ``indptr`` of shape
        ``[N, ceil(T / R) + 1]`` with ``indices`` either one flat array that every head's
        ``indptr`` points into, or ``[N, L]`` (head ``h`` reads ``indices[h]``). Duplicate
        and unsorted indices are allowed.
        """
        q_len = _positive_int(q_len, "q_len")
        kv_len = _positive_int(kv_len, "kv_len")
        block_q = _positive_int(block_q, "block_q")
        block_kv = _positive_int(block_kv, "block_kv")
        nbq, nbk = -(-q_len // block_q), -(-kv_len // block_kv)
        indptr = _concrete(indptr, "indptr")
        indices = _concrete(indices, "indices")
        for x, name in ((indptr, "indptr"), (indices, "indices")):
            if x.size and not np.issubdtype(x.dtype, np.integer):
                raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
        if indptr.ndim not in (1, 2) or indptr.shape[-1] != nbq + 1:
            raise ValueError(f"indptr must have shape [ceil(q_len / block_q) + 1] = [{nbq + 1}] "
                             f"(or [N, {nbq + 1}] per head), got {indptr.shape}")
        num_heads = indptr.shape[0] if indptr.ndim == 2 else 1
        if num_heads < 1:
            raise ValueError(f"indptr must have at least one head, got shape {indptr.shape}")
        indptr = indptr.astype(np.int64).reshape(num_heads, nbq + 1)
        if indices.ndim == 2:
            if indices.shape[0] != num_heads:
                raise ValueError(f"indices of shape {indices.shape} must have one row per head "
                                 f"({num_heads})")
            row_len = indices.shape[1]
            flat = indices.astype(np.int64).reshape(-1)
            base = np.arange(num_heads, dtype=np.int64) * row_len
        elif indices.ndim == 1:
            row_len = indices.shape[0]
            flat = indices.astype(np.int64)
            base = np.zeros(num_heads, np.int64)
        else:
            raise ValueError(f"indices must have rank 1 (or [N, L]), got shape {indices.shape}")
        if (indptr[:, 0] < 0).any() or (np.diff(indptr, axis=1) < 0).any():
            raise ValueError("indptr must be non-negative and non-decreasing")
        if (indptr[:, -1] > row_len).any():
            raise ValueError(f"indptr points past the end of indices: last entry "
                             f"{int(indptr[:, -1].max())} > {row_len} indices")
        counts = np.diff(indptr, axis=1).reshape(-1)  # [N * nbq]
        starts = (indptr[:, :-1] + base[:, None]).reshape(-1)
        total = int(counts.sum())
        owner = np.repeat(np.arange(num_heads * nbq, dtype=np.int64), counts)
        offset = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        cols = flat[starts[owner] + offset] if total else np.zeros(0, np.int64)
        if total and (cols.min() < 0 or cols.max() >= nbk):
            bad = cols[(cols < 0) | (cols >= nbk)][0]
            raise ValueError(f"block index {int(bad)} out of range: key blocks are "
                             f"0..{nbk - 1} for kv_len={kv_len}, block_kv={block_kv}")
        keys = np.unique(owner * nbk + cols)
        shape = (q_len, kv_len, block_q, block_kv, num_heads)
        return BlockSparseMask(_shape=shape, _keys=keys, _ids=_all_full(keys.size),
                               _pool=np.zeros((0, block_q, block_kv), bool))

    # ------------------------------------------------------------------ views

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(1 or N, T, S)``, the shape of ``to_dense()``."""
        return self.num_heads, self.q_len, self.kv_len

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(R, C)``."""
        return self.block_q, self.block_kv

    @property
    def grid(self) -> tuple[int, int]:
        """Blocks per head: ``(ceil(T / R), ceil(S / C))``."""
        return -(-self.q_len // self.block_q), -(-self.kv_len // self.block_kv)

    @property
    def num_blocks(self) -> int:
        """Non-empty blocks, over all heads."""
        return int(self._keys.size)

    @property
    def num_partial_blocks(self) -> int:
        return int((self._ids != _FULL).sum())

    @property
    def block_density(self) -> float:
        """The fraction of blocks that are non-empty."""
        nbq, nbk = self.grid
        return self.num_blocks / (self.num_heads * nbq * nbk)

    def block_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """BSR ``(indptr [1 or N, nbq + 1], indices)`` of the non-empty blocks (full or
        partial), in ``from_block_indices``'s per-head form: every head's ``indptr`` points
        into the one flat ``indices``."""
        nbq, nbk = self.grid
        counts = np.bincount(self._keys // nbk, minlength=self.num_heads * nbq)
        ends = np.cumsum(counts).reshape(self.num_heads, nbq)
        indptr = np.concatenate([ends[:, :1] - counts.reshape(self.num_heads, nbq)[:, :1], ends],
                                axis=1)
        return indptr, self._keys % nbk

    def to_dense(self) -> np.ndarray:
        """The mask as bool ``[1 or N, T, S]`` (True = attend)."""
        nbq, nbk = self.grid
        r, c = self.block_q, self.block_kv
        if r == c == 1:  # block keys are flat element indices (1x1 blocks are never partial)
            dense = np.zeros(self.num_heads * self.q_len * self.kv_len, bool)
            dense[self._keys] = True
            return dense.reshape(self.num_heads, self.q_len, self.kv_len)
        dense = np.zeros((self.num_heads, nbq, r, nbk, c), bool)
        h, i, j = self._unravel(self._keys)
        full = self._ids == _FULL
        dense[h[full], i[full], :, j[full], :] = True
        dense[h[~full], i[~full], :, j[~full], :] = self._pool[self._ids[~full]]
        return dense.reshape(self.num_heads, nbq * r, nbk * c)[:, :self.q_len, :self.kv_len]

    def with_block_size(self, block_q: int, block_kv: int) -> BlockSparseMask:
        """The same mask cut into blocks of another size."""
        return BlockSparseMask.from_dense(self.to_dense(), block_q=block_q, block_kv=block_kv)

    def __repr__(self) -> str:
        return (f"BlockSparseMask(shape={self.shape}, blocks={self.block_q}x{self.block_kv}, "
                f"non-empty={self.num_blocks} ({self.num_partial_blocks} partial), "
                f"density={self.block_density:.3f})")

    # ------------------------------------------------------------------ identity

    def _fingerprint(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            h.update(np.array([self.q_len, self.kv_len, self.block_q, self.block_kv,
                               self.num_heads], np.int64).tobytes())
            for a in (self._keys, self._ids, self._pool):
                h.update(np.array(a.shape, np.int64).tobytes())
                h.update(a.tobytes())
            object.__setattr__(self, "_digest", h.hexdigest())
        return self._digest

    def __hash__(self) -> int:
        return hash(self._fingerprint())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockSparseMask):
            return NotImplemented
        return self is other or self._fingerprint() == other._fingerprint()

    # ------------------------------------------------------------------ algebra

    def __or__(self, other: BlockSparseMask) -> BlockSparseMask:
        """Attend where either mask attends."""
        return _combine(self, other, union=True)

    def __and__(self, other: BlockSparseMask) -> BlockSparseMask:
        """Attend where both masks attend."""
        return _combine(self, other, union=False)

    # ------------------------------------------------------------------ internals

    def _unravel(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nbq, nbk = self.grid
        return keys // (nbq * nbk), (keys // nbk) % nbq, keys % nbk

    def _lookup(self, h: np.ndarray, t: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Element values at (head, query, key) index arrays (broadcast); False out of range."""
        nbq, nbk = self.grid
        h, t, s = np.broadcast_arrays(h, t, s)
        inside = (t < self.q_len) & (s < self.kv_len)
        i, j = t // self.block_q, s // self.block_kv
        key = (h * nbq + i) * nbk + j
        pos = np.minimum(np.searchsorted(self._keys, key), max(self._keys.size - 1, 0))
        found = inside & (self._keys.size > 0)
        if self._keys.size:
            found &= self._keys[pos] == key
        ids = self._ids[pos] if self._keys.size else np.zeros(key.shape, np.int32)
        value = found & (ids == _FULL)
        partial = found & (ids != _FULL)
        if partial.any():
            value[partial] = self._pool[ids[partial], t[partial] % self.block_q,
                                        s[partial] % self.block_kv]
        return value

    def kernel_tables(self, positions: int, keys: int, group: int, groups: int,
                      rows_padded: int | None = None) -> tuple[np.ndarray, ...]:
        """The tables for kernel tiles of ``positions`` queries x ``group`` heads by ``keys``;
        see ``jaxattn._mask_tables.kernel_tables`` (compiled once, cached on the mask)."""
        from jaxattn import _mask_tables  # the tables depend on the mask, not the reverse

        return _mask_tables.kernel_tables(self, positions, keys, group, groups, rows_padded)


def _all_full(count: int) -> np.ndarray:
    """The block ids of ``count`` full blocks: a read-only broadcast of _FULL (no memory)."""
    return np.broadcast_to(np.int32(_FULL), (count,))


def _rebuild(shape, keys, ids, pool) -> BlockSparseMask:
    """Unpickling."""
    return BlockSparseMask(_shape=shape, _keys=keys, _ids=ids, _pool=pool)


# ---------------------------------------------------------------------------- canonical form


def _check_shape(q_len: Any, kv_len: Any, block_q: Any, block_kv: Any,
                 num_heads: Any = 1) -> tuple[int, int, int, int, int]:
    return (_positive_int(q_len, "q_len"), _positive_int(kv_len, "kv_len"),
            _positive_int(block_q, "block_q"), _positive_int(block_kv, "block_kv"),
            _positive_int(num_heads, "num_heads"))


def _valid_region(shape: tuple[int, ...], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """bool [M, R, C]: which elements of blocks (i, j) lie inside the sequences."""
    q_len, kv_len, r, c, _ = shape
    rows = np.minimum(r, q_len - i * r)
    cols = np.minimum(c, kv_len - j * c)
    return ((np.arange(r)[None, :, None] < rows[:, None, None]) &
            (np.arange(c)[None, None, :] < cols[:, None, None]))


def _canonical(shape: tuple[int, ...], keys: np.ndarray, full: np.ndarray,
               elements: np.ndarray) -> BlockSparseMask:
    """The mask of blocks ``keys`` (unique), each full or with ``elements[k]`` ([M, R, C]
    for the non-full blocks in order): empty blocks dropped, all-True blocks marked full,
    element masks deduplicated (pool sorted by content, so equal masks are equal objects)."""
    q_len, kv_len, r, c, num_heads = shape
    nbq, nbk = -(-q_len // r), -(-kv_len // c)
    element_index = np.cumsum(~full) - 1  # row of `elements` of each non-full block
    order = np.argsort(keys, kind="stable")
    keys, full, element_index = keys[order], full[order], element_index[order]
    ids = np.full(keys.shape, _FULL, np.int32)
    keep = np.ones(keys.shape, bool)
    pool = np.zeros((0, r, c), bool)
    pk = np.nonzero(~full)[0]
    if pk.size:
        elems = elements[element_index[pk]]
        j = keys[pk] % nbk
        i = (keys[pk] // nbk) % nbq
        valid = _valid_region(shape, i, j)
        elems = elems & valid
        counts = elems.reshape(pk.size, -1).sum(axis=1)
        all_true = counts == valid.reshape(pk.size, -1).sum(axis=1)
        keep[pk[counts == 0]] = False
        mixed = pk[(counts > 0) & ~all_true]
        if mixed.size:
            rows = elems[(counts > 0) & ~all_true].reshape(mixed.size, r * c)
            pool_flat, inverse = unique_rows(rows.view(np.uint8))
            pool = pool_flat.reshape(-1, r, c).astype(bool)
            ids[mixed] = inverse.astype(np.int32)
    return BlockSparseMask(_shape=shape, _keys=keys[keep], _ids=ids[keep], _pool=pool)


def _from_stripes(shape: tuple[int, ...],
                  stripe: Callable[[int, int], np.ndarray]) -> BlockSparseMask:
    """Builds a mask from its dense rows, ``stripe(t0, t1)`` -> bool [1 or N, t1 - t0, S]
    (broadcastable), a few block rows at a time so that memory stays bounded."""
    q_len, kv_len, r, c, num_heads = shape
    nbq, nbk = -(-q_len // r), -(-kv_len // c)
    block_rows = max(1, _STRIPE_ELEMENTS // max(1, num_heads * r * nbk * c))
    all_keys, all_full, all_elems = [], [], []
    for i0 in range(0, nbq, block_rows):
        i1 = min(nbq, i0 + block_rows)
        t0, t1 = i0 * r, min(q_len, i1 * r)
        rows = np.broadcast_to(np.asarray(stripe(t0, t1), bool), (num_heads, t1 - t0, kv_len))
        padded = np.zeros((num_heads, (i1 - i0) * r, nbk * c), bool)
        padded[:, :t1 - t0, :kv_len] = rows
        blocks = padded.reshape(num_heads, i1 - i0, r, nbk, c)
        counts = np.count_nonzero(blocks, axis=(2, 4))  # [N, nbr, nbk]
        i = np.arange(i0, i1)
        area = (np.minimum(r, q_len - i * r)[:, None] *
                np.minimum(c, kv_len - np.arange(nbk) * c)[None, :])
        h, il, j = np.nonzero(counts)
        full = counts[h, il, j] == area[il, j]
        all_keys.append((h * nbq + i0 + il) * nbk + j)
        all_full.append(full)
        all_elems.append(blocks[h[~full], il[~full], :, j[~full], :])
    keys = np.concatenate(all_keys) if all_keys else np.zeros(0, np.int64)
    return _canonical(shape, keys.astype(np.int64), np.concatenate(all_full),
                      np.concatenate(all_elems))


# ---------------------------------------------------------------------------- structured masks
#
# The builders of structured patterns never look at all T x S pairs: each lists, block row by
# block row, the blocks its pattern can reach (a superset of the non-empty ones, as many as
# those), marks the blocks a closed form shows to be full, and gives every other block a
# pattern key: two blocks away from the sequence ends with the same key have the same element
# mask. The predicate is then evaluated on one block per distinct key (and on each block at a
# sequence end), so time and memory follow the number of blocks, not T x S.

_REP_ELEMENTS = 1 << 20  # elements of representative blocks evaluated at a time
_BLOCK_ROWS_PER_CHUNK = 1024  # block rows whose candidate blocks are listed at a time, at most
_CANDIDATES_PER_CHUNK = 1 << 19  # candidate blocks listed and classified at a time, about


def _ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, value) for the concatenated ranges [starts[k], stops[k]) (empty when
    stops <= starts): owner[m] = k, value[m] = starts[k] + offset."""
    counts = np.maximum(stops - starts, 0)
    owner = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    offset = np.arange(owner.size, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, starts[owner] + offset


def _band_columns(shape: tuple[int, ...], i: np.ndarray, lo: int | None,
                  hi: int | None) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) of the key blocks that block rows ``i`` reach with lo <= k - q <= hi
    (None: unbounded)."""
    q_len, kv_len, r, c, _ = shape
    nbk = -(-kv_len // c)
    t0, t1 = i * r, np.minimum(q_len, (i + 1) * r)
    start = np.zeros_like(i) if lo is None else np.clip((t0 + lo) // c, 0, nbk)
    stop = (np.full_like(i, nbk) if hi is None else
            np.clip((t1 - 1 + hi) // c + 1, 0, nbk))
    return start, stop


def _block_bounds(shape: tuple[int, ...], i: np.ndarray, j: np.ndarray):
    """(t0, t1, s0, s1): the query and key ranges of blocks (i, j), clipped to the ends."""
    q_len, kv_len, r, c, _ = shape
    return (i * r, np.minimum(q_len, (i + 1) * r), j * c, np.minimum(kv_len, (j + 1) * c))


def _structured(shape: tuple[int, ...], predicate: Callable[[np.ndarray, np.ndarray], np.ndarray],
                candidates: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                classify: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                ) -> BlockSparseMask:
    """A mask shared by all heads from a structured pattern.

    ``candidates(rows)`` -> (i, j), sorted by (i, j) and unique: the blocks of block rows
    ``rows`` the pattern may reach. ``classify(i, j)`` -> (full, key): blocks known to be full,
    and for the others an int64 pattern key >= 0 (equal keys, equal element masks, for blocks
    away from the sequence ends). ``predicate(q_idx, kv_idx)`` -> bool, vectorised.
    """
    q_len, kv_len, r, c, _ = shape
    nbq, nbk = -(-q_len // r), -(-kv_len // c)
    blocks, ids, open_at, open_keys = [], [], [], []
    count, i0, rows = 0, 0, 16
    while i0 < nbq:
        i, j = candidates(np.arange(i0, min(nbq, i0 + rows), dtype=np.int64))
        full, key = classify(i, j)
        # Blocks at a sequence end are clipped: each is its own pattern (key < 0).
        edge = ((i + 1) * r > q_len) | ((j + 1) * c > kv_len)
        key = np.where(edge, -1 - (i * nbk + j), key)
        blocks.append(i * nbk + j)
        ids.append(np.where(full, _FULL, -2).astype(np.int32))
        open_at.append(np.nonzero(~full)[0] + count)
        open_keys.append(key[~full])
        count += i.size
        # Next: about _CANDIDATES_PER_CHUNK blocks (rows grow or shrink with the pattern).
        i0 += rows
        rows = int(np.clip(_CANDIDATES_PER_CHUNK * rows // max(1, i.size), 1,
                           _BLOCK_ROWS_PER_CHUNK))
    blocks = np.concatenate(blocks)
    ids = np.concatenate(ids)
    open_at = np.concatenate(open_at)
    open_keys = np.concatenate(open_keys)
    pool = np.zeros((0, r, c), bool)
    if open_at.size:
        unique_keys, first, inverse = np.unique(open_keys, return_index=True,
                                                return_inverse=True)
        rep = blocks[open_at[first]]
        rep_class = np.zeros(rep.size, np.int8)  # 0 empty, 1 full, 2 partial
        patterns = []
        per_chunk = max(1, _REP_ELEMENTS // (r * c))
        arange_r, arange_c = np.arange(r), np.arange(c)
        for k0 in range(0, rep.size, per_chunk):
            ri, rj = rep[k0:k0 + per_chunk] // nbk, rep[k0:k0 + per_chunk] % nbk
            t = ri[:, None, None] * r + arange_r[None, :, None]
            s = rj[:, None, None] * c + arange_c[None, None, :]
            inside = (t < q_len) & (s < kv_len)
            # (indices clipped to the sequences: predicates may index per-position tables)
            elems = _call_predicate(predicate, np.minimum(t, q_len - 1),
                                    np.minimum(s, kv_len - 1)) & inside
            got = elems.reshape(ri.size, -1).sum(axis=1)
            area = inside.reshape(ri.size, -1).sum(axis=1)
            cls = np.where(got == 0, 0, np.where(got == area, 1, 2)).astype(np.int8)
            rep_class[k0:k0 + per_chunk] = cls
            patterns.append(elems[cls == 2])
        rep_id = np.full(rep.size, -3, np.int64)  # -3: empty
        rep_id[rep_class == 1] = _FULL
        mixed = np.nonzero(rep_class == 2)[0]
        if mixed.size:
            rows = np.concatenate(patterns).reshape(mixed.size, r * c)
            pool_flat, pool_index = unique_rows(rows.view(np.uint8))
            pool = pool_flat.reshape(-1, r, c).astype(bool)
            rep_id[mixed] = pool_index.reshape(-1)
        ids[open_at] = rep_id[inverse.reshape(-1)]
    keep = ids != -3
    return BlockSparseMask(_shape=shape, _keys=blocks[keep], _ids=ids[keep], _pool=pool)


def _mixed_radix(columns: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    """One int64 key >= 0 from key columns with 0 <= columns[m] < sizes[m]."""
    total = 1
    for size in sizes:
        total *= int(size)
    if total >= 2**62:
        raise ValueError("too many distinct block patterns for this builder: use larger "
                         "blocks (block_q, block_kv)")
    key = np.zeros(columns[0].shape, np.int64)
    for column, size in zip(columns, sizes):
        key = key * int(size) + column
    return key


def _union_of_two_ranges(rows: np.ndarray, a_start: np.ndarray, a_stop: np.ndarray,
                         b_start: np.ndarray, b_stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of the blocks ``j`` in [a_start, a_stop) or [b_start, b_stop) of block rows
    ``rows`` (an empty range: stop <= start), sorted by (i, j), each once."""
    a_empty, b_empty = a_stop <= a_start, b_stop <= b_start
    a_start, a_stop = np.where(a_empty, b_start, a_start), np.where(a_empty, b_stop, a_stop)
    b_start, b_stop = np.where(b_empty, a_start, b_start), np.where(b_empty, a_stop, b_stop)
    lo_first = a_start <= b_start
    first = (np.where(lo_first, a_start, b_start), np.where(lo_first, a_stop, b_stop))
    second = (np.where(lo_first, b_start, a_start), np.where(lo_first, b_stop, a_stop))
    joined = second[0] <= first[1]  # overlapping or touching: one range
    starts = np.stack([first[0], np.where(joined, 0, second[0])], axis=1)
    stops = np.stack([np.where(joined, np.maximum(first[1], second[1]), first[1]),
                      np.where(joined, 0, second[1])], axis=1)
    owner, j = _ranges(starts.reshape(-1), stops.reshape(-1))
    return rows[owner // 2], j


def _union_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The union of two sorted arrays of distinct values, sorted, without sorting them again
    (b is expected to be the shorter)."""
    if not a.size or not b.size:
        return b if not a.size else a
    pos = np.searchsorted(a, b)
    new = a[np.minimum(pos, a.size - 1)] != b
    b, pos = b[new], pos[new]
    out = np.empty(a.size + b.size, a.dtype)
    at = pos + np.arange(b.size)
    from_a = np.ones(out.size, bool)
    from_a[at] = False
    out[at] = b
    out[from_a] = a
    return out


def _unique_blocks(i: np.ndarray, j: np.ndarray, nbk: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = np.unique(i * nbk + j)
    return blocks // nbk, blocks % nbk


def _band(shape: tuple[int, ...], lo: int | None, hi: int | None) -> BlockSparseMask:
    """lo <= k - q <= hi (None: unbounded): causal is (None, 0), a window (-left, right)."""
    q_len, kv_len = shape[0], shape[1]
    # A bound past the sequences bounds nothing (and keeps the keys small).
    lo = None if lo is None or lo <= -q_len else lo
    hi = None if hi is None or hi >= kv_len else hi

    def predicate(q: np.ndarray, k: np.ndarray) -> np.ndarray:
        d = k - q
        out = np.ones(d.shape, bool) if lo is None else d >= lo
        return out if hi is None else out & (d <= hi)

    def candidates(rows: np.ndarray):
        start, stop = _band_columns(shape, rows, lo, hi)
        owner, j = _ranges(start, stop)
        return rows[owner], j

    def classify(i: np.ndarray, j: np.ndarray):
        t0, t1, s0, s1 = _block_bounds(shape, i, j)
        d_min, d_max = s0 - (t1 - 1), (s1 - 1) - t0
        full = np.ones(i.shape, bool)
        if lo is not None:
            full &= d_min >= lo
        if hi is not None:
            full &= d_max <= hi
        return full, s0 - t0 + q_len  # the pattern depends on the offset s0 - t0 only

    return _structured(shape, predicate, candidates, classify)


def _broadcast_heads(mask: BlockSparseMask, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, ids) of ``mask`` with its single head repeated to ``num_heads`` heads."""
    if mask.num_heads == num_heads:
        return mask._keys, mask._ids
    nbq, nbk = mask.grid
    step = np.arange(num_heads, dtype=np.int64)[:, None] * (nbq * nbk)
    return ((mask._keys[None, :] + step).reshape(-1),
            np.broadcast_to(mask._ids, (num_heads, mask._ids.size)).reshape(-1))


def _combine(a: BlockSparseMask, b: BlockSparseMask, union: bool) -> BlockSparseMask:
    if not isinstance(b, BlockSparseMask):
        return NotImplemented
    for name in ("q_len", "kv_len", "block_q", "block_kv"):
        if getattr(a, name) != getattr(b, name):
            hint = " (see BlockSparseMask.with_block_size)" if name.startswith("block") else ""
            raise ValueError(f"cannot combine masks with different {name}: {getattr(a, name)} "
                             f"vs {getattr(b, name)}{hint}")
    if a.num_heads != b.num_heads and 1 not in (a.num_heads, b.num_heads):
        raise ValueError(f"cannot combine masks of {a.num_heads} and {b.num_heads} heads")
    num_heads = max(a.num_heads, b.num_heads)
    ka, ia = _broadcast_heads(a, num_heads)
    kb, ib = _broadcast_heads(b, num_heads)
    keys = np.union1d(ka, kb) if union else np.intersect1d(ka, kb)

    def side(k: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Each key's block id on this side: _FULL, a pool index, or -2 (empty)."""
        if not k.size:
            return np.full(keys.shape, -2, np.int64)
        pos = np.minimum(np.searchsorted(k, keys), k.size - 1)
        return np.where(k[pos] == keys, ids[pos], -2)

    bid_a, bid_b = side(ka, ia), side(kb, ib)
    full_a, full_b = bid_a == _FULL, bid_b == _FULL
    full = (full_a | full_b) if union else (full_a & full_b)
    # A non-full block's elements follow from its two sides' block ids and, for a block at a
    # sequence end, its clipping: combine each distinct (id a, id b, clipping) once.
    shape = (a.q_len, a.kv_len, a.block_q, a.block_kv, num_heads)
    nbq, nbk = a.grid
    rest = np.nonzero(~full)[0]
    i, j = (keys[rest] // nbk) % nbq, keys[rest] % nbk
    clip = (i == nbq - 1) * 2 + (j == nbk - 1)
    combos, inverse = np.unique(np.stack([bid_a[rest], bid_b[rest], clip], axis=1), axis=0,
                                return_inverse=True)
    inverse = inverse.reshape(-1)

    def elements(bid: np.ndarray, pool: np.ndarray) -> np.ndarray:
        out = np.zeros((bid.size, a.block_q, a.block_kv), bool)
        out[bid == _FULL] = True
        out[bid >= 0] = pool[bid[bid >= 0]]
        return out

    ea, eb = elements(combos[:, 0], a._pool), elements(combos[:, 1], b._pool)
    elems = (ea | eb) if union else (ea & eb)
    # The clipping of a combination: the valid region of a block with that clipping.
    edge_i = np.where(combos[:, 2] >= 2, nbq - 1, 0)
    edge_j = np.where(combos[:, 2] % 2 == 1, nbk - 1, 0)
    valid = _valid_region(shape, edge_i, edge_j)
    elems &= valid
    count = elems.reshape(len(combos), a.block_q * a.block_kv).sum(axis=1)
    area = valid.reshape(len(combos), a.block_q * a.block_kv).sum(axis=1)
    combo_id = np.full(len(combos), -3, np.int64)  # -3: empty
    combo_id[(count == area) & (count > 0)] = _FULL
    mixed = np.nonzero((count > 0) & (count < area))[0]
    pool = np.zeros((0, a.block_q, a.block_kv), bool)
    if mixed.size:
        rows = elems[mixed].reshape(mixed.size, -1)
        pool_flat, pool_index = unique_rows(rows.view(np.uint8))
        pool = pool_flat.reshape(-1, a.block_q, a.block_kv).astype(bool)
        combo_id[mixed] = pool_index.reshape(-1)
    ids = np.full(keys.shape, _FULL, np.int64)
    ids[rest] = combo_id[inverse]
    keep = ids != -3
    return BlockSparseMask(_shape=shape, _keys=keys[keep], _ids=ids[keep].astype(np.int32),
                           _pool=pool)


# ---------------------------------------------------------------------------- builders


def _lengths(q_len: Any, kv_len: Any) -> tuple[int, int]:
    q_len = _positive_int(q_len, "q_len")
    return q_len, q_len if kv_len is None else _positive_int(kv_len, "kv_len")


def _call_predicate(f: Callable, *index: np.ndarray) -> np.ndarray:
    """f on broadcastable index arrays; element by element if f is not vectorised."""
    shape = np.broadcast_shapes(*(x.shape for x in index))
    name = getattr(f, "__qualname__", None) or repr(f)
    try:
        out = np.asarray(f(*index))
    except Exception as vector_error:  # f(q, k) written for scalars
        try:
            out = np.vectorize(lambda *x: bool(f(*x)), otypes=[bool])(*index)
        except Exception as e:
            raise TypeError(f"the mask function {name} failed on index arrays ({vector_error}) "
                            f"and on single indices ({e})") from e
    if out.shape != shape:
        try:
            out = np.broadcast_to(out, shape)
        except ValueError:
            raise ValueError(f"the mask function {name} returned shape {out.shape} for index "
                             f"arrays of broadcast shape {shape}: it must return bools of that "
                             f"shape (or broadcastable to it)") from None
    if out.dtype != np.bool_:
        raise TypeError(f"the mask function {name} must return bools, got dtype {out.dtype}")
    return out


BLOCK_EMPTY, BLOCK_FULL, BLOCK_PARTIAL = 0, 1, 2  # what a block classifier returns


def from_function(f: Callable[..., Any], q_len: int, kv_len: int | None = None, *,
                  num_heads: int | None = None, block_q: int = DEFAULT_BLOCK,
                  block_kv: int = DEFAULT_BLOCK,
                  block_class: Callable[..., Any] | None = None) -> BlockSparseMask:
    """The mask ``f(q_idx, kv_idx) -> bool`` (True = attend), or per head
    ``f(head, q_idx, kv_idx)`` when ``num_heads`` is given.

    ``f`` should be vectorised over NumPy index arrays that broadcast (``lambda q, k: k <= q``);
    a scalar-only ``f`` still works, one element at a time.

    An arbitrary ``f`` cannot tell which blocks are full or empty without being evaluated: by
    itself it is evaluated on every pair (time grows with T x S; memory stays bounded: a few
    block rows at a time). Give ``block_class`` to evaluate it only inside the blocks it may
    cut: ``block_class(q_start, q_stop, kv_start, kv_stop)`` (per head: ``block_class(head,
    q_start, q_stop, kv_start, kv_stop)``), vectorised over broadcasting int64 arrays of block
    bounds (queries ``[q_start, q_stop)``, keys ``[kv_start, kv_stop)``, clipped to the
    sequences), returns per block ``masks.BLOCK_EMPTY`` (0: ``f`` is False on every pair),
    ``masks.BLOCK_FULL`` (1: True on every pair) or ``masks.BLOCK_PARTIAL`` (2: unknown,
    evaluate ``f``). It is called once per block of the grid, ``f`` only on the partial
    blocks' elements. The classification is trusted, not checked: a block called empty or
    full is taken as such whatever ``f`` says there. For example, causal::

        masks.from_function(lambda q, k: k <= q, T,
                            block_class=lambda q0, q1, k0, k1: np.where(
                                k1 - 1 <= q0, 1, np.where(k0 > q1 - 1, 0, 2)))

    For long sequences prefer the structured builders (``causal``, ``local``,
    ``global_local``, ``strided``, ``random``), whose cost follows the number of non-empty
    blocks (the grid is never walked), or ``from_block_indices``, combined with ``|`` and
    ``&``.
    """
    q_len, kv_len = _lengths(q_len, kv_len)
    heads = 1 if num_heads is None else _positive_int(num_heads, "num_heads")
    shape = _check_shape(q_len, kv_len, block_q, block_kv, heads)
    if block_class is not None:
        if not callable(block_class):
            raise TypeError(f"block_class must be a function of the block bounds, got "
                            f"{block_class!r}")
        return _from_block_classes(shape, f, block_class, per_head=num_heads is not None)
    cols = np.arange(kv_len, dtype=np.int64)

    def stripe(t0: int, t1: int) -> np.ndarray:
        rows = np.arange(t0, t1, dtype=np.int64)
        if num_heads is None:
            return _call_predicate(f, rows[:, None], cols[None, :])[None]
        return _call_predicate(f, np.arange(heads)[:, None, None], rows[None, :, None],
                               cols[None, None, :])

    return _from_stripes(shape, stripe)


def _from_block_classes(shape: tuple[int, ...], f: Callable, block_class: Callable,
                        per_head: bool) -> BlockSparseMask:
    """from_function with a block classifier: ``f`` evaluated on the partial blocks only."""
    q_len, kv_len, r, c, heads = shape
    nbq, nbk = -(-q_len // r), -(-kv_len // c)
    name = getattr(block_class, "__qualname__", None) or repr(block_class)
    s0 = np.arange(nbk, dtype=np.int64) * c
    s1 = np.minimum(kv_len, s0 + c)
    head = np.arange(heads, dtype=np.int64)[:, None, None]
    block_rows = max(1, _STRIPE_ELEMENTS // (heads * nbk))
    all_keys, all_full, all_elems = [], [], []
    for i0 in range(0, nbq, block_rows):
        i = np.arange(i0, min(nbq, i0 + block_rows), dtype=np.int64)
        t0, t1 = i * r, np.minimum(q_len, (i + 1) * r)
        want = (heads, i.size, nbk)
        bounds = (t0[:, None], t1[:, None], s0[None, :], s1[None, :])
        got = np.asarray(block_class(head, *(x[None] for x in bounds)) if per_head
                         else block_class(*bounds))
        try:
            cls = np.broadcast_to(got if per_head else got[None], want)
        except (ValueError, IndexError):
            raise ValueError(f"the block classifier {name} returned shape {got.shape} for "
                             f"block bounds of broadcast shape {want if per_head else want[1:]}"
                             f": it must return one class per block") from None
        if not np.issubdtype(cls.dtype, np.integer) and cls.dtype != np.bool_:
            raise TypeError(f"the block classifier {name} must return ints (0 empty, 1 full, 2 "
                            f"partial), got dtype {cls.dtype}")
        if cls.size and (cls.min() < 0 or cls.max() > 2):
            raise ValueError(f"the block classifier {name} must return 0 (empty), 1 (full) or "
                             f"2 (partial), got {int(cls.min())}..{int(cls.max())}")
        h, il, j = (x.astype(np.int64) for x in np.nonzero(cls))
        full = cls[h, il, j] == BLOCK_FULL
        all_keys.append((h * nbq + i0 + il) * nbk + j)
        all_full.append(full)
        # f on the partial blocks' elements, a chunk of blocks at a time
        ph, pi, pj = h[~full], i0 + il[~full], j[~full]
        per_chunk = max(1, _REP_ELEMENTS // (r * c))
        for k0 in range(0, ph.size, per_chunk):
            bh, bi, bj = (x[k0:k0 + per_chunk] for x in (ph, pi, pj))
            t = bi[:, None, None] * r + np.arange(r)[None, :, None]
            s = bj[:, None, None] * c + np.arange(c)[None, None, :]
            inside = (t < q_len) & (s < kv_len)
            # (indices clipped to the sequences: f may index per-position tables)
            t, s = np.minimum(t, q_len - 1), np.minimum(s, kv_len - 1)
            elems = (_call_predicate(f, bh[:, None, None], t, s) if per_head
                     else _call_predicate(f, t, s))
            all_elems.append(elems & inside)
    keys = np.concatenate(all_keys) if all_keys else np.zeros(0, np.int64)
    elems = np.concatenate(all_elems) if all_elems else np.zeros((0, r, c), bool)
    return _canonical(shape, keys, np.concatenate(all_full), elems)


def causal(q_len: int, kv_len: int | None = None, *, block_q: int = DEFAULT_BLOCK,
           block_kv: int = DEFAULT_BLOCK) -> BlockSparseMask:
    """Query ``i`` sees keys ``j <= i`` (top-left, as ``flash_attention(is_causal=True)``)."""
    q_len, kv_len = _lengths(q_len, kv_len)
    return _band(_check_shape(q_len, kv_len, block_q, block_kv), None, 0)


def _window(window: Any) -> tuple[int, int]:
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be an int or (left, right), got {window!r}")
        left, right = window
    else:
        left = right = window
    out = []
    for x, name in ((left, "left"), (right, "right")):
        try:
            x = operator.index(x)
        except TypeError as e:
            raise TypeError(f"window {name} must be an int, got {x!r}") from e
        if x < 0:
            raise ValueError(f"window {name} must be >= 0, got {x}")
        out.append(x)
    return out[0], out[1]


def local(q_len: int, kv_len: int | None = None, *, window: int | tuple[int, int],
          block_q: int = DEFAULT_BLOCK, block_kv: int = DEFAULT_BLOCK) -> BlockSparseMask:
    """Sliding window: query ``i`` sees keys ``i - left <= j <= i + right``; ``window`` is
    ``(left, right)`` or ``w`` for ``(w, w)``; ``(w, 0)`` is a causal sliding window."""
    q_len, kv_len = _lengths(q_len, kv_len)
    left, right = _window(window)
    return _band(_check_shape(q_len, kv_len, block_q, block_kv), -left, right)


def _token_set(tokens: Any, length: int, name: str) -> np.ndarray:
    """bool [length]: an int g means the first g positions, else a list of positions."""
    out = np.zeros(length, bool)
    if isinstance(tokens, (int, np.integer)) and not isinstance(tokens, bool):
        if tokens < 0:
            raise ValueError(f"{name} must be >= 0, got {tokens}")
        out[:tokens] = True
        return out
    idx = np.asarray(tokens)
    if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1):
        raise TypeError(f"{name} must be an int or a list of positions, got {tokens!r}")
    if idx.size and (idx.min() < 0 or idx.max() >= length):
        raise ValueError(f"{name} positions must lie in [0, {length}), got {tokens!r}")
    out[idx.astype(np.int64)] = True
    return out


def global_local(q_len: int, kv_len: int | None = None, *, window: int | tuple[int, int],
                 global_tokens: int | Sequence[int], is_causal: bool = False,
                 block_q: int = DEFAULT_BLOCK, block_kv: int = DEFAULT_BLOCK) -> BlockSparseMask:
    """Longformer / BigBird-ITC: a sliding ``window`` plus global tokens.

    ``global_tokens``: ``g`` for positions ``0..g-1``, or a list of positions. A global query
    sees every key and a global key is seen by every query. With ``is_causal``, everything is
    also restricted to keys ``j <= i``.
    """
    q_len, kv_len = _lengths(q_len, kv_len)
    shape = _check_shape(q_len, kv_len, block_q, block_kv)
    left, right = _window(window)
    # A window side past the sequences bounds nothing (and keeps the pattern keys small).
    left, right = min(left, q_len + kv_len), min(right, q_len + kv_len)
    is_causal = bool(is_causal)
    global_q = _token_set(global_tokens, q_len, "global_tokens")
    global_k = _token_set(global_tokens, kv_len, "global_tokens")
    r, c = block_q, block_kv
    nbq, nbk = -(-q_len // r), -(-kv_len // c)
    # Per block row / column: how many of its positions are global (all, some or none).
    rows_global = np.add.reduceat(global_q, np.arange(0, q_len, r))
    cols_global = np.add.reduceat(global_k, np.arange(0, kv_len, c))
    rows_size = np.minimum(r, q_len - np.arange(nbq) * r)
    cols_size = np.minimum(c, kv_len - np.arange(nbk) * c)
    row_sig = np.where(rows_global == 0, 0, np.where(rows_global == rows_size, 1,
                                                      2 + np.arange(nbq)))
    col_sig = np.where(cols_global == 0, 0, np.where(cols_global == cols_size, 1,
                                                      2 + np.arange(nbk)))
    global_cols = np.nonzero(cols_global)[0]
    band_hi = min(right, 0) if is_causal else right

    def predicate(q: np.ndarray, k: np.ndarray) -> np.ndarray:
        out = ((k >= q - left) & (k <= q + right)) | global_q[q] | global_k[k]
        return out & (k <= q) if is_causal else out

    def candidates(rows: np.ndarray):
        t1 = np.minimum(q_len, (rows + 1) * r)
        reach = np.minimum(nbk, (t1 - 1) // c + 1) if is_causal else np.full_like(rows, nbk)
        start, stop = _band_columns(shape, rows, -left, band_hi)
        has_global = rows_global[rows] > 0  # a global query row sees every (causal) key
        start, stop = np.where(has_global, 0, start), np.where(has_global, reach, stop)
        owner, j = _ranges(start, stop)
        gi = np.repeat(rows, global_cols.size)
        gj = np.tile(global_cols, rows.size)
        below = gj < np.repeat(reach, global_cols.size)
        return _unique_blocks(np.concatenate([rows[owner], gi[below]]),
                              np.concatenate([j, gj[below]]), nbk)

    # The band and causal parts depend on the offset s0 - t0 only, and are constant below
    # offset_lo (band empty, causal all visible) and above offset_hi (both empty).
    offset_lo, offset_hi = min(-left, 0) - c, max(right, 0) + r

    def classify(i: np.ndarray, j: np.ndarray):
        t0, t1, s0, s1 = _block_bounds(shape, i, j)
        d_min, d_max = s0 - (t1 - 1), (s1 - 1) - t0
        causal_ok = (d_max <= 0) if is_causal else np.ones(i.shape, bool)
        full = ((d_min >= -left) & (d_max <= band_hi)) | (
            ((row_sig[i] == 1) | (col_sig[j] == 1)) & causal_ok)
        offset = np.clip(s0 - t0, offset_lo, offset_hi) - offset_lo
        key = _mixed_radix([offset, row_sig[i], col_sig[j]],
                           [offset_hi - offset_lo + 1, nbq + 2, nbk + 2])
        return full, key

    return _structured(shape, predicate, candidates, classify)


def strided(q_len: int, kv_len: int | None = None, *, stride: int, is_causal: bool = True,
            block_q: int = DEFAULT_BLOCK, block_kv: int = DEFAULT_BLOCK) -> BlockSparseMask:
    """The Sparse Transformer's strided pattern (Child et al. 2019): query ``i`` sees key ``j``
    when both lie in the same run of ``stride`` positions (``i // stride == j // stride``) or
    ``i - j`` is a multiple of ``stride``; with ``is_causal`` (default) only ``j <= i``."""
    q_len, kv_len = _lengths(q_len, kv_len)
    shape = _check_shape(q_len, kv_len, block_q, block_kv)
    stride = _positive_int(stride, "stride")
    is_causal = bool(is_causal)
    if stride >= max(q_len, kv_len):  # one run holds everything: every pair attends
        return _band(shape, None, 0 if is_causal else None)
    r, c, s = block_q, block_kv, stride
    nbk = -(-kv_len // c)

    def predicate(q: np.ndarray, k: np.ndarray) -> np.ndarray:
        out = (q // s == k // s) | ((q - k) % s == 0)
        return out & (k <= q) if is_causal else out

    def candidates(rows: np.ndarray):
        t0, t1 = rows * r, np.minimum(q_len, (rows + 1) * r)
        reach = np.minimum(nbk, (t1 - 1) // c + 1) if is_causal else np.full_like(rows, nbk)
        # The runs of the block's queries: keys [t0 // s * s, ((t1 - 1) // s + 1) * s).
        run_start = np.minimum(nbk, (t0 // s * s) // c)
        run_stop = np.minimum(reach, (((t1 - 1) // s + 1) * s - 1) // c + 1)
        # The diagonals q - k = m * s crossing the block row: keys [t0 - m s, t1 - 1 - m s].
        m_lo = -((kv_len - 1 - t0) // s)  # ceil((t0 - kv_len + 1) / s)
        if is_causal:
            m_lo = np.maximum(m_lo, 0)
        m_hi = (t1 - 1) // s
        if r + c > s:
            # No whole key block fits between two diagonals: they reach one range of blocks,
            # which joins the run's range into one or two ranges per row, in order.
            k_lo = np.maximum(0, t0 - m_hi * s)
            k_hi = np.minimum(kv_len - 1, t1 - 1 - m_lo * s)
            has = (m_lo <= m_hi) & (k_lo <= k_hi)
            d_start = np.where(has, k_lo // c, 0)
            d_stop = np.where(has, k_hi // c + 1, 0)
            return _union_of_two_ranges(rows, run_start, run_stop, d_start, d_stop)
        # Diagonals at least a block apart: each reaches its own blocks, in increasing key
        # order as m decreases; the run's blocks are merged in (both lists sorted, unique).
        m_owner, step = _ranges(np.zeros_like(m_lo), np.maximum(m_hi - m_lo + 1, 0))
        d = (m_hi[m_owner] - step) * s
        k_lo = np.maximum(0, t0[m_owner] - d)
        k_hi = np.minimum(kv_len - 1, t1[m_owner] - 1 - d)
        d_owner, dj = _ranges(k_lo // c, np.where(k_hi >= k_lo, k_hi // c + 1, 0))
        diagonal = rows[m_owner[d_owner]] * nbk + dj
        owner, j = _ranges(run_start, run_stop)
        blocks = _union_sorted(diagonal, rows[owner] * nbk + j)
        return blocks // nbk, blocks % nbk

    # The pattern of a block depends on its offsets within the runs (t0 % s, s0 % s), on the
    # difference of their run numbers (nothing shared beyond +-span) and, near the causal
    # diagonal, on s0 - t0 (every key visible from s0 - t0 <= -(c - 1) on).
    # A block whose queries and keys share no run sees only the diagonals: its pattern
    # depends on (t0 - s0) mod s and s0 - t0 only (far fewer patterns to evaluate); one
    # inside a single run is full (below the diagonal, when causal).
    span = (r + c) // s + 2
    offsets = r + c + 1
    diagonal_keys = s * offsets

    def classify(i: np.ndarray, j: np.ndarray):
        t0, t1, s0, s1 = _block_bounds(shape, i, j)
        runs = np.clip(t0 // s - s0 // s, -span, span) + span
        causal_offset = (np.clip(s0 - t0, -(c - 1), r) + c - 1 if is_causal
                         else np.zeros(i.shape, np.int64))
        apart = ((t1 - 1) // s < s0 // s) | ((s1 - 1) // s < t0 // s)
        key = np.where(apart, _mixed_radix([(t0 - s0) % s, causal_offset], [s, offsets]),
                       diagonal_keys + _mixed_radix([t0 % s, s0 % s, runs, causal_offset],
                                                    [s, s, 2 * span + 1, offsets]))
        # queries and keys all in one run (and, causal, every key before every query): full
        full = (t0 // s == (t1 - 1) // s) & (s0 // s == (s1 - 1) // s) & (t0 // s == s0 // s)
        return (full & (s1 - 1 <= t0)) if is_causal else full, key

    return _structured(shape, predicate, candidates, classify)


def _sample_without_replacement(rng: np.random.Generator, rows: int, n: int,
                                take: int) -> np.ndarray:
    """[rows, take]: per row, ``take`` distinct values of ``range(n)``, uniformly (the first
    ``take`` steps of a Fisher-Yates shuffle of each row, in O(rows * take^2), never O(n))."""
    out = np.zeros((rows, take), np.int64)
    # The shuffle's swaps so far, per row: position moved[:, m] now holds value held[:, m].
    moved = np.full((rows, take), -1, np.int64)
    held = np.zeros((rows, take), np.int64)
    row = np.arange(rows)

    def value_at(position: np.ndarray, steps: int) -> np.ndarray:
        if steps == 0:
            return position
        hit = moved[:, :steps] == position[:, None]
        last = steps - 1 - np.argmax(hit[:, ::-1], axis=1)  # the latest swap wins
        return np.where(hit.any(axis=1), held[row, last], position)

    for step in range(take):
        pick = step + np.floor(rng.random(rows) * (n - step)).astype(np.int64)
        pick = np.minimum(pick, n - 1)
        picked, current = value_at(pick, step), value_at(np.full(rows, step), step)
        out[:, step] = picked
        moved[:, step], held[:, step] = pick, current  # the swap: pick now holds step's value
    return out


def random(q_len: int, kv_len: int | None = None, *, num_blocks: int, seed: int,
           num_heads: int | None = None, block_q: int = DEFAULT_BLOCK,
           block_kv: int = DEFAULT_BLOCK) -> BlockSparseMask:
    """BigBird's random attention: each block row sees ``num_blocks`` distinct key blocks drawn
    uniformly with ``numpy.random.default_rng(seed)`` (all of them if there are fewer); per head
    with ``num_heads`` (>= 1). Time and memory follow the number of blocks drawn. Combine with
    ``local``/``global_local`` by ``|`` for full BigBird."""
    q_len, kv_len = _lengths(q_len, kv_len)
    shape = _check_shape(q_len, kv_len, block_q, block_kv, 1 if num_heads is None else num_heads)
    try:
        num_blocks = operator.index(num_blocks)
    except TypeError as e:
        raise TypeError(f"num_blocks must be an int, got {num_blocks!r}") from e
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    heads = shape[4]
    nbq, nbk = -(-q_len // block_q), -(-kv_len // block_kv)
    take = min(num_blocks, nbk)
    cols = _sample_without_replacement(np.random.default_rng(seed), heads * nbq, nbk, take)
    indptr = np.broadcast_to(np.arange(nbq + 1) * take, (heads, nbq + 1))
    indices = cols.reshape(heads, -1)
    if num_heads is None:
        indptr, indices = indptr[0], indices[0]
    return BlockSparseMask.from_block_indices(indptr, indices, q_len, kv_len, block_q, block_kv)
