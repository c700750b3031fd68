// Optimizer state as a safetensors file: codes, scales and fp32/bf16 state per tensor, the codebooks
// they were written with, per-tensor step counts, and a JSON layout in the metadata. Loading checks
// the whole file against the live optimizer before it copies a single byte.
#include <charconv>
#include <cmath>
#include <cstring>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "math/common.hpp"
#include "nibble/error.hpp"
#include "nibble/safetensors.hpp"
#include "optim/impl.hpp"

namespace nibble {
namespace {

constexpr const char* kFormat = "nibble.optimizer_state";
constexpr int kSchemaVersion = 1;

const char* codebook_name(math::CodebookId id) {
  switch (id) {
    case math::CodebookId::kDynamicSigned8: return "dynamic_signed_8";
    case math::CodebookId::kDynamicUnsigned8: return "dynamic_unsigned_8";
    case math::CodebookId::kDynamicSigned4: return "dynamic_signed_4";
    case math::CodebookId::kLinearUnsigned4: return "linear_unsigned_4";
  }
  return "unknown";
}

// What one stored tensor must look like, and where its bytes live in the optimizer.
struct Entry {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  void* data;
  bool check_finite;  // float state must be finite; codes are any byte
  bool non_negative = false;  // second moments and scales: a negative value would make a step NaN
};

std::vector<Entry> entries(const Optimizer::Impl& im, std::vector<TensorState>& tensors, std::vector<std::int64_t>& steps) {
  std::vector<Entry> out;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    TensorState& t = tensors[i];
    const std::string prefix = fmt::format("state.{}.", i);
    for (int j = 0; j < t.slot_count; ++j) {
      Slot& s = t.slots[j];
      const std::string base = prefix + s.name;
      // Unsigned slots hold squares (exp_avg_sq, max_exp_avg_sq), except SophiaG's Hessian EMA,
      // whose estimates may be negative (Hutchinson).
      const bool square = !s.is_signed && im.options.algorithm != Algorithm::kSophiaG;
      switch (s.precision) {
        case Precision::kFp32: out.push_back({base, DType::F32, t.param.shape, s.f32, true, square}); break;
        case Precision::kBf16: out.push_back({base, DType::BF16, t.param.shape, s.bf16, true, square}); break;
        case Precision::kInt8:
          out.push_back({base + ".codes", DType::U8, {t.numel}, s.codes, false});
          out.push_back({base + ".absmax", DType::F32, {s.blocks}, s.absmax, true, true});
          break;
        case Precision::kInt4:
          out.push_back({base + ".codes", DType::U8, {(t.numel + 1) / 2}, s.codes, false});
          if (s.rank1) {
            out.push_back({base + ".row_max", DType::F32, {t.rows}, s.row_max, true, true});
            out.push_back({base + ".col_max", DType::F32, {t.cols}, s.col_max, true, true});
          } else {
            out.push_back({base + ".absmax", DType::F32, {s.blocks}, s.absmax, true, true});
          }
          break;
      }
    }
    if (t.master) out.push_back({prefix + "master", DType::F32, t.param.shape, t.master, true});
    if (t.factored) {
      out.push_back({prefix + "exp_avg_sq_row", DType::F32, {t.rows}, t.af_row, true, true});
      out.push_back(
          {prefix + "exp_avg_sq_col", DType::F32, {(t.rows / t.batch_rows) * t.cols}, t.af_col, true, true});
    }
  }
  steps.resize(tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) steps[i] = tensors[i].step;
  out.push_back({"steps", DType::I64, {static_cast<std::int64_t>(steps.size())}, steps.data(), false});
  return out;
}

nlohmann::json layout(const Optimizer::Impl& im) {
  nlohmann::json params = nlohmann::json::array();
  for (const TensorState& t : im.tensors) {
    nlohmann::json slots = nlohmann::json::array();
    for (int j = 0; j < t.slot_count; ++j) {
      const Slot& s = t.slots[j];
      nlohmann::json slot = {{"name", s.name}, {"rank1", s.rank1}};
      if (s.precision == Precision::kInt8 || s.precision == Precision::kInt4) slot["codebook"] = codebook_name(s.codebook);
      slots.push_back(slot);
    }
    nlohmann::json entry = {{"name", t.param.name},
                            {"shape", t.param.shape},
                            {"precision", precision_name(t.precision)},
                            {"block", t.block},
                            {"factored", t.factored},
                            {"slots", slots}};
    // Only optimizers that keep fp32 copies of 16-bit parameters say so, so that the state of an
    // fp32-parameter optimizer loads on either backend.
    if (t.master) entry["master"] = true;
    params.push_back(entry);
  }
  return params;
}

nlohmann::json hyper_json(const Hyper& h) {
  return {{"lr", h.lr},
          {"weight_decay", h.weight_decay},
          {"beta1", h.beta1},
          {"beta2", h.beta2},
          {"eps", h.eps},
          {"momentum", h.momentum},
          {"dampening", h.dampening},
          {"nesterov", h.nesterov},
          {"amsgrad", h.amsgrad},
          {"maximize", h.maximize},
          {"bias_correction", h.bias_correction},
          {"decoupled_weight_decay", h.decoupled_weight_decay},
          {"nu", h.nu},
          {"eps2", h.eps2},
          {"clip_threshold", h.clip_threshold},
          {"decay_rate", h.decay_rate},
          {"first_moment", h.first_moment},
          {"relative_step", h.relative_step},
          {"scale_parameter", h.scale_parameter},
          {"warmup_init", h.warmup_init},
          {"delta", h.delta},
          {"wd_ratio", h.wd_ratio},
          {"rho", h.rho},
          {"batch_tokens", h.batch_tokens}};
}

std::vector<math::CodebookId> codebooks_used(const Optimizer::Impl& im) {
  bool used[math::kCodebookCount] = {};
  for (const TensorState& t : im.tensors)
    for (int j = 0; j < t.slot_count; ++j)
      if (t.slots[j].precision == Precision::kInt8 || t.slots[j].precision == Precision::kInt4)
        used[static_cast<int>(t.slots[j].codebook)] = true;
  std::vector<math::CodebookId> out;
  for (int i = 0; i < math::kCodebookCount; ++i)
    if (used[i]) out.push_back(static_cast<math::CodebookId>(i));
  return out;
}

bool all_finite(const Entry& e, const Tensor& t) {
  if (!e.check_finite) return true;
  const std::int64_t n = t.numel();
  if (t.dtype() == DType::F32) {
    const float* v = t.data_as<float>();
    for (std::int64_t i = 0; i < n; ++i)
      if (!std::isfinite(v[i])) return false;
  } else if (t.dtype() == DType::BF16) {
    const std::uint16_t* v = t.data_as<std::uint16_t>();
    for (std::int64_t i = 0; i < n; ++i)
      if ((v[i] & 0x7f80u) == 0x7f80u) return false;
  }
  return true;
}

// Index of the first negative element (-0 is not negative) of a non-negative tensor, or -1.
std::int64_t first_negative(const Entry& e, const Tensor& t) {
  if (!e.non_negative) return -1;
  const std::int64_t n = t.numel();
  if (t.dtype() == DType::F32) {
    const float* v = t.data_as<float>();
    for (std::int64_t i = 0; i < n; ++i)
      if (v[i] < 0.0f) return i;
  } else if (t.dtype() == DType::BF16) {
    const std::uint16_t* v = t.data_as<std::uint16_t>();
    for (std::int64_t i = 0; i < n; ++i)
      if ((v[i] & 0x8000u) && (v[i] & 0x7fffu)) return i;
  }
  return -1;
}

}  // namespace

void Optimizer::save(const std::filesystem::path& path) const {
  Impl& im = *impl_;
  HostState host = host_state(im);
  std::vector<std::int64_t> steps;
  std::vector<Entry> list = entries(im, *host.tensors, steps);
  std::vector<TensorView> views;
  views.reserve(list.size() + math::kCodebookCount);
  for (const Entry& e : list) views.push_back({e.name, e.dtype, e.shape, e.data});
  for (math::CodebookId id : codebooks_used(im)) {
    const math::Codebook& cb = codebook(id);
    views.push_back({fmt::format("codebook.{}", codebook_name(id)), DType::F32, {cb.size}, cb.values});
  }
  const std::map<std::string, std::string> metadata = {
      {"format", kFormat},
      {"schema_version", std::to_string(kSchemaVersion)},
      {"algorithm", std::string(algorithm_name(im.options.algorithm))},
      {"step", std::to_string(im.steps)},
      {"skipped", std::to_string(im.skipped)},
      {"hyper", hyper_json(im.hyper).dump()},
      {"layout", layout(im).dump()},
  };
  save_safetensors(path, views, metadata);
}

void Optimizer::load(const std::filesystem::path& path) {
  Impl& im = *impl_;
  const SafetensorsFile file = load_safetensors(path);
  const std::string where = path.string();
  auto meta = [&](const std::string& key) -> const std::string& {
    auto it = file.metadata.find(key);
    if (it == file.metadata.end())
      throw FormatError(fmt::format("{}: not a nibble optimizer state (metadata '{}' missing)", where, key));
    return it->second;
  };
  if (meta("format") != kFormat)
    throw FormatError(fmt::format("{}: format is '{}', expected '{}'", where, meta("format"), kFormat));
  if (meta("schema_version") != std::to_string(kSchemaVersion))
    throw FormatError(fmt::format("{}: schema version '{}' is not supported (this build reads {})", where,
                                  meta("schema_version"), kSchemaVersion));
  if (meta("algorithm") != algorithm_name(im.options.algorithm))
    throw StateMismatch(fmt::format("{}: state of algorithm '{}' cannot load into a {} optimizer", where,
                                    meta("algorithm"), algorithm_name(im.options.algorithm)));
  nlohmann::json saved;
  try {
    saved = nlohmann::json::parse(meta("layout"));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("{}: layout metadata is not valid JSON: {}", where, e.what()));
  }
  const nlohmann::json live = layout(im);
  if (!saved.is_array() || saved.size() != live.size())
    throw StateMismatch(fmt::format("{}: state holds {} parameters, this optimizer has {}", where,
                                    saved.is_array() ? saved.size() : 0, live.size()));
  for (std::size_t i = 0; i < live.size(); ++i)
    if (saved[i] != live[i])
      throw StateMismatch(fmt::format("{}: parameter {} differs: saved {} but this optimizer has {}", where, i,
                                      saved[i].dump(), live[i].dump()));
  // The whole value must be a decimal count (std::stoll would read "12x" or " 12.5" as 12).
  auto count = [&](const std::string& key) {
    const std::string& text = meta(key);
    std::int64_t value = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc() || end != text.data() + text.size())
      throw FormatError(fmt::format("{}: {} count '{}' is not a whole number", where, key, text));
    if (value < 0) throw FormatError(fmt::format("{}: negative {} count {}", where, key, value));
    return value;
  };
  const std::int64_t step = count("step");
  const std::int64_t skipped = count("skipped");
  for (math::CodebookId id : codebooks_used(im)) {
    const math::Codebook& cb = codebook(id);
    const std::string name = fmt::format("codebook.{}", codebook_name(id));
    const Tensor& stored = file.at(name);
    if (stored.dtype() != DType::F32 || stored.numel() != cb.size ||
        std::memcmp(stored.data(), cb.values, sizeof(float) * cb.size) != 0)
      throw StateMismatch(fmt::format("{}: {} differs from this build's codebook", where, name));
  }
  HostState host = host_state(im);
  std::vector<std::int64_t> steps;
  const std::vector<Entry> list = entries(im, *host.tensors, steps);
  std::size_t expected = list.size() + codebooks_used(im).size();
  if (file.tensors.size() != expected)
    throw StateMismatch(fmt::format("{}: holds {} tensors, this optimizer's state has {}", where,
                                    file.tensors.size(), expected));
  for (const Entry& e : list) {
    const Tensor& t = file.at(e.name);
    if (t.dtype() != e.dtype || t.shape() != e.shape)
      throw StateMismatch(fmt::format("{}: tensor '{}' is {} {}, expected {} {}", where, e.name, dtype_name(t.dtype()),
                                      shape_string(t.shape()), dtype_name(e.dtype), shape_string(e.shape)));
    if (!all_finite(e, t)) throw FormatError(fmt::format("{}: tensor '{}' holds inf or NaN", where, e.name));
    if (const std::int64_t k = first_negative(e, t); k >= 0)
      throw FormatError(fmt::format("{}: tensor '{}' holds a negative value at element {}; it must be >= 0", where,
                                    e.name, k));
  }
  const std::int64_t* saved_steps = file.at("steps").data_as<std::int64_t>();
  for (std::size_t i = 0; i < im.tensors.size(); ++i)
    if (saved_steps[i] < 0 || saved_steps[i] > step)
      throw FormatError(fmt::format("{}: step count {} of parameter {} is out of range", where, saved_steps[i], i));
  // Every check passed: now copy.
  for (const Entry& e : list) {
    const Tensor& t = file.at(e.name);
    if (e.data != steps.data()) std::memcpy(e.data, t.data(), t.nbytes());
  }
  for (std::size_t i = 0; i < im.tensors.size(); ++i) (*host.tensors)[i].step = saved_steps[i];
  im.steps = step;
  im.skipped = skipped;
  commit_host_state(im, host);
}

}  // namespace nibble
