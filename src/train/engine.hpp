// The model a training run drives, behind one interface: the CPU engine (model/gpt.hpp) or the
// CUDA engine (model/gpt_cuda.hpp), so that the loop, evaluation and checkpoints are written once.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/gpt.hpp"
#include "model/gpt_cuda.hpp"
#include "nibble/device.hpp"

namespace nibble::train {

class Engine {
 public:
  virtual ~Engine() = default;
  virtual float forward(const std::int32_t* tokens, const std::int32_t* targets, bool training,
                        std::uint64_t dropout_seed) = 0;
  virtual void backward(float loss_scale) = 0;
  virtual void zero_grad() = 0;
  virtual void synchronize() = 0;
  // The parameter tensors in layout order, on the engine's device (train/optimizer_setup.hpp makes
  // optimizer parameters of them).
  virtual std::vector<model::ModelTensor> tensors() = 0;
  // fp32 host values in layout order, whatever the engine holds.
  virtual void get_params(float* host) const = 0;
  virtual void set_params(const float* host) = 0;
  virtual const model::GptConfig& config() const = 0;
  virtual const std::vector<model::ParamTensor>& layout() const = 0;
  virtual std::int64_t batch() const = 0;
  virtual std::int64_t seq() const = 0;
  virtual std::int64_t param_count() const = 0;
  virtual std::int64_t param_bytes() const = 0;
  virtual std::int64_t grad_bytes() const = 0;
  virtual std::int64_t activation_bytes() const = 0;
  // CPU only (SophiaG's label sampling): the last forward's probabilities, its gradient.
  virtual model::Gpt* cpu() { return nullptr; }
  // CUDA only: the stream the optimizer queues on, and the model a captured step drives.
  virtual model::CudaGpt* cuda() { return nullptr; }
};

// The engine of `device` for `config` at (batch, seq); `compute` is the CUDA engine's precision.
std::unique_ptr<Engine> make_engine(Device device, const model::GptConfig& config, std::int64_t batch,
                                    std::int64_t seq, model::CudaPrecision compute);

}  // namespace nibble::train
