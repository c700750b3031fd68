// The optimizer's internal layout: one TensorState per parameter tensor, its state slots carved
// from one arena, and the chunk table that a step walks. Shared by the optimizer front end, the
// CPU driver and state save/load; not part of the public API.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "math/codebook.hpp"
#include "math/rules.hpp"
#include "math/state_codec.hpp"
#include "math/step_constants.hpp"
#include "nibble/algorithms.hpp"
#include "nibble/optim.hpp"
#include "nibble/tensor.hpp"

namespace nibble {

inline constexpr int kMaxSlots = kMaxStateSlots;
inline constexpr int kMaxBlock = 4096;
inline constexpr int kFullPrecisionBlock = 256;  // iteration block for fp32/bf16 state
inline constexpr std::int64_t kChunkElements = 1 << 16;

// One elementwise state tensor of one parameter (e.g. Adam's exp_avg), in one precision.
struct Slot {
  std::string name;
  bool is_signed = true;  // first moments are signed; second moments and Hessians are not
  Precision precision = Precision::kFp32;
  math::StateStorage storage = math::StateStorage::kF32;
  math::CodebookId codebook = math::CodebookId::kDynamicSigned8;
  bool rank1 = false;  // 4-bit, scaled by min(row max, column max) instead of a block absmax
  float* f32 = nullptr;
  std::uint16_t* bf16 = nullptr;
  std::uint8_t* codes = nullptr;
  float* absmax = nullptr;  // one per block
  std::int64_t blocks = 0;
  float* row_max = nullptr;  // rank1: [rows], [cols] of the (rows, cols) view
  float* col_max = nullptr;
  float* next_row_max = nullptr;  // rank1: scales of the state being written this step
  float* next_col_max = nullptr;
};

struct TensorState {
  Param param;
  int group = 0;
  std::int64_t numel = 0;
  std::int64_t offset = 0;  // first element in the concatenation of all tensors
  std::int64_t rows = 1;    // (rows, cols) view: rows = prod(shape[:-1]), cols = shape[-1]
  std::int64_t cols = 1;
  Precision precision = Precision::kFp32;
  int block = kFullPrecisionBlock;
  float lr = 0.0f;            // what it steps with: its group's, else the optimizer's (assign_rates)
  float weight_decay = 0.0f;
  std::optional<float> group_lr, group_weight_decay;  // its group's own, when the group set them
  bool decays = true;         // false: exempt from weight decay by name or rank (no_decay_*)
  std::int64_t step = 0;  // steps this tensor has taken (a tensor without a gradient does not step)
  // Sums an algorithm keeps across this tensor's steps, in double (schedule-free AdamW: lr_max and
  // weight_sum); they advance with `step` and are saved with it.
  std::array<double, 2> running = {};
  int slot_count = 0;
  std::array<Slot, kMaxSlots> slots;
  // Adafactor, factored (rank >= 2): EMAs of row and column means of g^2 + eps1, fp32.
  bool factored = false;
  std::int64_t batch_rows = 1;  // shape[-2]; rows = batches * batch_rows
  bool orthogonalised = false;  // Muon: its update is orthogonalised (else its AdamW fallback steps it)
  bool has_master = false;      // keeps an fp32 copy of a bf16/fp16 parameter (CUDA, master_weights)
  float* master = nullptr;
  float* af_row = nullptr;      // [rows]
  float* af_col = nullptr;      // [batches * cols]
  // Scratch for the reductions of AdamP, Adafactor and rank-1 scales, allocated once.
  std::vector<double> scratch;
};

using math::StepConstants;

struct Chunk {
  int tensor;
  std::int64_t begin, end;
};

class Backend;

struct Optimizer::Impl {
  OptimizerOptions options;
  Hyper hyper;  // resolved: options.hyper or the algorithm's defaults
  std::vector<TensorState> tensors;
  std::vector<Chunk> chunks;
  std::vector<StepConstants> constants;  // one per tensor
  std::vector<double> chunk_partials;    // one per chunk: deterministic global reductions
  std::vector<float> thread_scratch;     // rank-1 column maxima, one row per thread
  std::vector<double> column_partials;   // CPU Adafactor: column sums of fixed row groups
  std::vector<float> column_factors;     // CPU Adafactor: the stepped tensor's column factors
  // Muon on the CPU: the largest orthogonalised matrix's update and its Newton-Schulz workspace
  // (floats), in a Buffer so that the host memory counters see it as the memory plan does.
  Buffer ns_scratch;
  std::int64_t scratch_bytes = 0;  // beside the state: muon_scratch_bytes (state_layout.hpp)
  std::int64_t max_cols = 0;
  int threads = 1;
  Buffer arena;                    // CPU: all state; CUDA: unused (the state lives on the device)
  std::int64_t arena_bytes = 0;
  std::unique_ptr<Backend> backend;  // the device's half of every operation
  std::int64_t state_bytes = 0;
  std::int64_t total_numel = 0;
  std::int64_t steps = 0;
  std::int64_t skipped = 0;
  // Schedule-free AdamW: the parameters hold y (train mode) or x (eval mode); steps need train mode.
  bool train_mode = true;
};

const math::Codebook& codebook(math::CodebookId id);

namespace cpu {
// The sum of squared gradients of the tensors that have one (and whose `counted` flag is not 0,
// when given), in double, in chunk order; NaN/inf when not finite.
double grad_square_sum(Optimizer::Impl& impl, std::span<const std::uint8_t> counted);
// One optimizer step over every tensor that has a gradient (the step counters already advanced).
void step(Optimizer::Impl& impl, float grad_mul, float lr_scale);
// Sizes the step's host scratch once, when the optimizer is made (Adafactor's column partials and
// factors), so that no step allocates: a failed allocation midway would leave some tensors stepped.
void reserve_scratch(Optimizer::Impl& impl);
void update_hessian(Optimizer::Impl& impl, std::span<const float* const> estimates);
void interpolate_params(Optimizer::Impl& impl, float weight);
// Dequantized values of one slot.
void read_slot(const TensorState& t, const Slot& slot, float* out);
// Dequantized values of one slot from which write_slot re-creates the same codes and absmax when
// it is given the same blocks.
void read_slot_portable(const TensorState& t, const Slot& slot, float* out);
// Quantizes (or rounds, or copies) values into one slot, block by block, rounding to nearest.
void write_slot(const TensorState& t, Slot& slot, const float* values);
}  // namespace cpu

// The state in host memory, for save, load and state_values: the live tensors of a CPU optimizer;
// for a CUDA optimizer a downloaded copy whose pointers point into `bytes`, with the step counts
// read back from the device.
struct HostState {
  std::vector<TensorState>* tensors = nullptr;
  std::vector<TensorState> copy;
  Buffer bytes;
};

// A device's half of the optimizer: where its state lives, how a step is decided and run, and how
// the host reads and writes the state. The front end (optimizer.cpp) validates, lays the state out
// and calls these; it never asks which device it runs on. The step policy (norm, skip, clip) is
// math::decide_step on both.
class Backend {
 public:
  virtual ~Backend() = default;
  // The state arena, zeroed, once its size is known; then, once the layout is carved into it,
  // whatever the device keeps besides (CUDA: tables, scalars, master weights).
  virtual std::byte* allocate_arena(Optimizer::Impl& impl, std::int64_t bytes) = 0;
  virtual void create(Optimizer::Impl& impl) = 0;
  // One step with scalars already checked (CUDA may return before it ran: options.synchronize).
  virtual StepResult step(Optimizer::Impl& impl, const StepOptions& options) = 0;
  virtual double grad_square_sum(Optimizer::Impl& impl, std::span<const std::uint8_t> counted) = 0;
  virtual void enqueue_step(Optimizer::Impl& impl) = 0;
  // CUDA: the device-side square sum and the step that takes one (Optimizer's of the same names).
  virtual void enqueue_grad_square_sum(Optimizer::Impl& impl, std::span<const std::uint8_t> counted, double* out) = 0;
  virtual void enqueue_step_with_square_sum(Optimizer::Impl& impl, const double* square_sum) = 0;
  virtual DeviceScalars scalars(const Optimizer::Impl& impl) const = 0;
  virtual void synchronize(const Optimizer::Impl& impl) const = 0;
  virtual void set_stream(Optimizer::Impl& impl, void* stream) = 0;
  // After impl's gradient pointers changed (one tensor's, or any of them).
  virtual void grad_changed(Optimizer::Impl& impl, std::size_t index) = 0;
  virtual void grads_changed(Optimizer::Impl& impl) = 0;
  // Folds the estimates into the Hessian EMA; throws InvalidArgument naming the first tensor whose
  // estimate holds inf or NaN, with nothing applied.
  virtual void update_hessian(Optimizer::Impl& impl, std::span<const float* const> estimates) = 0;
  // After impl.hyper and the tensors' lr and weight decay changed (set_hyper): later steps read them.
  virtual void hyper_changed(Optimizer::Impl& impl) = 0;
  // Brings impl's step counters up to date with the device's.
  virtual void refresh_counters(Optimizer::Impl& impl) = 0;
  virtual HostState host_state(Optimizer::Impl& impl) = 0;
  // Writes a changed host copy (and impl's step counts) back to the device.
  virtual void commit_host_state(Optimizer::Impl& impl, HostState& state) = 0;
  // p = lerp(p, slot 0, weight) for every tensor that has stepped (schedule-free AdamW's train and
  // eval, slot 0 being z, always fp32), master weights included.
  virtual void interpolate_params(Optimizer::Impl& impl, float weight) = 0;
};
std::unique_ptr<Backend> make_cpu_backend();   // src/optim/cpu/backend.cpp
std::unique_ptr<Backend> make_cuda_backend();  // src/optim/cuda/backend.cu; without CUDA it refuses

inline HostState host_state(Optimizer::Impl& impl) { return impl.backend->host_state(impl); }
inline void commit_host_state(Optimizer::Impl& impl, HostState& state) { impl.backend->commit_host_state(impl, state); }

}  // namespace nibble
