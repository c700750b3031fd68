// `nibble step-bench`: the flags of the optimizer step benchmark (bench/step_bench.hpp), checked
// before any work; prints its progress, header and table, and writes its JSON and CSV files.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdint>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "bench/step_bench.hpp"
#include "cli/commands.hpp"
#include "cli/flags.hpp"
#include "cli/param_sets.hpp"
#include "nibble/device.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"

namespace nibble::cli {
namespace {

// Timed steps per row when --steps is not given: a GPU step is short, so it takes more of them.
constexpr int kCpuDefaultSteps = 10;
constexpr int kCudaDefaultSteps = 20;

struct StepBenchFlags {
  std::string device = "cpu";
  std::vector<std::string> algorithms;  // empty: all
  std::vector<std::string> precisions;  // empty: all
  std::string set = "gpt2-124m";
  std::int64_t params = 0;  // > 0: one flat tensor of this many elements instead of `set`
  int warmup = 3;
  int steps = kCpuDefaultSteps;  // kCudaDefaultSteps on cuda unless --steps is given
  int threads = 0;  // 0: OpenMP's default (cpu only)
  int block_size = 0;
  bool check_finite = false;   // the gradient pre-pass: non-finite check
  float max_grad_norm = 0.0f;  // and/or global-norm clipping
  bool levels = false;         // cuda: add the AdamW fp32 loop and foreach baselines
  std::uint64_t seed = 0;
  std::string json_path;
  std::string csv_path;
};

template <class T, class Parse>
std::vector<T> parse_names(const std::vector<std::string>& names, std::span<const T> all,
                           Parse parse, const char* what, const std::string& known) {
  if (names.empty()) return {all.begin(), all.end()};
  std::vector<T> chosen;
  for (const std::string& name : names) {
    const auto value = parse(name);
    if (!value) {
      throw InvalidArgument(fmt::format("unknown {} '{}' (known: {})", what, name, known));
    }
    if (std::find(chosen.begin(), chosen.end(), *value) == chosen.end()) chosen.push_back(*value);
  }
  return chosen;
}

void report_progress(const bench::StepBenchRow& r, std::size_t done, std::size_t total) {
  const std::string level = r.level == bench::kFusedLevel ? "" : " " + r.level;
  fmt::print(stderr, "[{}/{}] {} {}{}: median {:.3f} ms, {:.1f} GB/s ({:.0f}% of memcpy)\n", done,
             total, algorithm_name(r.algorithm), precision_name(r.precision), level, r.median_ms,
             r.gbps, 100.0 * r.ratio);
}

void check_options(const StepBenchFlags& flags, bool params_given) {
  if (flags.device != "cpu" && flags.device != "cuda") {
    throw InvalidArgument(fmt::format("unknown device '{}' (known: cpu, cuda)", flags.device));
  }
  const bool cuda = flags.device == "cuda";
  if (flags.levels && !cuda) {
    throw InvalidArgument(
        "--levels times the AdamW fp32 loop and foreach GPU baselines beside the fused step; it "
        "needs --device cuda");
  }
  if (params_given && flags.params <= 0) {
    throw InvalidArgument(fmt::format("--params must be positive, got {}", flags.params));
  }
  if (flags.steps < 1) {
    throw InvalidArgument(fmt::format("--steps must be at least 1, got {}", flags.steps));
  }
  if (flags.warmup < 0) {
    throw InvalidArgument(fmt::format("--warmup must not be negative, got {}", flags.warmup));
  }
  if (flags.threads < 0) {
    throw InvalidArgument(fmt::format("--threads must not be negative, got {}", flags.threads));
  }
  if (cuda && flags.threads > 0) {
    throw InvalidArgument(fmt::format(
        "--threads {} sets OpenMP threads of the CPU step; it has no meaning with --device cuda",
        flags.threads));
  }
  if (flags.block_size < 0) {
    throw InvalidArgument(
        fmt::format("--block-size must not be negative, got {}", flags.block_size));
  }
}

// Whether the device asked for exists; after every flag check, before any work.
void check_device(const StepBenchFlags& flags) {
  if (flags.device != "cuda") return;
  if (!cuda_built()) {
    throw DeviceError(
        "--device cuda: this nibble was built without the CUDA backend (no nvcc found at "
        "configure time, or -DNIBBLE_CUDA=OFF); use --device cpu");
  }
  if (cuda_device_count() == 0) {
    throw DeviceError(
        "--device cuda: no CUDA device is visible (no GPU, no driver, or CUDA_VISIBLE_DEVICES "
        "hides it); use --device cpu");
  }
}

void run_step_bench(StepBenchFlags flags, bool params_given, bool steps_given) {
  if (flags.device == "cuda" && !steps_given) flags.steps = kCudaDefaultSteps;
  check_options(flags, params_given);
  bench::StepBenchOptions options;
  options.algorithms =
      parse_names<Algorithm>(flags.algorithms, all_algorithms(), algorithm_from_name, "algorithm",
                             algorithm_names());
  options.precisions =
      parse_names<Precision>(flags.precisions, all_precisions(), precision_from_name, "precision",
                             precision_names());
  const std::vector<Algorithm>& algorithms = options.algorithms;
  const std::vector<Precision>& precisions = options.precisions;
  if (flags.levels &&
      (std::find(algorithms.begin(), algorithms.end(), Algorithm::kAdamW) == algorithms.end() ||
       std::find(precisions.begin(), precisions.end(), Precision::kFp32) == precisions.end())) {
    throw InvalidArgument(
        "--levels sets the AdamW fp32 baselines beside nibble's fused AdamW fp32 step; include "
        "adamw in --algorithms and fp32 in --precisions");
  }

  if (params_given) {
    options.tensors.push_back({"flat", {flags.params}});
    options.set_label = "one flat tensor";
  } else {
    for (ParamShape& p : named_param_set(flags.set)) options.tensors.push_back({std::move(p.name), std::move(p.shape)});
    options.set_label = fmt::format("{} ({} tensors)", flags.set, options.tensors.size());
  }

  check_device(flags);
  std::ofstream json_out;
  std::ofstream csv_out;
  if (!flags.json_path.empty()) json_out = open_output(flags.json_path);
  if (!flags.csv_path.empty()) csv_out = open_output(flags.csv_path);

  options.device = flags.device == "cuda" ? Device::kCuda : Device::kCpu;
  options.warmup = flags.warmup;
  options.steps = flags.steps;
  options.threads = flags.threads;
  options.block_size = flags.block_size;
  options.check_finite = flags.check_finite;
  options.max_grad_norm = flags.max_grad_norm;
  options.levels = flags.levels;
  options.seed = flags.seed;
  const bench::StepBenchRun run = bench::run_step_bench(options, report_progress);

  fmt::print("{}\n\n", run.header);
  fmt::print("{}", bench::step_bench_table(run.rows));
  if (json_out.is_open()) finish_output(json_out, flags.json_path, bench::step_bench_json(run.rows));
  if (csv_out.is_open()) finish_output(csv_out, flags.csv_path, bench::step_bench_csv(run.rows));
}

}  // namespace

void add_step_bench_command(CLI::App& app) {
  auto flags = std::make_shared<StepBenchFlags>();
  CLI::App* sub = app.add_subcommand(
      "step-bench",
      "Time the optimizer step alone for each algorithm and state precision, on the CPU or a CUDA "
      "GPU, and compare its achieved bandwidth with the copy bandwidth measured in the same run.");
  sub->add_option("--device", flags->device,
                  "Device to step on: cpu, or cuda (a build with the CUDA backend and a visible "
                  "GPU; parameters, gradients and state then live in GPU memory)");
  sub->add_option("--algorithms", flags->algorithms,
                  fmt::format("Comma-separated algorithms to run (default: all of {})",
                              algorithm_names()))
      ->delimiter(',')
      ->option_text("NAME,...");
  sub->add_option("--precisions", flags->precisions,
                  fmt::format("Comma-separated state precisions to run (default: all of {})",
                              precision_names()))
      ->delimiter(',')
      ->option_text("NAME,...");
  sub->add_option("--set", flags->set, fmt::format("Parameter set to step: {}", kParamSetNames));
  CLI::Option* params = sub->add_option("--params", flags->params,
                                        "Step one flat tensor of N parameters instead of --set")
                            ->check(at_least(1))
                            ->option_text("N");
  sub->add_option("--warmup", flags->warmup,
                  "Untimed steps after the set-up step (optimizer construction + first step), on "
                  "either device")
      ->check(non_negative());
  CLI::Option* steps =
      sub->add_option("--steps", flags->steps,
                      fmt::format("Timed steps per row (at least 1); default {} on cpu, {} on cuda",
                                  kCpuDefaultSteps, kCudaDefaultSteps))
          ->check(at_least(1))
          ->default_str(fmt::format("{} on cpu, {} on cuda", kCpuDefaultSteps, kCudaDefaultSteps));
  sub->add_option("--threads", flags->threads,
                  "OpenMP threads of the CPU step; 0 keeps OpenMP's default (cpu only; refused "
                  "with --device cuda)")
      ->check(number_in(0, false, 4096, false));
  add_block_size_option(*sub, flags->block_size);
  sub->add_option("--seed", flags->seed, "Seed of the random parameters and gradients")->check(non_negative());
  sub->add_flag("--check-finite", flags->check_finite,
                "Run the optimizer's gradient pre-pass that skips steps with inf/NaN gradients (on "
                "by default in the library; off here so the step compares with fused optimizer "
                "kernels that have none). Counted as 4 more bytes per parameter");
  sub->add_option("--max-grad-norm", flags->max_grad_norm,
                  "Clip gradients to this global norm (0: off); runs the same pre-pass")
      ->check(non_negative());
  sub->add_flag("--levels", flags->levels,
                "cuda only: beside nibble's fused AdamW fp32 row, time two AdamW fp32 baselines "
                "on the same parameters: 'loop' (one launch of an elementwise AdamW kernel per "
                "tensor) and 'foreach' (three op-by-op passes, m, v, then p, each one launch over "
                "all tensors). Needs adamw and fp32 among the selected algorithms and precisions; "
                "the baselines run no gradient pre-pass");
  sub->add_option("--json", flags->json_path, "Also write the results to FILE as JSON")
      ->option_text("FILE");
  sub->add_option("--csv", flags->csv_path, "Also write the results to FILE as CSV")
      ->option_text("FILE");
  sub->footer(
      "Columns: level, the implementation (fused: nibble's optimizer; loop, foreach: the --levels "
      "baselines); median_ms and min_ms over the timed steps (cpu: wall clock around step(); cuda: "
      "CUDA events around each enqueue_step(), one after another on one stream); B/param, the bytes"
      " the row's step moves per parameter (grad read, param read + write, each state tensor read +"
      " write, +4 with the gradient pre-pass; foreach counts every pass's reads and writes, 40); "
      "GB/s = B/param x params / median; memcpy GB/s, the copy bandwidth, read + write (cpu: the "
      "fastest of 5 multi-threaded memcpys of 256 MiB to 1 GiB before and 5 after each row, so "
      "each row is judged against the bandwidth the machine showed in the minutes it ran; cuda: the median of 10 "
      "device-to-device "
      "cudaMemcpyAsync of max(256 MiB, 2 x parameter bytes), less if free GPU memory is short); "
      "ratio = GB/s / memcpy GB/s, how well the row uses the bandwidth for what it moves; effective"
      " = the same with the bytes the update must move (no pre-pass; 28 for every AdamW fp32 "
      "level), so two rows of one algorithm and precision compare as speed; state B/param, "
      "optimizer state allocated per parameter; setup_ms, optimizer construction + first step "
      "(synchronised). threads in JSON/CSV is 0 on cuda. Progress goes to stderr, one line per "
      "row.");
  sub->callback([flags, params, steps] {
    run_step_bench(*flags, params->count() > 0, steps->count() > 0);
  });
}

}  // namespace nibble::cli
