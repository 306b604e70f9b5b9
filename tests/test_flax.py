"""jaxattn.flax: the drop-in attention_fn and the nnx/linen FlashSelfAttention modules."""

from __future__ import annotations

import inspect
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

import jaxattn  # noqa: E402
import jaxattn.flax  # noqa: E402
from jaxattn.flax import _common, attention_fn  # noqa: E402
from jaxattn.flax.linen import FlashSelfAttention as LinenFlash  # noqa: E402
from jaxattn.flax.nnx import FlashSelfAttention as NnxFlash  # noqa: E402
from oracle import attention_reference  # noqa: E402

F32_TOL = dict(rtol=2e-5, atol=2e-5)


def _normal(rng: np.random.Generator, shape, dtype=np.float32) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _padding_mask(lengths, length: int) -> jax.Array:
    """Flax-style [B, 1, T, T] float mask: query and key both inside the sequence."""
    valid = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    return nn.make_attention_mask(valid, valid)


# --------------------------------------------------------------------------------------------
# attention_fn: the drop-in
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", [nnx.dot_product_attention, nn.dot_product_attention])
def test_attention_fn_names_every_parameter_flax_passes(flavour):
    # linen filters kwargs by inspect.signature: a missing name (mask!) would be dropped.
    ours = inspect.signature(attention_fn).parameters
    theirs = inspect.signature(flavour).parameters
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    assert list(ours)[:5] == ["query", "key", "value", "bias", "mask"]
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ours.values())


@pytest.mark.parametrize("case", ["none", "causal_mask", "is_causal", "key_padding", "bias",
                                  "gqa", "two_batch_dims", "unbatched"])
def test_attention_fn_matches_flax_function(rng, case):
    b, t, s, n, h = 2, 19, 23, 4, 16
    k_heads = 2 if case == "gqa" else n
    lead = (3, b) if case == "two_batch_dims" else () if case == "unbatched" else (b,)
    if case in ("causal_mask", "is_causal"):
        s = t
    q = _normal(rng, lead + (t, n, h))
    k = _normal(rng, lead + (s, k_heads, h))
    v = _normal(rng, lead + (s, k_heads, h))
    kwargs = {}
    if case == "causal_mask":
        kwargs["mask"] = nn.make_causal_mask(jnp.ones(lead + (t,)))  # float [.., 1, T, T]
    elif case == "is_causal":
        kwargs["is_causal"] = True
    elif case == "key_padding":
        keep = np.arange(s)[None, :] < np.array([s, 7])[:, None]
        kwargs["mask"] = jnp.asarray(keep[:, None, None, :])  # bool [B, 1, 1, S]
    elif case == "bias":
        kwargs["bias"] = _normal(rng, (n, t, s))
    elif case == "two_batch_dims":  # a mask with both batch dims, and a bias with one
        kwargs["mask"] = jnp.asarray(rng.random(lead + (1, t, s)) < 0.8)
        kwargs["bias"] = _normal(rng, (b, n, t, s))
    actual = attention_fn(q, k, v, **kwargs)
    # nnx's function cannot broadcast a bias over some batch dims only; linen's has no GQA and
    # no is_causal.
    flavours = {"two_batch_dims": [nn], "gqa": [nnx], "is_causal": [nnx]}.get(case, [nnx, nn])
    for flavour in flavours:
        expected = flavour.dot_product_attention(q, k, v, **kwargs)
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        np.testing.assert_allclose(actual, expected, **F32_TOL)


def test_attention_fn_dropout_runs_and_deterministic_does_not_drop(rng):
    q = _normal(rng, (1, 5, 2, 8))
    dropped = attention_fn(q, q, q, dropout_rate=0.5, deterministic=False,
                           dropout_rng=jax.random.key(0))
    np.testing.assert_array_equal(dropped, jaxattn.flash_attention(
        q, q, q, dropout_rate=0.5, dropout_rng=jax.random.key(0), dropout_broadcast=True))
    np.testing.assert_allclose(attention_fn(q, q, q, dropout_rate=0.1, deterministic=True),
                               nnx.dot_product_attention(q, q, q), **F32_TOL)
    layer = nnx.MultiHeadAttention(2, 16, dropout_rate=0.1, attention_fn=attention_fn,
                                   decode=False, rngs=nnx.Rngs(0))
    x = _normal(rng, (1, 5, 16))
    assert layer(x, deterministic=False).shape == x.shape
    layer(x, deterministic=True)
    with pytest.raises(ValueError, match="dropout_rng"):
        attention_fn(q, q, q, dropout_rate=0.1, deterministic=False)
    # Custom einsums: Flax's ValueErrors for inconsistent ones, else not implemented.
    with pytest.raises(ValueError, match="together"):
        attention_fn(q, q, q, qk_attn_weights_einsum=jnp.einsum)
    with pytest.raises(ValueError, match="mutually exclusive"):
        attention_fn(q, q, q, precision=jax.lax.Precision.DEFAULT,
                     qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum)
    with pytest.raises(NotImplementedError, match="einsum"):
        attention_fn(q, q, q, qk_attn_weights_einsum=jnp.einsum,
                     attn_weights_value_einsum=jnp.einsum)


@pytest.mark.parametrize("q_shape, k_shape, v_shape, match", [
    ((2, 16, 4, 8), (16, 4, 8), (16, 4, 8), "same rank"),
    ((2, 16, 4, 8), (3, 16, 4, 8), (3, 16, 4, 8), "batch dims"),
    ((2, 16, 4, 8), (2, 16, 4, 8), (2, 15, 4, 8), "lengths must match"),
    ((2, 16, 4, 8), (2, 16, 4, 7), (2, 16, 4, 8), "depths must match"),
    ((1, 4, 5, 8), (1, 4, 2, 8), (1, 4, 2, 8), "must be (a )?multiple"),
])
def test_attention_fn_invalid_shapes_raise_as_flax(q_shape, k_shape, v_shape, match):
    """Flax's own messages (its tests match them), also with dropout on."""
    q, k, v = jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape)
    for flavour in (nnx.dot_product_attention, attention_fn):
        with pytest.raises(ValueError, match=match):
            flavour(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0))


def test_attention_fn_complex_inputs_raise_type_error():
    q = jnp.ones((1, 4, 2, 8), jnp.complex64)
    with pytest.raises(TypeError, match="complex"):
        attention_fn(q, q, q)
    with pytest.raises(TypeError, match="complex64"):
        jaxattn.flash_attention(q, q, q)


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_force_fp32_for_softmax_sows_float32_weights(rng, api):
    q = _normal(rng, (1, 6, 2, 8), jnp.bfloat16)
    if api == "linen":
        class Sower(nn.Module):
            force: bool

            @nn.compact
            def __call__(self, q):
                return attention_fn(q, q, q, module=self, force_fp32_for_softmax=self.force)

        for force, dtype in ((True, jnp.float32), (False, jnp.bfloat16)):
            _, state = Sower(force).apply({}, q, mutable=["intermediates"])
            (weights,) = state["intermediates"]["attention_weights"]
            assert weights.dtype == dtype
    else:
        class Sower(nnx.Module):
            pass

        for force, dtype in ((True, jnp.float32), (False, jnp.bfloat16)):
            module = Sower()
            _, state = nnx.capture(lambda m: attention_fn(q, q, q, module=m,
                                                          force_fp32_for_softmax=force),
                                   nnx.Intermediate)(module)
            weights = jax.tree.leaves(state)[0]
            assert weights.dtype == dtype


def test_attention_fn_dtype_promotion(rng):
    q = _normal(rng, (2, 9, 2, 16), jnp.bfloat16)
    k = _normal(rng, (2, 9, 2, 16), jnp.float32)
    out = attention_fn(q, k, k)  # promoted like Flax: bf16 + f32 -> f32
    assert out.dtype == jnp.float32
    out = attention_fn(q, k, k, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    ref = nnx.dot_product_attention(q.astype(jnp.float32), k, k)
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=3e-2, atol=3e-2)
    out16 = attention_fn(q.astype(jnp.float16), k.astype(jnp.float16), k.astype(jnp.float16))
    assert out16.dtype == jnp.float16
    np.testing.assert_allclose(out16.astype(np.float32), ref, rtol=1e-2, atol=1e-2)


def _nnx_pair(num_kv_heads=None, **kwargs):
    make = lambda **extra: nnx.MultiHeadAttention(
        num_heads=4, in_features=32, num_kv_heads=num_kv_heads, decode=False,
        rngs=nnx.Rngs(0), **kwargs, **extra)
    return make(), make(attention_fn=attention_fn)


@pytest.mark.parametrize("case", ["causal_mask", "padding", "is_causal", "gqa", "batch_dims"])
def test_nnx_multihead_drop_in(rng, case):
    t = 17
    x = _normal(rng, (3, 2, t, 32) if case == "batch_dims" else (2, t, 32))
    default, ours = _nnx_pair(num_kv_heads=2 if case == "gqa" else None)
    kwargs, rows = {}, slice(None)
    if case in ("causal_mask", "gqa", "batch_dims"):
        kwargs["mask"] = nn.make_causal_mask(jnp.ones(x.shape[:-1]))
    elif case == "is_causal":
        kwargs["is_causal"] = True
    else:
        kwargs["mask"] = _padding_mask([t, 11], t)
        rows = (1, slice(0, 11))  # padding query rows see nothing: jax.nn gives mean(V), we 0
    expected, actual = default(x, **kwargs), ours(x, **kwargs)
    np.testing.assert_allclose(actual[rows], expected[rows], **F32_TOL)
    if case == "padding":
        np.testing.assert_allclose(actual[0], expected[0], **F32_TOL)


def _nnx_loss(model, x, mask):
    return jnp.sum(jnp.sin(model(x, mask=mask)))


def test_nnx_multihead_gradients_every_parameter(rng):
    x = _normal(rng, (2, 13, 32))
    mask = nn.make_causal_mask(jnp.ones((2, 13)))
    default, ours = _nnx_pair(num_kv_heads=2)
    g_default = nnx.grad(_nnx_loss)(default, x, mask)
    g_ours = nnx.grad(_nnx_loss)(ours, x, mask)
    leaves_d = jax.tree.leaves_with_path(nnx.state(g_default, nnx.Param))
    leaves_o = dict(jax.tree.leaves_with_path(nnx.state(g_ours, nnx.Param)))
    assert len(leaves_d) == 8  # q/k/v/out kernels and biases
    for path, gd in leaves_d:
        go = leaves_o[path]
        assert float(jnp.abs(gd).max()) > 0, path
        np.testing.assert_allclose(go, gd, rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_nnx_multihead_jit_decode_and_sow(rng):
    default, ours = _nnx_pair()
    x = _normal(rng, (2, 9, 32))
    mask = nn.make_causal_mask(jnp.ones((2, 9)))
    run = nnx.jit(lambda model, x, mask: model(x, mask=mask))
    np.testing.assert_allclose(run(ours, x, mask), default(x, mask=mask), **F32_TOL)
    # Flax's own decode mode passes a [B, 1, 1, Smax] mask over its cache.
    for model in (default, ours):
        model.init_cache((2, 9, 32))
    for i in range(9):
        step = x[:, i:i + 1]
        np.testing.assert_allclose(ours(step, decode=True), default(step, decode=True),
                                   **F32_TOL)
    # sow_weights: the weights are sown as Flax's default sows them.
    sown = []
    for model in (default, ours):
        model(x, mask=mask, sow_weights=True)
        sown.append(jax.tree.leaves(nnx.pop(model, nnx.Intermediate)))
    assert len(sown[0]) == len(sown[1]) == 1 and sown[0][0].shape == (2, 4, 9, 9)
    np.testing.assert_allclose(sown[1][0], sown[0][0], **F32_TOL)


@pytest.mark.parametrize("case", ["causal_mask", "padding", "two_batch_dims"])
def test_linen_multihead_drop_in(rng, case):
    t = 15
    x = _normal(rng, (2, 2, t, 24) if case == "two_batch_dims" else (2, t, 24))
    rows = slice(None)
    if case == "padding":
        mask = _padding_mask([t, 6], t)
        rows = (1, slice(0, 6))
    else:
        mask = nn.make_causal_mask(jnp.ones(x.shape[:-1]))
    default = nn.MultiHeadDotProductAttention(num_heads=3)
    ours = nn.MultiHeadDotProductAttention(num_heads=3, attention_fn=attention_fn)
    variables = default.init(jax.random.key(0), x)
    expected = default.apply(variables, x, mask=mask)
    actual = jax.jit(lambda v, x, m: ours.apply(v, x, mask=m))(variables, x, mask)
    np.testing.assert_allclose(actual[rows], expected[rows], **F32_TOL)
    if case == "padding":
        np.testing.assert_allclose(actual[0], expected[0], **F32_TOL)

    def loss(module, v):
        return jnp.sum(jnp.sin(module.apply(v, x, mask=mask)[rows]))

    g_default, g_ours = (jax.grad(loss, argnums=1)(m, variables) for m in (default, ours))
    flat_d = jax.tree.leaves_with_path(g_default)
    assert len(flat_d) == 8
    for (path, gd), go in zip(flat_d, jax.tree.leaves(g_ours)):
        assert float(jnp.abs(gd).max()) > 0, path
        np.testing.assert_allclose(go, gd, rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_linen_drop_in_honours_mask():
    # The verified pitfall: a (*args, **kwargs) attention_fn silently loses the mask in linen.
    x = jnp.ones((1, 6, 8)).at[:, -1].set(5.0)
    layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=attention_fn)
    variables = layer.init(jax.random.key(0), x)
    mask = nn.make_causal_mask(jnp.ones((1, 6)))
    masked = layer.apply(variables, x, mask=mask)
    unmasked = layer.apply(variables, x)
    assert not np.allclose(masked[:, 0], unmasked[:, 0])


# --------------------------------------------------------------------------------------------
# FlashSelfAttention: an independent float64 reference of the whole layer
# --------------------------------------------------------------------------------------------


def _rope_reference(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x [B, T, heads, H] float64: pairs (i, i + H/2) rotated by pos * theta^(-2i/H)."""
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for i in range(half):
        angle = positions * theta ** (-2.0 * i / x.shape[-1])
        c, s = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
        a, b = x[..., i], x[..., i + half]
        out[..., i], out[..., i + half] = a * c - b * s, b * c + a * s
    return out


def _project(p: dict, x: np.ndarray) -> np.ndarray:
    y = np.einsum("btf,fnh->btnh", x, np.asarray(p["kernel"], np.float64))
    return y + np.asarray(p["bias"], np.float64) if "bias" in p else y


def _layer_reference(params: dict, x, *, is_causal=True, local_window_size=None,
                     logits_soft_cap=None, use_rope=False, rope_theta=10000.0, mask=None):
    """The layer in float64 NumPy from its parameter dict {query, key, value, out}."""
    x = np.asarray(x, np.float64)
    q, k, v = (_project(params[name], x) for name in ("query", "key", "value"))
    if use_rope:
        pos = np.arange(x.shape[1], dtype=np.float64)
        q, k = _rope_reference(q, pos, rope_theta), _rope_reference(k, pos, rope_theta)
    y, _ = attention_reference(q, k, v, mask=mask, is_causal=is_causal,
                               local_window_size=local_window_size,
                               logits_soft_cap=logits_soft_cap)
    out = np.einsum("btnh,nhf->btf", y, np.asarray(params["out"]["kernel"], np.float64))
    return out + np.asarray(params["out"]["bias"], np.float64) if "bias" in params["out"] \
        else out


def _nnx_params(model: NnxFlash) -> dict:
    return {name: {p: np.asarray(getattr(getattr(model, name), p)[...]) for p in
                   ("kernel", "bias") if getattr(getattr(model, name), p) is not None}
            for name in ("query", "key", "value", "out")}


LAYER_CASES = {
    "mha": dict(),
    "gqa_rope": dict(num_kv_heads=2, use_rope=True),
    "mqa_window_cap": dict(num_kv_heads=1, local_window_size=(4, 0), logits_soft_cap=5.0),
    "head_dim_no_bias": dict(head_dim=12, use_bias=False, out_features=20, rope_theta=100.0,
                             use_rope=True),
    "bidirectional": dict(is_causal=False, local_window_size=3),
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_nnx_layer_matches_reference(rng, name):
    kwargs = LAYER_CASES[name]
    model = NnxFlash(32, 4, rngs=nnx.Rngs(1), **kwargs)
    x = _normal(rng, (2, 23, 32))
    ref_kwargs = {k: v for k, v in kwargs.items() if k in
                  ("is_causal", "local_window_size", "logits_soft_cap", "use_rope", "rope_theta")}
    expected = _layer_reference(_nnx_params(model), x, **ref_kwargs)
    actual = model(x)
    assert actual.shape == expected.shape and actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    heads = kwargs.get("num_kv_heads", 4)
    assert model.key.kernel.shape == (32, heads, kwargs.get("head_dim", 8))


@pytest.mark.parametrize("name", ["mha", "gqa_rope", "mqa_window_cap"])
def test_linen_layer_matches_reference(rng, name):
    kwargs = LAYER_CASES[name]
    layer = LinenFlash(num_heads=4, **kwargs)
    x = _normal(rng, (2, 23, 32))
    variables = layer.init(jax.random.key(1), x)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "num_kv_heads"}
    expected = _layer_reference(variables["params"], x, **ref_kwargs)
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-4, atol=1e-5)


def test_nnx_layer_equals_flax_multihead_with_same_weights(rng):
    # Same parameter layout as nnx.MultiHeadAttention: its state loads as is.
    ours = NnxFlash(32, 4, num_kv_heads=2, rngs=nnx.Rngs(3))
    theirs = nnx.MultiHeadAttention(4, 32, num_kv_heads=2, decode=False, rngs=nnx.Rngs(4))
    nnx.update(theirs, nnx.state(ours, nnx.Param))
    x = _normal(rng, (2, 17, 32))
    np.testing.assert_allclose(ours(x), theirs(x, is_causal=True), **F32_TOL)


def test_layer_padding_mask_argument(rng):
    model = NnxFlash(16, 2, rngs=nnx.Rngs(0))
    x = _normal(rng, (2, 10, 16))
    keep = np.arange(10)[None, :] < np.array([10, 6])[:, None]
    mask = jnp.asarray(keep[:, None, None, :])
    expected = _layer_reference(_nnx_params(model), x, mask=np.asarray(mask))
    np.testing.assert_allclose(model(x, mask=mask), expected, rtol=1e-4, atol=1e-5)


def test_rope_is_relative(rng):
    # <rope(q, i), rope(k, j)> depends only on i - j.
    q, k = _normal(rng, (1, 1, 1, 16)), _normal(rng, (1, 1, 1, 16))
    score = lambda i, j: float(jnp.sum(_common.apply_rope(q, jnp.array([i]), 1e4)
                                       * _common.apply_rope(k, jnp.array([j]), 1e4)))
    assert score(7, 3) == pytest.approx(score(107, 103), rel=1e-4, abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
    np.testing.assert_allclose(_common.apply_rope(q, jnp.array([0]), 1e4), q)


def test_nnx_layer_gradients_every_parameter(rng):
    model = NnxFlash(16, 4, num_kv_heads=2, use_rope=True, rngs=nnx.Rngs(0))
    x = _normal(rng, (2, 11, 16))
    params = _nnx_params(model)

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)))

    grads, dx = nnx.grad(loss, argnums=(0, 1))(model, x)
    # Central differences of the float64 reference along one random direction per parameter.
    eps = 1e-4
    for name in ("query", "key", "value", "out"):
        for p in ("kernel", "bias"):
            g = np.asarray(getattr(getattr(grads, name), p)[...])
            direction = rng.standard_normal(g.shape)
            shifted = lambda sign: {**params, name: {**params[name], p: params[name][p]
                                                     + sign * eps * direction}}
            f = lambda prm: np.sum(np.sin(_layer_reference(prm, x, use_rope=True)))
            numeric = (f(shifted(1)) - f(shifted(-1))) / (2 * eps)
            assert np.sum(g * direction) == pytest.approx(numeric, rel=2e-3, abs=2e-4), (name, p)
    assert float(jnp.abs(dx).max()) > 0


def test_linen_layer_gradients_match_xla_autodiff(rng):
    # jax.grad through implementation="xla" is an independent gradient of the same layer.
    kwargs = dict(num_heads=4, num_kv_heads=2, use_rope=True, local_window_size=(5, 0))
    ours, xla = LinenFlash(**kwargs), LinenFlash(implementation="xla", **kwargs)
    x = _normal(rng, (2, 15, 16))
    variables = ours.init(jax.random.key(0), x)

    def loss(module, v, x):
        return jnp.sum(jnp.sin(module.apply(v, x)))

    g_ours, gx_ours = jax.jit(jax.grad(partial(loss, ours), argnums=(0, 1)))(variables, x)
    g_xla, gx_xla = jax.grad(partial(loss, xla), argnums=(0, 1))(variables, x)
    flat = jax.tree.leaves_with_path(g_ours)
    assert len(flat) == 8
    for (path, go), gx in zip(flat, jax.tree.leaves(g_xla)):
        assert float(jnp.abs(gx).max()) > 0, path
        np.testing.assert_allclose(go, gx, rtol=1e-4, atol=1e-5, err_msg=str(path))
    np.testing.assert_allclose(gx_ours, gx_xla, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_layer_is_causal(rng, flavour):
    x = _normal(rng, (2, 20, 16))
    x2 = x.at[:, 12:].set(_normal(rng, (2, 8, 16)))
    if flavour == "nnx":
        model = NnxFlash(16, 2, use_rope=True, rngs=nnx.Rngs(0))
        y, y2 = model(x), model(x2)
    else:
        layer = LinenFlash(num_heads=2, use_rope=True)
        variables = layer.init(jax.random.key(0), x)
        y, y2 = layer.apply(variables, x), layer.apply(variables, x2)
    np.testing.assert_array_equal(y[:, :12], y2[:, :12])
    assert not np.allclose(y[:, 12:], y2[:, 12:])


# --------------------------------------------------------------------------------------------
# Decoding with the KV cache
# --------------------------------------------------------------------------------------------

DECODE_CASES = {
    "gqa_rope": dict(num_kv_heads=2, use_rope=True),
    "mqa_window_cap": dict(num_kv_heads=1, local_window_size=(5, 0), logits_soft_cap=3.0),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
@pytest.mark.parametrize("chunks", [(1,) * 21, (9, 1, 1, 10), (20, 1)])
def test_nnx_decode_reproduces_full_forward(rng, name, chunks):
    model = NnxFlash(32, 4, rngs=nnx.Rngs(0), **DECODE_CASES[name])
    x = _normal(rng, (2, 21, 32))
    full = model(x)
    model.init_cache(batch_size=2, max_length=32)
    outs, start = [], 0
    for size in chunks:
        outs.append(model(x[:, start:start + size], decode=True))
        start += size
    assert int(model.cache_index[...]) == 21
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **F32_TOL)


def test_nnx_decode_under_jit(rng):
    model = NnxFlash(32, 4, num_kv_heads=2, use_rope=True, rngs=nnx.Rngs(0))
    x = _normal(rng, (2, 12, 32))
    full = nnx.jit(lambda m, x: m(x))(model, x)
    model.init_cache(batch_size=2, max_length=12)
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outs = [step(model, x[:, i:i + 1]) for i in range(12)]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **F32_TOL)
    with pytest.raises(ValueError, match="overflow"):
        model(x[:, :1], decode=True)


# A step past max_length under jit: dynamic_update_slice clamps the write, so the step would
# attend to a wrong cache. It must fail at run time instead (issue 13, item 2): the decode
# kernel's strict_lengths check for steps and prefill chunks of any size, a host check for
# implementation="xla".
# (A host callback's error reaches Python as a ValueError, a kernel's as JaxRuntimeError.)
RUN_TIME_ERRORS = (jax.errors.JaxRuntimeError, ValueError)
OVERFLOWS = {"decode_kernel": ((1,) * 4, 1), "prefill_chunk": ((20,), 20),
             "xla": ((1,) * 4, 1)}


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_nnx_cache_overflow_under_jit_fails_at_run_time(rng, case):
    fill, step_size = OVERFLOWS[case]
    implementation = "xla" if case == "xla" else "jaxattn"
    model = NnxFlash(16, 2, rngs=nnx.Rngs(0), implementation=implementation)
    model.init_cache(batch_size=1, max_length=sum(fill))
    step = nnx.jit(lambda m, x: m(x, decode=True))
    for size in fill:
        jax.block_until_ready(step(model, _normal(rng, (1, size, 16))))
    with pytest.raises(RUN_TIME_ERRORS, match="overflow"):
        jax.block_until_ready(step(model, _normal(rng, (1, step_size, 16))))


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_linen_cache_overflow_under_jit_fails_at_run_time(rng, case):
    fill, step_size = OVERFLOWS[case]
    layer = LinenFlash(num_heads=2, implementation="xla" if case == "xla" else "jaxattn")
    x = _normal(rng, (1, 4, 16))
    variables = layer.init(jax.random.key(0), x)
    _, state = layer.apply(variables, batch_size=1, max_length=sum(fill),
                           method=layer.init_cache, mutable=["cache"])
    step = jax.jit(lambda v, x: layer.apply(v, x, decode=True, mutable=["cache"]))
    for size in fill:
        out, state = step({**variables, **state}, _normal(rng, (1, size, 16)))
        jax.block_until_ready(out)
    with pytest.raises(RUN_TIME_ERRORS, match="overflow"):
        out, _ = step({**variables, **state}, _normal(rng, (1, step_size, 16)))
        jax.block_until_ready(out)


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_linen_decode_reproduces_full_forward(rng, name):
    layer = LinenFlash(num_heads=4, **DECODE_CASES[name])
    x = _normal(rng, (2, 14, 32))
    variables = layer.init(jax.random.key(0), x)
    full = layer.apply(variables, x)
    _, state = layer.apply(variables, batch_size=2, max_length=16, method=layer.init_cache,
                           mutable=["cache"])
    assert state["cache"]["cached_key"].shape == (2, 16, layer.num_kv_heads or 4, 8)
    step = jax.jit(lambda v, x: layer.apply(v, x, decode=True, mutable=["cache"]))
    outs = []
    for size in (5, 1, 1, 1, 6):
        start = sum(o.shape[1] for o in outs)
        out, state = step({**variables, **state}, x[:, start:start + size])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **F32_TOL)


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_xla_implementation_flag_matches(rng, flavour):
    # implementation="xla" swaps only the attention call: same parameters, same outputs.
    kwargs = dict(num_kv_heads=2, use_rope=True, local_window_size=(6, 0))
    x = _normal(rng, (2, 19, 32))
    if flavour == "nnx":
        ours = NnxFlash(32, 4, rngs=nnx.Rngs(0), **kwargs)
        xla = NnxFlash(32, 4, rngs=nnx.Rngs(0), implementation="xla", **kwargs)
        np.testing.assert_allclose(xla(x), ours(x), **F32_TOL)
        xla.init_cache(batch_size=2, max_length=19)
        steps = [xla(x[:, :7], decode=True)] + [xla(x[:, i:i + 1], decode=True)
                                                 for i in range(7, 19)]
        np.testing.assert_allclose(jnp.concatenate(steps, 1), ours(x), **F32_TOL)
    else:
        ours, xla = LinenFlash(num_heads=4, **kwargs), LinenFlash(num_heads=4,
                                                                   implementation="xla",
                                                                   **kwargs)
        variables = ours.init(jax.random.key(0), x)
        np.testing.assert_allclose(xla.apply(variables, x), ours.apply(variables, x),
                                   **F32_TOL)
    with pytest.raises(ValueError, match="implementation"):
        NnxFlash(32, 4, implementation="cudnn", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="soft_cap"):
        NnxFlash(32, 4, implementation="xla", logits_soft_cap=5.0, rngs=nnx.Rngs(0))


def test_decode_errors(rng):
    model = NnxFlash(16, 2, rngs=nnx.Rngs(0))
    x = _normal(rng, (1, 1, 16))
    with pytest.raises(ValueError, match="init_cache"):
        model(x, decode=True)
    model.init_cache(batch_size=2, max_length=4)
    with pytest.raises(ValueError, match="batch"):
        model(x, decode=True)
    bidirectional = NnxFlash(16, 2, is_causal=False, rngs=nnx.Rngs(0))
    bidirectional.init_cache(batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="causal"):
        bidirectional(x, decode=True)
    layer = LinenFlash(num_heads=2)
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="init_cache"):
        layer.apply(variables, x, decode=True, mutable=["cache"])


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        NnxFlash(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible"):
        NnxFlash(18, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="even head_dim"):
        NnxFlash(12, 4, use_rope=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="local_window_size"):
        NnxFlash(16, 4, local_window_size=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_length"):
        NnxFlash(16, 4, rngs=nnx.Rngs(0)).init_cache(batch_size=1, max_length=0)


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_layer_low_precision(rng, dtype):
    model = NnxFlash(32, 4, num_kv_heads=2, use_rope=True, dtype=dtype, rngs=nnx.Rngs(0))
    x = _normal(rng, (2, 16, 32))
    y = model(x)
    assert y.dtype == dtype and model.query.kernel.dtype == jnp.float32
    expected = _layer_reference(_nnx_params(model), x, use_rope=True)
    np.testing.assert_allclose(y.astype(np.float32), expected, rtol=5e-2, atol=5e-2)
    model.init_cache(batch_size=2, max_length=16)  # cache in the layer's dtype
    assert model.cached_key.dtype == dtype
    outs = [model(x[:, i:i + 1], decode=True) for i in range(16)]
    np.testing.assert_allclose(jnp.concatenate(outs, 1).astype(np.float32),
                               y.astype(np.float32), rtol=5e-2, atol=5e-2)


def test_layer_param_dtype_bfloat16(rng):
    layer = LinenFlash(num_heads=2, param_dtype=jnp.bfloat16)
    x = _normal(rng, (1, 8, 16), jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["query"]["kernel"].dtype == jnp.bfloat16
    assert layer.apply(variables, x).dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------------
# Block-sparse masks
# --------------------------------------------------------------------------------------------


def _global_local(length: int, **kwargs):
    return jaxattn.masks.global_local(length, window=(5, 2), global_tokens=[0, 9], block_q=8,
                                      block_kv=16, **kwargs)


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_layer_sparse_mask_matches_reference(rng, flavour):
    length = 40
    sparse = _global_local(length)  # bidirectional: the layer ANDs its own causal mask
    kwargs = dict(num_kv_heads=2, use_rope=True, sparse_mask=sparse)
    x = _normal(rng, (2, length, 32))
    dense = np.asarray(sparse.to_dense())[None] & np.tril(np.ones((length, length), bool))
    if flavour == "nnx":
        model = NnxFlash(32, 4, rngs=nnx.Rngs(0), **kwargs)
        params, y = _nnx_params(model), model(x)
        y_xla = NnxFlash(32, 4, rngs=nnx.Rngs(0), implementation="xla", **kwargs)(x)
    else:
        layer = LinenFlash(num_heads=4, **kwargs)
        variables = layer.init(jax.random.key(0), x)
        params, y = variables["params"], layer.apply(variables, x)
        y_xla = LinenFlash(num_heads=4, implementation="xla", **kwargs).apply(variables, x)
    expected = _layer_reference(params, x, use_rope=True, is_causal=False, mask=dense)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y_xla, y, **F32_TOL)


def test_layer_sparse_mask_per_head_window_and_grads(rng):
    length, heads = 24, 2
    per_head = jaxattn.masks.from_function(lambda h, q, k: (k <= q) & ((q - k) % (h + 2) == 0),
                                           length, num_heads=heads, block_q=8, block_kv=8)
    model = NnxFlash(16, heads, is_causal=False, local_window_size=(6, 0),
                     sparse_mask=per_head, rngs=nnx.Rngs(0))
    x = _normal(rng, (1, length, 16))
    dense = np.asarray(per_head.to_dense())
    rows, cols = np.arange(length)[:, None], np.arange(length)[None, :]
    dense = dense & (cols >= rows - 6) & (cols <= rows + 6)
    expected = _layer_reference(_nnx_params(model), x, is_causal=False, mask=dense[None])
    np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-5)
    xla = NnxFlash(16, heads, is_causal=False, local_window_size=(6, 0), sparse_mask=per_head,
                   implementation="xla", rngs=nnx.Rngs(0))
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
    g_ours, g_xla = (nnx.grad(loss)(m, x) for m in (model, xla))
    for (path, go), gx in zip(jax.tree.leaves_with_path(nnx.state(g_ours, nnx.Param)),
                              jax.tree.leaves(nnx.state(g_xla, nnx.Param))):
        assert float(jnp.abs(gx).max()) > 0, path
        np.testing.assert_allclose(go, gx, rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_layer_sparse_mask_errors(rng):
    sparse = _global_local(16)
    model = NnxFlash(16, 2, sparse_mask=sparse, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="16 tokens"):
        model(_normal(rng, (1, 12, 16)))
    with pytest.raises(ValueError, match="mask"):
        model(_normal(rng, (1, 16, 16)), mask=jnp.ones((16, 16), bool))
    model.init_cache(batch_size=1, max_length=16)
    with pytest.raises(NotImplementedError, match="sparse_mask"):
        model(_normal(rng, (1, 1, 16)), decode=True)
    with pytest.raises(TypeError, match="BlockSparseMask"):
        NnxFlash(16, 2, sparse_mask=np.ones((16, 16), bool), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="square"):
        NnxFlash(16, 2, sparse_mask=jaxattn.masks.causal(16, 32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="heads"):
        NnxFlash(16, 2, rngs=nnx.Rngs(0), sparse_mask=jaxattn.masks.from_function(
            lambda h, q, k: k <= q, 16, num_heads=3))


def test_submodules_reachable_from_the_package():
    """`import jaxattn.flax` is enough to reach the nnx and linen modules (as the README shows)."""
    import importlib

    package = importlib.import_module("jaxattn.flax")
    assert package.nnx.FlashSelfAttention.__module__ == "jaxattn.flax.nnx"
    assert package.linen.FlashSelfAttention.__module__ == "jaxattn.flax.linen"
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        package.missing  # noqa: B018  (the access itself must raise)



# ------------------------------------------------------------------ quantized KV caches


def _quantized_reference(project, x, cache_dtype):
    """The layer's output when its keys and values pass through quantize_kv / dequantize_kv
    (what a quantized cache stores), by the float64 oracle: ``project(name, x)`` applies the
    layer's ``query``/``key``/``value``/``out`` projections."""
    q, k, v = (project(name, x) for name in ("query", "key", "value"))
    positions = jnp.arange(x.shape[1])
    q, k = _common.apply_rope(q, positions, 10000.0), _common.apply_rope(k, positions, 10000.0)
    deq = lambda t: np.asarray(jaxattn.dequantize_kv(*jaxattn.quantize_kv(t, cache_dtype)))
    y, _ = attention_reference(np.asarray(q), deq(k), deq(v), is_causal=True)
    return project("out", jnp.asarray(y, jnp.float32))


@pytest.mark.parametrize("cache_dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2],
                         ids=["int8", "e4m3", "e5m2"])
@pytest.mark.parametrize("chunks", [(20, 1, 1), (1,) * 6, (9, 3, 10)])
def test_nnx_quantized_cache_prefill_then_decode(rng, cache_dtype, chunks):
    """A prompt prefilled in one call (T = 20 > 16: the flash tiles over the quantized cache;
    T <= 16: the split-KV decode kernel), then token-by-token decoding: the output of
    attention over the quantized-then-dequantised keys and values."""
    model = NnxFlash(32, 4, num_kv_heads=2, use_rope=True, kv_cache_dtype=cache_dtype,
                     rngs=nnx.Rngs(0))
    x = _normal(rng, (2, sum(chunks), 32))
    model.init_cache(batch_size=2, max_length=32)
    assert model.cached_key[...].dtype == cache_dtype
    assert model.cached_key_scale[...].shape == (2, 32, 2)
    step = nnx.jit(lambda m, x: m(x, decode=True))
    outs, start = [], 0
    for size in chunks:
        outs.append(step(model, x[:, start:start + size]))
        start += size
    assert int(model.cache_index[...]) == start
    got = jnp.concatenate(outs, axis=1)
    ref = _quantized_reference(lambda name, t: getattr(model, name)(t), x, cache_dtype)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # And near the unquantized layer (the quantization error itself).
    full = model(x)
    assert float(jnp.max(jnp.abs(got - full)) / jnp.max(jnp.abs(full))) < 0.1


def test_linen_quantized_cache_prefill_then_decode(rng):
    layer = LinenFlash(num_heads=4, num_kv_heads=2, use_rope=True, kv_cache_dtype=jnp.int8)
    x = _normal(rng, (2, 24, 32))
    variables = layer.init(jax.random.key(0), x)
    _, state = layer.apply(variables, batch_size=2, max_length=24, method=layer.init_cache,
                           mutable=["cache"])
    assert state["cache"]["cached_key"].dtype == jnp.int8
    assert state["cache"]["cached_value_scale"].shape == (2, 24, 2)
    step = jax.jit(lambda v, x: layer.apply(v, x, decode=True, mutable=["cache"]))
    outs = []
    for size in (18, 1, 5):
        start = sum(o.shape[1] for o in outs)
        out, state = step({**variables, **state}, x[:, start:start + size])
        outs.append(out)
    def project(name, t):
        sub = {"query": nn.DenseGeneral((4, 8)), "key": nn.DenseGeneral((2, 8)),
               "value": nn.DenseGeneral((2, 8)), "out": nn.DenseGeneral(32, axis=(-2, -1))}[name]
        return sub.apply({"params": variables["params"][name]}, t)
    ref = _quantized_reference(project, x, jnp.int8)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, rtol=1e-4, atol=1e-4)


def test_kv_cache_dtype_must_be_quantized():
    with pytest.raises(TypeError, match="kv_cache_dtype"):
        NnxFlash(16, 4, kv_cache_dtype=jnp.float16, rngs=nnx.Rngs(0))
    layer = LinenFlash(num_heads=4, kv_cache_dtype="int4")
    x = jnp.zeros((1, 2, 16))
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="kv_cache_dtype"):
        layer.apply(variables, batch_size=1, max_length=4, method=layer.init_cache,
                    mutable=["cache"])
