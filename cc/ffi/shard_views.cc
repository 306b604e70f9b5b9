// Shard views (docs/sharding.md). Under a multi-device jit, jaxattn/_sharding.py lowers every
// target so that XLA's batch partitioner can split it along batch and heads: each buffer is
// handed over in a "view" whose leading dims are the partitioned ones (a transpose with a
// layout that leaves the bytes where the kernels expect them; a broadcast along a factor the
// buffer lacks, whose first slice is the original; or a flat, replicated array). The int64
// array attribute `jaxattn_views` says how to get back the dims each handler expects. The
// trampoline below rewrites the buffer dims of the call frame (data pointers never change),
// checks that batch and heads were split consistently (whole GQA groups), strips the
// attribute and calls the handler: handlers never see views.
//
// Layout of `jaxattn_views` (format 1):
//   [1, num_args, num_rets, num_factors,
//    per factor: count, count x (buffer, view axis, global size),
//    per buffer (args, then results): rank r, r codes]
// A code >= 0 is a view axis (its local size), a code < 0 the constant -code - 1.
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ffi/common.h"

namespace jaxattn {
namespace {

constexpr char kViewsAttr[] = "jaxattn_views";
constexpr int64_t kMaxViewRank = 8;

XLA_FFI_Error* ViewError(const XLA_FFI_Api* api, const std::string& message) {
  const std::string text = "jaxattn: " + message;
  XLA_FFI_Error_Create_Args args;
  args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
  args.extension_start = nullptr;
  args.message = text.c_str();
  args.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
  return api->XLA_FFI_Error_Create(&args);
}

// Reads int64 values one at a time, failing (not reading past the end) on a short array.
class Reader {
 public:
  Reader(const int64_t* data, int64_t size) : data_(data), size_(size) {}
  bool Next(int64_t* value) {
    if (pos_ >= size_) return false;
    *value = data_[pos_++];
    return true;
  }
  bool done() const { return pos_ == size_; }

 private:
  const int64_t* data_;
  int64_t size_;
  int64_t pos_ = 0;
};

// Returns nullptr on success, else an error message. Fills `copies` (args, then results) with
// the frame's buffers, their dims rewritten into `dims`.
const char* ApplyViews(Reader& r, const XLA_FFI_CallFrame& frame,
                       std::vector<XLA_FFI_Buffer>& copies, std::vector<int64_t>& dims) {
  int64_t format, num_args, num_rets, num_factors;
  if (!r.Next(&format) || format != 1) return "unknown jaxattn_views format";
  if (!r.Next(&num_args) || !r.Next(&num_rets) || num_args != frame.args.size ||
      num_rets != frame.rets.size) {
    return "jaxattn_views does not match the number of operands and results";
  }
  const int64_t num_buffers = num_args + num_rets;
  std::vector<const XLA_FFI_Buffer*> views(num_buffers);
  for (int64_t i = 0; i < num_buffers; ++i) {
    const bool is_arg = i < num_args;
    const bool is_buffer = is_arg ? frame.args.types[i] == XLA_FFI_ArgType_BUFFER
                                  : frame.rets.types[i - num_args] == XLA_FFI_RetType_BUFFER;
    if (!is_buffer) return "jaxattn_views applies to buffers only";
    views[i] = static_cast<const XLA_FFI_Buffer*>(is_arg ? frame.args.args[i]
                                                         : frame.rets.rets[i - num_args]);
  }
  // Every axis split along one factor (batch, or heads) must have been cut in the same ratio:
  // otherwise, e.g., query heads and kv heads were not split in whole GQA groups.
  if (!r.Next(&num_factors) || num_factors < 0) return "bad jaxattn_views";
  for (int64_t f = 0; f < num_factors; ++f) {
    int64_t count, ref_local = 0, ref_global = 0;
    if (!r.Next(&count) || count < 0) return "bad jaxattn_views";
    for (int64_t c = 0; c < count; ++c) {
      int64_t buffer, axis, global;
      if (!r.Next(&buffer) || !r.Next(&axis) || !r.Next(&global) || buffer < 0 ||
          buffer >= num_buffers || axis < 0 || axis >= views[buffer]->rank || global < 0) {
        return "bad jaxattn_views";
      }
      const int64_t local = views[buffer]->dims[axis];
      if (c == 0) {
        ref_local = local, ref_global = global;
      } else if (local * ref_global != ref_local * global) {
        return "batch or heads were split inconsistently across operands; shard query heads "
               "and kv heads by the same mesh axes, in whole GQA groups (kv heads divisible "
               "by the number of shards)";
      }
    }
  }
  copies.resize(num_buffers);
  dims.resize(num_buffers * kMaxViewRank);
  for (int64_t i = 0; i < num_buffers; ++i) {
    const XLA_FFI_Buffer& view = *views[i];
    int64_t rank;
    if (!r.Next(&rank) || rank < 0 || rank > kMaxViewRank) return "bad jaxattn_views";
    int64_t* out = &dims[i * kMaxViewRank];
    int64_t view_elements = 1, elements = 1;
    for (int64_t a = 0; a < view.rank; ++a) view_elements *= view.dims[a];
    for (int64_t a = 0; a < rank; ++a) {
      int64_t code;
      if (!r.Next(&code)) return "bad jaxattn_views";
      if (code >= view.rank) return "bad jaxattn_views";
      out[a] = code >= 0 ? view.dims[code] : -code - 1;
      elements *= out[a];
    }
    // The handler reads a prefix of the view's memory; it may never be larger than the view.
    if (elements > view_elements) return "jaxattn_views describes more data than the buffer";
    copies[i] = view;
    copies[i].rank = rank;
    copies[i].dims = out;
  }
  if (!r.done()) return "bad jaxattn_views";
  return nullptr;
}

XLA_FFI_Error* CallWithViews(XLA_FFI_Handler* handler, XLA_FFI_CallFrame* frame) {
  // Metadata queries and other stages go to the handler untouched.
  if (frame->extension_start != nullptr || frame->stage != XLA_FFI_ExecutionStage_EXECUTE) {
    return handler(frame);
  }
  const XLA_FFI_Attrs& attrs = frame->attrs;
  int64_t found = -1;
  for (int64_t i = 0; i < attrs.size; ++i) {
    const XLA_FFI_ByteSpan* name = attrs.names[i];
    if (name->len == sizeof(kViewsAttr) - 1 && std::memcmp(name->ptr, kViewsAttr, name->len) == 0) {
      found = i;
      break;
    }
  }
  if (found < 0) return handler(frame);
  const auto* array = static_cast<const XLA_FFI_Array*>(attrs.attrs[found]);
  if (attrs.types[found] != XLA_FFI_AttrType_ARRAY || array->dtype != XLA_FFI_DataType_S64) {
    return ViewError(frame->api, "jaxattn_views must be an int64 array");
  }
  Reader reader(static_cast<const int64_t*>(array->data), static_cast<int64_t>(array->size));
  std::vector<XLA_FFI_Buffer> copies;
  std::vector<int64_t> dims;
  if (const char* message = ApplyViews(reader, *frame, copies, dims)) {
    return ViewError(frame->api, message);
  }
  const int64_t num_args = frame->args.size, num_rets = frame->rets.size;
  std::vector<void*> arg_ptrs(num_args), ret_ptrs(num_rets);
  for (int64_t i = 0; i < num_args; ++i) arg_ptrs[i] = &copies[i];
  for (int64_t i = 0; i < num_rets; ++i) ret_ptrs[i] = &copies[num_args + i];
  // The same attributes without ours (they stay sorted by name).
  std::vector<XLA_FFI_AttrType> types;
  std::vector<XLA_FFI_ByteSpan*> names;
  std::vector<void*> values;
  for (int64_t i = 0; i < attrs.size; ++i) {
    if (i == found) continue;
    types.push_back(attrs.types[i]);
    names.push_back(attrs.names[i]);
    values.push_back(attrs.attrs[i]);
  }
  XLA_FFI_CallFrame inner = *frame;
  inner.args.args = arg_ptrs.data();
  inner.rets.rets = ret_ptrs.data();
  inner.attrs.size = static_cast<int64_t>(types.size());
  inner.attrs.types = types.data();
  inner.attrs.names = names.data();
  inner.attrs.attrs = values.data();
  XLA_FFI_Error* error = handler(&inner);
  frame->future = inner.future;
  return error;
}

// XLA takes plain function pointers: one trampoline per registered target.
constexpr size_t kMaxTargets = 64;
XLA_FFI_Handler* g_view_handlers[kMaxTargets];

template <size_t I>
XLA_FFI_Error* ViewTrampoline(XLA_FFI_CallFrame* frame) {
  return CallWithViews(g_view_handlers[I], frame);
}

template <size_t... I>
constexpr std::array<XLA_FFI_Handler*, sizeof...(I)> MakeTrampolines(std::index_sequence<I...>) {
  return {&ViewTrampoline<I>...};
}

}  // namespace

void* WithShardViews(size_t index, void* handler) {
  static constexpr auto kTrampolines = MakeTrampolines(std::make_index_sequence<kMaxTargets>());
  // Past the table a target keeps its plain handler, which rejects views (an error at run
  // time, never wrong results): raise kMaxTargets.
  if (index >= kMaxTargets) return handler;
  g_view_handlers[index] = reinterpret_cast<XLA_FFI_Handler*>(handler);
  return reinterpret_cast<void*>(kTrampolines[index]);
}

}  // namespace jaxattn
