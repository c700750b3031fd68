// The memory plan: the CPU engine's buffers counted from the model's sizes, the CUDA engine's from
// its own carve of one allocation, and the optimizer's state as the optimizer itself plans it.
#include "train/memory_plan.hpp"

#include <fmt/format.h>

#include <cmath>

#include "nibble/error.hpp"
#include "nibble/tensor.hpp"

namespace nibble::train {

namespace {

// The model's tensors as the engine will hand them to the optimizer: bf16 parameters on CUDA in
// bf16 compute (fp32 master weights when asked for), fp32 otherwise.
ParamGroup gpt_param_group(const model::GptConfig& config, const OptimizerOptions& options,
                           model::CudaPrecision compute) {
  const bool bf16 = options.device == Device::kCuda && compute == model::CudaPrecision::kBf16;
  ParamGroup group;
  for (const model::ParamTensor& t : model::gpt_param_layout(config)) {
    Param param;
    param.name = t.name;
    param.shape = t.shape;
    param.dtype = bf16 ? DType::BF16 : DType::F32;
    group.params.push_back(std::move(param));
  }
  return group;
}

}  // namespace

std::int64_t planned_optimizer_state_bytes(const model::GptConfig& config, const OptimizerOptions& options,
                                           model::CudaPrecision compute) {
  const ParamGroup group = gpt_param_group(config, options, compute);
  return planned_state_bytes(std::span<const ParamGroup>(&group, 1), options);
}

std::int64_t planned_optimizer_scratch_bytes(const model::GptConfig& config, const OptimizerOptions& options,
                                             model::CudaPrecision compute) {
  const ParamGroup group = gpt_param_group(config, options, compute);
  return planned_scratch_bytes(std::span<const ParamGroup>(&group, 1), options);
}

MemoryPlan plan_memory(const model::GptConfig& config, std::int64_t batch, std::int64_t seq,
                       const OptimizerOptions& options, model::CudaPrecision compute) {
  model::validate(config);
  if (batch <= 0 || seq <= 0 || seq > config.context)
    throw InvalidArgument(fmt::format("memory plan: batch {} and seq {} must be positive, seq at most the context {}",
                                      batch, seq, config.context));
  MemoryPlan plan;
  const std::int64_t P = model::gpt_param_count(config);
  plan.params = 4 * P;
  plan.grads = 4 * P;
  plan.activations = 4 * model::gpt_activation_floats(config, batch, seq);
  plan.optimizer_state = planned_optimizer_state_bytes(config, options, compute);
  if (options.algorithm == Algorithm::kSophiaG) plan.workspace = 4 * P;
  if (options.device == Device::kCuda) {
    const model::CudaGptMemory m = model::cuda_gpt_memory(config, batch, seq, compute);
    plan.params = m.params;
    plan.grads = m.grads;
    plan.activations = m.activations;
    plan.workspace = m.workspace;
  }
  plan.workspace += planned_optimizer_scratch_bytes(config, options, compute);
  return plan;
}

}  // namespace nibble::train
