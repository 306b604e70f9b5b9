// Kernels compiled for avx2 (flags: cmake/isa_flags.cmake), chosen at run time by dispatch.cc.
#define JAXATTN_VL 8
#define JAXATTN_ISA_NAMESPACE avx2
#include "kernels_impl.h"

namespace jaxattn {
const KernelTable kAvx2Kernels = avx2::MakeKernelTable<avx2::ProductMode::kFloat32>("avx2");
}  // namespace jaxattn
