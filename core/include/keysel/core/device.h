// What the build and the machine offer: CUDA compiled in, GPUs present.
#pragma once

#include <string>

namespace keysel {

/// True when keysel was built with its CUDA kernels.
bool built_with_cuda();
/// True when keysel was built with the FAISS candidate searches.
bool built_with_faiss();
/// Number of CUDA devices visible (0 without CUDA support or without a GPU; never throws).
int cuda_device_count();
/// One line describing the GPU `index` ("NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB") or why there is none.
std::string cuda_device_description(int index = 0);

}  // namespace keysel
