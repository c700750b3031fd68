// The training loop, its log lines, evaluation, Sophia's Gauss-Newton-Bartlett Hessian estimates
// and checkpoints (model + data position + RNG in one safetensors file, optimizer state in another).
#include "train/trainer.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "math/common.hpp"
#include "model/loss.hpp"
#include "nibble/device.hpp"
#include "nibble/error.hpp"
#include "nibble/rng.hpp"
#include "nibble/safetensors.hpp"
#include "train/data.hpp"

namespace nibble::train {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr const char* kFormat = "nibble-train";
constexpr const char* kSchemaVersion = "1";

model::GptConfig make_config(const TrainOptions& o, std::int64_t vocab) {
  model::GptConfig c = model::gpt_preset(o.preset);
  if (o.layers) c.layers = *o.layers;
  if (o.heads) c.heads = *o.heads;
  if (o.width) c.width = *o.width;
  if (o.context) c.context = *o.context;
  c.vocab = vocab;
  c.dropout = o.dropout;
  model::validate(c);
  return c;
}

void validate_options(const TrainOptions& o) {
  auto positive = [](const char* what, std::int64_t v) {
    if (v <= 0) throw InvalidArgument(fmt::format("{} must be positive, got {}", what, v));
  };
  positive("batch", o.batch);
  positive("accum", o.accum);
  if (o.random_vocab < 0 || o.random_vocab > (std::int64_t{1} << 30))
    throw InvalidArgument(fmt::format("random vocabulary must be in [1, 2^30] (0: text), got {}", o.random_vocab));
  if (o.random_vocab > 0 && !o.data.empty())
    throw InvalidArgument("random tokens and a data file exclude each other: give one of them");
  if (o.device == Device::kCuda) {
    if (!cuda_built()) throw DeviceError("--device cuda: this nibble was built without CUDA");
    if (cuda_device_count() == 0) throw DeviceError("--device cuda: no CUDA device is visible");
    if (o.algorithm == Algorithm::kSophiaG)
      throw InvalidArgument("sophiag's Hessian estimates sample labels on the CPU engine; train it with --device cpu");
    if (o.dropout > 0.0f)
      throw InvalidArgument(fmt::format("dropout {} is not available on the CUDA engine; use 0", o.dropout));
  }
  if (o.pure_bf16 && (o.device != Device::kCuda || o.compute != model::CudaPrecision::kBf16))
    throw InvalidArgument("pure bf16 parameters need --device cuda --compute bf16");
  if (o.device != Device::kCuda && o.compute != model::CudaPrecision::kFp32) {
    throw InvalidArgument("bf16 compute is for the CUDA engine (--device cuda); the CPU engine computes in fp32");
  }
  positive("steps", o.steps);
  positive("eval batches", o.eval_batches);
  positive("hessian_every", o.hessian_every);
  if (o.seq < 0) throw InvalidArgument(fmt::format("seq must be >= 0, got {}", o.seq));
  if (o.warmup < 0) throw InvalidArgument(fmt::format("warmup must be >= 0, got {}", o.warmup));
  if (o.eval_every < 0) throw InvalidArgument(fmt::format("eval_every must be >= 0, got {}", o.eval_every));
  if (o.save_every < 0) throw InvalidArgument(fmt::format("save_every must be >= 0, got {}", o.save_every));
  if (!(o.grad_clip >= 0.0f) || !std::isfinite(o.grad_clip))
    throw InvalidArgument(fmt::format("grad_clip must be finite and >= 0, got {}", o.grad_clip));
  if (!(o.time_budget_s >= 0.0)) throw InvalidArgument(fmt::format("time budget must be >= 0, got {}", o.time_budget_s));
  if (o.target_val_loss && !std::isfinite(*o.target_val_loss))
    throw InvalidArgument(fmt::format("target validation loss must be finite, got {}", *o.target_val_loss));
  if (o.memory_limit < 0) throw InvalidArgument(fmt::format("memory limit must be >= 0, got {}", o.memory_limit));
  if (!(o.min_lr_ratio >= 0.0f && o.min_lr_ratio <= 1.0f))
    throw InvalidArgument(fmt::format("min_lr_ratio must be in [0, 1], got {}", o.min_lr_ratio));
  if ((o.save_every > 0 || o.resume) && o.checkpoint_dir.empty())
    throw InvalidArgument("--save-every and --resume need a checkpoint directory");
}

std::map<std::string, std::string> config_metadata(const model::GptConfig& c) {
  return {{"layers", std::to_string(c.layers)}, {"heads", std::to_string(c.heads)},
          {"width", std::to_string(c.width)},   {"context", std::to_string(c.context)},
          {"vocab", std::to_string(c.vocab)},   {"dropout", fmt::format("{}", c.dropout)}};
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
  try {
    model::validate(c);
  } catch (const InvalidArgument& e) {
    throw FormatError(fmt::format("{}: {}", file.string(), e.what()));
  }
  return c;
}

// Where batches come from: a text's characters, or uniformly random tokens of a given vocabulary.
class Batches {
 public:
  explicit Batches(const TrainOptions& o) : random_vocab_(o.random_vocab) {
    const std::int64_t context = o.seq > 0 ? o.seq : model::gpt_preset(o.preset).context;
    if (random_vocab_ > 0) return;
    text_.emplace(o.data.empty() ? TextDataset(default_corpus_description(), default_corpus(), context, o.val_fraction)
                                 : TextDataset(o.data, context, o.val_fraction));
  }
  std::int64_t vocab() const { return text_ ? text_->tokenizer().size() : random_vocab_; }
  std::string vocab_metadata() const {
    return text_ ? text_->tokenizer().to_metadata() : fmt::format("random:{}", random_vocab_);
  }
  std::string describe() const {
    if (!text_) return fmt::format("random tokens from a vocabulary of {}", random_vocab_);
    return fmt::format("{} ({} train / {} validation tokens)", text_->name(), text_->token_count(Split::kTrain),
                       text_->token_count(Split::kValidation));
  }
  // Random: each row draws seq + 1 tokens; the targets are the inputs shifted by one, as in text.
  void sample(Split split, std::int64_t batch, std::int64_t seq, Rng& rng, std::int32_t* inputs,
              std::int32_t* targets) const {
    if (text_) return text_->sample_batch(split, batch, seq, rng, inputs, targets);
    for (std::int64_t b = 0; b < batch; ++b) {
      std::int32_t prev = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(random_vocab_)));
      for (std::int64_t t = 0; t < seq; ++t) {
        const auto next = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(random_vocab_)));
        inputs[b * seq + t] = prev;
        targets[b * seq + t] = next;
        prev = next;
      }
    }
  }

 private:
  std::int64_t random_vocab_ = 0;
  std::optional<TextDataset> text_;
};

// The model a run trains: the CPU engine or the CUDA engine, behind what the loop needs.
class Engine {
 public:
  virtual ~Engine() = default;
  virtual float forward(const std::int32_t* tokens, const std::int32_t* targets, bool training,
                        std::uint64_t dropout_seed) = 0;
  virtual void backward(float loss_scale) = 0;
  virtual void zero_grad() = 0;
  virtual void synchronize() = 0;
  virtual std::vector<Param> optimizer_params() = 0;
  virtual void get_params(float* host) const = 0;
  virtual void set_params(const float* host) = 0;
  virtual const model::GptConfig& config() const = 0;
  virtual const std::vector<model::ParamTensor>& layout() const = 0;
  virtual std::int64_t batch() const = 0;
  virtual std::int64_t seq() const = 0;
  virtual std::int64_t param_count() const = 0;
  virtual std::int64_t param_bytes() const = 0;
  virtual std::int64_t grad_bytes() const = 0;
  virtual std::int64_t activation_bytes() const = 0;
  // CPU only (SophiaG's label sampling): the last forward's probabilities, its gradient.
  virtual model::Gpt* cpu() { return nullptr; }
  virtual model::CudaGpt* cuda() { return nullptr; }
};

class CpuEngine final : public Engine {
 public:
  CpuEngine(const model::GptConfig& c, std::int64_t B, std::int64_t T) : gpt_(c, B, T) {}
  float forward(const std::int32_t* tokens, const std::int32_t* targets, bool training, std::uint64_t seed) override {
    return gpt_.forward(tokens, targets, training, seed);
  }
  void backward(float loss_scale) override { gpt_.backward(loss_scale); }
  void zero_grad() override { gpt_.zero_grad(); }
  void synchronize() override {}
  std::vector<Param> optimizer_params() override { return gpt_.optimizer_params(); }
  void get_params(float* host) const override {
    std::memcpy(host, gpt_.params(), static_cast<std::size_t>(gpt_.param_count()) * sizeof(float));
  }
  void set_params(const float* host) override {
    std::memcpy(gpt_.params(), host, static_cast<std::size_t>(gpt_.param_count()) * sizeof(float));
  }
  const model::GptConfig& config() const override { return gpt_.config(); }
  const std::vector<model::ParamTensor>& layout() const override { return gpt_.layout(); }
  std::int64_t batch() const override { return gpt_.batch(); }
  std::int64_t seq() const override { return gpt_.seq(); }
  std::int64_t param_count() const override { return gpt_.param_count(); }
  std::int64_t param_bytes() const override { return gpt_.param_bytes(); }
  std::int64_t grad_bytes() const override { return gpt_.grad_bytes(); }
  std::int64_t activation_bytes() const override { return gpt_.activation_bytes(); }
  model::Gpt* cpu() override { return &gpt_; }

 private:
  model::Gpt gpt_;
};

class CudaEngine final : public Engine {
 public:
  CudaEngine(const model::GptConfig& c, std::int64_t B, std::int64_t T, model::CudaPrecision p)
      : gpt_(c, B, T, {.precision = p}) {}
  float forward(const std::int32_t* tokens, const std::int32_t* targets, bool, std::uint64_t) override {
    return gpt_.forward(tokens, targets);
  }
  void backward(float loss_scale) override { gpt_.backward(loss_scale); }
  void zero_grad() override { gpt_.zero_grad(); }
  void synchronize() override { gpt_.synchronize(); }
  std::vector<Param> optimizer_params() override { return gpt_.optimizer_params(); }
  void get_params(float* host) const override { gpt_.get_params(host); }
  void set_params(const float* host) override { gpt_.set_params(host); }
  const model::GptConfig& config() const override { return gpt_.config(); }
  const std::vector<model::ParamTensor>& layout() const override { return gpt_.layout(); }
  std::int64_t batch() const override { return gpt_.batch(); }
  std::int64_t seq() const override { return gpt_.seq(); }
  std::int64_t param_count() const override { return gpt_.param_count(); }
  std::int64_t param_bytes() const override { return gpt_.memory().params; }
  std::int64_t grad_bytes() const override { return gpt_.memory().grads; }
  std::int64_t activation_bytes() const override { return gpt_.memory().activations + gpt_.memory().workspace; }
  model::CudaGpt* cuda() override { return &gpt_; }

 private:
  model::CudaGpt gpt_;
};

struct TrainerState {
  std::int64_t step = 0;
  std::array<std::uint64_t, 4> rng{};
};

// NOTE: the model file is written after the optimizer file, and both carry the step: a crash
// between the two renames leaves a pair whose steps differ, which resume refuses.
void save_checkpoint(const fs::path& dir, const Engine& gpt, const Optimizer& opt, const std::string& vocab,
                     const TrainerState& st, const TrainOptions& o) {
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

float eval_loss(Engine& gpt, const Batches& data, const TrainOptions& o, std::int64_t step,
                std::vector<std::int32_t>& inputs, std::vector<std::int32_t>& targets) {
  // Its own generator, seeded by the step: evaluation never shifts the training batches.
  Rng rng(math::hash_u32(o.seed ^ 0xe7a1ull, static_cast<std::uint64_t>(step)));
  double sum = 0.0;
  for (std::int64_t i = 0; i < o.eval_batches; ++i) {
    data.sample(Split::kValidation, gpt.batch(), gpt.seq(), rng, inputs.data(), targets.data());
    sum += gpt.forward(inputs.data(), targets.data(), false, 0);
  }
  return static_cast<float>(sum / static_cast<double>(o.eval_batches));
}

std::string human_bytes(std::int64_t b) {
  const double v = static_cast<double>(b);
  if (v >= 1024.0 * 1024 * 1024) return fmt::format("{:.2f} GiB", v / (1024.0 * 1024 * 1024));
  if (v >= 1024.0 * 1024) return fmt::format("{:.1f} MiB", v / (1024.0 * 1024));
  return fmt::format("{:.1f} KiB", v / 1024.0);
}

void progress_bar(std::int64_t done, std::int64_t total, double elapsed_s) {
  constexpr int kWidth = 30;
  const double f = total > 0 ? static_cast<double>(done) / static_cast<double>(total) : 0.0;
  const int filled = static_cast<int>(f * kWidth);
  const double eta = done > 0 ? elapsed_s / static_cast<double>(done) * static_cast<double>(total - done) : 0.0;
  std::fprintf(stderr, "\r[%s%s] %3.0f%% step %lld/%lld, eta %.0f s ", std::string(filled, '#').c_str(),
               std::string(kWidth - filled, ' ').c_str(), 100.0 * f, static_cast<long long>(done),
               static_cast<long long>(total), eta);
  std::fflush(stderr);
}

}  // namespace

OptimizerOptions optimizer_options(const TrainOptions& o, std::int64_t T) {
  OptimizerOptions oo;
  oo.algorithm = o.algorithm;
  oo.precision = o.precision;
  Hyper h = default_hyper(o.algorithm);
  if (o.lr) h.lr = *o.lr;
  if (o.weight_decay) h.weight_decay = *o.weight_decay;
  if (o.beta1) h.beta1 = *o.beta1;
  if (o.beta2) h.beta2 = *o.beta2;
  if (o.eps) h.eps = *o.eps;
  if (o.algorithm == Algorithm::kSophiaG) h.batch_tokens = static_cast<float>(o.batch * T * o.accum);
  if (o.algorithm == Algorithm::kAdafactor && o.lr) h.relative_step = false;
  oo.hyper = h;
  oo.max_grad_norm = o.grad_clip;
  oo.no_decay_vectors = true;  // no weight decay for biases and LayerNorm weights
  oo.device = o.device;
  const bool bf16 = o.device == Device::kCuda && o.compute == model::CudaPrecision::kBf16;
  oo.master_weights = bf16 && !o.pure_bf16;
  oo.param_stochastic_rounding = bf16 && o.pure_bf16;
  return oo;
}

MemoryPlan plan_memory(const model::GptConfig& config, std::int64_t batch, std::int64_t seq,
                       const OptimizerOptions& options, model::CudaPrecision compute) {
  model::validate(config);
  if (batch <= 0 || seq <= 0 || seq > config.context)
    throw InvalidArgument(fmt::format("memory plan: batch {} and seq {} must be positive, seq at most the context {}",
                                      batch, seq, config.context));
  MemoryPlan plan;
  const std::int64_t P = model::gpt_param_count(config);
  plan.params = 4 * P;
  plan.grads = 4 * P;
  plan.activations = 4 * model::gpt_activation_floats(config, batch, seq);
  const Hyper hyper = options.hyper ? *options.hyper : default_hyper(options.algorithm);
  double state = 0.0;
  for (const model::ParamTensor& t : model::gpt_param_layout(config)) {
    const std::int64_t numel = shape_numel(t.shape);
    const Precision precision = numel < options.min_quant_size ? Precision::kFp32 : options.precision;
    state += state_bytes_per_element(options.algorithm, hyper, precision, options.block_size, t.shape,
                                     options.rank1_second_moment) *
             static_cast<double>(numel);
  }
  plan.optimizer_state = static_cast<std::int64_t>(std::llround(state));
  if (options.algorithm == Algorithm::kSophiaG) plan.workspace = 4 * P;
  if (options.device == Device::kCuda) {
    const model::CudaGptMemory m = model::cuda_gpt_memory(config, batch, seq, compute);
    plan.params = m.params;
    plan.grads = m.grads;
    plan.activations = m.activations;
    plan.workspace = m.workspace;
    // fp32 master weights of bf16 parameters (of tensors with numel > 0: every GPT tensor).
    if (options.master_weights && compute == model::CudaPrecision::kBf16) plan.optimizer_state += 4 * P;
  }
  return plan;
}

TrainSummary train(const TrainOptions& o, const std::function<void(const StepLog&)>& on_step) {
  const auto run_start = Clock::now();
  validate_options(o);
  const Batches data(o);
  const std::string vocab = data.vocab_metadata();
  const model::GptConfig config = make_config(o, data.vocab());
  const std::int64_t T = o.seq > 0 ? o.seq : config.context;
  const OptimizerOptions oo = optimizer_options(o, T);
  const MemoryPlan plan = plan_memory(config, o.batch, T, oo, o.compute);
  if (o.memory_limit > 0 && plan.total() > o.memory_limit)
    throw OutOfMemory(fmt::format("out of memory: the run needs {} (params {}, grads {}, optimizer state {}, "
                                  "activations {}, workspace {}) but the limit is {}",
                                  human_bytes(plan.total()), human_bytes(plan.params), human_bytes(plan.grads),
                                  human_bytes(plan.optimizer_state), human_bytes(plan.activations),
                                  human_bytes(plan.workspace), human_bytes(o.memory_limit)),
                      plan.total(), o.memory_limit);
  std::unique_ptr<Engine> engine;
  if (o.device == Device::kCuda) engine = std::make_unique<CudaEngine>(config, o.batch, T, o.compute);
  else engine = std::make_unique<CpuEngine>(config, o.batch, T);
  Engine& gpt = *engine;
  {
    std::vector<float> initial(static_cast<std::size_t>(gpt.param_count()));
    model::gpt_init_params(config, gpt.layout(), initial.data(), o.seed);
    gpt.set_params(initial.data());
  }

  OptimizerOptions engine_oo = oo;
  // On CUDA the optimizer queues its steps on the engine's stream, ordered after the backward.
  if (gpt.cuda() != nullptr) engine_oo.cuda_stream = gpt.cuda()->stream();
  Optimizer opt({ParamGroup{gpt.optimizer_params(), {}, {}, {}}}, engine_oo);

  Schedule schedule;
  schedule.kind = o.schedule;
  schedule.total_steps = o.steps;
  schedule.warmup_steps = std::min(o.warmup, o.steps);
  schedule.min_factor = o.min_lr_ratio;
  schedule.validate();

  TrainerState st;
  Rng rng(o.seed);
  if (o.resume) {
    const SafetensorsFile f = open_model_file(o.checkpoint_dir);
    const fs::path file = o.checkpoint_dir / "model.safetensors";
    const model::GptConfig saved = config_from_metadata(f.metadata, file);
    if (saved.layers != config.layers || saved.heads != config.heads || saved.width != config.width ||
        saved.context != config.context || saved.vocab != config.vocab)
      throw StateMismatch(fmt::format("{}: the checkpoint's model ({} layers, {} heads, width {}, context {}, vocab {}) "
                                      "differs from this run's ({}, {}, {}, {}, {})",
                                      file.string(), saved.layers, saved.heads, saved.width, saved.context, saved.vocab,
                                      config.layers, config.heads, config.width, config.context, config.vocab));
    if (f.metadata.at("vocab_bytes") != vocab)
      throw StateMismatch(fmt::format("{}: the checkpoint's vocabulary differs from this data's", file.string()));
    const std::int64_t step = parse_int(f.metadata, "step", file);
    if (step < 0 || step > o.steps)
      throw FormatError(fmt::format("{}: step {} is outside [0, {}]", file.string(), step, o.steps));
    std::array<std::uint64_t, 4> rs{};
    for (int i = 0; i < 4; ++i) rs[static_cast<std::size_t>(i)] = parse_u64(f.metadata, fmt::format("rng{}", i), file);
    // Everything is checked before anything is changed; the optimizer checks its own file.
    std::vector<float> params(static_cast<std::size_t>(gpt.param_count()));
    read_params(f, file, gpt.layout(), params.data());
    opt.load(o.checkpoint_dir / "optimizer.safetensors");
    if (opt.step_count() + opt.skipped_steps() != step)
      throw StateMismatch(fmt::format("{}: model is at step {} but the optimizer file at {}", file.string(), step,
                                      opt.step_count() + opt.skipped_steps()));
    gpt.set_params(params.data());
    st.step = step;
    rng.set_state(rs);
  }

  std::ofstream csv;
  if (!o.log_csv.empty()) {
    csv.open(o.log_csv, o.resume ? std::ios::app : std::ios::trunc);
    if (!csv) throw IoError(fmt::format("cannot open log file '{}'", o.log_csv.string()));
    if (!o.resume) csv << "step,loss,lr,grad_norm,ms,optimizer_ms,tokens_per_s,skipped,val_loss\n";
  }

  TrainSummary sum;
  sum.plan = plan;
  sum.param_bytes = gpt.param_bytes();
  sum.grad_bytes = gpt.grad_bytes();
  sum.state_bytes = opt.state_stats().state_bytes;
  sum.activation_bytes = gpt.activation_bytes();
  if (!o.quiet) {
    fmt::print("model: {} layers, {} heads, width {}, context {}, vocab {}: {} parameters\n", config.layers,
               config.heads, config.width, config.context, config.vocab, gpt.param_count());
    fmt::print("data: {}\n", data.describe());
    fmt::print("optimizer: {} with {} state; batch {} x {} tokens x {} accumulation\n", algorithm_name(o.algorithm),
               precision_name(o.precision), o.batch, T, o.accum);
    fmt::print("memory: params {}, grads {}, optimizer state {}, activations {}; total {}\n",
               human_bytes(sum.param_bytes), human_bytes(sum.grad_bytes), human_bytes(sum.state_bytes),
               human_bytes(sum.activation_bytes),
               human_bytes(sum.param_bytes + sum.grad_bytes + sum.state_bytes + sum.activation_bytes));
  }

  const std::int64_t BT = o.batch * T;
  std::vector<std::int32_t> inputs(static_cast<std::size_t>(BT)), targets(inputs.size()), sampled(inputs.size());
  // In a Buffer, so that the measured memory of a run sees it like the plan does.
  Buffer hessian_buffer(o.algorithm == Algorithm::kSophiaG ? static_cast<std::size_t>(plan.workspace) : 0);
  const std::span<float> hessian(reinterpret_cast<float*>(hessian_buffer.data()),
                                 o.algorithm == Algorithm::kSophiaG ? static_cast<std::size_t>(gpt.param_count()) : 0);
  // CUDA: the whole step (micro-batches, backward, optimizer) as one captured graph.
  std::unique_ptr<model::CudaTrainStep> graph_step;
  std::vector<std::int32_t> all_inputs, all_targets;
  std::vector<float> micro_losses;
  if (gpt.cuda() != nullptr && o.cuda_graph) {
    graph_step = std::make_unique<model::CudaTrainStep>(*gpt.cuda(), opt, o.accum);
    all_inputs.resize(static_cast<std::size_t>(BT * o.accum));
    all_targets.resize(all_inputs.size());
  }
  const bool tty = !o.quiet && ::isatty(STDERR_FILENO) != 0;
  double total_ms = 0.0, total_opt_ms = 0.0;
  std::int64_t timed_tokens = 0;
  const auto start = Clock::now();
  const std::int64_t first_step = st.step;

  // Everything after a step's work: counters, timing, evaluation, logging, checkpoints, stopping.
  bool stop = false;
  auto finish_step = [&](StepLog& log, Clock::time_point t0, Clock::time_point t1, Clock::time_point t2) {
    ++st.step;
    const auto t3 = Clock::now();
    log.ms = std::chrono::duration<double, std::milli>(t3 - t0).count();
    log.optimizer_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
    log.tokens_per_s = static_cast<double>(BT * o.accum) / (log.ms * 1e-3);
    total_ms += log.ms;
    total_opt_ms += log.optimizer_ms;
    timed_tokens += BT * o.accum;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const bool out_of_time = o.time_budget_s > 0.0 && elapsed >= o.time_budget_s;
    const bool last = st.step == o.steps || out_of_time;
    bool reached = false;
    if ((o.eval_every > 0 && st.step % o.eval_every == 0) || last) {
      log.val_loss = eval_loss(gpt, data, o, st.step, inputs, targets);
      sum.last_val_loss = log.val_loss;
      reached = o.target_val_loss && *log.val_loss <= *o.target_val_loss;
      sum.reached_target = sum.reached_target || reached;
    }
    log.elapsed_s = std::chrono::duration<double>(Clock::now() - run_start).count();
    sum.last_loss = log.loss;
    if (tty) std::fprintf(stderr, "\r\033[K");
    if (!o.quiet) {
      fmt::print("step {:>6} | loss {:.4f} | lr {:.3e} | norm {:.3f} | {:.1f} ms | {:.0f} tok/s{}{}\n", log.step,
                 log.loss, log.lr, log.grad_norm, log.ms, log.tokens_per_s, log.skipped ? " | skipped" : "",
                 log.val_loss ? fmt::format(" | val {:.4f}", *log.val_loss) : std::string());
      std::fflush(stdout);
    }
    if (tty) progress_bar(st.step - first_step, o.steps - first_step, elapsed);
    if (csv.is_open()) {
      csv << fmt::format("{},{},{},{},{:.3f},{:.3f},{:.1f},{},{}\n", log.step, log.loss, log.lr, log.grad_norm, log.ms,
                         log.optimizer_ms, log.tokens_per_s, log.skipped ? 1 : 0,
                         log.val_loss ? fmt::format("{}", *log.val_loss) : std::string());
      csv.flush();
    }
    if (on_step) on_step(log);
    if (o.save_every > 0 && (st.step % o.save_every == 0 || last || reached)) {
      st.rng = rng.state();
      save_checkpoint(o.checkpoint_dir, gpt, opt, vocab, st, o);
    }
    stop = out_of_time || reached;
  };
  if (st.step == 0) sum.first_val_loss = eval_loss(gpt, data, o, 0, inputs, targets);
  sum.setup_s = std::chrono::duration<double>(Clock::now() - run_start).count();
  while (st.step < o.steps) {
    const auto t0 = Clock::now();
    if (graph_step) {
      for (std::int64_t micro = 0; micro < o.accum; ++micro)
        data.sample(Split::kTrain, o.batch, T, rng, all_inputs.data() + micro * BT, all_targets.data() + micro * BT);
      StepLog log;
      log.step = st.step + 1;
      const float factor = schedule.factor(st.step);
      log.lr = opt.hyper().lr * factor;
      StepResult r;
      log.loss = graph_step->run(all_inputs.data(), all_targets.data(), factor, r);
      log.grad_norm = r.grad_norm;
      log.skipped = r.skipped;
      finish_step(log, t0, t0, t0);  // the optimizer's time is inside the graph: not measured apart
      if (stop) break;
      continue;
    }
    gpt.zero_grad();
    micro_losses.clear();
    for (std::int64_t micro = 0; micro < o.accum; ++micro) {
      data.sample(Split::kTrain, o.batch, T, rng, inputs.data(), targets.data());
      const std::uint64_t dropout_seed = math::hash_u32(o.seed, static_cast<std::uint64_t>(st.step * o.accum + micro));
      micro_losses.push_back(gpt.forward(inputs.data(), targets.data(), true, dropout_seed));
      gpt.backward(1.0f / static_cast<float>(o.accum));
    }
    StepLog log;
    log.step = st.step + 1;
    log.loss = model::step_loss(micro_losses);
    const float factor = schedule.factor(st.step);
    log.lr = opt.hyper().lr * factor;
    gpt.synchronize();  // the backward is queued on a GPU: the optimizer's time starts after it
    const auto t1 = Clock::now();
    const StepResult r = opt.step({.grad_scale = 1.0f, .lr_scale = factor});
    const auto t2 = Clock::now();
    log.grad_norm = r.grad_norm;
    log.skipped = r.skipped;
    if (o.algorithm == Algorithm::kSophiaG && st.step % o.hessian_every == 0) {
      // Gauss-Newton-Bartlett: the gradient of the loss on labels drawn from the model's own
      // softmax, squared, estimates the Hessian diagonal (Liu et al., arXiv 2305.14342).
      Rng label_rng(math::hash_u32(o.seed ^ 0x50f1aull, static_cast<std::uint64_t>(st.step)));
      model::Gpt& cpu = *gpt.cpu();  // validate_options keeps SophiaG on the CPU engine
      cpu.zero_grad();
      cpu.forward(inputs.data(), nullptr, false);
      const float* probs = cpu.probs();
      const std::int64_t V = config.vocab;
      for (std::int64_t i = 0; i < BT; ++i) {
        const float u = label_rng.uniform();
        float acc = 0.0f;
        std::int32_t pick = static_cast<std::int32_t>(V - 1);
        for (std::int64_t v = 0; v < V; ++v) {
          acc += probs[i * V + v];
          if (u < acc) {
            pick = static_cast<std::int32_t>(v);
            break;
          }
        }
        sampled[static_cast<std::size_t>(i)] = pick;
      }
      cpu.backward(1.0f, sampled.data());
      const float* g = cpu.grads();
      for (std::size_t i = 0; i < hessian.size(); ++i) hessian[i] = g[i] * g[i];
      std::vector<const float*> estimates;
      for (const model::ParamTensor& t : gpt.layout()) estimates.push_back(hessian.data() + t.offset);
      opt.update_hessian(estimates);
    }
    finish_step(log, t0, t1, t2);
    if (stop) break;
  }
  if (tty) std::fprintf(stderr, "\r\033[K");
  sum.steps = st.step;
  sum.tokens_per_s = total_ms > 0.0 ? static_cast<double>(timed_tokens) / (total_ms * 1e-3) : 0.0;
  sum.optimizer_share = total_ms > 0.0 ? total_opt_ms / total_ms : 0.0;
  return sum;
}

LoadedModel load_model(const fs::path& dir) {
  const SafetensorsFile f = open_model_file(dir);
  const fs::path file = dir / "model.safetensors";
  LoadedModel m;
  m.config = config_from_metadata(f.metadata, file);
  const auto it = f.metadata.find("vocab_bytes");
  if (it == f.metadata.end()) throw FormatError(fmt::format("{}: metadata 'vocab_bytes' is missing", file.string()));
  m.vocab_metadata = it->second;
  m.params.resize(static_cast<std::size_t>(model::gpt_param_count(m.config)));
  read_params(f, file, model::gpt_param_layout(m.config), m.params.data());
  return m;
}

}  // namespace nibble::train
