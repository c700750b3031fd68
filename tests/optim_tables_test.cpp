// The algorithm and precision tables and the state planning built on them: every table entry is
// consistent with the enums and with Hyper, names round-trip, validation follows the ranges, and
// the planned state bytes equal what an optimizer allocates.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "nibble/algorithms.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"
#include "nibble/tensor.hpp"

namespace nibble {
namespace {

TEST(AlgorithmTable, NamesRoundTripAndAliasesResolve) {
  ASSERT_EQ(algorithm_specs().size(), all_algorithms().size());
  for (const AlgorithmSpec& spec : algorithm_specs()) {
    EXPECT_EQ(algorithm_name(spec.id), spec.name);
    EXPECT_EQ(algorithm_from_name(spec.name), spec.id);
    std::string upper(spec.name);
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    EXPECT_EQ(algorithm_from_name(upper), spec.id) << "names are case-insensitive";
    if (!spec.alias.empty()) {
      EXPECT_EQ(algorithm_from_name(spec.alias), spec.id);
    }
    EXPECT_EQ(&algorithm_spec(spec.id), &spec);
  }
  EXPECT_EQ(algorithm_from_name("sophia"), Algorithm::kSophiaG);
  EXPECT_FALSE(algorithm_from_name("adamx").has_value());
  EXPECT_THROW(algorithm_spec(static_cast<Algorithm>(200)), InvalidArgument);
  for (Precision p : all_precisions()) EXPECT_EQ(precision_from_name(precision_name(p)), p);
  EXPECT_EQ(precision_from_name("INT8"), Precision::kInt8);
  EXPECT_FALSE(precision_from_name("3bit").has_value());
}

TEST(AlgorithmTable, EveryNameItReadsIsAHyperFieldOfTheRightKind) {
  for (const AlgorithmSpec& spec : algorithm_specs()) {
    for (const HyperUse& use : spec.numbers) {
      const HyperField* f = find_hyper_field(use.name);
      ASSERT_NE(f, nullptr) << spec.name << " reads " << use.name;
      EXPECT_NE(f->number, nullptr) << spec.name << ": " << use.name << " is not a number";
    }
    for (std::string_view flag : spec.flags) {
      const HyperField* f = find_hyper_field(flag);
      ASSERT_NE(f, nullptr) << spec.name << " reads " << flag;
      EXPECT_NE(f->flag, nullptr) << spec.name << ": " << flag << " is not a flag";
    }
    EXPECT_NO_THROW(validate_hyper(spec.id, spec.defaults)) << spec.name << "'s defaults are not valid";
    StateSlot slots[kMaxStateSlots];
    EXPECT_LE(spec.slots(spec.defaults, false, slots), kMaxStateSlots);
    EXPECT_FALSE(spec.state_note(spec.defaults).empty());
  }
  for (const HyperField& f : hyper_fields()) EXPECT_NE(f.number == nullptr, f.flag == nullptr) << f.name;
}

// Every validated number is refused outside its range with a message naming the algorithm, the
// hyperparameter and the value, and accepted at the edge its range includes.
TEST(AlgorithmTable, ValidationFollowsEachRange) {
  struct Case {
    HyperRange range;
    float bad, good;
  };
  const Case cases[] = {{HyperRange::kNonNegative, -0.5f, 0.0f}, {HyperRange::kPositive, 0.0f, 1e-30f},
                        {HyperRange::kBeta, 1.0f, 0.0f},         {HyperRange::kUnit, 1.5f, 1.0f},
                        {HyperRange::kDecayRate, 0.0f, -1.0f},   {HyperRange::kOpenUnit, 0.0f, 0.5f},
                        {HyperRange::kStepCount, 0.0f, 1.0f},    {HyperRange::kStepCount, 100.0f, 99.0f},
                        {HyperRange::kStepCount, 2.5f, 2.0f},    {HyperRange::kChoice, 3.0f, 2.0f},
                        {HyperRange::kChoice, 0.5f, 0.0f},       {HyperRange::kChoice, -1.0f, 1.0f},
                        {HyperRange::kPower, 200.0f, 16.0f},     {HyperRange::kPower, -0.5f, 0.0f},
                        {HyperRange::kSignedPower, 200.0f, 16.0f}, {HyperRange::kSignedPower, -16.5f, -16.0f}};
  for (const AlgorithmSpec& spec : algorithm_specs())
    for (const HyperUse& use : spec.numbers)
      for (const Case& c : cases) {
        if (c.range != use.range) continue;
        Hyper h = spec.defaults;
        h.*(find_hyper_field(use.name)->number) = c.bad;
        try {
          validate_hyper(spec.id, h);
          ADD_FAILURE() << spec.name << " accepted " << use.name << " = " << c.bad;
        } catch (const InvalidArgument& e) {
          const std::string message = e.what();
          EXPECT_NE(message.find(std::string(spec.name) + ": " + std::string(use.name)), std::string::npos) << message;
          EXPECT_NE(message.find(fmt::format("got {}", c.bad)), std::string::npos) << message;
        }
        h.*(find_hyper_field(use.name)->number) = std::numeric_limits<float>::quiet_NaN();
        EXPECT_THROW(validate_hyper(spec.id, h), InvalidArgument) << spec.name << " " << use.name << " NaN";
        h.*(find_hyper_field(use.name)->number) = c.good;
        EXPECT_NO_THROW(validate_hyper(spec.id, h)) << spec.name << " " << use.name << " = " << c.good;
      }
  Hyper h = default_hyper(Algorithm::kLion);
  h.amsgrad = true;
  EXPECT_THROW(
      {
        try {
          validate_hyper(Algorithm::kLion, h);
        } catch (const InvalidArgument& e) {
          EXPECT_STREQ(e.what(), "lion: amsgrad is only for adam and adamw");
          throw;
        }
      },
      InvalidArgument);
}

std::vector<ParamGroup> odd_groups() {
  auto param = [](std::string name, std::vector<std::int64_t> shape) {
    Param p;
    p.name = std::move(name);
    p.shape = std::move(shape);
    return p;
  };
  ParamGroup a;
  a.params = {param("embed.weight", {97, 64}), param("block.bias", {64}), param("block.w", {3, 40, 33}),
              param("norm.weight", {5000}), param("head.weight", {64, 80})};
  ParamGroup b;
  b.precision = Precision::kBf16;
  b.params = {param("extra.weight", {70, 70}), param("empty", {0, 4})};
  return {a, b};
}

// The plan equals what the optimizer allocates, over algorithms, precisions, block sizes, the
// small-tensor and by-name rules, rank-1 scales and a group that overrides the precision.
TEST(StatePlan, EqualsTheBytesAnOptimizerAllocates) {
  std::vector<ParamGroup> groups = odd_groups();
  std::vector<std::vector<float>> storage;
  for (ParamGroup& g : groups)
    for (Param& p : g.params) {
      storage.emplace_back(static_cast<std::size_t>(std::max<std::int64_t>(shape_numel(p.shape), 1)), 0.0f);
      p.data = storage.back().data();
    }
  int checked = 0;
  for (Algorithm algorithm : all_algorithms())
    for (Precision precision : all_precisions())
      for (int block : {0, 64})
        for (bool rank1 : {false, true}) {
          OptimizerOptions o;
          o.algorithm = algorithm;
          o.precision = precision;
          o.block_size = block;
          o.rank1_second_moment = rank1;
          o.min_quant_size = 3000;
          o.full_precision_names = {"head"};
          const Optimizer opt(groups, o);
          EXPECT_EQ(planned_state_bytes(odd_groups(), o), opt.state_stats().state_bytes)
              << algorithm << " " << precision << " block " << block << " rank1 " << rank1;
          ++checked;
        }
  EXPECT_EQ(checked, static_cast<int>(all_algorithms().size() * all_precisions().size() * 4));
  OptimizerOptions bad;
  bad.block_size = 100;
  EXPECT_THROW(planned_state_bytes(odd_groups(), bad), InvalidArgument);
}

TEST(StatePlan, ChecksOptionsWithoutParameters) {
  OptimizerOptions o;
  o.algorithm = Algorithm::kAdamW;
  o.hyper = default_hyper(Algorithm::kAdamW);
  o.hyper->decoupled_weight_decay = false;
  EXPECT_TRUE(resolve_options(o).hyper->decoupled_weight_decay) << "adamw always decouples its weight decay";
  o.max_grad_norm = -1.0f;
  EXPECT_THROW(resolve_options(o), InvalidArgument);
  OptimizerOptions defaults;
  defaults.algorithm = Algorithm::kLion;
  EXPECT_EQ(resolve_options(defaults).hyper->lr, default_hyper(Algorithm::kLion).lr);
}

}  // namespace
}  // namespace nibble
