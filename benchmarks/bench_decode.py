"""Decode attention (one new token against a long KV cache) vs XLA's attention and PyTorch SDPA.

All in one process, medians. Decoding is bound by memory bandwidth, so the figure of merit is
the KV cache streamed per second (bytes of K and V below the lengths / time), compared with the
machine's copy bandwidth (numpy copy of 256 MiB, read + write bytes, measured here too).
Ratios > 1 mean jaxattn is faster.

Quantized caches (``--cache-dtypes int8 float8_e4m3fn``, on by default): a bfloat16 query
against an int8 / float8 cache (with float32 scales per token and kv head), timed in turns
with the same query against a bfloat16 cache, a float32 query against a float32 cache, and
a read of 1 GiB by every thread (numpy sums on a thread pool): the figures are the speedup
over the bfloat16 cache and the share of that all-threads read bandwidth (cache bytes,
scales included, per second).

    python benchmarks/bench_decode.py [--threads N] [--dtypes float32 bfloat16] [--quick]
        [--cache-dtypes int8 float8_e4m3fn] [--only-quantized]

``--threads N`` pins the process to its first N CPUs before XLA starts its thread pool (XLA
and PyTorch then use N threads); the table header reports the thread count used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass


sys.path.insert(0, os.path.dirname(__file__))
from pin_threads import pin_threads_from_argv  # noqa: E402

pin_threads_from_argv()  # before jax (imported below) sizes its thread pool

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import (describe_machine, geomean, interleaved_seconds,  # noqa: E402
                    machine_figures, markdown_table, median_seconds, read_workload,
                    torch_or_none)

import jaxattn  # noqa: E402


@dataclass(frozen=True)
class Shape:
    b: int
    s: int
    n: int = 32
    k: int = 8
    h: int = 128
    t: int = 1

    def __str__(self) -> str:
        return f"B={self.b} S={self.s} N={self.n} K={self.k} H={self.h} T={self.t}"

    def kv_bytes(self, itemsize: int) -> int:
        return 2 * self.b * self.s * self.k * self.h * itemsize


SHAPES = (Shape(1, 32768), Shape(8, 4096))
QUICK_SHAPES = (Shape(1, 8192), Shape(4, 2048))
PAGE_SIZE = 16


def inputs(shape: Shape, dtype):
    rng = np.random.default_rng(0)
    mk = lambda *dims: jnp.asarray(rng.standard_normal(dims, np.float32), dtype)
    q = mk(shape.b, shape.t, shape.n, shape.h)
    key_cache, value_cache = mk(shape.b, shape.s, shape.k, shape.h), mk(shape.b, shape.s,
                                                                          shape.k, shape.h)
    lengths = jnp.full((shape.b,), shape.s, jnp.int32)  # a full cache: every byte is read
    return q, key_cache, value_cache, lengths


def xla_decode(q, key_cache, value_cache, lengths):
    """XLA's attention on the cache: key_value_seq_lengths masks the unused tail."""
    t, s = q.shape[1], key_cache.shape[1]
    mask = None
    if t > 1:  # the newest T tokens are causal among themselves
        pos = lengths[:, None] - t + jnp.arange(t)[None, :]
        mask = (jnp.arange(s)[None, None, :] <= pos[:, :, None])[:, None]
    return jax.nn.dot_product_attention(q, key_cache, value_cache, mask=mask,
                                        key_value_seq_lengths=lengths, implementation="xla")


def paged(key_cache, value_cache):
    """The same cache as pages of PAGE_SIZE, in order (block_tables[b] = b's pages)."""
    b, s, k, h = key_cache.shape
    per = s // PAGE_SIZE
    tables = jnp.arange(b * per, dtype=jnp.int32).reshape(b, per)
    return (key_cache.reshape(b * per, PAGE_SIZE, k, h),
            value_cache.reshape(b * per, PAGE_SIZE, k, h), tables)


def torch_runner(torch, shape: Shape, dtype_name: str):
    """PyTorch SDPA given its preferred layout ([B, heads, S, H], contiguous), GQA enabled,
    as a no-argument callable."""
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(shape.b, shape.n, shape.t, shape.h, generator=g).to(tdtype)
    k = torch.randn(shape.b, shape.k, shape.s, shape.h, generator=g).to(tdtype)
    v = torch.randn(shape.b, shape.k, shape.s, shape.h, generator=g).to(tdtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run():
        with torch.no_grad():
            return sdpa(q, k, v, is_causal=False, enable_gqa=True)
    return run


def time_torch(torch, shape: Shape, dtype_name: str) -> float:
    return median_seconds(torch_runner(torch, shape, dtype_name))


def run_speed(shapes, dtypes, torch, copy_gbs: float) -> tuple[str, dict]:
    rows, summary = [], {}
    nan = float("nan")
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        ratios_xla, ratios_torch, fractions = [], [], []
        for shape in shapes:
            q, kc, vc, lengths = inputs(shape, dtype)
            gb = shape.kv_bytes(dtype.itemsize) / 1e9
            ours = jax.jit(jaxattn.decode_attention)
            t_ours = median_seconds(lambda: ours(q, kc, vc, lengths))
            pk, pv, tables = paged(kc, vc)
            ours_paged = jax.jit(jaxattn.paged_decode_attention)
            t_paged = median_seconds(lambda: ours_paged(q, pk, pv, tables, lengths))
            try:
                xla = jax.jit(xla_decode)
                t_xla = median_seconds(lambda: xla(q, kc, vc, lengths))
            except Exception:  # XLA lacks some dtypes on the CPU (float16)
                t_xla = nan
            t_torch = time_torch(torch, shape, dtype_name) if torch is not None else nan
            ratios_xla.append(t_xla / t_ours)
            ratios_torch.append(t_torch / t_ours)
            fractions.append(gb / t_ours / copy_gbs)
            rows.append([dtype_name, str(shape), t_ours * 1e3, gb / t_ours,
                         100 * gb / t_ours / copy_gbs, t_paged * 1e3, t_xla * 1e3,
                         gb / t_xla, t_torch * 1e3, gb / t_torch, t_xla / t_ours,
                         t_torch / t_ours])
        summary[dtype_name] = {"vs_xla": geomean(ratios_xla), "vs_torch": geomean(ratios_torch),
                               "copy_fraction": geomean(fractions)}
        rows.append([dtype_name, "**geomean**"] + [nan] * 8 +
                    [summary[dtype_name]["vs_xla"], summary[dtype_name]["vs_torch"]])
    headers = ["dtype", "shape", "jaxattn ms", "KV GB/s", "% of copy", f"paged({PAGE_SIZE}) ms",
               "XLA ms", "XLA GB/s", "torch ms", "torch GB/s", "x XLA", "x torch"]
    return markdown_table(headers, rows), summary


def run_quantized(shapes, cache_dtypes, query_dtype: str = "bfloat16",
                  read_mib: int = 1024) -> tuple[str, dict]:
    """Quantized caches vs a cache in the query dtype and vs all-threads read bandwidth, timed
    in turns (see the module docstring)."""
    rows, summary = [], {}
    read, read_bytes = read_workload(read_mib)
    qdtype = jnp.dtype(query_dtype)
    for shape in shapes:
        q, kc, vc, lengths = inputs(shape, qdtype)
        ours = jax.jit(jaxattn.decode_attention)
        fns = {"read": read, query_dtype: lambda: ours(q, kc, vc, lengths)}
        nbytes = {query_dtype: shape.kv_bytes(qdtype.itemsize)}
        # The float32 cache (with a float32 query) for scale: twice the bfloat16 bytes.
        q32, k32, v32 = q.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32)
        fns["float32"] = lambda: ours(q32, k32, v32, lengths)
        nbytes["float32"] = shape.kv_bytes(4)
        for name in cache_dtypes:
            (kq, ks), (vq, vs) = jaxattn.quantize_kv(kc, name), jaxattn.quantize_kv(vc, name)
            fns[name] = (lambda kq=kq, vq=vq, ks=ks, vs=vs:
                         ours(q, kq, vq, lengths, key_scale=ks, value_scale=vs))
            nbytes[name] = shape.kv_bytes(1) + 2 * ks.nbytes
        times = interleaved_seconds(fns, min_seconds=2.0, min_runs=10)
        read_gbs = read_bytes / times["read"] / 1e9
        for name in ("float32", query_dtype, *cache_dtypes):
            gbs = nbytes[name] / times[name] / 1e9
            speedup = times[query_dtype] / times[name]
            rows.append([name, str(shape), times[name] * 1e3, gbs, read_gbs, 100 * gbs / read_gbs,
                         speedup])
            summary[f"{shape} {name}"] = {"ms": times[name] * 1e3, "kv_gbs": gbs,
                                          "read_gbs": read_gbs, "read_fraction": gbs / read_gbs,
                                          f"x_{query_dtype}_cache": speedup}
    headers = ["cache", "shape", "ms", "KV GB/s", "read GB/s (all threads)", "% of read",
               f"x {query_dtype} cache"]
    return markdown_table(headers, rows), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="pin to the first N CPUs (applied at import time)")
    parser.add_argument("--quick", action="store_true", help="smaller caches")
    parser.add_argument("--tokens", type=int, default=1, help="query tokens T (1..16)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--cache-dtypes", nargs="*", default=["int8", "float8_e4m3fn"],
                        help="quantized caches timed against a bfloat16 cache (none: skip)")
    parser.add_argument("--only-quantized", action="store_true",
                        help="only the quantized-cache table")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch = None if args.no_torch else torch_or_none()
    if torch is not None:
        torch.set_num_threads(threads)
    print(describe_machine())
    fig = machine_figures()
    print(f"threads used: {threads}; machine: copy {fig['copy_gbs']:.1f} GB/s (read+write, "
          f"1 thread numpy); torch: {torch.__version__ if torch else 'not installed'}\n")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    shapes = tuple(Shape(s.b, s.s, s.n, s.k, s.h, args.tokens) for s in shapes)
    summary = {}
    if not args.only_quantized:
        table, summary = run_speed(shapes, args.dtypes, torch, fig["copy_gbs"])
        print(table)
    if args.cache_dtypes:
        table, summary["quantized"] = run_quantized(shapes, args.cache_dtypes,
                                                    read_mib=256 if args.quick else 1024)
        print("\nQuantized caches (bfloat16 query), in turns with a bfloat16 cache and an "
              "all-threads read:\n")
        print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": threads, "machine": fig, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
