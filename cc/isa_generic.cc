// Kernels compiled for generic (flags in CMakeLists.txt); chosen at run time by dispatch.cc.
#define JAXATTN_VL 4
#define JAXATTN_ISA_NAMESPACE generic
#include "kernels_impl.h"

namespace jaxattn {
const KernelTable kGenericKernels = {"generic", generic::ForwardImpl<false>, generic::BackwardImpl<false>,
    generic::SparseTilingImpl, generic::SparseForwardImpl<false>, generic::SparseBackwardImpl<false>,
                                    generic::DecodeImpl, generic::DecodePartitionSizeImpl,
                                    generic::GlaForwardImpl, generic::GlaBackwardImpl};
}  // namespace jaxattn
