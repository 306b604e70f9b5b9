"""``jaxattn.flash_attention`` against the float64 oracle (docs/semantics.md sections 1 and 6).

Every comparison uses FlashAttention's rule (``oracle.assert_close_to_oracle``): the error against
float64 is at most twice that of a naive computation in the same dtype, plus a small floor. On top
of it, rows without a visible key must give exactly 0 (and lse -inf), and gradients that no visible
(query, key) pair reaches must be exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import (
    Array,
    Shape,
    assert_close_to_oracle,
    attention_reference,
    attention_reference_grad,
    naive_low_precision,
    naive_low_precision_grad,
    random_inputs,
    sum_to_shape,
    visibility,
)

import jaxattn

F32 = np.dtype(np.float32)
BF16 = np.dtype(jnp.bfloat16)
F16 = np.dtype(np.float16)
DTYPES = [pytest.param(dtype, id=dtype.name) for dtype in (F32, BF16, F16)]
F32_BF16 = DTYPES[:2]

INPUT_NAMES = ("query", "key", "value", "bias", "mask")
DIFFERENTIABLE = ("query", "key", "value", "bias")
LENGTH_NAMES = ("query_seq_lengths", "key_value_seq_lengths")

Inputs = dict[str, Array | None]  # query, key, value, bias, mask (in this order)
Options = dict[str, Any]  # keyword options of flash_attention, sequence lengths included


# --------------------------------------------------------------------------------------------
# Expected results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Expected:
    """The float64 reference, the naive low-precision result and where the value must be 0."""

    reference: Array
    naive: Array
    zero: Array  # bool over the leading axes of ``reference``: entries that must be exactly 0

    @staticmethod
    def stack(items: list[Expected]) -> Expected:
        """Stacks expectations of vmapped slices along a new leading axis."""
        return Expected(
            *(np.stack([getattr(e, f.name) for e in items]) for f in dataclasses.fields(Expected))
        )


def ordered(inputs: Inputs) -> tuple[Array | None, ...]:
    """query, key, value, bias, mask: the positional arguments of ``flash_attention``."""
    return tuple(inputs.get(name) for name in INPUT_NAMES)


def unreachable(inputs: Inputs, options: Options) -> dict[str, Array]:
    """Where results must be exactly zero: empty query rows, keys no query sees, unused bias."""
    query, key, bias = inputs["query"], inputs["key"], inputs["bias"]
    unbatched = query.ndim == 3
    visible = visibility(query, key, inputs["mask"], **options)
    if unbatched:
        visible = visible[None]
    batch, num_heads, q_len, kv_len = visible.shape
    num_kv_heads = key.shape[-2]
    empty_rows = ~visible.any(axis=-1).transpose(0, 2, 1)  # [B,T,N]
    grouped = visible.reshape(batch, num_kv_heads, num_heads // num_kv_heads, q_len, kv_len)
    unseen_keys = ~grouped.any(axis=(2, 3)).transpose(0, 2, 1)  # [B,S,K]
    zero = {"out": empty_rows, "query": empty_rows, "key": unseen_keys, "value": unseen_keys}
    if unbatched:
        zero = {name: mask[0] for name, mask in zero.items()}
    if bias is not None:
        as_4d = (1,) * (4 - bias.ndim) + bias.shape
        zero["bias"] = (sum_to_shape(visible.astype(np.int64), as_4d) == 0).reshape(bias.shape)
    return zero


def expected_forward(inputs: Inputs, options: Options) -> dict[str, Expected]:
    """Expected ``out`` and ``lse`` of ``flash_attention(**inputs, **options)``."""
    dtype = inputs["query"].dtype
    query, key, value, bias, mask = ordered(inputs)
    reference = attention_reference(query, key, value, bias, mask, **options)
    naive = naive_low_precision(query, key, value, dtype, bias, mask, **options)
    zero = unreachable(inputs, options)["out"]
    return {
        "out": Expected(reference[0], naive[0], zero),
        "lse": Expected(reference[1], naive[1], np.zeros_like(zero)),  # -inf is checked exactly
    }


def expected_gradients(inputs: Inputs, options: Options, dout: Array) -> dict[str, Expected]:
    """Expected gradients of ``sum(out * dout)`` with respect to the differentiable inputs."""
    dtype = inputs["query"].dtype
    args = (inputs["query"], inputs["key"], inputs["value"], dout)
    extras = {"bias": inputs["bias"], "mask": inputs["mask"], **options}
    reference = attention_reference_grad(*args, **extras)
    naive = naive_low_precision_grad(*args, dtype, **extras)
    zero = unreachable(inputs, options)
    return {
        name: Expected(ref, low, zero[name])
        for name, ref, low in zip(DIFFERENTIABLE, reference, naive)
        if inputs[name] is not None
    }


def assert_matches(actual: dict[str, Any], expected: dict[str, Expected], dtype: np.dtype) -> None:
    """Dtype, shape, tolerance and exact zeros of each named result."""
    assert set(actual) == set(expected), f"{sorted(actual)} != {sorted(expected)}"
    for name, want in expected.items():
        value = actual[name]
        value_dtype = F32 if name == "lse" else dtype
        assert value.dtype == value_dtype, f"{name}: dtype {value.dtype}, expected {value_dtype}"
        assert value.shape == want.reference.shape, (
            f"{name}: shape {value.shape} != {want.reference.shape}"
        )
        assert_close_to_oracle(value, want.reference, want.naive, dtype=value_dtype, name=name)
        nonzero = np.asarray(value).astype(np.float64)[want.zero] != 0
        assert not nonzero.any(), (
            f"{name}: {nonzero.sum()} entries must be exactly 0 (masked) but are not"
        )


# --------------------------------------------------------------------------------------------
# Calling flash_attention
# --------------------------------------------------------------------------------------------


def flash_forward(inputs: Inputs, options: Options, *, jit: bool = True) -> dict[str, Array]:
    """``out`` and ``lse`` of ``flash_attention(..., return_residual=True)``."""
    attend = functools.partial(jaxattn.flash_attention, **options, return_residual=True)
    out, lse = (jax.jit(attend) if jit else attend)(*ordered(inputs))
    return {"out": out, "lse": lse}


def flash_gradients(
    inputs: Inputs, options: Options, dout: Array, *, jit: bool = True
) -> dict[str, Array]:
    """Gradients of ``sum(out * dout)`` with respect to every differentiable input present."""
    names = [name for name in DIFFERENTIABLE if inputs[name] is not None]

    def gradients(differentiable: dict[str, Array], dout: Array) -> dict[str, Array]:
        def attend(diff: dict[str, Array]) -> Array:
            return jaxattn.flash_attention(**{**inputs, **diff}, **options)

        return jax.vjp(attend, differentiable)[1](dout)[0]

    differentiable = {name: inputs[name] for name in names}
    return (jax.jit(gradients) if jit else gradients)(differentiable, dout)


def random_cotangent(rng: np.random.Generator, inputs: Inputs) -> Array:
    """A random ``dout`` shaped like the output."""
    query, value = inputs["query"], inputs["value"]
    return rng.standard_normal((*query.shape[:-1], value.shape[-1])).astype(query.dtype)


def check_attention(
    rng: np.random.Generator,
    inputs: Inputs,
    options: Options,
    *,
    jit: bool = True,
    oracle_inputs: Inputs | None = None,
) -> None:
    """Forward and backward of ``flash_attention`` against the oracle.

    ``oracle_inputs`` replaces ``inputs`` for the oracle (e.g. NaN padding replaced by zeros).
    """
    oracle_inputs = inputs if oracle_inputs is None else oracle_inputs
    dtype = inputs["query"].dtype
    assert_matches(
        flash_forward(inputs, options, jit=jit), expected_forward(oracle_inputs, options), dtype
    )
    dout = random_cotangent(rng, inputs)
    actual = flash_gradients(inputs, options, dout, jit=jit)
    assert_matches(actual, expected_gradients(oracle_inputs, options, dout), dtype)


def check_case(
    rng: np.random.Generator,
    shape: Shape,
    dtype: np.dtype = F32,
    *,
    bias: str | None = None,
    mask: str | None = None,
    **options: Any,
) -> None:
    """Checks random inputs of ``shape``; bias/mask are shape patterns (``Shape.resolve``)."""
    inputs = random_inputs(rng, shape, dtype, bias=bias, mask=mask)
    check_attention(rng, inputs, options)


def lengths(*values: int) -> Array:
    """A per-batch sequence-length array (int32)."""
    return np.array(values, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [16, 40, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims(rng: np.random.Generator, head_dim: int, dtype: np.dtype) -> None:
    shape = Shape(batch=1, q_len=37, kv_len=129, num_heads=2, num_kv_heads=1, head_dim=head_dim)
    check_case(rng, shape, dtype, is_causal=head_dim % 32 == 0)  # causal for 4 of the 7 sizes


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "q_len, kv_len",
    [(1, 1), (1, 129), (37, 1), (37, 37), (37, 129), (129, 37), (129, 129), (1031, 37), (37, 1031)],
)
def test_sequence_lengths(
    rng: np.random.Generator, q_len: int, kv_len: int, is_causal: bool
) -> None:
    shape = Shape(batch=2, q_len=q_len, kv_len=kv_len, num_heads=2, num_kv_heads=1, head_dim=64)
    check_case(rng, shape, is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_causal(rng: np.random.Generator, dtype: np.dtype) -> None:
    shape = Shape(batch=1, q_len=1031, kv_len=1031, num_heads=2, num_kv_heads=1, head_dim=64)
    check_case(rng, shape, dtype, is_causal=True)


@pytest.mark.parametrize(
    "num_heads, num_kv_heads", [(8, 2), (8, 1), (4, 4)], ids=["gqa", "mqa", "mha"]
)
@pytest.mark.parametrize("dtype", F32_BF16)
def test_grouped_heads(
    rng: np.random.Generator, num_heads: int, num_kv_heads: int, dtype: np.dtype
) -> None:
    shape = Shape(
        batch=2, q_len=37, kv_len=53, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=32
    )
    check_case(rng, shape, dtype, bias="1NTS", is_causal=True, local_window_size=(9, 3))


@pytest.mark.parametrize("head_dim, value_head_dim", [(64, 32), (40, 128), (16, 256), (128, 8)])
def test_value_head_dim(rng: np.random.Generator, head_dim: int, value_head_dim: int) -> None:
    shape = Shape(2, 37, 70, 4, 2, head_dim, value_head_dim)
    check_case(rng, shape, is_causal=True)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

SHAPE = Shape(batch=2, q_len=37, kv_len=53, num_heads=4, num_kv_heads=2, head_dim=32)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_scale(rng: np.random.Generator, scale: float) -> None:
    check_case(rng, SHAPE, scale=scale)


@pytest.mark.parametrize("pattern", ["BNTS", "11TS", "1N1S", "B11S", "NTS", "TS"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias(rng: np.random.Generator, pattern: str, dtype: np.dtype) -> None:
    check_case(rng, SHAPE, dtype, bias=pattern)


@pytest.mark.parametrize("pattern", ["BNTS", "11TS", "B11S", "1NT1", "1N1S", "NTS"])
@pytest.mark.parametrize("dtype", F32_BF16)
def test_mask(rng: np.random.Generator, pattern: str, dtype: np.dtype) -> None:
    check_case(rng, SHAPE, dtype, mask=pattern)


@pytest.mark.parametrize(
    "window", [0, 3, (0, 0), (5, 0), (0, 5), (2, 7), (7, 2), (100, 0), (0, 100)], ids=str
)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_len, kv_len", [(67, 67), (37, 100), (100, 37)])
def test_local_window(
    rng: np.random.Generator,
    window: int | tuple[int, int],
    is_causal: bool,
    q_len: int,
    kv_len: int,
) -> None:
    shape = Shape(batch=1, q_len=q_len, kv_len=kv_len, num_heads=2, num_kv_heads=1, head_dim=16)
    check_case(rng, shape, local_window_size=window, is_causal=is_causal)


@pytest.mark.parametrize(
    "kv_lengths",
    [lengths(53, 53, 53), lengths(0, 1, 53), lengths(17, 0, 40)],
    ids=["full", "0_1_S", "17_0_40"],
)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_key_value_seq_lengths(
    rng: np.random.Generator, kv_lengths: Array, is_causal: bool, dtype: np.dtype
) -> None:
    shape = dataclasses.replace(SHAPE, batch=3)
    check_case(rng, shape, dtype, is_causal=is_causal, key_value_seq_lengths=kv_lengths)


@pytest.mark.parametrize(
    "q_lengths", [lengths(37, 37, 37), lengths(0, 37, 5), lengths(1, 0, 0)], ids=str
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_query_seq_lengths(rng: np.random.Generator, q_lengths: Array, dtype: np.dtype) -> None:
    shape = dataclasses.replace(SHAPE, batch=3)
    check_case(rng, shape, dtype, is_causal=True, query_seq_lengths=q_lengths)


@pytest.mark.parametrize("cap", [1.0, 5.0, 30.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_soft_cap(rng: np.random.Generator, cap: float, dtype: np.dtype) -> None:
    """scale=1 makes logits of size ~sqrt(H): the cap saturates, its derivative matters."""
    check_case(rng, SHAPE, dtype, bias="BNTS", scale=1.0, logits_soft_cap=cap)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["float32", "bfloat16", "float16"])
def test_soft_cap_applies_to_every_layout(rng: np.random.Generator, dtype: np.dtype) -> None:
    """The vectorised cap on query- and key-major tiles (forward, both backward passes) with
    masks cutting tiles at odd places, and the GQA group folded into the rows."""
    shape = Shape(batch=2, q_len=131, kv_len=77, num_heads=6, num_kv_heads=2, head_dim=24)
    check_case(rng, shape, dtype, mask="B1TS", scale=1.0, logits_soft_cap=2.0,
               is_causal=True, local_window_size=(40, 3),
               key_value_seq_lengths=lengths(77, 45))


@pytest.mark.parametrize("dtype, bias_value", [(BF16, 1000.0), (F16, 7e4)],
                         ids=["bfloat16_large_bias", "float16_bias_past_f16_max"])
def test_float32_bias_keeps_its_precision(rng: np.random.Generator, dtype: np.dtype,
                                          bias_value: float) -> None:
    """A float32 bias is added to the float32 logits in float32, not rounded to the inputs'
    dtype first: bias_value - 0.5|i - j| rounded to bf16 moves by up to 4 (the softmax then
    picks other keys), and 7e4 is infinite in float16."""
    shape = Shape(batch=1, q_len=33, kv_len=45, num_heads=2, num_kv_heads=2, head_dim=16)
    inputs = random_inputs(rng, shape, dtype)
    i, j = np.arange(shape.q_len)[:, None], np.arange(shape.kv_len)[None, :]
    bias = (bias_value - 0.5 * np.abs(i - j)).astype(np.float32)
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    dout = rng.standard_normal(shape.out).astype(dtype)

    def loss(q, k, v, bias):
        return jnp.sum(jaxattn.flash_attention(q, k, v, bias).astype(jnp.float32) * dout)

    out = jaxattn.flash_attention(q, k, v, bias)
    assert out.dtype == dtype
    reference, _ = attention_reference(q, k, v, bias)
    # Logits near 7e4 have float32 ulps of 2^-7: allow twice a float32 computation's error.
    naive_f32, _ = naive_low_precision(q, k, v, F32, bias)
    assert_close_to_oracle(out, reference, naive_f32, dtype=dtype, name="out")
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    assert grads[3].dtype == np.float32
    reference_grads = attention_reference_grad(q, k, v, dout, bias)
    naive_grads = naive_low_precision_grad(q, k, v, dout, F32, bias)
    for name, got, want, naive in zip(DIFFERENTIABLE, grads, reference_grads, naive_grads):
        # Within the inputs' dtype's rounding (the backward reads the rounded output).
        assert_close_to_oracle(got, want, naive, dtype=dtype, name=f"d{name}")


COMBINATIONS: dict[str, dict[str, Any]] = {
    "causal_window_lengths": {
        "is_causal": True,
        "local_window_size": (20, 0),
        "key_value_seq_lengths": lengths(53, 30),
        "query_seq_lengths": lengths(37, 21),
    },
    "mask_bias_cap": {"mask": "B1TS", "bias": "1N1S", "logits_soft_cap": 3.0, "scale": 0.5},
    "everything": {
        "mask": "1NTS",
        "bias": "BNTS",
        "is_causal": True,
        "local_window_size": (12, 4),
        "key_value_seq_lengths": lengths(40, 9),
        "query_seq_lengths": lengths(30, 37),
        "logits_soft_cap": 2.5,
    },
    "window_lengths_no_causal": {
        "local_window_size": (4, 11),
        "key_value_seq_lengths": lengths(2, 53),
        "mask": "11TS",
    },
}


@pytest.mark.parametrize("combination", COMBINATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_option_combinations(rng: np.random.Generator, combination: str, dtype: np.dtype) -> None:
    check_case(rng, SHAPE, dtype, **COMBINATIONS[combination])


# --------------------------------------------------------------------------------------------
# Rows without a visible key
# --------------------------------------------------------------------------------------------


def empty_row_case(rng: np.random.Generator, cause: str, dtype: np.dtype) -> tuple[Inputs, Options]:
    """Inputs where some query rows see no key, for one cause."""
    shape = Shape(batch=2, q_len=40, kv_len=30, num_heads=4, num_kv_heads=2, head_dim=32)
    inputs = random_inputs(rng, shape, dtype, bias="BNTS", mask="BNTS" if cause == "mask" else None)
    options: Options = {
        "mask": {},
        "kv_length_zero": {"key_value_seq_lengths": lengths(0, 30)},
        "q_length_zero": {"query_seq_lengths": lengths(0, 17)},
        "window_past_end": {"local_window_size": (0, 0)},  # rows 30.. have no key 30..
        "causal_and_window": {
            "is_causal": True,
            "local_window_size": (3, 5),
            "key_value_seq_lengths": lengths(30, 6),
        },
    }[cause]
    if cause == "mask":
        inputs["mask"][0, 1, ::3] = False  # whole rows
        inputs["mask"][1, :, :, 7] = False  # a key nobody sees
    return inputs, options


@pytest.mark.parametrize(
    "cause", ["mask", "kv_length_zero", "q_length_zero", "window_past_end", "causal_and_window"]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_visible_keys(rng: np.random.Generator, cause: str, dtype: np.dtype) -> None:
    """Output exactly 0, lse -inf, exactly zero gradients (checked inside ``check_attention``)."""
    inputs, options = empty_row_case(rng, cause, dtype)
    assert unreachable(inputs, options)["out"].any(), "the case must contain an empty row"
    check_attention(rng, inputs, options)
    lse = np.asarray(flash_forward(inputs, options)["lse"])
    assert np.all(lse[unreachable(inputs, options)["out"]] == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot_rows_have_exactly_zero_logit_gradients(rng: np.random.Generator,
                                                         dtype: np.dtype) -> None:
    """A row that sees exactly one key has P = 1 there and O = that key's value, so
    dS = P (dP - D) is exactly 0 when D = rowsum(dO * O) is rounded exactly as the dP = dO V^T
    product rounds that element (on AMX: inside the tile instruction); dQ and dK are then
    exactly 0. An ulp between the two, times the scale, would be the gradient."""
    for t, s, n, k, h in [(37, 53, 4, 2, 40), (130, 300, 2, 2, 128), (64, 64, 3, 1, 96)]:
        q, kk, v, dout = (jnp.asarray(rng.standard_normal(shape), dtype)
                          for shape in ((1, t, n, h), (1, s, k, h), (1, s, k, h), (1, t, n, h)))
        mask = np.zeros((1, 1, t, s), bool)
        mask[0, 0, np.arange(t), rng.integers(0, s, t)] = True
        attend = lambda q, kk, v: jaxattn.flash_attention(q, kk, v, mask=jnp.asarray(mask))
        _, vjp = jax.vjp(attend, q, kk, v)
        dq, dk, _ = vjp(dout)
        assert not np.asarray(dq.astype(jnp.float32)).any(), (t, s, n, k, h)
        assert not np.asarray(dk.astype(jnp.float32)).any(), (t, s, n, k, h)


# --------------------------------------------------------------------------------------------
# Out-of-bounds reads: memory past the logical sequence is NaN
# --------------------------------------------------------------------------------------------


def nan_padded(inputs: Inputs, options: Options, fill: float) -> Inputs:
    """Copies of the inputs with key/value rows past kv length and query rows past q length set."""
    padded = {name: None if x is None else np.array(x) for name, x in inputs.items()}
    for batch_index in range(inputs["query"].shape[0]):
        if "key_value_seq_lengths" in options:
            kv_length = options["key_value_seq_lengths"][batch_index]
            padded["key"][batch_index, kv_length:] = fill
            padded["value"][batch_index, kv_length:] = fill
        if "query_seq_lengths" in options:
            padded["query"][batch_index, options["query_seq_lengths"][batch_index] :] = fill
    return padded


NAN_CASES: dict[str, Options] = {
    "keys": {"key_value_seq_lengths": lengths(1, 37, 70, 0)},
    "keys_causal": {"key_value_seq_lengths": lengths(5, 64, 66, 70), "is_causal": True},
    "queries": {"query_seq_lengths": lengths(0, 1, 30, 65)},
    "both_window": {
        "query_seq_lengths": lengths(65, 3, 40, 17),
        "key_value_seq_lengths": lengths(33, 70, 0, 9),
        "local_window_size": (16, 16),
    },
}


@pytest.mark.parametrize("case", NAN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_past_sequence_end(rng: np.random.Generator, case: str, dtype: np.dtype) -> None:
    """NaN past the sequence lengths must not leak: finite, correct output and gradients."""
    shape = Shape(batch=4, q_len=65, kv_len=70, num_heads=4, num_kv_heads=2, head_dim=40)
    options = NAN_CASES[case]
    inputs = random_inputs(rng, shape, dtype, bias="1N1S")
    check_attention(
        rng,
        nan_padded(inputs, options, np.nan),
        options,
        oracle_inputs=nan_padded(inputs, options, 0.0),
    )


# --------------------------------------------------------------------------------------------
# Interface: residual, unbatched input, eager and jit, dtypes
# --------------------------------------------------------------------------------------------


def test_return_residual_false_gives_same_output(rng: np.random.Generator) -> None:
    inputs = random_inputs(rng, SHAPE, BF16, bias="11TS")
    out = jax.jit(functools.partial(jaxattn.flash_attention, is_causal=True))(*ordered(inputs))
    assert isinstance(out, jax.Array)
    with_residual = flash_forward(inputs, {"is_causal": True})
    np.testing.assert_array_equal(np.asarray(out), np.asarray(with_residual["out"]))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True},
        {"local_window_size": (3, 8), "logits_soft_cap": 4.0},
        {"bias": "NTS"},
        {"mask": "NTS"},
    ],
    ids=["plain", "causal", "window_cap", "bias", "mask"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched(rng: np.random.Generator, options: Options, dtype: np.dtype) -> None:
    """query [T,N,H], key [S,K,H], value [S,K,Hv] -> out [T,N,Hv], lse [T,N]."""
    options = dict(options)
    bias, mask = options.pop("bias", None), options.pop("mask", None)
    shape = Shape(
        batch=1, q_len=29, kv_len=41, num_heads=4, num_kv_heads=2, head_dim=24, value_head_dim=16
    )
    inputs = random_inputs(rng, shape, dtype, bias=bias, mask=mask)
    inputs.update({name: inputs[name][0] for name in ("query", "key", "value")})
    check_attention(rng, inputs, options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager(rng: np.random.Generator, dtype: np.dtype) -> None:
    """Without jit (op-by-op dispatch of the primitives and the custom VJP)."""
    inputs = random_inputs(rng, SHAPE, dtype, bias="1N1S", mask="B1TS")
    options = {"is_causal": True, "key_value_seq_lengths": lengths(30, 53), "logits_soft_cap": 5.0}
    check_attention(rng, inputs, options, jit=False)


def test_jit_with_traced_lengths(rng: np.random.Generator) -> None:
    """Sequence lengths are runtime values: one compiled function serves different lengths."""
    inputs = random_inputs(rng, SHAPE, F32)

    @jax.jit
    def attend(
        query: Array, key: Array, value: Array, q_lengths: Array, kv_lengths: Array
    ) -> tuple:
        return jaxattn.flash_attention(
            query,
            key,
            value,
            is_causal=True,
            query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths,
            return_residual=True,
        )

    for q_lengths, kv_lengths in [
        (lengths(37, 5), lengths(53, 0)),
        (lengths(0, 20), lengths(3, 53)),
    ]:
        out, lse = attend(inputs["query"], inputs["key"], inputs["value"], q_lengths, kv_lengths)
        options = {
            "is_causal": True,
            "query_seq_lengths": q_lengths,
            "key_value_seq_lengths": kv_lengths,
        }
        assert_matches({"out": out, "lse": lse}, expected_forward(inputs, options), F32)
    assert attend._cache_size() == 1


def test_mixed_dtypes_rejected(rng: np.random.Generator) -> None:
    """query, key and value share one dtype."""
    inputs = random_inputs(rng, SHAPE, F32)
    with pytest.raises((TypeError, ValueError)):
        jaxattn.flash_attention(inputs["query"], inputs["key"].astype(BF16), inputs["value"])


# --------------------------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------------------------

VMAP_SIZE = 3
VMAP_SHAPE = Shape(batch=2, q_len=19, kv_len=33, num_heads=4, num_kv_heads=2, head_dim=16)


@dataclasses.dataclass(frozen=True)
class VmapCase:
    """Which arguments are mapped, along which axis; static options; unbatched inner call."""

    in_axes: dict[str, int | None]
    options: Options = dataclasses.field(default_factory=dict)
    unbatched: bool = False


VMAP_CASES: dict[str, VmapCase] = {
    "query_only": VmapCase({"query": 0, "key": None, "value": None}, {"is_causal": True}),
    "all": VmapCase({"query": 0, "key": 0, "value": 0}),
    "kv_only": VmapCase({"query": None, "key": 0, "value": 0}, {"local_window_size": 5}),
    "non_leading": VmapCase({"query": 2, "key": 1, "value": 3}, {"is_causal": True}),
    "last_axis": VmapCase({"query": -1, "key": -1, "value": None}),
    "bias_mask_lengths": VmapCase(
        {
            "query": 0,
            "key": 0,
            "value": 0,
            "bias": 1,
            "mask": None,
            "key_value_seq_lengths": 0,
            "query_seq_lengths": None,
        },
        {"is_causal": True},
    ),
    "bias_only": VmapCase({"query": None, "key": None, "value": None, "bias": 0}),
    "unbatched_inner": VmapCase(
        {"query": 0, "key": 0, "value": 0}, {"logits_soft_cap": 3.0}, unbatched=True
    ),
}


def vmap_arguments(rng: np.random.Generator, case: VmapCase, dtype: np.dtype) -> dict[str, Array]:
    """Arguments of the vmapped function: mapped ones stacked along their axis."""

    def one_slice() -> dict[str, Array]:
        inputs = random_inputs(rng, VMAP_SHAPE, dtype, bias="BNTS", mask="1NTS")
        inputs["query_seq_lengths"] = rng.integers(
            0, VMAP_SHAPE.q_len + 1, VMAP_SHAPE.batch
        ).astype(np.int32)
        inputs["key_value_seq_lengths"] = rng.integers(
            0, VMAP_SHAPE.kv_len + 1, VMAP_SHAPE.batch
        ).astype(np.int32)
        if case.unbatched:
            inputs = {name: x[0] for name, x in inputs.items() if name in ("query", "key", "value")}
        return {name: inputs[name] for name in case.in_axes}

    slices = [one_slice() for _ in range(VMAP_SIZE)]
    return {
        name: slices[0][name] if axis is None else np.stack([s[name] for s in slices], axis=axis)
        for name, axis in case.in_axes.items()
    }


def vmap_slice(arguments: dict[str, Array], case: VmapCase, index: int) -> tuple[Inputs, Options]:
    """The inputs and options seen by the ``index``-th call under vmap."""
    sliced = {
        name: x if case.in_axes[name] is None else np.take(x, index, axis=case.in_axes[name])
        for name, x in arguments.items()
    }
    inputs = {name: sliced.get(name) for name in INPUT_NAMES}
    options = {**case.options, **{name: sliced[name] for name in LENGTH_NAMES if name in sliced}}
    return inputs, options


@pytest.mark.parametrize("case", VMAP_CASES)
@pytest.mark.parametrize("dtype", F32_BF16)
def test_vmap(rng: np.random.Generator, case: str, dtype: np.dtype) -> None:
    case = VMAP_CASES[case]
    arguments = vmap_arguments(rng, case, dtype)

    def attend(args: dict[str, Array]) -> dict[str, Array]:
        out, lse = jaxattn.flash_attention(**args, **case.options, return_residual=True)
        return {"out": out, "lse": lse}

    actual = jax.jit(jax.vmap(attend, in_axes=(case.in_axes,)))(arguments)
    per_slice = [expected_forward(*vmap_slice(arguments, case, i)) for i in range(VMAP_SIZE)]
    expected = {name: Expected.stack([e[name] for e in per_slice]) for name in per_slice[0]}
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize(
    "case", ["query_only", "all", "non_leading", "bias_mask_lengths", "unbatched_inner"]
)
def test_vmap_of_grad(rng: np.random.Generator, case: str) -> None:
    """Per-example gradients: ``vmap(grad)``, gradients of unmapped inputs per example too."""
    case = VMAP_CASES[case]
    arguments = vmap_arguments(rng, case, F32)
    differentiable = [name for name in DIFFERENTIABLE if name in arguments]
    douts = np.stack(
        [random_cotangent(rng, vmap_slice(arguments, case, i)[0]) for i in range(VMAP_SIZE)]
    )

    def gradients(args: dict[str, Array], dout: Array) -> dict[str, Array]:
        def loss(diff: dict[str, Array]) -> Array:
            out = jaxattn.flash_attention(**{**args, **diff}, **case.options)
            return jnp.sum(out * dout)

        return jax.grad(loss)({name: args[name] for name in differentiable})

    actual = jax.jit(jax.vmap(gradients, in_axes=(case.in_axes, 0)))(arguments, douts)
    per_slice = [
        expected_gradients(*vmap_slice(arguments, case, i), douts[i]) for i in range(VMAP_SIZE)
    ]
    expected = {name: Expected.stack([e[name] for e in per_slice]) for name in differentiable}
    assert_matches(actual, expected, F32)


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("dtype", F32_BF16)
def test_deterministic(rng: np.random.Generator, dtype: np.dtype, jit: bool) -> None:
    """Two calls give bitwise equal outputs and gradients (shape large enough to use threads)."""
    shape = Shape(batch=2, q_len=300, kv_len=333, num_heads=4, num_kv_heads=2, head_dim=64)
    inputs = random_inputs(rng, shape, dtype, bias="1NTS")
    options = {"is_causal": True, "key_value_seq_lengths": lengths(333, 290)}
    dout = random_cotangent(rng, inputs)

    def run() -> list[Array]:
        results = {
            **flash_forward(inputs, options, jit=jit),
            **flash_gradients(inputs, options, dout, jit=jit),
        }
        return [np.asarray(x) for x in results.values()]

    first, second = run(), run()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Parity with jax.nn.dot_product_attention where the semantics coincide
# --------------------------------------------------------------------------------------------

PARITY_CASES: dict[str, tuple[Shape, dict[str, Any]]] = {
    "plain": (Shape(2, 129, 129, 4, 4, 64), {}),
    "gqa_causal_bias": (Shape(2, 129, 160, 8, 2, 64), {"is_causal": True, "bias": "1NTS"}),
    "mqa_window": (Shape(1, 100, 100, 4, 1, 32), {"local_window_size": (10, 3), "scale": 0.3}),
    "mask_causal": (Shape(2, 70, 50, 4, 2, 40), {"mask": "B1TS", "is_causal": True}),
    "lengths": (
        Shape(2, 64, 90, 4, 2, 32),
        {
            "key_value_seq_lengths": lengths(90, 20),
            "query_seq_lengths": lengths(64, 11),
            "bias": "BNTS",
        },
    ),
}


@pytest.mark.parametrize("case", PARITY_CASES)
@pytest.mark.parametrize("dtype", F32_BF16)
def test_parity_with_jax_nn(rng: np.random.Generator, case: str, dtype: np.dtype) -> None:
    """float32: close to jax.nn. bfloat16: at most twice jax.nn's own error against float64."""
    shape, options = PARITY_CASES[case]
    options = dict(options)
    inputs = random_inputs(
        rng, shape, dtype, bias=options.pop("bias", None), mask=options.pop("mask", None)
    )
    if inputs["mask"] is not None:
        inputs["mask"][..., 0] = True  # with causal: every row keeps a key, as jax.nn needs
    padding_only = {"query_seq_lengths": options.get("query_seq_lengths")}
    empty_rows = unreachable(inputs, options)["out"]
    assert np.array_equal(empty_rows, unreachable(inputs, padding_only)["out"]), "jax.nn differs"
    dout = random_cotangent(rng, inputs)

    def run(attention: Callable[..., Any]) -> dict[str, Array]:
        """Output and gradients, jitted with the arrays as arguments (not folded constants)."""

        @jax.jit
        def forward_backward(diff: dict[str, Array], dout: Array) -> dict[str, Array]:
            out, vjp = jax.vjp(lambda d: attention(**{**inputs, **d}, **options), diff)
            return {"out": out, **vjp(dout)[0]}

        return forward_backward(
            {name: inputs[name] for name in DIFFERENTIABLE if inputs[name] is not None}, dout
        )

    ours = run(jaxattn.flash_attention)
    theirs = run(functools.partial(jax.nn.dot_product_attention, implementation="xla"))
    if dtype == F32:
        for name in ours:
            assert_close_to_oracle(ours[name], np.asarray(theirs[name]), dtype=F32, name=name)
        return
    expected = {**expected_forward(inputs, options), **expected_gradients(inputs, options, dout)}
    for name in ours:
        reference = expected[name].reference
        baseline = np.asarray(theirs[name]).astype(np.float64)
        assert_close_to_oracle(ours[name], reference, baseline, dtype=dtype, name=name)
