"""Gated linear attention: jaxattn vs flash-linear-attention's own PyTorch reference functions.

flash-linear-attention (``fla``) runs its kernels in Triton only, so on a CPU the functions of
its that run are its plain-PyTorch references: ``naive_recurrent_gla`` (fla/ops/gla/naive.py,
the recurrence jaxattn implements, a Python loop over T) and ``naive_chunk_simple_gla``
(fla/ops/simple_gla/naive.py, the chunked form with one scalar gate per head and step; it needs
``einops``). This script runs THEIR code, loaded by file path from an fla installation or
checkout (not ``import fla``: the package's ``__init__`` imports Triton), and reports:

1. agreement: jaxattn's output and final state against theirs (float32 both) on a few shapes,
   odd ones included (T = 1, T off the chunk, Hk != Hv, an initial state, strong decay);
2. time side by side (medians, timed in turns): forward, and forward+backward (their
   functions differentiated by torch.autograd, ours by the kernels' backward), on the issue's
   shapes (B=1, N=8, Hk=Hv in 32, 128, 256), PyTorch with the faster of 1 thread and every
   core for each shape. ``naive_chunk_simple_gla``'s gate is one scalar per head and step:
   jaxattn takes it as ``[B, T, N, 1]`` and runs its scalar-gate kernels.

Where fla comes from, first found: ``--fla-path DIR`` or ``$JAXATTN_FLA_PATH`` (a directory
holding ``fla/``: site-packages, a git checkout, an unpacked wheel), else the installed
``fla`` package (located without importing it). Without one, or without PyTorch, the script
says so and exits 0. To get it (pure Python; the references need only torch and einops)::

    pip install --no-deps fla-core einops
    python benchmarks/bench_fla.py [--threads N] [--quick] [--fla-path DIR]
        [--torch-threads N] [--max-autograd-gib 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types


sys.path.insert(0, os.path.dirname(__file__))
from pin_threads import pin_threads_from_argv  # noqa: E402

pin_threads_from_argv()  # before jax (imported below) sizes its thread pool

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import (describe_machine, interleaved_seconds, markdown_table,  # noqa: E402
                    torch_or_none)

import jaxattn  # noqa: E402

# The reference modules, relative to the directory holding fla/.
FLA_GLA_NAIVE = os.path.join("fla", "ops", "gla", "naive.py")
FLA_SIMPLE_GLA_NAIVE = os.path.join("fla", "ops", "simple_gla", "naive.py")


def find_fla_root(explicit: str | None) -> str | None:
    """The directory holding fla/ (see the module docstring), or None."""
    for root in (explicit, os.environ.get("JAXATTN_FLA_PATH")):
        if root:
            if not os.path.isfile(os.path.join(root, FLA_GLA_NAIVE)):
                sys.exit(f"bench_fla: {os.path.join(root, FLA_GLA_NAIVE)} not found")
            return root
    spec = importlib.util.find_spec("fla")  # a top-level package: located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(list(spec.submodule_search_locations)[0])


def load_module(root: str, relative: str, name: str) -> types.ModuleType:
    """One module file of fla, executed on its own (its imports: torch, einops)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(rng, b, t, n, hk, hv, *, scalar_gate=False, strength=16.0, state=False):
    """float32 numpy q, k, v, GLA's gate log_sigmoid(x) / strength (one per head and step
    when ``scalar_gate``: [B, T, N]), and optionally an initial state [B, N, Hk, Hv]."""
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    gate_shape = (b, t, n) if scalar_gate else (b, t, n, hk)
    g = np.array(jax.nn.log_sigmoid(normal(*gate_shape)) / strength, np.float32)  # writable
    return (normal(b, t, n, hk), normal(b, t, n, hk), normal(b, t, n, hv), g,
            normal(b, n, hk, hv) if state else None)


def ours(q, k, v, g, s0=None):
    """jaxattn on fla's layout ([B, T, N, H]; a scalar gate [B, T, N] as [B, T, N, 1]: the
    scalar-gate kernels)."""
    if g.ndim == 3:
        g = g[..., None]
    return jaxattn.gated_linear_attention(q, k, v, g, initial_state=s0, return_final_state=True)


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) /
                 max(np.max(np.abs(expected)), 1e-30))


def check_agreement(torch, gla_naive, simple_naive, rng) -> tuple[str, bool]:
    """jaxattn vs naive_recurrent_gla and naive_chunk_simple_gla: max |difference| over max
    |theirs|, for out and the final state."""
    cases = [(2, 1, 3, 16, 16, 16.0, True), (1, 37, 2, 17, 5, 16.0, True),
             (2, 130, 4, 64, 32, 16.0, False), (1, 300, 2, 33, 64, 1.0, True),
             (1, 257, 8, 128, 128, 16.0, True)]
    headers = ["reference", "B", "T", "N", "Hk", "Hv", "gate", "state", "out rel. error",
               "final state rel. error"]
    rows, worst = [], 0.0
    for (b, t, n, hk, hv, strength, state) in cases:
        for name, scalar in (("naive_recurrent_gla", False), ("naive_chunk_simple_gla", True)):
            if scalar and simple_naive is None:
                continue
            q, k, v, g, s0 = make_inputs(rng, b, t, n, hk, hv, scalar_gate=scalar,
                                         strength=strength, state=state)
            out, final = ours(q, k, v, g, s0)
            tq, tk, tv, tg = (torch.from_numpy(x) for x in (q, k, v, g))
            ts0 = None if s0 is None else torch.from_numpy(s0)
            if scalar:
                ref_out, ref_final = simple_naive.naive_chunk_simple_gla(
                    tq, tk, tv, tg, initial_state=ts0, output_final_state=True)
            else:
                ref_out, ref_final = gla_naive.naive_recurrent_gla(
                    tq, tk, tv, tg, initial_state=ts0, output_final_state=True)
            errors = (relative_error(out, ref_out.numpy()),
                      relative_error(final, ref_final.numpy()))
            worst = max(worst, *errors)
            rows.append([name, b, t, n, hk, hv, f"log_sigmoid/{strength:g}",
                         "yes" if state else "no", f"{errors[0]:.1e}", f"{errors[1]:.1e}"])
    return markdown_table(headers, rows), worst < 1e-4


def autograd_bytes(recurrent: bool, b: int, t: int, n: int, h: int) -> float:
    """About what torch.autograd keeps of a reference's forward: the recurrent one saves some
    four [B, N, H, H] float32 tensors per step, the chunked one per chunk of 64."""
    return 4.0 * 4 * b * n * h * h * (t if recurrent else -(-t // 64))


def fastest_thread_count(torch, fn, candidates) -> int:
    """The PyTorch thread count among ``candidates`` with which one call of ``fn`` (after a
    warm-up) is fastest, left set."""
    best = None
    for threads in sorted(set(candidates)):
        torch.set_num_threads(threads)
        fn()
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        if best is None or elapsed < best[0]:
            best = (elapsed, threads)
    torch.set_num_threads(best[1])
    return best[1]


def bench(torch, gla_naive, simple_naive, rng, shapes, min_seconds, max_autograd_gib,
          torch_threads):
    """Forward and forward+backward times, jaxattn vs their references (float32). Their
    backward is skipped ("-") where autograd would keep more than ``max_autograd_gib``.
    PyTorch runs each shape with the faster of ``torch_threads`` (thread counts)."""
    headers = ["reference", "B", "T", "N", "Hk=Hv", "torch threads", "jaxattn fwd ms",
               "theirs fwd ms",
               "x fwd", "jaxattn fwd+bwd ms", "theirs fwd+bwd ms", "x fwd+bwd"]
    rows = []
    for (b, t, n, h) in shapes:
        for name, scalar in (("naive_recurrent_gla", False), ("naive_chunk_simple_gla", True)):
            if scalar and simple_naive is None:
                continue
            q, k, v, g, _ = make_inputs(rng, b, t, n, h, h, scalar_gate=scalar)
            fwd = jax.jit(lambda q, k, v, g: ours(q, k, v, g)[0])
            loss = lambda q, k, v, g: jnp.sum(ours(q, k, v, g)[0] ** 2)
            fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
            reference = (simple_naive.naive_chunk_simple_gla if scalar
                         else gla_naive.naive_recurrent_gla)
            tensors = [torch.from_numpy(x) for x in (q, k, v, g)]
            leaves = [x.clone().requires_grad_(True) for x in tensors]

            def theirs_fwd():
                with torch.no_grad():
                    return reference(*tensors)[0]

            def theirs_fwd_bwd():
                for x in leaves:
                    x.grad = None
                (reference(*leaves)[0] ** 2).sum().backward()
                return [x.grad for x in leaves]

            threads = fastest_thread_count(torch, theirs_fwd, torch_threads)
            fns = {"fwd": lambda: fwd(q, k, v, g), "theirs_fwd": theirs_fwd,
                   "fwd_bwd": lambda: fwd_bwd(q, k, v, g), "theirs_fwd_bwd": theirs_fwd_bwd}
            if autograd_bytes(not scalar, b, t, n, h) > max_autograd_gib * 2**30:
                del fns["theirs_fwd_bwd"]
            times = interleaved_seconds(fns, min_seconds=min_seconds, min_runs=3,
                                        slow_seconds=min_seconds)
            times.setdefault("theirs_fwd_bwd", float("nan"))
            rows.append([name, b, t, n, h, threads, 1e3 * times["fwd"],
                         1e3 * times["theirs_fwd"],
                         times["theirs_fwd"] / times["fwd"], 1e3 * times["fwd_bwd"],
                         1e3 * times["theirs_fwd_bwd"],
                         times["theirs_fwd_bwd"] / times["fwd_bwd"]])
            print(markdown_table(headers, rows[-1:]).splitlines()[-1], flush=True)
    return markdown_table(headers, rows), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="pin to the first N CPUs")
    parser.add_argument("--quick", action="store_true", help="T=1024 instead of 4096")
    parser.add_argument("--fla-path", help="directory holding fla/ (or $JAXATTN_FLA_PATH)")
    parser.add_argument("--max-autograd-gib", type=float, default=4.0,
                        help="skip their fwd+bwd where autograd would keep more than this")
    parser.add_argument("--torch-threads", type=int, nargs="+",
                        help="PyTorch thread counts to try per shape, the faster one timed "
                             "(default: 1 and every core of the process: their references "
                             "are Python loops of small ops, where one thread can be faster)")
    parser.add_argument("--json", help="write the tables' rows here")
    args = parser.parse_args()
    torch = torch_or_none()
    root = find_fla_root(args.fla_path)
    if torch is None or root is None:
        print("bench_fla: skipped: needs PyTorch and flash-linear-attention's reference "
              "functions (pip install --no-deps fla-core einops, or --fla-path DIR / "
              "$JAXATTN_FLA_PATH naming a directory that holds fla/)")
        return
    gla_naive = load_module(root, FLA_GLA_NAIVE, "fla_gla_naive")
    try:
        simple_naive = load_module(root, FLA_SIMPLE_GLA_NAIVE, "fla_simple_gla_naive")
    except ImportError as e:  # einops missing: the chunked reference is skipped
        print(f"bench_fla: naive_chunk_simple_gla skipped ({e})")
        simple_naive = None
    print(describe_machine(), f"| torch {torch.__version__} | fla references from {root}",
          flush=True)
    rng = np.random.default_rng(0)
    table, agree = check_agreement(torch, gla_naive, simple_naive, rng)
    print(f"\nAgreement with their references (float32 both):\n\n{table}\n\n"
          f"{'agree' if agree else 'DISAGREE'} (every relative error below 1e-4: {agree})\n",
          flush=True)
    t = 1024 if args.quick else 4096
    shapes = [(1, t, 8, h) for h in (32, 128, 256)]
    table, rows = bench(torch, gla_naive, simple_naive, rng, shapes,
                        0.5 if args.quick else 2.0, args.max_autograd_gib,
                        args.torch_threads or (1, len(os.sched_getaffinity(0))))
    print(f"\nTimes (float32; x = their time / ours; '-': their backward skipped, autograd "
          f"would keep over {args.max_autograd_gib:g} GiB):\n\n{table}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": len(os.sched_getaffinity(0)), "agree": agree, "rows": rows},
                      f, indent=1, default=float)
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
