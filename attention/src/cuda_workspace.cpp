// A caller's device workspace, checked (cuda_workspace.h).
#include "cuda_workspace.h"

#include <cstdint>
#include <string>

#include "keysel/core/error.h"

namespace keysel::detail {

void* workspace_pointer(std::string_view function, const TensorView& workspace, std::int64_t bytes, Device device) {
  if (workspace.empty()) return nullptr;
  KEYSEL_CHECK_ARG_IN(function, workspace.device() == device, "workspace", "device memory on " + device.str(),
                      workspace.str());
  expect_writable(function, workspace, "workspace");
  expect_contiguous(function, workspace, "workspace");
  KEYSEL_CHECK_ARG_IN(function, workspace.bytes() >= bytes, "workspace", "at least " + std::to_string(bytes) + " bytes",
                      std::to_string(workspace.bytes()) + " bytes (" + workspace.str() + ")");
  KEYSEL_CHECK_ARG_IN(function, reinterpret_cast<std::uintptr_t>(workspace.raw_data()) % 16 == 0, "workspace",
                      "a 16-byte aligned address",
                      "an address " + std::to_string(reinterpret_cast<std::uintptr_t>(workspace.raw_data()) % 16) +
                          " bytes past alignment");
  return const_cast<void*>(workspace.raw_data());
}

}  // namespace keysel::detail
