// model-sweep: forward, forward+backward and full-step time of each model preset on random tokens;
// a model that does not fit is an out-of-memory row and the sweep goes on.
#include <fmt/format.h>


#include "bench/suite_registry.hpp"
#include "bench/suites/common.hpp"
#include "nibble/error.hpp"

namespace nibble::bench::suites {
namespace {

SuiteOutput model_sweep(const SuiteOptions& o, const ProgressCallback& progress, const nlohmann::json& env) {
  const OptimizerChoice opt = o.optimizers.front();
  Runner runner(progress, o.presets.size() * o.modes.size());
  std::vector<Keyed> runs;
  for (const std::string& preset : o.presets)
    for (TimingMode mode : o.modes) {
      TimingSpec spec;
      spec.config = config_for(o, preset);
      spec.batch = o.batch;
      spec.seq = seq_within_context(o, preset);
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
        add_gap(s, x);
        continue;
      }
      add_point(s, x, r.steady_ms.mean, r.steady_ms);
    }
    plot.series.push_back(std::move(s));
  }
  out.plots.push_back({"model-sweep-step-time", render_svg(plot)});
  return out;
}

void set_defaults(SuiteOptions& o, bool cpu) {
  o.optimizers = default_optimizers("adamw:fp32");
  if (cpu) o.presets = {"tiny", "char", "small", "medium"};
  o.batch = cpu ? 1 : 16;
  o.seq = cpu ? 128 : 0;
  o.warmup_steps = cpu ? 1 : 5;
  o.measure_steps = cpu ? 3 : 20;
}

void validate(const SuiteOptions& o) {
  if (o.modes.empty()) throw InvalidArgument("the mode list is empty");
}

std::string defaults_flags(const SuiteOptions& o) {
  return fmt::format(" --presets {} --batch {} --seq {} --warmup-steps {} --steps {}", comma_list(o.presets), o.batch,
                     o.seq, o.warmup_steps, o.measure_steps);
}

}  // namespace

extern constinit const SuiteDefinition kModelSweepSuite{
    .name = "model-sweep",
    .description = "forward / forward+backward / step time per model preset; out-of-memory rows",
    .in_default_tour = false,
    .runs_on_cuda = false,
    .uses_preset_list = true,
    .uses_batch_list = false,
    .times_steps = true,
    .set_defaults = set_defaults,
    .validate = validate,
    .defaults_flags = defaults_flags,
    .run = model_sweep,
};

}  // namespace nibble::bench::suites
