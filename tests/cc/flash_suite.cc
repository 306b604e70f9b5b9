// The flash attention kernels (FlashForward, FlashBackward) in the kernel harness: a random
// grid of problems plus hand-picked corners, each checked against a float64 reference of the
// semantics in docs/semantics.md section 1 (see kernel_harness.cc for what every suite checks).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "harness.h"

namespace jaxattn_harness {
namespace {

using jaxattn::AttentionProblem;

// ------------------------------------------------------------------------------ cases

struct Case {
  DType dtype = DType::kF32;
  int64_t B = 1, T = 1, S = 1, N = 1, K = 1, H = 1, Hv = 1;
  int64_t q_batch = 1, kv_batch = 1;
  bool has_bias = false, has_mask = false;
  DType bias_dtype = DType::kF32;  // the bias keeps its own dtype (any float type)
  int64_t bias_dims[4] = {1, 1, 1, 1}, mask_dims[4] = {1, 1, 1, 1};
  std::vector<int32_t> q_lengths, kv_lengths;  // empty: absent
  double scale = 1.0, soft_cap = 0.0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  bool backward = false, with_dlse = false, logits_grad = false;
  double mask_density = 0.7;
  // Token positions ([batch, T] / [batch, S] flattened, batch 1 or B), segment ids (both or
  // neither) and ALiBi slopes ([batch, N]); empty: absent.
  std::vector<int32_t> q_positions, kv_positions, q_segments, kv_segments;
  std::vector<float> alibi;
  // Dropout on the weights: seeds [batch, N, 2] (batch 1 or B); empty: none.
  std::vector<uint32_t> dropout_seeds;
  uint32_t dropout_threshold = 0;

  std::string Describe() const {
    char buf[512];
    std::snprintf(buf, sizeof(buf),
                  "%s B=%ld T=%ld S=%ld N=%ld K=%ld H=%ld Hv=%ld qb=%ld kvb=%ld bias=%s mask=%s "
                  "qlen=%zu kvlen=%zu scale=%g cap=%g causal=%d win=(%ld,%ld) bwd=%d dlse=%d "
                  "dlogits=%d",
                  DTypeName(dtype), long(B), long(T), long(S), long(N), long(K), long(H), long(Hv),
                  long(q_batch), long(kv_batch), has_bias ? Dims(bias_dims).c_str() : "-",
                  has_mask ? Dims(mask_dims).c_str() : "-", q_lengths.size(), kv_lengths.size(),
                  scale, soft_cap, int(causal), long(window_left), long(window_right),
                  int(backward), int(with_dlse), int(logits_grad));
    std::string s = buf;
    auto list = [&s](const char* name, const std::vector<int32_t>& v) {
      if (v.empty()) return;
      s += std::string(" ") + name + "=[";
      for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
      s += "]";
    };
    list("q_lengths", q_lengths);
    list("kv_lengths", kv_lengths);
    list("q_positions", q_positions);
    list("kv_positions", kv_positions);
    list("q_segments", q_segments);
    list("kv_segments", kv_segments);
    if (!alibi.empty()) s += " alibi=" + std::to_string(alibi.size());
    if (!dropout_seeds.empty()) {
      s += " dropout(threshold=" + std::to_string(dropout_threshold) +
           ", seeds=" + std::to_string(dropout_seeds.size()) + ")";
    }
    return s;
  }
  static std::string Dims(const int64_t* d) {
    return "[" + std::to_string(d[0]) + "," + std::to_string(d[1]) + "," + std::to_string(d[2]) +
           "," + std::to_string(d[3]) + "]";
  }
};

std::vector<int32_t> RandomLengths(Random& rng, int64_t count, int64_t len) {
  std::vector<int32_t> out(count);
  for (int32_t& x : out) {
    switch (rng.Int(0, 5)) {
      case 0: x = 0; break;
      case 1: x = static_cast<int32_t>(len); break;
      case 2: x = static_cast<int32_t>(len + rng.Int(1, 100)); break;  // past the end: clamped
      case 3: x = static_cast<int32_t>(-rng.Int(1, 5)); break;         // negative: clamped to 0
      case 4:
        x = rng.Chance(0.5) ? std::numeric_limits<int32_t>::max()
                            : std::numeric_limits<int32_t>::min();
        break;
      default: x = static_cast<int32_t>(rng.Int(0, len)); break;
    }
  }
  return out;
}

// Positions of `len` tokens for `batch` rows: increasing with gaps (padding, a prefill offset),
// shuffled, or with extremes that the kernels clamp to +-2^30.
std::vector<int32_t> RandomPositions(Random& rng, int64_t batch, int64_t len) {
  std::vector<int32_t> out(batch * len);
  const int kind = static_cast<int>(rng.Int(0, 3));
  for (int64_t b = 0; b < batch; ++b) {
    int64_t pos = rng.Int(-5, 40);
    for (int64_t i = 0; i < len; ++i) {
      int32_t& x = out[b * len + i];
      switch (kind) {
        case 0:  // ties and gaps
          pos += rng.Int(0, 2);
          x = static_cast<int32_t>(pos);
          break;
        case 1: x = static_cast<int32_t>(rng.Int(-10, len + 30)); break;  // any order
        case 2:
          x = rng.Chance(0.2) ? (rng.Chance(0.5) ? std::numeric_limits<int32_t>::max()
                                                 : std::numeric_limits<int32_t>::min())
                              : static_cast<int32_t>(i);
          break;
        default: x = static_cast<int32_t>(i + 7); break;
      }
    }
  }
  return out;
}

// Segment ids: contiguous runs (packed documents) or random small ids.
std::vector<int32_t> RandomSegments(Random& rng, int64_t batch, int64_t len, bool runs) {
  std::vector<int32_t> out(batch * len);
  for (int64_t b = 0; b < batch; ++b) {
    int32_t id = static_cast<int32_t>(rng.Int(0, 2));
    for (int64_t i = 0; i < len; ++i) {
      if (runs && rng.Chance(0.08)) ++id;
      out[b * len + i] = runs ? id : static_cast<int32_t>(rng.Int(0, 2));
    }
  }
  return out;
}

void RandomBroadcast(Random& rng, const Case& c, int64_t* dims) {
  const int64_t full[4] = {c.B, c.N, c.T, c.S};
  for (int i = 0; i < 4; ++i) dims[i] = rng.Chance(0.6) ? full[i] : 1;
}

Case RandomCase(Random& rng) {
  Case c;
  c.dtype = rng.Pick({DType::kF32, DType::kBF16, DType::kF16});
  c.B = rng.Int(1, 3);
  const bool big = rng.Chance(0.15);
  if (big) {
    c.T = rng.Pick<int64_t>({63, 64, 65, 127, 130, 200});
    c.S = rng.Pick<int64_t>({63, 64, 65, 129, 130, 200});
  } else {
    c.T = rng.Pick<int64_t>({1, 2, 3, 7, 16, 31, 33, 64, 65});
    c.S = rng.Pick<int64_t>({1, 2, 5, 7, 17, 31, 63, 64, 65, 66});
  }
  c.K = rng.Int(1, 3);
  c.N = c.K * rng.Pick<int64_t>({1, 1, 2, 3, 4, 8});
  if (rng.Chance(0.03)) {  // groups wider than a row tile
    c.K = 1;
    c.N = rng.Pick<int64_t>({65, 80});
    c.T = rng.Int(1, 3);
  }
  c.H = rng.Pick<int64_t>({1, 2, 3, 4, 8, 15, 16, 17, 24, 32, 40, 64, 80, 96, 100, 128});
  if (rng.Chance(0.07)) c.H = rng.Pick<int64_t>({192, 200, 256});
  c.Hv = rng.Chance(0.7) ? c.H : rng.Pick<int64_t>({1, 5, 16, 33, 64, 96, 256});
  if (big || c.H > 128 || c.N > 16) c.B = 1;
  c.q_batch = rng.Chance(0.2) ? 1 : c.B;
  c.kv_batch = rng.Chance(0.2) ? 1 : c.B;
  c.has_bias = rng.Chance(0.35);
  if (c.has_bias) {
    RandomBroadcast(rng, c, c.bias_dims);
    c.bias_dtype = rng.Chance(0.5) ? c.dtype : DType::kF32;
  }
  c.has_mask = rng.Chance(0.35);
  if (c.has_mask) {
    RandomBroadcast(rng, c, c.mask_dims);
    c.mask_density = rng.Pick({0.0, 0.3, 0.7, 0.95});
  }
  if (rng.Chance(0.35)) c.q_lengths = RandomLengths(rng, rng.Chance(0.8) ? c.B : 1, c.T);
  if (rng.Chance(0.45)) c.kv_lengths = RandomLengths(rng, rng.Chance(0.8) ? c.B : 1, c.S);
  c.causal = rng.Chance(0.35);
  if (rng.Chance(0.3)) {
    c.window_left = rng.Pick<int64_t>({-1, 0, 1, 3, 17, 70, int64_t(1) << 40});
    c.window_right = rng.Pick<int64_t>({-1, 0, 1, 2, 9, 70, int64_t(1) << 40});
  }
  if (rng.Chance(0.25)) c.soft_cap = rng.Pick({0.3, 2.0, 20.0});
  const double base = 1.0 / std::sqrt(static_cast<double>(c.H));
  c.scale = rng.Chance(0.8) ? base : rng.Pick({0.0, -0.5, 1e-6, 4.0, 50.0});
  c.backward = rng.Chance(0.6);
  c.with_dlse = rng.Chance(0.5);
  c.logits_grad = c.backward && rng.Chance(0.3);
  if (rng.Chance(0.2)) c.q_positions = RandomPositions(rng, rng.Chance(0.7) ? c.B : 1, c.T);
  if (rng.Chance(0.2)) c.kv_positions = RandomPositions(rng, rng.Chance(0.7) ? c.B : 1, c.S);
  if (rng.Chance(0.2)) {
    const bool runs = rng.Chance(0.7);
    const int64_t batch = rng.Chance(0.7) ? c.B : 1;
    c.q_segments = RandomSegments(rng, batch, c.T, runs);
    c.kv_segments = runs && c.T == c.S && rng.Chance(0.5) ? c.q_segments
                                                          : RandomSegments(rng, batch, c.S, runs);
  }
  if (rng.Chance(0.15)) {
    c.alibi.resize((rng.Chance(0.5) ? c.B : 1) * c.N);
    for (float& x : c.alibi) x = static_cast<float>(rng.Pick({0.0, 0.01, 0.25, 1.0, -0.1}));
  }
  if (rng.Chance(0.2)) {
    c.dropout_seeds.resize((rng.Chance(0.5) ? c.B : 1) * c.N * 2);
    for (uint32_t& x : c.dropout_seeds) x = static_cast<uint32_t>(rng.Int(0, 1 << 30)) * 7u;
    c.dropout_threshold = static_cast<uint32_t>(rng.Pick({0.0, 0.1, 0.5, 0.95}) * 4294967296.0);
  }
  return c;
}

// Hand-picked corners, run before the random grid.
std::vector<Case> EdgeCases() {
  std::vector<Case> cases;
  auto add = [&cases](Case c) {
    c.backward = true;
    cases.push_back(c);
    c.logits_grad = true;
    c.with_dlse = true;
    cases.push_back(c);
  };
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) {
    Case c;
    c.dtype = d;
    add(c);       // 1x1x1x1
    Case packed;  // packed documents over several tiles, causal, with positions and ALiBi
    packed.dtype = d;
    packed.B = 2;
    packed.T = 200;
    packed.S = 200;
    packed.N = 4;
    packed.K = 2;
    packed.H = 32;
    packed.Hv = 32;
    packed.scale = 0.2;
    packed.causal = true;
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t i = 0; i < 200; ++i) {
        packed.q_segments.push_back(static_cast<int32_t>(i / (b ? 70 : 30)));
        packed.q_positions.push_back(static_cast<int32_t>(i % (b ? 70 : 30)));
      }
    }
    packed.kv_segments = packed.q_segments;
    packed.kv_positions = packed.q_positions;
    packed.alibi = {0.5f, 0.25f, 0.125f, 0.0625f};
    add(packed);
    c.T = 130;
    c.S = 129;
    c.H = 256;
    c.Hv = 256;
    c.N = 2;
    c.K = 1;
    c.scale = 1 / 16.0;
    add(c);
    c.causal = true;
    add(c);
    Case g;  // group of 80 query heads: more rows than a tile
    g.dtype = d;
    g.N = 80;
    g.K = 1;
    g.T = 3;
    g.S = 70;
    g.H = 17;
    g.Hv = 9;
    g.scale = 0.2;
    g.causal = true;
    add(g);
    Case e;  // every length zero: every row empty
    e.dtype = d;
    e.B = 2;
    e.T = 9;
    e.S = 65;
    e.N = 2;
    e.K = 2;
    e.H = 8;
    e.Hv = 8;
    e.q_lengths = {0, 0};
    e.kv_lengths = {0, 0};
    add(e);
    e.q_lengths = {9, 20};
    e.kv_lengths = {std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()};
    add(e);
    Case big;  // large logits: no overflow to NaN
    big.dtype = d;
    big.T = 40;
    big.S = 70;
    big.N = 2;
    big.K = 1;
    big.H = 64;
    big.Hv = 64;
    big.scale = 200.0;
    big.soft_cap = 0.0;
    add(big);
    Case w;  // windows far wider than the sequence (no int64 overflow)
    w.dtype = d;
    w.T = 33;
    w.S = 65;
    w.H = 16;
    w.Hv = 16;
    w.window_left = std::numeric_limits<int64_t>::max() / 4;
    w.window_right = std::numeric_limits<int64_t>::max() / 4;
    add(w);
  }
  return cases;
}

// ------------------------------------------------------------------------------ problem

struct Buffers {
  Tensor q, k, v, bias, mask, out, lse, dout, dlse, dq, dk, dv, dlogits;
  std::vector<int32_t> q_lengths_copy, kv_lengths_copy;
  std::unique_ptr<int32_t[]> q_lengths, kv_lengths;
};

int64_t Clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

struct Semantics {
  const Case& c;
  int64_t QueryLength(int64_t b) const {
    if (c.q_lengths.empty()) return c.T;
    return Clamp(c.q_lengths[b % c.q_lengths.size()], 0, c.T);
  }
  int64_t KeyLength(int64_t b) const {
    if (c.kv_lengths.empty()) return c.S;
    return Clamp(c.kv_lengths[b % c.kv_lengths.size()], 0, c.S);
  }
  static int64_t BroadcastIndex(const int64_t* dims, int64_t b, int64_t n, int64_t t, int64_t s) {
    const int64_t i[4] = {dims[0] == 1 ? 0 : b, dims[1] == 1 ? 0 : n, dims[2] == 1 ? 0 : t,
                          dims[3] == 1 ? 0 : s};
    return ((i[0] * dims[1] + i[1]) * dims[2] + i[2]) * dims[3] + i[3];
  }
  // Every analytic mask (lengths, causal, window): the mask operand is applied separately.
  static int64_t Row(const std::vector<int32_t>& v, int64_t b, int64_t len, int64_t i) {
    return v[(b % (static_cast<int64_t>(v.size()) / len)) * len + i];
  }
  // Positions as the kernels clamp them; the index when absent.
  int64_t QueryPosition(int64_t b, int64_t t) const {
    return c.q_positions.empty() ? t : Clamp(Row(c.q_positions, b, c.T, t), -(1 << 30), 1 << 30);
  }
  int64_t KeyPosition(int64_t b, int64_t s) const {
    return c.kv_positions.empty() ? s : Clamp(Row(c.kv_positions, b, c.S, s), -(1 << 30), 1 << 30);
  }
  // Dropout: the multiplier of weight (b, n, t, s), keep / (1 - rate) or 0 (1 without).
  double Dropout(int64_t b, int64_t n, int64_t t, int64_t s) const {
    if (c.dropout_seeds.empty()) return 1.0;
    const int64_t batch = static_cast<int64_t>(c.dropout_seeds.size()) / (2 * c.N);
    const uint32_t* seed = &c.dropout_seeds[((b % batch) * c.N + n) * 2];
    if (!ReferenceDropoutKept(seed, t, s, c.dropout_threshold)) return 0.0;
    return 1.0 / (1.0 - static_cast<double>(c.dropout_threshold) * std::ldexp(1.0, -32));
  }
  // -slope * |qp - kp| (0 without ALiBi).
  double Alibi(int64_t b, int64_t n, int64_t t, int64_t s) const {
    if (c.alibi.empty()) return 0.0;
    const double slope = c.alibi[(b % (static_cast<int64_t>(c.alibi.size()) / c.N)) * c.N + n];
    return -slope * std::fabs(static_cast<double>(QueryPosition(b, t) - KeyPosition(b, s)));
  }
  bool AnalyticVisible(int64_t b, int64_t t, int64_t s) const {
    if (t >= QueryLength(b) || s >= KeyLength(b)) return false;
    const int64_t qp = QueryPosition(b, t), kp = KeyPosition(b, s);
    if (c.causal && kp > qp) return false;
    if (c.window_left >= 0 && kp < qp - c.window_left) return false;
    if (c.window_right >= 0 && kp > qp + c.window_right) return false;
    if (!c.q_segments.empty() && Row(c.q_segments, b, c.T, t) != Row(c.kv_segments, b, c.S, s)) {
      return false;
    }
    return true;
  }
};

// Fills the inputs. Entries no output may depend on are NaN: query rows that are past the
// query length for every output batch reading them, keys past the key length likewise, and
// bias entries every reader of which is masked.
void MakeInputs(const Case& c, Random& rng, Buffers* x) {
  const Semantics sem{c};
  x->q = Tensor(c.dtype, {c.q_batch, c.T, c.N, c.H});
  x->k = Tensor(c.dtype, {c.kv_batch, c.S, c.K, c.H});
  x->v = Tensor(c.dtype, {c.kv_batch, c.S, c.K, c.Hv});
  auto row_dead = [&](int64_t operand_batch, int64_t pos, bool query) {
    for (int64_t b = 0; b < c.B; ++b) {
      if (b % (query ? c.q_batch : c.kv_batch) != operand_batch) continue;
      if (pos < (query ? sem.QueryLength(b) : sem.KeyLength(b))) return false;
    }
    return true;
  };
  for (int64_t ob = 0; ob < c.q_batch; ++ob) {
    for (int64_t t = 0; t < c.T; ++t) {
      const bool dead = row_dead(ob, t, true);
      for (int64_t i = 0; i < c.N * c.H; ++i) {
        x->q.Set((ob * c.T + t) * c.N * c.H + i, dead ? kNaN : rng.Normal());
      }
    }
  }
  for (int64_t ob = 0; ob < c.kv_batch; ++ob) {
    for (int64_t s = 0; s < c.S; ++s) {
      const bool dead = row_dead(ob, s, false);
      for (int64_t i = 0; i < c.K * c.H; ++i) {
        x->k.Set((ob * c.S + s) * c.K * c.H + i, dead ? kNaN : rng.Normal());
      }
      for (int64_t i = 0; i < c.K * c.Hv; ++i) {
        x->v.Set((ob * c.S + s) * c.K * c.Hv + i, dead ? kNaN : rng.Normal());
      }
    }
  }
  if (c.has_mask) {
    const int64_t* d = c.mask_dims;
    x->mask = Tensor::Bytes({d[0], d[1], d[2], d[3]});
    for (int64_t i = 0; i < x->mask.count(); ++i) {
      const bool on = rng.Chance(c.mask_density);
      x->mask.SetByte(i, on ? static_cast<uint8_t>(rng.Int(1, 255)) : 0);  // nonzero: attend
    }
  }
  if (c.has_bias) {
    const int64_t* d = c.bias_dims;
    x->bias = Tensor(c.bias_dtype, {d[0], d[1], d[2], d[3]});
    std::vector<bool> read(x->bias.count(), false);
    for (int64_t b = 0; b < c.B; ++b) {
      for (int64_t n = 0; n < c.N; ++n) {
        for (int64_t t = 0; t < c.T; ++t) {
          for (int64_t s = 0; s < c.S; ++s) {
            bool visible = sem.AnalyticVisible(b, t, s);
            if (c.has_mask) {
              visible = visible &&
                        x->mask.values[Semantics::BroadcastIndex(c.mask_dims, b, n, t, s)] != 0;
            }
            if (visible) read[Semantics::BroadcastIndex(d, b, n, t, s)] = true;
          }
        }
      }
    }
    for (int64_t i = 0; i < x->bias.count(); ++i) {
      x->bias.Set(i, read[i] ? rng.Normal() : kNaN);
    }
  }
  if (!c.q_lengths.empty()) {
    x->q_lengths.reset(new int32_t[c.q_lengths.size()]);
    std::memcpy(x->q_lengths.get(), c.q_lengths.data(), c.q_lengths.size() * 4);
  }
  if (!c.kv_lengths.empty()) {
    x->kv_lengths.reset(new int32_t[c.kv_lengths.size()]);
    std::memcpy(x->kv_lengths.get(), c.kv_lengths.data(), c.kv_lengths.size() * 4);
  }
}

AttentionProblem MakeProblem(const Case& c, Buffers& x) {
  AttentionProblem p;
  p.dtype = c.dtype;
  p.batch = c.B;
  p.q_len = c.T;
  p.kv_len = c.S;
  p.num_heads = c.N;
  p.num_kv_heads = c.K;
  p.head_dim = c.H;
  p.value_dim = c.Hv;
  p.q_batch = c.q_batch;
  p.kv_batch = c.kv_batch;
  p.value_batch = c.kv_batch;
  p.query = x.q.data();
  p.key = x.k.data();
  p.value = x.v.data();
  if (c.has_bias) {
    p.bias.data = x.bias.data();
    p.bias.dtype = x.bias.dtype;
    for (int i = 0; i < 4; ++i) p.bias.dims[i] = c.bias_dims[i];
  }
  if (c.has_mask) {
    p.mask.data = x.mask.data();
    for (int i = 0; i < 4; ++i) p.mask.dims[i] = c.mask_dims[i];
  }
  if (!c.q_lengths.empty()) {
    p.q_lengths = x.q_lengths.get();
    p.q_lengths_batch = static_cast<int64_t>(c.q_lengths.size());
  }
  if (!c.kv_lengths.empty()) {
    p.kv_lengths = x.kv_lengths.get();
    p.kv_lengths_batch = static_cast<int64_t>(c.kv_lengths.size());
  }
  p.scale = static_cast<float>(c.scale);
  p.soft_cap = static_cast<float>(c.soft_cap);
  p.causal = c.causal;
  p.window_left = c.window_left;
  p.window_right = c.window_right;
  const auto rows = [](const std::vector<int32_t>& v, int64_t len, const int32_t** data,
                       int64_t* batch) {
    if (v.empty()) return;
    *data = v.data();
    *batch = static_cast<int64_t>(v.size()) / len;
  };
  rows(c.q_positions, c.T, &p.q_positions, &p.q_positions_batch);
  rows(c.kv_positions, c.S, &p.kv_positions, &p.kv_positions_batch);
  rows(c.q_segments, c.T, &p.q_segments, &p.q_segments_batch);
  rows(c.kv_segments, c.S, &p.kv_segments, &p.kv_segments_batch);
  if (!c.alibi.empty()) {
    p.alibi_slopes = c.alibi.data();
    p.alibi_batch = static_cast<int64_t>(c.alibi.size()) / c.N;
  }
  if (!c.dropout_seeds.empty()) {
    p.dropout_seeds = c.dropout_seeds.data();
    p.dropout_batch = static_cast<int64_t>(c.dropout_seeds.size()) / (2 * c.N);
    p.dropout_threshold = c.dropout_threshold;
  }
  return p;
}

// ------------------------------------------------------------------------------ reference

struct Reference {
  std::vector<double> out, lse, dq, dk, dv, dlogits;
  double max_logit = 0;  // largest |logit| seen: float32 logits carry an error relative to it
};

// Float64 attention of the (dtype-rounded) inputs, and its gradients for the cotangents dout
// (and dlse), per docs/semantics.md section 1. With `rounded_out`, D = rowsum(dout * out) uses
// that (the kernels' output in its dtype), as autodiff of a forward in that dtype would: in
// bfloat16 a near-one-hot row otherwise differs by cancellation in dP - D, not by a bug.
Reference ComputeReference(const Case& c, const Buffers& x, const Tensor* rounded_out) {
  const bool grads = rounded_out != nullptr;
  const Semantics sem{c};
  const int64_t G = c.N / c.K;
  Reference r;
  r.out.assign(c.B * c.T * c.N * c.Hv, 0.0);
  r.lse.assign(c.B * c.T * c.N, -kInf);
  if (grads) {
    r.dq.assign(c.B * c.T * c.N * c.H, 0.0);
    r.dk.assign(c.B * c.S * c.K * c.H, 0.0);
    r.dv.assign(c.B * c.S * c.K * c.Hv, 0.0);
    r.dlogits.assign(c.B * c.N * c.T * c.S, 0.0);
  }
  std::vector<double> logit(c.S), th(c.S), prob(c.S), dp(c.S);
  std::vector<char> vis(c.S);
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t qb = b % c.q_batch, kb = b % c.kv_batch;
    for (int64_t n = 0; n < c.N; ++n) {
      const int64_t kh = n / G;
      for (int64_t t = 0; t < c.T; ++t) {
        const double* q = &x.q.values[((qb * c.T + t) * c.N + n) * c.H];
        double mx = -kInf;
        for (int64_t s = 0; s < c.S; ++s) {
          vis[s] = sem.AnalyticVisible(b, t, s);
          if (c.has_mask) {
            vis[s] =
                vis[s] && x.mask.values[Semantics::BroadcastIndex(c.mask_dims, b, n, t, s)] != 0;
          }
          if (!vis[s]) continue;
          const double* k = &x.k.values[((kb * c.S + s) * c.K + kh) * c.H];
          double dot = 0;
          for (int64_t h = 0; h < c.H; ++h) dot += q[h] * k[h];
          double l = static_cast<double>(static_cast<float>(c.scale)) * dot;
          if (c.has_bias) l += x.bias.values[Semantics::BroadcastIndex(c.bias_dims, b, n, t, s)];
          l += sem.Alibi(b, n, t, s);
          r.max_logit = std::max(r.max_logit, std::fabs(l));
          if (c.soft_cap > 0) {
            const double cap = static_cast<float>(c.soft_cap);
            th[s] = std::tanh(l / cap);
            l = cap * th[s];
          }
          logit[s] = l;
          mx = std::max(mx, l);
        }
        if (mx == -kInf) continue;  // sees nothing: 0, lse -inf, zero gradients
        double sum = 0;
        for (int64_t s = 0; s < c.S; ++s) {
          prob[s] = vis[s] ? std::exp(logit[s] - mx) : 0.0;
          sum += prob[s];
        }
        const int64_t row = (b * c.T + t) * c.N + n;
        r.lse[row] = mx + std::log(sum);
        double* o = &r.out[row * c.Hv];
        for (int64_t s = 0; s < c.S; ++s) {
          prob[s] /= sum;
          if (prob[s] == 0) continue;
          const double* v = &x.v.values[((kb * c.S + s) * c.K + kh) * c.Hv];
          const double kept = prob[s] * sem.Dropout(b, n, t, s);
          for (int64_t h = 0; h < c.Hv; ++h) o[h] += kept * v[h];
        }
        if (!grads) continue;
        const double* dout = &x.dout.values[row * c.Hv];
        const double dlse = c.with_dlse ? x.dlse.values[row] : 0.0;
        double delta = 0;
        for (int64_t h = 0; h < c.Hv; ++h) delta += dout[h] * rounded_out->Get(row * c.Hv + h);
        for (int64_t s = 0; s < c.S; ++s) {
          if (!vis[s]) continue;
          const double* v = &x.v.values[((kb * c.S + s) * c.K + kh) * c.Hv];
          double d = 0;
          for (int64_t h = 0; h < c.Hv; ++h) d += dout[h] * v[h];
          const double z = sem.Dropout(b, n, t, s);  // out = (P o Z) V
          d *= z;
          double ds = prob[s] * (d - delta + dlse);
          if (c.soft_cap > 0) ds *= 1 - th[s] * th[s];
          r.dlogits[((b * c.N + n) * c.T + t) * c.S + s] = ds;
          const double* k = &x.k.values[((kb * c.S + s) * c.K + kh) * c.H];
          const double sc = static_cast<float>(c.scale);
          double* dq = &r.dq[row * c.H];
          double* dk = &r.dk[((b * c.S + s) * c.K + kh) * c.H];
          double* dv = &r.dv[((b * c.S + s) * c.K + kh) * c.Hv];
          for (int64_t h = 0; h < c.H; ++h) {
            dq[h] += sc * ds * k[h];
            dk[h] += sc * ds * q[h];
          }
          for (int64_t h = 0; h < c.Hv; ++h) dv[h] += prob[s] * z * dout[h];
        }
      }
    }
  }
  return r;
}

// ------------------------------------------------------------------------------ checks

// Relative to 1 + max|reference|. The kernels compute logits in float32, whose rounding error
// grows with the logits' size (scale * |q||k|), and a softmax amplifies a logit error into a
// relative error of the probabilities: hence the term in max|logit|.
double Tolerance(const Case& c, const Reference& r, bool grad) {
  double tol = 0;
  switch (c.dtype) {
    case DType::kF32: tol = grad ? 2e-4 : 5e-5; break;
    case DType::kBF16: tol = grad ? 6e-2 : 2e-2; break;
    case DType::kF16: tol = grad ? 1e-2 : 4e-3; break;
    case DType::kF64: break;  // float64 has its own suite (f64_suite.cc)
  }
  return tol + 4 * std::ldexp(1.0, -24) * r.max_logit * std::sqrt(double(c.H));
}

struct Outputs {
  Tensor out, lse, dq, dk, dv, dlogits;
};

Outputs Run(const Case& c, Buffers& x, const jaxattn::Parallel& parallel) {
  Outputs o;
  AttentionProblem p = MakeProblem(c, x);
  o.out = Tensor(c.dtype, {c.B, c.T, c.N, c.Hv});
  o.lse = Tensor(DType::kF32, {c.B, c.T, c.N});
  o.out.Fill(0xff);  // NaN: every element must be written
  o.lse.Fill(0xff);
  jaxattn::FlashForward(p, {o.out.data(), static_cast<float*>(o.lse.data())}, parallel);
  if (!c.backward) return o;
  jaxattn::FlashBackwardArgs a;
  a.out = o.out.data();
  a.lse = static_cast<const float*>(o.lse.data());
  a.dout = x.dout.data();
  a.dlse = c.with_dlse ? static_cast<const float*>(x.dlse.data()) : nullptr;
  if (c.logits_grad) {
    o.dlogits = Tensor(DType::kF32, {c.B, c.N, c.T, c.S});
    o.dlogits.Fill(0xff);
    a.dlogits = static_cast<float*>(o.dlogits.data());
  } else {
    o.dq = Tensor(c.dtype, {c.B, c.T, c.N, c.H});
    o.dk = Tensor(c.dtype, {c.B, c.S, c.K, c.H});
    o.dv = Tensor(c.dtype, {c.B, c.S, c.K, c.Hv});
    o.dq.Fill(0xff);
    o.dk.Fill(0xff);
    o.dv.Fill(0xff);
    a.dq = o.dq.data();
    a.dk = o.dk.data();
    a.dv = o.dv.data();
  }
  jaxattn::FlashBackward(p, a, parallel);
  return o;
}

// The forward-mode kernel, by duality with the reference gradients: for tangents t of
// (q, k, v) and the cotangents (dout, dlse), <jvp(t), (dout, dlse)> = <t, vjp(dout, dlse)>.
// Tangent entries no output may depend on are NaN (dead rows, as the inputs'); serial and
// threaded runs must agree bitwise.
void CheckJvp(const Case& c, Buffers& x, const Outputs& primal, const Reference& r, Random& rng,
              const jaxattn::Parallel& serial, const jaxattn::Parallel& threaded, Failures* f) {
  const Tensor* like[3] = {&x.q, &x.k, &x.v};
  Tensor tangent[3];
  for (int i = 0; i < 3; ++i) {
    tangent[i] = Tensor(c.dtype, like[i]->dims);
    for (int64_t e = 0; e < like[i]->count(); ++e) {
      tangent[i].Set(e, std::isnan(like[i]->Get(e)) ? kNaN : rng.Normal());
    }
  }
  jaxattn::FlashTangents t;
  t.dq = tangent[0].data();
  t.dk = tangent[1].data();
  t.dv = tangent[2].data();
  t.dq_batch = c.q_batch;
  t.dk_batch = t.dv_batch = c.kv_batch;
  const AttentionProblem p = MakeProblem(c, x);
  Tensor dout[2], dlse[2];
  for (int run = 0; run < 2; ++run) {
    dout[run] = Tensor(c.dtype, {c.B, c.T, c.N, c.Hv});
    dlse[run] = Tensor(DType::kF32, {c.B, c.T, c.N});
    dout[run].Fill(0xff);  // NaN: every element must be written
    dlse[run].Fill(0xff);
    jaxattn::FlashJvp(p, t, primal.out.data(), static_cast<const float*>(primal.lse.data()),
                      {dout[run].data(), static_cast<float*>(dlse[run].data())},
                      run == 0 ? serial : threaded);
  }
  CompareBitwise("jvp dout", dout[0], dout[1], f);
  CompareBitwise("jvp dlse", dlse[0], dlse[1], f);
  // Both sides of the duality, skipping dead rows (NaN cotangents or tangents; their
  // gradients and tangents are 0).
  double lhs = 0, rhs = 0, magnitude = 0;
  const auto accumulate = [&](double a, double b, double* sum) {
    if (std::isnan(a) || std::isnan(b)) return;
    *sum += a * b;
    magnitude += std::fabs(a * b);
  };
  for (int64_t e = 0; e < dout[0].count(); ++e) {
    accumulate(dout[0].Get(e), x.dout.Get(e), &lhs);
  }
  if (c.with_dlse) {
    for (int64_t e = 0; e < dlse[0].count(); ++e) {
      accumulate(dlse[0].Get(e), x.dlse.Get(e), &lhs);
    }
  }
  const std::vector<double>* grads[3] = {&r.dq, &r.dk, &r.dv};
  for (int i = 0; i < 3; ++i) {
    // Gradients are per output batch; tangents per operand batch (read at b % batch).
    const int64_t per_batch = tangent[i].count() / tangent[i].dims[0];
    for (int64_t e = 0; e < static_cast<int64_t>(grads[i]->size()); ++e) {
      const int64_t b = e / per_batch;
      accumulate(tangent[i].Get((b % tangent[i].dims[0]) * per_batch + e % per_batch),
                 (*grads[i])[e], &rhs);
    }
  }
  for (int64_t e = 0; e < dout[0].count(); ++e) {
    if (std::isnan(dout[0].Get(e)) && !std::isnan(x.dout.Get(e))) {
      f->Add("jvp dout: NaN at a live row");
      break;
    }
  }
  const double tol = Tolerance(c, r, true) * (1 + magnitude);
  if (!(std::fabs(lhs - rhs) <= tol)) {
    f->Add("jvp duality: <jvp(t), ct> = " + std::to_string(lhs) + " but <t, vjp(ct)> = " +
           std::to_string(rhs) + " (tolerance " + std::to_string(tol) + ")");
  }
}

void RunCase(const Case& c, uint64_t seed, ThreadPool* pool, Failures* f) {
  Random rng(seed);
  Buffers x;
  MakeInputs(c, rng, &x);
  const Semantics sem{c};
  if (c.backward) {
    // Cotangents; rows that are past the query length are NaN (they must not be read).
    x.dout = Tensor(c.dtype, {c.B, c.T, c.N, c.Hv});
    x.dlse = Tensor(DType::kF32, {c.B, c.T, c.N});
    for (int64_t b = 0; b < c.B; ++b) {
      for (int64_t t = 0; t < c.T; ++t) {
        const bool dead = t >= sem.QueryLength(b);
        for (int64_t i = 0; i < c.N * c.Hv; ++i) {
          x.dout.Set((b * c.T + t) * c.N * c.Hv + i, dead ? kNaN : rng.Normal());
        }
        for (int64_t n = 0; n < c.N; ++n) {
          x.dlse.Set((b * c.T + t) * c.N + n, dead ? kNaN : rng.Normal());
        }
      }
    }
  }
  AttentionProblem p = MakeProblem(c, x);
  if (const char* message = jaxattn::ValidateProblem(p)) {
    f->Add(std::string("ValidateProblem rejected a valid problem: ") + message);
    return;
  }
  jaxattn::SerialParallel serial;
  PoolParallel threaded(pool);
  const Outputs a = Run(c, x, serial);
  const Outputs b = Run(c, x, threaded);
  CompareBitwise("out", a.out, b.out, f);
  CompareBitwise("lse", a.lse, b.lse, f);
  const Reference r = ComputeReference(c, x, c.backward ? &a.out : nullptr);
  Compare("out", a.out, r.out, Tolerance(c, r, false), f);
  Compare("lse", a.lse, r.lse, Tolerance(c, r, false) / (c.dtype == DType::kF32 ? 1 : 10), f);
  if (!c.backward) return;
  if (c.logits_grad) {
    CompareBitwise("dlogits", a.dlogits, b.dlogits, f);
    Compare("dlogits", a.dlogits, r.dlogits, Tolerance(c, r, true), f);
  } else {
    CompareBitwise("dq", a.dq, b.dq, f);
    CompareBitwise("dk", a.dk, b.dk, f);
    CompareBitwise("dv", a.dv, b.dv, f);
    Compare("dq", a.dq, r.dq, Tolerance(c, r, true), f);
    Compare("dk", a.dk, r.dk, Tolerance(c, r, true), f);
    Compare("dv", a.dv, r.dv, Tolerance(c, r, true), f);
    if (c.dropout_seeds.empty()) CheckJvp(c, x, a, r, rng, serial, threaded, f);  // no dropout
  }
}

// Problems ValidateProblem must reject (the FFI layer relies on it before calling a kernel).
void CheckValidation(Failures* f) {
  auto valid = [] {
    AttentionProblem p;
    static float dummy[1];
    p.batch = p.q_len = p.kv_len = p.num_heads = p.num_kv_heads = p.head_dim = p.value_dim = 1;
    p.q_batch = p.kv_batch = p.value_batch = 1;
    p.query = p.key = p.value = dummy;
    return p;
  };
  if (const char* m = jaxattn::ValidateProblem(valid())) {
    f->Add(std::string("ValidateProblem rejected the minimal problem: ") + m);
  }
  struct Bad {
    const char* name;
    std::function<void(AttentionProblem&)> edit;
  };
  static int32_t lengths[3] = {1, 1, 1};
  static uint8_t mask[1];
  using P = AttentionProblem&;
  constexpr float kFloatInf = std::numeric_limits<float>::infinity();
  const std::vector<Bad> bad = {
      {"zero batch", [](P p) { p.batch = 0; }},
      {"negative q_len", [](P p) { p.q_len = -1; }},
      {"zero kv_len", [](P p) { p.kv_len = 0; }},
      {"zero head_dim", [](P p) { p.head_dim = 0; }},
      {"N % K",
       [](P p) {
         p.num_heads = 3;
         p.num_kv_heads = 2;
       }},
      {"q_batch 0", [](P p) { p.q_batch = 0; }},
      {"q_batch not dividing",
       [](P p) {
         p.batch = 3;
         p.q_batch = 2;
         p.kv_batch = 3;
       }},
      {"kv_lengths batch",
       [](P p) {
         p.batch = 2;
         p.q_batch = p.kv_batch = 2;
         p.kv_lengths = lengths;
         p.kv_lengths_batch = 3;
       }},
      {"q_lengths batch 0",
       [](P p) {
         p.q_lengths = lengths;
         p.q_lengths_batch = 0;
       }},
      {"mask dims",
       [](P p) {
         p.mask.data = mask;
         p.mask.dims[3] = 2;
       }},
      {"bias batch 0",
       [](P p) {
         p.bias.data = mask;
         p.bias.dims[0] = 0;
       }},
      {"NaN scale", [](P p) { p.scale = std::numeric_limits<float>::quiet_NaN(); }},
      {"inf scale", [=](P p) { p.scale = kFloatInf; }},
      {"negative soft cap", [](P p) { p.soft_cap = -1; }},
      {"inf soft cap", [=](P p) { p.soft_cap = kFloatInf; }},
      {"huge head dim", [](P p) { p.head_dim = 4096; }},
      {"huge window", [](P p) { p.window_right = std::numeric_limits<int64_t>::max(); }},
  };
  for (const Bad& b : bad) {
    AttentionProblem p = valid();
    b.edit(p);
    if (jaxattn::ValidateProblem(p) == nullptr) {
      f->Add(std::string("ValidateProblem accepted an invalid problem: ") + b.name);
    }
  }
}

// An allocation the backward cannot make is reported, not a crash: a (valid) problem whose
// [B, T, N] float32 rows of delta and norm (the backward's per-row buffers) take 2^48 bytes,
// more than any x86-64 address space. The operands are one element each: every operand is
// read at b % its batch, and nothing is read or written once the allocation has failed.
void CheckAllocationFailure(Failures* f) {
  static float one[8] = {};
  AttentionProblem p;
  p.batch = int64_t{1} << 46;
  p.q_len = p.kv_len = p.num_heads = p.num_kv_heads = 1;
  p.head_dim = p.value_dim = 8;
  p.q_batch = p.kv_batch = p.value_batch = 1;
  p.query = p.key = p.value = one;
  if (const char* m = jaxattn::ValidateProblem(p)) {
    f->Add(std::string("allocation failure: ValidateProblem rejected the problem: ") + m);
    return;
  }
  jaxattn::FlashBackwardArgs a;
  a.out = a.dout = one;
  a.lse = one;
  a.dq = a.dk = a.dv = one;
  jaxattn::SerialParallel serial;
  const int64_t failed = jaxattn::FlashBackward(p, a, serial);
  const int64_t expected = (int64_t{1} << 46) * static_cast<int64_t>(sizeof(float));
  if (failed != expected) {
    f->Add("allocation failure: FlashBackward returned " + std::to_string(failed) +
           " failed bytes, expected " + std::to_string(expected));
  }
}

void RunFlashSuite(SuiteContext& context) {
  {
    Failures f;
    CheckValidation(&f);
    context.Record("ValidateProblem", f);
  }
  {
    Failures f;
    CheckAllocationFailure(&f);
    context.Record("allocation failure", f);
  }
  std::vector<Case> cases = EdgeCases();
  Random grid(context.seed);
  for (int64_t i = 0; i < context.num_cases; ++i) cases.push_back(RandomCase(grid));
  for (size_t i = 0; i < cases.size(); ++i) {
    if (context.verbose) {
      std::printf("flash case %zu: %s\n", i, cases[i].Describe().c_str());
      std::fflush(stdout);
    }
    Failures f;
    RunCase(cases[i], context.seed * 1000003 + i, context.pool, &f);
    context.Record("case " + std::to_string(i) + " (" + cases[i].Describe() + ")", f);
  }
  // Kernels called from every worker of a busy pool that they also schedule on.
  Case c;
  c.B = 2;
  c.T = 130;
  c.S = 130;
  c.N = 4;
  c.K = 2;
  c.H = 32;
  c.Hv = 32;
  c.causal = true;
  c.scale = 0.2;
  c.backward = true;
  Failures f;
  CheckNestedJoin(
      "flash nested join", 4,
      [&c](ThreadPool* pool, int job, Failures* jf) { RunCase(c, 1000 + job, pool, jf); }, &f);
  context.Record("nested join", f);
}

}  // namespace

JAXATTN_HARNESS_SUITE(flash, RunFlashSuite);

}  // namespace jaxattn_harness
