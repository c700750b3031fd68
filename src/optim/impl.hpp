// The optimizer's internal layout: one TensorState per parameter tensor, its state slots carved
// from one arena, and the chunk table that a step walks. Shared by the optimizer front end, the
// CPU driver and state save/load; not part of the public API.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "math/codebook.hpp"
#include "math/rules.hpp"
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
  float lr = 0.0f;
  float weight_decay = 0.0f;
  std::int64_t step = 0;  // steps this tensor has taken (a tensor without a gradient does not step)
  int slot_count = 0;
  std::array<Slot, kMaxSlots> slots;
  // Adafactor, factored (rank >= 2): EMAs of row and column means of g^2 + eps1, fp32.
  bool factored = false;
  std::int64_t batch_rows = 1;  // shape[-2]; rows = batches * batch_rows
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

namespace cuda {
struct DeviceState;  // src/optim/cuda/backend.cu
}

struct Optimizer::Impl {
  OptimizerOptions options;
  Hyper hyper;  // resolved: options.hyper or the algorithm's defaults
  std::vector<TensorState> tensors;
  std::vector<Chunk> chunks;
  std::vector<StepConstants> constants;  // one per tensor
  std::vector<double> chunk_partials;    // one per chunk: deterministic global reductions
  std::vector<float> thread_scratch;     // rank-1 column maxima, one row per thread
  std::int64_t max_cols = 0;
  int threads = 1;
  Buffer arena;                    // CPU: all state; CUDA: unused (the state lives in `device`)
  std::int64_t arena_bytes = 0;
  std::unique_ptr<cuda::DeviceState, void (*)(cuda::DeviceState*)> device{nullptr, nullptr};
  std::int64_t state_bytes = 0;
  std::int64_t total_numel = 0;
  std::int64_t steps = 0;
  std::int64_t skipped = 0;
};

const math::Codebook& codebook(math::CodebookId id);

namespace cpu {
// The sum of squared gradients of the tensors that have one (and whose `counted` flag is not 0,
// when given), in double, in chunk order; NaN/inf when not finite.
double grad_square_sum(Optimizer::Impl& impl, std::span<const std::uint8_t> counted);
// One optimizer step over every tensor that has a gradient (the step counters already advanced).
void step(Optimizer::Impl& impl, float grad_mul, float lr_scale);
void update_hessian(Optimizer::Impl& impl, std::span<const float* const> estimates);
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
HostState host_state(Optimizer::Impl& impl);
// Writes a changed host copy (and impl's step counts) back to the device; nothing on the CPU.
void commit_host_state(Optimizer::Impl& impl, HostState& state);

namespace cuda {
// All of these throw Unsupported in a build without CUDA.
// Allocates the state arena on the current device, zeroed.
std::byte* allocate_arena(Optimizer::Impl& impl, std::int64_t bytes);
// Builds the device tables (tensors, chunks, codebooks, scalars) once the layout is carved, and
// copies bf16/fp16 parameters into their fp32 master weights.
void create(Optimizer::Impl& impl);
void set_scalars(Optimizer::Impl& impl, float grad_scale, float lr_scale, bool found_inf);
// Uploads the gradient pointers of every tensor, asynchronously on the optimizer's stream.
void set_grads(Optimizer::Impl& impl);
void set_stream(Optimizer::Impl& impl, void* stream);
void enqueue_step(Optimizer::Impl& impl);
// Waits for the queued work and returns the last step's result; refreshes impl's step counts.
StepResult read_result(Optimizer::Impl& impl);
void pull_counters(Optimizer::Impl& impl, std::vector<TensorState>& into);
void push_counters(Optimizer::Impl& impl);
void set_grad(Optimizer::Impl& impl, std::size_t index);
// Returns the index of the first estimate tensor holding inf or NaN, or -1, then applies them.
std::int64_t update_hessian(Optimizer::Impl& impl, std::span<const float* const> estimates);
void download(const Optimizer::Impl& impl, std::byte* host);
void upload(Optimizer::Impl& impl, const std::byte* host);
std::byte* arena_base(const Optimizer::Impl& impl);
DeviceScalars scalars(const Optimizer::Impl& impl);
void synchronize(const Optimizer::Impl& impl);
void destroy(DeviceState* state);
}  // namespace cuda

}  // namespace nibble
