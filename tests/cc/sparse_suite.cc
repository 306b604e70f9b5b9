// The block-sparse kernels (BlockSparseForward / BlockSparseBackward walking the tables of
// BlockSparseTables) in the kernel harness. Random element masks, shared by all heads or one
// per query head (tables per kv head group), are compiled here into tables for the kernels'
// tiling (BlockSparseTilingFor), each table block in its own exactly sized heap block, so that
// AddressSanitizer sees any read past a table, a mask or the operands. The results must equal
// bitwise those of the dense flash kernels given the same mask as an element mask (the same
// tile routine on the same tile grid; flash_suite.cc checks those against a float64
// reference), serial and threaded runs must agree bitwise, every output element must be
// written, and ValidateBlockSparse must accept the tables and reject corrupted ones. With
// dropout on the weights both run the same keep mask (a hash of the batch, head, query and
// key), so the bitwise comparison covers the sparse tasks' dropout too.
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "harness.h"

namespace jaxattn_harness {
namespace {

using jaxattn::AttentionProblem;
using jaxattn::BlockSparseTables;

struct Case {
  DType dtype = DType::kF32;
  int64_t B = 1, T = 1, S = 1, N = 1, K = 1, H = 8, Hv = 8;
  bool per_head = false;  // one mask per query head, tables per kv head group
  double density = 0.5;   // of the random part of the mask
  int64_t band = -1;      // >= 0: plus a causal band of this width (full tiles appear)
  double scale = 0.25, soft_cap = 0.0;
  bool backward = true;
  // Dropout on the weights: seeds [batch, N, 2] (batch 1 or B); empty: none.
  std::vector<uint32_t> dropout_seeds;
  uint32_t dropout_threshold = 0;

  std::string Describe() const {
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "%s B=%ld T=%ld S=%ld N=%ld K=%ld H=%ld Hv=%ld per_head=%d density=%g "
                  "band=%ld cap=%g bwd=%d",
                  DTypeName(dtype), long(B), long(T), long(S), long(N), long(K), long(H), long(Hv),
                  int(per_head), density, long(band), soft_cap, int(backward));
    std::string s = buf;
    if (!dropout_seeds.empty()) {
      s += " dropout(threshold=" + std::to_string(dropout_threshold) +
           ", seeds=" + std::to_string(dropout_seeds.size()) + ")";
    }
    return s;
  }
};

// Dropout with random seeds for batch 1 or B and a threshold of rate `rate`.
void SetDropout(Case* c, Random& rng, double rate) {
  c->dropout_seeds.resize((rng.Chance(0.5) ? c->B : 1) * c->N * 2);
  for (uint32_t& x : c->dropout_seeds) x = static_cast<uint32_t>(rng.Int(0, 1 << 30)) * 7u;
  c->dropout_threshold = static_cast<uint32_t>(rate * 4294967296.0);
}

struct Buffers {
  Tensor q, k, v, dout, mask;
  std::vector<uint8_t> mask_bytes;
};

void MakeInputs(const Case& c, Random& rng, Buffers* x) {
  x->q = Tensor(c.dtype, {c.B, c.T, c.N, c.H});
  x->k = Tensor(c.dtype, {c.B, c.S, c.K, c.H});
  x->v = Tensor(c.dtype, {c.B, c.S, c.K, c.Hv});
  x->dout = Tensor(c.dtype, {c.B, c.T, c.N, c.Hv});
  for (Tensor* t : {&x->q, &x->k, &x->v, &x->dout}) {
    for (int64_t i = 0; i < t->count(); ++i) t->Set(i, rng.Normal());
  }
  const int64_t heads = c.per_head ? c.N : 1;
  x->mask = Tensor::Bytes({heads, c.T, c.S});
  x->mask_bytes.assign(heads * c.T * c.S, 0);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t t = 0; t < c.T; ++t) {
      for (int64_t s = 0; s < c.S; ++s) {
        const bool in_band = c.band >= 0 && s <= t && s >= t - c.band;
        const uint8_t v = in_band || rng.Chance(c.density);
        x->mask_bytes[(h * c.T + t) * c.S + s] = v;
        x->mask.SetByte((h * c.T + t) * c.S + s, v);
      }
    }
  }
}

AttentionProblem MakeProblem(const Case& c, Buffers& x, bool with_mask) {
  AttentionProblem p;
  p.dtype = c.dtype;
  p.batch = c.B;
  p.q_len = c.T;
  p.kv_len = c.S;
  p.num_heads = c.N;
  p.num_kv_heads = c.K;
  p.head_dim = c.H;
  p.value_dim = c.Hv;
  p.q_batch = p.kv_batch = p.value_batch = c.B;
  p.query = x.q.data();
  p.key = x.k.data();
  p.value = x.v.data();
  p.scale = static_cast<float>(c.scale);
  p.soft_cap = static_cast<float>(c.soft_cap);
  if (!c.dropout_seeds.empty()) {
    p.dropout_seeds = c.dropout_seeds.data();
    p.dropout_batch = static_cast<int64_t>(c.dropout_seeds.size()) / (2 * c.N);
    p.dropout_threshold = c.dropout_threshold;
  }
  if (with_mask) {
    p.mask.data = x.mask.data();
    p.mask.dims[0] = 1;
    p.mask.dims[1] = c.per_head ? c.N : 1;
    p.mask.dims[2] = c.T;
    p.mask.dims[3] = c.S;
  }
  return p;
}

struct Outputs {
  Tensor out, lse, dq, dk, dv;
};

// Flash with the dense mask (tables == nullptr) or block-sparse with the tables.
Outputs Run(const Case& c, Buffers& x, const BlockSparseTables* tables,
            const jaxattn::Parallel& parallel) {
  Outputs o;
  const AttentionProblem p = MakeProblem(c, x, tables == nullptr);
  o.out = Tensor(c.dtype, {c.B, c.T, c.N, c.Hv});
  o.lse = Tensor(DType::kF32, {c.B, c.T, c.N});
  o.out.Fill(0xff);  // NaN: every element must be written
  o.lse.Fill(0xff);
  const jaxattn::FlashForwardResult res{o.out.data(), static_cast<float*>(o.lse.data())};
  if (tables == nullptr) {
    jaxattn::FlashForward(p, res, parallel);
  } else {
    BlockSparseTables forward = *tables;  // the forward needs no transposed tables
    forward.k_indptr = forward.k_entries = nullptr;
    forward.masks_t = nullptr;
    jaxattn::BlockSparseForward(p, forward, res, parallel);
  }
  if (!c.backward) return o;
  o.dq = Tensor(c.dtype, {c.B, c.T, c.N, c.H});
  o.dk = Tensor(c.dtype, {c.B, c.S, c.K, c.H});
  o.dv = Tensor(c.dtype, {c.B, c.S, c.K, c.Hv});
  o.dq.Fill(0xff);
  o.dk.Fill(0xff);
  o.dv.Fill(0xff);
  jaxattn::FlashBackwardArgs a;
  a.out = o.out.data();
  a.lse = static_cast<const float*>(o.lse.data());
  a.dout = x.dout.data();
  a.dq = o.dq.data();
  a.dk = o.dk.data();
  a.dv = o.dv.data();
  if (tables == nullptr) {
    jaxattn::FlashBackward(p, a, parallel);
  } else {
    jaxattn::BlockSparseBackward(p, *tables, a, parallel);
  }
  return o;
}

void RunCase(const Case& c, uint64_t seed, ThreadPool* pool, Failures* f) {
  Random rng(seed);
  Buffers x;
  MakeInputs(c, rng, &x);
  const CompiledTables compiled =
      CompileBlockSparseTables(c.T, c.S, c.N, c.K, c.per_head, x.mask_bytes);
  const AttentionProblem p = MakeProblem(c, x, false);
  if (const char* m = jaxattn::ValidateBlockSparse(p, compiled.tables)) {
    f->Add(std::string("ValidateBlockSparse rejected valid tables: ") + m);
    return;
  }
  jaxattn::SerialParallel serial;
  PoolParallel threaded(pool);
  const Outputs dense = Run(c, x, nullptr, serial);
  const Outputs sparse = Run(c, x, &compiled.tables, serial);
  const Outputs sparse_threaded = Run(c, x, &compiled.tables, threaded);
  CompareBitwise("out vs flash", sparse.out, dense.out, f);
  CompareBitwise("lse vs flash", sparse.lse, dense.lse, f);
  CompareBitwise("out threaded", sparse_threaded.out, sparse.out, f);
  CompareBitwise("lse threaded", sparse_threaded.lse, sparse.lse, f);
  if (!c.backward) return;
  CompareBitwise("dq vs flash", sparse.dq, dense.dq, f);
  CompareBitwise("dk vs flash", sparse.dk, dense.dk, f);
  CompareBitwise("dv vs flash", sparse.dv, dense.dv, f);
  CompareBitwise("dq threaded", sparse_threaded.dq, sparse.dq, f);
  CompareBitwise("dk threaded", sparse_threaded.dk, sparse.dk, f);
  CompareBitwise("dv threaded", sparse_threaded.dv, sparse.dv, f);
}

Case RandomCase(Random& rng) {
  Case c;
  c.dtype = rng.Pick({DType::kF32, DType::kF32, DType::kBF16, DType::kF16});
  c.B = rng.Int(1, 2);
  c.T = rng.Pick<int64_t>({1, 7, 33, 64, 65, 130, 200});
  c.S = rng.Pick<int64_t>({1, 5, 63, 64, 100, 129, 257});
  c.K = rng.Int(1, 2);
  c.N = c.K * rng.Pick<int64_t>({1, 2, 3, 4});
  c.H = rng.Pick<int64_t>({8, 16, 40, 64});
  c.Hv = rng.Chance(0.7) ? c.H : rng.Pick<int64_t>({8, 24, 48});
  c.per_head = rng.Chance(0.4);
  c.density = rng.Pick<double>({0.0, 0.02, 0.3, 0.9, 1.0});
  c.band = rng.Chance(0.5) ? rng.Pick<int64_t>({0, 5, 70, 1000}) : -1;
  c.scale = rng.Pick<double>({0.125, 0.5, 1.0});
  c.soft_cap = rng.Chance(0.3) ? 2.5 : 0.0;
  c.backward = rng.Chance(0.6);
  if (rng.Chance(0.3)) SetDropout(&c, rng, rng.Pick<double>({0.1, 0.5, 0.95}));
  return c;
}

// Corrupted tables must be rejected (the FFI handler returns the message as an error).
void CheckValidation(Failures* f) {
  Case c;
  c.T = 70;
  c.S = 90;
  c.N = 2;
  c.K = 1;
  c.density = 0.4;
  Random rng(5);
  Buffers x;
  MakeInputs(c, rng, &x);
  const CompiledTables compiled =
      CompileBlockSparseTables(c.T, c.S, c.N, c.K, c.per_head, x.mask_bytes);
  const AttentionProblem p = MakeProblem(c, x, false);
  if (jaxattn::ValidateBlockSparse(p, compiled.tables) != nullptr) {
    f->Add("rejected valid tables");
    return;
  }
  std::vector<int32_t> entries(compiled.tables.q_entries,
                               compiled.tables.q_entries + 2 * compiled.tables.q_nnz);
  auto expect_rejected = [&](const char* what, const std::vector<int32_t>& corrupt,
                             int64_t num_k_tiles_delta = 0) {
    Exact<int32_t> block(corrupt);
    BlockSparseTables t = compiled.tables;
    t.q_entries = block.data.get();
    t.num_k_tiles += num_k_tiles_delta;
    if (jaxattn::ValidateBlockSparse(p, t) == nullptr) f->Add(std::string("accepted ") + what);
  };
  std::vector<int32_t> bad = entries;
  bad[0] = static_cast<int32_t>(compiled.tables.num_k_tiles);  // key tile out of range
  expect_rejected("a key tile past the end", bad);
  bad = entries;
  bad[1] = static_cast<int32_t>(compiled.tables.num_masks);  // mask id out of range
  expect_rejected("a mask id past the pool", bad);
  bad = entries;
  bad[1] = -5;
  expect_rejected("a negative mask id", bad);
  expect_rejected("tables for another key length", entries, 1);
  AttentionProblem with_mask = MakeProblem(c, x, true);
  if (jaxattn::ValidateBlockSparse(with_mask, compiled.tables) == nullptr) {
    f->Add("accepted a problem with an element mask of its own");
  }
}

void RunSparseSuite(SuiteContext& context) {
  std::vector<Case> cases;
  // Hand-picked: full tiles only, empty rows, one tile, GQA with per-head masks.
  Case c;
  c.T = c.S = 256;
  c.N = 4;
  c.K = 2;
  c.band = 1000;
  c.density = 0.0;
  cases.push_back(c);  // causal: full and partial tiles, empty ones above the diagonal
  c.density = 0.0;
  c.band = -1;
  cases.push_back(c);  // nothing visible: every row outputs 0 with lse -inf
  c.per_head = true;
  c.density = 0.05;
  c.dtype = DType::kBF16;
  cases.push_back(c);
  Random rng(context.seed * 7919 + 3);
  // Dropout: causal band with random blocks (full, partial and empty tiles), per-head masks
  // and a batch of 2 with seeds per batch row or shared.
  c.B = 2;
  c.T = 130;
  c.S = 200;
  c.band = 70;
  c.density = 0.3;
  c.dtype = DType::kF32;
  SetDropout(&c, rng, 0.1);
  cases.push_back(c);
  c.dtype = DType::kBF16;
  c.per_head = false;
  c.soft_cap = 2.5;
  SetDropout(&c, rng, 0.5);
  cases.push_back(c);
  for (int64_t i = 0; i < context.num_cases / 4 + 1; ++i) cases.push_back(RandomCase(rng));
  for (size_t i = 0; i < cases.size(); ++i) {
    if (context.verbose) std::printf("  sparse %s\n", cases[i].Describe().c_str());
    Failures f;
    RunCase(cases[i], context.seed * 1000003 + i, context.pool, &f);
    context.Record(cases[i].Describe(), f);
  }
  Failures f;
  CheckValidation(&f);
  context.Record("ValidateBlockSparse", f);
}

}  // namespace

JAXATTN_HARNESS_SUITE(sparse, RunSparseSuite);

}  // namespace jaxattn_harness
