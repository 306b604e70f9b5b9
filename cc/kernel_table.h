// One entry per instruction set: the kernels compiled for it.
#pragma once

#include "attention.h"
#include "attention_f64.h"
#include "gated_linear.h"

namespace jaxattn {

struct KernelTable {
  const char* isa;
  // The entry points that allocate return 0 or the bytes of a failed allocation.
  int64_t (*flash_forward)(const AttentionProblem&, const FlashForwardResult&, const Parallel&);
  int64_t (*flash_backward)(const AttentionProblem&, const FlashBackwardArgs&, const Parallel&);
  BlockSparseTiling (*sparse_tiling)(int64_t group);
  int64_t (*sparse_forward)(const AttentionProblem&, const BlockSparseTables&,
                            const FlashForwardResult&, const Parallel&);
  int64_t (*sparse_backward)(const AttentionProblem&, const BlockSparseTables&,
                             const FlashBackwardArgs&, const Parallel&);
  int64_t (*decode_forward)(const DecodeAttentionProblem&, const DecodeResult&, const Parallel&);
  int64_t (*decode_partition_size)(const DecodeAttentionProblem&);
  int64_t (*flash_jvp)(const AttentionProblem&, const FlashTangents&, const void*, const float*,
                       const FlashJvpResult&, const Parallel&);
  // Float64 (attention_f64.h): sparse nullptr for flash attention.
  int64_t (*f64_forward)(const AttentionProblem&, const BlockSparseTables*, const F64ForwardResult&,
                         const Parallel&);
  int64_t (*f64_backward)(const AttentionProblem&, const BlockSparseTables*, const F64BackwardArgs&,
                          const Parallel&);
  int64_t (*f64_jvp)(const AttentionProblem&, const FlashTangents&, const double*, const double*,
                     const F64JvpResult&, const Parallel&);
  int64_t (*f64_decode)(const DecodeAttentionProblem&, const F64ForwardResult&, const Parallel&);
  const char* (*gla_forward)(const GatedLinearProblem&, const GatedLinearForwardResult&,
                             const Parallel&);
  const char* (*gla_backward)(const GatedLinearProblem&, const GatedLinearBackwardArgs&,
                              const Parallel&);
};

extern const KernelTable kGenericKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;
extern const KernelTable kAvx512BF16Kernels;  // avx512 with bf16 products on bf16 pairs
extern const KernelTable kAmxKernels;         // avx512 with bf16 products on AMX tiles

}  // namespace jaxattn
