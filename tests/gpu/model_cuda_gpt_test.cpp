// The CUDA GPT against the CPU engine: loss, logits and every parameter gradient of one step in
// fp32; bf16 within bf16's precision; 50 training steps with AdamW on both devices giving the same
// losses; run-to-run determinism; an out-of-memory model refused with the bytes it needs. Label
// gpu: each test skips, saying why, without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "model/gpt.hpp"
#include "model/gpt_cuda.hpp"
#include "nibble/device.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "train/optimizer_setup.hpp"

#include "gpu/cuda_test_util.hpp"

namespace nibble::model {
namespace {

GptConfig tiny() {
  GptConfig c = gpt_preset("tiny");
  c.vocab = 65;
  c.context = 32;
  return c;
}

void random_tokens(std::vector<std::int32_t>& v, std::int64_t vocab, Rng& rng) {
  for (auto& t : v) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab)));
}

// |a - b| <= atol + rtol |b| for every element; returns the count that fail.
std::int64_t mismatches(const float* a, const float* b, std::int64_t n, double atol, double rtol, double* worst) {
  std::int64_t bad = 0;
  *worst = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    *worst = std::max(*worst, d);
    if (!(d <= atol + rtol * std::fabs(b[i]))) ++bad;
  }
  return bad;
}

TEST(CudaGpt, OneStepMatchesTheCpuEngineInFp32) {
  NIBBLE_REQUIRE_GPU();
  const GptConfig c = tiny();
  const std::int64_t B = 2, T = 16, BT = B * T;
  Gpt cpu(c, B, T);
  cpu.init(42);
  CudaGpt gpu(c, B, T);
  gpu.init(42);
  Rng rng(1);
  std::vector<std::int32_t> tokens(BT), targets(BT);
  random_tokens(tokens, c.vocab, rng);
  random_tokens(targets, c.vocab, rng);
  const float loss_cpu = cpu.forward(tokens.data(), targets.data());
  const float loss_gpu = gpu.forward(tokens.data(), targets.data());
  // fp32 on both sides, sums in other orders (attention's online softmax, cuBLASLt's blocking).
  EXPECT_NEAR(loss_gpu, loss_cpu, 1e-5 * std::fabs(loss_cpu));
  double worst = 0.0;
  const std::vector<float> logits = gpu.logits();
  EXPECT_EQ(mismatches(logits.data(), cpu.logits(), BT * c.vocab, 1e-5, 1e-4, &worst), 0) << "worst " << worst;
  cpu.zero_grad();
  gpu.zero_grad();
  cpu.backward();
  gpu.backward();
  std::vector<float> grads(static_cast<std::size_t>(gpu.param_count()));
  gpu.get_grads(grads.data());
  for (const ParamTensor& t : cpu.layout()) {
    std::int64_t n = 1;
    for (std::int64_t d : t.shape) n *= d;
    // Gradients are sums over B x T positions of products: 1e-4 relative plus an absolute floor
    // of 1e-6 for entries that nearly cancel.
    EXPECT_EQ(mismatches(grads.data() + t.offset, cpu.grads() + t.offset, n, 1e-6, 1e-4, &worst), 0)
        << t.name << ": worst " << worst;
  }
}

TEST(CudaGpt, Bf16LossAndGradientsFollowFp32) {
  NIBBLE_REQUIRE_GPU();
  const GptConfig c = tiny();
  const std::int64_t B = 2, T = 16, BT = B * T;
  Gpt cpu(c, B, T);
  cpu.init(42);
  CudaGpt gpu(c, B, T, {.precision = CudaPrecision::kBf16});
  gpu.init(42);
  Rng rng(2);
  std::vector<std::int32_t> tokens(BT), targets(BT);
  random_tokens(tokens, c.vocab, rng);
  random_tokens(targets, c.vocab, rng);
  const float loss_cpu = cpu.forward(tokens.data(), targets.data());
  const float loss_gpu = gpu.forward(tokens.data(), targets.data());
  // bf16 keeps 8 significant bits: a loss near log(65) = 4.17 within 1%.
  EXPECT_NEAR(loss_gpu, loss_cpu, 1e-2 * std::fabs(loss_cpu));
  cpu.zero_grad();
  gpu.zero_grad();
  cpu.backward();
  gpu.backward();
  std::vector<float> grads(static_cast<std::size_t>(gpu.param_count()));
  gpu.get_grads(grads.data());
  // Direction: the cosine between the two gradients of the whole model above 0.99.
  double dot = 0, na = 0, nb = 0;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    dot += static_cast<double>(grads[i]) * cpu.grads()[i];
    na += static_cast<double>(grads[i]) * grads[i];
    nb += static_cast<double>(cpu.grads()[i]) * cpu.grads()[i];
  }
  EXPECT_GT(dot / std::sqrt(na * nb), 0.99);
}

TEST(CudaGpt, FiftyTrainingStepsMatchTheCpuEngine) {
  NIBBLE_REQUIRE_GPU();
  const GptConfig c = tiny();
  const std::int64_t B = 4, T = 32, BT = B * T;
  Gpt cpu(c, B, T);
  cpu.init(7);
  CudaGpt gpu(c, B, T);
  gpu.init(7);
  OptimizerOptions oc;
  oc.algorithm = Algorithm::kAdamW;
  oc.hyper = default_hyper(Algorithm::kAdamW);
  oc.hyper->lr = 1e-3f;
  OptimizerOptions og = oc;
  og.device = Device::kCuda;
  og.cuda_stream = gpu.stream();  // the model's own stream: the step is ordered after the backward
  Optimizer opt_cpu(train::optimizer_param_groups(cpu.tensors()), oc);
  Optimizer opt_gpu(train::optimizer_param_groups(gpu.tensors()), og);
  Rng rng(3);
  std::vector<std::int32_t> tokens(BT), targets(BT);
  for (int step = 0; step < 50; ++step) {
    // A learnable stream: each target is the next token of a repeating pattern with noise.
    for (std::int64_t i = 0; i < BT; ++i) {
      tokens[i] = static_cast<std::int32_t>((i * 7 + step) % c.vocab);
      targets[i] = static_cast<std::int32_t>((tokens[i] + 1) % c.vocab);
    }
    cpu.zero_grad();
    gpu.zero_grad();
    const float lc = cpu.forward(tokens.data(), targets.data());
    const float lg = gpu.forward(tokens.data(), targets.data());
    // fp32 rounding differences grow through 50 Adam steps; 1e-3 relative bounds them.
    ASSERT_NEAR(lg, lc, 1e-3 * std::fabs(lc)) << "step " << step;
    cpu.backward();
    gpu.backward();
    opt_cpu.step();
    opt_gpu.step();
  }
}

TEST(CudaGpt, ForwardAndBackwardAreDeterministic) {
  NIBBLE_REQUIRE_GPU();
  const GptConfig c = tiny();
  const std::int64_t B = 2, T = 32, BT = B * T;
  std::vector<std::int32_t> tokens(BT), targets(BT);
  Rng rng(4);
  random_tokens(tokens, c.vocab, rng);
  random_tokens(targets, c.vocab, rng);
  for (CudaPrecision p : {CudaPrecision::kFp32, CudaPrecision::kBf16}) {
    std::vector<float> first, second;
    for (std::vector<float>* out : {&first, &second}) {
      CudaGpt gpu(c, B, T, {.precision = p});
      gpu.init(5);
      gpu.zero_grad();
      gpu.forward(tokens.data(), targets.data());
      gpu.backward();
      out->resize(static_cast<std::size_t>(gpu.param_count()));
      gpu.get_grads(out->data());
    }
    EXPECT_EQ(first, second);
  }
}

TEST(CudaGpt, OutOfMemoryIsAnErrorNamingTheBytes) {
  NIBBLE_REQUIRE_GPU();
  GptConfig c = gpt_preset("xl");
  c.vocab = 50304;
  try {
    CudaGpt gpu(c, 512, c.context);
    FAIL() << "a model far beyond GPU memory was allocated";
  } catch (const OutOfMemory& e) {
    EXPECT_GT(e.requested_bytes(), 0);
    EXPECT_NE(std::string(e.what()).find("activations"), std::string::npos) << e.what();
  }
}

TEST(CudaGpt, BadInputIsRefused) {
  NIBBLE_REQUIRE_GPU();
  GptConfig c = tiny();
  CudaGpt gpu(c, 1, 4);
  std::vector<std::int32_t> tokens = {1, 2, 3, 65}, targets = {1, 2, 3, 4};
  EXPECT_THROW(gpu.forward(tokens.data(), targets.data()), InvalidArgument);
  c.dropout = 0.1f;
  EXPECT_THROW(CudaGpt(c, 1, 4), InvalidArgument);
}

}  // namespace
}  // namespace nibble::model
