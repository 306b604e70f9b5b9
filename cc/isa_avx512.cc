// Kernels compiled for avx512 (flags in CMakeLists.txt); chosen at run time by dispatch.cc.
#define JAXATTN_VL 16
#define JAXATTN_ISA_NAMESPACE avx512
#include "kernels_impl.h"

namespace jaxattn {
// Three tables: bf16 inputs multiplied widened to float32, as bf16 pairs by vdpbf16ps, or as
// the same pairs on AMX tiles (dispatch.cc picks the one that is fastest on the CPU).
using avx512::ProductMode;
const KernelTable kAvx512Kernels = {"avx512", avx512::ForwardImpl<ProductMode::kFloat32>,
    avx512::BackwardImpl<ProductMode::kFloat32>, avx512::SparseTilingImpl,
    avx512::SparseForwardImpl<ProductMode::kFloat32>,
    avx512::SparseBackwardImpl<ProductMode::kFloat32>, avx512::DecodeImpl,
    avx512::DecodePartitionSizeImpl, avx512::JvpImpl, avx512::GlaForwardImpl,
    avx512::GlaBackwardImpl};
const KernelTable kAvx512BF16Kernels = {"avx512bf16",
    avx512::ForwardImpl<ProductMode::kBF16Pairs>,
    avx512::BackwardImpl<ProductMode::kBF16Pairs>, avx512::SparseTilingImpl,
    avx512::SparseForwardImpl<ProductMode::kBF16Pairs>,
    avx512::SparseBackwardImpl<ProductMode::kBF16Pairs>, avx512::DecodeImpl,
    avx512::DecodePartitionSizeImpl, avx512::JvpImpl, avx512::GlaForwardImpl,
    avx512::GlaBackwardImpl};
const KernelTable kAmxKernels = {"amx", avx512::ForwardImpl<ProductMode::kAmxTiles>,
    avx512::BackwardImpl<ProductMode::kAmxTiles>, avx512::SparseTilingImpl,
    avx512::SparseForwardImpl<ProductMode::kAmxTiles>,
    avx512::SparseBackwardImpl<ProductMode::kAmxTiles>, avx512::DecodeImpl,
    avx512::DecodePartitionSizeImpl, avx512::JvpImpl, avx512::GlaForwardImpl,
    avx512::GlaBackwardImpl};
}  // namespace jaxattn
