// A GPT-2-style decoder on the CPU: configuration and presets, parameters and gradients in one
// contiguous buffer each, activations in one arena sized before the first step, and the forward
// and backward passes written by hand over the ops of src/model/cpu/ops.hpp.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/dtype.hpp"
#include "nibble/tensor.hpp"

namespace nibble::model {

// The GELU of the MLP: GPT-2's tanh approximation, or the exact erf form (PyTorch's nn.GELU default,
// which nanoGPT's model uses).
enum class Gelu : std::uint8_t { kTanh, kExact };
std::string_view gelu_name(Gelu gelu);  // "tanh", "exact"
// Throws InvalidArgument naming the value and the choices.
Gelu gelu_from_name(std::string_view name);

struct GptConfig {
  std::int64_t layers = 2;
  std::int64_t heads = 2;
  std::int64_t width = 64;     // C
  std::int64_t context = 64;   // maximum T
  std::int64_t vocab = 0;      // V, from the tokenizer unless a preset sets it
  float dropout = 0.0f;        // on the embeddings and on each residual branch, training only
  bool bias = true;            // biases in the Linear and LayerNorm layers (GPT-2); false: none (nanoGPT's train.py)
  Gelu gelu = Gelu::kTanh;
};

// "tiny", "char", "small", "medium", "large", "xl", "2.7b"; the vocabulary is left to the caller.
GptConfig gpt_preset(std::string_view name);
std::string_view gpt_preset_names();
// Throws InvalidArgument naming the field: sizes must be positive, width divisible by heads,
// dropout in [0, 1).
void validate(const GptConfig& config);

struct ParamTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::int64_t offset = 0;  // in floats, into the parameter and gradient buffers
};

// One parameter tensor of a built model, as training code sees it: where its values (of `dtype`)
// and its fp32 gradient live, host or device memory as the engine keeps them. The model knows
// nothing of optimizers; src/train turns these into optimizer parameters.
struct ModelTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  void* data = nullptr;
  float* grad = nullptr;
  DType dtype = DType::F32;
};

// The parameter layout of a config: GPT-2 names, in GPT-2 order (without the `.bias` tensors when
// config.bias is false).
std::vector<ParamTensor> gpt_param_layout(const GptConfig& config);
std::int64_t gpt_param_count(const GptConfig& config);
// GPT-2 initialisation of parameters laid out by gpt_param_layout into `params` (Gpt::init and
// the CUDA engine draw the same values for a seed).
void gpt_init_params(const GptConfig& config, const std::vector<ParamTensor>& layout, float* params,
                     std::uint64_t seed);
// Floats of forward activations plus their gradients for a batch of B sequences of T tokens.
std::int64_t gpt_activation_floats(const GptConfig& config, std::int64_t B, std::int64_t T);

class Gpt {
 public:
  // Allocates parameters and gradients; activations for (batch, seq) are allocated here too, so
  // the memory of a training step is fixed before it starts. seq <= config.context.
  Gpt(const GptConfig& config, std::int64_t batch, std::int64_t seq);

  const GptConfig& config() const { return config_; }
  std::int64_t batch() const { return batch_; }
  std::int64_t seq() const { return seq_; }
  std::int64_t param_count() const { return param_count_; }
  std::int64_t param_bytes() const { return static_cast<std::int64_t>(params_.size()); }
  std::int64_t grad_bytes() const { return static_cast<std::int64_t>(grads_.size()); }
  std::int64_t activation_bytes() const { return static_cast<std::int64_t>(acts_.size()); }

  float* params() { return reinterpret_cast<float*>(params_.data()); }
  const float* params() const { return reinterpret_cast<const float*>(params_.data()); }
  float* grads() { return reinterpret_cast<float*>(grads_.data()); }
  const std::vector<ParamTensor>& layout() const { return layout_; }

  // GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 layers), LayerNorm
  // weights 1, biases 0.
  void init(std::uint64_t seed);

  // Mean cross-entropy over the B x T positions (targets may be null: logits and probs only).
  // `dropout_seed` draws the dropout masks (ignored when config.dropout == 0 or !training).
  float forward(const std::int32_t* tokens, const std::int32_t* targets, bool training = false,
                std::uint64_t dropout_seed = 0);
  // Accumulates into grads() the gradient of loss_scale x the mean loss of the last forward, which
  // must have had targets (zero_grad() first for a fresh gradient).
  // `targets` replaces the forward's (for example labels sampled from the model's own output).
  void backward(float loss_scale = 1.0f, const std::int32_t* targets = nullptr);
  void zero_grad();
  // Logits and softmax probabilities of the last forward, [B, T, V].
  const float* logits() const;
  const float* probs() const;

  // Every parameter tensor, in layout order, pointing into the parameter and gradient buffers.
  std::vector<ModelTensor> tensors();

  struct Acts;  // the activation arena's layout (internal)

 private:
  GptConfig config_;
  std::int64_t batch_, seq_;
  std::vector<ParamTensor> layout_;
  std::int64_t param_count_ = 0;
  Buffer params_, grads_, acts_;
  std::int64_t act_floats_ = 0;
  const std::int32_t* tokens_ = nullptr;
  const std::int32_t* targets_ = nullptr;
  bool training_ = false;
  std::uint64_t dropout_seed_ = 0;
};

}  // namespace nibble::model
