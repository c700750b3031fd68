// State precisions: their names, blocks and codebooks, the per-tensor precision decision and
// the layout of one tensor's state (see state_layout.hpp).
#include "optim/state_layout.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "nibble/error.hpp"
#include "optim/cpu/newton_schulz.hpp"

namespace nibble {
namespace {

// One entry per state precision: its names, how its values are stored, its default quantization
// block and the codebooks of its signed and unsigned slots (quantized precisions).
struct PrecisionSpec {
  Precision id;
  std::string_view name;
  std::array<std::string_view, 3> aliases;  // other accepted names (empty: none)
  math::StateStorage storage;
  int default_block;  // fp32/bf16: the iteration block
  math::CodebookId signed_codebook = math::CodebookId::kDynamicSigned8;
  math::CodebookId unsigned_codebook = math::CodebookId::kDynamicUnsigned8;
};

constexpr std::array kPrecisionSpecs = {
    PrecisionSpec{Precision::kFp32, "fp32", {"32bit", "f32"}, math::StateStorage::kF32, kFullPrecisionBlock},
    PrecisionSpec{Precision::kBf16, "bf16", {"16bit"}, math::StateStorage::kBf16, kFullPrecisionBlock},
    PrecisionSpec{Precision::kInt8, "8bit", {"int8"}, math::StateStorage::kCodes8, kDefaultBlock8,
                  math::CodebookId::kDynamicSigned8, math::CodebookId::kDynamicUnsigned8},
    PrecisionSpec{Precision::kInt4, "4bit", {"int4"}, math::StateStorage::kCodes4, kDefaultBlock4,
                  math::CodebookId::kDynamicSigned4, math::CodebookId::kLinearUnsigned4},
    // Minifloat codes (src/math/codebook.hpp): e4m3 first moments, unsigned e5m3 second moments,
    // whose 2^-33 range below the block's absmax keeps small squares representable.
    PrecisionSpec{Precision::kFp8, "fp8", {"float8", "f8"}, math::StateStorage::kCodes8, kDefaultBlock8,
                  math::CodebookId::kFp8Signed, math::CodebookId::kFp8Unsigned},
};

const PrecisionSpec& precision_spec(Precision precision) {
  const auto i = static_cast<std::size_t>(precision);
  if (i >= kPrecisionSpecs.size())
    throw InvalidArgument(fmt::format("state precision {} is not one of {}", static_cast<int>(precision),
                                      precision_names()));
  return kPrecisionSpecs[i];
}

constexpr bool precisions_in_enum_order() {
  for (std::size_t i = 0; i < kPrecisionSpecs.size(); ++i)
    if (static_cast<std::size_t>(kPrecisionSpecs[i].id) != i) return false;
  return true;
}
static_assert(precisions_in_enum_order(), "kPrecisionSpecs must list the precisions in the order of enum Precision");

constexpr std::array kPrecisions = [] {
  std::array<Precision, kPrecisionSpecs.size()> out{};
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = kPrecisionSpecs[i].id;
  return out;
}();

}  // namespace

bool name_contains_any(const std::string& name, const std::vector<std::string>& patterns) {
  return std::any_of(patterns.begin(), patterns.end(),
                     [&](const std::string& p) { return !p.empty() && name.find(p) != std::string::npos; });
}

std::span<const Precision> all_precisions() { return kPrecisions; }

std::string_view precision_name(Precision precision) {
  const auto i = static_cast<std::size_t>(precision);
  return i < kPrecisionSpecs.size() ? kPrecisionSpecs[i].name : "unknown";
}

std::optional<Precision> precision_from_name(std::string_view name) {
  std::string n(name);
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const PrecisionSpec& p : kPrecisionSpecs) {
    if (p.name == n) return p.id;
    for (std::string_view alias : p.aliases)
      if (!alias.empty() && alias == n) return p.id;
  }
  return std::nullopt;
}

std::ostream& operator<<(std::ostream& os, Precision precision) { return os << precision_name(precision); }

void check_block_size(int block_size) {
  if (block_size != 0 && (block_size < 16 || block_size > kMaxBlock || (block_size & (block_size - 1))))
    throw InvalidArgument(fmt::format("block_size must be a power of two in [16, {}], got {}", kMaxBlock, block_size));
}

std::string precision_names() {
  std::string out;
  for (const PrecisionSpec& p : kPrecisionSpecs) out += fmt::format("{}{}", out.empty() ? "" : ", ", p.name);
  return out;
}

math::StateStorage state_storage(Precision precision) { return precision_spec(precision).storage; }

bool is_quantized(Precision precision) {
  const math::StateStorage s = state_storage(precision);
  return s == math::StateStorage::kCodes8 || s == math::StateStorage::kCodes4;
}

int state_block(Precision precision, int block_size) {
  return is_quantized(precision) && block_size != 0 ? block_size : precision_spec(precision).default_block;
}

math::CodebookId state_codebook(Precision precision, bool is_signed) {
  const PrecisionSpec& p = precision_spec(precision);
  return is_signed ? p.signed_codebook : p.unsigned_codebook;
}

std::string_view codebook_name(math::CodebookId id) {
  switch (id) {
    case math::CodebookId::kDynamicSigned8: return "dynamic_signed_8";
    case math::CodebookId::kDynamicUnsigned8: return "dynamic_unsigned_8";
    case math::CodebookId::kDynamicSigned4: return "dynamic_signed_4";
    case math::CodebookId::kLinearUnsigned4: return "linear_unsigned_4";
    case math::CodebookId::kFp8Signed: return "fp8_e4m3";
    case math::CodebookId::kFp8Unsigned: return "fp8_unsigned_e5m3";
  }
  return "unknown";
}

bool uses_rank1(bool requested, const AlgorithmSpec& algorithm, Precision precision, bool is_signed,
                std::size_t rank) {
  return requested && precision == Precision::kInt4 && !is_signed && rank >= 2 && !algorithm.hessian_slot;
}

Precision tensor_precision(Precision requested, std::int64_t global_numel, const std::string& name,
                           const OptimizerOptions& options) {
  if (requested != Precision::kFp32 &&
      (global_numel < options.min_quant_size || name_contains_any(name, options.full_precision_names)))
    return Precision::kFp32;
  return requested;
}

bool muon_orthogonalises(const AlgorithmSpec& algorithm, const std::string& name, std::size_t global_rank,
                         const OptimizerOptions& options) {
  if (!algorithm.orthogonalises_matrices) return false;
  if (options.use_muon == true && global_rank < 2)
    throw InvalidArgument(fmt::format("parameter '{}' has rank {}: use_muon true orthogonalises every tensor, and "
                                      "Newton-Schulz needs rank >= 2; give it a group or optimizer without use_muon",
                                      name, global_rank));
  if (options.use_muon) return *options.use_muon;
  return global_rank >= 2 && !name_contains_any(name, options.adamw_names);
}

std::int64_t muon_scratch_bytes(std::span<const TensorState> tensors, Device device) {
  std::int64_t cpu = 0, updates = 0, batches = 0;
  std::vector<std::pair<std::int64_t, std::int64_t>> shapes;
  for (const TensorState& t : tensors) {
    if (!t.orthogonalised || t.numel == 0) continue;
    const std::int64_t rows = t.param.shape[0], cols = t.numel / rows, s = std::min(rows, cols);
    cpu = std::max(cpu, 4 * (t.numel + cpu::newton_schulz_workspace(rows, cols)));
    updates += 4 * t.numel;
    // Per matrix of its batch: its index, its norm and the norm's partials, X and Y (s x l) and A
    // and B (s x s) in bf16.
    batches += 4 + 8 + 8 * muon_norm_blocks(t.numel) + 2 * (2 * t.numel + 2 * s * s);
    if (std::find(shapes.begin(), shapes.end(), std::make_pair(rows, cols)) == shapes.end())
      shapes.emplace_back(rows, cols);
  }
  if (device == Device::kCpu) return cpu;
  return shapes.empty() ? 0 : updates + batches + kCublasWorkspaceBytes;
}

void layout_tensor(TensorState& t, const AlgorithmSpec& algorithm, const Hyper& hyper, Precision precision,
                   const OptimizerOptions& options, std::span<const std::int64_t> global_shape) {
  const std::vector<std::int64_t>& shape = t.param.shape;
  const std::size_t rank = shape.size();
  t.cols = rank == 0 ? 1 : shape.back();
  t.rows = t.cols > 0 ? t.numel / t.cols : 0;
  t.batch_rows = rank >= 2 ? shape[rank - 2] : 1;
  t.precision = precision;
  t.block = state_block(precision, options.block_size);
  t.factored = algorithm.factors_matrices && global_shape.size() >= 2 && t.numel > 0;
  StateSlot specs[kMaxStateSlots];
  t.orthogonalised = muon_orthogonalises(algorithm, t.param.name, global_shape.size(), options);
  t.slot_count = algorithm.slots(hyper, t.factored || t.orthogonalised, specs);
  for (int j = 0; j < t.slot_count; ++j) {
    Slot& s = t.slots[j];
    s.name = specs[j].name;
    s.is_signed = specs[j].is_signed;
    s.precision = specs[j].always_fp32 ? Precision::kFp32 : precision;
    s.storage = state_storage(s.precision);
    s.codebook = state_codebook(s.precision, s.is_signed);
    s.rank1 = uses_rank1(options.rank1_second_moment, algorithm, s.precision, s.is_signed, global_shape.size()) &&
              t.numel > 0;
    s.blocks = (t.numel + t.block - 1) / t.block;
  }
}

void plan_tensor_state(TensorState& t, const AlgorithmSpec& algorithm, const Hyper& hyper,
                       std::optional<Precision> group_precision, const OptimizerOptions& options,
                       std::span<const std::int64_t> global_shape) {
  // Sizes of the state (elements times up to 16 bytes, three slots and a master copy) are int64
  // byte counts: a tensor is kept far below where they would wrap.
  const std::int64_t global_numel = shape_numel(global_shape);
  if (t.numel > kMaxTensorElements || global_numel > kMaxTensorElements)
    throw InvalidArgument(fmt::format("parameter '{}' has {} elements; nibble steps tensors of at most 2^48", t.param.name,
                                      std::max(t.numel, global_numel)));
  const Precision precision = tensor_precision(group_precision.value_or(options.precision), global_numel,
                                               t.param.name, options);
  layout_tensor(t, algorithm, hyper, precision, options, global_shape);
  t.has_master = options.master_weights && t.param.dtype != DType::F32 && t.numel > 0;
}

std::int64_t tensor_state_bytes(TensorState& t) {
  std::int64_t bytes = 0;
  for_each_region(t, [&](const Region& r, auto*&) {
    if (r.is_state()) bytes += r.bytes();
  });
  return bytes;
}

double state_bytes_per_element(Algorithm algorithm, const Hyper& hyper, Precision precision, int block_size,
                               std::span<const std::int64_t> shape, bool rank1) {
  TensorState t;
  t.numel = shape_numel(shape);
  if (t.numel == 0) return 0.0;
  check_block_size(block_size);
  t.param.shape.assign(shape.begin(), shape.end());
  OptimizerOptions options;
  options.block_size = block_size;
  options.rank1_second_moment = rank1;
  layout_tensor(t, algorithm_spec(algorithm), hyper, precision, options, shape);
  return static_cast<double>(tensor_state_bytes(t)) / static_cast<double>(t.numel);
}

}  // namespace nibble
