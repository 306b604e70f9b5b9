"""Packed sequences: segment ids against the equivalent dense mask.

D documents of equal length packed into one row of T tokens (default T = 8192, D = 8, B = 1,
N = K = 4, H = 64, float32, causal within each document). flash_attention with
query_segment_ids / key_value_segment_ids (tiles of different documents are never computed,
cost ~ sum of document length squared) against flash_attention with the same visibility given
as a dense [B, 1, T, S] bool mask: alone (every tile computed and masked), and, when causal,
with is_causal=True as well (the tiles above the diagonal skipped, every other one computed
and masked: the strongest dense baseline). Forward and
forward+backward under jit; the two variants are interleaved run by run and the fastest of
--reps kept for each, so that load from other processes (a shared machine) hits both alike.
Wall and process CPU time are both reported. The outputs of the two variants are checked to be
equal first.

With --positions: causal attention with monotone token positions (a prefill offset of 100,
query_positions and key_value_positions given) against plain is_causal on indices, which
skip the same tiles: the cost of cutting tiles by positions (should be ~1x). --window W adds a
local window of W - 1 keys back (Gemma's local layers: W = 100), --kv-heads K grouped heads.

    PYTHONPATH=. python benchmarks/bench_packed.py [--seq 8192] [--docs 8] [--reps 5]
    PYTHONPATH=. python benchmarks/bench_packed.py --positions [--seq 4096]
    PYTHONPATH=. python benchmarks/bench_packed.py --positions --seq 2048 --heads 8 \
        --kv-heads 4 --head-dim 256 --window 100
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import describe_machine, jit_forward_backward, paired_fastest  # noqa: E402

import jaxattn  # noqa: E402


def positions_overhead(args: argparse.Namespace) -> None:
    """Monotone positions against indices, causal: the same tiles, the same result."""
    b, t, n, h = args.batch, args.seq, args.heads, args.head_dim
    kh = args.kv_heads or n
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    q, dout = (jnp.asarray(rng.standard_normal((b, t, n, h)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, t, kh, h)), dtype) for _ in range(2))
    pos = jnp.arange(t, dtype=jnp.int32) + 100
    window = (args.window - 1, 0) if args.window > 0 else None

    def by_position(q, k, v):
        return jaxattn.flash_attention(q, k, v, is_causal=True, local_window_size=window,
                                       query_positions=pos, key_value_positions=pos)

    def by_index(q, k, v):
        return jaxattn.flash_attention(q, k, v, is_causal=True, local_window_size=window)

    # Bitwise equal without a window; with one, indices start the key tiles at the window's
    # first key and positions on the grid from key 0, so the sums round differently.
    np.testing.assert_allclose(np.asarray(jax.jit(by_position)(q, k, v)),
                               np.asarray(jax.jit(by_index)(q, k, v)),
                               rtol=0 if window is None else 1e-5, atol=0 if window is None else 1e-5)
    print(describe_machine())
    print(f"B={b} T=S={t} N={n} K={kh} H={h} {dtype.name} causal, window={window}, "
          f"reps={args.reps} (fastest); "
          "machine may be shared")
    print("| pass | positions (ms, wall / cpu) | indices (ms, wall / cpu) | ratio wall | "
          "ratio cpu |")
    print("|---|---|---|---|---|")
    for name, fn, base, fn_args in (
        ("fwd", jax.jit(by_position), jax.jit(by_index), (q, k, v)),
        ("fwd+bwd", jit_forward_backward(by_position), jit_forward_backward(by_index), (q, k, v, dout)),
    ):
        mine, theirs = paired_fastest(fn, base, fn_args, args.reps)
        print(f"| {name} | {mine[0] * 1e3:.1f} / {mine[1] * 1e3:.1f} | "
              f"{theirs[0] * 1e3:.1f} / {theirs[1] * 1e3:.1f} | {mine[0] / theirs[0]:.2f} | "
              f"{mine[1] / theirs[1]:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--positions", action="store_true")
    parser.add_argument("--kv-heads", type=int, default=0, help="--positions: K (0: = heads)")
    parser.add_argument("--window", type=int, default=0,
                        help="--positions: local window of this many keys (0: none)")
    args = parser.parse_args()
    if args.positions:
        positions_overhead(args)
        return

    b, t, n, h = args.batch, args.seq, args.heads, args.head_dim
    causal = not args.no_causal
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    q, k, v, dout = (jnp.asarray(rng.standard_normal((b, t, n, h)), dtype) for _ in range(4))
    ids = jnp.asarray(np.repeat(np.arange(args.docs), -(-t // args.docs))[:t][None]
                      .repeat(b, 0), jnp.int32)
    dense = ids[:, None, :, None] == ids[:, None, None, :]  # [B, 1, T, S]
    if causal:
        dense &= jnp.tril(jnp.ones((t, t), bool))

    def packed(q, k, v):
        return jaxattn.flash_attention(q, k, v, is_causal=causal, query_segment_ids=ids,
                                       key_value_segment_ids=ids)

    def masked(q, k, v):
        return jaxattn.flash_attention(q, k, v, mask=dense)

    def masked_causal(q, k, v):
        return jaxattn.flash_attention(q, k, v, mask=dense, is_causal=True)

    fwd = jax.jit(packed)
    baselines = [("dense mask", masked)]
    if causal:
        baselines.append(("dense mask + is_causal", masked_causal))
    for _, base in baselines:
        np.testing.assert_array_equal(np.asarray(fwd(q, k, v)), np.asarray(jax.jit(base)(q, k, v)))

    print(describe_machine())
    print(f"B={b} T=S={t} N=K={n} H={h} {dtype.name} docs={args.docs} causal={causal} "
          f"threads={os.cpu_count()} reps={args.reps} (fastest); machine may be shared")
    print("| pass | baseline | segment ids (ms, wall / cpu) | baseline (ms, wall / cpu) | "
          "speed-up wall | speed-up cpu |")
    print("|---|---|---|---|---|---|")
    for base_name, base in baselines:
        for name, fn, base_fn, fn_args in (
            ("fwd", fwd, jax.jit(base), (q, k, v)),
            ("fwd+bwd", jit_forward_backward(packed), jit_forward_backward(base), (q, k, v, dout)),
        ):
            mine, theirs = paired_fastest(fn, base_fn, fn_args, args.reps)
            print(f"| {name} | {base_name} | {mine[0] * 1e3:.1f} / {mine[1] * 1e3:.1f} | "
                  f"{theirs[0] * 1e3:.1f} / {theirs[1] * 1e3:.1f} | {theirs[0] / mine[0]:.2f}x | "
                  f"{theirs[1] / mine[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
