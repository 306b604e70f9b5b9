// Flash attention targets: forward, backward, the logits gradient (for a bias's gradient)
// and the forward-mode tangent (jvp). The _v1, _v2 and _v3 layouts of a target differ only in
// the token operands that end the argument list (none, kNumTokenOperands, and those plus the
// dropout seeds) and, for _v3, the dropout_threshold attribute: one handler serves them all
// (kTokens operands, attributes FlashAttrs or FlashDropoutAttrs).
#include <cstddef>
#include <vector>

#include "ffi/attention_operands.h"
#include "ffi/common.h"

namespace jaxattn {
namespace {

template <size_t kTokens, typename Attributes>
ffi::Error FlashForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                            ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                            S32Buffer q_lengths, S32Buffer kv_lengths,
                            ffi::RemainingArgs token_args, ffi::Result<ffi::AnyBuffer> out,
                            ffi::Result<ffi::AnyBuffer> lse, Attributes attrs) {
  const auto od = out->dimensions();
  if (od.size() != 4) return InvalidArgument("output must have rank 4");
  TokenOperands tokens;
  JAXATTN_RETURN_IF_ERROR(ParseTokenOperands(token_args, kTokens, &tokens));
  tokens.dropout_threshold = DropoutThreshold(attrs);
  AttentionProblem p;
  JAXATTN_RETURN_IF_ERROR(ParseProblem({query, key, value, bias, mask, q_lengths, kv_lengths},
                                       tokens, attrs, od[0], &p));
  JAXATTN_RETURN_IF_ERROR(CheckForwardResults(p, query.element_type(), *out, *lse));
  return RunAttentionForward("flash attention", p, nullptr, *out, *lse, pool);
}

template <size_t kTokens, typename Attributes>
ffi::Error FlashBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                             ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                             S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                             ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                             ffi::RemainingArgs token_args, ffi::Result<ffi::AnyBuffer> dq,
                             ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                             Attributes attrs) {
  const auto dqd = dq->dimensions();
  if (dqd.size() != 4) return InvalidArgument("dq must have rank 4");
  TokenOperands tokens;
  JAXATTN_RETURN_IF_ERROR(ParseTokenOperands(token_args, kTokens, &tokens));
  tokens.dropout_threshold = DropoutThreshold(attrs);
  AttentionProblem p;
  JAXATTN_RETURN_IF_ERROR(ParseProblem({query, key, value, bias, mask, q_lengths, kv_lengths},
                                       tokens, attrs, dqd[0], &p));
  FlashBackwardArgs args;
  F64BackwardArgs args64;
  JAXATTN_RETURN_IF_ERROR(ParseBackwardArgs(p, query.element_type(), out, lse, dout, dlse, &*dq,
                                            &*dk, &*dv, nullptr, &args, &args64));
  return RunAttentionBackward("flash attention backward", p, nullptr, args, args64, pool);
}

// d loss / d logits [B, N, T, S] in float32 (float64 for float64 inputs), for the gradient of
// a bias.
template <size_t kTokens, typename Attributes>
ffi::Error FlashLogitsGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                               ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                               S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                               ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::AnyBuffer dlse,
                               ffi::RemainingArgs token_args, ffi::Result<ffi::AnyBuffer> dlogits,
                               Attributes attrs) {
  const auto gd = dlogits->dimensions();
  if (gd.size() != 4) return InvalidArgument("dlogits must have rank 4");
  TokenOperands tokens;
  JAXATTN_RETURN_IF_ERROR(ParseTokenOperands(token_args, kTokens, &tokens));
  tokens.dropout_threshold = DropoutThreshold(attrs);
  AttentionProblem p;
  JAXATTN_RETURN_IF_ERROR(ParseProblem({query, key, value, bias, mask, q_lengths, kv_lengths},
                                       tokens, attrs, gd[0], &p));
  FlashBackwardArgs args;
  F64BackwardArgs args64;
  JAXATTN_RETURN_IF_ERROR(ParseBackwardArgs(p, query.element_type(), out, lse, dout, dlse, nullptr,
                                            nullptr, nullptr, &*dlogits, &args, &args64,
                                            "logits-gradient"));
  return RunAttentionBackward("flash attention backward", p, nullptr, args, args64, pool);
}

// The tangent of (out, lse) in the direction of (dq, dk, dv, dbias), for forward-mode AD.
// The token operands are the forward's: the tangent differentiates the same logits.
ffi::Error FlashJvpImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                        ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                        S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                        ffi::AnyBuffer lse, ffi::AnyBuffer dq, ffi::AnyBuffer dk, ffi::AnyBuffer dv,
                        ffi::AnyBuffer dbias, ffi::RemainingArgs token_args,
                        ffi::Result<ffi::AnyBuffer> dout, ffi::Result<ffi::AnyBuffer> dlse,
                        FlashAttrs attrs) {
  const auto od = dout->dimensions();
  if (od.size() != 4) return InvalidArgument("the output tangent must have rank 4");
  TokenOperands tokens;
  JAXATTN_RETURN_IF_ERROR(ParseTokenOperands(token_args, kNumTokenOperands, &tokens));
  AttentionProblem p;
  JAXATTN_RETURN_IF_ERROR(ParseProblem({query, key, value, bias, mask, q_lengths, kv_lengths},
                                       tokens, attrs, od[0], &p));
  const int64_t B = p.batch, T = p.q_len, N = p.num_heads, S = p.kv_len, K = p.num_kv_heads;
  const ffi::DataType dtype = query.element_type();
  // A tangent's batch divides B (vmap over tangents only folds into theirs).
  const auto tangent_ok = [&](const ffi::AnyBuffer& x, int64_t d1, int64_t d2, int64_t d3) {
    const auto d = x.dimensions();
    return x.element_type() == dtype && d.size() == 4 && d[0] > 0 && B % d[0] == 0 && d[1] == d1 &&
           d[2] == d2 && d[3] == d3;
  };
  if (!tangent_ok(dq, T, N, p.head_dim) || !tangent_ok(dk, S, K, p.head_dim) ||
      !tangent_ok(dv, S, K, p.value_dim) || out.element_type() != dtype ||
      !HasShape(out.dimensions(), {B, T, N, p.value_dim}) ||
      !HasShape(lse.dimensions(), {B, T, N}) || dout->element_type() != dtype ||
      !HasShape(od, {B, T, N, p.value_dim}) || !HasShape(dlse->dimensions(), {B, T, N}) ||
      lse.element_type() != LseType(p.dtype) || dlse->element_type() != LseType(p.dtype)) {
    return InvalidArgument("jvp operand shapes do not match the inputs");
  }
  FlashTangents tangents;
  tangents.dq = dq.untyped_data();
  tangents.dk = dk.untyped_data();
  tangents.dv = dv.untyped_data();
  tangents.dq_batch = dq.dimensions()[0];
  tangents.dk_batch = dk.dimensions()[0];
  tangents.dv_batch = dv.dimensions()[0];
  JAXATTN_RETURN_IF_ERROR(ParseBroadcast(dbias, "bias tangent", &tangents.dbias));
  if (tangents.dbias.data != nullptr) {
    if (!ToAttentionDType(dbias.element_type(), &tangents.dbias.dtype)) {
      return InvalidArgument("the bias tangent must be float32, bfloat16, float16 or float64");
    }
    if (tangents.dbias.dtype == DType::kF64 && p.dtype != DType::kF64) {
      return InvalidArgument("a float64 bias tangent needs float64 inputs");
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
  if (p.dtype == DType::kF64) {
    return ScratchError("flash attention jvp",
                        FlashJvpF64(p, tangents, static_cast<const double*>(out.untyped_data()),
                                    static_cast<const double*>(lse.untyped_data()),
                                    F64JvpResult{static_cast<double*>(dout->untyped_data()),
                                                 static_cast<double*>(dlse->untyped_data())},
                                    XlaParallel(pool)));
  }
  return ScratchError(
      "flash attention jvp",
      FlashJvp(p, tangents, out.untyped_data(), static_cast<const float*>(lse.untyped_data()),
               FlashJvpResult{dout->untyped_data(), static_cast<float*>(dlse->untyped_data())},
               XlaParallel(pool)));
}

// The operands every flash target starts with, in order.
auto BindProblem() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // query
      .Arg<ffi::AnyBuffer>()  // key
      .Arg<ffi::AnyBuffer>()  // value
      .Arg<ffi::AnyBuffer>()  // bias (0 elements: none)
      .Arg<ffi::AnyBuffer>()  // mask (0 elements: none)
      .Arg<S32Buffer>()       // query_seq_lengths (0 elements: none)
      .Arg<S32Buffer>();      // key_value_seq_lengths
}

template <typename Attributes>
auto BindForward() {
  return BindProblem()
      .RemainingArgs()        // the token operands (_v2, _v3) or none (_v1)
      .Ret<ffi::AnyBuffer>()  // out
      .Ret<ffi::AnyBuffer>()  // lse (float32; float64 for float64 inputs)
      .template Attrs<Attributes>();
}

// The forward's results and their cotangents, then the token operands.
auto BindBackwardOperands() {
  return BindProblem()
      .Arg<ffi::AnyBuffer>()  // out
      .Arg<ffi::AnyBuffer>()  // lse (float32; float64 for float64 inputs)
      .Arg<ffi::AnyBuffer>()  // dout
      .Arg<ffi::AnyBuffer>()  // dlse (0 elements: none), as lse
      .RemainingArgs();       // the token operands (_v2, _v3) or none (_v1)
}

template <typename Attributes>
auto BindBackward() {
  return BindBackwardOperands()
      .Ret<ffi::AnyBuffer>()  // dq
      .Ret<ffi::AnyBuffer>()  // dk
      .Ret<ffi::AnyBuffer>()  // dv
      .template Attrs<Attributes>();
}

template <typename Attributes>
auto BindLogitsGrad() {
  return BindBackwardOperands()
      .Ret<ffi::AnyBuffer>()  // dlogits, as lse
      .template Attrs<Attributes>();
}

auto BindJvp() {
  return BindProblem()
      .Arg<ffi::AnyBuffer>()  // out
      .Arg<ffi::AnyBuffer>()  // lse (float32; float64 for float64 inputs)
      .Arg<ffi::AnyBuffer>()  // dq (tangent)
      .Arg<ffi::AnyBuffer>()  // dk
      .Arg<ffi::AnyBuffer>()  // dv
      .Arg<ffi::AnyBuffer>()  // dbias (0 elements: none)
      .RemainingArgs()        // the token operands
      .Ret<ffi::AnyBuffer>()  // dout
      .Ret<ffi::AnyBuffer>()  // dlse, as lse
      .Attrs<FlashAttrs>();
}

}  // namespace

// The layouts of each target: _v1 (no token operands), _v2 (token operands), _v3 (token
// operands, dropout seeds [B, N, 2] uint32 and the dropout_threshold attribute).
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashForwardV1Handler,
                              (FlashForwardImpl<kNoTokenOperands, FlashAttrs>),
                              BindForward<FlashAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashForwardHandler,
                              (FlashForwardImpl<kNumTokenOperands, FlashAttrs>),
                              BindForward<FlashAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashForwardV3Handler,
                              (FlashForwardImpl<kDropoutTokenOperands, FlashDropoutAttrs>),
                              BindForward<FlashDropoutAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashBackwardV1Handler,
                              (FlashBackwardImpl<kNoTokenOperands, FlashAttrs>),
                              BindBackward<FlashAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashBackwardHandler,
                              (FlashBackwardImpl<kNumTokenOperands, FlashAttrs>),
                              BindBackward<FlashAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashBackwardV3Handler,
                              (FlashBackwardImpl<kDropoutTokenOperands, FlashDropoutAttrs>),
                              BindBackward<FlashDropoutAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashLogitsGradV1Handler,
                              (FlashLogitsGradImpl<kNoTokenOperands, FlashAttrs>),
                              BindLogitsGrad<FlashAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashLogitsGradHandler,
                              (FlashLogitsGradImpl<kNumTokenOperands, FlashAttrs>),
                              BindLogitsGrad<FlashAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashLogitsGradV3Handler,
                              (FlashLogitsGradImpl<kDropoutTokenOperands, FlashDropoutAttrs>),
                              BindLogitsGrad<FlashDropoutAttrs>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashJvpHandler, FlashJvpImpl, BindJvp());

std::vector<FfiTarget> FlashTargets() {
  return {
      {"jaxattn_flash_fwd_v1", reinterpret_cast<void*>(FlashForwardV1Handler)},
      {"jaxattn_flash_bwd_v1", reinterpret_cast<void*>(FlashBackwardV1Handler)},
      {"jaxattn_flash_dlogits_v1", reinterpret_cast<void*>(FlashLogitsGradV1Handler)},
      {"jaxattn_flash_fwd_v2", reinterpret_cast<void*>(FlashForwardHandler)},
      {"jaxattn_flash_bwd_v2", reinterpret_cast<void*>(FlashBackwardHandler)},
      {"jaxattn_flash_dlogits_v2", reinterpret_cast<void*>(FlashLogitsGradHandler)},
      {"jaxattn_flash_fwd_v3", reinterpret_cast<void*>(FlashForwardV3Handler)},
      {"jaxattn_flash_bwd_v3", reinterpret_cast<void*>(FlashBackwardV3Handler)},
      {"jaxattn_flash_dlogits_v3", reinterpret_cast<void*>(FlashLogitsGradV3Handler)},
      {"jaxattn_flash_jvp_v1", reinterpret_cast<void*>(FlashJvpHandler)},
  };
}

}  // namespace jaxattn
