// Which compute devices this build and machine offer. Backend-free: no CUDA header here.
#pragma once

#include <string>

namespace nibble {

enum class Device : unsigned char { kCpu, kCuda };
const char* device_name(Device device);  // "cpu", "cuda"

// True when this build includes the CUDA backend.
bool cuda_built();
// CUDA devices visible now; 0 without a driver, without a GPU, or in a CPU-only build.
int cuda_device_count();
// "NVIDIA H100 80GB HBM3" for device 0, or "" when there is none.
std::string cuda_device_name(int device = 0);

}  // namespace nibble
