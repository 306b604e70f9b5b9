"""Any number of query tokens against a KV cache (chunked prefill, prefix caching) and ragged
query lengths, in decode_attention and paged_decode_attention.

Up to 16 tokens run the split-KV decode kernel, more the flash forward over the cache (its
rows gathered through the block table, quantized rows dequantised a tile at a time). Both
are checked against the float64 oracle (tests/oracle.py) on a dense mask of the decode
semantics: query i of sequence b at position kv_lengths[b] - T_b + i, T_b its query length.
"""

from __future__ import annotations

import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from oracle import assert_close_to_oracle, attention_reference, naive_low_precision
from test_decode import _run_script, paged_layout

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered in subtract:RuntimeWarning")


def visibility(kv_lengths, q_len: int, kv_len: int, query_lengths=None,
               window_left: int | None = None) -> np.ndarray:
    """Dense bool [B, 1, T, S]: the decode semantics with ragged query lengths."""
    lengths = np.clip(np.asarray(kv_lengths, np.int64), 0, kv_len)
    counts = np.full_like(lengths, q_len) if query_lengths is None else np.clip(
        np.asarray(query_lengths, np.int64), 0, q_len)
    rows = np.arange(q_len)[None, :]
    pos = (lengths - counts)[:, None] + rows  # [B, T]
    cols = np.arange(kv_len)[None, None, :]
    visible = (cols <= pos[:, :, None]) & (cols < lengths[:, None, None])
    if window_left is not None:
        visible &= cols >= pos[:, :, None] - window_left
    visible &= (rows < counts[:, None])[:, :, None]
    return visible[:, None]


def normal(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def check(q, k, v, mask, out, lse, *, soft_cap=None, cache_dtype=None):
    """(out, lse) against the oracle; 16-bit queries also against a naive 16-bit run."""
    ref_out, ref_lse = attention_reference(q, k, v, mask=mask, logits_soft_cap=soft_cap)
    dtype = np.dtype(q.dtype)
    naive = None
    if dtype != np.float32:
        naive, _ = naive_low_precision(q, k.astype(np.float32), v.astype(np.float32), dtype,
                                       mask=mask, logits_soft_cap=soft_cap)
    assert out.dtype == q.dtype
    assert_close_to_oracle(np.asarray(out), ref_out, naive, dtype=dtype, name="out")
    assert_close_to_oracle(np.asarray(lse), ref_lse, dtype=np.float32 if naive is None else dtype,
                           name="lse")


def nan_past_lengths(cache: np.ndarray, lengths) -> np.ndarray:
    cache = cache.copy()
    for b, n in enumerate(np.asarray(lengths)):
        cache[b, max(0, int(n)):] = np.nan
    return cache


# ------------------------------------------------------------------------- any T, oracle


@pytest.mark.parametrize("q_len", [1, 7, 16, 17, 33, 130])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_any_query_length_matches_oracle(rng, q_len, heads, kv_heads):
    batch, smax, h = 3, 301, 40
    q = normal(rng, (batch, q_len, heads, h))
    k = normal(rng, (batch, smax, kv_heads, h))
    v = normal(rng, (batch, smax, kv_heads, 24))
    lengths = np.array([smax, q_len + 5, max(1, q_len - 3)], np.int32)  # the last: T > length
    k, v = nan_past_lengths(k, lengths), nan_past_lengths(v, lengths)
    out, lse = jaxattn.decode_attention(q, k, v, lengths, return_residual=True)
    mask = visibility(lengths, q_len, smax)
    check(q, np.nan_to_num(k), np.nan_to_num(v), mask, out, lse)


@pytest.mark.parametrize("page_size", [1, 7, 64, 128])
@pytest.mark.parametrize("q_len", [5, 40])
def test_paged_any_query_length(rng, page_size, q_len):
    batch, smax, heads, kv_heads, h = 2, 257, 8, 2, 32
    q = normal(rng, (batch, q_len, heads, h))
    k = normal(rng, (batch, smax, kv_heads, h))
    v = normal(rng, (batch, smax, kv_heads, h))
    lengths = np.array([smax, 61], np.int32)
    pool_k, pool_v, tables = paged_layout(rng, k, v, page_size)  # NaN in unused rows/pages
    for b, n in enumerate(lengths):  # and past the lengths inside used pages
        for j in range(n, smax):
            pool_k[tables[b, j // page_size], j % page_size] = np.nan
            pool_v[tables[b, j // page_size], j % page_size] = np.nan
    out, lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                              return_residual=True)
    check(q, k, v, visibility(lengths, q_len, smax), out, lse)
    # The same keys laid out contiguously: the same kernel path and tiles, bitwise.
    out_c, lse_c = jaxattn.decode_attention(q, k, v, lengths, return_residual=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_c))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_c))


def test_paged_shared_prefix_pages(rng):
    """Beams sharing the pages of a prompt, each with pages of its own after it."""
    page, heads, kv_heads, h, q_len = 16, 4, 2, 32, 24
    num_pages = 12
    pool_k = normal(rng, (num_pages, page, kv_heads, h))
    pool_v = normal(rng, (num_pages, page, kv_heads, h))
    tables = np.array([[3, 7, 0, 9, -1], [3, 7, 5, 11, -1], [3, 7, 2, 9, -1]], np.int32)
    lengths = np.array([64, 60, 50], np.int32)
    q = normal(rng, (3, q_len, heads, h))
    out, lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                              return_residual=True)
    k = pool_k[np.maximum(tables[:, :4], 0)].reshape(3, 64, kv_heads, h)
    v = pool_v[np.maximum(tables[:, :4], 0)].reshape(3, 64, kv_heads, h)
    check(q, k, v, visibility(lengths, q_len, 64), out, lse)


# -------------------------------------------------------------------- ragged query lengths


@pytest.mark.parametrize("q_len", [4, 16, 37])
@pytest.mark.parametrize("paged", [False, True])
def test_ragged_query_lengths(rng, q_len, paged):
    batch, smax, heads, kv_heads, h = 5, 200, 8, 2, 32
    q = normal(rng, (batch, q_len, heads, h))
    k = normal(rng, (batch, smax, kv_heads, h))
    v = normal(rng, (batch, smax, kv_heads, h))
    lengths = np.array([200, 150, 3, 0, 90], np.int32)
    query_lengths = np.array([q_len, 1, q_len, 2, 0], np.int32)
    query_lengths[1] = q_len - 1
    k, v = nan_past_lengths(k, lengths), nan_past_lengths(v, lengths)
    if paged:
        pool_k, pool_v, tables = paged_layout(rng, k, v, 16)
        out, lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                                  query_lengths=query_lengths,
                                                  return_residual=True)
    else:
        out, lse = jaxattn.decode_attention(q, k, v, lengths, query_lengths=query_lengths,
                                            return_residual=True)
    mask = visibility(lengths, q_len, smax, query_lengths)
    check(q, np.nan_to_num(k), np.nan_to_num(v), mask, out, lse)
    # Rows past a sequence's query length are exactly 0 with lse -inf.
    dead = ~mask[:, 0].any(-1)  # [B, T]
    assert np.all(np.asarray(out)[dead] == 0)
    assert np.all(np.asarray(lse)[dead] == -np.inf)


def test_ragged_equals_unpadded_calls(rng):
    """A ragged batch equals each sequence run alone with its own T (on its live rows)."""
    batch, q_len, smax, heads, kv_heads, h = 3, 24, 120, 4, 1, 16
    q = normal(rng, (batch, q_len, heads, h))
    k = normal(rng, (batch, smax, kv_heads, h))
    v = normal(rng, (batch, smax, kv_heads, h))
    lengths = np.array([120, 70, 30], np.int32)
    counts = np.array([24, 9, 17], np.int32)
    out = np.asarray(jaxattn.decode_attention(q, k, v, lengths, query_lengths=counts))
    for b in range(batch):
        alone = jaxattn.decode_attention(q[b:b + 1, :counts[b]], k[b:b + 1], v[b:b + 1],
                                         lengths[b:b + 1])
        np.testing.assert_allclose(out[b, :counts[b]], np.asarray(alone)[0], rtol=2e-6,
                                   atol=2e-6)


# --------------------------------------------------------------- options and dtypes


@pytest.mark.parametrize("window,soft_cap", [(9, None), (None, 5.0), (30, 20.0)])
def test_window_and_soft_cap(rng, window, soft_cap):
    batch, q_len, smax, heads, kv_heads, h = 2, 45, 180, 4, 2, 32
    q = normal(rng, (batch, q_len, heads, h))
    k = normal(rng, (batch, smax, kv_heads, h))
    v = normal(rng, (batch, smax, kv_heads, h))
    lengths = np.array([180, 77], np.int32)
    pool_k, pool_v, tables = paged_layout(rng, k, v, 32)
    out, lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                              local_window_size=window, logits_soft_cap=soft_cap,
                                              return_residual=True)
    check(q, k, v, visibility(lengths, q_len, smax, window_left=window), out, lse,
          soft_cap=soft_cap)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16], ids=["bf16", "f16"])
def test_low_precision(rng, dtype):
    batch, q_len, smax, heads, kv_heads, h = 2, 70, 300, 8, 2, 64
    q = normal(rng, (batch, q_len, heads, h), dtype)
    k = normal(rng, (batch, smax, kv_heads, h), dtype)
    v = normal(rng, (batch, smax, kv_heads, h), dtype)
    lengths = np.array([300, 111], np.int32)
    pool_k, pool_v, tables = paged_layout(rng, k, v, 16)
    out, lse = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                              return_residual=True)
    check(q, k.astype(np.float64), v.astype(np.float64), visibility(lengths, q_len, smax),
          out, lse)


@pytest.mark.parametrize("cache_dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2],
                         ids=["int8", "e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("paged", [False, True])
def test_quantized_cache(rng, cache_dtype, dtype, paged):
    batch, q_len, smax, heads, kv_heads, h = 2, 37, 150, 4, 2, 48
    q = normal(rng, (batch, q_len, heads, h), dtype)
    k = normal(rng, (batch, smax, kv_heads, h))
    v = normal(rng, (batch, smax, kv_heads, h))
    kq, ks = (np.asarray(x) for x in jaxattn.quantize_kv(k, cache_dtype))
    vq, vs = (np.asarray(x) for x in jaxattn.quantize_kv(v, cache_dtype))
    lengths = np.array([150, 44], np.int32)
    query_lengths = np.array([37, 30], np.int32)
    if paged:
        page = 8
        pk, pv, tables = paged_layout(rng, kq, vq, page, fill=0)
        # The scales follow the pages of the table.
        pks = np.zeros(pk.shape[:3], np.float32)
        pvs = np.zeros(pv.shape[:3], np.float32)
        for b in range(batch):
            for i in range(tables.shape[1]):
                rows = slice(i * page, min(smax, (i + 1) * page))
                pks[tables[b, i], :rows.stop - rows.start] = ks[b, rows]
                pvs[tables[b, i], :rows.stop - rows.start] = vs[b, rows]
        out, lse = jaxattn.paged_decode_attention(q, pk, pv, tables, lengths, key_scale=pks,
                                                  value_scale=pvs, query_lengths=query_lengths,
                                                  return_residual=True)
    else:
        out, lse = jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks, value_scale=vs,
                                            query_lengths=query_lengths, return_residual=True)
    kd = kq.astype(np.float64) * ks.astype(np.float64)[..., None]
    vd = vq.astype(np.float64) * vs.astype(np.float64)[..., None]
    if np.dtype(dtype) != np.float32:  # the flash tiles take the cache at the query's dtype
        kd = kd.astype(dtype).astype(np.float64)
        vd = vd.astype(dtype).astype(np.float64)
    check(q, kd, vd, visibility(lengths, q_len, smax, query_lengths), out, lse)


def test_matches_flash_attention_on_a_full_prompt(rng):
    """T = the cache length: causal flash attention over the prompt."""
    q = normal(rng, (2, 90, 4, 32))
    k = normal(rng, (2, 90, 2, 32))
    v = normal(rng, (2, 90, 2, 32))
    out = jaxattn.decode_attention(q, k, v, np.array([90, 90], np.int32))
    ref = jaxattn.flash_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_jit_and_vmap(rng):
    q = normal(rng, (2, 3, 20, 4, 16))
    k = normal(rng, (2, 3, 64, 2, 16))
    v = normal(rng, (2, 3, 64, 2, 16))
    lengths = np.array([[64, 30, 20], [5, 64, 40]], np.int32)
    counts = np.array([[20, 3, 0], [5, 20, 11]], np.int32)
    f = jax.jit(jax.vmap(lambda q, k, v, n, c: jaxattn.decode_attention(
        q, k, v, n, query_lengths=c)))
    out = np.asarray(f(q, k, v, lengths, counts))
    for i in range(2):
        ref = jaxattn.decode_attention(q[i], k[i], v[i], lengths[i], query_lengths=counts[i])
        np.testing.assert_array_equal(out[i], np.asarray(ref))


def test_bad_page_id_is_an_error(rng):
    q = normal(rng, (1, 30, 2, 16))
    pool = normal(rng, (4, 8, 1, 16))
    with pytest.raises(Exception, match="page id"):
        jax.block_until_ready(jaxattn.paged_decode_attention(
            q, pool, pool, np.array([[0, 1, 7, 2]], np.int32), np.array([30], np.int32)))


def test_flash_path_validation_error_is_reported(rng):
    """The FFI target called directly (past the Python checks) with what only the flash
    tiles reject (T > 16 with an infinite scale or soft cap) reports that, not a failed
    allocation."""
    q = normal(rng, (1, 17, 2, 16))
    k = normal(rng, (1, 20, 1, 16))
    out_types = (jax.ShapeDtypeStruct((1, 17, 2, 16), np.float32),
                 jax.ShapeDtypeStruct((1, 17, 2), np.float32))
    lengths = np.array([20], np.int32)
    for attrs, message in ((dict(scale=np.float32(np.inf), soft_cap=np.float32(0)),
                            "scale must be finite"),
                           (dict(scale=np.float32(0.25), soft_cap=np.float32(np.inf)),
                            "soft cap must be finite")):
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(jax.ffi.ffi_call("jaxattn_decode_fwd_v1", out_types)(
                q, k, k, lengths, window_left=np.int64(-1), **attrs))


# ---------------------------------------------------------------- thread-count invariance

_THREAD_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax.numpy as jnp
    import jaxattn
    rng = np.random.default_rng(0)
    outs = []
    for dtype, cache in [(np.float32, None), (jnp.bfloat16, None), (np.float32, jnp.int8)]:
        b, t, s, n, k, h = 2, 150, 704, 8, 2, 64
        q = rng.standard_normal((b, t, n, h)).astype(dtype)
        kc = rng.standard_normal((b, s, k, h)).astype(np.float32)
        vc = rng.standard_normal((b, s, k, h)).astype(np.float32)
        scales = {}
        if cache is not None:
            kc, ks = jaxattn.quantize_kv(kc, cache)
            vc, vs = jaxattn.quantize_kv(vc, cache)
            scales = dict(key_scale=ks, value_scale=vs)
        else:
            kc, vc = kc.astype(dtype), vc.astype(dtype)
        pk, pv = kc.reshape(-1, 16, k, h), vc.reshape(-1, 16, k, h)
        if scales:
            scales = {name: x.reshape(-1, 16, k) for name, x in scales.items()}
        tables = np.arange(b * s // 16, dtype=np.int32).reshape(b, -1)[:, ::-1].copy()
        pk, pv = pk[tables.ravel()], pv[tables.ravel()]  # page i of the table holds keys i
        if scales:
            scales = {name: x[tables.ravel()] for name, x in scales.items()}
        tables = np.arange(b * s // 16, dtype=np.int32).reshape(b, -1)
        out, lse = jaxattn.paged_decode_attention(
            q, pk, pv, tables, np.array([704, 333], np.int32), return_residual=True,
            query_lengths=np.array([150, 120], np.int32), **scales)
        outs += [np.asarray(out).view(np.uint8).ravel(), np.asarray(lse).view(np.uint8).ravel()]
    np.save(sys.argv[1], np.concatenate(outs))
""")


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and at least 2 CPUs")
def test_bitwise_identical_across_thread_counts(tmp_path):
    one = _run_script(_THREAD_SCRIPT, tmp_path / "one.npy", cpus="0")
    all_cpus = _run_script(_THREAD_SCRIPT, tmp_path / "all.npy")
    assert one.size > 0
    np.testing.assert_array_equal(one, all_cpus)
