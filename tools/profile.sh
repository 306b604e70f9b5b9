#!/usr/bin/env bash
# Where the kernels spend their time, in one command (a developer tool, not run in CI).
# Builds tools/profile (the kernels at -O3 with the real per-ISA flags, plus -g; no Python,
# no XLA) and prints markdown:
#   1. the machine's single-core peaks (clock, f32 FMA, vdpbf16ps, DRAM read) and, per case,
#      median time, GFLOP/s, GB/s and share of peak, single-threaded, full shapes;
#   2. perf record -e cpu-clock (software event: no hardware counters needed) per case, on the
#      kernels the CPU dispatches to (avx512 here): time share per statement of the kernel
#      task (the phases: QK^T Gemm, softmax, PV Gemm, packing, ...) and per innermost
#      function (inlined helpers resolved from the debug info);
#   3. valgrind --tool=callgrind per case on reduced shapes: instruction counts, same two
#      views. NOTE: valgrind 3.19 hides AVX-512 from the program, so the kernels dispatch to
#      their avx2 build under callgrind.
#
#   tools/profile.sh                          # everything (~3-5 min on 2 shared cores)
#   tools/profile.sh --cases fwd_f32,fwd_bf16 # some cases (profile_kernels --list)
#   tools/profile.sh --no-callgrind           # timing + perf only (~1 min)
#   tools/profile.sh --no-perf --no-timing    # callgrind only
#   tools/profile.sh --isa avx2               # force an instruction set (JAXATTN_ISA)
#
# Output: stdout, also kept in build/profile/report.md; raw profiles in build/profile/out/
# (perf.<case>.data, callgrind.<case>.out, callgrind.<case>.annotate.txt).
# Needs cmake, g++, python3 (standard library only); perf and valgrind for parts 2 and 3.
set -euo pipefail
cd "$(dirname "$0")/.."

cases=""
do_timing=1
do_perf=1
do_callgrind=1
perf_seconds=2
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cases) cases="$2"; shift 2 ;;
    --no-timing) do_timing=0; shift ;;
    --no-perf) do_perf=0; shift ;;
    --no-callgrind) do_callgrind=0; shift ;;
    --perf-seconds) perf_seconds="$2"; shift 2 ;;
    --isa) export JAXATTN_ISA="$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

generator=()
if command -v ninja > /dev/null; then generator=(-G Ninja); fi
build=build/profile
cmake -S tools/profile -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=None > /dev/null
cmake --build "$build" --parallel "$(nproc 2> /dev/null || echo 2)" > /dev/null
bin="$build/profile_kernels"
out="$build/out"
mkdir -p "$out"
if [[ -z "$cases" ]]; then cases="$("$bin" --list | paste -sd, -)"; fi
IFS=, read -r -a case_list <<< "$cases"

{
echo "# jaxattn kernel profile ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2> /dev/null || echo '?'))"
echo
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores visible; single-threaded runs."
echo

if [[ $do_timing == 1 ]]; then
  echo "## Timing (full shapes, median)"
  echo
  "$bin" --peak --cases "$cases"
  echo
fi

if [[ $do_perf == 1 ]]; then
  echo "## perf record -e cpu-clock (full shapes, time shares)"
  echo
  for c in "${case_list[@]}"; do
    echo "### $c"
    echo
    if perf record -q -g -e cpu-clock -o "$out/perf.$c.data" \
         "$bin" --cases "$c" --reps 3 --min-seconds "$perf_seconds" > /dev/null 2>&1; then
      require=()
      # The backward cases run the forward once first (for out and lse): leave it out.
      if [[ $c == bwd* ]]; then require=(--require 'RunBackward|BackwardImpl'); fi
      python3 tools/profile/attribute.py perf "$bin" "$out/perf.$c.data" "${require[@]}"
    else
      echo "(perf record failed: not installed, or perf_event_paranoid forbids it)"
      echo
    fi
  done
fi

if [[ $do_callgrind == 1 ]]; then
  echo "## valgrind --tool=callgrind (reduced shapes, instruction shares)"
  echo
  echo "valgrind hides AVX-512 from the program: the kernels run their avx2 build here."
  echo
  for c in "${case_list[@]}"; do
    echo "### $c (reduced)"
    echo
    # Collect only inside the public kernel calls (not the driver's data setup, nor the
    # forward run that gives a backward case its out and lse).
    case $c in
      bwd*) toggles=(--toggle-collect='jaxattn::FlashBackward*') ;;
      *) toggles=(--toggle-collect='jaxattn::FlashForward*'
                  --toggle-collect='jaxattn::DecodeForward*') ;;
    esac
    valgrind --tool=callgrind --dump-instr=yes --dump-line=no "${toggles[@]}" \
      --callgrind-out-file="$out/callgrind.$c.out" \
      "$bin" --cases "$c" --reduced --reps 1 > "$out/callgrind.$c.table.txt" 2> "$out/callgrind.$c.log"
    grep '^|' "$out/callgrind.$c.table.txt" | tail -1 | awk -F'|' '{print "isa under callgrind:" $4 "\n"}'
    callgrind_annotate --inclusive=no "$out/callgrind.$c.out" > "$out/callgrind.$c.annotate.txt" 2>&1 || true
    python3 tools/profile/attribute.py callgrind "$bin" "$out/callgrind.$c.out"
  done
fi
} | tee "$build/report.md"
