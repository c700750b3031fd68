// The step benchmark as a library (bench/step_bench.hpp): one row per algorithm x precision with
// consistent figures, and writers whose JSON and CSV hold every row. No timing is asserted.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench/step_bench.hpp"
#include "nibble/device.hpp"
#include "nibble/error.hpp"

namespace nibble::bench {
namespace {

StepBenchOptions small_cpu_run() {
  StepBenchOptions o;
  o.algorithms = {Algorithm::kAdamW, Algorithm::kLion};
  o.precisions = {Precision::kFp32, Precision::kInt8};
  o.tensors = {{"w", {64, 1024}}, {"b", {1024}}};
  o.set_label = "two tensors";
  o.warmup = 0;
  o.steps = 2;
  o.seed = 7;
  return o;
}

TEST(StepBench, OneRowPerAlgorithmAndPrecisionWithItsFigures) {
  std::vector<std::size_t> progress;
  const StepBenchRun run =
      run_step_bench(small_cpu_run(), [&](const StepBenchRow&, std::size_t done, std::size_t total) {
        EXPECT_EQ(total, 4u);
        progress.push_back(done);
      });
  EXPECT_EQ(progress, (std::vector<std::size_t>{1, 2, 3, 4}));
  ASSERT_EQ(run.rows.size(), 4u);
  EXPECT_NE(run.header.find("two tensors"), std::string::npos) << run.header;
  for (const StepBenchRow& r : run.rows) {
    EXPECT_EQ(r.device, "cpu");
    EXPECT_EQ(r.level, kFusedLevel);
    EXPECT_EQ(r.params, 64 * 1024 + 1024);
    EXPECT_GT(r.median_ms, 0.0);
    EXPECT_LE(r.min_ms, r.median_ms);
    EXPECT_GT(r.gbps, 0.0);
    EXPECT_FALSE(r.grad_pass);
    // Each row carries the copy bandwidth measured around it, and its ratio is against that.
    EXPECT_GT(r.memcpy_gbps, 0.0);
    EXPECT_DOUBLE_EQ(r.ratio, r.gbps / r.memcpy_gbps);
  }
  EXPECT_NE(run.header.find("measured around each row"), std::string::npos) << run.header;
  EXPECT_EQ(run.rows[0].algorithm, Algorithm::kAdamW);
  EXPECT_EQ(run.rows[1].precision, Precision::kInt8);
  EXPECT_DOUBLE_EQ(run.rows[0].bytes_per_param_moved, 28.0);  // AdamW fp32: 4 + 8 + 16
  EXPECT_DOUBLE_EQ(run.rows[0].state_bytes_per_param, 8.0);

  const nlohmann::json json = nlohmann::json::parse(step_bench_json(run.rows));
  ASSERT_EQ(json.size(), 4u);
  EXPECT_EQ(json[3]["algorithm"], "lion");
  EXPECT_EQ(json[3]["precision"], "8bit");
  const std::string csv = step_bench_csv(run.rows);
  EXPECT_EQ(csv.rfind("device,algorithm,precision,level,params,median_ms", 0), 0u);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 5);
  EXPECT_NE(step_bench_table(run.rows).find("lion       8bit"), std::string::npos);
}

TEST(StepBench, NothingToTimeIsRefusedByCount) {
  StepBenchOptions o = small_cpu_run();
  o.precisions.clear();
  try {
    run_step_bench(o);
    FAIL() << "an empty precision list ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("2 algorithms, 0 precisions"), std::string::npos) << e.what();
  }
}

// A build without CUDA, or a CUDA build on a machine without a GPU (as in CI), refuses clearly.
TEST(StepBench, CudaWithoutBackendOrDeviceIsRefused) {
  if (cuda_built() && cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is visible";
  StepBenchOptions o = small_cpu_run();
  o.device = Device::kCuda;
  EXPECT_THROW(run_step_bench(o), DeviceError);
}

}  // namespace
}  // namespace nibble::bench
