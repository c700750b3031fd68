// Learning-rate schedules: pure functions of the step, evaluated in double and returned as float.
// OneCycle follows PyTorch's OneCycleLR (cosine annealing, two phases) so that runs compare.
#include "nibble/schedule.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <numbers>
#include <string>

#include "nibble/error.hpp"

namespace nibble {
namespace {

// Cosine interpolation from `start` (pct 0) to `end` (pct 1), as PyTorch's _annealing_cos.
double anneal_cos(double start, double end, double pct) {
  return end + (start - end) / 2.0 * (std::cos(std::numbers::pi * pct) + 1.0);
}

// Shared by cosine and linear: the warm-up ramp ends at exactly 1 on its last step, so the first
// decay step (q = 0) continues from the peak without a jump.
double warmup_factor(std::int64_t step, std::int64_t warmup) {
  return static_cast<double>(step + 1) / static_cast<double>(warmup);
}

double decay_progress(std::int64_t step, std::int64_t warmup, std::int64_t total) {
  const double span = static_cast<double>(std::max<std::int64_t>(1, total - warmup));
  return std::clamp(static_cast<double>(step - warmup) / span, 0.0, 1.0);
}

double onecycle_factor(const Schedule& s, std::int64_t step) {
  const double initial = 1.0 / static_cast<double>(s.div_factor);
  const double final_factor = initial / static_cast<double>(s.final_div_factor);
  const double total = static_cast<double>(s.total_steps);
  const double phase_end = static_cast<double>(s.pct_start) * total - 1.0;
  const double last = total - 1.0;
  const double t = static_cast<double>(step);
  if (t <= phase_end) {
    // phase_end == 0 would make PyTorch divide 0 by 0; with a rise of no steps the peak is the
    // only value the first phase can have.
    if (phase_end <= 0.0) return 1.0;
    return anneal_cos(initial, 1.0, t / phase_end);
  }
  // pct_start < 1 makes last > phase_end, so the division is safe; steps past the end stay at the
  // final value instead of the cosine turning back up.
  const double pct = std::clamp((t - phase_end) / (last - phase_end), 0.0, 1.0);
  return anneal_cos(1.0, final_factor, pct);
}

std::string lowercase(std::string_view text) {
  std::string out(text);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string number(float value) {
  // Shortest text that reads back the same float, so the message shows the value the user gave.
  char buffer[32];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  return std::string(buffer, result.ptr);
}

}  // namespace

float Schedule::factor(std::int64_t step) const {
  step = std::max<std::int64_t>(step, 0);
  double value = 1.0;
  switch (kind) {
    case ScheduleKind::kConstant:
      value = 1.0;
      break;
    case ScheduleKind::kWarmupCosine: {
      if (step < warmup_steps) {
        value = warmup_factor(step, warmup_steps);
        break;
      }
      const double q = decay_progress(step, warmup_steps, total_steps);
      const double floor = static_cast<double>(min_factor);
      value = floor + (1.0 - floor) * 0.5 * (1.0 + std::cos(std::numbers::pi * q));
      break;
    }
    case ScheduleKind::kLinear: {
      if (step < warmup_steps) {
        value = warmup_factor(step, warmup_steps);
        break;
      }
      const double q = decay_progress(step, warmup_steps, total_steps);
      value = 1.0 - (1.0 - static_cast<double>(min_factor)) * q;
      break;
    }
    case ScheduleKind::kOneCycle:
      value = onecycle_factor(*this, step);
      break;
  }
  return static_cast<float>(value);
}

void Schedule::validate() const {
  const std::string prefix = "schedule " + std::string(schedule_name(kind)) + ": ";
  auto check_finite = [&](const char* field, float value) {
    if (!std::isfinite(value)) {
      throw InvalidArgument(prefix + field + " must be finite, got " + number(value));
    }
  };
  check_finite("min_factor", min_factor);
  check_finite("pct_start", pct_start);
  check_finite("div_factor", div_factor);
  check_finite("final_div_factor", final_div_factor);

  if (total_steps < 0 || (kind != ScheduleKind::kConstant && total_steps == 0)) {
    throw InvalidArgument(prefix + "total_steps must be positive, got " +
                          std::to_string(total_steps));
  }
  if (warmup_steps < 0) {
    throw InvalidArgument(prefix + "warmup_steps must not be negative, got " +
                          std::to_string(warmup_steps));
  }
  // A constant schedule has no length, so only the schedules that run over total_steps bound the
  // warm-up by it.
  if (kind != ScheduleKind::kConstant && warmup_steps > total_steps) {
    throw InvalidArgument(prefix + "warmup_steps " + std::to_string(warmup_steps) +
                          " exceeds total_steps " + std::to_string(total_steps));
  }
  if (min_factor < 0.0f || min_factor > 1.0f) {
    throw InvalidArgument(prefix + "min_factor must be in [0, 1], got " + number(min_factor));
  }
  if (pct_start <= 0.0f || pct_start >= 1.0f) {
    throw InvalidArgument(prefix + "pct_start must be in (0, 1), got " + number(pct_start));
  }
  if (div_factor <= 0.0f) {
    throw InvalidArgument(prefix + "div_factor must be positive, got " + number(div_factor));
  }
  if (final_div_factor <= 0.0f) {
    throw InvalidArgument(prefix + "final_div_factor must be positive, got " +
                          number(final_div_factor));
  }
}

std::string_view schedule_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kConstant:
      return "constant";
    case ScheduleKind::kWarmupCosine:
      return "cosine";
    case ScheduleKind::kOneCycle:
      return "onecycle";
    case ScheduleKind::kLinear:
      return "linear";
  }
  return "unknown";
}

ScheduleKind schedule_from_name(std::string_view name) {
  const std::string lower = lowercase(name);
  for (ScheduleKind kind : {ScheduleKind::kConstant, ScheduleKind::kWarmupCosine,
                            ScheduleKind::kOneCycle, ScheduleKind::kLinear}) {
    if (lower == schedule_name(kind)) return kind;
  }
  throw InvalidArgument("unknown schedule '" + std::string(name) +
                        "' (known: constant, cosine, onecycle, linear)");
}

}  // namespace nibble
