"""Block-sparse mask construction: time and peak memory of the builders and of the kernel
table compilation (issue 13, items 8 and 9).

Each case runs in a fresh interpreter (so that caches and earlier allocations do not count) and
reports the wall time of building the mask, the wall time of compiling its kernel tables
(``jaxattn.sparse.prepare_tables``, what ``block_sparse_attention`` runs before its kernels,
here for N = K heads: a GQA group of 1), the CPU time of the process over both (on a loaded
machine a steadier figure than wall time), the peak of memory allocated by Python and NumPy
over both (tracemalloc), the process's peak resident memory (VmHWM, minus that after
importing jaxattn), and the mask's block count.

    PYTHONPATH=. python benchmarks/bench_masks.py [--seq 65536] [--block 64] [--cases causal,...]
    PYTHONPATH=. python benchmarks/bench_masks.py --seq 1048576 --block 128
    PYTHONPATH=. python benchmarks/bench_masks.py --dense 8192   # from_dense with 1x1 blocks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = {
    "causal": "masks.causal(T, block_q=R, block_kv=R)",
    "local(256)": "masks.local(T, window=256, block_q=R, block_kv=R)",
    "causal_local(256)": "masks.local(T, window=(255, 0), block_q=R, block_kv=R)",
    "global_local": ("masks.global_local(T, window=256, global_tokens=64, is_causal=True, "
                     "block_q=R, block_kv=R)"),
    "strided(256)": "masks.strided(T, stride=256, block_q=R, block_kv=R)",
    "strided(4096)": "masks.strided(T, stride=4096, block_q=R, block_kv=R)",
    "random(3)": "masks.random(T, num_blocks=3, seed=0, block_q=R, block_kv=R)",
    "local|random": ("masks.local(T, window=256, block_q=R, block_kv=R) | "
                     "masks.random(T, num_blocks=3, seed=0, block_q=R, block_kv=R)"),
}

_WORKER = r"""
import json, sys, time, tracemalloc
import numpy as np
from jaxattn import masks
from jaxattn.sparse import prepare_tables


def vm_hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


T, R, expr, dense = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
if dense:  # a random 30% mask, drawn a few rows at a time (no [T, T] float64 temporary)
    rng = np.random.default_rng(0)
    dense_mask = np.empty((T, T), bool)
    for i in range(0, T, 256):
        dense_mask[i:i + 256] = rng.random((min(256, T - i), T)) < 0.3
before = vm_hwm()
tracemalloc.start()
cpu = time.process_time()
start = time.perf_counter()
m = masks.BlockSparseMask.from_dense(dense_mask, block_q=R, block_kv=R) if dense else eval(expr)
built = time.perf_counter()
tables = prepare_tables(m, num_heads=1, num_kv_heads=1)
compiled = time.perf_counter()
cpu = time.process_time() - cpu
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps(dict(build_s=built - start, tables_s=compiled - built, cpu_s=cpu,
                      peak_mib=peak / 2**20,
                      hwm_mib=(vm_hwm() - before) / 2**20, blocks=m.num_blocks,
                      partial=m.num_partial_blocks, tiles=int(tables[1].shape[0]),
                      dense_mib=dense_mask.nbytes / 2**20 if dense else 0)))
"""


def run(seq: int, block: int, expr: str, dense: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-c", _WORKER, str(seq), str(block), expr, "1" if dense else "0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dense", type=int, default=0,
                        help="instead: from_dense of a random [T, T] mask with 1x1 blocks")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.dense:
        rows = [("from_dense 1x1", run(args.dense, 1, "", True, args.timeout))]
        seq = args.dense
    else:
        rows = [(name, run(args.seq, args.block, CASES[name], False, args.timeout))
                for name in args.cases.split(",")]
        seq = args.seq
    block = 1 if args.dense else args.block
    print(f"| builder (T = S = {seq}, {block}x{block} blocks) | build s | tables s | total s | "
          f"CPU s | peak MiB (tracemalloc) | +VmHWM MiB | blocks | partial | kernel tiles |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | | | | |")
            continue
        print(f"| {name} | {r['build_s']:.3f} | {r['tables_s']:.3f} | "
              f"{r['build_s'] + r['tables_s']:.3f} | {r['cpu_s']:.3f} | {r['peak_mib']:.1f} | "
              f"{r['hwm_mib']:.0f} | {r['blocks']} | {r['partial']} | {r['tiles']} |")
        if r.get("dense_mib"):
            print(f"\n(the dense bool mask: {r['dense_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
