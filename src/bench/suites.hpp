// What a suite of the benchmark lab takes and gives: the options every suite reads from (each
// suite uses some), progress while it runs, and its output: a report of every raw measurement plus
// the environment, readable text tables and SVG plots. The suites themselves are in suite_registry.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "bench/report.hpp"
#include "bench/runner.hpp"

namespace nibble::bench {

enum class BenchDevice { kCpu, kCuda };
// Throws InvalidArgument for anything but "cpu" and "cuda".
BenchDevice bench_device_from_name(std::string_view name);

struct SuiteOptions {
  BenchDevice device = BenchDevice::kCpu;
  // Optimizers to compare; the first is the baseline every difference is measured against.
  std::vector<OptimizerChoice> optimizers;
  std::string preset = "char";              // batch-sweep, profile, convergence
  std::int64_t seq = 0;                     // tokens per sequence; 0: the context (preset lists: at most it)
  std::vector<std::int64_t> batches;        // batch-sweep, memory-plan
  std::int64_t batch = 16;                  // profile, convergence, model-sweep
  std::vector<std::string> presets;         // model-sweep, memory-plan
  std::vector<TimingMode> modes;            // model-sweep
  std::int64_t vocab = 0;                   // model-sweep, memory-plan; 0: 65 for tiny/char, 50304 above;
                                            // CUDA batch-sweep/convergence: > 0 trains on random tokens of it
  std::int64_t warmup_steps = 2;
  std::int64_t measure_steps = 8;
  std::vector<std::uint64_t> seeds{1337};
  std::optional<float> target_loss;         // convergence
  double time_budget_s = 0.0;               // convergence; 0: none
  std::int64_t max_steps = 0;               // convergence: steps per run at most
  bool stop_at_target = false;              // convergence: end a run at the target
  std::int64_t eval_every = 0;              // profile, convergence (0: only at the end)
  std::int64_t eval_batches = 4;
  std::optional<float> lr;                  // every optimizer's default otherwise
  std::filesystem::path data;               // empty: the default corpus
  std::int64_t memory_limit = 0;            // bytes a run may use; 0: no limit
  std::int64_t memory_size = 0;             // memory-plan: the memory to fit; 0: this machine's free memory
  bool measure = false;                     // memory-plan: also run what fits below measure_max
  std::int64_t measure_max = 0;             // bytes
};

// What the lab reports while it runs: run `index` of `count` started, or a step of it finished.
struct Progress {
  std::size_t index = 0;
  std::size_t count = 0;
  std::string label;
  std::int64_t step = 0;   // 0: the run is starting
  std::int64_t steps = 0;  // planned steps of the run, 0 when unknown
  std::optional<RunStatus> finished;
};
using ProgressCallback = std::function<void(const Progress&)>;

struct Plot {
  std::string name;  // file stem: "batch-sweep-throughput"
  std::string svg;
};

struct SuiteOutput {
  Report report;
  std::string text;  // the tables for the terminal
  std::vector<Plot> plots;
};

}  // namespace nibble::bench
