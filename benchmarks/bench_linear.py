"""Gated linear attention: jaxattn's kernels vs the best pure-JAX chunked implementation.

All in one process, timed in turns (medians). The baseline, ``chunked_gla_jax`` below, is the
chunk-parallel form written with ``einsum`` + ``lax.scan`` under ``jax.jit``: per chunk a
masked quadratic product with the gates factored around the chunk midpoint, per-chunk state
contributions as one batched matmul, and a scan of the [Hk, Hv] states over chunks only (its
gradient is JAX's autodiff of the same code). Ratios > 1 mean jaxattn is faster.

    python benchmarks/bench_linear.py [--threads N] [--quick] [--decode] [--crossover PNG]

``--decode`` also times one decoding step (T = 1 with a state) as state bytes moved (read +
write) per second against the machine's copy bandwidth; ``--crossover PNG`` times GLA against
causal ``flash_attention`` over T and head dim (forward and forward+backward) and plots it.
``--threads N`` pins the process to its first N CPUs before XLA sizes its thread pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _pin_threads_from_argv() -> None:
    """Applies --threads before jax (imported below) can size its thread pool."""
    for i, arg in enumerate(sys.argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else (
            sys.argv[i + 1] if arg == "--threads" and i + 1 < len(sys.argv) else None)
        if value is not None:
            cpus = sorted(os.sched_getaffinity(0))[: max(1, int(value))]
            os.sched_setaffinity(0, cpus)


_pin_threads_from_argv()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import (copy_bandwidth, describe_machine, geomean, interleaved_seconds,  # noqa: E402
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


def bench_decode(rng, min_seconds):
    """One token with a state: bytes = the state read and written once (float32)."""
    headers = ["B", "N", "Hk", "Hv", "us / step", "state GB/s", "of copy bandwidth",
               "JAX recurrence us", "ratio"]
    copy = copy_bandwidth()
    rows = []
    for (b, n, hk, hv) in ((1, 8, 128, 128), (8, 16, 128, 128), (4, 16, 256, 256)):
        q, k, v, g = make_inputs(rng, b, 1, n, hk, hv, jnp.float32)
        state = jnp.asarray(rng.standard_normal((b, n, hk, hv)), jnp.float32)
        ours = jax.jit(lambda q, k, v, g, s: jaxattn.gated_linear_attention(
            q, k, v, g, initial_state=s, return_final_state=True))

        def plain(q, k, v, g, s):
            s = jnp.exp(g[:, 0])[..., None] * s + k[:, 0, :, :, None] * v[:, 0, :, None, :]
            return jnp.einsum("bni,bnid->bnd", q[:, 0] * hk ** -0.5, s)[:, None], s

        theirs = jax.jit(plain)
        times = interleaved_seconds({"ours": lambda: ours(q, k, v, g, state),
                                     "jax": lambda: theirs(q, k, v, g, state)},
                                    min_seconds=min_seconds)
        nbytes = 2 * 4 * b * n * hk * hv
        gbs = nbytes / times["ours"] / 1e9
        rows.append([b, n, hk, hv, 1e6 * times["ours"], gbs, gbs / copy, 1e6 * times["jax"],
                     times["jax"] / times["ours"]])
        print(markdown_table(headers, rows[-1:]).splitlines()[-1], flush=True)
    return markdown_table(headers, rows) + f"\n\ncopy bandwidth (numpy, read + write): " \
        f"{copy:.1f} GB/s"


def bench_crossover(rng, path, lengths, head_dims, min_seconds):
    """GLA vs causal flash attention over T and head dim (B=1, N=8, f32), fwd and fwd+bwd."""
    results = []
    for h in head_dims:
        for t in lengths:
            q, k, v, g = make_inputs(rng, 1, t, 8, h, h, jnp.float32)
            gla = lambda q, k, v, g: jaxattn.gated_linear_attention(q, k, v, g)
            flash = lambda q, k, v, g: jaxattn.flash_attention(q, k, v, is_causal=True)
            fns = {"gla": jax.jit(gla), "flash": jax.jit(flash),
                   "gla_bwd": fwd_bwd(gla), "flash_bwd": fwd_bwd(flash)}
            times = interleaved_seconds({n_: (lambda f=f: f(q, k, v, g)) for n_, f in fns.items()},
                                        min_seconds=min_seconds)
            results.append({"T": t, "H": h, **{n_: 1e3 * s for n_, s in times.items()}})
            print(results[-1], flush=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, suffix, title in ((axes[0], "", "forward"), (axes[1], "_bwd", "forward + backward")):
        for i, h in enumerate(head_dims):
            rs = [r for r in results if r["H"] == h]
            color = f"C{i}"
            ax.plot([r["T"] for r in rs], [r["gla" + suffix] for r in rs], "-o", color=color,
                    label=f"GLA H={h}")
            ax.plot([r["T"] for r in rs], [r["flash" + suffix] for r in rs], "--s", color=color,
                    label=f"flash causal H={h}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("ms (B=1, N=8, f32)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"jaxattn GLA vs causal flash attention, {len(os.sched_getaffinity(0))} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="pin to the first N CPUs")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--decode", action="store_true", help="also time decoding steps")
    parser.add_argument("--crossover", metavar="PNG", help="GLA vs flash attention plot")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    min_seconds = 0.5 if args.quick else 2.0
    print(describe_machine())
    shapes = [(1, 4096, 8, h, h) for h in (32, 128, 256)]
    if not args.quick:
        shapes += [(4, 1024, 8, 64, 64), (1, 4096, 8, 128, 64)]
    summary = {}
    for dtype in args.dtypes:
        table, s = bench_vs_jax(shapes, jnp.dtype(dtype), rng, min_seconds)
        print(f"\n{table}\n\ngeomean: forward {s['fwd_vs_jax']:.2f}x, forward+backward "
              f"{s['fwd_bwd_vs_jax']:.2f}x faster than the pure-JAX chunked version\n")
        summary[dtype] = s
    if args.decode:
        print(bench_decode(rng, min_seconds))
    if args.crossover:
        lengths = (256, 1024, 4096) if args.quick else (256, 512, 1024, 2048, 4096, 8192)
        head_dims = (32, 128) if args.quick else (32, 64, 128, 256)
        summary["crossover"] = bench_crossover(rng, args.crossover, lengths, head_dims,
                                               min_seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": len(os.sched_getaffinity(0)), "summary": summary}, f,
                      indent=1, default=float)


if __name__ == "__main__":
    main()
