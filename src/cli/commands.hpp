// The subcommands of the nibble CLI and the few helpers they share. Each subcommand adds itself to
// the app with its flags and a callback; callbacks throw nibble::Error and main() reports it.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "bench/report.hpp"

namespace CLI {
class App;
}

namespace nibble::cli {

// Every subcommand below, in the order `nibble --help` lists them.
void add_commands(CLI::App& app);

// `nibble optimizers`: state bytes per parameter of every algorithm and precision.
void add_optimizers_command(CLI::App& app);
// `nibble step-bench`: time the optimizer step alone against the machine's copy bandwidth.
void add_step_bench_command(CLI::App& app);
// `nibble train` and `nibble sample`: the GPT training engine and text generation.
void add_train_command(CLI::App& app);
// `nibble bench`: the optimizer profiling lab (batch-sweep, profile, model-sweep, convergence,
// memory-plan).
void add_bench_command(CLI::App& app);

// Plain-text tables and grouped digits come from the bench library; files keep plain numbers.
using bench::Align;
using bench::format_table;
using bench::group_digits;

// --block-size, the quantization block size of 8- and 4-bit state, as every subcommand that builds
// optimizers takes it.
void add_block_size_option(CLI::App& sub, int& block_size);

// Opens `path` for writing now, so that a bad path fails before a long run rather than after it;
// throws IoError naming the path.
std::ofstream open_output(const std::string& path);

// Writes `text` to a stream from open_output and checks that it reached the file.
void finish_output(std::ofstream& out, const std::string& path, const std::string& text);

}  // namespace nibble::cli
