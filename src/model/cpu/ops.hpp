// CPU forward and backward of every op of the GPT model: embeddings, LayerNorm, matrix products
// (OpenBLAS), causal multi-head attention, GELU, residual adds and softmax cross-entropy.
// Row-major float arrays; B batch, T time, C channels, V vocabulary, NH heads. Backward functions
// accumulate (+=) into parameter gradients and into input gradients, so a caller zeroes them once.
#pragma once

#include <cstdint>

namespace nibble::model::cpu {

// out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]
void embedding_forward(float* out, const std::int32_t* tokens, const float* wte, const float* wpe,
                       std::int64_t B, std::int64_t T, std::int64_t C);
void embedding_backward(float* dwte, float* dwpe, const float* dout, const std::int32_t* tokens,
                        std::int64_t B, std::int64_t T, std::int64_t C);

// Per row of N rows of C: out = (in - mean) * rstd * weight + bias (bias may be null: none); saves
// mean and rstd [N]. The backward's dbias may be null likewise.
void layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* weight,
                       const float* bias, std::int64_t N, std::int64_t C);
void layernorm_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                        const float* weight, const float* mean, const float* rstd, std::int64_t N,
                        std::int64_t C);

// out[N, OC] = in[N, IC] * weight[OC, IC]^T + bias[OC] (bias may be null).
void matmul_forward(float* out, const float* in, const float* weight, const float* bias, std::int64_t N,
                    std::int64_t IC, std::int64_t OC);
// din += dout * weight; dweight += dout^T * in; dbias += column sums of dout (dbias may be null).
void matmul_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                     const float* weight, std::int64_t N, std::int64_t IC, std::int64_t OC);

// Causal self-attention over qkv[B, T, 3C] (q, k, v each C = NH heads x C/NH); out[B, T, C];
// att[B, NH, T, T] holds the softmax probabilities (only t2 <= t filled) for the backward.
void attention_forward(float* out, float* att, const float* qkv, std::int64_t B, std::int64_t T,
                       std::int64_t C, std::int64_t NH);
// dqkv += ...; datt is scratch of att's size.
void attention_backward(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att,
                        std::int64_t B, std::int64_t T, std::int64_t C, std::int64_t NH);

// GELU: the tanh approximation (as GPT-2) or exact, x * Phi(x) with the erf (PyTorch's default).
void gelu_forward(float* out, const float* in, std::int64_t n, bool exact = false);
void gelu_backward(float* din, const float* in, const float* dout, std::int64_t n, bool exact = false);  // din +=

void residual_forward(float* out, const float* a, const float* b, std::int64_t n);

// Softmax over V of logits[B*T, V] into probs, and losses[B*T] = -log probs[target].
void crossentropy_forward(float* losses, float* probs, const float* logits, const std::int32_t* targets,
                          std::int64_t BT, std::int64_t V);
// dlogits += (probs - onehot(target)) * dloss, dloss the gradient of each row's loss (1/BT for a mean).
void crossentropy_backward(float* dlogits, const float* probs, const std::int32_t* targets, float dloss,
                           std::int64_t BT, std::int64_t V);

}  // namespace nibble::model::cpu
