#include "ffi/common.h"

namespace jaxattn {

ffi::Error InvalidArgument(const std::string& message) {
  return ffi::Error::InvalidArgument("jaxattn: " + message);
}

ffi::Error ResourceExhausted(const std::string& message) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted, "jaxattn: " + message);
}

ffi::Error ScratchError(const char* op, int64_t failed_bytes) {
  if (failed_bytes == 0) return ffi::Error::Success();
  if (failed_bytes == kInvalidProblem) {  // the handlers validate first: not reached
    return InvalidArgument(std::string(op) + ": the kernel rejected the problem as invalid");
  }
  return ResourceExhausted(std::string(op) + ": could not allocate " +
                           std::to_string(failed_bytes) + " bytes of scratch memory");
}

std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

bool HasShape(ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> expected) {
  if (dims.size() != expected.size()) return false;
  size_t i = 0;
  for (int64_t e : expected) {
    if (dims[i++] != e) return false;
  }
  return true;
}

bool ToDType(ffi::DataType type, DType* dtype) {
  switch (type) {
    case ffi::DataType::F32: *dtype = DType::kF32; return true;
    case ffi::DataType::BF16: *dtype = DType::kBF16; return true;
    case ffi::DataType::F16: *dtype = DType::kF16; return true;
    default: return false;
  }
}

bool ToAttentionDType(ffi::DataType type, DType* dtype) {
  if (type == ffi::DataType::F64) {
    *dtype = DType::kF64;
    return true;
  }
  return ToDType(type, dtype);
}

namespace {

void ScheduleOnXlaPool(void* scheduler, void (*work)(void*), void* work_context) {
  static_cast<ffi::ThreadPool*>(scheduler)->Schedule([work, work_context] { work(work_context); });
}

}  // namespace

int64_t XlaParallel::num_threads() const {
  const int64_t n = pool_.num_threads();
  return n > 0 ? n : 1;
}

void XlaParallel::For(int64_t num_tasks, TaskFn fn, void* context) const {
  RunOnPool(num_tasks, fn, context, num_threads(), &ScheduleOnXlaPool,
            const_cast<ffi::ThreadPool*>(&pool_));
}

}  // namespace jaxattn
