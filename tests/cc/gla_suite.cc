// The gated linear attention kernels (GatedLinearForward / GatedLinearBackward) in the kernel
// harness: random problems (lengths around the 64-position chunk and the recurrent cut-off,
// head dims off the vector width, broadcast operand batches, zero to extreme decay, -inf
// resets, an initial state, a final-state cotangent, grouped kv heads, scalar gates), each checked
// against a float64 recurrence (gated_linear.h) and its backward, serial and thread-pool runs
// bitwise equal.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "gated_linear.h"
#include "harness.h"

namespace jaxattn_harness {
namespace {

using jaxattn::GatedLinearProblem;

struct Case {
  DType dtype = DType::kF32, gate_dtype = DType::kF32;
  int64_t B = 1, T = 1, N = 1, Hk = 1, Hv = 1;
  int64_t K = 1;             // kv heads of key, value, log_gate (divides N)
  bool scalar_gate = false;  // log_gate [.., 1]: one gate per head and step
  int64_t q_batch = 1, k_batch = 1, v_batch = 1, g_batch = 1, state_batch = 0;  // 0: none
  double decay = 1.0;  // log gates uniform in [-decay, 0]
  bool resets = false, dfinal = false;
  double scale = 1.0;

  std::string Describe() const {
    char buf[300];
    std::snprintf(buf, sizeof(buf),
                  "%s gate %s%s B=%ld T=%ld N=%ld K=%ld Hk=%ld Hv=%ld batches q%ld k%ld v%ld g%ld "
                  "s%ld decay=%g resets=%d dfinal=%d",
                  DTypeName(dtype), DTypeName(gate_dtype), scalar_gate ? " (scalar)" : "", long(B),
                  long(T), long(N), long(K), long(Hk), long(Hv), long(q_batch), long(k_batch),
                  long(v_batch), long(g_batch), long(state_batch), decay, int(resets), int(dfinal));
    return buf;
  }
};

int64_t Row(const Case& c, int64_t batch, int64_t b, int64_t t, int64_t n, int64_t dim) {
  return (((b % batch) * c.T + t) * c.N + n) * dim;
}

// A row of key, value or log_gate: query head n reads kv head n / (N / K).
int64_t KvRow(const Case& c, int64_t batch, int64_t b, int64_t t, int64_t n, int64_t dim) {
  return (((b % batch) * c.T + t) * c.K + n / (c.N / c.K)) * dim;
}

int64_t GateDim(const Case& c) { return c.scalar_gate ? 1 : c.Hk; }

struct Operands {
  Tensor q, k, v, g, state, dout, dfinal;
};

Operands MakeOperands(const Case& c, uint64_t seed) {
  Random r(seed);
  Operands x{Tensor(c.dtype, {c.q_batch, c.T, c.N, c.Hk}),
             Tensor(c.dtype, {c.k_batch, c.T, c.K, c.Hk}),
             Tensor(c.dtype, {c.v_batch, c.T, c.K, c.Hv}),
             Tensor(c.gate_dtype, {c.g_batch, c.T, c.K, GateDim(c)}),
             Tensor(DType::kF32, {std::max<int64_t>(c.state_batch, 1), c.N, c.Hk, c.Hv}),
             Tensor(c.dtype, {c.B, c.T, c.N, c.Hv}),
             Tensor(DType::kF32, {c.B, c.N, c.Hk, c.Hv})};
  for (Tensor* t : {&x.q, &x.k, &x.v, &x.state, &x.dout, &x.dfinal}) {
    for (int64_t i = 0; i < t->count(); ++i) t->Set(i, r.Normal());
  }
  for (int64_t i = 0; i < x.g.count(); ++i) {
    const bool reset = c.resets && r.Chance(0.02);
    x.g.Set(i, reset ? -kInf : -c.decay * std::abs(r.Normal()));
  }
  return x;
}

// The recurrence and its backward in float64 (tests/oracle.py's gla_reference(_grad)); the
// gradients of key, value and log_gate per query head, as the kernels write them.
struct Reference {
  std::vector<double> out, final_state, dq, dk, dv, dg, dstate;
};

Reference Compute(const Case& c, const Operands& x) {
  const int64_t B = c.B, T = c.T, N = c.N, Hk = c.Hk, Hv = c.Hv, S = Hk * Hv;
  const int64_t Gd = GateDim(c);
  Reference ref;
  ref.out.assign(B * T * N * Hv, 0.0);
  ref.final_state.assign(B * N * S, 0.0);
  ref.dq.assign(B * T * N * Hk, 0.0);
  ref.dk = ref.dq;
  ref.dg.assign(B * T * N * Gd, 0.0);
  ref.dv.assign(B * T * N * Hv, 0.0);
  ref.dstate.assign(B * N * S, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t n = 0; n < N; ++n) {
      std::vector<std::vector<double>> states(T + 1, std::vector<double>(S, 0.0));
      if (c.state_batch) {
        for (int64_t i = 0; i < S; ++i) {
          states[0][i] = x.state.values[((b % c.state_batch) * N + n) * S + i];
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < Hk; ++i) {
          const double decay =
              std::exp(x.g.values[KvRow(c, c.g_batch, b, t, n, Gd) + (c.scalar_gate ? 0 : i)]);
          const double ki = x.k.values[KvRow(c, c.k_batch, b, t, n, Hk) + i];
          for (int64_t j = 0; j < Hv; ++j) {
            states[t + 1][i * Hv + j] = decay * states[t][i * Hv + j] +
                                        ki * x.v.values[KvRow(c, c.v_batch, b, t, n, Hv) + j];
          }
        }
        for (int64_t j = 0; j < Hv; ++j) {
          double o = 0.0;
          for (int64_t i = 0; i < Hk; ++i) {
            o += c.scale * x.q.values[Row(c, c.q_batch, b, t, n, Hk) + i] *
                 states[t + 1][i * Hv + j];
          }
          ref.out[Row(c, B, b, t, n, Hv) + j] = o;
        }
      }
      for (int64_t i = 0; i < S; ++i) ref.final_state[(b * N + n) * S + i] = states[T][i];
      std::vector<double> ds(S, 0.0);
      if (c.dfinal) {
        for (int64_t i = 0; i < S; ++i) ds[i] = x.dfinal.values[(b * N + n) * S + i];
      }
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t rk = Row(c, B, b, t, n, Hk), rv = Row(c, B, b, t, n, Hv);
        const double* q = &x.q.values[Row(c, c.q_batch, b, t, n, Hk)];
        const double* k = &x.k.values[KvRow(c, c.k_batch, b, t, n, Hk)];
        const double* v = &x.v.values[KvRow(c, c.v_batch, b, t, n, Hv)];
        const double* g = &x.g.values[KvRow(c, c.g_batch, b, t, n, Gd)];
        const int64_t g_step = c.scalar_gate ? 0 : 1;
        if (c.scalar_gate) ref.dg[Row(c, B, b, t, n, 1)] = 0.0;
        const double* dout = &x.dout.values[rv];
        for (int64_t i = 0; i < Hk; ++i) {
          for (int64_t j = 0; j < Hv; ++j) ds[i * Hv + j] += c.scale * q[i] * dout[j];
        }
        for (int64_t i = 0; i < Hk; ++i) {
          double dq = 0, dk = 0, dg = 0;
          const double decay = std::exp(g[i * g_step]);
          for (int64_t j = 0; j < Hv; ++j) {
            dq += c.scale * states[t + 1][i * Hv + j] * dout[j];
            dk += ds[i * Hv + j] * v[j];
            dg += ds[i * Hv + j] * decay * states[t][i * Hv + j];
          }
          ref.dq[rk + i] = dq;
          ref.dk[rk + i] = dk;
          if (c.scalar_gate) {
            ref.dg[Row(c, B, b, t, n, 1)] += dg;
          } else {
            ref.dg[rk + i] = dg;
          }
        }
        for (int64_t j = 0; j < Hv; ++j) {
          double dv = 0;
          for (int64_t i = 0; i < Hk; ++i) dv += ds[i * Hv + j] * k[i];
          ref.dv[rv + j] = dv;
        }
        for (int64_t i = 0; i < Hk; ++i) {
          const double decay = std::exp(g[i * g_step]);
          for (int64_t j = 0; j < Hv; ++j) ds[i * Hv + j] *= decay;
        }
      }
      for (int64_t i = 0; i < S; ++i) ref.dstate[(b * N + n) * S + i] = ds[i];
    }
  }
  return ref;
}

GatedLinearProblem MakeProblem(const Case& c, Operands& x) {
  GatedLinearProblem p;
  p.dtype = c.dtype;
  p.gate_dtype = c.gate_dtype;
  p.batch = c.B;
  p.seq_len = c.T;
  p.num_heads = c.N;
  p.num_kv_heads = c.K;
  p.gate_dim = GateDim(c);
  p.key_dim = c.Hk;
  p.value_dim = c.Hv;
  p.q_batch = c.q_batch, p.k_batch = c.k_batch, p.v_batch = c.v_batch, p.g_batch = c.g_batch;
  p.query = x.q.data(), p.key = x.k.data(), p.value = x.v.data(), p.log_gate = x.g.data();
  if (c.state_batch) {
    p.initial_state = static_cast<const float*>(x.state.data());
    p.state_batch = c.state_batch;
  }
  p.scale = static_cast<float>(c.scale);
  return p;
}

struct Results {
  Tensor out, final_state, dq, dk, dv, dg, dstate;
};

Results Run(const Case& c, Operands& x, const jaxattn::Parallel& parallel, Failures* f) {
  Results r{
      Tensor(c.dtype, {c.B, c.T, c.N, c.Hv}),     Tensor(DType::kF32, {c.B, c.N, c.Hk, c.Hv}),
      Tensor(c.dtype, {c.B, c.T, c.N, c.Hk}),     Tensor(c.dtype, {c.B, c.T, c.N, c.Hk}),
      Tensor(c.dtype, {c.B, c.T, c.N, c.Hv}),     Tensor(c.gate_dtype, {c.B, c.T, c.N, GateDim(c)}),
      Tensor(DType::kF32, {c.B, c.N, c.Hk, c.Hv})};
  const GatedLinearProblem p = MakeProblem(c, x);
  if (const char* m = jaxattn::ValidateGatedLinear(p)) {
    f->Add(std::string("ValidateGatedLinear rejected a valid problem: ") + m);
    return r;
  }
  if (const char* m = jaxattn::GatedLinearForward(
          p, {r.out.data(), static_cast<float*>(r.final_state.data())}, parallel)) {
    f->Add(m);
  }
  jaxattn::GatedLinearBackwardArgs args;
  args.dout = x.dout.data();
  args.dfinal_state = c.dfinal ? static_cast<const float*>(x.dfinal.data()) : nullptr;
  args.dquery = r.dq.data(), args.dkey = r.dk.data(), args.dvalue = r.dv.data();
  args.dlog_gate = r.dg.data();
  args.dinitial_state = static_cast<float*>(r.dstate.data());
  if (const char* m = jaxattn::GatedLinearBackward(p, args, parallel)) f->Add(m);
  for (Tensor* t : {&r.out, &r.final_state, &r.dq, &r.dk, &r.dv, &r.dg, &r.dstate}) {
    for (int64_t i = 0; i < t->count(); ++i) t->values[i] = t->Get(i);
  }
  return r;
}

// The forward with final_state in initial_state's buffer (the primitive aliases the two: a
// decoding step updates a donated state in place) gives the results of separate buffers.
void CheckInPlace(const Case& c, Operands& x, const Results& separate,
                  const jaxattn::Parallel& parallel, Failures* f) {
  Tensor state(DType::kF32, {c.B, c.N, c.Hk, c.Hv}), out(c.dtype, {c.B, c.T, c.N, c.Hv});
  std::memcpy(state.data(), x.state.data(), state.count() * sizeof(float));
  GatedLinearProblem p = MakeProblem(c, x);
  p.initial_state = static_cast<const float*>(state.data());
  if (const char* m = jaxattn::GatedLinearForward(
          p, {out.data(), static_cast<float*>(state.data())}, parallel)) {
    f->Add(m);
  }
  for (Tensor* t : {&out, &state}) {
    for (int64_t i = 0; i < t->count(); ++i) t->values[i] = t->Get(i);
  }
  CompareBitwise("out (in place)", out, separate.out, f);
  CompareBitwise("final_state (in place)", state, separate.final_state, f);
}

void RunCase(const Case& c, uint64_t seed, ThreadPool* pool, Failures* f) {
  Operands x = MakeOperands(c, seed);
  const Reference ref = Compute(c, x);
  jaxattn::SerialParallel serial;
  const Results a = Run(c, x, serial, f);
  const double tol = c.dtype == DType::kF32 ? 2e-4 : c.dtype == DType::kBF16 ? 2e-2 : 4e-3;
  // The gate gradient sums over the sequence: its error grows with T.
  const double gate_tol =
      tol * (1.0 + std::sqrt(double(c.T))) * (c.gate_dtype == DType::kBF16 ? 4.0 : 1.0);
  Compare("out", a.out, ref.out, tol, f);
  Compare("final_state", a.final_state, ref.final_state, 2e-4 * (c.dtype == DType::kF32 ? 1 : 4),
          f);
  Compare("dquery", a.dq, ref.dq, tol, f);
  Compare("dkey", a.dk, ref.dk, tol, f);
  Compare("dvalue", a.dv, ref.dv, tol, f);
  Compare("dlog_gate", a.dg, ref.dg, gate_tol, f);
  Compare("dinitial_state", a.dstate, ref.dstate, 2e-4 * (c.dtype == DType::kF32 ? 1 : 4), f);
  PoolParallel parallel(pool);
  const Results b = Run(c, x, parallel, f);
  CompareBitwise("out (threads)", a.out, b.out, f);
  CompareBitwise("final_state (threads)", a.final_state, b.final_state, f);
  CompareBitwise("dquery (threads)", a.dq, b.dq, f);
  CompareBitwise("dlog_gate (threads)", a.dg, b.dg, f);
  CompareBitwise("dinitial_state (threads)", a.dstate, b.dstate, f);
  if (c.state_batch == c.B) CheckInPlace(c, x, a, parallel, f);
}

int64_t Divisor(Random& r, int64_t n) {
  std::vector<int64_t> d;
  for (int64_t i = 1; i <= n; ++i) {
    if (n % i == 0) d.push_back(i);
  }
  return d[r.Int(0, static_cast<int64_t>(d.size()) - 1)];
}

Case RandomCase(Random& r) {
  Case c;
  c.dtype = r.Pick({DType::kF32, DType::kF32, DType::kBF16, DType::kF16});
  c.gate_dtype = r.Chance(0.5) ? DType::kF32 : c.dtype;
  c.B = r.Int(1, 3);
  c.T = r.Pick<int64_t>({0, 1, 2, 4, 5, 17, 63, 64, 65, 100, 130});
  c.N = r.Pick<int64_t>({1, 2, 3, 4});
  c.K = Divisor(r, c.N);
  c.scalar_gate = r.Chance(0.4);
  c.Hk = r.Pick<int64_t>({1, 3, 8, 16, 17, 33});
  c.Hv = r.Pick<int64_t>({1, 5, 16, 20, 31, 100});  // 100: the decoder splits columns
  c.q_batch = Divisor(r, c.B), c.k_batch = Divisor(r, c.B), c.v_batch = Divisor(r, c.B);
  c.g_batch = Divisor(r, c.B);
  c.state_batch = r.Chance(0.5) ? Divisor(r, c.B) : 0;
  c.decay = r.Pick({0.0, 0.05, 1.0, 10.0, 200.0});
  c.resets = r.Chance(0.2);
  c.dfinal = r.Chance(0.5);
  c.scale = r.Pick({1.0, 0.25, -0.7});
  return c;
}

void CheckValidation(Failures* f) {
  static float dummy[1];
  GatedLinearProblem p;
  p.batch = p.seq_len = p.num_heads = p.num_kv_heads = p.key_dim = p.value_dim = 1;
  p.gate_dim = 1;
  p.q_batch = p.k_batch = p.v_batch = p.g_batch = 1;
  p.query = p.key = p.value = p.log_gate = dummy;
  if (jaxattn::ValidateGatedLinear(p) != nullptr) f->Add("rejected the minimal problem");
  GatedLinearProblem bad = p;
  bad.key_dim = 0;
  if (jaxattn::ValidateGatedLinear(bad) == nullptr) f->Add("accepted Hk = 0");
  bad = p;
  bad.batch = 3, bad.q_batch = 2;
  if (jaxattn::ValidateGatedLinear(bad) == nullptr) f->Add("accepted q_batch 2 of 3");
  bad = p;
  bad.initial_state = dummy, bad.state_batch = 0;
  if (jaxattn::ValidateGatedLinear(bad) == nullptr) f->Add("accepted state batch 0");
  bad = p;
  bad.scale = std::nanf("");
  if (jaxattn::ValidateGatedLinear(bad) == nullptr) f->Add("accepted a NaN scale");
  bad = p;
  bad.num_heads = 3, bad.num_kv_heads = 2;
  if (jaxattn::ValidateGatedLinear(bad) == nullptr) f->Add("accepted 2 kv heads for 3 heads");
  bad = p;
  bad.key_dim = 4, bad.gate_dim = 2;
  if (jaxattn::ValidateGatedLinear(bad) == nullptr) f->Add("accepted gate dim 2 for Hk = 4");
  bad = p;
  bad.value_dim = 4096;
  if (jaxattn::ValidateGatedLinear(bad) == nullptr) f->Add("accepted Hv = 4096");
}

void RunGlaSuite(SuiteContext& context) {
  {
    Failures f;
    CheckValidation(&f);
    context.Record("ValidateGatedLinear", f);
  }
  Random grid(context.seed + 29);
  // Fewer cases than the attention suites: the float64 backward reference is O(T Hk Hv).
  const int64_t num_cases = std::max<int64_t>(8, context.num_cases / 4);
  for (int64_t i = 0; i < num_cases; ++i) {
    const Case c = RandomCase(grid);
    if (context.verbose) {
      std::printf("gla case %ld: %s\n", long(i), c.Describe().c_str());
      std::fflush(stdout);
    }
    Failures f;
    RunCase(c, context.seed * 1000003 + i, context.pool, &f);
    context.Record("case " + std::to_string(i) + " (" + c.Describe() + ")", f);
  }
  Case c;
  c.B = 2, c.T = 70, c.N = 4, c.Hk = 16, c.Hv = 16, c.state_batch = 2, c.dfinal = true;
  Failures f;
  CheckNestedJoin(
      "gla nested join", 4,
      [&c](ThreadPool* pool, int job, Failures* jf) { RunCase(c, 3000 + job, pool, jf); }, &f);
  context.Record("nested join", f);
}

}  // namespace

JAXATTN_HARNESS_SUITE(gla, RunGlaSuite);

}  // namespace jaxattn_harness
