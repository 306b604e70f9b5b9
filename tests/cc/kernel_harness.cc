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
  if (bytes != b.size_bytes() ||
      (bytes && std::memcmp(a.bytes.get(), b.bytes.get(), bytes) != 0)) {
    f->Add(what + ": serial and thread-pool results differ bitwise");
  }
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
      std::fprintf(stderr, "FAIL %s: kernels called from busy pool workers did not finish in "
                           "120 s (deadlock)\n", what);
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
    if (arg == "--cases") num_cases = std::atoll(next());
    else if (arg == "--seed") seed = std::strtoull(next(), nullptr, 10);
    else if (arg == "--threads") threads = std::atoi(next());
    else if (arg == "--suite") only = next();
    else if (arg == "--verbose") verbose = true;
    else {
      std::fprintf(stderr, "usage: %s [--cases N] [--seed S] [--threads T] [--suite NAME] "
                           "[--verbose]\n", argv[0]);
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
