"""jaxattn.update_kv_cache / update_paged_kv_cache: scattering new tokens into contiguous and
paged caches (quantizing for int8 / float8 caches), in place under buffer donation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn

DTYPES = [np.float32, jnp.bfloat16, np.float16, jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2]
IDS = ["f32", "bf16", "f16", "int8", "e4m3", "e5m2"]


def quantized(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2)


def empty_cache(shape, dtype):
    """(key, value, key_scale, value_scale) filled with recognisable garbage (scales None for
    float caches)."""
    k = np.full(shape, 3, dtype)
    v = np.full(shape[:-1] + (shape[-1] + 8,), 5, dtype)
    scales = (np.full(shape[:3], 7.0, np.float32), np.full(shape[:3], 9.0, np.float32))
    return (k, v, *scales) if quantized(dtype) else (k, v, None, None)


def expected_rows(x, dtype):
    """What a write stores for new rows x: (values, scales or None)."""
    if quantized(dtype):
        values, scales = jaxattn.quantize_kv(x, dtype)
        return np.asarray(values), np.asarray(scales)
    return np.asarray(jnp.asarray(x).astype(dtype)), None


def write(fn, *args, key_scale=None, value_scale=None, **kw):
    out = fn(*args, key_scale=key_scale, value_scale=value_scale, **kw)
    out = [np.asarray(x) for x in out]
    return out + [None, None] if len(out) == 2 else out


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("ragged", [False, True], ids=["starts", "positions"])
def test_contiguous_write(rng, dtype, ragged):
    b, smax, kh, h, t = 3, 20, 2, 16, 4
    k, v, ks, vs = empty_cache((b, smax, kh, h), dtype)
    new_k = rng.standard_normal((b, t, kh, h)).astype(np.float32)
    new_v = rng.standard_normal((b, t, kh, h + 8)).astype(np.float32)
    if ragged:
        positions = np.array([[0, 5, 19, 20], [-1, 3, 4, 100], [7, 6, 8, 9]], np.int32)
    else:
        positions = np.array([0, 18, -2], np.int32)  # partly past the end / before the start
    out_k, out_v, out_ks, out_vs = write(jax.jit(jaxattn.update_kv_cache), k, v, new_k, new_v,
                                         positions, key_scale=ks, value_scale=vs)
    rows_k, scales_k = expected_rows(new_k, dtype)
    rows_v, scales_v = expected_rows(new_v, dtype)
    ref = [x.copy() if x is not None else None for x in (k, v, ks, vs)]
    pos = positions if ragged else positions[:, None] + np.arange(t)
    for i in range(b):
        for j in range(t):
            p = pos[i, j]
            if 0 <= p < smax:
                ref[0][i, p], ref[1][i, p] = rows_k[i, j], rows_v[i, j]
                if scales_k is not None:
                    ref[2][i, p], ref[3][i, p] = scales_k[i, j], scales_v[i, j]
    for got, want in zip((out_k, out_v, out_ks, out_vs), ref):
        if want is None:
            assert got is None
        else:
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_paged_write(rng, dtype):
    pages, page, kh, h = 7, 4, 2, 8
    k, v, ks, vs = empty_cache((pages, page, kh, h), dtype)
    tables = np.array([[5, 2, 0], [1, -1, 99]], np.int32)  # pages in any order; bad ids
    positions = np.array([[0, 3, 4, 9, 12], [2, 3, 4, 8, -1]], np.int32)
    new_k = rng.standard_normal((2, 5, kh, h)).astype(np.float32)
    new_v = rng.standard_normal((2, 5, kh, h + 8)).astype(np.float32)
    out_k, out_v, out_ks, out_vs = write(jax.jit(jaxattn.update_paged_kv_cache), k, v, new_k,
                                         new_v, tables, positions, key_scale=ks,
                                         value_scale=vs)
    rows_k, scales_k = expected_rows(new_k, dtype)
    rows_v, scales_v = expected_rows(new_v, dtype)
    ref = [x.copy() if x is not None else None for x in (k, v, ks, vs)]
    for i in range(2):
        for j in range(5):
            p = positions[i, j]
            if not 0 <= p < 3 * page:
                continue  # before the start or past the table: dropped
            pg = tables[i, p // page]
            if not 0 <= pg < pages:
                continue  # a bad page id: dropped
            ref[0][pg, p % page], ref[1][pg, p % page] = rows_k[i, j], rows_v[i, j]
            if scales_k is not None:
                ref[2][pg, p % page], ref[3][pg, p % page] = scales_k[i, j], scales_v[i, j]
    for got, want in zip((out_k, out_v, out_ks, out_vs), ref):
        if want is not None:
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn],
                         ids=["bf16", "int8", "e4m3"])
def test_donated_cache_is_updated_in_place(rng, dtype):
    """Under donation the results live in the donated buffers (no copy of the cache); without
    donation the inputs are left unchanged."""
    shape = (2, 4096, 4, 64)
    k, v, ks, vs = (jnp.asarray(x) if x is not None else None
                    for x in empty_cache(shape, dtype))
    new = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), jnp.float32)
    new_v = jnp.asarray(rng.standard_normal((2, 1, 4, 72)), jnp.float32)
    pos = jnp.array([10, 4000], jnp.int32)
    kwargs = dict(key_scale=ks, value_scale=vs) if quantized(dtype) else {}
    # Without donation: the caches given stay as they were.
    before = np.asarray(k).copy()
    jax.block_until_ready(jax.jit(jaxattn.update_kv_cache)(k, v, new, new_v, pos, **kwargs))
    np.testing.assert_array_equal(np.asarray(k).view(np.uint8), before.view(np.uint8))
    # Donated: the results use the same buffers.
    donated = [k, v] + ([ks, vs] if quantized(dtype) else [])
    pointers = [x.unsafe_buffer_pointer() for x in donated]
    step = jax.jit(jaxattn.update_kv_cache,
                   donate_argnames=("key_cache", "value_cache", "key_scale", "value_scale"))
    out = jax.block_until_ready(step(k, v, new, new_v, pos, **kwargs))
    assert [x.unsafe_buffer_pointer() for x in out] == pointers
    assert all(x.is_deleted() for x in donated)
    # The compiled step aliases every cache to its result and copies none of them.
    hlo = step.lower(*(jnp.zeros_like(x) for x in out[:2]), new, new_v, pos,
                     **{n: jnp.zeros_like(x) for n, x in zip(("key_scale", "value_scale"),
                                                             out[2:])}).compile().as_text()
    assert hlo.count("may-alias") == len(out) or hlo.count("must-alias") == len(out)
    assert " copy(" not in hlo
    # Paged, donated, in place too.
    tables = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    kp, vp = (x.reshape(-1, 512, *x.shape[2:]) for x in out[:2])
    kw = {}
    if quantized(dtype):
        kw = dict(key_scale=out[2].reshape(-1, 512, 4), value_scale=out[3].reshape(-1, 512, 4))
    pointers = [x.unsafe_buffer_pointer() for x in (kp, vp, *kw.values())]
    paged_step = jax.jit(jaxattn.update_paged_kv_cache,
                         donate_argnames=("key_pages", "value_pages", "key_scale",
                                          "value_scale"))
    out = paged_step(kp, vp, new, new_v, tables, pos, **kw)
    assert [x.unsafe_buffer_pointer() for x in out] == pointers


def test_write_then_decode(rng):
    """Prefill a prompt into an int8 cache in one write, then decode: the same as decoding the
    cache quantized directly."""
    b, smax, n, kh, h, t = 2, 64, 8, 2, 32, 20
    k = rng.standard_normal((b, t, kh, h)).astype(np.float32)
    v = rng.standard_normal((b, t, kh, h)).astype(np.float32)
    cache = (jnp.zeros((b, smax, kh, h), jnp.int8), jnp.zeros((b, smax, kh, h), jnp.int8))
    scales = (jnp.zeros((b, smax, kh)), jnp.zeros((b, smax, kh)))
    kc, vc, ks, vs = jaxattn.update_kv_cache(*cache, k, v, np.zeros(b, np.int32),
                                             key_scale=scales[0], value_scale=scales[1])
    q = rng.standard_normal((b, 1, n, h)).astype(np.float32)
    lengths = np.array([t, t], np.int32)
    out = jaxattn.decode_attention(q, kc, vc, lengths, key_scale=ks, value_scale=vs)
    (kq, kqs), (vq, vqs) = jaxattn.quantize_kv(k, jnp.int8), jaxattn.quantize_kv(v, jnp.int8)
    ref = jaxattn.decode_attention(q, kq, vq, lengths, key_scale=kqs, value_scale=vqs)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_vmap(rng):
    k = v = empty_cache((2, 8, 1, 4), np.float32)[0]
    new = rng.standard_normal((3, 2, 1, 1, 4)).astype(np.float32)
    pos = np.array([[0, 1], [2, 3], [7, 8]], np.int32)
    out = jax.vmap(jaxattn.update_kv_cache, in_axes=(None, None, 0, 0, 0))(k, v, new, new, pos)
    for i in range(3):
        want = jaxattn.update_kv_cache(k, v, new[i], new[i], pos[i])
        np.testing.assert_array_equal(np.asarray(out[0][i]), np.asarray(want[0]))
    # Mapped pools (one per instance) and tables.
    pools = np.stack([k.reshape(4, 4, 1, 4)] * 3)
    tables = np.array([[[3, 0], [1, 2]], [[1, 2], [0, 3]], [[0, -1], [2, 3]]], np.int32)
    out = jax.vmap(jaxattn.update_paged_kv_cache)(pools, pools, new, new, tables, pos)
    for i in range(3):
        want = jaxattn.update_paged_kv_cache(pools[i], pools[i], new[i], new[i], tables[i],
                                             pos[i])
        np.testing.assert_array_equal(np.asarray(out[0][i]), np.asarray(want[0]))


def test_bad_arguments():
    k = np.zeros((2, 8, 2, 4), np.float32)
    new = np.zeros((2, 1, 2, 4), np.float32)
    pos = np.zeros(2, np.int32)
    q8 = np.zeros((2, 8, 2, 4), np.int8)
    s = np.zeros((2, 8, 2), np.float32)
    with pytest.raises(ValueError, match="key_scale"):
        jaxattn.update_kv_cache(q8, q8, new, new, pos, value_scale=s)
    with pytest.raises(ValueError, match="only for quantized"):
        jaxattn.update_kv_cache(k, k, new, new, pos, key_scale=s)
    with pytest.raises(ValueError, match="value_scale must be float32"):
        jaxattn.update_kv_cache(q8, q8, new, new, pos, key_scale=s, value_scale=s[:, :4])
    with pytest.raises(TypeError, match="both be quantized"):
        jaxattn.update_kv_cache(k, q8, new, new, pos)
    with pytest.raises(ValueError, match="positions"):
        jaxattn.update_kv_cache(k, k, new, new, np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="positions"):
        jaxattn.update_kv_cache(k, k, new, new, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="key .* must match key_cache"):
        jaxattn.update_kv_cache(k, k, new[..., :3], new, pos)
    with pytest.raises(ValueError, match="batch"):
        jaxattn.update_kv_cache(k, k, new[:1], new[:1], pos[:1])
    with pytest.raises(ValueError, match="block_tables"):
        jaxattn.update_paged_kv_cache(k, k, new, new, np.zeros(2, np.int32), pos)
