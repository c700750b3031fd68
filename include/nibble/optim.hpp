// nibble's optimizers: SGD, Adam, AdamW, Lion, Adafactor, AdamP, QHM and SophiaG, each with its
// state held at fp32, bf16, 8-bit or 4-bit (block-wise quantized), stepped over all parameter
// tensors at once, on the CPU or a CUDA GPU. Parameters and gradients are arrays owned by the
// caller: fp32 host arrays for the CPU backend; device arrays of fp32, bf16 or fp16 parameters and
// fp32 or bf16 gradients for the CUDA backend.
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

#include "nibble/device.hpp"
#include "nibble/dtype.hpp"
#include "nibble/hyper.hpp"

namespace nibble {

std::string_view algorithm_name(Algorithm algorithm);  // "sgd", "adamw", ...
std::optional<Algorithm> algorithm_from_name(std::string_view name);  // case-insensitive
std::string_view precision_name(Precision precision);  // "fp32", "bf16", "8bit", "4bit"
// Print the names above (logs, test listings).
std::ostream& operator<<(std::ostream& os, Algorithm algorithm);
std::ostream& operator<<(std::ostream& os, Precision precision);
std::optional<Precision> precision_from_name(std::string_view name);  // also "32bit", "int8", "int4"
std::span<const Algorithm> all_algorithms();
std::span<const Precision> all_precisions();
// The names above as a list for help texts and messages: "sgd, adam, ...", "fp32, bf16, ...".
std::string algorithm_names();
std::string precision_names();

Hyper default_hyper(Algorithm algorithm);
// Throws InvalidArgument naming the hyperparameter and its value.
void validate_hyper(Algorithm algorithm, const Hyper& hyper);

struct Param {
  std::string name;
  std::vector<std::int64_t> shape;
  void* data = nullptr;
  void* grad = nullptr;           // null: no gradient this step, the tensor is left alone
  DType dtype = DType::F32;       // of data: F32 (CPU and CUDA), BF16 or F16 (CUDA)
  DType grad_dtype = DType::F32;  // of grad: F32 (CPU and CUDA), BF16 or F16 (CUDA)
  // Sharded training: `shape` is this rank's piece and `global_shape` the whole tensor's (empty:
  // the same as `shape`). Every choice that depends on the tensor (state precision by
  // min_quant_size, weight decay of vectors, factoring, rank-1 scales) is made from the global
  // shape, so every rank and every world size chooses alike; the step runs on the local piece.
  std::vector<std::int64_t> global_shape = {};
  // Other ranks hold other elements of this tensor. Algorithms whose math spans a whole tensor
  // (Adafactor's statistics, AdamP's projection test, rank-1 4-bit scales) refuse such a piece.
  bool split = false;
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
  Device device = Device::kCpu;            // where parameters, gradients and state live
  void* cuda_stream = nullptr;             // CUDA: the cudaStream_t every launch goes to (null: default)
  bool master_weights = false;             // CUDA, bf16/fp16 parameters: keep and step an fp32 copy
  bool param_stochastic_rounding = false;  // CUDA, bf16 parameters: round the stepped value stochastically
  // Muon: which tensors are orthogonalised; the others step with its AdamW fallback (adamw_lr,
  // beta1, beta2, adamw_eps, adamw_weight_decay). Unset: those of rank >= 2 whose name contains none
  // of adamw_names (embeddings and output heads); true: every tensor (each must have rank >= 2);
  // false: none.
  std::optional<bool> use_muon;
  std::vector<std::string> adamw_names = {"embed", "wte", "wpe", "lm_head"};
};

struct StepOptions {
  float grad_scale = 1.0f;  // gradients are divided by this (mixed-precision loss scaling)
  float lr_scale = 1.0f;    // multiplies every group's lr (the schedule's value this step)
  // CUDA: wait for the step to finish and report it. false returns as soon as the work is queued,
  // with `skipped` false, `grad_norm` NaN and `step` -1 (read them later from device_scalars()).
  bool synchronize = true;
  bool found_inf = false;   // the caller found inf/NaN gradients (e.g. an AMP scaler): skip this step
  // Sharded training: the sum of squared gradients (as given, before dividing by grad_scale) over
  // the whole model on every rank, from grad_square_sum() summed across ranks. Set, the non-finite
  // check and clipping use it instead of this optimizer's own gradients, so all ranks skip or clip
  // alike. CPU backend.
  std::optional<double> grad_square_sum = std::nullopt;
};

// CUDA: the scalars a step reads and writes in device memory. A training loop that captures
// enqueue_step() in a CUDA graph writes lr_scale, grad_scale and found_inf here (on the optimizer's
// stream) before each replay; the step never copies to or from the host.
struct DeviceScalars {
  float* lr_scale = nullptr;     // read: multiplies every group's lr
  float* grad_scale = nullptr;   // read: gradients are divided by it
  int* found_inf = nullptr;      // read: non-zero skips the step (e.g. set by an AMP scaler)
  int* skipped_last = nullptr;   // written: 1 when the last step was skipped
  double* grad_norm = nullptr;   // written: global norm of grad / grad_scale (NaN when not computed)
  std::int64_t* steps = nullptr;    // written: steps taken
  std::int64_t* skipped = nullptr;  // written: steps skipped
};

struct StepResult {
  bool skipped = false;    // gradients were not finite (or beyond sqrt(FLT_MAX) in norm); nothing changed
  double grad_norm = 0.0;  // global L2 norm of grad / grad_scale before clipping (NaN if not computed)
  std::int64_t step = 0;   // optimizer steps taken so far
};

struct StateStats {
  std::int64_t params = 0;       // elements of all parameter tensors
  std::int64_t state_bytes = 0;  // optimizer state, scales and codes included
  std::int64_t scratch_bytes = 0;  // allocated beside the state for the step (Muon's Newton-Schulz buffers)
  double bytes_per_param() const { return params ? static_cast<double>(state_bytes) / params : 0.0; }
};

// The options an Optimizer would run with: hyperparameters filled in from the algorithm's defaults,
// and every option checked (hyperparameters, precision, block size, sizes, device kind) as the
// constructor checks them, without parameters. Throws InvalidArgument naming the bad value.
OptimizerOptions resolve_options(OptimizerOptions options);

class Optimizer {
 public:
  // Validates everything (hyperparameters, shapes, duplicates, block size) and allocates all
  // state once; a step never allocates.
  Optimizer(std::vector<ParamGroup> groups, OptimizerOptions options);
  ~Optimizer();
  Optimizer(Optimizer&&) noexcept;
  Optimizer& operator=(Optimizer&&) noexcept;

  StepResult step(const StepOptions& options = {});
  // CUDA: queue one step that reads lr_scale, grad_scale and found_inf from device_scalars();
  // no host synchronisation and no host copies, so it can be captured in a CUDA graph.
  void enqueue_step();
  DeviceScalars device_scalars() const;  // CUDA only
  void synchronize() const;              // CUDA: wait for queued work (no-op on the CPU)
  Device device() const;
  // SophiaG: fold one Hessian-diagonal estimate per parameter (same order and shapes as the
  // parameters; null skips a tensor) into the Hessian EMA. fp32, on the optimizer's device.
  // CUDA: the estimates are checked for inf/NaN before this returns, but folded in on the
  // optimizer's stream afterwards: keep them alive and unchanged until that stream reaches it
  // (synchronize(), or later work on the same stream, as PyTorch's caching allocator orders it).
  void update_hessian(std::span<const float* const> estimates);
  // The sum of squared gradients (as given) of the tensors that have one, in double, summed in the
  // same order as the step's own norm. `counted`: one flag per parameter (0 leaves it out, e.g. a
  // replicated tensor that another rank counts), or empty for all. CPU backend.
  double grad_square_sum(std::span<const std::uint8_t> counted = {}) const;
  // CUDA, the same without a host round trip: queues on the optimizer's stream the sum of squared
  // gradients (counted likewise) into the device double `out`. New `counted` flags are uploaded
  // from the host, which a CUDA graph capture does not allow: set them by one call before capturing.
  void enqueue_grad_square_sum(std::span<const std::uint8_t> counted, double* out);
  // CUDA: enqueue_step() whose non-finite check and clipping take the device double `*square_sum`,
  // read when the step runs (enqueue_grad_square_sum's results summed over every group and rank,
  // e.g. by an NCCL all-reduce queued in between), instead of this optimizer's own gradients, so
  // every group and rank skips or clips alike.
  void enqueue_step_with_square_sum(const double* square_sum);
  // Points a parameter at a new gradient array (same dtype), or null for none.
  void set_grad(std::size_t param_index, void* grad);
  // All gradients at once, one per parameter; on CUDA one asynchronous table update on the
  // optimizer's stream when any changed, none when nothing did. Inside a CUDA graph capture the
  // update copies from one pinned buffer the optimizer keeps for captures, which the graph reads at
  // every replay: only the table most recently set in a capture replays as captured, so change
  // gradient pointers in one captured graph at most, once per graph before its steps.
  void set_grads(std::span<void* const> grads);
  // CUDA: the stream later steps are queued on (e.g. the framework's current stream).
  void set_cuda_stream(void* stream);
  // Schedule-free AdamW keeps two points of each parameter: y, where gradients are taken (train
  // mode), and x, the average that is evaluated (eval mode). eval() moves every parameter that has
  // stepped from y to x (x = y + (1 - 1/beta1) (z - y)), train() back (y = x + (1 - beta1) (z - x));
  // each does nothing when already in its mode, and both do nothing for other algorithms (always in
  // train mode). A new optimizer is in train mode (the schedulefree package starts in eval mode; its
  // Python class here does too); step() in eval mode throws InvalidArgument. The mode is saved.
  void train();
  void eval();
  bool training() const;

  // Changes the hyperparameters between steps, as torch.optim lets a scheduler or a script change a
  // group's values (OneCycleLR cycling beta1, a weight-decay schedule): later steps use `hyper`,
  // the state is kept. It is checked as the constructor checks it, and refused (InvalidArgument,
  // nothing changed) if a field that decides which state is kept changes (amsgrad, Adafactor's
  // first_moment) or, for schedule-free AdamW in eval mode, if beta1 changes. Groups that set their
  // own lr or weight_decay keep them; the other tensors take the new values. CUDA: applied on the
  // optimizer's stream, before steps queued later; a CUDA graph captured before replays the values
  // it captured.
  void set_hyper(const Hyper& hyper);
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
  // Sharded checkpoints: state_values whose quantized slots set_state_values turns back into the
  // same codes and absmax when the blocks are the same (see cpu::read_slot_portable), and the
  // reverse, which quantizes, rounds or copies `values` into one state tensor. It checks them
  // (count, finite, >= 0 for second moments) before writing; rank-1 4-bit state is refused.
  std::vector<float> portable_state_values(std::size_t param_index, std::string_view name) const;
  void set_state_values(std::size_t param_index, std::string_view name, std::span<const float> values);
  // Step counts, as a loaded state sets them: one per parameter, the optimizer's steps and skips.
  void set_step_counts(std::span<const std::int64_t> tensor_steps, std::int64_t steps, std::int64_t skipped);
  // Schedule-free AdamW: each parameter's lr_max and weight_sum, as a loaded state sets them (a
  // sharded checkpoint carries them beside the state values). Finite and >= 0; other algorithms
  // keep none and refuse.
  void set_running_sums(std::span<const double> lr_max, std::span<const double> weight_sum);

  // The whole optimizer state as safetensors (atomic write). load() checks the file against
  // this optimizer first and changes nothing unless every check passes.
  void save(const std::filesystem::path& path) const;
  void load(const std::filesystem::path& path);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// The optimizer state bytes an Optimizer over these groups would allocate (its state_stats()), decided
// as its constructor decides every tensor's state (precision by size and name, blocks, factoring,
// rank-1 scales, master weights of 16-bit parameters); parameters need no data. Throws as
// resolve_options does.
std::int64_t planned_state_bytes(std::span<const ParamGroup> groups, const OptimizerOptions& options);
// The scratch bytes it would allocate beside the state (its state_stats().scratch_bytes).
std::int64_t planned_scratch_bytes(std::span<const ParamGroup> groups, const OptimizerOptions& options);

// Bytes of optimizer state per element for a tensor of `numel` elements (scales included), as the
// optimizer would allocate it; 0 for none.
double state_bytes_per_element(Algorithm algorithm, const Hyper& hyper, Precision precision,
                               int block_size, std::span<const std::int64_t> shape, bool rank1);

}  // namespace nibble
