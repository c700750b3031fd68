// Learning-rate schedules as multipliers of each group's lr, evaluated per step with no state and
// no allocation: constant, linear warm-up + cosine decay to a floor, OneCycle, linear decay.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace nibble {

enum class ScheduleKind : std::uint8_t { kConstant, kWarmupCosine, kOneCycle, kLinear };

struct Schedule {
  ScheduleKind kind = ScheduleKind::kConstant;
  std::int64_t total_steps = 0;   // kWarmupCosine, kOneCycle, kLinear
  std::int64_t warmup_steps = 0;  // kWarmupCosine, kLinear: linear ramp from 0 over these steps
  float min_factor = 0.0f;        // kWarmupCosine, kLinear: floor as a fraction of the peak
  float pct_start = 0.3f;         // kOneCycle: fraction of steps spent rising
  float div_factor = 25.0f;       // kOneCycle: start = peak / div_factor
  float final_div_factor = 1e4f;  // kOneCycle: end = start / final_div_factor

  // Multiplier of the peak lr at optimizer step `step` (0-based: the step about to be taken).
  float factor(std::int64_t step) const;
  // Throws InvalidArgument naming the bad field.
  void validate() const;
};

std::string_view schedule_name(ScheduleKind kind);
// "constant", "cosine", "onecycle", "linear"; throws InvalidArgument for other names.
ScheduleKind schedule_from_name(std::string_view name);

}  // namespace nibble
