// batch-sweep: tokens per second of each optimizer against the batch size, with the difference to
// the baseline at each batch and whether it exceeds the step-to-step noise (Welch's t-test).
#include <fmt/format.h>


#include "bench/suite_registry.hpp"
#include "bench/suites/common.hpp"

namespace nibble::bench::suites {
namespace {

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
      const bool ok = has_steady_steps(r);
      row.push_back(ok ? fmt::format("{} ±{:.1f}%", tokens(r.tokens_per_s), r.steady_ms.cv_percent) : "out of memory");
      if (i == 0) continue;
      const bool both = ok && has_steady_steps(base);
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
        add_gap(s, x);
        continue;
      }
      add_point(s, x, r.tokens_per_s, summarize(tp));
    }
    plot.series.push_back(std::move(s));
  }
  out.plots.push_back({"batch-sweep-throughput", render_svg(plot)});
  return out;
}

void set_defaults(SuiteOptions& o, bool cpu) {
  o.optimizers = default_optimizers("adamw:fp32,adamw:8bit");
  o.batches = cpu ? std::vector<std::int64_t>{4, 8, 16, 32} : std::vector<std::int64_t>{16, 24, 32, 48, 64, 96, 128};
  o.seq = cpu ? 64 : 0;
  o.warmup_steps = cpu ? 1 : 10;
  o.measure_steps = cpu ? 6 : 50;
}

std::string defaults_flags(const SuiteOptions& o) {
  return fmt::format(" --preset {} --seq {} --batches {} --warmup-steps {} --steps {}", o.preset, o.seq,
                     comma_list(o.batches), o.warmup_steps, o.measure_steps);
}

}  // namespace

extern constinit const SuiteDefinition kBatchSweepSuite{
    .name = "batch-sweep",
    .description = "tokens/s per optimizer x batch size, with the difference to the baseline",
    .in_default_tour = true,
    .runs_on_cuda = true,
    .uses_preset_list = false,
    .uses_batch_list = true,
    .times_steps = true,
    .set_defaults = set_defaults,
    .validate = nullptr,
    .defaults_flags = defaults_flags,
    .run = batch_sweep,
};

}  // namespace nibble::bench::suites
