"""float64 under jax_enable_x64: every op against the float64 oracle at ~1e-12 relative.

Each test runs with x64 on (the autouse fixture restores the flag afterwards, so nothing
leaks into other test files). Shapes are odd on purpose: T != S both ways, head dims off the
tile sizes (1, 17, 100), GQA and MQA, rows that see no key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
import jaxattn.flax
from jaxattn import masks
from oracle import attention_reference, attention_reference_grad, decode_visibility

# The float64 kernels accumulate in float64: errors are a few ulps of the largest magnitude.
RTOL = 1e-12


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _close(actual, expected, name="", rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == np.float64, f"{name}: dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"{name}: {actual.shape} vs {expected.shape}"
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(actual[~finite], expected[~finite], err_msg=name)
    scale = max(1.0, float(np.max(np.abs(expected[finite]), initial=0.0)))
    err = float(np.max(np.abs(actual[finite] - expected[finite]), initial=0.0))
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


def _inputs(rng, b, t, s, n, k, h, hv=None):
    hv = h if hv is None else hv
    return (rng.standard_normal((b, t, n, h)), rng.standard_normal((b, s, k, h)),
            rng.standard_normal((b, s, k, hv)))


# (B, T, S, N, K, H, Hv)
SHAPES = {
    "t_lt_s_gqa_h17": (2, 37, 53, 4, 2, 17, 9),
    "t_gt_s_mqa_h100": (1, 70, 29, 3, 1, 100, 100),
    "mha_h1": (2, 65, 130, 2, 2, 1, 3),
}

OPTIONS = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "window": dict(local_window_size=(5, 3)),
    "causal_window_cap": dict(is_causal=True, local_window_size=(9, 0), logits_soft_cap=4.0),
    "lengths": dict(query_seq_lengths=np.array([0, 30]), key_value_seq_lengths=np.array([7, 0])),
    "positions": dict(is_causal=True, query_positions=np.arange(100)[::-1].copy(),
                      key_value_positions=np.arange(200) // 2),
    "segments": dict(query_segment_ids=np.arange(100) // 17,
                     key_value_segment_ids=np.arange(200) // 23),
    "alibi": dict(is_causal=True, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625],
                                                        np.float32)),
    "scale": dict(scale=0.3),
}


def _options_for(name, b, t, s, n):
    """OPTIONS[name] cut to the shape (lengths per batch row, ids per position, slopes per
    head)."""
    opts = dict(OPTIONS[name])
    for key in ("query_positions", "query_segment_ids"):
        if key in opts:
            opts[key] = opts[key][:t]
    for key in ("key_value_positions", "key_value_segment_ids"):
        if key in opts:
            opts[key] = opts[key][:s]
    for key in ("query_seq_lengths", "key_value_seq_lengths"):
        if key in opts:
            opts[key] = np.resize(opts[key], b)
    if "alibi_slopes" in opts:
        opts["alibi_slopes"] = np.resize(opts["alibi_slopes"], n)
    return opts


def _check_flash(rng, shape, opts, bias=None, mask=None):
    b, t, s, n, k, h, hv = shape
    q, kk, v = _inputs(rng, b, t, s, n, k, h, hv)
    out, lse = jaxattn.flash_attention(q, kk, v, bias=bias, mask=mask, return_residual=True,
                                       **opts)
    ref_out, ref_lse = attention_reference(q, kk, v, bias, mask, **opts)
    _close(out, ref_out, "out")
    _close(lse, ref_lse, "lse")
    dout = rng.standard_normal(out.shape)
    args = (q, kk, v) if bias is None else (q, kk, v, bias)

    def loss(*xs):
        x_bias = None if bias is None else xs[3]
        return jnp.sum(jaxattn.flash_attention(*xs[:3], bias=x_bias, mask=mask, **opts) * dout)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
    ref = attention_reference_grad(q, kk, v, dout, bias, mask, **opts)
    for g, r, name in zip(grads, ref, ("dq", "dk", "dv", "dbias")):
        _close(g, r, name)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_flash_matches_oracle(rng, shape, option):
    b, t, s, n, *_ = SHAPES[shape]
    _check_flash(rng, SHAPES[shape], _options_for(option, b, t, s, n))


@pytest.mark.parametrize("bias_shape", ["full", "heads", "rows"])
def test_flash_bias_and_mask(rng, bias_shape):
    shape = (2, 33, 47, 4, 2, 17, 17)
    b, t, s, n = shape[:4]
    bias = rng.standard_normal({"full": (b, n, t, s), "heads": (1, n, 1, s),
                                "rows": (b, 1, t, 1)}[bias_shape])
    mask = rng.random((b, 1, t, s)) < 0.6
    mask[0, 0, 3] = False  # a row that sees nothing
    _check_flash(rng, shape, dict(logits_soft_cap=3.0), bias=bias, mask=mask)


def test_flash_dropout_matches_oracle(rng):
    # rate 1/4: threshold 2^30 exactly, so the kept weights' scale 4/3 is the oracle's.
    b, t, s, n, k, h = 2, 29, 41, 4, 2, 17
    q, kk, v = _inputs(rng, b, t, s, n, k, h)
    key = jax.random.key(3)
    opts = dict(is_causal=True, dropout_rate=0.25, dropout_rng=key)
    keep = np.asarray(jaxattn.dropout_mask(key, 0.25, b, n, t, s))
    multiplier = keep / 0.75
    out = jaxattn.flash_attention(q, kk, v, **opts)
    ref_out, _ = attention_reference(q, kk, v, is_causal=True, dropout_multiplier=multiplier)
    _close(out, ref_out, "out")
    dout = rng.standard_normal(out.shape)
    grads = jax.grad(lambda *x: jnp.sum(jaxattn.flash_attention(*x, **opts) * dout),
                     argnums=(0, 1, 2))(q, kk, v)
    ref = attention_reference_grad(q, kk, v, dout, is_causal=True,
                                   dropout_multiplier=multiplier)
    for g, r, name in zip(grads, ref, ("dq", "dk", "dv")):
        _close(g, r, name)


def _sdpa64(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
            local_window_size=None, implementation=None):
    """jax.nn.dot_product_attention's contract in plain jnp float64 (jax.nn's own XLA path
    runs its softmax in float32, ~1e-7 off for float64 inputs); differentiable both ways."""
    del implementation
    t, s = query.shape[-3], key.shape[-3]
    group = query.shape[-2] // key.shape[-2]
    key, value = (jnp.repeat(x, group, axis=-2) for x in (key, value))
    scale = 1 / np.sqrt(query.shape[-1]) if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", query, key) * scale
    if bias is not None:
        logits = logits + bias
    visible = jnp.ones((t, s), bool)
    if is_causal:
        visible &= jnp.tril(visible)
    if local_window_size is not None:
        left, right = local_window_size
        i, j = np.arange(t)[:, None], np.arange(s)[None, :]
        visible &= (j >= i - left) & (j <= i + right)
    if mask is not None:
        visible = visible & mask
    weights = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", weights, value)


def test_flash_forward_mode_matches_float64_reference(rng):
    """jvp / jacfwd run the float64 tangent kernel."""
    b, t, s, n, k, h = 1, 13, 21, 4, 2, 17
    q, kk, v = _inputs(rng, b, t, s, n, k, h)
    bias = rng.standard_normal((1, n, t, s))
    tangents = _inputs(rng, b, t, s, n, k, h) + (rng.standard_normal(bias.shape),)

    def ours(q, k, v, bias):
        return jaxattn.flash_attention(q, k, v, bias=bias, is_causal=True)

    def ref(q, k, v, bias):
        return _sdpa64(q, k, v, bias=bias, is_causal=True)

    out, tangent = jax.jvp(ours, (q, kk, v, bias), tangents)
    ref_out, ref_tangent = jax.jvp(ref, (q, kk, v, bias), tangents)
    _close(out, ref_out, "out")
    _close(tangent, ref_tangent, "tangent")
    jac = jax.jacfwd(lambda q: ours(q, kk, v, bias)[0, 2])(q)
    _close(jac, jax.jacfwd(lambda q: ref(q, kk, v, bias)[0, 2])(q), "jacfwd")


def test_flash_jit_vmap(rng):
    b, t, s, n, k, h = 3, 19, 27, 2, 1, 17
    q, kk, v = _inputs(rng, b, t, s, n, k, h)
    f = jax.jit(jax.vmap(lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True)))
    _close(f(q, kk, v), attention_reference(q, kk, v, is_causal=True)[0], "vmap")


def test_flash_unbatched_and_empty(rng):
    q, k, v = _inputs(rng, 1, 5, 7, 2, 2, 3)
    out, lse = jaxattn.flash_attention(q[0], k[0], v[0], return_residual=True)
    ref = attention_reference(q[0], k[0], v[0])
    _close(out, ref[0], "out")
    _close(lse, ref[1], "lse")
    out, lse = jaxattn.flash_attention(q, k[:, :0], v[:, :0], return_residual=True)
    assert out.dtype == lse.dtype == jnp.float64
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == -np.inf)


SPARSE_MASKS = {
    "causal": lambda t, s: masks.causal(t, s, block_q=7, block_kv=11),
    "local": lambda t, s: masks.local(t, s, window=(6, 2), block_q=5, block_kv=3),
    "random": lambda t, s: masks.random(t, s, num_blocks=3, seed=1, block_q=16, block_kv=13),
}


@pytest.mark.parametrize("mask_name", list(SPARSE_MASKS))
@pytest.mark.parametrize("shape", ["t_lt_s_gqa_h17", "t_gt_s_mqa_h100"])
def test_block_sparse_matches_oracle(rng, mask_name, shape):
    b, t, s, n, k, h, hv = SHAPES[shape]
    q, kk, v = _inputs(rng, b, t, s, n, k, h, hv)
    mask = SPARSE_MASKS[mask_name](t, s)
    dense = np.asarray(mask.to_dense())
    out, lse = jaxattn.block_sparse_attention(q, kk, v, mask, logits_soft_cap=5.0,
                                              return_residual=True)
    ref_out, ref_lse = attention_reference(q, kk, v, mask=dense, logits_soft_cap=5.0)
    _close(out, ref_out, "out")
    _close(lse, ref_lse, "lse")
    dout = rng.standard_normal(out.shape)
    grads = jax.grad(lambda *x: jnp.sum(
        jaxattn.block_sparse_attention(*x, mask, logits_soft_cap=5.0) * dout),
        argnums=(0, 1, 2))(q, kk, v)
    ref = attention_reference_grad(q, kk, v, dout, mask=dense, logits_soft_cap=5.0)
    for g, r, name in zip(grads, ref, ("dq", "dk", "dv")):
        _close(g, r, name)
    # The same tiles as flash attention with the dense mask: bitwise equal, as in float32.
    flash = jax.grad(lambda *x: jnp.sum(
        jaxattn.flash_attention(*x, mask=dense[None], logits_soft_cap=5.0) * dout),
        argnums=(0, 1, 2))(q, kk, v)
    np.testing.assert_array_equal(out, jaxattn.flash_attention(
        q, kk, v, mask=dense[None], logits_soft_cap=5.0))
    for g, f in zip(grads, flash):
        np.testing.assert_array_equal(g, f)


def test_block_sparse_per_head_with_tokens(rng):
    b, t, s, n, k, h = 2, 40, 40, 4, 2, 17
    q, kk, v = _inputs(rng, b, t, s, n, k, h)
    mask = masks.from_function(lambda hh, i, j: (j <= i) & ((i - j) % (hh + 2) != 1), t, s,
                               num_heads=n, block_q=8, block_kv=8)
    seg = np.arange(t) // 13
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    opts = dict(query_segment_ids=seg, key_value_segment_ids=seg, alibi_slopes=slopes)
    out = jaxattn.block_sparse_attention(q, kk, v, mask, **opts)
    dense = np.asarray(mask.to_dense())
    _close(out, attention_reference(q, kk, v, mask=dense, **opts)[0], "out")


# Decoding: pages in a shuffled order, lengths below the capacity, GQA, every T regime.
@pytest.mark.parametrize("q_len", [1, 3, 20])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_matches_oracle(rng, q_len, paged):
    b, n, k, h, hv, page, pages_per_seq = 3, 4, 2, 17, 9, 5, 6
    capacity = page * pages_per_seq
    lengths = np.array([capacity, 21, q_len])
    q = rng.standard_normal((b, q_len, n, h))
    key_cache = rng.standard_normal((b, capacity, k, h))
    value_cache = rng.standard_normal((b, capacity, k, hv))
    opts = dict(local_window_size=(11, 0), logits_soft_cap=6.0)
    if paged:
        order = rng.permutation(b * pages_per_seq).astype(np.int32)
        block_tables = order.reshape(b, pages_per_seq)
        key_pages = np.zeros((b * pages_per_seq, page, k, h))
        value_pages = np.zeros((b * pages_per_seq, page, k, hv))
        for i in range(b):
            for j in range(pages_per_seq):
                key_pages[block_tables[i, j]] = key_cache[i, j * page:(j + 1) * page]
                value_pages[block_tables[i, j]] = value_cache[i, j * page:(j + 1) * page]
        out, lse = jaxattn.paged_decode_attention(q, key_pages, value_pages, block_tables,
                                                  lengths, return_residual=True, **opts)
    else:
        out, lse = jaxattn.decode_attention(q, key_cache, value_cache, lengths,
                                            return_residual=True, **opts)
    visible = decode_visibility(lengths, q_len, capacity, local_window_size=(11, 0))
    ref_out, ref_lse = attention_reference(q, key_cache, value_cache, mask=visible,
                                           logits_soft_cap=6.0)
    _close(out, ref_out, "out")
    _close(lse, ref_lse, "lse")


def test_decode_query_lengths_positions_alibi(rng):
    b, t, n, k, h, smax = 2, 4, 2, 1, 100, 23
    q = rng.standard_normal((b, t, n, h))
    kc, vc = rng.standard_normal((b, smax, k, h)), rng.standard_normal((b, smax, k, h))
    lengths, q_lengths = np.array([23, 9]), np.array([4, 2])
    slopes = np.array([0.25, 0.5], np.float32)
    out = jaxattn.decode_attention(q, kc, vc, lengths, query_lengths=q_lengths,
                                   alibi_slopes=slopes)
    # Token t of sequence b sits at len_b - T_b + t; rows t >= T_b output 0.
    qpos = lengths[:, None] - q_lengths[:, None] + np.arange(t)[None]
    visible = (np.arange(smax)[None, None, :] <= qpos[:, :, None]) & (
        np.arange(smax)[None, None, :] < lengths[:, None, None])
    visible &= (np.arange(t)[None, :] < q_lengths[:, None])[:, :, None]
    ref, _ = attention_reference(q, kc, vc, mask=visible[:, None], alibi_slopes=slopes,
                                 query_positions=qpos, key_value_positions=np.arange(smax))
    _close(out, ref, "out")


def test_decode_quantized_cache_with_float64_query_is_refused(rng):
    q = jnp.asarray(rng.standard_normal((1, 1, 2, 8)))
    values, scales = jaxattn.quantize_kv(jnp.ones((1, 4, 2, 8), jnp.float32), jnp.int8)
    with pytest.raises(TypeError, match="float64"):
        jaxattn.decode_attention(q, values, values, np.array([4]), key_scale=scales,
                                 value_scale=scales)


def test_merge_attention_states_float64(rng):
    b, t, s, n, k, h = 2, 9, 30, 2, 2, 17
    q, kk, v = _inputs(rng, b, t, s, n, k, h)
    parts = [jaxattn.flash_attention(q, kk[:, a:z], v[:, a:z], return_residual=True)
             for a, z in ((0, 11), (11, 30))]
    out, lse = jaxattn.merge_attention_states(jnp.stack([p[0] for p in parts]),
                                              jnp.stack([p[1] for p in parts]))
    ref_out, ref_lse = attention_reference(q, kk, v)
    _close(out, ref_out, "out")
    _close(lse, ref_lse, "lse")


def test_kernels_check_float64_operands():
    """The FFI handlers refuse mixed float64/float32 operands (a bypass of the Python checks)
    with an error instead of reading them at the wrong width."""
    from jaxattn import _ffi

    q = jnp.ones((1, 4, 2, 8))
    q32 = q.astype(jnp.float32)
    empty_i = jnp.zeros((0,), jnp.int32)
    lens = (empty_i, empty_i)
    with pytest.raises(Exception, match="float64 bias needs float64 inputs"):
        jax.block_until_ready(_ffi.flash_fwd_p.bind(
            q32, q32, q32, jnp.ones((1, 1, 4, 4)), jnp.zeros((0,), bool), *lens,
            *_ffi.no_tokens(), **_ffi.attention_attrs(1.0, None, False, None)))
    out, lse = _ffi.flash_fwd_p.bind(q, q, q, jnp.zeros((0,)), jnp.zeros((0,), bool), *lens,
                                     *_ffi.no_tokens(),
                                     **_ffi.attention_attrs(1.0, None, False, None))
    assert out.dtype == lse.dtype == jnp.float64
    with pytest.raises(Exception, match="must be float64 for float64 inputs"):
        jax.block_until_ready(_ffi.flash_bwd_p.bind(
            q, q, q, jnp.zeros((0,)), jnp.zeros((0,), bool), *lens, out,
            lse.astype(jnp.float32), out, jnp.zeros((0,), jnp.float32), *_ffi.no_tokens(),
            **_ffi.attention_attrs(1.0, None, False, None)))


def test_gated_linear_attention_refuses_float64():
    x = jnp.ones((1, 4, 2, 8))
    with pytest.raises(TypeError, match="no float64 kernels"):
        jaxattn.gated_linear_attention(x, x, x, -jnp.ones((1, 4, 2, 8)))


def test_float64_needs_x64():
    """Without x64 JAX makes float64 inputs float32: the float32 kernels run."""
    with jax.enable_x64(False):
        q = np.ones((1, 3, 2, 4))
        out = jaxattn.flash_attention(q, q, q)
        assert out.dtype == jnp.float32


# Flax: layers with dtype float64 (parameters float64 too) agree with implementation="xla"
# with jax.nn's attention replaced by the float64 reference above.
flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from jaxattn.flax.linen import FlashSelfAttention as LinenFlash  # noqa: E402
from jaxattn.flax.nnx import FlashSelfAttention as NnxFlash  # noqa: E402


@pytest.fixture
def float64_xla(monkeypatch):
    monkeypatch.setattr(jax.nn, "dot_product_attention", _sdpa64)


def test_nnx_float64_layer_and_decode(rng, float64_xla):
    kwargs = dict(num_kv_heads=2, use_rope=True, local_window_size=(6, 0), dtype=jnp.float64,
                  param_dtype=jnp.float64)
    ours = NnxFlash(32, 4, rngs=nnx.Rngs(0), **kwargs)
    xla = NnxFlash(32, 4, rngs=nnx.Rngs(0), implementation="xla", **kwargs)
    x = jnp.asarray(rng.standard_normal((2, 13, 32)))
    full = ours(x)
    assert full.dtype == jnp.float64
    _close(full, xla(x), "nnx", rtol=1e-11)
    ours.init_cache(batch_size=2, max_length=16)
    steps = [ours(x[:, :6], decode=True)] + [ours(x[:, i:i + 1], decode=True)
                                             for i in range(6, 13)]
    _close(jnp.concatenate(steps, axis=1), full, "nnx decode", rtol=1e-11)


def test_linen_float64_layer(rng, float64_xla):
    kwargs = dict(num_heads=4, num_kv_heads=1, dtype=jnp.float64, param_dtype=jnp.float64)
    ours, xla = LinenFlash(**kwargs), LinenFlash(implementation="xla", **kwargs)
    x = jnp.asarray(rng.standard_normal((2, 11, 32)))
    variables = ours.init(jax.random.key(0), x)
    out = ours.apply(variables, x)
    assert out.dtype == jnp.float64
    _close(out, xla.apply(variables, x), "linen", rtol=1e-11)
    grads = jax.grad(lambda v: jnp.sum(ours.apply(v, x) ** 2))(variables)
    ref = jax.grad(lambda v: jnp.sum(xla.apply(v, x) ** 2))(variables)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        _close(g, r, "linen grad", rtol=1e-10)


def test_flax_autoregressive_decode_with_x64():
    """Flax's nnx test of the same name with jaxattn's attention_fn swapped in."""
    x = jnp.ones((1, 4, 4))
    assert x.dtype == jnp.float64
    outs = []
    for fn in (jaxattn.flax.attention_fn, nnx.dot_product_attention):
        module = nnx.MultiHeadAttention(in_features=4, num_heads=2, qkv_features=4,
                                        decode=True, attention_fn=fn, rngs=nnx.Rngs(0))
        module.init_cache(x.shape, dtype=x.dtype)
        outs.append(jnp.concatenate([module(x[:, i:i + 1]) for i in range(4)], axis=1))
    assert outs[0].dtype == jnp.float64
    # Equal tokens: every step's output is the first one's (exact in float64; Flax's own
    # path is ~1e-8 off in places, so it bounds ours only loosely).
    _close(outs[0], jnp.broadcast_to(outs[0][:, :1], outs[0].shape), "decode")
    _close(outs[0], outs[1], "decode vs flax", rtol=1e-6)
