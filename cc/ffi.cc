// XLA FFI handlers: decode buffers and attributes, re-check what the kernels rely on, run them
// on XLA's intra-op thread pool. The only file that includes the XLA FFI headers.
#include "ffi.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "attention.h"
#include "gated_linear.h"
#include "cache.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxattn {
namespace {

using S32Buffer = ffi::Buffer<ffi::S32>;
using F32Buffer = ffi::Buffer<ffi::F32>;
using F32Result = ffi::Result<ffi::Buffer<ffi::F32>>;

// Parallel loops on XLA's intra-op pool (see RunOnPool for why this cannot deadlock).
class XlaParallel final : public Parallel {
 public:
  explicit XlaParallel(ffi::ThreadPool pool) : pool_(pool) {}
  int64_t num_threads() const override {
    const int64_t n = pool_.num_threads();
    return n > 0 ? n : 1;
  }
  void For(int64_t num_tasks, TaskFn fn, void* context) const override {
    RunOnPool(num_tasks, fn, context, num_threads(), &XlaParallel::Schedule,
              const_cast<ffi::ThreadPool*>(&pool_));
  }

 private:
  static void Schedule(void* scheduler, void (*work)(void*), void* work_context) {
    static_cast<ffi::ThreadPool*>(scheduler)->Schedule([work, work_context] {
      work(work_context);
    });
  }
  ffi::ThreadPool pool_;
};

ffi::Error InvalidArgument(const std::string& message) {
  return ffi::Error::InvalidArgument("jaxattn: " + message);
}

std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

bool ToDType(ffi::DataType type, DType* dtype) {
  switch (type) {
    case ffi::DataType::F32: *dtype = DType::kF32; return true;
    case ffi::DataType::BF16: *dtype = DType::kBF16; return true;
    case ffi::DataType::F16: *dtype = DType::kF16; return true;
    default: return false;
  }
}

// An optional [B', N', T', S'] operand; zero elements means absent.
ffi::Error DecodeBroadcast(const ffi::AnyBuffer& buffer, const char* name, Broadcast4* out) {
  if (buffer.element_count() == 0) return ffi::Error::Success();
  const auto dims = buffer.dimensions();
  if (dims.size() != 4) {
    return InvalidArgument(std::string(name) + " must have rank 4, got " + ShapeString(dims));
  }
  out->data = buffer.untyped_data();
  for (int i = 0; i < 4; ++i) out->dims[i] = dims[i];
  return ffi::Error::Success();
}

// Token positions, segment ids and ALiBi slopes (each 0 elements: absent).
struct TokenOperands {
  const S32Buffer& q_positions;   // [Bp, T]
  const S32Buffer& kv_positions;  // [Bp, S]
  const S32Buffer& q_segments;    // [Bs, T]
  const S32Buffer& kv_segments;   // [Bs, S]
  const F32Buffer& alibi_slopes;  // [Ba, N]
};

struct ProblemOperands {
  const ffi::AnyBuffer& query;
  const ffi::AnyBuffer& key;
  const ffi::AnyBuffer& value;
  const ffi::AnyBuffer& bias;
  const ffi::AnyBuffer& mask;
  const S32Buffer& q_lengths;
  const S32Buffer& kv_lengths;
  const TokenOperands* tokens = nullptr;
};

// Points p at the present token operands after checking their shapes against it.
ffi::Error DecodeTokens(const TokenOperands& in, AttentionProblem* p) {
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
  if (auto e = rows(in.q_positions, "query_positions", p->q_len, &p->q_positions,
                    &p->q_positions_batch);
      e.failure()) {
    return e;
  }
  if (auto e = rows(in.kv_positions, "key_value_positions", p->kv_len, &p->kv_positions,
                    &p->kv_positions_batch);
      e.failure()) {
    return e;
  }
  if (auto e = rows(in.q_segments, "query_segment_ids", p->q_len, &p->q_segments,
                    &p->q_segments_batch);
      e.failure()) {
    return e;
  }
  if (auto e = rows(in.kv_segments, "key_value_segment_ids", p->kv_len, &p->kv_segments,
                    &p->kv_segments_batch);
      e.failure()) {
    return e;
  }
  if (in.alibi_slopes.element_count() != 0) {
    const auto d = in.alibi_slopes.dimensions();
    if (d.size() != 2 || d[1] != p->num_heads) {
      return InvalidArgument("alibi_slopes must have shape [B, " + std::to_string(p->num_heads) +
                             "], got " + ShapeString(d));
    }
    p->alibi_slopes = in.alibi_slopes.typed_data();
    p->alibi_batch = d[0];
  }
  return ffi::Error::Success();
}

struct ProblemAttrs {
  float scale;
  float soft_cap;
  bool is_causal;
  int64_t window_left;
  int64_t window_right;
};

// Query, key and value of a problem with an output of batch `batch` (query [B,T,N,H] layout).
ffi::Error DecodeQueryKeyValue(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                               const ffi::AnyBuffer& value, int64_t batch,
                               AttentionProblem* p) {
  const auto q = query.dimensions(), k = key.dimensions(), v = value.dimensions();
  if (q.size() != 4 || k.size() != 4 || v.size() != 4) {
    return InvalidArgument("query, key and value must have rank 4, got " + ShapeString(q) +
                           ", " + ShapeString(k) + ", " + ShapeString(v));
  }
  if (!ToDType(query.element_type(), &p->dtype) ||
      key.element_type() != query.element_type() ||
      value.element_type() != query.element_type()) {
    return InvalidArgument("query, key and value must share one of float32, bfloat16, float16");
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

// Builds and checks the problem for an output of batch `batch` (query [B,T,N,H] layout).
ffi::Error DecodeProblem(const ProblemOperands& in, const ProblemAttrs& attrs, int64_t batch,
                         AttentionProblem* p) {
  if (auto e = DecodeQueryKeyValue(in.query, in.key, in.value, batch, p); e.failure()) {
    return e;
  }
  if (auto e = DecodeBroadcast(in.bias, "bias", &p->bias); e.failure()) return e;
  if (auto e = DecodeBroadcast(in.mask, "mask", &p->mask); e.failure()) return e;
  if (p->bias.data != nullptr && !ToDType(in.bias.element_type(), &p->bias.dtype)) {
    return InvalidArgument("bias must be float32, bfloat16 or float16");
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
  if (in.tokens != nullptr) {
    if (auto e = DecodeTokens(*in.tokens, p); e.failure()) return e;
  }
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
  p->window_right =
      attrs.window_right < 0 ? -1 : std::min<int64_t>(attrs.window_right, right_max);
  if (const char* message = ValidateProblem(*p)) return InvalidArgument(message);
  return ffi::Error::Success();
}

bool HasShape(ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> expected) {
  if (dims.size() != expected.size()) return false;
  size_t i = 0;
  for (int64_t e : expected) {
    if (dims[i++] != e) return false;
  }
  return true;
}

ffi::Error FlashForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                            ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                            S32Buffer q_lengths, S32Buffer kv_lengths, S32Buffer q_positions,
                            S32Buffer kv_positions, S32Buffer q_segments,
                            S32Buffer kv_segments, F32Buffer alibi_slopes,
                            ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                            float soft_cap, bool is_causal, int64_t window_left,
                            int64_t window_right) {
  const auto od = out->dimensions();
  if (od.size() != 4) return InvalidArgument("output must have rank 4");
  AttentionProblem p;
  const ProblemAttrs attrs{scale, soft_cap, is_causal, window_left, window_right};
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  const ProblemOperands in{query, key, value, bias, mask, q_lengths, kv_lengths, &tokens};
  if (auto e = DecodeProblem(in, attrs, od[0], &p); e.failure()) return e;
  if (out->element_type() != query.element_type() ||
      !HasShape(od, {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse->dimensions(), {p.batch, p.q_len, p.num_heads})) {
    return InvalidArgument("output shapes do not match the inputs");
  }
  FlashForward(p, FlashForwardResult{out->untyped_data(), lse->typed_data()},
               XlaParallel(pool));
  return ffi::Error::Success();
}

// Checks what every backward target takes besides the problem (the forward's out and lse,
// the cotangents dout and dlse) and the gradients it writes (nullptr: not written), and
// points args at them.
ffi::Error DecodeBackwardArgs(const AttentionProblem& p, ffi::DataType dtype,
                              const ffi::AnyBuffer& out, const F32Buffer& lse,
                              const ffi::AnyBuffer& dout, const F32Buffer& dlse,
                              ffi::AnyBuffer* dq, ffi::AnyBuffer* dk, ffi::AnyBuffer* dv,
                              ffi::Buffer<ffi::F32>* dlogits, FlashBackwardArgs* args,
                              const char* target = "backward") {
  const int64_t B = p.batch, T = p.q_len, N = p.num_heads, S = p.kv_len;
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
  args->out = out.untyped_data();
  args->lse = lse.typed_data();
  args->dout = dout.untyped_data();
  args->dlse = dlse.element_count() ? dlse.typed_data() : nullptr;
  args->dq = dq ? dq->untyped_data() : nullptr;
  args->dk = dk ? dk->untyped_data() : nullptr;
  args->dv = dv ? dv->untyped_data() : nullptr;
  args->dlogits = dlogits ? dlogits->typed_data() : nullptr;
  return ffi::Error::Success();
}

ffi::Error FlashBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                             ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                             S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                             F32Buffer lse, ffi::AnyBuffer dout, F32Buffer dlse,
                             S32Buffer q_positions, S32Buffer kv_positions,
                             S32Buffer q_segments, S32Buffer kv_segments,
                             F32Buffer alibi_slopes, ffi::Result<ffi::AnyBuffer> dq,
                             ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                             float scale, float soft_cap, bool is_causal, int64_t window_left,
                             int64_t window_right) {
  AttentionProblem p;
  const ProblemAttrs attrs{scale, soft_cap, is_causal, window_left, window_right};
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  const ProblemOperands in{query, key, value, bias, mask, q_lengths, kv_lengths, &tokens};
  const auto dqd = dq->dimensions();
  if (dqd.size() != 4) return InvalidArgument("dq must have rank 4");
  if (auto e = DecodeProblem(in, attrs, dqd[0], &p); e.failure()) return e;
  FlashBackwardArgs args;
  if (auto e = DecodeBackwardArgs(p, query.element_type(), out, lse, dout, dlse, &*dq, &*dk,
                                  &*dv, nullptr, &args);
      e.failure()) {
    return e;
  }
  FlashBackward(p, args, XlaParallel(pool));
  return ffi::Error::Success();
}

// d loss / d logits [B, N, T, S] in float32, for the gradient of a bias.
ffi::Error FlashLogitsGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                               ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                               S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                               F32Buffer lse, ffi::AnyBuffer dout, F32Buffer dlse,
                               S32Buffer q_positions, S32Buffer kv_positions,
                               S32Buffer q_segments, S32Buffer kv_segments,
                               F32Buffer alibi_slopes, F32Result dlogits, float scale,
                               float soft_cap, bool is_causal, int64_t window_left,
                               int64_t window_right) {
  AttentionProblem p;
  const ProblemAttrs attrs{scale, soft_cap, is_causal, window_left, window_right};
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  const ProblemOperands in{query, key, value, bias, mask, q_lengths, kv_lengths, &tokens};
  const auto gd = dlogits->dimensions();
  if (gd.size() != 4) return InvalidArgument("dlogits must have rank 4");
  if (auto e = DecodeProblem(in, attrs, gd[0], &p); e.failure()) return e;
  FlashBackwardArgs args;
  if (auto e = DecodeBackwardArgs(p, query.element_type(), out, lse, dout, dlse, nullptr,
                                  nullptr, nullptr, &*dlogits, &args, "logits-gradient");
      e.failure()) {
    return e;
  }
  FlashBackward(p, args, XlaParallel(pool));
  return ffi::Error::Success();
}

// The tangent of (out, lse) in the direction of (dq, dk, dv, dbias), for forward-mode AD.
ffi::Error FlashJvpImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                        ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                        S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                        F32Buffer lse, ffi::AnyBuffer dq, ffi::AnyBuffer dk, ffi::AnyBuffer dv,
                        ffi::AnyBuffer dbias, S32Buffer q_positions, S32Buffer kv_positions,
                        S32Buffer q_segments, S32Buffer kv_segments, F32Buffer alibi_slopes,
                        ffi::Result<ffi::AnyBuffer> dout, F32Result dlse, float scale,
                        float soft_cap, bool is_causal, int64_t window_left,
                        int64_t window_right) {
  AttentionProblem p;
  const ProblemAttrs attrs{scale, soft_cap, is_causal, window_left, window_right};
  // The forward's token operands: the tangent differentiates the same logits.
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  const ProblemOperands in{query, key, value, bias, mask, q_lengths, kv_lengths, &tokens};
  const auto od = dout->dimensions();
  if (od.size() != 4) return InvalidArgument("the output tangent must have rank 4");
  if (auto e = DecodeProblem(in, attrs, od[0], &p); e.failure()) return e;
  const int64_t B = p.batch, T = p.q_len, N = p.num_heads, S = p.kv_len, K = p.num_kv_heads;
  const ffi::DataType dtype = query.element_type();
  // A tangent's batch divides B (vmap over tangents only folds into theirs).
  const auto tangent_ok = [&](const ffi::AnyBuffer& x, int64_t d1, int64_t d2, int64_t d3) {
    const auto d = x.dimensions();
    return x.element_type() == dtype && d.size() == 4 && d[0] > 0 && B % d[0] == 0 &&
           d[1] == d1 && d[2] == d2 && d[3] == d3;
  };
  if (!tangent_ok(dq, T, N, p.head_dim) || !tangent_ok(dk, S, K, p.head_dim) ||
      !tangent_ok(dv, S, K, p.value_dim) || out.element_type() != dtype ||
      !HasShape(out.dimensions(), {B, T, N, p.value_dim}) ||
      !HasShape(lse.dimensions(), {B, T, N}) || dout->element_type() != dtype ||
      !HasShape(od, {B, T, N, p.value_dim}) || !HasShape(dlse->dimensions(), {B, T, N})) {
    return InvalidArgument("jvp operand shapes do not match the inputs");
  }
  FlashTangents tangents;
  tangents.dq = dq.untyped_data();
  tangents.dk = dk.untyped_data();
  tangents.dv = dv.untyped_data();
  tangents.dq_batch = dq.dimensions()[0];
  tangents.dk_batch = dk.dimensions()[0];
  tangents.dv_batch = dv.dimensions()[0];
  if (auto e = DecodeBroadcast(dbias, "bias tangent", &tangents.dbias); e.failure()) return e;
  if (tangents.dbias.data != nullptr) {
    if (!ToDType(dbias.element_type(), &tangents.dbias.dtype)) {
      return InvalidArgument("the bias tangent must be float32, bfloat16 or float16");
    }
    const int64_t full[4] = {B, N, T, S};
    if (tangents.dbias.dims[0] <= 0 || B % tangents.dbias.dims[0] != 0) {
      return InvalidArgument("the bias tangent's batch must divide B");
    }
    for (int i = 1; i < 4; ++i) {
      if (tangents.dbias.dims[i] != 1 && tangents.dbias.dims[i] != full[i]) {
        return InvalidArgument("the bias tangent must be broadcastable to [B, N, T, S]");
      }
    }
  }
  FlashJvp(p, tangents, out.untyped_data(), lse.typed_data(),
           FlashJvpResult{dout->untyped_data(), dlse->typed_data()}, XlaParallel(pool));
  return ffi::Error::Success();
}

// Block-sparse tables from their operands: q_indptr [groups * num_q_tiles + 1], q_entries
// [nnz, 2], k_indptr/k_entries the same transposed (or absent: nullptr), masks [M, rows, keys].
ffi::Error DecodeBlockSparse(const AttentionProblem& p, const S32Buffer& q_indptr,
                             const S32Buffer& q_entries, const S32Buffer* k_indptr,
                             const S32Buffer* k_entries, const ffi::AnyBuffer& masks,
                             const ffi::AnyBuffer* masks_t, BlockSparseTables* t) {
  const BlockSparseTiling tiling = BlockSparseTilingFor(p.num_heads / p.num_kv_heads);
  t->num_q_tiles = (p.q_len + tiling.positions - 1) / tiling.positions;
  t->num_k_tiles = (p.kv_len + tiling.keys - 1) / tiling.keys;
  const auto qi = q_indptr.dimensions(), qe = q_entries.dimensions(), md = masks.dimensions();
  if (qi.size() != 1 || (qi[0] - 1) % t->num_q_tiles != 0) {
    return InvalidArgument("block-sparse q_indptr must have groups * " +
                           std::to_string(t->num_q_tiles) + " + 1 entries, got " +
                           ShapeString(qi));
  }
  t->groups = (qi[0] - 1) / t->num_q_tiles;
  if (qe.size() != 2 || qe[1] != 2) {
    return InvalidArgument("block-sparse q_entries must have shape [nnz, 2], got " +
                           ShapeString(qe));
  }
  if (md.size() != 3 || md[1] != tiling.rows || md[2] != tiling.keys ||
      (masks.element_type() != ffi::DataType::PRED && masks.element_type() != ffi::DataType::U8)) {
    return InvalidArgument("block-sparse masks must be bool [M, " + std::to_string(tiling.rows) +
                           ", " + std::to_string(tiling.keys) + "], got " + ShapeString(md));
  }
  t->q_indptr = q_indptr.typed_data();
  t->q_entries = q_entries.typed_data();
  t->q_nnz = qe[0];
  t->masks = static_cast<const uint8_t*>(masks.untyped_data());
  t->num_masks = md[0];
  if (k_indptr != nullptr) {
    const auto ki = k_indptr->dimensions(), ke = k_entries->dimensions();
    if (ki.size() != 1 || ki[0] != t->groups * t->num_k_tiles + 1 || ke.size() != 2 ||
        ke[1] != 2) {
      return InvalidArgument("block-sparse k_indptr/k_entries have the wrong shape: " +
                             ShapeString(ki) + ", " + ShapeString(ke));
    }
    t->k_indptr = k_indptr->typed_data();
    t->k_entries = k_entries->typed_data();
    t->k_nnz = ke[0];
    const auto mt = masks_t->dimensions();
    if (mt.size() != 3 || mt[0] != md[0] || mt[1] != tiling.keys ||
        mt[2] != tiling.rows_padded || masks_t->element_type() != masks.element_type()) {
      return InvalidArgument("block-sparse transposed masks must be bool [M, " +
                             std::to_string(tiling.keys) + ", " +
                             std::to_string(tiling.rows_padded) + "], got " + ShapeString(mt));
    }
    t->masks_t = static_cast<const uint8_t*>(masks_t->untyped_data());
  }
  if (const char* message = ValidateBlockSparse(p, *t)) return InvalidArgument(message);
  return ffi::Error::Success();
}

ffi::Error SparseProblem(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                         const ffi::AnyBuffer& value, int64_t batch, float scale,
                         float soft_cap, const TokenOperands& tokens, AttentionProblem* p) {
  if (auto e = DecodeQueryKeyValue(query, key, value, batch, p); e.failure()) return e;
  if (auto e = DecodeTokens(tokens, p); e.failure()) return e;
  p->scale = scale;
  p->soft_cap = soft_cap;
  if (const char* message = ValidateProblem(*p)) return InvalidArgument(message);
  return ffi::Error::Success();
}

ffi::Error SparseForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                             ffi::AnyBuffer value, S32Buffer q_indptr, S32Buffer q_entries,
                             ffi::AnyBuffer masks, S32Buffer q_positions,
                             S32Buffer kv_positions, S32Buffer q_segments,
                             S32Buffer kv_segments, F32Buffer alibi_slopes,
                             ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                             float soft_cap) {
  const auto od = out->dimensions();
  if (od.size() != 4) return InvalidArgument("output must have rank 4");
  AttentionProblem p;
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  if (auto e = SparseProblem(query, key, value, od[0], scale, soft_cap, tokens, &p);
      e.failure()) {
    return e;
  }
  if (out->element_type() != query.element_type() ||
      !HasShape(od, {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse->dimensions(), {p.batch, p.q_len, p.num_heads})) {
    return InvalidArgument("output shapes do not match the inputs");
  }
  BlockSparseTables tables;
  if (auto e = DecodeBlockSparse(p, q_indptr, q_entries, nullptr, nullptr, masks, nullptr,
                                 &tables);
      e.failure()) {
    return e;
  }
  BlockSparseForward(p, tables, FlashForwardResult{out->untyped_data(), lse->typed_data()},
                     XlaParallel(pool));
  return ffi::Error::Success();
}

ffi::Error SparseBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                              ffi::AnyBuffer value, ffi::AnyBuffer out, F32Buffer lse,
                              ffi::AnyBuffer dout, F32Buffer dlse, S32Buffer q_indptr,
                              S32Buffer q_entries, S32Buffer k_indptr, S32Buffer k_entries,
                              ffi::AnyBuffer masks, ffi::AnyBuffer masks_t,
                              S32Buffer q_positions, S32Buffer kv_positions,
                              S32Buffer q_segments, S32Buffer kv_segments,
                              F32Buffer alibi_slopes, ffi::Result<ffi::AnyBuffer> dq,
                              ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                              float scale, float soft_cap) {
  const auto dqd = dq->dimensions();
  if (dqd.size() != 4) return InvalidArgument("dq must have rank 4");
  AttentionProblem p;
  const TokenOperands tokens{q_positions, kv_positions, q_segments, kv_segments, alibi_slopes};
  if (auto e = SparseProblem(query, key, value, dqd[0], scale, soft_cap, tokens, &p);
      e.failure()) {
    return e;
  }
  FlashBackwardArgs args;
  if (auto e = DecodeBackwardArgs(p, query.element_type(), out, lse, dout, dlse, &*dq, &*dk,
                                  &*dv, nullptr, &args);
      e.failure()) {
    return e;
  }
  BlockSparseTables tables;
  if (auto e = DecodeBlockSparse(p, q_indptr, q_entries, &k_indptr, &k_entries, masks,
                                 &masks_t, &tables);
      e.failure()) {
    return e;
  }
  BlockSparseBackward(p, tables, args, XlaParallel(pool));
  return ffi::Error::Success();
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
ffi::Error DecodeCacheScale(const F32Buffer* scale, const char* name,
                            const DecodeAttentionProblem& p, const float** out) {
  if (scale == nullptr || scale->element_count() == 0) return ffi::Error::Success();
  if (!HasShape(scale->dimensions(), {p.num_pages, p.page_size, p.num_kv_heads})) {
    return InvalidArgument(std::string("decode: ") + name + " must have the cache's shape "
                           "without its last axis, got " + ShapeString(scale->dimensions()));
  }
  *out = scale->typed_data();
  return ffi::Error::Success();
}

// Decode: query [Bq,T,N,H]; key/value storage [P, page, K, H|Hv] (a contiguous cache is P = Bk
// pages of page = Smax); block_tables [Bt, max_pages] (nullptr: contiguous); kv_lengths [Bl].
// Decode's optional token operands (0 elements: absent): query_positions [Bp, T],
// key_value_positions [Bp, max_pages * page_size], alibi_slopes [Ba, N].
// The _v1 targets predate them and pass nullptr.
struct DecodeTokenOperands {
  const S32Buffer& q_positions;
  const S32Buffer& kv_positions;
  const F32Buffer& alibi_slopes;
  // The _v3 (quantized: _v2) targets: query_lengths [Bq] (0 elements: T each).
  const S32Buffer* q_lengths = nullptr;
};

ffi::Error ReadDecodeTokens(const DecodeTokenOperands& in, DecodeAttentionProblem* p) {
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
  if (in.q_lengths != nullptr && in.q_lengths->element_count() != 0) {
    if (in.q_lengths->dimensions().size() != 1) {
      return InvalidArgument("decode: query_lengths must have shape [B], got " +
                             ShapeString(in.q_lengths->dimensions()));
    }
    p->q_lengths = in.q_lengths->typed_data();
    p->q_lengths_batch = in.q_lengths->element_count();
  }
  return ffi::Error::Success();
}

// The quantized targets pass key_scale / value_scale (possibly empty); the others nullptr.
ffi::Error DecodeRun(ffi::ThreadPool pool, const ffi::AnyBuffer& query,
                     const ffi::AnyBuffer& key, const ffi::AnyBuffer& value,
                     const S32Buffer* block_tables, const S32Buffer& kv_lengths,
                     const DecodeTokenOperands* tokens, ffi::Result<ffi::AnyBuffer>& out,
                     F32Result& lse, float scale, float soft_cap, int64_t window_left,
                     bool strict_lengths, const F32Buffer* key_scale = nullptr,
                     const F32Buffer* value_scale = nullptr) {
  const auto q = query.dimensions(), k = key.dimensions(), v = value.dimensions();
  const auto od = out->dimensions();
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || od.size() != 4) {
    return InvalidArgument("decode: query, caches and output must have rank 4, got " +
                           ShapeString(q) + ", " + ShapeString(k) + ", " + ShapeString(v));
  }
  DecodeAttentionProblem p;
  const bool quantized = key_scale != nullptr;
  if (quantized) {
    if (!ToDType(query.element_type(), &p.dtype) ||
        out->element_type() != query.element_type() ||
        !ToCacheQuant(key.element_type(), &p.cache_quant) ||
        value.element_type() != key.element_type()) {
      return InvalidArgument("decode: a quantized cache must be int8, float8_e4m3fn or "
                             "float8_e5m2 (keys and values alike) with a float32, bfloat16 or "
                             "float16 query");
    }
  } else if (!ToDType(query.element_type(), &p.dtype) ||
             key.element_type() != query.element_type() ||
             value.element_type() != query.element_type() ||
             out->element_type() != query.element_type()) {
    return InvalidArgument("decode: query and caches must share one of float32, bfloat16, "
                           "float16");
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
      return InvalidArgument("decode: block_tables must be [B, max_pages], got " +
                             ShapeString(bt));
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
  p.scale = scale;
  p.soft_cap = soft_cap;
  p.window_left = window_left;
  if (tokens != nullptr) {
    if (auto e = ReadDecodeTokens(*tokens, &p); e.failure()) return e;
  }
  if (const char* message = ValidateDecodeProblem(p)) {
    return InvalidArgument(std::string("decode: ") + message);
  }
  if (quantized) {
    if (value_batch_differs) {  // the scales are indexed by the key cache's rows
      return InvalidArgument("decode: a quantized value cache must have the key cache's batch");
    }
    if (auto e = DecodeCacheScale(key_scale, "key_scale", p, &p.key_scale); e.failure()) {
      return e;
    }
    if (auto e = DecodeCacheScale(value_scale, "value_scale", p, &p.value_scale); e.failure()) {
      return e;
    }
  }
  if (!HasShape(od, {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse->dimensions(), {p.batch, p.q_len, p.num_heads})) {
    return InvalidArgument("decode: output shapes do not match the inputs");
  }
  if (strict_lengths) {
    // Opt-in: a length past the cache (e.g. a KV cache stepped past its end under jit) is an
    // error rather than clamped.
    const int64_t capacity = p.max_pages * p.page_size;
    for (int64_t b = 0; b < p.kv_lengths_batch; ++b) {
      if (p.kv_lengths[b] < 0 || p.kv_lengths[b] > capacity) {
        return InvalidArgument("decode: kv_lengths[" + std::to_string(b) + "] = " +
                               std::to_string(p.kv_lengths[b]) + " is outside [0, " +
                               std::to_string(capacity) + "], the cache length (the KV cache "
                               "overflowed: a step past its max_length?)");
      }
    }
  }
  if (const char* message = ValidateDecodePages(p)) {
    return InvalidArgument(std::string("paged decode: ") + message);
  }
  const int64_t failed_bytes =
      DecodeForward(p, DecodeResult{out->untyped_data(), lse->typed_data()}, XlaParallel(pool));
  if (failed_bytes != 0) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "jaxattn: decode: could not allocate " + std::to_string(failed_bytes) +
                          " bytes of scratch memory");
  }
  return ffi::Error::Success();
}

ffi::Error DecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                             ffi::AnyBuffer value, S32Buffer kv_lengths,
                             ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                             float soft_cap, int64_t window_left) {
  return DecodeRun(pool, query, key, value, nullptr, kv_lengths, nullptr, out, lse, scale,
                   soft_cap, window_left, false);
}

ffi::Error PagedDecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                  ffi::AnyBuffer key_pages, ffi::AnyBuffer value_pages,
                                  S32Buffer block_tables, S32Buffer kv_lengths,
                                  ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                                  float soft_cap, int64_t window_left) {
  return DecodeRun(pool, query, key_pages, value_pages, &block_tables, kv_lengths, nullptr, out,
                   lse, scale, soft_cap, window_left, false);
}

// _v2: the _v1 targets plus the token operands (query_positions, key_value_positions,
// alibi_slopes; 0 elements: absent) and the strict_lengths attribute (the _v1 layout keeps
// working).
ffi::Error DecodeForwardV2Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                               ffi::AnyBuffer value, S32Buffer kv_lengths,
                               S32Buffer q_positions, S32Buffer kv_positions,
                               F32Buffer alibi_slopes, ffi::Result<ffi::AnyBuffer> out,
                               F32Result lse, float scale, float soft_cap, int64_t window_left,
                               bool strict_lengths) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes};
  return DecodeRun(pool, query, key, value, nullptr, kv_lengths, &tokens, out, lse, scale,
                   soft_cap, window_left, strict_lengths);
}

ffi::Error PagedDecodeForwardV2Impl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                    ffi::AnyBuffer key_pages, ffi::AnyBuffer value_pages,
                                    S32Buffer block_tables, S32Buffer kv_lengths,
                                    S32Buffer q_positions, S32Buffer kv_positions,
                                    F32Buffer alibi_slopes, ffi::Result<ffi::AnyBuffer> out,
                                    F32Result lse, float scale, float soft_cap,
                                    int64_t window_left, bool strict_lengths) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes};
  return DecodeRun(pool, query, key_pages, value_pages, &block_tables, kv_lengths, &tokens, out,
                   lse, scale, soft_cap, window_left, strict_lengths);
}

// Quantized caches: the _v2 targets plus key_scale and value_scale after the caches.
ffi::Error QuantDecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                  ffi::AnyBuffer key, ffi::AnyBuffer value, F32Buffer key_scale,
                                  F32Buffer value_scale, S32Buffer kv_lengths,
                                  S32Buffer q_positions, S32Buffer kv_positions,
                                  F32Buffer alibi_slopes, ffi::Result<ffi::AnyBuffer> out,
                                  F32Result lse, float scale, float soft_cap,
                                  int64_t window_left, bool strict_lengths) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes};
  return DecodeRun(pool, query, key, value, nullptr, kv_lengths, &tokens, out, lse, scale,
                   soft_cap, window_left, strict_lengths, &key_scale, &value_scale);
}

ffi::Error QuantPagedDecodeForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                       ffi::AnyBuffer key_pages, ffi::AnyBuffer value_pages,
                                       F32Buffer key_scale, F32Buffer value_scale,
                                       S32Buffer block_tables, S32Buffer kv_lengths,
                                       S32Buffer q_positions, S32Buffer kv_positions,
                                       F32Buffer alibi_slopes,
                                       ffi::Result<ffi::AnyBuffer> out, F32Result lse,
                                       float scale, float soft_cap, int64_t window_left,
                                       bool strict_lengths) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes};
  return DecodeRun(pool, query, key_pages, value_pages, &block_tables, kv_lengths, &tokens, out,
                   lse, scale, soft_cap, window_left, strict_lengths, &key_scale, &value_scale);
}

// _v3 (quantized: _v2): the targets above plus query_lengths [B] int32 (0 elements: T each)
// after the token operands; any T (beyond 16 tokens the flash kernels run over the cache).
ffi::Error DecodeForwardV3Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                               ffi::AnyBuffer value, S32Buffer kv_lengths,
                               S32Buffer q_positions, S32Buffer kv_positions,
                               F32Buffer alibi_slopes, S32Buffer q_lengths,
                               ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                               float soft_cap, int64_t window_left, bool strict_lengths) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes, &q_lengths};
  return DecodeRun(pool, query, key, value, nullptr, kv_lengths, &tokens, out, lse, scale,
                   soft_cap, window_left, strict_lengths);
}

ffi::Error PagedDecodeForwardV3Impl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                    ffi::AnyBuffer key_pages, ffi::AnyBuffer value_pages,
                                    S32Buffer block_tables, S32Buffer kv_lengths,
                                    S32Buffer q_positions, S32Buffer kv_positions,
                                    F32Buffer alibi_slopes, S32Buffer q_lengths,
                                    ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                                    float soft_cap, int64_t window_left, bool strict_lengths) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes, &q_lengths};
  return DecodeRun(pool, query, key_pages, value_pages, &block_tables, kv_lengths, &tokens, out,
                   lse, scale, soft_cap, window_left, strict_lengths);
}

ffi::Error QuantDecodeForwardV2Impl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                    ffi::AnyBuffer key, ffi::AnyBuffer value,
                                    F32Buffer key_scale, F32Buffer value_scale,
                                    S32Buffer kv_lengths, S32Buffer q_positions,
                                    S32Buffer kv_positions, F32Buffer alibi_slopes,
                                    S32Buffer q_lengths, ffi::Result<ffi::AnyBuffer> out,
                                    F32Result lse, float scale, float soft_cap,
                                    int64_t window_left, bool strict_lengths) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes, &q_lengths};
  return DecodeRun(pool, query, key, value, nullptr, kv_lengths, &tokens, out, lse, scale,
                   soft_cap, window_left, strict_lengths, &key_scale, &value_scale);
}

ffi::Error QuantPagedDecodeForwardV2Impl(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                         ffi::AnyBuffer key_pages, ffi::AnyBuffer value_pages,
                                         F32Buffer key_scale, F32Buffer value_scale,
                                         S32Buffer block_tables, S32Buffer kv_lengths,
                                         S32Buffer q_positions, S32Buffer kv_positions,
                                         F32Buffer alibi_slopes, S32Buffer q_lengths,
                                         ffi::Result<ffi::AnyBuffer> out, F32Result lse,
                                         float scale, float soft_cap, int64_t window_left,
                                         bool strict_lengths) {
  const DecodeTokenOperands tokens{q_positions, kv_positions, alibi_slopes, &q_lengths};
  return DecodeRun(pool, query, key_pages, value_pages, &block_tables, kv_lengths, &tokens, out,
                   lse, scale, soft_cap, window_left, strict_lengths, &key_scale, &value_scale);
}

// Cache writes: pool [P, L, ...] (aliased to the result: in place under buffer donation),
// rows [B, T, ...] of the pool's dtype and trailing shape, pages and slots [B, T] int32.
ffi::Error CacheWriteImpl(ffi::AnyBuffer pool, ffi::AnyBuffer rows, S32Buffer pages,
                          S32Buffer slots, ffi::Result<ffi::AnyBuffer> out) {
  const auto pd = pool.dimensions(), rd = rows.dimensions();
  if (pd.size() < 2 || rd.size() != pd.size() || rows.element_type() != pool.element_type() ||
      out->element_type() != pool.element_type() ||
      !std::equal(pd.begin() + 2, pd.end(), rd.begin() + 2) ||
      out->dimensions().size() != pd.size() ||
      !std::equal(pd.begin(), pd.end(), out->dimensions().begin())) {
    return InvalidArgument("cache write: rows " + ShapeString(rd) + " do not fit the cache " +
                           ShapeString(pd));
  }
  const int64_t count = rd[0] * rd[1];
  if (pages.element_count() != count || slots.element_count() != count) {
    return InvalidArgument("cache write: pages and slots must have one entry per row");
  }
  CacheRowWrite w;
  w.num_pages = pd[0];
  w.page_size = pd[1];
  w.row_bytes = w.num_pages * w.page_size == 0
                    ? 0 : static_cast<int64_t>(pool.size_bytes()) / (w.num_pages * w.page_size);
  w.pool = out->untyped_data();
  // XLA hands the aliased operand's buffer in as the result (copied first unless donated).
  if (w.pool != pool.untyped_data()) std::memcpy(w.pool, pool.untyped_data(), pool.size_bytes());
  w.rows = rows.untyped_data();
  w.pages = pages.typed_data();
  w.slots = slots.typed_data();
  w.count = count;
  WriteCacheRows(w);
  return ffi::Error::Success();
}

template <typename Binding>
auto BindDecodeResults(Binding binding) {
  return std::move(binding).template Ret<ffi::AnyBuffer>()  // out
      .template Ret<ffi::Buffer<ffi::F32>>()                // lse
      .template Attr<float>("scale")
      .template Attr<float>("soft_cap")
      .template Attr<int64_t>("window_left");
}

// The _v1 flash and block-sparse targets keep their original operand layout (exported
// programs may call them): they run the _v2 handlers with every token operand absent.
template <ffi::DataType kType>
ffi::Buffer<kType> AbsentToken() {
  static int64_t zero_dims[1] = {0};
  static const XLA_FFI_Buffer empty{XLA_FFI_Buffer_STRUCT_SIZE, nullptr,
                                    static_cast<XLA_FFI_DataType>(kType), nullptr, 1, zero_dims};
  return ffi::Buffer<kType>(&empty);
}

ffi::Error FlashForwardV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                              ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                              S32Buffer q_lengths, S32Buffer kv_lengths,
                              ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                              float soft_cap, bool is_causal, int64_t window_left,
                              int64_t window_right) {
  const S32Buffer none = AbsentToken<ffi::S32>();
  return FlashForwardImpl(pool, query, key, value, bias, mask, q_lengths, kv_lengths, none,
                          none, none, none, AbsentToken<ffi::F32>(), out, lse, scale, soft_cap,
                          is_causal, window_left, window_right);
}

ffi::Error FlashBackwardV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                               ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                               S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                               F32Buffer lse, ffi::AnyBuffer dout, F32Buffer dlse,
                               ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                               ffi::Result<ffi::AnyBuffer> dv, float scale, float soft_cap,
                               bool is_causal, int64_t window_left, int64_t window_right) {
  const S32Buffer none = AbsentToken<ffi::S32>();
  return FlashBackwardImpl(pool, query, key, value, bias, mask, q_lengths, kv_lengths, out, lse,
                           dout, dlse, none, none, none, none, AbsentToken<ffi::F32>(), dq, dk,
                           dv, scale, soft_cap, is_causal, window_left, window_right);
}

ffi::Error FlashLogitsGradV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                                 ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                                 S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                                 F32Buffer lse, ffi::AnyBuffer dout, F32Buffer dlse,
                                 F32Result dlogits, float scale, float soft_cap, bool is_causal,
                                 int64_t window_left, int64_t window_right) {
  const S32Buffer none = AbsentToken<ffi::S32>();
  return FlashLogitsGradImpl(pool, query, key, value, bias, mask, q_lengths, kv_lengths, out,
                             lse, dout, dlse, none, none, none, none, AbsentToken<ffi::F32>(),
                             dlogits, scale, soft_cap, is_causal, window_left, window_right);
}

ffi::Error SparseForwardV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                               ffi::AnyBuffer value, S32Buffer q_indptr, S32Buffer q_entries,
                               ffi::AnyBuffer masks, ffi::Result<ffi::AnyBuffer> out,
                               F32Result lse, float scale, float soft_cap) {
  const S32Buffer none = AbsentToken<ffi::S32>();
  return SparseForwardImpl(pool, query, key, value, q_indptr, q_entries, masks, none, none, none,
                           none, AbsentToken<ffi::F32>(), out, lse, scale, soft_cap);
}

ffi::Error SparseBackwardV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                                ffi::AnyBuffer value, ffi::AnyBuffer out, F32Buffer lse,
                                ffi::AnyBuffer dout, F32Buffer dlse, S32Buffer q_indptr,
                                S32Buffer q_entries, S32Buffer k_indptr, S32Buffer k_entries,
                                ffi::AnyBuffer masks, ffi::AnyBuffer masks_t,
                                ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                                ffi::Result<ffi::AnyBuffer> dv, float scale, float soft_cap) {
  const S32Buffer none = AbsentToken<ffi::S32>();
  return SparseBackwardImpl(pool, query, key, value, out, lse, dout, dlse, q_indptr, q_entries,
                            k_indptr, k_entries, masks, masks_t, none, none, none, none,
                            AbsentToken<ffi::F32>(), dq, dk, dv, scale, soft_cap);
}

// The operands and attributes every flash target shares, in order.
template <typename Binding>
auto BindProblem(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // query
      .template Arg<ffi::AnyBuffer>()            // key
      .template Arg<ffi::AnyBuffer>()            // value
      .template Arg<ffi::AnyBuffer>()            // bias (0 elements: none)
      .template Arg<ffi::AnyBuffer>()            // mask (0 elements: none)
      .template Arg<S32Buffer>()                 // query_seq_lengths (0 elements: none)
      .template Arg<S32Buffer>();                // key_value_seq_lengths
}

// The token operands of the flash targets, after their other operands.
template <typename Binding>
auto BindTokens(Binding binding) {
  return std::move(binding).template Arg<S32Buffer>()  // query_positions (0 elements: none)
      .template Arg<S32Buffer>()                        // key_value_positions
      .template Arg<S32Buffer>()                        // query_segment_ids
      .template Arg<S32Buffer>()                        // key_value_segment_ids
      .template Arg<ffi::Buffer<ffi::F32>>();           // alibi_slopes
}

template <typename Binding>
auto BindAttrs(Binding binding) {
  return std::move(binding).template Attr<float>("scale")
      .template Attr<float>("soft_cap")
      .template Attr<bool>("is_causal")
      .template Attr<int64_t>("window_left")
      .template Attr<int64_t>("window_right");
}

// The token operands of the _v2 and quantized decode targets, after kv_lengths.
template <typename Binding>
auto BindDecodeTokens(Binding binding) {
  return std::move(binding).template Arg<S32Buffer>()  // query_positions (0 elements: none)
      .template Arg<S32Buffer>()                        // key_value_positions
      .template Arg<ffi::Buffer<ffi::F32>>();           // alibi_slopes
}

template <typename Binding>
auto BindDecodeResultsV2(Binding binding) {
  return std::move(binding).template Ret<ffi::AnyBuffer>()  // out
      .template Ret<ffi::Buffer<ffi::F32>>()                // lse
      .template Attr<float>("scale")
      .template Attr<float>("soft_cap")
      .template Attr<int64_t>("window_left")
      .template Attr<bool>("strict_lengths");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashForwardHandler, FlashForwardImpl,
    BindAttrs(BindTokens(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()))
                  .Ret<ffi::AnyBuffer>()    // out
                  .Ret<ffi::Buffer<ffi::F32>>()));  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashBackwardHandler, FlashBackwardImpl,
    BindAttrs(BindTokens(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                             .Arg<ffi::AnyBuffer>()          // out
                             .Arg<ffi::Buffer<ffi::F32>>()   // lse
                             .Arg<ffi::AnyBuffer>()          // dout
                             .Arg<ffi::Buffer<ffi::F32>>())  // dlse (0 elements: none)
                  .Ret<ffi::AnyBuffer>()             // dq
                  .Ret<ffi::AnyBuffer>()             // dk
                  .Ret<ffi::AnyBuffer>()));          // dv

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashLogitsGradHandler, FlashLogitsGradImpl,
    BindAttrs(BindTokens(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                             .Arg<ffi::AnyBuffer>()          // out
                             .Arg<ffi::Buffer<ffi::F32>>()   // lse
                             .Arg<ffi::AnyBuffer>()          // dout
                             .Arg<ffi::Buffer<ffi::F32>>())  // dlse
                  .Ret<ffi::Buffer<ffi::F32>>()));   // dlogits

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashJvpHandler, FlashJvpImpl,
    BindAttrs(BindTokens(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                             .Arg<ffi::AnyBuffer>()          // out
                             .Arg<ffi::Buffer<ffi::F32>>()   // lse
                             .Arg<ffi::AnyBuffer>()          // dq (tangent)
                             .Arg<ffi::AnyBuffer>()          // dk
                             .Arg<ffi::AnyBuffer>()          // dv
                             .Arg<ffi::AnyBuffer>())         // dbias (0 elements: none)
                  .Ret<ffi::AnyBuffer>()             // dout
                  .Ret<ffi::Buffer<ffi::F32>>()));   // dlse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SparseForwardHandler, SparseForwardImpl,
    BindTokens(ffi::Ffi::Bind()
                   .Ctx<ffi::ThreadPool>()
                   .Arg<ffi::AnyBuffer>()     // query
                   .Arg<ffi::AnyBuffer>()     // key
                   .Arg<ffi::AnyBuffer>()     // value
                   .Arg<S32Buffer>()          // q_indptr
                   .Arg<S32Buffer>()          // q_entries
                   .Arg<ffi::AnyBuffer>())    // masks
        .Ret<ffi::AnyBuffer>()     // out
        .Ret<ffi::Buffer<ffi::F32>>()  // lse
        .Attr<float>("scale")
        .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SparseBackwardHandler, SparseBackwardImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()     // query
        .Arg<ffi::AnyBuffer>()     // key
        .Arg<ffi::AnyBuffer>()     // value
        .Arg<ffi::AnyBuffer>()     // out
        .Arg<ffi::Buffer<ffi::F32>>()  // lse
        .Arg<ffi::AnyBuffer>()     // dout
        .Arg<ffi::Buffer<ffi::F32>>()  // dlse (0 elements: none)
        .Arg<S32Buffer>()          // q_indptr
        .Arg<S32Buffer>()          // q_entries
        .Arg<S32Buffer>()          // k_indptr
        .Arg<S32Buffer>()          // k_entries
        .Arg<ffi::AnyBuffer>()     // masks
        .Arg<ffi::AnyBuffer>()     // masks_t (transposed)
        .Arg<S32Buffer>()          // query_positions (0 elements: none)
        .Arg<S32Buffer>()          // key_value_positions
        .Arg<S32Buffer>()          // query_segment_ids
        .Arg<S32Buffer>()          // key_value_segment_ids
        .Arg<ffi::Buffer<ffi::F32>>()  // alibi_slopes
        .Ret<ffi::AnyBuffer>()     // dq
        .Ret<ffi::AnyBuffer>()     // dk
        .Ret<ffi::AnyBuffer>()     // dv
        .Attr<float>("scale")
        .Attr<float>("soft_cap"));

// The original (_v1) layouts: no token operands.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashForwardV1Handler, FlashForwardV1Impl,
    BindAttrs(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                  .Ret<ffi::AnyBuffer>()    // out
                  .Ret<ffi::Buffer<ffi::F32>>()));  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashBackwardV1Handler, FlashBackwardV1Impl,
    BindAttrs(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                  .Arg<ffi::AnyBuffer>()             // out
                  .Arg<ffi::Buffer<ffi::F32>>()      // lse
                  .Arg<ffi::AnyBuffer>()             // dout
                  .Arg<ffi::Buffer<ffi::F32>>()      // dlse (0 elements: none)
                  .Ret<ffi::AnyBuffer>()             // dq
                  .Ret<ffi::AnyBuffer>()             // dk
                  .Ret<ffi::AnyBuffer>()));          // dv

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    FlashLogitsGradV1Handler, FlashLogitsGradV1Impl,
    BindAttrs(BindProblem(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                  .Arg<ffi::AnyBuffer>()             // out
                  .Arg<ffi::Buffer<ffi::F32>>()      // lse
                  .Arg<ffi::AnyBuffer>()             // dout
                  .Arg<ffi::Buffer<ffi::F32>>()      // dlse
                  .Ret<ffi::Buffer<ffi::F32>>()));   // dlogits

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SparseForwardV1Handler, SparseForwardV1Impl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()     // query
        .Arg<ffi::AnyBuffer>()     // key
        .Arg<ffi::AnyBuffer>()     // value
        .Arg<S32Buffer>()          // q_indptr
        .Arg<S32Buffer>()          // q_entries
        .Arg<ffi::AnyBuffer>()     // masks
        .Ret<ffi::AnyBuffer>()     // out
        .Ret<ffi::Buffer<ffi::F32>>()  // lse
        .Attr<float>("scale")
        .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SparseBackwardV1Handler, SparseBackwardV1Impl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()     // query
        .Arg<ffi::AnyBuffer>()     // key
        .Arg<ffi::AnyBuffer>()     // value
        .Arg<ffi::AnyBuffer>()     // out
        .Arg<ffi::Buffer<ffi::F32>>()  // lse
        .Arg<ffi::AnyBuffer>()     // dout
        .Arg<ffi::Buffer<ffi::F32>>()  // dlse (0 elements: none)
        .Arg<S32Buffer>()          // q_indptr
        .Arg<S32Buffer>()          // q_entries
        .Arg<S32Buffer>()          // k_indptr
        .Arg<S32Buffer>()          // k_entries
        .Arg<ffi::AnyBuffer>()     // masks
        .Arg<ffi::AnyBuffer>()     // masks_t (transposed)
        .Ret<ffi::AnyBuffer>()     // dq
        .Ret<ffi::AnyBuffer>()     // dk
        .Ret<ffi::AnyBuffer>()     // dv
        .Attr<float>("scale")
        .Attr<float>("soft_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeForwardHandler, DecodeForwardImpl,
    BindDecodeResults(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::AnyBuffer>()     // query
                          .Arg<ffi::AnyBuffer>()     // key_cache
                          .Arg<ffi::AnyBuffer>()     // value_cache
                          .Arg<S32Buffer>()));       // kv_lengths

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PagedDecodeForwardHandler, PagedDecodeForwardImpl,
    BindDecodeResults(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::AnyBuffer>()     // query
                          .Arg<ffi::AnyBuffer>()     // key_pages
                          .Arg<ffi::AnyBuffer>()     // value_pages
                          .Arg<S32Buffer>()          // block_tables
                          .Arg<S32Buffer>()));       // kv_lengths

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeForwardV2Handler, DecodeForwardV2Impl,
    BindDecodeResultsV2(BindDecodeTokens(ffi::Ffi::Bind()
                            .Ctx<ffi::ThreadPool>()
                            .Arg<ffi::AnyBuffer>()     // query
                            .Arg<ffi::AnyBuffer>()     // key_cache
                            .Arg<ffi::AnyBuffer>()     // value_cache
                            .Arg<S32Buffer>())));      // kv_lengths

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PagedDecodeForwardV2Handler, PagedDecodeForwardV2Impl,
    BindDecodeResultsV2(BindDecodeTokens(ffi::Ffi::Bind()
                            .Ctx<ffi::ThreadPool>()
                            .Arg<ffi::AnyBuffer>()     // query
                            .Arg<ffi::AnyBuffer>()     // key_pages
                            .Arg<ffi::AnyBuffer>()     // value_pages
                            .Arg<S32Buffer>()          // block_tables
                            .Arg<S32Buffer>())));      // kv_lengths

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    CacheWriteHandler, CacheWriteImpl,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()     // pool [P, L, ...] (aliased to the result)
        .Arg<ffi::AnyBuffer>()     // rows [B, T, ...]
        .Arg<S32Buffer>()          // pages [B, T]
        .Arg<S32Buffer>()          // slots [B, T]
        .Ret<ffi::AnyBuffer>());   // the pool

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    QuantDecodeForwardHandler, QuantDecodeForwardImpl,
    BindDecodeResultsV2(BindDecodeTokens(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::AnyBuffer>()     // query
                          .Arg<ffi::AnyBuffer>()     // key_cache (int8 / float8)
                          .Arg<ffi::AnyBuffer>()     // value_cache
                          .Arg<F32Buffer>()          // key_scale (0 elements: 1)
                          .Arg<F32Buffer>()          // value_scale
                          .Arg<S32Buffer>())));      // kv_lengths

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    QuantPagedDecodeForwardHandler, QuantPagedDecodeForwardImpl,
    BindDecodeResultsV2(BindDecodeTokens(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::AnyBuffer>()     // query
                          .Arg<ffi::AnyBuffer>()     // key_pages (int8 / float8)
                          .Arg<ffi::AnyBuffer>()     // value_pages
                          .Arg<F32Buffer>()          // key_scale (0 elements: 1)
                          .Arg<F32Buffer>()          // value_scale
                          .Arg<S32Buffer>()          // block_tables
                          .Arg<S32Buffer>())));      // kv_lengths

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DecodeForwardV3Handler, DecodeForwardV3Impl,
    BindDecodeResultsV2(BindDecodeTokens(ffi::Ffi::Bind()
                            .Ctx<ffi::ThreadPool>()
                            .Arg<ffi::AnyBuffer>()     // query
                            .Arg<ffi::AnyBuffer>()     // key_cache
                            .Arg<ffi::AnyBuffer>()     // value_cache
                            .Arg<S32Buffer>())     // kv_lengths
                        .Arg<S32Buffer>()));       // query_lengths

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    PagedDecodeForwardV3Handler, PagedDecodeForwardV3Impl,
    BindDecodeResultsV2(BindDecodeTokens(ffi::Ffi::Bind()
                            .Ctx<ffi::ThreadPool>()
                            .Arg<ffi::AnyBuffer>()     // query
                            .Arg<ffi::AnyBuffer>()     // key_pages
                            .Arg<ffi::AnyBuffer>()     // value_pages
                            .Arg<S32Buffer>()          // block_tables
                            .Arg<S32Buffer>())     // kv_lengths
                        .Arg<S32Buffer>()));       // query_lengths

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    QuantDecodeForwardV2Handler, QuantDecodeForwardV2Impl,
    BindDecodeResultsV2(BindDecodeTokens(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::AnyBuffer>()     // query
                          .Arg<ffi::AnyBuffer>()     // key_cache (int8 / float8)
                          .Arg<ffi::AnyBuffer>()     // value_cache
                          .Arg<F32Buffer>()          // key_scale (0 elements: 1)
                          .Arg<F32Buffer>()          // value_scale
                          .Arg<S32Buffer>())     // kv_lengths
                        .Arg<S32Buffer>()));       // query_lengths

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    QuantPagedDecodeForwardV2Handler, QuantPagedDecodeForwardV2Impl,
    BindDecodeResultsV2(BindDecodeTokens(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::AnyBuffer>()     // query
                          .Arg<ffi::AnyBuffer>()     // key_pages (int8 / float8)
                          .Arg<ffi::AnyBuffer>()     // value_pages
                          .Arg<F32Buffer>()          // key_scale (0 elements: 1)
                          .Arg<F32Buffer>()          // value_scale
                          .Arg<S32Buffer>()          // block_tables
                          .Arg<S32Buffer>())     // kv_lengths
                        .Arg<S32Buffer>()));       // query_lengths

}  // namespace jaxattn

// Gated linear attention (gated_linear.h).
namespace jaxattn {
namespace {

// query [Bq,T,N,Hk], key [Bk,T,N,Hk], value [Bv,T,N,Hv], log_gate [Bg,T,N,Hk],
// initial_state [Bs,N,Hk,Hv] float32 (0 elements: none), for outputs of batch `batch`.
ffi::Error DecodeGatedLinear(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                             const ffi::AnyBuffer& value, const ffi::AnyBuffer& log_gate,
                             const ffi::AnyBuffer& initial_state, int64_t batch, float scale,
                             GatedLinearProblem* p) {
  const auto q = query.dimensions(), k = key.dimensions(), v = value.dimensions(),
             g = log_gate.dimensions();
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || g.size() != 4) {
    return InvalidArgument("gated linear attention: query, key, value and log_gate must have "
                           "rank 4, got " + ShapeString(q) + ", " + ShapeString(k) + ", " +
                           ShapeString(v) + ", " + ShapeString(g));
  }
  if (!ToDType(query.element_type(), &p->dtype) ||
      key.element_type() != query.element_type() ||
      value.element_type() != query.element_type()) {
    return InvalidArgument("gated linear attention: query, key and value must share one of "
                           "float32, bfloat16, float16");
  }
  if (!ToDType(log_gate.element_type(), &p->gate_dtype)) {
    return InvalidArgument("gated linear attention: log_gate must be float32, bfloat16 or "
                           "float16");
  }
  for (const auto* d : {&k, &v, &g}) {
    if ((*d)[1] != q[1] || (*d)[2] != q[2]) {
      return InvalidArgument("gated linear attention: inconsistent shapes: query " +
                             ShapeString(q) + ", key " + ShapeString(k) + ", value " +
                             ShapeString(v) + ", log_gate " + ShapeString(g));
    }
  }
  if (k[3] != q[3] || g[3] != q[3]) {
    return InvalidArgument("gated linear attention: query, key and log_gate must share the "
                           "head dim, got " + ShapeString(q) + ", " + ShapeString(k) + ", " +
                           ShapeString(g));
  }
  p->batch = batch;
  p->seq_len = q[1];
  p->num_heads = q[2];
  p->key_dim = q[3];
  p->value_dim = v[3];
  p->q_batch = q[0];
  p->k_batch = k[0];
  p->v_batch = v[0];
  p->g_batch = g[0];
  p->query = query.untyped_data();
  p->key = key.untyped_data();
  p->value = value.untyped_data();
  p->log_gate = log_gate.untyped_data();
  p->scale = scale;
  if (initial_state.element_count() > 0) {
    const auto s = initial_state.dimensions();
    if (initial_state.element_type() != ffi::DataType::F32 || s.size() != 4 ||
        s[1] != p->num_heads || s[2] != p->key_dim || s[3] != p->value_dim) {
      return InvalidArgument("gated linear attention: initial_state must be float32 [B, N, "
                             "Hk, Hv] = [B, " + std::to_string(p->num_heads) + ", " +
                             std::to_string(p->key_dim) + ", " + std::to_string(p->value_dim) +
                             "], got " + ShapeString(s));
    }
    p->initial_state = static_cast<const float*>(initial_state.untyped_data());
    p->state_batch = s[0];
  }
  if (const char* message = ValidateGatedLinear(*p)) {
    return InvalidArgument(std::string("gated linear attention: ") + message);
  }
  return ffi::Error::Success();
}

ffi::Error GatedLinearForwardFfi(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                                 ffi::AnyBuffer value, ffi::AnyBuffer log_gate,
                                 ffi::AnyBuffer initial_state, ffi::Result<ffi::AnyBuffer> out,
                                 F32Result final_state, float scale) {
  const auto od = out->dimensions();
  if (od.size() != 4) return InvalidArgument("gated linear attention: out must have rank 4");
  GatedLinearProblem p;
  if (auto e = DecodeGatedLinear(query, key, value, log_gate, initial_state, od[0], scale, &p);
      e.failure()) {
    return e;
  }
  if (out->element_type() != query.element_type() ||
      !HasShape(od, {p.batch, p.seq_len, p.num_heads, p.value_dim}) ||
      !HasShape(final_state->dimensions(), {p.batch, p.num_heads, p.key_dim, p.value_dim})) {
    return InvalidArgument("gated linear attention: output shapes do not match the inputs");
  }
  if (const char* message = GatedLinearForward(
          p, GatedLinearForwardResult{out->untyped_data(), final_state->typed_data()},
          XlaParallel(pool))) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, std::string("jaxattn: ") + message);
  }
  return ffi::Error::Success();
}

ffi::Error GatedLinearBackwardFfi(ffi::ThreadPool pool, ffi::AnyBuffer query,
                                  ffi::AnyBuffer key, ffi::AnyBuffer value,
                                  ffi::AnyBuffer log_gate, ffi::AnyBuffer initial_state,
                                  ffi::AnyBuffer dout, F32Buffer dfinal_state,
                                  ffi::Result<ffi::AnyBuffer> dquery,
                                  ffi::Result<ffi::AnyBuffer> dkey,
                                  ffi::Result<ffi::AnyBuffer> dvalue,
                                  ffi::Result<ffi::AnyBuffer> dlog_gate,
                                  F32Result dinitial_state, float scale) {
  const auto dqd = dquery->dimensions();
  if (dqd.size() != 4) return InvalidArgument("gated linear attention: dquery must have rank 4");
  GatedLinearProblem p;
  if (auto e = DecodeGatedLinear(query, key, value, log_gate, initial_state, dqd[0], scale,
                                 &p);
      e.failure()) {
    return e;
  }
  const int64_t B = p.batch, T = p.seq_len, N = p.num_heads, Hk = p.key_dim, Hv = p.value_dim;
  const auto is = [](const ffi::AnyBuffer& x, ffi::DataType type,
                     std::initializer_list<int64_t> shape) {
    return x.element_type() == type && HasShape(x.dimensions(), shape);
  };
  const ffi::DataType dtype = query.element_type();
  if (!is(dout, dtype, {B, T, N, Hv}) ||
      (dfinal_state.element_count() != 0 &&
       !HasShape(dfinal_state.dimensions(), {B, N, Hk, Hv})) ||
      !is(*dquery, dtype, {B, T, N, Hk}) || !is(*dkey, dtype, {B, T, N, Hk}) ||
      !is(*dvalue, dtype, {B, T, N, Hv}) ||
      !is(*dlog_gate, log_gate.element_type(), {B, T, N, Hk}) ||
      !HasShape(dinitial_state->dimensions(), {B, N, Hk, Hv})) {
    return InvalidArgument("gated linear attention backward: operand shapes do not match the "
                           "inputs");
  }
  GatedLinearBackwardArgs args;
  args.dout = dout.untyped_data();
  args.dfinal_state = dfinal_state.element_count() ? dfinal_state.typed_data() : nullptr;
  args.dquery = dquery->untyped_data();
  args.dkey = dkey->untyped_data();
  args.dvalue = dvalue->untyped_data();
  args.dlog_gate = dlog_gate->untyped_data();
  args.dinitial_state = dinitial_state->typed_data();
  if (const char* message = GatedLinearBackward(p, args, XlaParallel(pool))) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, std::string("jaxattn: ") + message);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatedLinearForwardHandler, GatedLinearForwardFfi,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // query
                                  .Arg<ffi::AnyBuffer>()         // key
                                  .Arg<ffi::AnyBuffer>()         // value
                                  .Arg<ffi::AnyBuffer>()         // log_gate
                                  .Arg<ffi::AnyBuffer>()         // initial_state (0: none)
                                  .Ret<ffi::AnyBuffer>()         // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // final_state
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatedLinearBackwardHandler, GatedLinearBackwardFfi,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // query
                                  .Arg<ffi::AnyBuffer>()         // key
                                  .Arg<ffi::AnyBuffer>()         // value
                                  .Arg<ffi::AnyBuffer>()         // log_gate
                                  .Arg<ffi::AnyBuffer>()         // initial_state (0: none)
                                  .Arg<ffi::AnyBuffer>()         // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dfinal_state (0: none)
                                  .Ret<ffi::AnyBuffer>()         // dquery
                                  .Ret<ffi::AnyBuffer>()         // dkey
                                  .Ret<ffi::AnyBuffer>()         // dvalue
                                  .Ret<ffi::AnyBuffer>()         // dlog_gate
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dinitial_state
                                  .Attr<float>("scale"));

}  // namespace jaxattn

namespace jaxattn {

std::vector<FfiTarget> FfiTargets() {
  return {
      {"jaxattn_flash_fwd_v1", reinterpret_cast<void*>(FlashForwardV1Handler)},
      {"jaxattn_flash_bwd_v1", reinterpret_cast<void*>(FlashBackwardV1Handler)},
      {"jaxattn_flash_dlogits_v1", reinterpret_cast<void*>(FlashLogitsGradV1Handler)},
      {"jaxattn_flash_fwd_v2", reinterpret_cast<void*>(FlashForwardHandler)},
      {"jaxattn_flash_bwd_v2", reinterpret_cast<void*>(FlashBackwardHandler)},
      {"jaxattn_flash_dlogits_v2", reinterpret_cast<void*>(FlashLogitsGradHandler)},
      {"jaxattn_flash_jvp_v1", reinterpret_cast<void*>(FlashJvpHandler)},
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
      {"jaxattn_cache_write_v1", reinterpret_cast<void*>(CacheWriteHandler)},
      {"jaxattn_sparse_fwd_v1", reinterpret_cast<void*>(SparseForwardV1Handler)},
      {"jaxattn_sparse_bwd_v1", reinterpret_cast<void*>(SparseBackwardV1Handler)},
      {"jaxattn_sparse_fwd_v2", reinterpret_cast<void*>(SparseForwardHandler)},
      {"jaxattn_sparse_bwd_v2", reinterpret_cast<void*>(SparseBackwardHandler)},
      {"jaxattn_gla_fwd_v1", reinterpret_cast<void*>(GatedLinearForwardHandler)},
      {"jaxattn_gla_bwd_v1", reinterpret_cast<void*>(GatedLinearBackwardHandler)},
  };
}

}  // namespace jaxattn

// ---------------------------------------------------------------------------------------------
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
    if (name->len == sizeof(kViewsAttr) - 1 &&
        std::memcmp(name->ptr, kViewsAttr, name->len) == 0) {
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
constexpr std::array<XLA_FFI_Handler*, sizeof...(I)> MakeTrampolines(
    std::index_sequence<I...>) {
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
