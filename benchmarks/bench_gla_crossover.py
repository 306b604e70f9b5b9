"""Where gated linear attention overtakes causal flash attention: time against T and head dim.

GLA costs about T (Hk Hv + C (Hk + Hv) / 2) per head (the state update and the chunk's
quadratic part, C = 64), causal softmax attention about T^2 H / 2: GLA wins at long sequences,
later the larger the head. This script times both jaxattn ops (``gated_linear_attention`` and
``flash_attention(is_causal=True)``, B=1, N=8, Hk=Hv=H, float32 unless ``--dtype``), forward
and forward+backward (``jax.grad`` of sum(out^2)), timed in turns in one process (medians),
in the spirit of flash-linear-attention's GLA-vs-flash measurements. It writes

    <out>.md    the table, and per head dim the shortest T where GLA is faster
    <out>.json  the same numbers
    <out>.png   the plot (only if matplotlib imports; the table is written either way)

    python benchmarks/bench_gla_crossover.py [--threads N] [--lengths 256 1024 4096]
        [--head-dims 32 64 128 256] [--min-seconds 1.0] [--out PREFIX]

``--out`` defaults to benchmarks/results/gla_crossover_<cores>core. ``--threads N`` pins the
process to its first N CPUs before XLA sizes its thread pool.
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

from common import describe_machine, interleaved_seconds, markdown_table  # noqa: E402

import jaxattn  # noqa: E402

MODES = (("fwd", "forward"), ("fwd_bwd", "forward + backward"))


def time_pair(rng, t: int, h: int, batch: int, heads: int, dtype, min_seconds: float
              ) -> dict[str, float]:
    """ms of GLA and causal flash attention at one (T, H), forward and forward+backward."""
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    q, k, v = (normal(batch, t, heads, h) for _ in range(3))
    g = jnp.asarray(jax.nn.log_sigmoid(rng.standard_normal((batch, t, heads, h))) / 16, dtype)
    ops = {"gla": lambda q, k, v: jaxattn.gated_linear_attention(q, k, v, g),
           "flash": lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True)}
    fns = {}
    for name, op in ops.items():
        fns[f"{name}_fwd"] = jax.jit(op)
        loss = lambda q, k, v, op=op: jnp.sum(op(q, k, v).astype(jnp.float32) ** 2)
        fns[f"{name}_fwd_bwd"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    times = interleaved_seconds({name: (lambda f=f: f(q, k, v)) for name, f in fns.items()},
                                min_seconds=min_seconds)
    return {name: 1e3 * s for name, s in times.items()}


def crossovers(results: list[dict], head_dims) -> list[list]:
    """Per head dim and mode, the shortest measured T from which GLA stays faster."""
    rows = []
    for h in head_dims:
        rs = sorted((r for r in results if r["H"] == h), key=lambda r: r["T"])
        row = [h]
        for mode, _ in MODES:
            faster = [r["gla_" + mode] < r["flash_" + mode] for r in rs]
            first = next((i for i in range(len(rs)) if all(faster[i:])), None)
            row.append("never (measured)" if first is None else
                       f"T <= {rs[0]['T']}" if first == 0 else
                       f"{rs[first - 1]['T']} < T <= {rs[first]['T']}")
        rows.append(row)
    return rows


def plot(results: list[dict], head_dims, title: str, path: str) -> bool:
    """The two panels (forward, forward+backward) as a PNG; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, (mode, label) in zip(axes, MODES):
        for i, h in enumerate(head_dims):
            rs = sorted((r for r in results if r["H"] == h), key=lambda r: r["T"])
            ts = [r["T"] for r in rs]
            ax.plot(ts, [r["gla_" + mode] for r in rs], "-o", color=f"C{i}", label=f"GLA H={h}")
            ax.plot(ts, [r["flash_" + mode] for r in rs], "--s", color=f"C{i}",
                    label=f"flash causal H={h}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("ms")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="pin to the first N CPUs")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--out", help="path prefix of the .md/.json/.png files")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"gla_crossover_{cores}core")
    machine = describe_machine()
    print(machine, flush=True)
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    results = []
    for h in args.head_dims:
        for t in args.lengths:
            results.append({"T": t, "H": h, **time_pair(rng, t, h, args.batch, args.heads, dtype,
                                                         args.min_seconds)})
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in results[-1].items()},
                  flush=True)
    headers = ["H", "T", "GLA fwd ms", "flash fwd ms", "flash / GLA fwd", "GLA fwd+bwd ms",
               "flash fwd+bwd ms", "flash / GLA fwd+bwd"]
    rows = [[r["H"], r["T"], r["gla_fwd"], r["flash_fwd"], r["flash_fwd"] / r["gla_fwd"],
             r["gla_fwd_bwd"], r["flash_fwd_bwd"], r["flash_fwd_bwd"] / r["gla_fwd_bwd"]]
            for r in results]
    shape = f"B={args.batch}, N={args.heads}, Hk=Hv=H, {dtype.name}"
    title = f"jaxattn GLA vs causal flash attention, {cores} cores ({shape})"
    has_plot = plot(results, args.head_dims, title, out + ".png")
    command = "python benchmarks/bench_gla_crossover.py " + " ".join(sys.argv[1:])
    text = (f"# {title}\n\n{machine}. `{command.strip()}`; medians of runs timed in turns "
            f"(ratios > 1: GLA faster).\n\n"
            + (f"![crossover]({os.path.basename(out)}.png)\n\n" if has_plot else
               "(no plot: matplotlib is not installed)\n\n")
            + markdown_table(headers, rows)
            + "\n\nWhere GLA becomes faster (between the measured lengths):\n\n"
            + markdown_table(["H", "forward", "forward + backward"],
                             crossovers(results, args.head_dims)) + "\n")
    with open(out + ".md", "w") as f:
        f.write(text)
    with open(out + ".json", "w") as f:
        json.dump({"machine": machine, "threads": cores, "shape": shape, "results": results}, f,
                  indent=1)
    print("\n" + text)
    print(f"wrote {out}.md, {out}.json" + (f", {out}.png" if has_plot else ""))


if __name__ == "__main__":
    main()
