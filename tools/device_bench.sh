#!/usr/bin/env bash
# The 16-core measurement run (the `device` machine of this workplace, or any Linux box with
# jax, torch, nanobind, scikit-build-core, cmake and ninja installed and no registry access):
# builds jaxattn without build isolation and runs the benchmarks on the CPU, writing logs into
# $OUT (default ./bench_out/device). Usage:
#   tools/device_bench.sh [flash] [cap] [threads] [decode] [quant] [linear] [sparse]
#                         [gla_decode] [gla_crossover] [gla_crossover2] [fla]
#   (default: flash cap). fla needs flash-linear-attention's reference files in a directory
#   named by $JAXATTN_FLA_PATH (see benchmarks/bench_fla.py; einops beside them on PYTHONPATH
#   for the chunked reference).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out/device}"
mkdir -p "$OUT"
ROOT="$PWD"
export JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(flash cap)
{
  echo "== $(date -u) $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo)"
  grep -o -w -E 'amx_bf16|amx_fp16|avx512_bf16|avx512_fp16' /proc/cpuinfo | sort -u | tr '\n' ' '
  echo
  "$PY" -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
  # -c from elsewhere: in the repo root the source folder would shadow the installed package
  (cd /tmp && "$PY" -c "import jax, jaxattn; print('jax', jax.__version__, 'kernels', jaxattn.kernel_isa())")
} 2>&1 | tee "$OUT/setup.log"
for part in "${parts[@]}"; do
  case "$part" in
    flash) "$PY" benchmarks/bench_flash.py 2>&1 | tee "$OUT/flash.log" ;;
    cap) (cd /tmp && "$PY" -c "import sys; sys.path.insert(0, '$ROOT/benchmarks'); import bench_flash as b; print(b.run_soft_cap(['float32', 'bfloat16']))") 2>&1 | tee "$OUT/cap.log" ;;
    threads) "$PY" benchmarks/bench_threads.py --threads 1 16 2>&1 | tee "$OUT/threads.log" ;;
    decode) "$PY" benchmarks/bench_decode.py 2>&1 | tee "$OUT/decode.log" ;;
    quant) "$PY" benchmarks/bench_decode.py --threads "$(nproc)" --only-quantized --no-torch \
             --cache-dtypes int8 float8_e4m3fn 2>&1 | tee "$OUT/quant.log" ;;
    linear) "$PY" benchmarks/bench_linear.py 2>&1 | tee "$OUT/linear.log" ;;
    gla_decode) "$PY" benchmarks/bench_linear.py --only-decode --json "$OUT/gla_decode.json" \
                  2>&1 | tee "$OUT/gla_decode.log" ;;
    gla_crossover) "$PY" benchmarks/bench_gla_crossover.py --head-dims 32 64 128 256 512 \
                     --lengths 256 512 1024 2048 4096 8192 --out "$OUT/gla_crossover_$(nproc)core" \
                     2>&1 | tee "$OUT/gla_crossover.log" ;;
    gla_crossover2) "$PY" benchmarks/bench_gla_crossover.py --threads 2 --head-dims 32 128 256 \
                      --lengths 256 1024 4096 --min-seconds 0.5 --out "$OUT/gla_crossover_2core" \
                      2>&1 | tee "$OUT/gla_crossover2.log" ;;
    fla) "$PY" benchmarks/bench_fla.py --json "$OUT/fla.json" 2>&1 | tee "$OUT/fla.log" ;;
    sparse) "$PY" benchmarks/bench_sparse.py --reps 2 --densities 0.03,0.1,1.0 2>&1 | tee "$OUT/sparse.log" ;;
    *) echo "unknown part: $part" >&2 ;;
  esac
done
