// Block-sparse attention targets (cc/sparse_impl.h): forward and backward over a mask's tile
// tables (jaxattn/masks.py), in their _v2 layout (token operands) and the original _v1 layout.
#include <string>
#include <vector>

#include "ffi/attention_operands.h"
#include "ffi/common.h"

namespace jaxattn {
namespace {

// Block-sparse tables from their operands: q_indptr [groups * num_q_tiles + 1], q_entries
// [nnz, 2], k_indptr/k_entries the same transposed (or absent: nullptr), masks [M, rows, keys].
ffi::Error ParseBlockSparseTables(const AttentionProblem& p, const S32Buffer& q_indptr,
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

// The problem of a block-sparse target: no bias, mask, lengths or flags (the tables mask).
ffi::Error ParseSparseProblem(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                              const ffi::AnyBuffer& value, int64_t batch, float scale,
                              float soft_cap, const TokenOperands& tokens, AttentionProblem* p) {
  JAXATTN_RETURN_IF_ERROR(ParseQueryKeyValue(query, key, value, batch, p));
  JAXATTN_RETURN_IF_ERROR(ParseTokens(tokens, p));
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
  JAXATTN_RETURN_IF_ERROR(
      ParseSparseProblem(query, key, value, od[0], scale, soft_cap, tokens, &p));
  if (out->element_type() != query.element_type() ||
      !HasShape(od, {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse->dimensions(), {p.batch, p.q_len, p.num_heads})) {
    return InvalidArgument("output shapes do not match the inputs");
  }
  BlockSparseTables tables;
  JAXATTN_RETURN_IF_ERROR(ParseBlockSparseTables(p, q_indptr, q_entries, nullptr, nullptr,
                                                 masks, nullptr, &tables));
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
  JAXATTN_RETURN_IF_ERROR(
      ParseSparseProblem(query, key, value, dqd[0], scale, soft_cap, tokens, &p));
  FlashBackwardArgs args;
  JAXATTN_RETURN_IF_ERROR(ParseBackwardArgs(p, query.element_type(), out, lse, dout, dlse,
                                            &*dq, &*dk, &*dv, nullptr, &args));
  BlockSparseTables tables;
  JAXATTN_RETURN_IF_ERROR(ParseBlockSparseTables(p, q_indptr, q_entries, &k_indptr,
                                                 &k_entries, masks, &masks_t, &tables));
  BlockSparseBackward(p, tables, args, XlaParallel(pool));
  return ffi::Error::Success();
}

// The _v1 block-sparse targets keep their original operand layout (exported programs may
// call them): they run the _v2 handlers with every token operand absent.
ffi::Error SparseForwardV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                               ffi::AnyBuffer value, S32Buffer q_indptr, S32Buffer q_entries,
                               ffi::AnyBuffer masks, ffi::Result<ffi::AnyBuffer> out,
                               F32Result lse, float scale, float soft_cap) {
  const S32Buffer none = AbsentBuffer<ffi::S32>();
  return SparseForwardImpl(pool, query, key, value, q_indptr, q_entries, masks, none, none, none,
                           none, AbsentBuffer<ffi::F32>(), out, lse, scale, soft_cap);
}

ffi::Error SparseBackwardV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                                ffi::AnyBuffer value, ffi::AnyBuffer out, F32Buffer lse,
                                ffi::AnyBuffer dout, F32Buffer dlse, S32Buffer q_indptr,
                                S32Buffer q_entries, S32Buffer k_indptr, S32Buffer k_entries,
                                ffi::AnyBuffer masks, ffi::AnyBuffer masks_t,
                                ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                                ffi::Result<ffi::AnyBuffer> dv, float scale, float soft_cap) {
  const S32Buffer none = AbsentBuffer<ffi::S32>();
  return SparseBackwardImpl(pool, query, key, value, out, lse, dout, dlse, q_indptr, q_entries,
                            k_indptr, k_entries, masks, masks_t, none, none, none, none,
                            AbsentBuffer<ffi::F32>(), dq, dk, dv, scale, soft_cap);
}

}  // namespace

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
    BindTokens(ffi::Ffi::Bind()
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
                   .Arg<ffi::AnyBuffer>())    // masks_t (transposed)
        .Ret<ffi::AnyBuffer>()     // dq
        .Ret<ffi::AnyBuffer>()     // dk
        .Ret<ffi::AnyBuffer>()     // dv
        .Attr<float>("scale")
        .Attr<float>("soft_cap"));

// The original (_v1) layouts: no token operands.
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

std::vector<FfiTarget> BlockSparseTargets() {
  return {
      {"jaxattn_sparse_fwd_v1", reinterpret_cast<void*>(SparseForwardV1Handler)},
      {"jaxattn_sparse_bwd_v1", reinterpret_cast<void*>(SparseBackwardV1Handler)},
      {"jaxattn_sparse_fwd_v2", reinterpret_cast<void*>(SparseForwardHandler)},
      {"jaxattn_sparse_bwd_v2", reinterpret_cast<void*>(SparseBackwardHandler)},
  };
}

}  // namespace jaxattn
