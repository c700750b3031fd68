// xoshiro256** (Blackman and Vigna, "Scrambled linear pseudorandom number generators", 2018),
// seeded through splitmix64 so that nearby seeds give unrelated streams.
#include "nibble/rng.hpp"

#include <cmath>
#include <numbers>

#include "nibble/error.hpp"

namespace nibble {
namespace {

std::uint64_t splitmix64(std::uint64_t& x) {
  std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

Rng::Rng(std::uint64_t seed) {
  std::uint64_t x = seed;
  for (std::uint64_t& word : s_) word = splitmix64(x);
}

std::uint64_t Rng::next_u64() {
  const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const std::uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

float Rng::uniform() {
  // The top bits are the best mixed ones; 24 bits is exactly what a float mantissa represents,
  // so every value is exact and 1.0f is never produced.
  return static_cast<float>(next_u64() >> 40) * 0x1.0p-24f;
}

float Rng::normal() {
  // Double precision with 53-bit uniforms keeps the tails accurate; u1 lies in (0, 1] so the
  // logarithm is finite.
  const double u1 = static_cast<double>((next_u64() >> 11) + 1) * 0x1.0p-53;
  const double u2 = static_cast<double>(next_u64() >> 11) * 0x1.0p-53;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
}

std::uint64_t Rng::below(std::uint64_t n) {
  if (n == 0) throw InvalidArgument("Rng::below needs a positive bound, got 0");
  // Reject the lowest (2^64 mod n) values so that every residue is equally likely.
  const std::uint64_t threshold = (0 - n) % n;
  for (;;) {
    const std::uint64_t r = next_u64();
    if (r >= threshold) return r % n;
  }
}

}  // namespace nibble
