"""Tests of jaxattn.gated_linear_attention against the float64 recurrence (tests/oracle.py).

The kernels cut the sequence into chunks of 64 positions (cut further where the decay is
strong), and run T <= 4 step by step: lengths around those sizes, head dims off the vector
width, strong, zero and positive decay, an initial state, bf16/f16, jit, vmap and grad.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from _subprocess import CWD, python_env
from oracle import assert_close_to_oracle, gla_reference, gla_reference_grad

CHUNK = 64  # kGatedLinearChunk (cc/gated_linear.h)


def make_inputs(rng, batch, length, heads, key_dim, value_dim, *, decay=1.0, dtype=np.float32,
                gate_dtype=None, state=False, kv_heads=None, scalar_gate=False):
    """Standard-normal q, k, v; log gates uniform in [-decay, 0] (per key dim, or with
    ``scalar_gate`` one per head and step, [B, T, K]); key, value and gate with ``kv_heads``
    heads (default: ``heads``); optionally a state."""
    kv_heads = heads if kv_heads is None else kv_heads
    normal = lambda *shape: rng.standard_normal(shape).astype(dtype)
    q, k = normal(batch, length, heads, key_dim), normal(batch, length, kv_heads, key_dim)
    v = normal(batch, length, kv_heads, value_dim)
    gate_shape = (batch, length, kv_heads) + (() if scalar_gate else (key_dim,))
    g = (-decay * rng.random(gate_shape)).astype(gate_dtype or dtype)
    s0 = (rng.standard_normal((batch, heads, key_dim, value_dim)).astype(np.float32)
          if state else None)
    return q, k, v, g, s0


def check_forward(q, k, v, g, s0=None, *, scale=None, dtype=np.float32, rtol_floor=None):
    out, final = jaxattn.gated_linear_attention(q, k, v, g, scale=scale, initial_state=s0,
                                                return_final_state=True)
    ref_out, ref_final = gla_reference(q, k, v, g, scale=scale, initial_state=s0)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert final.dtype == jnp.float32 and final.shape == ref_final.shape
    assert_close_to_oracle(out, ref_out, dtype=dtype, name="out")
    assert_close_to_oracle(final, ref_final, dtype=np.float32, name="final_state")
    return out, final


def check_gradients(q, k, v, g, s0, rng, *, dtype=np.float32, with_final=True, factor=1.0):
    do = rng.standard_normal(q.shape[:3] + v.shape[-1:]).astype(q.dtype)
    if s0 is None:
        s0 = np.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), np.float32)
    dfinal = (rng.standard_normal((q.shape[0], q.shape[2], q.shape[3], v.shape[3]))
              .astype(np.float32) if with_final else None)

    def loss(q, k, v, g, s0):
        out, final = jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0,
                                                    return_final_state=True)
        total = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))
        return total + (jnp.sum(final * dfinal) if with_final else 0.0)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)
    refs = gla_reference_grad(q, k, v, g, do, initial_state=s0, dfinal_state=dfinal)
    for name, actual, ref, x in zip(("dquery", "dkey", "dvalue", "dlog_gate", "dinitial_state"),
                                    grads, refs, (q, k, v, g, s0)):
        assert actual.dtype == x.dtype and actual.shape == x.shape, name
        # The gate gradient is a running sum over the whole sequence: allow for its length.
        grow = factor * (1.0 + (np.sqrt(q.shape[1]) if name == "dlog_gate" else 0.0))
        tolerance_dtype = dtype if name != "dinitial_state" else np.float32
        assert_close_to_oracle(np.asarray(actual, np.float64) / grow, ref / grow,
                               dtype=tolerance_dtype, name=name)


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("length", [1, 3, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("state", [False, True], ids=["zero_state", "initial_state"])
def test_forward_lengths(rng, length, state):
    check_forward(*make_inputs(rng, 2, length, 3, 17, 9, state=state))


@pytest.mark.parametrize("key_dim,value_dim", [(1, 1), (3, 5), (8, 8), (17, 3), (100, 33),
                                               (256, 16), (16, 256)])
def test_forward_head_dims(rng, key_dim, value_dim):
    check_forward(*make_inputs(rng, 1, 70, 2, key_dim, value_dim, state=True))


@pytest.mark.parametrize("decay", [0.0, 0.02, 1.0, 8.0, 200.0])
def test_forward_decay_strengths(rng, decay):
    """Zero decay (linear attention), mild, strong (sub-chunks cut short, down to single rows)
    and extreme (exp underflows to 0 within one step)."""
    check_forward(*make_inputs(rng, 1, 150, 2, 12, 20, decay=decay, state=True))


def test_forward_mixed_decay_per_dimension(rng):
    """Some key dims forget within a step, others keep everything."""
    q, k, v, g, s0 = make_inputs(rng, 2, 140, 2, 24, 8, state=True)
    g[..., :8] = -50.0 * rng.random(g[..., :8].shape)
    g[..., 8:16] = 0.0
    check_forward(q, k, v, g, s0)


def test_full_reset_with_minus_infinity(rng):
    """log_gate = -inf forgets everything before: the output from there on equals a fresh run
    on the rest of the sequence."""
    q, k, v, g, s0 = make_inputs(rng, 1, 100, 2, 8, 8, state=True)
    g[:, 40] = -np.inf
    out = np.asarray(jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0))
    g_rest = g[:, 40:].copy()
    g_rest[:, 0] = 0.0
    fresh = np.asarray(jaxattn.gated_linear_attention(q[:, 40:], k[:, 40:], v[:, 40:], g_rest))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, 40:], fresh, rtol=1e-5, atol=1e-5)


def test_positive_gates_grow_the_state_exactly(rng):
    """Positive log gates are allowed (documented: unbounded growth) and follow the recurrence."""
    q, k, v, g, s0 = make_inputs(rng, 1, 100, 2, 8, 8, state=True)
    g = np.abs(g) * 0.05
    _, final = check_forward(q, k, v, g, s0)
    assert np.abs(final).max() > 10 * np.abs(s0).max()  # it did grow
    check_gradients(q, k, v, g, s0, rng)


def test_zero_log_gate_is_causal_linear_attention(rng):
    q, k, v, _, _ = make_inputs(rng, 2, 90, 3, 16, 12)
    out = jaxattn.gated_linear_attention(q, k, v, np.zeros_like(q), scale=0.5)
    mask = np.tril(np.ones((90, 90)))
    scores = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), k.astype(np.float64)) * mask
    expected = 0.5 * np.einsum("bnts,bsnd->btnd", scores, v.astype(np.float64))
    assert_close_to_oracle(out, expected, dtype=np.float32, name="out")


def test_constant_per_head_gate_is_retnet_retention(rng):
    """log_gate = log(gamma_n) broadcast over time and key dims: RetNet's parallel form
    out_t = sum_{s <= t} gamma^(t - s) (q_t . k_s) v_s (with the query scale)."""
    b, t, n, h = 2, 100, 4, 16
    q, k, v, _, _ = make_inputs(rng, b, t, n, h, h)
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(n))
    log_gate = np.log(gamma).astype(np.float32).reshape(1, 1, n, 1)  # broadcast
    out = jaxattn.gated_linear_attention(q, k, v, log_gate)
    pos = np.arange(t)
    decay = np.where(pos[:, None] >= pos[None, :],
                     gamma[:, None, None] ** (pos[:, None] - pos[None, :]), 0.0)  # [n, t, s]
    scores = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), k.astype(np.float64)) * decay
    expected = h ** -0.5 * np.einsum("bnts,bsnd->btnd", scores, v.astype(np.float64))
    assert_close_to_oracle(out, expected, dtype=np.float32, name="out")
    # The broadcast gate's gradient is summed back to its shape.
    dg = jax.grad(lambda g: jnp.sum(jaxattn.gated_linear_attention(q, k, v, g)))(log_gate)
    assert dg.shape == log_gate.shape and np.all(np.isfinite(np.asarray(dg)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("length", [3, 100])
def test_low_precision(rng, dtype, length):
    dtype = np.dtype(dtype)
    q, k, v, g, s0 = make_inputs(rng, 2, length, 2, 24, 40, dtype=dtype, state=True)
    check_forward(q, k, v, g, s0, dtype=dtype)
    check_gradients(q, k, v, g, s0, rng, dtype=dtype)


def test_float32_gate_with_bf16_inputs(rng):
    q, k, v, g, s0 = make_inputs(rng, 1, 80, 2, 16, 16, dtype=np.dtype(jnp.bfloat16),
                                 gate_dtype=np.float32, state=True)
    check_forward(q, k, v, g, s0, dtype=np.dtype(jnp.bfloat16))
    dg = jax.grad(lambda g: jnp.sum(jaxattn.gated_linear_attention(q, k, v, g)
                                    .astype(jnp.float32)))(g)
    assert dg.dtype == jnp.float32


def test_zero_length(rng):
    q, k, v, g, s0 = make_inputs(rng, 2, 0, 3, 5, 7, state=True)
    out, final = jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0,
                                                return_final_state=True)
    assert out.shape == (2, 0, 3, 7)
    np.testing.assert_array_equal(final, s0)
    out, final = jaxattn.gated_linear_attention(q, k, v, g, return_final_state=True)
    np.testing.assert_array_equal(final, np.zeros((2, 3, 5, 7), np.float32))
    grads = jax.grad(lambda s: jnp.sum(jaxattn.gated_linear_attention(
        q, k, v, g, initial_state=s, return_final_state=True)[1]))(s0)
    np.testing.assert_array_equal(grads, np.ones_like(s0))


def test_unbatched(rng):
    q, k, v, g, s0 = make_inputs(rng, 1, 30, 2, 8, 4, state=True)
    out, final = jaxattn.gated_linear_attention(q[0], k[0], v[0], g[0], initial_state=s0[0],
                                                return_final_state=True)
    ref_out, ref_final = gla_reference(q, k, v, g, initial_state=s0)
    assert_close_to_oracle(out, ref_out[0], dtype=np.float32, name="out")
    assert_close_to_oracle(final, ref_final[0], dtype=np.float32, name="final")


def test_scale(rng):
    check_forward(*make_inputs(rng, 1, 20, 2, 8, 4, state=True), scale=-1.7)


# -------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("step", [1, 3, 4, 7])
def test_decoding_in_steps_matches_one_call(rng, step):
    """Feeding the sequence in pieces, carrying the state, equals one call (steps of <= 4
    tokens run the recurrent kernel, longer ones the chunked one)."""
    q, k, v, g, s0 = make_inputs(rng, 2, 23, 2, 12, 10, state=True)
    full, full_state = jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0,
                                                      return_final_state=True)
    decode = jax.jit(lambda q, k, v, g, s: jaxattn.gated_linear_attention(
        q, k, v, g, initial_state=s, return_final_state=True))
    state, outs = s0, []
    for t in range(0, 23, step):
        piece = slice(t, t + step)
        out, state = decode(q[:, piece], k[:, piece], v[:, piece], g[:, piece], state)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(state, full_state, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("length", [1, 3, 70])
def test_donated_state_is_updated_in_place(rng, length):
    """final_state is aliased to initial_state: a donated state is updated in its own buffer
    (no copy in the compiled program), with the results of a call that keeps its input."""
    q, k, v, g, s0 = make_inputs(rng, 2, length, 3, 40, 100, decay=1.0, state=True)
    step = lambda q, k, v, g, s: jaxattn.gated_linear_attention(
        q, k, v, g, initial_state=s, return_final_state=True)
    expected = jax.jit(step)(q, k, v, g, s0)
    donating = jax.jit(step, donate_argnums=4)
    hlo = donating.lower(q, k, v, g, s0).compile().as_text()
    assert "output_to_operand_aliasing" in hlo
    assert not [line for line in hlo.splitlines() if " copy(" in line and "100]" in line]
    state = jnp.array(s0)
    buffer = state.unsafe_buffer_pointer()
    out, final = donating(q, k, v, g, state)
    assert state.is_deleted()
    assert final.unsafe_buffer_pointer() == buffer
    np.testing.assert_array_equal(out, expected[0])
    np.testing.assert_array_equal(final, expected[1])
    check_forward(q, k, v, g, s0)


def test_recurrent_kernel_against_oracle(rng):
    for length in (1, 2, 4):
        check_forward(*make_inputs(rng, 3, length, 2, 33, 17, decay=3.0, state=True))
        check_forward(*make_inputs(rng, 1, length, 1, 5, 128, state=False))


# ------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("length", [1, 4, 5, 64, 65, 150])
def test_gradients_lengths(rng, length):
    check_gradients(*make_inputs(rng, 2, length, 2, 12, 7, state=True), rng)


@pytest.mark.parametrize("key_dim,value_dim", [(1, 1), (3, 8), (17, 17), (100, 5), (256, 24)])
def test_gradients_head_dims(rng, key_dim, value_dim):
    check_gradients(*make_inputs(rng, 1, 70, 2, key_dim, value_dim, state=True), rng)


@pytest.mark.parametrize("decay", [0.0, 0.05, 5.0, 100.0])
def test_gradients_decay_strengths(rng, decay):
    check_gradients(*make_inputs(rng, 1, 140, 2, 10, 6, decay=decay, state=True), rng)


def test_gradients_without_state_or_final(rng):
    q, k, v, g, _ = make_inputs(rng, 2, 70, 2, 9, 11)
    do = rng.standard_normal(v.shape).astype(np.float32)
    grads = jax.grad(lambda *a: jnp.sum(jaxattn.gated_linear_attention(*a) * do),
                     argnums=(0, 1, 2, 3))(q, k, v, g)
    refs = gla_reference_grad(q, k, v, g, do)
    for name, actual, ref in zip("qkvg", grads, refs):
        grow = 1.0 + (np.sqrt(70) if name == "g" else 0.0)
        assert_close_to_oracle(np.asarray(actual) / grow, ref / grow, dtype=np.float32,
                               name=f"d{name}")


@pytest.mark.parametrize("kv_heads,scalar_gate", [(2, False), (1, True), (1, False)],
                         ids=["per_dim", "scalar_gqa", "gqa"])
def test_oracle_gradient_by_finite_differences(rng, kv_heads, scalar_gate):
    """The oracle's backward recurrence against central differences of its forward (with
    grouped kv heads and scalar gates: the sums over what they were expanded to)."""
    q, k, v, g, s0 = (x.astype(np.float64) for x in make_inputs(
        rng, 1, 9, 2, 3, 4, state=True, kv_heads=kv_heads, scalar_gate=scalar_gate))
    do = rng.standard_normal(q.shape[:3] + v.shape[-1:])
    dfinal = rng.standard_normal(s0.shape)

    def loss(q, k, v, g, s0):
        out, final = gla_reference(q, k, v, g, initial_state=s0)
        return np.sum(out * do) + np.sum(final * dfinal)

    grads = gla_reference_grad(q, k, v, g, do, initial_state=s0, dfinal_state=dfinal)
    args = [q, k, v, g, s0]
    for i, grad in enumerate(grads):
        direction = rng.standard_normal(args[i].shape)
        eps = 1e-6
        plus = list(args)
        plus[i] = args[i] + eps * direction
        minus = list(args)
        minus[i] = args[i] - eps * direction
        numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-6, atol=1e-8)


def test_kernel_gradient_by_finite_differences(rng):
    """The kernels' gradient along a random direction against central differences of the
    kernels' own forward (float32: a loose tolerance)."""
    q, k, v, g, s0 = make_inputs(rng, 1, 70, 2, 6, 5, decay=0.5, state=True)
    w = rng.standard_normal(v.shape).astype(np.float32)
    wf = rng.standard_normal(s0.shape).astype(np.float32)

    def loss(q, k, v, g, s0):
        out, final = jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0,
                                                    return_final_state=True)
        return jnp.sum(out * w) + jnp.sum(final * wf)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)
    args = [q, k, v, g, s0]
    for i, grad in enumerate(grads):
        direction = rng.standard_normal(args[i].shape).astype(np.float32)
        eps = 1e-2
        plus = list(args)
        plus[i] = args[i] + eps * direction
        minus = list(args)
        minus[i] = args[i] - eps * direction
        numeric = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
        analytic = float(jnp.sum(grad * direction))
        assert abs(analytic - numeric) <= 2e-3 * (abs(numeric) + 1.0), (i, analytic, numeric)


# ------------------------------------------------- scalar gates and grouped kv heads


@pytest.mark.parametrize("length", [1, 3, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_scalar_gate_and_kv_heads_forward(rng, length, kv_heads):
    """log_gate [B, T, K] (one gate per head and step) and K kv heads for N = 4 query heads:
    lengths through the recurrent kernel (T <= 4), one chunk and several."""
    check_forward(*make_inputs(rng, 2, length, 4, 17, 9, state=True, kv_heads=kv_heads,
                               scalar_gate=True))


@pytest.mark.parametrize("length", [1, 4, 5, 64, 65, 150])
@pytest.mark.parametrize("kv_heads,scalar_gate", [(3, True), (1, True), (1, False)],
                         ids=["scalar", "scalar_gqa", "gqa"])
def test_scalar_gate_and_kv_heads_gradients(rng, length, kv_heads, scalar_gate):
    check_gradients(*make_inputs(rng, 2, length, 3, 12, 7, state=True, kv_heads=kv_heads,
                                 scalar_gate=scalar_gate), rng)


@pytest.mark.parametrize("key_dim,value_dim", [(1, 1), (3, 5), (8, 8), (17, 3), (100, 33),
                                               (256, 16)])
def test_scalar_gate_head_dims(rng, key_dim, value_dim):
    inputs = make_inputs(rng, 1, 70, 2, key_dim, value_dim, state=True, scalar_gate=True)
    check_forward(*inputs)
    check_gradients(*inputs, rng)


@pytest.mark.parametrize("decay", [0.0, 0.02, 1.0, 8.0, 200.0])
def test_scalar_gate_decay_strengths(rng, decay):
    """As the per-dimension gate: sub-chunks cut where the summed gate spans too much, down to
    single rows, and an exp that underflows within one step."""
    inputs = make_inputs(rng, 1, 150, 2, 12, 20, decay=decay, state=True, scalar_gate=True)
    check_forward(*inputs)
    check_gradients(*inputs, rng)


def test_scalar_gate_equals_broadcast_per_dimension_gate(rng):
    """A [B, T, K] gate and the same gate broadcast to [B, T, K, Hk] (the other kernels) agree
    to rounding, gradients included (the scalar gate's is the sum over the key dims)."""
    q, k, v, g, s0 = make_inputs(rng, 2, 140, 4, 24, 16, decay=2.0, state=True, kv_heads=2,
                                 scalar_gate=True)
    wide = np.broadcast_to(g[..., None], g.shape + (24,)).copy()
    do = rng.standard_normal((2, 140, 4, 16)).astype(np.float32)

    def loss(q, k, v, g, s0):
        out, final = jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0,
                                                    return_final_state=True)
        return jnp.sum(out * do) + jnp.sum(final), (out, final)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    (*scalar_grads,), scalar_outs = grad(q, k, v, g, s0)
    (*wide_grads,), wide_outs = grad(q, k, v, wide, s0)
    wide_grads[3] = wide_grads[3].sum(-1)
    for name, a, b in zip(("out", "final", "dq", "dk", "dv", "dg", "ds0"),
                          (*scalar_outs, *scalar_grads), (*wide_outs, *wide_grads)):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(np.abs(b).max()),
                                   err_msg=name)


@pytest.mark.parametrize("gate_shape", [(2, 50, 2, 1), (1, 1, 2, 1), (2, 50, 2), (2, 1), ()],
                         ids=["BTK1", "11K1", "BTK", "K1", "scalar"])
def test_scalar_gate_shapes(rng, gate_shape):
    """Any gate whose last dim is 1, and a gate of rank one less than query ([B, T, K],
    broadcastable), is one gate per head and step; its gradient has its own shape."""
    q, k, v, _, s0 = make_inputs(rng, 2, 50, 2, 8, 6, state=True)
    g = (-rng.random(gate_shape)).astype(np.float32)
    full = np.broadcast_to(g[..., None] if g.ndim == 3 else g, (2, 50, 2, 1))[..., 0]
    out = jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0)
    ref, _ = gla_reference(q, k, v, np.ascontiguousarray(full), initial_state=s0)
    assert_close_to_oracle(out, ref, dtype=np.float32, name="out")
    dg = jax.grad(lambda g: jnp.sum(jaxattn.gated_linear_attention(q, k, v, g,
                                                                   initial_state=s0)))(g)
    assert dg.shape == g.shape and np.all(np.isfinite(np.asarray(dg)))


def test_scalar_gate_full_reset_and_positive_gates(rng):
    q, k, v, g, s0 = make_inputs(rng, 1, 100, 2, 8, 8, state=True, scalar_gate=True)
    g[:, 40] = -np.inf
    out = np.asarray(jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0))
    g_rest = g[:, 40:].copy()
    g_rest[:, 0] = 0.0
    fresh = np.asarray(jaxattn.gated_linear_attention(q[:, 40:], k[:, 40:], v[:, 40:], g_rest))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, 40:], fresh, rtol=1e-5, atol=1e-5)
    positive = np.abs(g[:, 41:]) * 0.05
    inputs = (q[:, 41:], k[:, 41:], v[:, 41:], positive, s0)
    _, final = check_forward(*inputs)
    assert np.abs(final).max() > 10 * np.abs(s0).max()
    check_gradients(*inputs, rng)


def test_scalar_gate_retnet_retention(rng):
    """A constant per head, [1, 1, N] against RetNet's parallel form."""
    b, t, n, h = 2, 100, 4, 16
    q, k, v, _, _ = make_inputs(rng, b, t, n, h, h)
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(n))
    out = jaxattn.gated_linear_attention(q, k, v, np.log(gamma).astype(np.float32)[None, None])
    pos = np.arange(t)
    decay = np.where(pos[:, None] >= pos[None, :],
                     gamma[:, None, None] ** (pos[:, None] - pos[None, :]), 0.0)
    scores = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), k.astype(np.float64)) * decay
    expected = h ** -0.5 * np.einsum("bnts,bsnd->btnd", scores, v.astype(np.float64))
    assert_close_to_oracle(out, expected, dtype=np.float32, name="out")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("length", [3, 100])
def test_scalar_gate_and_kv_heads_low_precision(rng, dtype, length):
    dtype = np.dtype(dtype)
    q, k, v, g, s0 = make_inputs(rng, 2, length, 4, 24, 40, dtype=dtype, state=True,
                                 kv_heads=2, scalar_gate=True)
    check_forward(q, k, v, g, s0, dtype=dtype)
    check_gradients(q, k, v, g, s0, rng, dtype=dtype)
    g32 = g.astype(np.float32)
    check_forward(q, k, v, g32, s0, dtype=dtype)
    dg = jax.grad(lambda g: jnp.sum(jaxattn.gated_linear_attention(q, k, v, g)
                                    .astype(jnp.float32)))(g32)
    assert dg.dtype == jnp.float32 and dg.shape == g32.shape


@pytest.mark.parametrize("step", [1, 3, 4, 7])
@pytest.mark.parametrize("scalar_gate", [True, False], ids=["scalar", "per_dim"])
def test_kv_heads_decoding_in_steps_matches_one_call(rng, step, scalar_gate):
    q, k, v, g, s0 = make_inputs(rng, 2, 23, 4, 12, 10, state=True, kv_heads=2,
                                 scalar_gate=scalar_gate)
    full, full_state = jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0,
                                                      return_final_state=True)
    decode = jax.jit(lambda q, k, v, g, s: jaxattn.gated_linear_attention(
        q, k, v, g, initial_state=s, return_final_state=True), donate_argnums=4)
    state, outs = jnp.array(s0), []
    for t in range(0, 23, step):
        piece = slice(t, t + step)
        out, state = decode(q[:, piece], k[:, piece], v[:, piece], g[:, piece], state)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(state, full_state, rtol=2e-5, atol=2e-5)
    check_forward(q[:, :1], k[:, :1], v[:, :1], g[:, :1], s0)


def test_kv_heads_equal_repeated_heads(rng):
    """K kv heads give what repeating key, value and gate over each group of N / K query heads
    gives (the repeat's gradients summed over the group)."""
    q, k, v, g, s0 = make_inputs(rng, 2, 90, 6, 8, 5, state=True, kv_heads=2)
    rep = lambda x: jnp.repeat(x, 3, axis=2)
    loss = lambda q, k, v, g, s: jnp.sum(jnp.sin(jaxattn.gated_linear_attention(
        q, k, v, g, initial_state=s)))
    grouped = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)
    repeated = jax.grad(lambda q, k, v, g, s: loss(q, rep(k), rep(v), rep(g), s),
                        argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)
    for a, b in zip(grouped, repeated):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kv_heads_vmap_jit_and_bad_shapes(rng):
    q, k, v, g, s0 = make_inputs(rng, 3, 40, 4, 8, 6, state=True, kv_heads=2, scalar_gate=True)
    f = lambda q, k, v, g, s: jaxattn.gated_linear_attention(q, k, v, g, initial_state=s,
                                                             return_final_state=True)
    out, final = jax.jit(jax.vmap(f, in_axes=(0, 0, 0, 0, 0)))(q[:, None], k[:, None],
                                                               v[:, None], g[:, None],
                                                               s0[:, None])
    ref_out, ref_final = gla_reference(q, k, v, g, initial_state=s0)
    assert_close_to_oracle(out[:, 0], ref_out, dtype=np.float32, name="out")
    assert_close_to_oracle(final[:, 0], ref_final, dtype=np.float32, name="final")
    out = jaxattn.gated_linear_attention(q[0], k[0], v[0], g[0], initial_state=s0[0])
    assert_close_to_oracle(out, ref_out[0], dtype=np.float32, name="unbatched")
    gla = jaxattn.gated_linear_attention
    k3, v3 = np.concatenate([k, k[:, :, :1]], 2), np.concatenate([v, v[:, :, :1]], 2)
    with pytest.raises(ValueError, match="key and value have 3 heads, which must divide"):
        gla(q, k3, v3, np.concatenate([g, g[:, :, :1]], 2))
    with pytest.raises(ValueError, match="value"):
        gla(q, k, v3, g)
    with pytest.raises(ValueError, match="log_gate"):
        gla(q, k, v, np.zeros((3, 40, 4), np.float32))  # per query head, not per kv head
    with pytest.raises(ValueError, match="log_gate"):
        gla(q, k, v, np.zeros((3, 40, 2, 5), np.float32))


def test_kv_heads_vmap_of_grad(rng):
    q, k, v, g, s0 = make_inputs(rng, 2, 66, 4, 5, 4, state=True, kv_heads=2, scalar_gate=True)
    qs = np.stack([q, 0.5 * q])
    loss = lambda q, k, v, g, s: jnp.sum(jaxattn.gated_linear_attention(q, k, v, g,
                                                                        initial_state=s) ** 2)
    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3, 4)),
                     in_axes=(0, None, None, None, None))(qs, k, v, g, s0)
    for i in range(2):
        expected = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(qs[i], k, v, g, s0)
        for a, b in zip(grads, expected):
            assert a[i].shape == b.shape
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-5)


def test_scalar_gate_and_kv_heads_export(rng):
    """jax.export round trip of a scalar-gate, grouped-head forward and backward."""
    from jax import export
    q, k, v, g, s0 = make_inputs(rng, 2, 70, 4, 8, 6, state=True, kv_heads=2, scalar_gate=True)
    f = jax.jit(jax.value_and_grad(lambda q, k, v, g, s: jnp.sum(
        jaxattn.gated_linear_attention(q, k, v, g, initial_state=s) ** 2),
        argnums=(0, 1, 2, 3, 4)))
    exported = export.deserialize(export.export(
        f, disabled_checks=jaxattn.export_disabled_checks())(q, k, v, g, s0).serialize())
    for a, b in zip(jax.tree.leaves(exported.call(q, k, v, g, s0)),
                    jax.tree.leaves(f(q, k, v, g, s0))):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------- jit, vmap, grad


def test_jit_matches_eager(rng):
    q, k, v, g, s0 = make_inputs(rng, 2, 50, 2, 8, 8, state=True)
    f = lambda *a: jaxattn.gated_linear_attention(*a[:4], initial_state=a[4],
                                                  return_final_state=True)
    eager = f(q, k, v, g, s0)
    jitted = jax.jit(f)(q, k, v, g, s0)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("in_axes", [(0, 0, 0, 0, 0), (1, None, 0, None, None),
                                     (None, 0, None, 2, 0)])
def test_vmap(rng, in_axes):
    size = 3
    q, k, v, g, s0 = make_inputs(rng, 2, 40, 2, 8, 6, state=True)

    def stacked(x, axis):
        if axis is None:
            return x
        return np.stack([x * (1.0 + 0.1 * i) for i in range(size)], axis=axis).astype(x.dtype)

    args = [stacked(x, a) for x, a in zip((q, k, v, g, s0), in_axes)]
    f = lambda q, k, v, g, s: jaxattn.gated_linear_attention(q, k, v, g, initial_state=s,
                                                             return_final_state=True)
    out, final = jax.vmap(f, in_axes=in_axes)(*args)
    for i in range(size):
        sliced = [x if a is None else np.take(x, i, axis=a) for x, a in zip(args, in_axes)]
        ref_out, ref_final = gla_reference(*sliced[:4], initial_state=sliced[4])
        assert_close_to_oracle(out[i], ref_out, dtype=np.float32, name="out")
        assert_close_to_oracle(final[i], ref_final, dtype=np.float32, name="final")


def test_vmap_of_grad(rng):
    q, k, v, g, s0 = make_inputs(rng, 2, 66, 2, 5, 4, state=True)
    qs = np.stack([q, 0.5 * q])
    loss = lambda q, k, v, g, s: jnp.sum(jaxattn.gated_linear_attention(q, k, v, g,
                                                                        initial_state=s) ** 2)
    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3, 4)),
                     in_axes=(0, None, None, None, None))(qs, k, v, g, s0)
    for i in range(2):
        expected = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(qs[i], k, v, g, s0)
        for a, b in zip(grads, expected):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-5)


def test_repeated_calls_are_bitwise_equal(rng):
    q, k, v, g, s0 = make_inputs(rng, 2, 200, 4, 16, 16, decay=3.0, state=True)
    f = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jaxattn.gated_linear_attention(
        *a[:4], initial_state=a[4]) ** 2), argnums=(0, 1, 2, 3, 4)))
    first = jax.tree.leaves(f(q, k, v, g, s0))
    for _ in range(2):
        for a, b in zip(first, jax.tree.leaves(f(q, k, v, g, s0))):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------ bad input


def test_bad_inputs(rng):
    q, k, v, g, s0 = make_inputs(rng, 2, 10, 2, 8, 6, state=True)
    gla = jaxattn.gated_linear_attention
    with pytest.raises(ValueError, match="key"):
        gla(q, k[:, :5], v, g)
    with pytest.raises(ValueError, match="value"):
        gla(q, k, v[:, :, :1], g)
    with pytest.raises(ValueError, match="log_gate"):
        gla(q, k, v, g[..., :3])
    with pytest.raises(TypeError, match="share one dtype"):
        gla(q, k.astype(jnp.bfloat16), v, g)
    with pytest.raises(TypeError, match="query"):
        gla(q.astype(np.int32), k, v, g)
    with pytest.raises(TypeError, match="log_gate"):
        gla(q, k, v, g.astype(np.int32))
    with pytest.raises(ValueError, match="initial_state"):
        gla(q, k, v, g, initial_state=s0[:, :, :4])
    with pytest.raises(TypeError, match="initial_state"):
        gla(q, k, v, g, initial_state=s0.astype(np.int32))
    with pytest.raises(TypeError, match="return_final_state"):
        gla(q, k, v, g, return_final_state=1)
    with pytest.raises(ValueError, match="scale"):
        gla(q, k, v, g, scale=float("nan"))
    with pytest.raises(ValueError, match="query"):
        gla(q[0, 0], k[0, 0], v[0, 0], g[0, 0])
    with pytest.raises(ValueError, match="head dims"):
        z = np.zeros((1, 2, 1, 0), np.float32)
        gla(z, z, np.zeros((1, 2, 1, 3), np.float32), z)


def test_kernel_rechecks_shapes(rng):
    """The FFI handler rejects inconsistent operands on its own (bypassing the Python checks)."""
    from jaxattn import _ffi
    q, k, v, g, _ = make_inputs(rng, 1, 10, 2, 8, 6)
    with pytest.raises(Exception, match="gated linear attention"):
        jax.block_until_ready(_ffi.gla_fwd_p.bind(q, k[:, :, :1], v, g, np.zeros((0,), np.float32),
                                                  scale=np.float32(1.0)))
    with pytest.raises(Exception, match="initial_state"):
        jax.block_until_ready(_ffi.gla_fwd_p.bind(q, k, v, g, np.zeros((1, 2, 8, 5), np.float32),
                                                  scale=np.float32(1.0)))


# ----------------------------------------------------------------- instruction sets

_ISA_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, jax, jax.numpy as jnp
    import jaxattn
    from oracle import gla_reference, gla_reference_grad
    assert jaxattn.kernel_isa() == sys.argv[1], jaxattn.kernel_isa()
    rng = np.random.default_rng(0)
    cases = ((3, 5, 7, 1.0, 2, False), (130, 19, 33, 0.3, 2, False), (90, 8, 4, 20.0, 2, False),
             (3, 5, 7, 1.0, 1, True), (130, 19, 33, 0.3, 2, True), (90, 8, 4, 20.0, 1, True))
    for (t, hk, hv, decay, kv_heads, scalar_gate) in cases:  # 2 query heads
        q = rng.standard_normal((2, t, 2, hk)).astype(np.float32)
        k = rng.standard_normal((2, t, kv_heads, hk)).astype(np.float32)
        v = rng.standard_normal((2, t, kv_heads, hv)).astype(np.float32)
        g = (-decay * rng.random((2, t, kv_heads) + (() if scalar_gate else (hk,))))
        g = g.astype(np.float32)
        s0 = rng.standard_normal((2, 2, hk, hv)).astype(np.float32)
        do = rng.standard_normal((2, t, 2, hv)).astype(np.float32)
        out, fin = jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0,
                                                  return_final_state=True)
        ref, ref_fin = gla_reference(q, k, v, g, initial_state=s0)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(fin, ref_fin, rtol=1e-4, atol=1e-4)
        grads = jax.grad(lambda *a: jnp.sum(jaxattn.gated_linear_attention(
            *a[:4], initial_state=a[4]) * do), argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)
        for a, r in zip(grads, gla_reference_grad(q, k, v, g, do, initial_state=s0)):
            np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-3 * max(1.0, np.abs(r).max()))
    print("ok")
""")


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_other_instruction_sets(isa):
    """The generic and avx2 kernels (forced through JAXATTN_ISA) agree with the oracle."""
    if isa == "avx2" and jaxattn.kernel_isa() == "generic":
        pytest.skip("no AVX2 on this CPU")
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, isa], capture_output=True,
                            text=True, env=python_env(JAXATTN_ISA=isa), cwd=CWD)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-5000:]


# ------------------------------------------------------------------------------- Flax


def _layer_reference(params, x, num_heads, normalizer=16.0, eps=1e-5, num_kv_heads=None):
    """The GLA layer in float64 NumPy from its parameters (flash-linear-attention's GLA; with
    ``num_kv_heads``, key, value and gate projections of that many heads)."""
    p = {name: {k: np.asarray(v, np.float64) for k, v in d.items()} for name, d in params.items()}
    x = np.asarray(x, np.float64)
    lin = lambda name, h: h @ p[name]["kernel"] + p[name].get("bias", 0.0)
    b, t, _ = x.shape
    heads = lambda h, n=num_heads: h.reshape(b, t, n, -1)
    kv_heads = lambda h: heads(h, num_kv_heads or num_heads)
    logits = lin("gk_up", lin("gk_down", x))
    log_gate = -np.logaddexp(0.0, -logits) / normalizer
    o, _ = gla_reference(heads(lin("q_proj", x)), kv_heads(lin("k_proj", x)),
                         kv_heads(lin("v_proj", x)), kv_heads(log_gate))
    o = o / np.sqrt(np.mean(o ** 2, axis=-1, keepdims=True) + eps) * p["g_norm"]["scale"]
    g = heads(lin("g_proj", x))
    o = o * g / (1.0 + np.exp(-g))
    return lin("o_proj", o.reshape(b, t, -1))


def test_flax_nnx_layer_matches_reference_and_decodes(rng):
    from flax import nnx
    from jaxattn.flax.nnx import GatedLinearAttention

    layer = GatedLinearAttention(48, 3, rngs=nnx.Rngs(0))
    x = rng.standard_normal((2, 70, 48)).astype(np.float32)
    y = layer(x)
    params = nnx.state(layer, nnx.Param)
    params = {name: {k: v[...] for k, v in d.items()} for name, d in params.items()}
    assert_close_to_oracle(y, _layer_reference(params, x, 3), dtype=np.float32, name="y")
    layer.init_cache(batch_size=2)
    steps = [layer(x[:, :5], decode=True)] + [layer(x[:, t:t + 1], decode=True)
                                              for t in range(5, 70)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), y, rtol=1e-4, atol=1e-5)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_flax_linen_layer_matches_nnx_and_decodes(rng):
    from flax import nnx
    from jaxattn.flax import linen as jl
    from jaxattn.flax.nnx import GatedLinearAttention

    x = rng.standard_normal((2, 40, 32)).astype(np.float32)
    module = jl.GatedLinearAttention(hidden_size=32, num_heads=2, expand_k=1.0)
    variables = module.init(jax.random.key(0), x)
    y = module.apply(variables, x)
    assert_close_to_oracle(y, _layer_reference(variables["params"], x, 2), dtype=np.float32,
                           name="y")
    _, cache = module.apply(variables, batch_size=2, method=module.init_cache,
                            mutable=["cache"])
    outs = []
    for t in range(0, 40, 3):
        out, cache = module.apply({**variables, **cache}, x[:, t:t + 3], decode=True,
                                  mutable=["cache"])
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), y, rtol=1e-4, atol=1e-5)
    # Same parameter names and shapes as the nnx layer.
    layer = GatedLinearAttention(32, 2, expand_k=1.0, rngs=nnx.Rngs(0))
    shapes = {name: {k: v[...].shape for k, v in d.items()}
              for name, d in nnx.state(layer, nnx.Param).items()}
    assert shapes == jax.tree.map(lambda a: a.shape, variables["params"])


def test_flax_layers_with_kv_heads(rng):
    """num_kv_heads = 2 of 4 heads: narrower key, value and gate projections; nnx and linen
    against the reference, and decoding."""
    from flax import nnx
    from jaxattn.flax import linen as jl
    from jaxattn.flax.nnx import GatedLinearAttention

    x = rng.standard_normal((2, 40, 32)).astype(np.float32)
    layer = GatedLinearAttention(32, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    assert layer.k_proj.kernel.shape == (32, 8) and layer.v_proj.kernel.shape == (32, 16)
    y = layer(x)
    params = {name: {k: v[...] for k, v in d.items()}
              for name, d in nnx.state(layer, nnx.Param).items()}
    assert_close_to_oracle(y, _layer_reference(params, x, 4, num_kv_heads=2), dtype=np.float32,
                           name="y")
    layer.init_cache(batch_size=2)
    assert layer.state[...].shape == (2, 4, 4, 8)
    steps = [layer(x[:, t:t + 3], decode=True) for t in range(0, 40, 3)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), y, rtol=1e-4, atol=1e-5)
    module = jl.GatedLinearAttention(hidden_size=32, num_heads=4, num_kv_heads=2)
    variables = module.init(jax.random.key(0), x)
    assert_close_to_oracle(module.apply(variables, x),
                           _layer_reference(variables["params"], x, 4, num_kv_heads=2),
                           dtype=np.float32, name="linen y")
    with pytest.raises(ValueError, match="num_kv_heads"):
        GatedLinearAttention(32, 4, num_kv_heads=3, rngs=nnx.Rngs(0))


def test_flax_layers_reject_bad_input():
    from flax import nnx
    from jaxattn.flax import linen as jl
    from jaxattn.flax.nnx import GatedLinearAttention

    with pytest.raises(ValueError, match="num_heads"):
        GatedLinearAttention(30, 4, rngs=nnx.Rngs(0))
    layer = GatedLinearAttention(16, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        layer(jnp.zeros((1, 1, 16)), decode=True)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(jnp.zeros((1, 1, 8)))
    module = jl.GatedLinearAttention(hidden_size=16, num_heads=2)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 2, 16)))
    with pytest.raises(ValueError, match="init_cache"):
        module.apply(variables, jnp.zeros((1, 1, 16)), decode=True, mutable=["cache"])
