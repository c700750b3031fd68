// The suites of nibble bench: batch-sweep, profile, model-sweep, convergence and memory-plan. Every
// run's raw numbers go into the report's tables; the text tables and plots are views of them.
#include "bench/suites.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>

#include "bench/svg.hpp"
#include "bench/system.hpp"
#include "model/gpt.hpp"
#include "nibble/error.hpp"

namespace nibble::bench {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr std::int64_t kGpt2Vocab = 50304;  // GPT-2's 50257 padded to a multiple of 64
constexpr std::int64_t kCharVocab = 65;     // the character vocabulary of the usual char benchmarks

struct SuiteInfo {
  Suite suite;
  std::string_view name;
};
constexpr SuiteInfo kSuites[] = {{Suite::kBatchSweep, "batch-sweep"},
                                 {Suite::kProfile, "profile"},
                                 {Suite::kModelSweep, "model-sweep"},
                                 {Suite::kConvergence, "convergence"},
                                 {Suite::kMemoryPlan, "memory-plan"}};

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

// ---- formatting -------------------------------------------------------------------------------

std::string fixed(double v, int digits) { return std::isfinite(v) ? fmt::format("{:.{}f}", v, digits) : "n/a"; }

std::string opt_fixed(const std::optional<double>& v, int digits) { return v ? fixed(*v, digits) : "n/a"; }

std::string signed_percent(double v) { return std::isfinite(v) ? fmt::format("{:+.1f}%", v) : "n/a"; }

std::string tokens(double v) { return std::isfinite(v) ? group_digits(std::llround(v)) : "n/a"; }

Cell real_or_empty(double v) { return std::isfinite(v) ? Cell{v} : Cell{}; }
template <class T>
Cell opt_cell(const std::optional<T>& v) {
  if (!v) return Cell{};
  if constexpr (std::is_integral_v<T>) {
    return Cell{static_cast<std::int64_t>(*v)};
  } else {
    return Cell{static_cast<double>(*v)};
  }
}

double safe_delta(double value, double baseline) {
  if (!std::isfinite(value) || !std::isfinite(baseline) || baseline == 0.0) return kNaN;
  return delta_percent(value, baseline);
}

// Per-step tokens/s of a run's steady steps: the samples a difference is tested on.
std::vector<double> steady_throughput(const RunRecord& r) {
  std::vector<double> out;
  for (const StepSample& s : r.steps)
    if (!s.warmup && s.ms > 0.0) out.push_back(static_cast<double>(r.tokens_per_step) / (s.ms * 1e-3));
  return out;
}

// ---- the records and their tables -----------------------------------------------------------------

struct Keyed {
  OptimizerChoice optimizer;
  std::string preset;
  std::int64_t batch = 0;
  std::int64_t seq = 0;
  std::uint64_t seed = 0;
  std::string mode = "train";
  RunRecord record;
};

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

Table runs_table(const std::vector<Keyed>& runs) {
  Table t{"runs", run_columns(), {}};
  for (const Keyed& k : runs) {
    const RunRecord& r = k.record;
    const bool ok = r.status == RunStatus::kOk;
    const bool timed = ok && r.steady_ms.n > 0;
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

// ---- running ------------------------------------------------------------------------------------------

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

// ---- batch-sweep --------------------------------------------------------------------------------------

SuiteOutput batch_sweep(const SuiteOptions& o, const ProgressCallback& progress, const nlohmann::json& env) {
  Runner runner(progress, o.batches.size() * o.optimizers.size());
  std::vector<Keyed> runs;
  const std::int64_t seq = seq_for(o, o.preset);
  for (std::int64_t b : o.batches)
    for (const OptimizerChoice& opt : o.optimizers) {
      const std::string label = fmt::format("{} batch {}", opt.label(), b);
      train::TrainOptions t = train_options(o, opt, b, o.seeds.front(), o.warmup_steps + o.measure_steps);
      t.eval_batches = 1;
      runs.push_back({opt, o.preset, b, seq, o.seeds.front(), "train", runner.train(label, t, o.warmup_steps, std::nullopt)});
    }

  SuiteOutput out;
  out.report.tables.push_back(runs_table(runs));
  out.report.tables.push_back(steps_table(runs));

  // Differences against the baseline at the same batch, with Welch's test on per-step throughput.
  using T = ColumnType;
  Table deltas{"deltas",
               {{"batch", T::kInt, ""},
                {"optimizer", T::kText, ""},
                {"baseline", T::kText, ""},
                {"tokens_per_s", T::kReal, "tokens/s"},
                {"baseline_tokens_per_s", T::kReal, "tokens/s"},
                {"delta_percent", T::kReal, "%"},
                {"ci95_low_percent", T::kReal, "%"},
                {"ci95_high_percent", T::kReal, "%"},
                {"exceeds_noise", T::kBool, ""}},
               {}};
  std::vector<std::string> header{"batch"};
  std::vector<Align> align{Align::kRight};
  for (std::size_t i = 0; i < o.optimizers.size(); ++i) {
    header.push_back(o.optimizers[i].label() + " tok/s");
    align.push_back(Align::kRight);
    if (i > 0) {
      header.push_back("Δ%");
      align.push_back(Align::kRight);
    }
  }
  std::vector<std::vector<std::string>> rows;
  const std::size_t n_opt = o.optimizers.size();
  for (std::size_t bi = 0; bi < o.batches.size(); ++bi) {
    std::vector<std::string> row{std::to_string(o.batches[bi])};
    const RunRecord& base = runs[bi * n_opt].record;
    for (std::size_t i = 0; i < n_opt; ++i) {
      const RunRecord& r = runs[bi * n_opt + i].record;
      const bool ok = r.status == RunStatus::kOk && r.steady_ms.n > 0;
      row.push_back(ok ? fmt::format("{} ±{:.1f}%", tokens(r.tokens_per_s), r.steady_ms.cv_percent) : "out of memory");
      if (i == 0) continue;
      const bool both = ok && base.status == RunStatus::kOk && base.steady_ms.n > 0;
      if (!both) {
        row.push_back("n/a");
        deltas.add_row({o.batches[bi], o.optimizers[i].label(), o.optimizers[0].label(), Cell{}, Cell{}, Cell{}, Cell{},
                        Cell{}, Cell{}});
        continue;
      }
      const double d = safe_delta(r.tokens_per_s, base.tokens_per_s);
      const std::vector<double> a = steady_throughput(r), bsl = steady_throughput(base);
      const Comparison c = compare(a, bsl);
      const double lo = c.ci95_low / c.mean_b * 100.0, hi = c.ci95_high / c.mean_b * 100.0;
      row.push_back(fmt::format("{}{}", signed_percent(d), c.exceeds_noise ? "*" : ""));
      deltas.add_row({o.batches[bi], o.optimizers[i].label(), o.optimizers[0].label(), r.tokens_per_s,
                      base.tokens_per_s, real_or_empty(d), real_or_empty(lo), real_or_empty(hi), c.exceeds_noise});
    }
    rows.push_back(std::move(row));
  }
  out.report.tables.push_back(std::move(deltas));
  out.text = fmt::format("batch-sweep: {} preset, {} tokens per sequence, {} warm-up + {} measured steps per run; {}\n",
                         o.preset, seq, o.warmup_steps, o.measure_steps, device_line(o, env));
  out.text += format_table(header, align, rows);
  out.text += fmt::format("tok/s: steady tokens per second ± CV% of step time; Δ% against {}; * the difference "
                          "exceeds the step-to-step noise (Welch, 95%)\n",
                          o.optimizers[0].label());
  out.text += oom_note(runs);

  LinePlot plot;
  plot.title = fmt::format("Throughput against batch size ({} preset, seq {})", o.preset, seq);
  plot.x_label = "batch size (sequences)";
  plot.y_label = "tokens/s";
  plot.log_x = true;
  plot.y_includes_zero = true;
  for (std::size_t i = 0; i < n_opt; ++i) {
    Series s;
    s.name = o.optimizers[i].label();
    for (std::size_t bi = 0; bi < o.batches.size(); ++bi) {
      const RunRecord& r = runs[bi * n_opt + i].record;
      const double x = static_cast<double>(o.batches[bi]);
      const std::vector<double> tp = steady_throughput(r);
      if (r.status != RunStatus::kOk || tp.empty()) {
        s.points.push_back({x, kNaN});
        s.band.push_back({kNaN, kNaN});
        continue;
      }
      const Summary sm = summarize(tp);
      s.points.push_back({x, r.tokens_per_s});
      const double half = std::isfinite(sm.ci95_half_width) ? sm.ci95_half_width : 0.0;
      s.band.push_back({sm.mean - half, sm.mean + half});
    }
    plot.series.push_back(std::move(s));
  }
  out.plots.push_back({"batch-sweep-throughput", render_svg(plot)});
  return out;
}

// ---- profile ------------------------------------------------------------------------------------------------

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

SuiteOutput profile(const SuiteOptions& o, const ProgressCallback& progress, const nlohmann::json& env) {
  Runner runner(progress, o.optimizers.size());
  std::vector<Keyed> runs;
  const std::int64_t seq = seq_for(o, o.preset);
  for (const OptimizerChoice& opt : o.optimizers) {
    const train::TrainOptions t = train_options(o, opt, o.batch, o.seeds.front(), o.warmup_steps + o.measure_steps);
    runs.push_back({opt, o.preset, o.batch, seq, o.seeds.front(), "train",
                    runner.train(opt.label(), t, o.warmup_steps, std::nullopt)});
  }
  SuiteOutput out;
  out.report.tables.push_back(runs_table(runs));
  out.report.tables.push_back(steps_table(runs));

  const RunRecord& base = runs.front().record;
  const bool base_ok = base.status == RunStatus::kOk && base.steady_ms.n > 0;
  std::vector<std::vector<std::string>> abs_rows, delta_rows, mem_rows;
  using T = ColumnType;
  Table deltas{"deltas",
               {{"optimizer", T::kText, ""},
                {"baseline", T::kText, ""},
                {"warmup_s_percent", T::kReal, "%"},
                {"step_ms_percent", T::kReal, "%"},
                {"tokens_per_s_percent", T::kReal, "%"},
                {"plan_total_bytes_percent", T::kReal, "%"},
                {"measured_peak_bytes_percent", T::kReal, "%"},
                {"rss_peak_bytes_percent", T::kReal, "%"},
                {"total_s_percent", T::kReal, "%"},
                {"final_val_loss_percent", T::kReal, "%"},
                {"step_time_exceeds_noise", T::kBool, ""}},
               {}};
  for (const Keyed& k : runs) {
    const RunRecord& r = k.record;
    const std::string name = k.optimizer.label();
    if (r.status != RunStatus::kOk || r.steady_ms.n == 0) {
      abs_rows.push_back({name, "out of memory", "", "", "", "", human_bytes(static_cast<double>(r.plan.total())), "",
                          "", "", "", "", "", ""});
      continue;
    }
    const std::string gpu_util = opt_fixed(r.gpu.mean_utilization_percent, 0);
    const std::string sm_clock = opt_fixed(r.gpu.mean_sm_clock_mhz, 0);
    abs_rows.push_back({name, fixed(r.warmup_s, 2),
                        fmt::format("{} ± {}", fixed(r.steady_ms.mean, 1), fixed(r.steady_ms.std_dev, 1)),
                        fixed(r.steady_ms.cv_percent, 1), tokens(r.tokens_per_s), fixed(100.0 * r.optimizer_share, 1),
                        human_bytes(static_cast<double>(r.plan.total())),
                        human_bytes(static_cast<double>(r.measured_peak_bytes)),
                        human_bytes(static_cast<double>(r.rss_peak_bytes)), gpu_util, sm_clock, fixed(r.total_s, 1),
                        fixed(r.final_loss, 3), opt_fixed(r.final_val_loss ? std::optional<double>(*r.final_val_loss) : std::nullopt, 3)});
    mem_rows.push_back({name, human_bytes(static_cast<double>(r.plan.params)), human_bytes(static_cast<double>(r.plan.grads)),
                        human_bytes(static_cast<double>(r.plan.optimizer_state)),
                        human_bytes(static_cast<double>(r.plan.activations)),
                        human_bytes(static_cast<double>(r.plan.workspace)), human_bytes(static_cast<double>(r.plan.total())),
                        human_bytes(static_cast<double>(r.measured_peak_bytes))});
    if (&k == &runs.front() || !base_ok) continue;
    const Comparison c = compare(steady_throughput(r), steady_throughput(base));
    const double d_warm = safe_delta(r.warmup_s, base.warmup_s), d_step = safe_delta(r.steady_ms.mean, base.steady_ms.mean),
                 d_tok = safe_delta(r.tokens_per_s, base.tokens_per_s),
                 d_plan = safe_delta(static_cast<double>(r.plan.total()), static_cast<double>(base.plan.total())),
                 d_meas = safe_delta(static_cast<double>(r.measured_peak_bytes), static_cast<double>(base.measured_peak_bytes)),
                 d_rss = safe_delta(static_cast<double>(r.rss_peak_bytes), static_cast<double>(base.rss_peak_bytes)),
                 d_total = safe_delta(r.total_s, base.total_s),
                 d_val = r.final_val_loss && base.final_val_loss ? safe_delta(*r.final_val_loss, *base.final_val_loss) : kNaN;
    deltas.add_row({name, runs.front().optimizer.label(), real_or_empty(d_warm), real_or_empty(d_step), real_or_empty(d_tok),
                    real_or_empty(d_plan), real_or_empty(d_meas), real_or_empty(d_rss), real_or_empty(d_total),
                    real_or_empty(d_val), c.exceeds_noise});
    delta_rows.push_back({name, signed_percent(d_warm), signed_percent(d_step) + (c.exceeds_noise ? "*" : ""),
                          signed_percent(d_tok), signed_percent(d_plan), signed_percent(d_rss), signed_percent(d_total),
                          signed_percent(d_val)});
  }
  out.report.tables.push_back(std::move(deltas));

  const std::vector<Align> R(14, Align::kRight);
  std::vector<Align> left_first = R;
  left_first[0] = Align::kLeft;
  out.text = fmt::format("profile: {} preset, batch {} x {} tokens, {} warm-up + {} measured steps; {}\n", o.preset,
                         o.batch, seq, o.warmup_steps, o.measure_steps, device_line(o, env));
  out.text += format_table({"optimizer", "warm-up s", "step ms", "CV%", "tok/s", "opt %", "peak (plan)", "peak (measured)",
                            "max RSS", "GPU util%", "SM MHz", "total s", "train loss", "val loss"},
                           left_first, abs_rows);
  if (!delta_rows.empty()) {
    out.text += fmt::format("\nagainst {}:\n", runs.front().optimizer.label());
    out.text += format_table({"optimizer", "warm-up", "step time", "tok/s", "peak memory", "max RSS", "total time",
                              "val loss"},
                             left_first, delta_rows);
    out.text += "* the step-time difference exceeds the step-to-step noise (Welch, 95%)\n";
  }
  out.text += "\nmemory breakdown (the engine's plan; measured = peak of nibble's buffers):\n";
  out.text += format_table({"optimizer", "params", "grads", "optimizer state", "activations", "workspace", "total",
                            "measured"},
                           left_first, mem_rows);
  out.text += oom_note(runs);

  std::vector<std::string> names;
  std::vector<train::MemoryPlan> plans;
  for (const Keyed& k : runs) {
    names.push_back(k.optimizer.label());
    plans.push_back(k.record.plan);
  }
  out.plots.push_back({"profile-memory", render_svg(memory_chart(
                                             fmt::format("Peak memory by part ({} preset, batch {} x {})", o.preset, o.batch, seq),
                                             names, plans))});
  LinePlot loss;
  loss.title = fmt::format("Training loss against step ({} preset, batch {})", o.preset, o.batch);
  loss.x_label = "step";
  loss.y_label = "training loss";
  for (const Keyed& k : runs) {
    Series s;
    s.name = k.optimizer.label();
    for (const StepSample& st : k.record.steps) s.points.push_back({static_cast<double>(st.step), st.loss});
    loss.series.push_back(std::move(s));
  }
  out.plots.push_back({"profile-loss", render_svg(loss)});
  return out;
}

// ---- model-sweep -------------------------------------------------------------------------------------------

SuiteOutput model_sweep(const SuiteOptions& o, const ProgressCallback& progress, const nlohmann::json& env) {
  const OptimizerChoice opt = o.optimizers.front();
  Runner runner(progress, o.presets.size() * o.modes.size());
  std::vector<Keyed> runs;
  for (const std::string& preset : o.presets)
    for (TimingMode mode : o.modes) {
      TimingSpec spec;
      spec.config = config_for(o, preset);
      spec.batch = o.batch;
      spec.seq = std::min(seq_for(o, preset), spec.config.context);
      spec.mode = mode;
      spec.optimizer = opt;
      spec.warmup_steps = o.warmup_steps;
      spec.measure_steps = o.measure_steps;
      spec.seed = o.seeds.front();
      spec.memory_limit = o.memory_limit;
      const std::string label = fmt::format("{} {}", preset, timing_mode_name(mode));
      runs.push_back({opt, preset, o.batch, spec.seq, o.seeds.front(), std::string(timing_mode_name(mode)),
                      runner.time(label, spec)});
    }
  SuiteOutput out;
  out.report.tables.push_back(runs_table(runs));
  out.report.tables.push_back(steps_table(runs));
  std::vector<std::vector<std::string>> rows;
  for (const Keyed& k : runs) {
    const RunRecord& r = k.record;
    if (r.status != RunStatus::kOk) {
      rows.push_back({k.preset, group_digits(r.param_count), std::to_string(k.batch), std::to_string(k.seq), k.mode,
                      "out of memory", "", "", "", "", "", human_bytes(static_cast<double>(r.plan.total()))});
      continue;
    }
    rows.push_back({k.preset, group_digits(r.param_count), std::to_string(k.batch), std::to_string(k.seq), k.mode, "ok",
                    fixed(r.warmup_s, 2), fixed(r.steady_ms.mean, 1), fixed(r.steady_ms.std_dev, 1),
                    fixed(r.steady_ms.cv_percent, 1), tokens(r.tokens_per_s), human_bytes(static_cast<double>(r.plan.total()))});
  }
  std::vector<Align> align(12, Align::kRight);
  align[0] = align[4] = align[5] = Align::kLeft;
  out.text = fmt::format("model-sweep: batch {}, {} warm-up + {} measured steps, random tokens; full step with {}; {}\n",
                         o.batch, o.warmup_steps, o.measure_steps, opt.label(), device_line(o, env));
  out.text += format_table({"preset", "params", "batch", "seq", "mode", "status", "warm-up s", "mean ms", "std ms", "CV%",
                            "tok/s", "memory (plan)"},
                           align, rows);
  out.text += oom_note(runs);

  LinePlot plot;
  plot.title = fmt::format("Time per step against model size (batch {})", o.batch);
  plot.x_label = "parameters";
  plot.y_label = "ms per step";
  plot.log_x = true;
  plot.y_includes_zero = true;
  for (TimingMode mode : o.modes) {
    Series s;
    s.name = std::string(timing_mode_name(mode));
    for (const Keyed& k : runs) {
      if (k.mode != timing_mode_name(mode)) continue;
      const RunRecord& r = k.record;
      const double x = static_cast<double>(r.param_count);
      if (r.status != RunStatus::kOk) {
        s.points.push_back({x, kNaN});
        s.band.push_back({kNaN, kNaN});
        continue;
      }
      s.points.push_back({x, r.steady_ms.mean});
      const double half = std::isfinite(r.steady_ms.ci95_half_width) ? r.steady_ms.ci95_half_width : 0.0;
      s.band.push_back({r.steady_ms.mean - half, r.steady_ms.mean + half});
    }
    plot.series.push_back(std::move(s));
  }
  out.plots.push_back({"model-sweep-step-time", render_svg(plot)});
  return out;
}

// ---- convergence -------------------------------------------------------------------------------------------

std::string mean_ci(const std::vector<double>& v, int digits) {
  if (v.empty()) return "n/a";
  const Summary s = summarize(v);
  if (v.size() == 1) return fixed(s.mean, digits);
  return fmt::format("{} ± {}", fixed(s.mean, digits), fixed(s.ci95_half_width, digits));
}

SuiteOutput convergence(const SuiteOptions& o, const ProgressCallback& progress, const nlohmann::json& env) {
  Runner runner(progress, o.optimizers.size() * o.seeds.size());
  const std::size_t n_seeds = o.seeds.size();
  std::vector<Keyed> runs(o.optimizers.size() * n_seeds);  // optimizer-major: runs[i * n_seeds + s]
  const std::int64_t seq = seq_for(o, o.preset);
  const std::int64_t steps = o.max_steps > 0 ? o.max_steps : std::numeric_limits<std::int32_t>::max();
  // NOTE: seed-major order, so that a machine that drifts during the suite (clock, other load)
  // touches every optimizer alike instead of favouring the ones that run last.
  for (std::size_t s = 0; s < n_seeds; ++s)
    for (std::size_t i = 0; i < o.optimizers.size(); ++i) {
      const OptimizerChoice& opt = o.optimizers[i];
      train::TrainOptions t = train_options(o, opt, o.batch, o.seeds[s], steps);
      t.time_budget_s = o.time_budget_s;
      if (o.stop_at_target) t.target_val_loss = o.target_loss;
      runs[i * n_seeds + s] = {opt, o.preset, o.batch, seq, o.seeds[s], "train",
                               runner.train(fmt::format("{} seed {}", opt.label(), o.seeds[s]), t, 0, o.target_loss)};
    }
  SuiteOutput out;
  out.report.tables.push_back(runs_table(runs));
  out.report.tables.push_back(steps_table(runs));

  struct PerOptimizer {
    std::vector<double> final_val, time_to_target, steps_to_target;
    std::size_t reached = 0, ok = 0;
  };
  std::vector<PerOptimizer> per(o.optimizers.size());
  std::vector<std::vector<std::string>> run_rows;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const Keyed& k = runs[i];
    const RunRecord& r = k.record;
    PerOptimizer& p = per[i / o.seeds.size()];
    if (r.status != RunStatus::kOk) {
      run_rows.push_back({k.optimizer.label(), std::to_string(k.seed), "out of memory", "", "", "", ""});
      continue;
    }
    ++p.ok;
    if (r.final_val_loss) p.final_val.push_back(*r.final_val_loss);
    if (r.steps_to_target) {
      ++p.reached;
      p.steps_to_target.push_back(static_cast<double>(*r.steps_to_target));
      p.time_to_target.push_back(*r.time_to_target_s);
    }
    run_rows.push_back({k.optimizer.label(), std::to_string(k.seed), std::to_string(r.steps.size()),
                        fixed(r.total_s, 1), r.steps_to_target ? std::to_string(*r.steps_to_target) : "-",
                        r.time_to_target_s ? fixed(*r.time_to_target_s, 1) : "-",
                        r.final_val_loss ? fixed(*r.final_val_loss, 4) : "n/a"});
  }

  using T = ColumnType;
  Table summary{"summary",
                {{"optimizer", T::kText, ""},
                 {"runs", T::kInt, ""},
                 {"reached_target", T::kInt, ""},
                 {"final_val_loss_mean", T::kReal, ""},
                 {"final_val_loss_ci95", T::kReal, ""},
                 {"time_to_target_mean_s", T::kReal, "s"},
                 {"time_to_target_ci95_s", T::kReal, "s"},
                 {"steps_to_target_mean", T::kReal, ""},
                 {"final_val_loss_delta", T::kReal, ""},
                 {"final_val_loss_delta_ci95_low", T::kReal, ""},
                 {"final_val_loss_delta_ci95_high", T::kReal, ""},
                 {"final_val_loss_exceeds_noise", T::kBool, ""},
                 {"time_to_target_delta_percent", T::kReal, "%"},
                 {"time_to_target_exceeds_noise", T::kBool, ""}},
                {}};
  std::vector<std::vector<std::string>> sum_rows;
  for (std::size_t i = 0; i < per.size(); ++i) {
    const PerOptimizer& p = per[i];
    const PerOptimizer& b = per.front();
    Cell fv_mean, fv_ci, tt_mean, tt_ci, st_mean, d_loss, d_lo, d_hi, loss_noise, d_time, time_noise;
    std::string loss_verdict = "-", time_verdict = "-";
    if (!p.final_val.empty()) {
      const Summary s = summarize(p.final_val);
      fv_mean = s.mean;
      fv_ci = real_or_empty(s.ci95_half_width);
    }
    if (!p.time_to_target.empty()) {
      const Summary s = summarize(p.time_to_target);
      tt_mean = s.mean;
      tt_ci = real_or_empty(s.ci95_half_width);
      st_mean = summarize(p.steps_to_target).mean;
    }
    if (i > 0 && !p.final_val.empty() && !b.final_val.empty()) {
      const Comparison c = compare(p.final_val, b.final_val);
      d_loss = c.difference;
      d_lo = real_or_empty(c.ci95_low);
      d_hi = real_or_empty(c.ci95_high);
      loss_noise = c.exceeds_noise;
      loss_verdict = fmt::format("{:+.4f} {}", c.difference,
                                 c.reason.empty() ? (c.exceeds_noise ? "(beyond noise)" : "(within noise)") : "(" + c.reason + ")");
    }
    if (i > 0 && !p.time_to_target.empty() && !b.time_to_target.empty()) {
      const Comparison c = compare(p.time_to_target, b.time_to_target);
      d_time = real_or_empty(c.relative_percent);
      time_noise = c.exceeds_noise;
      time_verdict = fmt::format("{} {}", signed_percent(c.relative_percent),
                                 c.reason.empty() ? (c.exceeds_noise ? "(beyond noise)" : "(within noise)") : "(" + c.reason + ")");
    }
    summary.add_row({o.optimizers[i].label(), static_cast<std::int64_t>(o.seeds.size()), static_cast<std::int64_t>(p.reached),
                     fv_mean, fv_ci, tt_mean, tt_ci, st_mean, d_loss, d_lo, d_hi, loss_noise, d_time, time_noise});
    sum_rows.push_back({o.optimizers[i].label(), fmt::format("{}/{}", p.reached, o.seeds.size()),
                        mean_ci(p.time_to_target, 1), mean_ci(p.steps_to_target, 0), mean_ci(p.final_val, 4),
                        i == 0 ? "baseline" : loss_verdict, i == 0 ? "baseline" : time_verdict});
  }
  out.report.tables.push_back(std::move(summary));

  std::vector<Align> align(7, Align::kRight);
  align[0] = Align::kLeft;
  out.text = fmt::format(
      "convergence: {} preset, batch {} x {} tokens, {} seed(s), target val loss {}, budget {}, at most {} steps; {}\n",
      o.preset, o.batch, seq, o.seeds.size(), o.target_loss ? fixed(*o.target_loss, 3) : "none",
      o.time_budget_s > 0 ? fmt::format("{:g} s", o.time_budget_s) : "none",
      o.max_steps > 0 ? std::to_string(o.max_steps) : "unlimited", device_line(o, env));
  out.text += format_table({"optimizer", "seed", "steps", "time s", "steps to target", "time to target s", "final val loss"},
                           align, run_rows);
  out.text += "\n";
  out.text += format_table({"optimizer", "reached", "time to target s", "steps to target", "final val loss",
                            "Δ final val loss", "Δ time to target"},
                           align, sum_rows);
  out.text += "mean ± 95% confidence interval across seeds; differences against the baseline by Welch's t-test\n";
  out.text += oom_note(runs);

  // Loss curves with seed bands: evaluations happen at the same steps in every seed's run.
  for (int by_time = 0; by_time < 2; ++by_time) {
    LinePlot plot;
    plot.title = fmt::format("Validation loss against {} ({} preset, mean and range over seeds)",
                             by_time ? "wall-clock time" : "step", o.preset);
    plot.x_label = by_time ? "seconds" : "step";
    plot.y_label = "validation loss";
    for (std::size_t i = 0; i < o.optimizers.size(); ++i) {
      std::map<std::int64_t, std::vector<std::pair<double, double>>> at_step;  // step -> (elapsed, loss)
      for (std::size_t s = 0; s < o.seeds.size(); ++s) {
        const RunRecord& r = runs[i * o.seeds.size() + s].record;
        for (const StepSample& st : r.steps)
          if (st.val_loss) at_step[st.step].push_back({st.elapsed_s, *st.val_loss});
      }
      Series series;
      series.name = o.optimizers[i].label();
      for (const auto& [step, values] : at_step) {
        double x = 0.0, y = 0.0, lo = std::numeric_limits<double>::infinity(), hi = -lo;
        for (const auto& [t, l] : values) {
          x += t;
          y += l;
          lo = std::min(lo, l);
          hi = std::max(hi, l);
        }
        x /= static_cast<double>(values.size());
        y /= static_cast<double>(values.size());
        series.points.push_back({by_time ? x : static_cast<double>(step), y});
        series.band.push_back({lo, hi});
      }
      if (by_time) {
        // Runs cut by the budget end at different steps; ordered by time, the tail does not fold back.
        std::vector<std::size_t> order(series.points.size());
        for (std::size_t k = 0; k < order.size(); ++k) order[k] = k;
        std::stable_sort(order.begin(), order.end(),
                         [&](std::size_t a, std::size_t b) { return series.points[a].x < series.points[b].x; });
        std::vector<Point> points;
        std::vector<Interval> band;
        for (std::size_t k : order) {
          points.push_back(series.points[k]);
          band.push_back(series.band[k]);
        }
        series.points = std::move(points);
        series.band = std::move(band);
      }
      plot.series.push_back(std::move(series));
    }
    out.plots.push_back({by_time ? "convergence-loss-time" : "convergence-loss-step", render_svg(plot)});
  }
  return out;
}

// ---- memory-plan -------------------------------------------------------------------------------------------

// On CUDA the engine computes in bf16 and the optimizer steps fp32 master weights, as `nibble
// train --device cuda --compute bf16` does.
OptimizerOptions plan_optimizer(const OptimizerChoice& opt, BenchDevice device) {
  OptimizerOptions oo;
  oo.algorithm = opt.algorithm;
  oo.precision = opt.precision;
  if (device == BenchDevice::kCuda) {
    oo.device = Device::kCuda;
    oo.master_weights = true;
  }
  return oo;
}

model::CudaPrecision plan_compute(BenchDevice device) {
  return device == BenchDevice::kCuda ? model::CudaPrecision::kBf16 : model::CudaPrecision::kFp32;
}

SuiteOutput memory_plan(const SuiteOptions& o, const ProgressCallback& progress, const nlohmann::json& env) {
  const std::int64_t memory = o.memory_size > 0 ? o.memory_size : available_host_memory();
  using T = ColumnType;
  Table plans{"plans",
              {{"preset", T::kText, ""},
               {"params", T::kInt, ""},
               {"batch", T::kInt, ""},
               {"seq", T::kInt, "tokens"},
               {"optimizer", T::kText, ""},
               {"params_bytes", T::kInt, "bytes"},
               {"grads_bytes", T::kInt, "bytes"},
               {"optimizer_state_bytes", T::kInt, "bytes"},
               {"activations_bytes", T::kInt, "bytes"},
               {"workspace_bytes", T::kInt, "bytes"},
               {"total_bytes", T::kInt, "bytes"},
               {"memory_bytes", T::kInt, "bytes"},
               {"fits", T::kBool, ""}},
              {}};
  Table largest{"largest-batch",
                {{"preset", T::kText, ""},
                 {"seq", T::kInt, "tokens"},
                 {"optimizer", T::kText, ""},
                 {"memory_bytes", T::kInt, "bytes"},
                 {"largest_batch", T::kInt, ""}},
                {}};
  std::vector<std::string> header{"preset", "optimizer"};
  for (std::int64_t b : o.batches) header.push_back(fmt::format("batch {}", b));
  header.push_back("largest batch");
  std::vector<std::vector<std::string>> rows;
  struct ToMeasure {
    std::string preset;
    OptimizerChoice opt;
    std::int64_t batch, seq;
    train::MemoryPlan plan;
  };
  std::vector<ToMeasure> to_measure;
  for (const std::string& preset : o.presets) {
    const model::GptConfig config = config_for(o, preset);
    const std::int64_t seq = std::min(seq_for(o, preset), config.context);
    for (const OptimizerChoice& opt : o.optimizers) {
      const OptimizerOptions oo = plan_optimizer(opt, o.device);
      std::vector<std::string> row{preset, opt.label()};
      for (std::int64_t b : o.batches) {
        const train::MemoryPlan p = train::plan_memory(config, b, seq, oo, plan_compute(o.device));
        const bool fits = p.total() <= memory;
        plans.add_row({preset, model::gpt_param_count(config), b, seq, opt.label(), p.params, p.grads, p.optimizer_state,
                       p.activations, p.workspace, p.total(), memory, fits});
        row.push_back(human_bytes(static_cast<double>(p.total())) + (fits ? "" : " ✗"));
        if (o.measure && p.total() <= o.measure_max) to_measure.push_back({preset, opt, b, seq, p});
      }
      // The plan grows with the batch, so the largest batch that fits is found by bisection.
      std::int64_t lo = 0, hi = 1;
      while (hi <= (std::int64_t{1} << 24) && train::plan_memory(config, hi, seq, oo, plan_compute(o.device)).total() <= memory) {
        lo = hi;
        hi *= 2;
      }
      while (hi - lo > 1) {
        const std::int64_t mid = lo + (hi - lo) / 2;
        (train::plan_memory(config, mid, seq, oo, plan_compute(o.device)).total() <= memory ? lo : hi) = mid;
      }
      largest.add_row({preset, seq, opt.label(), memory, lo});
      row.push_back(lo > 0 ? group_digits(lo) : "none");
      rows.push_back(std::move(row));
    }
  }
  SuiteOutput out;
  out.report.tables.push_back(std::move(plans));
  out.report.tables.push_back(std::move(largest));
  std::vector<Align> align(header.size(), Align::kRight);
  align[0] = align[1] = Align::kLeft;
  out.text = fmt::format("memory-plan: predicted peak training memory (params + grads + optimizer state + activations + "
                         "workspace) from the engine's accounting; memory to fit: {} ({}); {}\n",
                         human_bytes(static_cast<double>(memory)), o.memory_size > 0 ? "--memory" : "free memory of this machine",
                         device_line(o, env));
  out.text += format_table(header, align, rows);
  out.text += "✗ does not fit\n";

  if (!to_measure.empty()) {
    Table measured{"measured",
                   {{"preset", T::kText, ""},
                    {"batch", T::kInt, ""},
                    {"seq", T::kInt, "tokens"},
                    {"optimizer", T::kText, ""},
                    {"status", T::kText, ""},
                    {"predicted_bytes", T::kInt, "bytes"},
                    {"measured_peak_bytes", T::kInt, "bytes"},
                    {"rss_peak_bytes", T::kInt, "bytes"},
                    {"error_percent", T::kReal, "%"}},
                   {}};
    Runner runner(progress, to_measure.size());
    std::vector<std::vector<std::string>> mrows;
    for (const ToMeasure& m : to_measure) {
      TimingSpec spec;
      spec.config = config_for(o, m.preset);
      spec.batch = m.batch;
      spec.seq = m.seq;
      spec.mode = TimingMode::kStep;
      spec.optimizer = m.opt;
      spec.warmup_steps = 0;
      spec.measure_steps = 1;
      spec.seed = o.seeds.front();
      const RunRecord r = runner.time(fmt::format("{} {} batch {}", m.preset, m.opt.label(), m.batch), spec);
      const double err = safe_delta(static_cast<double>(r.measured_peak_bytes), static_cast<double>(m.plan.total()));
      measured.add_row({m.preset, m.batch, m.seq, m.opt.label(), std::string(status_name(r.status)), m.plan.total(),
                        r.measured_peak_bytes, r.rss_peak_bytes, real_or_empty(err)});
      mrows.push_back({m.preset, std::to_string(m.batch), m.opt.label(), human_bytes(static_cast<double>(m.plan.total())),
                       human_bytes(static_cast<double>(r.measured_peak_bytes)), signed_percent(err),
                       human_bytes(static_cast<double>(r.rss_peak_bytes))});
    }
    out.report.tables.push_back(std::move(measured));
    std::vector<Align> malign(7, Align::kRight);
    malign[0] = malign[2] = Align::kLeft;
    out.text += "\npredicted against measured (one training step; measured = peak of nibble's buffers):\n";
    out.text += format_table({"preset", "batch", "optimizer", "predicted", "measured", "difference", "max RSS"}, malign,
                             mrows);
  }

  // One bar per optimizer for the first preset at the first batch.
  const model::GptConfig config = config_for(o, o.presets.front());
  const std::int64_t seq = std::min(seq_for(o, o.presets.front()), config.context);
  std::vector<std::string> names;
  std::vector<train::MemoryPlan> bars;
  for (const OptimizerChoice& opt : o.optimizers) {
    names.push_back(opt.label());
    bars.push_back(train::plan_memory(config, o.batches.front(), seq, plan_optimizer(opt, o.device), plan_compute(o.device)));
  }
  out.plots.push_back({"memory-plan", render_svg(memory_chart(fmt::format("Predicted peak memory ({} preset, batch {} x {})",
                                                                          o.presets.front(), o.batches.front(), seq),
                                                              names, bars))});
  return out;
}

nlohmann::json options_json(Suite suite, const SuiteOptions& o) {
  nlohmann::json j;
  j["suite"] = std::string(suite_name(suite));
  j["device"] = o.device == BenchDevice::kCpu ? "cpu" : "cuda";
  nlohmann::json opts = nlohmann::json::array();
  for (const OptimizerChoice& c : o.optimizers) opts.push_back(c.label());
  j["optimizers"] = opts;
  j["baseline"] = o.optimizers.empty() ? "" : o.optimizers.front().label();
  j["preset"] = o.preset;
  j["seq"] = o.seq;
  j["batches"] = o.batches;
  j["batch"] = o.batch;
  j["presets"] = o.presets;
  nlohmann::json modes = nlohmann::json::array();
  for (TimingMode m : o.modes) modes.push_back(std::string(timing_mode_name(m)));
  j["modes"] = modes;
  j["vocab"] = o.vocab;
  j["warmup_steps"] = o.warmup_steps;
  j["measure_steps"] = o.measure_steps;
  j["seeds"] = o.seeds;
  j["target_loss"] = o.target_loss ? nlohmann::json(*o.target_loss) : nlohmann::json();
  j["time_budget_s"] = o.time_budget_s;
  j["max_steps"] = o.max_steps;
  j["stop_at_target"] = o.stop_at_target;
  j["eval_every"] = o.eval_every;
  j["eval_batches"] = o.eval_batches;
  j["lr"] = o.lr ? nlohmann::json(*o.lr) : nlohmann::json();
  j["data"] = o.data.empty() ? std::string("default corpus") : o.data.string();
  j["memory_limit_bytes"] = o.memory_limit;
  j["memory_bytes"] = o.memory_size;
  j["measure"] = o.measure;
  j["measure_max_bytes"] = o.measure_max;
  return j;
}

}  // namespace

std::string_view suite_name(Suite suite) {
  for (const SuiteInfo& s : kSuites)
    if (s.suite == suite) return s.name;
  return "?";
}

Suite suite_from_name(std::string_view name) {
  for (const SuiteInfo& s : kSuites)
    if (s.name == name) return s.suite;
  throw InvalidArgument(fmt::format("unknown suite '{}' (known: batch-sweep, profile, model-sweep, convergence, memory-plan)", name));
}

BenchDevice bench_device_from_name(std::string_view name) {
  if (name == "cpu") return BenchDevice::kCpu;
  if (name == "cuda") return BenchDevice::kCuda;
  throw InvalidArgument(fmt::format("unknown device '{}' (known: cpu, cuda)", name));
}

SuiteOptions default_suite_options(Suite suite, BenchDevice device) {
  SuiteOptions o;
  o.device = device;
  const bool cpu = device == BenchDevice::kCpu;
  const std::vector<Precision> fp32{Precision::kFp32};
  o.presets = {"tiny", "char", "small", "medium", "large", "xl", "2.7b"};
  o.modes = {TimingMode::kForward, TimingMode::kForwardBackward, TimingMode::kStep};
  switch (suite) {
    case Suite::kBatchSweep:
      o.optimizers = parse_optimizers("adamw:fp32,adamw:8bit", fp32);
      o.batches = cpu ? std::vector<std::int64_t>{4, 8, 16, 32} : std::vector<std::int64_t>{16, 24, 32, 48, 64, 96, 128};
      o.seq = cpu ? 64 : 0;
      o.warmup_steps = cpu ? 1 : 10;
      o.measure_steps = cpu ? 6 : 50;
      break;
    case Suite::kProfile:
      o.optimizers = parse_optimizers("adamw:fp32,adamw:8bit,adamw:4bit,lion:8bit,adafactor:fp32,sgd:fp32", fp32);
      o.batch = cpu ? 8 : 16;
      o.seq = cpu ? 64 : 0;
      o.warmup_steps = cpu ? 2 : 10;
      o.measure_steps = cpu ? 8 : 100;
      o.eval_batches = cpu ? 2 : 8;
      break;
    case Suite::kModelSweep:
      o.optimizers = parse_optimizers("adamw:fp32", fp32);
      if (cpu) o.presets = {"tiny", "char", "small", "medium"};
      o.batch = cpu ? 1 : 16;
      o.seq = cpu ? 128 : 0;
      o.warmup_steps = cpu ? 1 : 5;
      o.measure_steps = cpu ? 3 : 20;
      break;
    case Suite::kConvergence:
      o.optimizers = parse_optimizers("adamw:fp32,adamw:8bit,lion:fp32", fp32);
      o.preset = cpu ? "tiny" : "char";
      o.batch = cpu ? 16 : 64;
      o.seq = 0;
      o.seeds = {1, 2, 3};
      o.target_loss = cpu ? 2.6f : 1.6f;
      o.time_budget_s = cpu ? 15.0 : 300.0;
      o.max_steps = cpu ? 2000 : 5000;
      o.eval_every = cpu ? 25 : 100;
      o.eval_batches = cpu ? 4 : 16;
      o.warmup_steps = 0;
      break;
    case Suite::kMemoryPlan:
      o.optimizers = parse_optimizers("adamw:fp32,adamw:bf16,adamw:8bit,adamw:4bit,lion:8bit,adafactor:fp32,sgd:fp32", fp32);
      o.batches = {1, 8, 16, 32, 64};
      o.seq = 0;
      o.measure_max = std::int64_t{2} << 30;
      break;
  }
  return o;
}

void validate(Suite suite, const SuiteOptions& o) {
  if (o.optimizers.empty()) throw InvalidArgument("the optimizer list is empty");
  auto positive = [](const char* what, std::int64_t v) {
    if (v <= 0) throw InvalidArgument(fmt::format("{} must be positive, got {}", what, v));
  };
  if (o.seq < 0) throw InvalidArgument(fmt::format("seq must be >= 0, got {}", o.seq));
  if (o.vocab < 0) throw InvalidArgument(fmt::format("vocab must be >= 0, got {}", o.vocab));
  if (o.memory_limit < 0) throw InvalidArgument(fmt::format("memory limit must be >= 0, got {}", o.memory_limit));
  if (o.memory_size < 0) throw InvalidArgument(fmt::format("memory must be >= 0, got {}", o.memory_size));
  if (o.seeds.empty()) throw InvalidArgument("the seed list is empty");
  positive("eval batches", o.eval_batches);
  const bool uses_presets = suite == Suite::kModelSweep || suite == Suite::kMemoryPlan;
  if (uses_presets) {
    if (o.presets.empty()) throw InvalidArgument("the preset list is empty");
    // A seq beyond a preset's context is cut to the context for that preset.
    for (const std::string& p : o.presets) model::gpt_preset(p);  // throws for an unknown preset
  } else {
    const model::GptConfig c = model::gpt_preset(o.preset);
    if (o.seq > c.context)
      throw InvalidArgument(fmt::format("seq {} is longer than the {} preset's context {}", o.seq, o.preset, c.context));
  }
  if (suite == Suite::kBatchSweep || suite == Suite::kMemoryPlan) {
    if (o.batches.empty()) throw InvalidArgument("the batch list is empty");
    for (std::int64_t b : o.batches) positive("batch", b);
  } else {
    positive("batch", o.batch);
  }
  if (suite == Suite::kModelSweep && o.modes.empty()) throw InvalidArgument("the mode list is empty");
  if (suite != Suite::kMemoryPlan && suite != Suite::kConvergence) {
    if (o.warmup_steps < 0) throw InvalidArgument(fmt::format("warm-up steps must be >= 0, got {}", o.warmup_steps));
    positive("measured steps", o.measure_steps);
  }
  if (suite == Suite::kConvergence) {
    if (!o.target_loss && !(o.time_budget_s > 0.0) && o.max_steps <= 0)
      throw InvalidArgument("convergence needs a target loss, a time budget or a step limit");
    if (!(o.time_budget_s >= 0.0) || !std::isfinite(o.time_budget_s))
      throw InvalidArgument(fmt::format("time budget must be finite and >= 0, got {}", o.time_budget_s));
    if (o.max_steps < 0) throw InvalidArgument(fmt::format("max steps must be >= 0, got {}", o.max_steps));
    if (o.target_loss && !std::isfinite(*o.target_loss))
      throw InvalidArgument(fmt::format("target loss must be finite, got {}", *o.target_loss));
    if (o.eval_every <= 0) throw InvalidArgument(fmt::format("convergence evaluates every N steps: eval every must be positive, got {}", o.eval_every));
  }
  if (o.eval_every < 0) throw InvalidArgument(fmt::format("eval every must be >= 0, got {}", o.eval_every));
  if (o.device == BenchDevice::kCuda && (suite == Suite::kProfile || suite == Suite::kModelSweep))
    throw InvalidArgument("--device cuda: profile and model-sweep time the CPU engine's forward, backward and step "
                          "apart; on CUDA run batch-sweep, convergence or memory-plan (and `nibble train --device "
                          "cuda --no-cuda-graph` for the optimizer's share of a step)");
}

SuiteOutput run_suite(Suite suite, const SuiteOptions& options, const ProgressCallback& progress) {
  validate(suite, options);
  const nlohmann::json env = capture_environment();
  SuiteOutput out;
  switch (suite) {
    case Suite::kBatchSweep: out = batch_sweep(options, progress, env); break;
    case Suite::kProfile: out = profile(options, progress, env); break;
    case Suite::kModelSweep: out = model_sweep(options, progress, env); break;
    case Suite::kConvergence: out = convergence(options, progress, env); break;
    case Suite::kMemoryPlan: out = memory_plan(options, progress, env); break;
  }
  out.report.suite = std::string(suite_name(suite));
  out.report.environment = env;
  out.report.options = options_json(suite, options);
  return out;
}

}  // namespace nibble::bench
