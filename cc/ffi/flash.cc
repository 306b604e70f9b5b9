// Flash attention targets: forward, backward, the logits gradient (for a bias's gradient)
// and the forward-mode tangent (jvp), in their _v2 layout (token operands) and the original
// _v1 layout.
#include <string>
#include <utility>
#include <vector>

#include "ffi/attention_operands.h"
#include "ffi/common.h"

namespace jaxattn {
namespace {

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
  JAXATTN_RETURN_IF_ERROR(ParseProblem(in, attrs, od[0], &p));
  if (out->element_type() != query.element_type() ||
      !HasShape(od, {p.batch, p.q_len, p.num_heads, p.value_dim}) ||
      !HasShape(lse->dimensions(), {p.batch, p.q_len, p.num_heads})) {
    return InvalidArgument("output shapes do not match the inputs");
  }
  FlashForward(p, FlashForwardResult{out->untyped_data(), lse->typed_data()},
               XlaParallel(pool));
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
  JAXATTN_RETURN_IF_ERROR(ParseProblem(in, attrs, dqd[0], &p));
  FlashBackwardArgs args;
  JAXATTN_RETURN_IF_ERROR(ParseBackwardArgs(p, query.element_type(), out, lse, dout, dlse,
                                            &*dq, &*dk, &*dv, nullptr, &args));
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
  JAXATTN_RETURN_IF_ERROR(ParseProblem(in, attrs, gd[0], &p));
  FlashBackwardArgs args;
  JAXATTN_RETURN_IF_ERROR(ParseBackwardArgs(p, query.element_type(), out, lse, dout, dlse,
                                            nullptr, nullptr, nullptr, &*dlogits, &args,
                                            "logits-gradient"));
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
  JAXATTN_RETURN_IF_ERROR(ParseProblem(in, attrs, od[0], &p));
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
  JAXATTN_RETURN_IF_ERROR(ParseBroadcast(dbias, "bias tangent", &tangents.dbias));
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

// The _v1 flash targets keep their original operand layout (exported programs may call
// them): they run the _v2 handlers with every token operand absent.
ffi::Error FlashForwardV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                              ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                              S32Buffer q_lengths, S32Buffer kv_lengths,
                              ffi::Result<ffi::AnyBuffer> out, F32Result lse, float scale,
                              float soft_cap, bool is_causal, int64_t window_left,
                              int64_t window_right) {
  const S32Buffer none = AbsentBuffer<ffi::S32>();
  return FlashForwardImpl(pool, query, key, value, bias, mask, q_lengths, kv_lengths, none,
                          none, none, none, AbsentBuffer<ffi::F32>(), out, lse, scale, soft_cap,
                          is_causal, window_left, window_right);
}

ffi::Error FlashBackwardV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                               ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                               S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                               F32Buffer lse, ffi::AnyBuffer dout, F32Buffer dlse,
                               ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                               ffi::Result<ffi::AnyBuffer> dv, float scale, float soft_cap,
                               bool is_causal, int64_t window_left, int64_t window_right) {
  const S32Buffer none = AbsentBuffer<ffi::S32>();
  return FlashBackwardImpl(pool, query, key, value, bias, mask, q_lengths, kv_lengths, out, lse,
                           dout, dlse, none, none, none, none, AbsentBuffer<ffi::F32>(), dq, dk,
                           dv, scale, soft_cap, is_causal, window_left, window_right);
}

ffi::Error FlashLogitsGradV1Impl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                                 ffi::AnyBuffer value, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                                 S32Buffer q_lengths, S32Buffer kv_lengths, ffi::AnyBuffer out,
                                 F32Buffer lse, ffi::AnyBuffer dout, F32Buffer dlse,
                                 F32Result dlogits, float scale, float soft_cap, bool is_causal,
                                 int64_t window_left, int64_t window_right) {
  const S32Buffer none = AbsentBuffer<ffi::S32>();
  return FlashLogitsGradImpl(pool, query, key, value, bias, mask, q_lengths, kv_lengths, out,
                             lse, dout, dlse, none, none, none, none, AbsentBuffer<ffi::F32>(),
                             dlogits, scale, soft_cap, is_causal, window_left, window_right);
}

// The operands every flash target starts with, in order.
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

// The attributes every flash target ends with.
template <typename Binding>
auto BindAttrs(Binding binding) {
  return std::move(binding).template Attr<float>("scale")
      .template Attr<float>("soft_cap")
      .template Attr<bool>("is_causal")
      .template Attr<int64_t>("window_left")
      .template Attr<int64_t>("window_right");
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

std::vector<FfiTarget> FlashTargets() {
  return {
      {"jaxattn_flash_fwd_v1", reinterpret_cast<void*>(FlashForwardV1Handler)},
      {"jaxattn_flash_bwd_v1", reinterpret_cast<void*>(FlashBackwardV1Handler)},
      {"jaxattn_flash_dlogits_v1", reinterpret_cast<void*>(FlashLogitsGradV1Handler)},
      {"jaxattn_flash_fwd_v2", reinterpret_cast<void*>(FlashForwardHandler)},
      {"jaxattn_flash_bwd_v2", reinterpret_cast<void*>(FlashBackwardHandler)},
      {"jaxattn_flash_dlogits_v2", reinterpret_cast<void*>(FlashLogitsGradHandler)},
      {"jaxattn_flash_jvp_v1", reinterpret_cast<void*>(FlashJvpHandler)},
  };
}

}  // namespace jaxattn
