// `nibble train` on the CUDA engine: fp32 losses step for step like the CPU engine's, bf16
// learning, and checkpoints that move between GPU and CPU runs. Label gpu: skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <vector>

#include "nibble/device.hpp"
#include "train/trainer.hpp"

#include "gpu/cuda_test_util.hpp"

namespace nibble::train {
namespace {

TrainOptions tiny_run(Device device, std::int64_t steps) {
  TrainOptions o;
  o.preset = "tiny";
  o.device = device;
  o.batch = 4;
  o.seq = 32;
  o.steps = steps;
  o.warmup = 5;
  o.eval_every = 0;
  o.eval_batches = 2;
  o.quiet = true;
  return o;
}

std::vector<float> losses_of(const TrainOptions& o) {
  std::vector<float> losses;
  train(o, [&](const StepLog& log) { losses.push_back(log.loss); });
  return losses;
}

TEST(TrainCuda, Fp32LossesFollowTheCpuEngine) {
  NIBBLE_REQUIRE_GPU();
  const std::vector<float> cpu = losses_of(tiny_run(Device::kCpu, 30));
  const std::vector<float> gpu = losses_of(tiny_run(Device::kCuda, 30));
  ASSERT_EQ(cpu.size(), gpu.size());
  // Same data, initialisation and optimizer; fp32 sums in other orders drift slowly over 30 steps.
  for (std::size_t i = 0; i < cpu.size(); ++i) EXPECT_NEAR(gpu[i], cpu[i], 2e-3 * std::fabs(cpu[i])) << "step " << i;
  EXPECT_LT(gpu.back(), gpu.front());
}

// The captured step replays the same kernels in the same order as eager steps: the same losses,
// bit for bit (every kernel is deterministic), with gradient accumulation too.
TEST(TrainCuda, GraphReplayEqualsEagerSteps) {
  NIBBLE_REQUIRE_GPU();
  for (model::CudaPrecision p : {model::CudaPrecision::kFp32, model::CudaPrecision::kBf16}) {
    TrainOptions graph = tiny_run(Device::kCuda, 12);
    graph.compute = p;
    graph.accum = 2;
    TrainOptions eager = graph;
    eager.cuda_graph = false;
    EXPECT_EQ(losses_of(graph), losses_of(eager));
  }
}

// bf16 compute learns with fp32 master weights and with pure bf16 parameters rounded stochastically.
TEST(TrainCuda, Bf16ComputeLearns) {
  NIBBLE_REQUIRE_GPU();
  for (bool pure : {false, true}) {
    TrainOptions o = tiny_run(Device::kCuda, 60);
    o.compute = model::CudaPrecision::kBf16;
    o.pure_bf16 = pure;
    o.precision = Precision::kInt8;
    const std::vector<float> losses = losses_of(o);
    for (float l : losses) ASSERT_TRUE(std::isfinite(l)) << (pure ? "pure bf16" : "master weights");
    EXPECT_LT(losses.back(), losses.front() - 0.5f) << (pure ? "pure bf16" : "master weights");
  }
}

// 10 steps on one engine into a checkpoint, then resumed to step 20 on the other: the losses of
// steps 11-20 follow a run that stayed on the CPU (fp32 on both engines; other summation orders).
TEST(TrainCuda, CheckpointsMoveBetweenGpuAndCpu) {
  NIBBLE_REQUIRE_GPU();
  const auto dir = nibble::test::scratch_dir("nibble_train_cuda_checkpoint");
  auto split_run = [&](Device first, Device second) {
    std::filesystem::remove_all(dir);
    TrainOptions a = tiny_run(first, 10);
    a.checkpoint_dir = dir;
    a.save_every = 10;
    train(a);
    TrainOptions b = tiny_run(second, 20);
    b.checkpoint_dir = dir;
    b.resume = true;
    return losses_of(b);
  };
  const std::vector<float> cpu_cpu = split_run(Device::kCpu, Device::kCpu);
  const std::vector<float> gpu_cpu = split_run(Device::kCuda, Device::kCpu);
  const std::vector<float> cpu_gpu = split_run(Device::kCpu, Device::kCuda);
  std::filesystem::remove_all(dir);
  ASSERT_EQ(cpu_cpu.size(), 10u);
  ASSERT_EQ(gpu_cpu.size(), 10u);
  ASSERT_EQ(cpu_gpu.size(), 10u);
  for (std::size_t i = 0; i < cpu_cpu.size(); ++i) {
    EXPECT_NEAR(gpu_cpu[i], cpu_cpu[i], 2e-3 * std::fabs(cpu_cpu[i])) << "GPU -> CPU, step " << 11 + i;
    EXPECT_NEAR(cpu_gpu[i], cpu_cpu[i], 2e-3 * std::fabs(cpu_cpu[i])) << "CPU -> GPU, step " << 11 + i;
  }
}

}  // namespace
}  // namespace nibble::train
