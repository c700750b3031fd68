// `nibble step-bench`: times the optimizer step alone, for each algorithm and state precision, on
// the CPU or a CUDA GPU, and judges it against the copy bandwidth measured in the same run
// (bandwidth is the budget); on the GPU, `--levels` adds the AdamW fp32 baselines it replaces.
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
#include "cli/flags.hpp"
#include "cli/param_sets.hpp"
#include "nibble/device.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "nibble/tensor.hpp"
#ifdef NIBBLE_WITH_CUDA
#include "optim/cuda/step_bench.hpp"
#endif

namespace nibble::cli {
namespace {

using Clock = std::chrono::steady_clock;

// Timed steps per row when --steps is not given: a GPU step is short, so it takes more of them.
constexpr int kCpuDefaultSteps = 10;
constexpr int kCudaDefaultSteps = 20;

struct StepBenchOptions {
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

// The AdamW fp32 implementation levels of --levels: nibble's own optimizer is "fused".
constexpr const char* kFusedLevel = "fused";

struct Result {
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
  double effective_ratio = 0.0;  // the same from the bytes the update must move (see summarize)
  double state_bytes_per_param = 0.0;
  double setup_ms = 0.0;
  int threads = 0;  // OpenMP threads; 0 on cuda
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

// Where every tensor of a parameter set starts in one packed buffer of floats: each tensor begins
// on an `alignment`-byte boundary (a cache line on the CPU, 256 bytes on the GPU).
struct ParamLayout {
  std::vector<ParamShape> shapes;
  std::vector<std::int64_t> offsets;  // in floats
  std::int64_t params = 0;
  std::int64_t floats = 0;  // padding included

  ParamLayout(std::vector<ParamShape> set, std::size_t alignment) : shapes(std::move(set)) {
    const auto align_floats = static_cast<std::int64_t>(alignment / sizeof(float));
    for (const ParamShape& p : shapes) {
      offsets.push_back(floats);
      const std::int64_t numel = shape_numel(p.shape);
      params += numel;
      floats += (numel + align_floats - 1) / align_floats * align_floats;
    }
  }

  std::size_t bytes() const { return static_cast<std::size_t>(floats) * sizeof(float); }

  std::vector<Param> make_params(float* data, float* grad) const {
    std::vector<Param> list;
    list.reserve(shapes.size());
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      list.push_back({shapes[i].name, shapes[i].shape, data + offsets[i], grad + offsets[i]});
    }
    return list;
  }
};

// The parameters and gradients of one CPU run, allocated and filled once and shared by every row.
struct HostParams {
  ParamLayout layout;
  Buffer data;
  Buffer grad;

  HostParams(std::vector<ParamShape> set, std::uint64_t seed)
      : layout(std::move(set), Buffer::kAlignment), data(layout.bytes()), grad(layout.bytes()) {
    fill_normal(reinterpret_cast<float*>(data.data()), layout.floats, 0.02f, seed);
    fill_normal(reinterpret_cast<float*>(grad.data()), layout.floats, 1e-3f, seed + 1);
  }

  std::vector<Param> make_params() {
    return layout.make_params(reinterpret_cast<float*>(data.data()),
                              reinterpret_cast<float*>(grad.data()));
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

bool grad_pass(const StepBenchOptions& options) {
  return options.check_finite || options.max_grad_norm > 0.0f;
}

// Bytes the update must move per parameter: grad read (4), param read + write (8), every state
// tensor read + written; weighted over tensors by size. The gradient pre-pass is not included.
double update_bytes_per_param(const Optimizer& optimizer) {
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
  return params > 0 ? bytes / static_cast<double>(params) : 0.0;
}

// The pre-pass that checks gradients and takes their global norm reads every gradient once more
// before the update may touch anything.
double bytes_moved_per_param(const Optimizer& optimizer) {
  const OptimizerOptions& options = optimizer.options();
  const bool pre_pass = options.check_finite || options.max_grad_norm > 0.0f;
  return update_bytes_per_param(optimizer) + (pre_pass ? 4.0 : 0.0);
}

// The figures of a row from its step times. `moved` is what the row's step reads and writes per
// parameter (ratio); `floor` is what the update must move (effective): for nibble's rows the update
// without the gradient pre-pass, for the --levels baselines the fused AdamW fp32 update's 28 B.
// So ratio says how well a kernel uses the bandwidth for what it moves, and effective says how
// close the step comes to the fastest step possible for this work; effective ratios of two rows
// of the same algorithm and precision are their speed ratio.
void summarize(Result& r, const std::vector<double>& times, double moved, double floor) {
  r.median_ms = median(times);
  r.min_ms = *std::min_element(times.begin(), times.end());
  r.bytes_per_param_moved = moved;
  const double seconds = r.median_ms * 1e-3;
  const auto params = static_cast<double>(r.params);
  r.gbps = moved * params / seconds / 1e9;
  r.ratio = r.memcpy_gbps > 0.0 ? r.gbps / r.memcpy_gbps : 0.0;
  r.effective_ratio = r.memcpy_gbps > 0.0 ? floor * params / seconds / 1e9 / r.memcpy_gbps : 0.0;
}

Result run_cpu_row(HostParams& buffers, Algorithm algorithm, Precision precision,
                   const StepBenchOptions& options, double memcpy_gbps) {
  Result result;
  result.device = "cpu";
  result.algorithm = algorithm;
  result.precision = precision;
  result.params = buffers.layout.params;
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

  summarize(result, times, bytes_moved_per_param(optimizer), update_bytes_per_param(optimizer));
  result.state_bytes_per_param = optimizer.state_stats().bytes_per_param();
  result.grad_pass = grad_pass(options);
  return result;
}

#ifdef NIBBLE_WITH_CUDA

// The parameters and gradients of one GPU run, in device memory, filled on the device once and
// shared by every row. Each tensor starts on a 256-byte boundary, as a caching allocator places it.
struct DeviceParams {
  static constexpr std::size_t kAlignment = 256;
  ParamLayout layout;
  cuda::DeviceBuffer data;
  cuda::DeviceBuffer grad;

  DeviceParams(std::vector<ParamShape> set, std::uint64_t seed)
      : layout(std::move(set), kAlignment),
        data(layout.bytes(), "parameters"),
        grad(layout.bytes(), "gradients") {
    cuda::fill_normal(data.floats(), layout.floats, 0.02f, seed, nullptr);
    cuda::fill_normal(grad.floats(), layout.floats, 1e-3f, seed + 1, nullptr);
    cuda::synchronize_stream(nullptr);
  }

  std::vector<Param> make_params() const {
    return layout.make_params(data.floats(), grad.floats());
  }
};

// Every launch goes to the default stream; the optimizer and the timer share it.
Result run_cuda_row(const DeviceParams& buffers, Algorithm algorithm, Precision precision,
                    const StepBenchOptions& options, double copy_gbps) {
  Result result;
  result.device = "cuda";
  result.algorithm = algorithm;
  result.precision = precision;
  result.params = buffers.layout.params;
  result.memcpy_gbps = copy_gbps;

  std::vector<ParamGroup> groups(1);
  groups[0].params = buffers.make_params();
  OptimizerOptions optimizer_opts = optimizer_options(algorithm, precision, options);
  optimizer_opts.device = Device::kCuda;
  optimizer_opts.cuda_stream = nullptr;
  const auto setup_start = Clock::now();
  Optimizer optimizer(std::move(groups), std::move(optimizer_opts));
  optimizer.step();  // synchronises
  result.setup_ms = milliseconds(Clock::now() - setup_start);

  // Warm-up is queued without a wait, so the timed steps find the GPU busy rather than idle.
  for (int i = 0; i < options.warmup; ++i) optimizer.enqueue_step();
  const std::vector<double> times =
      cuda::time_calls(options.steps, [&] { optimizer.enqueue_step(); }, nullptr);
  // A skipped step does no work and would time as impossibly fast.
  if (const std::int64_t skipped = optimizer.skipped_steps(); skipped > 0) {
    throw Error(fmt::format("{} {}: {} of {} steps were skipped (non-finite gradients)",
                            algorithm_name(algorithm), precision_name(precision), skipped,
                            optimizer.step_count() + skipped));
  }

  summarize(result, times, bytes_moved_per_param(optimizer), update_bytes_per_param(optimizer));
  result.state_bytes_per_param = optimizer.state_stats().bytes_per_param();
  result.grad_pass = grad_pass(options);
  return result;
}

// An AdamW fp32 baseline of --levels on the same parameters, hyperparameters as the fused row.
Result run_level_row(const DeviceParams& buffers, cuda::AdamWLevel level,
                     const StepBenchOptions& options, double copy_gbps) {
  Result result;
  result.device = "cuda";
  result.algorithm = Algorithm::kAdamW;
  result.precision = Precision::kFp32;
  result.level = cuda::adamw_level_name(level);
  result.params = buffers.layout.params;
  result.memcpy_gbps = copy_gbps;

  const Hyper hyper = *optimizer_options(Algorithm::kAdamW, Precision::kFp32, options).hyper;
  std::vector<cuda::AdamWTensor> tensors;
  for (std::size_t i = 0; i < buffers.layout.shapes.size(); ++i) {
    const std::int64_t offset = buffers.layout.offsets[i];
    tensors.push_back({buffers.data.floats() + offset, buffers.grad.floats() + offset,
                       shape_numel(buffers.layout.shapes[i].shape)});
  }
  const auto setup_start = Clock::now();
  cuda::AdamWBaseline baseline(level, std::move(tensors), hyper, nullptr);
  baseline.enqueue_step();
  cuda::synchronize_stream(nullptr);
  result.setup_ms = milliseconds(Clock::now() - setup_start);

  for (int i = 0; i < options.warmup; ++i) baseline.enqueue_step();
  const std::vector<double> times =
      cuda::time_calls(options.steps, [&] { baseline.enqueue_step(); }, nullptr);

  summarize(result, times, baseline.bytes_moved_per_param(), cuda::kAdamWFp32BytesPerParam);
  result.state_bytes_per_param =
      static_cast<double>(baseline.state_bytes()) / static_cast<double>(baseline.params());
  result.grad_pass = false;
  return result;
}

#endif  // NIBBLE_WITH_CUDA

void report_progress(const Result& r, std::size_t done, std::size_t total) {
  const std::string level = r.level == kFusedLevel ? "" : " " + r.level;
  fmt::print(stderr, "[{}/{}] {} {}{}: median {:.3f} ms, {:.1f} GB/s ({:.0f}% of memcpy)\n", done,
             total, algorithm_name(r.algorithm), precision_name(r.precision), level, r.median_ms,
             r.gbps, 100.0 * r.ratio);
}

// The rows of a run and the line that heads their table.
struct Run {
  std::vector<Result> results;
  std::string header;
};

std::string pre_pass_note(const StepBenchOptions& options) {
  return grad_pass(options) ? "with the gradient check/norm pre-pass (+4 B/param)"
                            : "update pass alone (no gradient check; --check-finite adds it)";
}

Run run_cpu(std::vector<ParamShape> set, const std::string& set_label,
            const std::vector<Algorithm>& algorithms, const std::vector<Precision>& precisions,
            const StepBenchOptions& options) {
  if (options.threads > 0) omp_set_num_threads(options.threads);
  HostParams buffers(std::move(set), options.seed);
  // Measured while the optimizer state is not yet allocated, so the copy never competes with it
  // for memory; the buffers are freed before the first row.
  constexpr std::size_t kMinCopyBytes = std::size_t{256} << 20;
  const double memcpy_gbps = measure_memcpy_gbps(
      std::max(kMinCopyBytes, static_cast<std::size_t>(buffers.layout.params) * sizeof(float)));

  Run run;
  const std::size_t total = algorithms.size() * precisions.size();
  for (Algorithm algorithm : algorithms) {
    for (Precision precision : precisions) {
      run.results.push_back(run_cpu_row(buffers, algorithm, precision, options, memcpy_gbps));
      report_progress(run.results.back(), run.results.size(), total);
    }
  }
  run.header = fmt::format(
      "step-bench on cpu, {} threads: {}, {} params; {} timed steps after set-up + {} "
      "warm-up; memcpy {:.1f} GB/s (read + write); {}",
      omp_get_max_threads(), set_label, group_digits(buffers.layout.params), options.steps,
      options.warmup, memcpy_gbps, pre_pass_note(options));
  return run;
}

#ifdef NIBBLE_WITH_CUDA
Run run_cuda(std::vector<ParamShape> set, const std::string& set_label,
             const std::vector<Algorithm>& algorithms, const std::vector<Precision>& precisions,
             const StepBenchOptions& options) {
  DeviceParams buffers(std::move(set), options.seed);
  // Measured before any optimizer state exists, so the two copy buffers fit beside the parameters
  // and gradients; they are freed before the first row.
  constexpr std::size_t kMinCopyBytes = std::size_t{256} << 20;
  const cuda::CopyBandwidth copy = cuda::measure_copy_bandwidth(
      std::max(kMinCopyBytes, 2 * static_cast<std::size_t>(buffers.layout.params) * sizeof(float)),
      nullptr);

  Run run;
  const std::size_t total = algorithms.size() * precisions.size() + (options.levels ? 2 : 0);
  for (Algorithm algorithm : algorithms) {
    for (Precision precision : precisions) {
      run.results.push_back(run_cuda_row(buffers, algorithm, precision, options, copy.gbps));
      report_progress(run.results.back(), run.results.size(), total);
      if (options.levels && algorithm == Algorithm::kAdamW && precision == Precision::kFp32) {
        for (cuda::AdamWLevel level : {cuda::AdamWLevel::kLoop, cuda::AdamWLevel::kForeach}) {
          run.results.push_back(run_level_row(buffers, level, options, copy.gbps));
          report_progress(run.results.back(), run.results.size(), total);
        }
      }
    }
  }
  run.header = fmt::format(
      "step-bench on cuda ({}): {}, {} params; {} timed steps after set-up + {} warm-up, CUDA "
      "events around each step; device copy {:.1f} GB/s (cudaMemcpyAsync of {} MiB, read + "
      "write); {}{}",
      cuda_device_name(), set_label, group_digits(buffers.layout.params), options.steps,
      options.warmup, copy.gbps, group_digits(static_cast<std::int64_t>(copy.bytes >> 20)),
      pre_pass_note(options),
      options.levels ? "; loop and foreach are AdamW fp32 baselines with no gradient pre-pass, "
                       "effective counts 28 B/param for every AdamW fp32 level"
                     : "");
  return run;
}
#endif

nlohmann::ordered_json to_json(const Result& r) {
  return {{"device", r.device},
          {"algorithm", algorithm_name(r.algorithm)},
          {"precision", precision_name(r.precision)},
          {"level", r.level},
          {"params", r.params},
          {"median_ms", r.median_ms},
          {"min_ms", r.min_ms},
          {"bytes_per_param_moved", r.bytes_per_param_moved},
          {"gbps", r.gbps},
          {"memcpy_gbps", r.memcpy_gbps},
          {"ratio", r.ratio},
          {"effective_ratio", r.effective_ratio},
          {"state_bytes_per_param", r.state_bytes_per_param},
          {"setup_ms", r.setup_ms},
          {"threads", r.threads},
          {"grad_pass", r.grad_pass}};
}

std::string to_csv(const std::vector<Result>& results) {
  std::string text =
      "device,algorithm,precision,level,params,median_ms,min_ms,bytes_per_param_moved,gbps,"
      "memcpy_gbps,ratio,effective_ratio,state_bytes_per_param,setup_ms,threads,grad_pass\n";
  for (const Result& r : results) {
    text += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", r.device,
                        algorithm_name(r.algorithm), precision_name(r.precision), r.level,
                        r.params, r.median_ms, r.min_ms, r.bytes_per_param_moved, r.gbps,
                        r.memcpy_gbps, r.ratio, r.effective_ratio, r.state_bytes_per_param,
                        r.setup_ms, r.threads, r.grad_pass);
  }
  return text;
}

void check_options(const StepBenchOptions& options, bool params_given) {
  if (options.device != "cpu" && options.device != "cuda") {
    throw InvalidArgument(fmt::format("unknown device '{}' (known: cpu, cuda)", options.device));
  }
  const bool cuda = options.device == "cuda";
  if (options.levels && !cuda) {
    throw InvalidArgument(
        "--levels times the AdamW fp32 loop and foreach GPU baselines beside the fused step; it "
        "needs --device cuda");
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
  if (cuda && options.threads > 0) {
    throw InvalidArgument(fmt::format(
        "--threads {} sets OpenMP threads of the CPU step; it has no meaning with --device cuda",
        options.threads));
  }
  if (options.block_size < 0) {
    throw InvalidArgument(
        fmt::format("--block-size must not be negative, got {}", options.block_size));
  }
}

// Whether the device asked for exists; after every flag check, before any work.
void check_device(const StepBenchOptions& options) {
  if (options.device != "cuda") return;
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

void run_step_bench(StepBenchOptions options, bool params_given, bool steps_given) {
  if (options.device == "cuda" && !steps_given) options.steps = kCudaDefaultSteps;
  check_options(options, params_given);
  const std::vector<Algorithm> algorithms =
      parse_names<Algorithm>(options.algorithms, all_algorithms(), algorithm_from_name, "algorithm",
                             join_names(all_algorithms(), algorithm_name));
  const std::vector<Precision> precisions =
      parse_names<Precision>(options.precisions, all_precisions(), precision_from_name, "precision",
                             join_names(all_precisions(), precision_name));
  if (options.levels &&
      (std::find(algorithms.begin(), algorithms.end(), Algorithm::kAdamW) == algorithms.end() ||
       std::find(precisions.begin(), precisions.end(), Precision::kFp32) == precisions.end())) {
    throw InvalidArgument(
        "--levels sets the AdamW fp32 baselines beside nibble's fused AdamW fp32 step; include "
        "adamw in --algorithms and fp32 in --precisions");
  }

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

  check_device(options);
  std::ofstream json_out;
  std::ofstream csv_out;
  if (!options.json_path.empty()) json_out = open_output(options.json_path);
  if (!options.csv_path.empty()) csv_out = open_output(options.csv_path);

  Run run;
  if (options.device == "cpu") {
    run = run_cpu(std::move(set), set_label, algorithms, precisions, options);
  } else {
#ifdef NIBBLE_WITH_CUDA
    run = run_cuda(std::move(set), set_label, algorithms, precisions, options);
#else
    throw DeviceError("--device cuda: this nibble was built without the CUDA backend");
#endif
  }

  fmt::print("{}\n\n", run.header);
  std::vector<std::vector<std::string>> cells;
  for (const Result& r : run.results) {
    cells.push_back({std::string(algorithm_name(r.algorithm)),
                     std::string(precision_name(r.precision)), r.level, group_digits(r.params),
                     fmt::format("{:.3f}", r.median_ms), fmt::format("{:.3f}", r.min_ms),
                     fmt::format("{:.2f}", r.bytes_per_param_moved), fmt::format("{:.1f}", r.gbps),
                     fmt::format("{:.1f}", r.memcpy_gbps), fmt::format("{:.1f}%", 100.0 * r.ratio),
                     fmt::format("{:.1f}%", 100.0 * r.effective_ratio),
                     fmt::format("{:.3f}", r.state_bytes_per_param),
                     fmt::format("{:.1f}", r.setup_ms)});
  }
  fmt::print("{}",
             format_table({"algorithm", "precision", "level", "params", "median_ms", "min_ms",
                           "B/param", "GB/s", "memcpy GB/s", "ratio", "effective",
                           "state B/param", "setup_ms"},
                          {Align::kLeft, Align::kLeft, Align::kLeft, Align::kRight, Align::kRight,
                           Align::kRight, Align::kRight, Align::kRight, Align::kRight,
                           Align::kRight, Align::kRight, Align::kRight, Align::kRight},
                          cells));

  if (json_out.is_open()) {
    nlohmann::ordered_json json = nlohmann::ordered_json::array();
    for (const Result& r : run.results) json.push_back(to_json(r));
    finish_output(json_out, options.json_path, json.dump(2) + "\n");
  }
  if (csv_out.is_open()) finish_output(csv_out, options.csv_path, to_csv(run.results));
}

}  // namespace

void add_step_bench_command(CLI::App& app) {
  auto options = std::make_shared<StepBenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "step-bench",
      "Time the optimizer step alone for each algorithm and state precision, on the CPU or a CUDA "
      "GPU, and compare its achieved bandwidth with the copy bandwidth measured in the same run.");
  sub->add_option("--device", options->device,
                  "Device to step on: cpu, or cuda (a build with the CUDA backend and a visible "
                  "GPU; parameters, gradients and state then live in GPU memory)");
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
                            ->check(at_least(1))
                            ->option_text("N");
  sub->add_option("--warmup", options->warmup,
                  "Untimed steps after the set-up step (optimizer construction + first step), on "
                  "either device")
      ->check(non_negative());
  CLI::Option* steps =
      sub->add_option("--steps", options->steps,
                      fmt::format("Timed steps per row (at least 1); default {} on cpu, {} on cuda",
                                  kCpuDefaultSteps, kCudaDefaultSteps))
          ->check(at_least(1))
          ->default_str(fmt::format("{} on cpu, {} on cuda", kCpuDefaultSteps, kCudaDefaultSteps));
  sub->add_option("--threads", options->threads,
                  "OpenMP threads of the CPU step; 0 keeps OpenMP's default (cpu only; refused "
                  "with --device cuda)")
      ->check(number_in(0, false, 4096, false));
  sub->add_option("--block-size", options->block_size,
                  "Quantization block size in elements; 0 takes the default (256 for 8-bit, 128 "
                  "for 4-bit)")
      ->check(number_in(0, false, 4096, false));
  sub->add_option("--seed", options->seed, "Seed of the random parameters and gradients")->check(non_negative());
  sub->add_flag("--check-finite", options->check_finite,
                "Run the optimizer's gradient pre-pass that skips steps with inf/NaN gradients (on "
                "by default in the library; off here so the step compares with fused optimizer "
                "kernels that have none). Counted as 4 more bytes per parameter");
  sub->add_option("--max-grad-norm", options->max_grad_norm,
                  "Clip gradients to this global norm (0: off); runs the same pre-pass")
      ->check(non_negative());
  sub->add_flag("--levels", options->levels,
                "cuda only: beside nibble's fused AdamW fp32 row, time two AdamW fp32 baselines "
                "on the same parameters: 'loop' (one launch of an elementwise AdamW kernel per "
                "tensor) and 'foreach' (three op-by-op passes, m, v, then p, each one launch over "
                "all tensors). Needs adamw and fp32 among the selected algorithms and precisions; "
                "the baselines run no gradient pre-pass");
  sub->add_option("--json", options->json_path, "Also write the results to FILE as JSON")
      ->option_text("FILE");
  sub->add_option("--csv", options->csv_path, "Also write the results to FILE as CSV")
      ->option_text("FILE");
  sub->footer(
      "Columns: level, the implementation (fused: nibble's optimizer; loop, foreach: the --levels "
      "baselines); median_ms and min_ms over the timed steps (cpu: wall clock around step(); cuda: "
      "CUDA events around each enqueue_step(), one after another on one stream); B/param, the bytes"
      " the row's step moves per parameter (grad read, param read + write, each state tensor read +"
      " write, +4 with the gradient pre-pass; foreach counts every pass's reads and writes, 40); "
      "GB/s = B/param x params / median; memcpy GB/s, the copy bandwidth, read + write (cpu: a "
      "multi-threaded memcpy of at least 256 MiB; cuda: the median of 10 device-to-device "
      "cudaMemcpyAsync of max(256 MiB, 2 x parameter bytes), less if free GPU memory is short); "
      "ratio = GB/s / memcpy GB/s, how well the row uses the bandwidth for what it moves; effective"
      " = the same with the bytes the update must move (no pre-pass; 28 for every AdamW fp32 "
      "level), so two rows of one algorithm and precision compare as speed; state B/param, "
      "optimizer state allocated per parameter; setup_ms, optimizer construction + first step "
      "(synchronised). threads in JSON/CSV is 0 on cuda. Progress goes to stderr, one line per "
      "row.");
  sub->callback([options, params, steps] {
    run_step_bench(*options, params->count() > 0, steps->count() > 0);
  });
}

}  // namespace nibble::cli
