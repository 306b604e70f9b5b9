"""Property-based tests (hypothesis): random shapes, options and masks against the float64 oracle.

Each example draws a whole problem: dtype, B/T/S/N/K/H/Hv (odd sizes included), optional bias
and mask of random broadcast shapes, causal, window, soft cap, scale, query/key lengths that
may be negative or past the end (the kernels clamp), and dropout (the oracle applies
``jaxattn.dropout_mask``'s mask). When lengths are given, the inputs past
them may be filled with NaN (they must not be read). Forward and, for some examples, gradients
must pass FlashAttention's tolerance rule against the oracle.

By default the examples are derandomized (the same every run, so CI is reproducible) and
bounded to finish in well under a minute; ``HYPOTHESIS_PROFILE=explore`` draws new, more
examples. To cover another op, add a strategy and a test like ``test_flash_matches_oracle``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxattn
from jaxattn.dropout import dropout_threshold
from oracle import (
    Shape,
    assert_close_to_oracle,
    attention_reference,
    attention_reference_grad,
    naive_low_precision,
    naive_low_precision_grad,
)

settings.register_profile(
    "jaxattn-ci", max_examples=50, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "explore", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "jaxattn-ci")

F32 = np.dtype(np.float32)
BF16 = np.dtype(jnp.bfloat16)
F16 = np.dtype(np.float16)
F64 = np.dtype(np.float64)
DIFFERENTIABLE = ("query", "key", "value", "bias")
# Broadcast patterns (over "BNTS1", see Shape.resolve); batched-only ones start with B.
BATCHED_PATTERNS = ["BNTS", "B1TS", "B11S", "B1T1"]
SHARED_PATTERNS = ["11TS", "1N1S", "1NT1", "NTS", "TS", "S", "1S", "T1"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One drawn flash_attention call."""

    shape: Shape
    dtype: np.dtype
    unbatched: bool
    bias: str | None
    mask: str | None
    mask_density: float
    options: dict[str, Any]
    nan_padding: bool
    gradients: bool
    seed: int
    dropout: float | None = None

    def __repr__(self) -> str:  # shown by hypothesis on failure
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["dtype"] = self.dtype.name
        return f"Problem({fields})"


@st.composite
def problems(draw: st.DrawFn, dtypes: tuple[np.dtype, ...] = (F32, BF16, F16)) -> Problem:
    dtype = draw(st.sampled_from(dtypes))
    num_kv_heads = draw(st.integers(1, 2))
    shape = Shape(
        batch=draw(st.integers(1, 2)),
        q_len=draw(st.integers(1, 70)),
        kv_len=draw(st.integers(1, 70)),
        num_heads=num_kv_heads * draw(st.sampled_from([1, 2, 3])),
        num_kv_heads=num_kv_heads,
        head_dim=draw(st.sampled_from([1, 3, 8, 16, 24, 40, 64, 96])),
        value_head_dim=draw(st.one_of(st.none(), st.sampled_from([1, 8, 33]))),
    )
    unbatched = shape.batch == 1 and draw(st.booleans())
    patterns = SHARED_PATTERNS + ([] if unbatched else BATCHED_PATTERNS)
    bias = draw(st.one_of(st.none(), st.sampled_from(patterns)))
    mask = draw(st.one_of(st.none(), st.sampled_from(patterns)))
    options: dict[str, Any] = {"is_causal": draw(st.booleans())}
    window = draw(st.one_of(st.none(), st.integers(0, 20),
                            st.tuples(st.integers(0, 40), st.integers(0, 40))))
    if window is not None:
        options["local_window_size"] = window
    cap = draw(st.one_of(st.none(), st.sampled_from([0.5, 2.0, 20.0])))
    if cap is not None:
        options["logits_soft_cap"] = cap
    scale = draw(st.one_of(st.none(), st.floats(-1.5, 1.5, allow_nan=False, width=32)))
    if scale is not None:
        options["scale"] = scale
    lengths_batch = 1 if unbatched else shape.batch
    for name, limit in (("query_seq_lengths", shape.q_len), ("key_value_seq_lengths", shape.kv_len)):
        if draw(st.booleans()):
            values = draw(st.lists(st.integers(-3, limit + 3), min_size=lengths_batch,
                                   max_size=lengths_batch))
            options[name] = np.array(values, np.int32)
    has_lengths = "query_seq_lengths" in options or "key_value_seq_lengths" in options
    return Problem(
        shape=shape, dtype=dtype, unbatched=unbatched, bias=bias, mask=mask,
        mask_density=draw(st.sampled_from([0.3, 0.8, 1.0])), options=options,
        nan_padding=has_lengths and draw(st.booleans()), gradients=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
        dropout=draw(st.one_of(st.none(), st.sampled_from([0.2, 0.6]))))


def make_inputs(problem: Problem) -> tuple[dict[str, np.ndarray | None], dict[str, np.ndarray | None]]:
    """(inputs for flash, inputs for the oracle): equal, except that with ``nan_padding`` the
    flash inputs hold NaN past the (clamped) sequence lengths where the oracle's hold 0."""
    rng = np.random.default_rng(problem.seed)
    shape = problem.shape
    normal = lambda dims: rng.standard_normal(dims).astype(problem.dtype)  # noqa: E731
    inputs = {
        "query": normal(shape.query),
        "key": normal(shape.key),
        "value": normal(shape.value),
        "bias": None if problem.bias is None else normal(shape.resolve(problem.bias)),
        "mask": None if problem.mask is None else rng.random(shape.resolve(problem.mask)) < problem.mask_density,
    }
    padded = {k: None if v is None else v.copy() for k, v in inputs.items()}
    clean = {k: None if v is None else v.copy() for k, v in inputs.items()}
    if problem.nan_padding:
        for b in range(shape.batch):
            q_lengths = problem.options.get("query_seq_lengths")
            kv_lengths = problem.options.get("key_value_seq_lengths")
            if q_lengths is not None:
                end = int(np.clip(q_lengths[b], 0, shape.q_len))
                padded["query"][b, end:], clean["query"][b, end:] = np.nan, 0
            if kv_lengths is not None:
                end = int(np.clip(kv_lengths[b], 0, shape.kv_len))
                for name in ("key", "value"):
                    padded[name][b, end:], clean[name][b, end:] = np.nan, 0
    if problem.unbatched:
        for d in (padded, clean):
            for name in ("query", "key", "value"):
                d[name] = d[name][0]
    return padded, clean


@settings(settings.get_profile(PROFILE))
@given(problems())
def test_flash_matches_oracle(problem: Problem) -> None:
    check_flash_against_oracle(problem)


@settings(settings.get_profile(PROFILE))
@given(problems(dtypes=(F64,)))
def test_float64_flash_matches_oracle(problem: Problem) -> None:
    """The same problems in float64 (x64 on for the example only): the float64 kernels."""
    with jax.enable_x64(True):
        check_flash_against_oracle(problem)


def check_flash_against_oracle(problem: Problem) -> None:
    """Forward, lse and (when drawn) gradients of one problem against the float64 oracle."""
    inputs, oracle_inputs = make_inputs(problem)
    dtype, options = problem.dtype, dict(problem.options)
    present = [n for n in DIFFERENTIABLE if inputs[n] is not None]
    flash_options = dict(options)
    if problem.dropout is not None:
        key = jax.random.key(problem.seed % 2**31)
        flash_options.update(dropout_rate=problem.dropout, dropout_rng=key)
        shape = problem.shape
        keep = jaxattn.dropout_mask(key, problem.dropout, shape.batch, shape.num_heads,
                                    shape.q_len, shape.kv_len)
        # Kept weights are scaled by 1 / keep probability, that of the kernels' 32-bit
        # threshold (the rate rounded to a multiple of 2^-32: visible in float64).
        kept_fraction = 1 - dropout_threshold(problem.dropout) * 2.0**-32
        options["dropout_multiplier"] = np.asarray(keep, np.float64) / kept_fraction

    def attend(diff: dict[str, jax.Array]):
        return jaxattn.flash_attention(**{**inputs, **diff}, **flash_options,
                                       return_residual=True)

    out, lse = attend({n: inputs[n] for n in present})
    q, k, v, b, m = (oracle_inputs[n] for n in ("query", "key", "value", "bias", "mask"))
    ref_out, ref_lse = attention_reference(q, k, v, b, m, **options)
    naive_out, naive_lse = naive_low_precision(q, k, v, dtype, b, m, **options)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close_to_oracle(out, ref_out, naive_out, dtype=dtype, name="out")
    # The lse is float32, or float64 for float64 inputs.
    assert_close_to_oracle(lse, ref_lse, naive_lse, dtype=F64 if dtype == F64 else F32,
                           name="lse")
    if not problem.gradients:
        return
    dout = np.random.default_rng(problem.seed + 1).standard_normal(ref_out.shape).astype(dtype)
    _, vjp = jax.vjp(lambda d: attend(d)[0], {n: inputs[n] for n in present})
    (grads,) = vjp(dout)
    ref_grads = attention_reference_grad(q, k, v, dout, b, m, **options)
    naive_grads = naive_low_precision_grad(q, k, v, dout, dtype, b, m, **options)
    for name, ref, naive in zip(DIFFERENTIABLE, ref_grads, naive_grads):
        if name in grads:
            assert grads[name].shape == np.shape(inputs[name])
            assert_close_to_oracle(grads[name], ref, naive, dtype=dtype, name=f"d{name}")
