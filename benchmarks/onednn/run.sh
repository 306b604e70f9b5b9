#!/usr/bin/env bash
# Builds and runs brgemm_vs_ours.cc: our cc/gemm.h micro-kernel against oneDNN's BRGEMM
# ukernel, single thread. Self-contained: copy the repo (or just cc/ and benchmarks/onednn/)
# to another x86-64 machine with AVX-512 (+ avx512_bf16) and run it there.
#
# oneDNN comes from PyTorch: the PyPI onednn wheel is a SYCL build without the ukernel API,
# while libtorch_cpu.so links oneDNN 3.x with it and exports at::native::cpublas::brgemm.
#   PYTHON=/path/to/python-with-torch benchmarks/onednn/run.sh [reps] [seconds-per-block]
#   TORCH_LIB=/path/to/site-packages/torch/lib benchmarks/onednn/run.sh   (no Python needed)
#   GEMM_H=/path/to/cc/gemm.h to measure another gemm.h (default: this checkout's cc/gemm.h)
# ONEDNN_VERBOSE=all shows which ISA the generated kernels use (e.g. brg:avx512_core_amx).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ -z "${TORCH_LIB:-}" ]]; then
  PYTHON="${PYTHON:-python3}"
  TORCH_LIB="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
fi
out="${BUILD_DIR:-/tmp/jaxattn-onednn-bench}"
mkdir -p "$out"
gemm_h="$(realpath "${GEMM_H:-$here/../../cc/gemm.h}")"
defs=(-DJAXATTN_GEMM_H="\"$gemm_h\"")
grep -q 'struct BF16Pairs' "$gemm_h" && defs+=(-DJAXATTN_HAVE_BF16PAIRS)
echo "gemm.h: $gemm_h"
# The instruction-set flags cmake/isa_flags.cmake gives cc/isa_avx512.cc (no -march=native).
g++ -std=c++17 -O3 -Wall -Wno-unused-function \
  -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx2 -mfma -mf16c \
  -mprefer-vector-width=512 "${defs[@]}" \
  "$here/brgemm_vs_ours.cc" -o "$out/brgemm_vs_ours" \
  -L"$TORCH_LIB" -ltorch_cpu -lc10 -Wl,-rpath,"$TORCH_LIB"
lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | sed -E 's/(Flags:).*/\1 '"$(grep -o -w -E 'avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"'/'
# One thread: the ukernel is single-threaded; pin so the OS does not migrate it.
OMP_NUM_THREADS=1 taskset -c "${CPU:-0}" "$out/brgemm_vs_ours" "$@"
