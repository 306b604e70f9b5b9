// The float64 kernels (cc/attention_f64.h) under the sanitizers: random problems (every mask,
// bias broadcast, lengths, positions, segment ids, ALiBi, soft cap, dropout, GQA, odd shapes)
// through the flash forward, backward and logits gradient, block-sparse tables and paged
// decoding, each in operands of exactly their size, against a plain float64 reference here
// (1e-11 relative), serial and threaded runs bitwise equal.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "attention_f64.h"
#include "harness.h"

namespace jaxattn_harness {
namespace {

using jaxattn::AttentionProblem;

// Doubles in a heap block of exactly their count (ASan's redzone right after the last one).
struct Doubles {
  std::unique_ptr<double[]> data;
  int64_t count = 0;
  Doubles() = default;
  explicit Doubles(int64_t n) : data(new double[n > 0 ? n : 1]), count(n) {
    for (int64_t i = 0; i < n; ++i) data[i] = kNaN;  // unwritten outputs show up as NaN
  }
  double& operator[](int64_t i) { return data[i]; }
  const double& operator[](int64_t i) const { return data[i]; }
};

void Randomize(Random& rng, Doubles* x) {
  for (int64_t i = 0; i < x->count; ++i) (*x)[i] = rng.Normal();
}

void CompareClose(const std::string& what, const Doubles& a, const std::vector<double>& ref,
                  Failures* f) {
  double top = 1.0;
  for (double r : ref) top = std::isfinite(r) ? std::max(top, std::fabs(r)) : top;
  for (int64_t i = 0; i < a.count; ++i) {
    const bool same_special = !std::isfinite(ref[i]) && a[i] == ref[i];
    if (same_special) continue;
    if (!(std::fabs(a[i] - ref[i]) <= 1e-11 * top)) {
      f->Add(what + "[" + std::to_string(i) + "] = " + std::to_string(a[i]) + ", reference " +
             std::to_string(ref[i]));
      return;
    }
  }
}

void CompareSame(const std::string& what, const Doubles& a, const Doubles& b, Failures* f) {
  if (a.count != b.count ||
      std::memcmp(a.data.get(), b.data.get(), a.count * sizeof(double)) != 0) {
    f->Add(what + ": serial and threaded results differ");
  }
}

uint32_t Mix(uint32_t x) {  // the dropout hash of cc/dropout.h, written out for the reference
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

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
                  segments ? " segments" : "", alibi ? " alibi" : "",
                  dropout ? " dropout" : "", sparse ? " sparse" : "", (long long)left,
                  (long long)right, cap);
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
  Doubles q, k, v, bias, dout, dlse;
  std::vector<uint8_t> mask;            // [B, 1, T, S]
  std::vector<int32_t> q_lengths, kv_lengths, q_pos, kv_pos, q_seg, kv_seg;
  std::vector<float> slopes;            // [1, N]
  std::vector<uint32_t> seeds;          // [B, N, 2]
  uint32_t threshold = 0;
  // Block-sparse: the tables and their dense equivalent [T, S] (groups 1).
  std::vector<int32_t> q_indptr, q_entries, k_indptr, k_entries;
  std::vector<uint8_t> masks, masks_t, sparse_dense;
  jaxattn::BlockSparseTables tables;
};

// Random block-sparse tables over the kernels' tiling: each tile absent, full or partial
// (its own random element mask), and the dense mask they stand for.
void MakeTables(const Case& c, Random& rng, Inputs* x) {
  const jaxattn::BlockSparseTiling tl = jaxattn::BlockSparseTilingFor(c.N / c.K);
  const int64_t G = c.N / c.K;
  const int64_t nq = (c.T + tl.positions - 1) / tl.positions, nk = (c.S + tl.keys - 1) / tl.keys;
  x->sparse_dense.assign(c.T * c.S, 0);
  x->q_indptr.assign(1, 0);
  std::vector<std::vector<std::pair<int32_t, int32_t>>> by_key(nk);
  int32_t num_masks = 0;
  for (int64_t i = 0; i < nq; ++i) {
    for (int64_t j = 0; j < nk; ++j) {
      const int kind = static_cast<int>(rng.Int(0, 2));  // absent, full, partial
      if (kind == 0) continue;
      int32_t id = -1;
      if (kind == 2) {
        id = num_masks++;
        x->masks.resize(num_masks * tl.rows * tl.keys, 0);
        x->masks_t.resize(num_masks * tl.keys * tl.rows_padded, 0);
      }
      for (int64_t tp = 0; tp < tl.positions; ++tp) {
        const bool attend_row = rng.Chance(0.8);
        for (int64_t s = 0; s < tl.keys; ++s) {
          const bool on = kind == 1 || (attend_row && rng.Chance(0.6));
          const int64_t t = i * tl.positions + tp, key = j * tl.keys + s;
          if (id >= 0) {
            for (int64_t g = 0; g < G; ++g) {
              const int64_t r = tp * G + g;
              x->masks[(id * tl.rows + r) * tl.keys + s] = on;
              x->masks_t[(id * tl.keys + s) * tl.rows_padded + r] = on;
            }
          }
          if (t < c.T && key < c.S) x->sparse_dense[t * c.S + key] = on;
        }
      }
      x->q_entries.push_back(static_cast<int32_t>(j));
      x->q_entries.push_back(id);
      by_key[j].push_back({static_cast<int32_t>(i), id});
    }
    x->q_indptr.push_back(static_cast<int32_t>(x->q_entries.size() / 2));
  }
  x->k_indptr.assign(1, 0);
  for (int64_t j = 0; j < nk; ++j) {
    for (auto [i, id] : by_key[j]) {
      x->k_entries.push_back(i);
      x->k_entries.push_back(id);
    }
    x->k_indptr.push_back(static_cast<int32_t>(x->k_entries.size() / 2));
  }
  jaxattn::BlockSparseTables& t = x->tables;
  t.groups = 1;
  t.num_q_tiles = nq;
  t.num_k_tiles = nk;
  t.q_indptr = x->q_indptr.data();
  t.q_entries = x->q_entries.data();
  t.q_nnz = static_cast<int64_t>(x->q_entries.size() / 2);
  t.k_indptr = x->k_indptr.data();
  t.k_entries = x->k_entries.data();
  t.k_nnz = t.q_nnz;
  t.masks = x->masks.data();
  t.masks_t = x->masks_t.data();
  t.num_masks = num_masks;
}

void MakeInputs(const Case& c, Random& rng, Inputs* x) {
  x->q = Doubles(c.B * c.T * c.N * c.H);
  x->k = Doubles(c.B * c.S * c.K * c.H);
  x->v = Doubles(c.B * c.S * c.K * c.Hv);
  Randomize(rng, &x->q);
  Randomize(rng, &x->k);
  Randomize(rng, &x->v);
  if (c.bias) {
    x->bias = Doubles(c.B * c.N * c.T * c.S);
    Randomize(rng, &x->bias);
  }
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
  x->dout = Doubles(c.B * c.T * c.N * c.Hv);
  x->dlse = Doubles(c.B * c.T * c.N);
  Randomize(rng, &x->dout);
  Randomize(rng, &x->dlse);
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
  p.query = x.q.data.get();
  p.key = x.k.data.get();
  p.value = x.v.data.get();
  if (c.bias) {
    p.bias.data = x.bias.data.get();
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
        const double* q = &x.q[row * c.H];
        const int64_t qp = c.positions ? x.q_pos[t] : t;
        double top = -kInf;
        for (int64_t s = 0; s < c.S; ++s) {
          const int64_t kp = c.positions ? x.kv_pos[s] : s;
          bool visible = t < q_len && s < kv_len && (!c.causal || kp <= qp) &&
                         (c.left < 0 || kp >= qp - c.left) &&
                         (c.right < 0 || kp <= qp + c.right);
          if (c.mask) visible = visible && x.mask[(b * c.T + t) * c.S + s];
          if (c.segments) visible = visible && x.q_seg[t] == x.kv_seg[s];
          if (c.sparse) visible = visible && x.sparse_dense[t * c.S + s];
          double dot = 0.0;
          const double* k = &x.k[((b * c.S + s) * c.K + kh) * c.H];
          for (int64_t h = 0; h < c.H; ++h) dot += q[h] * k[h];
          double v = dot * c.scale;
          if (c.bias) v += x.bias[((b * c.N + n) * c.T + t) * c.S + s];
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
            const uint32_t k0 = Mix(seed[0] ^ Mix(static_cast<uint32_t>(t)));
            const uint32_t k1 = Mix(seed[1] ^ Mix(static_cast<uint32_t>(t) + 0x9E3779B9u));
            keep[s] = Mix(Mix(k0 ^ static_cast<uint32_t>(s)) ^ k1) >= x.threshold
                          ? keep_scale : 0.0;
          }
        }
        if (top == -kInf) continue;
        double sum = 0.0;
        for (int64_t s = 0; s < c.S; ++s) sum += prob[s] = std::exp(logit[s] - top);
        r.lse[row] = top + std::log(sum);
        double* out = &r.out[row * c.Hv];
        for (int64_t s = 0; s < c.S; ++s) {
          prob[s] /= sum;
          const double* v = &x.v[((b * c.S + s) * c.K + kh) * c.Hv];
          for (int64_t e = 0; e < c.Hv; ++e) out[e] += prob[s] * keep[s] * v[e];
        }
        // Backward: dp_s = keep_s dout.v_s, ds = p (dp - sum p dp) + p dlse.
        const double* dout = &x.dout[row * c.Hv];
        double d = -x.dlse[row];
        for (int64_t e = 0; e < c.Hv; ++e) d += dout[e] * out[e];
        for (int64_t s = 0; s < c.S; ++s) {
          if (prob[s] == 0.0) continue;
          const double* v = &x.v[((b * c.S + s) * c.K + kh) * c.Hv];
          double dp = 0.0;
          for (int64_t e = 0; e < c.Hv; ++e) dp += dout[e] * v[e];
          const double ds = prob[s] * (dp * keep[s] - d) * (1.0 - th[s] * th[s]);
          r.dlogits[((b * c.N + n) * c.T + t) * c.S + s] = ds;
          const double* k = &x.k[((b * c.S + s) * c.K + kh) * c.H];
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
  Doubles out, lse, dq, dk, dv, dlogits;
};

Outputs Run(const Case& c, const Inputs& x, const AttentionProblem& p,
            const jaxattn::Parallel& parallel, Failures* f) {
  Outputs o;
  o.out = Doubles(c.B * c.T * c.N * c.Hv);
  o.lse = Doubles(c.B * c.T * c.N);
  const jaxattn::BlockSparseTables* tables = c.sparse ? &x.tables : nullptr;
  if (jaxattn::FlashForwardF64(p, tables, {o.out.data.get(), o.lse.data.get()}, parallel)) {
    f->Add("forward: scratch allocation failed");
  }
  o.dq = Doubles(c.B * c.T * c.N * c.H);
  o.dk = Doubles(c.B * c.S * c.K * c.H);
  o.dv = Doubles(c.B * c.S * c.K * c.Hv);
  jaxattn::F64BackwardArgs a;
  a.out = o.out.data.get();
  a.lse = o.lse.data.get();
  a.dout = x.dout.data.get();
  a.dlse = x.dlse.data.get();
  a.dq = o.dq.data.get();
  a.dk = o.dk.data.get();
  a.dv = o.dv.data.get();
  if (jaxattn::FlashBackwardF64(p, tables, a, parallel)) f->Add("backward: allocation failed");
  if (!c.sparse) {
    o.dlogits = Doubles(c.B * c.N * c.T * c.S);
    a.dq = a.dk = a.dv = nullptr;
    a.dlogits = o.dlogits.data.get();
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
    if (const char* m = jaxattn::ValidateBlockSparse(p, x.tables)) {
      f->Add(std::string("ValidateBlockSparse rejected the tables: ") + m);
      return;
    }
  }
  jaxattn::SerialParallel serial;
  PoolParallel threaded(pool);
  const Outputs a = Run(c, x, p, serial, f);
  const Outputs b = Run(c, x, p, threaded, f);
  const Reference r = ComputeReference(c, x);
  CompareSame("out", a.out, b.out, f);
  CompareSame("dq", a.dq, b.dq, f);
  CompareSame("dk", a.dk, b.dk, f);
  CompareSame("dv", a.dv, b.dv, f);
  CompareClose("out", a.out, r.out, f);
  CompareClose("lse", a.lse, r.lse, f);
  CompareClose("dq", a.dq, r.dq, f);
  CompareClose("dk", a.dk, r.dk, f);
  CompareClose("dv", a.dv, r.dv, f);
  if (!c.sparse) {
    CompareSame("dlogits", a.dlogits, b.dlogits, f);
    CompareClose("dlogits", a.dlogits, r.dlogits, f);
  }
}

// Paged decoding: pages shuffled, lengths up to the capacity, T from 1 past the split-KV
// limit, against the same reference over the gathered cache.
void RunDecodeCase(Random& rng, ThreadPool* pool, Failures* f) {
  const int64_t B = rng.Int(1, 3), K = rng.Int(1, 2), N = K * rng.Int(1, 3);
  const int64_t T = rng.Pick<int64_t>({1, 2, 5, 20}), H = rng.Pick<int64_t>({1, 17, 33});
  const int64_t Hv = rng.Pick<int64_t>({1, 9}), page = rng.Int(1, 9), max_pages = rng.Int(1, 6);
  const int64_t P = B * max_pages + 1, capacity = page * max_pages;
  Doubles q(B * T * N * H), kp(P * page * K * H), vp(P * page * K * Hv), out(B * T * N * Hv),
      lse(B * T * N);
  Randomize(rng, &q);
  Randomize(rng, &kp);
  Randomize(rng, &vp);
  std::vector<int32_t> tables(B * max_pages), lengths(B);
  std::vector<int32_t> order(P);
  for (int64_t i = 0; i < P; ++i) order[i] = static_cast<int32_t>(i);
  for (int64_t i = P - 1; i > 0; --i) std::swap(order[i], order[rng.Int(0, i)]);
  for (int64_t i = 0; i < B * max_pages; ++i) tables[i] = order[i];
  for (int64_t b = 0; b < B; ++b) lengths[b] = static_cast<int32_t>(rng.Int(0, capacity));
  const int64_t window = rng.Chance(0.4) ? rng.Int(0, 10) : -1;
  const double cap = rng.Chance(0.4) ? 3.0 : 0.0;
  jaxattn::DecodeAttentionProblem p;
  p.dtype = DType::kF64;
  p.batch = p.q_batch = B;
  p.q_len = T;
  p.num_heads = N;
  p.num_kv_heads = K;
  p.head_dim = H;
  p.value_dim = Hv;
  p.query = q.data.get();
  p.key = kp.data.get();
  p.value = vp.data.get();
  p.num_pages = P;
  p.page_size = page;
  p.block_tables = tables.data();
  p.block_tables_batch = B;
  p.max_pages = max_pages;
  p.kv_lengths = lengths.data();
  p.kv_lengths_batch = B;
  p.scale = 0.25f;
  p.soft_cap = static_cast<float>(cap);
  p.window_left = window;
  if (const char* m = jaxattn::ValidateDecodeProblem(p)) {
    f->Add(std::string("ValidateDecodeProblem: ") + m);
    return;
  }
  jaxattn::SerialParallel serial;
  PoolParallel threaded(pool);
  Doubles out2(out.count), lse2(lse.count);
  jaxattn::DecodeForwardF64(p, {out.data.get(), lse.data.get()}, serial);
  jaxattn::DecodeForwardF64(p, {out2.data.get(), lse2.data.get()}, threaded);
  CompareSame("decode out", out, out2, f);
  CompareSame("decode lse", lse, lse2, f);
  std::vector<double> ref_out(out.count, 0.0), ref_lse(lse.count, -kInf), logit(capacity);
  const int64_t G = N / K;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (b * T + t) * N + n, qpos = lengths[b] - T + t;
        double top = -kInf;
        for (int64_t j = 0; j < lengths[b]; ++j) {
          const int64_t g = tables[b * max_pages + j / page] * page + j % page;
          const double* k = &kp[(g * K + n / G) * H];
          double dot = 0.0;
          for (int64_t h = 0; h < H; ++h) dot += q[row * H + h] * k[h];
          double v = dot * 0.25;
          if (cap > 0) v = cap * std::tanh(v / cap);
          const bool visible = j <= qpos && (window < 0 || j >= qpos - window);
          logit[j] = visible ? v : -kInf;
          top = std::max(top, logit[j]);
        }
        if (top == -kInf) continue;
        double sum = 0.0;
        for (int64_t j = 0; j < lengths[b]; ++j) sum += std::exp(logit[j] - top);
        ref_lse[row] = top + std::log(sum);
        for (int64_t j = 0; j < lengths[b]; ++j) {
          const int64_t g = tables[b * max_pages + j / page] * page + j % page;
          const double w = std::exp(logit[j] - top) / sum;
          for (int64_t e = 0; e < Hv; ++e) ref_out[row * Hv + e] += w * vp[(g * K + n / G) * Hv + e];
        }
      }
    }
  }
  CompareClose("decode out", out, ref_out, f);
  CompareClose("decode lse", lse, ref_lse, f);
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
  for (int64_t i = 0; i < count; ++i) {
    Failures f;
    RunDecodeCase(grid, context.pool, &f);
    context.Record("f64 decode case " + std::to_string(i), f);
  }
}

}  // namespace

JAXATTN_HARNESS_SUITE(f64, RunF64Suite);

}  // namespace jaxattn_harness
