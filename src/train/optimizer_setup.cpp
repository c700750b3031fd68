// Training options to optimizer options (the algorithm's defaults unless a flag overrides them,
// master weights for bf16 compute), and model tensors to one parameter group.
#include "train/optimizer_setup.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "nibble/algorithms.hpp"
#include "nibble/error.hpp"

namespace nibble::train {

OptimizerOptions optimizer_options(const TrainOptions& o, std::int64_t T) {
  OptimizerOptions oo;
  oo.algorithm = o.algorithm;
  oo.precision = o.precision;
  Hyper h = default_hyper(o.algorithm);
  if (o.lr) h.lr = *o.lr;
  if (o.weight_decay) h.weight_decay = *o.weight_decay;
  if (o.beta1) h.beta1 = *o.beta1;
  if (o.beta2) h.beta2 = *o.beta2;
  if (o.eps) h.eps = *o.eps;
  // Schedule-free AdamW without a schedule warms up by itself (a --hyper warmup_steps overrides).
  if (o.algorithm == Algorithm::kAdamWScheduleFree && o.schedule == ScheduleKind::kConstant)
    h.warmup_steps = static_cast<float>(std::min(o.warmup, o.steps));
  const AlgorithmSpec& spec = algorithm_spec(o.algorithm);
  for (const auto& [name, value] : o.hyper) {
    const HyperField* field = find_hyper_field(name);
    if (field == nullptr)
      throw InvalidArgument(fmt::format("hyperparameter '{}' is not one of nibble's ({})", name, hyper_field_names()));
    if (!reads_hyper(spec, name))
      throw InvalidArgument(fmt::format("{} does not read the hyperparameter '{}'", spec.name, name));
    if (field->number != nullptr) {
      h.*field->number = static_cast<float>(value);
    } else {
      if (value != 0.0 && value != 1.0)
        throw InvalidArgument(fmt::format("hyperparameter '{}' is a flag: 0 or 1, got {}", name, value));
      h.*field->flag = value != 0.0;
    }
  }
  if (o.algorithm == Algorithm::kSophiaG) h.batch_tokens = static_cast<float>(o.batch * T * o.accum);
  if (o.algorithm == Algorithm::kAdafactor && o.lr) h.relative_step = false;
  oo.hyper = h;
  oo.max_grad_norm = o.grad_clip;
  oo.no_decay_vectors = true;  // no weight decay for biases and LayerNorm weights
  oo.device = o.device;
  const bool bf16 = o.device == Device::kCuda && o.compute == model::CudaPrecision::kBf16;
  oo.master_weights = bf16 && !o.pure_bf16;
  oo.param_stochastic_rounding = bf16 && o.pure_bf16;
  return oo;
}

std::vector<ParamGroup> optimizer_param_groups(std::span<const model::ModelTensor> tensors) {
  std::vector<Param> params;
  for (const model::ModelTensor& t : tensors) {
    Param p{t.name, t.shape, t.data, t.grad};
    p.dtype = t.dtype;
    params.push_back(std::move(p));
  }
  return {ParamGroup{std::move(params), {}, {}, {}}};
}

}  // namespace nibble::train
