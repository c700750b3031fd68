// Muon's Newton-Schulz iteration on CUDA: strided-batched cuBLAS GEMMs over every matrix of one
// shape, bf16 inputs and outputs with fp32 accumulation (as torch.optim.Muon runs it in bf16).
#pragma once

#include <cublas_v2.h>

#include "optim/cuda/common.cuh"

namespace nibble::cuda {

// Throws DeviceError naming the call when a cuBLAS call fails.
void check_cublas(cublasStatus_t status, const char* what);

// `steps` iterations A = X X^T, B = b A + c A A, X <- a X + B X on every matrix of the batch, on
// `stream` (capturable in a CUDA graph: no allocation, no synchronisation). X starts in batch.x;
// returns where the result is (batch.x or batch.y).
__nv_bfloat16* newton_schulz_batched(cublasHandle_t handle, const NsBatch& batch, const Hyper& h,
                                     cudaStream_t stream);

}  // namespace nibble::cuda
