// Decoding attention targets (cc/decode_impl.h; beyond 16 tokens cc/cache_attention.cc): query
// tokens against a contiguous or paged KV cache, optionally quantized (int8 / float8 with
// float32 scales). The layouts of a target differ in the token operands that end the argument
// list (_v1: none; _v2 and quantized _v1: kNumDecodeTokenOperands; _v3 and quantized _v2:
// those and query_lengths) and the strict_lengths attribute (not in _v1): one handler serves
// them all (kTokens operands, Attrs).
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "ffi/common.h"

namespace jaxattn {

// The attributes of the decode targets.
struct DecodeAttrs {
  float scale;
  float soft_cap;
  int64_t window_left;
  bool strict_lengths;  // a length past the cache is an error rather than clamped
};
// The _v1 targets predate strict_lengths (off).
struct DecodeAttrsV1 {
  float scale;
  float soft_cap;
  int64_t window_left;
};

}  // namespace jaxattn

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jaxattn::DecodeAttrs, StructMember<float>("scale"),
                                      StructMember<float>("soft_cap"),
                                      StructMember<int64_t>("window_left"),
                                      StructMember<bool>("strict_lengths"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jaxattn::DecodeAttrsV1, StructMember<float>("scale"),
                                      StructMember<float>("soft_cap"),
                                      StructMember<int64_t>("window_left"));

namespace jaxattn {
namespace {

DecodeAttrs ToDecodeAttrs(const DecodeAttrs& attrs) { return attrs; }
DecodeAttrs ToDecodeAttrs(const DecodeAttrsV1& attrs) {
  return DecodeAttrs{attrs.scale, attrs.soft_cap, attrs.window_left, false};
}

bool ToCacheQuant(ffi::DataType type, CacheQuant* quant) {
  switch (type) {
    case ffi::DataType::S8: *quant = CacheQuant::kInt8; return true;
    case ffi::DataType::F8E4M3FN: *quant = CacheQuant::kF8E4M3; return true;
    case ffi::DataType::F8E5M2: *quant = CacheQuant::kF8E5M2; return true;
    default: return false;
  }
}

// The scales of a quantized cache: [P, page, K] float32, or 0 elements (scale 1).
ffi::Error ParseCacheScale(const F32Buffer* scale, const char* name,
                           const DecodeAttentionProblem& p, const float** out) {
  if (scale == nullptr || scale->element_count() == 0) return ffi::Error::Success();
  if (!HasShape(scale->dimensions(), {p.num_pages, p.page_size, p.num_kv_heads})) {
    return InvalidArgument(std::string("decode: ") + name +
                           " must have the cache's shape "
                           "without its last axis, got " +
                           ShapeString(scale->dimensions()));
  }
  *out = scale->typed_data();
  return ffi::Error::Success();
}

// Decode: query [Bq,T,N,H]; key/value storage [P, page, K, H|Hv] (a contiguous cache is P = Bk
// pages of page = Smax); block_tables [Bt, max_pages] (nullptr: contiguous); kv_lengths [Bl].
// Decode's optional token operands (0 elements: absent): query_positions [Bp, T],
// key_value_positions [Bp, max_pages * page_size], alibi_slopes [Ba, N], then query_lengths
// [Bq] (0 elements: T each). They end the argument list of the _v2, _v3 and quantized targets;
// the _v1 targets predate them (all absent), the _v2 (quantized: _v1) ones query_lengths.
struct DecodeTokenOperands {
  S32Buffer q_positions = AbsentBuffer<ffi::S32>();
  S32Buffer kv_positions = AbsentBuffer<ffi::S32>();
  F32Buffer alibi_slopes = AbsentBuffer<ffi::F32>();
  S32Buffer q_lengths = AbsentBuffer<ffi::S32>();
};
constexpr size_t kNoDecodeTokenOperands = 0;     // the _v1 layouts
constexpr size_t kNumDecodeTokenOperands = 3;    // _v2; quantized _v1
constexpr size_t kQueryLengthTokenOperands = 4;  // _v3; quantized _v2: and query_lengths

ffi::Error ParseDecodeTokens(const DecodeTokenOperands& in, DecodeAttentionProblem* p) {
  const auto rows = [](const ffi::AnyBuffer::Dimensions d, int64_t len) {
    return d.size() == 2 && d[0] > 0 && d[1] == len;
  };
  const int64_t capacity = p->max_pages * p->page_size;
  if (in.q_positions.element_count() != 0) {
    if (!rows(in.q_positions.dimensions(), p->q_len)) {
      return InvalidArgument("decode: query_positions must have shape [B, " +
                             std::to_string(p->q_len) + "], got " +
                             ShapeString(in.q_positions.dimensions()));
    }
    p->q_positions = in.q_positions.typed_data();
    p->q_positions_batch = in.q_positions.dimensions()[0];
  }
  if (in.kv_positions.element_count() != 0) {
    if (!rows(in.kv_positions.dimensions(), capacity)) {
      return InvalidArgument("decode: key_value_positions must have shape [B, " +
                             std::to_string(capacity) + "], got " +
                             ShapeString(in.kv_positions.dimensions()));
    }
    p->kv_positions = in.kv_positions.typed_data();
    p->kv_positions_batch = in.kv_positions.dimensions()[0];
  }
  if (in.alibi_slopes.element_count() != 0) {
    if (!rows(in.alibi_slopes.dimensions(), p->num_heads)) {
      return InvalidArgument("decode: alibi_slopes must have shape [B, " +
                             std::to_string(p->num_heads) + "], got " +
                             ShapeString(in.alibi_slopes.dimensions()));
    }
    p->alibi_slopes = in.alibi_slopes.typed_data();
    p->alibi_batch = in.alibi_slopes.dimensions()[0];
  }
  if (in.q_lengths.element_count() != 0) {
    if (in.q_lengths.dimensions().size() != 1) {
      return InvalidArgument("decode: query_lengths must have shape [B], got " +
                             ShapeString(in.q_lengths.dimensions()));
    }
    p->q_lengths = in.q_lengths.typed_data();
    p->q_lengths_batch = in.q_lengths.element_count();
  }
  return ffi::Error::Success();
}

// The quantized targets pass key_scale / value_scale (possibly empty); the others nullptr.
ffi::Error RunDecode(ffi::ThreadPool pool, const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                     const ffi::AnyBuffer& value, const S32Buffer* block_tables,
                     const S32Buffer& kv_lengths, const ffi::RemainingArgs& token_args,
                     size_t num_tokens, ffi::Result<ffi::AnyBuffer>& out,
                     ffi::Result<ffi::AnyBuffer>& lse, const DecodeAttrs& attrs,
                     const F32Buffer* key_scale = nullptr, const F32Buffer* value_scale = nullptr) {
  const auto q = query.dimensions(), k = key.dimensions(), v = value.dimensions();
  const auto od = out->dimensions();
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || od.size() != 4) {
    return InvalidArgument("decode: query, caches and output must have rank 4, got " +
                           ShapeString(q) + ", " + ShapeString(k) + ", " + ShapeString(v));
  }
  DecodeAttentionProblem p;
  const bool quantized = key_scale != nullptr;
  if (quantized) {
    if (!ToDType(query.element_type(), &p.dtype) || out->element_type() != query.element_type() ||
        !ToCacheQuant(key.element_type(), &p.cache_quant) ||
        value.element_type() != key.element_type()) {
      return InvalidArgument(
          "decode: a quantized cache must be int8, float8_e4m3fn or "
          "float8_e5m2 (keys and values alike) with a float32, bfloat16 or "
          "float16 query");
    }
  } else if (!ToAttentionDType(query.element_type(), &p.dtype) ||
             key.element_type() != query.element_type() ||
             value.element_type() != query.element_type() ||
             out->element_type() != query.element_type()) {
    return InvalidArgument(
        "decode: query and caches must share one of float32, bfloat16, "
        "float16, float64");
  }
  // A contiguous value cache may have its own batch (a vmap mapping one cache only).
  const bool value_batch_differs = block_tables == nullptr && k[0] != v[0];
  if ((k[0] != v[0] && !value_batch_differs) || k[1] != v[1] || k[2] != v[2] || q[3] != k[3]) {
    return InvalidArgument("decode: inconsistent shapes: query " + ShapeString(q) + ", key " +
                           ShapeString(k) + ", value " + ShapeString(v));
  }
  p.batch = od[0];
  p.q_batch = q[0];
  p.q_len = q[1];
  p.num_heads = q[2];
  p.head_dim = q[3];
  p.num_pages = k[0];
  p.page_size = k[1];
  p.num_kv_heads = k[2];
  p.value_dim = v[3];
  p.value_num_pages = value_batch_differs ? v[0] : 0;
  p.query = query.untyped_data();
  p.key = key.untyped_data();
  p.value = value.untyped_data();
  if (block_tables != nullptr) {
    const auto bt = block_tables->dimensions();
    if (bt.size() != 2 || bt[0] <= 0 || bt[1] <= 0) {
      return InvalidArgument("decode: block_tables must be [B, max_pages], got " + ShapeString(bt));
    }
    p.block_tables = block_tables->typed_data();
    p.block_tables_batch = bt[0];
    p.max_pages = bt[1];
  }
  if (kv_lengths.dimensions().size() != 1) {
    return InvalidArgument("decode: kv_lengths must have rank 1");
  }
  p.kv_lengths = kv_lengths.typed_data();
  p.kv_lengths_batch = kv_lengths.element_count();
  p.scale = attrs.scale;
  p.soft_cap = attrs.soft_cap;
  p.window_left = attrs.window_left;
  DecodeTokenOperands tokens;
  JAXATTN_RETURN_IF_ERROR(ParseTrailingOperands(token_args, num_tokens, &tokens.q_positions,
                                                &tokens.kv_positions, &tokens.alibi_slopes,
                                                &tokens.q_lengths));
  JAXATTN_RETURN_IF_ERROR(ParseDecodeTokens(tokens, &p));
  if (const char* message = ValidateDecodeProblem(p)) {
    return InvalidArgument(std::string("decode: ") + message);
  }
  if (quantized) {
    if (value_batch_differs) {  // the scales are indexed by the key cache's rows
      return InvalidArgument("decode: a quantized value cache must have the key cache's batch");
    }
    JAXATTN_RETURN_IF_ERROR(ParseCacheScale(key_scale, "key_scale", p, &p.key_scale));
    JAXATTN_RETURN_IF_ERROR(ParseCacheScale(value_scale, "value_scale", p, &p.value_scale));
  }
  if (!HasShape(od, {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse->dimensions(), {p.batch, p.q_len, p.num_heads}) ||
      lse->element_type() != LseType(p.dtype)) {
    return InvalidArgument("decode: output shapes or dtypes do not match the inputs");
  }
  if (attrs.strict_lengths) {
    // Opt-in: a length past the cache (e.g. a KV cache stepped past its end under jit) is an
    // error rather than clamped.
    const int64_t capacity = p.max_pages * p.page_size;
    for (int64_t b = 0; b < p.kv_lengths_batch; ++b) {
      if (p.kv_lengths[b] < 0 || p.kv_lengths[b] > capacity) {
        return InvalidArgument("decode: kv_lengths[" + std::to_string(b) +
                               "] = " + std::to_string(p.kv_lengths[b]) + " is outside [0, " +
                               std::to_string(capacity) +
                               "], the cache length (the KV cache "
                               "overflowed: a step past its max_length?)");
      }
    }
  }
  if (const char* message = ValidateDecodePages(p)) {
    return InvalidArgument(std::string("paged decode: ") + message);
  }
  const int64_t failed_bytes =
      p.dtype == DType::kF64
          ? DecodeForwardF64(p,
                             F64ForwardResult{static_cast<double*>(out->untyped_data()),
                                              static_cast<double*>(lse->untyped_data())},
                             XlaParallel(pool))
          : DecodeForward(
                p, DecodeResult{out->untyped_data(), static_cast<float*>(lse->untyped_data())},
                XlaParallel(pool));
  return ScratchError("decode", failed_bytes);
}

template <size_t kTokens, typename Attrs>
ffi::Error DecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                             ffi::AnyBuffer value, S32Buffer kv_lengths,
                             ffi::RemainingArgs token_args, ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::AnyBuffer> lse, Attrs attrs) {
  return RunDecode(pool, query, key, value, nullptr, kv_lengths, token_args, kTokens, out, lse,
                   ToDecodeAttrs(attrs));
}

template <size_t kTokens, typename Attrs>
ffi::Error PagedDecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                  ffi::AnyBuffer key_pages, ffi::AnyBuffer value_pages,
                                  S32Buffer block_tables, S32Buffer kv_lengths,
                                  ffi::RemainingArgs token_args, ffi::Result<ffi::AnyBuffer> out,
                                  ffi::Result<ffi::AnyBuffer> lse, Attrs attrs) {
  return RunDecode(pool, query, key_pages, value_pages, &block_tables, kv_lengths, token_args,
                   kTokens, out, lse, ToDecodeAttrs(attrs));
}

// Quantized caches: the _v2 (_v3) targets plus key_scale and value_scale after the caches.
template <size_t kTokens>
ffi::Error QuantDecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                                  ffi::AnyBuffer value, F32Buffer key_scale, F32Buffer value_scale,
                                  S32Buffer kv_lengths, ffi::RemainingArgs token_args,
                                  ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                                  DecodeAttrs attrs) {
  return RunDecode(pool, query, key, value, nullptr, kv_lengths, token_args, kTokens, out, lse,
                   attrs, &key_scale, &value_scale);
}

template <size_t kTokens>
ffi::Error QuantPagedDecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                       ffi::AnyBuffer key_pages, ffi::AnyBuffer value_pages,
                                       F32Buffer key_scale, F32Buffer value_scale,
                                       S32Buffer block_tables, S32Buffer kv_lengths,
                                       ffi::RemainingArgs token_args,
                                       ffi::Result<ffi::AnyBuffer> out,
                                       ffi::Result<ffi::AnyBuffer> lse, DecodeAttrs attrs) {
  return RunDecode(pool, query, key_pages, value_pages, &block_tables, kv_lengths, token_args,
                   kTokens, out, lse, attrs, &key_scale, &value_scale);
}

// The results and attributes (Attrs: DecodeAttrs or DecodeAttrsV1) after the operands.
template <typename Attrs, typename Binding>
auto BindDecodeResults(Binding binding) {
  return std::move(binding)
      .RemainingArgs()                 // the token operands (_v2, _v3, quantized) or none (_v1)
      .template Ret<ffi::AnyBuffer>()  // out
      .template Ret<ffi::AnyBuffer>()  // lse (float32; float64 for float64 inputs)
      .template Attrs<Attrs>();
}

auto BindContiguous() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // query
      .Arg<ffi::AnyBuffer>()  // key_cache
      .Arg<ffi::AnyBuffer>()  // value_cache
      .Arg<S32Buffer>();      // kv_lengths
}

auto BindPaged() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // query
      .Arg<ffi::AnyBuffer>()  // key_pages
      .Arg<ffi::AnyBuffer>()  // value_pages
      .Arg<S32Buffer>()       // block_tables
      .Arg<S32Buffer>();      // kv_lengths
}

auto BindQuantContiguous() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // query
      .Arg<ffi::AnyBuffer>()  // key_cache (int8 / float8)
      .Arg<ffi::AnyBuffer>()  // value_cache
      .Arg<F32Buffer>()       // key_scale (0 elements: 1)
      .Arg<F32Buffer>()       // value_scale
      .Arg<S32Buffer>();      // kv_lengths
}

auto BindQuantPaged() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // query
      .Arg<ffi::AnyBuffer>()  // key_pages (int8 / float8)
      .Arg<ffi::AnyBuffer>()  // value_pages
      .Arg<F32Buffer>()       // key_scale (0 elements: 1)
      .Arg<F32Buffer>()       // value_scale
      .Arg<S32Buffer>()       // block_tables
      .Arg<S32Buffer>();      // kv_lengths
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeForwardHandler,
                              (DecodeForwardImpl<kNoDecodeTokenOperands, DecodeAttrsV1>),
                              BindDecodeResults<DecodeAttrsV1>(BindContiguous()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeForwardV2Handler,
                              (DecodeForwardImpl<kNumDecodeTokenOperands, DecodeAttrs>),
                              BindDecodeResults<DecodeAttrs>(BindContiguous()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedDecodeForwardHandler,
                              (PagedDecodeForwardImpl<kNoDecodeTokenOperands, DecodeAttrsV1>),
                              BindDecodeResults<DecodeAttrsV1>(BindPaged()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedDecodeForwardV2Handler,
                              (PagedDecodeForwardImpl<kNumDecodeTokenOperands, DecodeAttrs>),
                              BindDecodeResults<DecodeAttrs>(BindPaged()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantDecodeForwardHandler,
                              QuantDecodeForwardImpl<kNumDecodeTokenOperands>,
                              BindDecodeResults<DecodeAttrs>(BindQuantContiguous()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantPagedDecodeForwardHandler,
                              QuantPagedDecodeForwardImpl<kNumDecodeTokenOperands>,
                              BindDecodeResults<DecodeAttrs>(BindQuantPaged()));

// _v3 / quantized _v2: query_lengths [B] int32 (0 elements: T each) after the token operands;
// any T (beyond 16 tokens the flash kernels run over the cache).
XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeForwardV3Handler,
                              (DecodeForwardImpl<kQueryLengthTokenOperands, DecodeAttrs>),
                              BindDecodeResults<DecodeAttrs>(BindContiguous()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedDecodeForwardV3Handler,
                              (PagedDecodeForwardImpl<kQueryLengthTokenOperands, DecodeAttrs>),
                              BindDecodeResults<DecodeAttrs>(BindPaged()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantDecodeForwardV2Handler,
                              QuantDecodeForwardImpl<kQueryLengthTokenOperands>,
                              BindDecodeResults<DecodeAttrs>(BindQuantContiguous()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantPagedDecodeForwardV2Handler,
                              QuantPagedDecodeForwardImpl<kQueryLengthTokenOperands>,
                              BindDecodeResults<DecodeAttrs>(BindQuantPaged()));

std::vector<FfiTarget> DecodeTargets() {
  return {
      {"jaxattn_decode_fwd_v1", reinterpret_cast<void*>(DecodeForwardHandler)},
      {"jaxattn_paged_decode_fwd_v1", reinterpret_cast<void*>(PagedDecodeForwardHandler)},
      {"jaxattn_decode_fwd_v2", reinterpret_cast<void*>(DecodeForwardV2Handler)},
      {"jaxattn_paged_decode_fwd_v2", reinterpret_cast<void*>(PagedDecodeForwardV2Handler)},
      {"jaxattn_quant_decode_fwd_v1", reinterpret_cast<void*>(QuantDecodeForwardHandler)},
      {"jaxattn_quant_paged_decode_fwd_v1",
       reinterpret_cast<void*>(QuantPagedDecodeForwardHandler)},
      {"jaxattn_decode_fwd_v3", reinterpret_cast<void*>(DecodeForwardV3Handler)},
      {"jaxattn_paged_decode_fwd_v3", reinterpret_cast<void*>(PagedDecodeForwardV3Handler)},
      {"jaxattn_quant_decode_fwd_v2", reinterpret_cast<void*>(QuantDecodeForwardV2Handler)},
      {"jaxattn_quant_paged_decode_fwd_v2",
       reinterpret_cast<void*>(QuantPagedDecodeForwardV2Handler)},
  };
}

}  // namespace jaxattn
