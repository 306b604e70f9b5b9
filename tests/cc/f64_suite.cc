// The float64 kernels (cc/attention_f64.h) under the sanitizers: random problems (every mask,
// bias broadcast, lengths, positions, segment ids, ALiBi, soft cap, dropout, GQA, odd shapes)
// through the flash forward, backward and logits gradient and block-sparse tables, each in
// operands of exactly their size, against a plain float64 reference here (1e-11 relative),
// serial and threaded runs bitwise equal. Float64 decoding runs in decode_suite.cc.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "attention_f64.h"
#include "harness.h"

namespace jaxattn_harness {
namespace {

using jaxattn::AttentionProblem;

// The float64 kernels accumulate in float64: errors are a few ulps of the largest magnitude.
constexpr double kTolerance = 1e-11;

// A float64 operand of `count` elements drawn from a standard normal.
Tensor RandomDoubles(Random& rng, int64_t count) {
  Tensor t(DType::kF64, {count});
  for (int64_t i = 0; i < count; ++i) t.Set(i, rng.Normal());
  return t;
}

// A float64 output of `count` elements, NaN until written (unwritten outputs show up).
Tensor OutputDoubles(int64_t count) {
  Tensor t(DType::kF64, {count});
  t.Fill(0xff);
  return t;
}

double* Data(Tensor& t) { return static_cast<double*>(t.data()); }
const double* Data(const Tensor& t) { return static_cast<const double*>(t.data()); }

struct Case {
  int64_t B = 1, T = 1, S = 1, N = 1, K = 1, H = 1, Hv = 1;
  bool causal = false, bias = false, mask = false, lengths = false, positions = false;
  bool segments = false, alibi = false, dropout = false, sparse = false;
  int64_t left = -1, right = -1;
  double cap = 0.0, scale = 0.5;
  std::string Describe() const {
    char s[256];
    std::snprintf(s, sizeof(s),
                  "B%lld T%lld S%lld N%lld K%lld H%lld Hv%lld%s%s%s%s%s%s%s%s%s w(%lld,%lld) "
                  "cap %g",
                  (long long)B, (long long)T, (long long)S, (long long)N, (long long)K,
                  (long long)H, (long long)Hv, causal ? " causal" : "", bias ? " bias" : "",
                  mask ? " mask" : "", lengths ? " lengths" : "", positions ? " positions" : "",
                  segments ? " segments" : "", alibi ? " alibi" : "", dropout ? " dropout" : "",
                  sparse ? " sparse" : "", (long long)left, (long long)right, cap);
    return s;
  }
};

Case RandomCase(Random& rng) {
  Case c;
  c.B = rng.Int(1, 2);
  c.T = rng.Pick<int64_t>({1, 5, 17, 64, 70, 129});
  c.S = rng.Pick<int64_t>({1, 7, 63, 65, 100, 130});
  c.K = rng.Int(1, 2);
  c.N = c.K * rng.Int(1, 3);
  c.H = rng.Pick<int64_t>({1, 3, 17, 40});
  c.Hv = rng.Pick<int64_t>({1, 9, 17});
  c.sparse = rng.Chance(0.25);
  if (!c.sparse) {
    c.causal = rng.Chance(0.4);
    c.bias = rng.Chance(0.3);
    c.mask = rng.Chance(0.3);
    c.lengths = rng.Chance(0.3);
    c.positions = rng.Chance(0.2);
    if (rng.Chance(0.3)) c.left = rng.Int(0, 20);
    if (rng.Chance(0.2)) c.right = rng.Int(0, 20);
  }
  c.segments = rng.Chance(0.2);
  c.alibi = rng.Chance(0.2);
  c.dropout = rng.Chance(0.2);
  if (rng.Chance(0.3)) c.cap = 4.0;
  return c;
}

struct Inputs {
  Tensor q, k, v, bias, dout, dlse;
  std::vector<uint8_t> mask;  // [B, 1, T, S]
  std::vector<int32_t> q_lengths, kv_lengths, q_pos, kv_pos, q_seg, kv_seg;
  std::vector<float> slopes;    // [1, N]
  std::vector<uint32_t> seeds;  // [B, N, 2]
  uint32_t threshold = 0;
  // Block-sparse: the element mask [T, S] (shared by the heads) and its tables.
  std::vector<uint8_t> sparse_dense;
  CompiledTables compiled;
};

// A random block-sparse element mask over the kernels' tiling, each tile absent, full or
// partial (its own random elements), and its tables.
void MakeTables(const Case& c, Random& rng, Inputs* x) {
  const jaxattn::BlockSparseTiling tl = jaxattn::BlockSparseTilingFor(c.N / c.K);
  const int64_t nq = (c.T + tl.positions - 1) / tl.positions, nk = (c.S + tl.keys - 1) / tl.keys;
  x->sparse_dense.assign(c.T * c.S, 0);
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t j = 0; j < nk; ++j) {
      const int kind = static_cast<int>(rng.Int(0, 2));  // absent, full, partial
      if (kind == 0) continue;
      for (int64_t t = i * tl.positions; t < std::min(c.T, (i + 1) * tl.positions); ++t) {
        const bool attend_row = rng.Chance(0.8);
        for (int64_t s = j * tl.keys; s < std::min(c.S, (j + 1) * tl.keys); ++s) {
          x->sparse_dense[t * c.S + s] = kind == 1 || (attend_row && rng.Chance(0.6));
        }
      }
    }
  }
  x->compiled = CompileBlockSparseTables(c.T, c.S, c.N, c.K, false, x->sparse_dense);
}

void MakeInputs(const Case& c, Random& rng, Inputs* x) {
  x->q = RandomDoubles(rng, c.B * c.T * c.N * c.H);
  x->k = RandomDoubles(rng, c.B * c.S * c.K * c.H);
  x->v = RandomDoubles(rng, c.B * c.S * c.K * c.Hv);
  if (c.bias) x->bias = RandomDoubles(rng, c.B * c.N * c.T * c.S);
  if (c.mask) {
    x->mask.resize(c.B * c.T * c.S);
    for (auto& m : x->mask) m = rng.Chance(0.7);
  }
  if (c.lengths) {
    for (int64_t b = 0; b < c.B; ++b) {
      x->q_lengths.push_back(static_cast<int32_t>(rng.Int(0, c.T)));
      x->kv_lengths.push_back(static_cast<int32_t>(rng.Int(0, c.S)));
    }
  }
  if (c.positions) {
    for (int64_t t = 0; t < c.T; ++t) x->q_pos.push_back(static_cast<int32_t>(rng.Int(-5, 60)));
    for (int64_t s = 0; s < c.S; ++s) x->kv_pos.push_back(static_cast<int32_t>(rng.Int(-5, 60)));
  }
  if (c.segments) {
    for (int64_t t = 0; t < c.T; ++t) x->q_seg.push_back(static_cast<int32_t>(t / 11));
    for (int64_t s = 0; s < c.S; ++s) x->kv_seg.push_back(static_cast<int32_t>(s / 13));
  }
  if (c.alibi) {
    for (int64_t n = 0; n < c.N; ++n) x->slopes.push_back(std::ldexp(1.0f, -1 - int(n)));
  }
  if (c.dropout) {
    for (int64_t i = 0; i < c.B * c.N * 2; ++i) {
      x->seeds.push_back(static_cast<uint32_t>(rng.Int(0, 0xFFFFFFFFll)));
    }
    x->threshold = 1u << 30;  // rate 1/4
  }
  if (c.sparse) MakeTables(c, rng, x);
  x->dout = RandomDoubles(rng, c.B * c.T * c.N * c.Hv);
  x->dlse = RandomDoubles(rng, c.B * c.T * c.N);
}

AttentionProblem MakeProblem(const Case& c, const Inputs& x) {
  AttentionProblem p;
  p.dtype = DType::kF64;
  p.batch = p.q_batch = p.kv_batch = p.value_batch = c.B;
  p.q_len = c.T;
  p.kv_len = c.S;
  p.num_heads = c.N;
  p.num_kv_heads = c.K;
  p.head_dim = c.H;
  p.value_dim = c.Hv;
  p.query = x.q.data();
  p.key = x.k.data();
  p.value = x.v.data();
  if (c.bias) {
    p.bias.data = x.bias.data();
    p.bias.dtype = DType::kF64;
    p.bias.dims[0] = c.B;
    p.bias.dims[1] = c.N;
    p.bias.dims[2] = c.T;
    p.bias.dims[3] = c.S;
  }
  if (c.mask) {
    p.mask.data = x.mask.data();
    p.mask.dims[0] = c.B;
    p.mask.dims[2] = c.T;
    p.mask.dims[3] = c.S;
  }
  if (c.lengths) {
    p.q_lengths = x.q_lengths.data();
    p.kv_lengths = x.kv_lengths.data();
    p.q_lengths_batch = p.kv_lengths_batch = c.B;
  }
  if (c.positions) {
    p.q_positions = x.q_pos.data();
    p.kv_positions = x.kv_pos.data();
  }
  if (c.segments) {
    p.q_segments = x.q_seg.data();
    p.kv_segments = x.kv_seg.data();
  }
  if (c.alibi) p.alibi_slopes = x.slopes.data();
  if (c.dropout) {
    p.dropout_seeds = x.seeds.data();
    p.dropout_batch = c.B;
    p.dropout_threshold = x.threshold;
  }
  p.scale = static_cast<float>(c.scale);
  p.soft_cap = static_cast<float>(c.cap);
  p.causal = c.causal;
  p.window_left = c.left;
  p.window_right = c.right;
  return p;
}

struct Reference {
  std::vector<double> out, lse, dq, dk, dv, dlogits;
};

// Plain float64 attention, row by row, with the analytic gradients of
// sum(out * dout) + sum(lse * dlse).
Reference ComputeReference(const Case& c, const Inputs& x) {
  Reference r;
  r.out.assign(c.B * c.T * c.N * c.Hv, 0.0);
  r.lse.assign(c.B * c.T * c.N, -kInf);
  r.dq.assign(c.B * c.T * c.N * c.H, 0.0);
  r.dk.assign(c.B * c.S * c.K * c.H, 0.0);
  r.dv.assign(c.B * c.S * c.K * c.Hv, 0.0);
  r.dlogits.assign(c.B * c.N * c.T * c.S, 0.0);
  const int64_t G = c.N / c.K;
  const double keep_scale = c.dropout ? 4.0 / 3.0 : 1.0;
  std::vector<double> logit(c.S), prob(c.S), th(c.S), keep(c.S);
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t q_len = c.lengths ? std::min<int64_t>(c.T, x.q_lengths[b]) : c.T;
    const int64_t kv_len = c.lengths ? std::min<int64_t>(c.S, x.kv_lengths[b]) : c.S;
    for (int64_t n = 0; n < c.N; ++n) {
      const int64_t kh = n / G;
      for (int64_t t = 0; t < c.T; ++t) {
        const int64_t row = (b * c.T + t) * c.N + n;
        const double* q = &x.q.values[row * c.H];
        const int64_t qp = c.positions ? x.q_pos[t] : t;
        double top = -kInf;
        for (int64_t s = 0; s < c.S; ++s) {
          const int64_t kp = c.positions ? x.kv_pos[s] : s;
          bool visible = t < q_len && s < kv_len && (!c.causal || kp <= qp) &&
                         (c.left < 0 || kp >= qp - c.left) && (c.right < 0 || kp <= qp + c.right);
          if (c.mask) visible = visible && x.mask[(b * c.T + t) * c.S + s];
          if (c.segments) visible = visible && x.q_seg[t] == x.kv_seg[s];
          if (c.sparse) visible = visible && x.sparse_dense[t * c.S + s];
          double dot = 0.0;
          const double* k = &x.k.values[((b * c.S + s) * c.K + kh) * c.H];
          for (int64_t h = 0; h < c.H; ++h) dot += q[h] * k[h];
          double v = dot * c.scale;
          if (c.bias) v += x.bias.values[((b * c.N + n) * c.T + t) * c.S + s];
          if (c.alibi) v -= x.slopes[n] * std::fabs(static_cast<double>(qp - kp));
          th[s] = 0.0;
          if (c.cap > 0) {
            th[s] = std::tanh(v / c.cap);
            v = c.cap * th[s];
          }
          logit[s] = visible ? v : -kInf;
          top = std::max(top, logit[s]);
          keep[s] = 1.0;
          if (c.dropout) {
            const uint32_t* seed = &x.seeds[(b * c.N + n) * 2];
            keep[s] = ReferenceDropoutKept(seed, t, s, x.threshold) ? keep_scale : 0.0;
          }
        }
        if (top == -kInf) continue;
        double sum = 0.0;
        for (int64_t s = 0; s < c.S; ++s) sum += prob[s] = std::exp(logit[s] - top);
        r.lse[row] = top + std::log(sum);
        double* out = &r.out[row * c.Hv];
        for (int64_t s = 0; s < c.S; ++s) {
          prob[s] /= sum;
          const double* v = &x.v.values[((b * c.S + s) * c.K + kh) * c.Hv];
          for (int64_t e = 0; e < c.Hv; ++e) out[e] += prob[s] * keep[s] * v[e];
        }
        // Backward: dp_s = keep_s dout.v_s, ds = p (dp - sum p dp) + p dlse.
        const double* dout = &x.dout.values[row * c.Hv];
        double d = -x.dlse.values[row];
        for (int64_t e = 0; e < c.Hv; ++e) d += dout[e] * out[e];
        for (int64_t s = 0; s < c.S; ++s) {
          if (prob[s] == 0.0) continue;
          const double* v = &x.v.values[((b * c.S + s) * c.K + kh) * c.Hv];
          double dp = 0.0;
          for (int64_t e = 0; e < c.Hv; ++e) dp += dout[e] * v[e];
          const double ds = prob[s] * (dp * keep[s] - d) * (1.0 - th[s] * th[s]);
          r.dlogits[((b * c.N + n) * c.T + t) * c.S + s] = ds;
          const double* k = &x.k.values[((b * c.S + s) * c.K + kh) * c.H];
          double* dk = &r.dk[((b * c.S + s) * c.K + kh) * c.H];
          double* dv = &r.dv[((b * c.S + s) * c.K + kh) * c.Hv];
          for (int64_t h = 0; h < c.H; ++h) {
            r.dq[row * c.H + h] += ds * c.scale * k[h];
            dk[h] += ds * c.scale * q[h];
          }
          for (int64_t e = 0; e < c.Hv; ++e) dv[e] += prob[s] * keep[s] * dout[e];
        }
      }
    }
  }
  return r;
}

struct Outputs {
  Tensor out, lse, dq, dk, dv, dlogits;
};

Outputs Run(const Case& c, const Inputs& x, const AttentionProblem& p,
            const jaxattn::Parallel& parallel, Failures* f) {
  Outputs o;
  o.out = OutputDoubles(c.B * c.T * c.N * c.Hv);
  o.lse = OutputDoubles(c.B * c.T * c.N);
  const jaxattn::BlockSparseTables* tables = c.sparse ? &x.compiled.tables : nullptr;
  if (jaxattn::FlashForwardF64(p, tables, {Data(o.out), Data(o.lse)}, parallel)) {
    f->Add("forward: scratch allocation failed");
  }
  o.dq = OutputDoubles(c.B * c.T * c.N * c.H);
  o.dk = OutputDoubles(c.B * c.S * c.K * c.H);
  o.dv = OutputDoubles(c.B * c.S * c.K * c.Hv);
  jaxattn::F64BackwardArgs a;
  a.out = Data(o.out);
  a.lse = Data(o.lse);
  a.dout = Data(x.dout);
  a.dlse = Data(x.dlse);
  a.dq = Data(o.dq);
  a.dk = Data(o.dk);
  a.dv = Data(o.dv);
  if (jaxattn::FlashBackwardF64(p, tables, a, parallel)) f->Add("backward: allocation failed");
  if (!c.sparse) {
    o.dlogits = OutputDoubles(c.B * c.N * c.T * c.S);
    a.dq = a.dk = a.dv = nullptr;
    a.dlogits = Data(o.dlogits);
    if (jaxattn::FlashBackwardF64(p, nullptr, a, parallel)) f->Add("dlogits: allocation failed");
  }
  return o;
}

void RunCase(const Case& c, uint64_t seed, ThreadPool* pool, Failures* f) {
  Random rng(seed);
  Inputs x;
  MakeInputs(c, rng, &x);
  const AttentionProblem p = MakeProblem(c, x);
  if (const char* m = jaxattn::ValidateProblem(p)) {
    f->Add(std::string("ValidateProblem rejected a valid problem: ") + m);
    return;
  }
  if (c.sparse) {
    if (const char* m = jaxattn::ValidateBlockSparse(p, x.compiled.tables)) {
      f->Add(std::string("ValidateBlockSparse rejected the tables: ") + m);
      return;
    }
  }
  jaxattn::SerialParallel serial;
  PoolParallel threaded(pool);
  const Outputs a = Run(c, x, p, serial, f);
  const Outputs b = Run(c, x, p, threaded, f);
  const Reference r = ComputeReference(c, x);
  CompareBitwise("out", a.out, b.out, f);
  CompareBitwise("lse", a.lse, b.lse, f);
  CompareBitwise("dq", a.dq, b.dq, f);
  CompareBitwise("dk", a.dk, b.dk, f);
  CompareBitwise("dv", a.dv, b.dv, f);
  Compare("out", a.out, r.out, kTolerance, f);
  Compare("lse", a.lse, r.lse, kTolerance, f);
  Compare("dq", a.dq, r.dq, kTolerance, f);
  Compare("dk", a.dk, r.dk, kTolerance, f);
  Compare("dv", a.dv, r.dv, kTolerance, f);
  if (!c.sparse) {
    CompareBitwise("dlogits", a.dlogits, b.dlogits, f);
    Compare("dlogits", a.dlogits, r.dlogits, kTolerance, f);
  }
}

void RunF64Suite(SuiteContext& context) {
  Random grid(context.seed * 7919 + 64);
  const int64_t count = std::max<int64_t>(8, context.num_cases / 4);  // the cases are larger
  for (int64_t i = 0; i < count; ++i) {
    const Case c = RandomCase(grid);
    if (context.verbose) {
      std::printf("f64 case %lld: %s\n", static_cast<long long>(i), c.Describe().c_str());
      std::fflush(stdout);
    }
    Failures f;
    RunCase(c, context.seed * 1000003 + i, context.pool, &f);
    context.Record("f64 case " + std::to_string(i) + " (" + c.Describe() + ")", f);
  }
}

}  // namespace

JAXATTN_HARNESS_SUITE(f64, RunF64Suite);

}  // namespace jaxattn_harness
