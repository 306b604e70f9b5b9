// The decode kernels (DecodeForward over contiguous and paged caches) in the kernel harness: a
// random grid of problems plus hand-picked corners, each checked against a float64 reference
// of docs/semantics.md section 2 (query t of sequence b at position len - T + t sees
// keys j <= position, and j >= position - window_left). Cache rows at or past a sequence's
// length, spare pages and table entries past the length hold NaN / garbage: they must never
// be read. Serial and thread-pool runs must agree bitwise; bad page ids must be rejected.
// Quantized caches (int8, float8 e4m3fn / e5m2 bytes with float32 scales per row and kv head)
// are checked against the reference on the dequantised values, decoded here independently.
// More than 16 query tokens run the flash tiles over the cache (same semantics). Float64
// queries and caches run the float64 kernels (DecodeForwardF64; no quantized caches).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "attention_f64.h"
#include "harness.h"

namespace jaxattn_harness {
namespace {

using jaxattn::CacheQuant;
using jaxattn::DecodeAttentionProblem;

const char* QuantName(CacheQuant q) {
  switch (q) {
    case CacheQuant::kInt8: return "int8";
    case CacheQuant::kF8E4M3: return "e4m3";
    case CacheQuant::kF8E5M2: return "e5m2";
    default: return "none";
  }
}

// The value of a cache byte (NaN for NaN patterns, +-inf for e5m2's infinities).
double DecodeByte(CacheQuant q, uint8_t byte) {
  if (q == CacheQuant::kInt8) return static_cast<int8_t>(byte);
  const bool e4m3 = q == CacheQuant::kF8E4M3;
  const int mant_bits = e4m3 ? 3 : 2, bias = e4m3 ? 7 : 15;
  const int exp = (byte & 0x7f) >> mant_bits, mant = byte & ((1 << mant_bits) - 1);
  const double sign = (byte & 0x80) ? -1.0 : 1.0;
  if (e4m3 && (byte & 0x7f) == 0x7f) return kNaN;
  if (!e4m3 && exp == 31) return mant ? kNaN : sign * kInf;
  if (exp == 0) return sign * std::ldexp(mant, 1 - bias - mant_bits);
  return sign * std::ldexp((1 << mant_bits) + mant, exp - bias - mant_bits);
}

struct Case {
  DType dtype = DType::kF32;
  int64_t B = 1, T = 1, N = 1, K = 1, H = 1, Hv = 1;
  int64_t q_batch = 1;
  int64_t S = 1;          // contiguous: Smax; paged: max_pages * page_size
  int64_t page_size = 0;  // 0: contiguous cache [kv_batch, S, K, H]
  int64_t kv_batch = 1;   // contiguous only: the cache batch (divides B)
  std::vector<int32_t> lengths;
  double scale = 1.0, soft_cap = 0.0;
  int64_t window_left = -1;
  CacheQuant quant = CacheQuant::kNone;         // a quantized cache (the query keeps dtype)
  bool key_scales = true, value_scales = true;  // quantized: scales given (else 1)
  // Token positions ([B, T] and [B, S] flattened) and ALiBi slopes [N]; empty: absent.
  std::vector<int32_t> q_positions, kv_positions;
  std::vector<float> alibi;

  static int64_t ClampPosition(int64_t x) {
    return std::min<int64_t>(int64_t{1} << 30, std::max<int64_t>(-(int64_t{1} << 30), x));
  }
  int64_t QueryPosition(int64_t b, int64_t t) const {
    return q_positions.empty() ? Length(b) - T + t : ClampPosition(q_positions[b * T + t]);
  }
  int64_t KeyPosition(int64_t b, int64_t j) const {
    return kv_positions.empty() ? j : ClampPosition(kv_positions[b * S + j]);
  }

  int64_t MaxPages() const { return page_size ? S / page_size : 1; }
  int64_t Length(int64_t b) const { return std::min<int64_t>(S, std::max<int64_t>(0, lengths[b])); }
  std::string Describe() const {
    char buf[360];
    std::snprintf(buf, sizeof(buf),
                  "%s cache=%s%s%s B=%ld T=%ld N=%ld K=%ld H=%ld Hv=%ld qb=%ld S=%ld page=%ld "
                  "kvb=%ld scale=%g cap=%g window=%ld lengths=[",
                  DTypeName(dtype), QuantName(quant), key_scales ? "" : " no-kscale",
                  value_scales ? "" : " no-vscale", long(B), long(T), long(N), long(K), long(H),
                  long(Hv), long(q_batch), long(S), long(page_size), long(kv_batch), scale,
                  soft_cap, long(window_left));
    std::string s = buf;
    for (size_t i = 0; i < lengths.size(); ++i) s += (i ? "," : "") + std::to_string(lengths[i]);
    s += "]";
    if (!q_positions.empty()) s += " q_positions";
    if (!kv_positions.empty()) s += " kv_positions";
    if (!alibi.empty()) s += " alibi";
    return s;
  }
};

struct Buffers {
  Tensor q, k, v;  // k, v: the pool [pages, page_size, K, H|Hv]; quantized: bytes whose
                   // values are the dequantised elements
  std::vector<float> k_scale, v_scale;  // quantized: [pages * page_size, K] (empty: none)
  std::vector<int32_t> tables;          // [B, max_pages] (paged)
  std::unique_ptr<int32_t[]> tables_block, lengths_block;  // exactly sized copies
};

// Logical key j of sequence b -> its row in the pool.
int64_t PoolRow(const Case& c, const Buffers& x, int64_t b, int64_t j) {
  if (!c.page_size) return (b % c.kv_batch) * c.S + j;
  return int64_t(x.tables[b * c.MaxPages() + j / c.page_size]) * c.page_size + j % c.page_size;
}

void MakeCache(const Case& c, Random& rng, int64_t rows, Buffers* x) {
  x->k = Tensor(c.dtype, {rows, c.K, c.H});
  x->v = Tensor(c.dtype, {rows, c.K, c.Hv});
  // NaN everywhere, then the rows some sequence may read get values.
  for (int64_t i = 0; i < x->k.count(); ++i) x->k.Set(i, kNaN);
  for (int64_t i = 0; i < x->v.count(); ++i) x->v.Set(i, kNaN);
  for (int64_t b = 0; b < c.B; ++b) {
    for (int64_t j = 0; j < c.Length(b); ++j) {
      const int64_t row = PoolRow(c, *x, b, j);
      if (!std::isnan(x->k.values[row * c.K * c.H])) continue;  // shared contiguous row
      for (int64_t i = 0; i < c.K * c.H; ++i) x->k.Set(row * c.K * c.H + i, rng.Normal());
      for (int64_t i = 0; i < c.K * c.Hv; ++i) x->v.Set(row * c.K * c.Hv + i, rng.Normal());
    }
  }
}

// A random finite byte of the cache format, of magnitude at most `limit` (float8 without
// scales: keeps logits moderate).
uint8_t RandomByte(CacheQuant q, Random& rng, double limit) {
  for (;;) {
    const uint8_t byte = static_cast<uint8_t>(rng.Int(0, 255));
    const double value = DecodeByte(q, byte);
    if (q == CacheQuant::kInt8 && byte == 0x80) continue;  // -128: quantize_kv never writes it
    if (std::isfinite(value) && std::fabs(value) <= limit) return byte;
  }
}

// Garbage rows hold NaN patterns (int8: -128) and NaN scales; used rows random bytes with
// scales mapping them to magnitudes around 1.
void MakeQuantizedCache(const Case& c, Random& rng, int64_t rows, Buffers* x) {
  x->k = Tensor::Bytes({rows, c.K, c.H});
  x->v = Tensor::Bytes({rows, c.K, c.Hv});
  const uint8_t garbage = c.quant == CacheQuant::kInt8 ? 0x80 : 0xff;
  for (Tensor* t : {&x->k, &x->v}) {
    for (int64_t i = 0; i < t->count(); ++i) {
      t->bytes[i] = garbage;
      t->values[i] = kNaN;
    }
  }
  const double largest = c.quant == CacheQuant::kInt8     ? 127
                         : c.quant == CacheQuant::kF8E4M3 ? 448
                                                          : 57344;
  x->k_scale.assign(c.key_scales ? rows * c.K : 0, std::numeric_limits<float>::quiet_NaN());
  x->v_scale.assign(c.value_scales ? rows * c.K : 0, std::numeric_limits<float>::quiet_NaN());
  std::vector<bool> done(rows, false);
  for (int64_t b = 0; b < c.B; ++b) {
    for (int64_t j = 0; j < c.Length(b); ++j) {
      const int64_t row = PoolRow(c, *x, b, j);
      if (done[row]) continue;  // shared contiguous row
      done[row] = true;
      struct Part {
        Tensor* t;
        std::vector<float>* scale;
        int64_t dim;
      };
      for (const Part& part : {Part{&x->k, &x->k_scale, c.H}, Part{&x->v, &x->v_scale, c.Hv}}) {
        for (int64_t kh = 0; kh < c.K; ++kh) {
          float scale = 1.0f;
          if (!part.scale->empty()) {
            scale = static_cast<float>((0.5 + rng.Int(0, 100) / 100.0) / largest);
            (*part.scale)[row * c.K + kh] = scale;
          }
          const double limit = part.scale->empty() ? 2.0 : largest;
          for (int64_t h = 0; h < part.dim; ++h) {
            const int64_t i = (row * c.K + kh) * part.dim + h;
            part.t->bytes[i] = RandomByte(c.quant, rng, limit);
            part.t->values[i] = DecodeByte(c.quant, part.t->bytes[i]) * double(scale);
          }
        }
      }
    }
  }
}

void MakeInputs(const Case& c, Random& rng, Buffers* x) {
  const int64_t max_pages = c.MaxPages();
  int64_t rows;
  if (c.page_size) {
    // Every sequence owns max_pages distinct pages, shuffled, plus two spare pages.
    const int64_t pages = c.B * max_pages + 2;
    std::vector<int32_t> ids(pages);
    for (int64_t i = 0; i < pages; ++i) ids[i] = int32_t(i);
    for (int64_t i = pages - 1; i > 0; --i) std::swap(ids[i], ids[rng.Int(0, i)]);
    x->tables.assign(c.B * max_pages, 0);
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t used = (c.Length(b) + c.page_size - 1) / c.page_size;
      for (int64_t i = 0; i < max_pages; ++i) {
        // Entries past the length are never read: garbage, out of range on purpose.
        x->tables[b * max_pages + i] =
            i < used ? ids[b * max_pages + i]
                     : rng.Pick<int32_t>({-1, int32_t(pages), std::numeric_limits<int32_t>::max(),
                                          ids[b * max_pages + i]});
      }
    }
    rows = pages * c.page_size;
  } else {
    rows = c.kv_batch * c.S;
  }
  x->q = Tensor(c.dtype, {c.q_batch, c.T, c.N, c.H});
  for (int64_t i = 0; i < x->q.count(); ++i) x->q.Set(i, rng.Normal());
  if (c.quant != CacheQuant::kNone) {
    MakeQuantizedCache(c, rng, rows, x);
  } else {
    MakeCache(c, rng, rows, x);
  }
  x->lengths_block.reset(new int32_t[c.B]);
  std::memcpy(x->lengths_block.get(), c.lengths.data(), c.B * sizeof(int32_t));
  if (c.page_size) {
    x->tables_block.reset(new int32_t[x->tables.size()]);
    std::memcpy(x->tables_block.get(), x->tables.data(), x->tables.size() * sizeof(int32_t));
  }
}

DecodeAttentionProblem MakeProblem(const Case& c, Buffers& x) {
  DecodeAttentionProblem p;
  p.dtype = c.dtype;
  p.batch = c.B;
  p.q_len = c.T;
  p.num_heads = c.N;
  p.num_kv_heads = c.K;
  p.head_dim = c.H;
  p.value_dim = c.Hv;
  p.q_batch = c.q_batch;
  p.query = x.q.data();
  p.key = x.k.data();
  p.value = x.v.data();
  if (c.page_size) {
    p.page_size = c.page_size;
    p.num_pages = x.k.dims[0] / c.page_size;
    p.block_tables = x.tables_block.get();
    p.block_tables_batch = c.B;
    p.max_pages = c.MaxPages();
  } else {
    p.page_size = c.S;
    p.num_pages = c.kv_batch;
  }
  p.kv_lengths = x.lengths_block.get();
  p.kv_lengths_batch = c.B;
  p.scale = static_cast<float>(c.scale);
  p.soft_cap = static_cast<float>(c.soft_cap);
  p.window_left = c.window_left;
  p.cache_quant = c.quant;
  p.key_scale = x.k_scale.empty() ? nullptr : x.k_scale.data();
  p.value_scale = x.v_scale.empty() ? nullptr : x.v_scale.data();
  if (!c.q_positions.empty()) {
    p.q_positions = c.q_positions.data();
    p.q_positions_batch = c.B;
  }
  if (!c.kv_positions.empty()) {
    p.kv_positions = c.kv_positions.data();
    p.kv_positions_batch = c.B;
  }
  if (!c.alibi.empty()) p.alibi_slopes = c.alibi.data();  // batch 1
  return p;
}

struct Reference {
  std::vector<double> out, lse;
  double max_logit = 0;
};

Reference ComputeReference(const Case& c, const Buffers& x) {
  const int64_t G = c.N / c.K;
  Reference r;
  r.out.assign(c.B * c.T * c.N * c.Hv, 0.0);
  r.lse.assign(c.B * c.T * c.N, -kInf);
  std::vector<double> logit;
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t len = c.Length(b);
    for (int64_t t = 0; t < c.T; ++t) {
      // Keys j < len whose position is in [qp - window_left, qp].
      const int64_t qp = c.QueryPosition(b, t);
      std::vector<int64_t> keys;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t kp = c.KeyPosition(b, j);
        if (kp <= qp && (c.window_left < 0 || kp >= qp - c.window_left)) keys.push_back(j);
      }
      if (keys.empty()) continue;
      for (int64_t n = 0; n < c.N; ++n) {
        const int64_t kh = n / G;
        const double* q = &x.q.values[(((b % c.q_batch) * c.T + t) * c.N + n) * c.H];
        logit.assign(keys.size(), 0.0);
        double mx = -kInf;
        for (size_t i = 0; i < keys.size(); ++i) {
          const int64_t j = keys[i];
          const double* k = &x.k.values[(PoolRow(c, x, b, j) * c.K + kh) * c.H];
          double dot = 0;
          for (int64_t h = 0; h < c.H; ++h) dot += q[h] * k[h];
          double l = static_cast<double>(static_cast<float>(c.scale)) * dot;
          if (!c.alibi.empty()) {
            l -= c.alibi[n] * std::fabs(static_cast<double>(qp - c.KeyPosition(b, j)));
          }
          r.max_logit = std::max(r.max_logit, std::fabs(l));
          if (c.soft_cap > 0) {
            const double cap = static_cast<float>(c.soft_cap);
            l = cap * std::tanh(l / cap);
          }
          logit[i] = l;
          mx = std::max(mx, l);
        }
        double sum = 0;
        for (double& l : logit) sum += (l = std::exp(l - mx));
        const int64_t row = (b * c.T + t) * c.N + n;
        r.lse[row] = mx + std::log(sum);
        for (size_t i = 0; i < keys.size(); ++i) {
          const double* v = &x.v.values[(PoolRow(c, x, b, keys[i]) * c.K + kh) * c.Hv];
          for (int64_t h = 0; h < c.Hv; ++h) r.out[row * c.Hv + h] += logit[i] / sum * v[h];
        }
      }
    }
  }
  return r;
}

double Tolerance(const Case& c, const Reference& r) {
  // Float64 accumulates in float64: a few ulps of the largest magnitude.
  if (c.dtype == DType::kF64) return 1e-11;
  double tol = c.dtype == DType::kF32 ? 5e-5 : c.dtype == DType::kBF16 ? 2e-2 : 4e-3;
  return tol + 4 * std::ldexp(1.0, -24) * r.max_logit * std::sqrt(double(c.H));
}

struct Outputs {
  Tensor out, lse;
};

Outputs Run(const Case& c, Buffers& x, const jaxattn::Parallel& parallel) {
  Outputs o;
  const bool f64 = c.dtype == DType::kF64;
  o.out = Tensor(c.dtype, {c.B, c.T, c.N, c.Hv});
  o.lse = Tensor(f64 ? DType::kF64 : DType::kF32, {c.B, c.T, c.N});
  o.out.Fill(0xff);  // NaN: every element must be written
  o.lse.Fill(0xff);
  if (f64) {
    jaxattn::DecodeForwardF64(
        MakeProblem(c, x), {static_cast<double*>(o.out.data()), static_cast<double*>(o.lse.data())},
        parallel);
  } else {
    jaxattn::DecodeForward(MakeProblem(c, x), {o.out.data(), static_cast<float*>(o.lse.data())},
                           parallel);
  }
  return o;
}

void RunCase(const Case& c, uint64_t seed, ThreadPool* pool, Failures* f) {
  Random rng(seed);
  Buffers x;
  MakeInputs(c, rng, &x);
  const DecodeAttentionProblem p = MakeProblem(c, x);
  if (const char* m = jaxattn::ValidateDecodeProblem(p)) {
    f->Add(std::string("ValidateDecodeProblem rejected a valid problem: ") + m);
    return;
  }
  if (const char* m = jaxattn::ValidateDecodePages(p)) {
    f->Add(std::string("ValidateDecodePages rejected valid pages: ") + m);
    return;
  }
  jaxattn::SerialParallel serial;
  PoolParallel threaded(pool);
  const Outputs a = Run(c, x, serial);
  const Outputs b = Run(c, x, threaded);
  CompareBitwise("out", a.out, b.out, f);
  CompareBitwise("lse", a.lse, b.lse, f);
  const Reference r = ComputeReference(c, x);
  const double tol = Tolerance(c, r);
  Compare("out", a.out, r.out, tol, f);
  Compare("lse", a.lse, r.lse, c.dtype == DType::kF32 || c.dtype == DType::kF64 ? tol : tol / 10,
          f);
}

std::vector<int32_t> RandomLengths(Random& rng, int64_t count, int64_t capacity, int64_t T) {
  std::vector<int32_t> out(count);
  for (int32_t& x : out) {
    switch (rng.Int(0, 6)) {
      case 0: x = static_cast<int32_t>(capacity); break;
      case 1: x = static_cast<int32_t>(rng.Int(0, T)); break;              // shorter than T
      case 2: x = static_cast<int32_t>(capacity + rng.Int(1, 50)); break;  // clamped
      case 3: x = static_cast<int32_t>(-rng.Int(1, 5)); break;             // clamped to 0
      case 4:
        x = rng.Chance(0.5) ? std::numeric_limits<int32_t>::max()
                            : std::numeric_limits<int32_t>::min();
        break;
      default: x = static_cast<int32_t>(rng.Int(1, capacity)); break;
    }
  }
  return out;
}

Case RandomCase(Random& rng) {
  Case c;
  c.dtype = rng.Pick({DType::kF32, DType::kF32, DType::kBF16, DType::kF16, DType::kF64});
  c.B = rng.Int(1, 3);
  c.T = rng.Pick<int64_t>({1, 1, 2, 3, 4, 16});
  c.K = rng.Int(1, 3);
  c.N = c.K * rng.Pick<int64_t>({1, 2, 4, 7});
  c.H = rng.Pick<int64_t>({8, 16, 24, 32, 40, 64, 80, 128});
  c.Hv = rng.Chance(0.7) ? c.H : rng.Pick<int64_t>({8, 24, 48, 96});
  c.q_batch = rng.Chance(0.8) ? c.B : 1;
  c.page_size = rng.Pick<int64_t>({0, 0, 1, 3, 7, 16, 64});
  const int64_t target = rng.Chance(0.25) ? rng.Int(300, 1500) : rng.Int(1, 120);
  if (c.page_size) {
    c.S = std::max<int64_t>(1, (target + c.page_size - 1) / c.page_size) * c.page_size;
  } else {
    c.S = target;
    c.kv_batch = rng.Chance(0.8) ? c.B : 1;
  }
  c.lengths = RandomLengths(rng, c.B, c.S, c.T);
  c.scale = rng.Pick({1.0 / std::sqrt(double(c.H)), 0.05, 0.5});
  if (rng.Chance(0.25)) c.soft_cap = rng.Pick({1.0, 5.0, 30.0});
  if (rng.Chance(0.3)) c.window_left = rng.Int(0, c.S);
  if (rng.Chance(0.4) && c.dtype != DType::kF64) {  // float64 takes no quantized cache
    c.quant = rng.Pick({CacheQuant::kInt8, CacheQuant::kF8E4M3, CacheQuant::kF8E5M2});
    if (c.quant != CacheQuant::kInt8) {
      c.key_scales = rng.Chance(0.7);
      c.value_scales = rng.Chance(0.7);
    }
  }
  if (rng.Chance(0.2)) {  // a batched cache with gaps: per-row prompt lengths, one end index
    c.kv_positions.assign(c.B * c.S, 1 << 30);
    c.q_positions.resize(c.B * c.T);
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t len = c.Length(b), prompt = rng.Int(0, std::max<int64_t>(0, len - c.T));
      for (int64_t j = 0; j < std::min(prompt, len); ++j) c.kv_positions[b * c.S + j] = j;
      for (int64_t t = 0; t < c.T; ++t) {
        const int64_t j = len - c.T + t;
        if (j >= 0) c.kv_positions[b * c.S + j] = prompt + t;
        c.q_positions[b * c.T + t] = static_cast<int32_t>(prompt + t);
      }
    }
    if (rng.Chance(0.3)) {  // any order
      for (int32_t& p : c.kv_positions) p = static_cast<int32_t>(rng.Int(-3, c.S + 3));
    }
  }
  if (rng.Chance(0.2)) {
    c.alibi.resize(c.N);
    for (float& x : c.alibi) x = static_cast<float>(rng.Pick({0.0, 0.02, 0.5}));
  }
  return c;
}

std::vector<Case> EdgeCases() {
  std::vector<Case> cases;
  auto add = [&](DType d, int64_t B, int64_t T, int64_t N, int64_t K, int64_t H, int64_t Hv,
                 int64_t S, int64_t page, std::vector<int32_t> lengths) {
    Case c;
    c.dtype = d;
    c.B = B;
    c.T = T;
    c.N = N;
    c.K = K;
    c.H = H;
    c.Hv = Hv;
    c.S = S;
    c.page_size = page;
    c.q_batch = B;
    c.kv_batch = page ? 1 : B;
    c.lengths = std::move(lengths);
    c.scale = 1.0 / std::sqrt(double(H));
    cases.push_back(c);
  };
  // A long cache split into many partitions, full and partial; every dtype.
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16, DType::kF64}) {
    add(d, 2, 1, 8, 2, 64, 64, 4096, 0, {4096, 1000});
    add(d, 2, 4, 4, 1, 40, 24, 2048, 16, {2048, 513});
  }
  // Lengths 0, 1, T - 1, page boundaries +- 1; page size 1; T = 16 with MQA.
  add(DType::kF32, 5, 3, 4, 2, 16, 16, 64, 8, {0, 1, 2, 7, 9});
  add(DType::kF32, 2, 2, 2, 1, 32, 32, 40, 1, {40, 17});
  add(DType::kBF16, 1, 16, 8, 1, 128, 128, 300, 0, {300});
  // Quantized caches with every query dtype, long (many partitions) and paged.
  const CacheQuant quants[] = {CacheQuant::kInt8, CacheQuant::kF8E4M3, CacheQuant::kF8E5M2};
  for (int i = 0; i < 3; ++i) {
    const DType d = i == 0 ? DType::kBF16 : i == 1 ? DType::kF32 : DType::kF16;
    add(d, 2, 1, 8, 2, 128, 128, 4096, 0, {4096, 1500});
    cases.back().quant = quants[i];
    add(d, 2, 3, 4, 1, 40, 24, 700, 7, {700, 99});
    cases.back().quant = quants[(i + 1) % 3];
  }
  // More than 16 tokens: the flash tiles over the cache (CacheAttentionForward), paged,
  // contiguous, quantized; lengths shorter than T and 0.
  add(DType::kF32, 3, 40, 8, 2, 32, 24, 301, 7, {301, 39, 0});
  add(DType::kBF16, 2, 33, 4, 1, 64, 64, 500, 0, {500, 100});
  add(DType::kF16, 2, 20, 4, 4, 16, 16, 90, 1, {90, 25});
  add(DType::kF32, 2, 70, 8, 2, 48, 48, 608, 16, {608, 333});  // S: whole pages (MaxPages)
  cases.back().quant = CacheQuant::kInt8;
  add(DType::kF32, 1, 17, 4, 2, 32, 32, 200, 8, {150});
  cases.back().quant = CacheQuant::kF8E4M3;
  // Float64: page size 1, lengths 0 and below T, T past 16, odd dims.
  add(DType::kF64, 3, 20, 6, 2, 17, 9, 45, 1, {45, 5, 0});
  add(DType::kF64, 2, 5, 3, 3, 33, 1, 90, 0, {90, 2});
  return cases;
}

// Problems the validators must reject (the FFI layer relies on them before calling a kernel).
void CheckValidation(Failures* f) {
  static float dummy[1];
  static int32_t lengths[2] = {4, 4};
  static int32_t tables[4] = {0, 1, 2, 3};
  auto valid = [] {
    DecodeAttentionProblem p;
    p.batch = p.q_len = p.num_heads = p.num_kv_heads = p.head_dim = p.value_dim = 1;
    p.q_batch = p.num_pages = 1;
    p.page_size = 4;
    p.query = p.key = p.value = dummy;
    p.kv_lengths = lengths;
    return p;
  };
  if (const char* m = jaxattn::ValidateDecodeProblem(valid())) {
    f->Add(std::string("ValidateDecodeProblem rejected the minimal problem: ") + m);
  }
  using P = DecodeAttentionProblem&;
  struct Bad {
    const char* name;
    std::function<void(P)> edit;
  };
  const std::vector<Bad> bad = {
      {"zero batch", [](P p) { p.batch = 0; }},
      {"query lengths batch",
       [](P p) {
         static int32_t q[1] = {1};
         p.batch = 2;
         p.q_batch = 2;
         p.num_pages = 2;
         p.kv_lengths_batch = 2;
         p.q_lengths = q;
         p.q_lengths_batch = 3;
       }},
      {"N % K",
       [](P p) {
         p.num_heads = 3;
         p.num_kv_heads = 2;
       }},
      {"q_batch not dividing",
       [](P p) {
         p.batch = 3;
         p.q_batch = 2;
       }},
      {"no lengths", [](P p) { p.kv_lengths = nullptr; }},
      {"lengths batch",
       [](P p) {
         p.batch = 2;
         p.q_batch = 2;
         p.num_pages = 2;
         p.kv_lengths_batch = 3;
       }},
      {"cache batch not dividing",
       [](P p) {
         p.batch = 3;
         p.q_batch = 3;
         p.num_pages = 2;
         p.kv_lengths_batch = 3;
       }},
      {"zero page size", [](P p) { p.page_size = 0; }},
      {"table batch",
       [](P p) {
         p.block_tables = tables;
         p.block_tables_batch = 0;
       }},
      {"NaN scale", [](P p) { p.scale = std::numeric_limits<float>::quiet_NaN(); }},
      {"negative soft cap", [](P p) { p.soft_cap = -1; }},
      {"huge head dim", [](P p) { p.value_dim = 4096; }},
      // More than 16 tokens run the flash tiles, which need a finite scale and soft cap.
      {"infinite scale, T > 16",
       [](P p) {
         p.q_len = 17;
         p.scale = std::numeric_limits<float>::infinity();
       }},
      {"infinite soft cap, T > 16",
       [](P p) {
         p.q_len = 17;
         p.soft_cap = std::numeric_limits<float>::infinity();
       }},
  };
  for (const Bad& b : bad) {
    DecodeAttentionProblem p = valid();
    b.edit(p);
    if (jaxattn::ValidateDecodeProblem(p) == nullptr) {
      f->Add(std::string("ValidateDecodeProblem accepted an invalid problem: ") + b.name);
    }
  }
  // Called anyway, the flash path reports kInvalidProblem (never a byte count) and writes
  // nothing.
  {
    DecodeAttentionProblem p = valid();
    p.q_len = 17;
    p.scale = std::numeric_limits<float>::infinity();
    std::vector<float> out(17, 7.0f), lse(17, 7.0f);
    const int64_t r = jaxattn::CacheAttentionForward(
        p, jaxattn::DecodeResult{out.data(), lse.data()}, jaxattn::SerialParallel());
    if (r != jaxattn::kInvalidProblem) {
      f->Add("CacheAttentionForward returned " + std::to_string(r) + " for an invalid problem");
    }
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i] != 7.0f || lse[i] != 7.0f) f->Add("an invalid problem wrote its outputs");
    }
  }
  // Page ids: bad ones among the pages below the length are errors; past it, ignored.
  static int32_t bad_tables[4] = {0, 1, -1, 99};
  DecodeAttentionProblem p = valid();
  p.num_pages = 2;
  p.block_tables = bad_tables;
  p.max_pages = 4;
  static int32_t short_length[1] = {8};                                   // pages 0 and 1: fine
  static int32_t long_length[1] = {9};                                    // reaches page id -1
  static int32_t huge_length[1] = {std::numeric_limits<int32_t>::max()};  // clamped: all pages
  p.kv_lengths = short_length;
  if (jaxattn::ValidateDecodePages(p) != nullptr) f->Add("rejected unused bad page ids");
  for (int32_t* l : {long_length, huge_length}) {
    p.kv_lengths = l;
    if (jaxattn::ValidateDecodePages(p) == nullptr) f->Add("accepted a bad page id in use");
  }
}

void RunDecodeSuite(SuiteContext& context) {
  {
    Failures f;
    CheckValidation(&f);
    context.Record("ValidateDecodeProblem / ValidateDecodePages", f);
  }
  std::vector<Case> cases = EdgeCases();
  Random grid(context.seed + 17);
  for (int64_t i = 0; i < context.num_cases; ++i) cases.push_back(RandomCase(grid));
  for (size_t i = 0; i < cases.size(); ++i) {
    if (context.verbose) {
      std::printf("decode case %zu: %s\n", i, cases[i].Describe().c_str());
      std::fflush(stdout);
    }
    Failures f;
    RunCase(cases[i], context.seed * 1000003 + i, context.pool, &f);
    context.Record("case " + std::to_string(i) + " (" + cases[i].Describe() + ")", f);
  }
  // Kernels called from every worker of a busy pool that they also schedule on.
  Case c;
  c.B = 1;
  c.T = 2;
  c.N = 8;
  c.K = 2;
  c.H = 32;
  c.Hv = 32;
  c.S = 3000;
  c.lengths = {2900};
  c.scale = 0.2;
  Failures f;
  CheckNestedJoin(
      "decode nested join", 4,
      [&c](ThreadPool* pool, int job, Failures* jf) { RunCase(c, 2000 + job, pool, jf); }, &f);
  context.Record("nested join", f);
}

}  // namespace

JAXATTN_HARNESS_SUITE(decode, RunDecodeSuite);

}  // namespace jaxattn_harness
