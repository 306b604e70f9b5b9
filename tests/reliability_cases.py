"""Public ops as table rows for the reliability tests (determinism, thread counts, instruction
set paths, concurrency).

A row (``OpCase``) is one deterministic problem: arguments built from a fixed seed, a jittable
function returning named outputs (forward results and gradients), and a check of those outputs
against the float64 oracle. The tests in ``test_determinism.py`` and ``test_concurrency.py`` run
every row of ``CASES``; ``reliability_worker.py`` runs them in subprocesses (other thread
counts, other ``JAXATTN_ISA``). To cover a new op (decode, paged decode, block-sparse, merge),
write a builder like ``flash_case`` and append its rows to ``CASES``. Float64 rows run with
x64 on (``OpCase.x64``: ``run`` and ``compiled`` turn it on around the call, in the calling
thread), so that their arrays stay float64 and the float64 kernels run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from _subprocess import python_env
from oracle import (
    Shape,
    assert_close_to_oracle,
    attention_reference,
    attention_reference_grad,
    decode_visibility,
    naive_low_precision,
    naive_low_precision_grad,
    random_inputs,
)

F32 = np.dtype(np.float32)
BF16 = np.dtype(jnp.bfloat16)
F16 = np.dtype(np.float16)
F64 = np.dtype(np.float64)

Outputs = dict[str, np.ndarray]
WORKER = Path(__file__).resolve().parent / "reliability_worker.py"
ALL_CPUS = tuple(sorted(os.sched_getaffinity(0)))


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One problem of one op.

    ``fn(*make_args())`` (jittable) returns named arrays; ``check(outputs)`` raises
    AssertionError when they are wrong. ``make_args`` must be deterministic: subprocesses rebuild
    the arguments and their results are compared bitwise.
    """

    name: str
    make_args: Callable[[], tuple[Any, ...]]
    fn: Callable[..., dict[str, jax.Array]]
    check: Callable[[tuple[Any, ...], Outputs], None]
    x64: bool = False  # float64 operands: calls run with jax_enable_x64

    def compiled(self) -> Callable[..., dict[str, jax.Array]]:
        """``jax.jit(fn)``, called with x64 on for a float64 row (the flag is per thread)."""
        fn = jax.jit(self.fn)
        if not self.x64:
            return fn

        def call(*args: Any) -> dict[str, jax.Array]:
            with jax.enable_x64(True):
                return fn(*args)
        return call

    def run(self, *, jit: bool = True, args: tuple[Any, ...] | None = None) -> Outputs:
        """Outputs as NumPy arrays (``args`` defaults to ``make_args()``)."""
        args = self.make_args() if args is None else args
        fn = self.compiled() if jit else self.fn
        with jax.enable_x64(True) if self.x64 else contextlib.nullcontext():
            return {name: np.asarray(x) for name, x in fn(*args).items()}


def assert_bitwise_equal(a: Outputs, b: Outputs, what: str) -> None:
    """Same names, shapes, dtypes and bytes (NaN payloads included)."""
    assert sorted(a) == sorted(b), f"{what}: outputs {sorted(a)} != {sorted(b)}"
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {name} dtype/shape differ"
        if x.tobytes() != y.tobytes():
            differing = int(np.sum(x.view(np.uint8) != y.view(np.uint8)))
            raise AssertionError(f"{what}: {name} differs bitwise ({differing} bytes)")


def run_worker(mode: str, *, isa: str = "default", cpus: tuple[int, ...] = ALL_CPUS,
               timeout: float = 300) -> dict:
    """Runs ``reliability_worker.py mode`` in a fresh interpreter and returns its pickle."""
    env = python_env()
    env.pop("JAXATTN_ISA", None)
    if isa != "default":
        env["JAXATTN_ISA"] = isa
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pkl"
        try:
            proc = subprocess.run(
                [sys.executable, str(WORKER), "--cpus", ",".join(map(str, cpus)), mode, str(out)],
                env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"worker {mode} (isa={isa}, cpus={cpus}) did not finish in "
                                 f"{timeout} s: a hang or deadlock") from e
        assert proc.returncode == 0, f"worker {mode} failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
        with open(out, "rb") as f:
            return pickle.load(f)


# --------------------------------------------------------------------------------------------
# flash_attention
# --------------------------------------------------------------------------------------------

_DIFFERENTIABLE = ("query", "key", "value", "bias")


def flash_case(name: str, shape: Shape, dtype: np.dtype, *, bias: str | None = None,
               mask: str | None = None, seed: int = 0, **options: Any) -> OpCase:
    """``flash_attention`` forward (out, lse) and the gradients of ``sum(out * dout)``.

    ``bias``/``mask`` are shape patterns for ``Shape.resolve``; ``options`` are keyword options
    of ``flash_attention`` (NumPy sequence lengths included).
    """

    def make_args() -> tuple[dict[str, np.ndarray | None], np.ndarray]:
        rng = np.random.default_rng(seed)
        inputs = random_inputs(rng, shape, dtype, bias=bias, mask=mask)
        dout = rng.standard_normal(shape.out).astype(dtype)
        return inputs, dout

    def fn(inputs: dict[str, Any], dout: jax.Array) -> dict[str, jax.Array]:
        differentiable = {k: inputs[k] for k in _DIFFERENTIABLE if inputs[k] is not None}

        def attend(diff: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
            return jaxattn.flash_attention(**{**inputs, **diff}, **options, return_residual=True)

        (out, lse), vjp = jax.vjp(attend, differentiable)
        (grads,) = vjp((dout, jnp.zeros_like(lse)))
        return {"out": out, "lse": lse, **{f"d{k}": g for k, g in grads.items()}}

    # Dropout (a key seeded by `seed`): the oracle applies the kernels' mask.
    rate = options.pop("dropout_rate", 0.0)
    oracle_options = dict(options)
    if rate:
        options["dropout_rate"] = rate
        options["dropout_rng"] = jax.random.key(seed)
        keep = jaxattn.dropout_mask(options["dropout_rng"], rate, shape.batch, shape.num_heads,
                                    shape.q_len, shape.kv_len)
        oracle_options["dropout_multiplier"] = np.asarray(keep, np.float64) / (1.0 - rate)

    def check(args: tuple[Any, ...], outputs: Outputs) -> None:
        inputs, dout = args
        q, k, v, b, m = (inputs[n] for n in ("query", "key", "value", "bias", "mask"))
        options = oracle_options
        out, lse = attention_reference(q, k, v, b, m, **options)
        naive_out, naive_lse = naive_low_precision(q, k, v, dtype, b, m, **options)
        assert_close_to_oracle(outputs["out"], out, naive_out, dtype=dtype, name=f"{name}: out")
        assert_close_to_oracle(outputs["lse"], lse, naive_lse, dtype=_lse_dtype(dtype),
                               name=f"{name}: lse")
        grads = attention_reference_grad(q, k, v, dout, b, m, **options)
        naive = naive_low_precision_grad(q, k, v, dout, dtype, b, m, **options)
        for arg, ref, low in zip(_DIFFERENTIABLE, grads, naive):
            if inputs[arg] is not None:
                assert_close_to_oracle(outputs[f"d{arg}"], ref, low, dtype=dtype,
                                       name=f"{name}: d{arg}")

    return OpCase(name, make_args, fn, check, x64=dtype == F64)


def _lse_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of the kernels' lse: float64 for float64 inputs, float32 otherwise."""
    return F64 if dtype == F64 else F32


def _lengths(*values: int) -> np.ndarray:
    return np.array(values, np.int32)


# --------------------------------------------------------------------------------------------
# decode_attention, paged_decode_attention, merge_attention_states
# --------------------------------------------------------------------------------------------


def _quantized_cache(k: np.ndarray, v: np.ndarray, cache_dtype: Any):
    """(keys, values, key scales, value scales) of a quantized cache, as NumPy arrays."""
    (kq, ks), (vq, vs) = (jaxattn.quantize_kv(x, cache_dtype) for x in (k, v))
    return tuple(np.asarray(x) for x in (kq, vq, ks, vs))


def decode_case(name: str, shape: Shape, dtype: np.dtype, lengths: np.ndarray, *,
                page_size: int | None = None, table_padding: int = 0, seed: int = 0,
                cache_dtype: Any = None, **options: Any) -> OpCase:
    """``decode_attention`` (``shape.q_len`` new tokens against a cache of ``shape.kv_len``),
    or with ``page_size`` ``paged_decode_attention`` on the same cache in shuffled pages
    (block tables padded with ``table_padding`` entries of -1). With ``cache_dtype`` (int8,
    float8) the cache is quantized (``jaxattn.quantize_kv``) and the oracle sees the
    dequantised cache."""

    def make_args() -> tuple[Any, ...]:
        rng = np.random.default_rng(seed)
        inputs = random_inputs(rng, shape, dtype)
        q, k, v = inputs["query"], inputs["key"], inputs["value"]
        scales: tuple[np.ndarray, ...] = ()
        if cache_dtype is not None:
            k, v, *scales = _quantized_cache(k, v, cache_dtype)
        if page_size is None:
            return (q, k, v, lengths, *scales)
        per = -(-shape.kv_len // page_size)
        pages = shape.batch * per + 1  # one spare page, never referenced
        order = rng.permutation(pages)[: shape.batch * per].reshape(shape.batch, per)
        # Rows past the cache hold NaN (int8: -128 with a NaN scale): never read.
        fill = -128 if k.dtype == np.int8 else np.nan
        pool_k = np.full((pages, page_size) + k.shape[2:], fill, k.dtype)
        pool_v = np.full((pages, page_size) + v.shape[2:], fill, v.dtype)
        pool_s = [np.full((pages, page_size) + k.shape[2:3], np.nan, np.float32) for _ in scales]
        for b in range(shape.batch):
            for i in range(per):
                rows = slice(i * page_size, min(shape.kv_len, (i + 1) * page_size))
                pool_k[order[b, i], : rows.stop - rows.start] = k[b, rows]
                pool_v[order[b, i], : rows.stop - rows.start] = v[b, rows]
                for pool, x in zip(pool_s, scales):
                    pool[order[b, i], : rows.stop - rows.start] = x[b, rows]
        tables = np.full((shape.batch, per + table_padding), -1, np.int32)
        tables[:, :per] = order
        return (q, pool_k, pool_v, tables, lengths, *pool_s)

    def fn(*args: Any) -> dict[str, jax.Array]:
        attend = jaxattn.decode_attention if page_size is None else jaxattn.paged_decode_attention
        scales = {}
        if cache_dtype is not None:
            *args, scales["key_scale"], scales["value_scale"] = args
        out, lse = attend(*args, **options, **scales, return_residual=True)
        return {"out": out, "lse": lse}

    def check(args: tuple[Any, ...], outputs: Outputs) -> None:
        rng = np.random.default_rng(seed)
        inputs = random_inputs(rng, shape, dtype)
        q, k, v = inputs["query"], inputs["key"], inputs["value"]
        if cache_dtype is not None:  # the cache the kernel reads, dequantised exactly
            kq, vq, ks, vs = _quantized_cache(k, v, cache_dtype)
            k = kq.astype(np.float64) * ks[..., None]
            v = vq.astype(np.float64) * vs[..., None]
        mask = decode_visibility(lengths, shape.q_len, shape.kv_len,
                                 options.get("local_window_size"))
        cap = {"logits_soft_cap": options["logits_soft_cap"]} if "logits_soft_cap" in options else {}
        out, lse = attention_reference(q, k, v, mask=mask, **cap)
        naive_out, naive_lse = naive_low_precision(q, k, v, dtype, mask=mask, **cap)
        assert_close_to_oracle(outputs["out"], out, naive_out, dtype=dtype, name=f"{name}: out")
        assert_close_to_oracle(outputs["lse"], lse, naive_lse, dtype=_lse_dtype(dtype),
                               name=f"{name}: lse")

    return OpCase(name, make_args, fn, check, x64=dtype == F64)


def merge_case(name: str, shape: Shape, parts: int, seed: int = 0) -> OpCase:
    """``merge_attention_states`` of flash attention over ``parts`` disjoint key sets (one of
    them empty), forward and the gradients of ``sum(out * dout) + sum(lse * dlse)``."""

    def make_args() -> tuple[Any, ...]:
        rng = np.random.default_rng(seed)
        inputs = random_inputs(rng, shape, F32)
        owner = rng.integers(0, parts - 1, size=shape.kv_len)  # part parts-1 stays empty
        masks = np.stack([owner == i for i in range(parts)])[:, None, None, None, :]
        dout = rng.standard_normal(shape.out).astype(F32)
        dlse = rng.standard_normal(shape.out[:3]).astype(F32)
        return inputs["query"], inputs["key"], inputs["value"], masks, dout, dlse

    def fn(q, k, v, masks, dout, dlse) -> dict[str, jax.Array]:
        def loss(q, k, v):
            outs, lses = zip(*(jaxattn.flash_attention(q, k, v, mask=masks[i],
                                                       return_residual=True)
                               for i in range(parts)))
            out, lse = jaxattn.merge_attention_states(jnp.stack(outs), jnp.stack(lses))
            return jnp.sum(out * dout) + jnp.sum(lse * dlse), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            q, k, v)
        return {"out": out, "lse": lse, "dquery": grads[0], "dkey": grads[1],
                "dvalue": grads[2]}

    def check(args: tuple[Any, ...], outputs: Outputs) -> None:
        q, k, v, _, dout, _ = args
        out, lse = attention_reference(q, k, v)
        assert_close_to_oracle(outputs["out"], out, dtype=F32, name=f"{name}: out")
        assert_close_to_oracle(outputs["lse"], lse, dtype=F32, name=f"{name}: lse")
        for got in ("dquery", "dkey", "dvalue"):
            assert np.all(np.isfinite(outputs[got])), f"{name}: {got} not finite"

    return OpCase(name, make_args, fn, check)


# Several query tiles, key tiles, batch elements and kv heads each, so that the kernels split
# the work into many tasks (thread-count independence is then a real property).
CASES: list[OpCase] = [
    flash_case("flash_f32_gqa_causal_lengths", Shape(2, 130, 150, 4, 2, 64), F32,
               is_causal=True, key_value_seq_lengths=_lengths(150, 77)),
    flash_case("flash_bf16_bias_mask_window", Shape(2, 97, 97, 4, 4, 40), BF16,
               bias="1NTS", mask="B1TS", local_window_size=(20, 5), seed=1),
    flash_case("flash_f16_softcap_lengths", Shape(1, 65, 200, 8, 2, 80, value_head_dim=48), F16,
               logits_soft_cap=5.0, query_seq_lengths=_lengths(50),
               key_value_seq_lengths=_lengths(180), seed=2),
    flash_case("flash_f32_mqa_h256", Shape(1, 70, 129, 4, 1, 256), F32, bias="11TS", seed=3),
    # The gradient of a bias broadcast over batch and heads is a sum over them: its order must
    # not depend on the thread count either.
    flash_case("flash_f32_broadcast_bias_grad", Shape(2, 96, 80, 6, 3, 32), F32, bias="11TS",
               is_causal=True, seed=9),
    # Packed documents with positions restarting per document, ALiBi and a window: tiles
    # classified by their positions and ids.
    flash_case("flash_bf16_packed_positions_alibi", Shape(2, 200, 200, 4, 2, 32), BF16,
               is_causal=True, local_window_size=(50, 0),
               query_segment_ids=np.arange(200, dtype=np.int32) // 70,
               key_value_segment_ids=np.arange(200, dtype=np.int32) // 70,
               query_positions=np.arange(200, dtype=np.int32) % 70,
               key_value_positions=np.arange(200, dtype=np.int32) % 70,
               alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32), seed=10),
    # Dropout: the mask regenerated in the backward, whatever the thread count.
    flash_case("flash_f32_dropout", Shape(2, 130, 150, 4, 2, 64), F32, bias="1NTS",
               is_causal=True, dropout_rate=0.3, seed=13),
    flash_case("flash_bf16_dropout_window", Shape(1, 97, 97, 4, 4, 40), BF16,
               local_window_size=(20, 5), dropout_rate=0.5, seed=14),
    # Long caches: many partitions, merged in a fixed order whatever the thread count.
    decode_case("decode_f32_gqa_long", Shape(2, 1, 4096, 8, 2, 64), F32, _lengths(4096, 1500),
                seed=4),
    decode_case("decode_bf16_t4_window_cap", Shape(2, 4, 3000, 4, 1, 80), BF16,
                _lengths(3000, 2041), local_window_size=700, logits_soft_cap=30.0, seed=5),
    decode_case("paged_decode_f16_page16", Shape(2, 2, 2048, 8, 2, 32), F16,
                _lengths(2048, 1000), page_size=16, seed=6),
    decode_case("paged_decode_f32_page7_t16", Shape(1, 16, 700, 4, 4, 48), F32, _lengths(690),
                page_size=7, seed=7),
    merge_case("merge_flash_parts_grad", Shape(2, 9, 60, 4, 2, 16), parts=3, seed=8),
    # A block table padded far past the lengths (issue 13): partitions follow the lengths.
    decode_case("paged_decode_f32_padded_table", Shape(3, 2, 1500, 8, 2, 32), F32,
                _lengths(1500, 40, 777), page_size=16, table_padding=20000, seed=9),
    # Quantized caches (int8, float8), contiguous and paged.
    decode_case("decode_bf16_int8_cache_long", Shape(2, 1, 4096, 8, 2, 64), BF16,
                _lengths(4096, 1777), cache_dtype=jnp.int8, seed=10),
    decode_case("paged_decode_f32_e4m3_cache_t3_window", Shape(2, 3, 2000, 4, 1, 48), F32,
                _lengths(2000, 999), page_size=16, cache_dtype=jnp.float8_e4m3fn,
                local_window_size=600, logits_soft_cap=20.0, seed=11),
    decode_case("paged_decode_f16_e5m2_cache_page5", Shape(1, 2, 900, 8, 4, 40), F16,
                _lengths(851), page_size=5, cache_dtype=jnp.float8_e5m2, seed=12),
    # Float64 (x64 on): the float64 kernels' own tiling, backward passes and decode loop.
    flash_case("flash_f64_gqa_causal_window_cap_lengths", Shape(2, 130, 150, 4, 2, 40), F64,
               is_causal=True, local_window_size=(60, 0), logits_soft_cap=5.0,
               key_value_seq_lengths=_lengths(150, 77), seed=15),
    # Rate 1/4: the keep threshold is exactly 2^30, so the oracle's 1 / (1 - rate) is the
    # kernels' keep scale to the last bit.
    flash_case("flash_f64_bias_grad_dropout", Shape(1, 97, 97, 4, 4, 17, value_head_dim=9), F64,
               bias="1NTS", dropout_rate=0.25, seed=16),
    decode_case("decode_f64_gqa_long", Shape(2, 1, 3000, 4, 2, 33), F64, _lengths(3000, 1100),
                seed=17),
    decode_case("paged_decode_f64_page7_t5_window_cap", Shape(2, 5, 700, 4, 1, 17), F64,
                _lengths(690, 3), page_size=7, local_window_size=200, logits_soft_cap=10.0,
                seed=18),
]
CASES_BY_NAME: dict[str, OpCase] = {case.name: case for case in CASES}
