# The instruction-set flags of each kernel set's source (cc/isa_*.cc), in one place for every
# build of the kernels: the extension (CMakeLists.txt), the sanitizer harness (tests/cc) and
# the profiling build (tools/profile) include this file. cc/isa_generic.cc gets none (the
# x86-64 baseline). Never -march=native: the kernel set is picked at run time (dispatch.cc).
set(JAXATTN_AVX2_FLAGS -mavx2 -mfma -mf16c)
# AVX512-VNNI (vpdpwssd: int8 KV caches) comes with every CPU that has AVX512-BF16.
set(JAXATTN_AVX512_FLAGS -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx512vnni
    -mamx-tile -mamx-bf16 -mavx2 -mfma -mf16c -mprefer-vector-width=512)

# Source properties are per directory: each CMakeLists.txt that compiles the ISA files calls
# this with the repository root.
function(jaxattn_set_isa_flags root)
  set_source_files_properties("${root}/cc/isa_avx2.cc" PROPERTIES COMPILE_OPTIONS
                              "${JAXATTN_AVX2_FLAGS}")
  set_source_files_properties("${root}/cc/isa_avx512.cc" PROPERTIES COMPILE_OPTIONS
                              "${JAXATTN_AVX512_FLAGS}")
endfunction()
