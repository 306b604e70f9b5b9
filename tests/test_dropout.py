"""Dropout on the attention weights (``dropout_rate``/``dropout_rng``) in the kernels.

The kernels draw the keep mask from a counter-based hash; ``jaxattn.dropout_mask`` computes the
same mask with jnp. The kernels are checked against the float64 oracle applying that mask
(forward and gradients, odd shapes, GQA, every mask kind, bf16), the mask's statistics (kept
fraction, independence of keys, mean preserved), reproducibility and the Flax integration.
Thread-count independence: the ``flash_f32_dropout`` row of ``reliability_cases.CASES``
(tests/test_determinism.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import (
    Shape,
    attention_reference,
    attention_reference_grad,
    naive_low_precision,
    naive_low_precision_grad,
    random_inputs,
)
from test_flash import (
    BF16,
    DIFFERENTIABLE,
    F32,
    Expected,
    assert_matches,
    ordered,
    random_cotangent,
    unreachable,
)

import jaxattn

KEY = jax.random.key(1234)


def multiplier(key: jax.Array, rate: float, shape: Shape, broadcast: bool = False) -> np.ndarray:
    """keep / (1 - rate) [B, N, T, S], the kernels' mask for this key."""
    mask = jaxattn.dropout_mask(key, rate, shape.batch, shape.num_heads, shape.q_len,
                                shape.kv_len, broadcast=broadcast)
    return np.asarray(mask, np.float64) / (1.0 - rate)


def check_dropout(rng: np.random.Generator, shape: Shape, dtype: np.dtype, rate: float, *,
                  bias: str | None = None, mask: str | None = None, key: jax.Array = KEY,
                  broadcast: bool = False, **options: Any) -> None:
    """Forward and gradients (query, key, value, bias) of flash_attention with dropout against
    the float64 oracle applying ``dropout_mask``'s mask."""
    inputs = random_inputs(rng, shape, dtype, bias=bias, mask=mask)
    drop = dict(dropout_rate=rate, dropout_rng=key, dropout_broadcast=broadcast)
    mult = multiplier(key, rate, shape, broadcast)
    query, key_, value, bias_, mask_ = ordered(inputs)
    zero = unreachable(inputs, options)

    attend = jax.jit(functools.partial(jaxattn.flash_attention, **options, **drop,
                                       return_residual=True))
    out, lse = attend(*ordered(inputs))
    ref = attention_reference(query, key_, value, bias_, mask_, dropout_multiplier=mult,
                              **options)
    naive = naive_low_precision(query, key_, value, dtype, bias_, mask_,
                                dropout_multiplier=mult, **options)
    assert_matches({"out": out, "lse": lse},
                   {"out": Expected(ref[0], naive[0], zero["out"]),
                    "lse": Expected(ref[1], naive[1], np.zeros_like(zero["out"]))}, dtype)

    dout = random_cotangent(rng, inputs)
    names = [n for n in DIFFERENTIABLE if inputs[n] is not None]

    @jax.jit
    def gradients(diff: dict[str, jax.Array], dout: jax.Array) -> dict[str, jax.Array]:
        def f(d: dict[str, jax.Array]) -> jax.Array:
            return jaxattn.flash_attention(**{**inputs, **d}, **options, **drop)
        return jax.vjp(f, diff)[1](dout)[0]

    actual = gradients({n: inputs[n] for n in names}, dout)
    extras = dict(bias=bias_, mask=mask_, dropout_multiplier=mult, **options)
    reference = attention_reference_grad(query, key_, value, dout, **extras)
    low = naive_low_precision_grad(query, key_, value, dout, dtype, **extras)
    expected = {n: Expected(r, lo, zero[n]) for n, r, lo in
                zip(DIFFERENTIABLE, reference, low) if inputs[n] is not None}
    assert_matches(actual, expected, dtype)


# --------------------------------------------------------------------------------------------
# Against the oracle
# --------------------------------------------------------------------------------------------

CASES = [
    pytest.param(Shape(2, 37, 53, 4, 2, 40), {}, id="gqa_odd"),
    pytest.param(Shape(1, 130, 150, 4, 2, 64), dict(is_causal=True), id="causal_multi_tile"),
    pytest.param(Shape(2, 97, 97, 4, 4, 32), dict(local_window_size=(20, 5), mask="B1TS",
                                                  bias="1NTS"), id="window_mask_bias"),
    pytest.param(Shape(1, 65, 200, 8, 2, 80, value_head_dim=48),
                 dict(logits_soft_cap=5.0, query_seq_lengths=np.array([50], np.int32),
                      key_value_seq_lengths=np.array([180], np.int32)), id="softcap_lengths"),
    pytest.param(Shape(2, 1, 300, 4, 1, 16), dict(mask="BNTS"), id="mqa_one_query"),
    pytest.param(Shape(1, 300, 5, 2, 2, 128), dict(is_causal=True), id="few_keys_h128"),
]


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"),
                                   pytest.param(BF16, id="bfloat16")])
@pytest.mark.parametrize("shape, options", CASES)
def test_matches_oracle_with_mask(rng, shape: Shape, options: dict, dtype: np.dtype) -> None:
    options = dict(options)
    bias, mask = options.pop("bias", None), options.pop("mask", None)
    check_dropout(rng, shape, dtype, 0.3, bias=bias, mask=mask, **options)


@pytest.mark.parametrize("rate", [0.05, 0.5, 0.9])
def test_rates(rng, rate: float) -> None:
    check_dropout(rng, Shape(2, 41, 67, 2, 1, 24), F32, rate, is_causal=True)


def test_broadcast_mask_shared_over_batch_and_heads(rng) -> None:
    shape = Shape(3, 29, 31, 4, 2, 16)
    check_dropout(rng, shape, F32, 0.4, broadcast=True)
    mask = np.asarray(jaxattn.dropout_mask(KEY, 0.4, 3, 4, 29, 31, broadcast=True))
    assert (mask == mask[:1, :1]).all()
    assert 0 < mask.sum() < mask.size


def test_float16_and_positions_segments_alibi(rng) -> None:
    ids = np.arange(60, dtype=np.int32) // 25
    check_dropout(rng, Shape(2, 60, 60, 4, 2, 32), np.dtype(np.float16), 0.2, is_causal=True,
                  query_segment_ids=ids, key_value_segment_ids=ids,
                  alibi_slopes=np.array([0.5, 0.25, 0.1, 0.05], np.float32))


def test_unbatched_and_vmap_over_keys(rng) -> None:
    shape = Shape(1, 23, 19, 2, 2, 16)
    inputs = random_inputs(rng, shape, F32)
    q, k, v = (inputs[n][0] for n in ("query", "key", "value"))
    keys = jax.random.split(KEY, 3)
    batched = jax.vmap(lambda key: jaxattn.flash_attention(
        q, k, v, dropout_rate=0.5, dropout_rng=key))(keys)
    for i in range(3):
        single = jaxattn.flash_attention(q, k, v, dropout_rate=0.5, dropout_rng=keys[i])
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(single))
        mult = multiplier(keys[i], 0.5, shape)
        ref, _ = attention_reference(q, k, v, dropout_multiplier=mult)
        np.testing.assert_allclose(np.asarray(single), ref, rtol=2e-5, atol=2e-5)
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[1]))


def test_rate_zero_is_no_dropout(rng) -> None:
    inputs = random_inputs(rng, Shape(2, 33, 33, 2, 2, 16), F32)
    plain = jaxattn.flash_attention(*ordered(inputs), is_causal=True)
    zero = jaxattn.flash_attention(*ordered(inputs), is_causal=True, dropout_rate=0.0,
                                   dropout_rng=KEY)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(zero))


# --------------------------------------------------------------------------------------------
# Block-sparse attention: the same mask as the dense kernels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"),
                                   pytest.param(BF16, id="bfloat16")])
def test_block_sparse_matches_flash_with_dense_mask(rng, dtype: np.dtype) -> None:
    t, n = 150, 4
    sparse = jaxattn.masks.causal(t, block_q=32, block_kv=16) & jaxattn.masks.local(
        t, window=(40, 0), block_q=32, block_kv=16)
    dense = np.asarray(sparse.to_dense())
    inputs = random_inputs(rng, Shape(2, t, t, n, 2, 32), dtype)
    q, k, v = (inputs[name] for name in ("query", "key", "value"))
    dout = random_cotangent(rng, inputs)
    drop = dict(dropout_rate=0.25, dropout_rng=KEY)

    def run(f):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(dout))

    got = jax.jit(lambda: run(lambda *a: jaxattn.block_sparse_attention(*a, sparse, **drop)))()
    want = jax.jit(lambda: run(lambda *a: jaxattn.flash_attention(*a, mask=dense, **drop)))()
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=1e-6, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------------------------
# The mask: statistics, reproducibility
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.75])
def test_kept_fraction(rate: float) -> None:
    mask = np.asarray(jaxattn.dropout_mask(KEY, rate, 2, 4, 256, 256))
    kept = mask.mean()
    sigma = np.sqrt(rate * (1 - rate) / mask.size)
    assert abs(kept - (1 - rate)) < 6 * sigma, (kept, 1 - rate)
    # Every row, column, head and batch alike (no structure along any axis).
    for axis in range(4):
        other = tuple(a for a in range(4) if a != axis)
        per = mask.mean(axis=other)
        count = mask.size // mask.shape[axis]
        assert np.all(np.abs(per - (1 - rate)) < 6 * np.sqrt(rate * (1 - rate) / count)), axis
    # Neighbouring keys and queries independent: P(both kept) = (1 - rate)^2.
    for pair in (mask[..., 1:] & mask[..., :-1], mask[:, :, 1:] & mask[:, :, :-1]):
        assert abs(pair.mean() - (1 - rate) ** 2) < 6 * np.sqrt(
            (1 - rate) ** 2 * (1 - (1 - rate) ** 2) / pair.size)


def test_mean_preserved(rng) -> None:
    """With V = 1 every undropped row sums to 1: the dropped output averages to 1, and over
    many keys the dropped output averages to the undropped one."""
    shape = Shape(2, 64, 96, 4, 2, 16)
    inputs = random_inputs(rng, shape, F32)
    q, k = inputs["query"], inputs["key"]
    ones = np.ones(shape.value, np.float32)
    out = jaxattn.flash_attention(q, k, ones, dropout_rate=0.3, dropout_rng=KEY)
    assert abs(float(np.mean(out)) - 1.0) < 0.02
    v = inputs["value"]
    plain = np.asarray(jaxattn.flash_attention(q, k, v), np.float64)
    keys = jax.random.split(jax.random.key(7), 200)
    drop = jax.jit(jax.vmap(lambda key: jaxattn.flash_attention(
        q, k, v, dropout_rate=0.3, dropout_rng=key)))
    mean = np.asarray(drop(keys), np.float64).mean(axis=0)
    # Per entry the average of 200 draws has a standard deviation of about
    # sqrt(rate / (1 - rate) * sum P^2 v^2 / 200) < 0.05 here.
    assert np.abs(mean - plain).mean() < 0.02
    assert np.abs(mean - plain).max() < 0.25


def test_reproducible_and_keys_differ(rng) -> None:
    inputs = random_inputs(rng, Shape(2, 40, 40, 2, 2, 16), F32)
    f = jax.jit(lambda key: jaxattn.flash_attention(*ordered(inputs), dropout_rate=0.5,
                                                    dropout_rng=key))
    a, b = f(KEY), f(KEY)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = f(jax.random.key(99))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # Eager and jitted agree bitwise; the legacy uint32 key format works too.
    eager = jaxattn.flash_attention(*ordered(inputs), dropout_rate=0.5, dropout_rng=KEY)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(eager))
    legacy = jaxattn.flash_attention(*ordered(inputs), dropout_rate=0.5,
                                     dropout_rng=jax.random.PRNGKey(3))
    assert legacy.shape == a.shape
    m1 = np.asarray(jaxattn.dropout_mask(KEY, 0.5, 2, 2, 40, 40))
    m2 = np.asarray(jaxattn.dropout_mask(jax.random.key(99), 0.5, 2, 2, 40, 40))
    assert 0.3 < (m1 != m2).mean() < 0.7
    # A batch row's and head's mask does not depend on how many there are.
    m3 = np.asarray(jaxattn.dropout_mask(KEY, 0.5, 3, 5, 40, 40))
    np.testing.assert_array_equal(m1, m3[:2, :2])


# --------------------------------------------------------------------------------------------
# Differentiation, validation
# --------------------------------------------------------------------------------------------


def test_forward_mode_raises_clearly(rng) -> None:
    inputs = random_inputs(rng, Shape(1, 8, 8, 2, 2, 8), F32)
    q, k, v = (inputs[n] for n in ("query", "key", "value"))
    f = lambda q: jaxattn.flash_attention(q, k, v, dropout_rate=0.1, dropout_rng=KEY)
    with pytest.raises(NotImplementedError, match="dropout_rate > 0"):
        jax.jvp(f, (q,), (q,))
    with pytest.raises(NotImplementedError, match="dropout_rate > 0"):
        jax.jacfwd(f)(q)
    # Reverse mode works, second derivatives raise.
    jax.grad(lambda q: f(q).sum())(q)
    with pytest.raises(NotImplementedError):
        jax.grad(lambda q: jax.grad(lambda q: f(q).sum())(q).sum())(q)


def test_gradient_by_finite_differences(rng) -> None:
    """The custom VJP differentiates the function the forward computes (fixed mask)."""
    inputs = random_inputs(rng, Shape(1, 9, 11, 2, 1, 8), F32)
    q, k, v = (inputs[n] for n in ("query", "key", "value"))
    f = lambda q, k, v: jnp.sum(jnp.sin(jaxattn.flash_attention(
        q, k, v, dropout_rate=0.4, dropout_rng=KEY)))
    grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    eps = 1e-2
    for i, (x, g) in enumerate(zip((q, k, v), grads)):
        direction = rng.standard_normal(x.shape).astype(np.float32)
        args = [q, k, v]
        args[i] = x + eps * direction
        plus = f(*args)
        args[i] = x - eps * direction
        minus = f(*args)
        numeric = (float(plus) - float(minus)) / (2 * eps)
        analytic = float(np.sum(np.asarray(g) * direction))
        assert abs(numeric - analytic) < 2e-2 * max(1.0, abs(analytic)), (i, numeric, analytic)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dropout_rate=1.0, dropout_rng=KEY), ValueError, "dropout_rate must be in"),
    (dict(dropout_rate=-0.1, dropout_rng=KEY), ValueError, "dropout_rate must be in"),
    (dict(dropout_rate=0.1), ValueError, "dropout_rng"),
    (dict(dropout_rate="0.1", dropout_rng=KEY), TypeError, "dropout_rate"),
    (dict(dropout_rate=True, dropout_rng=KEY), TypeError, "dropout_rate"),
    (dict(dropout_rate=0.1, dropout_rng=np.float32(3)), TypeError, "dropout_rng"),
    (dict(dropout_rate=0.1, dropout_rng=jax.random.split(KEY, 2)), ValueError, "dropout_rng"),
    (dict(dropout_rate=0.1, dropout_rng=KEY, dropout_broadcast=1), TypeError,
     "dropout_broadcast"),
])
def test_validation(kwargs: dict, error: type, match: str) -> None:
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(error, match=match):
        jaxattn.flash_attention(q, q, q, **kwargs)
    mask = jaxattn.masks.causal(4, block_q=2, block_kv=2)
    with pytest.raises(error, match=match):
        jaxattn.block_sparse_attention(q, q, q, mask, **kwargs)


def test_traced_rate_is_a_type_error() -> None:
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(TypeError, match="dropout_rate must be a concrete"):
        jax.jit(lambda r: jaxattn.flash_attention(q, q, q, dropout_rate=r,
                                                  dropout_rng=KEY))(0.1)


# --------------------------------------------------------------------------------------------
# Flax
# --------------------------------------------------------------------------------------------


def test_flax_attention_fn_dropout(rng) -> None:
    from jaxattn.flax import attention_fn

    inputs = random_inputs(rng, Shape(2, 16, 16, 4, 4, 8), F32)
    q, k, v = (inputs[n] for n in ("query", "key", "value"))
    for broadcast in (True, False):
        got = attention_fn(q, k, v, dropout_rate=0.2, dropout_rng=KEY, deterministic=False,
                           broadcast_dropout=broadcast)
        want = jaxattn.flash_attention(q, k, v, dropout_rate=0.2, dropout_rng=KEY,
                                       dropout_broadcast=broadcast)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    plain = jaxattn.flash_attention(q, k, v)
    same = attention_fn(q, k, v, dropout_rate=0.2, dropout_rng=KEY, deterministic=True)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    # Two batch dims (folded into one for the kernels).
    q5 = jnp.stack([q, q])
    out5 = attention_fn(q5, q5, q5, dropout_rate=0.2, dropout_rng=KEY, deterministic=False)
    assert out5.shape == q5.shape


def test_flax_nnx_multihead_attention_trains_with_dropout() -> None:
    from flax import nnx

    from jaxattn.flax import attention_fn

    layer = nnx.MultiHeadAttention(4, 32, dropout_rate=0.3, attention_fn=attention_fn,
                                   decode=False, rngs=nnx.Rngs(0, dropout=1))
    x = jax.random.normal(jax.random.key(2), (2, 12, 32))
    train = layer(x, deterministic=False)
    again = layer(x, deterministic=False)  # the dropout stream advances: a new mask
    evaluation = layer(x, deterministic=True)
    assert not np.allclose(np.asarray(train), np.asarray(evaluation))
    assert not np.allclose(np.asarray(train), np.asarray(again))

    def loss(model):
        return jnp.mean(model(x, deterministic=False) ** 2)

    grads = nnx.grad(loss)(layer)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_flax_linen_multihead_attention_with_dropout() -> None:
    import flax.linen as nn

    from jaxattn.flax import attention_fn

    layer = nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.3,
                                            attention_fn=attention_fn)
    x = jax.random.normal(jax.random.key(2), (2, 12, 32))
    params = layer.init(jax.random.key(0), x, deterministic=True)
    a = layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    b = layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    c = layer.apply(params, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_flash_self_attention_layers_dropout() -> None:
    import flax.linen as nn
    from flax import nnx

    from jaxattn.flax.linen import FlashSelfAttention as LinenFlash
    from jaxattn.flax.nnx import FlashSelfAttention as NnxFlash

    x = jax.random.normal(jax.random.key(2), (2, 12, 32))
    layer = NnxFlash(32, 4, dropout_rate=0.3, rngs=nnx.Rngs(0, dropout=1))
    a, b = layer(x, deterministic=False), layer(x, deterministic=False)
    evaluation = layer(x, deterministic=True)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(evaluation))
    with pytest.raises(ValueError, match="deterministic"):
        layer(x)
    plain = NnxFlash(32, 4, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(plain(x)), np.asarray(evaluation))

    module = LinenFlash(num_heads=4, dropout_rate=0.3, broadcast_dropout=False)
    params = module.init(jax.random.key(0), x, deterministic=True)
    c = module.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    d = module.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    e = module.apply(params, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    assert not np.allclose(np.asarray(c), np.asarray(e))
    assert isinstance(module, nn.Module)
