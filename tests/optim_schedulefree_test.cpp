// Schedule-free AdamW's two points of each parameter: eval() gives the reference's x, train() gives
// y back within rounding, steps are refused in eval mode, the mode and the running sums (lr_max,
// weight_sum) are saved and resume bit for bit in either mode, and a skipped step advances nothing.
// The per-step math against the fp64 reference is in optim_reference_test.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "nibble/error.hpp"
#include "nibble/optim.hpp"
#include "nibble/safetensors.hpp"
#include "reference_optimizers.hpp"
#include "test_util.hpp"

namespace nibble {
namespace {

using Shape = std::vector<std::int64_t>;
using test::TempDir;
using test::thrown_message;

const std::vector<Shape> kShapes = {{7}, {257}, {64, 65}};

Hyper sf_hyper() {
  Hyper h = default_hyper(Algorithm::kAdamWScheduleFree);
  h.lr = 1e-2f;
  h.weight_decay = 0.05f;
  h.warmup_steps = 4.0f;
  return h;
}

// One optimizer over its own parameters and gradients, with the fp64 reference beside it.
struct SfRun {
  std::vector<std::vector<float>> p, g;
  std::unique_ptr<Optimizer> opt;
  std::unique_ptr<testref::RefOptimizer> ref;
  std::mt19937 rng{7};

  explicit SfRun(Precision precision = Precision::kFp32, const std::vector<std::vector<float>>* init = nullptr) {
    ParamGroup group;
    std::vector<testref::RefTensor> tensors;
    std::mt19937 init_rng(3);
    for (std::size_t i = 0; i < kShapes.size(); ++i) {
      std::int64_t n = 1;
      for (std::int64_t d : kShapes[i]) n *= d;
      p.push_back(init ? (*init)[i] : test::uniform_values(init_rng, static_cast<std::size_t>(n), -1.0f, 1.0f));
      g.emplace_back(static_cast<std::size_t>(n), 0.0f);
      testref::RefTensor t;
      t.name = test::tensor_name(i);
      t.shape = kShapes[i];
      t.p.assign(p[i].begin(), p[i].end());
      t.lr = sf_hyper().lr;
      t.weight_decay = sf_hyper().weight_decay;
      tensors.push_back(std::move(t));
    }
    for (std::size_t i = 0; i < kShapes.size(); ++i)
      group.params.push_back({test::tensor_name(i), kShapes[i], p[i].data(), g[i].data()});
    OptimizerOptions o;
    o.algorithm = Algorithm::kAdamWScheduleFree;
    o.hyper = sf_hyper();
    o.precision = precision;
    o.min_quant_size = 0;
    opt = std::make_unique<Optimizer>(std::vector<ParamGroup>{group}, o);
    ref = std::make_unique<testref::RefOptimizer>(Algorithm::kAdamWScheduleFree, sf_hyper(), std::move(tensors));
  }

  // Gradients that pull the parameters toward 0.3, plus noise (the same sequence in every run).
  StepResult step(int it) {
    std::mt19937 noise(1000u + static_cast<unsigned>(it));
    std::vector<const float*> ptrs;
    for (std::size_t i = 0; i < p.size(); ++i) {
      const std::vector<float> n = test::uniform_values(noise, p[i].size(), -0.5f, 0.5f);
      for (std::size_t e = 0; e < p[i].size(); ++e) g[i][e] = (p[i][e] - 0.3f) + n[e];
      ptrs.push_back(g[i].data());
    }
    const StepResult r = opt->step();
    ref->step(ptrs);
    return r;
  }
};

// |got - want| <= 1e-5 |want| + 1e-5 rms(want) for every element (the fp32 bound of
// optim_reference_test.cpp: the largest error measured there is ~0.05 of it).
::testing::AssertionResult close_to_reference(const std::vector<float>& got, const std::vector<double>& want) {
  double ss = 0.0;
  for (double w : want) ss += w * w;
  const double atol = 1e-5 * std::sqrt(ss / static_cast<double>(want.size()));
  for (std::size_t e = 0; e < got.size(); ++e)
    if (!(std::abs(got[e] - want[e]) <= 1e-5 * std::abs(want[e]) + atol))
      return ::testing::AssertionFailure() << "element " << e << ": " << got[e] << " vs reference " << want[e];
  return ::testing::AssertionSuccess();
}

bool same_bits(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)) != 0) return false;
  return true;
}

TEST(ScheduleFree, EvalGivesTheReferencesXAndTrainGivesYBackWithinRounding) {
  SfRun run;
  EXPECT_TRUE(run.opt->training());
  // No tensor has stepped: there is no z yet, and neither call moves a parameter.
  const auto before = run.p;
  run.opt->eval();
  EXPECT_FALSE(run.opt->training());
  run.opt->train();
  EXPECT_TRUE(same_bits(before, run.p));
  for (int it = 0; it < 24; ++it) {
    run.step(it);
    if (it != 5 && it != 12 && it != 23) continue;
    SCOPED_TRACE("after step " + std::to_string(it + 1));
    const auto y = run.p;
    const std::vector<float> z = run.opt->state_values(2, "z");
    run.opt->eval();
    run.opt->eval();  // already in eval mode: no second move
    run.ref->eval();
    for (std::size_t i = 0; i < run.p.size(); ++i)
      EXPECT_TRUE(close_to_reference(run.p[i], run.ref->tensors()[i].p)) << "x of tensor " << i;
    // x is not y: the test would pass vacuously otherwise.
    EXPECT_FALSE(same_bits(y, run.p));
    run.opt->train();
    run.ref->train();
    // y -> x -> y rounds twice per element: x = y + w (z - y), then y' = x + (1 - beta1) (z - x);
    // each lerp rounds by <= 1.5 ulp of its terms, so 4 ulp of |y| + |z| bounds the round trip.
    const std::vector<float>& y2 = run.p[2];
    for (std::size_t e = 0; e < y2.size(); ++e) {
      const double bound = 4.0 * std::numeric_limits<float>::epsilon() * (std::abs(y[2][e]) + std::abs(z[e]));
      ASSERT_LE(std::abs(static_cast<double>(y2[e]) - y[2][e]), bound) << "element " << e;
    }
  }
  for (std::size_t i = 0; i < run.p.size(); ++i)
    EXPECT_TRUE(close_to_reference(run.p[i], run.ref->tensors()[i].p)) << "y of tensor " << i << " at the end";
}

TEST(ScheduleFree, StepInEvalModeIsRefusedAndChangesNothing) {
  SfRun run;
  run.step(0);
  run.opt->eval();
  const auto x = run.p;
  const std::string m = thrown_message<InvalidArgument>([&] { run.opt->step(); });
  EXPECT_NE(m.find("eval mode"), std::string::npos) << m;
  EXPECT_NE(m.find("train()"), std::string::npos) << m;
  EXPECT_TRUE(same_bits(x, run.p));
  EXPECT_EQ(run.opt->step_count(), 1);
}

// Other algorithms ignore train() and eval(), and refuse the running sums they do not keep.
TEST(ScheduleFree, OtherAlgorithmsIgnoreTrainAndEval) {
  std::vector<float> p(33, 0.5f), g(33, 0.1f);
  OptimizerOptions o;
  o.algorithm = Algorithm::kAdamW;
  ParamGroup group;
  group.params = {{"w", {33}, p.data(), g.data()}};
  Optimizer opt({group}, o);
  opt.step();
  const std::vector<float> before = p;
  opt.eval();
  EXPECT_TRUE(opt.training());
  EXPECT_EQ(std::memcmp(before.data(), p.data(), p.size() * sizeof(float)), 0);
  opt.step();  // still allowed
  EXPECT_EQ(opt.step_count(), 2);
  EXPECT_NE(thrown_message<InvalidArgument>([&] { opt.set_running_sums({{1.0}}, {{1.0}}); }).find("schedule-free"),
            std::string::npos);
}

// Saved in train or eval mode, at fp32 and 8-bit: the loaded optimizer has the mode, and after
// train() both continue identically (the running sums and z came back exactly).
TEST(ScheduleFree, SaveLoadInEitherModeResumesBitForBit) {
  TempDir dir;
  for (Precision precision : {Precision::kFp32, Precision::kInt8})
    for (bool eval_mode : {false, true}) {
      SCOPED_TRACE(std::string(precision_name(precision)) + (eval_mode ? " eval" : " train"));
      SfRun u(precision);
      for (int it = 0; it < 7; ++it) u.step(it);
      if (eval_mode) u.opt->eval();
      u.opt->save(dir / "sf.safetensors");
      SfRun r(precision, &u.p);
      r.opt->load(dir / "sf.safetensors");
      EXPECT_EQ(r.opt->training(), !eval_mode);
      if (eval_mode) {
        EXPECT_NE(thrown_message<InvalidArgument>([&] { r.opt->step(); }).find("eval mode"), std::string::npos);
        u.opt->train();
        r.opt->train();
      }
      ASSERT_TRUE(same_bits(u.p, r.p));
      SfRun fresh(precision, &u.p);  // control: the parameters without the saved state
      for (int it = 7; it < 14; ++it) {
        u.step(it);
        r.step(it);
        fresh.step(it);
      }
      EXPECT_TRUE(same_bits(u.p, r.p));
      EXPECT_FALSE(same_bits(u.p, fresh.p)) << "the saved state did not matter";
      u.opt->save(dir / "u.safetensors");
      r.opt->save(dir / "r.safetensors");
      EXPECT_TRUE(test::read_bytes(dir / "u.safetensors") == test::read_bytes(dir / "r.safetensors"));
    }
}

// What a sharded checkpoint restores by hand: state values, step counts and the running sums set
// into a fresh optimizer make it continue as the original, bit for bit; bad sums are refused and
// change nothing.
TEST(ScheduleFree, RunningSumsSetByHandResumeBitForBit) {
  SfRun u;
  for (int it = 0; it < 6; ++it) u.step(it);
  SfRun r(Precision::kFp32, &u.p);
  std::vector<std::int64_t> steps;
  std::vector<double> lr_max, weight_sum;
  TempDir dir;
  u.opt->save(dir / "u.safetensors");
  for (std::size_t i = 0; i < u.p.size(); ++i) {
    for (const std::string& name : u.opt->state_names(i)) r.opt->set_state_values(i, name, u.opt->state_values(i, name));
    steps.push_back(6);
  }
  r.opt->set_step_counts(steps, 6, 0);
  r.opt->save(dir / "before.safetensors");
  for (const auto& [bad, what] : {std::pair{-1.0, "lr_max of parameter 0 is -1"},
                                  std::pair{std::numeric_limits<double>::quiet_NaN(), "lr_max of parameter 0 is nan"}}) {
    const std::vector<double> wrong(u.p.size(), bad), ok(u.p.size(), 1.0);
    EXPECT_NE(thrown_message<InvalidArgument>([&] { r.opt->set_running_sums(wrong, ok); }).find(what), std::string::npos);
  }
  r.opt->save(dir / "refused.safetensors");
  EXPECT_TRUE(test::read_bytes(dir / "before.safetensors") == test::read_bytes(dir / "refused.safetensors"));
  // Still without the sums, the file differs from the original's; with them, it is the same.
  EXPECT_FALSE(test::read_bytes(dir / "u.safetensors") == test::read_bytes(dir / "before.safetensors"));
  const SafetensorsFile saved = load_safetensors(dir / "u.safetensors");
  for (std::size_t i = 0; i < u.p.size(); ++i) {
    lr_max.push_back(saved.at("state." + std::to_string(i) + ".lr_max").data_as<double>()[0]);
    weight_sum.push_back(saved.at("state." + std::to_string(i) + ".weight_sum").data_as<double>()[0]);
  }
  r.opt->set_running_sums(lr_max, weight_sum);
  r.opt->save(dir / "r.safetensors");
  EXPECT_TRUE(test::read_bytes(dir / "u.safetensors") == test::read_bytes(dir / "r.safetensors"));
  for (int it = 6; it < 12; ++it) {
    u.step(it);
    r.step(it);
  }
  EXPECT_TRUE(same_bits(u.p, r.p));
}

// A step skipped for a NaN gradient changes nothing, lr_max, weight_sum and the warm-up included:
// the run then equals one that never saw it (and the fp64 reference).
TEST(ScheduleFree, SkippedStepAdvancesNothing) {
  SfRun a, b;
  for (int it = 0; it < 10; ++it) {
    if (it == 2) {
      a.g[1][3] = std::numeric_limits<float>::quiet_NaN();
      ASSERT_TRUE(a.opt->step().skipped);
    }
    a.step(it);
    b.step(it);
  }
  EXPECT_TRUE(same_bits(a.p, b.p));
  for (std::size_t i = 0; i < a.p.size(); ++i) EXPECT_TRUE(close_to_reference(a.p[i], a.ref->tensors()[i].p));
}

// z stays fp32 whatever the requested precision; v takes it.
TEST(ScheduleFree, ZIsFp32AtEveryPrecision) {
  for (Precision precision : all_precisions()) {
    SCOPED_TRACE(std::string(precision_name(precision)));
    SfRun run(precision);
    run.step(0);
    const double z_bytes = 4.0;
    const double v_bytes = state_bytes_per_element(Algorithm::kAdamWScheduleFree, sf_hyper(), precision, 0, Shape{1 << 20},
                                                   false) - z_bytes;
    const double adamw = state_bytes_per_element(Algorithm::kAdamW, default_hyper(Algorithm::kAdamW), precision, 0,
                                                 Shape{1 << 20}, false);
    EXPECT_DOUBLE_EQ(v_bytes, adamw / 2.0);  // one of AdamW's two slots at this precision
    // After one step (which reads v before storing it) z = p - lr d holds the reference's z to fp32
    // accuracy; an 8-bit z would be off by up to half a code step (~1% of its block's absmax).
    EXPECT_TRUE(close_to_reference(run.opt->state_values(2, "z"), run.ref->tensors()[2].get("z")));
  }
}

}  // namespace
}  // namespace nibble
