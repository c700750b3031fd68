// nibble's command line: the subcommands, and the one place where an error becomes a message on
// stderr and an exit code (2 for nibble and flag errors, 1 for anything else).
#include <fmt/format.h>

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdlib>
#include <exception>
#include <new>
#include <string>
#include <string_view>

#include "cli/commands.hpp"
#include "nibble/error.hpp"

#ifndef NIBBLE_VERSION
#define NIBBLE_VERSION "0.1.0"
#endif

namespace {

// Messages stay on one line so that scripts can grep them.
int report_error(std::string_view message, int exit_code) {
  std::string line(message);
  std::replace(line.begin(), line.end(), '\n', ' ');
  fmt::print(stderr, "nibble: error: {}\n", line);
  return exit_code;
}

// NOTE: OpenMP threads that spin while they wait at a barrier stall the whole step when another
// process takes a core: with libgomp's default spin (300,000 rounds) a 2-core machine trained 3-9x
// slower beside one busy process. A short spin (kThreadSpin rounds, then the thread sleeps) keeps
// most of the idle speed of spinning and nearly all the speed of sleeping under load; `nibble
// bench` records what a run used. libgomp reads its wait settings from the environment when it
// loads, before main() runs, so when the user has set neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT,
// nibble sets the short spin and starts itself again, once. If the restart fails, it carries on
// with libgomp's defaults.
constexpr const char* kThreadSpin = "300";

void start_with_short_thread_spin(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) return;
  if (setenv("GOMP_SPINCOUNT", kThreadSpin, 1) != 0) return;
  execv("/proc/self/exe", argv);
  unsetenv("GOMP_SPINCOUNT");
}

}  // namespace

int main(int argc, char** argv) {
  start_with_short_thread_spin(argv);
  CLI::App app{"nibble: training optimizers with fp32, bf16, 8-bit and 4-bit state.", "nibble"};
  // Every flag's help shows its default.
  app.option_defaults()->always_capture_default();
  app.set_version_flag("--version", fmt::format("nibble {}", NIBBLE_VERSION),
                       "Print the version and exit");
  app.require_subcommand(1);
  nibble::cli::add_commands(app);
  // Set after the subcommands exist, which would otherwise inherit it.
  app.footer("Run 'nibble <subcommand> --help' for the flags of a subcommand.");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version arrive as "errors" with exit code 0; CLI11 prints them.
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    const auto parsed = app.get_subcommands();
    const std::string help = parsed.empty()
                                 ? "nibble --help"
                                 : fmt::format("nibble {} --help", parsed.front()->get_name());
    return report_error(fmt::format("{} (see {})", e.what(), help), 2);
  } catch (const nibble::Error& e) {
    return report_error(e.what(), 2);
  } catch (const std::bad_alloc&) {
    return report_error("out of memory", 1);
  } catch (const std::exception& e) {
    return report_error(e.what(), 1);
  }
  return 0;
}
