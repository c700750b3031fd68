// The GPT-2-style decoder on a CUDA GPU: the same model, parameter layout and initialisation as
// the CPU engine (model/gpt.hpp), with every op of src/model/cuda/ops.cuh. Parameters,
// activations and their gradients live in one device allocation made once, so the memory of a
// training step is known exactly before it starts. Backend-free header: no CUDA types.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/gpt.hpp"

namespace nibble::model {

// fp32: everything in fp32 (matrix products without TF32 unless asked), to check against the CPU
// engine. bf16: parameters, activations and their gradients in bf16, parameter gradients, LayerNorm
// statistics and losses in fp32 (the optimizer keeps fp32 master weights or rounds stochastically).
enum class CudaPrecision : std::uint8_t { kFp32, kBf16 };

struct CudaGptOptions {
  CudaPrecision precision = CudaPrecision::kFp32;
  bool allow_tf32 = false;      // fp32 only: TF32 tensor cores for the matrix products
  void* stream = nullptr;       // cudaStream_t of every launch (null: the default stream)
};

// Device bytes of one CudaGpt, by part.
struct CudaGptMemory {
  std::int64_t params = 0;
  std::int64_t grads = 0;
  std::int64_t activations = 0;  // forward values and the backward's activation gradients
  std::int64_t workspace = 0;    // op scratch and the matrix-product workspace
  std::int64_t total() const { return params + grads + activations + workspace; }
};
CudaGptMemory cuda_gpt_memory(const GptConfig& config, std::int64_t batch, std::int64_t seq, CudaPrecision precision);

class CudaGpt {
 public:
  // Allocates everything (throws OutOfMemory naming the bytes needed and free). Dropout is not on
  // the CUDA engine: a config with dropout > 0 is refused.
  CudaGpt(const GptConfig& config, std::int64_t batch, std::int64_t seq, CudaGptOptions options = {});
  ~CudaGpt();
  CudaGpt(const CudaGpt&) = delete;
  CudaGpt& operator=(const CudaGpt&) = delete;

  const GptConfig& config() const;
  std::int64_t batch() const;
  std::int64_t seq() const;
  std::int64_t param_count() const;
  const std::vector<ParamTensor>& layout() const;
  const CudaGptMemory& memory() const;

  void init(std::uint64_t seed);             // the values Gpt::init draws
  void set_params(const float* host);        // fp32 host values in layout order (rounded in bf16 mode)
  void get_params(float* host) const;        // as fp32
  void get_grads(float* host) const;         // fp32 parameter gradients

  // Mean cross-entropy over B x T of host tokens and targets (checked against the vocabulary);
  // waits for the result. targets null: logits only, returns 0.
  float forward(const std::int32_t* tokens, const std::int32_t* targets);
  // Accumulates the gradient of loss_scale x the last forward's mean loss into the parameter
  // gradients (zero_grad() first for a fresh gradient); queued, does not wait.
  void backward(float loss_scale = 1.0f);
  void zero_grad();
  // Logits of the last forward as fp32 on the host, [B, T, V] (before backward overwrites them).
  std::vector<float> logits() const;

  void synchronize() const;  // waits for the queued work
  void* stream() const;      // the cudaStream_t every launch goes to

  // Every parameter tensor, in layout order: device pointers, dtype F32 or BF16, fp32 gradients.
  std::vector<ModelTensor> tensors();

  // Throws InvalidArgument naming the first of `count` tokens or targets (targets may be null)
  // outside the vocabulary; forward() checks its batch so, enqueue_micro_batch() leaves it to the
  // caller.
  void check_tokens(const std::int32_t* tokens, const std::int32_t* targets, std::int64_t count) const;
  // One micro-batch of a training step, queued on stream() with no host work and no wait, so that
  // a caller can capture it in a CUDA graph (train/cuda/train_step.cu): copies batch x seq
  // `tokens` and `targets` in from pinned host memory (checked with check_tokens), runs the
  // forward, copies the per-token losses out to pinned `token_losses`, and accumulates the
  // gradient of loss_scale x the mean loss. zero_grad() is queued work of the same kind.
  void enqueue_micro_batch(const std::int32_t* tokens, const std::int32_t* targets, float* token_losses,
                           float loss_scale);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace nibble::model
