// Training runs and single-mode timings for the benchmark lab, with memory measured three ways:
// the plan (predicted), nibble's buffer counters (measured), and the process's resident peak.
#include "bench/runner.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <numeric>

#include "model/gpt.hpp"
#include "nibble/error.hpp"
#include "nibble/rng.hpp"
#include "nibble/tensor.hpp"
#include "train/optimizer_setup.hpp"

namespace nibble::bench {
namespace {

using Clock = std::chrono::steady_clock;

// The entries of a list, spaces around each trimmed; throws for an empty list or entry.
std::vector<std::string_view> split_list(std::string_view text, std::string_view what) {
  if (text.empty()) throw InvalidArgument(fmt::format("the {} list is empty", what));
  std::vector<std::string_view> out;
  for (std::string_view item : split_at_commas(text)) {
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    if (item.empty()) throw InvalidArgument(fmt::format("the {} list '{}' has an empty entry", what, text));
    out.push_back(item);
  }
  return out;
}

Precision precision_or_throw(std::string_view name) {
  const auto p = precision_from_name(name);
  if (!p) throw InvalidArgument(fmt::format("unknown precision '{}' (known: {})", name, precision_names()));
  return *p;
}

// Ends a run's measurements: memory peaks, GPU samples, steady-state statistics.
struct Meter {
  explicit Meter(GpuSampler* sampler) : sampler_(sampler) {
    reset_host_memory_peak();
    rss_reset_ = reset_peak_rss();
    if (sampler_ != nullptr) sampler_->start();
    start_ = Clock::now();
  }
  void finish(RunRecord& r) {
    r.total_s = std::chrono::duration<double>(Clock::now() - start_).count();
    if (sampler_ != nullptr) {
      sampler_->stop();
      r.gpu = sampler_->result();
    }
    r.measured_peak_bytes = host_memory_stats().peak_bytes - baseline_live_;
    r.rss_peak_bytes = read_rss().peak;
    r.rss_peak_is_lifetime = !rss_reset_;
  }

  GpuSampler* sampler_;
  bool rss_reset_ = false;
  std::int64_t baseline_live_ = host_memory_stats().live_bytes;
  Clock::time_point start_;
};

void summarize_steady(RunRecord& r) {
  std::vector<double> ms;
  double step_ms = 0.0, opt_ms = 0.0;
  for (const StepSample& s : r.steps) {
    if (s.warmup) continue;
    ms.push_back(s.ms);
    step_ms += s.ms;
    opt_ms += s.optimizer_ms;
  }
  if (!ms.empty()) {
    r.steady_ms = summarize(ms);
    r.tokens_per_s = static_cast<double>(r.tokens_per_step) * static_cast<double>(ms.size()) / (step_ms * 1e-3);
    r.optimizer_share = step_ms > 0.0 ? opt_ms / step_ms : 0.0;
  }
}

}  // namespace

std::vector<std::string_view> split_at_commas(std::string_view text) {
  std::vector<std::string_view> out;
  std::size_t start = 0;
  for (;;) {
    const std::size_t comma = text.find(',', start);
    out.push_back(text.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start));
    if (comma == std::string_view::npos) return out;
    start = comma + 1;
  }
}

std::string OptimizerChoice::label() const {
  return fmt::format("{}:{}", algorithm_name(algorithm), precision_name(precision));
}

std::vector<Precision> parse_precisions(std::string_view text) {
  std::vector<Precision> out;
  for (std::string_view item : split_list(text, "precision")) {
    const Precision p = precision_or_throw(item);
    if (std::find(out.begin(), out.end(), p) != out.end())
      throw InvalidArgument(fmt::format("precision '{}' is listed twice", item));
    out.push_back(p);
  }
  return out;
}

std::vector<OptimizerChoice> parse_optimizers(std::string_view text, std::span<const Precision> precisions) {
  if (precisions.empty()) throw InvalidArgument("the precision list is empty");
  std::vector<OptimizerChoice> out;
  for (std::string_view item : split_list(text, "optimizer")) {
    const std::size_t colon = item.find(':');
    const std::string_view name = item.substr(0, colon);
    const auto algorithm = algorithm_from_name(name);
    if (!algorithm)
      throw InvalidArgument(fmt::format("unknown optimizer '{}' (known: {})", name, algorithm_names()));
    std::vector<Precision> ps;
    if (colon == std::string_view::npos) {
      ps.assign(precisions.begin(), precisions.end());
    } else {
      ps.push_back(precision_or_throw(item.substr(colon + 1)));
    }
    for (Precision p : ps) {
      const OptimizerChoice choice{*algorithm, p};
      if (std::find(out.begin(), out.end(), choice) != out.end())
        throw InvalidArgument(fmt::format("optimizer '{}' is listed twice", choice.label()));
      out.push_back(choice);
    }
  }
  return out;
}

std::vector<std::int64_t> parse_int_list(std::string_view text, std::string_view what) {
  std::vector<std::int64_t> out;
  for (std::string_view item : split_list(text, what)) {
    std::int64_t v = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (ec != std::errc() || end != item.data() + item.size() || v <= 0)
      throw InvalidArgument(fmt::format("{} '{}' is not a positive integer", what, item));
    out.push_back(v);
  }
  return out;
}

std::string_view status_name(RunStatus status) { return status == RunStatus::kOk ? "ok" : "out of memory"; }

std::string_view timing_mode_name(TimingMode mode) {
  switch (mode) {
    case TimingMode::kForward: return "forward";
    case TimingMode::kForwardBackward: return "forward+backward";
    case TimingMode::kStep: return "step";
  }
  return "?";
}

RunRecord run_training(const train::TrainOptions& options, std::int64_t warmup_steps, std::optional<float> target,
                       GpuSampler* sampler, const StepCallback& on_step) {
  if (warmup_steps < 0) throw InvalidArgument(fmt::format("warm-up steps must be >= 0, got {}", warmup_steps));
  train::TrainOptions o = options;
  o.quiet = true;
  RunRecord r;
  std::optional<ScopedHostMemoryLimit> limit;
  if (o.memory_limit > 0) limit.emplace(o.memory_limit + host_memory_stats().live_bytes);
  Meter meter(sampler);
  try {
    const train::TrainSummary sum = train::train(o, [&](const train::StepLog& log) {
      const StepSample s{log, log.step <= warmup_steps};
      r.steps.push_back(s);
      if (!target) target = o.target_val_loss;
      if (target && !r.steps_to_target && log.val_loss && *log.val_loss <= *target) {
        r.steps_to_target = log.step;
        r.time_to_target_s = log.elapsed_s;
      }
      if (on_step) on_step(s);
    });
    r.plan = sum.plan;
    r.param_count = sum.plan.params / 4;
    r.setup_s = sum.setup_s;
    r.first_val_loss = sum.first_val_loss;
    r.final_val_loss = sum.last_val_loss;
    r.final_loss = sum.last_loss;
    r.reached_target = r.steps_to_target.has_value();
  } catch (const OutOfMemory& e) {
    r.status = RunStatus::kOutOfMemory;
    r.message = e.what();
  }
  meter.finish(r);
  r.tokens_per_step = o.batch * (o.seq > 0 ? o.seq : model::gpt_preset(o.preset).context) * o.accum;
  if (r.status == RunStatus::kOutOfMemory) {
    r.steps.clear();
    return r;
  }
  r.warmup_s = r.setup_s;
  for (const StepSample& s : r.steps)
    if (s.warmup) r.warmup_s += s.ms * 1e-3;
  summarize_steady(r);
  return r;
}

train::MemoryPlan plan_for_mode(const model::GptConfig& config, std::int64_t batch, std::int64_t seq, TimingMode mode,
                                const OptimizerOptions& options) {
  train::MemoryPlan plan = train::plan_memory(config, batch, seq, options);
  if (mode != TimingMode::kStep) {
    plan.optimizer_state = 0;
    plan.workspace = 0;
  }
  return plan;
}

RunRecord run_timing(const TimingSpec& spec, GpuSampler* sampler, const StepCallback& on_step) {
  if (spec.warmup_steps < 0) throw InvalidArgument(fmt::format("warm-up steps must be >= 0, got {}", spec.warmup_steps));
  if (spec.measure_steps <= 0)
    throw InvalidArgument(fmt::format("measured steps must be positive, got {}", spec.measure_steps));
  if (spec.memory_limit < 0) throw InvalidArgument(fmt::format("memory limit must be >= 0, got {}", spec.memory_limit));
  const std::int64_t T = spec.seq > 0 ? spec.seq : spec.config.context;
  OptimizerOptions oo;
  oo.algorithm = spec.optimizer.algorithm;
  oo.precision = spec.optimizer.precision;
  oo.max_grad_norm = 1.0f;
  oo.no_decay_vectors = true;

  RunRecord r;
  r.plan = plan_for_mode(spec.config, spec.batch, T, spec.mode, oo);
  r.param_count = model::gpt_param_count(spec.config);
  r.tokens_per_step = spec.batch * T;
  std::optional<ScopedHostMemoryLimit> limit;
  if (spec.memory_limit > 0) limit.emplace(spec.memory_limit + host_memory_stats().live_bytes);
  Meter meter(sampler);
  try {
    if (spec.memory_limit > 0 && r.plan.total() > spec.memory_limit)
      throw OutOfMemory(fmt::format("out of memory: needs {} bytes, the limit is {} bytes", r.plan.total(),
                                    spec.memory_limit),
                        r.plan.total(), spec.memory_limit);
    const auto t0 = Clock::now();
    model::Gpt gpt(spec.config, spec.batch, T);
    gpt.init(spec.seed);
    std::optional<Optimizer> opt;
    if (spec.mode == TimingMode::kStep) opt.emplace(train::optimizer_param_groups(gpt.tensors()), oo);
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(spec.batch * (T + 1)));
    std::vector<std::int32_t> inputs(static_cast<std::size_t>(spec.batch * T)), targets(inputs.size());
    Rng rng(spec.seed);
    r.setup_s = std::chrono::duration<double>(Clock::now() - t0).count();
    r.warmup_s = r.setup_s;
    for (std::int64_t i = 0; i < spec.warmup_steps + spec.measure_steps; ++i) {
      for (std::int64_t b = 0; b < spec.batch; ++b)
        for (std::int64_t t = 0; t <= T; ++t) {
          const auto tok = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(spec.config.vocab)));
          if (t < T) inputs[static_cast<std::size_t>(b * T + t)] = tok;
          if (t > 0) targets[static_cast<std::size_t>(b * T + t - 1)] = tok;
        }
      StepSample s;
      s.step = i + 1;
      s.warmup = i < spec.warmup_steps;
      const auto a = Clock::now();
      if (spec.mode != TimingMode::kForward) gpt.zero_grad();
      s.loss = gpt.forward(inputs.data(), targets.data(), spec.mode != TimingMode::kForward);
      if (spec.mode != TimingMode::kForward) gpt.backward();
      const auto b = Clock::now();
      if (opt) opt->step();
      const auto c = Clock::now();
      s.ms = std::chrono::duration<double, std::milli>(c - a).count();
      s.optimizer_ms = opt ? std::chrono::duration<double, std::milli>(c - b).count() : 0.0;
      s.elapsed_s = std::chrono::duration<double>(c - t0).count();
      if (s.warmup) r.warmup_s += s.ms * 1e-3;
      r.steps.push_back(s);
      if (on_step) on_step(s);
    }
    r.final_loss = r.steps.back().loss;
  } catch (const OutOfMemory& e) {
    r.status = RunStatus::kOutOfMemory;
    r.message = e.what();
    r.steps.clear();
  }
  meter.finish(r);
  if (r.status == RunStatus::kOk) summarize_steady(r);
  return r;
}

}  // namespace nibble::bench
