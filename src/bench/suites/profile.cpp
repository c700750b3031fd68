// profile: one training run per optimizer: warm-up, step time, tokens/s, peak memory by part,
// RSS, GPU use and losses, each set against the baseline optimizer.
#include <fmt/format.h>

#include <optional>

#include "bench/suite_registry.hpp"
#include "bench/suites/common.hpp"

namespace nibble::bench::suites {
namespace {

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
  const bool base_ok = has_steady_steps(base);
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
    if (!has_steady_steps(r)) {
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

void set_defaults(SuiteOptions& o, bool cpu) {
  o.optimizers = default_optimizers("adamw:fp32,adamw:8bit,adamw:4bit,adamw:fp8,lion:8bit,adafactor:fp32,sgd:fp32");
  o.batch = cpu ? 8 : 16;
  o.seq = cpu ? 64 : 0;
  o.warmup_steps = cpu ? 2 : 10;
  o.measure_steps = cpu ? 8 : 100;
  o.eval_batches = cpu ? 2 : 8;
}

std::string defaults_flags(const SuiteOptions& o) {
  return fmt::format(" --preset {} --seq {} --batch {} --warmup-steps {} --steps {} --eval-batches {}", o.preset,
                     o.seq, o.batch, o.warmup_steps, o.measure_steps, o.eval_batches);
}

}  // namespace

extern constinit const SuiteDefinition kProfileSuite{
    .name = "profile",
    .description = "warm-up, step time, tokens/s, peak memory by part, RSS, GPU use, losses per optimizer",
    .in_default_tour = true,
    .runs_on_cuda = false,
    .uses_preset_list = false,
    .uses_batch_list = false,
    .times_steps = true,
    .set_defaults = set_defaults,
    .validate = nullptr,
    .defaults_flags = defaults_flags,
    .run = profile,
};

}  // namespace nibble::bench::suites
