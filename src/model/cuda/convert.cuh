// Conversions between fp32, the arithmetic type of every model kernel, and the storage type T of
// activations and parameters (float or bf16, rounded to nearest even), shared by the model's .cu
// files.
#pragma once

#include <cuda_bf16.h>

#include <type_traits>

#include "model/cuda/ops.cuh"

namespace nibble::model::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>)
    return x;
  else
    return __float2bfloat16_rn(x);
}

}  // namespace nibble::model::cuda
