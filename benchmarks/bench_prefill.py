"""Paged prefill: T new tokens against a cached prefix in a paged KV cache, vs flash_attention.

A prompt chunk of T tokens (already written to the cache) attends to a prefix of P cached
tokens and causally to itself: ``paged_decode_attention`` over a page pool with shuffled
pages (and ``decode_attention`` over a contiguous cache), against ``flash_attention`` on the
same keys laid out contiguously, with the same causal semantics (query positions P + i).
Timed in turns in one process (medians); ratios > 1 mean the cache path is faster.
Target (issue 15): paged >= 0.9x flash at T = 2048, P = 30000.

    python benchmarks/bench_prefill.py [--threads N] [--dtypes float32 bfloat16]
        [--prefix 30000] [--tokens 2048] [--heads 8 --kv-heads 2 --head-dim 128]
        [--page-sizes 16 128] [--cache-dtypes int8] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(__file__))
from pin_threads import pin_threads_from_argv  # noqa: E402

pin_threads_from_argv()  # before jax (imported below) sizes its thread pool

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import describe_machine, interleaved_seconds, markdown_table  # noqa: E402

import jaxattn  # noqa: E402


def run(dtype: str, prefix: int, tokens: int, heads: int, kv_heads: int, head_dim: int,
        page_sizes: list[int], cache_dtypes: list[str], min_seconds: float) -> list[list]:
    rng = np.random.default_rng(0)
    total = prefix + tokens
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.standard_normal((1, tokens, heads, head_dim), np.float32), dt)
    k32 = rng.standard_normal((1, total, kv_heads, head_dim), np.float32)
    v32 = rng.standard_normal((1, total, kv_heads, head_dim), np.float32)
    k, v = jnp.asarray(k32, dt), jnp.asarray(v32, dt)
    lengths = jnp.array([total], jnp.int32)
    positions = jnp.arange(prefix, total, dtype=jnp.int32)[None]

    flash = jax.jit(lambda q, k, v: jaxattn.flash_attention(
        q, k, v, is_causal=True, query_positions=positions))
    contiguous = jax.jit(lambda q, k, v: jaxattn.decode_attention(q, k, v, lengths))
    paged = jax.jit(lambda q, k, v, t, *s: jaxattn.paged_decode_attention(
        q, k, v, t, lengths, **(dict(key_scale=s[0], value_scale=s[1]) if s else {})))

    fns = {"flash": lambda: flash(q, k, v), "contiguous cache": lambda: contiguous(q, k, v)}
    reference = np.asarray(fns["flash"](), np.float32)
    for page in page_sizes:
        pages = -(-total // page)
        perm = rng.permutation(pages).astype(np.int32)
        def pool(x, dtype=dt):
            padded = np.zeros((pages * page,) + x.shape[2:], x.dtype)
            padded[:total] = x[0]
            out = np.empty_like(padded.reshape(pages, page, *x.shape[2:]))
            out[perm] = padded.reshape(pages, page, *x.shape[2:])
            return jnp.asarray(out, dtype)
        tables = jnp.asarray(perm[None])
        pk, pv = pool(k32), pool(v32)
        fns[f"paged {page}"] = (lambda pk=pk, pv=pv, t=tables: paged(q, pk, pv, t))
        err = np.abs(np.asarray(fns[f"paged {page}"](), np.float32) - reference).max()
        assert err < 1e-2, f"paged {page} differs from flash by {err}"
        for cache in cache_dtypes:
            kq, ks = jaxattn.quantize_kv(k32, jnp.dtype(cache))
            vq, vs = jaxattn.quantize_kv(v32, jnp.dtype(cache))
            qk = pool(np.asarray(kq), kq.dtype)
            qv = pool(np.asarray(vq), vq.dtype)
            sk = pool(np.asarray(ks)[..., None], jnp.float32)[..., 0]
            sv = pool(np.asarray(vs)[..., None], jnp.float32)[..., 0]
            fns[f"paged {page} {cache}"] = (
                lambda qk=qk, qv=qv, t=tables, sk=sk, sv=sv: paged(q, qk, qv, t, sk, sv))
    times = interleaved_seconds(fns, min_seconds=min_seconds, min_runs=3)
    flops = 4 * heads * head_dim * (tokens * prefix + tokens * (tokens + 1) / 2)
    rows = []
    for name, seconds in times.items():
        rows.append([dtype, name, f"{seconds * 1e3:.1f}", f"{flops / seconds / 1e9:.0f}",
                     f"{times['flash'] / seconds:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prefix", type=int, default=30000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--cache-dtypes", nargs="*", default=["int8"])
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="prefix 4000, 512 tokens")
    args = parser.parse_args()
    if args.quick:
        args.prefix, args.tokens, args.min_seconds = 4000, 512, 1.0
    print(describe_machine())
    print(f"{jax.local_devices()[0].platform}, kernels {jaxattn.kernel_isa()}, "
          f"threads {len(os.sched_getaffinity(0))}; B=1 N={args.heads} K={args.kv_heads} "
          f"H={args.head_dim}, prefix {args.prefix} + {args.tokens} new tokens\n")
    rows = []
    for dtype in args.dtypes:
        rows += run(dtype, args.prefix, args.tokens, args.heads, args.kv_heads, args.head_dim,
                    args.page_sizes, args.cache_dtypes, args.min_seconds)
    print(markdown_table(["dtype", "keys from", "ms", "GFLOP/s", "vs flash"], rows))


if __name__ == "__main__":
    main()
