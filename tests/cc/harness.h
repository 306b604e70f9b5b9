// Shared pieces of the kernel harness (tests/cc): operands in exactly-sized heap blocks, a
// std::thread pool driving the kernels through RunOnPool, random inputs, comparisons, and a
// registry of suites. A kernel family adds a file tests/cc/<op>_suite.cc that defines
// `void Run<Op>Suite(SuiteContext&)` and registers it with one line:
//     JAXATTN_HARNESS_SUITE(decode, RunDecodeSuite);
// (tests/cc/CMakeLists.txt compiles every *_suite.cc into the harness).
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attention.h"
#include "parallel.h"

namespace jaxattn_harness {

using jaxattn::DType;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ------------------------------------------------------------------------------ threads

// A minimal fixed-size pool, standing in for XLA's intra-op pool. The destructor runs what is
// still queued (late RunOnPool helpers find an exhausted counter) and joins the workers.
class ThreadPool {
 public:
  explicit ThreadPool(int num_threads) {
    for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { Loop(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
  }
  int size() const { return static_cast<int>(workers_.size()); }
  void Schedule(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(fn));
    }
    wake_.notify_one();
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
      fn();
    }
  }
  std::vector<std::thread> workers_;
  std::deque<std::function<void()>> queue_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
};

// jaxattn::Parallel on ThreadPool through RunOnPool, as cc/ffi/common.cc does on XLA's pool.
class PoolParallel final : public jaxattn::Parallel {
 public:
  explicit PoolParallel(ThreadPool* pool) : pool_(pool) {}
  int64_t num_threads() const override { return pool_->size(); }
  void For(int64_t num_tasks, jaxattn::TaskFn fn, void* context) const override {
    jaxattn::RunOnPool(num_tasks, fn, context, num_threads(), &Schedule, pool_);
  }

 private:
  static void Schedule(void* scheduler, void (*work)(void*), void* work_context) {
    static_cast<ThreadPool*>(scheduler)->Schedule([work, work_context] { work(work_context); });
  }
  ThreadPool* pool_;
};

// ------------------------------------------------------------------------------ dtypes

inline float RoundBF16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return x;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

inline size_t DTypeSize(DType d) { return d == DType::kF64 ? 8 : d == DType::kF32 ? 4 : 2; }
inline const char* DTypeName(DType d) {
  return d == DType::kF64 ? "f64" : d == DType::kF32 ? "f32" : d == DType::kBF16 ? "bf16" : "f16";
}

// An operand in its own heap block of exactly its size (so ASan's redzone starts right after
// the last element), plus the values it holds as doubles (after rounding to its dtype).
struct Tensor {
  DType dtype = DType::kF32;
  size_t element_size = 4;  // DTypeSize(dtype), or 1 for a byte (bool) tensor
  std::vector<int64_t> dims;
  std::unique_ptr<uint8_t[]> bytes;
  std::vector<double> values;

  Tensor() = default;
  Tensor(DType d, std::vector<int64_t> shape)
      : dtype(d), element_size(DTypeSize(d)), dims(std::move(shape)) {
    bytes.reset(new uint8_t[std::max<size_t>(1, count() * element_size)]);
    values.assign(count(), 0.0);
  }
  // One byte per element (masks); set with SetByte.
  static Tensor Bytes(std::vector<int64_t> shape) {
    Tensor t;
    t.element_size = 1;
    t.dims = std::move(shape);
    t.bytes.reset(new uint8_t[std::max<int64_t>(1, t.count())]);
    t.values.assign(t.count(), 0.0);
    return t;
  }
  void SetByte(int64_t i, uint8_t b) {
    bytes[i] = b;
    values[i] = b != 0;
  }
  int64_t count() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
  void* data() { return bytes.get(); }
  const void* data() const { return bytes.get(); }
  void Set(int64_t i, double x) {
    if (dtype == DType::kF64) {
      std::memcpy(bytes.get() + 8 * i, &x, 8);
      values[i] = x;
      return;
    }
    const float f = static_cast<float>(x);
    switch (dtype) {
      case DType::kF32:
        std::memcpy(bytes.get() + 4 * i, &f, 4);
        values[i] = f;
        return;
      case DType::kBF16: {
        const float r = RoundBF16(f);
        uint32_t bits;
        std::memcpy(&bits, &r, 4);
        const uint16_t h = static_cast<uint16_t>(bits >> 16);
        std::memcpy(bytes.get() + 2 * i, &h, 2);
        values[i] = r;
        return;
      }
      case DType::kF16: {
        const _Float16 h = static_cast<_Float16>(f);
        std::memcpy(bytes.get() + 2 * i, &h, 2);
        values[i] = static_cast<double>(h);
        return;
      }
      case DType::kF64: return;  // above
    }
  }
  double Get(int64_t i) const {
    switch (dtype) {
      case DType::kF32: {
        float f;
        std::memcpy(&f, bytes.get() + 4 * i, 4);
        return f;
      }
      case DType::kBF16: {
        uint16_t h;
        std::memcpy(&h, bytes.get() + 2 * i, 2);
        const uint32_t bits = static_cast<uint32_t>(h) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
      }
      case DType::kF16: {
        _Float16 h;
        std::memcpy(&h, bytes.get() + 2 * i, 2);
        return h;
      }
      case DType::kF64: {
        double d;
        std::memcpy(&d, bytes.get() + 8 * i, 8);
        return d;
      }
    }
    return 0.0;
  }
  size_t size_bytes() const { return count() * element_size; }
  void Fill(uint8_t byte) { std::memset(bytes.get(), byte, size_bytes()); }
};

// ------------------------------------------------------------------------------ helpers

class Random {
 public:
  explicit Random(uint64_t seed) : gen_(seed) {}
  int64_t Int(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(gen_);
  }
  bool Chance(double p) { return std::uniform_real_distribution<double>(0, 1)(gen_) < p; }
  double Normal() { return std::normal_distribution<double>(0, 1)(gen_); }
  template <typename T>
  T Pick(std::initializer_list<T> items) {
    return items.begin()[Int(0, static_cast<int64_t>(items.size()) - 1)];
  }

 private:
  std::mt19937_64 gen_;
};

struct Failures {
  std::vector<std::string> messages;
  void Add(const std::string& m) { messages.push_back(m); }
};

// |actual - ref| <= tol * (1 + max|ref|) elementwise; non-finite references must match
// exactly and actual must be finite wherever the reference is. Adds one failure at most.
void Compare(const std::string& what, const Tensor& actual, const std::vector<double>& ref,
             double tol, Failures* f);
// a and b hold the same bytes (results of a serial and a thread-pool run).
void CompareBitwise(const std::string& what, const Tensor& a, const Tensor& b, Failures* f);

// Whether dropout keeps weight (query t, key s) of the head whose seed pair is seed[0..1],
// with keep threshold `threshold`: the hash cc/dropout_hash.h documents, written out here
// independently of the kernels (the references' dropout).
bool ReferenceDropoutKept(const uint32_t* seed, int64_t t, int64_t s, uint32_t threshold);

// Block-sparse tables of an element mask for the kernels' tiling (BlockSparseTilingFor), each
// table in a heap block of exactly its size (so that ASan sees a read past one).
template <typename T>
struct Exact {
  std::unique_ptr<T[]> data;
  int64_t size = 0;
  explicit Exact(const std::vector<T>& v)
      : data(new T[std::max<size_t>(1, v.size())]), size(static_cast<int64_t>(v.size())) {
    if (!v.empty()) std::memcpy(data.get(), v.data(), v.size() * sizeof(T));
  }
};
struct CompiledTables {
  std::unique_ptr<Exact<int32_t>> q_indptr, q_entries, k_indptr, k_entries;
  std::unique_ptr<Exact<uint8_t>> masks, masks_t;
  jaxattn::BlockSparseTables tables;  // pointing into the blocks above
};
// The tables of `mask` ([N or 1, T, S] bytes: per query head when per_head, then one table
// group per kv head, else one mask for all heads) for N query heads over K kv heads. Tiles
// with no visible element are left out, tiles all visible (within T and S) are full.
CompiledTables CompileBlockSparseTables(int64_t T, int64_t S, int64_t N, int64_t K, bool per_head,
                                        const std::vector<uint8_t>& mask);

// Runs `jobs` copies of job(pool, failures) on the workers of a 2-thread pool at once, so
// that every worker is busy when the kernels inside schedule their helpers on that same pool:
// a join that waited for helpers that cannot start would hang. A watchdog turns a hang into
// a failure (and exits: a deadlocked process cannot be cleaned up).
void CheckNestedJoin(const char* what, int jobs,
                     const std::function<void(ThreadPool* pool, int job, Failures* f)>& job,
                     Failures* f);

// ------------------------------------------------------------------------------ suites

struct SuiteContext {
  int64_t num_cases;  // random cases to draw (hand-picked edge cases come on top)
  uint64_t seed;
  ThreadPool* pool;  // for the threaded runs (compared bitwise with serial ones)
  bool verbose;      // print each case before running it
  int64_t cases_run = 0;
  int64_t cases_failed = 0;
  Failures failures;

  // Records the messages of one case, prefixed with its description.
  void Record(const std::string& description, const Failures& f) {
    ++cases_run;
    if (f.messages.empty()) return;
    ++cases_failed;
    for (const std::string& m : f.messages) failures.Add(description + ": " + m);
  }
};

using SuiteFn = void (*)(SuiteContext& context);
bool RegisterSuite(const char* name, SuiteFn fn);

#define JAXATTN_HARNESS_SUITE(name, fn) \
  static const bool jaxattn_harness_suite_##name = ::jaxattn_harness::RegisterSuite(#name, fn)

}  // namespace jaxattn_harness
