// The model's tensors become the optimizer's parameters one for one: same order, names, shapes,
// dtypes and memory, in one group that takes the optimizer's own hyperparameters.
#include <gtest/gtest.h>

#include <vector>

#include "model/gpt.hpp"
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

}  // namespace
}  // namespace nibble::train
