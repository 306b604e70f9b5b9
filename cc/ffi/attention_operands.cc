#include "ffi/attention_operands.h"

#include <algorithm>
#include <string>

namespace jaxattn {

ffi::Error ParseBroadcast(const ffi::AnyBuffer& buffer, const char* name, Broadcast4* out) {
  if (buffer.element_count() == 0) return ffi::Error::Success();
  const auto dims = buffer.dimensions();
  if (dims.size() != 4) {
    return InvalidArgument(std::string(name) + " must have rank 4, got " + ShapeString(dims));
  }
  out->data = buffer.untyped_data();
  for (int i = 0; i < 4; ++i) out->dims[i] = dims[i];
  return ffi::Error::Success();
}

ffi::Error ParseTokenOperands(const ffi::RemainingArgs& rest, size_t count, TokenOperands* tokens) {
  return ParseTrailingOperands(rest, count, &tokens->q_positions, &tokens->kv_positions,
                               &tokens->q_segments, &tokens->kv_segments, &tokens->alibi_slopes,
                               &tokens->dropout_seeds);
}

ffi::Error ParseTokens(const TokenOperands& in, AttentionProblem* p) {
  const auto rows = [](const S32Buffer& x, const char* name, int64_t len, const int32_t** data,
                       int64_t* batch) -> ffi::Error {
    if (x.element_count() == 0) return ffi::Error::Success();
    const auto d = x.dimensions();
    if (d.size() != 2 || d[1] != len) {
      return InvalidArgument(std::string(name) + " must have shape [B, " + std::to_string(len) +
                             "], got " + ShapeString(d));
    }
    *data = x.typed_data();
    *batch = d[0];
    return ffi::Error::Success();
  };
  JAXATTN_RETURN_IF_ERROR(
      rows(in.q_positions, "query_positions", p->q_len, &p->q_positions, &p->q_positions_batch));
  JAXATTN_RETURN_IF_ERROR(rows(in.kv_positions, "key_value_positions", p->kv_len, &p->kv_positions,
                               &p->kv_positions_batch));
  JAXATTN_RETURN_IF_ERROR(
      rows(in.q_segments, "query_segment_ids", p->q_len, &p->q_segments, &p->q_segments_batch));
  JAXATTN_RETURN_IF_ERROR(rows(in.kv_segments, "key_value_segment_ids", p->kv_len, &p->kv_segments,
                               &p->kv_segments_batch));
  if (in.alibi_slopes.element_count() != 0) {
    const auto d = in.alibi_slopes.dimensions();
    if (d.size() != 2 || d[1] != p->num_heads) {
      return InvalidArgument("alibi_slopes must have shape [B, " + std::to_string(p->num_heads) +
                             "], got " + ShapeString(d));
    }
    p->alibi_slopes = in.alibi_slopes.typed_data();
    p->alibi_batch = d[0];
  }
  if (in.dropout_threshold != 0) {
    if (in.dropout_threshold < 0 || in.dropout_threshold > 0xFFFFFFFFll) {
      return InvalidArgument("dropout_threshold must be in [0, 2^32), got " +
                             std::to_string(in.dropout_threshold));
    }
    const auto d = in.dropout_seeds.dimensions();
    if (in.dropout_seeds.element_count() == 0 || d.size() != 3 || d[1] != p->num_heads ||
        d[2] != 2) {
      return InvalidArgument("dropout seeds must have shape [B, " + std::to_string(p->num_heads) +
                             ", 2], got " + ShapeString(d));
    }
    p->dropout_seeds = in.dropout_seeds.typed_data();
    p->dropout_batch = d[0];
    p->dropout_threshold = static_cast<uint32_t>(in.dropout_threshold);
  }
  return ffi::Error::Success();
}

ffi::Error ParseQueryKeyValue(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                              const ffi::AnyBuffer& value, int64_t batch, AttentionProblem* p) {
  const auto q = query.dimensions(), k = key.dimensions(), v = value.dimensions();
  if (q.size() != 4 || k.size() != 4 || v.size() != 4) {
    return InvalidArgument("query, key and value must have rank 4, got " + ShapeString(q) + ", " +
                           ShapeString(k) + ", " + ShapeString(v));
  }
  if (!ToAttentionDType(query.element_type(), &p->dtype) ||
      key.element_type() != query.element_type() || value.element_type() != query.element_type()) {
    return InvalidArgument(
        "query, key and value must share one of float32, bfloat16, float16, float64");
  }
  if (k[1] != v[1] || k[2] != v[2] || q[3] != k[3]) {
    return InvalidArgument("inconsistent shapes: query " + ShapeString(q) + ", key " +
                           ShapeString(k) + ", value " + ShapeString(v));
  }
  p->batch = batch;
  p->q_batch = q[0];
  p->q_len = q[1];
  p->num_heads = q[2];
  p->head_dim = q[3];
  p->kv_batch = k[0];
  p->value_batch = v[0];
  p->kv_len = k[1];
  p->num_kv_heads = k[2];
  p->value_dim = v[3];
  p->query = query.untyped_data();
  p->key = key.untyped_data();
  p->value = value.untyped_data();
  return ffi::Error::Success();
}

ffi::Error ParseProblem(const ProblemOperands& in, const TokenOperands& tokens,
                        const FlashAttrs& attrs, int64_t batch, AttentionProblem* p) {
  JAXATTN_RETURN_IF_ERROR(ParseQueryKeyValue(in.query, in.key, in.value, batch, p));
  JAXATTN_RETURN_IF_ERROR(ParseBroadcast(in.bias, "bias", &p->bias));
  JAXATTN_RETURN_IF_ERROR(ParseBroadcast(in.mask, "mask", &p->mask));
  if (p->bias.data != nullptr && !ToAttentionDType(in.bias.element_type(), &p->bias.dtype)) {
    return InvalidArgument("bias must be float32, bfloat16, float16 or float64");
  }
  if (p->bias.data != nullptr && p->bias.dtype == DType::kF64 && p->dtype != DType::kF64) {
    return InvalidArgument(
        "a float64 bias needs float64 inputs (the float32 kernels add the "
        "bias in float32: pass it as float32)");
  }
  if (p->mask.data != nullptr && in.mask.element_type() != ffi::DataType::PRED &&
      in.mask.element_type() != ffi::DataType::U8) {
    return InvalidArgument("mask must be boolean");
  }
  if (in.q_lengths.element_count() > 0) {
    p->q_lengths = in.q_lengths.typed_data();
    p->q_lengths_batch = in.q_lengths.element_count();
  }
  if (in.kv_lengths.element_count() > 0) {
    p->kv_lengths = in.kv_lengths.typed_data();
    p->kv_lengths_batch = in.kv_lengths.element_count();
  }
  JAXATTN_RETURN_IF_ERROR(ParseTokens(tokens, p));
  p->scale = attrs.scale;
  p->soft_cap = attrs.soft_cap;
  p->causal = attrs.is_causal;
  // A window side wider than the sequence bounds nothing: clamp so that the kernels'
  // position + window arithmetic cannot overflow for any attribute value (-1: unbounded).
  // Positions (clamped to +-2^30 by the kernels) are at most 2^31 apart.
  const bool by_position = p->q_positions != nullptr || p->kv_positions != nullptr;
  const int64_t left_max = by_position ? int64_t{1} << 31 : p->q_len;
  const int64_t right_max = by_position ? int64_t{1} << 31 : p->kv_len;
  p->window_left = attrs.window_left < 0 ? -1 : std::min<int64_t>(attrs.window_left, left_max);
  p->window_right = attrs.window_right < 0 ? -1 : std::min<int64_t>(attrs.window_right, right_max);
  if (const char* message = ValidateProblem(*p)) return InvalidArgument(message);
  return ffi::Error::Success();
}

ffi::Error CheckForwardResults(const AttentionProblem& p, ffi::DataType dtype,
                               const ffi::AnyBuffer& out, const ffi::AnyBuffer& lse) {
  if (out.element_type() != dtype || lse.element_type() != LseType(p.dtype) ||
      !HasShape(out.dimensions(), {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse.dimensions(), {p.batch, p.q_len, p.num_heads})) {
    return InvalidArgument("output shapes or dtypes do not match the inputs");
  }
  return ffi::Error::Success();
}

ffi::Error ParseBackwardArgs(const AttentionProblem& p, ffi::DataType dtype,
                             const ffi::AnyBuffer& out, const ffi::AnyBuffer& lse,
                             const ffi::AnyBuffer& dout, const ffi::AnyBuffer& dlse,
                             ffi::AnyBuffer* dq, ffi::AnyBuffer* dk, ffi::AnyBuffer* dv,
                             ffi::AnyBuffer* dlogits, FlashBackwardArgs* args,
                             F64BackwardArgs* args64, const char* target) {
  const int64_t B = p.batch, T = p.q_len, N = p.num_heads, S = p.kv_len;
  const ffi::DataType lse_type = LseType(p.dtype);
  if (lse.element_type() != lse_type ||
      (dlse.element_count() != 0 && dlse.element_type() != lse_type) ||
      (dlogits != nullptr && dlogits->element_type() != lse_type)) {
    return InvalidArgument(std::string(target) +
                           ": lse, its cotangent and the logits "
                           "gradient must be float64 for float64 inputs, float32 otherwise");
  }
  const auto is = [dtype](const ffi::AnyBuffer* x, std::initializer_list<int64_t> shape) {
    return x == nullptr || (x->element_type() == dtype && HasShape(x->dimensions(), shape));
  };
  if (!is(&out, {B, T, N, p.value_dim}) || !is(&dout, {B, T, N, p.value_dim}) ||
      !HasShape(lse.dimensions(), {B, T, N}) ||
      (dlse.element_count() != 0 && !HasShape(dlse.dimensions(), {B, T, N})) ||
      !is(dq, {B, T, N, p.head_dim}) || !is(dk, {B, S, p.num_kv_heads, p.head_dim}) ||
      !is(dv, {B, S, p.num_kv_heads, p.value_dim}) ||
      (dlogits != nullptr && !HasShape(dlogits->dimensions(), {B, N, T, S}))) {
    return InvalidArgument(std::string(target) + " operand shapes do not match the inputs");
  }
  if (p.dtype == DType::kF64) {
    args64->out = static_cast<const double*>(out.untyped_data());
    args64->lse = static_cast<const double*>(lse.untyped_data());
    args64->dout = static_cast<const double*>(dout.untyped_data());
    args64->dlse = dlse.element_count() ? static_cast<const double*>(dlse.untyped_data()) : nullptr;
    args64->dq = dq ? static_cast<double*>(dq->untyped_data()) : nullptr;
    args64->dk = dk ? static_cast<double*>(dk->untyped_data()) : nullptr;
    args64->dv = dv ? static_cast<double*>(dv->untyped_data()) : nullptr;
    args64->dlogits = dlogits ? static_cast<double*>(dlogits->untyped_data()) : nullptr;
    return ffi::Error::Success();
  }
  args->out = out.untyped_data();
  args->lse = static_cast<const float*>(lse.untyped_data());
  args->dout = dout.untyped_data();
  args->dlse = dlse.element_count() ? static_cast<const float*>(dlse.untyped_data()) : nullptr;
  args->dq = dq ? dq->untyped_data() : nullptr;
  args->dk = dk ? dk->untyped_data() : nullptr;
  args->dv = dv ? dv->untyped_data() : nullptr;
  args->dlogits = dlogits ? static_cast<float*>(dlogits->untyped_data()) : nullptr;
  return ffi::Error::Success();
}

ffi::Error RunAttentionForward(const char* op, const AttentionProblem& p,
                               const BlockSparseTables* tables, const ffi::AnyBuffer& out,
                               const ffi::AnyBuffer& lse, ffi::ThreadPool pool) {
  const XlaParallel parallel(pool);
  if (p.dtype == DType::kF64) {
    const F64ForwardResult result{static_cast<double*>(out.untyped_data()),
                                  static_cast<double*>(lse.untyped_data())};
    return ScratchError(op, FlashForwardF64(p, tables, result, parallel));
  }
  const FlashForwardResult result{out.untyped_data(), static_cast<float*>(lse.untyped_data())};
  return ScratchError(op, tables != nullptr ? BlockSparseForward(p, *tables, result, parallel)
                                            : FlashForward(p, result, parallel));
}

ffi::Error RunAttentionBackward(const char* op, const AttentionProblem& p,
                                const BlockSparseTables* tables, const FlashBackwardArgs& args,
                                const F64BackwardArgs& args64, ffi::ThreadPool pool) {
  const XlaParallel parallel(pool);
  if (p.dtype == DType::kF64) {
    return ScratchError(op, FlashBackwardF64(p, tables, args64, parallel));
  }
  return ScratchError(op, tables != nullptr ? BlockSparseBackward(p, *tables, args, parallel)
                                            : FlashBackward(p, args, parallel));
}

}  // namespace jaxattn
