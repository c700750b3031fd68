// `nibble train`: train the GPT on a text file (or the default corpus) with any nibble optimizer,
// and `nibble sample`: generate text from a training checkpoint.
#include <fmt/format.h>
#include <omp.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "cli/flags.hpp"
#include "model/gpt.hpp"
#include "nibble/algorithms.hpp"
#include "nibble/error.hpp"
#include "nibble/rng.hpp"
#include "train/checkpoint.hpp"
#include "train/data.hpp"
#include "train/trainer.hpp"

namespace nibble::cli {
namespace {

struct TrainFlags {
  train::TrainOptions o;
  std::string algorithm = "adamw";
  std::string precision = "fp32";
  std::optional<std::string> schedule;  // unset: cosine, or constant for schedule-free AdamW
  std::string device = "cpu";
  std::string compute = "fp32";
  std::string gelu = "tanh";
  bool no_bias = false;
  bool no_cuda_graph = false;
  std::string data, checkpoint_dir, log_csv;
  std::optional<std::int64_t> layers, heads, width, context;
  std::optional<float> lr, weight_decay, beta1, beta2, eps;
  std::vector<std::string> hyper;  // NAME=VALUE
  int threads = 0;
};

void run_train(TrainFlags& f) {
  train::TrainOptions& o = f.o;
  const auto algorithm = algorithm_from_name(f.algorithm);
  if (!algorithm) throw InvalidArgument(fmt::format("unknown optimizer '{}'", f.algorithm));
  const auto precision = precision_from_name(f.precision);
  if (!precision) throw InvalidArgument(fmt::format("unknown state precision '{}'", f.precision));
  o.algorithm = *algorithm;
  o.precision = *precision;
  if (f.device == "cpu") o.device = Device::kCpu;
  else if (f.device == "cuda") o.device = Device::kCuda;
  else throw InvalidArgument(fmt::format("unknown device '{}' (known: cpu, cuda)", f.device));
  if (f.compute == "fp32") o.compute = model::CudaPrecision::kFp32;
  else if (f.compute == "bf16") o.compute = model::CudaPrecision::kBf16;
  else throw InvalidArgument(fmt::format("unknown compute precision '{}' (known: fp32, bf16)", f.compute));
  o.cuda_graph = !f.no_cuda_graph;
  o.bias = !f.no_bias;
  o.gelu = model::gelu_from_name(f.gelu);
  o.schedule = schedule_from_name(f.schedule.value_or(o.algorithm == Algorithm::kAdamWScheduleFree ? "constant" : "cosine"));
  if (f.layers) o.layers = *f.layers;
  if (f.heads) o.heads = *f.heads;
  if (f.width) o.width = *f.width;
  if (f.context) o.context = *f.context;
  if (f.lr) o.lr = *f.lr;
  if (f.weight_decay) o.weight_decay = *f.weight_decay;
  if (f.beta1) o.beta1 = *f.beta1;
  if (f.beta2) o.beta2 = *f.beta2;
  if (f.eps) o.eps = *f.eps;
  for (const std::string& item : f.hyper) {
    const std::size_t eq = item.find('=');
    double value = 0.0;
    const char* end = item.data() + item.size();
    const auto [at, ec] = eq == std::string::npos ? std::from_chars(end, end, value)
                                                  : std::from_chars(item.data() + eq + 1, end, value);
    // A hyperparameter with named choices (Muon's adjust_lr) also takes a choice's name.
    const HyperField* field = eq == std::string::npos ? nullptr : find_hyper_field(item.substr(0, eq));
    if (field != nullptr && !field->choices.empty() && (ec != std::errc() || at != end)) {
      o.hyper.emplace_back(item.substr(0, eq), hyper_choice(*field, item.substr(eq + 1)));
      continue;
    }
    if (eq == std::string::npos || eq == 0 || ec != std::errc() || at != end || !std::isfinite(value))
      throw InvalidArgument(fmt::format("--hyper takes NAME=VALUE with a finite number, got '{}'", item));
    o.hyper.emplace_back(item.substr(0, eq), value);
  }
  o.data = f.data;
  o.checkpoint_dir = f.checkpoint_dir;
  o.log_csv = f.log_csv;
  if (f.threads > 0) omp_set_num_threads(f.threads);
  const train::TrainSummary s = train::train(o);
  fmt::print("done: {} steps, {:.0f} tokens/s, optimizer {:.1f}% of step time", s.steps, s.tokens_per_s,
             100.0 * s.optimizer_share);
  if (s.first_val_loss && s.last_val_loss)
    fmt::print(", validation loss {:.4f} -> {:.4f}", *s.first_val_loss, *s.last_val_loss);
  fmt::print("\n");
}

struct SampleFlags {
  std::string checkpoint_dir;
  std::string prompt = "\n";
  std::int64_t tokens = 200;
  float temperature = 1.0f;
  int top_k = 0;
  std::uint64_t seed = 0;
};

void run_sample(const SampleFlags& f) {
  if (!(f.temperature > 0.0f) || !std::isfinite(f.temperature))
    throw InvalidArgument(fmt::format("temperature must be finite and > 0, got {}", f.temperature));
  if (f.top_k < 0) throw InvalidArgument(fmt::format("top-k must be >= 0, got {}", f.top_k));
  const train::LoadedModel m = train::load_model(f.checkpoint_dir);
  if (m.vocab_metadata.starts_with("random:"))
    throw InvalidArgument(fmt::format("{} was trained on random tokens ({}): it has no text vocabulary to sample with",
                                      f.checkpoint_dir, m.vocab_metadata));
  const train::CharTokenizer tok = train::CharTokenizer::from_metadata(m.vocab_metadata);
  if (tok.size() != m.config.vocab)
    throw FormatError(fmt::format("checkpoint vocabulary has {} entries, the model {}", tok.size(), m.config.vocab));
  std::vector<std::int32_t> ids = tok.encode(f.prompt);
  if (ids.empty()) throw InvalidArgument("the prompt is empty");
  const std::int64_t T = m.config.context, V = m.config.vocab;
  model::Gpt gpt(m.config, 1, T);
  std::copy(m.params.begin(), m.params.end(), gpt.params());
  Rng rng(f.seed);
  std::vector<std::int32_t> window(static_cast<std::size_t>(T), 0);
  std::vector<float> p(static_cast<std::size_t>(V));
  std::vector<std::int32_t> order(static_cast<std::size_t>(V));
  fmt::print("{}", f.prompt);
  for (std::int64_t n = 0; n < f.tokens; ++n) {
    // The last T tokens, left-aligned: causal attention makes the padding after them irrelevant.
    const std::int64_t len = std::min<std::int64_t>(T, static_cast<std::int64_t>(ids.size()));
    std::fill(window.begin(), window.end(), 0);
    std::copy(ids.end() - len, ids.end(), window.begin());
    gpt.forward(window.data(), nullptr, false);
    const float* logits = gpt.logits() + (len - 1) * V;
    float top = -INFINITY;
    for (std::int64_t v = 0; v < V; ++v) top = std::max(top, logits[v] / f.temperature);
    double total = 0.0;
    for (std::int64_t v = 0; v < V; ++v) total += p[static_cast<std::size_t>(v)] = std::exp(logits[v] / f.temperature - top);
    if (f.top_k > 0 && f.top_k < V) {
      std::iota(order.begin(), order.end(), 0);
      std::nth_element(order.begin(), order.begin() + f.top_k, order.end(),
                       [&](std::int32_t a, std::int32_t b) { return p[static_cast<std::size_t>(a)] > p[static_cast<std::size_t>(b)]; });
      for (std::size_t i = static_cast<std::size_t>(f.top_k); i < order.size(); ++i) {
        total -= p[static_cast<std::size_t>(order[i])];
        p[static_cast<std::size_t>(order[i])] = 0.0f;
      }
    }
    const double u = static_cast<double>(rng.uniform()) * total;
    double acc = 0.0;
    std::int32_t pick = 0;
    for (std::int64_t v = 0; v < V; ++v) {
      acc += p[static_cast<std::size_t>(v)];
      if (p[static_cast<std::size_t>(v)] > 0.0f) pick = static_cast<std::int32_t>(v);
      if (u < acc) break;
    }
    ids.push_back(pick);
    const std::int32_t one[1] = {pick};
    fmt::print("{}", tok.decode(one));
    std::fflush(stdout);
  }
  fmt::print("\n");
}

}  // namespace

void add_train_command(CLI::App& app) {
  auto f = std::make_shared<TrainFlags>();
  CLI::App* sub = app.add_subcommand(
      "train", "Train a character-level GPT from scratch on a text file (default: the fortunes corpus) with any "
               "nibble optimizer and state precision.");
  train::TrainOptions& o = f->o;
  sub->add_option("--preset", o.preset, fmt::format("Model size: {}", model::gpt_preset_names()))->capture_default_str();
  sub->add_option("--layers", f->layers, "Override the preset's number of layers")->check(positive());
  sub->add_option("--heads", f->heads, "Override the preset's attention heads (must divide the width)")->check(positive());
  sub->add_option("--width", f->width, "Override the preset's width (channels)")->check(positive());
  sub->add_option("--context", f->context, "Override the preset's context length")->check(positive());
  sub->add_option("--dropout", o.dropout, "Dropout on embeddings and residual branches, in [0, 1)")->check(fraction_below_one())->capture_default_str();
  sub->add_flag("--no-bias", f->no_bias,
               "No biases in the Linear and LayerNorm layers, as nanoGPT's train.py trains its GPT (CPU engine)");
  sub->add_option("--gelu", f->gelu,
                  "The MLP's GELU: tanh (GPT-2's approximation) or exact (erf, PyTorch's and nanoGPT's; CPU engine)")
      ->capture_default_str();
  sub->add_option("--data", f->data, "Text file to train on (default: the `fortunes` package's text)");
  sub->add_option("--random-vocab", o.random_vocab,
                  "Train on uniformly random tokens from a vocabulary of this size instead of text (throughput "
                  "runs at a real vocabulary, e.g. 50304); 0: text")
      ->check(number_in(0, false, 2147483647, false))
      ->capture_default_str();
  sub->add_option("--val-fraction", o.val_fraction, "Last fraction of the text kept for validation")->check(number_in(0.0, true, 1.0, true))->capture_default_str();
  sub->add_option("--device", f->device,
                  "cpu, or cuda: the CUDA engine (a build with CUDA and a GPU; no dropout, no sophiag yet)")
      ->capture_default_str();
  sub->add_option("--compute", f->compute,
                  "CUDA engine precision: fp32 (checks against the CPU engine) or bf16 (bf16 activations and "
                  "parameters, the optimizer stepping fp32 master weights)")
      ->capture_default_str();
  sub->add_flag("--pure-bf16", o.pure_bf16,
                "With --compute bf16: keep no fp32 master weights; the optimizer rounds the bf16 parameters "
                "stochastically (half the parameter memory of master weights)");
  sub->add_flag("--no-cuda-graph", f->no_cuda_graph,
                "CUDA: run every step eagerly instead of replaying one captured CUDA graph (measures the "
                "optimizer's share of the step apart)");
  sub->add_option("--optimizer", f->algorithm, algorithm_names())->capture_default_str();
  sub->add_option("--precision", f->precision, "Optimizer state precision: " + precision_names())->capture_default_str();
  sub->add_option("--lr", f->lr, "Peak learning rate (default: the optimizer's)")->check(positive());
  sub->add_option("--weight-decay", f->weight_decay, "Weight decay (default: the optimizer's); none on vectors")->check(non_negative());
  sub->add_option("--beta1", f->beta1, "beta1 (default: the optimizer's)")->check(fraction_below_one());
  sub->add_option("--beta2", f->beta2, "beta2 (default: the optimizer's)")->check(fraction_below_one());
  sub->add_option("--eps", f->eps, "epsilon (default: the optimizer's)")->check(positive());
  sub->add_option("--hyper", f->hyper,
                  "Any other hyperparameter the optimizer reads, NAME=VALUE, comma-separated (e.g. "
                  "alpha=5,beta3_warmup=1000 for ademamix; flags 0 or 1; a choice by name, e.g. "
                  "adjust_lr=match_rms_adamw for muon). Names: " + hyper_field_names())
      ->delimiter(',')
      ->option_text("NAME=VALUE");
  sub->add_option("--schedule", f->schedule,
                  "Learning-rate schedule: constant, cosine, onecycle, linear (default: cosine; constant for "
                  "adamw_schedulefree, which needs no schedule)");
  sub->add_option("--warmup", o.warmup,
                  "Linear warm-up steps (cosine, linear; adamw_schedulefree with a constant schedule: its own "
                  "warmup_steps, unless --hyper sets them)")->check(non_negative())->capture_default_str();
  sub->add_option("--min-lr-ratio", o.min_lr_ratio, "Floor of the decay as a fraction of the peak lr")->check(unit_interval())->capture_default_str();
  sub->add_option("--grad-clip", o.grad_clip, "Clip gradients to this global norm; 0: off")->check(non_negative())->capture_default_str();
  sub->add_option("--hessian-every", o.hessian_every, "SophiaG: Gauss-Newton-Bartlett Hessian estimate every k steps")->check(at_least(1))->capture_default_str();
  sub->add_option("--batch", o.batch, "Sequences per micro-batch")->check(at_least(1))->capture_default_str();
  sub->add_option("--seq", o.seq, "Tokens per sequence; 0: the model's context")->check(non_negative())->capture_default_str();
  sub->add_option("--accum", o.accum, "Micro-batches accumulated per optimizer step")->check(at_least(1))->capture_default_str();
  sub->add_option("--steps", o.steps, "Optimizer steps (also the schedule's length)")->check(at_least(1))->capture_default_str();
  sub->add_option("--time-budget", o.time_budget_s, "Stop after this many seconds of training; 0: no limit")->check(non_negative())->capture_default_str();
  sub->add_option("--eval-every", o.eval_every, "Validation loss every N steps (and at the end); 0: only at the end")->check(non_negative())->capture_default_str();
  sub->add_option("--eval-batches", o.eval_batches, "Validation batches per evaluation")->check(at_least(1))->capture_default_str();
  sub->add_option("--seed", o.seed, "Seed of initialisation, batches and dropout")->check(non_negative())->capture_default_str();
  sub->add_option("--checkpoint-dir", f->checkpoint_dir, "Directory of model.safetensors + optimizer.safetensors");
  sub->add_option("--save-every", o.save_every, "Write a checkpoint every N steps (and at the end); 0: never")->check(non_negative())->capture_default_str();
  sub->add_flag("--resume", o.resume, "Continue the run saved in --checkpoint-dir, bit for bit");
  sub->add_option("--log-csv", f->log_csv, "Also write every step's log line to this CSV file");
  sub->add_option("--threads", f->threads, "OpenMP threads; 0 keeps OpenMP's default")->check(number_in(0, false, 4096, false));
  sub->footer("Each step prints step, loss, lr, gradient norm, ms and tokens/s; a progress bar shows on a terminal.");
  sub->callback([f] { run_train(*f); });

  auto s = std::make_shared<SampleFlags>();
  CLI::App* sample = app.add_subcommand("sample", "Generate text from a `nibble train` checkpoint.");
  sample->add_option("--checkpoint-dir", s->checkpoint_dir, "Checkpoint directory written by nibble train")->required();
  sample->add_option("--prompt", s->prompt, "Text to start from (its characters must be in the vocabulary)");
  sample->add_option("--tokens", s->tokens, "Characters to generate")->check(at_least(1))->capture_default_str();
  sample->add_option("--temperature", s->temperature, "Softmax temperature, > 0")->check(positive())->capture_default_str();
  sample->add_option("--top-k", s->top_k, "Sample among the k most likely characters; 0: all")->check(non_negative())->capture_default_str();
  sample->add_option("--seed", s->seed, "Seed of the sampling")->check(non_negative())->capture_default_str();
  sample->callback([s] { run_sample(*s); });
}

}  // namespace nibble::cli
