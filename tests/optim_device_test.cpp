// Choosing a device: what a CPU optimizer refuses (16-bit parameters, the CUDA-only calls), and
// how a CUDA optimizer is refused where the build or the machine has no GPU. The CUDA backend's
// own tests are in tests/gpu/ (label gpu).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "nibble/device.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"

#include "test_util.hpp"

namespace nibble {
namespace {
using test::thrown_message;

ParamGroup one_param(std::vector<float>& p, std::vector<float>& g) {
  ParamGroup group;
  group.params.push_back({"w", {static_cast<std::int64_t>(p.size())}, p.data(), g.data()});
  return group;
}

TEST(OptimizerDevice, CpuRefusesSixteenBitParametersAndGradients) {
  std::vector<float> p(8), g(8);
  for (DType dtype : {DType::BF16, DType::F16}) {
    ParamGroup group = one_param(p, g);
    group.params[0].dtype = dtype;
    const std::string what = thrown_message<InvalidArgument>([&] { Optimizer opt({group}, OptimizerOptions{}); });
    EXPECT_NE(what.find("'w'"), std::string::npos) << what;
    EXPECT_NE(what.find(std::string(dtype_name(dtype))), std::string::npos) << what;
  }
  ParamGroup group = one_param(p, g);
  group.params[0].grad_dtype = DType::BF16;
  const std::string what = thrown_message<InvalidArgument>([&] { Optimizer opt({group}, OptimizerOptions{}); });
  EXPECT_NE(what.find("BF16"), std::string::npos) << what;
}

TEST(OptimizerDevice, CudaOnlyCallsAreRefusedOnTheCpu) {
  std::vector<float> p(8, 1.0f), g(8, 0.5f);
  Optimizer opt({one_param(p, g)}, OptimizerOptions{});
  EXPECT_EQ(opt.device(), Device::kCpu);
  EXPECT_NE(thrown_message<InvalidArgument>([&] { opt.enqueue_step(); }).find("CUDA"), std::string::npos);
  EXPECT_NE(thrown_message<InvalidArgument>([&] { (void)opt.device_scalars(); }).find("CUDA"), std::string::npos);
  opt.synchronize();  // nothing queued on a CPU optimizer: a no-op
  // StepOptions::synchronize only matters on CUDA; a CPU step reports its result either way.
  const StepResult r = opt.step({.synchronize = false});
  EXPECT_EQ(r.step, 1);
  EXPECT_FALSE(r.skipped);
}

TEST(OptimizerDevice, CudaWithoutGpuIsAClearError) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is present: the GPU tests cover this case";
  std::vector<float> p(8), g(8);
  OptimizerOptions options;
  options.device = Device::kCuda;
  const std::string what = thrown_message<DeviceError>([&] { Optimizer opt({one_param(p, g)}, options); });
  if (cuda_built())
    EXPECT_NE(what.find("no CUDA device is visible"), std::string::npos) << what;
  else
    EXPECT_NE(what.find("built without CUDA"), std::string::npos) << what;
}

TEST(OptimizerDevice, NamesOfDevices) {
  EXPECT_STREQ(device_name(Device::kCpu), "cpu");
  EXPECT_STREQ(device_name(Device::kCuda), "cuda");
}

}  // namespace
}  // namespace nibble
