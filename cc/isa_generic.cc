// Kernels compiled for generic (flags in CMakeLists.txt); chosen at run time by dispatch.cc.
#define JAXATTN_VL 4
#define JAXATTN_ISA_NAMESPACE generic
#include "kernels_impl.h"

namespace jaxattn {
using generic::ProductMode;
const KernelTable kGenericKernels = {"generic", generic::ForwardImpl<ProductMode::kFloat32>,
    generic::BackwardImpl<ProductMode::kFloat32>, generic::SparseTilingImpl,
    generic::SparseForwardImpl<ProductMode::kFloat32>,
    generic::SparseBackwardImpl<ProductMode::kFloat32>, generic::DecodeImpl,
    generic::DecodePartitionSizeImpl, generic::JvpImpl, generic::GlaForwardImpl,
    generic::GlaBackwardImpl};
}  // namespace jaxattn
