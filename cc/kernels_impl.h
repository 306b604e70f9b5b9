// The kernel source compiled once per instruction set. The including isa_*.cc file defines
// JAXATTN_VL and JAXATTN_ISA_NAMESPACE and is compiled with that instruction set's flags.
// Everything here lives in that namespace, so no two instruction sets share a symbol.
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

}  // namespace JAXATTN_ISA_NAMESPACE
}  // namespace jaxattn
