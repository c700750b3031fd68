// `nibble step-bench`: times the optimizer step alone, for each algorithm and state precision,
// and judges it against the copy bandwidth measured in the same run (bandwidth is the budget).
#include <fmt/format.h>
#include <omp.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cli/commands.hpp"
#include "cli/param_sets.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "nibble/tensor.hpp"

namespace nibble::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct StepBenchOptions {
  std::string device = "cpu";
  std::vector<std::string> algorithms;  // empty: all
  std::vector<std::string> precisions;  // empty: all
  std::string set = "gpt2-124m";
  std::int64_t params = 0;  // > 0: one flat tensor of this many elements instead of `set`
  int warmup = 3;
  int steps = 10;
  int threads = 0;  // 0: OpenMP's default
  int block_size = 0;
  bool check_finite = false;   // the gradient pre-pass: non-finite check
  float max_grad_norm = 0.0f;  // and/or global-norm clipping
  std::uint64_t seed = 0;
  std::string json_path;
  std::string csv_path;
};

struct Result {
  Algorithm algorithm;
  Precision precision;
  std::int64_t params = 0;
  double median_ms = 0.0;
  double min_ms = 0.0;
  double bytes_per_param_moved = 0.0;
  double gbps = 0.0;
  double memcpy_gbps = 0.0;
  double ratio = 0.0;
  double state_bytes_per_param = 0.0;
  double setup_ms = 0.0;
  int threads = 0;
  bool grad_pass = false;  // the step ran the gradient-norm pre-pass
};

double milliseconds(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

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

std::string join_names(auto all, auto name_of) {
  std::string text;
  for (auto value : all) {
    if (!text.empty()) text += ", ";
    text += name_of(value);
  }
  return text;
}

// Copy bandwidth of this machine counted as bytes read + written, the figure a memory-bound step
// is judged against. Each thread copies one contiguous slice, as a multi-tensor step streams.
double measure_memcpy_gbps(std::size_t bytes) {
  Buffer source(bytes);
  Buffer target(bytes);
  auto copy = [&] {
#pragma omp parallel
    {
      const std::size_t threads = static_cast<std::size_t>(omp_get_num_threads());
      const std::size_t thread = static_cast<std::size_t>(omp_get_thread_num());
      // Slices start on cache lines so that no two threads write the same line.
      const std::size_t lines = bytes / Buffer::kAlignment;
      const std::size_t begin = lines * thread / threads * Buffer::kAlignment;
      const std::size_t end =
          thread + 1 == threads ? bytes : lines * (thread + 1) / threads * Buffer::kAlignment;
      std::memcpy(target.data() + begin, source.data() + begin, end - begin);
    }
  };
  copy();
  std::vector<double> seconds;
  for (int i = 0; i < 5; ++i) {
    const auto start = Clock::now();
    copy();
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  return 2.0 * static_cast<double>(bytes) / median(seconds) / 1e9;
}

// Fills `values` with scale * N(0, 1), the same numbers for a seed whatever the thread count:
// each fixed-size chunk draws from its own generator.
void fill_normal(float* values, std::int64_t count, float scale, std::uint64_t seed) {
  constexpr std::int64_t kChunk = 1 << 16;
  const std::int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
    Rng rng(seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(chunk + 1)));
    const std::int64_t end = std::min(count, (chunk + 1) * kChunk);
    for (std::int64_t i = chunk * kChunk; i < end; ++i) values[i] = scale * rng.normal();
  }
}

// The parameters and gradients of one run, packed into two buffers with every tensor starting on
// a cache line, allocated and filled once and shared by every row.
struct ParamBuffers {
  std::vector<ParamShape> shapes;
  std::vector<std::int64_t> offsets;  // in floats
  std::int64_t params = 0;
  Buffer data;
  Buffer grad;

  ParamBuffers(std::vector<ParamShape> set, std::uint64_t seed) : shapes(std::move(set)) {
    constexpr std::int64_t kLineFloats = Buffer::kAlignment / sizeof(float);
    std::int64_t floats = 0;
    for (const ParamShape& p : shapes) {
      offsets.push_back(floats);
      const std::int64_t numel = shape_numel(p.shape);
      params += numel;
      floats += (numel + kLineFloats - 1) / kLineFloats * kLineFloats;
    }
    data = Buffer(static_cast<std::size_t>(floats) * sizeof(float));
    grad = Buffer(static_cast<std::size_t>(floats) * sizeof(float));
    fill_normal(reinterpret_cast<float*>(data.data()), floats, 0.02f, seed);
    fill_normal(reinterpret_cast<float*>(grad.data()), floats, 1e-3f, seed + 1);
  }

  std::vector<Param> make_params() {
    std::vector<Param> list;
    list.reserve(shapes.size());
    auto* data_floats = reinterpret_cast<float*>(data.data());
    auto* grad_floats = reinterpret_cast<float*>(grad.data());
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      list.push_back(
          {shapes[i].name, shapes[i].shape, data_floats + offsets[i], grad_floats + offsets[i]});
    }
    return list;
  }
};

OptimizerOptions optimizer_options(Algorithm algorithm, Precision precision, const StepBenchOptions& bench) {
  OptimizerOptions options;
  options.algorithm = algorithm;
  options.hyper = default_hyper(algorithm);
  // Weight decay on, so that the timed step includes the decay arithmetic these algorithms run in
  // training.
  if (algorithm == Algorithm::kAdamW || algorithm == Algorithm::kLion ||
      algorithm == Algorithm::kSophiaG) {
    options.hyper->weight_decay = 0.01f;
  }
  options.precision = precision;
  options.block_size = bench.block_size;
  options.check_finite = bench.check_finite;
  options.max_grad_norm = bench.max_grad_norm;
  return options;
}

// Bytes a step must move per parameter: grad read (4), param read + write (8), every state tensor
// read + written; weighted over tensors by size.
double bytes_moved_per_param(const Optimizer& optimizer) {
  const OptimizerOptions& options = optimizer.options();
  double bytes = 0.0;
  std::int64_t params = 0;
  for (std::size_t i = 0; i < optimizer.param_count(); ++i) {
    const Param& p = optimizer.param(i);
    const std::int64_t numel = shape_numel(p.shape);
    const double state =
        state_bytes_per_element(options.algorithm, optimizer.hyper(), optimizer.state_precision(i),
                                options.block_size, p.shape, options.rank1_second_moment);
    bytes += static_cast<double>(numel) * (12.0 + 2.0 * state);
    params += numel;
  }
  // The pre-pass that checks gradients and takes their global norm reads every gradient once
  // more before the update may touch anything.
  if (options.check_finite || options.max_grad_norm > 0.0f) bytes += 4.0 * static_cast<double>(params);
  return params > 0 ? bytes / static_cast<double>(params) : 0.0;
}

Result run_row(ParamBuffers& buffers, Algorithm algorithm, Precision precision,
               const StepBenchOptions& options, double memcpy_gbps) {
  Result result{algorithm, precision};
  result.params = buffers.params;
  result.memcpy_gbps = memcpy_gbps;
  result.threads = omp_get_max_threads();

  std::vector<ParamGroup> groups(1);
  groups[0].params = buffers.make_params();
  const auto setup_start = Clock::now();
  Optimizer optimizer(std::move(groups),
                      optimizer_options(algorithm, precision, options));
  optimizer.step();
  result.setup_ms = milliseconds(Clock::now() - setup_start);

  for (int i = 0; i < options.warmup; ++i) optimizer.step();
  std::vector<double> times;
  times.reserve(static_cast<std::size_t>(options.steps));
  for (int i = 0; i < options.steps; ++i) {
    const auto start = Clock::now();
    const StepResult step = optimizer.step();
    times.push_back(milliseconds(Clock::now() - start));
    // A skipped step does no work and would time as impossibly fast.
    if (step.skipped) {
      throw Error(fmt::format("{} {}: step {} was skipped (non-finite gradients)",
                              algorithm_name(algorithm), precision_name(precision), step.step));
    }
  }

  result.median_ms = median(times);
  result.min_ms = *std::min_element(times.begin(), times.end());
  result.bytes_per_param_moved = bytes_moved_per_param(optimizer);
  result.gbps = result.bytes_per_param_moved * static_cast<double>(result.params) /
                (result.median_ms * 1e-3) / 1e9;
  result.ratio = memcpy_gbps > 0.0 ? result.gbps / memcpy_gbps : 0.0;
  result.state_bytes_per_param = optimizer.state_stats().bytes_per_param();
  result.grad_pass = options.check_finite || options.max_grad_norm > 0.0f;
  return result;
}

nlohmann::ordered_json to_json(const Result& r) {
  return {{"device", "cpu"},
          {"algorithm", algorithm_name(r.algorithm)},
          {"precision", precision_name(r.precision)},
          {"params", r.params},
          {"median_ms", r.median_ms},
          {"min_ms", r.min_ms},
          {"bytes_per_param_moved", r.bytes_per_param_moved},
          {"gbps", r.gbps},
          {"memcpy_gbps", r.memcpy_gbps},
          {"ratio", r.ratio},
          {"state_bytes_per_param", r.state_bytes_per_param},
          {"setup_ms", r.setup_ms},
          {"threads", r.threads},
          {"grad_pass", r.grad_pass}};
}

std::string to_csv(const std::vector<Result>& results) {
  std::string text =
      "device,algorithm,precision,params,median_ms,min_ms,bytes_per_param_moved,gbps,memcpy_gbps,"
      "ratio,state_bytes_per_param,setup_ms,threads,grad_pass\n";
  for (const Result& r : results) {
    text += fmt::format("cpu,{},{},{},{},{},{},{},{},{},{},{},{},{}\n", algorithm_name(r.algorithm),
                        precision_name(r.precision), r.params, r.median_ms, r.min_ms,
                        r.bytes_per_param_moved, r.gbps, r.memcpy_gbps, r.ratio,
                        r.state_bytes_per_param, r.setup_ms, r.threads, r.grad_pass);
  }
  return text;
}

void check_options(const StepBenchOptions& options, bool params_given) {
  if (options.device == "cuda") {
#ifdef NIBBLE_WITH_CUDA
    throw Error(
        "CUDA step-bench is not available yet: this build has the CUDA backend, but "
        "step-bench times the CPU step only so far; use --device cpu");
#else
    throw Error(
        "CUDA step-bench is not built yet: this nibble was built without CUDA; use "
        "--device cpu");
#endif
  }
  if (options.device != "cpu") {
    throw InvalidArgument(fmt::format("unknown device '{}' (known: cpu, cuda)", options.device));
  }
  if (params_given && options.params <= 0) {
    throw InvalidArgument(fmt::format("--params must be positive, got {}", options.params));
  }
  if (options.steps < 1) {
    throw InvalidArgument(fmt::format("--steps must be at least 1, got {}", options.steps));
  }
  if (options.warmup < 0) {
    throw InvalidArgument(fmt::format("--warmup must not be negative, got {}", options.warmup));
  }
  if (options.threads < 0) {
    throw InvalidArgument(fmt::format("--threads must not be negative, got {}", options.threads));
  }
  if (options.block_size < 0) {
    throw InvalidArgument(
        fmt::format("--block-size must not be negative, got {}", options.block_size));
  }
}

void run_step_bench(const StepBenchOptions& options, bool params_given) {
  check_options(options, params_given);
  const std::vector<Algorithm> algorithms =
      parse_names<Algorithm>(options.algorithms, all_algorithms(), algorithm_from_name, "algorithm",
                             join_names(all_algorithms(), algorithm_name));
  const std::vector<Precision> precisions =
      parse_names<Precision>(options.precisions, all_precisions(), precision_from_name, "precision",
                             join_names(all_precisions(), precision_name));

  std::vector<ParamShape> set;
  std::string set_label;
  if (params_given) {
    set.push_back({"flat", {options.params}});
    set_label = "one flat tensor";
  } else {
    auto named = param_set_from_name(options.set);
    if (!named) {
      throw InvalidArgument(
          fmt::format("unknown parameter set '{}' (known: {})", options.set, kParamSetNames));
    }
    set = std::move(*named);
    set_label = fmt::format("{} ({} tensors)", options.set, set.size());
  }

  std::ofstream json_out;
  std::ofstream csv_out;
  if (!options.json_path.empty()) json_out = open_output(options.json_path);
  if (!options.csv_path.empty()) csv_out = open_output(options.csv_path);
  if (options.threads > 0) omp_set_num_threads(options.threads);

  ParamBuffers buffers(std::move(set), options.seed);
  // Measured while the optimizer state is not yet allocated, so the copy never competes with it
  // for memory; the buffers are freed before the first row.
  constexpr std::size_t kMinCopyBytes = std::size_t{256} << 20;
  const double memcpy_gbps = measure_memcpy_gbps(
      std::max(kMinCopyBytes, static_cast<std::size_t>(buffers.params) * sizeof(float)));

  std::vector<Result> results;
  const std::size_t total = algorithms.size() * precisions.size();
  for (Algorithm algorithm : algorithms) {
    for (Precision precision : precisions) {
      results.push_back(run_row(buffers, algorithm, precision, options, memcpy_gbps));
      const Result& r = results.back();
      fmt::print(stderr, "[{}/{}] {} {}: median {:.3f} ms, {:.1f} GB/s ({:.0f}% of memcpy)\n",
                 results.size(), total, algorithm_name(algorithm), precision_name(precision),
                 r.median_ms, r.gbps, 100.0 * r.ratio);
    }
  }

  fmt::print(
      "step-bench on cpu, {} threads: {}, {} params; {} timed steps after set-up + {} "
      "warm-up; memcpy {:.1f} GB/s (read + write); {}\n\n",
      omp_get_max_threads(), set_label, group_digits(buffers.params), options.steps, options.warmup,
      memcpy_gbps,
      options.check_finite || options.max_grad_norm > 0.0f
          ? "with the gradient check/norm pre-pass (+4 B/param)"
          : "update pass alone (no gradient check; --check-finite adds it)");
  std::vector<std::vector<std::string>> cells;
  for (const Result& r : results) {
    cells.push_back({std::string(algorithm_name(r.algorithm)),
                     std::string(precision_name(r.precision)), group_digits(r.params),
                     fmt::format("{:.3f}", r.median_ms), fmt::format("{:.3f}", r.min_ms),
                     fmt::format("{:.2f}", r.bytes_per_param_moved), fmt::format("{:.1f}", r.gbps),
                     fmt::format("{:.1f}", r.memcpy_gbps), fmt::format("{:.1f}%", 100.0 * r.ratio),
                     fmt::format("{:.3f}", r.state_bytes_per_param),
                     fmt::format("{:.1f}", r.setup_ms)});
  }
  fmt::print(
      "{}", format_table({"algorithm", "precision", "params", "median_ms", "min_ms", "B/param",
                          "GB/s", "memcpy GB/s", "ratio", "state B/param", "setup_ms"},
                         {Align::kLeft, Align::kLeft, Align::kRight, Align::kRight, Align::kRight,
                          Align::kRight, Align::kRight, Align::kRight, Align::kRight, Align::kRight,
                          Align::kRight},
                         cells));

  if (json_out.is_open()) {
    nlohmann::ordered_json json = nlohmann::ordered_json::array();
    for (const Result& r : results) json.push_back(to_json(r));
    finish_output(json_out, options.json_path, json.dump(2) + "\n");
  }
  if (csv_out.is_open()) finish_output(csv_out, options.csv_path, to_csv(results));
}

}  // namespace

void add_step_bench_command(CLI::App& app) {
  auto options = std::make_shared<StepBenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "step-bench",
      "Time the optimizer step alone for each algorithm and state precision, and compare its "
      "achieved bandwidth with the copy bandwidth measured in the same run.");
  sub->add_option("--device", options->device,
                  "Device to step on: cpu (cuda is not available yet)");
  sub->add_option("--algorithms", options->algorithms,
                  fmt::format("Comma-separated algorithms to run (default: all of {})",
                              join_names(all_algorithms(), algorithm_name)))
      ->delimiter(',')
      ->option_text("NAME,...");
  sub->add_option("--precisions", options->precisions,
                  fmt::format("Comma-separated state precisions to run (default: all of {})",
                              join_names(all_precisions(), precision_name)))
      ->delimiter(',')
      ->option_text("NAME,...");
  sub->add_option("--set", options->set, fmt::format("Parameter set to step: {}", kParamSetNames));
  CLI::Option* params = sub->add_option("--params", options->params,
                                        "Step one flat tensor of N parameters instead of --set")
                            ->option_text("N");
  sub->add_option("--warmup", options->warmup,
                  "Untimed steps after the set-up step (optimizer construction + first step)");
  sub->add_option("--steps", options->steps, "Timed steps per row (at least 1)");
  sub->add_option("--threads", options->threads, "OpenMP threads; 0 keeps OpenMP's default");
  sub->add_option("--block-size", options->block_size,
                  "Quantization block size in elements; 0 takes the default (256 for 8-bit, 128 "
                  "for 4-bit)");
  sub->add_option("--seed", options->seed, "Seed of the random parameters and gradients");
  sub->add_flag("--check-finite", options->check_finite,
                "Run the optimizer's gradient pre-pass that skips steps with inf/NaN gradients (on "
                "by default in the library; off here so the step compares with fused optimizer "
                "kernels that have none). Counted as 4 more bytes per parameter");
  sub->add_option("--max-grad-norm", options->max_grad_norm,
                  "Clip gradients to this global norm (0: off); runs the same pre-pass")
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--json", options->json_path, "Also write the results to FILE as JSON")
      ->option_text("FILE");
  sub->add_option("--csv", options->csv_path, "Also write the results to FILE as CSV")
      ->option_text("FILE");
  sub->footer(
      "Columns: median_ms and min_ms over the timed steps; B/param, the bytes a step must move per "
      "parameter (grad read, param read + write, each state tensor read + write); GB/s = B/param x "
      "params / median; memcpy GB/s, a multi-threaded memcpy of at least 256 MiB, read + write; "
      "ratio = GB/s / memcpy GB/s; state B/param, optimizer state allocated per parameter; "
      "setup_ms, optimizer construction + first step. Progress goes to stderr, one line per row.");
  sub->callback([options, params] { run_step_bench(*options, params->count() > 0); });
}

}  // namespace nibble::cli
