// Block-sparse attention targets (cc/sparse_impl.h): forward and backward over a mask's tile
// tables (jaxattn/masks.py). The _v1, _v2 and _v3 layouts of a target differ only in the token
// operands that end the argument list (none, kNumTokenOperands, and those plus the dropout
// seeds) and, for _v3, the dropout_threshold attribute: one handler serves them all.
#include <cstddef>
#include <string>
#include <vector>

#include "ffi/attention_operands.h"
#include "ffi/common.h"

namespace jaxattn {

// The attributes of the block-sparse targets (the tables carry the masking).
struct SparseAttrs {
  float scale;
  float soft_cap;
};

// The attributes of the _v3 block-sparse targets: those above and the dropout keep threshold
// (cc/dropout.h; 0: no dropout).
struct SparseDropoutAttrs : SparseAttrs {
  int64_t dropout_threshold;
};

inline int64_t DropoutThreshold(const SparseAttrs&) { return 0; }
inline int64_t DropoutThreshold(const SparseDropoutAttrs& attrs) { return attrs.dropout_threshold; }

}  // namespace jaxattn

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jaxattn::SparseAttrs, StructMember<float>("scale"),
                                      StructMember<float>("soft_cap"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jaxattn::SparseDropoutAttrs, StructMember<float>("scale"),
                                      StructMember<float>("soft_cap"),
                                      StructMember<int64_t>("dropout_threshold"));

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
                           std::to_string(t->num_q_tiles) + " + 1 entries, got " + ShapeString(qi));
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
    if (ki.size() != 1 || ki[0] != t->groups * t->num_k_tiles + 1 || ke.size() != 2 || ke[1] != 2) {
      return InvalidArgument("block-sparse k_indptr/k_entries have the wrong shape: " +
                             ShapeString(ki) + ", " + ShapeString(ke));
    }
    t->k_indptr = k_indptr->typed_data();
    t->k_entries = k_entries->typed_data();
    t->k_nnz = ke[0];
    const auto mt = masks_t->dimensions();
    if (mt.size() != 3 || mt[0] != md[0] || mt[1] != tiling.keys || mt[2] != tiling.rows_padded ||
        masks_t->element_type() != masks.element_type()) {
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
                              const ffi::AnyBuffer& value, int64_t batch, const SparseAttrs& attrs,
                              const TokenOperands& tokens, AttentionProblem* p) {
  JAXATTN_RETURN_IF_ERROR(ParseQueryKeyValue(query, key, value, batch, p));
  JAXATTN_RETURN_IF_ERROR(ParseTokens(tokens, p));
  p->scale = attrs.scale;
  p->soft_cap = attrs.soft_cap;
  if (const char* message = ValidateProblem(*p)) return InvalidArgument(message);
  return ffi::Error::Success();
}

template <size_t kTokens, typename Attributes>
ffi::Error SparseForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                             ffi::AnyBuffer value, S32Buffer q_indptr, S32Buffer q_entries,
                             ffi::AnyBuffer masks, ffi::RemainingArgs token_args,
                             ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                             Attributes attrs) {
  const auto od = out->dimensions();
  if (od.size() != 4) return InvalidArgument("output must have rank 4");
  TokenOperands tokens;
  JAXATTN_RETURN_IF_ERROR(ParseTokenOperands(token_args, kTokens, &tokens));
  tokens.dropout_threshold = DropoutThreshold(attrs);
  AttentionProblem p;
  JAXATTN_RETURN_IF_ERROR(ParseSparseProblem(query, key, value, od[0], attrs, tokens, &p));
  JAXATTN_RETURN_IF_ERROR(CheckForwardResults(p, query.element_type(), *out, *lse));
  BlockSparseTables tables;
  JAXATTN_RETURN_IF_ERROR(
      ParseBlockSparseTables(p, q_indptr, q_entries, nullptr, nullptr, masks, nullptr, &tables));
  return RunAttentionForward("block-sparse attention", p, &tables, *out, *lse, pool);
}

template <size_t kTokens, typename Attributes>
ffi::Error SparseBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                              ffi::AnyBuffer value, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                              ffi::AnyBuffer dout, ffi::AnyBuffer dlse, S32Buffer q_indptr,
                              S32Buffer q_entries, S32Buffer k_indptr, S32Buffer k_entries,
                              ffi::AnyBuffer masks, ffi::AnyBuffer masks_t,
                              ffi::RemainingArgs token_args, ffi::Result<ffi::AnyBuffer> dq,
                              ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                              Attributes attrs) {
  const auto dqd = dq->dimensions();
  if (dqd.size() != 4) return InvalidArgument("dq must have rank 4");
  TokenOperands tokens;
  JAXATTN_RETURN_IF_ERROR(ParseTokenOperands(token_args, kTokens, &tokens));
  tokens.dropout_threshold = DropoutThreshold(attrs);
  AttentionProblem p;
  JAXATTN_RETURN_IF_ERROR(ParseSparseProblem(query, key, value, dqd[0], attrs, tokens, &p));
  FlashBackwardArgs args;
  F64BackwardArgs args64;
  JAXATTN_RETURN_IF_ERROR(ParseBackwardArgs(p, query.element_type(), out, lse, dout, dlse, &*dq,
                                            &*dk, &*dv, nullptr, &args, &args64));
  BlockSparseTables tables;
  JAXATTN_RETURN_IF_ERROR(ParseBlockSparseTables(p, q_indptr, q_entries, &k_indptr, &k_entries,
                                                 masks, &masks_t, &tables));
  return RunAttentionBackward("block-sparse attention backward", p, &tables, args, args64, pool);
}

template <typename Attributes>
auto BindForward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // query
      .Arg<ffi::AnyBuffer>()  // key
      .Arg<ffi::AnyBuffer>()  // value
      .Arg<S32Buffer>()       // q_indptr
      .Arg<S32Buffer>()       // q_entries
      .Arg<ffi::AnyBuffer>()  // masks
      .RemainingArgs()        // the token operands (_v2, _v3) or none (_v1)
      .Ret<ffi::AnyBuffer>()  // out
      .Ret<ffi::AnyBuffer>()  // lse (float32; float64 for float64 inputs)
      .template Attrs<Attributes>();
}

template <typename Attributes>
auto BindBackward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // query
      .Arg<ffi::AnyBuffer>()  // key
      .Arg<ffi::AnyBuffer>()  // value
      .Arg<ffi::AnyBuffer>()  // out
      .Arg<ffi::AnyBuffer>()  // lse (float32; float64 for float64 inputs)
      .Arg<ffi::AnyBuffer>()  // dout
      .Arg<ffi::AnyBuffer>()  // dlse (0 elements: none), as lse
      .Arg<S32Buffer>()       // q_indptr
      .Arg<S32Buffer>()       // q_entries
      .Arg<S32Buffer>()       // k_indptr
      .Arg<S32Buffer>()       // k_entries
      .Arg<ffi::AnyBuffer>()  // masks
      .Arg<ffi::AnyBuffer>()  // masks_t (transposed)
      .RemainingArgs()        // the token operands (_v2, _v3) or none (_v1)
      .Ret<ffi::AnyBuffer>()  // dq
      .Ret<ffi::AnyBuffer>()  // dk
      .Ret<ffi::AnyBuffer>()  // dv
      .template Attrs<Attributes>();
}

}  // namespace

// The layouts of each target: _v1 (no token operands), _v2 (token operands), _v3 (token
// operands, dropout seeds [B, N, 2] uint32 and the dropout_threshold attribute).
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseForwardV1Handler,
                              (SparseForwardImpl<kNoTokenOperands, SparseAttrs>),
                              BindForward<SparseAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseForwardHandler,
                              (SparseForwardImpl<kNumTokenOperands, SparseAttrs>),
                              BindForward<SparseAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseForwardV3Handler,
                              (SparseForwardImpl<kDropoutTokenOperands, SparseDropoutAttrs>),
                              BindForward<SparseDropoutAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseBackwardV1Handler,
                              (SparseBackwardImpl<kNoTokenOperands, SparseAttrs>),
                              BindBackward<SparseAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseBackwardHandler,
                              (SparseBackwardImpl<kNumTokenOperands, SparseAttrs>),
                              BindBackward<SparseAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseBackwardV3Handler,
                              (SparseBackwardImpl<kDropoutTokenOperands, SparseDropoutAttrs>),
                              BindBackward<SparseDropoutAttrs>());

std::vector<FfiTarget> BlockSparseTargets() {
  return {
      {"jaxattn_sparse_fwd_v1", reinterpret_cast<void*>(SparseForwardV1Handler)},
      {"jaxattn_sparse_bwd_v1", reinterpret_cast<void*>(SparseBackwardV1Handler)},
      {"jaxattn_sparse_fwd_v2", reinterpret_cast<void*>(SparseForwardHandler)},
      {"jaxattn_sparse_bwd_v2", reinterpret_cast<void*>(SparseBackwardHandler)},
      {"jaxattn_sparse_fwd_v3", reinterpret_cast<void*>(SparseForwardV3Handler)},
      {"jaxattn_sparse_bwd_v3", reinterpret_cast<void*>(SparseBackwardV3Handler)},
  };
}

}  // namespace jaxattn
