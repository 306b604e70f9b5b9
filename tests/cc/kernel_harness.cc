// The kernel harness: drives the C++ kernels directly through cc/attention.h over grids of
// problems, with every operand in its own exactly-sized heap block, so that an
// AddressSanitizer build reports any read or write outside an operand (and UBSan any
// undefined arithmetic, TSan any data race). Built by tests/cc/CMakeLists.txt; run by
// tools/sanitize.sh once per instruction set (JAXATTN_ISA) and by tests/test_sanitizers.py.
//
// Each suite (one per kernel family, tests/cc/*_suite.cc) also checks results, so that a
// clean sanitizer run means more than "did not crash": against a float64 reference, with NaN
// in memory the semantics never read, serial vs thread-pool runs bitwise equal, and no
// deadlock when the caller is a busy pool worker.
//
// Usage: kernel_harness [--cases N] [--seed S] [--threads T] [--suite NAME] [--verbose]
// Exit status 0 when every case passes; failures are printed one per line ("FAIL ...").
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "harness.h"

namespace jaxattn_harness {

namespace {

struct RegisteredSuite {
  const char* name;
  SuiteFn fn;
};

std::vector<RegisteredSuite>& Suites() {
  static std::vector<RegisteredSuite> suites;
  return suites;
}

}  // namespace

bool RegisterSuite(const char* name, SuiteFn fn) {
  Suites().push_back({name, fn});
  return true;
}

void Compare(const std::string& what, const Tensor& actual, const std::vector<double>& ref,
             double tol, Failures* f) {
  double scale = 0;
  for (double r : ref) {
    if (std::isfinite(r)) scale = std::max(scale, std::fabs(r));
  }
  const double allowed = tol * (1 + scale);
  for (int64_t i = 0; i < actual.count(); ++i) {
    const double a = actual.Get(i), r = ref[i];
    bool ok;
    if (!std::isfinite(r)) {
      ok = a == r;
    } else {
      ok = std::isfinite(a) && std::fabs(a - r) <= allowed;
    }
    if (!ok) {
      char buf[256];
      std::snprintf(buf, sizeof(buf), "%s[%ld]: got %.8g, want %.8g (allowed error %.3g)",
                    what.c_str(), long(i), a, r, allowed);
      f->Add(buf);
      return;
    }
  }
}

void CompareBitwise(const std::string& what, const Tensor& a, const Tensor& b, Failures* f) {
  const size_t bytes = a.size_bytes();
  if (bytes != b.size_bytes() || (bytes && std::memcmp(a.bytes.get(), b.bytes.get(), bytes) != 0)) {
    f->Add(what + ": serial and thread-pool results differ bitwise");
  }
}

bool ReferenceDropoutKept(const uint32_t* seed, int64_t t, int64_t s, uint32_t threshold) {
  auto mix = [](uint32_t x) {  // lowbias32
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
  };
  const uint32_t tt = static_cast<uint32_t>(t);
  const uint32_t row0 = mix(seed[0] ^ mix(tt)), row1 = mix(seed[1] ^ mix(tt + 0x9E3779B9u));
  return mix(mix(row0 ^ static_cast<uint32_t>(s)) ^ row1) >= threshold;
}

CompiledTables CompileBlockSparseTables(int64_t T, int64_t S, int64_t N, int64_t K, bool per_head,
                                        const std::vector<uint8_t>& mask) {
  const int64_t G = N / K;
  const jaxattn::BlockSparseTiling tiling = jaxattn::BlockSparseTilingFor(G);
  const int64_t P = tiling.positions, rows = tiling.rows, kt = tiling.keys;
  const int64_t rp = tiling.rows_padded;
  const int64_t groups = per_head ? K : 1;
  const int64_t nqt = (T + P - 1) / P, nkt = (S + kt - 1) / kt;
  auto visible = [&](int64_t group, int64_t g, int64_t t, int64_t s) {
    const int64_t head = per_head ? group * G + g : 0;
    return mask[(head * T + t) * S + s] != 0;
  };
  std::vector<int32_t> q_indptr{0}, q_entries, k_indptr{0}, k_entries;
  std::vector<uint8_t> masks;
  // tile_id[(group * nqt + a) * nkt + b]: -2 empty, -1 full, else a mask index.
  std::vector<int32_t> tile_id(groups * nqt * nkt, -2);
  int32_t num_masks = 0;
  for (int64_t group = 0; group < groups; ++group) {
    for (int64_t a = 0; a < nqt; ++a) {
      for (int64_t b = 0; b < nkt; ++b) {
        std::vector<uint8_t> tile(rows * kt, 0);
        int64_t count = 0, area = 0;
        for (int64_t t = a * P; t < std::min(T, (a + 1) * P); ++t) {
          for (int64_t g = 0; g < G; ++g) {
            for (int64_t s = b * kt; s < std::min(S, (b + 1) * kt); ++s) {
              const bool v = visible(group, g, t, s);
              tile[((t - a * P) * G + g) * kt + (s - b * kt)] = v;
              count += v;
              ++area;
            }
          }
        }
        if (count == 0) continue;
        int32_t id = -1;
        if (count < area) {
          id = num_masks++;
          masks.insert(masks.end(), tile.begin(), tile.end());
        }
        tile_id[(group * nqt + a) * nkt + b] = id;
        q_entries.push_back(static_cast<int32_t>(b));
        q_entries.push_back(id);
      }
      q_indptr.push_back(static_cast<int32_t>(q_entries.size() / 2));
    }
  }
  for (int64_t group = 0; group < groups; ++group) {
    for (int64_t b = 0; b < nkt; ++b) {
      for (int64_t a = 0; a < nqt; ++a) {
        const int32_t id = tile_id[(group * nqt + a) * nkt + b];
        if (id == -2) continue;
        k_entries.push_back(static_cast<int32_t>(a));
        k_entries.push_back(id);
      }
      k_indptr.push_back(static_cast<int32_t>(k_entries.size() / 2));
    }
  }
  std::vector<uint8_t> masks_t(num_masks * kt * rp, 0);
  for (int64_t m = 0; m < num_masks; ++m) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t s = 0; s < kt; ++s) {
        masks_t[(m * kt + s) * rp + r] = masks[(m * rows + r) * kt + s];
      }
    }
  }
  CompiledTables out;
  out.q_indptr.reset(new Exact<int32_t>(q_indptr));
  out.q_entries.reset(new Exact<int32_t>(q_entries));
  out.k_indptr.reset(new Exact<int32_t>(k_indptr));
  out.k_entries.reset(new Exact<int32_t>(k_entries));
  out.masks.reset(new Exact<uint8_t>(masks));
  out.masks_t.reset(new Exact<uint8_t>(masks_t));
  jaxattn::BlockSparseTables& t = out.tables;
  t.groups = groups;
  t.num_q_tiles = nqt;
  t.num_k_tiles = nkt;
  t.q_indptr = out.q_indptr->data.get();
  t.q_entries = out.q_entries->data.get();
  t.q_nnz = static_cast<int64_t>(q_entries.size() / 2);
  t.k_indptr = out.k_indptr->data.get();
  t.k_entries = out.k_entries->data.get();
  t.k_nnz = static_cast<int64_t>(k_entries.size() / 2);
  t.masks = num_masks ? out.masks->data.get() : nullptr;
  t.num_masks = num_masks;
  t.masks_t = num_masks ? out.masks_t->data.get() : nullptr;
  return out;
}

void CheckNestedJoin(const char* what, int jobs,
                     const std::function<void(ThreadPool* pool, int job, Failures* f)>& job,
                     Failures* f) {
  ThreadPool pool(2);
  std::mutex mutex;
  std::condition_variable done_cv;
  int done = 0;
  std::vector<Failures> job_failures(jobs);
  for (int j = 0; j < jobs; ++j) {
    pool.Schedule([&, j] {
      job(&pool, j, &job_failures[j]);
      std::lock_guard<std::mutex> lock(mutex);
      ++done;
      done_cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mutex);
    if (!done_cv.wait_for(lock, std::chrono::seconds(120), [&] { return done == jobs; })) {
      std::fprintf(stderr,
                   "FAIL %s: kernels called from busy pool workers did not finish in "
                   "120 s (deadlock)\n",
                   what);
      std::fflush(stderr);
      std::_Exit(3);
    }
  }
  for (const Failures& jf : job_failures) {
    for (const std::string& m : jf.messages) f->Add(std::string(what) + ": " + m);
  }
}

}  // namespace jaxattn_harness

// The allocation-failure checks (e.g. flash_suite.cc) ask for more memory than exists: the
// sanitizers' allocators then return nullptr, as malloc does, instead of ending the run
// (ASAN_OPTIONS / TSAN_OPTIONS still apply on top). Unused without sanitizers.
extern "C" const char* __asan_default_options() { return "allocator_may_return_null=1"; }
extern "C" const char* __tsan_default_options() { return "allocator_may_return_null=1"; }

int main(int argc, char** argv) {
  using namespace jaxattn_harness;
  int64_t num_cases = 300;
  uint64_t seed = 1;
  int threads = 3;
  bool verbose = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--cases")
      num_cases = std::atoll(next());
    else if (arg == "--seed")
      seed = std::strtoull(next(), nullptr, 10);
    else if (arg == "--threads")
      threads = std::atoi(next());
    else if (arg == "--suite")
      only = next();
    else if (arg == "--verbose")
      verbose = true;
    else {
      std::fprintf(stderr,
                   "usage: %s [--cases N] [--seed S] [--threads T] [--suite NAME] "
                   "[--verbose]\n",
                   argv[0]);
      return 2;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  std::printf("kernel_harness: isa=%s cases=%ld seed=%lu threads=%d\n", jaxattn::KernelIsa(),
              long(num_cases), static_cast<unsigned long>(seed), threads);
  std::fflush(stdout);

  ThreadPool pool(threads);
  int64_t total_cases = 0, total_failed = 0, total_failures = 0, suites_run = 0;
  for (const RegisteredSuite& suite : Suites()) {
    if (!only.empty() && only != suite.name) continue;
    ++suites_run;
    SuiteContext context{num_cases, seed, &pool, verbose, 0, 0, Failures{}};
    const auto suite_start = std::chrono::steady_clock::now();
    suite.fn(context);
    for (const std::string& m : context.failures.messages) {
      std::printf("FAIL [%s] %s\n", suite.name, m.c_str());
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - suite_start).count();
    std::printf("  suite %s: %ld cases, %ld failed, %.1f s\n", suite.name, long(context.cases_run),
                long(context.cases_failed), seconds);
    total_cases += context.cases_run;
    total_failed += context.cases_failed;
    total_failures += static_cast<int64_t>(context.failures.messages.size());
  }
  if (suites_run == 0) {
    std::fprintf(stderr, "no suite named %s\n", only.c_str());
    return 2;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("kernel_harness: isa=%s %ld cases, %ld failed, %ld failures, %.1f s\n",
              jaxattn::KernelIsa(), long(total_cases), long(total_failed), long(total_failures),
              seconds);
  return total_failures == 0 ? 0 : 1;
}
