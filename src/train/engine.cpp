// The two engines behind train::Engine: each forwards to its model, and the CPU engine copies
// its host parameters where the CUDA engine moves them across the bus.
#include "train/engine.hpp"

#include <cstring>

namespace nibble::train {
namespace {

class CpuEngine final : public Engine {
 public:
  CpuEngine(const model::GptConfig& c, std::int64_t B, std::int64_t T) : gpt_(c, B, T) {}
  float forward(const std::int32_t* tokens, const std::int32_t* targets, bool training, std::uint64_t seed) override {
    return gpt_.forward(tokens, targets, training, seed);
  }
  void backward(float loss_scale) override { gpt_.backward(loss_scale); }
  void zero_grad() override { gpt_.zero_grad(); }
  void synchronize() override {}
  std::vector<model::ModelTensor> tensors() override { return gpt_.tensors(); }
  void get_params(float* host) const override {
    std::memcpy(host, gpt_.params(), static_cast<std::size_t>(gpt_.param_count()) * sizeof(float));
  }
  void set_params(const float* host) override {
    std::memcpy(gpt_.params(), host, static_cast<std::size_t>(gpt_.param_count()) * sizeof(float));
  }
  const model::GptConfig& config() const override { return gpt_.config(); }
  const std::vector<model::ParamTensor>& layout() const override { return gpt_.layout(); }
  std::int64_t batch() const override { return gpt_.batch(); }
  std::int64_t seq() const override { return gpt_.seq(); }
  std::int64_t param_count() const override { return gpt_.param_count(); }
  std::int64_t param_bytes() const override { return gpt_.param_bytes(); }
  std::int64_t grad_bytes() const override { return gpt_.grad_bytes(); }
  std::int64_t activation_bytes() const override { return gpt_.activation_bytes(); }
  model::Gpt* cpu() override { return &gpt_; }

 private:
  model::Gpt gpt_;
};

class CudaEngine final : public Engine {
 public:
  CudaEngine(const model::GptConfig& c, std::int64_t B, std::int64_t T, model::CudaPrecision p)
      : gpt_(c, B, T, {.precision = p}) {}
  float forward(const std::int32_t* tokens, const std::int32_t* targets, bool, std::uint64_t) override {
    return gpt_.forward(tokens, targets);
  }
  void backward(float loss_scale) override { gpt_.backward(loss_scale); }
  void zero_grad() override { gpt_.zero_grad(); }
  void synchronize() override { gpt_.synchronize(); }
  std::vector<model::ModelTensor> tensors() override { return gpt_.tensors(); }
  void get_params(float* host) const override { gpt_.get_params(host); }
  void set_params(const float* host) override { gpt_.set_params(host); }
  const model::GptConfig& config() const override { return gpt_.config(); }
  const std::vector<model::ParamTensor>& layout() const override { return gpt_.layout(); }
  std::int64_t batch() const override { return gpt_.batch(); }
  std::int64_t seq() const override { return gpt_.seq(); }
  std::int64_t param_count() const override { return gpt_.param_count(); }
  std::int64_t param_bytes() const override { return gpt_.memory().params; }
  std::int64_t grad_bytes() const override { return gpt_.memory().grads; }
  std::int64_t activation_bytes() const override { return gpt_.memory().activations + gpt_.memory().workspace; }
  model::CudaGpt* cuda() override { return &gpt_; }

 private:
  model::CudaGpt gpt_;
};

}  // namespace

std::unique_ptr<Engine> make_engine(Device device, const model::GptConfig& config, std::int64_t batch,
                                    std::int64_t seq, model::CudaPrecision compute) {
  if (device == Device::kCuda) return std::make_unique<CudaEngine>(config, batch, seq, compute);
  return std::make_unique<CpuEngine>(config, batch, seq);
}

}  // namespace nibble::train
