// What a benchmark runs on and what it costs the machine: the environment (CPU, threads, OS,
// compiler, commit, GPU and driver), the process's resident memory and its peak, and GPU
// utilisation and SM clock sampled in the background through NVML, loaded at run time.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>

namespace nibble::bench {

// An object with: nibble_version, commit (git hash the build was configured at, "unknown" when not
// a git checkout), build_type, compiler, cxx_flags, cpu (model name from /proc/cpuinfo), cpu_cores
// (online), threads (OpenMP max threads), memory_total_bytes (MemTotal), os (uname sysname +
// release), hostname, cuda_build (true when nibble was built with CUDA), cuda_runtime_version
// ("n/a" without CUDA), gpu (NVML device 0 name or "n/a"), gpu_driver ("n/a"), gpu_memory_bytes
// (null without NVML), date (UTC, ISO 8601).
nlohmann::json capture_environment();

// Resident memory of this process from /proc/self/status.
struct RssBytes {
  std::int64_t current = 0;  // VmRSS
  std::int64_t peak = 0;     // VmHWM
};
RssBytes read_rss();
// Resets the peak (VmHWM) to the current RSS by writing "5" to /proc/self/clear_refs, so that the
// peak of one run can be read apart from the runs before it. Returns false where the kernel does
// not allow it (the caller then reports the process-lifetime peak and says so).
bool reset_peak_rss();
// MemAvailable from /proc/meminfo, in bytes; 0 when unreadable.
std::int64_t available_host_memory();

// GPU utilisation (%) and SM clock (MHz) of device 0, sampled every `interval_ms` on a background
// thread between start() and stop(). Without libnvidia-ml.so.1 or a GPU, available() is false
// and the results are empty.
class GpuSampler {
 public:
  explicit GpuSampler(int interval_ms = 100);
  ~GpuSampler();  // stops the thread
  GpuSampler(const GpuSampler&) = delete;
  GpuSampler& operator=(const GpuSampler&) = delete;

  bool available() const;
  void start();  // clears earlier samples
  void stop();
  struct Result {
    std::int64_t samples = 0;
    std::optional<double> mean_utilization_percent;  // empty when no sample was taken
    std::optional<double> max_utilization_percent;
    std::optional<double> mean_sm_clock_mhz;
    std::optional<double> max_memory_used_bytes;     // device-wide, as NVML reports it
  };
  Result result() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace nibble::bench
