// The optimizer step benchmark (step_bench.hpp): parameters and gradients filled once per run, one
// optimizer per row timed after its set-up and warm-up, and the copy bandwidth of the same machine.
#include "bench/step_bench.hpp"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <nlohmann/json.hpp>
#include <utility>

#include "bench/report.hpp"
#include "bench/stats.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "nibble/tensor.hpp"
#ifdef NIBBLE_WITH_CUDA
#include "bench/cuda/step_baselines.hpp"
#endif

namespace nibble::bench {
namespace {

using Clock = std::chrono::steady_clock;

double milliseconds(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

// Seconds of `count` copies of `bytes` (after one untimed copy that touches the pages). Each
// thread copies one contiguous slice, as a multi-tensor step streams.
std::vector<double> time_memcpy(std::size_t bytes, int count) {
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
  for (int i = 0; i < count; ++i) {
    const auto start = Clock::now();
    copy();
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  return seconds;
}

// Copy bandwidth counted as bytes read + written, the figure a memory-bound step is judged
// against. Copies far larger than any cache: at least 256 MiB, the parameter bytes up to 1 GiB.
struct CopyBandwidth {
  static constexpr int kCopies = 5;
  std::size_t bytes;
  std::vector<double> seconds;

  explicit CopyBandwidth(std::int64_t params)
      : bytes(std::clamp(static_cast<std::size_t>(params) * sizeof(float), std::size_t{256} << 20,
                         std::size_t{1} << 30)) {}
  void measure() {
    const std::vector<double> more = time_memcpy(bytes, kCopies);
    seconds.insert(seconds.end(), more.begin(), more.end());
  }
  // The fastest copy: noise only slows a copy down, so the fastest is the bandwidth the machine
  // showed around the row (the median copy swung by a third between rows whose steps held steady).
  double gbps() const { return 2.0 * static_cast<double>(bytes) / summarize(seconds).min / 1e9; }
};

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
  std::vector<StepBenchTensor> shapes;
  std::vector<std::int64_t> offsets;  // in floats
  std::int64_t params = 0;
  std::int64_t floats = 0;  // padding included

  ParamLayout(std::vector<StepBenchTensor> set, std::size_t alignment) : shapes(std::move(set)) {
    const auto align_floats = static_cast<std::int64_t>(alignment / sizeof(float));
    for (const StepBenchTensor& p : shapes) {
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

  HostParams(std::vector<StepBenchTensor> set, std::uint64_t seed)
      : layout(std::move(set), Buffer::kAlignment), data(layout.bytes()), grad(layout.bytes()) {
    fill_normal(reinterpret_cast<float*>(data.data()), layout.floats, 0.02f, seed);
    fill_normal(reinterpret_cast<float*>(grad.data()), layout.floats, 1e-3f, seed + 1);
  }

  std::vector<Param> make_params() {
    return layout.make_params(reinterpret_cast<float*>(data.data()),
                              reinterpret_cast<float*>(grad.data()));
  }
};

OptimizerOptions optimizer_options(Algorithm algorithm, Precision precision, const StepBenchOptions& run) {
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
  options.block_size = run.block_size;
  options.check_finite = run.check_finite;
  options.max_grad_norm = run.max_grad_norm;
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
void fill_figures(StepBenchRow& r, const std::vector<double>& times, double moved, double floor) {
  const Summary spread = summarize(times);
  r.median_ms = spread.median;
  r.min_ms = spread.min;
  r.bytes_per_param_moved = moved;
  const double seconds = r.median_ms * 1e-3;
  const auto params = static_cast<double>(r.params);
  r.gbps = moved * params / seconds / 1e9;
  r.ratio = r.memcpy_gbps > 0.0 ? r.gbps / r.memcpy_gbps : 0.0;
  r.effective_ratio = r.memcpy_gbps > 0.0 ? floor * params / seconds / 1e9 / r.memcpy_gbps : 0.0;
}

// A row's identity and the copy bandwidth it is judged against; its figures come from fill_figures.
StepBenchRow new_row(const char* device, Algorithm algorithm, Precision precision, std::int64_t params,
                     double memcpy_gbps) {
  StepBenchRow row;
  row.device = device;
  row.algorithm = algorithm;
  row.precision = precision;
  row.params = params;
  row.memcpy_gbps = memcpy_gbps;
  return row;
}

// The copy bandwidth of a row is measured around it, before its optimizer exists and after it is
// gone: on a machine whose bandwidth drifts, each row is judged against the minutes it ran in, and
// the copies never compete with its state for memory.
StepBenchRow run_cpu_row(HostParams& buffers, Algorithm algorithm, Precision precision,
                         const StepBenchOptions& options) {
  CopyBandwidth copy(buffers.layout.params);
  copy.measure();
  StepBenchRow result = new_row("cpu", algorithm, precision, buffers.layout.params, 0.0);
  result.threads = omp_get_max_threads();

  std::vector<double> times;
  double moved = 0.0, floor = 0.0;
  {
    std::vector<ParamGroup> groups(1);
    groups[0].params = buffers.make_params();
    const auto setup_start = Clock::now();
    Optimizer optimizer(std::move(groups), optimizer_options(algorithm, precision, options));
    optimizer.step();
    result.setup_ms = milliseconds(Clock::now() - setup_start);

    for (int i = 0; i < options.warmup; ++i) optimizer.step();
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
    moved = bytes_moved_per_param(optimizer);
    floor = update_bytes_per_param(optimizer);
    result.state_bytes_per_param = optimizer.state_stats().bytes_per_param();
  }
  copy.measure();
  result.memcpy_gbps = copy.gbps();
  fill_figures(result, times, moved, floor);
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

  DeviceParams(std::vector<StepBenchTensor> set, std::uint64_t seed)
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
StepBenchRow run_cuda_row(const DeviceParams& buffers, Algorithm algorithm, Precision precision,
                          const StepBenchOptions& options, double copy_gbps) {
  StepBenchRow result = new_row("cuda", algorithm, precision, buffers.layout.params, copy_gbps);

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

  fill_figures(result, times, bytes_moved_per_param(optimizer), update_bytes_per_param(optimizer));
  result.state_bytes_per_param = optimizer.state_stats().bytes_per_param();
  result.grad_pass = grad_pass(options);
  return result;
}

// An AdamW fp32 baseline of --levels on the same parameters, hyperparameters as the fused row.
StepBenchRow run_level_row(const DeviceParams& buffers, cuda::AdamWLevel level,
                           const StepBenchOptions& options, double copy_gbps) {
  StepBenchRow result = new_row("cuda", Algorithm::kAdamW, Precision::kFp32, buffers.layout.params, copy_gbps);
  result.level = cuda::adamw_level_name(level);

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

  fill_figures(result, times, baseline.bytes_moved_per_param(), cuda::kAdamWFp32BytesPerParam);
  result.state_bytes_per_param =
      static_cast<double>(baseline.state_bytes()) / static_cast<double>(baseline.params());
  result.grad_pass = false;
  return result;
}

#endif  // NIBBLE_WITH_CUDA

std::string pre_pass_note(const StepBenchOptions& options) {
  return grad_pass(options) ? "with the gradient check/norm pre-pass (+4 B/param)"
                            : "update pass alone (no gradient check; --check-finite adds it)";
}

StepBenchRun run_cpu(const StepBenchOptions& options, const StepBenchProgress& progress) {
  if (options.threads > 0) omp_set_num_threads(options.threads);
  HostParams buffers(options.tensors, options.seed);

  StepBenchRun run;
  const std::size_t total = options.algorithms.size() * options.precisions.size();
  for (Algorithm algorithm : options.algorithms) {
    for (Precision precision : options.precisions) {
      run.rows.push_back(run_cpu_row(buffers, algorithm, precision, options));
      if (progress) progress(run.rows.back(), run.rows.size(), total);
    }
  }
  const auto [low, high] = std::minmax_element(run.rows.begin(), run.rows.end(), [](const auto& a, const auto& b) {
    return a.memcpy_gbps < b.memcpy_gbps;
  });
  run.header = fmt::format(
      "step-bench on cpu, {} threads: {}, {} params; {} timed steps after set-up + {} "
      "warm-up; memcpy (read + write) measured around each row, {:.1f} to {:.1f} GB/s; {}",
      omp_get_max_threads(), options.set_label, group_digits(buffers.layout.params), options.steps,
      options.warmup, low->memcpy_gbps, high->memcpy_gbps, pre_pass_note(options));
  return run;
}

#ifdef NIBBLE_WITH_CUDA
StepBenchRun run_cuda(const StepBenchOptions& options, const StepBenchProgress& progress) {
  DeviceParams buffers(options.tensors, options.seed);
  // Measured before any optimizer state exists, so the two copy buffers fit beside the parameters
  // and gradients; they are freed before the first row.
  constexpr std::size_t kMinCopyBytes = std::size_t{256} << 20;
  const cuda::CopyTimes copy = cuda::time_device_copies(
      std::max(kMinCopyBytes, 2 * static_cast<std::size_t>(buffers.layout.params) * sizeof(float)),
      nullptr);
  // Bytes read + written per second, from the median copy.
  const double copy_gbps = 2.0 * static_cast<double>(copy.bytes) / (summarize(copy.ms).median * 1e-3) / 1e9;

  StepBenchRun run;
  const std::size_t total = options.algorithms.size() * options.precisions.size() + (options.levels ? 2 : 0);
  for (Algorithm algorithm : options.algorithms) {
    for (Precision precision : options.precisions) {
      run.rows.push_back(run_cuda_row(buffers, algorithm, precision, options, copy_gbps));
      if (progress) progress(run.rows.back(), run.rows.size(), total);
      if (options.levels && algorithm == Algorithm::kAdamW && precision == Precision::kFp32) {
        for (cuda::AdamWLevel level : {cuda::AdamWLevel::kLoop, cuda::AdamWLevel::kForeach}) {
          run.rows.push_back(run_level_row(buffers, level, options, copy_gbps));
          if (progress) progress(run.rows.back(), run.rows.size(), total);
        }
      }
    }
  }
  run.header = fmt::format(
      "step-bench on cuda ({}): {}, {} params; {} timed steps after set-up + {} warm-up, CUDA "
      "events around each step; device copy {:.1f} GB/s (cudaMemcpyAsync of {} MiB, read + "
      "write); {}{}",
      cuda_device_name(), options.set_label, group_digits(buffers.layout.params), options.steps,
      options.warmup, copy_gbps, group_digits(static_cast<std::int64_t>(copy.bytes >> 20)),
      pre_pass_note(options),
      options.levels ? "; loop and foreach are AdamW fp32 baselines with no gradient pre-pass, "
                       "effective counts 28 B/param for every AdamW fp32 level"
                     : "");
  return run;
}
#endif

nlohmann::ordered_json row_json(const StepBenchRow& r) {
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

}  // namespace

StepBenchRun run_step_bench(const StepBenchOptions& options, const StepBenchProgress& progress) {
  if (options.algorithms.empty() || options.precisions.empty()) {
    throw Error(fmt::format("step-bench: nothing to time ({} algorithms, {} precisions)", options.algorithms.size(),
                            options.precisions.size()));
  }
  if (options.device == Device::kCpu) return run_cpu(options, progress);
#ifdef NIBBLE_WITH_CUDA
  return run_cuda(options, progress);
#else
  throw DeviceError("--device cuda: this nibble was built without the CUDA backend");
#endif
}

std::string step_bench_table(const std::vector<StepBenchRow>& rows) {
  std::vector<std::vector<std::string>> cells;
  for (const StepBenchRow& r : rows) {
    cells.push_back({std::string(algorithm_name(r.algorithm)),
                     std::string(precision_name(r.precision)), r.level, group_digits(r.params),
                     fmt::format("{:.3f}", r.median_ms), fmt::format("{:.3f}", r.min_ms),
                     fmt::format("{:.2f}", r.bytes_per_param_moved), fmt::format("{:.1f}", r.gbps),
                     fmt::format("{:.1f}", r.memcpy_gbps), fmt::format("{:.1f}%", 100.0 * r.ratio),
                     fmt::format("{:.1f}%", 100.0 * r.effective_ratio),
                     fmt::format("{:.3f}", r.state_bytes_per_param),
                     fmt::format("{:.1f}", r.setup_ms)});
  }
  return format_table({"algorithm", "precision", "level", "params", "median_ms", "min_ms", "B/param", "GB/s",
                       "memcpy GB/s", "ratio", "effective", "state B/param", "setup_ms"},
                      {Align::kLeft, Align::kLeft, Align::kLeft, Align::kRight, Align::kRight, Align::kRight,
                       Align::kRight, Align::kRight, Align::kRight, Align::kRight, Align::kRight, Align::kRight,
                       Align::kRight},
                      cells);
}

std::string step_bench_json(const std::vector<StepBenchRow>& rows) {
  nlohmann::ordered_json json = nlohmann::ordered_json::array();
  for (const StepBenchRow& r : rows) json.push_back(row_json(r));
  return json.dump(2) + "\n";
}

std::string step_bench_csv(const std::vector<StepBenchRow>& rows) {
  std::string text =
      "device,algorithm,precision,level,params,median_ms,min_ms,bytes_per_param_moved,gbps,"
      "memcpy_gbps,ratio,effective_ratio,state_bytes_per_param,setup_ms,threads,grad_pass\n";
  for (const StepBenchRow& r : rows) {
    text += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", r.device,
                        algorithm_name(r.algorithm), precision_name(r.precision), r.level,
                        r.params, r.median_ms, r.min_ms, r.bytes_per_param_moved, r.gbps,
                        r.memcpy_gbps, r.ratio, r.effective_ratio, r.state_bytes_per_param,
                        r.setup_ms, r.threads, r.grad_pass);
  }
  return text;
}

}  // namespace nibble::bench
