"""Block-sparse attention: masks, kernel tables, and the kernels against the float64 oracle.

``block_sparse_attention(q, k, v, m)`` must equal the float64 oracle with ``m.to_dense()`` (to
FlashAttention's tolerance) and ``flash_attention(q, k, v, mask=m.to_dense())`` bitwise,
forward and backward: both run the same tile routine over the same tile grid.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from _subprocess import CWD, python_env
from isa_support import skip_reason as isa_skip_reason
from jaxattn import _mask_tables, masks
from jaxattn.masks import BlockSparseMask
from oracle import (
    assert_close_to_oracle,
    attention_reference,
    attention_reference_grad,
    naive_low_precision,
    naive_low_precision_grad,
)



# ------------------------------------------------------------------------------ helpers


def _inputs(rng, b, t, s, n, k, h, dtype, hv=None):
    def normal(shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return normal((b, t, n, h)), normal((b, s, k, h)), normal((b, s, k, hv or h))


def _as_np(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def _assert_same(actual, expected, name):
    np.testing.assert_array_equal(_as_np(actual), _as_np(expected), err_msg=name)


def _run(q, k, v, mask, dout, dlse, **kw):
    """(out, lse, dq, dk, dv) of block_sparse_attention for cotangents (dout, dlse)."""
    f = lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, mask, return_residual=True, **kw)
    (out, lse), vjp = jax.vjp(f, q, k, v)
    return (out, lse) + tuple(vjp((dout, dlse)))


def _run_flash(q, k, v, dense, dout, dlse, **kw):
    f = lambda q, k, v: jaxattn.flash_attention(q, k, v, mask=dense, return_residual=True, **kw)
    (out, lse), vjp = jax.vjp(f, q, k, v)
    return (out, lse) + tuple(vjp((dout, dlse)))


def _check_against_oracle(rng, mask, b=1, n=2, k=None, h=16, dtype="float32", soft_cap=None,
                          grads=True):
    """Forward (and gradients) vs the float64 oracle, and bitwise vs dense flash attention."""
    k = k or n
    t, s = mask.q_len, mask.kv_len
    q, kk, v = _inputs(rng, b, t, s, n, k, h, dtype)
    dense = mask.to_dense()
    dout = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    dlse = jnp.zeros((b, t, n), jnp.float32)
    got = _run(q, kk, v, mask, dout, dlse, logits_soft_cap=soft_cap)
    opts = dict(logits_soft_cap=soft_cap)
    args = [np.asarray(x.astype(jnp.float32)) for x in (q, kk, v)]
    ref_out, ref_lse = attention_reference(*args, mask=dense, **opts)
    naive_out, _ = naive_low_precision(*args, jnp.dtype(dtype), mask=dense, **opts)
    assert_close_to_oracle(got[0], ref_out, naive_out, dtype=dtype, name="out")
    assert_close_to_oracle(got[1], ref_lse, dtype="float32", name="lse")
    if grads:
        d = np.asarray(dout.astype(jnp.float32))
        ref = attention_reference_grad(*args, d, mask=dense, **opts)
        naive = naive_low_precision_grad(*args, d, jnp.dtype(dtype), mask=dense, **opts)
        for name, g, r, nv in zip(("dq", "dk", "dv"), got[2:], ref, naive):
            assert_close_to_oracle(g, r, nv, dtype=dtype, name=name)
    # Exactly dense flash attention with the materialised mask, forward and backward.
    want = _run_flash(q, kk, v, jnp.asarray(dense), dout, dlse, logits_soft_cap=soft_cap)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        _assert_same(a, e, name)
    return got


# ------------------------------------------------------------------------------ masks


BLOCKS = [(1, 1), (2, 3), (5, 7), (16, 16), (7, 64), (64, 64), (128, 16), (100, 13), (33, 128)]


@pytest.mark.parametrize("block_q,block_kv", BLOCKS)
def test_from_dense_round_trip(rng, block_q, block_kv):
    dense = rng.random((3, 45, 70)) < 0.3
    dense[:, :10] = False
    dense[:, 20:, :30] = True
    m = BlockSparseMask.from_dense(dense, block_q=block_q, block_kv=block_kv)
    np.testing.assert_array_equal(m.to_dense(), dense)
    assert m.shape == (3, 45, 70) and m.block_shape == (block_q, block_kv)
    # canonical: rebuilding gives an equal mask with the same hash
    again = BlockSparseMask.from_dense(m.to_dense(), block_q=block_q, block_kv=block_kv)
    assert again == m and hash(again) == hash(m)
    assert m != BlockSparseMask.from_dense(~dense, block_q=block_q, block_kv=block_kv)


def test_immutable_hashable_picklable():
    import pickle

    m = masks.local(30, window=2, block_q=4, block_kv=4)
    with pytest.raises(AttributeError, match="immutable"):
        m.q_len = 5
    with pytest.raises(ValueError):
        m._keys[0] = 1  # the arrays are read-only too
    again = pickle.loads(pickle.dumps(m))
    assert again == m and hash(again) == hash(m) and {m: 1}[again] == 1
    np.testing.assert_array_equal(again.to_dense(), m.to_dense())


def test_block_classification_and_dedup():
    m = masks.causal(256, block_q=32, block_kv=32)
    # 8 x 8 blocks: 8 diagonal (partial, all the same triangle), 28 full below, 28 empty
    assert m.num_blocks == 36 and m.num_partial_blocks == 8
    assert m._pool.shape[0] == 1
    # misaligned edges: the last block row/column is short; its blocks are still deduplicated
    m = masks.causal(100, 90, block_q=32, block_kv=32)
    np.testing.assert_array_equal(m.to_dense()[0], np.tri(100, 90, dtype=bool))


def test_builders_match_their_definitions():
    q = np.arange(50)[:, None]
    k = np.arange(61)[None, :]
    cases = {
        "causal": (masks.causal(50, 61, block_q=7, block_kv=5), k <= q),
        "local": (masks.local(50, 61, window=(4, 2), block_q=3, block_kv=8),
                  (k >= q - 4) & (k <= q + 2)),
        "local_int": (masks.local(50, 61, window=3, block_q=16, block_kv=16),
                      (k >= q - 3) & (k <= q + 3)),
        "global_local": (masks.global_local(50, 61, window=(2, 0), global_tokens=3,
                                            is_causal=True, block_q=4, block_kv=4),
                         (((k >= q - 2) & (k <= q)) | (q < 3) | (k < 3)) & (k <= q)),
        "global_list": (masks.global_local(50, 61, window=1, global_tokens=[5, 40],
                                           block_q=8, block_kv=3),
                        ((k >= q - 1) & (k <= q + 1)) | np.isin(q, [5, 40]) |
                        np.isin(k, [5, 40])),
        "strided": (masks.strided(50, 61, stride=6, block_q=6, block_kv=6),
                    ((q // 6 == k // 6) | ((q - k) % 6 == 0)) & (k <= q)),
        "function": (masks.from_function(lambda a, b: (a + b) % 4 == 0, 50, 61, block_q=9,
                                         block_kv=2), (q + k) % 4 == 0),
        # a scalar-only function is evaluated element by element
        "scalar_function": (masks.from_function(lambda a, b: bool(a * b % 5 == 1), 50, 61),
                            q * k % 5 == 1),
    }
    for name, (m, expected) in cases.items():
        np.testing.assert_array_equal(m.to_dense()[0], expected, err_msg=name)


def test_from_function_per_head():
    m = masks.from_function(lambda h, q, k: k <= q + h, 20, 30, num_heads=3, block_q=4,
                            block_kv=8)
    q, k = np.arange(20)[:, None], np.arange(30)[None]
    np.testing.assert_array_equal(m.to_dense(), np.stack([k <= q + h for h in range(3)]))


def test_random_is_seeded_block_rows():
    a = masks.random(100, 130, num_blocks=3, seed=7, block_q=16, block_kv=16)
    b = masks.random(100, 130, num_blocks=3, seed=7, block_q=16, block_kv=16)
    c = masks.random(100, 130, num_blocks=3, seed=8, block_q=16, block_kv=16)
    assert a == b and a != c
    indptr, indices = a.block_indices()
    assert (np.diff(indptr[0]) == 3).all()  # 3 distinct key blocks per block row
    heads = masks.random(100, 130, num_blocks=2, seed=7, num_heads=4, block_q=16, block_kv=16)
    assert heads.shape == (4, 100, 130)
    assert len({d.tobytes() for d in heads.to_dense()}) > 1  # heads differ
    full = masks.random(10, 10, num_blocks=99, seed=0, block_q=3, block_kv=3)
    assert full.to_dense().all()


def test_from_block_indices():
    # scipy.sparse.bsr_array layout: row i of blocks -> indices[indptr[i]:indptr[i+1]]
    indptr = np.array([0, 2, 2, 3])
    indices = np.array([1, 0, 2])
    m = BlockSparseMask.from_block_indices(indptr, indices, q_len=10, kv_len=11, block_q=4,
                                           block_kv=5)
    expected = np.zeros((10, 11), bool)
    expected[0:4, 0:10] = True  # blocks (0, 0) and (0, 1)
    expected[8:10, 10:11] = True  # block (2, 2): short in both directions
    np.testing.assert_array_equal(m.to_dense()[0], expected)
    scipy_sparse = pytest.importorskip("scipy.sparse")
    bsr = scipy_sparse.bsr_array((np.ones((3, 4, 5)), indices, indptr), shape=(12, 15))
    np.testing.assert_array_equal(m.to_dense()[0], bsr.toarray()[:10, :11].astype(bool))
    # per head: 2-D indices (one row per head) or one flat array
    per_head = BlockSparseMask.from_block_indices(
        np.array([[0, 1, 1, 2], [0, 0, 1, 1]]), np.array([[0, 2], [1, 9]]), 10, 11, 4, 5)
    flat = BlockSparseMask.from_block_indices(
        np.array([[0, 1, 1, 2], [2, 2, 3, 3]]), np.array([0, 2, 1]), 10, 11, 4, 5)
    assert per_head == flat and per_head.shape == (2, 10, 11)
    # duplicates and unsorted indices are fine
    dup = BlockSparseMask.from_block_indices([0, 3, 3, 3], [2, 0, 2], 10, 11, 4, 5)
    np.testing.assert_array_equal(dup.to_dense()[0, :4], np.ones((4, 11), bool) &
                                  ~((np.arange(11) >= 5) & (np.arange(11) < 10))[None])
    # block_indices inverts from_block_indices
    indptr2, indices2 = per_head.block_indices()
    assert BlockSparseMask.from_block_indices(indptr2, indices2, 10, 11, 4, 5) == per_head


def test_or_and():
    a = masks.causal(40, 50, block_q=6, block_kv=7)
    b = masks.local(40, 50, window=3, block_q=6, block_kv=7)
    c = masks.random(40, 50, num_blocks=2, seed=1, num_heads=3, block_q=6, block_kv=7)
    for x, y in ((a, b), (a, c), (c, b), (c, c)):
        np.testing.assert_array_equal((x | y).to_dense(), x.to_dense() | y.to_dense())
        np.testing.assert_array_equal((x & y).to_dense(), x.to_dense() & y.to_dense())
    empty = a & masks.from_function(lambda q, k: k > q, 40, 50, block_q=6, block_kv=7)
    assert empty.num_blocks == 0 and not empty.to_dense().any()


def test_kernel_tables_reproduce_the_mask():
    """Expanding the kernel tables (both orders) gives back the dense mask per kernel row."""
    dense = np.random.default_rng(0).random((4, 70, 150)) < 0.4
    dense[:, :, 64:128] = False  # an empty kernel key tile
    m = BlockSparseMask.from_dense(dense, block_q=5, block_kv=3)
    for group, groups in ((1, 4), (2, 2), (4, 1)):
        positions, keys = max(1, 64 // group), 64
        q_indptr, q_entries, k_indptr, k_entries, pool, pool_t = m.kernel_tables(
            positions, keys, group, groups, rows_padded=positions * group + 3)
        np.testing.assert_array_equal(pool_t[:, :, :positions * group],
                                      pool.transpose(0, 2, 1))
        assert not pool_t[:, :, positions * group:].any()
        nqt, nkt = -(-70 // positions), -(-150 // keys)
        assert pool.shape[1:] == (positions * group, keys)
        assert len({p.tobytes() for p in pool}) == pool.shape[0]  # deduplicated
        for order in ("q", "k"):
            rebuilt = np.zeros((4, 70, 150), bool)
            indptr, entries, n_tiles = ((q_indptr, q_entries, nqt) if order == "q"
                                        else (k_indptr, k_entries, nkt))
            for g in range(groups):
                for tile in range(n_tiles):
                    row = g * n_tiles + tile
                    for other, mid in entries[indptr[row]:indptr[row + 1]]:
                        a, b = (tile, other) if order == "q" else (other, tile)
                        assert b != 1  # the empty key tile is never listed
                        for r in range(positions * group):
                            t, head = a * positions + r // group, g * group + r % group
                            if t >= 70:
                                continue
                            s0, s1 = b * keys, min(150, (b + 1) * keys)
                            vals = True if mid < 0 else pool[mid, r, :s1 - s0]
                            rebuilt[head, t, s0:s1] = vals
            np.testing.assert_array_equal(rebuilt, dense, err_msg=f"{order} G={group}")


def test_shared_mask_tables_for_gqa_replicate_rows():
    m = masks.causal(20, block_q=3, block_kv=3)
    q_indptr, q_entries, _, _, pool, _ = m.kernel_tables(16, 64, 4, 1)
    assert q_indptr.shape == (2 + 1,)
    for p in pool:
        np.testing.assert_array_equal(p[0::4], p[1::4])  # every head of a position alike


# ------------------------------------------------------------------------------ invalid input


def test_invalid_mask_metadata():
    def raises(exc, match, fn, *args, **kw):
        with pytest.raises(exc, match=match):
            fn(*args, **kw)

    f = BlockSparseMask.from_block_indices
    raises(ValueError, "indptr must have shape", f, [0, 1], [0], 10, 10, 4, 4)
    raises(ValueError, "non-decreasing", f, [0, 2, 1, 2], [0, 1], 10, 10, 4, 4)
    raises(ValueError, "non-negative", f, [-1, 0, 0, 0], [0], 10, 10, 4, 4)
    raises(ValueError, "past the end", f, [0, 1, 2, 5], [0, 1], 10, 10, 4, 4)
    raises(ValueError, "out of range", f, [0, 1, 1, 1], [3], 10, 10, 4, 4)
    raises(ValueError, "out of range", f, [0, 1, 1, 1], [-1], 10, 10, 4, 4)
    raises(ValueError, "block_q must be >= 1", f, [0, 1], [0], 10, 10, 0, 4)
    raises(ValueError, "block_kv must be >= 1", f, [0, 1, 1, 1], [0], 10, 10, 4, -2)
    raises(ValueError, "q_len must be >= 1", f, [0], [], 0, 10, 4, 4)
    raises(TypeError, "block_q must be an int", f, [0, 1], [0], 10, 10, 2.5, 4)
    raises(TypeError, "integer array", f, [0.0, 1.0, 1.0, 1.0], [0], 10, 10, 4, 4)
    raises(ValueError, "one row per head", f, np.zeros((2, 4), int), np.zeros((3, 1), int),
           10, 10, 4, 4)
    d = BlockSparseMask.from_dense
    raises(TypeError, "bool", d, np.zeros((4, 4)), block_q=2, block_kv=2)
    raises(ValueError, r"\[T, S\] or \[N, T, S\]", d, np.zeros((1, 1, 4, 4), bool))
    raises(ValueError, "block_q must be >= 1", d, np.zeros((4, 4), bool), block_q=0)
    raises(ValueError, "window left", masks.local, 10, window=(-1, 2))
    raises(ValueError, "global_tokens", masks.global_local, 10, window=1, global_tokens=[12])
    raises(ValueError, "stride must be >= 1", masks.strided, 10, stride=0)
    raises(ValueError, "num_blocks", masks.random, 10, num_blocks=-1, seed=0)
    raises(TypeError, "must return bools", masks.from_function, lambda q, k: q + k, 4)
    # issue 13, item 10: the function, the expected and the returned shape are named
    raises(ValueError, r"mask function .*lambda.* returned shape \(\d+,\) for index arrays of "
           r"broadcast shape \(\d+, \d+\)", masks.from_function,
           lambda q, k: (k <= q).ravel(), 8, block_q=4, block_kv=4)
    raises(ValueError, "num_heads must be >= 1", masks.random, 10, num_blocks=1, seed=0,
           num_heads=0)
    raises(ValueError, "num_heads must be >= 1", masks.from_function, lambda h, q, k: k <= q,
           10, num_heads=0)
    causal_class = lambda q0, q1, k0, k1: np.where(k1 - 1 <= q0, 1, np.where(k0 >= q1, 0, 2))
    raises(ValueError, r"block classifier .*lambda.* returned shape \(3,\) for block bounds "
           r"of broadcast shape \(5, 5\)", masks.from_function, lambda q, k: k <= q, 10,
           block_q=2, block_kv=2, block_class=lambda q0, q1, k0, k1: np.zeros(3, int))
    raises(ValueError, r"must return 0 \(empty\), 1 \(full\) or 2", masks.from_function,
           lambda q, k: k <= q, 10, block_q=2, block_kv=2,
           block_class=lambda q0, q1, k0, k1: causal_class(q0, q1, k0, k1) + 1)
    raises(TypeError, "must return ints", masks.from_function, lambda q, k: k <= q, 10,
           block_class=lambda q0, q1, k0, k1: 0.5 + 0 * q0 * k0)
    raises(TypeError, "block_class must be a function", masks.from_function,
           lambda q, k: k <= q, 10, block_class=2)
    a, b = masks.causal(10, block_q=2, block_kv=2), masks.causal(10, block_q=2, block_kv=5)
    raises(ValueError, "different block_kv", lambda: a | b)
    raises(ValueError, "different q_len", lambda: a & masks.causal(12, 10, block_q=2,
                                                                   block_kv=2))
    h2 = masks.random(10, num_blocks=1, seed=0, num_heads=2, block_q=2, block_kv=2)
    h3 = masks.random(10, num_blocks=1, seed=0, num_heads=3, block_q=2, block_kv=2)
    raises(ValueError, "2 and 3 heads", lambda: h2 | h3)
    with pytest.raises(TypeError):
        a | np.ones((10, 10), bool)


def test_invalid_attention_inputs(rng):
    q, k, v = _inputs(rng, 1, 10, 12, 4, 2, 8, "float32")
    m = masks.causal(10, 12, block_q=4, block_kv=4)
    with pytest.raises(TypeError, match="mask must be a jaxattn.BlockSparseMask"):
        jaxattn.block_sparse_attention(q, k, v, np.ones((10, 12), bool))
    with pytest.raises(ValueError, match="q_len=10, kv_len=12 but query has T=10 and key S=11"):
        jaxattn.block_sparse_attention(q, k[:, :11], v[:, :11], m)
    three = masks.random(10, 12, num_blocks=1, seed=0, num_heads=3)
    with pytest.raises(ValueError, match="mask has 3 heads"):
        jaxattn.block_sparse_attention(q, k, v, three)
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        jaxattn.block_sparse_attention(q[:, :, :3], k, v, m)
    with pytest.raises(TypeError, match="scale"):
        jaxattn.block_sparse_attention(q, k, v, m, scale="big")
    with pytest.raises(ValueError, match="logits_soft_cap"):
        jaxattn.block_sparse_attention(q, k, v, m, logits_soft_cap=-1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        jaxattn.block_sparse_attention(q, k.astype(jnp.bfloat16), v, m)


def test_kernel_rejects_corrupt_tables(rng):
    """The FFI handler re-checks the tables: an error, never a crash or an out-of-range read."""
    from jaxattn import _ffi

    q, k, v = _inputs(rng, 1, 100, 130, 2, 2, 8, "float32")
    m = masks.causal(100, 130, block_q=10, block_kv=10)
    tables = [np.array(x) for x in m.kernel_tables(64, 64, 1, 1)]
    attrs = dict(scale=np.float32(0.3), soft_cap=np.float32(0.0))

    def call(q_indptr, q_entries, pool):
        out = _ffi.sparse_fwd_p.bind(q, k, v, jnp.asarray(q_indptr), jnp.asarray(q_entries),
                                     jnp.asarray(pool), *_ffi.no_tokens(), **attrs)
        jax.block_until_ready(out)

    call(tables[0], tables[1], tables[4])  # as compiled: fine
    bad_tile, bad_mask, bad_order, bad_ptr = (tables[1].copy() for _ in range(4))
    bad_tile[0, 0] = 99
    bad_mask[-1, 1] = 1000
    bad_order[-2:, 0] = bad_order[-1:-3:-1, 0]  # the last row's two key tiles swapped
    cases = [
        ((tables[0], bad_tile, tables[4]), "tile ids"),
        ((tables[0], bad_mask, tables[4]), "mask id"),
        ((tables[0], bad_order, tables[4]), "increasing"),
        ((tables[0] + 1, tables[1], tables[4]), "indptr"),
        ((tables[0][:-1], tables[1], tables[4]), "q_indptr"),
        ((tables[0], tables[1], tables[4][:, :5]), "masks must be bool"),
    ]
    for operands, message in cases:
        with pytest.raises(Exception, match=message):
            call(*operands)
    call(tables[0], tables[1], tables[4])  # the process is still fine

    out, lse = _ffi.sparse_fwd_p.bind(q, k, v, *(jnp.asarray(tables[i]) for i in (0, 1, 4)),
                                      *_ffi.no_tokens(), **attrs)
    residuals = (out, lse, jnp.ones_like(out), jnp.zeros_like(lse))

    def backward(k_entries, pool_t):
        grads = _ffi.sparse_bwd_p.bind(q, k, v, *residuals, *(jnp.asarray(x) for x in (
            tables[0], tables[1], tables[2], k_entries, tables[4], pool_t)), *_ffi.no_tokens(),
            **attrs)
        jax.block_until_ready(grads)

    backward(tables[3], tables[5])
    with pytest.raises(Exception, match="transposed masks"):
        backward(tables[3], tables[5][:, :, :3])
    bad_k = tables[3].copy()
    bad_k[0, 0] = 7
    with pytest.raises(Exception, match="tile ids"):
        backward(bad_k, tables[5])


# ------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("block_q,block_kv", BLOCKS)
def test_block_sizes_vs_oracle(rng, block_q, block_kv):
    dense = rng.random((67, 141)) < 0.35
    dense[:20, 30:] = False  # empty regions
    dense[40:, :70] = True  # full regions
    m = BlockSparseMask.from_dense(dense, block_q=block_q, block_kv=block_kv)
    _check_against_oracle(rng, m, n=2, h=24)


BUILDERS = {
    "causal": lambda t, s: masks.causal(t, s, block_q=16, block_kv=32),
    "local": lambda t, s: masks.local(t, s, window=(20, 5), block_q=8, block_kv=8),
    "global_local": lambda t, s: masks.global_local(t, s, window=(16, 0), global_tokens=7,
                                                    is_causal=True, block_q=32, block_kv=16),
    "strided": lambda t, s: masks.strided(t, s, stride=11, block_q=11, block_kv=11),
    "random": lambda t, s: masks.random(t, s, num_blocks=3, seed=3, block_q=20, block_kv=30),
    "bigbird": lambda t, s: (masks.random(t, s, num_blocks=2, seed=1, block_q=16, block_kv=16) |
                             masks.global_local(t, s, window=16, global_tokens=16, block_q=16,
                                                block_kv=16)),
    "function": lambda t, s: masks.from_function(lambda q, k: (q // 13 + k // 17) % 3 != 0,
                                                 t, s, block_q=13, block_kv=17),
}


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_builders_vs_oracle(rng, builder):
    _check_against_oracle(rng, BUILDERS[builder](150, 201), b=2, n=4, k=2, h=32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision(rng, dtype):
    m = masks.local(130, 130, window=(40, 0), block_q=8, block_kv=24) | masks.random(
        130, 130, num_blocks=1, seed=0, block_q=8, block_kv=24)
    _check_against_oracle(rng, m, n=3, k=1, h=40, dtype=dtype)


def test_soft_cap(rng):
    _check_against_oracle(rng, masks.causal(90, 100, block_q=7, block_kv=9), n=2, h=16,
                          soft_cap=2.0)


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (6, 1)])
def test_per_head_masks(rng, n, k):
    dense = rng.random((n, 77, 96)) < 0.3
    dense[0] = False  # a head that sees nothing
    dense[1, :, :64] = True
    m = BlockSparseMask.from_dense(dense, block_q=6, block_kv=10)
    _check_against_oracle(rng, m, n=n, k=k, h=16)


def test_per_head_builder_combination(rng):
    m = masks.random(64, 64, num_blocks=2, seed=5, num_heads=4, block_q=8, block_kv=8) | \
        masks.causal(64, block_q=8, block_kv=8)
    _check_against_oracle(rng, m, n=4, k=2, h=16)


def test_rows_without_keys(rng):
    dense = np.tri(70, 80, dtype=bool)
    dense[5:30] = False  # rows that see nothing, inside otherwise busy tiles
    dense[64:] = False  # a whole kernel query tile that sees nothing
    m = BlockSparseMask.from_dense(dense, block_q=5, block_kv=5)
    out, lse, dq, dk, dv = _check_against_oracle(rng, m, n=2, h=8)
    assert (_as_np(out)[:, 5:30] == 0).all() and (_as_np(out)[:, 64:] == 0).all()
    assert np.isneginf(_as_np(lse)[:, 5:30]).all()
    assert (_as_np(dq)[:, 5:30] == 0).all() and (_as_np(dq)[:, 64:] == 0).all()
    empty = m & masks.from_function(lambda q, k: k > 1000, 70, 80, block_q=5, block_kv=5)
    out, lse, dq, dk, dv = _check_against_oracle(rng, empty, n=2, h=8)
    assert (_as_np(out) == 0).all() and np.isneginf(_as_np(lse)).all()
    assert all((_as_np(g) == 0).all() for g in (dq, dk, dv))


def test_empty_kernel_tiles_are_never_read(rng):
    """Keys no query sees (a whole kernel key tile, 64 keys) may hold NaN: never loaded."""
    s = 200
    keep = (np.arange(s) < 64) | (np.arange(s) >= 128)
    m = masks.from_function(lambda q, k: keep[k] & (k <= q + 100), 90, s, block_q=9,
                            block_kv=16)
    q, k, v = _inputs(rng, 1, 90, s, 2, 2, 16, "float32")
    poison = jnp.asarray(~keep)[None, :, None, None]
    k_nan, v_nan = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    dout = jnp.asarray(rng.standard_normal((1, 90, 2, 16)), jnp.float32)
    dlse = jnp.zeros((1, 90, 2), jnp.float32)
    clean = _run(q, k, v, m, dout, dlse)
    dirty = _run(q, k_nan, v_nan, m, dout, dlse)
    for name, a, b in zip(("out", "lse", "dq"), dirty, clean):
        _assert_same(a, b, name)
    for name, a, b in zip(("dk", "dv"), dirty[3:], clean[3:]):
        _assert_same(_as_np(a)[:, keep], _as_np(b)[:, keep], name)
        assert (_as_np(a)[:, ~keep] == 0).all()


def test_lse_cotangent_and_value_dim(rng):
    """Gradients through the returned lse, and Hv != H, bitwise as flash."""
    m = masks.global_local(60, 70, window=9, global_tokens=2, block_q=4, block_kv=4)
    q, k, v = _inputs(rng, 2, 60, 70, 4, 2, 16, "float32", hv=24)
    dout = jnp.asarray(rng.standard_normal((2, 60, 4, 24)), jnp.float32)
    dlse = jnp.asarray(rng.standard_normal((2, 60, 4)), jnp.float32)
    got = _run(q, k, v, m, dout, dlse, scale=0.7)
    want = _run_flash(q, k, v, jnp.asarray(m.to_dense()), dout, dlse, scale=0.7)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        _assert_same(a, e, name)


def test_unbatched_and_deterministic(rng):
    m = masks.local(50, window=7, block_q=5, block_kv=5)
    q, k, v = _inputs(rng, 1, 50, 50, 2, 1, 8, "float32")
    batched = jaxattn.block_sparse_attention(q, k, v, m)
    single = jaxattn.block_sparse_attention(q[0], k[0], v[0], m)
    _assert_same(single, batched[0], "unbatched")
    _assert_same(jaxattn.block_sparse_attention(q, k, v, m), batched, "repeat")


def test_jit_static_and_closure(rng):
    m = masks.strided(64, stride=8, block_q=8, block_kv=8)
    q, k, v = _inputs(rng, 1, 64, 64, 2, 2, 8, "float32")
    eager = jaxattn.block_sparse_attention(q, k, v, m)
    static = jax.jit(jaxattn.block_sparse_attention, static_argnums=3)
    _assert_same(static(q, k, v, m), eager, "static_argnums")
    # an equal mask (rebuilt) hits the same cache entry; a different one recompiles
    _assert_same(static(q, k, v, masks.strided(64, stride=8, block_q=8, block_kv=8)), eager,
                 "equal mask")
    other = masks.causal(64, block_q=8, block_kv=8)
    _assert_same(static(q, k, v, other), jaxattn.block_sparse_attention(q, k, v, other),
                 "other mask")
    closure = jax.jit(jax.grad(lambda q: jaxattn.block_sparse_attention(q, k, v, m).sum()))
    _assert_same(closure(q), jax.grad(lambda q: jaxattn.block_sparse_attention(
        q, k, v, m).sum())(q), "jit(grad)")


def test_vmap(rng):
    m = masks.global_local(40, 45, window=4, global_tokens=1, block_q=6, block_kv=6)
    q, k, v = _inputs(rng, 3, 40, 45, 4, 2, 8, "float32")
    f = lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, m)
    expected = f(q, k, v)
    # map over the batch of every operand, or only over the queries with shared K/V
    _assert_same(jax.vmap(f)(q[:, None], k[:, None], v[:, None])[:, 0], expected, "all")
    _assert_same(jax.vmap(f, in_axes=(0, None, None))(q[:, None], k[:1], v[:1])[:, 0],
                 f(q, jnp.broadcast_to(k[:1], k.shape), jnp.broadcast_to(v[:1], v.shape)),
                 "shared kv")
    _assert_same(jax.vmap(f, in_axes=(2, 2, 2), out_axes=2)(q[:, :, None], k[:, :, None],
                                                            v[:, :, None])[:, :, 0],
                 expected, "axis 2")
    # vmap of grad: per-example gradients
    g = jax.grad(lambda q, k, v: (f(q[None], k[None], v[None]) ** 2).sum(), argnums=(0, 1, 2))
    per_example = jax.vmap(g)(q, k, v)
    for i in range(3):
        single = g(q[i], k[i], v[i])
        for name, a, b in zip(("dq", "dk", "dv"), per_example, single):
            _assert_same(a[i], b, f"vmap(grad) {name}[{i}]")


_ISA_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
import jaxattn
from jaxattn import masks, _ffi
assert _ffi.kernel_isa() == "{isa}", _ffi.kernel_isa()
rng = np.random.default_rng(0)
for (t, s, n, k, r, c, dtype) in [(70, 90, 4, 2, 3, 5, "float32"), (130, 65, 2, 1, 16, 64,
                                                                     "bfloat16")]:
    d = rng.random((n, t, s)) < 0.4
    d[:, :20] = False
    d[:, 40:, :30] = True
    m = jaxattn.BlockSparseMask.from_dense(d, block_q=r, block_kv=c)
    q = jnp.asarray(rng.standard_normal((2, t, n, 16)), dtype)
    kk = jnp.asarray(rng.standard_normal((2, s, k, 16)), dtype)
    v = jnp.asarray(rng.standard_normal((2, s, k, 16)), dtype)
    do = jnp.asarray(rng.standard_normal((2, t, n, 16)), dtype)
    runs = []
    for fn in (lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, m, logits_soft_cap=3.0),
               lambda q, k, v: jaxattn.flash_attention(q, k, v, mask=m.to_dense(),
                                                       logits_soft_cap=3.0)):
        out, vjp = jax.vjp(fn, q, kk, v)
        runs.append([np.asarray(x.astype(jnp.float32)) for x in (out, *vjp(do))])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
print("ok")
"""


@pytest.mark.parametrize("isa", ["amx", "avx512bf16", "avx512", "avx2", "generic"])
def test_other_instruction_sets(isa):
    """The amx (bf16 on AMX tiles), avx512bf16 (bf16 pairs), avx512 (bf16 widened to f32),
    avx2 and generic kernels (another vector width in the mask code) in a subprocess."""
    reason = isa_skip_reason(isa)
    if reason:
        pytest.skip(reason)
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.replace("{isa}", isa)],
                            env=python_env(JAXATTN_ISA=isa), cwd=CWD, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ------------------------------------------------- issue 13: costs that follow the blocks


def _structured_cases(rng, count):
    """(name, mask, dense definition) for random shapes, block sizes and parameters."""
    for it in range(count):
        t, s = int(rng.integers(1, 100)), int(rng.integers(1, 100))
        r, c = int(rng.integers(1, 17)), int(rng.integers(1, 17))
        q, k = np.arange(t)[:, None], np.arange(s)[None, :]
        kind = it % 4
        if kind == 0:
            yield "causal", masks.causal(t, s, block_q=r, block_kv=c), k <= q
        elif kind == 1:
            left, right = int(rng.integers(0, 120)), int(rng.integers(0, 120))
            yield ("local", masks.local(t, s, window=(left, right), block_q=r, block_kv=c),
                   (k >= q - left) & (k <= q + right))
        elif kind == 2:
            left, right = int(rng.integers(0, 30)), int(rng.integers(0, 30))
            causal = bool(rng.integers(0, 2))
            positions = rng.choice(min(t, s), size=min(int(rng.integers(0, 4)), min(t, s)),
                                   replace=False)
            tokens = int(rng.integers(0, min(t, s) + 1)) if rng.integers(0, 2) else [
                int(x) for x in positions]
            g = np.zeros(max(t, s), bool)
            g[np.arange(tokens) if isinstance(tokens, int) else tokens] = True
            want = ((k >= q - left) & (k <= q + right)) | g[q] | g[k]
            yield ("global_local", masks.global_local(t, s, window=(left, right),
                                                      global_tokens=tokens, is_causal=causal,
                                                      block_q=r, block_kv=c),
                   want & (k <= q) if causal else want)
        else:
            stride, causal = int(rng.integers(1, 110)), bool(rng.integers(0, 2))
            want = (q // stride == k // stride) | ((q - k) % stride == 0)
            yield ("strided", masks.strided(t, s, stride=stride, is_causal=causal, block_q=r,
                                            block_kv=c), want & (k <= q) if causal else want)


def test_structured_builders_match_their_definitions_on_random_shapes(rng):
    """The closed forms per block (which blocks, full or not, which share a pattern) give
    exactly the dense definition, in the canonical form from_dense gives."""
    for name, m, want in _structured_cases(rng, 240):
        np.testing.assert_array_equal(m.to_dense()[0], want, err_msg=f"{name} {m}")
        assert m == BlockSparseMask.from_dense(want, block_q=m.block_q, block_kv=m.block_kv)


def test_kernel_tables_agree_on_every_path(rng, monkeypatch):
    """Tables compiled per block (in bands of query tile rows, pattern signatures looked up
    once), from blocks of whole tiles (split once per pattern and clipping, expanded in
    order) and through the dense mask (tiny blocks) are identical."""
    for it in range(80):
        n = int(rng.choice([1, 2, 4]))
        t, s = int(rng.integers(1, 80)), int(rng.integers(1, 80))
        dense = rng.random((n, t, s)) < rng.choice([0.05, 0.4, 1.0])
        dense |= np.tri(t, s, dtype=bool) & bool(rng.integers(0, 2))
        tq, tk = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        if it % 2:  # blocks of whole tiles (the aligned path)
            tq, tk = int(rng.integers(1, 9)), int(rng.integers(1, 9))
            r, c = tq * int(rng.integers(1, 4)), tk * int(rng.integers(1, 4))
        else:
            r, c = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        m = BlockSparseMask.from_dense(dense, block_q=r, block_kv=c)
        if n == 1:
            group, groups = int(rng.integers(1, 4)), 1
        else:
            group = int(rng.choice([1, n // 2]))
            groups = n // group
        # per block: a band of query tile rows at a time (tiny bands here, to cross them)
        monkeypatch.setattr(_mask_tables, "_TABLE_BLOCKS_PER_BAND", int(rng.choice([3, 1 << 16])))
        monkeypatch.setattr(_mask_tables, "_BLOCKS_PER_CHUNK", int(rng.choice([1, 5, 1 << 20])))
        by_tiles = _mask_tables._compile_by_tiles(m, tq, tk, group, groups)
        paths = {"dense": _mask_tables._compile_from_dense(m, tq, tk, group, groups),
                 "public": _mask_tables.compile_tables(m, tq, tk, group, groups)}
        if r % tq == 0 and c % tk == 0 and (group == 1 or n == 1):
            paths["aligned"] = _mask_tables._compile_aligned(m, tq, tk, group, groups)
        for name, tables in paths.items():
            for x, y in zip(tables, by_tiles):
                assert x.dtype == y.dtype and x.shape == y.shape, f"case {it} {name}"
                np.testing.assert_array_equal(x, y, err_msg=f"case {it} {name}")
    # long block rows (entries written one row slice at a time), GQA groups, clipped ends
    for m, group in ((masks.causal(4100, block_q=128, block_kv=128), 1),
                     (masks.strided(3000, 2900, stride=200, block_q=64, block_kv=128), 2),
                     (masks.local(5000, window=(700, 30), block_q=128, block_kv=64), 4)):
        want = _mask_tables._compile_by_tiles(m, 64 // group, 64, group, 1)
        for x, y in zip(_mask_tables.compile_tables(m, 64 // group, 64, group, 1), want):
            np.testing.assert_array_equal(x, y, err_msg=repr(m))


@pytest.mark.parametrize("builder", ["causal", "local", "global_local", "strided"])
def test_structured_builders_evaluate_blocks_not_all_pairs(monkeypatch, builder):
    """Issue 13, item 8: the builders evaluated every (q, k) pair (T x S); now a few blocks per
    distinct pattern. Counted at T = S = 16384 in 64 x 64 blocks: T x S is 268M pairs."""
    evaluated = []
    real = masks._call_predicate

    def counting(f, *index):
        out = real(f, *index)
        evaluated.append(out.size)
        return out

    monkeypatch.setattr(masks, "_call_predicate", counting)
    t = 16384
    make = {"causal": lambda: masks.causal(t),
            "local": lambda: masks.local(t, window=256),
            "global_local": lambda: masks.global_local(t, window=256, global_tokens=64,
                                                       is_causal=True),
            "strided": lambda: masks.strided(t, stride=256)}[builder]
    m = make()
    assert sum(evaluated) <= 16 * t * 64, f"{builder}: {sum(evaluated)} pairs evaluated"
    # ... and the kernel tables of the mask reproduce it (spot check of a few tiles).
    positions, _, keys, rows_padded = jaxattn._ffi.block_sparse_tiling(1)
    q_indptr, q_entries, _, _, pool, _ = m.kernel_tables(positions, keys, 1, 1, rows_padded)
    dense_rows = m._lookup(np.zeros((1, 1), np.int64), np.arange(positions)[:, None] + 2048,
                           np.arange(t)[None, :])
    row_tile = 2048 // positions
    tiles = dict((int(e[0]), int(e[1])) for e in q_entries[q_indptr[row_tile]:
                                                           q_indptr[row_tile + 1]])
    for b in range(t // keys):
        got = dense_rows[:, b * keys:(b + 1) * keys]
        if b not in tiles:
            assert not got.any()
        elif tiles[b] < 0:
            assert got.all()
        else:
            np.testing.assert_array_equal(pool[tiles[b]], got)


def _peak_bytes(fn):
    import tracemalloc
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_one_by_one_blocks_memory_follows_the_dense_mask(rng):
    """Issue 13, item 9: from_dense with 1x1 blocks and its kernel tables used ~70x the dense
    bool mask (per-block int64 bookkeeping); now a small multiple of it."""
    dense = rng.random((2048, 2048)) < 0.3
    positions, _, keys, rows_padded = jaxattn._ffi.block_sparse_tiling(1)

    def build():
        m = BlockSparseMask.from_dense(dense, block_q=1, block_kv=1)
        m.kernel_tables(positions, keys, 1, 1, rows_padded)
        return m

    m, peak = _peak_bytes(build)
    # (8.6x before the all-full block ids became a broadcast view; 6.4x measured)
    assert peak <= 8 * dense.nbytes, f"{peak / dense.nbytes:.1f}x the dense mask"
    np.testing.assert_array_equal(m.to_dense()[0], dense)
    again = pickle.loads(pickle.dumps(m))  # the broadcast ids survive a round trip
    assert again == m and hash(again) == hash(m)
    np.testing.assert_array_equal(again.to_dense()[0], dense)
    small = BlockSparseMask.from_dense(dense[:100, :90], block_q=1, block_kv=1)
    assert small == BlockSparseMask.from_dense(dense[:100, :90], block_q=1, block_kv=1)
    np.testing.assert_array_equal(small.with_block_size(7, 5).to_dense()[0], dense[:100, :90])


def test_random_blocks_cost_follows_the_blocks_drawn():
    """random drew a key for every block of the grid (4096 x 4096 here: 270 MB); now only
    the blocks it keeps."""
    m, peak = _peak_bytes(lambda: masks.random(2**16, num_blocks=3, seed=0, block_q=16,
                                               block_kv=16))
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB"
    indptr, indices = m.block_indices()
    assert (np.diff(indptr[0]) == 3).all()


def test_or_and_on_random_masks_equal_the_dense_combination(rng):
    """| and & combine each distinct pair of block patterns once (clipping included), and
    give the canonical mask of the combined dense masks."""
    for it in range(120):
        t, s = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        r, c = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        na, nb = (int(x) for x in rng.choice([1, 3], 2))
        da = rng.random((na, t, s)) < rng.choice([0.1, 0.5, 0.95])
        db = rng.random((nb, t, s)) < rng.choice([0.1, 0.5, 0.95])
        da |= np.tri(t, s, dtype=bool) & bool(rng.integers(0, 2))
        a = BlockSparseMask.from_dense(da, block_q=r, block_kv=c)
        b = BlockSparseMask.from_dense(db, block_q=r, block_kv=c)
        for got, want in ((a | b, da | db), (a & b, da & db)):
            want = want if want.shape[0] > 1 else want[0]
            assert got == BlockSparseMask.from_dense(want, block_q=r, block_kv=c), it


def _window_class(left: int, right: int):
    """The block classifier of keys q - left <= k <= q + right (bounds are half-open)."""
    def classify(q0, q1, k0, k1):
        full = (k0 >= q1 - 1 - left) & (k1 - 1 <= q0 + right)
        empty = (k1 - 1 < q0 - left) | (k0 > q1 - 1 + right)
        return np.where(full, masks.BLOCK_FULL,
                        np.where(empty, masks.BLOCK_EMPTY, masks.BLOCK_PARTIAL))
    return classify


def test_from_function_with_a_block_classifier_equals_the_full_evaluation(rng):
    """Issue 13, item 8: with block_class, f runs on the partial blocks only, and the mask is
    the one evaluating every pair gives (shared and per head, any block size)."""
    for it in range(40):
        t, s = int(rng.integers(1, 70)), int(rng.integers(1, 70))
        r, c = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        left, right = (int(x) for x in rng.integers(0, 12, 2))
        f = lambda q, k: (k >= q - left) & (k <= q + right) & ((q + k) % 3 != 0)
        # f is not the window: the window's full blocks are only partial for it
        not_full = lambda *b: np.where(_window_class(left, right)(*b) == masks.BLOCK_EMPTY,
                                       masks.BLOCK_EMPTY, masks.BLOCK_PARTIAL)
        fast = masks.from_function(f, t, s, block_q=r, block_kv=c, block_class=not_full)
        assert fast == masks.from_function(f, t, s, block_q=r, block_kv=c), it
        window = lambda q, k: (k >= q - left) & (k <= q + right)
        assert masks.from_function(window, t, s, block_q=r, block_kv=c,
                                   block_class=_window_class(left, right)) == masks.local(
                                       t, s, window=(left, right), block_q=r, block_kv=c), it
        per_head = lambda h, q, k: (k >= q - left - h) & (k <= q + right)
        per_head_class = lambda h, q0, q1, k0, k1: _window_class(left + h, right)(q0, q1, k0, k1)
        assert masks.from_function(per_head, t, s, num_heads=3, block_q=r, block_kv=c,
                                   block_class=per_head_class) == masks.from_function(
                                       per_head, t, s, num_heads=3, block_q=r, block_kv=c), it


def test_from_function_with_a_block_classifier_evaluates_only_partial_blocks(monkeypatch):
    """At T = S = 16384 in 64 x 64 blocks a causal window evaluates its diagonal blocks'
    elements, not the 268M pairs."""
    evaluated = []
    real = masks._call_predicate

    def counting(f, *index):
        out = real(f, *index)
        evaluated.append(out.size)
        return out

    monkeypatch.setattr(masks, "_call_predicate", counting)
    t = 16384
    m = masks.from_function(lambda q, k: (k <= q) & (k >= q - 300), t,
                            block_class=_window_class(300, 0))
    assert sum(evaluated) <= 3 * t * 64, f"{sum(evaluated)} pairs evaluated"
    monkeypatch.setattr(masks, "_call_predicate", real)
    assert m == masks.local(t, window=(300, 0))


def test_kernel_tables_of_empty_and_clipped_masks():
    """No block at all, and masks whose every block is clipped at a sequence end, on every
    table path."""
    empty = BlockSparseMask.from_dense(np.zeros((130, 200), bool), block_q=64, block_kv=64)
    tiny = masks.causal(5, 3, block_q=64, block_kv=64)  # one block, clipped both ways
    for m in (empty, tiny):
        want = _mask_tables._compile_by_tiles(m, 32, 64, 2, 1)
        for got in (_mask_tables._compile_aligned(m, 32, 64, 2, 1),
                    _mask_tables._compile_from_dense(m, 32, 64, 2, 1)):
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x, y, err_msg=repr(m))
    assert _mask_tables.compile_tables(empty, 64, 64, 1, 1)[1].shape == (0, 2)


def test_stable_argsort_equals_numpys(rng):
    """The radix argsort behind the key-major tables (one or two 16-bit passes) is NumPy's
    stable argsort."""
    for bound in (7, 1 << 16, (1 << 16) + 1, 1 << 20, 1 << 33):
        key = rng.integers(0, bound, 5000)
        np.testing.assert_array_equal(_mask_tables._stable_argsort(key, bound),
                                      np.argsort(key, kind="stable"), err_msg=str(bound))
