// The per-tensor constants of one optimizer step (bias corrections, decays, the Adafactor decay
// schedule), computed from the hyperparameters, the tensor's step count and the step's scalars.
// Host+device: the CPU driver calls it on the host, the CUDA backend in a kernel from scalars that
// live in device memory, so both backends start each step from the same numbers.
#pragma once

#include <math.h>

#include "math/common.hpp"
#include "math/rules.hpp"
#include "nibble/hyper.hpp"

namespace nibble::math {

struct StepConstants {
  SgdStep sgd;
  AdamStep adam;
  LionStep lion;
  QhmStep qhm;
  SophiaStep sophia;
  AdamPStep adamp;
  AdafactorStep adafactor;
  float lr;
  float adamp_decay;
  int adamp_view;  // 0: not projected, 1: channel view (rows of shape[0]), 2: whole tensor
  std::uint64_t rounding_seed;
};

// The seed of stochastic rounding for a tensor that has taken `step` steps: a pure function of the
// options' seed and the tensor's step count, so a loaded optimizer rounds as the saved one.
NIBBLE_HD std::uint64_t rounding_seed(std::uint64_t seed, std::int64_t step) {
  const auto s = static_cast<std::uint64_t>(step);
  return hash_u32(seed, s) | (static_cast<std::uint64_t>(hash_u32(~seed, s)) << 32);
}

// grad_mul: 1 / grad_scale times the clip coefficient (maximize is folded in here). `tensor_lr` is
// the group's lr, scaled by lr_scale (the schedule). AdamP's projection and Adafactor's per-tensor
// scale are filled later by their reductions.
NIBBLE_HD void fill_step_constants(StepConstants& k, Algorithm algorithm, const Hyper& h, float tensor_lr,
                                   float wd, std::int64_t tensor_step, float grad_mul, float lr_scale,
                                   std::uint64_t seed) {
  const float gm = grad_mul * (h.maximize ? -1.0f : 1.0f);
  const double step = static_cast<double>(tensor_step > 1 ? tensor_step : 1);
  const float lr = tensor_lr * lr_scale;
  k.lr = lr;
  k.rounding_seed = rounding_seed(seed, tensor_step);
  k.adamp_decay = 1.0f;
  k.adamp_view = 0;
  const float bc1 = h.bias_correction ? static_cast<float>(1.0 - ::pow(static_cast<double>(h.beta1), step)) : 1.0f;
  const float bc2 = h.bias_correction ? static_cast<float>(1.0 - ::pow(static_cast<double>(h.beta2), step)) : 1.0f;
  const bool decoupled = h.decoupled_weight_decay;
  switch (algorithm) {
    case Algorithm::kSgd: {
      const bool first = tensor_step == 1;
      k.sgd = {lr,
               first ? 0.0f : h.momentum,
               first || h.momentum == 0.0f ? 1.0f : 1.0f - h.dampening,
               h.momentum,
               h.nesterov ? 1.0f : 0.0f,
               decoupled ? 0.0f : wd,
               decoupled ? 1.0f - lr * wd : 1.0f,
               gm};
      break;
    }
    case Algorithm::kAdam:
    case Algorithm::kAdamW:
      k.adam = {h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, lr / bc1,
                1.0f / sqrtf(bc2), h.eps, decoupled ? 0.0f : wd,
                decoupled ? 1.0f - lr * wd : 1.0f, gm};
      break;
    case Algorithm::kLion:
      k.lion = {lr, h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, 1.0f - lr * wd, gm};
      break;
    case Algorithm::kQhm:
      k.qhm = {lr, h.momentum, 1.0f - h.momentum, h.nu, 1.0f - h.nu, decoupled ? 0.0f : wd,
               decoupled ? 1.0f - lr * wd : 1.0f, gm};
      break;
    case Algorithm::kSophiaG:
      k.sophia = {lr, h.beta1, 1.0f - h.beta1, h.rho * h.batch_tokens, 1.0f - lr * wd, gm};
      break;
    case Algorithm::kAdamP:
      k.adamp = {h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, lr / bc1, 1.0f / sqrtf(bc2),
                 h.eps, h.nesterov ? 1.0f : 0.0f, gm};
      k.adamp_decay = 1.0f - lr * wd;
      break;
    case Algorithm::kAdafactor: {
      const float beta2t = static_cast<float>(1.0 - ::pow(step, static_cast<double>(h.decay_rate)));
      k.adafactor = {beta2t, 1.0f - beta2t, h.eps, gm, 0.0f, h.beta1, 1.0f - h.beta1, 1.0f};
      break;
    }
  }
}

// Adafactor's learning rate for a tensor: relative step and parameter scale (rms of p), then the
// update clipped by its RMS. Returns the multiplier of the unscaled update; decay gets 1 - wd * lr.
NIBBLE_HD float adafactor_scale(const Hyper& h, float tensor_lr, float lr_scale, std::int64_t tensor_step,
                                double sum_pp, double sum_uu, double numel, float& decay, float wd) {
  const double step = static_cast<double>(tensor_step);
  double lr = static_cast<double>(tensor_lr) * lr_scale;
  if (h.relative_step) {
    const double cap = h.warmup_init ? 1e-6 * step : 1e-2;
    const double inv_sqrt = 1.0 / ::sqrt(step);
    lr = cap < inv_sqrt ? cap : inv_sqrt;
  }
  if (h.scale_parameter) {
    const double rms_p = ::sqrt(sum_pp / numel);
    lr *= static_cast<double>(h.eps2) > rms_p ? static_cast<double>(h.eps2) : rms_p;
  }
  const double clip = ::sqrt(sum_uu / numel) / h.clip_threshold;
  decay = static_cast<float>(1.0 - static_cast<double>(wd) * lr);
  return static_cast<float>(lr / (clip > 1.0 ? clip : 1.0));
}

}  // namespace nibble::math
