// Kernels compiled for avx2 (flags in CMakeLists.txt); chosen at run time by dispatch.cc.
#define JAXATTN_VL 8
#define JAXATTN_ISA_NAMESPACE avx2
#include "kernels_impl.h"

namespace jaxattn {
using avx2::ProductMode;
const KernelTable kAvx2Kernels = {"avx2", avx2::ForwardImpl<ProductMode::kFloat32>,
    avx2::BackwardImpl<ProductMode::kFloat32>, avx2::SparseTilingImpl,
    avx2::SparseForwardImpl<ProductMode::kFloat32>,
    avx2::SparseBackwardImpl<ProductMode::kFloat32>, avx2::DecodeImpl,
    avx2::DecodePartitionSizeImpl, avx2::JvpImpl, avx2::GlaForwardImpl,
    avx2::GlaBackwardImpl};
}  // namespace jaxattn
