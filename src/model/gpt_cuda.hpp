// The GPT-2-style decoder on a CUDA GPU: the same model, parameter layout and initialisation as
// the CPU engine (model/gpt.hpp), with every op of src/model/cuda/ops.cuh. Parameters,
// activations and their gradients live in one device allocation made once, so the memory of a
// training step is known exactly before it starts. Backend-free header: no CUDA types.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/gpt.hpp"
#include "nibble/optim.hpp"

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

  // One optimizer parameter per tensor: device pointers, dtype F32 or BF16, fp32 gradients.
  std::vector<Param> optimizer_params();

  struct Impl;

 private:
  friend class CudaTrainStep;
  std::unique_ptr<Impl> impl_;
};

// A whole training step captured once in a CUDA graph and replayed: zeroing the gradients, `accum`
// micro-batches of forward and backward, the optimizer's step (its lr multiplier read from device
// memory), and the copies of the batch in and of the losses and the step's result out, through
// pinned host memory. The first run() does the same work eagerly (it fills the matrix products'
// algorithm cache, which a capture must not query); the second captures; later ones replay.
// The optimizer must be a CUDA optimizer over this model's optimizer_params().
class CudaTrainStep {
 public:
  CudaTrainStep(CudaGpt& gpt, Optimizer& optimizer, std::int64_t accum);
  ~CudaTrainStep();
  CudaTrainStep(const CudaTrainStep&) = delete;
  CudaTrainStep& operator=(const CudaTrainStep&) = delete;
  // tokens and targets: accum x batch x seq each, on the host. Returns the mean loss and fills
  // `result` (skipped, gradient norm, steps taken).
  float run(const std::int32_t* tokens, const std::int32_t* targets, float lr_scale, StepResult& result);
  bool captured() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace nibble::model
