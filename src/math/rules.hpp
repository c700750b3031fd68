// Per-element update rules of every nibble optimizer, for one element of one tensor, in fp32
// "opmath". Each rule reads per-step constants (a *Step struct, filled once per tensor per step
// by src/optim/step_constants.hpp) and updates the parameter and its state in place. The CPU
// drivers and the CUDA kernels call these same functions: this file is the only copy of the math.
#pragma once

#include <cmath>

#include "math/common.hpp"

namespace nibble::math {

// grad_mul folds maximize (-1), 1/grad_scale and the global-norm clip coefficient into one
// multiplier. l2 is coupled weight decay (added to the gradient); decay = 1 - lr * wd is
// decoupled weight decay (applied to the parameter first).

// SGD with momentum, dampening and Nesterov (torch.optim.SGD semantics; on the first step the
// buffer is the gradient itself: keep = 0, grad_coef = 1).
struct SgdStep {
  float lr, keep, grad_coef, momentum, nesterov, l2, decay, grad_mul;
};
NIBBLE_HD void sgd_update(float& p, float g, float& buf, const SgdStep& k) {
  g = g * k.grad_mul + k.l2 * p;
  p = p * k.decay;
  buf = k.keep * buf + k.grad_coef * g;
  const float d = k.nesterov != 0.0f ? g + k.momentum * buf : buf;
  p = p - k.lr * d;
}

// Adam / AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), with optional AMSGrad.
struct AdamStep {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bc2_sqrt, eps, l2, decay, grad_mul;
};
template <bool kAmsgrad>
NIBBLE_HD void adam_update(float& p, float g, float& m, float& v, float& vmax, const AdamStep& k) {
  g = g * k.grad_mul + k.l2 * p;
  p = p * k.decay;
  m = k.beta1 * m + k.one_minus_beta1 * g;
  v = k.beta2 * v + k.one_minus_beta2 * (g * g);
  float second = v;
  if constexpr (kAmsgrad) {
    vmax = max_f(vmax, v);
    second = vmax;
  }
  const float denom = sqrtf(second) * k.inv_bc2_sqrt + k.eps;
  p = p - k.step_size * (m / denom);
}

// Lion (Chen et al., arXiv 2302.06675): sign of an interpolated momentum, decoupled decay.
struct LionStep {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, grad_mul;
};
NIBBLE_HD void lion_update(float& p, float g, float& m, const LionStep& k) {
  g = g * k.grad_mul;
  const float c = k.beta1 * m + k.one_minus_beta1 * g;
  p = p * k.decay - k.lr * sign_f(c);
  m = k.beta2 * m + k.one_minus_beta2 * g;
}

// Quasi-hyperbolic momentum (Ma & Yarats, arXiv 1810.06801).
struct QhmStep {
  float lr, beta, one_minus_beta, nu, one_minus_nu, l2, decay, grad_mul;
};
NIBBLE_HD void qhm_update(float& p, float g, float& buf, const QhmStep& k) {
  g = g * k.grad_mul + k.l2 * p;
  p = p * k.decay;
  buf = k.beta * buf + k.one_minus_beta * g;
  p = p - k.lr * (k.one_minus_nu * g + k.nu * buf);
}

// SophiaG (Liu et al., arXiv 2305.14342): momentum preconditioned by an EMA of a Hessian-diagonal
// estimate h, the ratio clipped to 1. rho_bs = rho * batch_tokens.
struct SophiaStep {
  float lr, beta1, one_minus_beta1, rho_bs, decay, grad_mul;
};
NIBBLE_HD void sophia_update(float& p, float g, float& m, float h, const SophiaStep& k) {
  g = g * k.grad_mul;
  m = k.beta1 * m + k.one_minus_beta1 * g;
  p = p * k.decay;
  const float ratio = min_f(abs_f(m) / (k.rho_bs * h + 1e-15f), 1.0f);
  p = p - k.lr * sign_f(m) * ratio;
}
struct SophiaHessianStep {
  float beta2, one_minus_beta2;
};
NIBBLE_HD void sophia_hessian_update(float& h, float estimate, const SophiaHessianStep& k) {
  h = k.beta2 * h + k.one_minus_beta2 * estimate;
}

// AdamP (Heo et al., arXiv 2006.08217): Adam whose update direction loses its radial component
// for scale-invariant weights. adamp_perturb updates the moments and returns the direction;
// adamp_apply removes the projection p_unit * dot and steps.
struct AdamPStep {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bc2_sqrt, eps, nesterov, grad_mul;
};
NIBBLE_HD float adamp_perturb(float g, float& m, float& v, const AdamPStep& k) {
  g = g * k.grad_mul;
  m = k.beta1 * m + k.one_minus_beta1 * g;
  v = k.beta2 * v + k.one_minus_beta2 * (g * g);
  const float denom = sqrtf(v) * k.inv_bc2_sqrt + k.eps;
  const float num = k.nesterov != 0.0f ? k.beta1 * m + k.one_minus_beta1 * g : m;
  return num / denom;
}
// inv_norm = 1 / (||p_view_row|| + eps); dot = sum over the view row of p_unit * perturb
// (both 0 when the tensor is not projected); decay = 1 - lr * wd * wd_ratio.
NIBBLE_HD void adamp_apply(float& p, float perturb, float inv_norm, float dot, float decay, float step_size) {
  const float projected = perturb - (p * inv_norm) * dot;
  p = p * decay - step_size * projected;
}

// Adafactor (Shazeer & Stern, arXiv 1804.04235), as in the common PyTorch port: second moment
// factored into row and column EMAs for >=2-D tensors, relative step, update clipping by RMS.
struct AdafactorStep {
  float beta2t, one_minus_beta2t, eps1, grad_mul;
  float scale;  // lr_eff / max(1, rms(update) / clip_threshold), per tensor
  float beta1, one_minus_beta1, decay;
};
NIBBLE_HD float adafactor_square(float g, const AdafactorStep& k) {
  g = g * k.grad_mul;
  return g * g + k.eps1;
}
// Unfactored second moment: updates v and returns the unscaled update g / sqrt(v).
NIBBLE_HD float adafactor_unfactored(float g, float& v, const AdafactorStep& k) {
  v = k.beta2t * v + k.one_minus_beta2t * adafactor_square(g, k);
  return (g * k.grad_mul) / sqrtf(v);
}
// Factored: r = 1/sqrt(row / mean(row)), c = 1/sqrt(col) are per-row and per-column factors.
NIBBLE_HD float adafactor_factored(float g, float r, float c, const AdafactorStep& k) {
  return (g * k.grad_mul) * (r * c);
}
template <bool kFirstMoment>
NIBBLE_HD void adafactor_apply(float& p, float update, float& m, const AdafactorStep& k) {
  float u = update * k.scale;
  if constexpr (kFirstMoment) {
    m = k.beta1 * m + k.one_minus_beta1 * u;
    u = m;
  }
  p = p * k.decay - u;
}

}  // namespace nibble::math
