// Gated linear attention targets (cc/gated_linear.h): forward and backward of the chunked
// recurrence.
#include <string>
#include <vector>

#include "ffi/common.h"
#include "gated_linear.h"

namespace jaxattn {

struct GatedLinearAttrs {
  float scale;
};

}  // namespace jaxattn

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jaxattn::GatedLinearAttrs, StructMember<float>("scale"));

namespace jaxattn {
namespace {

// query [Bq,T,N,Hk], key [Bk,T,K,Hk], value [Bv,T,K,Hv], log_gate [Bg,T,K,Hk] or
// [Bg,T,K,1] (a scalar gate), initial_state [Bs,N,Hk,Hv] float32 (0 elements: none), for
// outputs of batch `batch`; K divides N.
ffi::Error ParseGatedLinear(const ffi::AnyBuffer& query, const ffi::AnyBuffer& key,
                            const ffi::AnyBuffer& value, const ffi::AnyBuffer& log_gate,
                            const ffi::AnyBuffer& initial_state, int64_t batch, float scale,
                            GatedLinearProblem* p) {
  const auto q = query.dimensions(), k = key.dimensions(), v = value.dimensions(),
             g = log_gate.dimensions();
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || g.size() != 4) {
    return InvalidArgument(
        "gated linear attention: query, key, value and log_gate must have "
        "rank 4, got " +
        ShapeString(q) + ", " + ShapeString(k) + ", " + ShapeString(v) + ", " + ShapeString(g));
  }
  if (!ToDType(query.element_type(), &p->dtype) || key.element_type() != query.element_type() ||
      value.element_type() != query.element_type()) {
    return InvalidArgument(
        "gated linear attention: query, key and value must share one of "
        "float32, bfloat16, float16");
  }
  if (!ToDType(log_gate.element_type(), &p->gate_dtype)) {
    return InvalidArgument(
        "gated linear attention: log_gate must be float32, bfloat16 or "
        "float16");
  }
  for (const auto* d : {&k, &v, &g}) {
    if ((*d)[1] != q[1] || (*d)[2] != k[2]) {
      return InvalidArgument("gated linear attention: inconsistent shapes: query " +
                             ShapeString(q) + ", key " + ShapeString(k) + ", value " +
                             ShapeString(v) + ", log_gate " + ShapeString(g));
    }
  }
  if (k[2] <= 0 || q[2] % k[2] != 0) {
    return InvalidArgument("gated linear attention: the kv heads of key " + ShapeString(k) +
                           " must divide the query heads " + ShapeString(q));
  }
  if (k[3] != q[3] || (g[3] != q[3] && g[3] != 1)) {
    return InvalidArgument(
        "gated linear attention: query and key must share the head dim, "
        "log_gate have it or 1, got " +
        ShapeString(q) + ", " + ShapeString(k) + ", " + ShapeString(g));
  }
  p->batch = batch;
  p->seq_len = q[1];
  p->num_heads = q[2];
  p->num_kv_heads = k[2];
  p->gate_dim = g[3];
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
      return InvalidArgument(
          "gated linear attention: initial_state must be float32 [B, N, "
          "Hk, Hv] = [B, " +
          std::to_string(p->num_heads) + ", " + std::to_string(p->key_dim) + ", " +
          std::to_string(p->value_dim) + "], got " + ShapeString(s));
    }
    p->initial_state = static_cast<const float*>(initial_state.untyped_data());
    p->state_batch = s[0];
  }
  if (const char* message = ValidateGatedLinear(*p)) {
    return InvalidArgument(std::string("gated linear attention: ") + message);
  }
  return ffi::Error::Success();
}

ffi::Error GatedLinearForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                                  ffi::AnyBuffer value, ffi::AnyBuffer log_gate,
                                  ffi::AnyBuffer initial_state, ffi::Result<ffi::AnyBuffer> out,
                                  F32Result final_state, GatedLinearAttrs attrs) {
  const auto od = out->dimensions();
  if (od.size() != 4) return InvalidArgument("gated linear attention: out must have rank 4");
  GatedLinearProblem p;
  JAXATTN_RETURN_IF_ERROR(
      ParseGatedLinear(query, key, value, log_gate, initial_state, od[0], attrs.scale, &p));
  if (out->element_type() != query.element_type() ||
      !HasShape(od, {p.batch, p.seq_len, p.num_heads, p.value_dim}) ||
      !HasShape(final_state->dimensions(), {p.batch, p.num_heads, p.key_dim, p.value_dim})) {
    return InvalidArgument("gated linear attention: output shapes do not match the inputs");
  }
  if (const char* message = GatedLinearForward(
          p, GatedLinearForwardResult{out->untyped_data(), final_state->typed_data()},
          XlaParallel(pool))) {
    return ResourceExhausted(message);
  }
  return ffi::Error::Success();
}

ffi::Error GatedLinearBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer key,
                                   ffi::AnyBuffer value, ffi::AnyBuffer log_gate,
                                   ffi::AnyBuffer initial_state, ffi::AnyBuffer dout,
                                   F32Buffer dfinal_state, ffi::Result<ffi::AnyBuffer> dquery,
                                   ffi::Result<ffi::AnyBuffer> dkey,
                                   ffi::Result<ffi::AnyBuffer> dvalue,
                                   ffi::Result<ffi::AnyBuffer> dlog_gate, F32Result dinitial_state,
                                   GatedLinearAttrs attrs) {
  const auto dqd = dquery->dimensions();
  if (dqd.size() != 4) return InvalidArgument("gated linear attention: dquery must have rank 4");
  GatedLinearProblem p;
  JAXATTN_RETURN_IF_ERROR(
      ParseGatedLinear(query, key, value, log_gate, initial_state, dqd[0], attrs.scale, &p));
  const int64_t B = p.batch, T = p.seq_len, N = p.num_heads, Hk = p.key_dim, Hv = p.value_dim;
  // dkey, dvalue and dlog_gate per query head (summed over the groups by the caller).
  const auto is = [](const ffi::AnyBuffer& x, ffi::DataType type,
                     std::initializer_list<int64_t> shape) {
    return x.element_type() == type && HasShape(x.dimensions(), shape);
  };
  const ffi::DataType dtype = query.element_type();
  if (!is(dout, dtype, {B, T, N, Hv}) ||
      (dfinal_state.element_count() != 0 && !HasShape(dfinal_state.dimensions(), {B, N, Hk, Hv})) ||
      !is(*dquery, dtype, {B, T, N, Hk}) || !is(*dkey, dtype, {B, T, N, Hk}) ||
      !is(*dvalue, dtype, {B, T, N, Hv}) ||
      !is(*dlog_gate, log_gate.element_type(), {B, T, N, p.gate_dim}) ||
      !HasShape(dinitial_state->dimensions(), {B, N, Hk, Hv})) {
    return InvalidArgument(
        "gated linear attention backward: operand shapes do not match the "
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
    return ResourceExhausted(message);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatedLinearForwardHandler, GatedLinearForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // query
                                  .Arg<ffi::AnyBuffer>()         // key
                                  .Arg<ffi::AnyBuffer>()         // value
                                  .Arg<ffi::AnyBuffer>()         // log_gate
                                  .Arg<ffi::AnyBuffer>()         // initial_state (0: none)
                                  .Ret<ffi::AnyBuffer>()         // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // final_state
                                  .Attrs<GatedLinearAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GatedLinearBackwardHandler, GatedLinearBackwardImpl,
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
                                  .Attrs<GatedLinearAttrs>());

std::vector<FfiTarget> GatedLinearTargets() {
  return {
      {"jaxattn_gla_fwd_v1", reinterpret_cast<void*>(GatedLinearForwardHandler)},
      {"jaxattn_gla_bwd_v1", reinterpret_cast<void*>(GatedLinearBackwardHandler)},
  };
}

}  // namespace jaxattn
