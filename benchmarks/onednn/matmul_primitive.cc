// Per-call cost of the dnnl::matmul primitive from the PyPI onednn wheel (a SYCL build, so
// the CPU engine runs through the Intel OpenCL CPU runtime), for comparison with the
// ukernel. Build and run: see benchmarks/results/onednn_brgemm.md.
#include <chrono>
#include <cstdio>
#include <vector>
#include "oneapi/dnnl/dnnl.hpp"
int main() {
  using namespace dnnl;
  auto t0 = std::chrono::steady_clock::now();
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  auto t1 = std::chrono::steady_clock::now();
  printf("engine+stream %.1f ms\n", std::chrono::duration<double, std::milli>(t1 - t0).count());
  for (int n : {64, 128}) {
    memory::desc a({n, n}, memory::data_type::f32, memory::format_tag::ab);
    auto t2 = std::chrono::steady_clock::now();
    matmul::primitive_desc pd(eng, a, a, a);
    matmul mm(pd);
    auto t3 = std::chrono::steady_clock::now();
    memory A(a, eng), B(a, eng), C(a, eng);
    mm.execute(s, {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}});
    s.wait();
    int it = 2000;
    auto t4 = std::chrono::steady_clock::now();
    for (int i = 0; i < it; ++i)
      mm.execute(s, {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}});
    s.wait();
    auto t5 = std::chrono::steady_clock::now();
    double us = std::chrono::duration<double, std::micro>(t5 - t4).count() / it;
    printf("n=%d create %.1f ms, exec %.2f us = %.1f GFLOP/s impl=%s\n", n,
           std::chrono::duration<double, std::milli>(t3 - t2).count(), us,
           2.0 * n * n * n / us * 1e-3, pd.impl_info_str());
  }
}
