// What the suites of nibble bench share: model configuration from the options, number formatting,
// the runs and steps tables every training suite reports, a runner that reports progress, plot
// points with their confidence bands, and the memory chart. Each suite is one file beside this one.
#pragma once

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "bench/report.hpp"
#include "bench/runner.hpp"
#include "bench/suites.hpp"
#include "bench/svg.hpp"
#include "bench/system.hpp"
#include "model/gpt.hpp"

namespace nibble::bench::suites {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- the model of a run -------------------------------------------------------------------------

// The vocabulary: the option's, else 65 for the character presets (tiny, char) and GPT-2's above.
std::int64_t vocab_for(const SuiteOptions& o, std::string_view preset);
model::GptConfig config_for(const SuiteOptions& o, std::string_view preset);
// Tokens per sequence: the option's, else the preset's context.
std::int64_t seq_for(const SuiteOptions& o, std::string_view preset);
// seq_for, at most the preset's context: what a suite over several presets runs each one with.
std::int64_t seq_within_context(const SuiteOptions& o, std::string_view preset);
// The trainer's options for one run of a training suite: quiet, warm-up a tenth of the steps; on
// CUDA in bf16 (on random tokens when `o.vocab` is set).
train::TrainOptions train_options(const SuiteOptions& o, const OptimizerChoice& opt, std::int64_t batch,
                                  std::uint64_t seed, std::int64_t steps);

// A suite's default optimizers: "name:precision" entries, an entry without a precision at fp32.
std::vector<OptimizerChoice> default_optimizers(std::string_view list);

// ---- formatting ---------------------------------------------------------------------------------

// Text cells: "n/a" for a value that is not finite (or absent).
std::string fixed(double v, int digits);
std::string opt_fixed(const std::optional<double>& v, int digits);
std::string signed_percent(double v);
std::string tokens(double v);  // rounded, digits grouped
// "1,2,3": a list option's value as its flag takes it, for the defaults line of --help.
std::string comma_list(const auto& list) { return fmt::format("{}", fmt::join(list, ",")); }

// Report cells: empty for a value that is not finite (or absent).
Cell real_or_empty(double v);
template <class T>
Cell opt_cell(const std::optional<T>& v) {
  if (!v) return Cell{};
  if constexpr (std::is_integral_v<T>) {
    return Cell{static_cast<std::int64_t>(*v)};
  } else {
    return Cell{static_cast<double>(*v)};
  }
}

// delta_percent, or NaN where it is undefined (a value not finite, a zero baseline).
double safe_delta(double value, double baseline);
// Whether a run finished and timed steady steps: the runs that have a step time and tokens/s.
bool has_steady_steps(const RunRecord& r);
// Per-step tokens/s of a run's steady steps: the samples a difference is tested on.
std::vector<double> steady_throughput(const RunRecord& r);

// ---- plots --------------------------------------------------------------------------------------

// A point at (x, y) with the 95% interval of `spread`'s mean as its band (no band width where the
// interval is undefined, one sample).
void add_point(Series& series, double x, double y, const Summary& spread);
// A gap in the line at x: a run that did not fit in memory.
void add_gap(Series& series, double x);

// ---- the records and their tables ---------------------------------------------------------------

// One run and what it was run with.
struct Keyed {
  OptimizerChoice optimizer;
  std::string preset;
  std::int64_t batch = 0;
  std::int64_t seq = 0;
  std::uint64_t seed = 0;
  std::string mode = "train";
  RunRecord record;
};

// Every figure of every run, one row per run.
Table runs_table(const std::vector<Keyed>& runs);
// Every step of every run, one row per step.
Table steps_table(const std::vector<Keyed>& runs);
// The device and threads a suite ran on, for the line above its tables.
std::string device_line(const SuiteOptions& o, const nlohmann::json& env);
// "out of memory:" and one line per run that did not fit; empty when all did.
std::string oom_note(const std::vector<Keyed>& runs);
// Stacked bars of a memory plan's parts, one bar per category (optimizer).
BarChart memory_chart(const std::string& title, const std::vector<std::string>& categories,
                      const std::vector<train::MemoryPlan>& plans);

// ---- running ------------------------------------------------------------------------------------

// Runs training and timing runs one after another, numbering them for the progress callback and
// sampling the GPU (where NVML is there) during each.
class Runner {
 public:
  Runner(const ProgressCallback& progress, std::size_t count) : progress_(progress), count_(count) {}

  RunRecord train(const std::string& label, const train::TrainOptions& options, std::int64_t warmup,
                  std::optional<float> target) {
    begin(label, options.steps);
    RunRecord r = run_training(options, warmup, target, sampler(), [&](const StepSample& s) { step(label, s, options.steps); });
    end(label, r);
    return r;
  }
  RunRecord time(const std::string& label, const TimingSpec& spec) {
    const std::int64_t steps = spec.warmup_steps + spec.measure_steps;
    begin(label, steps);
    RunRecord r = run_timing(spec, sampler(), [&](const StepSample& s) { step(label, s, steps); });
    end(label, r);
    return r;
  }

 private:
  GpuSampler* sampler() { return sampler_.available() ? &sampler_ : nullptr; }
  void begin(const std::string& label, std::int64_t steps) {
    ++index_;
    if (progress_) progress_({index_, count_, label, 0, steps, std::nullopt});
  }
  void step(const std::string& label, const StepSample& s, std::int64_t steps) {
    if (progress_) progress_({index_, count_, label, s.step, steps, std::nullopt});
  }
  void end(const std::string& label, const RunRecord& r) {
    if (progress_) progress_({index_, count_, label, static_cast<std::int64_t>(r.steps.size()), 0, r.status});
  }

  const ProgressCallback& progress_;
  std::size_t count_;
  std::size_t index_ = 0;
  GpuSampler sampler_;
};

}  // namespace nibble::bench::suites
