"""Long context with a block-sparse mask: attention whose cost follows the mask, not T^2.

    python examples/long_context.py                 # 8192 tokens
    python examples/long_context.py --length 16384 --window 512

Run with jaxattn installed: after ``python3 run.py demo`` that means
``source .venv/bin/activate`` first, or ``.venv/bin/python`` instead of ``python``. In a
development tree built with ``tools/build_inplace.sh``, prefix ``PYTHONPATH=.``.

A causal sliding window plus a few global tokens (Longformer / BigBird style) keeps a few
percent of the T x T pairs. ``jaxattn.block_sparse_attention`` skips the empty blocks
entirely, so it runs many times faster than dense causal attention while giving exactly
``flash_attention(mask=mask.to_dense())``. The same mask drops into a Flax layer with
``FlashSelfAttention(..., sparse_mask=mask)``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxattn
from jaxattn.flax.nnx import FlashSelfAttention


def median_ms(fn, *args, reps: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256, help="causal sliding window (left)")
    p.add_argument("--global-tokens", type=int, default=64, help="first g tokens are global")
    p.add_argument("--block", type=int, default=64, help="mask block size")
    args = p.parse_args()
    t, n, k, h = args.length, args.heads, args.kv_heads, args.head_dim

    # 1. The mask: built once on the host, reused by every call (its kernel tables are cached).
    t0 = time.perf_counter()
    mask = jaxattn.masks.global_local(t, window=(args.window, 0),
                                      global_tokens=args.global_tokens, is_causal=True,
                                      block_q=args.block, block_kv=args.block)
    print(f"{mask}\n  built in {time.perf_counter() - t0:.2f} s; attends to "
          f"{mask.block_density:.1%} of the blocks (dense causal: ~50%)")

    # 2. The function, against dense causal attention and against the dense form of the mask.
    kq, kk, kv, kx = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (1, t, n, h))
    key = jax.random.normal(kk, (1, t, k, h))
    value = jax.random.normal(kv, (1, t, k, h))
    sparse = jax.jit(lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, mask))
    dense_mask = jnp.asarray(mask.to_dense())[None]  # [1, 1, T, T] bool
    masked = jax.jit(lambda q, k, v: jaxattn.flash_attention(q, k, v, mask=dense_mask))
    causal = jax.jit(lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True))
    diff = float(jnp.abs(sparse(q, key, value) - masked(q, key, value)).max())
    print(f"block_sparse_attention vs flash_attention(mask=mask.to_dense()): max |diff| = "
          f"{diff:.1e}")

    def fwd_bwd(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))

    print(f"\nT={t}, {n} query heads / {k} kv heads, head dim {h}, float32 (median ms):")
    print(f"  {'':34s} {'forward':>10s} {'fwd+bwd':>10s}")
    rows = (("block_sparse_attention (mask)", sparse),
            ("flash_attention, dense causal", causal))
    results = {}
    for name, f in rows:
        results[name] = (median_ms(f, q, key, value), median_ms(fwd_bwd(f), q, key, value))
        print(f"  {name:34s} {results[name][0]:10.1f} {results[name][1]:10.1f}", flush=True)
    fast, slow = results[rows[0][0]], results[rows[1][0]]
    print(f"  block-sparse speed-up: {slow[0] / fast[0]:.1f}x forward, "
          f"{slow[1] / fast[1]:.1f}x forward+backward")

    # 3. The same mask in a Flax layer (RoPE, GQA); the layer ANDs its own causal mask.
    d_model = n * h
    x = jax.random.normal(kx, (1, t, d_model))
    layers = {
        "FlashSelfAttention(sparse_mask=mask)": FlashSelfAttention(
            d_model, n, num_kv_heads=k, use_rope=True, sparse_mask=mask, rngs=nnx.Rngs(0)),
        "FlashSelfAttention (dense causal)": FlashSelfAttention(
            d_model, n, num_kv_heads=k, use_rope=True, rngs=nnx.Rngs(0)),
    }
    step = nnx.jit(nnx.value_and_grad(lambda layer, x: jnp.mean(layer(x) ** 2)))
    print(f"\nlayer loss + gradients on x [1, {t}, {d_model}] (median ms):")
    for name, layer in layers.items():
        print(f"  {name:38s} {median_ms(step, layer, x):10.1f}", flush=True)


if __name__ == "__main__":
    main()
