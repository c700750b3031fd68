// nibble's optimizers: SGD, Adam, AdamW, Lion, Adafactor, AdamP, QHM and SophiaG, each with its
// state held at fp32, bf16, 8-bit or 4-bit (block-wise quantized), stepped over all parameter
// tensors at once. Parameters and gradients are fp32 host arrays owned by the caller.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <iosfwd>
#include <string_view>
#include <vector>

namespace nibble {

enum class Algorithm : std::uint8_t { kSgd, kAdam, kAdamW, kLion, kAdafactor, kAdamP, kQhm, kSophiaG };
enum class Precision : std::uint8_t { kFp32, kBf16, kInt8, kInt4 };

std::string_view algorithm_name(Algorithm algorithm);  // "sgd", "adamw", ...
std::optional<Algorithm> algorithm_from_name(std::string_view name);  // case-insensitive
std::string_view precision_name(Precision precision);  // "fp32", "bf16", "8bit", "4bit"
// Print the names above (logs, test listings).
std::ostream& operator<<(std::ostream& os, Algorithm algorithm);
std::ostream& operator<<(std::ostream& os, Precision precision);
std::optional<Precision> precision_from_name(std::string_view name);  // also "32bit", "int8", "int4"
std::span<const Algorithm> all_algorithms();
std::span<const Precision> all_precisions();

// Every hyperparameter of every algorithm; each algorithm reads the ones it names.
// default_hyper() gives each algorithm the defaults of its paper's reference code.
struct Hyper {
  float lr = 1e-3f;
  float weight_decay = 0.0f;
  float beta1 = 0.9f;           // Adam*, Lion, AdamP, SophiaG; Adafactor's first moment
  float beta2 = 0.999f;         // Adam*, Lion, AdamP, SophiaG (Hessian EMA)
  float eps = 1e-8f;            // Adam*, AdamP; Adafactor's eps1 (added to g^2)
  float momentum = 0.0f;        // SGD; QHM's beta
  float dampening = 0.0f;       // SGD
  bool nesterov = false;        // SGD, AdamP
  bool amsgrad = false;         // Adam, AdamW
  bool maximize = false;        // every algorithm
  bool bias_correction = true;  // Adam, AdamW, AdamP
  bool decoupled_weight_decay = false;  // Adam (false) vs AdamW (true); SGD and QHM either way
  float nu = 0.7f;              // QHM
  float eps2 = 1e-3f;           // Adafactor: floor of the parameter scale
  float clip_threshold = 1.0f;  // Adafactor: update RMS clip
  float decay_rate = -0.8f;     // Adafactor: beta2_t = 1 - t^decay_rate
  bool first_moment = false;    // Adafactor: keep a first moment with beta1
  bool relative_step = true;    // Adafactor: lr_t = min(1e-2, 1/sqrt(t)) instead of lr
  bool scale_parameter = true;  // Adafactor: lr scaled by max(eps2, rms(p))
  bool warmup_init = false;     // Adafactor: relative step min(1e-6 t, 1/sqrt(t))
  float delta = 0.1f;           // AdamP: cosine threshold
  float wd_ratio = 0.1f;        // AdamP: weight-decay ratio of projected tensors
  float rho = 0.04f;            // SophiaG
  float batch_tokens = 5120.0f; // SophiaG: the `bs` that multiplies rho
};
Hyper default_hyper(Algorithm algorithm);
// Throws InvalidArgument naming the hyperparameter and its value.
void validate_hyper(Algorithm algorithm, const Hyper& hyper);

struct Param {
  std::string name;
  std::vector<std::int64_t> shape;
  float* data = nullptr;
  float* grad = nullptr;  // null: no gradient this step, the tensor is left alone
};

// Parameters that share hyperparameters; unset fields take the optimizer's values.
struct ParamGroup {
  std::vector<Param> params;
  std::optional<float> lr;
  std::optional<float> weight_decay;
  std::optional<Precision> precision;
};

struct OptimizerOptions {
  Algorithm algorithm = Algorithm::kAdamW;
  std::optional<Hyper> hyper;              // unset: default_hyper(algorithm)
  Precision precision = Precision::kFp32;  // state precision, unless a group or rule says otherwise
  int block_size = 0;                      // quantization block; 0: 256 for 8-bit, 128 for 4-bit
  std::int64_t min_quant_size = 4096;      // tensors with fewer elements keep fp32 state
  std::vector<std::string> full_precision_names;  // tensors whose name contains one keep fp32 state
  std::vector<std::string> no_decay_names;        // no weight decay for names containing one
  bool no_decay_vectors = false;           // no weight decay for tensors of rank < 2 (biases, norms)
  bool rank1_second_moment = false;        // 4-bit second moments of >=2-D tensors: row/column max scale
  bool stochastic_rounding = false;        // bf16 state rounded stochastically
  std::uint64_t seed = 0;                  // for stochastic rounding
  float max_grad_norm = 0.0f;              // > 0: clip gradients by global norm
  bool check_finite = true;                // skip a step whose gradients hold inf or NaN
};

struct StepOptions {
  float grad_scale = 1.0f;  // gradients are divided by this (mixed-precision loss scaling)
  float lr_scale = 1.0f;    // multiplies every group's lr (the schedule's value this step)
};

struct StepResult {
  bool skipped = false;    // gradients were not finite; nothing changed
  double grad_norm = 0.0;  // global L2 norm of grad / grad_scale before clipping (NaN if not computed)
  std::int64_t step = 0;   // optimizer steps taken so far
};

struct StateStats {
  std::int64_t params = 0;       // elements of all parameter tensors
  std::int64_t state_bytes = 0;  // optimizer state, scales and codes included
  double bytes_per_param() const { return params ? static_cast<double>(state_bytes) / params : 0.0; }
};

class Optimizer {
 public:
  // Validates everything (hyperparameters, shapes, duplicates, block size) and allocates all
  // state once; a step never allocates.
  Optimizer(std::vector<ParamGroup> groups, OptimizerOptions options);
  ~Optimizer();
  Optimizer(Optimizer&&) noexcept;
  Optimizer& operator=(Optimizer&&) noexcept;

  StepResult step(const StepOptions& options = {});
  // SophiaG: fold one Hessian-diagonal estimate per parameter (same order and shapes as the
  // parameters; null skips a tensor) into the Hessian EMA.
  void update_hessian(std::span<const float* const> estimates);
  void set_grad(std::size_t param_index, float* grad);

  const OptimizerOptions& options() const;  // hyper filled in
  const Hyper& hyper() const;
  std::int64_t step_count() const;
  std::int64_t skipped_steps() const;
  std::size_t param_count() const;
  const Param& param(std::size_t index) const;
  Precision state_precision(std::size_t param_index) const;
  StateStats state_stats() const;
  // Names of the state tensors of one parameter ("exp_avg", "exp_avg_sq", ...) and their
  // dequantized values (row/column vectors of factored Adafactor come back as stored).
  std::vector<std::string> state_names(std::size_t param_index) const;
  std::vector<float> state_values(std::size_t param_index, std::string_view name) const;

  // The whole optimizer state as safetensors (atomic write). load() checks the file against
  // this optimizer first and changes nothing unless every check passes.
  void save(const std::filesystem::path& path) const;
  void load(const std::filesystem::path& path);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Bytes of optimizer state per element for a tensor of `numel` elements (scales included), as the
// optimizer would allocate it; 0 for none.
double state_bytes_per_element(Algorithm algorithm, const Hyper& hyper, Precision precision,
                               int block_size, std::span<const std::int64_t> shape, bool rank1);

}  // namespace nibble
