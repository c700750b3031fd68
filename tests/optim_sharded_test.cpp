// One rank's shard of a tensor (Param::global_shape, Param::split): choices made from the global
// shape, the tensors that whole-tensor algorithms refuse, and a step that takes its gradient
// square sum from outside, which must equal the optimizer's own when it is the same sum.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/error.hpp"
#include "nibble/optim.hpp"

namespace nibble {
namespace {

struct Tensors {
  std::vector<float> data, grad;
  explicit Tensors(std::size_t n) : data(n, 0.5f), grad(n) {
    for (std::size_t i = 0; i < n; ++i) grad[i] = 0.01f * static_cast<float>(i % 17) - 0.07f;
  }
};

Param shard(Tensors& t, std::vector<std::int64_t> shape, std::vector<std::int64_t> global, bool split) {
  Param p;
  p.name = std::string("w");
  p.shape = std::move(shape);
  p.global_shape = std::move(global);
  p.split = split;
  p.data = t.data.data();
  p.grad = t.grad.data();
  return p;
}

Optimizer make(Param p, Algorithm algorithm, Precision precision = Precision::kFp32, bool rank1 = false) {
  OptimizerOptions o;
  o.algorithm = algorithm;
  o.precision = precision;
  o.rank1_second_moment = rank1;
  o.no_decay_vectors = true;
  ParamGroup g;
  g.params.push_back(std::move(p));
  return Optimizer({std::move(g)}, o);
}

TEST(ShardedParam, StatePrecisionFollowsTheGlobalElementCount) {
  // 2048 local elements of a 4096-element tensor: quantized like the whole tensor, at any world size.
  Tensors t(2048);
  Optimizer opt = make(shard(t, {64, 32}, {128, 32}, true), Algorithm::kAdamW, Precision::kInt8);
  EXPECT_EQ(opt.state_precision(0), Precision::kInt8);
  Tensors whole(2048);
  Optimizer local = make(shard(whole, {64, 32}, {}, false), Algorithm::kAdamW, Precision::kInt8);
  EXPECT_EQ(local.state_precision(0), Precision::kFp32);
}

TEST(ShardedParam, AnEmptyShardIsAcceptedAndSteps) {
  Tensors t(0);
  Optimizer opt = make(shard(t, {0, 13}, {3, 13}, true), Algorithm::kAdamW, Precision::kInt8);
  EXPECT_EQ(opt.step().step, 1);
}

TEST(ShardedParam, WholeTensorAlgorithmsRefuseASplitTensorNamingIt) {
  Tensors t(64);
  for (Algorithm a : {Algorithm::kAdafactor, Algorithm::kAdamP}) {
    try {
      make(shard(t, {2, 32}, {4, 32}, true), a);
      FAIL() << algorithm_name(a) << " took a split tensor";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string_view(e.what()).find("parameter 'w' is split across ranks"), std::string_view::npos)
          << e.what();
    }
  }
  // Rank-1 4-bit (from the global 4096 elements, above min_quant_size): column maxima span all rows.
  EXPECT_THROW(make(shard(t, {2, 32}, {128, 32}, true), Algorithm::kAdam, Precision::kInt4, true), InvalidArgument);
  // Not split (a whole tensor, or a replicated one): accepted.
  EXPECT_NO_THROW(make(shard(t, {2, 32}, {2, 32}, false), Algorithm::kAdafactor));
  EXPECT_NO_THROW(make(shard(t, {2, 32}, {2, 32}, false), Algorithm::kAdamW, Precision::kInt4, true));
  // AdamP's projection is for >= 2-D tensors only: a split vector steps.
  EXPECT_NO_THROW(make(shard(t, {32}, {64}, true), Algorithm::kAdamP));
}

TEST(ShardedParam, InconsistentShapesAreRefused) {
  Tensors t(64);
  EXPECT_THROW(make(shard(t, {2, 32}, {4, 32}, false), Algorithm::kAdamW), InvalidArgument);  // not marked split
  EXPECT_THROW(make(shard(t, {2, 32}, {64}, true), Algorithm::kAdamW), InvalidArgument);      // rank differs
  EXPECT_THROW(make(shard(t, {2, 32}, {1, 32}, true), Algorithm::kAdamW), InvalidArgument);   // larger than global
  EXPECT_THROW(make(shard(t, {2, 32}, {}, true), Algorithm::kAdamW), InvalidArgument);        // split, no shape
}

TEST(ShardedParam, AGivenSquareSumEqualsTheOwnNormAndDecidesTheSkip) {
  Tensors a(300), b(300);
  OptimizerOptions o;
  o.max_grad_norm = 0.1f;
  auto build = [&](Tensors& t) {
    ParamGroup g;
    g.params.push_back(shard(t, {10, 30}, {}, false));
    return Optimizer({std::move(g)}, o);
  };
  Optimizer own = build(a), given = build(b);
  for (int i = 0; i < 3; ++i) {
    const StepResult r = own.step();
    StepOptions so;
    so.grad_square_sum = given.grad_square_sum();
    const StepResult s = given.step(so);
    EXPECT_EQ(r.grad_norm, s.grad_norm);
  }
  EXPECT_EQ(a.data, b.data);
  const std::vector<float> before = b.data;
  StepOptions so;
  so.grad_square_sum = std::numeric_limits<double>::infinity();  // another rank's gradient was not finite
  EXPECT_TRUE(given.step(so).skipped);
  EXPECT_EQ(b.data, before);
  EXPECT_EQ(given.skipped_steps(), 1);
  const std::uint8_t none[] = {0};
  EXPECT_EQ(given.grad_square_sum(none), 0.0);
}

// The device-side pair (a square sum queued into device memory, a step that reads one) is CUDA's;
// a CPU optimizer refuses it by name and points at its own pair. The GPU test is in
// tests/gpu/optim_cuda_test.cpp (CudaSharded).
TEST(ShardedParam, TheDeviceSquareSumCallsAreRefusedOnTheCpu) {
  Tensors t(300);
  Optimizer opt = make(shard(t, {10, 30}, {}, false), Algorithm::kAdamW);
  double sum = 0.0;
  try {
    opt.enqueue_grad_square_sum({}, &sum);
    FAIL() << "a CPU optimizer queued a device square sum";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string_view(e.what()).find("grad_square_sum()"), std::string_view::npos) << e.what();
  }
  try {
    opt.enqueue_step_with_square_sum(&sum);
    FAIL() << "a CPU optimizer queued a step with a device square sum";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string_view(e.what()).find("StepOptions::grad_square_sum"), std::string_view::npos) << e.what();
  }
  const std::uint8_t two[] = {1, 1};
  EXPECT_THROW(opt.enqueue_grad_square_sum(two, &sum), InvalidArgument);  // one flag per parameter
  EXPECT_THROW(opt.enqueue_grad_square_sum({}, nullptr), InvalidArgument);
  EXPECT_THROW(opt.enqueue_step_with_square_sum(nullptr), InvalidArgument);
  EXPECT_EQ(opt.step_count(), 0);
  EXPECT_EQ(t.data, std::vector<float>(300, 0.5f));
}

}  // namespace
}  // namespace nibble
