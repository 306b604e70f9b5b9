"""Shared benchmark helpers: timing, machine figures, optional PyTorch, table output."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Sequence

import jax
import numpy as np


def median_seconds(fn: Callable[[], object], *, warmup: int = 1, min_runs: int = 3,
                   min_seconds: float = 1.0, max_runs: int = 50) -> float:
    """Median wall time of ``fn()`` (results blocked on), after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds
                                    and len(times) < max_runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wall_and_cpu_seconds(fn: Callable[..., object], args: Sequence[object]) -> np.ndarray:
    """(wall, process CPU) seconds of one call ``fn(*args)``, its result blocked on."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return np.array([time.perf_counter() - wall, time.process_time() - cpu])


def paired_fastest(fn: Callable[..., object], base: Callable[..., object],
                   args: Sequence[object], reps: int) -> tuple[np.ndarray, np.ndarray]:
    """Fastest (wall, cpu) seconds of ``fn(*args)`` and of ``base(*args)`` over ``reps``
    interleaved runs (each compiled first)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(base(*args))
    times, base_times = [], []
    for _ in range(reps):
        times.append(wall_and_cpu_seconds(fn, args))
        base_times.append(wall_and_cpu_seconds(base, args))
    return np.min(times, axis=0), np.min(base_times, axis=0)


def jit_forward_backward(attention: Callable[..., object]) -> Callable[..., object]:
    """jit of ``(q, k, v, dout) -> (out, dq, dk, dv)``: one forward and one backward pass."""

    def run(q, k, v, dout):
        out, vjp = jax.vjp(attention, q, k, v)
        return (out,) + vjp(dout)

    return jax.jit(run)


def torch_or_none():
    """PyTorch (an optional benchmark dependency) set to use every core, or None."""
    try:
        import torch
    except ImportError:
        return None
    # The process's affinity, not os.cpu_count(): a child pinned with taskset gets its cores.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return torch


def machine_figures() -> dict[str, float]:
    """This machine's f32 matmul GFLOP/s (XLA, 4096^3 or less) and copy GB/s (read+write)."""
    n = 2048
    a = jax.numpy.ones((n, n), jax.numpy.float32)
    mm = jax.jit(lambda x: x @ x)
    t = median_seconds(lambda: mm(a))
    src = np.ones(256 * 2**20 // 4, np.float32)  # 256 MiB, far beyond the caches
    dst = np.empty_like(src)
    tc = median_seconds(lambda: np.copyto(dst, src), min_runs=5)
    return {"matmul_gflops": 2 * n**3 / t / 1e9, "copy_gbs": 2 * src.nbytes / tc / 1e9}


def interleaved_seconds(fns: dict[str, Callable[[], object]], *, min_seconds: float = 1.0,
                        min_runs: int = 3, max_runs: int = 50,
                        slow_seconds: float = 3.0, warmup: bool = True,
                        statistic: Callable[[list[float]], float] = statistics.median
                        ) -> dict[str, float]:
    """Median (or ``statistic``) wall time of each ``fns[name]()``, the callables timed in
    turns (ABAB...).

    On a shared machine, load that comes and goes then hits every alternative alike, so
    their ratios stay meaningful. Each is called once untimed first (compilation). A
    callable stops taking turns after ``min_runs`` calls and ``min_seconds`` of them, or
    ``max_runs``, or (for slow ones) after one call once ``slow_seconds`` are spent on it.
    """
    for fn in fns.values() if warmup else ():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}

    def wants_more(name: str) -> bool:
        ts, spent = times[name], sum(times[name])
        if not ts:
            return True
        if len(ts) >= max_runs or spent >= max(slow_seconds, min_seconds):
            return False
        return len(ts) < min_runs or spent < min_seconds

    while any(wants_more(name) for name in fns):
        for name, fn in fns.items():
            if wants_more(name):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
    return {name: statistic(ts) for name, ts in times.items()}


def best_seconds(fn: Callable[[], object], *, min_runs: int = 5,
                 min_seconds: float = 1.0) -> float:
    """Fastest wall time of ``fn()`` after one warm-up call: for peaks, where the best run
    is the figure wanted and others' load on a shared machine only ever slows a run down."""
    jax.block_until_ready(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_candidates(dtype: str = "float32", torch=None,
                      sizes: Sequence[int] = (2048, 4096)
                      ) -> list[tuple[str, Callable[[], object], float]]:
    """Square matmuls in ``dtype`` as (label, no-argument callable, flops per call).

    XLA (output in ``dtype``; for bfloat16 also accumulating into an f32 output) and, when
    given, PyTorch's torch.matmul (MKL / oneDNN; uses AVX512-BF16 / AMX where the CPU has
    them), at each size in ``sizes``.
    """
    out: list[tuple[str, Callable[[], object], float]] = []
    for n in sizes:
        a = jax.numpy.ones((n, n), jax.numpy.dtype(dtype))
        fns = [(f"XLA {dtype}", lambda x: x @ x)]
        if dtype == "bfloat16":
            fns.append(("XLA bf16->f32", lambda x: jax.numpy.dot(
                x, x, preferred_element_type=jax.numpy.float32)))
        for name, f in fns:
            mm = jax.jit(f)
            out.append((f"{name}, {n}^3", lambda mm=mm, a=a: mm(a), 2.0 * n**3))
        if torch is not None:
            ta = torch.randn(n, n).to(getattr(torch, dtype))
            out.append((f"torch.matmul {dtype} (torch {torch.__version__}), {n}^3",
                        lambda ta=ta: torch.matmul(ta, ta), 2.0 * n**3))
    return out


def matmul_peak(dtype: str = "float32", torch=None, sizes: Sequence[int] = (2048, 4096),
                min_seconds: float = 1.0) -> tuple[float, str]:
    """The best matmul GFLOP/s of :func:`matmul_candidates` here (fastest single run), and
    the label of the candidate that reached it."""
    return max((flops / best_seconds(fn, min_seconds=min_seconds) / 1e9, label)
               for label, fn, flops in matmul_candidates(dtype, torch, sizes))


def copy_workload(mib: int = 256, threads: int | None = 1
                  ) -> tuple[Callable[[], object], float]:
    """A numpy copy of ``mib`` MiB, far beyond the caches, and its bytes (read + write), by
    ``threads`` threads (None: every core of the process), each copying its contiguous slice
    (numpy releases the GIL in the copy, so the threads copy in parallel). The destination is
    written once first (no page faults in the timed copies)."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.zeros_like(src)
    threads = threads or len(os.sched_getaffinity(0))
    if threads == 1:
        return (lambda: np.copyto(dst, src)), 2.0 * src.nbytes
    import concurrent.futures
    pairs = list(zip(np.array_split(dst, threads), np.array_split(src, threads)))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)

    def copy() -> None:
        list(pool.map(lambda pair: np.copyto(*pair), pairs))
    return copy, 2.0 * src.nbytes


def read_workload(mib: int = 1024, threads: int | None = None
                  ) -> tuple[Callable[[], object], float]:
    """A read of ``mib`` MiB (far beyond the caches) by ``threads`` threads (default: every
    core of the process), and its bytes: each thread sums its contiguous slice with numpy,
    which releases the GIL in the reduction, so the threads read in parallel. The memory is
    written once first (no zero-page reads)."""
    import concurrent.futures
    threads = threads or len(os.sched_getaffinity(0))
    data = np.ones(mib * 2**20 // 4, np.float32)
    slices = np.array_split(data, threads)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)

    def read() -> float:
        return sum(pool.map(np.sum, slices))
    return read, float(data.nbytes)


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from jaxattn import kernel_isa
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, jax {jax.__version__}, "
            f"jaxattn kernels: {kernel_isa()}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x: object) -> str:
        if isinstance(x, float):
            return "-" if np.isnan(x) else (f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}")
        return str(x)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def geomean(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")
