// Tests of the learning-rate schedules: values at hand-computed steps, monotonicity, OneCycle's
// PyTorch-matching end points, rejection of every invalid field and the name round trip.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "nibble/error.hpp"
#include "nibble/schedule.hpp"

namespace nibble {
namespace {

Schedule warmup_decay(ScheduleKind kind) {
  Schedule s;
  s.kind = kind;
  s.total_steps = 100;
  s.warmup_steps = 10;
  s.min_factor = 0.1f;
  return s;
}

Schedule onecycle() {
  Schedule s;
  s.kind = ScheduleKind::kOneCycle;
  s.total_steps = 100;
  s.pct_start = 0.25f;  // exact in float, so the rise ends exactly at step 24
  return s;
}

TEST(Schedule, ConstantIsOneEverywhere) {
  Schedule s;
  EXPECT_NO_THROW(s.validate());
  for (std::int64_t step : {0, 1, 10, 1000000}) EXPECT_EQ(s.factor(step), 1.0f) << step;
}

TEST(Schedule, WarmupCosineValues) {
  const Schedule s = warmup_decay(ScheduleKind::kWarmupCosine);
  ASSERT_NO_THROW(s.validate());
  EXPECT_FLOAT_EQ(s.factor(0), 0.1f);                   // (0 + 1) / 10
  EXPECT_FLOAT_EQ(s.factor(4), 0.5f);                   // (4 + 1) / 10
  EXPECT_FLOAT_EQ(s.factor(9), 1.0f);                   // end of warm-up
  EXPECT_FLOAT_EQ(s.factor(10), 1.0f);                  // q = 0
  EXPECT_FLOAT_EQ(s.factor(30), 0.8947199994035401f);   // q = 2/9
  EXPECT_FLOAT_EQ(s.factor(55), 0.55f);                 // q = 1/2: halfway between 1 and 0.1
  EXPECT_FLOAT_EQ(s.factor(99), 0.10027412784140691f);  // q = 89/90
  EXPECT_FLOAT_EQ(s.factor(100), 0.1f);
  EXPECT_FLOAT_EQ(s.factor(5000), 0.1f);
}

TEST(Schedule, LinearValues) {
  const Schedule s = warmup_decay(ScheduleKind::kLinear);
  ASSERT_NO_THROW(s.validate());
  EXPECT_FLOAT_EQ(s.factor(0), 0.1f);
  EXPECT_FLOAT_EQ(s.factor(9), 1.0f);
  EXPECT_FLOAT_EQ(s.factor(10), 1.0f);
  EXPECT_FLOAT_EQ(s.factor(55), 0.55f);
  EXPECT_FLOAT_EQ(s.factor(99), 0.11f);  // 1 - 0.9 * 89/90
  EXPECT_FLOAT_EQ(s.factor(100), 0.1f);
  EXPECT_FLOAT_EQ(s.factor(5000), 0.1f);
}

TEST(Schedule, NoWarmupStartsAtPeak) {
  for (ScheduleKind kind : {ScheduleKind::kWarmupCosine, ScheduleKind::kLinear}) {
    Schedule s = warmup_decay(kind);
    s.warmup_steps = 0;
    s.min_factor = 0.0f;
    ASSERT_NO_THROW(s.validate());
    EXPECT_FLOAT_EQ(s.factor(0), 1.0f) << schedule_name(kind);
    EXPECT_FLOAT_EQ(s.factor(50), 0.5f) << schedule_name(kind);
    EXPECT_FLOAT_EQ(s.factor(100), 0.0f) << schedule_name(kind);
  }
}

TEST(Schedule, WarmupOverWholeRunNeverDividesByZero) {
  Schedule s = warmup_decay(ScheduleKind::kWarmupCosine);
  s.warmup_steps = s.total_steps;
  ASSERT_NO_THROW(s.validate());
  EXPECT_FLOAT_EQ(s.factor(99), 1.0f);
  EXPECT_FLOAT_EQ(s.factor(100), 1.0f);  // q = 0 / max(1, 0)
  EXPECT_FLOAT_EQ(s.factor(101), 0.1f);
  EXPECT_TRUE(std::isfinite(s.factor(1000)));
}

TEST(Schedule, WarmupThenDecayIsMonotone) {
  for (ScheduleKind kind : {ScheduleKind::kWarmupCosine, ScheduleKind::kLinear}) {
    const Schedule s = warmup_decay(kind);
    for (std::int64_t step = 1; step < s.warmup_steps; ++step) {
      EXPECT_GT(s.factor(step), s.factor(step - 1)) << schedule_name(kind) << " step " << step;
    }
    for (std::int64_t step = s.warmup_steps + 1; step <= 120; ++step) {
      EXPECT_LE(s.factor(step), s.factor(step - 1)) << schedule_name(kind) << " step " << step;
      EXPECT_GE(s.factor(step), s.min_factor) << schedule_name(kind) << " step " << step;
    }
  }
}

TEST(Schedule, OneCycleValues) {
  const Schedule s = onecycle();
  ASSERT_NO_THROW(s.validate());
  EXPECT_FLOAT_EQ(s.factor(0), 0.04f);                // 1 / div_factor
  EXPECT_FLOAT_EQ(s.factor(6), 0.1805887450304573f);  // a quarter of the rise
  EXPECT_FLOAT_EQ(s.factor(12), 0.52f);               // halfway up: (0.04 + 1) / 2
  EXPECT_FLOAT_EQ(s.factor(24), 1.0f);                // pct_start * total - 1
  EXPECT_FLOAT_EQ(s.factor(54), 0.654509879153485f);  // 30 of 75 falling steps
  EXPECT_FLOAT_EQ(s.factor(99), 4e-6f);               // 1 / (div * final_div)
  EXPECT_FLOAT_EQ(s.factor(100), 4e-6f);
  EXPECT_FLOAT_EQ(s.factor(100000), 4e-6f);
}

TEST(Schedule, OneCycleEndPointsFollowTheFactors) {
  Schedule s = onecycle();
  s.total_steps = 1000;
  s.pct_start = 0.3f;
  s.div_factor = 10.0f;
  s.final_div_factor = 100.0f;
  ASSERT_NO_THROW(s.validate());
  EXPECT_FLOAT_EQ(s.factor(0), 0.1f);
  const std::int64_t peak = static_cast<std::int64_t>(std::llround(0.3 * 1000)) - 1;
  EXPECT_NEAR(s.factor(peak), 1.0f, 1e-6f);
  EXPECT_FLOAT_EQ(s.factor(999), 1e-3f);
}

TEST(Schedule, OneCycleRisesThenFalls) {
  const Schedule s = onecycle();
  for (std::int64_t step = 1; step <= 24; ++step) {
    EXPECT_GT(s.factor(step), s.factor(step - 1)) << "step " << step;
  }
  for (std::int64_t step = 25; step <= 110; ++step) {
    EXPECT_LE(s.factor(step), s.factor(step - 1)) << "step " << step;
  }
}

TEST(Schedule, OneCycleWithRiseOfNoStepsStartsAtPeak) {
  Schedule s = onecycle();
  s.total_steps = 4;  // pct_start * total - 1 = 0
  ASSERT_NO_THROW(s.validate());
  EXPECT_FLOAT_EQ(s.factor(0), 1.0f);
  EXPECT_FLOAT_EQ(s.factor(3), 4e-6f);
}

TEST(Schedule, NegativeStepReadsAsFirstStep) {
  const Schedule s = warmup_decay(ScheduleKind::kWarmupCosine);
  EXPECT_FLOAT_EQ(s.factor(-5), s.factor(0));
}

// Expects validate() to throw InvalidArgument whose message names `field` and `value`.
void expect_rejected(const Schedule& s, const std::string& field, const std::string& value) {
  try {
    s.validate();
    ADD_FAILURE() << field << " = " << value << " was accepted";
  } catch (const InvalidArgument& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(field), std::string::npos) << message;
    EXPECT_NE(message.find(value), std::string::npos) << message;
  }
}

TEST(Schedule, RejectsEachInvalidField) {
  constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (ScheduleKind kind :
       {ScheduleKind::kWarmupCosine, ScheduleKind::kLinear, ScheduleKind::kOneCycle}) {
    Schedule s = warmup_decay(kind);
    s.total_steps = 0;
    expect_rejected(s, "total_steps", "0");
    s.total_steps = -3;
    expect_rejected(s, "total_steps", "-3");
  }

  Schedule s = warmup_decay(ScheduleKind::kWarmupCosine);
  s.warmup_steps = -1;
  expect_rejected(s, "warmup_steps", "-1");
  s.warmup_steps = 101;
  expect_rejected(s, "warmup_steps", "101");

  s = warmup_decay(ScheduleKind::kLinear);
  s.min_factor = -0.5f;
  expect_rejected(s, "min_factor", "-0.5");
  s.min_factor = 1.5f;
  expect_rejected(s, "min_factor", "1.5");
  s.min_factor = kNan;
  expect_rejected(s, "min_factor", "nan");

  for (float bad : {0.0f, 1.0f, -0.25f, kNan}) {
    s = onecycle();
    s.pct_start = bad;
    expect_rejected(s, "pct_start", std::isnan(bad) ? "nan" : "");
  }
  s = onecycle();
  s.pct_start = 1.25f;
  expect_rejected(s, "pct_start", "1.25");

  s = onecycle();
  s.div_factor = 0.0f;
  expect_rejected(s, "div_factor", "0");
  s.div_factor = -2.0f;
  expect_rejected(s, "div_factor", "-2");
  s.div_factor = kInf;
  expect_rejected(s, "div_factor", "inf");

  s = onecycle();
  s.final_div_factor = 0.0f;
  expect_rejected(s, "final_div_factor", "0");
  s.final_div_factor = -kInf;
  expect_rejected(s, "final_div_factor", "inf");
}

TEST(Schedule, ConstantNeedsNoLength) {
  Schedule s;
  s.total_steps = 0;
  s.warmup_steps = 0;
  EXPECT_NO_THROW(s.validate());
  s.total_steps = -1;
  expect_rejected(s, "total_steps", "-1");
}

TEST(Schedule, NameRoundTrip) {
  for (ScheduleKind kind : {ScheduleKind::kConstant, ScheduleKind::kWarmupCosine,
                            ScheduleKind::kOneCycle, ScheduleKind::kLinear}) {
    EXPECT_EQ(schedule_from_name(schedule_name(kind)), kind) << schedule_name(kind);
  }
  EXPECT_EQ(schedule_name(ScheduleKind::kWarmupCosine), "cosine");
  EXPECT_EQ(schedule_from_name("OneCycle"), ScheduleKind::kOneCycle);
  try {
    schedule_from_name("exponential");
    ADD_FAILURE() << "unknown name accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("exponential"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nibble
