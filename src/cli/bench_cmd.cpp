// `nibble bench [suite]`: the optimizer profiling lab. Parses the flags over the suite's defaults,
// shows progress, prints the tables and writes the JSON, CSV and SVG files.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <omp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "bench/runner.hpp"
#include "bench/suite_registry.hpp"
#include "bench/svg.hpp"
#include "cli/commands.hpp"
#include "cli/flags.hpp"
#include "nibble/error.hpp"

namespace nibble::cli {
namespace {

struct BenchFlags {
  std::string suite;
  std::string device = "cpu";
  std::string optimizers, precisions = "fp32", preset, presets, batches, modes, seeds, data;
  std::string memory_limit, memory, measure_max;
  std::int64_t seq = -1, batch = 0, vocab = 0, warmup = -1, steps = 0, max_steps = -1, eval_every = -1,
               eval_batches = 0;
  double target_loss = 0.0, time_budget = -1.0;
  float lr = 0.0f;
  bool measure = false, stop_at_target = false, no_target = false, no_plots = false, quiet = false;
  std::string out_dir = "out/bench";
  int threads = 0;
  CLI::App* app = nullptr;

  bool given(const char* flag) const { return app->count(flag) > 0; }
};

std::vector<bench::TimingMode> parse_modes(const std::string& text) {
  std::vector<bench::TimingMode> out;
  for (std::string_view item : bench::split_at_commas(text)) {
    if (item == "forward") {
      out.push_back(bench::TimingMode::kForward);
    } else if (item == "forward+backward" || item == "fwd+bwd") {
      out.push_back(bench::TimingMode::kForwardBackward);
    } else if (item == "step") {
      out.push_back(bench::TimingMode::kStep);
    } else {
      throw InvalidArgument(fmt::format("unknown mode '{}' (known: forward, forward+backward, step)", item));
    }
  }
  return out;
}

std::vector<std::string> split_names(const std::string& text, const char* what) {
  std::vector<std::string> out;
  for (std::string_view item : bench::split_at_commas(text)) {
    if (item.empty()) throw InvalidArgument(fmt::format("the {} list '{}' has an empty entry", what, text));
    out.emplace_back(item);
  }
  return out;
}

// The suite's defaults with every flag the user gave laid over them.
bench::SuiteOptions options_for(const bench::SuiteDefinition& suite, const BenchFlags& f) {
  const bench::BenchDevice device = bench::bench_device_from_name(f.device);
  bench::SuiteOptions o = bench::default_suite_options(suite, device);
  const std::vector<Precision> precisions = bench::parse_precisions(f.precisions);
  if (f.given("--optimizers")) {
    o.optimizers = bench::parse_optimizers(f.optimizers, precisions);
  } else if (f.given("--precisions")) {
    // Only precisions given: the default algorithms at those precisions.
    std::vector<std::string> algorithms;
    for (const bench::OptimizerChoice& c : o.optimizers) {
      const std::string name(algorithm_name(c.algorithm));
      if (std::find(algorithms.begin(), algorithms.end(), name) == algorithms.end()) algorithms.push_back(name);
    }
    o.optimizers = bench::parse_optimizers(fmt::format("{}", fmt::join(algorithms, ",")), precisions);
  }
  if (f.given("--preset")) o.preset = f.preset;
  if (f.given("--presets")) o.presets = split_names(f.presets, "preset");
  if (f.given("--seq")) o.seq = f.seq;
  if (f.given("--batches")) o.batches = bench::parse_int_list(f.batches, "batch");
  if (f.given("--batch")) o.batch = f.batch;
  if (f.given("--modes")) o.modes = parse_modes(f.modes);
  if (f.given("--vocab")) o.vocab = f.vocab;
  if (f.given("--warmup-steps")) o.warmup_steps = f.warmup;
  if (f.given("--steps")) o.measure_steps = f.steps;
  if (f.given("--seeds")) {
    o.seeds.clear();
    for (std::int64_t s : bench::parse_int_list(f.seeds, "seed")) o.seeds.push_back(static_cast<std::uint64_t>(s));
  }
  if (f.given("--target-loss")) o.target_loss = static_cast<float>(f.target_loss);
  if (f.given("--no-target")) o.target_loss.reset();
  if (f.given("--time-budget")) o.time_budget_s = f.time_budget;
  if (f.given("--max-steps")) o.max_steps = f.max_steps;
  if (f.given("--stop-at-target")) o.stop_at_target = true;
  if (f.given("--eval-every")) o.eval_every = f.eval_every;
  if (f.given("--eval-batches")) o.eval_batches = f.eval_batches;
  if (f.given("--lr")) {
    if (!(f.lr > 0.0f)) throw InvalidArgument(fmt::format("--lr must be positive, got {}", f.lr));
    o.lr = f.lr;
  }
  if (f.given("--data")) o.data = f.data;
  if (f.given("--memory-limit")) o.memory_limit = bench::parse_bytes(f.memory_limit);
  if (f.given("--memory")) o.memory_size = bench::parse_bytes(f.memory);
  if (f.given("--measure")) o.measure = true;
  if (f.given("--measure-max")) o.measure_max = bench::parse_bytes(f.measure_max);
  return o;
}

// One line on a terminal that is rewritten as the run advances; elsewhere one line per finished run.
class ProgressLine {
 public:
  explicit ProgressLine(bool quiet) : quiet_(quiet), tty_(::isatty(STDERR_FILENO) != 0) {}
  ~ProgressLine() { clear(); }
  void operator()(const bench::Progress& p) {
    if (quiet_) return;
    using Clock = std::chrono::steady_clock;
    if (p.step == 0 && !p.finished) start_ = Clock::now();
    const double s = std::chrono::duration<double>(Clock::now() - start_).count();
    if (p.finished) {
      if (!tty_ || *p.finished != bench::RunStatus::kOk) {
        clear();
        fmt::print(stderr, "[{}/{}] {}: {} after {:.1f} s\n", p.index, p.count, p.label, bench::status_name(*p.finished), s);
      }
      return;
    }
    if (!tty_) return;
    const std::string steps = p.steps > 0 ? fmt::format("step {}/{}", p.step, p.steps) : fmt::format("step {}", p.step);
    fmt::print(stderr, "\r\033[K[{}/{}] {}: {} ({:.1f} s)", p.index, p.count, p.label, p.step == 0 ? "starting" : steps, s);
    std::fflush(stderr);
    shown_ = true;
  }

 private:
  void clear() {
    if (tty_ && shown_) {
      fmt::print(stderr, "\r\033[K");
      std::fflush(stderr);
    }
    shown_ = false;
  }
  bool quiet_, tty_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point start_{};
};

void run_one(const bench::SuiteDefinition& suite, const BenchFlags& f) {
  const bench::SuiteOptions o = options_for(suite, f);
  bench::validate(suite, o);
  ProgressLine progress(f.quiet);
  const bench::SuiteOutput out = bench::run_suite(suite, o, [&](const bench::Progress& p) { progress(p); });
  fmt::print("\n{}", out.text);
  const std::string stem(suite.name);
  std::vector<std::filesystem::path> written = bench::write_report(out.report, f.out_dir, stem);
  if (!f.no_plots) {
    for (const bench::Plot& plot : out.plots) {
      const std::filesystem::path path = std::filesystem::path(f.out_dir) / (plot.name + ".svg");
      bench::save_svg(path, plot.svg);
      written.push_back(path);
    }
  }
  std::vector<std::string> files;
  for (const auto& p : written) files.push_back(p.filename().string());
  fmt::print("wrote {}: {}\n", f.out_dir, fmt::join(files, ", "));
  std::fflush(stdout);
}

void run_bench(BenchFlags& f) {
  if (f.threads < 0) throw InvalidArgument(fmt::format("--threads must be >= 0, got {}", f.threads));
  // An output directory that cannot be made fails now, not after minutes of measuring.
  std::error_code ec;
  std::filesystem::create_directories(f.out_dir, ec);
  if (ec || !std::filesystem::is_directory(f.out_dir))
    throw IoError(fmt::format("cannot use output directory '{}': {}", f.out_dir,
                              ec ? ec.message() : std::string("not a directory")));
  if (f.threads > 0) omp_set_num_threads(f.threads);
  if (f.suite.empty()) {
    std::vector<const bench::SuiteDefinition*> tour;
    for (const bench::SuiteDefinition* s : bench::all_suites())
      if (s->in_default_tour) tour.push_back(s);
    for (const bench::SuiteDefinition* s : tour) bench::validate(*s, options_for(*s, f));  // every flag checked before the first run
    for (const bench::SuiteDefinition* s : tour) run_one(*s, f);
    return;
  }
  run_one(bench::suite_from_name(f.suite), f);
}

// The CPU defaults of every suite, for --help.
std::string defaults_text() {
  std::string text = "CPU defaults per suite (--device cuda has larger ones):";
  for (const bench::SuiteDefinition* suite : bench::all_suites()) {
    const bench::SuiteOptions o = bench::default_suite_options(*suite, bench::BenchDevice::kCpu);
    std::vector<std::string> labels;
    for (const bench::OptimizerChoice& c : o.optimizers) labels.push_back(c.label());
    text += fmt::format("\n  {}: --optimizers {}{}", suite->name, fmt::join(labels, ","), suite->defaults_flags(o));
  }
  return text + "\nOutputs in --out: <suite>.json, <suite>-<table>.csv and <suite>-*.svg.";
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto flags = std::make_shared<BenchFlags>();
  std::string suites;
  for (const bench::SuiteDefinition* suite : bench::all_suites())
    suites += fmt::format("{}{} ({})", suites.empty() ? "" : ", ", suite->name, suite->description);
  auto all = [](const bench::SuiteDefinition&) { return true; };
  CLI::App* cmd = app.add_subcommand(
      "bench",
      fmt::format("The optimizer profiling lab. Suites: {}. Without a suite: {} on the char preset. Every flag left "
                  "out takes the suite's default for the device; the first optimizer is the baseline.",
                  suites, bench::suite_names([](const bench::SuiteDefinition& s) { return s.in_default_tour; }, " then ")));
  flags->app = cmd;
  BenchFlags& f = *flags;
  cmd->add_option("suite", f.suite, fmt::format("{} (none: the default tour)", bench::suite_names(all, " or ")));
  cmd->add_option("--device", f.device,
                  fmt::format("cpu or cuda (cuda: {} on the CUDA engine in bf16; --vocab N trains on random tokens of N)",
                              bench::suite_names([](const bench::SuiteDefinition& s) { return s.runs_on_cuda; }, " and ")));
  cmd->add_option("--optimizers", f.optimizers,
                  "Comma-separated name[:precision], e.g. adamw,adamw:8bit,lion:4bit; the first is the baseline");
  cmd->add_option("--precisions", f.precisions, "Precisions for --optimizers entries without one (" + precision_names() + ")");
  cmd->add_option("--preset", f.preset, "Model preset for batch-sweep, profile and convergence (tiny, char, small, ...)");
  cmd->add_option("--presets", f.presets, "Model presets for model-sweep and memory-plan, comma-separated");
  cmd->add_option("--seq", f.seq, "Tokens per sequence (0: the preset's context)")->check(non_negative())->default_str("");
  cmd->add_option("--batches", f.batches, "Batch sizes for batch-sweep and memory-plan, comma-separated");
  cmd->add_option("--batch", f.batch, "Batch size for profile, model-sweep and convergence")->check(at_least(1))->default_str("");
  cmd->add_option("--modes", f.modes, "model-sweep modes: forward, forward+backward, step");
  cmd->add_option("--vocab", f.vocab, "Vocabulary for model-sweep and memory-plan (0: 65 for tiny/char, 50304 above); on --device cuda, batch-sweep and convergence train on random tokens of this vocabulary")->check(number_in(0, false, 2147483647, false))->default_str("");
  cmd->add_option("--warmup-steps", f.warmup, "Steps timed apart as warm-up before the measured ones")->check(non_negative())->default_str("");
  cmd->add_option("--steps", f.steps, "Measured steps per run after warm-up")->check(at_least(1))->default_str("");
  cmd->add_option("--seeds", f.seeds, "Seeds, comma-separated (convergence repeats every optimizer per seed)");
  cmd->add_option("--target-loss", f.target_loss, "convergence: the validation loss to reach")->check(positive())->default_str("");
  cmd->add_flag("--no-target", f.no_target, "convergence: no target loss (budget only)");
  cmd->add_option("--time-budget", f.time_budget, "convergence: seconds per run (0: none)")->check(non_negative())->default_str("");
  cmd->add_option("--max-steps", f.max_steps, "convergence: steps per run at most (0: unlimited)")->check(non_negative())->default_str("");
  cmd->add_flag("--stop-at-target", f.stop_at_target, "convergence: end each run when it reaches the target");
  cmd->add_option("--eval-every", f.eval_every, "Evaluate on validation data every N steps (profile: 0 = at the end)")->check(non_negative())->default_str("");
  cmd->add_option("--eval-batches", f.eval_batches, "Batches per evaluation")->check(at_least(1))->default_str("");
  cmd->add_option("--lr", f.lr, "Learning rate for every optimizer (default: each optimizer's own)")->check(positive())->default_str("");
  cmd->add_option("--data", f.data, "Text file to train on (default: the fortunes corpus)");
  cmd->add_option("--memory-limit", f.memory_limit,
                  "Memory a run may use, e.g. 16GB or 8GiB; a run above it is an out-of-memory row (default: none)");
  cmd->add_option("--memory", f.memory, "memory-plan: the memory to fit, e.g. 16GB (default: this machine's free memory)");
  cmd->add_flag("--measure", f.measure, "memory-plan: also run one step of each configuration below --measure-max");
  cmd->add_option("--measure-max", f.measure_max, "memory-plan: largest predicted size --measure runs (default 2GiB)");
  cmd->add_option("--out", f.out_dir, "Directory for the JSON, CSV and SVG files");
  cmd->add_flag("--no-plots", f.no_plots, "Write no SVG plots");
  cmd->add_flag("--quiet", f.quiet, "No progress display");
  cmd->add_option("--threads", f.threads, "CPU threads (0: OpenMP's default)")->check(number_in(0, false, 4096, false))->default_str("");
  cmd->footer(defaults_text());
  cmd->callback([flags]() { run_bench(*flags); });
}

}  // namespace nibble::cli
