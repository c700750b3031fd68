// Muon's Newton-Schulz iteration on CUDA: strided-batched cuBLAS GEMMs over every matrix of one
// shape, bf16 inputs and outputs with fp32 accumulation (as torch.optim.Muon runs it in bf16).
#pragma once

#include <cublas_v2.h>

#include <cstddef>

#include "optim/cuda/common.cuh"

namespace nibble::cuda {

// Throws DeviceError naming the call when a cuBLAS call fails.
void check_cublas(cublasStatus_t status, const char* what);

// Binds `handle` to `stream` and to `workspace` (in that order: setting the stream resets the
// workspace to cuBLAS's own pool, which would allocate inside a captured step).
void bind_cublas(cublasHandle_t handle, cudaStream_t stream, void* workspace, std::size_t bytes);

// `steps` iterations A = X X^T, B = b A + c A A, X <- a X + B X on every matrix of the batch, on
// `stream`, which `handle` must be bound to by bind_cublas (capturable in a CUDA graph: no
// allocation, no synchronisation; throws DeviceError for a handle bound elsewhere). X starts in batch.x;
// returns where the result is (batch.x or batch.y).
__nv_bfloat16* newton_schulz_batched(cublasHandle_t handle, const NsBatch& batch, const Hyper& h,
                                     cudaStream_t stream);

}  // namespace nibble::cuda
