// The vocabulary of nibble's optimizers that host and device code share: algorithms, state
// precisions and every hyperparameter. Plain values only, so CUDA kernels take them by value.
#pragma once

#include <cstdint>

namespace nibble {

enum class Algorithm : std::uint8_t {
  kSgd, kAdam, kAdamW, kLion, kAdafactor, kAdamP, kQhm, kSophiaG, kAdopt, kAdEMAMix, kAdamWScheduleFree,
  kMuon, kRAdam
};
enum class Precision : std::uint8_t { kFp32, kBf16, kInt8, kInt4, kFp8 };
// Muon's learning-rate factor for a matrix of shape (A, B): sqrt(max(1, A/B)) (Keller Jordan's),
// 0.2 sqrt(max(A, B)) (Moonshot's, matching AdamW's update RMS), sqrt(A/B) (Bernstein's). Held in
// Hyper::adjust_lr as its index; its names are the choices of that field in the algorithm table.
enum class AdjustLr : std::uint8_t { kOriginal, kMatchRmsAdamW, kSpectralUnclamped };

// Every hyperparameter of every algorithm; each algorithm reads the ones it names.
// default_hyper() gives each algorithm the defaults of its paper's reference code.
struct Hyper {
  float lr = 1e-3f;
  float weight_decay = 0.0f;
  float beta1 = 0.9f;           // Adam*, RAdam, Lion, AdamP, SophiaG; Adafactor's first moment
  float beta2 = 0.999f;         // Adam*, Lion, AdamP, SophiaG (Hessian EMA)
  float eps = 1e-8f;            // Adam*, AdamP; Adafactor's eps1 (added to g^2)
  float momentum = 0.0f;        // SGD; QHM's beta
  float dampening = 0.0f;       // SGD
  bool nesterov = false;        // SGD, AdamP
  bool amsgrad = false;         // Adam, AdamW
  bool maximize = false;        // every algorithm
  bool bias_correction = true;  // Adam, AdamW, AdamP
  bool decoupled_weight_decay = false;  // Adam (false) vs AdamW (true); SGD and QHM either way
  float nu = 0.7f;              // QHM
  float eps2 = 1e-3f;           // Adafactor: floor of the parameter scale
  float clip_threshold = 1.0f;  // Adafactor: update RMS clip
  float decay_rate = -0.8f;     // Adafactor: beta2_t = 1 - t^decay_rate
  bool first_moment = false;    // Adafactor: keep a first moment with beta1
  bool relative_step = true;    // Adafactor: lr_t = min(1e-2, 1/sqrt(t)) instead of lr
  bool scale_parameter = true;  // Adafactor: lr scaled by max(eps2, rms(p))
  bool warmup_init = false;     // Adafactor: relative step min(1e-6 t, 1/sqrt(t))
  float delta = 0.1f;           // AdamP: cosine threshold
  float wd_ratio = 0.1f;        // AdamP: weight-decay ratio of projected tensors
  float rho = 0.04f;            // SophiaG
  float batch_tokens = 5120.0f; // SophiaG: the `bs` that multiplies rho
  float beta3 = 0.9999f;        // AdEMAMix: the slow EMA of the gradient
  float alpha = 2.0f;           // AdEMAMix: weight of the slow EMA in the update
  float alpha_warmup = 0.0f;    // AdEMAMix: steps over which alpha rises linearly from 0 (0: none)
  float beta3_warmup = 0.0f;    // AdEMAMix: steps over which beta3 rises from beta1, linearly in half-life
  float clip_exponent = 0.25f;  // ADOPT: normalised gradients clipped to +-(t-1)^clip_exponent (< 0: none)
  float warmup_steps = 0.0f;    // schedule-free AdamW: steps over which lr rises linearly (0: none)
  float r = 0.0f;               // schedule-free AdamW: the average's weights grow as step^r
  float weight_lr_power = 2.0f; // schedule-free AdamW: ... and as lr_max^weight_lr_power
  float ns_steps = 5.0f;        // Muon: Newton-Schulz iterations (an integer in [1, 99])
  float ns_a = 3.4445f;         // Muon: the quintic's coefficients, X <- a X + (b A + c A^2) X, A = X X^T
  float ns_b = -4.7750f;
  float ns_c = 2.0315f;
  float adjust_lr = 0.0f;       // Muon: the lr's shape factor, an AdjustLr as its index
  float adamw_lr = 3e-4f;       // Muon's AdamW fallback (tensors it does not orthogonalise); its betas are
  float adamw_eps = 1e-10f;     // beta1 and beta2
  float adamw_weight_decay = 0.0f;
};
}  // namespace nibble
