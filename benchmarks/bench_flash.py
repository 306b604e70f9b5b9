"""Flash attention forward and forward+backward vs XLA's attention and PyTorch's CPU SDPA.

All in one process, medians. Ratios > 1 mean jaxattn is faster. GFLOP/s count the useful
work (causal: only the visible half), with fwd = 4*B*N*T*S*H and fwd+bwd = 3.5x that; "% mm"
is their share of the machine's matrix-product rate in the same dtype (PyTorch's torch.mm,
4096^3: oneDNN, on AMX for bf16 where the CPU has it).

    python benchmarks/bench_flash.py [--quick] [--dtypes float32 bfloat16] [--memory]
        [--passes fwd fwd+bwd] [--isas amx avx512] [--soft-cap] [--dropout]
        [--shapes 2x512x8x2x128 1x2048x16x16x128c]

--shapes replaces the speed shapes: BxTxNxKxH (T = S), a trailing "c" for causal.

--isas runs the benchmark once per jaxattn kernel set (JAXATTN_ISA), each in its own process
with PyTorch timed in that process, and ends with a table comparing the kernel sets per shape.
--soft-cap adds the cost of a logit soft cap (Gemma 2's, cap 50): jaxattn with and without it
on Gemma-like shapes, forward and forward+backward, timed in alternating turns.
--dropout adds the cost of dropout on the attention weights (rate 0.1) the same way, on the
first two speed shapes (the quick ones with --quick).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import (describe_machine, geomean, machine_figures, markdown_table,  # noqa: E402
                    median_seconds, torch_or_none)

import jaxattn  # noqa: E402


@dataclass(frozen=True)
class Shape:
    b: int
    t: int
    n: int
    k: int
    h: int
    causal: bool

    def __str__(self) -> str:
        gqa = f" K={self.k}" if self.k != self.n else ""
        return (f"B={self.b} T=S={self.t} N={self.n}{gqa} H={self.h}"
                f"{' causal' if self.causal else ''}")

    def flops(self, backward: bool) -> float:
        visible = (self.t + 1) / (2 * self.t) if self.causal else 1.0
        fwd = 4.0 * self.b * self.n * self.t * self.t * self.h * visible
        return fwd * (3.5 if backward else 1.0)

    def bytes(self, itemsize: int, backward: bool) -> float:
        """Bytes of the operands each touched once: fwd reads Q, K, V and writes O; bwd also
        reads Q, K, V, O, dO and writes dQ, dK, dV (the per-row softmax statistics are
        negligible)."""
        q = self.b * self.t * self.n * self.h
        kv = self.b * self.t * self.k * self.h
        return float(itemsize * ((6 * q + 6 * kv) if backward else (2 * q + 2 * kv)))


SHAPES = (Shape(1, 2048, 16, 16, 128, True), Shape(4, 512, 12, 12, 64, False),
          Shape(1, 4096, 8, 2, 128, True))
QUICK_SHAPES = (Shape(1, 1024, 8, 8, 128, True), Shape(2, 512, 8, 8, 64, False),
                Shape(1, 1024, 8, 2, 128, True))


def parse_shape(text: str) -> Shape:
    """``BxTxNxKxH`` (T = S), ``c`` appended for causal: ``2x512x8x2x128``, ``1x2048x16x16x128c``."""
    causal = text.endswith("c")
    b, t, n, k, h = (int(x) for x in text.rstrip("c").split("x"))
    return Shape(b, t, n, k, h, causal)


def inputs(shape: Shape, dtype):
    rng = np.random.default_rng(0)
    mk = lambda heads: jnp.asarray(rng.standard_normal((shape.b, shape.t, heads, shape.h)),
                                   dtype)
    return mk(shape.n), mk(shape.k), mk(shape.k)


def jax_runner(attention, shape: Shape, backward: bool):
    f = lambda q, k, v: attention(q, k, v, is_causal=shape.causal)
    if backward:
        loss = lambda q, k, v: f(q, k, v).astype(jnp.float32).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return jax.jit(f)


def xla_attention(q, k, v, is_causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")


def torch_runner(torch, shape: Shape, dtype_name: str, backward: bool):
    """A no-argument callable running PyTorch SDPA on ``shape`` in its preferred layout."""
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    mk = lambda heads: torch.randn(shape.b, heads, shape.t, shape.h, generator=g).to(tdtype)
    q, k, v = mk(shape.n), mk(shape.k), mk(shape.k)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = shape.k != shape.n

    def run():
        if backward:
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            sdpa(qq, kk, vv, is_causal=shape.causal, enable_gqa=gqa).float().sum().backward()
            return None
        with torch.no_grad():
            return sdpa(q, k, v, is_causal=shape.causal, enable_gqa=gqa)
    return run


def time_torch(torch, shape: Shape, dtype_name: str, backward: bool) -> float:
    return median_seconds(torch_runner(torch, shape, dtype_name, backward))


def torch_matmul_gflops(torch, dtype_name: str) -> float:
    """torch.mm GFLOP/s on 4096^3 in dtype_name (oneDNN; AMX for bf16 where present)."""
    n = 4096
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    a = torch.ones(n, n, dtype=tdtype)
    b = torch.ones(n, n, dtype=tdtype)
    return 2 * n**3 / median_seconds(lambda: torch.mm(a, b)) / 1e9


def run_speed(shapes, dtypes, torch, passes=("fwd", "fwd+bwd")) -> tuple[str, dict]:
    rows, summary = [], {}
    matmul = {d: torch_matmul_gflops(torch, d) if torch is not None else float("nan")
              for d in dtypes if d in ("float32", "bfloat16")}
    summary["matmul_gflops"] = matmul
    summary["shapes"] = []
    for backward in [b for b, name in ((False, "fwd"), (True, "fwd+bwd")) if name in passes]:
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            ratios_xla, ratios_torch = [], []
            for shape in shapes:
                q, k, v = inputs(shape, dtype)
                ours = jax_runner(jaxattn.flash_attention, shape, backward)
                t_ours = median_seconds(lambda: ours(q, k, v))
                try:
                    xla = jax_runner(xla_attention, shape, backward)
                    t_xla = median_seconds(lambda: xla(q, k, v))
                except Exception:  # XLA lacks some dtypes on the CPU (float16)
                    t_xla = float("nan")
                t_torch = (time_torch(torch, shape, dtype_name, backward)
                           if torch is not None else float("nan"))
                ratios_xla.append(t_xla / t_ours)
                ratios_torch.append(t_torch / t_ours)
                gflops = shape.flops(backward) / t_ours / 1e9
                rows.append([("fwd+bwd" if backward else "fwd"), dtype_name, str(shape),
                             t_ours * 1e3, gflops,
                             100 * gflops / matmul.get(dtype_name, float("nan")), t_xla * 1e3,
                             t_torch * 1e3, t_xla / t_ours, t_torch / t_ours])
                summary["shapes"].append({"pass": "fwd+bwd" if backward else "fwd",
                                          "dtype": dtype_name, "shape": str(shape),
                                          "ms": t_ours * 1e3, "gflops": gflops,
                                          "torch_ms": t_torch * 1e3})
            key = f"{'fwd+bwd' if backward else 'fwd'} {dtype_name}"
            summary[key] = {"vs_xla": geomean(ratios_xla), "vs_torch": geomean(ratios_torch)}
            rows.append([key.split()[0], dtype_name, "**geomean**", float("nan"), float("nan"),
                         float("nan"), float("nan"), float("nan"), summary[key]["vs_xla"],
                         summary[key]["vs_torch"]])
    headers = ["pass", "dtype", "shape", "jaxattn ms", "jaxattn GFLOP/s", "% mm", "XLA ms",
               "torch ms", "x XLA", "x torch"]
    return markdown_table(headers, rows), summary


CAP_SHAPES = (Shape(1, 2048, 8, 4, 256, True), Shape(1, 2048, 16, 16, 128, True))


def run_soft_cap(dtypes, cap: float = 50.0) -> str:
    """The overhead of ``logits_soft_cap=cap`` over the same call without it."""
    return run_overhead(dtypes, CAP_SHAPES, f"cap {cap:g}", logits_soft_cap=cap)


def run_overhead(dtypes, shapes, label: str, **options) -> str:
    """The overhead of ``flash_attention``'s ``options`` over the same call without them."""
    rows = []
    for backward in (False, True):
        for dtype_name in dtypes:
            for shape in shapes:
                q, k, v = inputs(shape, jnp.dtype(dtype_name))
                capped = functools.partial(jaxattn.flash_attention, **options)
                plain = jax_runner(jaxattn.flash_attention, shape, backward)
                with_cap = jax_runner(capped, shape, backward)
                # Alternate the two so that both see the same machine state.
                t_plain, t_cap = [], []
                for _ in range(3):
                    t_plain.append(median_seconds(lambda: plain(q, k, v)))
                    t_cap.append(median_seconds(lambda: with_cap(q, k, v)))
                t_plain, t_cap = float(np.median(t_plain)), float(np.median(t_cap))
                rows.append([("fwd+bwd" if backward else "fwd"), dtype_name, str(shape),
                             t_plain * 1e3, t_cap * 1e3, 100.0 * (t_cap / t_plain - 1.0)])
    return markdown_table(["pass", "dtype", "shape", "without ms", f"{label} ms",
                           "overhead %"], rows)


_MEMORY_CHILD = r"""
import resource, sys, jax, jax.numpy as jnp, numpy as np, jaxattn
impl, t = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((1, t, 4, 64)), jnp.float32) for _ in range(3))
attn = (jaxattn.flash_attention if impl == "jaxattn" else
        lambda q, k, v, is_causal: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                                                implementation="xla"))
jax.block_until_ready((q, k, v))
with open("/proc/self/statm") as f:  # current resident set, pages
    base = int(f.read().split()[1]) * resource.getpagesize() // 1024
g = jax.jit(jax.grad(lambda q, k, v: attn(q, k, v, is_causal=True).sum(), argnums=(0, 1, 2)))
jax.block_until_ready(g(q, k, v))
# VmHWM: this process image's own peak (ru_maxrss would also count the parent's resident set
# at fork, which Linux carries across exec).
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(peak - base)
"""


def run_memory(t: int) -> str:
    """Peak memory over the resident set before one jitted fwd+bwd (B=1, N=4, H=64, f32,
    causal), each implementation in a fresh process (upper bound: includes compilation)."""
    rows = []
    for impl in ("jaxattn", "xla"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, impl, str(t)],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        rows.append([impl, f"T={t}", int(out.stdout.split()[-1]) / 1024])
    return markdown_table(["impl", "shape", "peak added (MiB)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--memory", action="store_true", help="also peak memory at T=8192")
    parser.add_argument("--soft-cap", action="store_true", help="also the soft cap's overhead")
    parser.add_argument("--dropout", action="store_true", help="also dropout's overhead")
    parser.add_argument("--only-overheads", action="store_true",
                        help="skip the speed table (with --soft-cap / --dropout)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"],
                        choices=["fwd", "fwd+bwd"])
    parser.add_argument("--isas", nargs="+",
                        help="jaxattn kernel sets to compare (JAXATTN_ISA), one process each")
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        help="speed shapes instead of the default ones: BxTxNxKxH[c]")
    args = parser.parse_args()
    if args.isas:
        compare_isas(args)
        return
    torch = None if args.no_torch else torch_or_none()
    print(describe_machine())
    fig = machine_figures()
    print(f"machine: f32 matmul {fig['matmul_gflops']:.0f} GFLOP/s (XLA), "
          f"copy {fig['copy_gbs']:.1f} GB/s; torch: "
          f"{torch.__version__ if torch else 'not installed'}\n")
    summary = {}
    if not args.only_overheads:
        shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
        table, summary = run_speed(shapes, args.dtypes, torch, args.passes)
        print("torch.mm 4096^3: " + ", ".join(f"{d} {g:.0f} GFLOP/s"
                                              for d, g in summary["matmul_gflops"].items()) + "\n")
        print(table)
    if args.soft_cap:
        print("\n" + run_soft_cap(args.dtypes))
    if args.dropout:
        print("\n" + run_overhead(args.dtypes, (QUICK_SHAPES if args.quick else SHAPES)[:2],
                                  "dropout 0.1", dropout_rate=0.1,
                                  dropout_rng=jax.random.key(0)))
    if args.memory:
        print("\n" + run_memory(8192))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": fig, "summary": summary}, f, indent=1)


def shape_arg(shape: Shape) -> str:
    """The --shapes text of ``shape``."""
    return (f"{shape.b}x{shape.t}x{shape.n}x{shape.k}x{shape.h}"
            f"{'c' if shape.causal else ''}")


def compare_isas(args) -> None:
    """Runs this benchmark once per kernel set in args.isas (fresh processes: the kernel set
    is chosen once per process), then compares them per shape. Each process times PyTorch
    too, so each kernel set's ratio to PyTorch is measured side by side in one process; the
    kernel sets' ratio to each other spans processes (on a shared machine, check it against
    the ratio of their PyTorch ratios)."""
    import tempfile
    results = {}
    for isa in args.isas:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--dtypes", *args.dtypes, "--passes", *args.passes,
                   "--json", f.name] + (["--quick"] if args.quick else []) + (
                       ["--shapes", *(shape_arg(s) for s in args.shapes)]
                       if args.shapes else []) + (
                       ["--no-torch"] if args.no_torch else [])
            print(f"## JAXATTN_ISA={isa}\n", flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "JAXATTN_ISA": isa})
            print(flush=True)
            with open(f.name) as fh:
                results[isa] = json.load(fh)["summary"]
    first, *others = args.isas
    headers = ["pass", "dtype", "shape"] + [f"{isa} ms" for isa in args.isas] + [
        f"{isa} x torch" for isa in args.isas] + [f"{first} x {o}" for o in others] + [
        f"{first} % mm"]
    rows, per_isa = [], {isa: [] for isa in args.isas}
    for i, row in enumerate(results[first]["shapes"]):
        rs = [results[isa]["shapes"][i] for isa in args.isas]
        vs_torch = [r["torch_ms"] / r["ms"] for r in rs]
        for isa, x in zip(args.isas, vs_torch):
            per_isa[isa].append(x)
        matmul = results[first]["matmul_gflops"].get(row["dtype"], float("nan"))
        rows.append([row["pass"], row["dtype"], row["shape"]] + [r["ms"] for r in rs] +
                    vs_torch + [r["ms"] / row["ms"] for r in rs[1:]] +
                    [100 * row["gflops"] / matmul])
    rows.append(["", "", "**geomean x torch**"] + [float("nan")] * len(args.isas) +
                [geomean(per_isa[isa]) for isa in args.isas] + [float("nan")] * len(others) +
                [float("nan")])
    print("## kernel sets compared\n")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
