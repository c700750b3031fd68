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

// The seed of stochastic rounding for a tensor that has taken `step` steps: a pure function of the
// options' seed and the tensor's step count, so a loaded optimizer rounds as the saved one.
NIBBLE_HD std::uint64_t rounding_seed(std::uint64_t seed, std::int64_t step) {
  const auto s = static_cast<std::uint64_t>(step);
  return hash_u32(seed, s) | (static_cast<std::uint64_t>(hash_u32(~seed, s)) << 32);
}

// grad_mul: 1 / grad_scale times the clip coefficient (maximize is folded in here). `tensor_lr` is
// the group's lr, scaled by lr_scale (the schedule). AdamP's projection and Adafactor's per-tensor
// scale are filled later by their reductions. `running`: the tensor's sums kept across steps
// (TensorState::running), advanced when the tensor steps; null when it does not.
NIBBLE_HD void fill_step_constants(StepConstants& k, Algorithm algorithm, const Hyper& h, float tensor_lr,
                                   float wd, std::int64_t tensor_step, float grad_mul, float lr_scale,
                                   std::uint64_t seed, double* running) {
  StepInputs in;
  in.running = running;
  in.grad_mul = grad_mul * (h.maximize ? -1.0f : 1.0f);
  in.step = static_cast<double>(tensor_step > 1 ? tensor_step : 1);
  in.tensor_step = tensor_step;
  in.lr = tensor_lr * lr_scale;
  in.wd = wd;
  in.bc1 = h.bias_correction ? static_cast<float>(1.0 - ::pow(static_cast<double>(h.beta1), in.step)) : 1.0f;
  in.bc2 = h.bias_correction ? static_cast<float>(1.0 - ::pow(static_cast<double>(h.beta2), in.step)) : 1.0f;
  k.lr = in.lr;
  k.rounding_seed = rounding_seed(seed, tensor_step);
  k.adamp_decay = 1.0f;
  k.adamp_view = 0;
  fill_rule_constants(Rules{}, k, algorithm, h, in);
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
