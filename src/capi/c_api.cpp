// The C interface over nibble::Optimizer: options from JSON, parameters from plain structs, every
// exception turned into a return code and a thread-local message.
#include "nibble/c_api.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "nibble/algorithms.hpp"
#include "nibble/device.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"

struct nibble_optimizer {
  nibble::Optimizer optimizer;
};

namespace {

thread_local std::string last_error;

// The message of the last failed call; a message that cannot be stored (no memory) leaves it empty
// rather than let an exception out of an extern "C" function.
void set_error(const char* message) noexcept {
  try {
    last_error = message;
  } catch (...) {
    last_error.clear();
  }
}

template <class Fn>
int guarded(Fn&& fn) {
  try {
    fn();
    last_error.clear();
    return NIBBLE_OK;
  } catch (const nibble::InvalidArgument& e) {
    set_error(e.what());
    return NIBBLE_INVALID_ARGUMENT;
  } catch (const nibble::StateMismatch& e) {
    set_error(e.what());
    return NIBBLE_STATE_MISMATCH;
  } catch (const nibble::FormatError& e) {
    set_error(e.what());
    return NIBBLE_FORMAT_ERROR;
  } catch (const nibble::IoError& e) {
    set_error(e.what());
    return NIBBLE_IO_ERROR;
  } catch (const nibble::OutOfMemory& e) {
    set_error(e.what());
    return NIBBLE_OUT_OF_MEMORY;
  } catch (const nibble::DeviceError& e) {
    set_error(e.what());
    return NIBBLE_DEVICE_ERROR;
  } catch (const std::bad_alloc&) {
    set_error("out of host memory (an allocation failed)");
    return NIBBLE_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_error(e.what());
    return NIBBLE_ERROR;
  } catch (...) {
    set_error("unknown error");
    return NIBBLE_ERROR;
  }
}

void require(const void* p, const char* what) {
  if (p == nullptr) throw nibble::InvalidArgument(fmt::format("{} is NULL", what));
}

// A call's CUDA stream: NULL keeps the optimizer's; one given to a CPU optimizer is refused.
void use_stream(nibble::Optimizer& opt, void* stream, const char* call) {
  if (stream == nullptr) return;
  if (opt.device() != nibble::Device::kCuda)
    throw nibble::InvalidArgument(fmt::format("{}: a stream was given to an optimizer on the CPU", call));
  opt.set_cuda_stream(stream);
}

nibble::DType element_type(std::int32_t code, const char* what, const std::string& name) {
  switch (code) {
    case NIBBLE_F32: return nibble::DType::F32;
    case NIBBLE_BF16: return nibble::DType::BF16;
    case NIBBLE_F16: return nibble::DType::F16;
    default: throw nibble::InvalidArgument(fmt::format("{} of parameter '{}' is {}, not 0 (f32), 1 (bf16) or 2 (f16)", what, name, code));
  }
}

// Reads the Hyper fields named in `j` onto `h`, refusing names it does not know.
void read_hyper(const nlohmann::json& j, nibble::Hyper& h) {
  if (!j.is_object()) throw nibble::InvalidArgument("options: \"hyper\" must be an object");
  for (const auto& [key, value] : j.items()) {
    auto number = [&](float& field) {
      if (!value.is_number()) throw nibble::InvalidArgument(fmt::format("hyper.{} must be a number, got {}", key, value.dump()));
      field = value.get<float>();
    };
    auto flag = [&](bool& field) {
      if (!value.is_boolean()) throw nibble::InvalidArgument(fmt::format("hyper.{} must be true or false, got {}", key, value.dump()));
      field = value.get<bool>();
    };
    const nibble::HyperField* field = nibble::find_hyper_field(key);
    if (field == nullptr) throw nibble::InvalidArgument(fmt::format("hyper.{} is not a nibble hyperparameter", key));
    if (!field->choices.empty() && value.is_string()) h.*field->number = nibble::hyper_choice(*field, value.get<std::string>());
    else if (field->number != nullptr) number(h.*field->number);
    else flag(h.*field->flag);
  }
}

const char* range_name(nibble::HyperRange range) {
  switch (range) {
    case nibble::HyperRange::kFinite: return "finite";
    case nibble::HyperRange::kNonNegative: return ">= 0";
    case nibble::HyperRange::kPositive: return "> 0";
    case nibble::HyperRange::kBeta: return "[0, 1)";
    case nibble::HyperRange::kUnit: return "[0, 1]";
    case nibble::HyperRange::kDecayRate: return "[-1, 0)";
    case nibble::HyperRange::kOpenUnit: return "(0, 1)";
    case nibble::HyperRange::kStepCount: return "integer in [1, 99]";
    case nibble::HyperRange::kPower: return "[0, 16]";
    case nibble::HyperRange::kSignedPower: return "[-16, 16]";
    case nibble::HyperRange::kChoice: return "choice";
  }
  return "";
}

// The algorithm, precision and hyperparameter tables, for bindings that list or check them.
nlohmann::ordered_json tables_json() {
  nlohmann::ordered_json hyper = nlohmann::ordered_json::array();
  for (const nibble::HyperField& f : nibble::hyper_fields()) {
    hyper.push_back({{"name", f.name}, {"type", f.number != nullptr ? "number" : "flag"}});
    if (!f.choices.empty()) hyper.back()["choices"] = f.choices;
  }
  nlohmann::ordered_json algorithms = nlohmann::ordered_json::array();
  for (const nibble::AlgorithmSpec& a : nibble::algorithm_specs()) {
    nlohmann::ordered_json defaults = nlohmann::ordered_json::object();
    for (const nibble::HyperField& f : nibble::hyper_fields()) {
      if (f.number != nullptr) defaults[std::string(f.name)] = a.defaults.*f.number;
      else defaults[std::string(f.name)] = a.defaults.*f.flag;
    }
    nlohmann::ordered_json numbers = nlohmann::ordered_json::array();
    for (const nibble::HyperUse& use : a.numbers) numbers.push_back({{"name", use.name}, {"range", range_name(use.range)}});
    nlohmann::ordered_json flags = nlohmann::ordered_json::array();
    for (std::string_view flag : a.flags) flags.push_back(flag);
    nibble::StateSlot slots[nibble::kMaxStateSlots];
    nlohmann::ordered_json state = nlohmann::ordered_json::array();
    for (int j = 0, n = a.slots(a.defaults, false, slots); j < n; ++j) state.push_back(slots[j].name);
    algorithms.push_back({{"name", a.name},
                          {"alias", a.alias},
                          {"title", a.title},
                          {"defaults", defaults},
                          {"numbers", numbers},
                          {"flags", flags},
                          {"state", state}});
  }
  nlohmann::ordered_json precisions = nlohmann::ordered_json::array();
  for (nibble::Precision p : nibble::all_precisions()) precisions.push_back(nibble::precision_name(p));
  return {{"algorithms", algorithms}, {"precisions", precisions}, {"hyper", hyper}};
}

nibble::OptimizerOptions read_options(const char* text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw nibble::InvalidArgument(fmt::format("options are not valid JSON: {}", e.what()));
  }
  if (!j.is_object()) throw nibble::InvalidArgument("options must be a JSON object");
  nibble::OptimizerOptions o;
  // The algorithm first: the hyperparameters start from its defaults.
  if (j.contains("algorithm")) {
    const auto a = nibble::algorithm_from_name(j["algorithm"].is_string() ? j["algorithm"].get<std::string>() : "");
    if (!a) throw nibble::InvalidArgument(fmt::format("unknown algorithm {}", j["algorithm"].dump()));
    o.algorithm = *a;
  }
  nibble::Hyper hyper = nibble::default_hyper(o.algorithm);
  auto get = [&](const std::string& key, auto& field) {
    using T = std::remove_reference_t<decltype(field)>;
    const nlohmann::json& v = j[key];
    if constexpr (std::is_same_v<T, bool>) {
      if (!v.is_boolean()) throw nibble::InvalidArgument(fmt::format("option {} must be true or false, got {}", key, v.dump()));
      field = v.get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      // A whole number that fits, compared as JSON holds it (int64 or uint64) before it narrows:
      // 16.9 or 2^32 + 256 would otherwise arrive as 16 or 256.
      if (!v.is_number_integer())
        throw nibble::InvalidArgument(fmt::format("option {} must be a whole number, got {}", key, v.dump()));
      const bool fits = v.is_number_unsigned() ? std::in_range<T>(v.get<std::uint64_t>())
                                               : std::in_range<T>(v.get<std::int64_t>());
      if (!fits)
        throw nibble::InvalidArgument(fmt::format("option {} is out of range [{}, {}]: {}", key,
                                                  std::numeric_limits<T>::min(), std::numeric_limits<T>::max(), v.dump()));
      field = v.is_number_unsigned() ? static_cast<T>(v.get<std::uint64_t>()) : static_cast<T>(v.get<std::int64_t>());
    } else if constexpr (std::is_floating_point_v<T>) {
      if (!v.is_number()) throw nibble::InvalidArgument(fmt::format("option {} must be a number, got {}", key, v.dump()));
      field = v.get<T>();
    } else {
      try {
        field = v.get<T>();
      } catch (const nlohmann::json::exception&) {
        throw nibble::InvalidArgument(fmt::format("option {} has the wrong type: {}", key, v.dump()));
      }
    }
  };
  for (const auto& [key, value] : j.items()) {
    if (key == "algorithm") continue;
    if (key == "hyper") {
      read_hyper(value, hyper);
    } else if (key == "precision") {
      const auto p = nibble::precision_from_name(value.is_string() ? value.get<std::string>() : "");
      if (!p) throw nibble::InvalidArgument(fmt::format("unknown precision {}", value.dump()));
      o.precision = *p;
    } else if (key == "device") {
      const std::string d = value.is_string() ? value.get<std::string>() : value.dump();
      if (d == "cpu") o.device = nibble::Device::kCpu;
      else if (d == "cuda") o.device = nibble::Device::kCuda;
      else throw nibble::InvalidArgument(fmt::format("unknown device '{}' (known: cpu, cuda)", d));
    } else if (key == "block_size") get(key, o.block_size);
    else if (key == "min_quant_size") get(key, o.min_quant_size);
    else if (key == "max_grad_norm") get(key, o.max_grad_norm);
    else if (key == "check_finite") get(key, o.check_finite);
    else if (key == "stochastic_rounding") get(key, o.stochastic_rounding);
    else if (key == "seed") get(key, o.seed);
    else if (key == "rank1_second_moment") get(key, o.rank1_second_moment);
    else if (key == "master_weights") get(key, o.master_weights);
    else if (key == "param_stochastic_rounding") get(key, o.param_stochastic_rounding);
    else if (key == "full_precision_names") get(key, o.full_precision_names);
    else if (key == "no_decay_names") get(key, o.no_decay_names);
    else if (key == "no_decay_vectors") get(key, o.no_decay_vectors);
    else if (key == "use_muon") {
      if (!value.is_null() && !value.is_boolean())
        throw nibble::InvalidArgument(fmt::format("option use_muon must be true, false or null, got {}", value.dump()));
      o.use_muon = value.is_null() ? std::nullopt : std::optional<bool>(value.get<bool>());
    } else if (key == "adamw_names") get(key, o.adamw_names);
    else throw nibble::InvalidArgument(fmt::format("option '{}' is not a nibble optimizer option", key));
  }
  o.hyper = hyper;
  return o;
}

}  // namespace

extern "C" {

const char* nibble_last_error(void) { return last_error.c_str(); }

int nibble_cuda_available(void) {
  try {
    return nibble::cuda_built() && nibble::cuda_device_count() > 0 ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

int nibble_check_options(const char* options_json) {
  return guarded([&] {
    require(options_json, "options_json");
    (void)nibble::resolve_options(read_options(options_json));
  });
}

const char* nibble_tables_json(void) {
  try {
    static const std::string text = tables_json().dump();
    return text.c_str();
  } catch (...) {  // nothing leaves an extern "C" function; a later call tries again
    set_error("nibble_tables_json: the tables could not be made (out of host memory?)");
    return nullptr;
  }
}

int nibble_create(const char* options_json, const nibble_param* params, int64_t count, nibble_optimizer** out) {
  return guarded([&] {
    require(options_json, "options_json");
    require(out, "out");
    *out = nullptr;
    if (count < 0) throw nibble::InvalidArgument(fmt::format("parameter count {} is negative", count));
    if (count > 0) require(params, "params");
    nibble::OptimizerOptions options = read_options(options_json);
    nibble::ParamGroup group;
    for (int64_t i = 0; i < count; ++i) {
      const nibble_param& p = params[i];
      nibble::Param param;
      param.name = p.name != nullptr ? p.name : fmt::format("param.{}", i);
      if (p.rank < 0 || (p.rank > 0 && p.shape == nullptr))
        throw nibble::InvalidArgument(fmt::format("parameter '{}' has rank {} and shape {}", param.name, p.rank,
                                                  p.shape == nullptr ? "NULL" : "given"));
      param.shape.assign(p.shape, p.shape + p.rank);
      if (p.global_shape != nullptr) param.global_shape.assign(p.global_shape, p.global_shape + p.rank);
      param.split = p.split != 0;
      param.data = p.data;
      param.grad = p.grad;
      param.dtype = element_type(p.dtype, "dtype", param.name);
      param.grad_dtype = element_type(p.grad_dtype, "grad_dtype", param.name);
      group.params.push_back(std::move(param));
    }
    *out = new nibble_optimizer{nibble::Optimizer({std::move(group)}, options)};
  });
}

void nibble_destroy(nibble_optimizer* optimizer) { delete optimizer; }

int nibble_set_grads(nibble_optimizer* optimizer, void* const* grads, int64_t count, void* stream) {
  return guarded([&] {
    require(optimizer, "optimizer");
    if (count > 0) require(grads, "grads");
    if (count < 0) throw nibble::InvalidArgument(fmt::format("gradient count {} is negative", count));
    nibble::Optimizer& opt = optimizer->optimizer;
    use_stream(opt, stream, "nibble_set_grads");
    opt.set_grads({grads, static_cast<std::size_t>(count)});
  });
}

int nibble_step(nibble_optimizer* optimizer, float grad_scale, float lr_scale, int32_t found_inf, void* stream,
                int32_t* skipped, double* grad_norm, int64_t* step) {
  return guarded([&] {
    require(optimizer, "optimizer");
    nibble::Optimizer& opt = optimizer->optimizer;
    const bool cuda = opt.device() == nibble::Device::kCuda;
    use_stream(opt, stream, "nibble_step");
    nibble::StepOptions so;
    so.grad_scale = grad_scale;
    so.lr_scale = lr_scale;
    so.found_inf = found_inf != 0;
    so.synchronize = false;
    const nibble::StepResult r = opt.step(so);
    if (!cuda) {
      if (skipped) *skipped = r.skipped ? 1 : 0;
      if (grad_norm) *grad_norm = r.grad_norm;
      if (step) *step = r.step;
    }
  });
}

int nibble_grad_square_sum(nibble_optimizer* optimizer, const uint8_t* counted, int64_t count, double* out) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(out, "out");
    if (counted != nullptr && count < 0) throw nibble::InvalidArgument(fmt::format("flag count {} is negative", count));
    *out = optimizer->optimizer.grad_square_sum(
        counted != nullptr ? std::span<const std::uint8_t>(counted, static_cast<std::size_t>(count))
                           : std::span<const std::uint8_t>());
  });
}

int nibble_step_with_square_sum(nibble_optimizer* optimizer, float grad_scale, float lr_scale, int32_t found_inf,
                                double grad_square_sum, int32_t* skipped, double* grad_norm, int64_t* step) {
  return guarded([&] {
    require(optimizer, "optimizer");
    nibble::StepOptions so;
    so.grad_scale = grad_scale;
    so.lr_scale = lr_scale;
    so.found_inf = found_inf != 0;
    so.grad_square_sum = grad_square_sum;
    const nibble::StepResult r = optimizer->optimizer.step(so);
    if (skipped) *skipped = r.skipped ? 1 : 0;
    if (grad_norm) *grad_norm = r.grad_norm;
    if (step) *step = r.step;
  });
}

int nibble_enqueue_step(nibble_optimizer* optimizer, void* stream) {
  return guarded([&] {
    require(optimizer, "optimizer");
    if (stream != nullptr) optimizer->optimizer.set_cuda_stream(stream);
    optimizer->optimizer.enqueue_step();
  });
}

int nibble_enqueue_grad_square_sum(nibble_optimizer* optimizer, const uint8_t* counted, int64_t count, double* out,
                                   void* stream) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(out, "out");
    if (counted != nullptr && count < 0) throw nibble::InvalidArgument(fmt::format("flag count {} is negative", count));
    if (stream != nullptr) optimizer->optimizer.set_cuda_stream(stream);
    optimizer->optimizer.enqueue_grad_square_sum(
        counted != nullptr ? std::span<const std::uint8_t>(counted, static_cast<std::size_t>(count))
                           : std::span<const std::uint8_t>(),
        out);
  });
}

int nibble_enqueue_step_with_square_sum(nibble_optimizer* optimizer, const double* square_sum, void* stream) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(square_sum, "square_sum");
    if (stream != nullptr) optimizer->optimizer.set_cuda_stream(stream);
    optimizer->optimizer.enqueue_step_with_square_sum(square_sum);
  });
}

int nibble_device_scalars(nibble_optimizer* optimizer, void** lr_scale, void** grad_scale, void** found_inf,
                          void** steps) {
  return guarded([&] {
    require(optimizer, "optimizer");
    const nibble::DeviceScalars s = optimizer->optimizer.device_scalars();
    if (lr_scale) *lr_scale = s.lr_scale;
    if (grad_scale) *grad_scale = s.grad_scale;
    if (found_inf) *found_inf = s.found_inf;
    if (steps) *steps = s.steps;
  });
}

int nibble_device_grad_norm(nibble_optimizer* optimizer, void** grad_norm) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(grad_norm, "grad_norm");
    *grad_norm = optimizer->optimizer.device_scalars().grad_norm;
  });
}

int nibble_counters(nibble_optimizer* optimizer, int64_t* steps, int64_t* skipped) {
  return guarded([&] {
    require(optimizer, "optimizer");
    if (steps) *steps = optimizer->optimizer.step_count();
    if (skipped) *skipped = optimizer->optimizer.skipped_steps();
  });
}

int nibble_state_bytes(nibble_optimizer* optimizer, int64_t* params, int64_t* bytes) {
  return guarded([&] {
    require(optimizer, "optimizer");
    const nibble::StateStats s = optimizer->optimizer.state_stats();
    if (params) *params = s.params;
    if (bytes) *bytes = s.state_bytes;
  });
}

int nibble_save(nibble_optimizer* optimizer, const char* path) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(path, "path");
    optimizer->optimizer.save(path);
  });
}

int nibble_load(nibble_optimizer* optimizer, const char* path) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(path, "path");
    optimizer->optimizer.load(path);
  });
}

int nibble_state_values(nibble_optimizer* optimizer, int64_t param_index, const char* name, float* out,
                        int64_t count) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(name, "name");
    if (param_index < 0) throw nibble::InvalidArgument(fmt::format("parameter index {} is negative", param_index));
    const std::vector<float> values =
        optimizer->optimizer.portable_state_values(static_cast<std::size_t>(param_index), name);
    if (static_cast<int64_t>(values.size()) != count)
      throw nibble::InvalidArgument(
          fmt::format("state '{}' of parameter {} has {} values, the buffer {}", name, param_index, values.size(), count));
    if (count > 0) {
      require(out, "out");
      std::copy(values.begin(), values.end(), out);
    }
  });
}
int nibble_set_state_values(nibble_optimizer* optimizer, int64_t param_index, const char* name, const float* values,
                            int64_t count) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(name, "name");
    if (count > 0) require(values, "values");
    if (param_index < 0) throw nibble::InvalidArgument(fmt::format("parameter index {} is negative", param_index));
    if (count < 0) throw nibble::InvalidArgument(fmt::format("value count {} is negative", count));
    optimizer->optimizer.set_state_values(static_cast<std::size_t>(param_index), name,
                                          {values, static_cast<std::size_t>(count)});
  });
}
int nibble_set_step_counts(nibble_optimizer* optimizer, const int64_t* tensor_steps, int64_t count, int64_t steps,
                           int64_t skipped) {
  return guarded([&] {
    require(optimizer, "optimizer");
    if (count > 0) require(tensor_steps, "tensor_steps");
    if (count < 0) throw nibble::InvalidArgument(fmt::format("step count length {} is negative", count));
    optimizer->optimizer.set_step_counts({tensor_steps, static_cast<std::size_t>(count)}, steps, skipped);
  });
}
int nibble_set_running_sums(nibble_optimizer* optimizer, const double* lr_max, const double* weight_sum,
                            int64_t count) {
  return guarded([&] {
    require(optimizer, "optimizer");
    if (count > 0) {
      require(lr_max, "lr_max");
      require(weight_sum, "weight_sum");
    }
    if (count < 0) throw nibble::InvalidArgument(fmt::format("running sums length {} is negative", count));
    const auto n = static_cast<std::size_t>(count);
    optimizer->optimizer.set_running_sums({lr_max, n}, {weight_sum, n});
  });
}
int nibble_update_hessian(nibble_optimizer* optimizer, const float* const* estimates, int64_t count, void* stream) {
  return guarded([&] {
    require(optimizer, "optimizer");
    if (count > 0) require(estimates, "estimates");
    if (count < 0) throw nibble::InvalidArgument(fmt::format("estimate count {} is negative", count));
    use_stream(optimizer->optimizer, stream, "nibble_update_hessian");
    optimizer->optimizer.update_hessian({estimates, static_cast<std::size_t>(count)});
  });
}
int nibble_train(nibble_optimizer* optimizer) {
  return guarded([&] {
    require(optimizer, "optimizer");
    optimizer->optimizer.train();
  });
}
int nibble_eval(nibble_optimizer* optimizer) {
  return guarded([&] {
    require(optimizer, "optimizer");
    optimizer->optimizer.eval();
  });
}
int nibble_set_hyper(nibble_optimizer* optimizer, const char* hyper_json, void* stream) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(hyper_json, "hyper_json");
    nibble::Optimizer& opt = optimizer->optimizer;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(hyper_json);
    } catch (const nlohmann::json::exception& e) {
      throw nibble::InvalidArgument(fmt::format("nibble_set_hyper: the hyperparameters are not valid JSON: {}", e.what()));
    }
    if (!j.is_object()) throw nibble::InvalidArgument(fmt::format("nibble_set_hyper: expected a JSON object, got {}", j.dump()));
    nibble::Hyper hyper = opt.hyper();
    read_hyper(j, hyper);
    use_stream(opt, stream, "nibble_set_hyper");
    opt.set_hyper(hyper);
  });
}

int nibble_training(nibble_optimizer* optimizer, int32_t* train) {
  return guarded([&] {
    require(optimizer, "optimizer");
    require(train, "train");
    *train = optimizer->optimizer.training() ? 1 : 0;
  });
}

}  // extern "C"
