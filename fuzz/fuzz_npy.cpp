// keysel::parse_npy (recall/include/keysel/recall/loaders.h) on arbitrary bytes. An accepted array is decoded to
// fp32 and, in the dtypes .npy can hold, must survive serialize_npy -> parse_npy unchanged.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_support.h"
#include "keysel/recall/loaders.h"

using keysel::fuzz::finding;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keysel::fuzz::single_threaded();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  keysel::fuzz::fuzz_one([&] {
    const keysel::LoadedTensor t = keysel::parse_npy(keysel::fuzz::bytes_of(data, size), "fuzz.npy");
    if (static_cast<std::int64_t>(t.data.size()) != keysel::dtype_bytes(t.dtype, t.numel())) {
      finding("parse_npy: data size disagrees with dtype and shape");
    }
    const std::vector<float> values = t.to_float();
    if (static_cast<std::int64_t>(values.size()) != t.numel()) finding("to_float size differs from numel");
    std::vector<std::byte> bytes;
    try {
      bytes = keysel::serialize_npy(t);
    } catch (const keysel::Error&) {
      return;  // a dtype .npy cannot hold
    }
    const keysel::LoadedTensor again = keysel::parse_npy(bytes, "fuzz.npy");
    if (again.dtype != t.dtype || again.shape != t.shape || again.data != t.data) {
      finding("npy round trip changed the array");
    }
  });
  return 0;
}
