"""Compilation of a ``BlockSparseMask`` into the block-sparse kernels' tables.

A mask is cut into blocks of its own size (``jaxattn.masks``); the kernels walk tiles of their
own size (``positions`` queries x ``group`` heads by ``keys``, from
``_ffi.block_sparse_tiling``). This module turns the one into the other, once per mask and
tiling (cached on the mask), as splash attention keeps its mask apart from its "mask info":
per query tile the non-empty key tiles, each full or partial with an index into a
deduplicated pool of element masks, and the same transposed for the backward's key-major pass.

Three ways, picked by the block size, all giving identical tables:
- blocks a whole number of tiles (the default 64 x 64 blocks, and 128 x 128): each block
  splits into the same tiles wherever it is, so each distinct (block pattern, clipping at the
  sequence ends) is split once and the blocks are expanded without sorting the tiles; time
  and memory follow the number of blocks;
- tiny blocks (at most ``_DENSE_TABLES_RATIO`` elements per non-empty block, e.g. 1 x 1):
  through the dense mask, in memory a small multiple of it;
- any other size: each block cut by the tiles it overlaps, tiles with the same signature
  (clipping, overlapping blocks and their patterns) looked up once.
"""

from __future__ import annotations

import numpy as np

from jaxattn import masks
from jaxattn.masks import _FULL, _readonly, unique_rows

_EMPTY = -3  # a tile with no visible element (dropped from the tables)
_LOOKUP_ELEMENTS = 1 << 20  # elements looked up at a time while compiling kernel tables
_TABLE_BLOCKS_PER_BAND = 1 << 16  # blocks whose tiles are worked out at a time
_BLOCKS_PER_CHUNK = 1 << 20  # blocks expanded into tiles at a time (aligned blocks)
# Compile kernel tables through the dense mask when it has at most this many elements per
# block (tiny blocks, where per-block bookkeeping would outweigh the dense mask).
_DENSE_TABLES_RATIO = 32


def kernel_tables(mask: masks.BlockSparseMask, positions: int, keys: int, group: int,
                  groups: int, rows_padded: int | None = None) -> tuple[np.ndarray, ...]:
    """The tables for kernel tiles of ``positions`` queries x ``group`` heads by ``keys``.

    ``groups`` is 1 for a mask shared by all heads, or K for a per-head mask (table g
    serves query heads ``g*group .. g*group + group - 1``; needs ``num_heads == K*group``).
    Returns ``(q_indptr, q_entries, k_indptr, k_entries, masks, masks_t)``: int32 CSR
    over (group, query tile) of entries (key tile, mask id or -1 for full), the same over
    (group, key tile) of (query tile, mask id), the deduplicated element masks, bool
    ``[P, positions * group, keys]`` (row ``(t - t0) * group + g``), and the same
    transposed, ``[P, keys, rows_padded]`` (rows zero-padded to ``rows_padded``, default
    no padding) for the backward's key-major pass. Cached on the mask per arguments.
    """
    rows = positions * group
    rows_padded = rows if rows_padded is None else rows_padded
    if rows_padded < rows:
        raise ValueError(f"rows_padded={rows_padded} < rows per tile {rows}")
    cache_key = (positions, keys, group, groups, rows_padded)
    if cache_key not in mask._tables:
        tables = compile_tables(mask, positions, keys, group, groups)
        pool = tables[-1]
        pool_t = np.zeros((pool.shape[0], keys, rows_padded), bool)
        pool_t[:, :, :rows] = pool.transpose(0, 2, 1)
        mask._tables[cache_key] = tuple(_readonly(x) for x in tables + (pool_t,))
    return mask._tables[cache_key]


def compile_tables(mask: masks.BlockSparseMask, positions: int, keys_per_tile: int, group: int,
                   groups: int) -> tuple[np.ndarray, ...]:
    """``kernel_tables`` without the transposed mask pool and the cache."""
    per_head = mask.num_heads > 1
    if (groups != 1 and not per_head) or (per_head and mask.num_heads != groups * group):
        raise ValueError(f"a mask of {mask.num_heads} heads cannot have {groups} table groups "
                         f"of {group} heads")
    if mask.num_heads * mask.q_len * mask.kv_len <= _DENSE_TABLES_RATIO * max(1, mask.num_blocks):
        # Blocks so small that the dense mask is smaller than the per-block bookkeeping
        # (e.g. 1x1 blocks): cut the dense mask into kernel tiles instead.
        return _compile_from_dense(mask, positions, keys_per_tile, group, groups)
    if (mask.block_q % positions == 0 and mask.block_kv % keys_per_tile == 0
            and (group == 1 or not per_head)):
        return _compile_aligned(mask, positions, keys_per_tile, group, groups)
    return _compile_by_tiles(mask, positions, keys_per_tile, group, groups)


def _unique_rows_first(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct rows, index of each one's first occurrence, inverse), rows in any order."""
    rows = np.ascontiguousarray(rows)
    as_bytes = rows.view(np.dtype((np.void, rows.shape[1] * rows.dtype.itemsize))).reshape(-1)
    unique, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    return unique, first, inverse.reshape(-1)


# ---------------------------------------------------------------------------- aligned blocks


def _compile_aligned(mask: masks.BlockSparseMask, positions: int, keys_per_tile: int,
                     group: int, groups: int) -> tuple[np.ndarray, ...]:
    """Blocks of a whole number of tiles (R = U * positions, C = V * keys), shared by the
    heads or one table group per head (group 1). A block's U x V tiles follow from its
    pattern id and its clipping at the sequence ends only: each such combination is split
    once, then every block is expanded into its tiles in table order, a chunk of block rows
    (and, for the transposed tables, of block columns) at a time, without sorting tiles."""
    q_len, kv_len, r, c = mask.q_len, mask.kv_len, mask.block_q, mask.block_kv
    tq, tk = positions, keys_per_tile
    sub_rows, sub_cols = r // tq, c // tk
    nbq, nbk = mask.grid
    nqt, nkt = -(-q_len // tq), -(-kv_len // tk)
    lines = mask.num_heads * nbq  # block rows over all heads: line = h * nbq + i
    keys, ids = mask._keys, mask._ids
    line_ptr = np.searchsorted(keys, np.arange(lines + 1, dtype=np.int64) * nbk)

    # 1. Each block's combination: 1 + its pattern id (0: full), or for a block clipped at a
    # sequence end, one of the extra combinations (pattern id, clipping) after those.
    clipped = []
    if q_len % r:  # the last block row of every head
        clipped += [np.arange(line_ptr[h * nbq + nbq - 1], line_ptr[h * nbq + nbq])
                    for h in range(mask.num_heads)]
    if kv_len % c:  # the last block column: the last block of a row, if any
        last = line_ptr[1:][np.diff(line_ptr) > 0] - 1
        clipped.append(last[keys[last] % nbk == nbk - 1])
    clipped = np.unique(np.concatenate(clipped)) if clipped else np.zeros(0, np.int64)
    clip = (((keys[clipped] // nbk) % nbq == nbq - 1) & bool(q_len % r)) * 2 + (
        (keys[clipped] % nbk == nbk - 1) & bool(kv_len % c))
    num_patterns = mask._pool.shape[0]
    extra, extra_of = np.unique((ids[clipped].astype(np.int64) + 1) * 4 + clip,
                                return_inverse=True)
    combo = ids.astype(np.int32) + 1
    combo[clipped] = num_patterns + 1 + extra_of.reshape(-1)

    # 2. Every combination's elements, cut into tiles: empty, full or a pattern.
    base = np.concatenate([np.ones((1, r, c), bool), mask._pool])
    elems = np.concatenate([base, base[extra // 4]])
    rows_valid = np.full(elems.shape[0], r)
    cols_valid = np.full(elems.shape[0], c)
    rows_valid[num_patterns + 1:] = np.where(extra % 4 >= 2, q_len - (nbq - 1) * r, r)
    cols_valid[num_patterns + 1:] = np.where(extra % 2 == 1, kv_len - (nbk - 1) * c, c)
    elems[num_patterns + 1:] &= ((np.arange(r)[None, :, None] < rows_valid[num_patterns + 1:,
                                                                            None, None]) &
                                 (np.arange(c)[None, None, :] < cols_valid[num_patterns + 1:,
                                                                           None, None]))
    tiles = elems.reshape(-1, sub_rows, tq, sub_cols, tk)
    count = np.count_nonzero(tiles, axis=(2, 4))  # [combinations, U, V]
    area = (np.clip(rows_valid[:, None] - np.arange(sub_rows) * tq, 0, tq)[:, :, None] *
            np.clip(cols_valid[:, None] - np.arange(sub_cols) * tk, 0, tk)[:, None, :])
    sub_id = np.where(count == 0, _EMPTY, np.where(count == area, _FULL, 0)).astype(np.int32)
    used = np.zeros(sub_id.shape[0], bool)
    used[combo] = True  # a pattern seen only at a sequence end is split only as clipped there
    partial = np.nonzero((sub_id == 0) & used[:, None, None])
    pool = np.zeros((0, tq * group, tk), bool)
    if partial[0].size:
        found = tiles[partial[0], partial[1], :, partial[2], :]  # [m, tq, tk]
        # A tile's rows are (position, head): the shared mask repeated for the group's heads.
        found = np.repeat(found, group, axis=1).reshape(found.shape[0], -1)
        unique, inverse = unique_rows(found.view(np.uint8))
        pool = unique.reshape(-1, tq * group, tk).astype(bool)
        sub_id[partial] = inverse
    del elems, tiles

    # 3. The query-major tables: per block row, per tile row u, its blocks' tiles in order.
    if pool.shape[0] >= 2**31:
        raise ValueError("block-sparse mask too large for int32 kernel tables")
    q_indptr, q_entries = _expand(sub_id, combo, keys, line_ptr, None,
                                  lambda k: k % nbk, groups, nqt)
    # 4. The key-major tables: the blocks by (head, block column), stably (rows in order).
    column = (keys // (nbq * nbk)) * nbk + keys % nbk
    order = _stable_argsort(column, mask.num_heads * nbk)
    column_ptr = np.concatenate([[0], np.cumsum(np.bincount(column,
                                                            minlength=mask.num_heads * nbk))])
    del column
    k_indptr, k_entries = _expand(np.ascontiguousarray(sub_id.transpose(0, 2, 1)), combo, keys,
                                  column_ptr, order, lambda k: (k // nbk) % nbq, groups, nkt)
    return q_indptr, q_entries, k_indptr, k_entries, pool


def _expand(sub_id: np.ndarray, combo: np.ndarray, keys: np.ndarray, line_ptr: np.ndarray,
            order: np.ndarray | None, minor_of, groups: int,
            tiles_per_line: int) -> tuple[np.ndarray, np.ndarray]:
    """The CSR (indptr, entries [E, 2] of (minor tile, id)) over (group, tile line) of the
    non-empty tiles of blocks taken in ``order`` (None: as stored) and grouped into lines
    (block rows or columns, ``line_ptr`` their starts in that order), in the order (line,
    tile line u, block, tile v): block k has tiles ``sub_id[combo[k], u, v]`` with minor tiles
    ``minor_of(keys[k]) * V + v``. Tile lines past ``tiles_per_line`` are empty (clipped)."""
    sub_lines, sub_minor = sub_id.shape[1:]
    lines = line_ptr.size - 1
    nonempty = np.count_nonzero(sub_id != _EMPTY, axis=2).astype(np.int64)  # [combos, U]
    # Chunks of whole lines of about _BLOCKS_PER_CHUNK tiles (a line may exceed it).
    budget = max(1, _BLOCKS_PER_CHUNK // (sub_lines * sub_minor))
    chunks, l0 = [], 0
    while l0 < lines:
        l1 = int(np.searchsorted(line_ptr, line_ptr[l0] + budget, side="right")) - 1
        l1 = min(lines, max(l1, l0 + 1))
        chunks.append((l0, l1))
        l0 = l1

    def blocks(l0: int, l1: int) -> np.ndarray | slice:
        k0, k1 = int(line_ptr[l0]), int(line_ptr[l1])
        return slice(k0, k1) if order is None else order[k0:k1]

    # Per combination and u: whether any of its tiles is empty (else nothing to drop).
    has_empty = (sub_id == _EMPTY).any(axis=2)
    sub_id_of_line = [np.ascontiguousarray(sub_id[:, u, :]) for u in range(sub_lines)]

    # Pass 1: the entries of every (line, u).
    counts = np.zeros((lines, sub_lines), np.int64)
    for l0, l1 in chunks:
        k0 = int(line_ptr[l0])
        per_block = nonempty[combo[blocks(l0, l1)]]
        total = np.concatenate([np.zeros((1, sub_lines), np.int64),
                                np.cumsum(per_block, axis=0)])
        counts[l0:l1] = total[line_ptr[l0 + 1:l1 + 1] - k0] - total[line_ptr[l0:l1] - k0]
    out_start = (np.cumsum(counts.reshape(-1)) - counts.reshape(-1)).reshape(lines, sub_lines)
    entries = np.empty((int(counts.sum()), 2), np.int32)
    if entries.shape[0] >= 2**31:
        raise ValueError("block-sparse mask too large for int32 kernel tables")

    # Pass 2: each u's tiles of a chunk, written where their lines' entries start.
    for l0, l1 in chunks:
        sel = blocks(l0, l1)
        block_combo = combo[sel]
        minor = ((minor_of(keys[sel]) * sub_minor).astype(np.int32)[:, None] +
                 np.arange(sub_minor, dtype=np.int32))
        for u in range(sub_lines):
            ids = np.take(sub_id_of_line[u], block_combo, axis=0)  # [n, V]
            if has_empty[block_combo, u].any():
                keep = ids != _EMPTY
                ids, tile = ids[keep], minor[keep]
            else:
                ids, tile = ids.reshape(-1), minor.reshape(-1)
            cnt = counts[l0:l1, u]
            if sub_lines == 1:  # the chunk's entries are contiguous
                dest = slice(int(out_start[l0, 0]), int(out_start[l0, 0]) + ids.size)
            elif ids.size >= 64 * (l1 - l0):  # long lines: one slice per line
                ends = np.cumsum(cnt).tolist()
                for line, (o, e) in enumerate(zip(out_start[l0:l1, u].tolist(), ends)):
                    n = cnt[line]
                    entries[o:o + n, 0] = tile[e - n:e]
                    entries[o:o + n, 1] = ids[e - n:e]
                continue
            else:
                dest = (np.repeat(out_start[l0:l1, u] - (np.cumsum(cnt) - cnt), cnt) +
                        np.arange(ids.size))
            entries[dest, 0] = tile
            entries[dest, 1] = ids
    per_line = counts.reshape(groups, -1)[:, :tiles_per_line]
    indptr = np.concatenate([[0], np.cumsum(per_line.reshape(-1))]).astype(np.int32)
    return indptr, entries


def _stable_argsort(key: np.ndarray, bound: int) -> np.ndarray:
    """A stable argsort of non-negative keys < bound, in linear time for bound <= 2**32 (one
    or two passes of NumPy's radix sort on 16-bit digits)."""
    if bound <= 1 << 16:
        return np.argsort(key.astype(np.uint16), kind="stable")
    if bound <= 1 << 32:
        order = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
        return order[np.argsort((key[order] >> 16).astype(np.uint16), kind="stable")]
    return np.argsort(key, kind="stable")


# ---------------------------------------------------------------------------- any block size


def _compile_by_tiles(mask: masks.BlockSparseMask, positions: int, keys_per_tile: int, group: int,
                    groups: int) -> tuple[np.ndarray, ...]:
    """Any block size: each block cut by the tiles it overlaps (see compile_tables)."""
    per_head = mask.num_heads > 1
    if (groups != 1 and not per_head) or (per_head and mask.num_heads != groups * group):
        raise ValueError(f"a mask of {mask.num_heads} heads cannot have {groups} table groups "
                         f"of {group} heads")
    q_len, kv_len = mask.q_len, mask.kv_len
    r = mask.block_q
    tq, tk = positions, keys_per_tile
    nqt, nkt = -(-q_len // tq), -(-kv_len // tk)
    rows_per_tile = tq * group
    if mask.num_heads * q_len * kv_len <= _DENSE_TABLES_RATIO * max(1, mask._keys.size):
        # Blocks so small that the dense mask is smaller than the per-block bookkeeping
        # (e.g. 1x1 blocks): cut the dense mask into kernel tiles instead.
        return _compile_from_dense(mask, positions, keys_per_tile, group, groups)

    # Steps 1-3 a band of query tile rows at a time, so that the per-block bookkeeping (a few
    # dozen int64 per block) stays bounded; element masks are deduplicated over all bands.
    nbq, nbk = mask.grid
    per_tile_row = max(1, mask._keys.size // max(1, nqt))
    band = max(1, _TABLE_BLOCKS_PER_BAND // per_tile_row)
    parts, patterns = [], [np.zeros((0, rows_per_tile * tk), np.uint8)]
    for a_start in range(0, nqt, band):
        tile_rows = (a_start, min(nqt, a_start + band))
        i_lo = tile_rows[0] * tq // r
        i_hi = min(nbq, (tile_rows[1] * tq - 1) // r + 1)
        head_base = np.arange(mask.num_heads, dtype=np.int64) * nbq * nbk
        lo = np.searchsorted(mask._keys, head_base + i_lo * nbk)
        hi = np.searchsorted(mask._keys, head_base + i_hi * nbk)
        sel = np.concatenate([np.arange(x, y) for x, y in zip(lo, hi)])
        if not sel.size:
            continue
        g_of, a_of, b_of, ids, found = _tables_of_tile_rows(
            mask, mask._keys[sel], mask._ids[sel], tile_rows, positions, keys_per_tile, group,
            per_head)
        ids = np.where(ids >= 0, ids + sum(x.shape[0] for x in patterns), ids)
        parts.append((g_of, a_of, b_of, ids))
        patterns.append(found)
    if not parts:
        return _csr_tables(*(np.zeros(0, np.int64),) * 4, np.zeros((0, rows_per_tile, tk), bool),
                           groups, nqt, nkt)
    g_of, a_of, b_of, ids = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((b_of, a_of, g_of))
    g_of, a_of, b_of, ids = g_of[order], a_of[order], b_of[order], ids[order]
    masks = np.zeros((0, rows_per_tile, tk), bool)
    patterns = np.concatenate(patterns)
    if patterns.shape[0]:
        unique, inverse = unique_rows(patterns)
        masks = unique.reshape(-1, rows_per_tile, tk).astype(bool)
        partial = ids >= 0
        ids[partial] = inverse.reshape(-1)[ids[partial]]
    return _csr_tables(g_of, a_of, b_of, ids, masks, groups, nqt, nkt)


def _tables_of_tile_rows(mask: masks.BlockSparseMask, block_keys: np.ndarray, block_ids: np.ndarray,
                         tile_rows: tuple[int, int], positions: int, keys_per_tile: int,
                         group: int, per_head: bool) -> tuple[np.ndarray, ...]:
    """The non-empty tiles of query tile rows [tile_rows[0], tile_rows[1]) from the blocks
    that overlap them: (group, query tile, key tile, id) sorted by (group, query tile, key
    tile), id _FULL or an index into the returned element masks (uint8 rows, deduplicated)."""
    q_len, kv_len = mask.q_len, mask.kv_len
    r, c = mask.block_q, mask.block_kv
    tq, tk = positions, keys_per_tile
    nqt, nkt = -(-q_len // tq), -(-kv_len // tk)
    rows_per_tile = tq * group

    # 1. Every (head, kernel tile) a non-empty block overlaps, and the area full blocks cover.
    h, i, j = mask._unravel(block_keys)
    t_lo, t_hi = i * r, np.minimum(q_len, (i + 1) * r)
    s_lo, s_hi = j * c, np.minimum(kv_len, (j + 1) * c)
    a0, a1 = t_lo // tq, (t_hi - 1) // tq
    b0, b1 = s_lo // tk, (s_hi - 1) // tk
    na, nb = a1 - a0 + 1, b1 - b0 + 1
    pairs = na * nb
    owner = np.repeat(np.arange(h.size), pairs)
    offset = np.arange(int(pairs.sum())) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    a = a0[owner] + offset // nb[owner]
    b = b0[owner] + offset % nb[owner]
    inside_rows = (a >= tile_rows[0]) & (a < tile_rows[1])  # this chunk's query tiles
    owner, a, b = owner[inside_rows], a[inside_rows], b[inside_rows]
    rows_in = np.minimum(t_hi[owner], np.minimum(q_len, (a + 1) * tq)) - np.maximum(
        t_lo[owner], a * tq)
    cols_in = np.minimum(s_hi[owner], np.minimum(kv_len, (b + 1) * tk)) - np.maximum(
        s_lo[owner], b * tk)
    full_area = np.where(block_ids[owner] == _FULL, rows_in * cols_in, 0)
    head_tile = (h[owner] * nqt + a) * nkt + b
    head_tiles, inverse = np.unique(head_tile, return_inverse=True)
    covered = np.bincount(inverse.reshape(-1), weights=full_area, minlength=head_tiles.size)
    th = head_tiles // (nqt * nkt)
    ta = (head_tiles // nkt) % nqt
    tb = head_tiles % nkt
    tile_area = ((np.minimum(q_len, (ta + 1) * tq) - ta * tq) *
                 (np.minimum(kv_len, (tb + 1) * tk) - tb * tk))
    head_full = covered == tile_area  # full blocks cover the (head, tile) entirely

    # 2. Per (table group, tile): non-empty if any of its heads is, full if all of them are.
    tg = th // group if per_head else np.zeros_like(th)
    group_tile = (tg * nqt + ta) * nkt + tb
    tiles, inverse = np.unique(group_tile, return_inverse=True)
    heads_needed = group if per_head else 1
    full_heads = np.bincount(inverse.reshape(-1), weights=head_full, minlength=tiles.size)
    tile_full = full_heads == heads_needed
    g_of = tiles // (nqt * nkt)
    a_of = (tiles // nkt) % nqt
    b_of = tiles % nkt

    # 3. Element masks of the other tiles. A tile's elements follow from its clipping at the
    # sequence ends and from the blocks overlapping it (head within the group, offset from the
    # tile's origin, pattern id): tiles with the same such signature share their elements,
    # which are looked up once, on one tile per signature.
    mask_id = np.full(tiles.size, _FULL, np.int64)
    keep = np.ones(tiles.size, bool)
    masks = np.zeros((0, rows_per_tile, tk), bool)
    todo = np.nonzero(~tile_full)[0]
    if todo.size:
        pair_group = h[owner] // group if per_head else np.zeros_like(owner)
        pos = np.searchsorted(tiles, (pair_group * nqt + a) * nkt + b)
        need = ~tile_full[pos]
        pos, by = pos[need], owner[need]
        columns = (h[by] % group if per_head else np.zeros_like(by),
                   t_lo[by] - a[need] * tq, s_lo[by] - b[need] * tk,
                   block_ids[by].astype(np.int64))
        order = np.lexsort(columns[::-1] + (pos,))
        slot = np.full(tiles.size, -1, np.int64)
        slot[todo] = np.arange(todo.size)
        row = slot[pos[order]]  # non-decreasing
        per_tile = np.bincount(row, minlength=todo.size)
        rank = np.arange(row.size) - np.repeat(np.cumsum(per_tile) - per_tile, per_tile)
        signature = np.full((todo.size, 2 + 4 * int(per_tile.max())), -(2**62), np.int64)
        signature[:, 0] = np.minimum(q_len, (a_of[todo] + 1) * tq) - a_of[todo] * tq
        signature[:, 1] = np.minimum(kv_len, (b_of[todo] + 1) * tk) - b_of[todo] * tk
        for k, column in enumerate(columns):
            signature[row, 2 + 4 * rank + k] = column[order]
        _, first, same = _unique_rows_first(signature)
        del signature
        reps = todo[first]
        rep_id = np.full(reps.size, _FULL, np.int64)  # -3: empty
        row = np.arange(rows_per_tile)
        row_pos, row_head = row // group, row % group
        col = np.arange(tk)
        mixed_reps, patterns = [], []
        chunk = max(1, _LOOKUP_ELEMENTS // (rows_per_tile * tk))
        for start in range(0, reps.size, chunk):
            sel = reps[start:start + chunk]
            t = a_of[sel, None, None] * tq + row_pos[None, :, None]
            s = b_of[sel, None, None] * tk + col[None, None, :]
            if per_head:
                head = g_of[sel, None, None] * group + row_head[None, :, None]
            else:
                head = np.zeros((1, 1, 1), np.int64)
            elems = mask._lookup(head, t, s)  # [m, rows, keys], False past the sequence ends
            inside = (t < q_len) & (s < kv_len)
            count = elems.reshape(sel.size, -1).sum(axis=1)
            area = np.broadcast_to(inside, elems.shape).reshape(sel.size, -1).sum(axis=1)
            rep_id[start + np.nonzero(count == 0)[0]] = -3
            mixed = (count > 0) & (count < area)
            mixed_reps.append(start + np.nonzero(mixed)[0])
            patterns.append(elems[mixed])
        mixed_reps = np.concatenate(mixed_reps)
        if mixed_reps.size:
            elems = np.concatenate(patterns).reshape(mixed_reps.size, -1)
            unique, inverse = unique_rows(elems.view(np.uint8))
            masks = unique.reshape(-1, rows_per_tile, tk).astype(bool)
            rep_id[mixed_reps] = inverse.reshape(-1)
        ids = rep_id[same.reshape(-1)]
        keep[todo[ids == -3]] = False
        mask_id[todo] = ids

    found = masks.reshape(masks.shape[0], rows_per_tile * tk).view(np.uint8)
    return g_of[keep], a_of[keep], b_of[keep], mask_id[keep], found


def _compile_from_dense(mask: masks.BlockSparseMask, positions: int, keys_per_tile: int,
                               group: int, groups: int) -> tuple[np.ndarray, ...]:
    """_compile_tables through the dense mask, in memory a small multiple of it (the same
    tables as the block path: tiles classified by their elements, masks deduplicated)."""
    q_len, kv_len = mask.q_len, mask.kv_len
    tq, tk = positions, keys_per_tile
    nqt, nkt = -(-q_len // tq), -(-kv_len // tk)
    per_head = mask.num_heads > 1
    heads = group if per_head else 1  # heads of a table group held in the dense mask
    dense = mask.to_dense().reshape(groups, heads, q_len, kv_len)
    if q_len % tq or kv_len % tk:  # pad to whole tiles
        padded = np.zeros((groups, heads, nqt * tq, nkt * tk), bool)
        padded[:, :, :q_len, :kv_len] = dense
        dense = padded
        del padded
    grid = dense.reshape(groups, heads, nqt, tq, nkt, tk)
    counts = np.count_nonzero(grid, axis=(1, 3, 5)) * (group // heads)  # [groups, nqt, nkt]
    rows_in = np.minimum(tq, q_len - np.arange(nqt) * tq)
    cols_in = np.minimum(tk, kv_len - np.arange(nkt) * tk)
    area = (rows_in[:, None] * cols_in[None, :] * group)[None]
    g_of, a_of, b_of = (x.astype(np.int64) for x in np.nonzero(counts))  # sorted (g, a, b)
    mixed = counts[g_of, a_of, b_of] < area[0, a_of, b_of]
    mask_id = np.full(g_of.size, _FULL, np.int64)
    pool = np.zeros((0, tq * group, tk), bool)
    if mixed.any():
        # [group, query tile, key tile, position, head, key]: a tile's rows are (position, head)
        tiles = grid.transpose(0, 2, 4, 3, 1, 5)
        sel = tiles[g_of[mixed], a_of[mixed], b_of[mixed]]  # [m, tq, heads, tk]
        del dense, grid, tiles
        sel = np.broadcast_to(sel, sel.shape[:2] + (group, tk)).reshape(sel.shape[0], -1)
        unique, inverse = unique_rows(sel.view(np.uint8))
        del sel
        pool = unique.view(bool).reshape(-1, tq * group, tk)
        mask_id[mixed] = inverse
    return _csr_tables(g_of, a_of, b_of, mask_id, pool, groups, nqt, nkt)


def _csr_tables(g_of: np.ndarray, a_of: np.ndarray, b_of: np.ndarray, mask_id: np.ndarray,
                masks: np.ndarray, groups: int, nqt: int, nkt: int) -> tuple[np.ndarray, ...]:
    """The CSR tables in both orders of the non-empty tiles (sorted by (group, query tile,
    key tile)) with their mask ids; see masks.BlockSparseMask.kernel_tables."""
    if g_of.size >= 2**31 or masks.shape[0] >= 2**31:
        raise ValueError("block-sparse mask too large for int32 kernel tables")
    q_indptr = np.zeros(groups * nqt + 1, np.int64)
    q_indptr[1:] = np.cumsum(np.bincount(g_of * nqt + a_of, minlength=groups * nqt))
    q_entries = np.stack([b_of, mask_id], axis=1)
    order = np.lexsort((a_of, b_of, g_of))
    k_indptr = np.zeros(groups * nkt + 1, np.int64)
    k_indptr[1:] = np.cumsum(np.bincount(g_of * nkt + b_of, minlength=groups * nkt))
    k_entries = np.stack([a_of[order], mask_id[order]], axis=1)
    as32 = lambda x: x.astype(np.int32).reshape(x.shape)
    return (as32(q_indptr), as32(q_entries).reshape(-1, 2), as32(k_indptr),
            as32(k_entries).reshape(-1, 2), masks)
