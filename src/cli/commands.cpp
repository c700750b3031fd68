// Every subcommand added to one app (main() and the flag tests build the same one), and the
// subcommands' output files: opened before a long run, so that a bad path fails first.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstring>

#include "cli/commands.hpp"
#include "cli/flags.hpp"
#include "nibble/error.hpp"

namespace nibble::cli {

void add_commands(CLI::App& app) {
  add_optimizers_command(app);
  add_step_bench_command(app);
  add_train_command(app);
  add_bench_command(app);
}

void add_block_size_option(CLI::App& sub, int& block_size) {
  sub.add_option("--block-size", block_size,
                 "Quantization block size in elements; 0 takes the default (256 for 8-bit, 128 for 4-bit)")
      ->check(number_in(0, false, 4096, false));
}

std::ofstream open_output(const std::string& path) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw IoError(fmt::format("cannot write '{}': {}", path, std::strerror(errno)));
  return out;
}

void finish_output(std::ofstream& out, const std::string& path, const std::string& text) {
  out << text;
  out.flush();
  if (!out) throw IoError(fmt::format("writing '{}' failed", path));
}

}  // namespace nibble::cli
