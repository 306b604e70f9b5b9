"""Values only seen at run time: out-of-range sequence lengths, NaN and Inf, extreme logits.

- Sequence lengths are clamped by the kernels: a length below 0 means 0 and one past T or S
  means T or S (``QueryLength``/``KeyLength`` in cc/visibility.h). Results equal the oracle on
  the clamped lengths, also when the lengths are traced (the kernels see the raw values).
- NaN in an input reaches every output it affects (never silently replaced by 0), and only
  those; NaN the semantics never look at (masked bias entries, cotangents of empty rows) stays
  out. NaN stored past the sequence lengths is covered in test_flash.py.
- Large logits (1e4), tiny and zero scales, very negative finite biases give finite, correct
  results.

Each group is a table (dict of named cases) so that other ops can add rows.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from oracle import (
    Shape,
    assert_close_to_oracle,
    attention_reference,
    attention_reference_grad,
    naive_low_precision,
    naive_low_precision_grad,
    random_inputs,
    visibility,
)

F32 = np.dtype(np.float32)
BF16 = np.dtype(jnp.bfloat16)
F16 = np.dtype(np.float16)
DTYPES = [pytest.param(d, id=d.name) for d in (F32, BF16, F16)]
INT32 = np.iinfo(np.int32)
DIFFERENTIABLE = ("query", "key", "value", "bias")


def attend(inputs: dict[str, Any], options: dict[str, Any], dout: np.ndarray):
    """(out, lse) and the gradients of sum(out * dout), in one jitted call.

    Sequence lengths are passed as traced arguments so the kernels see the raw values.
    """
    lengths = {k: options[k] for k in ("query_seq_lengths", "key_value_seq_lengths") if k in options}
    static = {k: v for k, v in options.items() if k not in lengths}
    present = [k for k in DIFFERENTIABLE if inputs.get(k) is not None]

    @jax.jit
    def run(diff, mask, lengths, dout):
        def f(d):
            return jaxattn.flash_attention(**d, mask=mask, **lengths, **static, return_residual=True)

        (out, lse), vjp = jax.vjp(f, diff)
        return out, lse, vjp((dout, jnp.zeros_like(lse)))[0]

    out, lse, grads = run({k: inputs[k] for k in present}, inputs.get("mask"), lengths, dout)
    return np.asarray(out), np.asarray(lse), {k: np.asarray(g) for k, g in grads.items()}


def check_against_oracle(inputs: dict[str, Any], options: dict[str, Any], oracle_options: dict[str, Any],
                         dout: np.ndarray, dtype: np.dtype) -> None:
    """Flash with ``options`` equals the oracle with ``oracle_options`` (forward and gradients)."""
    compare_to_oracle(attend(inputs, options, dout), inputs, oracle_options, dout, dtype)


def compare_to_oracle(results, inputs: dict[str, Any], oracle_options: dict[str, Any], dout: np.ndarray,
                      dtype: np.dtype) -> None:
    """``results`` of ``attend`` equal the oracle on ``inputs`` (forward and gradients)."""
    out, lse, grads = results
    q, k, v, b, m = (inputs.get(n) for n in ("query", "key", "value", "bias", "mask"))
    ref_out, ref_lse = attention_reference(q, k, v, b, m, **oracle_options)
    naive_out, naive_lse = naive_low_precision(q, k, v, dtype, b, m, **oracle_options)
    assert_close_to_oracle(out, ref_out, naive_out, dtype=dtype, name="out")
    assert_close_to_oracle(lse, ref_lse, naive_lse, dtype=F32, name="lse")
    ref_grads = attention_reference_grad(q, k, v, dout, b, m, **oracle_options)
    naive_grads = naive_low_precision_grad(q, k, v, dout, dtype, b, m, **oracle_options)
    for name, ref, naive in zip(DIFFERENTIABLE, ref_grads, naive_grads):
        if name in grads:
            assert_close_to_oracle(grads[name], ref, naive, dtype=dtype, name=f"d{name}")


# --------------------------------------------------------------------------------------------
# Sequence lengths outside [0, T] / [0, S]
# --------------------------------------------------------------------------------------------

LENGTH_SHAPE = Shape(batch=2, q_len=70, kv_len=90, num_heads=4, num_kv_heads=2, head_dim=32)
T, S = LENGTH_SHAPE.q_len, LENGTH_SHAPE.kv_len

# name: flash_attention options with raw lengths (the oracle gets them clamped)
LENGTH_CASES: dict[str, dict[str, Any]] = {
    "kv_negative": {"key_value_seq_lengths": [-1, -100]},
    "kv_past_end": {"key_value_seq_lengths": [S + 1, 10**6]},
    "kv_int32_extremes": {"key_value_seq_lengths": [INT32.min, INT32.max]},
    "q_negative": {"query_seq_lengths": [-5, 3]},
    "q_past_end": {"query_seq_lengths": [T + 1, INT32.max]},
    "q_int32_min": {"query_seq_lengths": [INT32.min, T]},
    "mixed_causal": {"query_seq_lengths": [T + 7, -1], "key_value_seq_lengths": [-3, S + 9],
                     "is_causal": True},
    "mixed_window_bias": {"query_seq_lengths": [40, 2**30], "key_value_seq_lengths": [2**30, 33],
                          "local_window_size": (9, 4)},
}


def clamp_lengths(options: dict[str, Any]) -> dict[str, Any]:
    clamped = dict(options)
    for name, limit in (("query_seq_lengths", T), ("key_value_seq_lengths", S)):
        if name in clamped:
            clamped[name] = np.clip(np.asarray(clamped[name], np.int64), 0, limit).astype(np.int32)
    return clamped


@pytest.mark.parametrize("case", LENGTH_CASES)
@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(BF16, id="bfloat16")])
def test_out_of_range_lengths_are_clamped(rng: np.random.Generator, case: str, dtype: np.dtype) -> None:
    options = {k: np.asarray(v, np.int32) if "lengths" in k else v for k, v in LENGTH_CASES[case].items()}
    inputs = random_inputs(rng, LENGTH_SHAPE, dtype, bias="1NTS" if "bias" in case else None)
    dout = rng.standard_normal(LENGTH_SHAPE.out).astype(dtype)
    check_against_oracle(inputs, options, clamp_lengths(options), dout, dtype)
    # Exactly the computation with the lengths clamped beforehand.
    raw = attend(inputs, options, dout)
    clamped = attend(inputs, clamp_lengths(options), dout)
    for a, b in zip(jax.tree_util.tree_leaves(raw), jax.tree_util.tree_leaves(clamped)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# NaN propagation
# --------------------------------------------------------------------------------------------

NAN_SHAPE = Shape(batch=2, q_len=40, kv_len=130, num_heads=4, num_kv_heads=2, head_dim=24)


def nan_case(rng: np.random.Generator, where: str, dtype: np.dtype):
    """Inputs with one NaN, options, and the bool [B,T,N] rows whose output must be all NaN."""
    inputs = random_inputs(rng, NAN_SHAPE, dtype, bias="BNTS" if where == "bias" else None)
    options: dict[str, Any] = {"is_causal": where == "key_causal"}
    b, t, n, s = 1, 17, 3, 9
    kv_head = n // (NAN_SHAPE.num_heads // NAN_SHAPE.num_kv_heads)
    if where == "query":
        inputs["query"][b, t, n, 5] = np.nan
    elif where in ("key", "key_causal"):
        inputs["key"][b, s, kv_head, 0] = np.nan
    elif where == "bias":
        inputs["bias"][b, n, t, s] = np.nan
    elif where == "key_alone_in_tile":
        # Rows that see the NaN key as their only key in the first 64-key tile, and finite keys
        # in later tiles: the NaN must not be lost when that tile is otherwise masked.
        inputs["key"][b, s, kv_head, 0] = np.nan
        mask = np.zeros((NAN_SHAPE.batch, 1, NAN_SHAPE.q_len, NAN_SHAPE.kv_len), bool)
        mask[..., s] = True
        mask[..., 64:] = True
        inputs["mask"] = mask
    elif where == "query_masked_row":
        # A NaN query in a row that sees nothing: the row is empty (0), not NaN.
        inputs["query"][b, t, n, 5] = np.nan
        options["query_seq_lengths"] = np.array([NAN_SHAPE.q_len, t], np.int32)
    visible = visibility(inputs["query"], inputs["key"], inputs["mask"], **options)  # [B,N,T,S]
    if where == "query":
        rows = np.zeros(visible.shape[:3], bool)
        rows[b, n, t] = True
    elif where == "bias":
        rows = np.zeros(visible.shape[:3], bool)
        rows[b, n, t] = visible[b, n, t, s]
    elif where == "query_masked_row":
        rows = np.zeros(visible.shape[:3], bool)
    else:  # a NaN key: every row of its batch and kv head group that sees it
        rows = visible[..., s].copy()
        group = NAN_SHAPE.num_heads // NAN_SHAPE.num_kv_heads
        head_of = np.arange(NAN_SHAPE.num_heads) // group
        rows &= (np.arange(NAN_SHAPE.batch)[:, None, None] == b) & (head_of[None, :, None] == kv_head)
    return inputs, options, rows.transpose(0, 2, 1)  # [B,T,N]


NAN_WHERE = ["query", "key", "key_causal", "bias", "key_alone_in_tile", "query_masked_row"]


@pytest.mark.parametrize("where", NAN_WHERE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_reaches_exactly_the_affected_outputs(rng: np.random.Generator, where: str, dtype: np.dtype) -> None:
    inputs, options, nan_rows = nan_case(rng, where, dtype)
    assert nan_rows.any() or where == "query_masked_row"
    out, lse = jax.jit(functools.partial(jaxattn.flash_attention, **options, return_residual=True))(
        inputs["query"], inputs["key"], inputs["value"], inputs["bias"], inputs["mask"])
    out, lse = np.asarray(out).astype(np.float64), np.asarray(lse)
    assert np.isnan(out[nan_rows]).all(), "output rows that depend on a NaN must be NaN"
    assert np.isnan(lse[nan_rows]).all(), "lse of rows that depend on a NaN must be NaN"
    assert np.isfinite(out[~nan_rows]).all(), "NaN leaked into rows that do not depend on it"
    # Everything else is the normal answer (the oracle agrees on which rows are NaN).
    q, k, v, b, m = (inputs[n] for n in ("query", "key", "value", "bias", "mask"))
    ref_out, ref_lse = attention_reference(q, k, v, b, m, **options)
    np.testing.assert_array_equal(np.isnan(ref_out).all(-1), nan_rows)
    naive_out, _ = naive_low_precision(q, k, v, dtype, b, m, **options)
    assert_close_to_oracle(out[~nan_rows], ref_out[~nan_rows], naive_out[~nan_rows], dtype=dtype, name="out")
    assert_close_to_oracle(lse[~nan_rows], ref_lse[~nan_rows], dtype=F32, name="lse")


@pytest.mark.parametrize("where", ["query", "key", "key_alone_in_tile"])
def test_nan_reaches_gradients(rng: np.random.Generator, where: str) -> None:
    """The gradients of an affected row are NaN too (not zeroed); other batch elements are not."""
    inputs, options, nan_rows = nan_case(rng, where, F32)
    dout = rng.standard_normal(NAN_SHAPE.out).astype(np.float32)
    _, _, grads = attend(inputs, options, dout)
    b, t, n = np.argwhere(nan_rows)[0]
    assert np.isnan(grads["query"][b, t, n]).all()
    for name in ("query", "key", "value"):
        assert np.isfinite(grads[name][1 - b]).all(), f"d{name}: NaN leaked across batch elements"


def test_nan_value_reaches_its_column(rng: np.random.Generator) -> None:
    """A NaN value element makes that column NaN in every row that sees its key."""
    inputs = random_inputs(rng, NAN_SHAPE, F32)
    b, s, kv_head, h = 0, 20, 1, 3
    inputs["value"][b, s, kv_head, h] = np.nan
    out = np.asarray(jaxattn.flash_attention(inputs["query"], inputs["key"], inputs["value"], is_causal=True))
    group = NAN_SHAPE.num_heads // NAN_SHAPE.num_kv_heads
    heads = slice(kv_head * group, (kv_head + 1) * group)
    assert np.isnan(out[b, s:, heads, h]).all()
    assert np.isfinite(np.delete(out[b, :, heads], h, axis=-1)).all()
    assert np.isfinite(out[1 - b]).all()
    # Rows that do not see key s may be NaN in column h or not (0 * NaN in P @ V, as in the
    # oracle and jax.nn, where the key shares a tile with visible ones): unspecified.


# --------------------------------------------------------------------------------------------
# NaN the semantics never look at
# --------------------------------------------------------------------------------------------

UNREAD_SHAPE = Shape(batch=2, q_len=33, kv_len=70, num_heads=2, num_kv_heads=1, head_dim=16)

# name: (options, what is NaN)
UNREAD_CASES: dict[str, dict[str, Any]] = {
    "masked_bias_soft_cap": {"logits_soft_cap": 5.0},
    "masked_bias_causal_soft_cap": {"logits_soft_cap": 2.0, "is_causal": True},
    "masked_bias_no_cap": {},
    "minus_inf_bias_as_mask_soft_cap": {"logits_soft_cap": 3.0, "fill": -np.inf},
    "dout_of_empty_rows": {"query_seq_lengths": np.array([20, 0], np.int32)},
}


@pytest.mark.parametrize("case", UNREAD_CASES)
@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(BF16, id="bfloat16")])
def test_unread_nan_stays_out(rng: np.random.Generator, case: str, dtype: np.dtype) -> None:
    """NaN (or -inf) in masked bias entries, or in the cotangent of rows that output a constant 0:
    outputs and gradients are finite and equal the oracle's (computed with those entries 0)."""
    options = dict(UNREAD_CASES[case])
    fill = options.pop("fill", np.nan)
    inputs = random_inputs(rng, UNREAD_SHAPE, dtype, bias="BNTS", mask="BNTS")
    inputs["mask"][0, 1, 5] = False  # one whole row masked as well
    clean = {k: None if v is None else v.copy() for k, v in inputs.items()}
    dout = rng.standard_normal(UNREAD_SHAPE.out).astype(dtype)
    clean_dout = dout.copy()
    if case == "dout_of_empty_rows":
        lengths = options["query_seq_lengths"]
        for b, length in enumerate(lengths):
            dout[b, length:] = np.nan
            clean_dout[b, length:] = 0
    else:
        inputs["bias"][~inputs["mask"]] = fill
        clean["bias"][~inputs["mask"]] = 0
    results = attend(inputs, options, dout)
    out, lse, grads = results
    assert np.isfinite(out.astype(np.float64)).all()
    for name, g in grads.items():
        assert np.isfinite(g.astype(np.float64)).all(), f"d{name} is not finite"
    compare_to_oracle(results, clean, options, clean_dout, dtype)


# --------------------------------------------------------------------------------------------
# Extreme but finite logits and scales
# --------------------------------------------------------------------------------------------

EXTREME_SHAPE = Shape(batch=1, q_len=50, kv_len=100, num_heads=2, num_kv_heads=1, head_dim=64)

# name: (options, input transform) — each keeps every number representable in the dtype
EXTREME_CASES: dict[str, dict[str, Any]] = {
    "logits_1e4": {"scale": 1250.0},  # |logits| ~ 1e4
    "logits_1e4_causal_cap": {"scale": 1250.0, "is_causal": True, "logits_soft_cap": 30.0},
    "bias_1e4": {"bias_scale": 1e4},
    "very_negative_bias": {"bias_offset": -1e30},  # finite: a shift, not a mask
    "tiny_scale": {"scale": 1e-30},
    "denormal_scale": {"scale": 1e-40},
    "zero_scale_causal": {"scale": 0.0, "is_causal": True},
}


@pytest.mark.parametrize("case", EXTREME_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits_are_finite_and_correct(rng: np.random.Generator, case: str, dtype: np.dtype) -> None:
    options = dict(EXTREME_CASES[case])
    bias_scale, bias_offset = options.pop("bias_scale", None), options.pop("bias_offset", None)
    if bias_offset is not None and dtype == F16:
        pytest.skip("-1e30 is not a float16 number")
    inputs = random_inputs(rng, EXTREME_SHAPE, dtype, bias="11TS" if (bias_scale or bias_offset) else None)
    if bias_scale is not None:
        inputs["bias"] = (inputs["bias"].astype(np.float32) * bias_scale).astype(dtype)
    if bias_offset is not None:
        inputs["bias"] = (inputs["bias"].astype(np.float32) + bias_offset).astype(dtype)
    dout = rng.standard_normal(EXTREME_SHAPE.out).astype(dtype)
    out, lse, grads = attend(inputs, options, dout)
    assert np.isfinite(out.astype(np.float64)).all() and np.isfinite(lse).all()
    for name, g in grads.items():
        assert np.isfinite(g.astype(np.float64)).all(), f"d{name} is not finite"
    check_against_oracle(inputs, options, options, dout, dtype)
