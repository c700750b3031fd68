// libFuzzer entry point for the safetensors reader: any input must either parse into a
// self-consistent file or throw nibble::FormatError. Not part of the CMake build; by hand:
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
//     tests/fuzz/safetensors_fuzz.cpp src/core/{dtype,tensor,rng,safetensors,io}.cpp -lfmt -o
//     safetensors_fuzz
//   ./safetensors_fuzz -max_len=4096 -max_total_time=600 corpus_dir/
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "nibble/error.hpp"
#include "nibble/safetensors.hpp"

namespace {

// A crash is how a fuzzer reports a finding, so a parse that succeeds with inconsistent results
// aborts rather than returning quietly.
void require(bool condition) {
  if (!condition) std::abort();
}

void check_consistent(const nibble::SafetensorsFile& file, std::span<const std::uint8_t> bytes) {
  std::uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | bytes[i];
  const std::span<const std::uint8_t> data = bytes.subspan(8 + header_length);

  std::vector<nibble::TensorView> views;
  std::size_t offset = 0;
  for (const nibble::NamedTensor& named : file.tensors) {
    const nibble::Tensor& tensor = named.tensor;
    require(tensor.numel() == nibble::shape_numel(tensor.shape()));
    require(tensor.nbytes() ==
            static_cast<std::size_t>(tensor.numel()) * nibble::dtype_size(tensor.dtype()));
    require(offset + tensor.nbytes() <= data.size());
    require(tensor.nbytes() == 0 ||
            std::memcmp(tensor.data(), data.data() + offset, tensor.nbytes()) == 0);
    offset += tensor.nbytes();
    views.push_back({named.name, tensor.dtype(), tensor.shape(), tensor.data()});
  }
  require(offset == data.size());

  const nibble::SafetensorsFile again =
      nibble::parse_safetensors(nibble::encode_safetensors(views, file.metadata));
  require(again.metadata == file.metadata);
  require(again.tensors.size() == file.tensors.size());
  for (std::size_t i = 0; i < file.tensors.size(); ++i) {
    require(again.tensors[i].name == file.tensors[i].name);
    require(again.tensors[i].tensor.shape() == file.tensors[i].tensor.shape());
    require(again.tensors[i].tensor.dtype() == file.tensors[i].tensor.dtype());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::uint8_t> bytes(data, size);
  try {
    check_consistent(nibble::parse_safetensors(bytes), bytes);
  } catch (const nibble::FormatError&) {
  }
  return 0;
}
