// The memory plan of a training run: the bytes of parameters, gradients, optimizer state,
// activations and workspace, from the engines' own accounting, known before anything is allocated.
#pragma once

#include <cstdint>

#include "model/gpt.hpp"
#include "model/gpt_cuda.hpp"
#include "nibble/optim.hpp"

namespace nibble::train {

struct MemoryPlan {
  std::int64_t params = 0;
  std::int64_t grads = 0;
  std::int64_t optimizer_state = 0;
  std::int64_t activations = 0;
  std::int64_t workspace = 0;  // SophiaG's Hessian-estimate buffer; Muon's Newton-Schulz scratch
  std::int64_t total() const { return params + grads + optimizer_state + activations + workspace; }
};

// The memory of training `config` at (batch, seq) with the optimizer of `options`, on the device
// `options.device` names (the CUDA engine in `compute` precision).
MemoryPlan plan_memory(const model::GptConfig& config, std::int64_t batch, std::int64_t seq,
                       const OptimizerOptions& options,
                       model::CudaPrecision compute = model::CudaPrecision::kFp32);

// The plan's one estimate of optimizer state: every GPT tensor's state at the precision the
// optimizer gives it (full precision below min_quant_size), plus fp32 master weights of bf16
// parameters on the CUDA engine.
std::int64_t planned_optimizer_state_bytes(const model::GptConfig& config, const OptimizerOptions& options,
                                           model::CudaPrecision compute);
// The scratch the optimizer allocates beside its state over the same tensors (Muon's Newton-Schulz
// buffers), counted in the plan's workspace.
std::int64_t planned_optimizer_scratch_bytes(const model::GptConfig& config, const OptimizerOptions& options,
                                             model::CudaPrecision compute);

}  // namespace nibble::train
