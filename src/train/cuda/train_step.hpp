// A whole CUDA training step captured once in a CUDA graph and replayed: the model's queued
// micro-batches (model/gpt_cuda.hpp) and the optimizer's queued step on the model's stream.
// Backend-free header: no CUDA types; a build without CUDA gets train_step_stub.cpp.
#pragma once

#include <cstdint>
#include <memory>

#include "model/gpt_cuda.hpp"
#include "nibble/optim.hpp"

namespace nibble::train {

// One step: zeroing the gradients, `accum` micro-batches of forward and backward, the optimizer's
// step (its lr multiplier read from device memory), and the copies of the batch in and of the
// losses and the step's result out, through pinned host memory. The first run() does the same
// work eagerly (it fills the matrix products' algorithm cache, which a capture must not query);
// the second captures; later ones replay. The optimizer must be a CUDA optimizer over this
// model's tensors() (train/optimizer_setup.hpp).
class CudaTrainStep {
 public:
  CudaTrainStep(model::CudaGpt& gpt, Optimizer& optimizer, std::int64_t accum);
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

}  // namespace nibble::train
