// Device discovery through the CUDA runtime, and the CUDA error checks of core/cuda/check.cuh. A
// machine without a driver or GPU reports zero devices instead of failing, so one binary serves CPU
// and GPU machines.
#include <cuda_runtime.h>

#include <string>

#include "core/cuda/check.cuh"
#include "nibble/device.hpp"
#include "nibble/error.hpp"

namespace nibble {

bool cuda_built() { return true; }

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string cuda_device_name(int device) {
  cudaDeviceProp prop{};
  if (device < 0 || device >= cuda_device_count()) return {};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return {};
  return prop.name;
}

namespace cuda {
namespace {

std::string failure(const char* call, cudaError_t error) {
  return std::string("CUDA call ") + call + " failed: " + cudaGetErrorName(error) + " (" + cudaGetErrorString(error) +
         ")";
}

}  // namespace

void throw_cuda(const char* call, cudaError_t error, const char* file, int line) {
  throw DeviceError(failure(call, error) + " at " + file + ":" + std::to_string(line));
}

void check_cuda(cudaError_t error, const char* call) {
  if (error != cudaSuccess) throw DeviceError(failure(call, error));
}

void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw DeviceError(std::string("CUDA kernel ") + kernel + " failed to launch: " + cudaGetErrorString(error));
}

}  // namespace cuda
}  // namespace nibble
