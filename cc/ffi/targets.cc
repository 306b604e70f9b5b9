// The list of every target that module.cc registers. A new op family adds its
// <Family>Targets() (declared in common.h) here; a new target of an existing family goes into
// that family's list, in its own file.
#include "ffi/common.h"

namespace jaxattn {

std::vector<FfiTarget> FfiTargets() {
  std::vector<FfiTarget> all;
  for (std::vector<FfiTarget> (*family)() : {&FlashTargets, &DecodeTargets, &CacheWriteTargets,
                                             &BlockSparseTargets, &GatedLinearTargets}) {
    const std::vector<FfiTarget> targets = family();
    all.insert(all.end(), targets.begin(), targets.end());
  }
  return all;
}

}  // namespace jaxattn
