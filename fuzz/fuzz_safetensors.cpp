// keysel::parse_safetensors (recall/include/keysel/recall/loaders.h) on arbitrary bytes. An accepted file is
// decoded to fp32 and must survive serialize_safetensors -> parse_safetensors unchanged.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "fuzz_support.h"
#include "keysel/recall/loaders.h"

namespace {

using keysel::fuzz::finding;

std::map<std::string, const keysel::LoadedTensor*> by_name(const keysel::SafetensorsFile& file) {
  std::map<std::string, const keysel::LoadedTensor*> out;
  for (const keysel::LoadedTensor& t : file.tensors) out[t.name] = &t;
  return out;
}

void check_round_trip(const keysel::SafetensorsFile& file) {
  std::vector<std::byte> bytes;
  try {
    bytes = keysel::serialize_safetensors(file.tensors, file.metadata);
  } catch (const keysel::Error&) {
    return;  // a documented refusal of the writer (names it cannot write)
  }
  const keysel::SafetensorsFile again = keysel::parse_safetensors(bytes, "<round trip>");
  if (again.metadata != file.metadata) finding("safetensors round trip changed the metadata");
  const auto before = by_name(file);
  const auto after = by_name(again);
  if (before.size() != after.size() || after.size() != file.tensors.size()) {
    finding("safetensors round trip changed the tensor count");
  }
  for (const auto& [name, t] : before) {
    const auto it = after.find(name);
    if (it == after.end()) finding("safetensors round trip lost tensor " + name);
    const keysel::LoadedTensor& u = *it->second;
    if (u.dtype != t->dtype || u.shape != t->shape || u.data != t->data) {
      finding("safetensors round trip changed tensor " + name);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keysel::fuzz::single_threaded();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  keysel::fuzz::fuzz_one([&] {
    const keysel::SafetensorsFile file = keysel::parse_safetensors(keysel::fuzz::bytes_of(data, size), "<fuzz>");
    for (const keysel::LoadedTensor& t : file.tensors) {
      if (static_cast<std::uint64_t>(t.numel()) * 4 > (std::uint64_t{64} << 20)) continue;  // fp32 copy stays small
      const std::vector<float> values = t.to_float();
      if (static_cast<std::int64_t>(values.size()) != t.numel()) finding("to_float size differs from numel");
      (void)t.view();
    }
    check_round_trip(file);
  });
  return 0;
}
