// `nibble optimizers`: what each algorithm's state costs at each precision, in bytes per
// parameter of a GPT-2-shaped parameter set, counted the way the optimizer allocates it.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "cli/commands.hpp"
#include "cli/flags.hpp"
#include "cli/param_sets.hpp"
#include "nibble/algorithms.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"

namespace nibble::cli {
namespace {

struct OptimizersOptions {
  std::string set = "gpt2-124m";
  int block_size = 0;
  std::int64_t min_quant_size = OptimizerOptions{}.min_quant_size;
  std::string json_path;
};


struct Row {
  Algorithm algorithm;
  Precision precision;
  double state_bytes = 0.0;
  std::string note;
};

void run_optimizers(const OptimizersOptions& options) {
  if (options.block_size < 0) {
    throw InvalidArgument(
        fmt::format("--block-size must not be negative, got {}", options.block_size));
  }
  if (options.min_quant_size < 0) {
    throw InvalidArgument(
        fmt::format("--min-quant-size must not be negative, got {}", options.min_quant_size));
  }
  const std::vector<ParamShape> set = named_param_set(options.set);
  std::ofstream json_out;
  if (!options.json_path.empty()) json_out = open_output(options.json_path);

  const std::int64_t params = total_elements(set);
  std::int64_t small_tensors = 0;
  std::int64_t small_params = 0;
  for (const ParamShape& p : set) {
    const std::int64_t numel = shape_numel(p.shape);
    if (numel < options.min_quant_size) {
      ++small_tensors;
      small_params += numel;
    }
  }

  ParamGroup group;
  for (const ParamShape& p : set) group.params.push_back(Param{.name = p.name, .shape = p.shape});
  std::vector<Row> rows;
  for (Algorithm algorithm : all_algorithms()) {
    OptimizerOptions oo;
    oo.algorithm = algorithm;
    oo.block_size = options.block_size;
    oo.min_quant_size = options.min_quant_size;
    for (Precision precision : all_precisions()) {
      oo.precision = precision;
      // Counted as the optimizer allocates it (small tensors keep fp32 state, and so on).
      const double bytes = static_cast<double>(planned_state_bytes(std::span<const ParamGroup>(&group, 1), oo));
      rows.push_back(Row{algorithm, precision, bytes, algorithm_spec(algorithm).state_note(default_hyper(algorithm))});
    }
  }

  std::vector<std::vector<std::string>> cells;
  nlohmann::ordered_json json = nlohmann::ordered_json::array();
  double fp32_bytes = 0.0;
  for (const Row& row : rows) {
    if (row.precision == Precision::kFp32) fp32_bytes = row.state_bytes;
    const double per_param = row.state_bytes / static_cast<double>(params);
    const std::string of_fp32 =
        fp32_bytes > 0.0 ? fmt::format("{:.1f}%", 100.0 * row.state_bytes / fp32_bytes) : "-";
    cells.push_back({std::string(algorithm_name(row.algorithm)),
                     std::string(precision_name(row.precision)), fmt::format("{:.3f}", per_param),
                     fmt::format("{:.1f}", row.state_bytes / (1024.0 * 1024.0)), of_fp32,
                     row.note});
    json.push_back({{"algorithm", algorithm_name(row.algorithm)},
                    {"precision", precision_name(row.precision)},
                    {"set", options.set},
                    {"params", params},
                    {"tensors", set.size()},
                    {"block_size", options.block_size},
                    {"min_quant_size", options.min_quant_size},
                    {"state_bytes", static_cast<std::int64_t>(row.state_bytes + 0.5)},
                    {"state_bytes_per_param", per_param},
                    {"state", row.note}});
  }

  fmt::print(
      "Optimizer state on {} ({} tensors, {} params), default hyperparameters, block size {}.\n",
      options.set, set.size(), group_digits(params),
      options.block_size == 0 ? std::string("default") : std::to_string(options.block_size));
  fmt::print("{} tensors ({} params) below {} elements keep fp32 state.\n\n", small_tensors,
             group_digits(small_params), group_digits(options.min_quant_size));
  fmt::print("{}", format_table(
                       {"algorithm", "precision", "state B/param", "state MiB", "of fp32", "state"},
                       {Align::kLeft, Align::kLeft, Align::kRight, Align::kRight, Align::kRight,
                        Align::kLeft},
                       cells));
  if (json_out.is_open()) finish_output(json_out, options.json_path, json.dump(2) + "\n");
}

}  // namespace

void add_optimizers_command(CLI::App& app) {
  auto options = std::make_shared<OptimizersOptions>();
  CLI::App* sub = app.add_subcommand(
      "optimizers",
      "List every algorithm and state precision with the optimizer-state bytes per parameter on a "
      "GPT-2-shaped parameter set (default hyperparameters).");
  sub->add_option("--set", options->set,
                  fmt::format("Parameter set to count state on: {}", kParamSetNames));
  add_block_size_option(*sub, options->block_size);
  sub->add_option("--min-quant-size", options->min_quant_size,
                  "Tensors with fewer elements than this keep fp32 state")
      ->check(non_negative());
  sub->add_option("--json", options->json_path,
                  "Also write the table to FILE as a JSON array of objects")
      ->option_text("FILE");
  sub->callback([options] { run_optimizers(*options); });
}

}  // namespace nibble::cli
