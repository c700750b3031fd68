// The safetensors file format: an 8-byte little-endian header length N, N bytes of JSON
// ({name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}), then the tensor bytes.
// Writing is atomic (temporary file, flush, rename); reading validates every field first.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "nibble/tensor.hpp"

namespace nibble {

inline constexpr std::uint64_t kMaxSafetensorsHeader = 100'000'000;

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  std::vector<NamedTensor> tensors;  // in data-offset order

  const Tensor* find(const std::string& name) const;
  // Throws FormatError naming the tensor when it is missing.
  const Tensor& at(const std::string& name) const;
};

// The complete file image: header length, JSON header padded with spaces to a multiple of 8, data.
// CRC-32C (Castagnoli) of `bytes`, continuing from `crc` (0 to start).
std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t bytes);

std::vector<std::uint8_t> encode_safetensors(std::span<const TensorView> tensors,
                                             const std::map<std::string, std::string>& metadata);
// Writes atomically: a reader never sees a half-written file, and a failed write leaves the old
// file untouched. The metadata gains "nibble.crc32c", the data section's CRC-32C, which
// load_safetensors checks (and removes from what it returns); the key is the writer's own.
void save_safetensors(const std::filesystem::path& path, std::span<const TensorView> tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Throws FormatError for any byte sequence that is not a valid file.
SafetensorsFile parse_safetensors(std::span<const std::uint8_t> bytes);
SafetensorsFile load_safetensors(const std::filesystem::path& path);

}  // namespace nibble
