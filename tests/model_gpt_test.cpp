// The whole GPT: its backward pass against finite differences of its own forward (in float, on a
// model small enough for the differences to be accurate), parameter layout and counts, the
// activation arena, dropout masks shared by forward and backward, and bad configurations.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "model/gpt.hpp"
#include "nibble/error.hpp"
#include "nibble/rng.hpp"

namespace nibble::model {
namespace {

GptConfig micro_config() {
  GptConfig c;
  c.layers = 2;
  c.heads = 2;
  c.width = 8;
  c.context = 6;
  c.vocab = 5;
  return c;
}

struct Batch {
  std::vector<std::int32_t> tokens, targets;
};

Batch random_batch(std::int64_t B, std::int64_t T, std::int64_t V, std::uint64_t seed) {
  Rng rng(seed);
  Batch b;
  for (std::int64_t i = 0; i < B * T; ++i) {
    b.tokens.push_back(static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(V))));
    b.targets.push_back(static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(V))));
  }
  return b;
}

// Central differences of the float forward over every parameter of the micro model. h = 3e-3:
// the loss (~1.6) rounds to ~2e-7, which puts ~3e-5 of noise on a difference, while the O(h^2)
// truncation stays below 1e-4 even with dropout's 1/(1-p) scaling (h = 1e-2 was not enough there).
TEST(Gpt, BackwardMatchesFiniteDifferencesOfTheForward) {
  struct Case {
    const char* name;
    float dropout;
    bool bias;
    Gelu gelu;
  };
  for (const Case& k : {Case{"GPT-2", 0.0f, true, Gelu::kTanh}, Case{"with dropout", 0.3f, true, Gelu::kTanh},
                        Case{"nanoGPT's: no biases, exact GELU", 0.0f, false, Gelu::kExact}}) {
    SCOPED_TRACE(k.name);
    GptConfig c = micro_config();
    c.dropout = k.dropout;
    c.bias = k.bias;
    c.gelu = k.gelu;
    Gpt gpt(c, 2, 5);
    gpt.init(3);
    // Non-trivial LayerNorm weights and biases, so their gradients are exercised too.
    Rng rng(9);
    for (std::int64_t i = 0; i < gpt.param_count(); ++i) gpt.params()[i] += 0.05f * rng.normal();
    const Batch b = random_batch(2, 5, c.vocab, 11);
    const std::uint64_t seed = 77;
    gpt.zero_grad();
    gpt.forward(b.tokens.data(), b.targets.data(), true, seed);
    gpt.backward();
    const std::vector<float> analytic(gpt.grads(), gpt.grads() + gpt.param_count());
    const float h = 3e-3f;
    double worst = 0.0;
    std::int64_t bad = 0;
    for (std::int64_t i = 0; i < gpt.param_count(); ++i) {
      const float keep = gpt.params()[i];
      gpt.params()[i] = keep + h;
      const double up = gpt.forward(b.tokens.data(), b.targets.data(), true, seed);
      gpt.params()[i] = keep - h;
      const double down = gpt.forward(b.tokens.data(), b.targets.data(), true, seed);
      gpt.params()[i] = keep;
      const double numeric = (up - down) / (2.0 * h);
      const double err = std::fabs(numeric - analytic[static_cast<std::size_t>(i)]);
      // Absolute 2e-4 covers the O(h^2) truncation of the central difference on this model
      // (third derivatives of order 1); relative 2% covers larger gradients.
      if (err > 2e-4 + 2e-2 * std::fabs(numeric) && ++bad <= 10)
        ADD_FAILURE() << "parameter " << i << ": analytic " << analytic[static_cast<std::size_t>(i)] << ", numeric "
                      << numeric;
      worst = std::max(worst, err);
    }
    EXPECT_EQ(bad, 0) << "worst abs error " << worst;
  }
}

TEST(Gpt, GradientsAccumulateAndLossScaleScales) {
  const GptConfig c = micro_config();
  Gpt gpt(c, 2, 4);
  gpt.init(1);
  const Batch b = random_batch(2, 4, c.vocab, 5);
  gpt.zero_grad();
  gpt.forward(b.tokens.data(), b.targets.data());
  gpt.backward();
  const std::vector<float> once(gpt.grads(), gpt.grads() + gpt.param_count());
  gpt.forward(b.tokens.data(), b.targets.data());
  gpt.backward(0.5f);
  for (std::int64_t i = 0; i < gpt.param_count(); ++i)
    ASSERT_NEAR(gpt.grads()[i], 1.5f * once[static_cast<std::size_t>(i)], 1e-6f + 1e-5f * std::fabs(once[static_cast<std::size_t>(i)]))
        << "parameter " << i;
}

TEST(Gpt, LayoutMatchesGpt2SmallCounts) {
  GptConfig c = gpt_preset("small");
  c.vocab = 50257;
  c.context = 1024;
  // GPT-2 124M: 124,439,808 parameters with the head tied to wte.
  EXPECT_EQ(gpt_param_count(c), 124439808);
  const std::vector<ParamTensor> layout = gpt_param_layout(c);
  EXPECT_EQ(layout.size(), 2u + 12u * 12u + 2u);
  EXPECT_EQ(layout.front().name, "wte");
  EXPECT_EQ(layout[2].name, "h.0.ln_1.weight");
  EXPECT_EQ(layout.back().name, "ln_f.bias");
  for (std::size_t i = 1; i < layout.size(); ++i) EXPECT_GT(layout[i].offset, layout[i - 1].offset);
  // Without biases: nanoGPT's GPT-2 124M count for bias=False (its vocabulary 50304 aside), and no
  // `.bias` tensor in the layout.
  c.bias = false;
  const std::vector<ParamTensor> bare = gpt_param_layout(c);
  EXPECT_EQ(bare.size(), 2u + 12u * 6u + 1u);
  EXPECT_EQ(bare.back().name, "ln_f.weight");
  for (const ParamTensor& t : bare) EXPECT_FALSE(t.name.ends_with(".bias")) << t.name;
  const std::int64_t biases = 12 * (768 + 3 * 768 + 768 + 768 + 4 * 768 + 768) + 768;
  EXPECT_EQ(gpt_param_count(c), 124439808 - biases);
}

TEST(Gpt, PresetsAndValidation) {
  for (const char* name : {"tiny", "char", "small", "medium", "large", "xl", "2.7b"}) {
    GptConfig c = gpt_preset(name);
    c.vocab = 65;
    EXPECT_NO_THROW(validate(c)) << name;
  }
  EXPECT_EQ(gpt_preset("xl").width, 1600);
  EXPECT_EQ(gpt_preset("2.7b").layers, 32);
  EXPECT_THROW(gpt_preset("huge"), InvalidArgument);
  GptConfig c = micro_config();
  c.heads = 3;  // 8 is not divisible by 3
  try {
    validate(c);
    ADD_FAILURE() << "width 8 with 3 heads was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("divisible"), std::string::npos) << e.what();
  }
  c = micro_config();
  c.dropout = 1.0f;
  EXPECT_THROW(validate(c), InvalidArgument);
  c = micro_config();
  c.vocab = 0;
  EXPECT_THROW(validate(c), InvalidArgument);
  EXPECT_THROW(Gpt(micro_config(), 2, 7), InvalidArgument);  // seq beyond the context of 6
  EXPECT_THROW(Gpt(micro_config(), 0, 4), InvalidArgument);
  EXPECT_EQ(gelu_from_name("exact"), Gelu::kExact);
  EXPECT_EQ(gelu_from_name(gelu_name(Gelu::kTanh)), Gelu::kTanh);
  try {
    gelu_from_name("relu");
    ADD_FAILURE() << "GELU 'relu' was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'relu'"), std::string::npos) << e.what();
  }
}

TEST(Gpt, OutOfVocabularyTokensAreRefused) {
  const GptConfig c = micro_config();
  Gpt gpt(c, 1, 3);
  gpt.init(1);
  std::vector<std::int32_t> tokens = {0, 5, 1}, targets = {1, 2, 3};
  EXPECT_THROW(gpt.forward(tokens.data(), targets.data()), InvalidArgument);
  tokens[1] = -1;
  EXPECT_THROW(gpt.forward(tokens.data(), targets.data()), InvalidArgument);
}

TEST(Gpt, ActivationArenaIsWhatTheModelAllocates) {
  const GptConfig c = micro_config();
  const Gpt gpt(c, 3, 6);
  EXPECT_EQ(gpt.activation_bytes(), gpt_activation_floats(c, 3, 6) * static_cast<std::int64_t>(sizeof(float)));
  EXPECT_EQ(gpt.param_bytes(), gpt.param_count() * 4);
  EXPECT_EQ(gpt.grad_bytes(), gpt.param_count() * 4);
}

TEST(Gpt, ForwardIsDeterministicAndDropoutDependsOnItsSeed) {
  GptConfig c = micro_config();
  c.dropout = 0.2f;
  Gpt gpt(c, 2, 6);
  gpt.init(4);
  const Batch b = random_batch(2, 6, c.vocab, 8);
  const float eval1 = gpt.forward(b.tokens.data(), b.targets.data(), false);
  const float eval2 = gpt.forward(b.tokens.data(), b.targets.data(), false);
  EXPECT_EQ(eval1, eval2);
  const float a = gpt.forward(b.tokens.data(), b.targets.data(), true, 1);
  const float a_again = gpt.forward(b.tokens.data(), b.targets.data(), true, 1);
  const float other = gpt.forward(b.tokens.data(), b.targets.data(), true, 2);
  EXPECT_EQ(a, a_again);
  EXPECT_NE(a, other);
  EXPECT_NE(a, eval1);
}

}  // namespace
}  // namespace nibble::model
