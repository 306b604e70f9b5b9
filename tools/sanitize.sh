#!/usr/bin/env bash
# The kernels under AddressSanitizer + UndefinedBehaviorSanitizer (and ThreadSanitizer):
# builds tests/cc/kernel_harness (no Python needed) and runs every suite (one per kernel
# family, tests/cc/*_suite.cc) over its shape grid once per kernel set the CPU has
# (JAXATTN_ISA=generic, avx2, avx512, avx512bf16, amx and the default: amx on Intel CPUs with
# AMX-BF16, avx512bf16 on AMD CPUs with AVX512-BF16). Any sanitizer report,
# wrong result, NaN leak, serial/threaded mismatch or deadlock fails.
#
#   tools/sanitize.sh                 # ~1-2 min on 2 cores
#   tools/sanitize.sh --cases 2000    # a larger random grid (default 400 per ISA)
#   tools/sanitize.sh --seed 7        # another grid
#   tools/sanitize.sh --no-tsan       # skip the ThreadSanitizer build
#   tools/sanitize.sh --isa avx2      # one kernel set only (generic|avx2|avx512|avx512bf16|amx|default)
#   tools/sanitize.sh --suite flash   # one kernel family (tests/cc/<name>_suite.cc)
#
# Build directories: build/sanitize (ASan+UBSan) and build/tsan. Needs cmake and g++ or clang++.
set -euo pipefail
cd "$(dirname "$0")/.."

cases=400
seed=1
tsan=1
isas=(generic avx2 avx512 avx512bf16 amx default)
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cases) cases="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --no-tsan) tsan=0; shift ;;
    --isa) isas=("$2"); shift 2 ;;
    --suite) extra=(--suite "$2"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

generator=()
if command -v ninja > /dev/null; then generator=(-G Ninja); fi
jobs="$(nproc 2> /dev/null || echo 2)"

build() {  # build DIR SANITIZERS
  cmake -S tests/cc -B "$1" "${generator[@]}" -DJAXATTN_HARNESS_SANITIZERS="$2" > /dev/null
  cmake --build "$1" --parallel "$jobs" > /dev/null
}

run() {  # run BINARY ISA [extra args...]
  local binary="$1" isa="$2"
  shift 2
  if [[ "$isa" == default ]]; then
    env -u JAXATTN_ISA "$binary" --cases "$cases" --seed "$seed" "${extra[@]}" "$@"
  else
    JAXATTN_ISA="$isa" "$binary" --cases "$cases" --seed "$seed" "${extra[@]}" "$@"
  fi
}

# Whether this CPU has the instructions of kernel set $1 (a forced set it lacks would run the
# default set instead; the harness prints which set ran).
cpu_has() {
  local flags
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2> /dev/null) "
  case "$1" in
    avx2) [[ $flags == *" avx2 "* ]] ;;
    avx512|avx512bf16) [[ $flags == *" avx512f "* && $flags == *" avx512_bf16 "* ]] ;;
    amx) [[ $flags == *" avx512_bf16 "* && $flags == *" amx_tile "* && $flags == *" amx_bf16 "* ]] ;;
    *) true ;;
  esac
}

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}"

start=$SECONDS
echo "== building the harness with -fsanitize=address,undefined (build/sanitize)"
build build/sanitize "address,undefined"
for isa in "${isas[@]}"; do
  if ! cpu_has "$isa"; then
    echo "== ASan+UBSan, JAXATTN_ISA=$isa: skipped, this CPU lacks its instructions"
    continue
  fi
  echo "== ASan+UBSan, JAXATTN_ISA=$isa"
  run build/sanitize/kernel_harness "$isa"
done
if [[ $tsan == 1 ]]; then
  echo "== building the harness with -fsanitize=thread (build/tsan)"
  build build/tsan "thread"
  # Data races do not depend on the instruction set: one run, with more threads than cores.
  echo "== TSan, default ISA"
  cases=$(( cases / 4 > 20 ? cases / 4 : 20 )) run build/tsan/kernel_harness default --threads 4
fi
echo "== sanitizers: all clean ($((SECONDS - start)) s)"
