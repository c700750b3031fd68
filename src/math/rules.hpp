// Per-element update rules of every nibble optimizer, for one element of one tensor, in fp32
// "opmath". Each rule reads per-step constants (a *Step struct, filled once per tensor per step
// by its rule's fill()) and updates the parameter and its state in place. The CPU drivers and the
// CUDA kernels call these same functions: this file is the only copy of the math. At its end, one
// adaptor per algorithm and the list of them, from which both backends instantiate every rule.
#pragma once

#include <cmath>
#include <cstdint>

#include "math/common.hpp"
#include "nibble/hyper.hpp"

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

// ADOPT (Taniguchi et al., arXiv 2411.02853), as its authors' code: the gradient normalised by the
// second moment of the steps before it and clipped to +-clip, then the momentum and the step, then
// the second moment. A tensor's first step only sets v = g^2 (first = 1). clip is +inf for none.
struct AdoptStep {
  float lr, one_minus_beta1, beta2, one_minus_beta2, eps, clip, l2, decay, grad_mul, first;
};
NIBBLE_HD void adopt_update(float& p, float g, float& m, float& v, const AdoptStep& k) {
  g = g * k.grad_mul + k.l2 * p;
  if (k.first != 0.0f) {
    v = g * g;
    return;
  }
  p = p * k.decay;
  const float n = min_f(max_f(g / max_f(sqrtf(v), k.eps), -k.clip), k.clip);
  m = m + k.one_minus_beta1 * (n - m);
  p = p - k.lr * m;
  v = k.beta2 * v + k.one_minus_beta2 * (g * g);
}

// AdEMAMix (Pagliardini et al., arXiv 2409.03463): Adam's bias-corrected fast EMA plus alpha times
// a slow EMA (beta3), over the same second moment; decoupled weight decay.
struct AdemamixStep {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, inv_bc1, inv_bc2_sqrt, alpha, eps,
      lr, decay, grad_mul;
};
NIBBLE_HD void ademamix_update(float& p, float g, float& m, float& v, float& slow, const AdemamixStep& k) {
  g = g * k.grad_mul;
  p = p * k.decay;
  m = k.beta1 * m + k.one_minus_beta1 * g;
  slow = k.beta3 * slow + k.one_minus_beta3 * g;
  v = k.beta2 * v + k.one_minus_beta2 * (g * g);
  const float denom = sqrtf(v) * k.inv_bc2_sqrt + k.eps;
  p = p - k.lr * ((m * k.inv_bc1 + k.alpha * slow) / denom);
}

// AdEMAMix's warm-ups of alpha (linear from 0) and beta3 (linear in half-life from beta1) over
// `warmup` steps each, as the authors' schedulers; their final values from step `warmup` on.
NIBBLE_HD double ademamix_alpha(double alpha, double step, double warmup) {
  return warmup > 0.0 && step < warmup ? step / warmup * alpha : alpha;
}
NIBBLE_HD double ademamix_beta3(double beta1, double beta3, double step, double warmup) {
  if (!(warmup > 0.0 && step < warmup)) return beta3;
  const double a = step / warmup;
  const double half_life_start = ::log(0.5) / ::log(beta1 + 1e-8) - 1.0;
  const double half_life_end = ::log(0.5) / ::log(beta3 + 1e-8) - 1.0;
  return ::pow(0.5, 1.0 / ((1.0 - a) * half_life_start + a * half_life_end + 1.0));
}

// Schedule-free AdamW (Defazio et al., arXiv 2405.15682), as the schedulefree package's
// AdamWScheduleFree: the parameter holds y, the point the gradient is taken at; z is the base
// sequence and x, the average that is evaluated, is kept implicitly (y = (1 - beta1) z + beta1 x).
// d is the gradient over Adam's bias-corrected second moment plus weight decay at y; y moves
// toward z by ckp1 (the new point's share of the average) and by lr (beta1 (1 - ckp1) - 1) d, z by
// -lr d. A tensor's first step starts z at the parameter (first = 1).
struct ScheduleFreeStep {
  float beta2, one_minus_beta2, bc2, eps, wd, ckp1, y_step, lr, grad_mul, first;
};
// torch.lerp's arithmetic, so that y and x round as the package's do.
NIBBLE_HD float lerp_f(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}
NIBBLE_HD void schedulefree_update(float& y, float g, float& z, float& v, const ScheduleFreeStep& k) {
  g = g * k.grad_mul;
  if (k.first != 0.0f) z = y;
  v = k.beta2 * v + k.one_minus_beta2 * (g * g);
  const float d = g / (sqrtf(v / k.bc2) + k.eps) + k.wd * y;
  y = lerp_f(y, z, k.ckp1);
  y = y + k.y_step * d;
  z = z - k.lr * d;
}

// Schedule-free AdamW's per-step scalars of a tensor that takes its step `tensor_step` (k + 1 in
// the package) at the scheduled lr: the linear warm-up, then lr_max and weight_sum (running[0],
// running[1], advanced here; they start at 0) and the new point's weight in the average.
struct ScheduleFreeScalars {
  double lr, ckp1;
};
NIBBLE_HD ScheduleFreeScalars schedulefree_advance(const Hyper& h, double lr, std::int64_t tensor_step, double* running) {
  const double k1 = static_cast<double>(tensor_step);
  if (k1 - 1.0 < static_cast<double>(h.warmup_steps)) lr *= k1 / static_cast<double>(h.warmup_steps);
  const double lr_max = running[0] > lr ? running[0] : lr;
  const double weight = ::pow(k1, static_cast<double>(h.r)) * ::pow(lr_max, static_cast<double>(h.weight_lr_power));
  const double weight_sum = running[1] + weight;
  running[0] = lr_max;
  running[1] = weight_sum;
  return {lr, weight_sum > 0.0 ? weight / weight_sum : 0.0};
}

// Muon (Jordan et al., 2024), as torch.optim.Muon: a momentum buffer (torch's lerp) whose Nesterov
// update the backends orthogonalise by Newton-Schulz over the whole matrix, then a decoupled decay
// and a step of lr times the shape factor of muon_lr_factor. Its other tensors step with AdamStep.
struct MuonStep {
  float momentum, one_minus_momentum, nesterov, grad_mul, lr, decay;
};
// Updates the buffer and returns the update to orthogonalise.
NIBBLE_HD float muon_momentum(float g, float& buf, const MuonStep& k) {
  g = g * k.grad_mul;
  buf = lerp_f(buf, g, k.one_minus_momentum);
  return k.nesterov != 0.0f ? lerp_f(g, buf, k.momentum) : buf;
}
// o: the orthogonalised update; step = lr * muon_lr_factor.
NIBBLE_HD void muon_apply(float& p, float o, float decay, float step) { p = p * decay - step * o; }
// The lr's factor for a matrix of shape (A, B) (rank > 2: (shape[0], the rest)), by AdjustLr.
NIBBLE_HD double muon_lr_factor(float adjust, double rows, double cols) {
  switch (static_cast<AdjustLr>(static_cast<int>(adjust))) {
    case AdjustLr::kOriginal: return ::sqrt(rows / cols > 1.0 ? rows / cols : 1.0);
    case AdjustLr::kMatchRmsAdamW: return 0.2 * ::sqrt(rows > cols ? rows : cols);
    case AdjustLr::kSpectralUnclamped: return ::sqrt(rows / cols);
  }
  return 1.0;
}

// ---------------------------------------------------------------------------------------------
// Rule adaptors. Each says which algorithms it steps (handles), fills its constants once per
// tensor per step (fill), and, when kElementwise, updates one element with up to three state
// values (update). kVariant is its one compile-time option (variant(hyper): AMSGrad, Adafactor's
// first moment); the step writes back slots [0, kWrittenSlots). AdamP and Adafactor need
// whole-tensor statistics first, so the backends give them their own passes.

// What every rule's constants are made from, per tensor per step.
struct StepInputs {
  float lr;        // the group's lr times the schedule's lr_scale
  float wd;        // the tensor's weight decay
  float grad_mul;  // 1 / grad_scale times the clip coefficient, negated to maximize
  float bc1, bc2;  // bias corrections 1 - beta^t (1 without bias_correction)
  std::int64_t tensor_step;
  double step;     // max(tensor_step, 1)
  // Sums an algorithm keeps across a tensor's steps (schedule-free AdamW: lr_max, weight_sum), which
  // fill advances; null when the tensor does not step (its constants are then not used).
  double* running;
};

// The constants of one tensor's step: its rule's, and what the whole-tensor passes fill in.
struct StepConstants {
  SgdStep sgd;
  AdamStep adam;
  LionStep lion;
  QhmStep qhm;
  SophiaStep sophia;
  AdamPStep adamp;
  AdafactorStep adafactor;
  AdoptStep adopt;
  AdemamixStep ademamix;
  ScheduleFreeStep schedulefree;
  MuonStep muon;
  float lr;
  float adamp_decay;
  int adamp_view;  // 0: not projected, 1: channel view (rows of shape[0]), 2: whole tensor
  std::uint64_t rounding_seed;
};

struct RuleDefaults {
  static constexpr bool kElementwise = true;
  static constexpr bool kHasVariant = false;
  static constexpr int kWrittenSlots = 3;
  // How many leading state slots the rule (its variant when `variant`) reads. A slot the tensor
  // does not keep reads as zeros; the CPU driver writes those zeros only for slots below this.
  static constexpr int read_slots(bool /*variant*/) { return 3; }
  NIBBLE_HD static bool variant(const Hyper&) { return false; }
};

struct SgdRule : RuleDefaults {
  static constexpr int read_slots(bool) { return 1; }  // its buffer, zeros without momentum
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kSgd; }
  NIBBLE_HD static const SgdStep& constants(const StepConstants& k) { return k.sgd; }
  // On the first step the buffer is the gradient itself: keep = 0, grad_coef = 1.
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    const bool first = in.tensor_step == 1;
    const bool decoupled = h.decoupled_weight_decay;
    k.sgd = {in.lr,
             first ? 0.0f : h.momentum,
             first || h.momentum == 0.0f ? 1.0f : 1.0f - h.dampening,
             h.momentum,
             h.nesterov ? 1.0f : 0.0f,
             decoupled ? 0.0f : in.wd,
             decoupled ? 1.0f - in.lr * in.wd : 1.0f,
             in.grad_mul};
  }
  template <bool>
  NIBBLE_HD static void update(float& p, float g, float& s0, float&, float&, const SgdStep& k) {
    sgd_update(p, g, s0, k);
  }
};

struct AdamRule : RuleDefaults {
  static constexpr int read_slots(bool amsgrad) { return amsgrad ? 3 : 2; }
  static constexpr bool kHasVariant = true;  // AMSGrad
  NIBBLE_HD static bool variant(const Hyper& h) { return h.amsgrad; }
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kAdam || a == Algorithm::kAdamW; }
  NIBBLE_HD static const AdamStep& constants(const StepConstants& k) { return k.adam; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    const bool decoupled = h.decoupled_weight_decay;
    k.adam = {h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, in.lr / in.bc1,
              1.0f / sqrtf(in.bc2), h.eps, decoupled ? 0.0f : in.wd,
              decoupled ? 1.0f - in.lr * in.wd : 1.0f, in.grad_mul};
  }
  template <bool kAmsgrad>
  NIBBLE_HD static void update(float& p, float g, float& s0, float& s1, float& s2, const AdamStep& k) {
    adam_update<kAmsgrad>(p, g, s0, s1, s2, k);
  }
};

// RAdam (Liu et al., ICLR 2020), as torch.optim.RAdam: Adam's moments; while the variance of the
// adaptive rate is intractable (rho_t <= 5, the first steps) the step is lr m / bc1, after it
// lr r_t sqrt(bc2) m / (bc1 (sqrt(v) + eps)) with the rectification r_t. Both are Adam's update with
// other constants: the first with denominator 0 * sqrt(v) + 1. Scalars in double, as torch's.
struct RAdamRule : RuleDefaults {
  static constexpr int read_slots(bool) { return 2; }
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kRAdam; }
  NIBBLE_HD static const AdamStep& constants(const StepConstants& k) { return k.adam; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    const bool decoupled = h.decoupled_weight_decay;
    const double beta2 = h.beta2, beta2_t = ::pow(beta2, in.step);
    const double bc1 = 1.0 - ::pow(static_cast<double>(h.beta1), in.step), bc2 = 1.0 - beta2_t;
    const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * in.step * beta2_t / bc2;
    float step_size = static_cast<float>(in.lr / bc1), inv_bc2_sqrt = 0.0f, eps = 1.0f;
    if (rho_t > 5.0) {
      const double rect = ::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
      step_size = static_cast<float>(in.lr * rect * ::sqrt(bc2) / bc1);
      inv_bc2_sqrt = 1.0f;
      eps = h.eps;
    }
    k.adam = {h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, step_size, inv_bc2_sqrt, eps,
              decoupled ? 0.0f : in.wd, decoupled ? 1.0f - in.lr * in.wd : 1.0f, in.grad_mul};
  }
  template <bool>
  NIBBLE_HD static void update(float& p, float g, float& s0, float& s1, float& s2, const AdamStep& k) {
    adam_update<false>(p, g, s0, s1, s2, k);
  }
};

struct LionRule : RuleDefaults {
  static constexpr int read_slots(bool) { return 1; }
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kLion; }
  NIBBLE_HD static const LionStep& constants(const StepConstants& k) { return k.lion; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    k.lion = {in.lr, h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, 1.0f - in.lr * in.wd, in.grad_mul};
  }
  template <bool>
  NIBBLE_HD static void update(float& p, float g, float& s0, float&, float&, const LionStep& k) {
    lion_update(p, g, s0, k);
  }
};

struct QhmRule : RuleDefaults {
  static constexpr int read_slots(bool) { return 1; }
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kQhm; }
  NIBBLE_HD static const QhmStep& constants(const StepConstants& k) { return k.qhm; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    const bool decoupled = h.decoupled_weight_decay;
    k.qhm = {in.lr, h.momentum, 1.0f - h.momentum, h.nu, 1.0f - h.nu, decoupled ? 0.0f : in.wd,
             decoupled ? 1.0f - in.lr * in.wd : 1.0f, in.grad_mul};
  }
  template <bool>
  NIBBLE_HD static void update(float& p, float g, float& s0, float&, float&, const QhmStep& k) {
    qhm_update(p, g, s0, k);
  }
};

struct SophiaRule : RuleDefaults {
  static constexpr int read_slots(bool) { return 2; }
  static constexpr int kWrittenSlots = 1;  // it reads its Hessian EMA; only update_hessian writes it
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kSophiaG; }
  NIBBLE_HD static const SophiaStep& constants(const StepConstants& k) { return k.sophia; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    k.sophia = {in.lr, h.beta1, 1.0f - h.beta1, h.rho * h.batch_tokens, 1.0f - in.lr * in.wd, in.grad_mul};
  }
  template <bool>
  NIBBLE_HD static void update(float& p, float g, float& s0, float& s1, float&, const SophiaStep& k) {
    sophia_update(p, g, s0, s1, k);
  }
};

struct AdoptRule : RuleDefaults {
  static constexpr int read_slots(bool) { return 2; }
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kAdopt; }
  NIBBLE_HD static const AdoptStep& constants(const StepConstants& k) { return k.adopt; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    const bool decoupled = h.decoupled_weight_decay;
    const double updates = static_cast<double>(in.tensor_step > 1 ? in.tensor_step - 1 : 0);
    const float clip = h.clip_exponent < 0.0f ? bits_float(0x7f800000u)
                                              : static_cast<float>(::pow(updates, static_cast<double>(h.clip_exponent)));
    k.adopt = {in.lr, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, h.eps, clip, decoupled ? 0.0f : in.wd,
               decoupled ? 1.0f - in.lr * in.wd : 1.0f, in.grad_mul, in.tensor_step <= 1 ? 1.0f : 0.0f};
  }
  template <bool>
  NIBBLE_HD static void update(float& p, float g, float& s0, float& s1, float&, const AdoptStep& k) {
    adopt_update(p, g, s0, s1, k);
  }
};

struct AdemamixRule : RuleDefaults {
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kAdEMAMix; }
  NIBBLE_HD static const AdemamixStep& constants(const StepConstants& k) { return k.ademamix; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    // 1 - beta3 from the double: beta3 near 1 rounded to float first would lose most of its digits.
    const double beta3 = ademamix_beta3(h.beta1, h.beta3, in.step, h.beta3_warmup);
    k.ademamix = {h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, static_cast<float>(beta3),
                  static_cast<float>(1.0 - beta3), 1.0f / in.bc1,
                  1.0f / sqrtf(in.bc2), static_cast<float>(ademamix_alpha(h.alpha, in.step, h.alpha_warmup)), h.eps, in.lr,
                  1.0f - in.lr * in.wd, in.grad_mul};
  }
  template <bool>
  NIBBLE_HD static void update(float& p, float g, float& s0, float& s1, float& s2, const AdemamixStep& k) {
    ademamix_update(p, g, s0, s1, s2, k);
  }
};

struct ScheduleFreeRule : RuleDefaults {
  static constexpr int read_slots(bool) { return 2; }
  static constexpr int kWrittenSlots = 2;
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kAdamWScheduleFree; }
  NIBBLE_HD static const ScheduleFreeStep& constants(const StepConstants& k) { return k.schedulefree; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    double unused[2] = {0.0, 0.0};
    const ScheduleFreeScalars s =
        schedulefree_advance(h, in.lr, in.tensor_step, in.running != nullptr ? in.running : unused);
    const double k1 = static_cast<double>(in.tensor_step > 1 ? in.tensor_step : 1);
    k.schedulefree = {h.beta2, 1.0f - h.beta2, static_cast<float>(1.0 - ::pow(static_cast<double>(h.beta2), k1)),
                      h.eps, in.wd, static_cast<float>(s.ckp1),
                      static_cast<float>(s.lr * (static_cast<double>(h.beta1) * (1.0 - s.ckp1) - 1.0)),
                      static_cast<float>(s.lr), in.grad_mul, in.tensor_step <= 1 ? 1.0f : 0.0f};
  }
  template <bool>
  NIBBLE_HD static void update(float& p, float g, float& s0, float& s1, float&, const ScheduleFreeStep& k) {
    schedulefree_update(p, g, s0, s1, k);
  }
};

struct AdamPRule : RuleDefaults {
  static constexpr bool kElementwise = false;  // its projection needs cosines over rows and tensors
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kAdamP; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    k.adamp = {h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, in.lr / in.bc1, 1.0f / sqrtf(in.bc2),
               h.eps, h.nesterov ? 1.0f : 0.0f, in.grad_mul};
    k.adamp_decay = 1.0f - in.lr * in.wd;
  }
};

struct AdafactorRule : RuleDefaults {
  static constexpr bool kElementwise = false;  // row/column statistics and the update's RMS first
  static constexpr bool kHasVariant = true;    // the first moment
  // Unfactored tensors keep v and then m (with the first moment); factored ones m alone. The
  // update reads m only with the first moment.
  static constexpr int read_slots(bool first_moment) { return first_moment ? 2 : 1; }
  NIBBLE_HD static bool variant(const Hyper& h) { return h.first_moment; }
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kAdafactor; }
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    const float beta2t = static_cast<float>(1.0 - ::pow(in.step, static_cast<double>(h.decay_rate)));
    k.adafactor = {beta2t, 1.0f - beta2t, h.eps, in.grad_mul, 0.0f, h.beta1, 1.0f - h.beta1, 1.0f};
  }
};

struct MuonRule : RuleDefaults {
  static constexpr int read_slots(bool) { return 2; }  // momentum; the AdamW fallback's two moments
  static constexpr bool kElementwise = false;  // Newton-Schulz over each whole matrix
  NIBBLE_HD static bool handles(Algorithm a) { return a == Algorithm::kMuon; }
  // The orthogonalised tensors' momentum, and the AdamW fallback's constants for the others (whose
  // lr and wd are adamw_lr and adamw_weight_decay unless their group sets them).
  NIBBLE_HD static void fill(StepConstants& k, const Hyper& h, const StepInputs& in) {
    k.muon = {h.momentum, 1.0f - h.momentum, h.nesterov ? 1.0f : 0.0f, in.grad_mul, in.lr, 1.0f - in.lr * in.wd};
    k.adam = {h.beta1, 1.0f - h.beta1, h.beta2, 1.0f - h.beta2, in.lr / in.bc1, 1.0f / sqrtf(in.bc2),
              h.adamw_eps, 0.0f, 1.0f - in.lr * in.wd, in.grad_mul};
  }
};

template <class... R>
struct RuleList {};
// Every algorithm's rule: the backends instantiate these and nothing else.
using Rules = RuleList<SgdRule, AdamRule, LionRule, QhmRule, SophiaRule, AdoptRule, AdemamixRule, AdamPRule,
                       AdafactorRule, ScheduleFreeRule, MuonRule, RAdamRule>;

// Fills k from the rule that handles `algorithm`.
template <class... R>
NIBBLE_HD void fill_rule_constants(RuleList<R...>, StepConstants& k, Algorithm algorithm, const Hyper& h,
                                   const StepInputs& in) {
  ((R::handles(algorithm) ? R::fill(k, h, in) : void()), ...);
}

// Calls fn.template operator()<R, kVariant>() with the rule that handles `algorithm` and its
// variant for h: the one place where an algorithm's runtime value becomes a compile-time rule.
// Returns false when no rule handles it. Host code.
template <class R, class Fn>
void visit_variant(const Hyper& h, Fn& fn) {
  if constexpr (R::kHasVariant) {
    if (R::variant(h)) fn.template operator()<R, true>();
    else fn.template operator()<R, false>();
  } else {
    fn.template operator()<R, false>();
  }
}
template <class Fn, class... R>
bool visit_rule(RuleList<R...>, Algorithm algorithm, const Hyper& h, Fn&& fn) {
  return ((R::handles(algorithm) ? (visit_variant<R>(h, fn), true) : false) || ...);
}

}  // namespace nibble::math
