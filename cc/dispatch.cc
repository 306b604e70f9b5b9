// Picks the kernels for the CPU at run time; JAXATTN_ISA=<name of a kernel set in kKernelSets>
// forces another one the CPU can run (tests and benchmarks use it to cover every path).
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "attention.h"
#include "gated_linear.h"
#include "kernel_table.h"

namespace jaxattn {
namespace {

bool CpuHasAvx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}
bool CpuHasAvx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// Whether bf16 products run faster as bf16 pairs (vdpbf16ps) than widened to float32 FMAs.
// Measured peaks per core (tools/profile/peak_avx512.cc): AMD Zen 5 443 GFLOP/s vdpbf16ps vs
// 215 f32 FMA (flash forward 1.9x faster with pairs); a 16-core Intel Xeon with AMX 84 vs 165
// (flash forward 1.7x slower with pairs).
bool FasterBF16Pairs() { return __builtin_cpu_is("amd"); }

// AMX-BF16 tiles, usable by this process: Linux enables the tile data state per process
// only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; the first tile
// instruction raises SIGILL otherwise), and refuses on kernels or VMs without it. Asked
// once, when the kernels are first selected; the permission is then checked, not assumed.
bool AmxUsable() {
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
#if defined(__linux__) && defined(__x86_64__) && defined(SYS_arch_prctl)
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtileData = 18;
  auto granted = [] {
    unsigned long features = 0;
    return syscall(SYS_arch_prctl, kArchGetXcompPerm, &features) == 0 &&
           (features & (1ul << kXfeatureXtileData)) != 0;
  };
  if (granted()) return true;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) != 0) return false;
  return granted();
#else
  return false;
#endif
}

bool CpuHasAmx() { return CpuHasAvx512() && AmxUsable(); }

bool CpuRunsAnything() { return true; }

// Every kernel set with what the CPU needs to run it: the one list that JAXATTN_ISA, and
// kernel_isas() / available_kernel_isas() in Python, are read from. A new kernel set is one
// entry here (and, to be picked by default, a rule in SelectKernels).
struct KernelSet {
  const KernelTable* table;
  bool (*cpu_runs)();
};
const KernelSet kKernelSets[] = {
    {&kGenericKernels, CpuRunsAnything}, {&kAvx2Kernels, CpuHasAvx2},
    {&kAvx512Kernels, CpuHasAvx512},     {&kAvx512BF16Kernels, CpuHasAvx512},
    {&kAmxKernels, CpuHasAmx},
};

const KernelTable& SelectKernels() {
  const char* forced = std::getenv("JAXATTN_ISA");
  const bool avx512 = CpuHasAvx512(), avx2 = CpuHasAvx2();
  if (forced != nullptr) {
    // Where AMX is unusable, JAXATTN_ISA=amx gets the default set: jaxattn/_ffi.py then
    // refuses to load.
    for (const KernelSet& set : kKernelSets) {
      if (std::strcmp(forced, set.table->isa) == 0 && set.cpu_runs()) return *set.table;
    }
  }
  if (avx512 && !FasterBF16Pairs() && AmxUsable()) return kAmxKernels;
  if (avx512) return FasterBF16Pairs() ? kAvx512BF16Kernels : kAvx512Kernels;
  if (avx2) return kAvx2Kernels;
  return kGenericKernels;
}

int64_t CeilDivI(int64_t x, int64_t m) { return (x + m - 1) / m; }

const KernelTable& Kernels() {
  static const KernelTable& table = SelectKernels();
  return table;
}

}  // namespace

const char* KernelIsa() { return Kernels().isa; }

std::vector<KernelIsaInfo> KernelIsas() {
  std::vector<KernelIsaInfo> isas;
  for (const KernelSet& set : kKernelSets) isas.push_back({set.table->isa, set.cpu_runs()});
  return isas;
}

const char* ValidateProblem(const AttentionProblem& p) {
  if (p.batch <= 0 || p.q_len <= 0 || p.kv_len <= 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 ||
      p.head_dim <= 0 || p.value_dim <= 0) {
    return "every dimension must be positive";
  }
  // Positions are compared as int32 vectors (TransformLogits).
  if (p.q_len >= (int64_t{1} << 31) || p.kv_len >= (int64_t{1} << 31)) {
    return "sequence lengths must be below 2^31";
  }
  if (p.num_heads % p.num_kv_heads != 0) {
    return "the number of query heads must be a multiple of the number of kv heads";
  }
  if (p.q_batch <= 0 || p.batch % p.q_batch != 0 || p.kv_batch <= 0 || p.batch % p.kv_batch != 0 ||
      p.value_batch <= 0 || p.batch % p.value_batch != 0) {
    return "operand batch sizes must divide the output batch";
  }
  if (p.q_lengths != nullptr && (p.q_lengths_batch <= 0 || p.batch % p.q_lengths_batch)) {
    return "query_seq_lengths must have one entry per batch element";
  }
  if (p.kv_lengths != nullptr && (p.kv_lengths_batch <= 0 || p.batch % p.kv_lengths_batch)) {
    return "key_value_seq_lengths must have one entry per batch element";
  }
  const int64_t full[4] = {p.batch, p.num_heads, p.q_len, p.kv_len};
  for (const Broadcast4* x : {&p.bias, &p.mask}) {
    if (x->data == nullptr) continue;
    if (x->dims[0] <= 0 || p.batch % x->dims[0] != 0) return "bias/mask batch must divide B";
    for (int i = 1; i < 4; ++i) {
      if (x->dims[i] != 1 && x->dims[i] != full[i]) {
        return "bias/mask must be broadcastable to [B, N, T, S]";
      }
    }
  }
  // Written so that NaN fails: an infinite scale or cap would turn every logit into NaN or 0.
  if (!(p.scale - p.scale == 0.0f)) return "scale must be finite";
  if (!(p.soft_cap >= 0.0f && p.soft_cap - p.soft_cap == 0.0f)) {
    return "soft cap must be finite and >= 0 (0: off)";
  }
  if (p.head_dim > 1024 || p.value_dim > 1024) return "head dims above 1024 are not supported";
  // The kernels add windows to positions in int64 (callers clamp wider windows).
  if (p.window_left > (int64_t{1} << 62) || p.window_right > (int64_t{1} << 62)) {
    return "window sizes above 2^62 are not supported";
  }
  const auto divides = [&p](const void* x, int64_t batch) {
    return x == nullptr || (batch > 0 && p.batch % batch == 0);
  };
  if (!divides(p.q_positions, p.q_positions_batch) ||
      !divides(p.kv_positions, p.kv_positions_batch) ||
      !divides(p.q_segments, p.q_segments_batch) || !divides(p.kv_segments, p.kv_segments_batch) ||
      !divides(p.alibi_slopes, p.alibi_batch)) {
    return "positions, segment ids and ALiBi slopes must have batch 1 or B";
  }
  if ((p.q_segments == nullptr) != (p.kv_segments == nullptr)) {
    return "query and key/value segment ids must be given together";
  }
  return nullptr;
}

BlockSparseTiling BlockSparseTilingFor(int64_t group) { return Kernels().sparse_tiling(group); }

namespace {

// One CSR table: rows of entries (tile id, mask id), tile ids strictly increasing in a row.
const char* CheckTable(const int32_t* indptr, int64_t rows, const int32_t* entries, int64_t nnz,
                       int64_t num_tiles, int64_t num_masks) {
  if (indptr == nullptr || (nnz > 0 && entries == nullptr)) return "a table is missing";
  if (indptr[0] != 0 || indptr[rows] != nnz) {
    return "table indptr must start at 0 and end at the number of entries";
  }
  for (int64_t row = 0; row < rows; ++row) {
    if (indptr[row + 1] < indptr[row]) return "table indptr must be non-decreasing";
    int64_t previous = -1;
    for (int64_t e = indptr[row]; e < indptr[row + 1]; ++e) {
      const int64_t tile = entries[2 * e], mask = entries[2 * e + 1];
      if (tile <= previous || tile >= num_tiles) {
        return "table tile ids must be in range and increasing within a row";
      }
      if (mask < -1 || mask >= num_masks) return "table mask id out of range";
      previous = tile;
    }
  }
  return nullptr;
}

}  // namespace

const char* ValidateBlockSparse(const AttentionProblem& p, const BlockSparseTables& t) {
  if (p.bias.data != nullptr || p.mask.data != nullptr || p.q_lengths != nullptr ||
      p.kv_lengths != nullptr || p.causal || p.window_left >= 0 || p.window_right >= 0) {
    return "block-sparse attention takes no other bias or mask";
  }
  const BlockSparseTiling tiling = BlockSparseTilingFor(p.num_heads / p.num_kv_heads);
  if (t.num_q_tiles != CeilDivI(p.q_len, tiling.positions) ||
      t.num_k_tiles != CeilDivI(p.kv_len, tiling.keys)) {
    return "block-sparse tables were compiled for another tiling or sequence length";
  }
  if (t.groups != 1 && t.groups != p.num_kv_heads) {
    return "block-sparse tables must have 1 or num_kv_heads groups";
  }
  if (t.num_masks < 0 || (t.num_masks > 0 && t.masks == nullptr)) return "masks missing";
  if (const char* m = CheckTable(t.q_indptr, t.groups * t.num_q_tiles, t.q_entries, t.q_nnz,
                                 t.num_k_tiles, t.num_masks)) {
    return m;
  }
  if (t.k_indptr != nullptr) {
    if (t.k_nnz != t.q_nnz) return "the transposed table must have as many entries";
    if (t.num_masks > 0 && t.masks_t == nullptr) return "transposed masks missing";
    return CheckTable(t.k_indptr, t.groups * t.num_k_tiles, t.k_entries, t.k_nnz, t.num_q_tiles,
                      t.num_masks);
  }
  return nullptr;
}

int64_t BlockSparseForward(const AttentionProblem& problem, const BlockSparseTables& tables,
                           const FlashForwardResult& result, const Parallel& parallel) {
  return Kernels().sparse_forward(problem, tables, result, parallel);
}

int64_t BlockSparseBackward(const AttentionProblem& problem, const BlockSparseTables& tables,
                            const FlashBackwardArgs& args, const Parallel& parallel) {
  return Kernels().sparse_backward(problem, tables, args, parallel);
}

const char* ValidateDecodeProblem(const DecodeAttentionProblem& p) {
  if (p.batch <= 0 || p.q_len <= 0 || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.value_dim <= 0 || p.num_pages <= 0 || p.page_size <= 0 || p.max_pages <= 0) {
    return "every dimension must be positive";
  }
  if (p.num_heads % p.num_kv_heads != 0) {
    return "the number of query heads must be a multiple of the number of kv heads";
  }
  if (p.q_batch <= 0 || p.batch % p.q_batch != 0) return "query batch must divide the batch";
  if (p.kv_lengths == nullptr || p.kv_lengths_batch <= 0 || p.batch % p.kv_lengths_batch) {
    return "kv_lengths must have one entry per batch element";
  }
  if (p.block_tables == nullptr) {
    if (p.max_pages != 1 || p.batch % p.num_pages != 0) {
      return "the cache batch must divide the batch";
    }
    if (p.value_num_pages < 0 || (p.value_num_pages > 0 && p.batch % p.value_num_pages != 0)) {
      return "the value cache batch must divide the batch";
    }
  } else if (p.value_num_pages != 0) {
    return "a paged cache has one page pool for keys and values";
  } else if (p.block_tables_batch <= 0 || p.batch % p.block_tables_batch != 0) {
    return "block_tables must have one row per batch element";
  }
  if (!(p.scale == p.scale) || !(p.soft_cap >= 0.0f)) return "scale/soft cap invalid";
  if (p.head_dim > 1024 || p.value_dim > 1024) return "head dims above 1024 are not supported";
  const auto divides = [&p](const void* x, int64_t batch) {
    return x == nullptr || (batch > 0 && p.batch % batch == 0);
  };
  if (!divides(p.q_positions, p.q_positions_batch) ||
      !divides(p.kv_positions, p.kv_positions_batch) || !divides(p.alibi_slopes, p.alibi_batch)) {
    return "positions and ALiBi slopes must have batch 1 or B";
  }
  if (p.q_lengths != nullptr && (p.q_lengths_batch <= 0 || p.batch % p.q_lengths_batch != 0)) {
    return "query lengths must have one entry per batch element";
  }
  if (p.q_len > kDecodeMaxTokens) return ValidateCacheAttention(p);
  return nullptr;
}

const char* ValidateDecodePages(const DecodeAttentionProblem& p) {
  if (p.block_tables == nullptr) return nullptr;
  const int64_t capacity = p.max_pages * p.page_size;
  for (int64_t b = 0; b < p.block_tables_batch; ++b) {
    // The longest length any batch element using this row of the table has.
    int64_t len = 0;
    for (int64_t i = b; i < p.batch; i += p.block_tables_batch) {
      const int64_t l = p.kv_lengths[i % p.kv_lengths_batch];
      len = std::max(len, std::min(capacity, std::max<int64_t>(0, l)));
    }
    const int64_t used = (len + p.page_size - 1) / p.page_size;
    for (int64_t i = 0; i < used; ++i) {
      const int32_t page = p.block_tables[b * p.max_pages + i];
      if (page < 0 || page >= p.num_pages) {
        return "block_tables holds a page id outside [0, num_pages) for a page below "
               "kv_lengths";
      }
    }
  }
  return nullptr;
}

int64_t DecodePartitionSize(const DecodeAttentionProblem& problem) {
  return Kernels().decode_partition_size(problem);
}

int64_t DecodeForward(const DecodeAttentionProblem& problem, const DecodeResult& result,
                      const Parallel& parallel) {
  if (problem.q_len > kDecodeMaxTokens) return CacheAttentionForward(problem, result, parallel);
  return Kernels().decode_forward(problem, result, parallel);
}

int64_t FlashForward(const AttentionProblem& problem, const FlashForwardResult& result,
                     const Parallel& parallel) {
  return Kernels().flash_forward(problem, result, parallel);
}

int64_t FlashBackward(const AttentionProblem& problem, const FlashBackwardArgs& args,
                      const Parallel& parallel) {
  return Kernels().flash_backward(problem, args, parallel);
}

int64_t FlashJvp(const AttentionProblem& problem, const FlashTangents& tangents, const void* out,
                 const float* lse, const FlashJvpResult& result, const Parallel& parallel) {
  return Kernels().flash_jvp(problem, tangents, out, lse, result, parallel);
}

int64_t FlashForwardF64(const AttentionProblem& problem, const BlockSparseTables* sparse,
                        const F64ForwardResult& result, const Parallel& parallel) {
  return Kernels().f64_forward(problem, sparse, result, parallel);
}

int64_t FlashBackwardF64(const AttentionProblem& problem, const BlockSparseTables* sparse,
                         const F64BackwardArgs& args, const Parallel& parallel) {
  return Kernels().f64_backward(problem, sparse, args, parallel);
}

int64_t FlashJvpF64(const AttentionProblem& problem, const FlashTangents& tangents,
                    const double* out, const double* lse, const F64JvpResult& result,
                    const Parallel& parallel) {
  return Kernels().f64_jvp(problem, tangents, out, lse, result, parallel);
}

int64_t DecodeForwardF64(const DecodeAttentionProblem& problem, const F64ForwardResult& result,
                         const Parallel& parallel) {
  return Kernels().f64_decode(problem, result, parallel);
}

const char* ValidateGatedLinear(const GatedLinearProblem& p) {
  if (p.batch <= 0 || p.seq_len < 0 || p.num_heads <= 0 || p.key_dim <= 0 || p.value_dim <= 0) {
    return "batch, heads and head dims must be positive, the length non-negative";
  }
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return "the kv heads (of key, value and log_gate) must divide the query heads";
  }
  if (p.gate_dim != p.key_dim && p.gate_dim != 1) {
    return "log_gate's last dim must be the key head dim or 1";
  }
  for (int64_t operand_batch : {p.q_batch, p.k_batch, p.v_batch, p.g_batch}) {
    if (operand_batch <= 0 || p.batch % operand_batch != 0) {
      return "operand batch sizes must divide the output batch";
    }
  }
  if (p.initial_state != nullptr && (p.state_batch <= 0 || p.batch % p.state_batch != 0)) {
    return "initial_state batch must divide the output batch";
  }
  if (!(p.scale - p.scale == 0.0f)) return "scale must be finite";
  if (p.key_dim > 1024 || p.value_dim > 1024) return "head dims above 1024 are not supported";
  return nullptr;
}

const char* GatedLinearForward(const GatedLinearProblem& problem,
                               const GatedLinearForwardResult& result, const Parallel& parallel) {
  return Kernels().gla_forward(problem, result, parallel);
}

const char* GatedLinearBackward(const GatedLinearProblem& problem,
                                const GatedLinearBackwardArgs& args, const Parallel& parallel) {
  return Kernels().gla_backward(problem, args, parallel);
}

}  // namespace jaxattn
