"""Quantized KV caches (int8, float8_e4m3fn, float8_e5m2) in decode_attention and
paged_decode_attention, and jaxattn.quantize_kv.

The kernels dequantise in registers; the float64 oracle (tests/oracle.py) is applied to the
dequantised cache ``values * scales[..., None]`` computed exactly in float64, so the only
differences left are the kernels' float32 arithmetic and the rounding of the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from oracle import assert_close_to_oracle, attention_reference, decode_visibility, \
    naive_low_precision

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered in subtract:RuntimeWarning")

QUERY_DTYPES = [np.float32, jnp.bfloat16, np.float16]
CACHE_DTYPES = [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2]
CACHE_IDS = ["int8", "e4m3", "e5m2"]


def quantize(x: np.ndarray, cache_dtype) -> tuple[np.ndarray, np.ndarray]:
    values, scales = jaxattn.quantize_kv(x, cache_dtype)
    return np.asarray(values), np.asarray(scales)


def dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The cache the kernel reads, exactly (float64)."""
    return values.astype(np.float64) * scales.astype(np.float64)[..., None]


def make_cache(rng, batch, q_len, kv_len, heads, kv_heads, head_dim, value_dim, dtype,
               cache_dtype):
    """(query, kq, vq, key_scale, value_scale) with a quantized contiguous cache."""
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, kv_heads, value_dim)).astype(np.float32)
    kq, ks = quantize(k, cache_dtype)
    vq, vs = quantize(v, cache_dtype)
    return q, kq, vq, ks, vs


# int8 caches take integer dot products (cc/decode_impl.h): the query rows, and each row's
# probabilities in a block of 32 keys, are rounded to int16 against their largest magnitude
# (relative error <= 2^-16 of it). A few such roundings add up in a score or an output; below
# every low-precision dtype's own rounding, but coarser than float32's: a float32 query is
# held to 2^-13 of the largest magnitude on top of the float32 floor.
INT8_FIXED_POINT_RTOL = 2.0**-13


def check(q, kq, vq, ks, vs, lengths, out, lse, *, window=None, soft_cap=None):
    """(out, lse) against the oracle on the dequantised cache."""
    k = dequantize(kq, ks) if ks is not None else kq.astype(np.float64)
    v = dequantize(vq, vs) if vs is not None else vq.astype(np.float64)
    mask = decode_visibility(lengths, q.shape[1], k.shape[1],
                             None if window is None else (window, 0))
    ref_out, ref_lse = attention_reference(q, k, v, mask=mask, logits_soft_cap=soft_cap)
    dtype = np.dtype(q.dtype)
    naive = None
    if dtype != np.float32:
        naive, _ = naive_low_precision(q, k.astype(np.float32), v.astype(np.float32), dtype,
                                       mask=mask, logits_soft_cap=soft_cap)
    out = np.asarray(out)
    assert out.dtype == dtype
    extra = INT8_FIXED_POINT_RTOL if kq.dtype == np.int8 else 0.0
    assert_close_to_oracle(out, ref_out, naive, dtype=dtype, name="out", extra_rtol=extra)
    assert_close_to_oracle(lse, ref_lse, dtype=np.float32, name="lse", extra_rtol=extra)


def paged(rng, key, value, key_scale, value_scale, page_size, extra_pages=2):
    """A contiguous quantized cache scattered into shuffled pages; rows past the cache and the
    unused pages hold garbage that must never be read (NaN values for float8, NaN scales)."""
    batch, kv_len = key.shape[:2]
    per = -(-kv_len // page_size)
    num_pages = batch * per + extra_pages
    order = rng.permutation(num_pages)[: batch * per].reshape(batch, per)
    fill = -128 if key.dtype == np.int8 else np.nan

    def pool(x, fill_value):
        return np.full((num_pages, page_size) + x.shape[2:], fill_value, x.dtype)

    pools = [pool(key, fill), pool(value, fill)]
    pools += [pool(s, np.nan) if s is not None else None for s in (key_scale, value_scale)]
    for b in range(batch):
        for i in range(per):
            rows = slice(i * page_size, min(kv_len, (i + 1) * page_size))
            n = rows.stop - rows.start
            for p, x in zip(pools, (key, value, key_scale, value_scale)):
                if p is not None:
                    p[order[b, i], :n] = x[b, rows]
    return (*pools, order.astype(np.int32))


# ------------------------------------------------------------------------------- contiguous


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=CACHE_IDS)
@pytest.mark.parametrize("dtype", QUERY_DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("heads,kv_heads,q_len", [(8, 2, 1), (4, 1, 3), (4, 4, 16)],
                         ids=["gqa", "mqa_t3", "mha_t16"])
def test_every_dtype_pair_matches_oracle(rng, dtype, cache_dtype, heads, kv_heads, q_len):
    kv_len = 300
    q, kq, vq, ks, vs = make_cache(rng, 3, q_len, kv_len, heads, kv_heads, 72, 40, dtype,
                                   cache_dtype)
    lengths = np.array([kv_len, 129, 2], np.int32)
    out, lse = jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks, value_scale=vs,
                                        return_residual=True)
    check(q, kq, vq, ks, vs, lengths, out, lse)


@pytest.mark.parametrize("cache_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2],
                         ids=["e4m3", "e5m2"])
def test_float8_without_scales(rng, cache_dtype):
    """float8 caches need no scales (scale 1): raw float8 values, as vLLM's fp8 caches."""
    q = rng.standard_normal((2, 2, 4, 32)).astype(np.float32)
    k = (rng.standard_normal((2, 90, 2, 32)) * 3).astype(cache_dtype)
    v = (rng.standard_normal((2, 90, 2, 32)) * 3).astype(cache_dtype)
    lengths = np.array([90, 41], np.int32)
    out, lse = jaxattn.decode_attention(q, k, v, lengths, return_residual=True)
    check(q, np.asarray(k), np.asarray(v), None, None, lengths, out, lse)
    # One scale given, the other default 1.
    ks = rng.uniform(0.5, 2.0, (2, 90, 2)).astype(np.float32)
    out, lse = jaxattn.decode_attention(q, k, v, lengths, key_scale=ks, return_residual=True)
    check(q, np.asarray(k), np.asarray(v), ks, None, lengths, out, lse)


@pytest.mark.parametrize("cache_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2],
                         ids=["e4m3", "e5m2"])
def test_every_float8_value_converts_exactly(cache_dtype):
    """Every finite bit pattern as a key and as a value element: the in-register conversion
    must equal ml_dtypes' exactly (a wrong denormal, sign or exponent shows); NaN propagates."""
    patterns = np.arange(256, dtype=np.uint8).view(cache_dtype)
    as_f32 = patterns.astype(np.float32)
    finite = patterns[np.isfinite(as_f32)]
    h = len(finite)
    # One key (length 1): the output is its value row, and with MQA query head n one-hot at
    # element n (scale 1) the lse is key element n.
    k = finite.reshape(1, 1, 1, h)
    v = finite.reshape(1, 1, 1, h)
    q = np.eye(h, dtype=np.float32).reshape(1, 1, h, h)
    out, lse = jaxattn.decode_attention(q, k, v, np.array([1], np.int32), scale=1.0,
                                        return_residual=True)
    expected = finite.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out)[0, 0], np.broadcast_to(expected, (h, h)))
    np.testing.assert_array_equal(np.asarray(lse)[0, 0], expected)
    for nan in patterns[np.isnan(as_f32)]:
        v_nan = v.copy()
        v_nan[..., 3] = nan
        out = np.asarray(jaxattn.decode_attention(q[:, :, :1], k, v_nan,
                                                  np.array([1], np.int32)))[0, 0, 0]
        assert np.isnan(out[3]) and np.isfinite(np.delete(out, 3)).all()


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=CACHE_IDS)
def test_lengths_window_soft_cap(rng, cache_dtype):
    kv_len = 777
    q, kq, vq, ks, vs = make_cache(rng, 6, 4, kv_len, 8, 2, 64, 64, jnp.bfloat16, cache_dtype)
    lengths = np.array([0, 1, 3, 256, 700, kv_len], np.int32)
    for window, cap in ((None, 10.0), (100, None), (33, 5.0)):
        out, lse = jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks, value_scale=vs,
                                            local_window_size=window, logits_soft_cap=cap,
                                            return_residual=True)
        check(q, kq, vq, ks, vs, lengths, out, lse, window=window, soft_cap=cap)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=CACHE_IDS)
def test_garbage_past_lengths_is_never_read(rng, cache_dtype):
    kv_len = 600
    q, kq, vq, ks, vs = make_cache(rng, 2, 2, kv_len, 4, 2, 48, 48, np.float32, cache_dtype)
    lengths = np.array([400, 77], np.int32)
    ks, vs = ks.copy(), vs.copy()
    kq, vq = kq.copy(), vq.copy()
    for b, n in enumerate(lengths):
        ks[b, n:] = np.nan
        vs[b, n:] = np.inf
        if cache_dtype != jnp.int8:
            kq[b, n:] = np.nan
            vq[b, n:] = np.nan
    out, lse = jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks, value_scale=vs,
                                        return_residual=True)
    assert np.isfinite(np.asarray(out)).all()
    trim = lambda x: np.where(np.isfinite(x), x, 0)
    check(q, kq if cache_dtype == jnp.int8 else np.asarray(trim(kq.astype(np.float32))).astype(
        cache_dtype), vq if cache_dtype == jnp.int8 else trim(vq.astype(np.float32)).astype(
        cache_dtype), trim(ks), trim(vs), lengths, out, lse)


@pytest.mark.parametrize("h", [512, 1024])
def test_int8_extreme_values_at_the_largest_head_dim(rng, h):
    """The integer dot products at their limits: -128 (which quantize_kv never writes, but a
    cache may hold) in every element of the keys and values, H = Hv = 1024 (the largest head
    dim) or 512 (the largest whose scores are summed in int32, cc/decode_impl.h kI8ExactDim),
    and a query whose every element has the row's largest magnitude: the int32 sums are at
    their largest and must not overflow. Also random bytes over the full range."""
    kv_len = 70
    q = np.full((1, 2, 4, h), -0.03, np.float32)
    q[:, 1] = rng.standard_normal((1, 4, h)).astype(np.float32)
    k = np.full((1, kv_len, 2, h), -128, np.int8)
    v = np.full((1, kv_len, 2, h), -128, np.int8)
    k[:, 1::3] = rng.integers(-128, 128, (1, len(range(1, kv_len, 3)), 2, h), dtype=np.int8)
    v[:, 2::3] = rng.integers(-128, 128, (1, len(range(2, kv_len, 3)), 2, h), dtype=np.int8)
    ks = rng.uniform(0.001, 0.01, (1, kv_len, 2)).astype(np.float32)
    vs = rng.uniform(0.001, 0.01, (1, kv_len, 2)).astype(np.float32)
    lengths = np.array([kv_len], np.int32)
    out, lse = jaxattn.decode_attention(q, k, v, lengths, key_scale=ks, value_scale=vs,
                                        return_residual=True)
    check(q, k, v, ks, vs, lengths, out, lse)


def test_int8_nan_scale_reaches_the_output(rng):
    """A NaN scale of a visible key or value row makes its rows' outputs NaN, as float
    arithmetic would (the integer path must not round it away); other sequences stay
    finite."""
    q, kq, vq, ks, vs = make_cache(rng, 3, 1, 100, 4, 2, 32, 32, np.float32, jnp.int8)
    lengths = np.array([100, 100, 100], np.int32)
    ks, vs = ks.copy(), vs.copy()
    ks[0, 40, 1] = np.nan
    vs[1, 7, 0] = np.nan
    out = np.asarray(jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks,
                                              value_scale=vs))
    assert np.isnan(out[0, :, 2:]).all() and np.isfinite(out[0, :, :2]).all()
    assert np.isnan(out[1, :, :2]).all() and np.isfinite(out[1, :, 2:]).all()
    assert np.isfinite(out[2]).all()


# ------------------------------------------------------------------------------------ paged


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=CACHE_IDS)
@pytest.mark.parametrize("page_size", [1, 3, 16, 128])
def test_paged_matches_contiguous_and_oracle(rng, cache_dtype, page_size):
    kv_len = 300
    q, kq, vq, ks, vs = make_cache(rng, 3, 2, kv_len, 8, 2, 40, 24, jnp.float16, cache_dtype)
    lengths = np.array([kv_len, 0, 131], np.int32)
    kp, vp, ksp, vsp, tables = paged(rng, kq, vq, ks, vs, page_size)
    out, lse = jaxattn.paged_decode_attention(q, kp, vp, tables, lengths, key_scale=ksp,
                                              value_scale=vsp, return_residual=True)
    check(q, kq, vq, ks, vs, lengths, out, lse)
    ref = jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks, value_scale=vs)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=CACHE_IDS)
def test_paged_shared_pages(rng, cache_dtype):
    """Two sequences share their prefix pages (beams): each sees the shared prefix and its own
    tail."""
    page, h = 8, 32
    pool_f = rng.standard_normal((6, page, 2, h)).astype(np.float32)
    kp, ksp = quantize(pool_f, cache_dtype)
    vp, vsp = quantize(rng.standard_normal((6, page, 2, h)).astype(np.float32), cache_dtype)
    tables = np.array([[4, 1, 2], [4, 1, 5]], np.int32)  # shared pages 4, 1
    lengths = np.array([21, 24], np.int32)
    q = rng.standard_normal((2, 1, 4, h)).astype(np.float32)
    out, lse = jaxattn.paged_decode_attention(q, kp, vp, tables, lengths, key_scale=ksp,
                                              value_scale=vsp, return_residual=True)
    gather = lambda x: np.concatenate([x[tables[:, i]] for i in range(3)], axis=1)
    check(q, gather(kp), gather(vp), gather(ksp), gather(vsp), lengths, out, lse)


def test_paged_out_of_range_page_is_an_error(rng):
    q, kq, vq, ks, vs = make_cache(rng, 1, 1, 32, 4, 2, 16, 16, np.float32, jnp.int8)
    kp, vp, ksp, vsp, tables = paged(rng, kq, vq, ks, vs, 8)
    tables[0, 2] = kp.shape[0]  # a page below the length
    with pytest.raises(jax.errors.JaxRuntimeError, match="page id"):
        jax.block_until_ready(jaxattn.paged_decode_attention(q, kp, vp, tables, [32],
                                                             key_scale=ksp, value_scale=vsp))
    tables[0, 2] = -1  # past the length: never read, fine
    out = jaxattn.paged_decode_attention(q, kp, vp, tables, [16], key_scale=ksp,
                                         value_scale=vsp)
    assert np.isfinite(np.asarray(out)).all()


# ------------------------------------------------------------------------- jit, vmap, errors


def test_jit_and_vmap(rng):
    q, kq, vq, ks, vs = make_cache(rng, 2, 1, 64, 4, 2, 32, 32, np.float32, jnp.int8)
    lengths = np.array([64, 30], np.int32)
    f = jax.jit(lambda *a: jaxattn.decode_attention(a[0], a[1], a[2], a[5], key_scale=a[3],
                                                    value_scale=a[4]))
    ref = np.asarray(jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks,
                                              value_scale=vs))
    np.testing.assert_array_equal(np.asarray(f(q, kq, vq, ks, vs, lengths)), ref)
    # vmap over a leading axis of everything (one cache per instance), and over the query only.
    stack = lambda x: np.stack([x, x[::-1]])
    outs = jax.vmap(f)(*(stack(x) for x in (q, kq, vq, ks, vs, lengths)))
    np.testing.assert_array_equal(np.asarray(outs[0]), ref)
    shared = jax.vmap(f, in_axes=(0, None, None, None, None, None))(stack(q), kq, vq, ks, vs,
                                                                    lengths)
    np.testing.assert_array_equal(np.asarray(shared[0]), ref)
    # Only the scales mapped (the values shared): the caches are mapped alike.
    scaled = jax.vmap(f, in_axes=(None, None, None, 0, None, None))(q, kq, vq,
                                                                    np.stack([ks, 2 * ks]),
                                                                    vs, lengths)
    np.testing.assert_array_equal(np.asarray(scaled[0]), ref)
    ref2 = jaxattn.decode_attention(q, kq, vq, lengths, key_scale=2 * ks, value_scale=vs)
    np.testing.assert_array_equal(np.asarray(scaled[1]), np.asarray(ref2))

    # Paged: mapped pools and scales.
    kp, vp, ksp, vsp, tables = paged(rng, kq, vq, ks, vs, 16)
    g = lambda q, kp, vp, ksp, vsp: jaxattn.paged_decode_attention(
        q, kp, vp, tables, lengths, key_scale=ksp, value_scale=vsp)
    outs = jax.jit(jax.vmap(g))(stack(q), *(np.stack([x, x]) for x in (kp, vp, ksp, vsp)))
    np.testing.assert_array_equal(np.asarray(outs[1]), np.asarray(g(q[::-1], kp, vp, ksp, vsp)))
    outs = jax.vmap(g, in_axes=(None, None, None, 0, None))(q, kp, vp, np.stack([ksp, ksp]),
                                                             vsp)
    np.testing.assert_array_equal(np.asarray(outs[0]), ref)


def test_not_differentiable(rng):
    q, kq, vq, ks, vs = make_cache(rng, 1, 1, 16, 2, 2, 16, 16, np.float32, jnp.int8)
    with pytest.raises(NotImplementedError, match="no gradient"):
        jax.grad(lambda q: jaxattn.decode_attention(q, kq, vq, [16], key_scale=ks,
                                                    value_scale=vs).sum())(q)


def test_bad_arguments(rng):
    q, kq, vq, ks, vs = make_cache(rng, 1, 1, 16, 2, 2, 16, 16, np.float32, jnp.int8)
    lengths = np.array([16], np.int32)
    with pytest.raises(ValueError, match="key_scale"):
        jaxattn.decode_attention(q, kq, vq, lengths, value_scale=vs)
    with pytest.raises(ValueError, match="value_scale"):
        jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks)
    with pytest.raises(ValueError, match="key_scale.*shape"):
        jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks[:, :8], value_scale=vs)
    with pytest.raises(TypeError, match="value_scale.*floating"):
        jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks,
                                 value_scale=vs.astype(np.int32))
    with pytest.raises(TypeError, match="share one dtype"):
        jaxattn.decode_attention(q, kq, vq.astype(jnp.float8_e4m3fn), lengths, key_scale=ks,
                                 value_scale=vs)
    with pytest.raises(ValueError, match="only for quantized"):
        jaxattn.decode_attention(q, q.repeat(16, 1)[:, :, :2], q.repeat(16, 1)[:, :, :2],
                                 lengths, key_scale=ks)
    with pytest.raises(TypeError, match="query"):
        jaxattn.decode_attention(q.astype(np.int8), kq, vq, lengths, key_scale=ks,
                                 value_scale=vs)
    with pytest.raises(TypeError, match="key_pages"):
        jaxattn.paged_decode_attention(q, kq.astype(np.uint8), vq, np.zeros((1, 1), np.int32),
                                       lengths)


# ----------------------------------------------------------------------------- quantize_kv


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=CACHE_IDS)
def test_quantize_kv_round_trip(rng, cache_dtype):
    x = (rng.standard_normal((3, 50, 2, 64)) * rng.uniform(0.01, 100, (3, 50, 2, 1))).astype(
        np.float32)
    x[0, 0, 0] = 0.0  # an all-zero row: scale 0, values 0
    values, scales = jaxattn.quantize_kv(x, cache_dtype)
    assert values.dtype == cache_dtype and values.shape == x.shape
    assert scales.dtype == jnp.float32 and scales.shape == x.shape[:3]
    assert float(scales[0, 0, 0]) == 0.0 and not np.asarray(values[0, 0, 0]).astype(float).any()
    back = np.asarray(jaxattn.dequantize_kv(values, scales))
    absmax = np.abs(x).max(-1, keepdims=True)
    # The row's largest element maps to the format's largest value, and the error per element
    # is at most half a step (int8) or half an ulp at the row's absmax (float8, relative).
    rel = np.abs(back - x) / np.where(absmax > 0, absmax, 1)
    bound = {jnp.int8: 0.5 / 127, jnp.float8_e4m3fn: 2.0**-4, jnp.float8_e5m2: 2.0**-3}
    assert rel.max() <= bound[cache_dtype] * 1.0001
    np.testing.assert_allclose(np.abs(back).max(-1), absmax[..., 0], rtol=1e-6)


def test_quantize_kv_bad_arguments():
    with pytest.raises(TypeError, match="dtype"):
        jaxattn.quantize_kv(np.ones((2, 4), np.float32), jnp.int16)
    with pytest.raises(TypeError, match="floating"):
        jaxattn.quantize_kv(np.ones((2, 4), np.int32), jnp.int8)


# Measured on random data (numbers in the README): the output error of an int8 cache against
# the unquantized float32 cache, relative to the output's largest magnitude.
INT8_RELATIVE_ERROR_BOUND = 2e-2


def test_int8_error_against_unquantized_cache(rng):
    b, s, n, kh, h = 4, 2048, 16, 4, 128
    q = rng.standard_normal((b, 1, n, h)).astype(np.float32)
    k = rng.standard_normal((b, s, kh, h)).astype(np.float32)
    v = rng.standard_normal((b, s, kh, h)).astype(np.float32)
    lengths = np.array([s, 1000, 100, 7], np.int32)
    exact = np.asarray(jaxattn.decode_attention(q, k, v, lengths))
    errors = {}
    for cache_dtype, name in zip(CACHE_DTYPES, CACHE_IDS):
        (kq, ks), (vq, vs) = jaxattn.quantize_kv(k, cache_dtype), jaxattn.quantize_kv(v,
                                                                                    cache_dtype)
        out = np.asarray(jaxattn.decode_attention(q, kq, vq, lengths, key_scale=ks,
                                                  value_scale=vs))
        errors[name] = np.abs(out - exact).max() / np.abs(exact).max()
    print("relative output error vs the float32 cache:", errors)
    assert errors["int8"] <= INT8_RELATIVE_ERROR_BOUND
    assert errors["int8"] < errors["e4m3"] < errors["e5m2"]


def test_forward_mode_raises(rng):
    q, kq, vq, ks, vs = make_cache(rng, 1, 1, 16, 2, 2, 16, 16, np.float32, jnp.int8)
    f = lambda q: jaxattn.decode_attention(q, kq, vq, [16], key_scale=ks, value_scale=vs)
    with pytest.raises(NotImplementedError):
        jax.jvp(f, (q,), (q,))
