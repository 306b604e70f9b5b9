"""Token positions, packed sequences (segment ids) and ALiBi in ``flash_attention``.

Every case runs forward and backward against the float64 oracle (``tests/oracle.py``, whose
``visibility`` and bias take positions, segment ids and slopes), with FlashAttention's tolerance
rule and exact zeros where nothing is visible. Tile skipping by positions and ids is checked to
give the same results as the equivalent dense mask, bitwise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import Shape, random_inputs, visibility
from test_flash import (
    BF16,
    DTYPES,
    F16,
    F32,
    check_attention,
    flash_forward,
    flash_gradients,
    random_cotangent,
)

import jaxattn


def gapped_positions(rng: np.random.Generator, batch: int, length: int, start: int = 0,
                     max_gap: int = 3) -> np.ndarray:
    """Increasing positions [B, L] with random gaps (padding, holes in a batched cache)."""
    steps = rng.integers(1, max_gap + 1, size=(batch, length))
    return (start + np.cumsum(steps, axis=1) - steps[:, :1]).astype(np.int32)


def packed_segments(rng: np.random.Generator, batch: int, length: int,
                    docs: int) -> np.ndarray:
    """Segment ids [B, L]: `docs` contiguous documents of random lengths per row."""
    ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=docs - 1, replace=False))
        ids[b] = np.searchsorted(cuts, np.arange(length), side="right")
    return ids


def check(rng: np.random.Generator, shape: Shape, dtype: np.dtype = F32, *,
          bias: str | None = None, mask: str | None = None, **options: Any) -> None:
    inputs = random_inputs(rng, shape, dtype, bias=bias, mask=mask)
    check_attention(rng, inputs, options)


# --------------------------------------------------------------------------------------------
# The oracle's own semantics, by explicit loops
# --------------------------------------------------------------------------------------------


def test_oracle_visibility_and_alibi_by_loops(rng: np.random.Generator) -> None:
    from oracle import alibi_bias

    b_, t_, s_, n_ = 2, 9, 11, 3
    q = np.zeros((b_, t_, n_, 4))
    k = np.zeros((b_, s_, 1, 4))
    qp = rng.integers(-5, 15, size=(b_, t_))
    kp = rng.integers(-5, 15, size=(b_, s_))
    qs = rng.integers(0, 3, size=(b_, t_))
    ks = rng.integers(0, 3, size=(b_, s_))
    slopes = rng.random((b_, n_))
    kv_len = np.array([11, 6])
    got = visibility(q, k, is_causal=True, local_window_size=(4, 2), query_positions=qp,
                     key_value_positions=kp, query_segment_ids=qs, key_value_segment_ids=ks,
                     key_value_seq_lengths=kv_len)
    bias = alibi_bias(slopes, t_, s_, qp, kp)
    for b in range(b_):
        for n in range(n_):
            for i in range(t_):
                for j in range(s_):
                    want = (kp[b, j] <= qp[b, i] and qp[b, i] - 4 <= kp[b, j] <= qp[b, i] + 2
                            and qs[b, i] == ks[b, j] and j < kv_len[b])
                    assert got[b, n, i, j] == want
                    assert bias[b, n, i, j] == -slopes[b, n] * abs(qp[b, i] - kp[b, j])


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, (7, 0), (5, 3)], ids=["nowin", "left", "both"])
def test_left_padding(rng: np.random.Generator, dtype: np.dtype, window: Any) -> None:
    """Left-padded prompts: positions start after the padding, padding keys are masked."""
    shape = Shape(batch=3, q_len=75, kv_len=75, num_heads=4, num_kv_heads=2, head_dim=40)
    pads = np.array([0, 9, 70])
    positions = (np.arange(75)[None] - pads[:, None]).astype(np.int32)
    # Padding keys get a position past every query; the causal mask hides them.
    kv_positions = np.where(positions < 0, 2**30, positions).astype(np.int32)
    check(rng, shape, dtype, is_causal=True, local_window_size=window,
          query_positions=positions, key_value_positions=kv_positions)


@pytest.mark.parametrize("q_len, kv_len", [(37, 200), (1, 129), (130, 300), (65, 65)])
def test_prefill_into_cache(rng: np.random.Generator, q_len: int, kv_len: int) -> None:
    """The queries are the last tokens of a longer sequence (a second turn of a chat)."""
    shape = Shape(batch=2, q_len=q_len, kv_len=kv_len, num_heads=2, num_kv_heads=1, head_dim=32)
    q_positions = (np.arange(q_len) + kv_len - q_len).astype(np.int32)
    check(rng, shape, is_causal=True, query_positions=q_positions)
    check(rng, shape, is_causal=True, local_window_size=(50, 0), query_positions=q_positions,
          key_value_seq_lengths=np.array([kv_len, kv_len - 3], np.int32))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gapped_positions(rng: np.random.Generator, dtype: np.dtype) -> None:
    shape = Shape(batch=2, q_len=150, kv_len=211, num_heads=6, num_kv_heads=2, head_dim=64)
    q_positions = gapped_positions(rng, 2, 150, start=40)
    kv_positions = gapped_positions(rng, 2, 211)
    check(rng, shape, dtype, is_causal=True, local_window_size=(60, 10),
          query_positions=q_positions, key_value_positions=kv_positions)
    check(rng, shape, dtype, local_window_size=(30, 30), bias="1NTS",
          query_positions=q_positions, key_value_positions=kv_positions)


@pytest.mark.parametrize("is_causal", [False, True])
def test_non_monotone_positions(rng: np.random.Generator, is_causal: bool) -> None:
    shape = Shape(batch=2, q_len=133, kv_len=140, num_heads=2, num_kv_heads=2, head_dim=16)
    q_positions = rng.permutation(np.arange(200))[:133][None].repeat(2, 0).astype(np.int32)
    kv_positions = rng.integers(-50, 250, size=(2, 140)).astype(np.int32)
    check(rng, shape, is_causal=is_causal, local_window_size=(40, 20),
          query_positions=q_positions, key_value_positions=kv_positions,
          query_seq_lengths=np.array([133, 100], np.int32))


def test_positions_without_masks_change_nothing(rng: np.random.Generator) -> None:
    """Without causal or window, positions alone (no ALiBi) leave the result unchanged."""
    shape = Shape(batch=2, q_len=70, kv_len=90, num_heads=2, num_kv_heads=1, head_dim=32)
    inputs = random_inputs(rng, shape, F32)
    plain = flash_forward(inputs, {})
    moved = flash_forward(inputs, {"query_positions": gapped_positions(rng, 2, 70),
                                   "key_value_positions": gapped_positions(rng, 2, 90)})
    for name in plain:
        np.testing.assert_array_equal(plain[name], moved[name])


def test_fully_masked_rows(rng: np.random.Generator) -> None:
    """Queries whose position precedes every key see nothing: 0, lse -inf, zero gradients."""
    shape = Shape(batch=1, q_len=80, kv_len=80, num_heads=2, num_kv_heads=1, head_dim=32)
    q_positions = np.arange(80, dtype=np.int32) - 20  # the first 20 queries see nothing
    check(rng, shape, is_causal=True, query_positions=q_positions)


# --------------------------------------------------------------------------------------------
# Segment ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_packed_sequences(rng: np.random.Generator, dtype: np.dtype, is_causal: bool) -> None:
    shape = Shape(batch=2, q_len=301, kv_len=301, num_heads=4, num_kv_heads=1, head_dim=40)
    ids = packed_segments(rng, 2, 301, docs=5)
    check(rng, shape, dtype, is_causal=is_causal, query_segment_ids=ids,
          key_value_segment_ids=ids)


@pytest.mark.parametrize(
    "combo",
    ["window", "lengths", "mask", "bias", "positions", "cap", "all"],
)
def test_segments_with_other_masks(rng: np.random.Generator, combo: str) -> None:
    shape = Shape(batch=2, q_len=150, kv_len=170, num_heads=4, num_kv_heads=2, head_dim=32)
    q_ids, kv_ids = packed_segments(rng, 2, 150, 4), packed_segments(rng, 2, 170, 4)
    options: dict[str, Any] = {"query_segment_ids": q_ids, "key_value_segment_ids": kv_ids,
                               "is_causal": combo in ("positions", "all")}
    bias = mask = None
    if combo in ("window", "all"):
        options["local_window_size"] = (40, 5)
    if combo in ("lengths", "all"):
        options["query_seq_lengths"] = np.array([150, 111], np.int32)
        options["key_value_seq_lengths"] = np.array([99, 170], np.int32)
    if combo in ("mask", "all"):
        mask = "B1TS"
    if combo in ("bias", "all"):
        bias = "1NTS"
    if combo in ("positions", "all"):
        options["query_positions"] = gapped_positions(rng, 2, 150, start=30)
        options["key_value_positions"] = gapped_positions(rng, 2, 170)
    if combo in ("cap", "all"):
        options["logits_soft_cap"] = 3.0
    check(rng, shape, bias=bias, mask=mask, **options)


def test_segments_non_contiguous(rng: np.random.Generator) -> None:
    """Ids need not be contiguous runs: every pair with equal ids attends."""
    shape = Shape(batch=1, q_len=130, kv_len=140, num_heads=2, num_kv_heads=2, head_dim=16)
    q_ids = rng.integers(0, 3, size=(1, 130)).astype(np.int32)
    kv_ids = rng.integers(1, 5, size=(1, 140)).astype(np.int32)  # id 0 matches no key
    check(rng, shape, query_segment_ids=q_ids, key_value_segment_ids=kv_ids)


# --------------------------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------------------------


def alibi(num_heads: int) -> np.ndarray:
    """The geometric slopes of the ALiBi paper."""
    return (2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alibi(rng: np.random.Generator, dtype: np.dtype) -> None:
    shape = Shape(batch=2, q_len=97, kv_len=131, num_heads=4, num_kv_heads=2, head_dim=32)
    check(rng, shape, dtype, is_causal=True, alibi_slopes=alibi(4))
    check(rng, shape, dtype, alibi_slopes=np.abs(rng.standard_normal((2, 4))).astype(np.float32),
          bias="B1TS", logits_soft_cap=5.0)


def test_alibi_with_positions_and_segments(rng: np.random.Generator) -> None:
    shape = Shape(batch=2, q_len=140, kv_len=200, num_heads=4, num_kv_heads=1, head_dim=32)
    check(rng, shape, is_causal=True, local_window_size=(80, 0), alibi_slopes=alibi(4),
          query_positions=gapped_positions(rng, 2, 140, start=100),
          key_value_positions=gapped_positions(rng, 2, 200),
          query_segment_ids=packed_segments(rng, 2, 140, 3),
          key_value_segment_ids=packed_segments(rng, 2, 200, 3))


def test_alibi_slopes_get_no_gradient(rng: np.random.Generator) -> None:
    shape = Shape(batch=1, q_len=20, kv_len=20, num_heads=2, num_kv_heads=2, head_dim=16)
    inputs = random_inputs(rng, shape, F32)
    grad = jax.grad(lambda s: jaxattn.flash_attention(inputs["query"], inputs["key"],
                                                      inputs["value"], alibi_slopes=s).sum())
    np.testing.assert_array_equal(grad(jnp.ones(2)), np.zeros(2))


# --------------------------------------------------------------------------------------------
# Tile skipping: the same results as the equivalent dense mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("case", ["packed", "packed_causal", "positions", "shuffled"])
def test_skipping_matches_dense_mask(rng: np.random.Generator, dtype: np.dtype,
                                     case: str) -> None:
    shape = Shape(batch=2, q_len=513, kv_len=513, num_heads=4, num_kv_heads=2, head_dim=64)
    inputs = random_inputs(rng, shape, dtype)
    options: dict[str, Any] = {}
    if case.startswith("packed"):
        ids = packed_segments(rng, 2, 513, 6)
        options = {"query_segment_ids": ids, "key_value_segment_ids": ids}
        options["is_causal"] = case == "packed_causal"
    elif case == "positions":
        options = {"is_causal": True, "local_window_size": (100, 0),
                   "query_positions": gapped_positions(rng, 2, 513, start=7),
                   "key_value_positions": gapped_positions(rng, 2, 513)}
    else:
        options = {"is_causal": True, "query_positions": rng.permutation(513)[None]}
    dense = {**inputs, "mask": visibility(inputs["query"], inputs["key"], **options)}
    dout = random_cotangent(rng, inputs)
    got = {**flash_forward(inputs, options), **flash_gradients(inputs, options, dout)}
    want = {**flash_forward(dense, {}), **flash_gradients(dense, {}, dout)}
    for name in got:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)


# --------------------------------------------------------------------------------------------
# Transformations and validation
# --------------------------------------------------------------------------------------------


def test_vmap_and_unbatched(rng: np.random.Generator) -> None:
    shape = Shape(batch=3, q_len=45, kv_len=60, num_heads=2, num_kv_heads=1, head_dim=16)
    inputs = random_inputs(rng, shape, F32)
    q_pos = gapped_positions(rng, 3, 45, start=20)
    ids = packed_segments(rng, 3, 60, 3)
    slopes = alibi(2)
    options = dict(is_causal=True, alibi_slopes=slopes)

    def one(q, k, v, qp, qs, ks):
        return jaxattn.flash_attention(q, k, v, query_positions=qp, query_segment_ids=qs,
                                       key_value_segment_ids=ks, **options)

    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    mapped = jax.jit(jax.vmap(one))(q, k, v, q_pos, ids[:, :45], ids)
    batched = jaxattn.flash_attention(q, k, v, query_positions=q_pos,
                                      query_segment_ids=ids[:, :45], key_value_segment_ids=ids,
                                      **options)
    np.testing.assert_array_equal(mapped, batched)
    for b in range(3):
        alone = one(q[b], k[b], v[b], q_pos[b], ids[b, :45], ids[b])
        np.testing.assert_array_equal(alone, batched[b])
    # vmap of grad, positions mapped
    grad = jax.vmap(jax.grad(lambda q, qp: one(q, k[0], v[0], qp, ids[0, :45], ids[0]).sum()))
    got = grad(q, q_pos)
    for b in range(3):
        want = jax.grad(lambda q: one(q, k[0], v[0], q_pos[b], ids[0, :45], ids[0]).sum())(q[b])
        np.testing.assert_array_equal(got[b], want)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"query_positions": np.zeros((2, 5), np.int32)}, ValueError, "query_positions"),
        ({"key_value_positions": np.zeros((3, 9), np.int32)}, ValueError, "key_value_positions"),
        ({"query_positions": np.zeros((2, 8), np.float32)}, TypeError, "query_positions"),
        ({"query_segment_ids": np.zeros((2, 8), np.int32)}, ValueError, "both or neither"),
        ({"query_segment_ids": np.zeros((2, 8), np.int32),
          "key_value_segment_ids": np.zeros((2, 8), np.int32)}, ValueError,
         "key_value_segment_ids"),
        ({"alibi_slopes": np.zeros((3,), np.float32)}, ValueError, "alibi_slopes"),
        ({"alibi_slopes": np.zeros((4,), np.int32)}, TypeError, "alibi_slopes"),
    ],
)
def test_validation(changes: dict[str, Any], error: type, match: str) -> None:
    q = jnp.zeros((2, 8, 4, 16))
    k = jnp.zeros((2, 9, 2, 16))
    with pytest.raises(error, match=match):
        jaxattn.flash_attention(q, k, k, **changes)


# --------------------------------------------------------------------------------------------
# Decoding: positions (batched caches with gaps) and ALiBi
# --------------------------------------------------------------------------------------------


def decode_reference(q, k, v, lengths, q_positions, kv_positions, *, window_left=None,
                     slopes=None, soft_cap=None):
    """decode_attention's semantics through the flash oracle: key j < len visible to query i
    where kv_positions[j] <= q_positions[i] (and >= q_positions[i] - window_left)."""
    from oracle import alibi_bias, attention_reference, token_positions

    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]
    qp, kp = token_positions(q_len, kv_len, q_positions, kv_positions)
    visible = (kp <= qp) & (np.arange(kv_len)[None, None, None] < lengths[:, None, None, None])
    if window_left is not None:
        visible &= kp >= qp - window_left
    bias = None
    if slopes is not None:
        bias = alibi_bias(slopes, q_len, kv_len, q_positions, kv_positions)
    return attention_reference(q, k, v, bias, np.broadcast_to(visible, (batch, 1, q_len, kv_len)),
                               logits_soft_cap=soft_cap)


def gapped_cache(rng: np.random.Generator, prompt_lengths: list[int], capacity: int,
                 q_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gemma's batched cache: prompts of different lengths left at the start of the cache,
    gaps up to the longest prompt, then the T new tokens written at one shared end index.
    Returns (kv_positions [B, capacity], query positions [B, T], lengths [B])."""
    longest = max(prompt_lengths)
    end = longest + q_len
    kv_positions = np.full((len(prompt_lengths), capacity), 2**30, np.int32)  # gaps: hidden
    q_positions = np.zeros((len(prompt_lengths), q_len), np.int32)
    for b, n in enumerate(prompt_lengths):
        kv_positions[b, :n] = np.arange(n)
        kv_positions[b, longest:end] = n + np.arange(q_len)
        q_positions[b] = n + np.arange(q_len)
    return kv_positions, q_positions, np.full(len(prompt_lengths), end, np.int32)


@pytest.mark.parametrize("q_len", [1, 3, 16])
@pytest.mark.parametrize("window", [None, 20])
def test_decode_batched_cache_with_gaps(rng: np.random.Generator, q_len: int,
                                        window: int | None) -> None:
    from oracle import assert_close_to_oracle

    capacity = 700  # several decode partitions
    kv_positions, q_positions, lengths = gapped_cache(rng, [5, 300, 640], capacity, q_len)
    q = rng.standard_normal((3, q_len, 8, 32)).astype(np.float32)
    k = rng.standard_normal((3, capacity, 2, 32)).astype(np.float32)
    v = rng.standard_normal((3, capacity, 2, 32)).astype(np.float32)
    out, lse = jaxattn.decode_attention(q, k, v, lengths, query_positions=q_positions,
                                        key_value_positions=kv_positions,
                                        local_window_size=window, return_residual=True)
    ref_out, ref_lse = decode_reference(q, k, v, lengths, q_positions, kv_positions,
                                        window_left=window)
    assert_close_to_oracle(out, ref_out, dtype=np.float32, name="out")
    assert_close_to_oracle(lse, ref_lse, dtype=np.float32, name="lse")
    # The same through flash attention with the same positions.
    flash = jaxattn.flash_attention(q, k, v, is_causal=True, query_positions=q_positions,
                                    key_value_positions=kv_positions,
                                    key_value_seq_lengths=lengths,
                                    local_window_size=None if window is None else (window, 0))
    np.testing.assert_allclose(np.asarray(out), np.asarray(flash), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [np.float32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_decode_alibi(rng: np.random.Generator, dtype: np.dtype) -> None:
    from oracle import assert_close_to_oracle

    q = rng.standard_normal((3, 4, 8, 64)).astype(dtype)
    k = rng.standard_normal((3, 600, 2, 64)).astype(dtype)
    v = rng.standard_normal((3, 600, 2, 64)).astype(dtype)
    lengths = np.array([600, 37, 4], np.int32)
    slopes = alibi(8) * 4
    for kw in ({}, {"soft_cap": 2.0, "window_left": 100}):
        out, lse = jaxattn.decode_attention(
            q, k, v, lengths, alibi_slopes=slopes, logits_soft_cap=kw.get("soft_cap"),
            local_window_size=kw.get("window_left"), return_residual=True)
        default_q = (lengths[:, None] - 4 + np.arange(4)[None]).astype(np.int32)
        ref_out, ref_lse = decode_reference(q, k, v, lengths, default_q, None, slopes=slopes,
                                            **kw)
        # The output is rounded once to its dtype; the lse is float32 from exact products.
        assert_close_to_oracle(out, ref_out, dtype=dtype, name="out")
        assert_close_to_oracle(lse, ref_lse, dtype=np.float32, name="lse")


@pytest.mark.parametrize("page_size", [7, 64])
def test_paged_decode_positions_match_contiguous(rng: np.random.Generator,
                                                 page_size: int) -> None:
    from test_decode import paged_layout

    capacity = 448
    kv_positions, q_positions, lengths = gapped_cache(rng, [10, 200, 400], capacity, 2)
    q = rng.standard_normal((3, 2, 4, 16)).astype(np.float32)
    k = rng.standard_normal((3, capacity, 1, 16)).astype(np.float32)
    v = rng.standard_normal((3, capacity, 1, 16)).astype(np.float32)
    pool_k, pool_v, tables = paged_layout(rng, k, v, page_size, fill=np.nan)
    slopes = alibi(4)
    kw = dict(query_positions=q_positions, alibi_slopes=slopes)
    paged_positions = np.full((3, tables.shape[1] * page_size), 2**30, np.int32)
    paged_positions[:, :capacity] = kv_positions
    paged = jaxattn.paged_decode_attention(q, pool_k, pool_v, tables, lengths,
                                           key_value_positions=paged_positions, **kw)
    contiguous = jaxattn.decode_attention(q, k, v, lengths, key_value_positions=kv_positions,
                                          **kw)
    assert np.all(np.isfinite(np.asarray(paged)))
    np.testing.assert_allclose(np.asarray(paged), np.asarray(contiguous), rtol=1e-5, atol=1e-6)
    # vmap over the batch, positions mapped, pool shared.
    one = lambda q, t, l, kp, qp: jaxattn.paged_decode_attention(
        q[None], pool_k, pool_v, t[None], l[None], key_value_positions=kp[None],
        query_positions=qp[None], alibi_slopes=slopes)[0]
    mapped = jax.vmap(one)(q, tables, lengths, paged_positions, q_positions)
    np.testing.assert_array_equal(np.asarray(mapped), np.asarray(paged))


def test_decode_validation() -> None:
    q = jnp.zeros((2, 1, 4, 16))
    k = jnp.zeros((2, 32, 2, 16))
    lengths = jnp.array([3, 4], jnp.int32)
    with pytest.raises(ValueError, match="key_value_positions"):
        jaxattn.decode_attention(q, k, k, lengths, key_value_positions=jnp.zeros((2, 31), int))
    with pytest.raises(ValueError, match="query_positions"):
        jaxattn.decode_attention(q, k, k, lengths, query_positions=jnp.zeros((2, 2), int))
    with pytest.raises(ValueError, match="alibi_slopes"):
        jaxattn.decode_attention(q, k, k, lengths, alibi_slopes=jnp.zeros((2,)))


# --------------------------------------------------------------------------------------------
# Flax: FlashSelfAttention(x, segment_ids=...)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["nnx", "linen"])
def test_flax_packed_equals_separate_documents(rng: np.random.Generator, flavour: str) -> None:
    """A packed row gives each document what the layer gives that document alone."""
    from flax import nnx

    from jaxattn.flax.linen import FlashSelfAttention as LinenFlash
    from jaxattn.flax.nnx import FlashSelfAttention as NnxFlash

    lengths = [13, 40, 1, 26]
    t = sum(lengths)
    ids = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    x = rng.standard_normal((2, t, 32)).astype(np.float32)
    options = dict(num_kv_heads=2, use_rope=True, local_window_size=(9, 0))
    if flavour == "nnx":
        layer = NnxFlash(32, 4, rngs=nnx.Rngs(0), **options)
        run = lambda x, **kw: layer(x, **kw)
    else:
        module = LinenFlash(4, **options)
        params = module.init(jax.random.key(0), x)
        run = lambda x, **kw: module.apply(params, x, **kw)
    packed = np.asarray(jax.jit(lambda x, s: run(x, segment_ids=s))(x, ids))
    start = 0
    for n in lengths:
        alone = np.asarray(run(x[:, start:start + n]))
        np.testing.assert_allclose(packed[:, start:start + n], alone, rtol=2e-5, atol=2e-5)
        start += n
    # Per-row ids ([B, T]) and the xla implementation agree too.
    per_row = np.stack([ids, np.zeros_like(ids)])
    got = np.asarray(run(x, segment_ids=per_row))
    np.testing.assert_allclose(got[0], packed[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[1], np.asarray(run(x))[1], rtol=2e-5, atol=2e-5)
    if flavour == "nnx":
        xla = NnxFlash(32, 4, rngs=nnx.Rngs(0), implementation="xla", **options)
        np.testing.assert_allclose(np.asarray(xla(x, segment_ids=per_row)), got, rtol=2e-5,
                                   atol=2e-5)


def test_flax_segment_ids_errors(rng: np.random.Generator) -> None:
    from flax import nnx

    from jaxattn.flax.nnx import FlashSelfAttention as NnxFlash

    layer = NnxFlash(16, 2, rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 5, 16))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        layer(x, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be an integer"):
        layer(x, segment_ids=jnp.zeros((5,)))
    layer.init_cache(batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="not supported with decode=True"):
        layer(x[:, :1], decode=True, segment_ids=jnp.zeros((2, 1), jnp.int32))


# --------------------------------------------------------------------------------------------
# block_sparse_attention: segment ids, positions (for ALiBi) and slopes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_block_sparse_matches_flash_with_dense_mask(rng: np.random.Generator,
                                                    dtype: np.dtype) -> None:
    """The same tiles on the same grid as flash_attention with the dense mask: bitwise."""
    from oracle import assert_close_to_oracle, attention_reference

    t, s = 200, 230
    shape = Shape(batch=2, q_len=t, kv_len=s, num_heads=4, num_kv_heads=2, head_dim=32)
    inputs = random_inputs(rng, shape, dtype)
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    m = jaxattn.masks.local(t, s, window=(60, 10), block_q=16, block_kv=32)
    tokens = dict(query_segment_ids=packed_segments(rng, 2, t, 3),
                  key_value_segment_ids=packed_segments(rng, 2, s, 3),
                  query_positions=gapped_positions(rng, 2, t, start=5),
                  key_value_positions=gapped_positions(rng, 2, s), alibi_slopes=alibi(4))
    dout = random_cotangent(rng, inputs)

    def run(attend):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(dout))

    sparse = jax.jit(lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, m, **tokens))
    dense_mask = jnp.asarray(m.to_dense())[None]
    flash = jax.jit(lambda q, k, v: jaxattn.flash_attention(q, k, v, mask=dense_mask, **tokens))
    for got, want, name in zip(run(sparse), run(flash), ("out", "dq", "dk", "dv")):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), name)
    # And the oracle agrees (forward).
    ref, _ = attention_reference(q, k, v, None, np.asarray(dense_mask), **tokens)
    assert_close_to_oracle(sparse(q, k, v), ref, dtype=dtype, name="out")


def test_block_sparse_tokens_vmap_and_validation(rng: np.random.Generator) -> None:
    shape = Shape(batch=3, q_len=70, kv_len=70, num_heads=2, num_kv_heads=1, head_dim=16)
    inputs = random_inputs(rng, shape, F32)
    q, k, v = inputs["query"], inputs["key"], inputs["value"]
    m = jaxattn.masks.causal(70, 70, block_q=8, block_kv=8)
    ids = packed_segments(rng, 3, 70, 3)
    one = lambda q, k, v, i: jaxattn.block_sparse_attention(
        q, k, v, m, query_segment_ids=i, key_value_segment_ids=i, alibi_slopes=alibi(2))
    batched = one(q, k, v, ids)
    np.testing.assert_array_equal(np.asarray(jax.vmap(one)(q, k, v, ids)), np.asarray(batched))
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(one(q[b], k[b], v[b], ids[b])),
                                      np.asarray(batched[b]))
    with pytest.raises(ValueError, match="both or neither"):
        jaxattn.block_sparse_attention(q, k, v, m, query_segment_ids=ids)
    with pytest.raises(ValueError, match="key_value_positions"):
        jaxattn.block_sparse_attention(q, k, v, m, key_value_positions=np.zeros((3, 9), int))


def test_v1_targets_keep_their_original_layout(rng: np.random.Generator) -> None:
    """Programs exported before the token operands call the _v1 targets with their original
    operands (flash: 7, decode: 4, no strict_lengths); they still run, as the defaults."""
    q = rng.standard_normal((2, 9, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 11, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 11, 2, 8)).astype(np.float32)
    empty_f, empty_b, empty_i = (np.zeros((0,), t) for t in (np.float32, np.bool_, np.int32))
    out_types = (jax.ShapeDtypeStruct((2, 9, 4, 8), np.float32),
                 jax.ShapeDtypeStruct((2, 9, 4), np.float32))
    out, lse = jax.ffi.ffi_call("jaxattn_flash_fwd_v1", out_types)(
        q, k, v, empty_f, empty_b, empty_i, empty_i, scale=np.float32(0.25),
        soft_cap=np.float32(0), is_causal=True, window_left=np.int64(-1),
        window_right=np.int64(-1))
    want = jaxattn.flash_attention(q, k, v, scale=0.25, is_causal=True, return_residual=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want[1]))

    lengths = np.array([11, 5], np.int32)
    qd = q[:, :3]
    out_types = (jax.ShapeDtypeStruct((2, 3, 4, 8), np.float32),
                 jax.ShapeDtypeStruct((2, 3, 4), np.float32))
    out, lse = jax.ffi.ffi_call("jaxattn_decode_fwd_v1", out_types)(
        qd, k, v, lengths, scale=np.float32(0.25), soft_cap=np.float32(0),
        window_left=np.int64(-1))
    want = jaxattn.decode_attention(qd, k, v, lengths, scale=0.25, return_residual=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want[1]))


def test_each_layout_takes_exactly_its_token_operands(rng: np.random.Generator) -> None:
    """The _v1 and _v2 layouts share one handler (the token operands end the argument list);
    each still takes exactly its own operands and attributes: a _v2 call without its token
    operands, a _v1 call with them, or a missing attribute is an error, not a guess."""
    q = rng.standard_normal((1, 5, 2, 8)).astype(np.float32)
    empty_f, empty_b, empty_i = (np.zeros((0,), t) for t in (np.float32, np.bool_, np.int32))
    out_types = (jax.ShapeDtypeStruct((1, 5, 2, 8), np.float32),
                 jax.ShapeDtypeStruct((1, 5, 2), np.float32))
    attrs = dict(scale=np.float32(0.25), soft_cap=np.float32(0), is_causal=False,
                 window_left=np.int64(-1), window_right=np.int64(-1))
    base = (q, q, q, empty_f, empty_b, empty_i, empty_i)
    tokens = (empty_i, empty_i, empty_i, empty_i, empty_f)
    with pytest.raises(Exception, match="expected 5 trailing operands, got 0"):
        jax.ffi.ffi_call("jaxattn_flash_fwd_v2", out_types)(*base, **attrs)
    with pytest.raises(Exception, match="expected 0 trailing operands, got 5"):
        jax.ffi.ffi_call("jaxattn_flash_fwd_v1", out_types)(*base, *tokens, **attrs)
    del attrs["window_right"]
    with pytest.raises(Exception, match="attributes"):
        jax.ffi.ffi_call("jaxattn_flash_fwd_v2", out_types)(*base, *tokens, **attrs)


def test_v2_targets_keep_their_layout(rng: np.random.Generator) -> None:
    """The public functions call the _v3 targets (dropout; decode: query_lengths). Programs
    exported before them call the _v2 flash, block-sparse and decode targets and the _v1
    quantized ones; those still run and equal the _v3 results without dropout."""
    q = rng.standard_normal((2, 9, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 11, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 11, 2, 8)).astype(np.float32)
    empty_f, empty_b, empty_i = (np.zeros((0,), t) for t in (np.float32, np.bool_, np.int32))
    tokens = (empty_i, empty_i, empty_i, empty_i, empty_f)
    out_types = (jax.ShapeDtypeStruct((2, 9, 4, 8), np.float32),
                 jax.ShapeDtypeStruct((2, 9, 4), np.float32))
    attrs = dict(scale=np.float32(0.25), soft_cap=np.float32(0), is_causal=True,
                 window_left=np.int64(-1), window_right=np.int64(-1))
    out, lse = jax.ffi.ffi_call("jaxattn_flash_fwd_v2", out_types)(
        q, k, v, empty_f, empty_b, empty_i, empty_i, *tokens, **attrs)
    want = jaxattn.flash_attention(q, k, v, scale=0.25, is_causal=True, return_residual=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want[1]))

    # _v3 takes exactly six trailing operands and the dropout_threshold attribute.
    base = (q, k, v, empty_f, empty_b, empty_i, empty_i)
    seeds = np.zeros((0,), np.uint32)
    with pytest.raises(Exception, match="expected 6 trailing operands, got 5"):
        jax.ffi.ffi_call("jaxattn_flash_fwd_v3", out_types)(
            *base, *tokens, **attrs, dropout_threshold=np.int64(0))
    with pytest.raises(Exception, match="attributes"):
        jax.ffi.ffi_call("jaxattn_flash_fwd_v3", out_types)(*base, *tokens, seeds, **attrs)
    with pytest.raises(Exception, match="dropout seeds must have shape"):
        jax.ffi.ffi_call("jaxattn_flash_fwd_v3", out_types)(
            *base, *tokens, seeds, **attrs, dropout_threshold=np.int64(1 << 31))

    lengths = np.array([11, 5], np.int32)
    qd = q[:, :3]
    out_types = (jax.ShapeDtypeStruct((2, 3, 4, 8), np.float32),
                 jax.ShapeDtypeStruct((2, 3, 4), np.float32))
    decode_attrs = dict(scale=np.float32(0.25), soft_cap=np.float32(0),
                        window_left=np.int64(-1), strict_lengths=False)
    out, lse = jax.ffi.ffi_call("jaxattn_decode_fwd_v2", out_types)(
        qd, k, v, lengths, empty_i, empty_i, empty_f, **decode_attrs)
    want = jaxattn.decode_attention(qd, k, v, lengths, scale=0.25, return_residual=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want[1]))
    with pytest.raises(Exception, match="expected 4 trailing operands, got 3"):
        jax.ffi.ffi_call("jaxattn_decode_fwd_v3", out_types)(
            qd, k, v, lengths, empty_i, empty_i, empty_f, **decode_attrs)
    out3, lse3 = jax.ffi.ffi_call("jaxattn_decode_fwd_v3", out_types)(
        qd, k, v, lengths, empty_i, empty_i, empty_f, empty_i, **decode_attrs)
    np.testing.assert_array_equal(np.asarray(out3), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(lse3), np.asarray(want[1]))
