// The step policy every backend applies before it updates anything: the global gradient norm, the
// decision to skip a step (inf/NaN gradients, or the caller found some), and the clip coefficient.
// Host+device: the CPU front end and the CUDA begin-step kernel both call it.
#pragma once

#include <cfloat>
#include <cmath>
#include <limits>

#include "math/common.hpp"

namespace nibble::math {

struct StepDecision {
  bool skip;         // nothing is updated and the step counters do not advance
  double grad_norm;  // L2 norm of grad / grad_scale (NaN when not computed)
  float grad_mul;    // what every gradient is multiplied by: 1 / grad_scale times the clip coefficient
};

// The largest gradient norm a step takes: sqrt(FLT_MAX), rounded down. No element of a gradient
// within it has a square beyond float range, which the second-moment updates form (g * g).
inline constexpr double kMaxStepNorm = 1.8446742e19;

// `square_sum`: the sum of squared gradients as given (read only when norm_computed).
NIBBLE_HD StepDecision decide_step(bool found_inf, bool norm_computed, double square_sum, float grad_scale,
                                   float max_grad_norm) {
  const float inv_scale = 1.0f / grad_scale;
  StepDecision d;
  d.grad_norm = norm_computed ? sqrt(square_sum) * static_cast<double>(inv_scale)
                              : std::numeric_limits<double>::quiet_NaN();
  // The norm is summed in double, where finite gradients can have a finite norm whose update
  // overflows float: g / grad_scale beyond float range, or g * g beyond it (|g| > sqrt(FLT_MAX)),
  // which would leave inf in a second moment (and, 8-bit, NaN in its whole block). So a step is
  // skipped when the gradient it would apply, clipped, has a norm beyond kMaxStepNorm, as it is
  // for inf or NaN.
  d.skip = found_inf || (norm_computed && !(d.grad_norm <= static_cast<double>(FLT_MAX)));
  float clip = 1.0f;
  if (!d.skip && max_grad_norm > 0.0f) {
    const double coef = static_cast<double>(max_grad_norm) / (d.grad_norm + 1e-6);
    if (coef < 1.0) clip = static_cast<float>(coef);
  }
  if (!d.skip && norm_computed && !(d.grad_norm * static_cast<double>(clip) <= kMaxStepNorm)) d.skip = true;
  d.grad_mul = inv_scale * clip;
  return d;
}

}  // namespace nibble::math
