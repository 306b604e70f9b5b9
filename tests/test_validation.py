"""Bad inputs get a clear error at trace time; unusual but valid inputs get correct results.

Three tables, each a list of rows so that other ops (decode, paged decode, block-sparse, merge,
Flax modules) add their cases as rows:

- ``BAD_INPUTS``: a call that must raise ``ValueError``/``TypeError`` whose message names the
  argument (``match`` is a regular expression searched in the message).
- ``SUPPORTED``: corner cases that are valid: a call and the float64 answer it must give.
- ``FFI_BAD_BINDS``: the primitives bound directly with inconsistent operands or attributes,
  bypassing the Python checks: the C++ handlers re-check and fail with an error (never a crash,
  never garbage), and the process stays usable.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import _ffi
from oracle import (
    assert_close_to_oracle,
    attention_reference,
    attention_reference_grad,
    decode_visibility,
)

F32 = np.dtype(np.float32)
BF16 = np.dtype(jnp.bfloat16)

# Standard valid inputs: B=2, T=5, S=6, N=4, K=2, H=8.
B, T, S, N, K, H = 2, 5, 6, 4, 2, 8
_rng = np.random.default_rng(0)
QUERY = _rng.standard_normal((B, T, N, H)).astype(np.float32)
KEY = _rng.standard_normal((B, S, K, H)).astype(np.float32)
VALUE = _rng.standard_normal((B, S, K, H)).astype(np.float32)


def ones(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.ones(shape, dtype)


def flash(**changes: Any) -> Callable[[], Any]:
    """``flash_attention`` on the standard inputs with some arguments replaced (a thunk)."""
    arguments = {"query": QUERY, "key": KEY, "value": VALUE, **changes}
    return lambda: jaxattn.flash_attention(**arguments)


def flash_jit(name: str, value: Any) -> Callable[[], Any]:
    """``flash_attention`` under ``jax.jit`` with argument ``name`` traced (a thunk)."""

    def call():
        return jax.jit(lambda x: jaxattn.flash_attention(QUERY, KEY, VALUE, **{name: x}))(value)

    return call


LENGTHS = np.array([S, 3], np.int32)
TABLES = np.array([[0, 1, 2], [3, 4, 5]], np.int32)  # pages of 2 rows: the cache, in order
KEY_PAGES, VALUE_PAGES = KEY.reshape(B * S // 2, 2, K, H), VALUE.reshape(B * S // 2, 2, K, H)


def decode(**changes: Any) -> Callable[[], Any]:
    """``decode_attention`` of the last 2 query tokens on the standard cache (a thunk)."""
    arguments = {"query": QUERY[:, :2], "key_cache": KEY, "value_cache": VALUE,
                 "kv_lengths": LENGTHS, **changes}
    return lambda: jaxattn.decode_attention(**arguments)


def paged(**changes: Any) -> Callable[[], Any]:
    """``paged_decode_attention`` on the standard cache as pages of 2 rows (a thunk)."""
    arguments = {"query": QUERY[:, :2], "key_pages": KEY_PAGES, "value_pages": VALUE_PAGES,
                 "block_tables": TABLES, "kv_lengths": LENGTHS, **changes}
    return lambda: jaxattn.paged_decode_attention(**arguments)


def merge(outputs: Any, lses: Any) -> Callable[[], Any]:
    return lambda: jaxattn.merge_attention_states(outputs, lses)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bad:
    """``call()`` must raise ``error`` with a message matching ``match`` (naming the argument)."""

    id: str
    call: Callable[[], Any]
    error: type[Exception] | tuple[type[Exception], ...]
    match: str


FLASH_BAD_INPUTS = [
    # ranks
    Bad("query_rank2", flash(query=ones(T, H)), ValueError, r"query must have shape"),
    Bad("query_rank5", flash(query=ones(1, B, T, N, H)), ValueError, r"query must have shape"),
    Bad("query_scalar", flash(query=1.0), ValueError, r"query must have shape"),
    Bad("key_rank3_batched_query", flash(key=ones(S, K, H)), ValueError, r"key must have the rank"),
    Bad("value_rank5", flash(value=ones(1, B, S, K, H)), ValueError, r"value must have the rank"),
    # mismatched dimensions
    Bad("batch_mismatch", flash(key=ones(3, S, K, H), value=ones(3, S, K, H)), ValueError,
        r"batch size.*\(2, 5, 4, 8\), \(3, 6, 2, 8\)"),
    Bad("length_mismatch", flash(value=ones(B, S + 1, K, H)), ValueError,
        r"key and value must have the same length S"),
    Bad("kv_heads_mismatch", flash(value=ones(B, S, K + 1, H)), ValueError,
        r"key and value must have the same number of heads K"),
    Bad("head_dim_mismatch", flash(key=ones(B, S, K, H + 1)), ValueError,
        r"query and key must have the same head dim H"),
    Bad("heads_not_divisible", flash(query=ones(B, T, 3, H)), ValueError,
        r"query heads N=3 must be a multiple of the number of kv heads K=2"),
    Bad("zero_kv_heads", flash(key=ones(B, S, 0, H), value=ones(B, S, 0, H)), ValueError,
        r"kv heads K=0"),
    Bad("zero_head_dim", flash(query=ones(B, T, N, 0), key=ones(B, S, K, 0)), ValueError,
        r"head dim H must be positive"),
    Bad("head_dim_over_limit", flash(query=ones(1, 2, 1, 1025), key=ones(1, 2, 1, 1025),
                                     value=ones(1, 2, 1, 4)), ValueError, r"head dims above 1024"),
    Bad("value_dim_over_limit", flash(value=ones(B, S, K, 2048)), ValueError,
        r"head dims above 1024.*Hv=2048"),
    # dtypes
    Bad("int_inputs", flash(query=ones(B, T, N, H, dtype=np.int32), key=ones(B, S, K, H, dtype=np.int32),
                            value=ones(B, S, K, H, dtype=np.int32)), TypeError,
        r"query must be float32, bfloat16, float16 or float64 \(with jax_enable_x64\), got int32"),
    Bad("bool_query", flash(query=ones(B, T, N, H, dtype=bool)), TypeError, r"query must be float32"),
    Bad("complex_key", flash(key=ones(B, S, K, H, dtype=np.complex64)), TypeError,
        r"key must be float32"),
    Bad("mixed_dtypes", flash(key=KEY.astype(BF16)), TypeError,
        r"query, key and value must share one dtype.*float32, bfloat16, float32"),
    Bad("mixed_value_f16", flash(value=VALUE.astype(np.float16)), TypeError, r"share one dtype"),
    # not arrays
    Bad("query_string", flash(query="abc"), TypeError, r"query must be an array"),
    Bad("key_none", flash(key=None), TypeError, r"key must be an array"),
    Bad("value_ragged_list", flash(value=[[1.0], [1.0, 2.0]]), TypeError, r"value must be an array"),
    Bad("query_dict", flash(query={"a": 1}), TypeError, r"query must be an array"),
    # bias
    Bad("bias_not_broadcastable", flash(bias=ones(B, N, T, S + 1)), ValueError,
        r"bias of shape \(2, 4, 5, 7\) is not broadcastable to \[B, N, T, S\] = \[2, 4, 5, 6\]"),
    Bad("bias_wrong_batch", flash(bias=ones(3, 1, 1, S)), ValueError, r"bias .*axis 0: 3 vs 2"),
    Bad("bias_wrong_heads", flash(bias=ones(K, T, S)), ValueError, r"bias .*axis 1: 2 vs 4"),
    Bad("bias_rank5", flash(bias=ones(1, B, N, T, S)), ValueError, r"bias must have rank <= 4"),
    Bad("bias_int", flash(bias=ones(T, S, dtype=np.int32)), TypeError, r"bias must be a floating"),
    Bad("bias_bool", flash(bias=ones(T, S, dtype=bool)), TypeError, r"bias must be a floating"),
    Bad("bias_string", flash(bias="x"), TypeError, r"bias"),
    # mask
    Bad("mask_int", flash(mask=ones(T, S, dtype=np.int32)), TypeError, r"mask must be a bool array"),
    Bad("mask_float", flash(mask=ones(T, S)), TypeError, r"mask must be a bool array"),
    Bad("mask_not_broadcastable", flash(mask=ones(T + 1, S, dtype=bool)), ValueError,
        r"mask of shape \(6, 6\) is not broadcastable"),
    Bad("mask_wrong_batch", flash(mask=ones(3, N, T, S, dtype=bool)), ValueError,
        r"mask .*axis 0: 3 vs 2"),
    Bad("mask_rank5", flash(mask=ones(1, 1, 1, T, S, dtype=bool)), ValueError, r"mask must have rank"),
    Bad("mask_list_of_bool_rows_ragged", flash(mask=[[True], [True, False]]), TypeError, r"mask"),
    # sequence lengths
    Bad("q_lengths_float", flash(query_seq_lengths=np.array([1.0, 2.0])), TypeError,
        r"query_seq_lengths must be an integer array, got dtype float"),
    Bad("kv_lengths_bool", flash(key_value_seq_lengths=np.array([True, False])), TypeError,
        r"key_value_seq_lengths must be an integer array, got dtype bool"),
    Bad("kv_lengths_too_many", flash(key_value_seq_lengths=np.array([1, 2, 3])), ValueError,
        r"key_value_seq_lengths must have shape \[B\] = \(2,\), got \(3,\)"),
    Bad("kv_lengths_2d", flash(key_value_seq_lengths=np.ones((B, 1), np.int32)), ValueError,
        r"key_value_seq_lengths must have shape \[B\]"),
    Bad("q_lengths_scalar_batched", flash(query_seq_lengths=3), ValueError,
        r"query_seq_lengths must have shape \[B\] = \(2,\), got \(\)"),
    Bad("kv_lengths_ragged", flash(key_value_seq_lengths=[[1], [1, 2]]), TypeError,
        r"key_value_seq_lengths must be an integer array"),
    Bad("kv_lengths_string", flash(key_value_seq_lengths="ab"), TypeError, r"key_value_seq_lengths"),
    Bad("unbatched_lengths_two", lambda: jaxattn.flash_attention(
        QUERY[0], KEY[0], VALUE[0], key_value_seq_lengths=np.array([3, 4])), ValueError,
        r"key_value_seq_lengths must have shape \[B\] = \(1,\)"),
    # local window
    Bad("window_negative", flash(local_window_size=-1), ValueError,
        r"local_window_size .*must be >= 0, got -1"),
    Bad("window_left_negative", flash(local_window_size=(-2, 3)), ValueError,
        r"local_window_size left must be >= 0"),
    Bad("window_right_negative", flash(local_window_size=(2, -3)), ValueError,
        r"local_window_size right must be >= 0"),
    Bad("window_three", flash(local_window_size=(1, 2, 3)), ValueError,
        r"local_window_size must be an int or \(left, right\)"),
    Bad("window_float", flash(local_window_size=1.5), TypeError, r"local_window_size .*must be an int"),
    Bad("window_bool", flash(local_window_size=True), TypeError, r"local_window_size .*must be an int"),
    Bad("window_none_side", flash(local_window_size=(None, 3)), TypeError,
        r"local_window_size left must be an int"),
    Bad("window_string", flash(local_window_size="3"), TypeError, r"local_window_size"),
    # soft cap
    Bad("cap_zero", flash(logits_soft_cap=0.0), ValueError, r"logits_soft_cap must be positive"),
    Bad("cap_negative", flash(logits_soft_cap=-1.0), ValueError, r"logits_soft_cap must be positive"),
    Bad("cap_inf", flash(logits_soft_cap=float("inf")), ValueError, r"logits_soft_cap"),
    Bad("cap_nan", flash(logits_soft_cap=float("nan")), ValueError, r"logits_soft_cap"),
    Bad("cap_overflows_float32", flash(logits_soft_cap=1e300), ValueError, r"logits_soft_cap"),
    Bad("cap_underflows_float32", flash(logits_soft_cap=1e-300), ValueError, r"logits_soft_cap"),
    Bad("cap_string", flash(logits_soft_cap="1"), TypeError, r"logits_soft_cap"),
    Bad("cap_bool", flash(logits_soft_cap=True), TypeError, r"logits_soft_cap"),
    Bad("cap_array", flash(logits_soft_cap=jnp.float32(2.0)), TypeError, r"logits_soft_cap"),
    # scale
    Bad("scale_nan", flash(scale=float("nan")), ValueError, r"scale must be finite"),
    Bad("scale_inf", flash(scale=float("inf")), ValueError, r"scale must be finite"),
    Bad("scale_minus_inf", flash(scale=-float("inf")), ValueError, r"scale must be finite"),
    Bad("scale_overflows_float32", flash(scale=1e39), ValueError, r"scale must be finite and within float32"),
    Bad("scale_string", flash(scale="0.5"), TypeError, r"scale must be a real number"),
    Bad("scale_complex", flash(scale=1j), TypeError, r"scale must be a real number"),
    Bad("scale_bool", flash(scale=True), TypeError, r"scale must be a real number"),
    Bad("scale_1d_array", flash(scale=jnp.array([0.5])), TypeError, r"scale must be a real number"),
    Bad("scale_bool_array", flash(scale=jnp.array(True)), TypeError, r"scale must be a real number"),
    Bad("scale_complex_array", flash(scale=np.array(1j)), TypeError, r"scale must be a real number"),
    Bad("scale_nan_array", flash(scale=jnp.array(jnp.nan)), ValueError, r"scale must be finite"),
    # flags
    Bad("is_causal_string", flash(is_causal="yes"), TypeError, r"is_causal must be a bool"),
    Bad("is_causal_int", flash(is_causal=1), TypeError, r"is_causal must be a bool"),
    Bad("is_causal_none", flash(is_causal=None), TypeError, r"is_causal must be a bool"),
    Bad("return_residual_string", flash(return_residual="x"), TypeError,
        r"return_residual must be a bool"),
    # static options passed as traced values under jit
    Bad("traced_scale", flash_jit("scale", 0.5), TypeError, r"scale must be a concrete number.*traced"),
    Bad("traced_window", flash_jit("local_window_size", 3), TypeError, r"local_window_size"),
    Bad("traced_cap", flash_jit("logits_soft_cap", 2.0), TypeError, r"logits_soft_cap"),
    Bad("traced_is_causal", flash_jit("is_causal", True), TypeError, r"is_causal must be a bool"),
    Bad("traced_float_lengths", flash_jit("key_value_seq_lengths", np.array([1.0, 2.0])), TypeError,
        r"key_value_seq_lengths must be an integer array"),
]

DECODE_BAD_INPUTS = [
    Bad("decode_query_rank3", decode(query=ones(2, N, H)), ValueError, r"query must have shape \[B, T, N, H\]"),
    Bad("decode_0_tokens", decode(query=ones(B, 0, N, H)), ValueError, r"at least one token"),
    Bad("decode_query_lengths_shape", decode(query_lengths=np.ones(B + 1, np.int32)), ValueError,
        r"query_lengths must have shape \[B\]"),
    Bad("decode_query_lengths_float", decode(query_lengths=np.ones(B, np.float32)), TypeError,
        r"query_lengths must be an integer array"),
    Bad("decode_int_query", decode(query=ones(B, 1, N, H, dtype=np.int32)), TypeError,
        r"query must be float32"),
    Bad("decode_cache_rank3", decode(key_cache=ones(S, K, H)), ValueError, r"key_cache must have shape"),
    Bad("decode_cache_batch", decode(key_cache=ones(3, S, K, H), value_cache=ones(3, S, K, H)),
        ValueError, r"key_cache batch 3 must equal the query batch 2"),
    Bad("decode_value_length", decode(value_cache=ones(B, S + 1, K, H)), ValueError,
        r"key_cache .* and value_cache .* must agree"),
    Bad("decode_head_dim", decode(key_cache=ones(B, S, K, H + 1), value_cache=ones(B, S, K, H + 1)),
        ValueError, r"key_cache head dim 9 must equal the query head dim 8"),
    Bad("decode_heads_not_divisible", decode(query=ones(B, 1, 3, H)), ValueError,
        r"query heads N=3 must be a multiple of the number of kv heads K=2"),
    Bad("decode_mixed_dtypes", decode(value_cache=VALUE.astype(BF16)), TypeError, r"share one dtype"),
    Bad("decode_lengths_none", decode(kv_lengths=None), TypeError, r"kv_lengths"),
    Bad("decode_lengths_float", decode(kv_lengths=np.array([1.0, 2.0])), TypeError,
        r"kv_lengths must be an integer array"),
    Bad("decode_lengths_shape", decode(kv_lengths=np.array([1, 2, 3])), ValueError,
        r"kv_lengths must have shape \[B\]"),
    Bad("decode_window_negative", decode(local_window_size=-1), ValueError, r"local_window_size"),
    Bad("decode_cap_zero", decode(logits_soft_cap=0.0), ValueError, r"logits_soft_cap"),
    Bad("decode_scale_nan", decode(scale=float("nan")), ValueError, r"scale must be finite"),
    Bad("decode_scale_string", decode(scale="1"), TypeError, r"scale must be a real number"),
    Bad("decode_strict_lengths_int", decode(strict_lengths=1), TypeError, r"strict_lengths must be a bool"),
    Bad("decode_return_residual_string", decode(return_residual="x"), TypeError,
        r"return_residual must be a bool"),
    Bad("paged_pages_rank3", paged(key_pages=ones(6, 2, K)), ValueError, r"key_pages must have shape"),
    Bad("paged_tables_rank1", paged(block_tables=np.zeros(3, np.int32)), ValueError,
        r"block_tables must have shape \[B, max_pages\]"),
    Bad("paged_tables_batch", paged(block_tables=np.zeros((3, 3), np.int32)), ValueError,
        r"block_tables must have shape \[B, max_pages\] with B=2"),
    Bad("paged_tables_float", paged(block_tables=np.zeros((B, 3))), TypeError,
        r"block_tables must be an integer array"),
    Bad("paged_tables_ragged", paged(block_tables=[[0], [1, 2]]), TypeError, r"block_tables"),
    Bad("paged_lengths_shape", paged(kv_lengths=np.array([1])), ValueError, r"kv_lengths must have shape"),
    Bad("merge_shape_mismatch", merge(ones(2, 3, 4), ones(2, 4)), ValueError, r"outputs .* lses"),
    Bad("merge_int_outputs", merge(ones(2, 3, 4, dtype=np.int32), ones(2, 3)), TypeError,
        r"outputs must be a floating array"),
    Bad("merge_int_lses", merge(ones(2, 3, 4), ones(2, 3, dtype=np.int32)), TypeError,
        r"lses must be a floating array"),
    Bad("merge_no_parts", merge(ones(0, 3, 4), ones(0, 3)), ValueError, r"M >= 1"),
]

BAD_INPUTS: list[Bad] = [*FLASH_BAD_INPUTS, *DECODE_BAD_INPUTS]


@pytest.mark.parametrize("row", BAD_INPUTS, ids=lambda row: row.id)
def test_bad_input_raises_naming_the_argument(row: Bad) -> None:
    with pytest.raises(row.error) as info:
        jax.block_until_ready(row.call())
    message = str(info.value)
    assert re.search(row.match, message), f"message {message!r} does not match {row.match!r}"


def test_float64_inputs_must_share_one_dtype_under_x64() -> None:
    """With x64 enabled float64 inputs run the float64 kernels (tests/test_float64.py); a
    float64 query with float32 keys is a TypeError naming the dtypes."""
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match=r"share one dtype, got float64, float32"):
            jaxattn.flash_attention(jnp.asarray(QUERY, jnp.float64), KEY, VALUE)
        with pytest.raises(TypeError, match=r"query must be .*float64.* got complex128"):
            jaxattn.flash_attention(jnp.asarray(QUERY, jnp.complex128), KEY, VALUE)


def test_errors_leave_the_process_usable() -> None:
    for row in BAD_INPUTS[:10]:
        with pytest.raises((TypeError, ValueError)):
            row.call()
    out = jaxattn.flash_attention(QUERY, KEY, VALUE)
    assert np.isfinite(np.asarray(out)).all()


# --------------------------------------------------------------------------------------------
# Supported corner cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Supported:
    """``call()`` returns ``(out, lse)`` equal to ``expected()`` (float64 ``(out, lse)``)."""

    id: str
    call: Callable[[], tuple[Any, Any]]
    expected: Callable[[], tuple[np.ndarray, np.ndarray]]
    dtype: np.dtype = F32


def flash_residual(*args: Any, **kwargs: Any) -> Callable[[], tuple[Any, Any]]:
    return lambda: jaxattn.flash_attention(*args, **kwargs, return_residual=True)


def oracle(*args: Any, **kwargs: Any) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    return lambda: attention_reference(*args, **kwargs)


def empty_result(out_shape: tuple[int, ...]) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """Zero output, -inf lse: nothing to attend to."""
    return lambda: (np.zeros(out_shape), np.full(out_shape[:-1], -np.inf))


def uniform_average(value: np.ndarray, num_heads: int) -> np.ndarray:
    """[B,S,K,Hv] -> [B,1,N,Hv]: each query head's mean over the keys of its kv head."""
    mean = value.astype(np.float64).mean(axis=1, keepdims=True)
    return np.repeat(mean, num_heads // value.shape[2], axis=2)


MASK_BTS = np.random.default_rng(1).random((B, T, S)) < 0.6  # B != N
MASK_BTS[:, :, 0] = True
MASK_NTS = np.random.default_rng(2).random((N, T, S)) < 0.6
MASK_NTS[:, :, 0] = True

FLASH_SUPPORTED = [
    Supported("empty_query_len", flash_residual(ones(B, 0, N, H), KEY, VALUE), empty_result((B, 0, N, H))),
    Supported("empty_key_len", flash_residual(QUERY, ones(B, 0, K, H), ones(B, 0, K, H)),
              empty_result((B, T, N, H))),
    Supported("empty_key_len_causal_bias", flash_residual(
        QUERY, ones(B, 0, K, H), ones(B, 0, K, H), ones(T, 0), is_causal=True),
        empty_result((B, T, N, H))),
    Supported("empty_batch", flash_residual(ones(0, T, N, H), ones(0, S, K, H), ones(0, S, K, H)),
              empty_result((0, T, N, H))),
    Supported("zero_query_heads", flash_residual(ones(B, T, 0, H), KEY, VALUE), empty_result((B, T, 0, H))),
    Supported("zero_value_dim", flash_residual(QUERY, KEY, ones(B, S, K, 0)), lambda: (
        np.zeros((B, T, N, 0)), attention_reference(QUERY, KEY, VALUE)[1])),
    Supported("zero_kv_lengths", flash_residual(QUERY, KEY, VALUE, key_value_seq_lengths=np.zeros(B, np.int32)),
              empty_result((B, T, N, H))),
    Supported("zero_q_lengths", flash_residual(QUERY, KEY, VALUE, query_seq_lengths=np.zeros(B, np.int32)),
              empty_result((B, T, N, H))),
    Supported("python_lists", flash_residual(QUERY.tolist(), KEY.tolist(), VALUE.tolist(), is_causal=True),
              oracle(QUERY, KEY, VALUE, is_causal=True)),
    Supported("numpy_float64_becomes_float32", flash_residual(
        QUERY.astype(np.float64), KEY.astype(np.float64), VALUE.astype(np.float64)),
        oracle(QUERY, KEY, VALUE)),
    Supported("float64_bias_cast", flash_residual(QUERY, KEY, VALUE, np.ones((T, S)) * 0.5),
              oracle(QUERY, KEY, VALUE, np.ones((T, S)) * 0.5)),
    Supported("unbatched_scalar_length", flash_residual(QUERY[0], KEY[0], VALUE[0], key_value_seq_lengths=3),
              oracle(QUERY[0], KEY[0], VALUE[0], key_value_seq_lengths=np.array([3]))),
    Supported("int64_length_beyond_int32", flash_residual(
        QUERY, KEY, VALUE, key_value_seq_lengths=np.array([2**40, 4], np.int64)),
        oracle(QUERY, KEY, VALUE, key_value_seq_lengths=np.array([S, 4]))),
    Supported("int64_length_below_int32", flash_residual(
        QUERY, KEY, VALUE, query_seq_lengths=np.array([-(2**40), 2], np.int64)),
        oracle(QUERY, KEY, VALUE, query_seq_lengths=np.array([0, 2]))),
    Supported("uint32_length_max", flash_residual(
        QUERY, KEY, VALUE, key_value_seq_lengths=np.array([2**32 - 1, 1], np.uint32)),
        oracle(QUERY, KEY, VALUE, key_value_seq_lengths=np.array([S, 1]))),
    Supported("uint8_lengths", flash_residual(
        QUERY, KEY, VALUE, key_value_seq_lengths=np.array([255, 2], np.uint8)),
        oracle(QUERY, KEY, VALUE, key_value_seq_lengths=np.array([S, 2]))),
    Supported("window_beyond_int64", flash_residual(QUERY, KEY, VALUE, local_window_size=(2**70, 2**64)),
              oracle(QUERY, KEY, VALUE)),
    Supported("window_numpy_ints", flash_residual(
        QUERY, KEY, VALUE, local_window_size=(np.int64(1), np.int32(2))),
        oracle(QUERY, KEY, VALUE, local_window_size=(1, 2))),
    Supported("window_zero", flash_residual(QUERY, KEY, VALUE, local_window_size=0),
              oracle(QUERY, KEY, VALUE, local_window_size=0)),
    Supported("numpy_scalar_options", flash_residual(
        QUERY, KEY, VALUE, scale=np.float32(0.3), logits_soft_cap=np.float64(2.0),
        is_causal=np.bool_(True)),
        oracle(QUERY, KEY, VALUE, scale=0.3, logits_soft_cap=2.0, is_causal=True)),
    Supported("scale_zero_is_uniform", flash_residual(QUERY, KEY, VALUE, scale=0.0), lambda: (
        np.broadcast_to(uniform_average(VALUE, N), (B, T, N, H)),
        np.full((B, T, N), np.log(S)))),
    Supported("scale_negative", flash_residual(QUERY, KEY, VALUE, scale=-2.0),
              oracle(QUERY, KEY, VALUE, scale=-2.0)),
    Supported("scale_int", flash_residual(QUERY, KEY, VALUE, scale=1), oracle(QUERY, KEY, VALUE, scale=1.0)),
    # issue 18: any concrete real scalar is a scale
    Supported("scale_jax_0d", flash_residual(QUERY, KEY, VALUE, scale=jnp.float32(0.3)),
              oracle(QUERY, KEY, VALUE, scale=float(np.float32(0.3)))),
    Supported("scale_jax_0d_array", flash_residual(QUERY, KEY, VALUE, scale=jnp.array(0.25)),
              oracle(QUERY, KEY, VALUE, scale=0.25)),
    Supported("scale_numpy_0d_array", flash_residual(QUERY, KEY, VALUE, scale=np.array(2)),
              oracle(QUERY, KEY, VALUE, scale=2.0)),
    Supported("scale_numpy_float16", flash_residual(QUERY, KEY, VALUE, scale=np.float16(0.5)),
              oracle(QUERY, KEY, VALUE, scale=0.5)),
    # issue 18: a [B, T, S] mask (B != N) is shared over heads; [N, T, S] over the batch
    Supported("mask_batch_rank3_shared_over_heads", flash_residual(
        QUERY, KEY, VALUE, mask=MASK_BTS), oracle(QUERY, KEY, VALUE, mask=MASK_BTS[:, None])),
    Supported("mask_heads_rank3_shared_over_batch", flash_residual(
        QUERY, KEY, VALUE, mask=MASK_NTS), oracle(QUERY, KEY, VALUE, mask=MASK_NTS[None])),
    Supported("tiny_soft_cap", flash_residual(QUERY, KEY, VALUE, logits_soft_cap=1e-30),
              oracle(QUERY, KEY, VALUE, logits_soft_cap=1e-30)),
    Supported("head_dim_one", flash_residual(QUERY[..., :1], KEY[..., :1], VALUE[..., :1]),
              oracle(QUERY[..., :1], KEY[..., :1], VALUE[..., :1])),
    Supported("head_dim_at_limit", flash_residual(ones(1, 3, 1, 1024) * 0.01, ones(1, 4, 1, 1024) * 0.02,
                                                  np.arange(4 * 1024, dtype=np.float32).reshape(1, 4, 1, 1024)),
              oracle(ones(1, 3, 1, 1024) * 0.01, ones(1, 4, 1, 1024) * 0.02,
                     np.arange(4 * 1024, dtype=np.float32).reshape(1, 4, 1, 1024))),
]

def decode_residual(*args: Any, **kwargs: Any) -> Callable[[], tuple[Any, Any]]:
    return lambda: jaxattn.decode_attention(*args, **kwargs, return_residual=True)


def decode_oracle(lengths: Any, q_len: int = 2, window: Any = None
                  ) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """The float64 decode answer for the last ``q_len`` standard query tokens."""
    mask = decode_visibility(lengths, q_len, S, window)
    return oracle(QUERY[:, :q_len], KEY, VALUE, mask=mask)


DECODE_SUPPORTED = [
    Supported("decode_empty_cache", decode_residual(QUERY[:, :2], ones(B, 0, K, H), ones(B, 0, K, H),
                                                    LENGTHS), empty_result((B, 2, N, H))),
    Supported("decode_zero_lengths", decode_residual(QUERY[:, :2], KEY, VALUE, np.zeros(B, np.int32)),
              empty_result((B, 2, N, H))),
    Supported("decode_int64_length_beyond_int32", decode_residual(
        QUERY[:, :2], KEY, VALUE, np.array([2**40, -(2**40)], np.int64)), decode_oracle([S, 0])),
    Supported("decode_python_lists", decode_residual(
        QUERY[:, :1].tolist(), KEY.tolist(), VALUE.tolist(), [S, 4]), decode_oracle([S, 4], 1)),
    Supported("decode_window_beyond_int64", decode_residual(
        QUERY[:, :2], KEY, VALUE, LENGTHS, local_window_size=(2**70, 5)), decode_oracle(LENGTHS)),
    Supported("decode_window_zero", decode_residual(QUERY[:, :2], KEY, VALUE, LENGTHS,
                                                    local_window_size=0),
              decode_oracle(LENGTHS, window=0)),
    Supported("paged_table_ids_int64", lambda: jaxattn.paged_decode_attention(
        QUERY[:, :2], KEY_PAGES, VALUE_PAGES, TABLES.astype(np.int64), LENGTHS,
        return_residual=True), decode_oracle(LENGTHS)),
    Supported("merge_single_part", lambda: jaxattn.merge_attention_states(
        *(x[None] for x in attention_reference(QUERY, KEY, VALUE))), oracle(QUERY, KEY, VALUE)),
]

SUPPORTED: list[Supported] = [*FLASH_SUPPORTED, *DECODE_SUPPORTED]


@pytest.mark.parametrize("row", SUPPORTED, ids=lambda row: row.id)
def test_supported_corner_case(row: Supported) -> None:
    out, lse = row.call()
    want_out, want_lse = row.expected()
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    assert out.dtype == row.dtype and lse.dtype == F32
    assert_close_to_oracle(out, want_out, dtype=row.dtype, name="out")
    assert_close_to_oracle(lse, want_lse, dtype=F32, name="lse")


@pytest.mark.parametrize("q_len, kv_len", [(0, S), (T, 0), (0, 0)], ids=["T0", "S0", "T0S0"])
def test_empty_sequences_have_zero_gradients(q_len: int, kv_len: int) -> None:
    """Gradients through an empty attention exist, have the input shapes and are zero."""
    q, k, v = ones(B, q_len, N, H), ones(B, kv_len, K, H), ones(B, kv_len, K, H)
    bias = ones(q_len, kv_len)
    loss = lambda *a: jnp.sum(jaxattn.flash_attention(*a, is_causal=True) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for g, x in zip(grads, (q, k, v, bias)):
        assert g.shape == x.shape
        assert not np.asarray(g).any()


def test_zero_kv_lengths_gradients_are_zero() -> None:
    lengths = np.array([0, 3], np.int32)
    dout = np.random.default_rng(1).standard_normal((B, T, N, H)).astype(np.float32)

    def attend(q, k, v):
        return jaxattn.flash_attention(q, k, v, key_value_seq_lengths=lengths)

    _, vjp = jax.vjp(attend, QUERY, KEY, VALUE)
    grads = vjp(dout)
    want = attention_reference_grad(QUERY, KEY, VALUE, dout, key_value_seq_lengths=lengths)
    for got, ref, name in zip(grads, want, ("dq", "dk", "dv")):
        assert_close_to_oracle(got, ref, dtype=F32, name=name)
        assert not np.asarray(got)[0].any(), f"{name}: batch 0 sees nothing, gradient must be 0"


# --------------------------------------------------------------------------------------------
# The primitives bound directly: the C++ handlers re-check
# --------------------------------------------------------------------------------------------


def _empty(dtype: Any) -> jax.Array:
    return jnp.zeros((0,), dtype)


ATTRS = _ffi.attention_attrs(0.5, None, False, None)
NO_BIAS, NO_MASK, NO_LENGTHS = _empty(jnp.float32), _empty(jnp.bool_), _empty(jnp.int32)


def bind_fwd(q=QUERY, k=KEY, v=VALUE, bias=NO_BIAS, mask=NO_MASK, q_lengths=NO_LENGTHS,
             kv_lengths=NO_LENGTHS, tokens=None, **attrs: Any) -> Callable[[], Any]:
    """A thunk binding ``flash_fwd_p`` to the given operands and attributes (``tokens``: the
    five token operands, absent by default)."""
    tokens = _ffi.no_tokens() if tokens is None else tokens
    return lambda: _ffi.flash_fwd_p.bind(q, k, v, bias, mask, q_lengths, kv_lengths, *tokens,
                                         **{**ATTRS, **attrs})


def with_token(index: int, value: Any) -> tuple[Any, ...]:
    """The absent token operands with operand ``index`` replaced."""
    tokens = list(_ffi.no_tokens())
    tokens[index] = value
    return tuple(tokens)


def bind_bwd(primitive=_ffi.flash_bwd_p, **changes: Any) -> Callable[[], Any]:
    """A thunk binding a backward primitive to consistent operands with some replaced."""
    operands = dict(q=QUERY, k=KEY, v=VALUE, bias=NO_BIAS, mask=NO_MASK, q_lengths=NO_LENGTHS,
                    kv_lengths=NO_LENGTHS, out=ones(B, T, N, H), lse=ones(B, T, N),
                    dout=ones(B, T, N, H), dlse=ones(B, T, N))
    operands.update(changes)
    return lambda: primitive.bind(*operands.values(), *_ffi.no_tokens(), **ATTRS)


@dataclasses.dataclass(frozen=True)
class BadBind:
    """``call()`` must fail cleanly: JaxRuntimeError from the handler (``match`` in the message)
    or an exception from abstract evaluation."""

    id: str
    call: Callable[[], Any]
    match: str
    error: type[Exception] | tuple[type[Exception], ...] = jax.errors.JaxRuntimeError


FLASH_FFI_BAD_BINDS = [
    BadBind("head_dim_mismatch", bind_fwd(k=ones(B, S, K, H + 8)), r"jaxattn: inconsistent shapes"),
    BadBind("length_mismatch", bind_fwd(v=ones(B, S + 1, K, H)), r"jaxattn: inconsistent shapes"),
    BadBind("heads_not_divisible", bind_fwd(k=ones(B, S, 3, H), v=ones(B, S, 3, H)),
            r"jaxattn: the number of query heads must be a multiple"),
    BadBind("int_inputs", bind_fwd(q=ones(B, T, N, H, dtype=np.int32)), r"jaxattn: query, key and value must share"),
    BadBind("mixed_dtypes", bind_fwd(v=VALUE.astype(BF16)), r"jaxattn: query, key and value must share"),
    BadBind("batch_not_dividing", bind_fwd(k=ones(3, S, K, H), v=ones(3, S, K, H)),
            r"jaxattn: operand batch sizes must divide"),
    BadBind("mask_not_broadcastable", bind_fwd(mask=ones(1, 1, T, S + 1, dtype=bool)),
            r"jaxattn: bias/mask must be broadcastable"),
    BadBind("mask_rank2", bind_fwd(mask=ones(T, S, dtype=bool)), r"jaxattn: mask must have rank 4"),
    BadBind("mask_float", bind_fwd(mask=ones(1, 1, T, S)), r"jaxattn: mask must be boolean"),
    BadBind("bias_dtype", bind_fwd(bias=ones(1, 1, T, S, dtype=np.int32)),
            r"jaxattn: bias must be float32, bfloat16, float16 or float64"),
    BadBind("bias_rank3", bind_fwd(bias=ones(1, T, S)), r"jaxattn: bias must have rank 4"),
    BadBind("lengths_float", bind_fwd(kv_lengths=ones(B)), r"S32"),
    BadBind("lengths_batch", bind_fwd(q_lengths=np.ones(3, np.int32)), r"jaxattn: operand batch sizes must divide"),
    BadBind("scale_nan", bind_fwd(scale=np.float32(np.nan)), r"jaxattn: scale must be finite"),
    BadBind("scale_inf", bind_fwd(scale=np.float32(np.inf)), r"jaxattn: scale must be finite"),
    BadBind("soft_cap_negative", bind_fwd(soft_cap=np.float32(-1)), r"jaxattn: soft cap"),
    BadBind("soft_cap_inf", bind_fwd(soft_cap=np.float32(np.inf)), r"jaxattn: soft cap"),
    BadBind("head_dim_over_limit", bind_fwd(q=ones(1, 1, 1, 2048), k=ones(1, 1, 1, 2048), v=ones(1, 1, 1, 2048)),
            r"jaxattn: head dims above 1024"),
    BadBind("empty_keys", bind_fwd(k=ones(B, 0, K, H), v=ones(B, 0, K, H)),
            r"jaxattn: every dimension must be positive"),
    BadBind("query_rank3", bind_fwd(q=ones(T, N, H)), r"jaxattn_flash_fwd: query must have rank 4", ValueError),
    BadBind("bwd_dout_shape", bind_bwd(dout=ones(B, T, N, H + 1)), r"jaxattn: backward operand shapes"),
    BadBind("bwd_lse_shape", bind_bwd(lse=ones(B, T, N + 1)), r"jaxattn: backward operand shapes"),
    BadBind("bwd_dlse_shape", bind_bwd(dlse=ones(B, T)), r"jaxattn: backward operand shapes"),
    BadBind("bwd_out_dtype", bind_bwd(out=ones(B, T, N, H, dtype=BF16)), r"jaxattn: backward operand shapes"),
    BadBind("bwd_key_rank", bind_bwd(k=ones(S, K, H)), r"jaxattn_flash_bwd: key must have rank 4", ValueError),
    BadBind("dlogits_dout_shape", bind_bwd(_ffi.flash_dlogits_p, dout=ones(B, T + 1, N, H)),
            r"jaxattn: logits-gradient operand shapes"),
    BadBind("q_positions_length", bind_fwd(tokens=with_token(0, np.ones((B, T + 1), np.int32))),
            r"jaxattn: query_positions must have shape"),
    BadBind("kv_positions_rank", bind_fwd(tokens=with_token(1, np.ones(S, np.int32))),
            r"jaxattn: key_value_positions must have shape"),
    # A batch of 3 makes the output batch 3, which the query's 2 does not divide.
    BadBind("positions_batch", bind_fwd(tokens=with_token(0, np.ones((3, T), np.int32))),
            r"jaxattn: operand batch sizes must divide"),
    BadBind("one_segment_side", bind_fwd(tokens=with_token(2, np.ones((B, T), np.int32))),
            r"jaxattn: query and key/value segment ids must be given together"),
    BadBind("alibi_heads", bind_fwd(tokens=with_token(4, np.ones((1, N + 1), np.float32))),
            r"jaxattn: alibi_slopes must have shape"),
]

DECODE_ATTRS = _ffi.decode_attrs(0.5, None, None)


def bind_decode(q=QUERY[:, :2], k=KEY, v=VALUE, lengths=LENGTHS, **attrs: Any) -> Callable[[], Any]:
    return lambda: _ffi.decode_fwd_p.bind(q, k, v, lengths, *_ffi.no_decode_tokens(),
                                          **{**DECODE_ATTRS, **attrs})


def bind_paged(q=QUERY[:, :2], k=KEY_PAGES, v=VALUE_PAGES, tables=TABLES, lengths=LENGTHS,
               **attrs: Any) -> Callable[[], Any]:
    return lambda: _ffi.paged_decode_fwd_p.bind(q, k, v, tables, lengths,
                                                *_ffi.no_decode_tokens(),
                                                **{**DECODE_ATTRS, **attrs})


DECODE_FFI_BAD_BINDS = [
    # The output batch is the largest operand batch; every other one must divide it.
    BadBind("decode_cache_batch", bind_decode(q=ones(4, 1, N, H), k=ones(3, S, K, H),
                                              v=ones(3, S, K, H), lengths=np.ones(4, np.int32)),
            r"jaxattn: decode: the cache batch must divide the batch"),
    BadBind("decode_query_batch", bind_decode(k=ones(3, S, K, H), v=ones(3, S, K, H)),
            r"jaxattn: decode: query batch must divide the batch"),
    BadBind("decode_head_dim", bind_decode(k=ones(B, S, K, H + 8)), r"jaxattn: decode: inconsistent shapes"),
    BadBind("decode_mixed_dtypes", bind_decode(v=VALUE.astype(BF16)), r"must share one of"),
    BadBind("decode_lengths_batch", bind_decode(q=ones(4, 1, N, H), lengths=np.ones(3, np.int32)),
            r"kv_lengths must have one entry per batch element"),
    BadBind("decode_lengths_rank2", bind_decode(lengths=np.ones((B, 1), np.int32)),
            r"kv_lengths must have rank 1"),
    BadBind("decode_lengths_float", bind_decode(lengths=ones(B)), r"S32"),
    BadBind("decode_heads_not_divisible", bind_decode(k=ones(B, S, 3, H), v=ones(B, S, 3, H)),
            r"must be a multiple of the number of kv heads"),
    BadBind("decode_scale_nan", bind_decode(scale=np.float32(np.nan)), r"scale/soft cap invalid"),
    BadBind("decode_soft_cap_negative", bind_decode(soft_cap=np.float32(-1)), r"scale/soft cap invalid"),
    BadBind("decode_head_dim_over_limit", bind_decode(q=ones(1, 1, 1, 2048), k=ones(1, 2, 1, 2048),
                                                      v=ones(1, 2, 1, 2048), lengths=np.ones(1, np.int32)),
            r"head dims above 1024"),
    BadBind("paged_tables_batch", bind_paged(q=ones(6, 1, N, H), tables=np.zeros((4, 3), np.int32)),
            r"block_tables must have one row per batch element"),
    BadBind("paged_bad_page_id", bind_paged(tables=np.array([[0, 1, 9], [3, 4, 5]], np.int32)),
            r"paged decode: block_tables holds a page id outside \[0, num_pages\)"),
    BadBind("paged_negative_page_id", bind_paged(tables=np.array([[0, 1, 2], [-3, 4, 5]], np.int32)),
            r"page id outside"),
    # issue 13, item 2: with strict_lengths a length past the cache is an error, not clamped
    BadBind("decode_strict_length_past_cache", bind_decode(lengths=np.array([S + 1, 3], np.int32),
                                                           strict_lengths=True),
            r"jaxattn: decode: kv_lengths\[0\] = 7 is outside \[0, 6\]"),
    BadBind("decode_strict_negative_length", bind_decode(lengths=np.array([S, -1], np.int32),
                                                         strict_lengths=True),
            r"kv_lengths\[1\] = -1 is outside"),
    BadBind("paged_strict_length_past_table", bind_paged(lengths=np.array([S + 1, 3], np.int32),
                                                         strict_lengths=True),
            r"kv_lengths\[0\] = 7 is outside \[0, 6\]"),
    # a contiguous value cache of another batch (vmap of one cache) must divide the batch
    BadBind("decode_value_cache_batch", bind_decode(q=ones(4, 1, N, H), k=ones(4, S, K, H),
                                                    v=ones(3, S, K, H),
                                                    lengths=np.ones(4, np.int32)),
            r"value cache batch must divide the batch"),
    BadBind("paged_value_pool_differs", bind_paged(v=VALUE_PAGES[:5]), r"inconsistent shapes"),
]

FFI_BAD_BINDS: list[BadBind] = [*FLASH_FFI_BAD_BINDS, *DECODE_FFI_BAD_BINDS]


@pytest.mark.parametrize("row", FFI_BAD_BINDS, ids=lambda row: row.id)
def test_primitive_rejects_inconsistent_operands(row: BadBind) -> None:
    with pytest.raises(row.error) as info:
        jax.block_until_ready(row.call())
    assert re.search(row.match, str(info.value)), f"{str(info.value)!r} !~ {row.match!r}"
    # The process is still usable: a valid call right after gives the right answer.
    out, lse = jax.block_until_ready(bind_fwd()())
    want_out, want_lse = attention_reference(QUERY, KEY, VALUE, scale=0.5)
    assert_close_to_oracle(out, want_out, dtype=F32, name="out")
    assert_close_to_oracle(lse, want_lse, dtype=F32, name="lse")


def test_primitive_clamps_huge_window_attributes() -> None:
    """Window attributes past the sequence (even INT64_MAX) mean unbounded, not overflow."""
    big = np.int64(np.iinfo(np.int64).max)
    huge = jax.block_until_ready(bind_fwd(window_left=big, window_right=big, is_causal=False)())
    plain = jax.block_until_ready(bind_fwd()())
    for a, b in zip(huge, plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Any negative value means unbounded too.
    negative = jax.block_until_ready(bind_fwd(window_left=np.int64(-5), window_right=np.int64(-7))())
    for a, b in zip(negative, plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
