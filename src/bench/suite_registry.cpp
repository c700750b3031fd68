// The table of nibble bench's suites, and what every suite shares: the options' defaults and
// checks, the run's environment and the options written into its report.
#include "bench/suite_registry.hpp"

#include <fmt/format.h>

#include <cmath>

#include "bench/system.hpp"
#include "model/gpt.hpp"
#include "nibble/error.hpp"

namespace nibble::bench {

// Each defined in its own file under src/bench/suites/.
namespace suites {
extern const SuiteDefinition kBatchSweepSuite;
extern const SuiteDefinition kProfileSuite;
extern const SuiteDefinition kModelSweepSuite;
extern const SuiteDefinition kConvergenceSuite;
extern const SuiteDefinition kMemoryPlanSuite;
}  // namespace suites

namespace {

// NOTE: an explicit table rather than suites that register themselves from a static constructor:
// nibble_bench is a static library, and the linker drops an object file nothing refers to, with
// its constructor.
constexpr const SuiteDefinition* kSuites[] = {
    &suites::kBatchSweepSuite, &suites::kProfileSuite, &suites::kModelSweepSuite, &suites::kConvergenceSuite,
    &suites::kMemoryPlanSuite,
};

nlohmann::json options_json(const SuiteDefinition& suite, const SuiteOptions& o) {
  nlohmann::json j;
  j["suite"] = std::string(suite.name);
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

std::span<const SuiteDefinition* const> all_suites() { return kSuites; }

const SuiteDefinition& suite_from_name(std::string_view name) {
  for (const SuiteDefinition* s : kSuites)
    if (s->name == name) return *s;
  throw InvalidArgument(fmt::format("unknown suite '{}' (known: {})", name,
                                    suite_names([](const SuiteDefinition&) { return true; }, ", ")));
}

BenchDevice bench_device_from_name(std::string_view name) {
  if (name == "cpu") return BenchDevice::kCpu;
  if (name == "cuda") return BenchDevice::kCuda;
  throw InvalidArgument(fmt::format("unknown device '{}' (known: cpu, cuda)", name));
}

SuiteOptions default_suite_options(const SuiteDefinition& suite, BenchDevice device) {
  SuiteOptions o;
  o.device = device;
  o.presets = {"tiny", "char", "small", "medium", "large", "xl", "2.7b"};
  o.modes = {TimingMode::kForward, TimingMode::kForwardBackward, TimingMode::kStep};
  suite.set_defaults(o, device == BenchDevice::kCpu);
  return o;
}

void validate(const SuiteDefinition& suite, const SuiteOptions& o) {
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
  if (suite.uses_preset_list) {
    if (o.presets.empty()) throw InvalidArgument("the preset list is empty");
    // A seq beyond a preset's context is cut to the context for that preset.
    for (const std::string& p : o.presets) model::gpt_preset(p);  // throws for an unknown preset
  } else {
    const model::GptConfig c = model::gpt_preset(o.preset);
    if (o.seq > c.context)
      throw InvalidArgument(fmt::format("seq {} is longer than the {} preset's context {}", o.seq, o.preset, c.context));
  }
  if (suite.uses_batch_list) {
    if (o.batches.empty()) throw InvalidArgument("the batch list is empty");
    for (std::int64_t b : o.batches) positive("batch", b);
  } else {
    positive("batch", o.batch);
  }
  if (suite.validate) suite.validate(o);
  if (suite.times_steps) {
    if (o.warmup_steps < 0) throw InvalidArgument(fmt::format("warm-up steps must be >= 0, got {}", o.warmup_steps));
    positive("measured steps", o.measure_steps);
  }
  if (o.eval_every < 0) throw InvalidArgument(fmt::format("eval every must be >= 0, got {}", o.eval_every));
  if (o.device == BenchDevice::kCuda && !suite.runs_on_cuda)
    throw InvalidArgument(fmt::format(
        "--device cuda: {} time the CPU engine's forward, backward and step apart; on CUDA run {} (and `nibble "
        "train --device cuda --no-cuda-graph` for the optimizer's share of a step)",
        suite_names([](const SuiteDefinition& s) { return !s.runs_on_cuda; }, " and "),
        suite_names([](const SuiteDefinition& s) { return s.runs_on_cuda; }, " or ")));
}

SuiteOutput run_suite(const SuiteDefinition& suite, const SuiteOptions& options, const ProgressCallback& progress) {
  validate(suite, options);
  const nlohmann::json env = capture_environment();
  SuiteOutput out = suite.run(options, progress, env);
  out.report.suite = std::string(suite.name);
  out.report.environment = env;
  out.report.options = options_json(suite, options);
  return out;
}

}  // namespace nibble::bench
