// bfloat16 storage: round-to-nearest-even, or stochastic rounding (the expected value of the
// stored number equals the input, which keeps tiny updates from vanishing in low precision).
#pragma once

#include "math/common.hpp"

namespace nibble::math {

NIBBLE_HD float bf16_to_float(std::uint16_t h) { return bits_float(static_cast<std::uint32_t>(h) << 16); }

NIBBLE_HD std::uint16_t bf16_round_nearest(float f) {
  const std::uint32_t u = float_bits(f);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<std::uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

// `random16` supplies 16 uniformly random bits; adding them below the kept bits and truncating
// rounds up with probability equal to the discarded fraction.
NIBBLE_HD std::uint16_t bf16_round_stochastic(float f, std::uint32_t random16) {
  const std::uint32_t u = float_bits(f);
  const bool special = (u & 0x7f800000u) == 0x7f800000u;
  const std::uint32_t rounded = (u + (random16 & 0xffffu)) >> 16;
  const std::uint32_t keep = (u >> 16) | (((u & 0x7fffffu) != 0 && special) ? 0x40u : 0u);
  return static_cast<std::uint16_t>(special ? keep : rounded);
}

}  // namespace nibble::math
