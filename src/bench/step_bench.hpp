// The optimizer step benchmark behind `nibble step-bench`: times the step alone, for each algorithm
// and state precision, on the CPU or a CUDA GPU, and judges it against the copy bandwidth measured
// in the same run (bandwidth is the budget); on the GPU it can add the AdamW fp32 baselines that
// nibble's fused step replaces. Rows come back as data, with writers for the table, JSON and CSV.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "nibble/device.hpp"
#include "nibble/hyper.hpp"

namespace nibble::bench {

// A tensor to step, by shape only: the benchmark allocates and fills it.
struct StepBenchTensor {
  std::string name;
  std::vector<std::int64_t> shape;
};

struct StepBenchOptions {
  Device device = Device::kCpu;
  std::vector<Algorithm> algorithms;  // each row: one algorithm at one precision
  std::vector<Precision> precisions;
  std::vector<StepBenchTensor> tensors;
  std::string set_label;  // how the run's header names the tensors: "gpt2-124m (148 tensors)"
  int warmup = 3;         // untimed steps after the set-up step
  int steps = 10;         // timed steps per row, at least 1
  int threads = 0;        // 0: OpenMP's default (cpu only)
  int block_size = 0;
  bool check_finite = false;   // the gradient pre-pass: non-finite check
  float max_grad_norm = 0.0f;  // and/or global-norm clipping
  bool levels = false;         // cuda: add the AdamW fp32 loop and foreach baselines after adamw fp32
  std::uint64_t seed = 0;
};

// The implementation level of nibble's own optimizer; the --levels baselines are "loop" and "foreach".
inline constexpr const char* kFusedLevel = "fused";

struct StepBenchRow {
  std::string device;
  Algorithm algorithm = Algorithm::kAdamW;
  Precision precision = Precision::kFp32;
  std::string level = kFusedLevel;
  std::int64_t params = 0;
  double median_ms = 0.0;
  double min_ms = 0.0;
  double bytes_per_param_moved = 0.0;
  double gbps = 0.0;
  double memcpy_gbps = 0.0;
  double ratio = 0.0;            // gbps / memcpy_gbps: the bandwidth of what this row moves
  double effective_ratio = 0.0;  // the same from the bytes the update must move
  double state_bytes_per_param = 0.0;
  double setup_ms = 0.0;
  int threads = 0;         // OpenMP threads; 0 on cuda
  bool grad_pass = false;  // the step ran the gradient-norm pre-pass
};

// The rows of a run and the line that heads their table.
struct StepBenchRun {
  std::vector<StepBenchRow> rows;
  std::string header;
};

// Called after each row with the rows done so far and the rows planned.
using StepBenchProgress = std::function<void(const StepBenchRow& row, std::size_t done, std::size_t total)>;

// Runs every row. Throws Error when a timed step was skipped (non-finite gradients), OutOfMemory
// when the device lacks the memory, DeviceError for cuda in a build without the CUDA backend.
StepBenchRun run_step_bench(const StepBenchOptions& options, const StepBenchProgress& progress = {});

// The rows as a plain-text table, a JSON array (indented, ending in a newline) and CSV.
std::string step_bench_table(const std::vector<StepBenchRow>& rows);
std::string step_bench_json(const std::vector<StepBenchRow>& rows);
std::string step_bench_csv(const std::vector<StepBenchRow>& rows);

}  // namespace nibble::bench
