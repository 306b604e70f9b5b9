// The Python extension: hands the FFI targets to jaxattn/_ffi.py as PyCapsules. The only file
// that includes nanobind.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>
#include <vector>

#include "attention.h"
#include "ffi/targets.h"

namespace nb = nanobind;

NB_MODULE(_jaxattn, m) {
  m.doc() = "jaxattn kernels as XLA FFI custom-call targets";
  m.def(
      "registrations",
      [] {
        nb::dict targets;
        const std::vector<jaxattn::FfiTarget> all = jaxattn::FfiTargets();
        for (size_t i = 0; i < all.size(); ++i) {
          targets[all[i].name] = nb::capsule(jaxattn::WithShardViews(i, all[i].handler));
        }
        return targets;
      },
      "{target name: PyCapsule of its XLA FFI handler}");
  m.def(
      "block_sparse_tiling",
      [](int64_t group) {
        const jaxattn::BlockSparseTiling t = jaxattn::BlockSparseTilingFor(group);
        return nb::make_tuple(t.positions, t.rows, t.keys, t.rows_padded);
      },
      "The kernels' tile for GQA group size G: (query positions, rows, keys, rows rounded up "
      "to vectors) per tile.");
  m.def(
      "kernel_isa", [] { return std::string(jaxattn::KernelIsa()); },
      "The kernel set the kernels run with (one of the names kernel_isas() lists).");
  m.def(
      "kernel_isas",
      [] {
        nb::dict isas;
        for (const jaxattn::KernelIsaInfo& isa : jaxattn::KernelIsas()) {
          isas[isa.name] = isa.runs_on_this_cpu;
        }
        return isas;
      },
      "{kernel set name: whether this CPU can run it}, every kernel set compiled in.");
}
