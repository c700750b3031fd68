// The measurements the benchmark suites are made of: one training run of the engine with every
// step timed, or one model timed in a single mode (forward, forward+backward, full step) on random
// tokens. A run that does not fit in memory comes back as an out-of-memory record, never as a crash.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "bench/stats.hpp"
#include "bench/system.hpp"
#include "nibble/optim.hpp"
#include "train/trainer.hpp"

namespace nibble::bench {

// An optimizer as people name it in a list: "adamw", "adamw:8bit", "lion:4bit".
struct OptimizerChoice {
  Algorithm algorithm = Algorithm::kAdamW;
  Precision precision = Precision::kFp32;
  std::string label() const;  // "adamw:fp32"
  bool operator==(const OptimizerChoice&) const = default;
};

// Comma-separated entries "name[:precision]"; an entry without a precision is expanded to every
// precision of `precisions`. Throws InvalidArgument naming an unknown algorithm or precision, an
// empty list or entry, or a duplicate.
std::vector<OptimizerChoice> parse_optimizers(std::string_view text, std::span<const Precision> precisions);
std::vector<Precision> parse_precisions(std::string_view text);
// The pieces of `text` between commas, as they stand (an empty piece included; "" is one empty
// piece): what every list flag is cut into before its entries are checked.
std::vector<std::string_view> split_at_commas(std::string_view text);
// Comma-separated positive integers ("16,32,64"); throws InvalidArgument naming the bad entry.
std::vector<std::int64_t> parse_int_list(std::string_view text, std::string_view what);

enum class RunStatus { kOk, kOutOfMemory };
std::string_view status_name(RunStatus status);  // "ok", "out of memory"

// One step as the trainer logs it (a timing run fills step, loss and the times), and whether it is
// one of the warm-up steps that the steady statistics leave out.
struct StepSample : train::StepLog {
  bool warmup = false;
};

struct RunRecord {
  RunStatus status = RunStatus::kOk;
  std::string message;  // the out-of-memory message
  std::int64_t param_count = 0;
  std::int64_t tokens_per_step = 0;
  train::MemoryPlan plan;
  std::int64_t measured_peak_bytes = 0;  // peak of nibble's counted buffers during the run
  std::int64_t rss_peak_bytes = 0;       // peak resident memory of the process during the run
  bool rss_peak_is_lifetime = false;     // the kernel refused a reset: the peak is since start
  double setup_s = 0.0;                  // before step 1: data, model, optimizer, first evaluation
  double warmup_s = 0.0;                 // setup_s + the warm-up steps
  double total_s = 0.0;
  std::vector<StepSample> steps;
  Summary steady_ms;                     // the steps after warm-up (n = 0 when there are none)
  double tokens_per_s = 0.0;             // steady tokens per second of step time
  double optimizer_share = 0.0;          // optimizer ms / step ms over the steady steps
  std::optional<float> first_val_loss, final_val_loss;
  float final_loss = 0.0f;
  bool reached_target = false;
  std::optional<std::int64_t> steps_to_target;
  std::optional<double> time_to_target_s;
  GpuSampler::Result gpu;
};

// Trains with `options` (quiet); the first `warmup_steps` steps are warm-up, the rest steady.
// `options.memory_limit` > 0 is enforced on the plan before and on nibble's buffers during the run
// (on top of what is live already); 0 leaves any limit the caller set in place.
// `target` (without stopping the run; options.target_val_loss stops it) fills steps_to_target and
// time_to_target_s at the first evaluation at or below it. `on_step` sees every step.
using StepCallback = std::function<void(const StepSample&)>;
RunRecord run_training(const train::TrainOptions& options, std::int64_t warmup_steps,
                       std::optional<float> target = std::nullopt, GpuSampler* sampler = nullptr,
                       const StepCallback& on_step = {});

enum class TimingMode { kForward, kForwardBackward, kStep };
std::string_view timing_mode_name(TimingMode mode);  // "forward", "forward+backward", "step"

struct TimingSpec {
  model::GptConfig config;  // vocab set
  std::int64_t batch = 1;
  std::int64_t seq = 0;     // 0: the context
  TimingMode mode = TimingMode::kStep;
  OptimizerChoice optimizer;  // kStep only
  std::int64_t warmup_steps = 1;
  std::int64_t measure_steps = 3;
  std::uint64_t seed = 1;
  std::int64_t memory_limit = 0;  // bytes; 0: none
};

// Times one mode on random tokens. The engine allocates its gradients and activation arena for
// every mode; only kStep adds optimizer state.
RunRecord run_timing(const TimingSpec& spec, GpuSampler* sampler = nullptr, const StepCallback& on_step = {});

// The memory a timing or training run of `config` needs in `mode`.
train::MemoryPlan plan_for_mode(const model::GptConfig& config, std::int64_t batch, std::int64_t seq,
                                TimingMode mode, const OptimizerOptions& options);

}  // namespace nibble::bench
