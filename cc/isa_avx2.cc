// Kernels compiled for avx2 (flags in CMakeLists.txt); chosen at run time by dispatch.cc.
#define JAXATTN_VL 8
#define JAXATTN_ISA_NAMESPACE avx2
#include "kernels_impl.h"

namespace jaxattn {
const KernelTable kAvx2Kernels = {"avx2", avx2::ForwardImpl<false>, avx2::BackwardImpl<false>,
    avx2::SparseTilingImpl, avx2::SparseForwardImpl<false>, avx2::SparseBackwardImpl<false>,
                                    avx2::DecodeImpl, avx2::DecodePartitionSizeImpl,
                                    avx2::GlaForwardImpl, avx2::GlaBackwardImpl};
}  // namespace jaxattn
