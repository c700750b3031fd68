// Shared vocabulary of the host+device math: the NIBBLE_HD marker and bit casts that work in
// both compilers. Everything in src/math/ is header-only and runs unchanged on CPU and GPU.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NIBBLE_HD __host__ __device__ __forceinline__
#else
#define NIBBLE_HD inline __attribute__((always_inline))
#endif

namespace nibble::math {

NIBBLE_HD std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

NIBBLE_HD float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

NIBBLE_HD float abs_f(float x) { return bits_float(float_bits(x) & 0x7fffffffu); }
NIBBLE_HD float min_f(float a, float b) { return b < a ? b : a; }
NIBBLE_HD float max_f(float a, float b) { return b > a ? b : a; }
// -1, 0 or +1 (0 for both zeros), as torch.sign.
// sign(x) in {-1, 0, +1}, 0 for NaN; written with integer comparisons so that loops vectorise.
NIBBLE_HD float sign_f(float x) { return static_cast<float>(static_cast<int>(x > 0.0f) - static_cast<int>(x < 0.0f)); }
NIBBLE_HD bool is_finite_bits(std::uint32_t u) { return (u & 0x7f800000u) != 0x7f800000u; }

// Counter-based random bits: a stateless hash of (seed, counter), so any element of any step
// draws the same bits on any backend and thread count.
NIBBLE_HD std::uint32_t hash_u32(std::uint64_t seed, std::uint64_t counter) {
  std::uint64_t z = seed ^ (counter * 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<std::uint32_t>(z >> 32);
}

}  // namespace nibble::math
