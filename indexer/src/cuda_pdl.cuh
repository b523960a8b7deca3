// Programmatic dependent launch (sm_90+): a kernel launched with launch_kernel(..., programmatic = true) may start
// while the stream's previous kernel is still running (once every block of that kernel has called pdl_trigger()
// or exited); it must call pdl_wait() before it touches memory that earlier work in the stream writes or reads.
// pdl_wait() returns once the previous kernel has completed and its writes are visible; without the launch
// attribute it returns at once. Every block of a kernel launched this way calls pdl_wait() before it exits, so that
// the kernel completes only after its predecessor (the chain stays ordered end to end).
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace keysel::cuda_kernels {

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/// True when `kernel`'s loaded image was compiled for sm_90 or newer, i.e. its pdl_wait() is a real wait (an
/// sm_80 image JIT-compiled on a Hopper GPU has none, so it must not be launched programmatically).
template <typename Kernel>
bool image_waits(Kernel kernel) {
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attributes.binaryVersion >= 90 && attributes.ptxVersion >= 90;
}

/// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the stream's previous kernel when
/// `programmatic`.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                          bool programmatic, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace keysel::cuda_kernels
