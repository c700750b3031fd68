// A small, seeded, reproducible random generator (xoshiro256**, seeded through splitmix64).
// Its whole state can be saved and restored, so a resumed run draws the same numbers.
#pragma once

#include <array>
#include <cstdint>

namespace nibble {

class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0);
  std::uint64_t next_u64();
  // Uniform in [0, 1) with 24 random bits.
  float uniform();
  // Standard normal (Box-Muller, one value per call).
  float normal();
  // Uniform integer in [0, n); n must be positive.
  std::uint64_t below(std::uint64_t n);

  std::array<std::uint64_t, 4> state() const { return s_; }
  void set_state(const std::array<std::uint64_t, 4>& s) { s_ = s; }

 private:
  std::array<std::uint64_t, 4> s_{};
};

}  // namespace nibble
