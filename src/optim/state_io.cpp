// Optimizer state as a safetensors file: codes, scales and fp32/bf16 state per tensor, the codebooks
// they were written with, per-tensor step counts, and a JSON layout in the metadata. Loading checks
// the whole file against the live optimizer before it copies a single byte.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "math/common.hpp"
#include "nibble/error.hpp"
#include "nibble/safetensors.hpp"
#include "optim/impl.hpp"
#include "optim/state_layout.hpp"

namespace nibble {
namespace {

constexpr const char* kFormat = "nibble.optimizer_state";
constexpr int kSchemaVersion = 1;


// What one stored tensor must look like, and where its bytes live in the optimizer.
struct Entry {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  void* data;
  bool check_finite;  // float state must be finite; codes are any byte
  bool non_negative = false;  // second moments and scales: a negative value would make a step NaN
  const math::Codebook* nan_codes = nullptr;  // one code per byte of a codebook that has NaN codes (fp8)
};

std::vector<Entry> entries(const Optimizer::Impl& im, std::vector<TensorState>& tensors, std::vector<std::int64_t>& steps) {
  const AlgorithmSpec& algorithm = algorithm_spec(im.options.algorithm);
  std::vector<Entry> out;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    TensorState& t = tensors[i];
    const std::string prefix = fmt::format("state.{}.", i);
    for_each_region(t, [&](const Region& r, auto* data) {
      if (!r.is_state()) return;
      Entry e{prefix, r.dtype, {r.count}, data, r.dtype != DType::U8};
      if (r.slot >= 0) e.name += t.slots[r.slot].name;
      if (r.slot >= 0 && !r.name.empty()) e.name += '.';
      e.name += r.name;
      switch (r.role) {
        case RegionRole::kValues:
          e.shape = t.param.shape;
          e.non_negative = slot_non_negative(algorithm, t.slots[r.slot]);
          break;
        case RegionRole::kMaster: e.shape = t.param.shape; break;
        case RegionRole::kScale:
        case RegionRole::kFactor: e.non_negative = true; break;
        case RegionRole::kCodes:
          if (t.slots[r.slot].storage == math::StateStorage::kCodes8) {
            const math::Codebook& cb = codebook(t.slots[r.slot].codebook);
            if (std::any_of(cb.values, cb.values + cb.size, [](float v) { return std::isnan(v); })) e.nan_codes = &cb;
          }
          break;
        case RegionRole::kStagedScale: break;
      }
      out.push_back(std::move(e));
    });
    // Schedule-free AdamW's lr_max and weight_sum; other algorithms keep none, and their files
    // hold no such entries.
    if (im.options.algorithm == Algorithm::kAdamWScheduleFree) {
      out.push_back({prefix + "lr_max", DType::F64, {1}, &t.running[0], true, true});
      out.push_back({prefix + "weight_sum", DType::F64, {1}, &t.running[1], true, true});
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
      if (is_quantized(s.precision)) slot["codebook"] = codebook_name(s.codebook);
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

nlohmann::json hyper_json(const AlgorithmSpec& algorithm, const Hyper& h) {
  nlohmann::json out = nlohmann::json::object();
  for (const HyperField& f : hyper_fields()) {
    if (!f.in_every_file && !reads_hyper(algorithm, f.name)) continue;
    if (f.number != nullptr) out[std::string(f.name)] = h.*f.number;
    else out[std::string(f.name)] = h.*f.flag;
  }
  return out;
}

std::vector<math::CodebookId> codebooks_used(const Optimizer::Impl& im) {
  bool used[math::kCodebookCount] = {};
  for (const TensorState& t : im.tensors)
    for (int j = 0; j < t.slot_count; ++j)
      if (is_quantized(t.slots[j].precision))
        used[static_cast<int>(t.slots[j].codebook)] = true;
  std::vector<math::CodebookId> out;
  for (int i = 0; i < math::kCodebookCount; ++i)
    if (used[i]) out.push_back(static_cast<math::CodebookId>(i));
  return out;
}

// A stored tensor's values: a file's tensor, or the live state an Entry points at.
struct Values {
  DType dtype;
  const void* data;
  std::int64_t n;
  template <class T>
  const T* as() const { return static_cast<const T*>(data); }
};

Values values_of(const Tensor& t) { return {t.dtype(), t.data(), t.numel()}; }

bool all_finite(const Entry& e, const Values& t) {
  if (!e.check_finite) return true;
  const std::int64_t n = t.n;
  if (t.dtype == DType::F64) {
    const double* v = t.as<double>();
    for (std::int64_t i = 0; i < n; ++i)
      if (!std::isfinite(v[i])) return false;
  } else if (t.dtype == DType::F32) {
    const float* v = t.as<float>();
    for (std::int64_t i = 0; i < n; ++i)
      if (!std::isfinite(v[i])) return false;
  } else if (t.dtype == DType::BF16) {
    const std::uint16_t* v = t.as<std::uint16_t>();
    for (std::int64_t i = 0; i < n; ++i)
      if ((v[i] & 0x7f80u) == 0x7f80u) return false;
  }
  return true;
}

// Index of the first negative element (-0 is not negative) of a non-negative tensor, or -1.
std::int64_t first_negative(const Entry& e, const Values& t) {
  if (!e.non_negative) return -1;
  const std::int64_t n = t.n;
  if (t.dtype == DType::F64) {
    const double* v = t.as<double>();
    for (std::int64_t i = 0; i < n; ++i)
      if (v[i] < 0.0) return i;
  } else if (t.dtype == DType::F32) {
    const float* v = t.as<float>();
    for (std::int64_t i = 0; i < n; ++i)
      if (v[i] < 0.0f) return i;
  } else if (t.dtype == DType::BF16) {
    const std::uint16_t* v = t.as<std::uint16_t>();
    for (std::int64_t i = 0; i < n; ++i)
      if ((v[i] & 0x8000u) && (v[i] & 0x7fffu)) return i;
  }
  return -1;
}

// Index of the first code that decodes to NaN (e4m3's 0x7f and 0xff, which the encoder never
// writes), or -1.
std::int64_t first_nan_code(const Entry& e, const Values& t) {
  if (e.nan_codes == nullptr) return -1;
  const std::uint8_t* c = t.as<std::uint8_t>();
  for (std::int64_t i = 0; i < t.n; ++i)
    if (std::isnan(e.nan_codes->values[c[i]])) return i;
  return -1;
}

// What load() refuses in a tensor, as a message ("" when it would load). `what` names the tensor.
std::string refusal(const Entry& e, const Values& t, const std::string& what) {
  if (!all_finite(e, t)) return fmt::format("{} holds inf or NaN", what);
  if (const std::int64_t k = first_negative(e, t); k >= 0)
    return fmt::format("{} holds a negative value at element {}; it must be >= 0", what, k);
  if (const std::int64_t k = first_nan_code(e, t); k >= 0)
    return fmt::format("{} holds code {:#04x} at element {}, which decodes to NaN", what, t.as<std::uint8_t>()[k], k);
  return {};
}

}  // namespace

void Optimizer::save(const std::filesystem::path& path) const {
  Impl& im = *impl_;
  HostState host = host_state(im);
  std::vector<std::int64_t> steps;
  std::vector<Entry> list = entries(im, *host.tensors, steps);
  // A state load() would refuse (inf or NaN from a step taken with check_finite off, say) is not
  // written: the file at `path`, perhaps the last good checkpoint, is left as it is.
  for (const Entry& e : list) {
    const std::int64_t n = std::accumulate(e.shape.begin(), e.shape.end(), std::int64_t{1}, std::multiplies<>());
    const std::string why = refusal(e, {e.dtype, e.data, n}, fmt::format("state tensor '{}'", e.name));
    if (!why.empty())
      throw StateMismatch(fmt::format("{}: not saved: {}, which load() refuses; the file is left as it was",
                                      path.string(), why));
  }
  std::vector<TensorView> views;
  views.reserve(list.size() + math::kCodebookCount);
  for (const Entry& e : list) views.push_back({e.name, e.dtype, e.shape, e.data});
  for (math::CodebookId id : codebooks_used(im)) {
    const math::Codebook& cb = codebook(id);
    views.push_back({fmt::format("codebook.{}", codebook_name(id)), DType::F32, {cb.size}, cb.values});
  }
  std::map<std::string, std::string> metadata = {
      {"format", kFormat},
      {"schema_version", std::to_string(kSchemaVersion)},
      {"algorithm", std::string(algorithm_name(im.options.algorithm))},
      {"step", std::to_string(im.steps)},
      {"skipped", std::to_string(im.skipped)},
      {"hyper", hyper_json(algorithm_spec(im.options.algorithm), im.hyper).dump()},
      {"layout", layout(im).dump()},
  };
  // Schedule-free AdamW: whether the parameters held y (train) or x (eval) when this was saved.
  if (im.options.algorithm == Algorithm::kAdamWScheduleFree) metadata["mode"] = im.train_mode ? "train" : "eval";
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
  // The hyperparameters the state was saved with are a record, not a requirement (an optimizer
  // with others may load it), but the record must be well formed: a JSON object of numbers and
  // flags.
  {
    nlohmann::json hyper;
    try {
      hyper = nlohmann::json::parse(meta("hyper"));
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(fmt::format("{}: hyper metadata is not valid JSON: {}", where, e.what()));
    }
    if (!hyper.is_object())
      throw FormatError(fmt::format("{}: hyper metadata is {}, not a JSON object", where, hyper.type_name()));
    for (const auto& [key, value] : hyper.items())
      if (!value.is_number() && !value.is_boolean())
        throw FormatError(fmt::format("{}: hyper metadata's {} is {}, not a number or flag", where, key, value.dump()));
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
  bool train_mode = im.train_mode;
  if (im.options.algorithm == Algorithm::kAdamWScheduleFree) {
    const std::string& mode = meta("mode");
    if (mode != "train" && mode != "eval")
      throw FormatError(fmt::format("{}: mode '{}' is neither 'train' nor 'eval'", where, mode));
    train_mode = mode == "train";
  }
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
    const std::string why = refusal(e, values_of(t), fmt::format("tensor '{}'", e.name));
    if (!why.empty()) throw FormatError(fmt::format("{}: {}", where, why));
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
  im.train_mode = train_mode;
  commit_host_state(im, host);
}

}  // namespace nibble
