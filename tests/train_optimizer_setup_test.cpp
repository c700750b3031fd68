// The model's tensors become the optimizer's parameters one for one: same order, names, shapes,
// dtypes and memory, in one group that takes the optimizer's own hyperparameters.
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "model/gpt.hpp"
#include "nibble/error.hpp"
#include "train/optimizer_setup.hpp"

namespace nibble::train {
namespace {

TEST(OptimizerSetup, OneParamPerModelTensorInLayoutOrder) {
  model::GptConfig config = model::gpt_preset("tiny");
  config.vocab = 11;
  model::Gpt gpt(config, 2, 8);
  const std::vector<model::ModelTensor> tensors = gpt.tensors();
  ASSERT_EQ(tensors.size(), gpt.layout().size());
  const std::vector<ParamGroup> groups = optimizer_param_groups(tensors);
  ASSERT_EQ(groups.size(), 1u);
  const ParamGroup& group = groups.front();
  EXPECT_FALSE(group.lr || group.weight_decay || group.precision);
  ASSERT_EQ(group.params.size(), tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const model::ParamTensor& t = gpt.layout()[i];
    const Param& p = group.params[i];
    EXPECT_EQ(tensors[i].name, t.name);
    EXPECT_EQ(p.name, t.name);
    EXPECT_EQ(p.shape, t.shape);
    EXPECT_EQ(p.data, gpt.params() + t.offset);
    EXPECT_EQ(p.grad, gpt.grads() + t.offset);
    EXPECT_EQ(p.dtype, DType::F32);
    EXPECT_EQ(p.grad_dtype, DType::F32);
  }
}

// Named hyperparameters (train --hyper) reach the optimizer by their table names; a name nibble
// does not know, one the algorithm does not read, or a flag other than 0/1 is refused by name.
TEST(OptimizerSetup, NamedHyperparametersReachTheOptimizerOrAreRefused) {
  TrainOptions o;
  o.algorithm = Algorithm::kAdEMAMix;
  o.beta1 = 0.8f;
  o.hyper = {{"alpha", 5.0}, {"beta3_warmup", 1000.0}, {"bias_correction", 0.0}, {"beta1", 0.85}};
  const OptimizerOptions oo = optimizer_options(o, 8);
  ASSERT_TRUE(oo.hyper.has_value());
  EXPECT_EQ(oo.hyper->alpha, 5.0f);
  EXPECT_EQ(oo.hyper->beta3_warmup, 1000.0f);
  EXPECT_FALSE(oo.hyper->bias_correction);
  EXPECT_EQ(oo.hyper->beta1, 0.85f) << "--hyper comes after the named flags";
  EXPECT_EQ(oo.hyper->beta3, default_hyper(Algorithm::kAdEMAMix).beta3);

  auto refused = [&](std::vector<std::pair<std::string, double>> hyper, const std::string& words) {
    TrainOptions bad = o;
    bad.hyper = std::move(hyper);
    try {
      optimizer_options(bad, 8);
      ADD_FAILURE() << "accepted: " << words;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  refused({{"gamma", 1.0}}, "'gamma' is not one of nibble's");
  refused({{"nu", 0.5}}, "ademamix does not read the hyperparameter 'nu'");
  refused({{"bias_correction", 0.5}}, "'bias_correction' is a flag: 0 or 1, got 0.5");
}

// Schedule-free AdamW on a constant schedule takes the trainer's warm-up (at most the run's length)
// as its own warmup_steps; --hyper warmup_steps overrides it; under another schedule, which warms
// up itself, it keeps its default 0.
TEST(OptimizerSetup, ScheduleFreeTakesTheWarmupOfAConstantSchedule) {
  TrainOptions o;
  o.algorithm = Algorithm::kAdamWScheduleFree;
  o.schedule = ScheduleKind::kConstant;
  o.warmup = 30;
  o.steps = 200;
  EXPECT_EQ(optimizer_options(o, 8).hyper->warmup_steps, 30.0f);
  o.steps = 10;
  EXPECT_EQ(optimizer_options(o, 8).hyper->warmup_steps, 10.0f);
  o.hyper = {{"warmup_steps", 7.0}};
  EXPECT_EQ(optimizer_options(o, 8).hyper->warmup_steps, 7.0f);
  o.hyper.clear();
  o.schedule = ScheduleKind::kWarmupCosine;
  EXPECT_EQ(optimizer_options(o, 8).hyper->warmup_steps, 0.0f);
}

}  // namespace
}  // namespace nibble::train
