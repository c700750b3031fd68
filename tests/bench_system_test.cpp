// nibble bench system probes: the environment record's keys and types, resident memory and its
// peak as 64 MiB is touched and freed, and the GPU sampler with and without NVML.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "bench/system.hpp"
#include "nibble/error.hpp"

namespace nibble::bench {
namespace {

constexpr std::int64_t kMiB = 1024 * 1024;
constexpr std::int64_t kTouched = 64 * kMiB;
// What must show up of kTouched: the allocator's bookkeeping and rounding cost less than this.
constexpr std::int64_t kTouchedAtLeast = 60 * kMiB;

// Keeps the compiler from dropping an allocation that is written but never read.
void escape(void* pointer) { asm volatile("" : : "g"(pointer) : "memory"); }

// kTouched bytes, every page written, so that all of it is resident.
std::unique_ptr<unsigned char[]> touch_memory() {
  auto memory = std::make_unique_for_overwrite<unsigned char[]>(kTouched);
  std::memset(memory.get(), 0x5a, kTouched);
  escape(memory.get());
  return memory;
}

TEST(BenchSystem, EnvironmentHasEveryKeyWithItsType) {
  const nlohmann::json env = capture_environment();
  ASSERT_TRUE(env.is_object());
  const std::vector<std::string> strings = {
      "nibble_version", "commit", "build_type", "compiler", "cxx_flags", "cpu", "os",
      "hostname", "cuda_runtime_version", "gpu", "gpu_driver", "date"};
  for (const auto& key : strings) {
    ASSERT_TRUE(env.contains(key)) << key;
    EXPECT_TRUE(env[key].is_string()) << key << " = " << env[key].dump();
  }
  for (const auto& key : {"cpu_cores", "threads", "memory_total_bytes"}) {
    ASSERT_TRUE(env.contains(key)) << key;
    EXPECT_TRUE(env[key].is_number_integer()) << key << " = " << env[key].dump();
  }
  ASSERT_TRUE(env.contains("cuda_build"));
  EXPECT_TRUE(env["cuda_build"].is_boolean());
  ASSERT_TRUE(env.contains("gpu_memory_bytes"));
  EXPECT_TRUE(env["gpu_memory_bytes"].is_null() || env["gpu_memory_bytes"].is_number_integer())
      << env["gpu_memory_bytes"].dump();
  // How OpenMP threads wait: the variable's value, or null when it is not set.
  for (const auto& key : {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}) {
    ASSERT_TRUE(env.contains(key)) << key;
    EXPECT_TRUE(env[key].is_null() || env[key].is_string()) << key << " = " << env[key].dump();
  }
  EXPECT_EQ(env.size(), strings.size() + 7) << "unexpected keys in " << env.dump();
}

TEST(BenchSystem, EnvironmentValuesDescribeThisMachine) {
  const nlohmann::json env = capture_environment();
  EXPECT_FALSE(env["commit"].get<std::string>().empty());
  EXPECT_FALSE(env["nibble_version"].get<std::string>().empty());
  EXPECT_FALSE(env["compiler"].get<std::string>().empty());
  EXPECT_NE(env["cpu"].get<std::string>(), "");
  EXPECT_NE(env["os"].get<std::string>().find("Linux"), std::string::npos) << env["os"];
  EXPECT_GE(env["threads"].get<std::int64_t>(), 1);
  EXPECT_GE(env["cpu_cores"].get<std::int64_t>(), 1);
  EXPECT_GT(env["memory_total_bytes"].get<std::int64_t>(), 0);
  const std::regex iso8601(R"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z)");
  EXPECT_TRUE(std::regex_match(env["date"].get<std::string>(), iso8601)) << env["date"];
  if (!env["cuda_build"].get<bool>()) {
    EXPECT_EQ(env["cuda_runtime_version"], "n/a");
  }
  if (env["gpu"] == "n/a") {
    EXPECT_EQ(env["gpu_driver"], "n/a");
    EXPECT_TRUE(env["gpu_memory_bytes"].is_null());
  } else {
    EXPECT_GT(env["gpu_memory_bytes"].get<std::int64_t>(), 0);
  }
}

TEST(BenchSystem, ReadRssSeesTouchedMemoryInCurrentAndPeak) {
  const bool reset = reset_peak_rss();
  const RssBytes before = read_rss();
  EXPECT_GT(before.current, 0);
  EXPECT_GE(before.peak, before.current);

  const auto memory = touch_memory();
  const RssBytes after = read_rss();
  EXPECT_GE(after.current - before.current, kTouchedAtLeast);
  EXPECT_GE(after.peak, after.current);
  EXPECT_GE(after.peak - before.current, kTouchedAtLeast);
  // With the peak reset first it starts at the current RSS, so all of kTouched adds to it.
  if (reset) {
    EXPECT_GE(after.peak - before.peak, kTouchedAtLeast);
  }
  escape(memory.get());
}

TEST(BenchSystem, ResetPeakRssDropsThePeakOfFreedMemory) {
  auto memory = touch_memory();
  const RssBytes touched = read_rss();
  memory.reset();
  const RssBytes freed = read_rss();
  EXPECT_LE(freed.current, touched.current - kTouchedAtLeast)
      << "the 64 MiB block should have gone back to the kernel";
  // The kernel's RSS counters are per-CPU and approximate, so the peak is compared with margin.
  EXPECT_GE(freed.peak - freed.current, kTouchedAtLeast) << "the peak should still hold the block";
  if (!reset_peak_rss()) GTEST_SKIP() << "this kernel does not allow writing /proc/self/clear_refs";
  const RssBytes reset = read_rss();
  EXPECT_LE(reset.peak, touched.peak - kTouchedAtLeast);
  EXPECT_GE(reset.peak, reset.current);
}

TEST(BenchSystem, AvailableHostMemoryIsPositive) {
  EXPECT_GT(available_host_memory(), 0);
}

TEST(BenchSystem, GpuSamplerRejectsANonPositiveInterval) {
  EXPECT_THROW(GpuSampler(0), InvalidArgument);
  EXPECT_THROW(GpuSampler(-5), InvalidArgument);
}

TEST(BenchSystem, GpuSamplerBeforeStartHasNoSamples) {
  const GpuSampler sampler(10);
  const GpuSampler::Result result = sampler.result();
  EXPECT_EQ(result.samples, 0);
  EXPECT_FALSE(result.mean_utilization_percent.has_value());
}

TEST(BenchSystem, GpuSamplerSamplesOrStaysEmpty) {
  GpuSampler sampler(20);
  sampler.stop();  // before any start
  sampler.start();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  sampler.stop();
  sampler.stop();
  const GpuSampler::Result result = sampler.result();
  if (!sampler.available()) {
    EXPECT_EQ(result.samples, 0);
    EXPECT_FALSE(result.mean_utilization_percent.has_value());
    EXPECT_FALSE(result.max_utilization_percent.has_value());
    EXPECT_FALSE(result.mean_sm_clock_mhz.has_value());
    EXPECT_FALSE(result.max_memory_used_bytes.has_value());
    return;
  }
  EXPECT_GT(result.samples, 0);
  ASSERT_TRUE(result.mean_utilization_percent.has_value());
  ASSERT_TRUE(result.max_utilization_percent.has_value());
  EXPECT_GE(*result.mean_utilization_percent, 0.0);
  EXPECT_LE(*result.mean_utilization_percent, *result.max_utilization_percent);
  EXPECT_LE(*result.max_utilization_percent, 100.0);
  ASSERT_TRUE(result.mean_sm_clock_mhz.has_value());
  EXPECT_GT(*result.mean_sm_clock_mhz, 0.0);
  ASSERT_TRUE(result.max_memory_used_bytes.has_value());
  EXPECT_GT(*result.max_memory_used_bytes, 0.0);
  // Stopped: no more samples arrive.
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  EXPECT_EQ(sampler.result().samples, result.samples);
}

TEST(BenchSystem, GpuSamplerRestartsAndClearsEarlierSamples) {
  GpuSampler sampler(5);
  sampler.start();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  sampler.stop();
  const std::int64_t first = sampler.result().samples;
  // start() while running restarts; the second run, a tenth as long, starts from zero.
  sampler.start();
  sampler.start();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  sampler.stop();
  const std::int64_t second = sampler.result().samples;
  if (!sampler.available()) {
    EXPECT_EQ(first, 0);
    EXPECT_EQ(second, 0);
    return;
  }
  EXPECT_GT(first, 1);
  EXPECT_GT(second, 0);
  EXPECT_LT(second, first);
}

TEST(BenchSystem, GpuSamplerResultIsSafeWhileRunningAndDestructorStopsTheThread) {
  auto sampler = std::make_unique<GpuSampler>(1);
  sampler->start();
  std::vector<std::thread> readers;
  std::vector<std::int64_t> last(4, 0);
  for (std::size_t i = 0; i < last.size(); ++i) {
    readers.emplace_back([&sampler, &last, i] {
      for (int k = 0; k < 200; ++k) {
        const std::int64_t samples = sampler->result().samples;
        EXPECT_GE(samples, last[i]);  // samples only grow while one run lasts
        last[i] = samples;
      }
    });
  }
  for (auto& reader : readers) reader.join();
  sampler.reset();  // destroyed while running: must join, not terminate
}

}  // namespace
}  // namespace nibble::bench
