// convergence: time and steps to a target validation loss, and the loss after a time budget, per
// optimizer over several seeds, with confidence intervals and Welch's test against the baseline.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "bench/suite_registry.hpp"
#include "bench/suites/common.hpp"
#include "nibble/error.hpp"

namespace nibble::bench::suites {
namespace {

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

void set_defaults(SuiteOptions& o, bool cpu) {
  o.optimizers = default_optimizers("adamw:fp32,adamw:8bit,lion:fp32");
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
}

void validate(const SuiteOptions& o) {
  if (!o.target_loss && !(o.time_budget_s > 0.0) && o.max_steps <= 0)
    throw InvalidArgument("convergence needs a target loss, a time budget or a step limit");
  if (!(o.time_budget_s >= 0.0) || !std::isfinite(o.time_budget_s))
    throw InvalidArgument(fmt::format("time budget must be finite and >= 0, got {}", o.time_budget_s));
  if (o.max_steps < 0) throw InvalidArgument(fmt::format("max steps must be >= 0, got {}", o.max_steps));
  if (o.target_loss && !std::isfinite(*o.target_loss))
    throw InvalidArgument(fmt::format("target loss must be finite, got {}", *o.target_loss));
  if (o.eval_every <= 0) throw InvalidArgument(fmt::format("convergence evaluates every N steps: eval every must be positive, got {}", o.eval_every));
}

std::string defaults_flags(const SuiteOptions& o) {
  return fmt::format(" --preset {} --batch {} --seeds {} --target-loss {} --time-budget {} --max-steps {} "
                     "--eval-every {}",
                     o.preset, o.batch, comma_list(o.seeds), o.target_loss ? *o.target_loss : 0.0f, o.time_budget_s,
                     o.max_steps, o.eval_every);
}

}  // namespace

extern constinit const SuiteDefinition kConvergenceSuite{
    .name = "convergence",
    .description = "time and steps to a target validation loss and the loss after a time budget, over seeds, with "
                   "confidence intervals",
    .in_default_tour = false,
    .runs_on_cuda = true,
    .uses_preset_list = false,
    .uses_batch_list = false,
    .times_steps = false,
    .set_defaults = set_defaults,
    .validate = validate,
    .defaults_flags = defaults_flags,
    .run = convergence,
};

}  // namespace nibble::bench::suites
