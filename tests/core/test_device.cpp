// What the build offers. The GPU kernels' own tests skip, with a message, where no GPU is present.
#include <gtest/gtest.h>

#include "keysel/core/build_config.h"
#include "keysel/core/device.h"

namespace keysel {
namespace {

TEST(Device, BuildFlagsMatchTheConfiguration) {
  EXPECT_EQ(built_with_cuda(), KEYSEL_CUDA != 0);
  EXPECT_EQ(built_with_faiss(), KEYSEL_FAISS != 0);
}

TEST(Device, CountNeverThrowsAndDescriptionIsInformative) {
  const int count = cuda_device_count();
  EXPECT_GE(count, 0);
  const std::string text = cuda_device_description(0);
  EXPECT_FALSE(text.empty());
  if (!built_with_cuda()) {
    EXPECT_EQ(count, 0);
    EXPECT_NE(text.find("without CUDA"), std::string::npos) << text;
  } else if (count == 0) {
    EXPECT_NE(text.find("no CUDA device"), std::string::npos) << text;
  } else {
    EXPECT_NE(text.find("sm_"), std::string::npos) << text;
    EXPECT_NE(cuda_device_description(count).find("no CUDA device"), std::string::npos);
  }
}

}  // namespace
}  // namespace keysel
