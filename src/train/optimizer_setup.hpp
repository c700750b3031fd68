// What a training run hands the optimizer: its options from the run's options, and its parameter
// groups from the model's tensors. The one place where model tensors become nibble::Params.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "model/gpt.hpp"
#include "nibble/optim.hpp"
#include "train/trainer.hpp"

namespace nibble::train {

// The optimizer options train() uses for these options and sequence length.
OptimizerOptions optimizer_options(const TrainOptions& options, std::int64_t seq);
// One optimizer parameter per model tensor, in the model's order, with its name, shape, dtype,
// values and fp32 gradient; all in a single group that takes the optimizer's hyperparameters.
std::vector<ParamGroup> optimizer_param_groups(std::span<const model::ModelTensor> tensors);

}  // namespace nibble::train
