"""Float64 NumPy reference for ``jaxattn.flash_attention`` (independent of JAX).

Semantics of docs/semantics.md section 1: ``logits = scale * q.k``, ``+ bias``, optional soft cap
``cap * tanh(logits / cap)``, then the masks (``mask``, causal, local window, key/value and query
sequence lengths). A query row with no visible key outputs 0, has ``lse = -inf`` and gets zero
gradients. Query head ``h`` uses key/value head ``h // (N // K)``.

The same code, run with a rounding step after every operation, gives ``naive_low_precision``:
the plain (non-flash) computation in bfloat16/float16/float32, whose error against the float64
result sets the tolerance of FlashAttention-style tests (``assert_close_to_oracle``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

Array = np.ndarray
DTypeLike = Any
Rounding = Callable[[Array], Array]
Window = int | tuple[int, int] | None

# Tolerance floors (atol, rtol): error <= factor * naive_error + atol + rtol * max|reference|.
# Low precision: one unit in the last place at the largest magnitude, the cost of rounding the
# result once. float32: a small floor, since float32 accumulation orders legitimately differ.
_FLOORS: dict[str, tuple[float, float]] = {
    "float64": (1e-12, 1e-12),
    "float32": (2e-5, 2e-5),
    "bfloat16": (1e-5, float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)),
    "float16": (1e-6, float(ml_dtypes.finfo(np.float16).eps)),
}


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def window_bounds(local_window_size: Window) -> tuple[int, int] | None:
    """Normalises ``local_window_size`` to ``(left, right)``; an int ``w`` means ``(w, w)``."""
    if local_window_size is None:
        return None
    if isinstance(local_window_size, (int, np.integer)):
        return int(local_window_size), int(local_window_size)
    left, right = local_window_size
    return int(left), int(right)


def token_positions(q_len: int, kv_len: int, query_positions: Array | None = None,
                    key_value_positions: Array | None = None) -> tuple[Array, Array]:
    """Query and key positions as int64 ``[B or 1, 1, T, 1]`` and ``[B or 1, 1, 1, S]``:
    the given ones (``[B, L]`` or ``[L]``, clamped to ``[-2**30, 2**30]`` as the kernels
    clamp them) or the indices."""

    def as_4d(x: Array | None, length: int) -> Array:
        if x is None:
            return np.arange(length, dtype=np.int64)[None]
        return np.clip(np.asarray(x, dtype=np.int64).reshape(-1, length), -2**30, 2**30)

    return (as_4d(query_positions, q_len)[:, None, :, None],
            as_4d(key_value_positions, kv_len)[:, None, None, :])


def alibi_bias(slopes: Array, q_len: int, kv_len: int, query_positions: Array | None = None,
               key_value_positions: Array | None = None) -> Array:
    """The ALiBi term ``-slope[b, n] * |qp - kp|`` as float64 ``[B or 1, N, T, S]``."""
    slopes = np.asarray(slopes, dtype=np.float64)
    slopes = slopes.reshape(-1, slopes.shape[-1])[:, :, None, None]
    qp, kp = token_positions(q_len, kv_len, query_positions, key_value_positions)
    return -slopes * np.abs(qp - kp).astype(np.float64)


def visibility(
    q: Array,
    k: Array,
    mask: Array | None = None,
    *,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: Window = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    query_positions: Array | None = None,
    key_value_positions: Array | None = None,
    query_segment_ids: Array | None = None,
    key_value_segment_ids: Array | None = None,
    alibi_slopes: Array | None = None,
) -> Array:
    """Which (query, key) pairs are attended: bool ``[B,N,T,S]`` (``[N,T,S]`` if unbatched).

    The causal mask and the window compare token positions (``query_positions``,
    ``key_value_positions``; each defaults to the indices); the lengths count indices; segment
    ids must be equal. ``scale``, ``logits_soft_cap`` and ``alibi_slopes`` are accepted and
    ignored so that one options dict can be passed to every function of this module.
    """
    del scale, logits_soft_cap, alibi_slopes
    unbatched = np.ndim(q) == 3
    q_shape = (1, *np.shape(q)) if unbatched else np.shape(q)
    batch, q_len, num_heads, _ = q_shape
    kv_len = np.shape(k)[-3]
    index_rows = np.arange(q_len)[:, None]
    index_cols = np.arange(kv_len)[None, :]
    rows, cols = token_positions(q_len, kv_len, query_positions, key_value_positions)
    visible = np.ones((batch, num_heads, q_len, kv_len), dtype=bool)
    if query_segment_ids is not None:
        q_ids = np.asarray(query_segment_ids).reshape(-1, 1, q_len, 1)
        kv_ids = np.asarray(key_value_segment_ids).reshape(-1, 1, 1, kv_len)
        visible &= q_ids == kv_ids
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        visible &= mask
    if is_causal:
        visible &= cols <= rows
    window = window_bounds(local_window_size)
    if window is not None:
        left, right = window
        visible &= (cols >= rows - left) & (cols <= rows + right)
    if key_value_seq_lengths is not None:
        kv_lengths = np.asarray(key_value_seq_lengths).reshape(-1, 1, 1, 1)
        visible &= index_cols[None, None] < kv_lengths
    if query_seq_lengths is not None:
        q_lengths = np.asarray(query_seq_lengths).reshape(-1, 1, 1, 1)
        visible &= index_rows[None, None] < q_lengths
    return visible[0] if unbatched else visible


def decode_visibility(kv_lengths: Array, q_len: int, kv_len: int,
                      local_window_size: Window = None) -> Array:
    """The visibility of decoding (``decode_attention``) as a dense bool mask ``[B,1,T,S]``.

    Lengths are clamped to ``[0, S]``; query ``t`` of sequence ``b`` sits at position
    ``len_b - T + t`` and sees keys ``j <= position`` (and ``j >= position - left`` with a
    window; its right side cannot matter). Pass it as ``mask`` to the functions below.
    """
    lengths = np.clip(np.asarray(kv_lengths, dtype=np.int64), 0, kv_len)
    pos = lengths[:, None] - q_len + np.arange(q_len)[None, :]  # [B, T]
    cols = np.arange(kv_len)[None, None, :]
    visible = cols <= pos[:, :, None]
    window = window_bounds(local_window_size)
    if window is not None:
        visible &= cols >= pos[:, :, None] - window[0]
    return visible[:, None]


def sum_to_shape(x: Array, shape: Sequence[int]) -> Array:
    """Sums ``x`` over the axes along which an array of ``shape`` was broadcast to ``x.shape``."""
    shape = tuple(shape)
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    broadcast_axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=broadcast_axes, keepdims=True).reshape(shape)


# --------------------------------------------------------------------------------------------
# Forward and backward, parameterised by the rounding applied after each operation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Precision:
    """Working dtype (float64 or float32) and the dtype every operation's result is rounded to."""

    work: np.dtype
    storage: np.dtype

    @classmethod
    def of(cls, dtype: DTypeLike) -> _Precision:
        storage = np.dtype(dtype)
        work = np.dtype(np.float64 if storage == np.float64 else np.float32)
        return cls(work=work, storage=storage)

    def round(self, x: Array | float) -> Array:
        """Rounds to the storage dtype and returns it in the working dtype."""
        return np.asarray(x).astype(self.storage).astype(self.work)


@dataclasses.dataclass(frozen=True)
class _Forward:
    """Inputs (batched, heads expanded to N) and intermediates of one forward pass."""

    q: Array  # [B,T,N,H]
    k: Array  # [B,S,N,H], kv heads repeated to the query heads
    v: Array  # [B,S,N,Hv]
    visible: Array  # bool [B,N,T,S]
    scale: float
    cap: float | None
    capped_tanh: Array | None  # tanh(logits / cap) [B,N,T,S] when a soft cap is used
    probs: Array  # [B,N,T,S], 0 where invisible
    dropout: Array | None  # [B,N,T,S] keep / (1 - rate) multiplying probs in out, or None
    out: Array  # [B,T,N,Hv]
    lse: Array  # [B,T,N]
    num_kv_heads: int
    unbatched: bool
    bias_shape: tuple[int, ...] | None


def _forward(
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None,
    mask: Array | None,
    precision: _Precision,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: Window = None,
    logits_soft_cap: float | None = None,
    dropout_multiplier: Array | None = None,
    **tokens: Any,
) -> _Forward:
    """Attention forward pass, rounding each operation's result with ``precision``.

    ``tokens``: ``query_positions``, ``key_value_positions``, ``query_segment_ids``,
    ``key_value_segment_ids``, ``alibi_slopes`` (see ``visibility`` and ``alibi_bias``).
    ``dropout_multiplier``: dropout on the weights, ``keep / (1 - rate)`` broadcastable to
    ``[B, N, T, S]``, multiplying the normalised weights before the product with V (the lse
    is that of the undropped weights).
    """
    r = precision.round
    unbatched = np.ndim(q) == 3
    if unbatched != (np.ndim(k) == 3) or np.ndim(k) != np.ndim(v):
        raise ValueError("query, key and value must all be batched or all unbatched")
    visible = visibility(
        q,
        k,
        mask,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        **tokens,
    )
    if unbatched:
        q, k, v, visible = q[None], k[None], v[None], visible[None]
    q, k, v = r(q), r(k), r(v)
    batch, q_len, num_heads, head_dim = q.shape
    _, kv_len, num_kv_heads, _ = k.shape
    if num_heads % num_kv_heads or k.shape[-1] != head_dim or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"bad shapes q {q.shape}, k {k.shape}, v {v.shape}")
    group = num_heads // num_kv_heads
    k = np.repeat(k, group, axis=2)  # query head h reads kv head h // group
    v = np.repeat(v, group, axis=2)
    scale = 1.0 / np.sqrt(head_dim) if scale is None else float(scale)

    logits = r(np.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)))  # [B,N,T,S]
    logits = r(logits * precision.work.type(scale))
    if bias is not None:
        logits = r(logits + r(np.asarray(bias)))
    if tokens.get("alibi_slopes") is not None:
        alibi = alibi_bias(tokens["alibi_slopes"], q_len, kv_len, tokens.get("query_positions"),
                           tokens.get("key_value_positions"))
        logits = r(logits + r(alibi))
    capped_tanh = None
    if logits_soft_cap is not None:
        cap = precision.work.type(logits_soft_cap)
        capped_tanh = r(np.tanh(r(logits / cap)))
        logits = r(cap * capped_tanh)

    masked = np.where(visible, logits, -np.inf)
    row_max = masked.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0)
    exp = np.exp(masked - row_max)  # 0 where invisible
    denom = exp.sum(axis=-1, keepdims=True)
    probs = r(exp / np.where(denom > 0, denom, 1))  # softmax is one operation: one rounding
    dropout = None
    weights = probs
    if dropout_multiplier is not None:
        dropout = np.broadcast_to(np.asarray(dropout_multiplier, np.float64), probs.shape)
        weights = r(probs * dropout)
    out = r(np.matmul(weights, v.transpose(0, 2, 1, 3)))  # [B,N,T,Hv]
    with np.errstate(divide="ignore"):
        lse = (row_max + np.log(denom))[..., 0]  # -inf for rows without a visible key
    return _Forward(
        q=q,
        k=k,
        v=v,
        visible=visible,
        scale=scale,
        cap=logits_soft_cap,
        capped_tanh=capped_tanh,
        probs=probs,
        dropout=dropout,
        out=out.transpose(0, 2, 1, 3),
        lse=lse.transpose(0, 2, 1),
        num_kv_heads=num_kv_heads,
        unbatched=unbatched,
        bias_shape=None if bias is None else np.shape(bias),
    )


def _backward(
    fwd: _Forward, dout: Array, precision: _Precision
) -> tuple[Array, Array, Array, Array | None]:
    """Gradients of ``sum(out * dout)`` with respect to q, k, v and bias."""
    r = precision.round
    dout = r(dout[None] if fwd.unbatched else dout).transpose(0, 2, 1, 3)  # [B,N,T,Hv]
    probs = fwd.probs
    weights = probs if fwd.dropout is None else r(probs * fwd.dropout)
    dv = r(np.matmul(weights.transpose(0, 1, 3, 2), dout))  # [B,N,S,Hv]
    dprobs = r(np.matmul(dout, fwd.v.transpose(0, 2, 3, 1)))  # [B,N,T,S]
    if fwd.dropout is not None:  # out = (probs * dropout) V
        dprobs = r(dprobs * fwd.dropout)
    # Softmax backward, one operation. Rows without a visible key have probs == 0: no gradient.
    dlogits = r(probs * (dprobs - (probs * dprobs).sum(axis=-1, keepdims=True)))
    if fwd.cap is not None:
        dlogits = r(dlogits * (1 - fwd.capped_tanh**2))  # d/dx cap*tanh(x/cap)
    dbias = None
    if fwd.bias_shape is not None:
        as_4d = (1,) * (4 - len(fwd.bias_shape)) + tuple(fwd.bias_shape)
        dbias = r(sum_to_shape(dlogits, as_4d)).reshape(fwd.bias_shape)
    dscores = r(dlogits * precision.work.type(fwd.scale))
    dq = r(np.matmul(dscores, fwd.k.transpose(0, 2, 1, 3)))  # [B,N,T,H]
    dk = r(np.matmul(dscores.transpose(0, 1, 3, 2), fwd.q.transpose(0, 2, 1, 3)))  # [B,N,S,H]

    def to_kv_heads(grad: Array) -> Array:
        """[B,N,S,D] per query head -> [B,S,K,D] summed over each kv head's group."""
        batch, num_heads, kv_len, dim = grad.shape
        grouped = grad.reshape(batch, fwd.num_kv_heads, num_heads // fwd.num_kv_heads, kv_len, dim)
        return r(grouped.sum(axis=2)).transpose(0, 2, 1, 3)

    grads = [dq.transpose(0, 2, 1, 3), to_kv_heads(dk), to_kv_heads(dv)]
    if fwd.unbatched:
        grads = [g[0] for g in grads]
    return grads[0], grads[1], grads[2], dbias


def _unbatch(fwd: _Forward) -> tuple[Array, Array]:
    if fwd.unbatched:
        return fwd.out[0], fwd.lse[0]
    return fwd.out, fwd.lse


def _as_float64(*arrays: Array | None) -> tuple[Array | None, ...]:
    return tuple(None if a is None else np.asarray(a).astype(np.float64) for a in arrays)


# --------------------------------------------------------------------------------------------
# Public reference functions
# --------------------------------------------------------------------------------------------


def attention_reference(
    q: Array,
    k: Array,
    v: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    **options: Any,
) -> tuple[Array, Array]:
    """Exact attention in float64: ``(out [B,T,N,Hv], lse [B,T,N])`` (no B axis if unbatched)."""
    fwd = _forward(*_as_float64(q, k, v, bias), mask, _Precision.of(np.float64), **options)
    return _unbatch(fwd)


def attention_reference_grad(
    q: Array,
    k: Array,
    v: Array,
    dout: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    **options: Any,
) -> tuple[Array, Array, Array, Array | None]:
    """Analytic float64 gradients ``(dq, dk, dv, dbias)`` of ``sum(out * dout)``.

    ``dbias`` is summed to the shape of ``bias`` (``None`` without a bias).
    """
    precision = _Precision.of(np.float64)
    q, k, v, bias, dout = _as_float64(q, k, v, bias, dout)
    return _backward(_forward(q, k, v, bias, mask, precision, **options), dout, precision)


def naive_low_precision(
    q: Array,
    k: Array,
    v: Array,
    dtype: DTypeLike,
    bias: Array | None = None,
    mask: Array | None = None,
    **options: Any,
) -> tuple[Array, Array]:
    """The plain attention computation in ``dtype``, returned as float64 ``(out, lse)``.

    Each operation (matmul, scale, bias add, tanh, softmax, matmul) accumulates in float32 and
    rounds its result to ``dtype``, like framework code running in that dtype. ``lse`` is computed
    in float32 from the rounded logits.
    """
    fwd = _forward(*_as_float64(q, k, v, bias), mask, _Precision.of(dtype), **options)
    return _as_float64(*_unbatch(fwd))


def naive_low_precision_grad(
    q: Array,
    k: Array,
    v: Array,
    dout: Array,
    dtype: DTypeLike,
    bias: Array | None = None,
    mask: Array | None = None,
    **options: Any,
) -> tuple[Array, Array, Array, Array | None]:
    """Gradients of the naive computation in ``dtype`` (rounded after each op), as float64."""
    precision = _Precision.of(dtype)
    q, k, v, bias, dout = _as_float64(q, k, v, bias, dout)
    grads = _backward(_forward(q, k, v, bias, mask, precision, **options), dout, precision)
    return _as_float64(*grads)


# --------------------------------------------------------------------------------------------
# Tolerance rule
# --------------------------------------------------------------------------------------------


def tolerance_floor(dtype: DTypeLike, reference_magnitude: float) -> float:
    """The error always allowed for results in ``dtype`` of the given largest magnitude."""
    atol, rtol = _FLOORS[np.dtype(dtype).name]
    return atol + rtol * reference_magnitude


def _max_abs(x: Array) -> float:
    return float(np.max(np.abs(x))) if x.size else 0.0


def assert_close_to_oracle(
    actual: Any,
    reference: Array,
    naive: Array | None = None,
    *,
    dtype: DTypeLike,
    name: str,
    factor: float = 2.0,
    extra_rtol: float = 0.0,
) -> None:
    """FlashAttention's rule: ``max|actual - ref| <= factor * max|naive - ref| + floor``.

    ``reference`` is the float64 oracle, ``naive`` the same computation done naively in ``dtype``
    (omit it to check against the floor alone). Non-finite reference entries (``-inf`` lse of
    empty rows) must be matched exactly; ``actual`` must be finite everywhere else.
    ``extra_rtol`` (times max|ref|) adds to the floor where a kernel documents arithmetic
    coarser than ``dtype`` (the integer dot products of int8 caches).
    """
    actual = np.asarray(actual).astype(np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != {reference.shape}"
    finite = np.isfinite(reference)
    mismatched = ~finite & (actual != reference)
    assert not mismatched.any(), (
        f"{name}: {mismatched.sum()} entries differ where the reference is non-finite, first at "
        f"{tuple(np.argwhere(mismatched)[0])}: "
        f"{actual[mismatched][0]} vs {reference[mismatched][0]}"
    )
    bad = finite & ~np.isfinite(actual)
    assert not bad.any(), (
        f"{name}: {bad.sum()} non-finite entries where the reference is finite, first at "
        f"{tuple(np.argwhere(bad)[0])}"
    )
    error = np.zeros_like(reference)
    error[finite] = np.abs(actual[finite] - reference[finite])
    max_error = _max_abs(error)
    naive_error = 0.0
    if naive is not None:
        naive = np.asarray(naive, dtype=np.float64)
        naive_error = _max_abs(naive[finite] - reference[finite])
    magnitude = _max_abs(reference[finite])
    allowed = factor * naive_error + tolerance_floor(dtype, magnitude) + extra_rtol * magnitude
    if max_error > allowed:
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(error), error.shape))
        raise AssertionError(
            f"{name} ({np.dtype(dtype).name}): max error {max_error:.3e} > allowed {allowed:.3e} "
            f"(naive error {naive_error:.3e}, max|ref| {_max_abs(reference[finite]):.3e}); "
            f"worst at {worst}: actual {actual[worst]!r}, reference {reference[worst]!r}"
        )


# --------------------------------------------------------------------------------------------
# Test inputs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """Sizes of one attention problem, named as in docs/semantics.md (B, T, S, N, K, H, Hv)."""

    batch: int = 2
    q_len: int = 37
    kv_len: int = 37
    num_heads: int = 2
    num_kv_heads: int = 2
    head_dim: int = 32
    value_head_dim: int | None = None

    @property
    def query(self) -> tuple[int, int, int, int]:
        return self.batch, self.q_len, self.num_heads, self.head_dim

    @property
    def key(self) -> tuple[int, int, int, int]:
        return self.batch, self.kv_len, self.num_kv_heads, self.head_dim

    @property
    def value(self) -> tuple[int, int, int, int]:
        return self.batch, self.kv_len, self.num_kv_heads, self.value_head_dim or self.head_dim

    @property
    def out(self) -> tuple[int, int, int, int]:
        return self.batch, self.q_len, self.num_heads, self.value_head_dim or self.head_dim

    def resolve(self, pattern: str) -> tuple[int, ...]:
        """A shape from a pattern over "BNTS1", e.g. ``"1N1S"`` -> ``(1, N, 1, S)``."""
        sizes = {"B": self.batch, "N": self.num_heads, "T": self.q_len, "S": self.kv_len, "1": 1}
        return tuple(sizes[letter] for letter in pattern)


def random_inputs(
    rng: np.random.Generator,
    shape: Shape,
    dtype: DTypeLike,
    *,
    bias: str | None = None,
    mask: str | None = None,
    mask_density: float = 0.75,
) -> dict[str, Array | None]:
    """Standard-normal ``query, key, value`` (and ``bias``) in ``dtype``, and a random bool mask.

    ``bias`` and ``mask`` are shape patterns for ``Shape.resolve`` (``None``: no such input).
    """

    def normal(dims: tuple[int, ...]) -> Array:
        return rng.standard_normal(dims).astype(dtype)

    return {
        "query": normal(shape.query),
        "key": normal(shape.key),
        "value": normal(shape.value),
        "bias": None if bias is None else normal(shape.resolve(bias)),
        "mask": None if mask is None else rng.random(shape.resolve(mask)) < mask_density,
    }


# --------------------------------------------------------------------------------------------
# Forward mode
# --------------------------------------------------------------------------------------------


def _tangent(
    fwd: _Forward, dq: Array, dk: Array, dv: Array, dbias: Array | None, precision: _Precision
) -> tuple[Array, Array]:
    """The tangent of (out, lse) in the direction (dq, dk, dv, dbias), analytically:
    dS = d logits, c = sum_j P dS (the lse's tangent), dO = P (dS - c) V + P dV."""
    r = precision.round
    if fwd.unbatched:
        dq, dk, dv = dq[None], dk[None], dv[None]
    group = fwd.q.shape[2] // fwd.num_kv_heads
    dq, dk, dv = r(dq), r(np.repeat(r(dk), group, axis=2)), r(np.repeat(r(dv), group, axis=2))
    scale = precision.work.type(fwd.scale)
    dlogits = r(scale * (np.matmul(dq.transpose(0, 2, 1, 3), fwd.k.transpose(0, 2, 3, 1))
                         + np.matmul(fwd.q.transpose(0, 2, 1, 3), dk.transpose(0, 2, 3, 1))))
    if dbias is not None:
        dlogits = r(dlogits + r(np.asarray(dbias)))
    if fwd.cap is not None:
        dlogits = r(dlogits * (1 - fwd.capped_tanh**2))
    weighted = np.where(fwd.visible, fwd.probs * dlogits, 0.0)  # masked entries: no effect
    dlse = r(weighted.sum(axis=-1))  # [B,N,T]
    dout = r(np.matmul(r(weighted - fwd.probs * dlse[..., None]), fwd.v.transpose(0, 2, 1, 3))
             + np.matmul(fwd.probs, dv.transpose(0, 2, 1, 3)))  # [B,N,T,Hv]
    dout, dlse = dout.transpose(0, 2, 1, 3), dlse.transpose(0, 2, 1)
    return (dout[0], dlse[0]) if fwd.unbatched else (dout, dlse)


def attention_reference_jvp(
    q: Array,
    k: Array,
    v: Array,
    dq: Array,
    dk: Array,
    dv: Array,
    bias: Array | None = None,
    dbias: Array | None = None,
    mask: Array | None = None,
    *,
    dtype: DTypeLike = np.float64,
    **options: Any,
) -> tuple[Array, Array]:
    """Analytic tangents ``(dout, dlse)`` of ``attention_reference`` in the direction
    ``(dq, dk, dv, dbias)``; with ``dtype`` the naive computation rounded to it (float64
    results)."""
    precision = _Precision.of(dtype)
    q, k, v, bias, dq, dk, dv, dbias = _as_float64(q, k, v, bias, dq, dk, dv, dbias)
    fwd = _forward(q, k, v, bias, mask, precision, **options)
    return _as_float64(*_tangent(fwd, dq, dk, dv, dbias, precision))


# --------------------------------------------------------------------------------------------
# Gated linear attention (jaxattn.gated_linear_attention)
# --------------------------------------------------------------------------------------------


def _gla_states(q, k, v, log_gate, initial_state):
    b, t, n, hk = q.shape
    hv = v.shape[-1]
    state = (np.zeros((b, n, hk, hv)) if initial_state is None
             else np.array(initial_state, dtype=np.float64))
    states = [state]
    for i in range(t):
        state = (np.exp(log_gate[:, i])[..., None] * state
                 + k[:, i][..., :, None] * v[:, i][..., None, :])
        states.append(state)
    return states


def _gla_expand(q, k, v, g):
    """Grouped kv heads repeated to the query's ``N`` (query head n reads kv head
    n // (N // K)), and a gate of one value per head and step (``[B, T, K]`` or
    ``[B, T, K, 1]``) broadcast over the key dim: the per-head, per-dim recurrence's operands."""
    group = q.shape[2] // k.shape[2]
    if g.ndim == 3:
        g = g[..., None]
    g = np.broadcast_to(g, k.shape[:3] + (q.shape[3],))
    k, v, g = (np.repeat(x, group, axis=2) for x in (k, v, g))
    return q, k, v, g


def _gla_reduce(grad, like):
    """The gradient of an expanded operand (``_gla_expand``) summed back to ``like``'s shape."""
    b, t, n, h = grad.shape
    kv_heads = like.shape[2]
    grad = grad.reshape(b, t, kv_heads, n // kv_heads, h).sum(axis=3)
    if like.ndim == 3:
        return grad.sum(axis=-1)
    return grad.sum(axis=-1, keepdims=True) if like.shape[-1] == 1 and h != 1 else grad


def gla_reference(query: Array, key: Array, value: Array, log_gate: Array, *,
                  scale: float | None = None,
                  initial_state: Array | None = None) -> tuple[Array, Array]:
    """The gated linear attention recurrence step by step in float64.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``out_t = scale q_t S_t``; query
    ``[B, T, N, Hk]``, key and log_gate ``[B, T, K, Hk]``, value ``[B, T, K, Hv]`` (K divides
    N; query head n reads kv head n // (N // K)), initial_state ``[B, N, Hk, Hv]``; a gate
    ``[B, T, K]`` or ``[B, T, K, 1]`` is the same on every key dim.
    Returns ``(out [B, T, N, Hv], final_state [B, N, Hk, Hv])``.
    """
    q, k, v, g = _gla_expand(*_as_float64(query, key, value, log_gate))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    states = _gla_states(q, k, v, g, initial_state)
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for i in range(q.shape[1]):
        out[:, i] = np.einsum("bni,bnij->bnj", scale * q[:, i], states[i + 1])
    return out, states[-1]


def gla_reference_grad(query: Array, key: Array, value: Array, log_gate: Array, dout: Array, *,
                       scale: float | None = None, initial_state: Array | None = None,
                       dfinal_state: Array | None = None) -> tuple[Array, ...]:
    """Gradients of ``gla_reference`` by the backward recurrence (float64).

    With dS the total gradient of the state S_t: dS_t = scale q_t^T dout_t
    + diag(exp(g_{t+1})) dS_{t+1}; then dq_t = scale S_t dout_t, dk_t = dS_t v_t,
    dv_t = dS_t^T k_t, dg_t = rowsum(dS_t * diag(exp(g_t)) S_{t-1}), d initial = the dS before
    the first step; grouped kv heads and scalar gates (see ``gla_reference``) get the sums
    over what they were expanded to. Returns ``(dq, dk, dv, dlog_gate, dinitial_state)``, each
    of its operand's shape.
    """
    q0, k0, v0, g0, do = _as_float64(query, key, value, log_gate, dout)
    q, k, v, g = _gla_expand(q0, k0, v0, g0)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    states = _gla_states(q, k, v, g, initial_state)
    ds = (np.zeros_like(states[0]) if dfinal_state is None
          else np.array(dfinal_state, dtype=np.float64))
    dq, dk, dg = np.zeros_like(q), np.zeros_like(k), np.zeros_like(g)
    dv = np.zeros_like(v)
    for i in reversed(range(q.shape[1])):
        ds = ds + scale * q[:, i][..., :, None] * do[:, i][..., None, :]
        dq[:, i] = scale * np.einsum("bnij,bnj->bni", states[i + 1], do[:, i])
        dk[:, i] = np.einsum("bnij,bnj->bni", ds, v[:, i])
        dv[:, i] = np.einsum("bnij,bni->bnj", ds, k[:, i])
        decayed = np.exp(g[:, i])[..., None] * states[i]
        dg[:, i] = np.sum(ds * decayed, axis=-1)
        ds = np.exp(g[:, i])[..., None] * ds
    return dq, _gla_reduce(dk, k0), _gla_reduce(dv, v0), _gla_reduce(dg, g0), ds
