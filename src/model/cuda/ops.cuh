// CUDA forward and backward of every op of the GPT model, the GPU twins of src/model/cpu/ops.hpp.
// Activations and parameters are T = float (fp32 mode, checked against the CPU engine) or
// __nv_bfloat16 (mixed precision); parameter gradients, LayerNorm statistics and losses are fp32.
// Row-major; B batch, T time, C channels, V vocabulary, NH heads. Every launcher takes a stream,
// allocates nothing (scratch comes from the caller, sized by the *_scratch_bytes functions) and is
// deterministic: the same inputs give the same bits, so a replayed CUDA graph equals eager steps.
// Backward launchers accumulate (+=) into parameter gradients; activation gradients are noted per
// function.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace nibble::model::cuda {

using bf16 = __nv_bfloat16;

// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]
template <class T>
void embedding_forward(T* out, const std::int32_t* tokens, const T* wte, const T* wpe, std::int64_t B,
                       std::int64_t Tn, std::int64_t C, cudaStream_t stream);
// dwte += scatter of dout by token (deterministic: no float atomics), dwpe += sum over b.
template <class T>
void embedding_backward(float* dwte, float* dwpe, const T* dout, const std::int32_t* tokens, std::int64_t B,
                        std::int64_t Tn, std::int64_t C, std::int64_t V, void* scratch, cudaStream_t stream);
std::size_t embedding_backward_scratch_bytes(std::int64_t B, std::int64_t Tn, std::int64_t V);

// Per row of N rows of C: out = (in - mean) * rstd * weight + bias; saves mean and rstd [N] (fp32).
template <class T>
void layernorm_forward(T* out, float* mean, float* rstd, const T* in, const T* weight, const T* bias, std::int64_t N,
                       std::int64_t C, cudaStream_t stream);
// din += ...; dweight += ...; dbias += ... (deterministic reductions over rows through scratch).
template <class T>
void layernorm_backward(T* din, float* dweight, float* dbias, const T* dout, const T* in, const T* weight,
                        const float* mean, const float* rstd, std::int64_t N, std::int64_t C, void* scratch,
                        cudaStream_t stream);
std::size_t layernorm_backward_scratch_bytes(std::int64_t N, std::int64_t C);

// GELU, tanh approximation (as GPT-2). gelu_backward: din = dout * gelu'(in) (overwrites).
template <class T>
void gelu_forward(T* out, const T* in, std::int64_t n, cudaStream_t stream);
template <class T>
void gelu_backward(T* din, const T* in, const T* dout, std::int64_t n, cudaStream_t stream);

// out = a + b.
template <class T>
void residual_forward(T* out, const T* a, const T* b, std::int64_t n, cudaStream_t stream);

// Fused softmax cross-entropy over logits[BT, V] (rows of `stride` >= V elements, the padding
// ignored): losses[BT] = -log softmax(logits)[target]; when `backward`, the logits are overwritten
// in place with dlogits = (softmax - onehot(target)) * dloss, so no probability matrix is ever
// stored.
template <class T>
void crossentropy_forward_backward(float* losses, T* logits, const std::int32_t* targets, float dloss, bool backward,
                                   std::int64_t BT, std::int64_t V, std::int64_t stride, cudaStream_t stream);

// Causal self-attention over qkv[B, T, 3C] (q, k, v each C = NH heads x HD), FlashAttention-style:
// tiles of q, k, v in shared memory, online softmax, no T x T matrix in global memory. out[B, T, C];
// lse[B, NH, T] (fp32) keeps each row's log-sum-exp for the backward.
template <class T>
void attention_forward(T* out, float* lse, const T* qkv, std::int64_t B, std::int64_t Tn, std::int64_t C,
                       std::int64_t NH, cudaStream_t stream);
// dqkv = gradient wrt qkv (overwrites); `out` and `lse` from the forward.
template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const float* lse, std::int64_t B,
                        std::int64_t Tn, std::int64_t C, std::int64_t NH, void* scratch, cudaStream_t stream);
std::size_t attention_backward_scratch_bytes(std::int64_t B, std::int64_t Tn, std::int64_t C, std::int64_t NH);
// Head dimensions the kernels take (C / NH); anything else is refused by InvalidArgument.
bool attention_supports_head_dim(std::int64_t head_dim);

// Matrix products through cuBLASLt: T inputs with fp32 accumulation (TF32 tensor cores for fp32
// when allowed), fused bias and GELU epilogues.
class Matmul {
 public:
  explicit Matmul(bool allow_tf32);  // creates the cuBLASLt handle and a workspace
  ~Matmul();
  Matmul(const Matmul&) = delete;
  Matmul& operator=(const Matmul&) = delete;

  // out[N, OC] = in[N, IC] * weight[OC, IC]^T + bias[OC] (bias may be null). With `pre_gelu`
  // non-null: pre_gelu gets that value and out = gelu(pre_gelu) (the fused GELU epilogue).
  template <class T>
  void forward(T* out, T* pre_gelu, const T* in, const T* weight, const T* bias, std::int64_t N, std::int64_t IC,
               std::int64_t OC, cudaStream_t stream);
  // din = dout * weight (overwrites; null skips it); dweight += dout^T * in (fp32);
  // dbias += column sums of dout (fp32; null skips it).
  template <class T>
  void backward(T* din, float* dweight, float* dbias, const T* dout, const T* in, const T* weight, std::int64_t N,
                std::int64_t IC, std::int64_t OC, void* scratch, cudaStream_t stream);
  static std::size_t backward_scratch_bytes(std::int64_t N, std::int64_t OC);

 private:
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
  bool allow_tf32_ = false;
};

}  // namespace nibble::model::cuda
