"""Forward-mode differentiation of ``flash_attention`` (``jax.jvp``, ``jax.linearize``,
``jax.jacfwd``) against the analytic float64 tangent of the oracle, and its consistency with
reverse mode (the tangent kernel's transpose is the backward pass)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import Shape, assert_close_to_oracle, attention_reference_jvp, random_inputs

import jaxattn

F32 = np.dtype(np.float32)
BF16 = np.dtype(jnp.bfloat16)
F16 = np.dtype(np.float16)


def tangents_like(rng: np.random.Generator, inputs: dict[str, Any]) -> dict[str, Any]:
    return {name: None if x is None else rng.standard_normal(x.shape).astype(x.dtype)
            for name, x in inputs.items() if name in ("query", "key", "value", "bias")}


def check_jvp(rng: np.random.Generator, shape: Shape, dtype: np.dtype, *, bias: str | None = None,
              mask: str | None = None, **options: Any) -> None:
    inputs = random_inputs(rng, shape, dtype, bias=bias, mask=mask)
    tangents = tangents_like(rng, inputs)
    names = [n for n in ("query", "key", "value", "bias") if inputs[n] is not None]

    def attend(*diff):
        return jaxattn.flash_attention(**{**inputs, **dict(zip(names, diff))}, **options,
                                       return_residual=True)

    (out, lse), (dout, dlse) = jax.jit(lambda p, t: jax.jvp(attend, p, t))(
        tuple(inputs[n] for n in names), tuple(tangents[n] for n in names))
    args = [inputs[n] for n in ("query", "key", "value")]
    targs = [tangents[n] for n in ("query", "key", "value")]
    extra = dict(bias=inputs["bias"], dbias=tangents.get("bias"), mask=inputs["mask"], **options)
    ref = attention_reference_jvp(*args, *targs, **extra)
    naive = attention_reference_jvp(*args, *targs, dtype=dtype, **extra)
    assert dout.dtype == dtype and dlse.dtype == F32
    assert_close_to_oracle(dout, ref[0], naive[0], dtype=dtype, name="dout")
    assert_close_to_oracle(dlse, ref[1], naive[1], dtype=dtype, name="dlse")


SHAPE = Shape(batch=2, q_len=37, kv_len=45, num_heads=4, num_kv_heads=2, head_dim=24,
              value_head_dim=20)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["float32", "bfloat16", "float16"])
def test_jvp_matches_the_oracle(rng: np.random.Generator, dtype: np.dtype) -> None:
    check_jvp(rng, SHAPE, dtype)


@pytest.mark.parametrize("options", [
    {"is_causal": True},
    {"is_causal": True, "local_window_size": (9, 2), "logits_soft_cap": 3.0, "scale": 0.7},
    {"key_value_seq_lengths": np.array([45, 11], np.int32),
     "query_seq_lengths": np.array([30, 37], np.int32)},
    {"bias": "1NTS", "mask": "B1TS"},
    {"bias": "BNTS", "logits_soft_cap": 2.0},
], ids=["causal", "window_cap_scale", "lengths", "bias_mask", "full_bias_cap"])
def test_jvp_with_every_option(rng: np.random.Generator, options: dict[str, Any]) -> None:
    options = dict(options)
    check_jvp(rng, SHAPE, F32, bias=options.pop("bias", None), mask=options.pop("mask", None),
              **options)


def _packed_tokens(rng: np.random.Generator) -> dict[str, Any]:
    """Positions restarting at each packed sequence, segment ids and ALiBi slopes for SHAPE."""
    t, s = SHAPE.q_len, SHAPE.kv_len
    q_seg = np.sort(rng.integers(0, 3, (SHAPE.batch, t)), axis=1).astype(np.int32)
    kv_seg = np.sort(rng.integers(0, 3, (SHAPE.batch, s)), axis=1).astype(np.int32)

    def restart(seg: np.ndarray) -> np.ndarray:
        pos = np.zeros_like(seg)
        for b in range(seg.shape[0]):
            for i in range(1, seg.shape[1]):
                pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
        return pos

    return {"query_positions": restart(q_seg) + 3, "key_value_positions": restart(kv_seg),
            "query_segment_ids": q_seg, "key_value_segment_ids": kv_seg,
            "alibi_slopes": rng.uniform(0.01, 0.5, SHAPE.num_heads).astype(np.float32)}


@pytest.mark.parametrize("which", ["positions", "segments", "alibi", "all"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_jvp_with_token_operands(rng: np.random.Generator, which: str, dtype: np.dtype) -> None:
    """The tangent kernel reads the forward's positions, segment ids and ALiBi slopes (the
    tangent of attention that ignored them would differ from the oracle's)."""
    tokens = _packed_tokens(rng)
    keys = {"positions": ("query_positions", "key_value_positions"),
            "segments": ("query_segment_ids", "key_value_segment_ids"),
            "alibi": ("alibi_slopes",), "all": tuple(tokens)}[which]
    check_jvp(rng, SHAPE, dtype, is_causal=which != "alibi", logits_soft_cap=4.0,
              **{k: tokens[k] for k in keys})


@pytest.mark.parametrize("shape", [
    Shape(batch=1, q_len=130, kv_len=70, num_heads=8, num_kv_heads=1, head_dim=80),  # MQA, T > S
    Shape(batch=1, q_len=5, kv_len=200, num_heads=3, num_kv_heads=3, head_dim=7),  # T < S
], ids=["mqa_long_q", "short_q_odd_head_dim"])
def test_jvp_odd_shapes(rng: np.random.Generator, shape: Shape) -> None:
    check_jvp(rng, shape, F32, is_causal=True)


def test_fully_masked_rows_have_zero_tangents(rng: np.random.Generator) -> None:
    inputs = random_inputs(rng, SHAPE, F32)
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    mask = np.ones((SHAPE.batch, 1, SHAPE.q_len, SHAPE.kv_len), bool)
    mask[:, :, 3] = False  # row 3 sees nothing
    t = tangents_like(rng, inputs)
    _, (dout, dlse) = jax.jvp(
        lambda q, k, v: jaxattn.flash_attention(q, k, v, mask=mask, return_residual=True),
        (q, k, v), (t["query"], t["key"], t["value"]))
    assert np.all(np.asarray(dout)[:, 3] == 0) and np.all(np.asarray(dlse)[:, 3] == 0)


def test_forward_and_reverse_jacobians_agree(rng: np.random.Generator) -> None:
    shape = Shape(batch=1, q_len=6, kv_len=9, num_heads=2, num_kv_heads=1, head_dim=4)
    inputs = random_inputs(rng, shape, F32, bias="1NTS")
    q, k, v, bias = (inputs[n] for n in ("query", "key", "value", "bias"))

    def f(q, k, v, bias):
        out, lse = jaxattn.flash_attention(q, k, v, bias, is_causal=True, return_residual=True)
        return out, lse

    forward = jax.jacfwd(f, argnums=(0, 1, 2, 3))(q, k, v, bias)
    reverse = jax.jacrev(f, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for fwd_part, rev_part in zip(jax.tree.leaves(forward), jax.tree.leaves(reverse)):
        np.testing.assert_allclose(fwd_part, rev_part, rtol=2e-5, atol=2e-6)


def test_linearize_and_vmapped_tangents(rng: np.random.Generator) -> None:
    inputs = random_inputs(rng, SHAPE, F32)
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    f = lambda q: jaxattn.flash_attention(q, k, v, is_causal=True)
    tangents = rng.standard_normal((3,) + q.shape).astype(F32)
    out, f_lin = jax.linearize(f, q)
    by_linearize = jax.vmap(jax.jit(f_lin))(tangents)
    by_jvp = jax.vmap(lambda t: jax.jvp(f, (q,), (t,))[1])(tangents)
    np.testing.assert_array_equal(by_linearize, by_jvp)
    for i in range(3):
        np.testing.assert_array_equal(by_jvp[i], jax.jvp(f, (q,), (tangents[i],))[1])


def test_jvp_agrees_with_jax_nn(rng: np.random.Generator) -> None:
    """Where the semantics coincide (every row sees a key), jax.nn's tangent is the same."""
    inputs = random_inputs(rng, Shape(batch=2, q_len=37, kv_len=45, num_heads=4, num_kv_heads=2,
                                      head_dim=24), F32)
    primals = tuple(inputs[n] for n in ("query", "key", "value"))
    tangents = tuple(rng.standard_normal(x.shape).astype(F32) for x in primals)
    ours = jax.jvp(lambda *a: jaxattn.flash_attention(*a, is_causal=True), primals, tangents)
    theirs = jax.jvp(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True,
                                                             implementation="xla"),
                     primals, tangents)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4, atol=1e-5)


def test_second_derivatives_raise_a_clear_error(rng: np.random.Generator) -> None:
    inputs = random_inputs(rng, Shape(batch=1, q_len=5, kv_len=5, num_heads=1, num_kv_heads=1,
                                      head_dim=4), F32)
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    with pytest.raises(NotImplementedError, match="flash_attention: second derivatives"):
        jax.hessian(lambda q: jaxattn.flash_attention(q, k, v).sum())(q)
    with pytest.raises(NotImplementedError, match="flash_attention"):
        jax.grad(lambda q: jax.grad(lambda q: jaxattn.flash_attention(q, k, v).sum())(q).sum())(q)
