// Element types of tensors, named as safetensors names them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace nibble {

enum class DType : std::uint8_t { F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

std::size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype);
// The dtype for a safetensors name such as "F32"; nothing for a name nibble does not know.
std::optional<DType> dtype_from_name(std::string_view name);

}  // namespace nibble
