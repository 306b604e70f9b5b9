"""Thread scaling: each workload timed in a fresh process pinned to 1, 2, 4, ... cores.

XLA sizes its intra-op pool from the process's CPU affinity, so `taskset -c 0-(n-1)` gives
the kernels n threads. Prints speed-up over 1 thread (and, with --plot, saves a PNG).

    python benchmarks/bench_threads.py [--threads 1 2 4 8 16] [--plot threads.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown_table  # noqa: E402

# name -> code run in the child: defines `fn` (a jitted callable of no arguments) and `work`
# (what one call does: a GFLOP count or GB of KV streamed, with its unit).
WORKLOADS = {
    "prefill fwd f32 B=1 T=4096 N=32 K=8 H=128 causal": """
q, k, v = rand((1, 4096, 32, 128)), rand((1, 4096, 8, 128)), rand((1, 4096, 8, 128))
f = jax.jit(lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True))
fn = lambda: f(q, k, v)
work = (4 * 32 * 4096 * 4097 / 2 * 128 / 1e9, "GFLOP/s")
""",
    "prefill fwd bf16 B=1 T=4096 N=32 K=8 H=128 causal": """
q, k, v = (rand(s, jnp.bfloat16) for s in ((1, 4096, 32, 128), (1, 4096, 8, 128), (1, 4096, 8, 128)))
f = jax.jit(lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True))
fn = lambda: f(q, k, v)
work = (4 * 32 * 4096 * 4097 / 2 * 128 / 1e9, "GFLOP/s")
""",
    "fwd+bwd f32 B=1 T=2048 N=16 H=128 causal": """
q, k, v = (rand((1, 2048, 16, 128)) for _ in range(3))
g = jax.jit(jax.grad(lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True).sum(), argnums=(0, 1, 2)))
fn = lambda: g(q, k, v)
work = (3.5 * 4 * 16 * 2048 * 2049 / 2 * 128 / 1e9, "GFLOP/s")
""",
    "fwd+bwd bf16 B=1 T=2048 N=16 H=128 causal": """
q, k, v = (rand((1, 2048, 16, 128), jnp.bfloat16) for _ in range(3))
g = jax.jit(jax.grad(lambda q, k, v: jaxattn.flash_attention(q, k, v, is_causal=True)
                     .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
fn = lambda: g(q, k, v)
work = (3.5 * 4 * 16 * 2048 * 2049 / 2 * 128 / 1e9, "GFLOP/s")
""",
}
DECODE = """
q = rand((1, 1, 32, 128), DT)
kc, vc = rand((1, 32768, 8, 128), DT), rand((1, 32768, 8, 128), DT)
lengths = jnp.array([32768], jnp.int32)
f = jax.jit(lambda q, k, v, n: jaxattn.decode_attention(q, k, v, n))
fn = lambda: f(q, kc, vc, lengths)
work = (2 * kc.size * kc.dtype.itemsize / 1e9, "GB/s")
"""

CHILD = """
import os, sys, json
sys.path.insert(0, {bench_dir!r})
import jax, jax.numpy as jnp, numpy as np, jaxattn
from common import median_seconds
rng = np.random.default_rng(0)
rand = lambda shape, dt=jnp.float32: jnp.asarray(rng.standard_normal(shape), dt)
{code}
t = median_seconds(fn, min_seconds=2.0)
print(json.dumps({{"seconds": t, "rate": work[0] / t, "unit": work[1]}}))
"""


def run_child(code: str, threads: int) -> dict:
    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
    child = CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), code=code)
    # python -c puts the working directory first on sys.path: run the child from the
    # benchmarks folder, so that a clone's root (the source folder jaxattn/, without the
    # compiled extension) cannot shadow the installed package.
    out = subprocess.run(["taskset", "-c", cores, sys.executable, "-c", child],
                         capture_output=True, text=True, env=os.environ.copy(),
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    available = len(os.sched_getaffinity(0))
    default = [n for n in (1, 2, 4, 8, 16, 32) if n <= available]
    parser.add_argument("--threads", type=int, nargs="+", default=default)
    parser.add_argument("--plot", help="save a PNG of speed-up vs threads here")
    parser.add_argument("--json", help="save the raw results here")
    args = parser.parse_args()

    import jaxattn
    workloads = dict(WORKLOADS)
    if hasattr(jaxattn, "decode_attention"):
        for dt in ("float32", "bfloat16"):
            workloads[f"decode {dt} B=1 S=32768 N=32 K=8 H=128"] = DECODE.replace(
                "DT", f"jnp.{dt}")
    results: dict[str, dict[int, dict]] = {}
    rows = []
    for name, code in workloads.items():
        results[name] = {n: run_child(code, n) for n in args.threads}
        base = results[name][args.threads[0]]["seconds"]
        for n, r in results[name].items():
            rows.append([name, n, r["seconds"] * 1e3, r["rate"], r["unit"],
                         base / r["seconds"]])
        print(f"done: {name}", file=sys.stderr, flush=True)
    print(markdown_table(["workload", "threads", "ms", "rate", "unit",
                          f"speed-up vs {args.threads[0]}"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, per in results.items():
            base = per[args.threads[0]]["seconds"]
            ax.plot(args.threads, [base / per[n]["seconds"] for n in args.threads], "o-",
                    label=name)
        ax.plot(args.threads, [n / args.threads[0] for n in args.threads], "k:", label="ideal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("threads (cores)")
        ax.set_ylabel("speed-up")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
