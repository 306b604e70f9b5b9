"""Gated linear attention: jaxattn's kernels vs the best pure-JAX chunked implementation.

All in one process, timed in turns (medians). The baseline, ``chunked_gla_jax`` below, is the
chunk-parallel form written with ``einsum`` + ``lax.scan`` under ``jax.jit``: per chunk a
masked quadratic product with the gates factored around the chunk midpoint, per-chunk state
contributions as one batched matmul, and a scan of the [Hk, Hv] states over chunks only (its
gradient is JAX's autodiff of the same code). Ratios > 1 mean jaxattn is faster.

    python benchmarks/bench_linear.py [--threads N] [--quick] [--decode | --only-decode]
                                      [--scalar-gate | --only-scalar-gate]

``--decode`` also times one decoding step (T = 1 with a state) as state bytes moved (read +
write) per second against the all-threads copy bandwidth (see ``bench_decode``).
``--scalar-gate`` also times a scalar gate (one per head and step, ``[B, T, N]``: Mamba-2,
RetNet, "simple GLA") against the same gate broadcast to ``[B, T, N, Hk]`` (the per-dimension
kernels): the scalar-gate kernels' speedup.
``--threads N`` pins the process to its first N CPUs before XLA sizes its thread pool.
GLA against causal ``flash_attention`` (the crossover): benchmarks/bench_gla_crossover.py;
against flash-linear-attention's PyTorch reference functions: benchmarks/bench_fla.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.dirname(__file__))
from pin_threads import pin_threads_from_argv  # noqa: E402

pin_threads_from_argv()  # before jax (imported below) sizes its thread pool

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import (copy_workload, describe_machine, geomean, interleaved_seconds,  # noqa: E402
                    markdown_table)

import jaxattn  # noqa: E402


def chunked_gla_jax(q, k, v, log_gate, initial_state=None, *, chunk: int = 64,
                    scale: float | None = None):
    """Gated linear attention in pure JAX, chunk-parallel (the baseline; also a reference for
    moderate decays: the gate factors exp(+-(G - midpoint)) overflow past ~88 per chunk).

    q, k, log_gate [B, T, N, Hk], v [B, T, N, Hv], T a multiple of ``chunk``.
    Returns (out [B, T, N, Hv], final state [B, N, Hk, Hv] float32).
    """
    b, t, n, hk = q.shape
    hv = v.shape[-1]
    scale = hk ** -0.5 if scale is None else scale
    nc = t // chunk
    f32, dtype = jnp.float32, v.dtype
    # [B, N, nc, C, H]
    split = lambda x: x.astype(f32).reshape(b, nc, chunk, n, x.shape[-1]).transpose(0, 3, 1, 2, 4)
    q, k, v, g = split(q) * scale, split(k), split(v), split(log_gate)
    cum = jnp.cumsum(g, axis=3)                       # gate from the chunk start, inclusive
    last = cum[:, :, :, -1:, :]
    mid = 0.5 * (cum[:, :, :, :1, :] + last)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    scores = jnp.einsum("bncti,bncsi->bncts", q * jnp.exp(cum - mid), k * jnp.exp(mid - cum))
    out = jnp.einsum("bncts,bncsd->bnctd", jnp.where(causal, scores, 0.0), v)
    # Per-chunk contributions to the state and its decay, then a scan over chunks.
    contrib = jnp.einsum("bncsi,bncsd->bncid", k * jnp.exp(last - cum), v)
    decay = jnp.exp(last[:, :, :, 0, :])              # [B, N, nc, Hk]
    state0 = (jnp.zeros((b, n, hk, hv), f32) if initial_state is None
              else initial_state.astype(f32))

    def step(state, xs):
        d, u = xs
        return d[..., None] * state + u, state

    final, starts = jax.lax.scan(step, state0, (jnp.moveaxis(decay, 2, 0),
                                                jnp.moveaxis(contrib, 2, 0)))
    starts = jnp.moveaxis(starts, 0, 2)               # state at each chunk start
    out = out + jnp.einsum("bncti,bncid->bnctd", q * jnp.exp(cum), starts)
    out = out.transpose(0, 2, 3, 1, 4).reshape(b, t, n, hv)
    return out.astype(dtype), final


def gla_flops(b, t, n, hk, hv, chunk=64) -> float:
    """Multiply-adds x 2 of the chunked form: the state product and update (2 T Hk Hv) and
    the causal half of the intra-chunk products (C / 2 (Hk + Hv) per position)."""
    return 2.0 * b * n * t * (2 * hk * hv + chunk / 2 * (hk + hv))


def make_inputs(rng, b, t, n, hk, hv, dtype):
    q, k = (jnp.asarray(rng.standard_normal((b, t, n, hk)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, n, hv)), dtype)
    # GLA's gates: log_sigmoid(x) / 16 (its normaliser), x standard normal.
    g = jnp.asarray(jax.nn.log_sigmoid(rng.standard_normal((b, t, n, hk))) / 16, dtype)
    return q, k, v, g


def fwd_bwd(fn):
    def loss(q, k, v, g):
        return jnp.sum(fn(q, k, v, g).astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def bench_vs_jax(shapes, dtype, rng, min_seconds):
    headers = ["B", "T", "N", "Hk", "Hv", "dtype", "fwd ms", "fwd GFLOP/s", "JAX fwd ms",
               "fwd ratio", "fwd+bwd ms", "JAX fwd+bwd ms", "fwd+bwd ratio"]
    rows, fwd_ratios, both_ratios = [], [], []
    ours = lambda q, k, v, g: jaxattn.gated_linear_attention(q, k, v, g)
    theirs = lambda q, k, v, g: chunked_gla_jax(q, k, v, g)[0]
    for (b, t, n, hk, hv) in shapes:
        args = make_inputs(rng, b, t, n, hk, hv, dtype)
        fns = {"ours": jax.jit(ours), "jax": jax.jit(theirs),
               "ours_bwd": fwd_bwd(ours), "jax_bwd": fwd_bwd(theirs)}
        # Same numbers (f32): the baseline is a correct implementation.
        np.testing.assert_allclose(np.asarray(fns["ours"](*args), np.float32),
                                   np.asarray(fns["jax"](*args), np.float32),
                                   rtol=2e-2, atol=2e-2)
        times = interleaved_seconds({name: (lambda f=f: f(*args)) for name, f in fns.items()},
                                    min_seconds=min_seconds)
        fr, br = times["jax"] / times["ours"], times["jax_bwd"] / times["ours_bwd"]
        fwd_ratios.append(fr)
        both_ratios.append(br)
        rows.append([b, t, n, hk, hv, jnp.dtype(dtype).name, 1e3 * times["ours"],
                     gla_flops(b, t, n, hk, hv) / times["ours"] / 1e9, 1e3 * times["jax"], fr,
                     1e3 * times["ours_bwd"], 1e3 * times["jax_bwd"], br])
        print(markdown_table(headers, rows[-1:]).splitlines()[-1], flush=True)
    return markdown_table(headers, rows), {"fwd_vs_jax": geomean(fwd_ratios),
                                           "fwd_bwd_vs_jax": geomean(both_ratios),
                                           "rows": rows}


def bench_scalar_gate(shapes, dtype, rng, min_seconds):
    """jaxattn with a scalar gate [B, T, N] against the same gate broadcast to [B, T, N, Hk]
    (materialised: the per-dimension kernels), forward and forward+backward, in turns."""
    headers = ["B", "T", "N", "Hk", "Hv", "dtype", "scalar fwd ms", "per-dim fwd ms",
               "fwd speedup", "scalar fwd+bwd ms", "per-dim fwd+bwd ms", "fwd+bwd speedup"]
    rows, fwd_ratios, both_ratios = [], [], []
    gla = lambda q, k, v, g: jaxattn.gated_linear_attention(q, k, v, g)
    for (b, t, n, hk, hv) in shapes:
        q, k, v, g = make_inputs(rng, b, t, n, hk, hv, dtype)
        scalar = g[..., 0]
        wide = jnp.array(jnp.broadcast_to(scalar[..., None], g.shape))
        fwd, both = jax.jit(gla), fwd_bwd(gla)
        np.testing.assert_allclose(np.asarray(fwd(q, k, v, scalar), np.float32),
                                   np.asarray(fwd(q, k, v, wide), np.float32),
                                   rtol=2e-2, atol=2e-2)
        times = interleaved_seconds({
            "scalar": lambda: fwd(q, k, v, scalar), "wide": lambda: fwd(q, k, v, wide),
            "scalar_bwd": lambda: both(q, k, v, scalar), "wide_bwd": lambda: both(q, k, v, wide),
        }, min_seconds=min_seconds)
        fr, br = times["wide"] / times["scalar"], times["wide_bwd"] / times["scalar_bwd"]
        fwd_ratios.append(fr)
        both_ratios.append(br)
        rows.append([b, t, n, hk, hv, jnp.dtype(dtype).name, 1e3 * times["scalar"],
                     1e3 * times["wide"], fr, 1e3 * times["scalar_bwd"],
                     1e3 * times["wide_bwd"], br])
        print(markdown_table(headers, rows[-1:]).splitlines()[-1], flush=True)
    return markdown_table(headers, rows), {"scalar_fwd_speedup": geomean(fwd_ratios),
                                           "scalar_fwd_bwd_speedup": geomean(both_ratios),
                                           "rows": rows}


# [B, N, Hk, Hv] states of 0.125 to 128 MiB: in the caches, then well beyond them.
DECODE_SHAPES = ((1, 8, 64, 64), (1, 8, 128, 128), (8, 16, 128, 128), (4, 16, 256, 256),
                 (16, 32, 128, 128), (8, 32, 256, 256), (16, 32, 256, 256))
QUICK_DECODE_SHAPES = ((1, 8, 64, 64), (1, 8, 128, 128), (8, 16, 128, 128), (8, 32, 256, 256))
DECODE_LOOP_STEPS = 8


def bench_decode(rng, min_seconds, shapes=DECODE_SHAPES):
    """One token with a state [B, N, Hk, Hv] float32: bytes = the state read and written once,
    against a numpy copy of 256 MiB by every thread (read + write bytes), timed in turns with
    the steps. Three ways to call a step: a jitted call that keeps its input state (XLA copies
    it first: the kernel updates final_state in initial_state's buffer), one that donates it
    (``donate_argnums``: updated in place), and DECODE_LOOP_STEPS steps in one
    ``lax.fori_loop`` carrying the state (in place, no per-call dispatch). The pure-JAX step
    (``jnp``, donated) is the baseline of the last column. Every figure is the fastest of its
    runs (the copy's too): the hardware's rate, which other processes' load only lowers."""
    headers = ["B", "N", "Hk", "Hv", "state MiB", "call us", "donated us", "in loop us",
               "donated GB/s", "in loop GB/s", "call % copy", "donated % copy",
               "in loop % copy", "jnp donated us", "x jnp"]
    copy, copy_bytes = copy_workload(256, threads=None)
    rows, summary = [], []
    for (b, n, hk, hv) in shapes:
        q, k, v, g = make_inputs(rng, b, 1, n, hk, hv, jnp.float32)
        state = jnp.asarray(rng.standard_normal((b, n, hk, hv)), jnp.float32)

        def step(q, k, v, g, s):
            return jaxattn.gated_linear_attention(q, k, v, g, initial_state=s,
                                                  return_final_state=True)

        def jnp_step(q, k, v, g, s):
            s = jnp.exp(g[:, 0])[..., None] * s + k[:, 0, :, :, None] * v[:, 0, :, None, :]
            return jnp.einsum("bni,bnid->bnd", q[:, 0] * hk ** -0.5, s)[:, None], s

        def loop(q, k, v, g, s):
            def body(_, carry):
                out, s = step(q, k, v, g, carry[1])
                return carry[0] + out, s
            return jax.lax.fori_loop(0, DECODE_LOOP_STEPS, body, (jnp.zeros_like(v), s))

        def donating(fn):
            """fn jitted with the state donated, as a no-argument callable carrying it."""
            jitted, box = jax.jit(fn, donate_argnums=4), [jnp.array(state)]

            def run():
                out, box[0] = jitted(q, k, v, g, box[0])
                return out
            return run

        call = jax.jit(step)
        times = interleaved_seconds({"copy": copy, "call": lambda: call(q, k, v, g, state),
                                     "donated": donating(step), "loop": donating(loop),
                                     "jnp": donating(jnp_step)},
                                    min_seconds=min_seconds, min_runs=10, max_runs=400,
                                    statistic=min)
        times["loop"] /= DECODE_LOOP_STEPS
        copy_gbs = copy_bytes / times["copy"] / 1e9
        nbytes = 2 * 4 * b * n * hk * hv
        gbs = {name: nbytes / times[name] / 1e9 for name in ("call", "donated", "loop")}
        rows.append([b, n, hk, hv, nbytes / 2 / 2**20, 1e6 * times["call"],
                     1e6 * times["donated"], 1e6 * times["loop"], gbs["donated"], gbs["loop"],
                     100 * gbs["call"] / copy_gbs, 100 * gbs["donated"] / copy_gbs,
                     100 * gbs["loop"] / copy_gbs, 1e6 * times["jnp"],
                     times["jnp"] / times["donated"]])
        summary.append({"shape": [b, n, hk, hv], "copy_gbs": copy_gbs,
                        **{f"{name}_us": 1e6 * times[name] for name in times if name != "copy"},
                        **{f"{name}_copy_fraction": gbs[name] / copy_gbs for name in gbs}})
        print(markdown_table(headers, rows[-1:]).splitlines()[-1], f"(copy {copy_gbs:.1f} GB/s)",
              flush=True)
    copies = [r["copy_gbs"] for r in summary]
    return (markdown_table(headers, rows) + f"\n\ncopy bandwidth (numpy, every thread, read + "
            f"write, timed in turns with the steps, fastest run): {min(copies):.1f}-{max(copies):.1f} GB/s",
            summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="pin to the first N CPUs")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--decode", action="store_true", help="also time decoding steps")
    parser.add_argument("--only-decode", action="store_true",
                        help="time decoding steps only (not the training kernels)")
    parser.add_argument("--scalar-gate", action="store_true",
                        help="also time scalar gates against per-dimension ones")
    parser.add_argument("--only-scalar-gate", action="store_true",
                        help="time scalar gates against per-dimension ones only")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    min_seconds = 0.5 if args.quick else 2.0
    print(describe_machine())
    shapes = [(1, 4096, 8, h, h) for h in (32, 128, 256)]
    if not args.quick:
        shapes += [(4, 1024, 8, 64, 64), (1, 4096, 8, 128, 64)]
    summary = {}
    only_other = args.only_decode or args.only_scalar_gate
    for dtype in () if only_other else args.dtypes:
        table, s = bench_vs_jax(shapes, jnp.dtype(dtype), rng, min_seconds)
        print(f"\n{table}\n\ngeomean: forward {s['fwd_vs_jax']:.2f}x, forward+backward "
              f"{s['fwd_bwd_vs_jax']:.2f}x faster than the pure-JAX chunked version\n")
        summary[dtype] = s
    if args.scalar_gate or args.only_scalar_gate:
        for dtype in args.dtypes:
            table, s = bench_scalar_gate(shapes, jnp.dtype(dtype), rng, min_seconds)
            print(f"\n{table}\n\ngeomean: the scalar gate's kernels are "
                  f"{s['scalar_fwd_speedup']:.2f}x (forward), {s['scalar_fwd_bwd_speedup']:.2f}x "
                  f"(forward+backward) faster than the per-dimension ones\n")
            summary[f"scalar_gate_{dtype}"] = s
    if args.decode or args.only_decode:
        table, summary["decode"] = bench_decode(
            rng, min_seconds, QUICK_DECODE_SHAPES if args.quick else DECODE_SHAPES)
        print(f"\n{table}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": len(os.sched_getaffinity(0)), "summary": summary}, f,
                      indent=1, default=float)


if __name__ == "__main__":
    main()
