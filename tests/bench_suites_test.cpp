// nibble bench's runs and suites on the tiny model: list parsing and option checks, the memory plan
// against what the engine really allocates, out-of-memory rows from a simulated allocation failure,
// and each suite's tables, differences and plots.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "bench/report.hpp"
#include "bench/runner.hpp"
#include "bench/suite_registry.hpp"
#include "model/gpt.hpp"
#include "nibble/error.hpp"
#include "nibble/tensor.hpp"
#include "train/optimizer_setup.hpp"

#include "test_util.hpp"

namespace nibble::bench {
namespace {
using test::thrown_message;

const std::vector<Precision> kFp32{Precision::kFp32};

const Cell& cell(const Table& t, std::size_t row, std::string_view column) { return t.rows.at(row).at(t.column(column)); }

const Table& table(const Report& r, std::string_view name) {
  for (const Table& t : r.tables)
    if (t.name == name) return t;
  throw std::runtime_error("no table " + std::string(name));
}

TEST(BenchLists, OptimizersExpandOverPrecisions) {
  const std::vector<Precision> ps{Precision::kFp32, Precision::kInt8};
  const auto list = parse_optimizers("adamw,lion:4bit", ps);
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[0].label(), "adamw:fp32");
  EXPECT_EQ(list[1].label(), "adamw:8bit");
  EXPECT_EQ(list[2].label(), "lion:4bit");
}

TEST(BenchLists, BadListsNameTheBadEntry) {
  EXPECT_NE(thrown_message<Error>([] { parse_optimizers("adamw,rmsprop", kFp32); }).find("'rmsprop'"), std::string::npos);
  EXPECT_NE(thrown_message<Error>([] { parse_optimizers("adamw:3bit", kFp32); }).find("'3bit'"), std::string::npos);
  EXPECT_NE(thrown_message<Error>([] { parse_optimizers("adamw,,lion", kFp32); }).find("empty entry"), std::string::npos);
  EXPECT_NE(thrown_message<Error>([] { parse_optimizers("", kFp32); }).find("empty"), std::string::npos);
  EXPECT_NE(thrown_message<Error>([] { parse_optimizers("adamw,adamw:fp32", kFp32); }).find("twice"), std::string::npos);
  EXPECT_NE(thrown_message<Error>([] { parse_int_list("16,-4", "batch"); }).find("'-4'"), std::string::npos);
  EXPECT_NE(thrown_message<Error>([] { parse_int_list("16,x", "batch"); }).find("'x'"), std::string::npos);
  EXPECT_NE(thrown_message<Error>([] { parse_int_list("0", "batch"); }).find("'0'"), std::string::npos);
  EXPECT_EQ(parse_int_list("16, 32", "batch"), (std::vector<std::int64_t>{16, 32}));
  EXPECT_NE(thrown_message<Error>([] { suite_from_name("sweep"); }).find("'sweep'"), std::string::npos);
  EXPECT_NE(thrown_message<Error>([] { bench_device_from_name("tpu"); }).find("'tpu'"), std::string::npos);
}

TEST(BenchOptions, EveryDefaultIsValidOnTheCpu) {
  for (const SuiteDefinition* s : all_suites()) {
    SCOPED_TRACE(std::string(s->name));
    EXPECT_NO_THROW(validate(*s, default_suite_options(*s, BenchDevice::kCpu)));
    EXPECT_EQ(&suite_from_name(s->name), s);
  }
}

// The table is what the CLI's help, its suite argument and the default tour are made from.
TEST(BenchOptions, TheRegistryListsEverySuiteOnceWithItsParts) {
  std::set<std::string_view> names;
  for (const SuiteDefinition* s : all_suites()) {
    EXPECT_TRUE(names.insert(s->name).second) << s->name << " is listed twice";
    EXPECT_FALSE(s->description.empty()) << s->name;
    EXPECT_TRUE(s->set_defaults && s->defaults_flags && s->run) << s->name;
  }
  for (const char* name : {"batch-sweep", "profile", "model-sweep", "convergence", "memory-plan"})
    EXPECT_EQ(suite_from_name(name).name, name);
  EXPECT_EQ(suite_names([](const SuiteDefinition& s) { return s.in_default_tour; }, " then "), "batch-sweep then profile");
}

TEST(BenchOptions, BadOptionsAreRefusedWithTheirName) {
  auto o = default_suite_options(suite_from_name("batch-sweep"), BenchDevice::kCpu);
  o.batches.clear();
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("batch-sweep"), o); }).find("batch list is empty"), std::string::npos);
  o = default_suite_options(suite_from_name("batch-sweep"), BenchDevice::kCpu);
  o.batches = {8, -2};
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("batch-sweep"), o); }).find("-2"), std::string::npos);
  o = default_suite_options(suite_from_name("profile"), BenchDevice::kCpu);
  o.optimizers.clear();
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("profile"), o); }).find("optimizer list is empty"), std::string::npos);
  o = default_suite_options(suite_from_name("profile"), BenchDevice::kCpu);
  o.measure_steps = 0;
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("profile"), o); }).find("measured steps"), std::string::npos);
  o = default_suite_options(suite_from_name("profile"), BenchDevice::kCpu);
  o.preset = "huge";
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("profile"), o); }).find("'huge'"), std::string::npos);
  o = default_suite_options(suite_from_name("profile"), BenchDevice::kCpu);
  o.seq = 100000;
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("profile"), o); }).find("100000"), std::string::npos);
  o = default_suite_options(suite_from_name("model-sweep"), BenchDevice::kCpu);
  o.presets = {"tiny", "nano"};
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("model-sweep"), o); }).find("'nano'"), std::string::npos);
  o = default_suite_options(suite_from_name("convergence"), BenchDevice::kCpu);
  o.target_loss.reset();
  o.time_budget_s = 0;
  o.max_steps = 0;
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("convergence"), o); }).find("target loss, a time budget or a step limit"),
            std::string::npos);
  o = default_suite_options(suite_from_name("convergence"), BenchDevice::kCpu);
  o.time_budget_s = -1;
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("convergence"), o); }).find("-1"), std::string::npos);
  o = default_suite_options(suite_from_name("memory-plan"), BenchDevice::kCpu);
  o.memory_size = -5;
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("memory-plan"), o); }).find("-5"), std::string::npos);
  o = default_suite_options(suite_from_name("profile"), BenchDevice::kCuda);
  EXPECT_NE(thrown_message<Error>([&] { validate(suite_from_name("profile"), o); }).find("profile and model-sweep time the CPU engine"),
            std::string::npos);
  EXPECT_NO_THROW(validate(suite_from_name("batch-sweep"), default_suite_options(suite_from_name("batch-sweep"), BenchDevice::kCuda)));
  EXPECT_NO_THROW(validate(suite_from_name("memory-plan"), default_suite_options(suite_from_name("memory-plan"), BenchDevice::kCuda)));
}

TEST(HostMemory, BuffersAreCountedAndTheLimitRefusesBeforeTouching) {
  const HostMemoryStats before = host_memory_stats();
  {
    Buffer a(1000);  // rounded up to whole 64-byte blocks
    EXPECT_EQ(host_memory_stats().live_bytes - before.live_bytes, 1024);
    reset_host_memory_peak();
    {
      Buffer b(64 * 100);
      EXPECT_EQ(host_memory_stats().peak_bytes - before.live_bytes, 1024 + 6400);
    }
    EXPECT_EQ(host_memory_stats().live_bytes - before.live_bytes, 1024);
    EXPECT_EQ(host_memory_stats().peak_bytes - before.live_bytes, 1024 + 6400);
    ScopedHostMemoryLimit limit(host_memory_stats().live_bytes + 4096);
    try {
      Buffer c(8192);
      FAIL() << "a buffer above the limit was allocated";
    } catch (const OutOfMemory& e) {
      EXPECT_EQ(e.requested_bytes(), 8192);
      EXPECT_EQ(e.available_bytes(), 4096);
      EXPECT_NE(std::string(e.what()).find("8192 bytes"), std::string::npos) << e.what();
    }
    EXPECT_EQ(host_memory_stats().live_bytes - before.live_bytes, 1024);  // nothing charged
    Buffer d(4096);                                                       // exactly what is free
  }
  EXPECT_EQ(host_memory_stats().live_bytes, before.live_bytes);
  EXPECT_EQ(host_memory_stats().limit_bytes, before.limit_bytes);
  EXPECT_THROW(set_host_memory_limit(-1), InvalidArgument);
}

// The plan is what the engine allocates: model buffers exactly, optimizer state up to the 64-byte
// alignment of each state array.
TEST(MemoryPlan, MatchesWhatTheEngineAllocates) {
  model::GptConfig config = model::gpt_preset("tiny");
  config.vocab = 65;
  const std::int64_t B = 3, T = 40;
  for (Algorithm a : all_algorithms())
    for (Precision p : all_precisions()) {
      SCOPED_TRACE(fmt::format("{} {}", algorithm_name(a), precision_name(p)));
      OptimizerOptions oo;
      oo.algorithm = a;
      oo.precision = p;
      oo.min_quant_size = 1024;  // so that the tiny model has quantized tensors
      const train::MemoryPlan plan = train::plan_memory(config, B, T, oo);
      model::Gpt gpt(config, B, T);
      EXPECT_EQ(plan.params, gpt.param_bytes());
      EXPECT_EQ(plan.grads, gpt.grad_bytes());
      EXPECT_EQ(plan.activations, gpt.activation_bytes());
      Optimizer opt(train::optimizer_param_groups(gpt.tensors()), oo);
      EXPECT_EQ(plan.optimizer_state, opt.state_stats().state_bytes);
      // SophiaG's Hessian estimates; Muon's Newton-Schulz scratch, which only Muon allocates.
      EXPECT_EQ(plan.workspace, (a == Algorithm::kSophiaG ? plan.params : 0) + opt.state_stats().scratch_bytes);
      EXPECT_EQ(opt.state_stats().scratch_bytes > 0, a == Algorithm::kMuon);
    }
}

TEST(MemoryPlan, RefusesBadSizes) {
  model::GptConfig config = model::gpt_preset("tiny");
  config.vocab = 65;
  EXPECT_THROW(train::plan_memory(config, 0, 8, {}), InvalidArgument);
  EXPECT_THROW(train::plan_memory(config, 1, 65, {}), InvalidArgument);  // beyond the context
  config.heads = 3;
  EXPECT_THROW(train::plan_memory(config, 1, 8, {}), InvalidArgument);
}

TimingSpec tiny_spec(TimingMode mode) {
  TimingSpec s;
  s.config = model::gpt_preset("tiny");
  s.config.vocab = 65;
  s.batch = 2;
  s.seq = 16;
  s.mode = mode;
  s.optimizer = {Algorithm::kAdamW, Precision::kInt8};
  s.warmup_steps = 1;
  s.measure_steps = 3;
  return s;
}

TEST(BenchRun, TimingMeasuresEveryStepAndTheMemory) {
  for (TimingMode mode : {TimingMode::kForward, TimingMode::kForwardBackward, TimingMode::kStep}) {
    SCOPED_TRACE(std::string(timing_mode_name(mode)));
    const RunRecord r = run_timing(tiny_spec(mode));
    ASSERT_EQ(r.status, RunStatus::kOk) << r.message;
    ASSERT_EQ(r.steps.size(), 4u);
    EXPECT_TRUE(r.steps[0].warmup);
    EXPECT_FALSE(r.steps[1].warmup);
    EXPECT_EQ(r.steady_ms.n, 3u);
    EXPECT_EQ(r.tokens_per_step, 32);
    EXPECT_GT(r.tokens_per_s, 0.0);
    EXPECT_EQ(r.plan.optimizer_state > 0, mode == TimingMode::kStep);
    // Measured: the plan plus at most the alignment padding of each buffer.
    EXPECT_GE(r.measured_peak_bytes, r.plan.total());
    EXPECT_LT(r.measured_peak_bytes, r.plan.total() + 64 * 1024);
    EXPECT_GT(r.rss_peak_bytes, 0);
    for (const StepSample& s : r.steps) EXPECT_TRUE(std::isfinite(s.loss));
    EXPECT_EQ(r.optimizer_share > 0.0, mode == TimingMode::kStep);
  }
}

// A device smaller than the model: the allocation itself fails, and the run says so.
TEST(BenchRun, SimulatedAllocationFailureIsAnOutOfMemoryRecord) {
  TimingSpec spec = tiny_spec(TimingMode::kStep);
  {
    ScopedHostMemoryLimit device(host_memory_stats().live_bytes + 100 * 1024);
    const RunRecord r = run_timing(spec);
    EXPECT_EQ(r.status, RunStatus::kOutOfMemory);
    EXPECT_NE(r.message.find("out of memory"), std::string::npos) << r.message;
    EXPECT_TRUE(r.steps.empty());
  }
  const HostMemoryStats after = host_memory_stats();
  EXPECT_EQ(after.limit_bytes, 0);
  // The plan check refuses before allocating anything.
  spec.memory_limit = 1000;
  const RunRecord refused = run_timing(spec);
  EXPECT_EQ(refused.status, RunStatus::kOutOfMemory);
  EXPECT_EQ(refused.measured_peak_bytes, 0);
  // And the training engine does the same.
  train::TrainOptions t;
  t.preset = "tiny";
  t.steps = 2;
  t.batch = 2;
  t.memory_limit = 1000;
  const RunRecord trained = run_training(t, 1);
  EXPECT_EQ(trained.status, RunStatus::kOutOfMemory);
  EXPECT_NE(trained.message.find("limit"), std::string::npos) << trained.message;
}

TEST(BenchRun, TrainingRecordsWarmupSteadyAndTarget) {
  train::TrainOptions t;
  t.preset = "tiny";
  t.steps = 12;
  t.batch = 4;
  t.seq = 32;
  t.eval_every = 4;
  t.eval_batches = 1;
  const RunRecord r = run_training(t, 2, 100.0f);  // a target every evaluation meets
  ASSERT_EQ(r.status, RunStatus::kOk) << r.message;
  ASSERT_EQ(r.steps.size(), 12u);
  EXPECT_EQ(std::count_if(r.steps.begin(), r.steps.end(), [](const StepSample& s) { return s.warmup; }), 2);
  EXPECT_EQ(r.steady_ms.n, 10u);
  EXPECT_TRUE(r.reached_target);
  EXPECT_EQ(r.steps_to_target, 4);  // the first evaluation
  EXPECT_GT(r.warmup_s, r.setup_s);
  EXPECT_GE(r.total_s, r.warmup_s);
  ASSERT_TRUE(r.final_val_loss.has_value());
  ASSERT_TRUE(r.first_val_loss.has_value());
  const RunRecord missed = run_training(t, 2, 0.01f);
  EXPECT_FALSE(missed.reached_target);
  EXPECT_FALSE(missed.steps_to_target.has_value());
  // The trainer's own target ends the run at the first evaluation that reaches it.
  t.target_val_loss = 100.0f;
  const RunRecord stopped = run_training(t, 2);
  EXPECT_EQ(stopped.steps.size(), 4u);
}

SuiteOptions tiny_options(const SuiteDefinition& suite) {
  SuiteOptions o = default_suite_options(suite, BenchDevice::kCpu);
  o.preset = "tiny";
  o.seq = 16;
  o.batch = 2;
  o.batches = {2, 4};
  o.warmup_steps = 1;
  o.measure_steps = 3;
  o.eval_batches = 1;
  o.optimizers = parse_optimizers("adamw:fp32,adamw:8bit", kFp32);
  return o;
}

TEST(BenchSuite, BatchSweepTablesDeltasAndPlot) {
  std::vector<Progress> events;
  const SuiteOutput out = run_suite(suite_from_name("batch-sweep"), tiny_options(suite_from_name("batch-sweep")),
                                    [&](const Progress& p) { events.push_back(p); });
  EXPECT_EQ(out.report.suite, "batch-sweep");
  const Table& runs = table(out.report, "runs");
  ASSERT_EQ(runs.rows.size(), 4u);
  EXPECT_EQ(std::get<std::string>(cell(runs, 1, "optimizer")), "adamw:8bit");
  EXPECT_EQ(std::get<std::int64_t>(cell(runs, 2, "batch")), 4);
  const Table& deltas = table(out.report, "deltas");
  ASSERT_EQ(deltas.rows.size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    const double tp = std::get<double>(cell(deltas, i, "tokens_per_s"));
    const double base = std::get<double>(cell(deltas, i, "baseline_tokens_per_s"));
    EXPECT_NEAR(std::get<double>(cell(deltas, i, "delta_percent")), (tp - base) / base * 100.0, 1e-9);
  }
  EXPECT_EQ(table(out.report, "steps").rows.size(), 4u * 4u);
  EXPECT_TRUE(out.report.environment.contains("cpu"));
  EXPECT_EQ(out.report.options["baseline"], "adamw:fp32");
  EXPECT_NE(out.text.find("adamw:8bit tok/s"), std::string::npos) << out.text;
  ASSERT_EQ(out.plots.size(), 1u);
  EXPECT_NE(out.plots[0].svg.find("adamw:8bit"), std::string::npos);
  // Progress: a start, steps and an end for each of the four runs.
  EXPECT_EQ(std::count_if(events.begin(), events.end(), [](const Progress& p) { return p.finished.has_value(); }), 4);
  EXPECT_EQ(events.back().index, 4u);
  EXPECT_EQ(events.back().count, 4u);
  // The whole report survives JSON, and each table CSV.
  const Report back = report_from_json(to_json(out.report));
  EXPECT_EQ(to_json(back), to_json(out.report));
  const Table csv = table_from_csv(to_csv(runs), runs.name, runs.columns);
  EXPECT_EQ(to_csv(csv), to_csv(runs));
}

TEST(BenchSuite, ProfileHasAbsoluteAndRelativeTables) {
  SuiteOptions o = tiny_options(suite_from_name("profile"));
  o.optimizers = parse_optimizers("adamw:fp32,adamw:4bit,sophiag:fp32", kFp32);
  const SuiteOutput out = run_suite(suite_from_name("profile"), o);
  const Table& runs = table(out.report, "runs");
  ASSERT_EQ(runs.rows.size(), 3u);
  const Table& deltas = table(out.report, "deltas");
  ASSERT_EQ(deltas.rows.size(), 2u);
  const double base_plan = static_cast<double>(std::get<std::int64_t>(cell(runs, 0, "plan_total_bytes")));
  const double sophia_plan = static_cast<double>(std::get<std::int64_t>(cell(runs, 2, "plan_total_bytes")));
  EXPECT_NEAR(std::get<double>(cell(deltas, 1, "plan_total_bytes_percent")), (sophia_plan - base_plan) / base_plan * 100.0,
              1e-9);
  EXPECT_GT(std::get<std::int64_t>(cell(runs, 2, "plan_workspace_bytes")), 0);
  EXPECT_TRUE(std::holds_alternative<double>(cell(runs, 0, "final_val_loss")));
  // Without NVML there is no GPU figure, and the cell is empty rather than a made-up zero.
  if (!GpuSampler().available()) {
    EXPECT_TRUE(std::holds_alternative<std::monostate>(cell(runs, 0, "gpu_utilization_mean_percent")));
  } else {
    EXPECT_TRUE(std::holds_alternative<double>(cell(runs, 0, "gpu_utilization_mean_percent")));
  }
  EXPECT_NE(out.text.find("against adamw:fp32"), std::string::npos);
  EXPECT_NE(out.text.find("memory breakdown"), std::string::npos);
  EXPECT_EQ(out.plots.size(), 2u);
}

TEST(BenchSuite, ModelSweepContinuesPastAnOutOfMemoryModel) {
  SuiteOptions o = tiny_options(suite_from_name("model-sweep"));
  o.presets = {"tiny", "char"};
  o.batch = 1;
  o.seq = 16;
  o.modes = {TimingMode::kForward, TimingMode::kStep};
  o.optimizers = parse_optimizers("adamw:fp32", kFp32);
  o.vocab = 65;
  // Between the two models: tiny fits, char does not.
  model::GptConfig tiny = model::gpt_preset("tiny"), chr = model::gpt_preset("char");
  tiny.vocab = chr.vocab = 65;
  OptimizerOptions oo;
  const std::int64_t tiny_need = plan_for_mode(tiny, 1, 16, TimingMode::kStep, oo).total();
  const std::int64_t char_need = plan_for_mode(chr, 1, 16, TimingMode::kForward, oo).total();
  ASSERT_LT(tiny_need, char_need);
  o.memory_limit = (tiny_need + char_need) / 2;
  const SuiteOutput out = run_suite(suite_from_name("model-sweep"), o);
  const Table& runs = table(out.report, "runs");
  ASSERT_EQ(runs.rows.size(), 4u);
  EXPECT_EQ(std::get<std::string>(cell(runs, 0, "status")), "ok");
  EXPECT_EQ(std::get<std::string>(cell(runs, 1, "status")), "ok");
  EXPECT_EQ(std::get<std::string>(cell(runs, 2, "status")), "out of memory");
  EXPECT_EQ(std::get<std::string>(cell(runs, 3, "status")), "out of memory");
  EXPECT_TRUE(std::holds_alternative<std::monostate>(cell(runs, 2, "tokens_per_s")));
  EXPECT_NE(out.text.find("out of memory"), std::string::npos);
}

TEST(BenchSuite, ConvergenceAcrossSeedsWithConfidenceIntervals) {
  SuiteOptions o = tiny_options(suite_from_name("convergence"));
  o.optimizers = parse_optimizers("adamw:fp32,sgd:fp32", kFp32);
  o.seeds = {1, 2, 3};
  o.max_steps = 20;
  o.time_budget_s = 0;
  o.eval_every = 5;
  o.target_loss = 3.9f;  // the tiny model starts near ln(65) = 4.17
  o.lr = 3e-3f;
  const SuiteOutput out = run_suite(suite_from_name("convergence"), o);
  const Table& runs = table(out.report, "runs");
  ASSERT_EQ(runs.rows.size(), 6u);
  const Table& summary = table(out.report, "summary");
  ASSERT_EQ(summary.rows.size(), 2u);
  // The summary's mean and interval are those of the three runs' final losses.
  std::vector<double> finals;
  for (std::size_t i = 0; i < 3; ++i) finals.push_back(std::get<double>(cell(runs, i, "final_val_loss")));
  const Summary s = summarize(finals);
  EXPECT_NEAR(std::get<double>(cell(summary, 0, "final_val_loss_mean")), s.mean, 1e-12);
  EXPECT_NEAR(std::get<double>(cell(summary, 0, "final_val_loss_ci95")), s.ci95_half_width, 1e-12);
  std::int64_t reached = 0;
  for (std::size_t i = 0; i < 3; ++i) reached += std::holds_alternative<std::int64_t>(cell(runs, i, "steps_to_target"));
  EXPECT_EQ(std::get<std::int64_t>(cell(summary, 0, "reached_target")), reached);
  EXPECT_TRUE(std::holds_alternative<bool>(cell(summary, 1, "final_val_loss_exceeds_noise")));
  EXPECT_EQ(out.plots.size(), 2u);
  EXPECT_NE(out.text.find("95% confidence interval"), std::string::npos);
}

TEST(BenchSuite, MemoryPlanFindsTheLargestBatchThatFits) {
  SuiteOptions o = default_suite_options(suite_from_name("memory-plan"), BenchDevice::kCpu);
  o.presets = {"small"};
  o.optimizers = parse_optimizers("adamw:fp32,adamw:8bit", kFp32);
  o.batches = {1, 8};
  o.memory_size = std::int64_t{16} * 1000 * 1000 * 1000;  // 16 GB
  const SuiteOutput out = run_suite(suite_from_name("memory-plan"), o);
  const Table& largest = table(out.report, "largest-batch");
  ASSERT_EQ(largest.rows.size(), 2u);
  model::GptConfig config = model::gpt_preset("small");
  config.vocab = 50304;
  std::int64_t previous = 0;
  for (std::size_t i = 0; i < 2; ++i) {
    OptimizerOptions oo;
    oo.algorithm = o.optimizers[i].algorithm;
    oo.precision = o.optimizers[i].precision;
    const std::int64_t b = std::get<std::int64_t>(cell(largest, i, "largest_batch"));
    ASSERT_GT(b, 0);
    EXPECT_LE(train::plan_memory(config, b, 512, oo).total(), o.memory_size);
    EXPECT_GT(train::plan_memory(config, b + 1, 512, oo).total(), o.memory_size);
    EXPECT_GE(b, previous);  // 8-bit state leaves room for at least as large a batch
    previous = b;
  }
  EXPECT_EQ(table(out.report, "plans").rows.size(), 4u);
}

TEST(BenchSuite, MemoryPlanMeasuresWhatFits) {
  SuiteOptions o = default_suite_options(suite_from_name("memory-plan"), BenchDevice::kCpu);
  o.presets = {"tiny"};
  o.optimizers = parse_optimizers("adamw:fp32,lion:8bit", kFp32);
  o.batches = {2};
  o.measure = true;
  const SuiteOutput out = run_suite(suite_from_name("memory-plan"), o);
  const Table& measured = table(out.report, "measured");
  ASSERT_EQ(measured.rows.size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    const auto predicted = std::get<std::int64_t>(cell(measured, i, "predicted_bytes"));
    const auto got = std::get<std::int64_t>(cell(measured, i, "measured_peak_bytes"));
    EXPECT_GE(got, predicted);
    EXPECT_LT(got, predicted + 64 * 1024);
  }
}

}  // namespace
}  // namespace nibble::bench
