// The machine a benchmark runs on: environment capture, resident memory from /proc, and GPU
// utilisation sampled on a background thread through NVML, which is loaded with dlopen so that a
// machine without an NVIDIA driver builds and runs the same binary.
#include "bench/system.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <omp.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <mutex>
#include <string_view>
#include <system_error>

#include "nibble/error.hpp"

#if defined(NIBBLE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace nibble::bench {
namespace {

constexpr std::int64_t kKiB = 1024;
constexpr const char* kNotAvailable = "n/a";
constexpr const char* kUnknown = "unknown";

// The value of the first line of a /proc file that starts with `key` (e.g. "VmRSS:"), with the key
// and surrounding blanks removed; empty when the file or the key is missing.
std::string proc_field(const char* path, std::string_view key) {
  std::ifstream file(path);
  std::string line;
  while (std::getline(file, line)) {
    if (!line.starts_with(key)) continue;
    const auto first = line.find_first_not_of(" \t", key.size());
    if (first == std::string::npos) return "";
    const auto last = line.find_last_not_of(" \t\r");
    return line.substr(first, last - first + 1);
  }
  return "";
}

// A "1234 kB" field of /proc/self/status or /proc/meminfo in bytes; 0 when missing or malformed.
std::int64_t proc_kib_field(const char* path, std::string_view key) {
  const std::string value = proc_field(path, key);
  std::int64_t kib = 0;
  std::size_t i = 0;
  for (; i < value.size() && value[i] >= '0' && value[i] <= '9'; ++i) kib = kib * 10 + (value[i] - '0');
  if (i == 0 || value.compare(i, std::string::npos, " kB") != 0) return 0;
  return kib * kKiB;
}

// The subset of NVML that nibble uses, declared here because the machines that build nibble need
// not have the NVML header. Types follow nvml.h: nvmlReturn_t and enums are int, 0 is success.
using NvmlReturn = int;
struct NvmlDeviceOpaque;
using NvmlDevice = NvmlDeviceOpaque*;
struct NvmlUtilization {
  unsigned int gpu;
  unsigned int memory;
};
struct NvmlMemory {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
};
constexpr NvmlReturn kNvmlSuccess = 0;
constexpr int kNvmlClockSm = 1;
// NVML_DEVICE_NAME_V2_BUFFER_SIZE and NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE.
constexpr unsigned int kNvmlNameBufferSize = 96;
constexpr unsigned int kNvmlDriverBufferSize = 80;

// libnvidia-ml.so.1, opened and initialised for the lifetime of the object. ok() is false when the
// library, any symbol, initialisation or device 0 is missing; every query then reports failure.
class Nvml {
 public:
  Nvml() {
    library_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library_ == nullptr) return;
    if (!resolve(init_, "nvmlInit_v2") || !resolve(shutdown_, "nvmlShutdown") ||
        !resolve(handle_by_index_, "nvmlDeviceGetHandleByIndex_v2") ||
        !resolve(name_, "nvmlDeviceGetName") ||
        !resolve(driver_version_, "nvmlSystemGetDriverVersion") ||
        !resolve(utilization_, "nvmlDeviceGetUtilizationRates") ||
        !resolve(clock_info_, "nvmlDeviceGetClockInfo") ||
        !resolve(memory_info_, "nvmlDeviceGetMemoryInfo")) {
      return;
    }
    if (init_() != kNvmlSuccess) return;
    initialised_ = true;
    ok_ = handle_by_index_(0, &device_) == kNvmlSuccess && device_ != nullptr;
  }
  ~Nvml() {
    if (initialised_) shutdown_();
    if (library_ != nullptr) dlclose(library_);
  }
  Nvml(const Nvml&) = delete;
  Nvml& operator=(const Nvml&) = delete;

  bool ok() const { return ok_; }

  std::optional<std::string> device_name() const {
    std::array<char, kNvmlNameBufferSize> buffer{};
    if (!ok_ || name_(device_, buffer.data(), buffer.size()) != kNvmlSuccess) return std::nullopt;
    buffer.back() = '\0';
    return std::string(buffer.data());
  }
  std::optional<std::string> driver_version() const {
    std::array<char, kNvmlDriverBufferSize> buffer{};
    if (!ok_ || driver_version_(buffer.data(), buffer.size()) != kNvmlSuccess) return std::nullopt;
    buffer.back() = '\0';
    return std::string(buffer.data());
  }
  std::optional<NvmlUtilization> utilization() const {
    NvmlUtilization rates{};
    if (!ok_ || utilization_(device_, &rates) != kNvmlSuccess) return std::nullopt;
    return rates;
  }
  std::optional<unsigned int> sm_clock_mhz() const {
    unsigned int mhz = 0;
    if (!ok_ || clock_info_(device_, kNvmlClockSm, &mhz) != kNvmlSuccess) return std::nullopt;
    return mhz;
  }
  std::optional<NvmlMemory> memory() const {
    NvmlMemory memory{};
    if (!ok_ || memory_info_(device_, &memory) != kNvmlSuccess) return std::nullopt;
    return memory;
  }

 private:
  template <typename Function>
  bool resolve(Function*& function, const char* name) {
    function = reinterpret_cast<Function*>(dlsym(library_, name));
    return function != nullptr;
  }

  void* library_ = nullptr;
  bool initialised_ = false;
  bool ok_ = false;
  NvmlDevice device_ = nullptr;
  NvmlReturn (*init_)() = nullptr;
  NvmlReturn (*shutdown_)() = nullptr;
  NvmlReturn (*handle_by_index_)(unsigned int, NvmlDevice*) = nullptr;
  NvmlReturn (*name_)(NvmlDevice, char*, unsigned int) = nullptr;
  NvmlReturn (*driver_version_)(char*, unsigned int) = nullptr;
  NvmlReturn (*utilization_)(NvmlDevice, NvmlUtilization*) = nullptr;
  NvmlReturn (*clock_info_)(NvmlDevice, int, unsigned int*) = nullptr;
  NvmlReturn (*memory_info_)(NvmlDevice, NvmlMemory*) = nullptr;
};

std::string compiler_text() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return kUnknown;
#endif
}

std::string cuda_runtime_version_text() {
#if defined(NIBBLE_WITH_CUDA)
  // Encoded as 1000 * major + 10 * minor (12040 is 12.4).
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return kUnknown;
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
#else
  return kNotAvailable;
#endif
}

std::string utc_now_iso8601() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  std::array<char, 32> buffer{};
  if (gmtime_r(&now, &utc) == nullptr ||
      std::strftime(buffer.data(), buffer.size(), "%Y-%m-%dT%H:%M:%SZ", &utc) == 0) {
    return kUnknown;
  }
  return buffer.data();
}

std::int64_t online_cpu_cores() {
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  if (online > 0) return online;
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

nlohmann::json capture_environment() {
  nlohmann::json env;
  env["nibble_version"] = NIBBLE_VERSION;
  const std::string commit = NIBBLE_GIT_COMMIT;
  env["commit"] = commit.empty() ? kUnknown : commit;
  env["build_type"] = NIBBLE_BUILD_TYPE;
  env["compiler"] = compiler_text();
  env["cxx_flags"] = NIBBLE_CXX_FLAGS_TEXT;

  const std::string cpu = proc_field("/proc/cpuinfo", "model name");
  // The line reads "model name\t: <model>"; what proc_field leaves starts at the colon.
  const auto model = cpu.find_first_not_of(": \t");
  env["cpu"] = model == std::string::npos ? std::string(kUnknown) : cpu.substr(model);
  env["cpu_cores"] = online_cpu_cores();
  env["threads"] = omp_get_max_threads();
  // How OpenMP threads wait (the CLI sets GOMP_SPINCOUNT when the user set neither).
  for (const char* name : {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}) {
    const char* value = std::getenv(name);
    env[name] = value != nullptr ? nlohmann::json(value) : nlohmann::json();
  }
  const std::int64_t memory_total = proc_kib_field("/proc/meminfo", "MemTotal:");
  env["memory_total_bytes"] = memory_total > 0 ? nlohmann::json(memory_total) : nlohmann::json();

  utsname system{};
  if (uname(&system) == 0) {
    env["os"] = std::string(system.sysname) + " " + system.release;
  } else {
    env["os"] = kUnknown;
  }
  std::array<char, 256> host{};
  if (gethostname(host.data(), host.size() - 1) == 0 && host[0] != '\0') {
    env["hostname"] = std::string(host.data());
  } else {
    env["hostname"] = kUnknown;
  }

#if defined(NIBBLE_WITH_CUDA)
  env["cuda_build"] = true;
#else
  env["cuda_build"] = false;
#endif
  env["cuda_runtime_version"] = cuda_runtime_version_text();

  const Nvml nvml;
  env["gpu"] = nvml.device_name().value_or(kNotAvailable);
  env["gpu_driver"] = nvml.driver_version().value_or(kNotAvailable);
  const auto gpu_memory = nvml.memory();
  env["gpu_memory_bytes"] = gpu_memory ? nlohmann::json(static_cast<std::int64_t>(gpu_memory->total))
                                       : nlohmann::json();
  env["date"] = utc_now_iso8601();
  return env;
}

RssBytes read_rss() {
  return RssBytes{.current = proc_kib_field("/proc/self/status", "VmRSS:"),
                  .peak = proc_kib_field("/proc/self/status", "VmHWM:")};
}

bool reset_peak_rss() {
  const int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool written = write(fd, "5", 1) == 1;
  const bool closed = close(fd) == 0;
  return written && closed;
}

std::int64_t available_host_memory() { return proc_kib_field("/proc/meminfo", "MemAvailable:"); }

// NOTE: one mutex guards the samples and the stop flag; the thread holds it only to record a
// sample and to wait, so result() never waits for an NVML call. `lifecycle` serialises start()
// and stop() so that two callers cannot both join or both spawn the thread.
struct GpuSampler::State {
  std::chrono::milliseconds interval;
  Nvml nvml;

  std::mutex lifecycle;
  std::thread thread;

  mutable std::mutex mutex;
  std::condition_variable wake;
  bool stopping = false;
  std::int64_t samples = 0;
  std::int64_t utilization_count = 0;
  double utilization_sum = 0;
  double utilization_max = 0;
  std::int64_t clock_count = 0;
  double clock_sum = 0;
  std::optional<double> memory_used_max;

  void clear() {
    samples = 0;
    utilization_count = 0;
    utilization_sum = 0;
    utilization_max = 0;
    clock_count = 0;
    clock_sum = 0;
    memory_used_max.reset();
  }

  void run() {
    std::unique_lock lock(mutex);
    while (!stopping) {
      lock.unlock();
      const auto utilization = nvml.utilization();
      const auto clock = nvml.sm_clock_mhz();
      const auto memory = nvml.memory();
      lock.lock();
      if (utilization || clock || memory) ++samples;
      if (utilization) {
        ++utilization_count;
        utilization_sum += utilization->gpu;
        utilization_max = std::max(utilization_max, static_cast<double>(utilization->gpu));
      }
      if (clock) {
        ++clock_count;
        clock_sum += *clock;
      }
      if (memory) {
        memory_used_max = std::max(memory_used_max.value_or(0.0), static_cast<double>(memory->used));
      }
      wake.wait_for(lock, interval, [this] { return stopping; });
    }
  }

  void stop_thread() {
    if (!thread.joinable()) return;
    {
      std::lock_guard lock(mutex);
      stopping = true;
    }
    wake.notify_all();
    thread.join();
  }
};

GpuSampler::GpuSampler(int interval_ms) {
  if (interval_ms <= 0) {
    throw InvalidArgument("GPU sampling interval must be positive, got " + std::to_string(interval_ms) +
                          " ms");
  }
  state_ = std::make_unique<State>();
  state_->interval = std::chrono::milliseconds(interval_ms);
}

GpuSampler::~GpuSampler() { stop(); }

bool GpuSampler::available() const { return state_->nvml.ok(); }

void GpuSampler::start() {
  std::lock_guard lifecycle(state_->lifecycle);
  state_->stop_thread();
  {
    std::lock_guard lock(state_->mutex);
    state_->clear();
    state_->stopping = false;
  }
  if (!state_->nvml.ok()) return;
  try {
    state_->thread = std::thread([state = state_.get()] { state->run(); });
  } catch (const std::system_error& e) {
    throw Error(std::string("could not start the GPU sampling thread: ") + e.what());
  }
}

void GpuSampler::stop() {
  std::lock_guard lifecycle(state_->lifecycle);
  state_->stop_thread();
}

GpuSampler::Result GpuSampler::result() const {
  std::lock_guard lock(state_->mutex);
  Result result;
  result.samples = state_->samples;
  if (state_->utilization_count > 0) {
    result.mean_utilization_percent =
        state_->utilization_sum / static_cast<double>(state_->utilization_count);
    result.max_utilization_percent = state_->utilization_max;
  }
  if (state_->clock_count > 0) {
    result.mean_sm_clock_mhz = state_->clock_sum / static_cast<double>(state_->clock_count);
  }
  result.max_memory_used_bytes = state_->memory_used_max;
  return result;
}

}  // namespace nibble::bench
