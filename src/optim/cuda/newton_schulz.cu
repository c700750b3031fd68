// Muon's Newton-Schulz iteration on CUDA (see newton_schulz.cuh).
#include "optim/cuda/newton_schulz.cuh"

#include <string>
#include <utility>

namespace nibble::cuda {

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw DeviceError(std::string(what) + " failed: " + cublasGetStatusName(status) + " (" +
                      cublasGetStatusString(status) + ")");
}

void bind_cublas(cublasHandle_t handle, cudaStream_t stream, void* workspace, std::size_t bytes) {
  check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
  check_cublas(cublasSetWorkspace(handle, workspace, bytes), "cublasSetWorkspace");
}

namespace {

// Row-major C (m x n) = alpha op(A) op(B) + beta C over the batch, as cuBLAS's column-major
// C^T = op(B)^T op(A)^T: the operands swap. A is m x k (or k x m transposed), B k x n.
void gemm_row_major(cublasHandle_t handle, bool transpose_b, int m, int n, int k, float alpha,
                    const __nv_bfloat16* a, int lda, long long stride_a, const __nv_bfloat16* b, int ldb,
                    long long stride_b, float beta, __nv_bfloat16* c, int ldc, long long stride_c, int count) {
  check_cublas(cublasGemmStridedBatchedEx(handle, transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, n, m, k,
                                          &alpha, b, CUDA_R_16BF, ldb, stride_b, a, CUDA_R_16BF, lda, stride_a,
                                          &beta, c, CUDA_R_16BF, ldc, stride_c, count, CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT),
               "cublasGemmStridedBatchedEx (Newton-Schulz)");
}

}  // namespace

__nv_bfloat16* newton_schulz_batched(cublasHandle_t handle, const NsBatch& batch, const Hyper& h,
                                     cudaStream_t stream) {
  // The handle was bound to the stream and to its workspace once, at creation (bind_cublas):
  // cublasSetStream also resets the workspace to cuBLAS's own pool, which a captured step would
  // allocate from, so it is not called here.
  cudaStream_t bound = nullptr;
  check_cublas(cublasGetStream(handle, &bound), "cublasGetStream");
  if (bound != stream) throw DeviceError("newton_schulz_batched: the cuBLAS handle is bound to another stream");
  const int s = static_cast<int>(batch.s), l = static_cast<int>(batch.l), count = batch.count;
  const long long sl = batch.s * batch.l, ss = batch.s * batch.s;
  __nv_bfloat16* x = batch.x;
  __nv_bfloat16* y = batch.y;
  for (int step = 0; step < static_cast<int>(h.ns_steps); ++step) {
    // A = X X^T (s x s): X is s x l with leading dimension l; X^T is X read transposed.
    gemm_row_major(handle, true, s, s, l, 1.0f, x, l, sl, x, l, sl, 0.0f, batch.a, s, ss, count);
    // B = b A + c A A
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(batch.b, batch.a, static_cast<std::size_t>(ss * count) * sizeof(__nv_bfloat16),
                                      cudaMemcpyDeviceToDevice, stream));
    gemm_row_major(handle, false, s, s, s, h.ns_c, batch.a, s, ss, batch.a, s, ss, h.ns_b, batch.b, s, ss, count);
    // Y = a X + B X
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(y, x, static_cast<std::size_t>(sl * count) * sizeof(__nv_bfloat16),
                                      cudaMemcpyDeviceToDevice, stream));
    gemm_row_major(handle, false, s, l, s, 1.0f, batch.b, s, ss, x, l, sl, h.ns_a, y, l, sl, count);
    std::swap(x, y);
  }
  return x;
}

}  // namespace nibble::cuda
