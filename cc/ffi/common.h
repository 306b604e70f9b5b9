// What every FFI handler file shares: error conversion, the thread-pool adapter, buffer
// helpers and each op family's target list. Included only by the files in cc/ffi/ (the only
// files that include the XLA FFI headers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "attention_f64.h"
#include "ffi/targets.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace jaxattn {

namespace ffi = xla::ffi;

using S32Buffer = ffi::Buffer<ffi::S32>;
using F32Buffer = ffi::Buffer<ffi::F32>;
using F32Result = ffi::Result<ffi::Buffer<ffi::F32>>;
using U32Buffer = ffi::Buffer<ffi::U32>;

// Evaluates `expr` (an ffi::Error) and returns it from the calling function if it failed.
#define JAXATTN_RETURN_IF_ERROR(expr)                                          \
  do {                                                                         \
    if (::xla::ffi::Error jaxattn_error_ = (expr); jaxattn_error_.failure()) { \
      return jaxattn_error_;                                                   \
    }                                                                          \
  } while (false)

// Errors carry the "jaxattn: " prefix so that a failure in a large program names its source.
ffi::Error InvalidArgument(const std::string& message);
ffi::Error ResourceExhausted(const std::string& message);
// The kernels return the bytes of scratch memory they could not allocate (0: none): success,
// or a RESOURCE_EXHAUSTED error of `op` naming them (kInvalidProblem: INVALID_ARGUMENT).
ffi::Error ScratchError(const char* op, int64_t failed_bytes);

std::string ShapeString(ffi::AnyBuffer::Dimensions dims);
bool HasShape(ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> expected);
// The kernels' float element types; false for any other.
bool ToDType(ffi::DataType type, DType* dtype);
// The same plus float64, which the attention ops take (attention_f64.h).
bool ToAttentionDType(ffi::DataType type, DType* dtype);
// The element type of an attention problem's log-sum-exps (and of its logits gradient):
// float64 for a float64 problem, float32 otherwise.
inline ffi::DataType LseType(DType dtype) {
  return dtype == DType::kF64 ? ffi::DataType::F64 : ffi::DataType::F32;
}

// An empty buffer of element type kType: what an absent optional operand looks like (the
// older target layouts that lack an operand run the newer handler with this in its place).
template <ffi::DataType kType>
ffi::Buffer<kType> AbsentBuffer() {
  static int64_t zero_dims[1] = {0};
  static const XLA_FFI_Buffer empty{XLA_FFI_Buffer_STRUCT_SIZE,
                                    nullptr,
                                    static_cast<XLA_FFI_DataType>(kType),
                                    nullptr,
                                    1,
                                    zero_dims};
  return ffi::Buffer<kType>(&empty);
}

// The optional operands that end a target's argument list (bound as ffi::RemainingArgs so
// that one handler serves every layout of a target): each layout appends to the one before,
// so a layout is the number `count` of leading `buffers` it passes (all of them in the newest
// layout, none in the oldest); the others keep the absent value they were initialised with.
template <typename... Buffers>
ffi::Error ParseTrailingOperands(const ffi::RemainingArgs& rest, size_t count,
                                 Buffers*... buffers) {
  if (count > sizeof...(Buffers)) {
    return InvalidArgument("a layout of " + std::to_string(count) + " trailing operands; at most " +
                           std::to_string(sizeof...(Buffers)) + " exist");
  }
  if (rest.size() != count) {
    return InvalidArgument("expected " + std::to_string(count) + " trailing operands, got " +
                           std::to_string(rest.size()));
  }
  if (count == 0) return ffi::Error::Success();
  size_t index = 0;
  ffi::Error error;
  const auto read = [&](auto* buffer) {
    if (index >= count) return;
    using Buffer = std::remove_pointer_t<decltype(buffer)>;
    ffi::ErrorOr<Buffer> decoded = rest.template get<Buffer>(index);
    if (decoded.has_value()) {
      *buffer = *decoded;
    } else if (error.success()) {
      error = InvalidArgument("trailing operand " + std::to_string(index) + ": " +
                              decoded.error().message());
    }
    ++index;
  };
  (read(buffers), ...);
  return error;
}

// Parallel loops on XLA's intra-op pool (see RunOnPool for why this cannot deadlock).
class XlaParallel final : public Parallel {
 public:
  explicit XlaParallel(ffi::ThreadPool pool) : pool_(pool) {}
  int64_t num_threads() const override;
  void For(int64_t num_tasks, TaskFn fn, void* context) const override;

 private:
  ffi::ThreadPool pool_;
};

// Each op family's targets, defined in its own file; targets.cc lists them all.
std::vector<FfiTarget> FlashTargets();        // flash.cc
std::vector<FfiTarget> BlockSparseTargets();  // block_sparse.cc
std::vector<FfiTarget> DecodeTargets();       // decode.cc
std::vector<FfiTarget> CacheWriteTargets();   // cache_write.cc
std::vector<FfiTarget> GatedLinearTargets();  // gated_linear.cc

}  // namespace jaxattn
