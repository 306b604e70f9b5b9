"""Sweep: jaxattn vs XLA, PyTorch SDPA and tokamax along one axis at a time, with plots.

Each axis varies one parameter around a base point (B=1 T=S=2048 N=K=8 H=128 causal, float32,
forward): sequence length (forward and forward+backward), head dim, dtype, GQA ratio N/K,
threads (a fresh process per count, pinned with taskset), and a decode-like axis (one query
token against a KV cache of S tokens, where bandwidth is what counts). The implementations of
one point are timed in turns (ABAB..., medians) in one process, so a shared machine's load
hits them alike; a matmul and a memory copy take the same turns, so each point also has the
matmul GFLOP/s and copy GB/s the machine gave at that moment ("% of matmul" and "% of copy"
divide by those). GFLOP/s count useful work (4*B*N*T*S*H, causal: the visible half;
backward: 2.5x forward); GB/s count Q, K, V, O (and for backward dO, dQ, dK, dV) each touched
once. The machine's peaks (fastest matmul of XLA and PyTorch in f32 and bf16, fastest copy)
are measured at the start. Writes sweep.md, sweep.json and sweep_<axis>.png into --out.

    python benchmarks/bench_sweep.py [--quick] [--axes seq headdim dtype gqa threads decode]
                                     [--out benchmarks/results] [--threads-max N]

PyTorch and tokamax are optional (pip install .[bench]); when missing their columns are '-'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode  # noqa: E402
from bench_flash import Shape, inputs, jax_runner, torch_runner, xla_attention  # noqa: E402
from common import (best_seconds, copy_workload, describe_machine,  # noqa: E402
                    interleaved_seconds, markdown_table, matmul_candidates, matmul_peak,
                    torch_or_none)

import jaxattn  # noqa: E402

IMPLS = ("jaxattn", "XLA", "torch", "tokamax")
REFS = ("matmul", "copy")  # reference workloads timed in the same turns as the IMPLS
AXES = ("seq", "headdim", "dtype", "gqa", "threads", "decode")
GBS_AXES = ("seq", "decode")  # axes whose plot gets a GB/s panel (bandwidth matters there)
NAN = float("nan")


@dataclass(frozen=True)
class Point:
    """One measurement: a flash shape (or a decode shape when ``decode``) and how to run it."""
    axis: str
    value: int | str
    shape: Shape | bench_decode.Shape
    dtype: str = "float32"
    backward: bool = False
    threads: int | None = None  # run in a child pinned to this many cores
    decode: bool = False

    @property
    def pass_name(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    def flops(self) -> float:
        if self.decode:
            s = self.shape
            return 4.0 * s.b * s.n * s.t * s.s * s.h
        return self.shape.flops(self.backward)

    def bytes(self) -> float:
        itemsize = jnp.dtype(self.dtype).itemsize
        if self.decode:
            s = self.shape
            return float(s.kv_bytes(itemsize) + 2 * s.b * s.t * s.n * s.h * itemsize)
        return self.shape.bytes(itemsize, self.backward)


def base_shape(quick: bool) -> Shape:
    """The point every axis varies one parameter of (smaller for --quick)."""
    return Shape(1, 512, 8, 8, 64, True) if quick else Shape(1, 2048, 8, 8, 128, True)


def points(axis: str, quick: bool, threads_max: int) -> list[Point]:
    """The points of one axis, each the base point with one parameter changed."""
    base = base_shape(quick)
    rep = dataclasses.replace
    if axis == "seq":
        seqs = (256, 512, 1024) if quick else (256, 512, 1024, 2048, 4096, 8192)
        return [Point(axis, t, rep(base, t=t), backward=bwd)
                for bwd in (False, True) for t in seqs]
    if axis == "headdim":
        return [Point(axis, h, rep(base, h=h)) for h in ((64, 80, 128) if quick else
                                                         (64, 80, 128, 256))]
    if axis == "dtype":
        return [Point(axis, f"{dt} {'fwd+bwd' if bwd else 'fwd'}", base, dtype=dt, backward=bwd)
                for dt in ("float32", "bfloat16") for bwd in (False, True)]
    if axis == "gqa":
        return [Point(axis, r, rep(base, k=base.n // r)) for r in (1, 4, 8)]
    if axis == "threads":
        counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n < threads_max] + [threads_max]
        if quick:
            counts = sorted({1, threads_max})
        return [Point(axis, n, base, threads=n) for n in counts]
    if axis == "decode":
        lengths = (2048, 8192) if quick else (2048, 8192, 32768)
        return [Point(axis, s, bench_decode.Shape(1, s, 32, 8, 128, 1), decode=True)
                for s in lengths]
    raise ValueError(f"unknown axis {axis!r}; pick from {AXES}")


def tokamax_or_none() -> tuple[object | None, str]:
    """tokamax (optional) and a description of the implementation its default picks here."""
    try:
        import tokamax
    except Exception as e:  # not installed, or it fails to import with this jax
        return None, f"not available ({type(e).__name__})"
    # tokamax reads its config from absl flags and, at first use, parses sys.argv for them,
    # which rejects this script's own options; parse just the program name instead.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])
    # implementation=None tries its default order and takes the first one that does not raise
    # NotImplementedError; find which one that is on this backend.
    chosen, order = "?", "?"
    try:
        from tokamax._src.ops.attention import api
        order = api._DEFAULT_IMPLEMENTATION
        q = jnp.zeros((1, 16, 1, 16), jnp.float32)
        for impl in order:
            try:
                tokamax.dot_product_attention(q, q, q, implementation=impl)
                chosen = impl
                break
            except NotImplementedError:
                continue
    except Exception:  # private module layout changed: the description just stays vague
        pass
    return tokamax, (f"tokamax {tokamax.__version__}, implementation=None (default order "
                     f"{order}) runs {chosen!r} on {jax.default_backend()}")


def runners(p: Point, torch, tokamax) -> dict[str, Callable[[], object]]:
    """No-argument callables for each available implementation at ``p``."""
    dtype = jnp.dtype(p.dtype)
    fns: dict[str, Callable[[], object]] = {}
    if p.decode:
        q, kc, vc, lengths = bench_decode.inputs(p.shape, dtype)
        ours = jax.jit(jaxattn.decode_attention)
        fns["jaxattn"] = lambda: ours(q, kc, vc, lengths)
        xla = jax.jit(bench_decode.xla_decode)
        fns["XLA"] = lambda: xla(q, kc, vc, lengths)
        if torch is not None:
            fns["torch"] = bench_decode.torch_runner(torch, p.shape, p.dtype)
        if tokamax is not None:
            tk = jax.jit(lambda q, k, v, n: tokamax.dot_product_attention(
                q, k, v, key_value_seq_lengths=n))
            fns["tokamax"] = lambda: tk(q, kc, vc, lengths)
        return fns
    q, k, v = inputs(p.shape, dtype)
    for name, attention in (("jaxattn", jaxattn.flash_attention), ("XLA", xla_attention)):
        f = jax_runner(attention, p.shape, p.backward)
        fns[name] = lambda f=f: f(q, k, v)
    if torch is not None:
        fns["torch"] = torch_runner(torch, p.shape, p.dtype, p.backward)
    if tokamax is not None:
        tk = jax_runner(lambda q, k, v, is_causal: tokamax.dot_product_attention(
            q, k, v, is_causal=is_causal), p.shape, p.backward)
        fns["tokamax"] = lambda: tk(q, k, v)
    return fns


def references(torch, matmul_labels: dict[str, str]) -> dict[str, tuple[Callable, float]]:
    """The reference workloads: per dtype the matmul named in ``matmul_labels`` (the fastest
    one found at the start), and the memory copy, each as (callable, flops or bytes)."""
    refs = {}
    for dtype, label in matmul_labels.items():
        n = int(label.rsplit(", ", 1)[1].split("^")[0])  # labels end in ", {n}^3"
        refs[f"matmul {dtype}"] = next((fn, flops) for name, fn, flops in
                                       matmul_candidates(dtype, torch, (n,)) if name == label)
    refs["copy"] = copy_workload()
    return refs


def measure(p: Point, torch, tokamax, refs: dict, *, min_seconds: float,
            skip: dict[str, str]) -> tuple[dict[str, float], dict[str, str]]:
    """Seconds per call at ``p`` of each implementation and of the matmul and copy references
    (NaN where skipped or failed), and notes saying why."""
    notes = dict(skip)
    fns = {name: fn for name, fn in runners(p, torch, tokamax).items() if name not in skip}
    fns["matmul"] = refs[f"matmul {p.dtype}"][0]
    fns["copy"] = refs["copy"][0]
    warm = {}
    for name, fn in fns.items():  # compile and run once; one failing must not sink the rest
        try:
            jax.block_until_ready(fn())
            warm[name] = fn
        except Exception as e:  # e.g. out of memory for XLA's T x S logits
            notes[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    seconds = interleaved_seconds(warm, min_seconds=min_seconds, warmup=False) if warm else {}
    return {name: seconds.get(name, NAN) for name in IMPLS + REFS}, notes


def peak_options(quick: bool) -> dict:
    """Matmul sizes and timing for the peaks (--quick: small, as a smoke test)."""
    return {"sizes": (1024,), "min_seconds": 0.2} if quick else {"sizes": (2048, 4096)}


def run_child(p: Point, args, matmul_labels: dict[str, str]) -> dict:
    """Measures ``p`` in a fresh process pinned to its first ``p.threads`` cores (XLA sizes its
    pool from the affinity at start; PyTorch's count is set from it too)."""
    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:p.threads])
    cmd = ["taskset", "-c", cores, sys.executable, os.path.abspath(__file__), "--child",
           json.dumps({"value": p.value, "quick": args.quick, "min_seconds": args.min_seconds,
                       "no_torch": args.no_torch, "no_tokamax": args.no_tokamax,
                       "threads_max": args.threads_max, "matmul_labels": matmul_labels})]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = {k: (NAN if v is None else v) for k, v in result["seconds"].items()}
    return result


def child_main(spec: dict) -> None:
    """Entry point of a --child process: one threads-axis point, result as JSON on stdout."""
    torch = None if spec["no_torch"] else torch_or_none()
    tokamax = None if spec["no_tokamax"] else tokamax_or_none()[0]
    p = next(q for q in points("threads", spec["quick"], spec["threads_max"])
             if q.value == spec["value"])
    refs = references(torch, {"float32": spec["matmul_labels"]["float32"]})
    seconds, notes = measure(p, torch, tokamax, refs, min_seconds=spec["min_seconds"],
                             skip={})
    # json has no NaN; None stands for it
    print(json.dumps({"seconds": {k: (None if v != v else v) for k, v in seconds.items()},
                      "notes": notes}))


def run_axis(axis: str, args, torch, tokamax, refs: dict, matmul_labels: dict[str, str]
             ) -> list[dict]:
    """Measures every point of ``axis``; returns one record per point."""
    records = []
    last: dict[tuple[bool, str], tuple[float, float]] = {}  # (backward, impl) -> (s, work)
    for p in points(axis, args.quick, args.threads_max):
        work = p.bytes() if p.decode else p.flops()
        # Skip what would be too slow, predicted from the previous point of this pass (the
        # quadratic-memory implementations at long S on few cores), or what already failed.
        skip = {}
        for name in IMPLS:
            prev = last.get((p.backward, name))
            if prev is not None and math.isnan(prev[0]):
                skip[name] = "skipped: failed or skipped at a smaller size"
            elif prev is not None and prev[0] * work / prev[1] > args.max_call_seconds:
                skip[name] = (f"skipped: predicted {prev[0] * work / prev[1]:.0f} s per call "
                              f"> --max-call-seconds {args.max_call_seconds:g}")
        t0 = time.perf_counter()
        if p.threads is not None:
            child = run_child(p, args, matmul_labels)
            seconds, notes = child["seconds"], child["notes"]
        else:
            seconds, notes = measure(p, torch, tokamax, refs, min_seconds=args.min_seconds,
                                     skip=skip)
        for name in IMPLS:
            last[(p.backward, name)] = (seconds[name], work)
        records.append({
            "axis": axis, "value": p.value, "shape": str(p.shape), "pass": p.pass_name,
            "dtype": p.dtype, "threads": p.threads, "flops": p.flops(), "bytes": p.bytes(),
            "seconds": seconds, "notes": notes,
            # what the machine gave a matmul and a copy in the same turns
            "matmul_gflops": refs[f"matmul {p.dtype}"][1] / seconds["matmul"] / 1e9,
            "copy_gbs": refs["copy"][1] / seconds["copy"] / 1e9})
        print(f"  {axis}={p.value} {p.pass_name} {p.dtype}: " + ", ".join(
            f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items() if v == v)
            + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return records


def axis_table(records: list[dict]) -> str:
    headers = ["value", "shape", "pass", "dtype"]
    for name in IMPLS:
        headers += [f"{name} ms", f"{name} GFLOP/s", f"{name} GB/s"]
    headers += ["matmul GFLOP/s", "copy GB/s", "jaxattn % of matmul", "jaxattn % of copy"]
    headers += [f"x {n}" for n in IMPLS[1:]]
    rows = []
    for r in records:
        s = r["seconds"]
        row = [r["value"], r["shape"], r["pass"], r["dtype"]]
        for name in IMPLS:
            row += [s[name] * 1e3, r["flops"] / s[name] / 1e9, r["bytes"] / s[name] / 1e9]
        ours = s["jaxattn"]
        row += [r["matmul_gflops"], r["copy_gbs"],
                100 * r["flops"] / ours / 1e9 / r["matmul_gflops"],
                100 * r["bytes"] / ours / 1e9 / r["copy_gbs"]]
        row += [s[name] / ours for name in IMPLS[1:]]
        rows.append(row)
    return markdown_table(headers, rows)


AXIS_TITLES = {"seq": "sequence length T=S", "headdim": "head dim H", "dtype": "dtype, pass",
               "gqa": "GQA ratio N/K (N=8)", "threads": "threads (cores)",
               "decode": "KV cache length S (decode: T=1, N=32, K=8, H=128)"}
COLORS = {"jaxattn": "tab:blue", "XLA": "tab:orange", "torch": "tab:green",
          "tokamax": "tab:red"}


def plot_axis(axis: str, records: list[dict], path: str, machine: dict, base: str) -> None:
    """GFLOP/s (and for GBS_AXES, GB/s) against the axis, one line per implementation; black
    dashed: the matmul (copy) rate in the same turns, grey dotted: the machine's peak."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    panels = ["GFLOP/s", "GB/s"] if axis in GBS_AXES else ["GFLOP/s"]
    if axis == "decode":
        panels = ["GB/s", "GFLOP/s"]
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 4.5), squeeze=False)
    rate = {"GFLOP/s": lambda r, s: r["flops"] / s / 1e9,
            "GB/s": lambda r, s: r["bytes"] / s / 1e9}

    def refs(unit: str, r: dict) -> tuple[float, float, str]:
        """(rate in the same turns, the machine's peak, what it is) for ``r``."""
        if unit == "GB/s":
            return r["copy_gbs"], machine["copy_gbs"], "copy"
        short = "bf16" if r["dtype"] == "bfloat16" else "f32"
        return r["matmul_gflops"], machine[f"{short}_gflops"], f"{short} matmul"

    for ax, unit in zip(axes[0], panels):
        if axis == "dtype":  # categorical: grouped bars, each group with its own references
            width = 0.8 / len(IMPLS)
            for i, name in enumerate(IMPLS):
                ys = [rate[unit](r, r["seconds"][name]) for r in records]
                ax.bar([j + (i - (len(IMPLS) - 1) / 2) * width for j in range(len(records))],
                       [0 if math.isnan(y) else y for y in ys], width, label=name,
                       color=COLORS[name])
            for j, r in enumerate(records):
                now, peak, what = refs(unit, r)
                ax.hlines(now, j - 0.45, j + 0.45, colors="k", linestyles="--",
                          label="matmul, same turns" if j == 0 else None)
                ax.hlines(peak, j - 0.45, j + 0.45, colors="grey", linestyles=":",
                          label="peak (fastest seen)" if j == 0 else None)
            ax.set_xticks(range(len(records)), [str(r["value"]) for r in records])
        else:
            passes = sorted({r["pass"] for r in records}, key=len)
            for pass_name in passes:
                rs = [r for r in records if r["pass"] == pass_name]
                xs = [r["value"] for r in rs]
                style = "o-" if pass_name == "fwd" else "s:"
                for name in IMPLS:
                    ys = [rate[unit](r, r["seconds"][name]) for r in rs]
                    if all(math.isnan(y) for y in ys):
                        continue
                    ax.plot(xs, ys, style, color=COLORS[name],
                            label=f"{name} {pass_name}" if len(passes) > 1 else name)
            rs = [r for r in records if r["pass"] == passes[0]]
            xs = [r["value"] for r in rs]
            what = refs(unit, rs[0])[2]
            ax.plot(xs, [refs(unit, r)[0] for r in rs], "kx--",
                    label=f"{what}, same turns" + (" (on these cores)"
                                                   if axis == "threads" else ""))
            ax.axhline(refs(unit, rs[0])[1], color="grey", linestyle=":",
                       label=f"{what} peak (fastest seen, all cores)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")  # 300, not 3x10^2
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda y, _: f"{y:g}" if f"{y:g}"[0] in "25" else ""))
        ax.set_xlabel(AXIS_TITLES[axis])
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{AXIS_TITLES[axis]}; the rest as in {base} float32 fwd"
                 if axis != "decode" else AXIS_TITLES[axis], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def peaks_seen(machine: dict, results: dict[str, list[dict]]) -> dict:
    """``machine`` with its peaks raised to the fastest matmul and copy seen at any point: on
    a shared machine the start may have been a busy moment."""
    seen = dict(machine)
    records = [r for rs in results.values() for r in rs]
    for short, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        seen[f"{short}_gflops"] = max([machine[f"{short}_gflops_at_start"]] + [
            r["matmul_gflops"] for r in records if r["dtype"] == dtype
            and r["matmul_gflops"] == r["matmul_gflops"]])
    seen["copy_gbs"] = max([machine["copy_gbs_at_start"]] + [
        r["copy_gbs"] for r in records if r["copy_gbs"] == r["copy_gbs"]])
    return seen


def write_outputs(out: str, run: dict, results: dict[str, list[dict]], machine: dict
                  ) -> None:
    """sweep.md, sweep_<axis>.png and sweep.json (everything, for --replot) into ``out``."""
    os.makedirs(out, exist_ok=True)
    base = str(base_shape(run["quick"]))
    seen = peaks_seen(machine, results)
    parts = [header_text(seen, run)]
    for axis, records in results.items():
        png = f"sweep_{axis}.png"
        plot_axis(axis, records, os.path.join(out, png), seen, base)
        notes = sorted({f"{r['value']} {r['pass']} {k}: {v}" for r in records
                        for k, v in r["notes"].items()})
        parts.append(f"## {AXIS_TITLES[axis]}\n\n![{axis}]({png})\n\n{axis_table(records)}")
        if notes:
            parts.append("\n".join(f"- {n}" for n in notes))
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write("\n\n".join(parts) + "\n")
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"run": run, "machine": machine, "results": results}, f, indent=1,
                  default=str)


def header_text(machine: dict, run: dict) -> str:
    """The head of sweep.md: how it was run, the machine and its peaks, what was compared."""
    return "\n".join([
        "# Attention sweep: jaxattn vs XLA, PyTorch SDPA, tokamax", "",
        f"`{run['command']}` — {run['date']}, {run['minutes']:.1f} min; 1-min load average "
        f"before it started {run['load_start']:.1f}, at the end {run['load_end']:.1f} "
        f"(on {run['cores']} cores).", "",
        f"- Machine: {machine['description']}",
        f"- Peaks, the fastest seen in this run: f32 matmul "
        f"{machine['f32_gflops']:.0f} GFLOP/s ({machine['f32_source']}); bf16 matmul "
        f"{machine['bf16_gflops']:.0f} GFLOP/s ({machine['bf16_source']}); copy "
        f"{machine['copy_gbs']:.1f} GB/s (numpy, 256 MiB, read+write, one thread). "
        "At the start the fastest run of XLA's and PyTorch's matmuls (sizes "
        f"{peak_options(run['quick'])['sizes']}) picked the matmul per dtype and gave "
        f"{machine['f32_gflops_at_start']:.0f} / {machine['bf16_gflops_at_start']:.0f} "
        f"GFLOP/s and {machine['copy_gbs_at_start']:.1f} GB/s. That matmul and the copy "
        "are then timed in the same turns as the implementations at every point: "
        "columns 'matmul GFLOP/s' and 'copy GB/s' (what the machine gave them at that "
        "moment), which '% of matmul' and '% of copy' divide by.",
        f"- PyTorch: {machine['torch']} (`scaled_dot_product_attention`, [B, heads, T, H] "
        "layout, enable_gqa)",
        f"- tokamax: {machine['tokamax']}" + (
            " — `tokamax.dot_product_attention` as a user gets it on the CPU: its Pallas "
            "kernels (Mosaic, Triton) raise NotImplementedError here and it falls back to its "
            "XLA reference (einsum, f32 softmax, T x S logits materialized, K/V broadcast to "
            "N heads for GQA)" if "runs 'xla'" in machine["tokamax"] else ""),
        "- XLA: `jax.nn.dot_product_attention(implementation=\"xla\")`; decode: with "
        "key_value_seq_lengths (bench_decode.xla_decode); jaxattn decode: "
        "`jaxattn.decode_attention`",
        f"- Base point: {base_shape(run['quick'])}, float32, forward; each axis changes one "
        "parameter. The threads axis runs each count in a fresh process pinned with "
        "taskset (its matmul and copy on the same cores).",
        "- Implementations of a point are timed in turns in one process (medians). "
        "GFLOP/s: 4*B*N*T*S*H (causal: visible half), fwd+bwd = 3.5x fwd; GB/s: Q, K, V, "
        "O read/written once (fwd+bwd: also dO, dQ, dK, dV; decode: the KV cache). "
        "'x impl' = impl's time / jaxattn's (> 1: jaxattn faster). '-': not installed, "
        "skipped or failed (see notes).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    parser.add_argument("--axes", nargs="+", choices=AXES, default=list(AXES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--threads-max", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="time each implementation at least this long per point")
    parser.add_argument("--max-call-seconds", type=float, default=10.0,
                        help="skip an implementation whose call is predicted to take longer")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-tokamax", action="store_true")
    parser.add_argument("--replot", metavar="SWEEP_JSON",
                        help="rewrite sweep.md and the PNGs into --out from a saved sweep.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        for records in saved["results"].values():  # json has no NaN: null stands for it
            for r in records:
                r["seconds"] = {k: (NAN if v is None else v) for k, v in r["seconds"].items()}
        write_outputs(args.out, saved["run"], saved["results"], saved["machine"])
        return
    if args.min_seconds is None:
        args.min_seconds = 0.2 if args.quick else 2.0
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0]  # > 0 before we start: others share the cores
    torch = None if args.no_torch else torch_or_none()
    tokamax, tokamax_desc = (None, "disabled") if args.no_tokamax else tokamax_or_none()
    f32, f32_src = matmul_peak("float32", torch, **peak_options(args.quick))
    bf16, bf16_src = matmul_peak("bfloat16", torch, **peak_options(args.quick))
    matmul_labels = {"float32": f32_src, "bfloat16": bf16_src}
    refs = references(torch, matmul_labels)
    copy_gbs = refs["copy"][1] / best_seconds(refs["copy"][0]) / 1e9
    machine = {"description": describe_machine(), "f32_gflops_at_start": f32,
               "f32_source": f32_src, "bf16_gflops_at_start": bf16, "bf16_source": bf16_src,
               "copy_gbs_at_start": copy_gbs,
               "torch": torch.__version__ if torch else "not installed",
               "tokamax": tokamax_desc}
    print(json.dumps(machine, indent=1), file=sys.stderr)
    results: dict[str, list[dict]] = {}

    run = {"command": " ".join(["python benchmarks/bench_sweep.py"] + sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "load_start": load_at_start,
           "cores": len(os.sched_getaffinity(0))}
    for axis in args.axes:
        print(f"axis {axis}", file=sys.stderr, flush=True)
        results[axis] = run_axis(axis, args, torch, tokamax, refs, matmul_labels)
        # after each axis, so that partial results survive
        run.update(minutes=(time.perf_counter() - start) / 60, load_end=os.getloadavg()[0])
        write_outputs(args.out, run, results, machine)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; wrote "
          f"{os.path.join(args.out, 'sweep.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
