// Parameter sets shaped like GPT-2 models (names and shapes only, no data), the sets that
// BENCHMARKS.md measures optimizers on. Header-only so that tests can use it without the CLI.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/error.hpp"
#include "nibble/tensor.hpp"

namespace nibble::cli {

struct ParamShape {
  std::string name;
  std::vector<std::int64_t> shape;
};

// The tensors of a GPT-2 with a tied head, in the order of the Hugging Face / nanoGPT state dict.
// Linear weights are [in, out] as GPT-2's Conv1D stores them.
inline std::vector<ParamShape> gpt2_param_shapes(std::int64_t d_model, std::int64_t layers,
                                                 std::int64_t vocab = 50304,
                                                 std::int64_t context = 1024) {
  std::vector<ParamShape> set;
  set.reserve(static_cast<std::size_t>(4 + 12 * layers));
  set.push_back({"wte", {vocab, d_model}});
  set.push_back({"wpe", {context, d_model}});
  for (std::int64_t layer = 0; layer < layers; ++layer) {
    const std::string prefix = "h." + std::to_string(layer) + ".";
    set.push_back({prefix + "ln_1.weight", {d_model}});
    set.push_back({prefix + "ln_1.bias", {d_model}});
    set.push_back({prefix + "attn.c_attn.weight", {d_model, 3 * d_model}});
    set.push_back({prefix + "attn.c_attn.bias", {3 * d_model}});
    set.push_back({prefix + "attn.c_proj.weight", {d_model, d_model}});
    set.push_back({prefix + "attn.c_proj.bias", {d_model}});
    set.push_back({prefix + "ln_2.weight", {d_model}});
    set.push_back({prefix + "ln_2.bias", {d_model}});
    set.push_back({prefix + "mlp.c_fc.weight", {d_model, 4 * d_model}});
    set.push_back({prefix + "mlp.c_fc.bias", {4 * d_model}});
    set.push_back({prefix + "mlp.c_proj.weight", {4 * d_model, d_model}});
    set.push_back({prefix + "mlp.c_proj.bias", {d_model}});
  }
  set.push_back({"ln_f.weight", {d_model}});
  set.push_back({"ln_f.bias", {d_model}});
  return set;
}

// 148 tensors, 124,475,904 parameters.
inline std::vector<ParamShape> gpt2_124m_shapes() { return gpt2_param_shapes(768, 12); }

// 580 tensors, 1,557,686,400 parameters.
inline std::vector<ParamShape> gpt2_xl_shapes() { return gpt2_param_shapes(1600, 48); }

inline constexpr std::string_view kParamSetNames = "gpt2-124m, gpt2-xl";

// The set for a name in kParamSetNames; nothing for another name.
inline std::optional<std::vector<ParamShape>> param_set_from_name(std::string_view name) {
  if (name == "gpt2-124m") return gpt2_124m_shapes();
  if (name == "gpt2-xl") return gpt2_xl_shapes();
  return std::nullopt;
}

// The set for a name in kParamSetNames; throws InvalidArgument naming another name and the known
// ones, as the --set flags report it.
inline std::vector<ParamShape> named_param_set(std::string_view name) {
  auto set = param_set_from_name(name);
  if (!set) {
    throw InvalidArgument("unknown parameter set '" + std::string(name) + "' (known: " +
                          std::string(kParamSetNames) + ")");
  }
  return std::move(*set);
}

inline std::int64_t total_elements(const std::vector<ParamShape>& set) {
  std::int64_t total = 0;
  for (const ParamShape& p : set) total += shape_numel(p.shape);
  return total;
}

}  // namespace nibble::cli
