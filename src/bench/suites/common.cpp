// What the suites of nibble bench share (see common.hpp).
#include "bench/suites/common.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace nibble::bench::suites {
namespace {

constexpr std::int64_t kGpt2Vocab = 50304;  // GPT-2's 50257 padded to a multiple of 64
constexpr std::int64_t kCharVocab = 65;     // the character vocabulary of the usual char benchmarks

std::vector<Column> run_columns() {
  using T = ColumnType;
  return {{"optimizer", T::kText, ""},
          {"algorithm", T::kText, ""},
          {"precision", T::kText, ""},
          {"preset", T::kText, ""},
          {"mode", T::kText, ""},
          {"batch", T::kInt, ""},
          {"seq", T::kInt, "tokens"},
          {"seed", T::kInt, ""},
          {"status", T::kText, ""},
          {"message", T::kText, ""},
          {"params", T::kInt, ""},
          {"tokens_per_step", T::kInt, "tokens"},
          {"steps", T::kInt, ""},
          {"setup_s", T::kReal, "s"},
          {"warmup_s", T::kReal, "s"},
          {"total_s", T::kReal, "s"},
          {"step_ms_mean", T::kReal, "ms"},
          {"step_ms_std", T::kReal, "ms"},
          {"step_ms_cv_percent", T::kReal, "%"},
          {"step_ms_ci95", T::kReal, "ms"},
          {"step_ms_median", T::kReal, "ms"},
          {"step_ms_min", T::kReal, "ms"},
          {"step_ms_max", T::kReal, "ms"},
          {"tokens_per_s", T::kReal, "tokens/s"},
          {"optimizer_share", T::kReal, ""},
          {"plan_params_bytes", T::kInt, "bytes"},
          {"plan_grads_bytes", T::kInt, "bytes"},
          {"plan_optimizer_state_bytes", T::kInt, "bytes"},
          {"plan_activations_bytes", T::kInt, "bytes"},
          {"plan_workspace_bytes", T::kInt, "bytes"},
          {"plan_total_bytes", T::kInt, "bytes"},
          {"measured_peak_bytes", T::kInt, "bytes"},
          {"rss_peak_bytes", T::kInt, "bytes"},
          {"rss_peak_is_lifetime", T::kBool, ""},
          {"gpu_utilization_mean_percent", T::kReal, "%"},
          {"gpu_sm_clock_mean_mhz", T::kReal, "MHz"},
          {"gpu_memory_max_bytes", T::kReal, "bytes"},
          {"first_val_loss", T::kReal, ""},
          {"final_loss", T::kReal, ""},
          {"final_val_loss", T::kReal, ""},
          {"steps_to_target", T::kInt, ""},
          {"time_to_target_s", T::kReal, "s"}};
}

}  // namespace

std::int64_t vocab_for(const SuiteOptions& o, std::string_view preset) {
  if (o.vocab > 0) return o.vocab;
  return preset == "tiny" || preset == "char" ? kCharVocab : kGpt2Vocab;
}

model::GptConfig config_for(const SuiteOptions& o, std::string_view preset) {
  model::GptConfig c = model::gpt_preset(preset);
  c.vocab = vocab_for(o, preset);
  return c;
}

std::int64_t seq_for(const SuiteOptions& o, std::string_view preset) {
  return o.seq > 0 ? o.seq : model::gpt_preset(preset).context;
}

std::int64_t seq_within_context(const SuiteOptions& o, std::string_view preset) {
  return std::min(seq_for(o, preset), model::gpt_preset(preset).context);
}

std::vector<OptimizerChoice> default_optimizers(std::string_view list) {
  const std::vector<Precision> fp32{Precision::kFp32};
  return parse_optimizers(list, fp32);
}

train::TrainOptions train_options(const SuiteOptions& o, const OptimizerChoice& opt, std::int64_t batch,
                                  std::uint64_t seed, std::int64_t steps) {
  train::TrainOptions t;
  t.preset = o.preset;
  t.seq = o.seq;
  t.data = o.data;
  t.algorithm = opt.algorithm;
  t.precision = opt.precision;
  t.lr = o.lr;
  t.batch = batch;
  t.steps = steps;
  t.warmup = std::max<std::int64_t>(1, steps / 10);
  t.eval_every = o.eval_every;
  t.eval_batches = o.eval_batches;
  t.seed = seed;
  t.memory_limit = o.memory_limit;
  t.quiet = true;
  if (o.device == BenchDevice::kCuda) {
    t.device = Device::kCuda;
    t.compute = model::CudaPrecision::kBf16;
    t.random_vocab = o.vocab;  // > 0: random tokens at that vocabulary (the GPT-2 shape: 50304)
  }
  return t;
}

std::string fixed(double v, int digits) { return std::isfinite(v) ? fmt::format("{:.{}f}", v, digits) : "n/a"; }

std::string opt_fixed(const std::optional<double>& v, int digits) { return v ? fixed(*v, digits) : "n/a"; }

std::string signed_percent(double v) { return std::isfinite(v) ? fmt::format("{:+.1f}%", v) : "n/a"; }

std::string tokens(double v) { return std::isfinite(v) ? group_digits(std::llround(v)) : "n/a"; }

Cell real_or_empty(double v) { return std::isfinite(v) ? Cell{v} : Cell{}; }

double safe_delta(double value, double baseline) {
  if (!std::isfinite(value) || !std::isfinite(baseline) || baseline == 0.0) return kNaN;
  return delta_percent(value, baseline);
}

bool has_steady_steps(const RunRecord& r) { return r.status == RunStatus::kOk && r.steady_ms.n > 0; }

std::vector<double> steady_throughput(const RunRecord& r) {
  std::vector<double> out;
  for (const StepSample& s : r.steps)
    if (!s.warmup && s.ms > 0.0) out.push_back(static_cast<double>(r.tokens_per_step) / (s.ms * 1e-3));
  return out;
}

void add_point(Series& series, double x, double y, const Summary& spread) {
  series.points.push_back({x, y});
  const double half = std::isfinite(spread.ci95_half_width) ? spread.ci95_half_width : 0.0;
  series.band.push_back({spread.mean - half, spread.mean + half});
}

void add_gap(Series& series, double x) {
  series.points.push_back({x, kNaN});
  series.band.push_back({kNaN, kNaN});
}

Table runs_table(const std::vector<Keyed>& runs) {
  Table t{"runs", run_columns(), {}};
  for (const Keyed& k : runs) {
    const RunRecord& r = k.record;
    const bool ok = r.status == RunStatus::kOk;
    const bool timed = has_steady_steps(r);
    auto stat = [&](double v) { return timed ? real_or_empty(v) : Cell{}; };
    t.add_row({k.optimizer.label(), std::string(algorithm_name(k.optimizer.algorithm)),
               std::string(precision_name(k.optimizer.precision)), k.preset, k.mode, k.batch, k.seq,
               static_cast<std::int64_t>(k.seed), std::string(status_name(r.status)), r.message, r.param_count,
               r.tokens_per_step, static_cast<std::int64_t>(r.steps.size()), ok ? Cell{r.setup_s} : Cell{},
               ok ? Cell{r.warmup_s} : Cell{}, r.total_s, stat(r.steady_ms.mean), stat(r.steady_ms.std_dev),
               stat(r.steady_ms.cv_percent), stat(r.steady_ms.ci95_half_width), stat(r.steady_ms.median),
               stat(r.steady_ms.min), stat(r.steady_ms.max), timed ? Cell{r.tokens_per_s} : Cell{},
               timed ? Cell{r.optimizer_share} : Cell{}, r.plan.params, r.plan.grads, r.plan.optimizer_state,
               r.plan.activations, r.plan.workspace, r.plan.total(), ok ? Cell{r.measured_peak_bytes} : Cell{},
               r.rss_peak_bytes, r.rss_peak_is_lifetime, opt_cell(r.gpu.mean_utilization_percent),
               opt_cell(r.gpu.mean_sm_clock_mhz), opt_cell(r.gpu.max_memory_used_bytes), opt_cell(r.first_val_loss),
               ok && !r.steps.empty() ? Cell{static_cast<double>(r.final_loss)} : Cell{}, opt_cell(r.final_val_loss),
               opt_cell(r.steps_to_target), opt_cell(r.time_to_target_s)});
  }
  return t;
}

Table steps_table(const std::vector<Keyed>& runs) {
  using T = ColumnType;
  Table t{"steps",
          {{"optimizer", T::kText, ""},
           {"preset", T::kText, ""},
           {"mode", T::kText, ""},
           {"batch", T::kInt, ""},
           {"seed", T::kInt, ""},
           {"step", T::kInt, ""},
           {"warmup", T::kBool, ""},
           {"ms", T::kReal, "ms"},
           {"optimizer_ms", T::kReal, "ms"},
           {"elapsed_s", T::kReal, "s"},
           {"loss", T::kReal, ""},
           {"val_loss", T::kReal, ""}},
          {}};
  for (const Keyed& k : runs)
    for (const StepSample& s : k.record.steps)
      t.add_row({k.optimizer.label(), k.preset, k.mode, k.batch, static_cast<std::int64_t>(k.seed), s.step, s.warmup,
                 s.ms, s.optimizer_ms, s.elapsed_s, real_or_empty(s.loss), opt_cell(s.val_loss)});
  return t;
}

std::string device_line(const SuiteOptions& o, const nlohmann::json& env) {
  (void)o;
  return fmt::format("{}, {} threads", env.value("cpu", std::string("unknown CPU")), env.value("threads", 0));
}

std::string oom_note(const std::vector<Keyed>& runs) {
  std::string text;
  for (const Keyed& k : runs)
    if (k.record.status == RunStatus::kOutOfMemory)
      text += fmt::format("  {} {} batch {}: {}\n", k.preset, k.optimizer.label(), k.batch, k.record.message);
  return text.empty() ? text : "out of memory:\n" + text;
}

BarChart memory_chart(const std::string& title, const std::vector<std::string>& categories,
                      const std::vector<train::MemoryPlan>& plans) {
  BarChart chart;
  chart.title = title;
  chart.category_label = "optimizer";
  chart.value_label = "MiB";
  chart.categories = categories;
  chart.segment_names = {"params", "grads", "optimizer state", "activations", "workspace"};
  for (const train::MemoryPlan& p : plans) {
    constexpr double kMiB = 1024.0 * 1024.0;
    chart.values.push_back({static_cast<double>(p.params) / kMiB, static_cast<double>(p.grads) / kMiB,
                            static_cast<double>(p.optimizer_state) / kMiB, static_cast<double>(p.activations) / kMiB,
                            static_cast<double>(p.workspace) / kMiB});
  }
  return chart;
}

}  // namespace nibble::bench::suites
