// State precision in one place: which precision, block and codebook a tensor's state takes, and
// the arrays ("regions") each slot keeps at its precision. The arena carve, the byte counts, the
// memory plan, save/load and the host copy of CUDA state all walk the same regions.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "math/codebook.hpp"
#include "nibble/algorithms.hpp"
#include "nibble/dtype.hpp"
#include "optim/impl.hpp"

namespace nibble {

inline constexpr int kDefaultBlock8 = 256;
inline constexpr int kDefaultBlock4 = 128;

// How a precision's values are stored.
math::StateStorage state_storage(Precision precision);

// Throws InvalidArgument unless block_size is 0 (the default) or a power of two in [16, kMaxBlock].
void check_block_size(int block_size);
// The block a precision iterates and scales by: block_size or its default; fp32/bf16 state is
// iterated in kFullPrecisionBlock blocks.
int state_block(Precision precision, int block_size);
bool is_quantized(Precision precision);
math::CodebookId state_codebook(Precision precision, bool is_signed);
std::string_view codebook_name(math::CodebookId id);
// Whether a 4-bit slot is scaled rank-1 (row/column max) rather than per block: only non-negative
// states of >= 2-D tensors, and not a Hessian EMA, which update_hessian writes outside the step's
// row/column-max pass.
bool uses_rank1(bool requested, const AlgorithmSpec& algorithm, Precision precision, bool is_signed,
                std::size_t rank);

// Whether `name` contains one of `patterns` (empty patterns match nothing).
bool name_contains_any(const std::string& name, const std::vector<std::string>& patterns);

// Whether a slot's values must be >= 0 (in a loaded file or set values): unsigned slots hold
// squares, except a Hessian EMA, whose estimates (Hutchinson's) may be negative.
inline bool slot_non_negative(const AlgorithmSpec& algorithm, const Slot& slot) {
  return !slot.is_signed && !algorithm.hessian_slot;
}

// The state precision a tensor gets: the requested one, or fp32 when it is smaller than
// min_quant_size (by its global element count) or its name contains one of full_precision_names.
Precision tensor_precision(Precision requested, std::int64_t global_numel, const std::string& name,
                           const OptimizerOptions& options);

// Muon: whether a tensor named `name` of rank `global_rank` is orthogonalised (else its AdamW
// fallback steps it), as options.use_muon and options.adamw_names say; false for other algorithms.
// Throws InvalidArgument for use_muon true and a tensor of rank < 2.
bool muon_orthogonalises(const AlgorithmSpec& algorithm, const std::string& name, std::size_t global_rank,
                         const OptimizerOptions& options);

// Muon's scratch beside the state for these laid-out tensors: on the CPU the largest orthogonalised
// matrix's update and Newton-Schulz workspace (fp32); on CUDA an fp32 update per matrix and, per
// batch of one shape, its tensor list, norms and their partials, bf16 X, Y, A and B, and the cuBLAS
// workspace (what
// the backends allocate). 0 when no tensor is orthogonalised.
std::int64_t muon_scratch_bytes(std::span<const TensorState> tensors, Device device);
inline constexpr std::int64_t kCublasWorkspaceBytes = 32 << 20;  // cuBLAS's recommendation for Hopper
// The most elements of one parameter (2^48, a petabyte of fp32): its state's byte counts stay far
// from int64's end. plan_tensor_state refuses more.
inline constexpr std::int64_t kMaxTensorElements = std::int64_t{1} << 48;
// CUDA: the blocks that sum one matrix's squared update for its norm (one per 64Ki elements, 1 to
// 64), each into a partial of its own; fixed by the size, so the sum's order is too.
inline std::int64_t muon_norm_blocks(std::int64_t numel) {
  const std::int64_t blocks = (numel + 65535) / 65536;
  return blocks < 1 ? 1 : (blocks > 64 ? 64 : blocks);
}

// Fills t's view (rows, cols, batch_rows), precision, block, factoring, Muon's choice and slots from its
// parameter (t.param, t.numel set) and the global shape. Allocates nothing.
void layout_tensor(TensorState& t, const AlgorithmSpec& algorithm, const Hyper& hyper, Precision precision,
                   const OptimizerOptions& options, std::span<const std::int64_t> global_shape);

// Both of the above, as the optimizer decides a tensor's state: the group's precision or the
// optimizer's, then the layout; and whether it keeps fp32 master weights.
void plan_tensor_state(TensorState& t, const AlgorithmSpec& algorithm, const Hyper& hyper,
                       std::optional<Precision> group_precision, const OptimizerOptions& options,
                       std::span<const std::int64_t> global_shape);

// One array of a tensor's state.
enum class RegionRole : std::uint8_t {
  kValues,       // a slot's fp32 or bf16 values, stored with the parameter's shape
  kCodes,        // a slot's 8-bit or packed 4-bit codes
  kScale,        // a slot's per-block absmax or rank-1 row/column maxima
  kStagedScale,  // rank-1 maxima of the state being written this step: scratch, not state
  kMaster,       // fp32 master copy of a 16-bit parameter
  kFactor,       // Adafactor's row and column statistics
};
struct Region {
  RegionRole role;
  int slot;                 // the slot's index; -1 for master and factors
  std::string_view name;    // "codes", "absmax", "row_max", ... ("" for values); master and factors: their name
  DType dtype;
  std::int64_t count;       // elements
  std::int64_t bytes() const { return count * static_cast<std::int64_t>(dtype_size(dtype)); }
  // Kept across steps: counted in the state's bytes and saved.
  bool is_state() const { return role != RegionRole::kStagedScale; }
};

// Calls fn(region, pointer) for each array of t, in arena order; `pointer` is a reference to the
// TensorState's or Slot's typed pointer for that array (fn may read or set it).
template <class Fn>
void for_each_region(TensorState& t, Fn&& fn) {
  for (int j = 0; j < t.slot_count; ++j) {
    Slot& s = t.slots[j];
    switch (s.storage) {
      case math::StateStorage::kF32: fn(Region{RegionRole::kValues, j, "", DType::F32, t.numel}, s.f32); break;
      case math::StateStorage::kBf16: fn(Region{RegionRole::kValues, j, "", DType::BF16, t.numel}, s.bf16); break;
      case math::StateStorage::kCodes8:
        fn(Region{RegionRole::kCodes, j, "codes", DType::U8, t.numel}, s.codes);
        fn(Region{RegionRole::kScale, j, "absmax", DType::F32, s.blocks}, s.absmax);
        break;
      case math::StateStorage::kCodes4:
        fn(Region{RegionRole::kCodes, j, "codes", DType::U8, (t.numel + 1) / 2}, s.codes);
        if (s.rank1) {
          fn(Region{RegionRole::kScale, j, "row_max", DType::F32, t.rows}, s.row_max);
          fn(Region{RegionRole::kScale, j, "col_max", DType::F32, t.cols}, s.col_max);
          fn(Region{RegionRole::kStagedScale, j, "next_row_max", DType::F32, t.rows}, s.next_row_max);
          fn(Region{RegionRole::kStagedScale, j, "next_col_max", DType::F32, t.cols}, s.next_col_max);
        } else {
          fn(Region{RegionRole::kScale, j, "absmax", DType::F32, s.blocks}, s.absmax);
        }
        break;
    }
  }
  if (t.has_master) fn(Region{RegionRole::kMaster, -1, "master", DType::F32, t.numel}, t.master);
  if (t.factored) {
    fn(Region{RegionRole::kFactor, -1, "exp_avg_sq_row", DType::F32, t.rows}, t.af_row);
    fn(Region{RegionRole::kFactor, -1, "exp_avg_sq_col", DType::F32, (t.rows / t.batch_rows) * t.cols}, t.af_col);
  }
}

// Bytes of state (regions that are state) of a laid-out tensor.
std::int64_t tensor_state_bytes(TensorState& t);

}  // namespace nibble
