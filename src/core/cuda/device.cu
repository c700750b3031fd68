// Device discovery through the CUDA runtime. A machine without a driver or GPU reports zero
// devices instead of failing, so one binary serves CPU and GPU machines.
#include <cuda_runtime.h>

#include "nibble/device.hpp"

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

}  // namespace nibble
