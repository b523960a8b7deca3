#include "keysel/core/device.h"

#include "keysel/core/build_config.h"

namespace keysel {

std::string Device::str() const {
  return kind == DeviceKind::cpu ? std::string("cpu") : "cuda:" + std::to_string(index);
}

bool built_with_cuda() { return KEYSEL_CUDA != 0; }
bool built_with_faiss() { return KEYSEL_FAISS != 0; }

#if !KEYSEL_CUDA
int cuda_device_count() { return 0; }
std::string cuda_device_description(int) { return "keysel was built without CUDA"; }
#endif

}  // namespace keysel
