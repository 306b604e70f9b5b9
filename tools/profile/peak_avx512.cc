// Machine-peak loops for the roofline in docs/profile.md, compiled with the AVX-512 flags of
// cc/isa_avx512.cc and called only when the CPU has AVX-512 (+BF16). Single thread.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace profile {

namespace {
double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

// Core clock in GHz: a chain of dependent integer adds runs at one per cycle.
double MeasureGHz() {
  const int64_t iters = 20000000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    uint64_t x = 0;
    const double t0 = Now();
    for (int64_t i = 0; i < iters; ++i) {
      // 50 dependent adds per iteration; the loop counter runs on another chain.
      asm volatile(
          ".rept 50\n\t"
          "add $1, %0\n\t"
          ".endr"
          : "+r"(x));
    }
    const double ghz = 50.0 * iters / (Now() - t0) / 1e9;
    if (ghz > best) best = ghz;
  }
  return best;
}

// Throughput of one zmm multiply-add instruction in GFLOP/s: kAcc independent accumulators
// (enough to cover its latency times its pipes), best of 3 runs.
template <int kAcc, class Operand, class Step>
double PeakGflops(double flops_per_instruction, Operand a, Operand b, Step step) {
  const int64_t iters = 20000000;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    __m512 acc[kAcc];
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(float(i));
    asm volatile("" : "+v"(a), "+v"(b));
    const double t0 = Now();
    for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 24
      for (int i = 0; i < kAcc; ++i) acc[i] = step(acc[i], a, b);
    }
    const double s = Now() - t0;
    __m512 sum = acc[0];
    for (int i = 1; i < kAcc; ++i) sum = _mm512_add_ps(sum, acc[i]);
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, sum);
    volatile float sink = lanes[0];
    (void)sink;
    const double g = kAcc * flops_per_instruction * iters / s / 1e9;
    if (g > best) best = g;
  }
  return best;
}

// f32 FMA: 16 lanes x (mul + add); 12 accumulators.
double FmaGflops() {
  return PeakGflops<12>(32.0, _mm512_set1_ps(0.999f), _mm512_set1_ps(1e-3f),
                        [](__m512 c, __m512 a, __m512 b) { return _mm512_fmadd_ps(c, a, b); });
}

// vdpbf16ps: 16 lanes x 2 products x (mul + add); 24 accumulators, in case its latency x
// pipes exceeds that of the FMA.
double Dpbf16Gflops() {
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
  return PeakGflops<24>(64.0, a, a,
                        [](__m512 c, __m512bh x, __m512bh y) { return _mm512_dpbf16_ps(c, x, y); });
}

// Single-thread read bandwidth from DRAM in GB/s: summing a buffer far larger than L3.
double ReadGBs(int64_t bytes) {
  const int64_t n = bytes / 4;
  float* buf = static_cast<float*>(std::aligned_alloc(64, n * 4));
  for (int64_t i = 0; i < n; ++i) buf[i] = 1e-6f * float(i & 1023);
  double best = 0;
  for (int rep = 0; rep < 4; ++rep) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const double t0 = Now();
    for (int64_t i = 0; i < n; i += 64) {
      a0 = _mm512_add_ps(a0, _mm512_load_ps(buf + i));
      a1 = _mm512_add_ps(a1, _mm512_load_ps(buf + i + 16));
      a2 = _mm512_add_ps(a2, _mm512_load_ps(buf + i + 32));
      a3 = _mm512_add_ps(a3, _mm512_load_ps(buf + i + 48));
    }
    const double s = Now() - t0;
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, a0 + a1 + a2 + a3);
    volatile float sink = lanes[0];
    (void)sink;
    const double g = double(n) * 4 / s / 1e9;
    if (g > best) best = g;
  }
  std::free(buf);
  return best;
}

}  // namespace profile
