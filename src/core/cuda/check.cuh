// The CUDA error checks every .cu file of nibble shares: a failed runtime call or kernel launch
// becomes a nibble::DeviceError naming the call (defined in core/cuda/device.cu).
#pragma once

#include <cuda_runtime.h>

namespace nibble::cuda {

// "CUDA call <call> failed: <name> (<description>) at <file>:<line>".
[[noreturn]] void throw_cuda(const char* call, cudaError_t error, const char* file, int line);

// The same without the source location, for callers that name the call by its function alone.
void check_cuda(cudaError_t error, const char* call);

// Throws "CUDA kernel <kernel> failed to launch: ..." when the last launch failed.
void check_launch(const char* kernel);

}  // namespace nibble::cuda

#define NIBBLE_CUDA_CHECK(call)                                                        \
  do {                                                                                 \
    const cudaError_t nibble_cuda_status = (call);                                     \
    if (nibble_cuda_status != cudaSuccess)                                             \
      ::nibble::cuda::throw_cuda(#call, nibble_cuda_status, __FILE__, __LINE__);       \
  } while (0)
