// Kernels compiled for generic (flags: cmake/isa_flags.cmake), chosen at run time by dispatch.cc.
#define JAXATTN_VL 4
#define JAXATTN_ISA_NAMESPACE generic
#include "kernels_impl.h"

namespace jaxattn {
const KernelTable kGenericKernels =
    generic::MakeKernelTable<generic::ProductMode::kFloat32>("generic");
}  // namespace jaxattn
