// The Optimizer front end: validates its inputs, lays every state tensor out in one arena, builds
// the chunk table once, and runs a step as norm check -> clip -> per-tensor constants -> passes.
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nibble/device.hpp"
#include "nibble/error.hpp"
#include "math/bf16.hpp"
#include "math/scratch_layout.hpp"
#include "math/step_policy.hpp"
#include "optim/impl.hpp"
#include "optim/state_layout.hpp"

namespace nibble {

const math::Codebook& codebook(math::CodebookId id) {
  static const auto books = [] {
    auto b = std::make_unique<std::array<math::Codebook, math::kCodebookCount>>();
    for (int i = 0; i < math::kCodebookCount; ++i)
      if (!math::build_codebook((*b)[i], static_cast<math::CodebookId>(i)))
        throw Error(fmt::format("internal: codebook {} has no bin table", i));
    return b;
  }();
  return (*books)[static_cast<int>(id)];
}

namespace {


void check_rate(std::string_view what, std::string_view group, float v) {
  if (!std::isfinite(v) || v < 0.0f)
    throw InvalidArgument(fmt::format("{} of parameter group {} must be finite and >= 0, got {}", what, group, v));
}



std::int64_t align64(std::int64_t bytes) { return (bytes + 63) / 64 * 64; }

void check_precision(Precision precision, std::string_view where) {
  const auto known = all_precisions();
  if (std::find(known.begin(), known.end(), precision) == known.end())
    throw InvalidArgument(fmt::format("state precision {} of {} is not one of {}", static_cast<int>(precision), where,
                                      precision_names()));
}


// Names go into save()'s JSON header; the writer refuses what is not UTF-8, so refuse it here,
// before any training, rather than at the first checkpoint.
void check_name(const std::string& name) {
  try {
    (void)nlohmann::json(name).dump();
  } catch (const nlohmann::json::exception&) {
    throw InvalidArgument(fmt::format("parameter name {} is not valid UTF-8",
                                      nlohmann::json(name).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)));
  }
}

void check_dtypes(const Param& param, bool on_cuda) {
  if (!on_cuda) {
    if (param.dtype != DType::F32 || param.grad_dtype != DType::F32)
      throw InvalidArgument(fmt::format("parameter '{}': the CPU backend steps F32 parameters and gradients, got {} and {}",
                                        param.name, dtype_name(param.dtype), dtype_name(param.grad_dtype)));
    return;
  }
  if (param.dtype != DType::F32 && param.dtype != DType::BF16 && param.dtype != DType::F16)
    throw InvalidArgument(fmt::format("parameter '{}': dtype {} is not F32, BF16 or F16", param.name,
                                      dtype_name(param.dtype)));
  if (param.grad_dtype != DType::F32 && param.grad_dtype != DType::BF16 && param.grad_dtype != DType::F16)
    throw InvalidArgument(fmt::format("parameter '{}': gradient dtype {} is not F32, BF16 or F16", param.name,
                                      dtype_name(param.grad_dtype)));
}

// A shard's global shape: checked against its local shape, or the local shape when none is given.
std::vector<std::int64_t> global_shape_of(const Param& param, std::int64_t local_numel) {
  if (param.global_shape.empty()) {
    if (param.split)
      throw InvalidArgument(fmt::format("parameter '{}' is marked split but has no global shape", param.name));
    return param.shape;
  }
  const std::vector<std::int64_t>& global = param.global_shape;
  if (global.size() != param.shape.size())
    throw InvalidArgument(fmt::format("parameter '{}': its shard has {} dimensions, its global shape {}",
                                      param.name, param.shape.size(), global.size()));
  for (std::size_t d = 0; d < global.size(); ++d)
    if (param.shape[d] > global[d])
      throw InvalidArgument(fmt::format("parameter '{}': its shard is {} long in dimension {}, more than the "
                                        "global shape's {}", param.name, param.shape[d], d, global[d]));
  std::int64_t global_numel = 0;
  try {
    global_numel = shape_numel(global);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(fmt::format("parameter '{}', global shape: {}", param.name, e.what()));
  }
  if (!param.split && local_numel > 0 && local_numel != global_numel)
    throw InvalidArgument(fmt::format("parameter '{}' holds {} of its {} elements but is not marked split",
                                      param.name, local_numel, global_numel));
  return global;
}

// Refuses a split tensor for the algorithms whose update depends on statistics of the whole tensor;
// reducing those statistics over the ranks would cost a collective per tensor per step.
void check_split(const TensorState& t, const AlgorithmSpec& algo, std::size_t global_rank, bool rank1_requested) {
  if (!t.param.split) return;
  const bool matrix = global_rank >= 2 && (!algo.orthogonalises_matrices || t.orthogonalised);
  std::string_view why = matrix && !algo.split_refusal_matrix.empty() ? algo.split_refusal_matrix
                                                                     : algo.split_refusal_any;
  for (int j = 0; j < t.slot_count && why.empty(); ++j)
    if (uses_rank1(rank1_requested, algo, t.slots[j].precision, t.slots[j].is_signed, global_rank))
      why = "rank-1 4-bit second moments are scaled by row and column maxima of the whole matrix";
  if (!why.empty())
    throw InvalidArgument(fmt::format("parameter '{}' is split across ranks, and {}: keep it whole on one rank "
                                      "(a replicated tensor) or use another algorithm", t.param.name, why));
}


void require_train_mode(const Optimizer::Impl& im) {
  if (!im.train_mode)
    throw InvalidArgument(fmt::format("{} is in eval mode (its parameters hold the averaged x): call train() "
                                      "before step()", algorithm_name(im.options.algorithm)));
}

// An fp32 array of t outside its slots (master weights, Adafactor's factors) by name, or none.
struct PlainState {
  float* data = nullptr;
  std::int64_t count = 0;
  bool non_negative = false;
};
PlainState plain_state(TensorState& t, std::string_view name) {
  PlainState out;
  for_each_region(t, [&](const Region& r, auto* pointer) {
    if constexpr (std::is_same_v<decltype(pointer), float*>)
      if (r.slot < 0 && r.name == name) out = {pointer, r.count, r.role == RegionRole::kFactor};
  });
  return out;
}

// Parameters whose arrays share memory (overlapping views of one storage) would be stepped twice
// at once, by different threads: refused, naming both. Sorted by address, each must end before the
// next begins.
void check_no_overlap(const std::vector<TensorState>& tensors) {
  struct Range {
    std::uintptr_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (const TensorState& t : tensors)
    if (t.numel > 0) {
      const auto begin = reinterpret_cast<std::uintptr_t>(t.param.data);
      ranges.push_back({begin, begin + static_cast<std::uintptr_t>(t.numel) * dtype_size(t.param.dtype), &t.param.name});
    }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (std::size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].begin < ranges[i - 1].end)
      throw InvalidArgument(fmt::format("parameters '{}' and '{}' overlap in memory (views of one storage?); each "
                                        "parameter needs elements of its own",
                                        *ranges[i - 1].name, *ranges[i].name));
}

// A tensor's lr and weight decay: its group's when the group set them, else the optimizer's (Muon's
// AdamW fallback has its own); no weight decay for a tensor exempted by name or rank.
void assign_rates(TensorState& t, const AlgorithmSpec& spec, const Hyper& hyper) {
  const bool fallback = spec.orthogonalises_matrices && !t.orthogonalised;
  t.lr = t.group_lr.value_or(fallback ? hyper.adamw_lr : hyper.lr);
  t.weight_decay = t.decays ? t.group_weight_decay.value_or(fallback ? hyper.adamw_weight_decay : hyper.weight_decay)
                            : 0.0f;
}

// Whether a tensor keeps the same state slots (names, signs, fp32-only) under both hyperparameters.
bool same_slots(const AlgorithmSpec& spec, const TensorState& t, const Hyper& a, const Hyper& b) {
  StateSlot x[kMaxStateSlots], y[kMaxStateSlots];
  const bool matrix = t.factored || t.orthogonalised;
  const int n = spec.slots(a, matrix, x);
  if (spec.slots(b, matrix, y) != n) return false;
  for (int j = 0; j < n; ++j)
    if (x[j].name != y[j].name || x[j].is_signed != y[j].is_signed || x[j].always_fp32 != y[j].always_fp32)
      return false;
  return true;
}

bool same_field(const HyperField& f, const Hyper& a, const Hyper& b) {
  if (f.number != nullptr) return std::bit_cast<std::uint32_t>(a.*f.number) == std::bit_cast<std::uint32_t>(b.*f.number);
  return a.*f.flag == b.*f.flag;
}

std::string field_value(const HyperField& f, const Hyper& h) {
  if (f.number != nullptr) return fmt::format("{}", h.*f.number);
  return h.*f.flag ? "true" : "false";
}

}  // namespace

OptimizerOptions resolve_options(OptimizerOptions options) {
  const Algorithm algo = options.algorithm;
  Hyper hyper = options.hyper.value_or(default_hyper(algo));
  if (algorithm_spec(algo).always_decoupled) hyper.decoupled_weight_decay = true;
  validate_hyper(algo, hyper);
  options.hyper = hyper;
  check_block_size(options.block_size);
  check_precision(options.precision, "the optimizer");
  if (options.min_quant_size < 0)
    throw InvalidArgument(fmt::format("min_quant_size must be >= 0, got {}", options.min_quant_size));
  if (!std::isfinite(options.max_grad_norm) || options.max_grad_norm < 0.0f)
    throw InvalidArgument(fmt::format("max_grad_norm must be finite and >= 0, got {}", options.max_grad_norm));
  if (options.device != Device::kCpu && options.device != Device::kCuda)
    throw InvalidArgument(fmt::format("device {} is not cpu or cuda", static_cast<int>(options.device)));
  return options;
}

std::int64_t planned_state_bytes(std::span<const ParamGroup> groups, const OptimizerOptions& options_in) {
  const OptimizerOptions options = resolve_options(options_in);
  const AlgorithmSpec& spec = algorithm_spec(options.algorithm);
  std::int64_t bytes = 0;
  for (const ParamGroup& group : groups) {
    if (group.precision) check_precision(*group.precision, "a parameter group");
    for (const Param& param : group.params) {
      TensorState t;
      t.param = param;
      t.numel = shape_numel(param.shape);
      plan_tensor_state(t, spec, *options.hyper, group.precision, options, global_shape_of(param, t.numel));
      if (__builtin_add_overflow(bytes, tensor_state_bytes(t), &bytes))
        throw InvalidArgument("planned_state_bytes: the parameters' state is larger than 64-bit sizes hold");
    }
  }
  return bytes;
}

std::int64_t planned_scratch_bytes(std::span<const ParamGroup> groups, const OptimizerOptions& options_in) {
  const OptimizerOptions options = resolve_options(options_in);
  const AlgorithmSpec& spec = algorithm_spec(options.algorithm);
  std::vector<TensorState> tensors;
  for (const ParamGroup& group : groups)
    for (const Param& param : group.params) {
      TensorState& t = tensors.emplace_back();
      t.param = param;
      t.numel = shape_numel(param.shape);
      plan_tensor_state(t, spec, *options.hyper, group.precision, options, global_shape_of(param, t.numel));
    }
  return muon_scratch_bytes(tensors, options.device);
}

Optimizer::Optimizer(std::vector<ParamGroup> groups, OptimizerOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  options = resolve_options(std::move(options));
  const Algorithm algo = options.algorithm;
  const Hyper hyper = *options.hyper;
  const AlgorithmSpec& spec = algorithm_spec(algo);
  im.hyper = hyper;
  if (groups.empty()) throw InvalidArgument("optimizer: no parameter groups were given");
  const bool on_cuda = options.device == Device::kCuda;
  im.backend = on_cuda ? make_cuda_backend() : make_cpu_backend();
  im.options = options;
  im.threads = std::max(1, omp_get_max_threads());

  std::map<std::string, std::size_t> names;
  std::map<const void*, std::string> datas;
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    ParamGroup& group = groups[gi];
    const std::string gname = std::to_string(gi);
    if (group.lr) check_rate("lr", gname, *group.lr);
    if (group.weight_decay) check_rate("weight_decay", gname, *group.weight_decay);
    if (group.precision) check_precision(*group.precision, "parameter group " + gname);
    for (Param& param : group.params) {
      TensorState t;
      const std::size_t index = im.tensors.size();
      if (param.name.empty()) param.name = fmt::format("param.{}", index);
      check_name(param.name);
      if (!names.emplace(param.name, index).second)
        throw InvalidArgument(fmt::format("parameter name '{}' appears twice", param.name));
      try {
        t.numel = shape_numel(param.shape);
      } catch (const InvalidArgument& e) {
        throw InvalidArgument(fmt::format("parameter '{}': {}", param.name, e.what()));
      }
      if (t.numel > 0 && param.data == nullptr)
        throw InvalidArgument(fmt::format("parameter '{}' has no data", param.name));
      if (t.numel > 0) {
        auto [it, fresh] = datas.emplace(param.data, param.name);
        if (!fresh)
          throw InvalidArgument(fmt::format("parameter '{}' is listed twice (same data as '{}')", param.name, it->second));
      }
      check_dtypes(param, on_cuda);
      const std::vector<std::int64_t> global = global_shape_of(param, t.numel);
      const std::size_t global_rank = global.size();
      t.param = param;
      t.group = static_cast<int>(gi);
      t.offset = im.total_numel;
      im.total_numel += t.numel;
      plan_tensor_state(t, spec, hyper, group.precision, options, global);
      t.group_lr = group.lr;
      t.group_weight_decay = group.weight_decay;
      t.decays = !name_contains_any(param.name, options.no_decay_names) && !(options.no_decay_vectors && global_rank < 2);
      assign_rates(t, spec, hyper);
      check_split(t, spec, global_rank, options.rank1_second_moment);
      if (spec.reduction == Reduction::kProjection && global_rank >= 2) {
        // The dot products: per row, or per fixed segment of the tensor.
        const std::int64_t rows0 = param.shape[0];
        const std::int64_t segments = (t.numel + kChunkElements - 1) / kChunkElements;
        t.scratch.assign(static_cast<std::size_t>(math::AdamPScratch{rows0}.doubles(std::max(rows0, segments))), 0.0);
      }
      if (t.factored)
        t.scratch.assign(static_cast<std::size_t>(math::AdafactorScratch{t.rows, t.cols, t.rows / t.batch_rows}.doubles()),
                         0.0);
      im.tensors.push_back(std::move(t));
    }
  }
  if (im.tensors.empty()) throw InvalidArgument("optimizer: the parameter list is empty");
  check_no_overlap(im.tensors);
  im.scratch_bytes = muon_scratch_bytes(im.tensors, options.device);
  if (!on_cuda && im.scratch_bytes > 0) im.ns_scratch = Buffer(static_cast<std::size_t>(im.scratch_bytes));

  // Lay out all state in one arena: first measure, then carve.
  for (int pass = 0; pass < 2; ++pass) {
    std::int64_t cursor = 0;
    std::int64_t counted = 0;
    std::byte* base = nullptr;
    if (pass == 1) base = im.backend->allocate_arena(im, im.arena_bytes);
    auto take = [&](std::int64_t bytes, bool state) -> std::byte* {
      std::byte* p = base ? base + cursor : nullptr;
      // Each tensor is below kMaxTensorElements, but their sum is checked too: a wrapped size would
      // carve state past the end of a small arena.
      if (__builtin_add_overflow(cursor, align64(bytes), &cursor))
        throw InvalidArgument("optimizer: the parameters' state is larger than 64-bit sizes hold");
      if (state) counted += bytes;
      return p;
    };
    for (TensorState& t : im.tensors) {
      for_each_region(t, [&](const Region& r, auto*& pointer) {
        pointer = reinterpret_cast<std::remove_reference_t<decltype(pointer)>>(take(r.bytes(), r.is_state()));
      });
      for (int j = 0; j < t.slot_count; ++j)
        if (t.slots[j].rank1) im.max_cols = std::max(im.max_cols, t.cols);
    }
    if (pass == 0) {
      im.arena_bytes = cursor;
    }
    im.state_bytes = counted;
  }

  for (std::size_t i = 0; i < im.tensors.size(); ++i)
    for (std::int64_t b = 0; b < im.tensors[i].numel; b += kChunkElements)
      im.chunks.push_back({static_cast<int>(i), b, std::min(b + kChunkElements, im.tensors[i].numel)});
  im.chunk_partials.assign(im.chunks.size(), 0.0);
  im.constants.assign(im.tensors.size(), StepConstants{});
  if (im.max_cols > 0) im.thread_scratch.assign(static_cast<std::size_t>(im.threads * im.max_cols), 0.0f);
  im.backend->create(im);
}

Optimizer::~Optimizer() = default;
Optimizer::Optimizer(Optimizer&&) noexcept = default;
Optimizer& Optimizer::operator=(Optimizer&&) noexcept = default;

StepResult Optimizer::step(const StepOptions& options) {
  Impl& im = *impl_;
  if (!std::isfinite(options.grad_scale) || options.grad_scale <= 0.0f || !std::isfinite(1.0f / options.grad_scale))
    throw InvalidArgument(fmt::format("grad_scale must be finite and > 0 with a finite inverse, got {}",
                                      options.grad_scale));
  // inf or NaN is a verdict (a rank found inf: the step is skipped); a negative sum is no sum.
  if (options.grad_square_sum && *options.grad_square_sum < 0.0)
    throw InvalidArgument(fmt::format("grad_square_sum must be >= 0 (or inf/NaN to skip), got {}",
                                      *options.grad_square_sum));
  if (!std::isfinite(options.lr_scale) || options.lr_scale < 0.0f)
    throw InvalidArgument(fmt::format("lr_scale must be finite and >= 0, got {}", options.lr_scale));
  require_train_mode(im);
  return im.backend->step(im, options);
}

void Optimizer::train() {
  Impl& im = *impl_;
  if (im.train_mode || im.options.algorithm != Algorithm::kAdamWScheduleFree) return;
  im.backend->interpolate_params(im, static_cast<float>(1.0 - static_cast<double>(im.hyper.beta1)));
  im.train_mode = true;
}

void Optimizer::eval() {
  Impl& im = *impl_;
  if (!im.train_mode || im.options.algorithm != Algorithm::kAdamWScheduleFree) return;
  im.backend->interpolate_params(im, static_cast<float>(1.0 - 1.0 / static_cast<double>(im.hyper.beta1)));
  im.train_mode = false;
}

bool Optimizer::training() const { return impl_->train_mode; }

void Optimizer::set_hyper(const Hyper& requested) {
  Impl& im = *impl_;
  const AlgorithmSpec& spec = algorithm_spec(im.options.algorithm);
  Hyper hyper = requested;
  if (spec.always_decoupled) hyper.decoupled_weight_decay = true;
  validate_hyper(im.options.algorithm, hyper);
  for (const HyperField& f : hyper_fields()) {
    if (same_field(f, im.hyper, hyper)) continue;
    // A field whose change alone changes a tensor's state slots is fixed at construction: the state
    // is laid out once (amsgrad's v_max, Adafactor's first moment).
    Hyper alone = im.hyper;
    if (f.number != nullptr) alone.*f.number = hyper.*f.number;
    else alone.*f.flag = hyper.*f.flag;
    for (const TensorState& t : im.tensors)
      if (!same_slots(spec, t, im.hyper, alone))
        throw InvalidArgument(fmt::format("{}: {} cannot change after the optimizer is made ({} to {}): it decides "
                                          "which state is kept; make a new optimizer",
                                          spec.name, f.name, field_value(f, im.hyper), field_value(f, hyper)));
  }
  // Eval mode's parameters are x, reached from y with beta1: train() returns to y with the same one.
  if (!im.train_mode && hyper.beta1 != im.hyper.beta1)
    throw InvalidArgument(fmt::format("{}: beta1 cannot change in eval mode ({} to {}): the parameters hold the "
                                      "average x, which train() turns back into y with the beta1 eval() used; "
                                      "change it in train mode",
                                      spec.name, im.hyper.beta1, hyper.beta1));
  im.hyper = hyper;
  im.options.hyper = hyper;
  for (TensorState& t : im.tensors) assign_rates(t, spec, hyper);
  im.backend->hyper_changed(im);
}

double Optimizer::grad_square_sum(std::span<const std::uint8_t> counted) const {
  Impl& im = *impl_;
  if (!counted.empty() && counted.size() != im.tensors.size())
    throw InvalidArgument(fmt::format("grad_square_sum needs {} flags (one per parameter), got {}", im.tensors.size(),
                                      counted.size()));
  return im.backend->grad_square_sum(im, counted);
}

void Optimizer::enqueue_grad_square_sum(std::span<const std::uint8_t> counted, double* out) {
  Impl& im = *impl_;
  if (!counted.empty() && counted.size() != im.tensors.size())
    throw InvalidArgument(fmt::format("enqueue_grad_square_sum needs {} flags (one per parameter), got {}",
                                      im.tensors.size(), counted.size()));
  if (out == nullptr) throw InvalidArgument("enqueue_grad_square_sum: the output address is null");
  im.backend->enqueue_grad_square_sum(im, counted, out);
}

void Optimizer::enqueue_step() {
  require_train_mode(*impl_);
  impl_->backend->enqueue_step(*impl_);
}

void Optimizer::enqueue_step_with_square_sum(const double* square_sum) {
  require_train_mode(*impl_);
  if (square_sum == nullptr) throw InvalidArgument("enqueue_step_with_square_sum: the square sum's address is null");
  impl_->backend->enqueue_step_with_square_sum(*impl_, square_sum);
}

DeviceScalars Optimizer::device_scalars() const { return impl_->backend->scalars(*impl_); }

void Optimizer::synchronize() const { impl_->backend->synchronize(*impl_); }

Device Optimizer::device() const { return impl_->options.device; }

void Optimizer::update_hessian(std::span<const float* const> estimates) {
  Impl& im = *impl_;
  if (im.options.algorithm != Algorithm::kSophiaG)
    throw InvalidArgument(fmt::format("update_hessian is for sophiag, not {}", algorithm_name(im.options.algorithm)));
  if (estimates.size() != im.tensors.size())
    throw InvalidArgument(fmt::format("update_hessian needs {} estimates (one per parameter), got {}",
                                      im.tensors.size(), estimates.size()));
  im.backend->update_hessian(im, estimates);
}

void Optimizer::set_grad(std::size_t param_index, void* grad) {
  if (param_index >= impl_->tensors.size())
    throw InvalidArgument(fmt::format("parameter index {} is out of range (have {})", param_index, impl_->tensors.size()));
  impl_->tensors[param_index].param.grad = grad;
  impl_->backend->grad_changed(*impl_, param_index);
}

void Optimizer::set_grads(std::span<void* const> grads) {
  Impl& im = *impl_;
  if (grads.size() != im.tensors.size())
    throw InvalidArgument(fmt::format("set_grads needs {} gradients (one per parameter), got {}", im.tensors.size(),
                                      grads.size()));
  bool changed = false;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    changed = changed || im.tensors[i].param.grad != grads[i];
    im.tensors[i].param.grad = grads[i];
  }
  if (changed) im.backend->grads_changed(im);
}

void Optimizer::set_cuda_stream(void* stream) {
  impl_->backend->set_stream(*impl_, stream);
}

const OptimizerOptions& Optimizer::options() const { return impl_->options; }
const Hyper& Optimizer::hyper() const { return impl_->hyper; }
std::int64_t Optimizer::step_count() const {
  impl_->backend->refresh_counters(*impl_);
  return impl_->steps;
}
std::int64_t Optimizer::skipped_steps() const {
  impl_->backend->refresh_counters(*impl_);
  return impl_->skipped;
}
std::size_t Optimizer::param_count() const { return impl_->tensors.size(); }

const Param& Optimizer::param(std::size_t index) const {
  if (index >= impl_->tensors.size())
    throw InvalidArgument(fmt::format("parameter index {} is out of range (have {})", index, impl_->tensors.size()));
  return impl_->tensors[index].param;
}

Precision Optimizer::state_precision(std::size_t param_index) const {
  param(param_index);
  return impl_->tensors[param_index].precision;
}

StateStats Optimizer::state_stats() const { return {impl_->total_numel, impl_->state_bytes, impl_->scratch_bytes}; }

std::vector<std::string> Optimizer::state_names(std::size_t param_index) const {
  param(param_index);
  TensorState& t = impl_->tensors[param_index];
  std::vector<std::string> out;
  for (int j = 0; j < t.slot_count; ++j) out.push_back(t.slots[j].name);
  for_each_region(t, [&](const Region& r, auto*) {
    if (r.slot < 0) out.emplace_back(r.name);
  });
  return out;
}

std::vector<float> Optimizer::state_values(std::size_t param_index, std::string_view name) const {
  param(param_index);
  HostState host = host_state(*impl_);
  TensorState& t = (*host.tensors)[param_index];
  for (int j = 0; j < t.slot_count; ++j)
    if (t.slots[j].name == name) {
      std::vector<float> out(static_cast<std::size_t>(t.numel));
      cpu::read_slot(t, t.slots[j], out.data());
      return out;
    }
  if (const PlainState plain = plain_state(t, name); plain.data != nullptr)
    return {plain.data, plain.data + plain.count};
  throw InvalidArgument(fmt::format("parameter '{}' has no state named '{}'", t.param.name, name));
}

std::vector<float> Optimizer::portable_state_values(std::size_t param_index, std::string_view name) const {
  param(param_index);
  HostState host = host_state(*impl_);
  const TensorState& t = (*host.tensors)[param_index];
  for (int j = 0; j < t.slot_count; ++j)
    if (t.slots[j].name == name) {
      std::vector<float> out(static_cast<std::size_t>(t.numel));
      cpu::read_slot_portable(t, t.slots[j], out.data());
      return out;
    }
  return state_values(param_index, name);
}

void Optimizer::set_state_values(std::size_t param_index, std::string_view name, std::span<const float> values) {
  param(param_index);
  Impl& im = *impl_;
  HostState host = host_state(im);
  TensorState& t = (*host.tensors)[param_index];
  Slot* slot = nullptr;
  float* plain = nullptr;  // fp32 state outside the slots: master weights, Adafactor's factors
  std::int64_t count = t.numel;
  bool non_negative = false;
  for (int j = 0; j < t.slot_count; ++j)
    if (t.slots[j].name == name) {
      slot = &t.slots[j];
      non_negative = slot_non_negative(algorithm_spec(im.options.algorithm), *slot);
    }
  if (slot == nullptr) {
    const PlainState state = plain_state(t, name);
    if (state.data == nullptr)
      throw InvalidArgument(fmt::format("parameter '{}' has no state named '{}'", t.param.name, name));
    plain = state.data, count = state.count, non_negative = state.non_negative;
  }
  if (static_cast<std::int64_t>(values.size()) != count)
    throw InvalidArgument(fmt::format("parameter '{}': state '{}' takes {} values, got {}", t.param.name, name, count,
                                      values.size()));
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i]))
      throw InvalidArgument(fmt::format("parameter '{}': state '{}' holds {} at element {}", t.param.name, name,
                                        values[i], i));
    if (non_negative && values[i] < 0.0f)
      throw InvalidArgument(fmt::format("parameter '{}': state '{}' holds {} at element {}; it must be >= 0",
                                        t.param.name, name, values[i], i));
    // bf16 state rounds the largest floats up to inf, which no later step or load accepts.
    if (slot != nullptr && slot->storage == math::StateStorage::kBf16 &&
        (math::bf16_round_nearest(values[i]) & 0x7f80u) == 0x7f80u)
      throw InvalidArgument(fmt::format("parameter '{}': state '{}' holds {} at element {}, beyond the range of its "
                                        "bf16 storage", t.param.name, name, values[i], i));
  }
  if (slot != nullptr) cpu::write_slot(t, *slot, values.data());
  else std::copy(values.begin(), values.end(), plain);
  commit_host_state(im, host);
}

void Optimizer::set_step_counts(std::span<const std::int64_t> tensor_steps, std::int64_t steps, std::int64_t skipped) {
  Impl& im = *impl_;
  if (tensor_steps.size() != im.tensors.size())
    throw InvalidArgument(fmt::format("{} step counts for {} parameters", tensor_steps.size(), im.tensors.size()));
  if (steps < 0 || skipped < 0)
    throw InvalidArgument(fmt::format("step counts must be >= 0, got steps {} and skipped {}", steps, skipped));
  for (std::size_t i = 0; i < tensor_steps.size(); ++i)
    if (tensor_steps[i] < 0 || tensor_steps[i] > steps)
      throw InvalidArgument(fmt::format("step count {} of parameter {} is not in [0, {}]", tensor_steps[i], i, steps));
  HostState host = host_state(im);
  for (std::size_t i = 0; i < tensor_steps.size(); ++i) (*host.tensors)[i].step = tensor_steps[i];
  im.steps = steps;
  im.skipped = skipped;
  commit_host_state(im, host);
}

void Optimizer::set_running_sums(std::span<const double> lr_max, std::span<const double> weight_sum) {
  Impl& im = *impl_;
  if (im.options.algorithm != Algorithm::kAdamWScheduleFree)
    throw InvalidArgument(fmt::format("lr_max and weight_sum are schedule-free AdamW's; this optimizer runs {}",
                                      algorithm_name(im.options.algorithm)));
  if (lr_max.size() != im.tensors.size() || weight_sum.size() != im.tensors.size())
    throw InvalidArgument(fmt::format("{} lr_max and {} weight_sum values for {} parameters", lr_max.size(),
                                      weight_sum.size(), im.tensors.size()));
  for (std::size_t i = 0; i < lr_max.size(); ++i)
    for (const auto& [name, v] : {std::pair{"lr_max", lr_max[i]}, std::pair{"weight_sum", weight_sum[i]}})
      if (!(std::isfinite(v) && v >= 0.0))
        throw InvalidArgument(fmt::format("{} of parameter {} is {}; it must be finite and >= 0", name, i, v));
  HostState host = host_state(im);
  for (std::size_t i = 0; i < lr_max.size(); ++i) (*host.tensors)[i].running = {lr_max[i], weight_sum[i]};
  commit_host_state(im, host);
}

}  // namespace nibble
