// The memory plan: the CPU engine's buffers counted from the model's sizes, the CUDA engine's from
// its own carve of one allocation, and the optimizer's state from its per-element rules.
#include "train/memory_plan.hpp"

#include <fmt/format.h>

#include <cmath>

#include "nibble/error.hpp"
#include "nibble/tensor.hpp"

namespace nibble::train {

std::int64_t planned_optimizer_state_bytes(const model::GptConfig& config, const OptimizerOptions& options,
                                           model::CudaPrecision compute) {
  const Hyper hyper = options.hyper ? *options.hyper : default_hyper(options.algorithm);
  double state = 0.0;
  for (const model::ParamTensor& t : model::gpt_param_layout(config)) {
    const std::int64_t numel = shape_numel(t.shape);
    const Precision precision = numel < options.min_quant_size ? Precision::kFp32 : options.precision;
    state += state_bytes_per_element(options.algorithm, hyper, precision, options.block_size, t.shape,
                                     options.rank1_second_moment) *
             static_cast<double>(numel);
  }
  std::int64_t bytes = static_cast<std::int64_t>(std::llround(state));
  // fp32 master weights of bf16 parameters (of tensors with numel > 0: every GPT tensor).
  if (options.device == Device::kCuda && options.master_weights && compute == model::CudaPrecision::kBf16)
    bytes += 4 * model::gpt_param_count(config);
  return bytes;
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
  return plan;
}

}  // namespace nibble::train
