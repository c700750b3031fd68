// Checkpoint files: the model file's metadata (format, schema version, config, vocabulary, step,
// RNG, run settings) and tensors, the order of the two writes, and the checks of a resume.
#include "train/checkpoint.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <system_error>

#include "nibble/error.hpp"
#include "nibble/safetensors.hpp"
#include "nibble/tensor.hpp"

namespace nibble::train {
namespace {

namespace fs = std::filesystem;

constexpr const char* kFormat = "nibble-train";
constexpr const char* kSchemaVersion = "1";

// The model's shape. `bias` and `gelu` are written only when they differ from GPT-2's (biases, tanh
// GELU), which a file without them means: files of GPT-2's model stay as they were.
std::map<std::string, std::string> config_metadata(const model::GptConfig& c) {
  std::map<std::string, std::string> m{{"layers", std::to_string(c.layers)}, {"heads", std::to_string(c.heads)},
                                       {"width", std::to_string(c.width)},   {"context", std::to_string(c.context)},
                                       {"vocab", std::to_string(c.vocab)},   {"dropout", fmt::format("{}", c.dropout)}};
  if (!c.bias) m["bias"] = "false";
  if (c.gelu != model::Gelu::kTanh) m["gelu"] = std::string(model::gelu_name(c.gelu));
  return m;
}

std::int64_t parse_int(const std::map<std::string, std::string>& m, const std::string& key, const fs::path& file) {
  const auto it = m.find(key);
  if (it == m.end()) throw FormatError(fmt::format("{}: metadata '{}' is missing", file.string(), key));
  std::size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(it->second, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != it->second.size())
    throw FormatError(fmt::format("{}: metadata '{}' = '{}' is not an integer", file.string(), key, it->second));
  return v;
}

std::uint64_t parse_u64(const std::map<std::string, std::string>& m, const std::string& key, const fs::path& file) {
  const auto it = m.find(key);
  if (it == m.end()) throw FormatError(fmt::format("{}: metadata '{}' is missing", file.string(), key));
  std::size_t used = 0;
  unsigned long long v = 0;
  try {
    v = std::stoull(it->second, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != it->second.size() || it->second.front() == '-')
    throw FormatError(fmt::format("{}: metadata '{}' = '{}' is not an unsigned integer", file.string(), key, it->second));
  return v;
}

model::GptConfig config_from_metadata(const std::map<std::string, std::string>& m, const fs::path& file) {
  model::GptConfig c;
  c.layers = parse_int(m, "layers", file);
  c.heads = parse_int(m, "heads", file);
  c.width = parse_int(m, "width", file);
  c.context = parse_int(m, "context", file);
  c.vocab = parse_int(m, "vocab", file);
  const auto it = m.find("dropout");
  c.dropout = it == m.end() ? 0.0f : std::strtof(it->second.c_str(), nullptr);
  if (const auto bias = m.find("bias"); bias != m.end()) {
    if (bias->second != "true" && bias->second != "false")
      throw FormatError(fmt::format("{}: metadata 'bias' = '{}' is not true or false", file.string(), bias->second));
    c.bias = bias->second == "true";
  }
  try {
    if (const auto gelu = m.find("gelu"); gelu != m.end()) c.gelu = model::gelu_from_name(gelu->second);
    model::validate(c);
  } catch (const InvalidArgument& e) {
    throw FormatError(fmt::format("{}: {}", file.string(), e.what()));
  }
  return c;
}

SafetensorsFile open_model_file(const fs::path& dir) {
  const fs::path file = dir / "model.safetensors";
  SafetensorsFile f = load_safetensors(file);
  const auto fmt_it = f.metadata.find("format");
  if (fmt_it == f.metadata.end() || fmt_it->second != kFormat)
    throw FormatError(fmt::format("{}: not a nibble training checkpoint (format)", file.string()));
  const auto v = f.metadata.find("schema_version");
  if (v == f.metadata.end() || v->second != kSchemaVersion)
    throw FormatError(fmt::format("{}: unsupported schema_version '{}'", file.string(),
                                  v == f.metadata.end() ? "" : v->second));
  return f;
}

// Copies the checkpoint's parameters into `params` after checking every tensor against `layout`.
void read_params(const SafetensorsFile& f, const fs::path& file, const std::vector<model::ParamTensor>& layout,
                 float* params) {
  if (f.tensors.size() != layout.size())
    throw StateMismatch(fmt::format("{}: holds {} tensors, the model has {}", file.string(), f.tensors.size(), layout.size()));
  for (const model::ParamTensor& t : layout) {
    const Tensor& x = f.at(t.name);
    if (x.dtype() != DType::F32 || x.shape() != t.shape)
      throw StateMismatch(fmt::format("{}: tensor '{}' does not match the model's {} shape", file.string(), t.name, "F32"));
  }
  for (const model::ParamTensor& t : layout) {
    const Tensor& x = f.at(t.name);
    std::memcpy(params + t.offset, x.data(), x.nbytes());
  }
}

// The vocabulary the checkpoint was trained with, as its metadata holds it.
const std::string& saved_vocab(const SafetensorsFile& f, const fs::path& file) {
  const auto it = f.metadata.find("vocab_bytes");
  if (it == f.metadata.end()) throw FormatError(fmt::format("{}: metadata 'vocab_bytes' is missing", file.string()));
  return it->second;
}

}  // namespace

// NOTE: the model file is written after the optimizer file, and both carry the step: a crash
// between the two renames leaves a pair whose steps differ, which resume refuses.
void save_checkpoint(const fs::path& dir, const Engine& gpt, const Optimizer& opt, const std::string& vocab,
                     const RunPosition& st, const TrainOptions& o) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IoError(fmt::format("cannot create checkpoint directory '{}': {}", dir.string(), ec.message()));
  opt.save(dir / "optimizer.safetensors");
  // fp32 on the host whatever the engine holds, so checkpoints move between CPU and GPU runs.
  std::vector<float> params(static_cast<std::size_t>(gpt.param_count()));
  gpt.get_params(params.data());
  std::vector<TensorView> views;
  for (const model::ParamTensor& t : gpt.layout())
    views.push_back({t.name, DType::F32, t.shape, params.data() + t.offset});
  std::map<std::string, std::string> meta = config_metadata(gpt.config());
  meta.emplace("format", std::string(kFormat));
  meta.emplace("schema_version", std::string(kSchemaVersion));
  meta["vocab_bytes"] = vocab;
  meta["step"] = std::to_string(st.step);
  for (int i = 0; i < 4; ++i) meta[fmt::format("rng{}", i)] = std::to_string(st.rng[static_cast<std::size_t>(i)]);
  meta["seed"] = std::to_string(o.seed);
  meta["batch"] = std::to_string(o.batch);
  meta["seq"] = std::to_string(gpt.seq());
  meta["algorithm"] = std::string(algorithm_name(opt.options().algorithm));
  meta["precision"] = std::string(precision_name(opt.options().precision));
  save_safetensors(dir / "model.safetensors", views, meta);
}


RunPosition resume_from_checkpoint(const fs::path& dir, const model::GptConfig& config, const std::string& vocab,
                                   std::int64_t max_step, Engine& gpt, Optimizer& opt) {
  const SafetensorsFile f = open_model_file(dir);
  const fs::path file = dir / "model.safetensors";
  const model::GptConfig saved = config_from_metadata(f.metadata, file);
  auto describe = [](const model::GptConfig& c) {
    return fmt::format("{} layers, {} heads, width {}, context {}, vocab {}, {}, {} GELU", c.layers, c.heads, c.width,
                       c.context, c.vocab, c.bias ? "biases" : "no biases", model::gelu_name(c.gelu));
  };
  if (saved.layers != config.layers || saved.heads != config.heads || saved.width != config.width ||
      saved.context != config.context || saved.vocab != config.vocab || saved.bias != config.bias ||
      saved.gelu != config.gelu)
    throw StateMismatch(fmt::format("{}: the checkpoint's model ({}) differs from this run's ({})", file.string(),
                                    describe(saved), describe(config)));
  if (saved_vocab(f, file) != vocab)
    throw StateMismatch(fmt::format("{}: the checkpoint's vocabulary differs from this data's", file.string()));
  const std::int64_t step = parse_int(f.metadata, "step", file);
  if (step < 0 || step > max_step)
    throw FormatError(fmt::format("{}: step {} is outside [0, {}]", file.string(), step, max_step));
  RunPosition at;
  for (int i = 0; i < 4; ++i) at.rng[static_cast<std::size_t>(i)] = parse_u64(f.metadata, fmt::format("rng{}", i), file);
  // Everything is checked before anything is changed; the optimizer checks its own file.
  std::vector<float> params(static_cast<std::size_t>(gpt.param_count()));
  read_params(f, file, gpt.layout(), params.data());
  opt.load(dir / "optimizer.safetensors");
  if (opt.step_count() + opt.skipped_steps() != step)
    throw StateMismatch(fmt::format("{}: model is at step {} but the optimizer file at {}", file.string(), step,
                                    opt.step_count() + opt.skipped_steps()));
  gpt.set_params(params.data());
  at.step = step;
  return at;
}

LoadedModel load_model(const fs::path& dir) {
  const SafetensorsFile f = open_model_file(dir);
  const fs::path file = dir / "model.safetensors";
  LoadedModel m;
  m.config = config_from_metadata(f.metadata, file);
  m.vocab_metadata = saved_vocab(f, file);
  m.params.resize(static_cast<std::size_t>(model::gpt_param_count(m.config)));
  read_params(f, file, model::gpt_param_layout(m.config), m.params.data());
  return m;
}

}  // namespace nibble::train
