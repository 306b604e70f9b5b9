// Profiling driver: calls the attention kernels through the XLA-free API (cc/attention.h,
// dispatched by cc/dispatch.cc to the instruction set the CPU has; JAXATTN_ISA forces a
// lower one) on a few representative problems, single-threaded (SerialParallel), and prints
// a markdown table of median time, GFLOP/s and bytes/s. No Python, no XLA: the same binary
// runs under `valgrind --tool=callgrind` and `perf record` (tools/profile.sh).
//
// Usage: profile_kernels [--cases a,b,...] [--reduced] [--reps N] [--min-seconds S] [--peak]
//                        [--list]
//   --reduced   smaller shapes (for callgrind, ~50x slower than native)
//   --reps N    timed calls per case (median reported); default 5, 1 with --reduced
//   --min-seconds S   keep calling until S seconds have passed (enough perf samples)
//   --peak      also measure the machine's single-core peaks (AVX-512 only) and print
//               the share of peak each case reaches
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention.h"
#include "parallel.h"

namespace profile {
double MeasureGHz();
double FmaGflops();
double Dpbf16Gflops();
double ReadGBs(int64_t bytes);
}  // namespace profile

namespace {

using jaxattn::DType;

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A host buffer of n elements of dtype, filled with uniform values in [-1, 1).
struct Buffer {
  std::vector<uint8_t> bytes;
  Buffer(DType dtype, int64_t n, std::mt19937* gen) {
    const int64_t size = dtype == DType::kF32 ? 4 : 2;
    bytes.resize(n * size + 64);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float f = dist(*gen);
      if (dtype == DType::kF32) {
        std::memcpy(bytes.data() + 4 * i, &f, 4);
      } else {
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        const uint16_t h = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
      }
    }
  }
  void* data() { return bytes.data(); }
};

enum class Kind { kForward, kBackward, kDecode };

struct Case {
  const char* name;
  Kind kind;
  DType dtype;
  bool causal;
  // Full and reduced shapes: B, T, S, N, K, H.
  int64_t full[6];
  int64_t reduced[6];
  float soft_cap;  // 0: none
  // Decode: the cache's element type (int8 / float8 bytes with float32 scales per row and kv
  // head; the query and output keep `dtype`).
  jaxattn::CacheQuant quant = jaxattn::CacheQuant::kNone;
};

// One case per line: the table reads as a table.
// clang-format off
const Case kCases[] = {
    {"fwd_f32", Kind::kForward, DType::kF32, false, {1, 2048, 2048, 8, 8, 128}, {1, 512, 512, 2, 2, 128}},
    {"fwd_f32_causal", Kind::kForward, DType::kF32, true, {1, 2048, 2048, 8, 8, 128}, {1, 512, 512, 2, 2, 128}},
    {"fwd_bf16", Kind::kForward, DType::kBF16, false, {1, 2048, 2048, 8, 8, 128}, {1, 512, 512, 2, 2, 128}},
    {"fwd_bf16_causal", Kind::kForward, DType::kBF16, true, {1, 2048, 2048, 8, 8, 128}, {1, 512, 512, 2, 2, 128}},
    {"bwd_f32", Kind::kBackward, DType::kF32, false, {1, 2048, 2048, 8, 8, 128}, {1, 256, 256, 2, 2, 128}},
    {"bwd_f32_causal", Kind::kBackward, DType::kF32, true, {1, 2048, 2048, 8, 8, 128}, {1, 256, 256, 2, 2, 128}},
    {"bwd_bf16", Kind::kBackward, DType::kBF16, false, {1, 2048, 2048, 8, 8, 128}, {1, 256, 256, 2, 2, 128}},
    // bench_flash.py's short shape (softmax- and packing-bound), and Gemma 2's soft cap.
    {"fwd_f32_short", Kind::kForward, DType::kF32, false, {4, 512, 512, 12, 12, 64}, {1, 256, 256, 2, 2, 64}},
    {"fwd_bf16_short", Kind::kForward, DType::kBF16, false, {4, 512, 512, 12, 12, 64}, {1, 256, 256, 2, 2, 64}},
    {"bwd_f32_short", Kind::kBackward, DType::kF32, false, {4, 512, 512, 12, 12, 64}, {1, 256, 256, 2, 2, 64}},
    // Few (batch, kv head) pairs at a short length: GQA groups of 4.
    {"bwd_f32_gqa_short", Kind::kBackward, DType::kF32, false, {2, 512, 512, 8, 2, 128}, {1, 256, 256, 4, 1, 128}},
    {"bwd_bf16_short", Kind::kBackward, DType::kBF16, false, {4, 512, 512, 12, 12, 64}, {1, 256, 256, 2, 2, 64}},
    {"fwd_f32_causal_cap", Kind::kForward, DType::kF32, true, {1, 2048, 2048, 8, 8, 128}, {1, 512, 512, 2, 2, 128}, 50.0f},
    {"fwd_bf16_causal_cap", Kind::kForward, DType::kBF16, true, {1, 2048, 2048, 8, 8, 128}, {1, 512, 512, 2, 2, 128}, 50.0f},
    {"bwd_f32_causal_cap", Kind::kBackward, DType::kF32, true, {1, 2048, 2048, 8, 8, 128}, {1, 256, 256, 2, 2, 128}, 50.0f},
    {"decode_f32", Kind::kDecode, DType::kF32, false, {1, 1, 32768, 32, 8, 128}, {1, 1, 4096, 32, 8, 128}},
    {"decode_bf16", Kind::kDecode, DType::kBF16, false, {1, 1, 32768, 32, 8, 128}, {1, 1, 4096, 32, 8, 128}},
    {"decode_int8", Kind::kDecode, DType::kBF16, false, {1, 1, 32768, 32, 8, 128}, {1, 1, 4096, 32, 8, 128}, 0.0f, jaxattn::CacheQuant::kInt8},
    {"decode_f8e4m3", Kind::kDecode, DType::kBF16, false, {1, 1, 32768, 32, 8, 128}, {1, 1, 4096, 32, 8, 128}, 0.0f, jaxattn::CacheQuant::kF8E4M3},
    // Cache-resident (1 MiB of K and V bytes for int8, 2 MiB bf16): the compute cost of a
    // key, without DRAM.
    {"decode_bf16_l2", Kind::kDecode, DType::kBF16, false, {1, 1, 4096, 32, 8, 128}, {1, 1, 4096, 32, 8, 128}, 0.0f},
    {"decode_int8_l2", Kind::kDecode, DType::kBF16, false, {1, 1, 4096, 32, 8, 128}, {1, 1, 4096, 32, 8, 128}, 0.0f, jaxattn::CacheQuant::kInt8},
    {"decode_f8e4m3_l2", Kind::kDecode, DType::kBF16, false, {1, 1, 4096, 32, 8, 128}, {1, 1, 4096, 32, 8, 128}, 0.0f, jaxattn::CacheQuant::kF8E4M3},
};
// clang-format on

struct Result {
  double seconds;  // median
  double flops;    // useful flops (see Flops)
  double bytes;    // K and V bytes read (decode), 0 otherwise
  std::string shape;
};

// Query-key pairs that pass the causal mask (top-left aligned, as the kernels).
double VisiblePairs(int64_t t, int64_t s, bool causal) {
  if (!causal) return double(t) * s;
  double pairs = 0;
  for (int64_t i = 0; i < t; ++i) pairs += std::min<int64_t>(i + 1, s);
  return pairs;
}

Result RunCase(const Case& c, bool reduced, int reps, double min_seconds) {
  const int64_t* d = reduced ? c.reduced : c.full;
  const int64_t B = d[0], T = d[1], S = d[2], N = d[3], K = d[4], H = d[5];
  std::mt19937 gen(1);
  const jaxattn::SerialParallel serial;
  Result r{};
  char shape[128];
  std::snprintf(shape, sizeof(shape), "B=%ld T=%ld S=%ld N=%ld K=%ld H=%ld%s%s", long(B), long(T),
                long(S), long(N), long(K), long(H), c.causal ? " causal" : "",
                c.soft_cap > 0 ? " cap 50" : "");
  r.shape = shape;
  std::vector<double> times;
  auto time_it = [&](auto&& call) {
    call();  // warm-up: scratch allocation, page faults, caches
    const double start = Now();
    for (int i = 0; i < reps || Now() - start < min_seconds; ++i) {
      const double t0 = Now();
      call();
      times.push_back(Now() - t0);
    }
  };

  // The same operands for every kind: decode reads the K/V as a full contiguous cache.
  Buffer q(c.dtype, B * T * N * H, &gen), k(c.dtype, B * S * K * H, &gen),
      v(c.dtype, B * S * K * H, &gen), out(c.dtype, B * T * N * H, &gen);
  std::vector<float> lse(B * T * N);
  if (c.kind == Kind::kDecode) {
    std::vector<int32_t> lengths(B, int32_t(S));
    jaxattn::DecodeAttentionProblem p;
    p.dtype = c.dtype;
    p.batch = B;
    p.q_len = T;
    p.num_heads = N;
    p.num_kv_heads = K;
    p.head_dim = p.value_dim = H;
    p.q_batch = B;
    p.query = q.data();
    p.key = k.data();
    p.value = v.data();
    p.num_pages = B;
    p.page_size = S;
    p.kv_lengths = lengths.data();
    p.kv_lengths_batch = B;
    p.scale = 1.0f / std::sqrt(float(H));
    // A quantized cache: random bytes (int8 in [-127, 127]; float8 any finite pattern) in
    // place of the bf16 ones, and positive scales per (row, kv head).
    std::vector<int8_t> kq, vq;
    std::vector<float> key_scale, value_scale;
    if (c.quant != jaxattn::CacheQuant::kNone) {
      std::uniform_int_distribution<int> byte(-127, 127);
      std::uniform_real_distribution<float> scale(0.005f, 0.02f);
      kq.resize(B * S * K * H);
      vq.resize(B * S * K * H);
      for (auto* x : {&kq, &vq}) {
        for (int8_t& e : *x) {
          e = static_cast<int8_t>(byte(gen));
          if (c.quant == jaxattn::CacheQuant::kF8E4M3 && (e & 0x7f) == 0x7f) e = 0;  // no NaN
        }
      }
      key_scale.resize(B * S * K);
      value_scale.resize(B * S * K);
      for (float& f : key_scale) f = scale(gen);
      for (float& f : value_scale) f = scale(gen);
      p.cache_quant = c.quant;
      p.key = kq.data();
      p.value = vq.data();
      p.key_scale = key_scale.data();
      p.value_scale = value_scale.data();
    }
    if (const char* e = jaxattn::ValidateDecodeProblem(p)) {
      std::fprintf(stderr, "%s: %s\n", c.name, e);
      std::exit(1);
    }
    jaxattn::DecodeResult res{out.data(), lse.data()};
    time_it([&] { jaxattn::DecodeForward(p, res, serial); });
    r.flops = 4.0 * B * T * N * S * H;
    const double element_bytes = c.quant != jaxattn::CacheQuant::kNone ? 1
                                 : c.dtype == DType::kF32              ? 4
                                                                       : 2;
    r.bytes =
        2.0 * B * S * K * (H * element_bytes + (c.quant != jaxattn::CacheQuant::kNone ? 4 : 0));
  } else {
    jaxattn::AttentionProblem p;
    p.dtype = c.dtype;
    p.batch = B;
    p.q_len = T;
    p.kv_len = S;
    p.num_heads = N;
    p.num_kv_heads = K;
    p.head_dim = p.value_dim = H;
    p.q_batch = p.kv_batch = p.value_batch = B;
    p.query = q.data();
    p.key = k.data();
    p.value = v.data();
    p.scale = 1.0f / std::sqrt(float(H));
    p.causal = c.causal;
    p.soft_cap = c.soft_cap;
    if (const char* e = jaxattn::ValidateProblem(p)) {
      std::fprintf(stderr, "%s: %s\n", c.name, e);
      std::exit(1);
    }
    jaxattn::FlashForwardResult res{out.data(), lse.data()};
    // Two GEMMs of 2 H flops per visible (query, key) pair and head.
    const double fwd_flops = 4.0 * B * N * VisiblePairs(T, S, c.causal) * H;
    if (c.kind == Kind::kForward) {
      time_it([&] { jaxattn::FlashForward(p, res, serial); });
      r.flops = fwd_flops;
    } else {
      jaxattn::FlashForward(p, res, serial);
      Buffer dout(c.dtype, B * T * N * H, &gen), dq(c.dtype, B * T * N * H, &gen),
          dk(c.dtype, B * S * K * H, &gen), dv(c.dtype, B * S * K * H, &gen);
      jaxattn::FlashBackwardArgs a;
      a.out = out.data();
      a.lse = lse.data();
      a.dout = dout.data();
      a.dq = dq.data();
      a.dk = dk.data();
      a.dv = dv.data();
      time_it([&] { jaxattn::FlashBackward(p, a, serial); });
      // The usual convention: 5 GEMMs (dV, dP, dQ, dK + the recomputed S) = 2.5 x forward.
      r.flops = 2.5 * fwd_flops;
    }
  }
  std::sort(times.begin(), times.end());
  r.seconds = times[times.size() / 2];
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::string only;
  bool reduced = false, peak = false;
  int reps = -1;
  double min_seconds = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--cases" && i + 1 < argc)
      only = "," + std::string(argv[++i]) + ",";
    else if (arg == "--reduced")
      reduced = true;
    else if (arg == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else if (arg == "--min-seconds" && i + 1 < argc)
      min_seconds = std::atof(argv[++i]);
    else if (arg == "--peak")
      peak = true;
    else if (arg == "--list") {
      for (const Case& c : kCases) std::printf("%s\n", c.name);
      return 0;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--cases a,b] [--reduced] [--reps N] [--min-seconds S] [--peak] "
                   "[--list]\n",
                   argv[0]);
      return 2;
    }
  }
  if (reps < 0) reps = reduced ? 1 : 5;

  double fma = 0, dp = 0, ghz = 0, gbs = 0;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  if (peak && avx512) {
    ghz = profile::MeasureGHz();
    fma = profile::FmaGflops();
    dp = profile::Dpbf16Gflops();
    gbs = profile::ReadGBs(int64_t(1) << 30);
    std::printf("| machine (1 core) | value |\n|---|---|\n");
    std::printf("| clock (dependent add chain) | %.2f GHz |\n", ghz);
    std::printf("| f32 FMA zmm peak | %.1f GFLOP/s (%.1f flop/cycle) |\n", fma, fma / ghz);
    std::printf("| vdpbf16ps zmm peak | %.1f GFLOP/s (%.1f flop/cycle) |\n", dp, dp / ghz);
    std::printf("| DRAM read, 1 GiB sum | %.1f GB/s |\n\n", gbs);
  } else if (peak) {
    std::printf("(no AVX-512 BF16 visible, e.g. under valgrind: peaks skipped)\n\n");
  }

  std::printf("| case | shape | isa | median ms | GFLOP/s | GB/s (K+V) |%s\n",
              fma > 0 ? " % f32 FMA peak | % DRAM read |" : "");
  std::printf("|---|---|---|---:|---:|---:|%s\n", fma > 0 ? "---:|---:|" : "");
  for (const Case& c : kCases) {
    if (!only.empty() && only.find("," + std::string(c.name) + ",") == std::string::npos) {
      continue;
    }
    const Result r = RunCase(c, reduced, reps, min_seconds);
    const double gflops = r.flops / r.seconds / 1e9;
    const double gb = r.bytes / r.seconds / 1e9;
    char gb_cell[32] = "", gb_share[32] = "";
    if (r.bytes > 0) {
      std::snprintf(gb_cell, sizeof(gb_cell), "%.1f", gb);
      if (gbs > 0) std::snprintf(gb_share, sizeof(gb_share), "%.0f%%", 100 * gb / gbs);
    }
    std::printf("| %s | %s | %s | %.2f | %.1f | %s |", c.name, r.shape.c_str(),
                jaxattn::KernelIsa(), r.seconds * 1e3, gflops, gb_cell);
    if (fma > 0) std::printf(" %.0f%% | %s |", 100 * gflops / fma, gb_share);
    std::printf("\n");
    std::fflush(stdout);
  }
  return 0;
}
