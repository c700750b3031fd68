// The suites of nibble bench, one entry each in a table (suite_registry.cpp) that the CLI, its help
// text and the tests read: a suite is one file under src/bench/suites/ that defines its entry.
#pragma once

#include <nlohmann/json.hpp>

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "bench/suites.hpp"

namespace nibble::bench {

// One suite: its name and phrase for the CLI, which shared options it reads (so that the shared
// checks and the CUDA refusal need no list of suites), and its own defaults, checks and run.
struct SuiteDefinition {
  std::string_view name;         // "batch-sweep": the CLI's argument and the stem of its files
  std::string_view description;  // what it measures, for `nibble bench --help`
  bool in_default_tour = false;  // run, in table order, by `nibble bench` without a suite
  bool runs_on_cuda = false;     // false: --device cuda is refused
  bool uses_preset_list = false;  // reads `presets` (each checked); otherwise `preset` (and seq <= its context)
  bool uses_batch_list = false;   // reads `batches` (each positive); otherwise `batch`
  bool times_steps = false;       // reads `warmup_steps` (>= 0) and `measure_steps` (> 0)
  // The suite's defaults over the shared ones; `cpu`: small enough to finish in minutes on two
  // cores, otherwise sized for one large GPU.
  void (*set_defaults)(SuiteOptions& options, bool cpu) = nullptr;
  // Checks beyond the shared ones (may be null); throws InvalidArgument naming the option.
  void (*validate)(const SuiteOptions& options) = nullptr;
  // The flags of its defaults after --optimizers, for --help: " --preset char --seq 64 ...".
  std::string (*defaults_flags)(const SuiteOptions& options) = nullptr;
  // The runs and their report; `environment` is the machine's, captured once per suite.
  SuiteOutput (*run)(const SuiteOptions& options, const ProgressCallback& progress,
                     const nlohmann::json& environment) = nullptr;
};

// Every suite, in the order help lists them.
std::span<const SuiteDefinition* const> all_suites();

// The names of the suites that `keep` selects, in table order, as "a, b<last>c" ("a, b or c").
template <class Keep>
std::string suite_names(Keep keep, std::string_view last_separator) {
  std::vector<std::string_view> names;
  for (const SuiteDefinition* suite : all_suites())
    if (keep(*suite)) names.push_back(suite->name);
  std::string text;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (i > 0) text += i + 1 == names.size() ? last_separator : std::string_view(", ");
    text += names[i];
  }
  return text;
}
// Throws InvalidArgument naming the unknown suite and listing the known ones.
const SuiteDefinition& suite_from_name(std::string_view name);

// The defaults of a suite on a device.
SuiteOptions default_suite_options(const SuiteDefinition& suite, BenchDevice device);
// Throws InvalidArgument naming the first option a suite cannot run with (empty lists, a step
// count or batch below 1, an unknown preset, a convergence run with neither target nor budget).
void validate(const SuiteDefinition& suite, const SuiteOptions& options);

// Runs a suite. Throws InvalidArgument for bad options before the first run; a run that does not
// fit in memory is a row with status "out of memory" and the suite goes on.
SuiteOutput run_suite(const SuiteDefinition& suite, const SuiteOptions& options, const ProgressCallback& progress = {});

}  // namespace nibble::bench
