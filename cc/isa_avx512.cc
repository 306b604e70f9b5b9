// Kernels compiled for avx512 (flags: cmake/isa_flags.cmake), chosen at run time by dispatch.cc.
#define JAXATTN_VL 16
#define JAXATTN_ISA_NAMESPACE avx512
#include "kernels_impl.h"

namespace jaxattn {
// Three tables: bf16 inputs multiplied widened to float32, as bf16 pairs by vdpbf16ps, or as
// the same pairs on AMX tiles (dispatch.cc picks the one that is fastest on the CPU).
const KernelTable kAvx512Kernels = avx512::MakeKernelTable<avx512::ProductMode::kFloat32>("avx512");
const KernelTable kAvx512BF16Kernels =
    avx512::MakeKernelTable<avx512::ProductMode::kBF16Pairs>("avx512bf16");
const KernelTable kAmxKernels = avx512::MakeKernelTable<avx512::ProductMode::kAmxTiles>("amx");
}  // namespace jaxattn
