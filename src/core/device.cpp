// CPU-only builds answer the device questions here; CUDA builds answer in cuda/device.cu.
#include "nibble/device.hpp"

namespace nibble {
const char* device_name(Device device) { return device == Device::kCuda ? "cuda" : "cpu"; }
}  // namespace nibble

#if !defined(NIBBLE_WITH_CUDA)
namespace nibble {
bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_device_name(int) { return {}; }
}  // namespace nibble
#endif
