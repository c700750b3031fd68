// memory-plan: the predicted peak training memory of each preset, optimizer and batch from the
// engine's accounting, the largest batch that fits, and optionally one measured step to check it.
#include <fmt/format.h>


#include "bench/suite_registry.hpp"
#include "bench/suites/common.hpp"

namespace nibble::bench::suites {
namespace {

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
    const std::int64_t seq = seq_within_context(o, preset);
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
  const std::int64_t seq = seq_within_context(o, o.presets.front());
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

void set_defaults(SuiteOptions& o, bool /* the same on every device */) {
  o.optimizers = default_optimizers("adamw:fp32,adamw:bf16,adamw:8bit,adamw:4bit,lion:8bit,adafactor:fp32,sgd:fp32");
  o.batches = {1, 8, 16, 32, 64};
  o.seq = 0;
  o.measure_max = std::int64_t{2} << 30;
}

std::string defaults_flags(const SuiteOptions& o) {
  return fmt::format(" --presets {} --batches {} (seq: each preset's context)", comma_list(o.presets), comma_list(o.batches));
}

}  // namespace

extern constinit const SuiteDefinition kMemoryPlanSuite{
    .name = "memory-plan",
    .description = "predicted peak memory and the largest batch that fits",
    .in_default_tour = false,
    .runs_on_cuda = true,
    .uses_preset_list = true,
    .uses_batch_list = true,
    .times_steps = false,
    .set_defaults = set_defaults,
    .validate = nullptr,
    .defaults_flags = defaults_flags,
    .run = memory_plan,
};

}  // namespace nibble::bench::suites
