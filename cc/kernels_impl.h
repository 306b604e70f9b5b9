// The kernel source compiled once per instruction set. The including isa_*.cc file defines
// JAXATTN_VL and JAXATTN_ISA_NAMESPACE and is compiled with that instruction set's flags.
// Everything here lives in that namespace, so no two instruction sets share a symbol. Each
// header below includes the pieces it uses itself (#pragma once), so the order here only
// lists the kernel families.
#include <immintrin.h>  // F16C conversions (decode_impl.h), used under the ISA's flags only

#include "attention.h"
#include "gated_linear.h"
#include "kernel_table.h"

namespace jaxattn {
namespace JAXATTN_ISA_NAMESPACE {

#include "simd.h"
#include "gemm.h"
#include "cache_rows_impl.h"
#include "flash_impl.h"
#include "flash_jvp_impl.h"
#include "sparse_impl.h"
#include "decode_impl.h"
#include "gla_impl.h"
#include "f64_impl.h"

// The kernel table of this instruction set, its bf16 products made by kMode (isa: the table's
// name). Every entry is set here by name, once for all the sets (a new kernel: one line).
template <ProductMode kMode>
constexpr KernelTable MakeKernelTable(const char* isa) {
  KernelTable table{};
  table.isa = isa;
  table.flash_forward = ForwardImpl<kMode>;
  table.flash_backward = BackwardImpl<kMode>;
  table.sparse_tiling = SparseTilingImpl;
  table.sparse_forward = SparseForwardImpl<kMode>;
  table.sparse_backward = SparseBackwardImpl<kMode>;
  table.decode_forward = DecodeImpl;
  table.decode_partition_size = DecodePartitionSizeImpl;
  table.flash_jvp = JvpImpl;
  table.f64_forward = F64ForwardImpl;
  table.f64_backward = F64BackwardImpl;
  table.f64_jvp = F64JvpImpl;
  table.f64_decode = F64DecodeImpl;
  table.gla_forward = GlaForwardImpl;
  table.gla_backward = GlaBackwardImpl;
  return table;
}

}  // namespace JAXATTN_ISA_NAMESPACE
}  // namespace jaxattn
