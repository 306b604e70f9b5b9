// Kernels compiled for avx512 (flags in CMakeLists.txt); chosen at run time by dispatch.cc.
#define JAXATTN_VL 16
#define JAXATTN_ISA_NAMESPACE avx512
#include "kernels_impl.h"

namespace jaxattn {
// Two tables: bf16 inputs multiplied widened to float32, or as bf16 pairs by vdpbf16ps
// (dispatch.cc picks the one that is faster on the CPU).
const KernelTable kAvx512Kernels = {"avx512", avx512::ForwardImpl<false>,
    avx512::BackwardImpl<false>, avx512::SparseTilingImpl, avx512::SparseForwardImpl<false>,
    avx512::SparseBackwardImpl<false>, avx512::DecodeImpl, avx512::DecodePartitionSizeImpl,
    avx512::GlaForwardImpl, avx512::GlaBackwardImpl};
const KernelTable kAvx512BF16Kernels = {"avx512bf16", avx512::ForwardImpl<true>,
    avx512::BackwardImpl<true>, avx512::SparseTilingImpl, avx512::SparseForwardImpl<true>,
    avx512::SparseBackwardImpl<true>, avx512::DecodeImpl, avx512::DecodePartitionSizeImpl,
    avx512::GlaForwardImpl, avx512::GlaBackwardImpl};
}  // namespace jaxattn
