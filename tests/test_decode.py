"""Tests of decode_attention, paged_decode_attention and merge_attention_states.

Decoding maps to the float64 oracle (tests/oracle.py) as plain attention over the whole cache
with a dense mask: query token t of sequence b sits at position len_b - T + t and sees cache
keys j <= that position (and j >= position - window_left).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from _subprocess import CWD, python_env
from oracle import (
    assert_close_to_oracle,
    attention_reference,
    attention_reference_grad,
    decode_visibility,
    naive_low_precision,
)


# The oracle's comparison subtracts -inf from -inf for rows that see nothing (and masks it).
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered in subtract:RuntimeWarning")


# ------------------------------------------------------------------------------------ helpers


def decode_mask(lengths, q_len: int, kv_len: int, window_left: int | None = None) -> np.ndarray:
    """The visibility of decoding as a dense bool mask [B, 1, T, S] (lengths clamped)."""
    return decode_visibility(lengths, q_len, kv_len,
                             None if window_left is None else (window_left, 0))


def make_inputs(rng, batch, q_len, kv_len, heads, kv_heads, head_dim, value_dim=None,
                dtype=np.float32):
    value_dim = value_dim or head_dim
    normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
    return (normal(batch, q_len, heads, head_dim), normal(batch, kv_len, kv_heads, head_dim),
            normal(batch, kv_len, kv_heads, value_dim))


def check_against_oracle(q, k, v, lengths, *, window=None, soft_cap=None, out=None, lse=None,
                         dtype=np.float32):
    """Compares (out, lse) with the oracle (and the naive low-precision error for 16 bits)."""
    window_left = window if window is None or isinstance(window, int) else window[0]
    mask = decode_mask(lengths, q.shape[1], k.shape[1], window_left)
    ref_out, ref_lse = attention_reference(q, k, v, mask=mask, logits_soft_cap=soft_cap)
    naive_out = None
    if np.dtype(dtype) != np.float32:
        naive_out, _ = naive_low_precision(q, k, v, dtype, mask=mask, logits_soft_cap=soft_cap)
    assert out.dtype == q.dtype
    assert_close_to_oracle(out, ref_out, naive_out, dtype=dtype, name="out")
    # The lse is computed in f32 from exact products of the (already rounded) inputs.
    assert_close_to_oracle(lse, ref_lse, dtype=np.float32, name="lse")


def paged_layout(rng, key_cache, value_cache, page_size, extra_pages=3, fill=np.nan):
    """Scatters a contiguous cache into a shuffled page pool.

    Returns (key_pages, value_pages, block_tables). Rows past the cache end and the extra
    (unused) pages hold ``fill``.
    """
    batch, kv_len = key_cache.shape[:2]
    per_seq = -(-kv_len // page_size)
    num_pages = batch * per_seq + extra_pages
    perm = rng.permutation(num_pages)[: batch * per_seq].reshape(batch, per_seq)
    pool_k = np.full((num_pages, page_size) + key_cache.shape[2:], fill, key_cache.dtype)
    pool_v = np.full((num_pages, page_size) + value_cache.shape[2:], fill, value_cache.dtype)
    for b in range(batch):
        for i in range(per_seq):
            rows = slice(i * page_size, min(kv_len, (i + 1) * page_size))
            n = rows.stop - rows.start
            pool_k[perm[b, i], :n] = key_cache[b, rows]
            pool_v[perm[b, i], :n] = value_cache[b, rows]
    return pool_k, pool_v, perm.astype(np.int32)


def run_decode(q, k, v, lengths, **kw):
    out, lse = jaxattn.decode_attention(q, k, v, lengths, return_residual=True, **kw)
    return np.asarray(out), np.asarray(lse)


# ---------------------------------------------------------------------- contiguous decoding


@pytest.mark.parametrize("q_len", [1, 2, 4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (16, 2), (8, 1)],
                         ids=["mha", "gqa4", "gqa8", "mqa"])
def test_matches_oracle(rng, q_len, heads, kv_heads):
    kv_len = 97
    q, k, v = make_inputs(rng, 4, q_len, kv_len, heads, kv_heads, 64)
    lengths = np.array([kv_len, 1, 33, 64], np.int32)  # full, 1, 32+1, 64
    out, lse = run_decode(q, k, v, lengths)
    check_against_oracle(q, k, v, lengths, out=out, lse=lse)


@pytest.mark.parametrize("page", [16, 64])
def test_lengths_around_block_boundaries(rng, page):
    kv_len = 4 * page + 5
    lengths = np.array([1, page - 1, page, page + 1, 2 * page - 1, 2 * page + 1, kv_len - 1,
                        kv_len], np.int32)
    q, k, v = make_inputs(rng, len(lengths), 2, kv_len, 8, 2, 32)
    out, lse = run_decode(q, k, v, lengths)
    check_against_oracle(q, k, v, lengths, out=out, lse=lse)


def test_short_and_out_of_range_lengths(rng):
    """Lengths are clamped to [0, Smax]; rows at negative positions see nothing (0, -inf)."""
    kv_len, q_len = 20, 4
    lengths = np.array([0, 2, -5, 3, 10**6, kv_len], np.int32)
    q, k, v = make_inputs(rng, len(lengths), q_len, kv_len, 4, 2, 32)
    for x in (q, k, v):
        x[4] = x[5]
    out, lse = run_decode(q, k, v, lengths)
    check_against_oracle(q, k, v, lengths, out=out, lse=lse)
    # Length 2 with T = 4: tokens 0 and 1 sit at positions -2, -1 and see nothing.
    assert np.all(out[1, :2] == 0) and np.all(lse[1, :2] == -np.inf)
    assert np.all(np.isfinite(lse[1, 2:]))
    assert np.all(out[0] == 0) and np.all(out[2] == 0)
    np.testing.assert_array_equal(out[4], out[5])  # clamped to Smax


@pytest.mark.parametrize("window", [0, 1, 5, (7, 3), 1000])
def test_local_window(rng, window):
    kv_len = 150
    lengths = np.array([150, 40, 3, 77], np.int32)
    q, k, v = make_inputs(rng, 4, 4, kv_len, 8, 2, 32)
    out, lse = run_decode(q, k, v, lengths, local_window_size=window)
    check_against_oracle(q, k, v, lengths, window=window, out=out, lse=lse)


@pytest.mark.parametrize("soft_cap", [0.5, 5.0, 50.0])
def test_soft_cap(rng, soft_cap):
    kv_len = 70
    lengths = np.array([70, 35], np.int32)
    q, k, v = make_inputs(rng, 2, 2, kv_len, 4, 2, 64)
    q *= 3  # large logits, so the cap matters
    out, lse = run_decode(q, k, v, lengths, logits_soft_cap=soft_cap)
    check_against_oracle(q, k, v, lengths, soft_cap=soft_cap, out=out, lse=lse)


@pytest.mark.parametrize("head_dim,value_dim", [(16, 16), (40, 40), (80, 80), (128, 128),
                                                (256, 256), (64, 96), (96, 40)])
def test_head_dims(rng, head_dim, value_dim):
    lengths = np.array([45, 17], np.int32)
    q, k, v = make_inputs(rng, 2, 3, 45, 4, 1, head_dim, value_dim)
    out, lse = run_decode(q, k, v, lengths)
    check_against_oracle(q, k, v, lengths, out=out, lse=lse)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("soft_cap,window", [(None, None), (20.0, 9)])
def test_low_precision(rng, dtype, soft_cap, window):
    kv_len = 300
    lengths = np.array([300, 129, 1], np.int32)
    q, k, v = make_inputs(rng, 3, 4, kv_len, 8, 2, 80, dtype=dtype)
    out, lse = run_decode(q, k, v, lengths, logits_soft_cap=soft_cap, local_window_size=window)
    check_against_oracle(q, k, v, lengths, window=window, soft_cap=soft_cap, out=out, lse=lse,
                         dtype=dtype)


def test_split_partitions(rng):
    """Long caches are cut into partitions that are merged: a few lengths inside, between and
    exactly at partition boundaries (including partitions left empty)."""
    kv_len = 4096
    lengths = np.array([4096, 2500, 256, 257, 1], np.int32)
    q, k, v = make_inputs(rng, len(lengths), 2, kv_len, 4, 1, 32)
    out, lse = run_decode(q, k, v, lengths)
    check_against_oracle(q, k, v, lengths, out=out, lse=lse)


def test_split_partitions_with_window_and_cap(rng):
    kv_len = 3000
    lengths = np.array([3000, 1800], np.int32)
    q, k, v = make_inputs(rng, 2, 3, kv_len, 2, 1, 64, dtype=jnp.bfloat16)
    out, lse = run_decode(q, k, v, lengths, local_window_size=700, logits_soft_cap=30.0)
    check_against_oracle(q, k, v, lengths, window=700, soft_cap=30.0, out=out, lse=lse,
                         dtype=jnp.bfloat16)


@pytest.mark.parametrize("kv_len", [50, 2000])
def test_nan_beyond_lengths_is_never_read(rng, kv_len):
    lengths = np.array([kv_len // 2, 1, kv_len - 3], np.int32)
    q, k, v = make_inputs(rng, 3, 2, kv_len, 4, 2, 32)
    k_nan, v_nan = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        k_nan[b, n:] = np.nan
        v_nan[b, n:] = np.nan
    out, lse = run_decode(q, k_nan, v_nan, lengths)
    assert np.all(np.isfinite(out))
    check_against_oracle(q, k, v, lengths, out=out, lse=lse)


def test_jit_and_repeatability(rng):
    q, k, v = make_inputs(rng, 2, 2, 600, 8, 2, 64)
    lengths = np.array([600, 311], np.int32)
    f = jax.jit(lambda *a: jaxattn.decode_attention(*a, return_residual=True))
    out1, lse1 = f(q, k, v, lengths)
    out2, lse2 = f(q, k, v, lengths)
    out3, lse3 = run_decode(q, k, v, lengths)
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
    np.testing.assert_array_equal(np.asarray(out1), out3)
    np.testing.assert_array_equal(np.asarray(lse1), lse3)
    check_against_oracle(q, k, v, lengths, out=np.asarray(out1), lse=np.asarray(lse1))


def test_vmap(rng):
    """vmap over everything, over the query only (shared cache), and with in_axes != 0."""
    q, k, v = make_inputs(rng, 6, 2, 90, 4, 2, 32)
    q, k, v = (x.reshape((3, 2) + x.shape[1:]) for x in (q, k, v))
    lengths = np.array([[90, 5], [44, 1], [60, 90]], np.int32)
    f = lambda q, k, v, l: jaxattn.decode_attention(q, k, v, l, return_residual=True)
    out, lse = jax.vmap(f)(q, k, v, lengths)
    for i in range(3):
        ref = run_decode(q[i], k[i], v[i], lengths[i])
        np.testing.assert_array_equal(np.asarray(out[i]), ref[0])
        np.testing.assert_array_equal(np.asarray(lse[i]), ref[1])
    out, lse = jax.vmap(f, in_axes=(0, None, None, None))(q, k[0], v[0], lengths[0])
    for i in range(3):
        ref = run_decode(q[i], k[0], v[0], lengths[0])
        np.testing.assert_array_equal(np.asarray(out[i]), ref[0])
    out = jax.vmap(lambda q, k: jaxattn.decode_attention(q, k, v[1], lengths[1]),
                   in_axes=(2, None), out_axes=1)(np.moveaxis(q, 0, 2), k[1])
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(out[:, i]),
                                      run_decode(q[i], k[1], v[1], lengths[1])[0])


def test_not_differentiable(rng):
    q, k, v = make_inputs(rng, 1, 1, 10, 2, 1, 16)
    lengths = np.array([10], np.int32)
    with pytest.raises(NotImplementedError, match="no gradient"):
        jax.grad(lambda q: jaxattn.decode_attention(q, k, v, lengths).sum())(q)
    with pytest.raises(NotImplementedError, match="no gradient"):
        pages = k.reshape(2, 5, 1, 16)
        jax.grad(lambda k: jaxattn.paged_decode_attention(
            q, k, pages, np.array([[0, 1]], np.int32), lengths).sum())(pages)


def test_bad_inputs(rng):
    q, k, v = make_inputs(rng, 2, 2, 10, 4, 2, 16)
    lengths = np.array([10, 10], np.int32)
    bad = [
        (dict(query=q[:, :, :, :, None]), ValueError, "query"),
        (dict(query=np.zeros((2, 0, 4, 16), np.float32)), ValueError, "at least one token"),
        (dict(query_lengths=np.array([1, 2, 3])), ValueError, "query_lengths"),
        (dict(query=q.astype(np.int32)), TypeError, "query"),
        (dict(key_cache=k.astype(jnp.bfloat16)), TypeError, "dtype"),
        (dict(key_cache=k[:, :, :1].repeat(3, 2), value_cache=v[:, :, :1].repeat(3, 2)),
         ValueError, "multiple"),
        (dict(key_cache=k[:1], value_cache=v[:1]), ValueError, "batch"),
        (dict(value_cache=v[:, :5]), ValueError, "value_cache"),
        (dict(key_cache=k[..., :8]), ValueError, "head dim"),
        (dict(kv_lengths=lengths[:1]), ValueError, "kv_lengths"),
        (dict(kv_lengths=lengths.astype(np.float32)), TypeError, "kv_lengths"),
    ]
    base = dict(query=q, key_cache=k, value_cache=v, kv_lengths=lengths)
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            jaxattn.decode_attention(**{**base, **change})
    with pytest.raises(ValueError, match="local_window_size"):
        jaxattn.decode_attention(q, k, v, lengths, local_window_size=-1)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        jaxattn.decode_attention(q, k, v, lengths, logits_soft_cap=0.0)
    pages = k.reshape(4, 5, 2, 16)
    with pytest.raises(ValueError, match="block_tables"):
        jaxattn.paged_decode_attention(q, pages, pages, np.zeros((3, 2), np.int32), lengths)
    with pytest.raises(TypeError, match="block_tables"):
        jaxattn.paged_decode_attention(q, pages, pages, np.zeros((2, 2), np.float32), lengths)


# --------------------------------------------------------------------------- paged decoding


@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
def test_paged_matches_oracle_and_contiguous(rng, page_size):
    kv_len = 3 * 64  # a multiple of every page size but 7
    lengths = np.array([kv_len, page_size - 1 or 1, page_size, page_size + 1, 100], np.int32)
    q, k, v = make_inputs(rng, len(lengths), 2, kv_len, 8, 2, 32)
    pool_k, pool_v, tables = paged_layout(rng, k, v, page_size)
    out, lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                              return_residual=True)
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(np.isfinite(out))  # the NaN padding and spare pages are never read
    check_against_oracle(q, k, v, lengths, out=out, lse=lse)
    ref_out, ref_lse = run_decode(q, k, v, lengths)
    if kv_len % page_size == 0:
        # Same capacity, same partitions, same keys in the same order: the same bits.
        np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(lse, ref_lse)
    else:
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_paged_low_precision_long(rng, dtype):
    kv_len = 2048  # split into partitions
    lengths = np.array([2048, 1000], np.int32)
    q, k, v = make_inputs(rng, 2, 4, kv_len, 4, 1, 64, dtype=dtype)
    pool_k, pool_v, tables = paged_layout(rng, k, v, 16)
    out, lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                              local_window_size=1500, logits_soft_cap=40.0,
                                              return_residual=True)
    check_against_oracle(q, k, v, lengths, window=1500, soft_cap=40.0, out=np.asarray(out),
                         lse=np.asarray(lse), dtype=dtype)
    ref = run_decode(q, k, v, lengths, local_window_size=1500, logits_soft_cap=40.0)
    np.testing.assert_array_equal(np.asarray(out), ref[0])


def test_paged_shared_pages_and_unused_table_entries(rng):
    """Two sequences share a prefix page; entries past the length may hold anything."""
    page_size, heads = 8, 4
    pool_k = rng.standard_normal((5, page_size, 2, 32)).astype(np.float32)
    pool_v = rng.standard_normal((5, page_size, 2, 32)).astype(np.float32)
    tables = np.array([[3, 0, -1, 99], [3, 4, 1, -7]], np.int32)
    lengths = np.array([13, 24], np.int32)
    q = rng.standard_normal((2, 1, heads, 32)).astype(np.float32)
    out, lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                              return_residual=True)
    for b in range(2):
        used = tables[b, : -(-lengths[b] // page_size)]
        k = pool_k[used].reshape(1, -1, 2, 32)
        v = pool_v[used].reshape(1, -1, 2, 32)
        check_against_oracle(q[b:b + 1], k, v, lengths[b:b + 1], out=np.asarray(out[b:b + 1]),
                             lse=np.asarray(lse[b:b + 1]))


@pytest.mark.parametrize("bad_page", [-1, 5, 2**31 - 1])
def test_paged_bad_page_id_is_an_error(rng, bad_page):
    pool = rng.standard_normal((5, 4, 1, 16)).astype(np.float32)
    q = rng.standard_normal((1, 1, 2, 16)).astype(np.float32)
    tables = np.array([[0, 1, bad_page, 2]], np.int32)
    with pytest.raises(Exception, match="page id"):
        jax.block_until_ready(
            jaxattn.paged_decode_attention(q, pool, pool, tables, np.array([9], np.int32)))
    # The same table is fine when the bad entry lies past the length (8 keys = 2 pages).
    out = jaxattn.paged_decode_attention(q, pool, pool, tables, np.array([8], np.int32))
    assert np.all(np.isfinite(np.asarray(out)))
    # Lengths past the table's capacity (4 pages x 4) are clamped to it, then checked.
    with pytest.raises(Exception, match="page id"):
        jax.block_until_ready(
            jaxattn.paged_decode_attention(q, pool, pool, tables, np.array([10**6], np.int32)))


def test_paged_vmap(rng):
    page_size = 4
    q, k, v = make_inputs(rng, 6, 2, 24, 4, 2, 16)
    lengths = np.array([24, 3, 17, 9, 1, 24], np.int32)
    pool_k, pool_v, tables = paged_layout(rng, k, v, page_size, fill=0.0)
    f = lambda q, kp, vp, t, l: jaxattn.paged_decode_attention(q, kp, vp, t, l)
    full = run_decode(q, k, v, lengths)[0]
    # Shared pool, mapped queries/tables/lengths.
    out = jax.vmap(f, in_axes=(0, None, None, 0, 0))(
        q.reshape(3, 2, 2, 4, 16), pool_k, pool_v, tables.reshape(3, 2, -1), lengths.reshape(3, 2))
    np.testing.assert_array_equal(np.asarray(out).reshape(full.shape), full)
    # One pool per vmapped instance (here the same pool twice, one table), and bad ids stay bad.
    out = jax.vmap(f, in_axes=(0, 0, 0, None, None))(
        np.stack([q, q]), np.stack([pool_k, pool_k]), np.stack([pool_v, pool_v]), tables, lengths)
    np.testing.assert_array_equal(np.asarray(out[1]), full)
    bad = tables.copy()
    bad[0, 0] = pool_k.shape[0]  # would be a valid id in the concatenated pool
    with pytest.raises(Exception, match="page id"):
        jax.block_until_ready(jax.vmap(f, in_axes=(0, 0, 0, None, None))(
            np.stack([q, q]), np.stack([pool_k, pool_k]), np.stack([pool_v, pool_v]), bad,
            lengths))


# ---------------------------------------------------------------- thread-count invariance

_THREAD_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax, jax.numpy as jnp
    import jaxattn
    rng = np.random.default_rng(0)
    outs = []
    for dtype, (b, t, s, n, k, h) in [(np.float32, (1, 1, 8192, 8, 2, 64)),
                                      (jnp.bfloat16, (3, 4, 3008, 4, 4, 80)),
                                      (np.float32, (2, 16, 2048, 16, 2, 32))]:
        q = rng.standard_normal((b, t, n, h)).astype(dtype)
        kc = rng.standard_normal((b, s, k, h)).astype(dtype)
        vc = rng.standard_normal((b, s, k, h)).astype(dtype)
        lengths = rng.integers(s // 2, s + 1, size=b).astype(np.int32)
        out, lse = jaxattn.decode_attention(q, kc, vc, lengths, return_residual=True,
                                            logits_soft_cap=30.0)
        outs += [np.asarray(out).view(np.uint8).ravel(), np.asarray(lse).view(np.uint8).ravel()]
        pk, pv = kc.reshape(-1, 16, k, h), vc.reshape(-1, 16, k, h)
        per = s // 16
        tables = (np.arange(b)[:, None] * per + np.arange(per)[None, :]).astype(np.int32)
        out = jaxattn.paged_decode_attention(q, pk, pv, tables, lengths)
        outs.append(np.asarray(out).view(np.uint8).ravel())
    # Quantized caches (int8: integer dot products; float8: conversions in registers).
    b, t, s, n, k, h = 2, 3, 4096, 8, 2, 72
    q = rng.standard_normal((b, t, n, h)).astype(jnp.bfloat16)
    for cache in (jnp.int8, jnp.float8_e4m3fn):
        kq, ks = jaxattn.quantize_kv(rng.standard_normal((b, s, k, h)).astype(np.float32), cache)
        vq, vs = jaxattn.quantize_kv(rng.standard_normal((b, s, k, h)).astype(np.float32), cache)
        out, lse = jaxattn.decode_attention(q, kq, vq, np.array([4096, 3001], np.int32),
                                            key_scale=ks, value_scale=vs, return_residual=True)
        outs += [np.asarray(out).view(np.uint8).ravel(), np.asarray(lse).view(np.uint8).ravel()]
    np.save(sys.argv[1], np.concatenate(outs))
""")


def _run_script(script: str, path: Path, cpus: str | None = None, **env_vars) -> np.ndarray:
    env = python_env(**env_vars)
    cmd = [sys.executable, "-c", script, str(path)]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus] + cmd
    subprocess.run(cmd, check=True, env=env, cwd=CWD, timeout=300)
    return np.load(path)


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and at least 2 CPUs")
def test_bitwise_identical_across_thread_counts(tmp_path):
    one = _run_script(_THREAD_SCRIPT, tmp_path / "one.npy", cpus="0")
    all_cpus = _run_script(_THREAD_SCRIPT, tmp_path / "all.npy")
    assert one.size > 0
    np.testing.assert_array_equal(one, all_cpus)


_ISA_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax.numpy as jnp
    import jaxattn
    assert jaxattn.kernel_isa() == sys.argv[2], jaxattn.kernel_isa()
    rng = np.random.default_rng(1)
    outs = []
    for dtype, (b, t, s, n, k, h, hv) in [(np.float32, (2, 3, 700, 8, 2, 40, 72)),
                                          (jnp.bfloat16, (2, 1, 300, 4, 1, 64, 64)),
                                          (jnp.float16, (1, 16, 80, 4, 4, 32, 32))]:
        q = rng.standard_normal((b, t, n, h)).astype(dtype)
        kc = rng.standard_normal((b, s, k, h)).astype(dtype)
        vc = rng.standard_normal((b, s, k, hv)).astype(dtype)
        lengths = np.array([s, s // 3][:b], np.int32)
        out = jaxattn.decode_attention(q, kc, vc, lengths, logits_soft_cap=20.0,
                                       local_window_size=250)
        outs.append(np.asarray(out, np.float32))
    np.savez(sys.argv[1], *outs)
""")


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_other_instruction_sets(tmp_path, isa):
    """The avx2 and generic kernels (forced through JAXATTN_ISA) agree with the default.
    (Decoding is the same code in the avx512 and avx512bf16 kernel sets.)"""
    if isa == "avx2" and jaxattn.kernel_isa() == "generic":
        pytest.skip("no AVX2 on this CPU")
    cmd_isa = [sys.executable, "-c", "import jaxattn; print(jaxattn.kernel_isa())"]
    found = subprocess.run(cmd_isa, capture_output=True, text=True, env=python_env(), cwd=CWD)
    assert found.returncode == 0, f"exit {found.returncode}:\n{found.stderr[-4000:]}"
    default = found.stdout.strip()
    ours = _run_script(_ISA_SCRIPT.replace("sys.argv[2]", repr(isa)), tmp_path / "isa.npz",
                       JAXATTN_ISA=isa)
    ref = _run_script(_ISA_SCRIPT.replace("sys.argv[2]", repr(default)), tmp_path / "ref.npz")
    # Different vector widths sum in different orders; a bf16/f16 output may round the other
    # way (one unit in the last place).
    for name, tol in (("arr_0", 1e-5), ("arr_1", 2e-2), ("arr_2", 2e-3)):
        np.testing.assert_allclose(ours[name], ref[name], rtol=tol, atol=tol, err_msg=name)


# ------------------------------------------------------------------ merge_attention_states


def _split_keys(rng, kv_len, parts):
    """A random partition of range(kv_len) into `parts` disjoint (possibly empty) sets."""
    owner = rng.integers(0, parts, size=kv_len)
    return [np.flatnonzero(owner == i) for i in range(parts)]


def test_merge_is_exact(rng):
    q, k, v = make_inputs(rng, 2, 3, 50, 4, 2, 32)
    sets = _split_keys(rng, 50, 3) + [np.array([], np.int64)]  # plus an empty part
    outs, lses = [], []
    for keys in sets:
        mask = np.zeros((1, 1, 1, 50), bool)
        mask[..., keys] = True
        o, l = attention_reference(q, k, v, mask=mask)
        outs.append(o if keys.size else np.full_like(o, np.nan))  # an empty part: any output
        lses.append(l)
    out, lse = jaxattn.merge_attention_states(np.stack(outs).astype(np.float32),
                                              np.stack(lses).astype(np.float32))
    ref_out, ref_lse = attention_reference(q, k, v)
    assert_close_to_oracle(out, ref_out, dtype=np.float32, name="merged out")
    assert_close_to_oracle(lse, ref_lse, dtype=np.float32, name="merged lse")


def test_merge_all_empty_and_dtype():
    outs = jnp.full((3, 2, 5), jnp.nan, jnp.bfloat16)
    lses = jnp.full((3, 2), -jnp.inf)
    out, lse = jaxattn.merge_attention_states(outs, lses)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert np.all(np.asarray(out, np.float32) == 0) and np.all(np.asarray(lse) == -np.inf)
    grads = jax.grad(lambda o, l: jaxattn.merge_attention_states(o, l)[0].sum(),
                     argnums=(0, 1))(outs.astype(jnp.float32), lses)
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_merge_of_decode_parts_is_decode_of_union(rng):
    """Cascade attention with T = 1: a prefix part and a suffix part, both decoded, merged."""
    prefix_len, suffix_len = 300, 70
    q, k, v = make_inputs(rng, 2, 1, prefix_len + suffix_len, 8, 2, 64)
    lengths = np.array([prefix_len + suffix_len, prefix_len + 5], np.int32)
    o1, l1 = run_decode(q, k[:, :prefix_len], v[:, :prefix_len],
                        np.full(2, prefix_len, np.int32))
    o2, l2 = run_decode(q, k[:, prefix_len:], v[:, prefix_len:], lengths - prefix_len)
    out, lse = jaxattn.merge_attention_states(np.stack([o1, o2]), np.stack([l1, l2]))
    check_against_oracle(q, k, v, lengths, out=np.asarray(out), lse=np.asarray(lse))


def test_merge_of_flash_parts_is_decode_of_union(rng):
    """T = 4: a fully visible prefix (flash, no mask) and the causal suffix, merged."""
    prefix_len, suffix_len = 200, 50
    q, k, v = make_inputs(rng, 2, 4, prefix_len + suffix_len, 8, 2, 32)
    lengths = np.array([prefix_len + suffix_len, prefix_len + 4], np.int32)
    mask = decode_mask(lengths, 4, prefix_len + suffix_len)[..., prefix_len:]
    o1, l1 = jaxattn.flash_attention(q, k[:, :prefix_len], v[:, :prefix_len],
                                     return_residual=True)
    o2, l2 = jaxattn.flash_attention(q, k[:, prefix_len:], v[:, prefix_len:], mask=mask,
                                     return_residual=True)
    out, lse = jaxattn.merge_attention_states(jnp.stack([o1, o2]), jnp.stack([l1, l2]))
    full_out, full_lse = run_decode(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(out), full_out, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), full_lse, rtol=2e-6, atol=2e-6)


def _merged_flash_loss(sets, dout, dlse):
    """sum(out * dout) + sum(lse * dlse) of flash attention over key subsets, merged."""
    def loss(q, k, v):
        outs, lses = [], []
        for keys in sets:
            o, l = jaxattn.flash_attention(q, k[:, keys], v[:, keys], return_residual=True)
            outs.append(o)
            lses.append(l)
        out, lse = jaxattn.merge_attention_states(jnp.stack(outs), jnp.stack(lses))
        return jnp.sum(out * dout) + jnp.sum(lse * dlse)
    return loss


def test_merge_gradient(rng):
    """Gradients through flash parts + merge equal those of attention over the union: against
    the oracle for the output term, against flash over the union with an lse term too. One
    part is empty (lse = -inf): it must contribute nothing and produce no NaN."""
    q, k, v = make_inputs(rng, 1, 5, 40, 4, 2, 16)
    dout = rng.standard_normal((1, 5, 4, 16)).astype(np.float32)
    dlse = rng.standard_normal((1, 5, 4)).astype(np.float32)
    sets = _split_keys(rng, 40, 3) + [np.array([], np.int64)]

    grads = jax.grad(_merged_flash_loss(sets, dout, np.zeros_like(dlse)), argnums=(0, 1, 2))(
        q, k, v)
    for got, want, name in zip(grads, attention_reference_grad(q, k, v, dout),
                               ("dq", "dk", "dv")):
        assert_close_to_oracle(got, want, dtype=np.float32, name=name)

    grads = jax.grad(_merged_flash_loss(sets, dout, dlse), argnums=(0, 1, 2))(q, k, v)
    union = jax.grad(_merged_flash_loss([np.arange(40)], dout, dlse), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, union):
        assert np.all(np.isfinite(np.asarray(got)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_merge_bad_inputs():
    with pytest.raises(ValueError, match="lses"):
        jaxattn.merge_attention_states(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4)))
    with pytest.raises(TypeError, match="outputs"):
        jaxattn.merge_attention_states(jnp.zeros((2, 3, 4), jnp.int32), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="M >= 1"):
        jaxattn.merge_attention_states(jnp.zeros((0, 3, 4)), jnp.zeros((0, 3)))


# ------------------------------------------------------- issue 13: padding, strictness, vmap


_PADDING_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, jax, jaxattn
    # T = 16 tokens x 64 query heads of one kv head: 1024 rows per partial result. Sizing the
    # split-KV scratch by the table (2**16 pages of 64 keys) took 512 partitions x 1024 rows x
    # 64 floats = 128 MiB; the lengths (one sequence of 16 keys) need none.
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 16, 64, 64)).astype(np.float32)
    pages = rng.standard_normal((2, 64, 1, 64)).astype(np.float32)
    lengths = np.array([16], np.int32)
    def run(max_pages):
        table = np.full((1, max_pages), -1, np.int32)
        table[0, 0] = 1
        out = jaxattn.paged_decode_attention(q, pages, pages, table, lengths)
        return np.asarray(jax.block_until_ready(out))
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    small = run(1)
    run(2**16)  # compiles for the padded shape (compilation memory does not count)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident set
    padded = run(2**16)
    grown_kib = status("VmHWM") - before
    assert np.array_equal(small.view(np.uint32), padded.view(np.uint32)), "results differ"
    print(grown_kib)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self")
def test_paged_table_padding_costs_no_scratch(tmp_path):
    """Issue 13, item 1: scratch sized by the lengths, not by max_pages * page_size (which
    crashed on a failed, unchecked malloc for long padded tables)."""
    proc = subprocess.run([sys.executable, "-c", _PADDING_SCRIPT], env=python_env(), cwd=CWD,
                          timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mib = int(proc.stdout.split()[-1]) / 1024
    # The padded table itself is 256 KiB; the old sizing added 128 MiB.
    assert grown_mib < 24, f"peak memory grew by {grown_mib:.0f} MiB for a padded table"


@pytest.mark.parametrize("lengths", [[3000], [3000, 17, 0], [700, 2500]])
def test_results_do_not_depend_on_cache_padding(rng, lengths):
    """Partitions follow the longest length: padding the block table or the contiguous cache
    past the lengths changes no bit of the result."""
    lengths = np.array(lengths, np.int32)
    kv_len, page_size = int(lengths.max()), 16
    q, k, v = make_inputs(rng, len(lengths), 1, kv_len, 4, 2, 32)
    pool_k, pool_v, tables = paged_layout(rng, k, v, page_size)
    ref_out, ref_lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                                      return_residual=True)
    padded = np.full((len(lengths), 4096), -1, np.int32)
    padded[:, :tables.shape[1]] = tables
    out, lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, padded, lengths,
                                              return_residual=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(ref_lse))
    grow = lambda x: np.concatenate([x, np.full((x.shape[0], 5 * kv_len) + x.shape[2:], np.nan,
                                                x.dtype)], axis=1)
    out_c, lse_c = run_decode(q, k, v, lengths)
    out_p, lse_p = run_decode(q, grow(k), grow(v), lengths)
    np.testing.assert_array_equal(out_p, out_c)
    np.testing.assert_array_equal(lse_p, lse_c)
    check_against_oracle(q, k, v, lengths, out=out_c, lse=lse_c)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_strict_lengths_rejects_lengths_past_the_cache(rng, paged):
    q, k, v = make_inputs(rng, 2, 1, 32, 4, 2, 16)
    if paged:
        pool_k, pool_v, tables = paged_layout(rng, k, v, 8, fill=0.0)
        attend = lambda lengths, **kw: jaxattn.paged_decode_attention(q, pool_k, pool_v, tables,
                                                                      lengths, **kw)
    else:
        attend = lambda lengths, **kw: jaxattn.decode_attention(q, k, v, lengths, **kw)
    ok = np.array([32, 5], np.int32)
    np.testing.assert_array_equal(np.asarray(attend(ok, strict_lengths=True)),
                                  np.asarray(attend(ok)))
    for bad in ([33, 5], [32, -1]):
        bad = np.array(bad, np.int32)
        jax.block_until_ready(attend(bad))  # clamped without the flag
        with pytest.raises(Exception, match="outside"):
            jax.block_until_ready(attend(bad, strict_lengths=True))
        with pytest.raises(Exception, match="outside"):
            jax.block_until_ready(jax.jit(lambda l: attend(l, strict_lengths=True))(bad))
    with pytest.raises(TypeError, match="strict_lengths"):
        attend(ok, strict_lengths=1)


def test_vmap_with_one_cache_mapped(rng):
    """Issue 13, item 6: several key caches sharing one value cache (and the reverse)."""
    q, k, v = make_inputs(rng, 2, 2, 40, 4, 2, 16)
    keys = np.stack([k, k * 0.5, -k])
    values = np.stack([v, v + 1.0, v * 2.0])
    lengths = np.array([40, 13], np.int32)
    f = lambda k, v: jaxattn.decode_attention(q, k, v, lengths, return_residual=True)
    out, lse = jax.vmap(f, in_axes=(0, None))(keys, v)
    for i in range(3):
        ref = run_decode(q, keys[i], v, lengths)
        np.testing.assert_array_equal(np.asarray(out[i]), ref[0])
        np.testing.assert_array_equal(np.asarray(lse[i]), ref[1])
    out = jax.vmap(lambda v: f(k, v)[0], in_axes=1, out_axes=2)(np.moveaxis(values, 0, 1))
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(out[:, :, i]),
                                      run_decode(q, k, values[i], lengths)[0])


@pytest.mark.parametrize("where", ["key", "value", "lse"])
def test_merge_propagates_nan_as_attention_over_the_union(rng, where):
    """Issue 13, item 3: a NaN in one part makes the merged rows NaN, as flash attention over
    all keys does (a NaN lse used to be taken for an empty part)."""
    q, k, v = make_inputs(rng, 1, 4, 40, 2, 1, 16)
    if where == "key":
        k[0, 30] = np.nan
    elif where == "value":
        v[0, 30] = np.nan
    whole_out, whole_lse = jaxattn.flash_attention(q, k, v, return_residual=True)
    halves = [jaxattn.flash_attention(q, k[:, s], v[:, s], return_residual=True)
              for s in (slice(0, 20), slice(20, 40))]
    outs, lses = (jnp.stack(x) for x in zip(*halves))
    if where == "lse":
        lses = lses.at[1, 0, 2].set(np.nan)
        whole_out = whole_out.at[0, 2].set(np.nan)
        whole_lse = whole_lse.at[0, 2].set(np.nan)
    out, lse = jaxattn.merge_attention_states(outs, lses)
    np.testing.assert_array_equal(np.isnan(np.asarray(out)), np.isnan(np.asarray(whole_out)))
    np.testing.assert_array_equal(np.isnan(np.asarray(lse)), np.isnan(np.asarray(whole_lse)))
    assert np.isnan(np.asarray(out)).any()
    finite = ~np.isnan(np.asarray(whole_out))
    np.testing.assert_allclose(np.asarray(out)[finite], np.asarray(whole_out)[finite],
                               rtol=1e-5, atol=1e-6)
