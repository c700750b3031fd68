// The training loop: batches from a text dataset through the GPT's forward and backward passes
// into any nibble optimizer, with a schedule, clipping, accumulation, evaluation, logging and
// checkpoints that resume a run bit for bit (train/checkpoint.hpp; the plan: train/memory_plan.hpp).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "model/gpt.hpp"
#include "model/gpt_cuda.hpp"
#include "nibble/optim.hpp"
#include "nibble/schedule.hpp"
#include "train/memory_plan.hpp"

namespace nibble::train {

struct TrainOptions {
  std::string preset = "char";
  std::optional<std::int64_t> layers, heads, width, context;  // override the preset
  float dropout = 0.0f;
  bool bias = true;                      // false: no biases in the Linear and LayerNorm layers (nanoGPT's)
  model::Gelu gelu = model::Gelu::kTanh;
  std::filesystem::path data;  // empty: the default corpus (the fortunes package)
  // > 0: no text; uniformly random tokens from a vocabulary of this size (throughput runs at a
  // real model's vocabulary, e.g. 50304 for the GPT-2 shape).
  std::int64_t random_vocab = 0;
  double val_fraction = 0.1;

  Algorithm algorithm = Algorithm::kAdamW;
  Precision precision = Precision::kFp32;
  std::optional<float> lr, weight_decay, beta1, beta2, eps;  // unset: the algorithm's defaults
  // Any other hyperparameter the algorithm reads, by its name in nibble::hyper_fields() (flags: 0
  // or 1), applied after the ones above.
  std::vector<std::pair<std::string, double>> hyper;
  ScheduleKind schedule = ScheduleKind::kWarmupCosine;  // `nibble train`: constant for adamw_schedulefree
  std::int64_t warmup = 100;
  float min_lr_ratio = 0.1f;
  float grad_clip = 1.0f;  // 0: off
  std::int64_t hessian_every = 10;  // SophiaG: Gauss-Newton-Bartlett estimate every k steps

  // cpu: the CPU engine. cuda: the CUDA engine, in fp32 (checks against the CPU) or bf16
  // (activations and parameters in bf16, the optimizer stepping fp32 master weights).
  Device device = Device::kCpu;
  model::CudaPrecision compute = model::CudaPrecision::kFp32;
  bool cuda_graph = true;  // CUDA: capture the whole step in a CUDA graph after one eager step
  bool pure_bf16 = false;  // bf16 compute: no fp32 master weights; bf16 parameters rounded stochastically

  std::int64_t batch = 16;
  std::int64_t seq = 0;  // 0: the model's context
  std::int64_t accum = 1;
  std::int64_t steps = 1000;
  double time_budget_s = 0.0;  // > 0: stop once this much training time has passed
  std::optional<float> target_val_loss;  // stop at the first evaluation at or below it
  // > 0: refuse (OutOfMemory) before allocating anything when the memory plan exceeds it.
  std::int64_t memory_limit = 0;
  std::int64_t eval_every = 100;  // 0: only at the end
  std::int64_t eval_batches = 8;
  std::uint64_t seed = 1337;

  std::filesystem::path checkpoint_dir;  // where --save-every writes, and what --resume reads
  std::int64_t save_every = 0;
  bool resume = false;
  std::filesystem::path log_csv;  // empty: no CSV
  bool quiet = false;             // no per-step lines (tests)
};

struct StepLog {
  std::int64_t step = 0;
  float loss = 0.0f;
  float lr = 0.0f;
  double grad_norm = 0.0;
  double ms = 0.0;
  double optimizer_ms = 0.0;
  double tokens_per_s = 0.0;
  double elapsed_s = 0.0;  // since the run started (set-up and evaluations included)
  bool skipped = false;
  std::optional<float> val_loss;
};

struct TrainSummary {
  std::int64_t steps = 0;
  double setup_s = 0.0;  // data, model, optimizer and the first evaluation, before step 1
  bool reached_target = false;
  MemoryPlan plan;
  float last_loss = 0.0f;
  std::optional<float> first_val_loss, last_val_loss;
  double tokens_per_s = 0.0;     // over all timed steps
  double optimizer_share = 0.0;  // of step time
  std::int64_t param_bytes = 0, grad_bytes = 0, state_bytes = 0, activation_bytes = 0;
};

// Runs training; `on_step` (optional) sees every step's log. Throws nibble::Error on bad options,
// data or checkpoints, before anything is written.
TrainSummary train(const TrainOptions& options, const std::function<void(const StepLog&)>& on_step = {});

}  // namespace nibble::train
