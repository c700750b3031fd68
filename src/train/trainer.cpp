// The training loop: batches through the engine's forward and backward (or the captured CUDA
// step) into the optimizer, with the schedule, evaluation, Sophia's Gauss-Newton-Bartlett Hessian
// estimates, log lines and checkpoints. Engines, checkpoints and the memory plan have files of their own.
#include "train/trainer.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <vector>

#include "math/common.hpp"
#include "model/loss.hpp"
#include "nibble/device.hpp"
#include "nibble/error.hpp"
#include "nibble/rng.hpp"
#include "train/checkpoint.hpp"
#include "train/cuda/train_step.hpp"
#include "train/data.hpp"
#include "train/engine.hpp"
#include "train/optimizer_setup.hpp"

namespace nibble::train {
namespace {

using Clock = std::chrono::steady_clock;

model::GptConfig make_config(const TrainOptions& o, std::int64_t vocab) {
  model::GptConfig c = model::gpt_preset(o.preset);
  if (o.layers) c.layers = *o.layers;
  if (o.heads) c.heads = *o.heads;
  if (o.width) c.width = *o.width;
  if (o.context) c.context = *o.context;
  c.vocab = vocab;
  c.dropout = o.dropout;
  c.bias = o.bias;
  c.gelu = o.gelu;
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
    if (!o.bias || o.gelu != model::Gelu::kTanh)
      throw InvalidArgument("--no-bias and --gelu exact are for the CPU engine; the CUDA engine trains GPT-2's model "
                            "(biases, tanh GELU)");
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

TrainSummary train(const TrainOptions& o, const std::function<void(const StepLog&)>& on_step) {
  const auto run_start = Clock::now();
  validate_options(o);
  const Batches data(o.random_vocab, o.data, o.seq > 0 ? o.seq : model::gpt_preset(o.preset).context,
                     o.val_fraction);
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
  const std::unique_ptr<Engine> engine = make_engine(o.device, config, o.batch, T, o.compute);
  Engine& gpt = *engine;
  {
    std::vector<float> initial(static_cast<std::size_t>(gpt.param_count()));
    model::gpt_init_params(config, gpt.layout(), initial.data(), o.seed);
    gpt.set_params(initial.data());
  }

  OptimizerOptions engine_oo = oo;
  // On CUDA the optimizer queues its steps on the engine's stream, ordered after the backward.
  if (gpt.cuda() != nullptr) engine_oo.cuda_stream = gpt.cuda()->stream();
  Optimizer opt(optimizer_param_groups(gpt.tensors()), engine_oo);

  Schedule schedule;
  schedule.kind = o.schedule;
  schedule.total_steps = o.steps;
  schedule.warmup_steps = std::min(o.warmup, o.steps);
  schedule.min_factor = o.min_lr_ratio;
  schedule.validate();

  RunPosition st;
  Rng rng(o.seed);
  if (o.resume) {
    st = resume_from_checkpoint(o.checkpoint_dir, config, vocab, o.steps, gpt, opt);
    rng.set_state(st.rng);
    opt.train();  // a finished run's checkpoint holds x (schedule-free AdamW): step from y
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
  std::unique_ptr<CudaTrainStep> graph_step;
  std::vector<std::int32_t> all_inputs, all_targets;
  std::vector<float> micro_losses;
  if (gpt.cuda() != nullptr && o.cuda_graph) {
    graph_step = std::make_unique<CudaTrainStep>(*gpt.cuda(), opt, o.accum);
    all_inputs.resize(static_cast<std::size_t>(BT * o.accum));
    all_targets.resize(all_inputs.size());
  }
  const bool tty = !o.quiet && ::isatty(STDERR_FILENO) != 0;
  double total_ms = 0.0, total_opt_ms = 0.0;
  std::int64_t timed_tokens = 0;
  const auto start = Clock::now();
  const std::int64_t first_step = st.step;

  // The lr step `step` (from 0) takes: the schedule's, and schedule-free AdamW's own warm-up.
  auto step_lr = [&](std::int64_t step, float factor) {
    const double warmup = opt.hyper().warmup_steps;
    const double own = o.algorithm == Algorithm::kAdamWScheduleFree && static_cast<double>(step) < warmup
                           ? static_cast<double>(step + 1) / warmup
                           : 1.0;
    return static_cast<float>(static_cast<double>(opt.hyper().lr) * factor * own);
  };

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
    const bool evaluate = (o.eval_every > 0 && st.step % o.eval_every == 0) || last;
    if (evaluate) {
      opt.eval();  // schedule-free AdamW: evaluate the average x (other algorithms: nothing)
      log.val_loss = eval_loss(gpt, data, o, st.step, inputs, targets);
      sum.last_val_loss = log.val_loss;
      reached = o.target_val_loss && *log.val_loss <= *o.target_val_loss;
      sum.reached_target = sum.reached_target || reached;
    }
    // A run that ends keeps (and saves) the evaluated x; one that goes on steps from y again.
    if (evaluate && !(last || reached)) opt.train();
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
      log.lr = step_lr(st.step, factor);
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
    log.lr = step_lr(st.step, factor);
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

}  // namespace nibble::train
