// A plain fp64 reference of every nibble optimizer, written from the papers' reference code
// (PyTorch semantics) one element at a time, for tests to compare nibble::Optimizer against.
// It shares no code with the library: only the public Hyper/Algorithm vocabulary.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/optim.hpp"

namespace nibble::testref {

struct RefTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::int64_t numel = 0;
  double lr = 0.0;            // the tensor's group lr (before lr_scale)
  double weight_decay = 0.0;  // after the no-decay masks
  std::int64_t step = 0;      // steps this tensor took (a missing gradient does not count)
  std::vector<double> p;
  std::vector<std::string> state_names;  // the names nibble uses
  std::vector<std::vector<double>> state;
  double lr_max = -1.0;     // schedule-free AdamW, as the package starts them
  double weight_sum = 0.0;

  std::vector<double>& get(std::string_view n) {
    for (std::size_t i = 0; i < state_names.size(); ++i)
      if (state_names[i] == n) return state[i];
    throw std::out_of_range("reference tensor has no state " + std::string(n));
  }
  const std::vector<double>& get(std::string_view n) const { return const_cast<RefTensor*>(this)->get(n); }
  bool has(std::string_view n) const { return std::find(state_names.begin(), state_names.end(), n) != state_names.end(); }
  int rank() const { return static_cast<int>(shape.size()); }
};

// What the reference saw, so a test can assert that the branch it means to test really ran.
struct RefCounters {
  std::int64_t adamp_views[3] = {0, 0, 0};  // per (rank >= 2 tensor, step): none, channel, layer
  std::int64_t adafactor_clipped = 0;       // per (tensor, step): rms(u) > clip_threshold
  std::int64_t adafactor_unclipped = 0;
  std::int64_t sophia_full = 0;  // per element and step: |ratio| clipped to 1 (sign step)
  std::int64_t sophia_ratio = 0;  // per element and step: ratio < 1
  std::int64_t clipped_steps = 0;  // global-norm clipping was active
  std::int64_t sgd_first_steps = 0;  // per (tensor, step) where the buffer was set to the gradient
};

class RefOptimizer {
 public:
  // `hyper` as given to nibble; AdamW is always decoupled.
  RefOptimizer(Algorithm algorithm, Hyper hyper, std::vector<RefTensor> tensors)
      : algorithm_(algorithm), h_(hyper), tensors_(std::move(tensors)) {
    if (algorithm_ == Algorithm::kAdamW) h_.decoupled_weight_decay = true;
    for (RefTensor& t : tensors_) init_state(t);
  }

  std::vector<RefTensor>& tensors() { return tensors_; }
  const std::vector<RefTensor>& tensors() const { return tensors_; }
  const RefCounters& counters() const { return counters_; }
  const Hyper& hyper() const { return h_; }

  // One step; grads[i] == nullptr leaves tensor i alone. Returns the global gradient norm of
  // grad / grad_scale over the tensors that have a gradient.
  double step(const std::vector<const float*>& grads, double grad_scale = 1.0, double lr_scale = 1.0,
              double max_grad_norm = 0.0) {
    double sum = 0.0;
    for (std::size_t i = 0; i < tensors_.size(); ++i)
      if (grads[i] != nullptr)
        for (std::int64_t e = 0; e < tensors_[i].numel; ++e) sum += static_cast<double>(grads[i][e]) * grads[i][e];
    const double norm = std::sqrt(sum) / grad_scale;
    double clip = 1.0;
    if (max_grad_norm > 0.0) {
      const double coef = max_grad_norm / (norm + 1e-6);
      if (coef < 1.0) {
        clip = coef;
        ++counters_.clipped_steps;
      }
    }
    const double gm = (h_.maximize ? -1.0 : 1.0) * clip / grad_scale;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      if (grads[i] == nullptr) continue;
      RefTensor& t = tensors_[i];
      ++t.step;
      std::vector<double> g(static_cast<std::size_t>(t.numel));
      for (std::int64_t e = 0; e < t.numel; ++e) g[e] = gm * static_cast<double>(grads[i][e]);
      const double lr = t.lr * lr_scale;
      switch (algorithm_) {
        case Algorithm::kSgd: sgd(t, g, lr); break;
        case Algorithm::kAdam:
        case Algorithm::kAdamW: adam(t, g, lr); break;
        case Algorithm::kRAdam: radam(t, g, lr); break;
        case Algorithm::kLion: lion(t, g, lr); break;
        case Algorithm::kQhm: qhm(t, g, lr); break;
        case Algorithm::kSophiaG: sophia(t, g, lr); break;
        case Algorithm::kAdamP: adamp(t, g, grads[i], lr); break;
        case Algorithm::kAdafactor: adafactor(t, g, lr); break;
        case Algorithm::kAdopt: adopt(t, g, lr); break;
        case Algorithm::kAdEMAMix: ademamix(t, g, lr); break;
        case Algorithm::kAdamWScheduleFree: schedulefree(t, g, lr); break;
        case Algorithm::kMuon:
          if (orthogonalised(t)) muon(t, g, lr);
          else muon_adamw(t, g, lr);
          break;
      }
    }
    return norm;
  }

  // Schedule-free AdamW: the parameters to x (eval) or back to y (train), as the package's
  // eval() and train() (tensors that never stepped have no z and stay).
  void eval() { interpolate(1.0 - 1.0 / static_cast<double>(h_.beta1)); }
  void train() { interpolate(1.0 - static_cast<double>(h_.beta1)); }

  // SophiaG: h = beta2 h + (1 - beta2) estimate, for every tensor with an estimate.
  void update_hessian(const std::vector<const float*>& estimates) {
    const double b2 = h_.beta2;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      if (estimates[i] == nullptr) continue;
      std::vector<double>& hs = tensors_[i].get("hessian");
      for (std::int64_t e = 0; e < tensors_[i].numel; ++e) hs[e] = b2 * hs[e] + (1.0 - b2) * estimates[i][e];
    }
  }

 private:
  static std::int64_t cols_of(const RefTensor& t) { return t.shape.empty() ? 1 : t.shape.back(); }
  bool factored(const RefTensor& t) const {
    return algorithm_ == Algorithm::kAdafactor && t.rank() >= 2 && t.numel > 0;
  }

  void init_state(RefTensor& t) {
    t.numel = 1;
    for (std::int64_t d : t.shape) t.numel *= d;
    if (static_cast<std::int64_t>(t.p.size()) != t.numel) throw std::invalid_argument("reference: p has the wrong size");
    auto add = [&](const char* name, std::int64_t n) {
      t.state_names.emplace_back(name);
      t.state.emplace_back(static_cast<std::size_t>(n), 0.0);
    };
    switch (algorithm_) {
      case Algorithm::kSgd:
        if (h_.momentum > 0.0f) add("momentum_buffer", t.numel);
        break;
      case Algorithm::kAdam:
      case Algorithm::kAdamW:
        add("exp_avg", t.numel);
        add("exp_avg_sq", t.numel);
        if (h_.amsgrad) add("max_exp_avg_sq", t.numel);
        break;
      case Algorithm::kAdamP:
      case Algorithm::kRAdam:
        add("exp_avg", t.numel);
        add("exp_avg_sq", t.numel);
        break;
      case Algorithm::kLion: add("exp_avg", t.numel); break;
      case Algorithm::kQhm: add("momentum_buffer", t.numel); break;
      case Algorithm::kSophiaG:
        add("exp_avg", t.numel);
        add("hessian", t.numel);
        break;
      case Algorithm::kAdopt:
        add("exp_avg", t.numel);
        add("exp_avg_sq", t.numel);
        break;
      case Algorithm::kAdEMAMix:
        add("exp_avg", t.numel);
        add("exp_avg_sq", t.numel);
        add("exp_avg_slow", t.numel);
        break;
      case Algorithm::kAdamWScheduleFree:
        add("z", t.numel);
        add("exp_avg_sq", t.numel);
        break;
      case Algorithm::kMuon:
        if (orthogonalised(t)) {
          add("momentum_buffer", t.numel);
        } else {
          add("exp_avg", t.numel);
          add("exp_avg_sq", t.numel);
        }
        break;
      case Algorithm::kAdafactor:
        if (h_.first_moment) add("exp_avg", t.numel);
        if (factored(t)) {
          const std::int64_t cols = cols_of(t), rows = t.numel / cols, batch_rows = t.shape[t.shape.size() - 2];
          add("exp_avg_sq_row", rows);
          add("exp_avg_sq_col", rows / batch_rows * cols);
        } else {
          add("exp_avg_sq", t.numel);
        }
        break;
    }
  }

  // torch.optim.SGD: the first step sets the buffer to the gradient; decoupled decay optional.
  void sgd(RefTensor& t, const std::vector<double>& g0, double lr) {
    const double wd = t.weight_decay, mom = h_.momentum, damp = h_.dampening;
    const bool decoupled = h_.decoupled_weight_decay;
    std::vector<double>* buf = mom > 0.0 ? &t.get("momentum_buffer") : nullptr;
    if (buf && t.step == 1) ++counters_.sgd_first_steps;
    for (std::int64_t e = 0; e < t.numel; ++e) {
      double& p = t.p[e];
      double g = g0[e];
      if (decoupled) p *= 1.0 - lr * wd;
      else g += wd * p;
      double d = g;
      if (buf) {
        double& b = (*buf)[e];
        b = t.step == 1 ? g : mom * b + (1.0 - damp) * g;
        d = h_.nesterov ? g + mom * b : b;
      }
      p -= lr * d;
    }
  }

  // Adam (L2 added to the gradient) / AdamW (decoupled), AMSGrad on the maximum of v.
  void adam(RefTensor& t, const std::vector<double>& g0, double lr) {
    const double b1 = h_.beta1, b2 = h_.beta2, eps = h_.eps, wd = t.weight_decay;
    const double n = static_cast<double>(t.step);
    const double bc1 = h_.bias_correction ? 1.0 - std::pow(b1, n) : 1.0;
    const double bc2 = h_.bias_correction ? 1.0 - std::pow(b2, n) : 1.0;
    std::vector<double>& m = t.get("exp_avg");
    std::vector<double>& v = t.get("exp_avg_sq");
    std::vector<double>* vmax = h_.amsgrad ? &t.get("max_exp_avg_sq") : nullptr;
    for (std::int64_t e = 0; e < t.numel; ++e) {
      double& p = t.p[e];
      const double g = decayed(p, g0[e], lr, wd);
      m[e] = b1 * m[e] + (1.0 - b1) * g;
      v[e] = b2 * v[e] + (1.0 - b2) * g * g;
      double second = v[e];
      if (vmax) second = (*vmax)[e] = std::max((*vmax)[e], v[e]);
      p -= lr / bc1 * m[e] / (std::sqrt(second) / std::sqrt(bc2) + eps);
    }
  }

  // Weight decay as torch.optim applies it: decoupled, p shrinks by lr * wd before the update;
  // coupled (L2), wd * p joins the gradient, which is returned.
  double decayed(double& p, double g, double lr, double wd) const {
    if (h_.decoupled_weight_decay) {
      p *= 1.0 - lr * wd;
      return g;
    }
    return g + wd * p;
  }

  // torch.optim.RAdam, written from the paper's algorithm: the unrectified step while rho_t <= 5.
  void radam(RefTensor& t, const std::vector<double>& g0, double lr) {
    const double b1 = h_.beta1, b2 = h_.beta2, eps = h_.eps, wd = t.weight_decay;
    const double n = static_cast<double>(t.step);
    const double bc1 = 1.0 - std::pow(b1, n), bc2 = 1.0 - std::pow(b2, n);
    const double rho_inf = 2.0 / (1.0 - b2) - 1.0, rho_t = rho_inf - 2.0 * n * std::pow(b2, n) / bc2;
    std::vector<double>& m = t.get("exp_avg");
    std::vector<double>& v = t.get("exp_avg_sq");
    for (std::int64_t e = 0; e < t.numel; ++e) {
      double& p = t.p[e];
      const double g = decayed(p, g0[e], lr, wd);
      m[e] = b1 * m[e] + (1.0 - b1) * g;
      v[e] = b2 * v[e] + (1.0 - b2) * g * g;
      const double m_hat = m[e] / bc1;
      if (rho_t > 5.0) {
        const double r = std::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
        p -= lr * m_hat * r * std::sqrt(bc2) / (std::sqrt(v[e]) + eps);
      } else {
        p -= lr * m_hat;
      }
    }
  }

  void lion(RefTensor& t, const std::vector<double>& g, double lr) {
    const double b1 = h_.beta1, b2 = h_.beta2;
    std::vector<double>& m = t.get("exp_avg");
    for (std::int64_t e = 0; e < t.numel; ++e) {
      const double c = b1 * m[e] + (1.0 - b1) * g[e];
      t.p[e] = t.p[e] * (1.0 - lr * t.weight_decay) - lr * sign(c);
      m[e] = b2 * m[e] + (1.0 - b2) * g[e];
    }
  }

  // qhoptim's QHM: p -= lr ((1 - nu) g + nu buf), buf an EMA of g with beta = momentum.
  void qhm(RefTensor& t, const std::vector<double>& g0, double lr) {
    const double beta = h_.momentum, nu = h_.nu, wd = t.weight_decay;
    std::vector<double>& buf = t.get("momentum_buffer");
    for (std::int64_t e = 0; e < t.numel; ++e) {
      double& p = t.p[e];
      const double g = decayed(p, g0[e], lr, wd);
      buf[e] = beta * buf[e] + (1.0 - beta) * g;
      p -= lr * ((1.0 - nu) * g + nu * buf[e]);
    }
  }

  // SophiaG (Liu et al.): the Hessian EMA changes only in update_hessian.
  void sophia(RefTensor& t, const std::vector<double>& g, double lr) {
    const double b1 = h_.beta1, rho_bs = static_cast<double>(h_.rho) * h_.batch_tokens;
    std::vector<double>& m = t.get("exp_avg");
    const std::vector<double>& hs = t.get("hessian");
    for (std::int64_t e = 0; e < t.numel; ++e) {
      m[e] = b1 * m[e] + (1.0 - b1) * g[e];
      t.p[e] *= 1.0 - lr * t.weight_decay;
      const double ratio = std::min(std::abs(m[e]) / (rho_bs * hs[e] + 1e-15), 1.0);
      ++(ratio < 1.0 ? counters_.sophia_ratio : counters_.sophia_full);
      t.p[e] -= lr * sign(m[e]) * ratio;
    }
  }

  // AdamP (clovaai/AdamP): the cosine test looks at the raw gradient; channel view first
  // (rows of shape[0]), then the whole tensor.
  void adamp(RefTensor& t, const std::vector<double>& g, const float* raw, double lr) {
    const double b1 = h_.beta1, b2 = h_.beta2, eps = h_.eps;
    const double n = static_cast<double>(t.step);
    const double bc1 = h_.bias_correction ? 1.0 - std::pow(b1, n) : 1.0;
    const double bc2 = h_.bias_correction ? 1.0 - std::pow(b2, n) : 1.0;
    std::vector<double>& m = t.get("exp_avg");
    std::vector<double>& v = t.get("exp_avg_sq");
    std::vector<double> perturb(static_cast<std::size_t>(t.numel));
    for (std::int64_t e = 0; e < t.numel; ++e) {
      m[e] = b1 * m[e] + (1.0 - b1) * g[e];
      v[e] = b2 * v[e] + (1.0 - b2) * g[e] * g[e];
      const double denom = std::sqrt(v[e]) / std::sqrt(bc2) + eps;
      perturb[e] = (h_.nesterov ? b1 * m[e] + (1.0 - b1) * g[e] : m[e]) / denom;
    }
    double ratio = 1.0;
    if (t.rank() >= 2 && t.numel > 0) {
      const std::int64_t rows = t.shape[0], len = t.numel / rows;
      std::vector<double> pp(static_cast<std::size_t>(rows), 0.0);
      double max_cos = 0.0, sgp = 0.0, sgg = 0.0, spp = 0.0;
      for (std::int64_t r = 0; r < rows; ++r) {
        double gp = 0.0, gg = 0.0;
        for (std::int64_t e = r * len; e < (r + 1) * len; ++e) {
          gp += raw[e] * t.p[e];
          gg += static_cast<double>(raw[e]) * raw[e];
          pp[r] += t.p[e] * t.p[e];
        }
        max_cos = std::max(max_cos, std::abs(gp) / std::max(std::sqrt(gg) * std::sqrt(pp[r]), eps));
        sgp += gp;
        sgg += gg;
        spp += pp[r];
      }
      const double layer_cos = std::abs(sgp) / std::max(std::sqrt(sgg) * std::sqrt(spp), eps);
      int view = 0;
      if (max_cos < h_.delta / std::sqrt(static_cast<double>(len))) view = 1;
      else if (layer_cos < h_.delta / std::sqrt(static_cast<double>(t.numel))) view = 2;
      ++counters_.adamp_views[view];
      if (view != 0) {
        const std::int64_t vrows = view == 1 ? rows : 1, vlen = t.numel / vrows;
        for (std::int64_t r = 0; r < vrows; ++r) {
          const double inv = 1.0 / (std::sqrt(view == 1 ? pp[r] : spp) + eps);
          double dot = 0.0;
          for (std::int64_t e = r * vlen; e < (r + 1) * vlen; ++e) dot += t.p[e] * inv * perturb[e];
          for (std::int64_t e = r * vlen; e < (r + 1) * vlen; ++e) perturb[e] -= t.p[e] * inv * dot;
        }
        ratio = h_.wd_ratio;
      }
    }
    const double decay = 1.0 - lr * t.weight_decay * ratio;
    for (std::int64_t e = 0; e < t.numel; ++e) t.p[e] = t.p[e] * decay - lr / bc1 * perturb[e];
  }

  // Adafactor as in the common PyTorch port (fairseq / transformers).
  void adafactor(RefTensor& t, const std::vector<double>& g, double group_lr) {
    if (t.numel == 0) return;
    const double n = static_cast<double>(t.step);
    const double beta2t = 1.0 - std::pow(n, static_cast<double>(h_.decay_rate));
    const double eps1 = h_.eps;
    std::vector<double> u(static_cast<std::size_t>(t.numel));
    if (factored(t)) {
      const std::int64_t cols = cols_of(t), rows = t.numel / cols, br = t.shape[t.shape.size() - 2];
      const std::int64_t batches = rows / br;
      std::vector<double>& row = t.get("exp_avg_sq_row");
      std::vector<double>& col = t.get("exp_avg_sq_col");
      std::vector<double> col_sum(static_cast<std::size_t>(batches * cols), 0.0);
      for (std::int64_t r = 0; r < rows; ++r) {
        double s = 0.0;
        for (std::int64_t c = 0; c < cols; ++c) {
          const double sq = g[r * cols + c] * g[r * cols + c] + eps1;
          s += sq;
          col_sum[(r / br) * cols + c] += sq;
        }
        row[r] = beta2t * row[r] + (1.0 - beta2t) * s / static_cast<double>(cols);
      }
      for (std::int64_t bc = 0; bc < batches * cols; ++bc)
        col[bc] = beta2t * col[bc] + (1.0 - beta2t) * col_sum[bc] / static_cast<double>(br);
      for (std::int64_t b = 0; b < batches; ++b) {
        double mean = 0.0;
        for (std::int64_t r = b * br; r < (b + 1) * br; ++r) mean += row[r];
        mean /= static_cast<double>(br);
        for (std::int64_t r = b * br; r < (b + 1) * br; ++r) {
          const double rf = 1.0 / std::sqrt(row[r] / mean);
          for (std::int64_t c = 0; c < cols; ++c)
            u[r * cols + c] = g[r * cols + c] * rf / std::sqrt(col[b * cols + c]);
        }
      }
    } else {
      std::vector<double>& v = t.get("exp_avg_sq");
      for (std::int64_t e = 0; e < t.numel; ++e) {
        v[e] = beta2t * v[e] + (1.0 - beta2t) * (g[e] * g[e] + eps1);
        u[e] = g[e] / std::sqrt(v[e]);
      }
    }
    double sum_uu = 0.0, sum_pp = 0.0;
    for (std::int64_t e = 0; e < t.numel; ++e) {
      sum_uu += u[e] * u[e];
      sum_pp += t.p[e] * t.p[e];
    }
    double lr = group_lr;
    if (h_.relative_step) lr = std::min(h_.warmup_init ? 1e-6 * n : 1e-2, 1.0 / std::sqrt(n));
    if (h_.scale_parameter) lr *= std::max(static_cast<double>(h_.eps2), std::sqrt(sum_pp / t.numel));
    const double rms_u = std::sqrt(sum_uu / t.numel);
    ++(rms_u > h_.clip_threshold ? counters_.adafactor_clipped : counters_.adafactor_unclipped);
    const double scale = lr / std::max(1.0, rms_u / h_.clip_threshold);
    const double decay = 1.0 - t.weight_decay * lr;
    std::vector<double>* m = h_.first_moment ? &t.get("exp_avg") : nullptr;
    for (std::int64_t e = 0; e < t.numel; ++e) {
      double step = u[e] * scale;
      if (m) step = (*m)[e] = h_.beta1 * (*m)[e] + (1.0 - h_.beta1) * step;
      t.p[e] = t.p[e] * decay - step;
    }
  }

  // ADOPT (iShohei220/adopt): the first step sets v = g^2 and nothing else; later ones clip the
  // normalised gradient to +-(steps before)^clip_exponent, move m, step, then update v.
  void adopt(RefTensor& t, const std::vector<double>& g0, double lr) {
    const double b1 = h_.beta1, b2 = h_.beta2, eps = h_.eps, wd = t.weight_decay;
    const double clip = h_.clip_exponent < 0.0f ? HUGE_VAL
                                                : std::pow(static_cast<double>(t.step - 1), h_.clip_exponent);
    std::vector<double>& m = t.get("exp_avg");
    std::vector<double>& v = t.get("exp_avg_sq");
    for (std::int64_t e = 0; e < t.numel; ++e) {
      double& p = t.p[e];
      double g = g0[e];
      if (!h_.decoupled_weight_decay) g += wd * p;
      if (t.step == 1) {
        v[e] = g * g;
        continue;
      }
      if (h_.decoupled_weight_decay) p *= 1.0 - lr * wd;
      const double n = std::clamp(g / std::max(std::sqrt(v[e]), eps), -clip, clip);
      m[e] = b1 * m[e] + (1.0 - b1) * n;
      p -= lr * m[e];
      v[e] = b2 * v[e] + (1.0 - b2) * g * g;
    }
  }

  // AdEMAMix (apple/ml-ademamix): alpha warms up linearly from 0 over alpha_warmup steps, beta3
  // linearly in half-life from beta1 over beta3_warmup steps; decoupled weight decay.
  void ademamix(RefTensor& t, const std::vector<double>& g, double lr) {
    const double b1 = h_.beta1, b2 = h_.beta2, eps = h_.eps, n = static_cast<double>(t.step);
    double alpha = h_.alpha, b3 = h_.beta3;
    if (h_.alpha_warmup > 0.0f && n < h_.alpha_warmup) alpha = n / h_.alpha_warmup * h_.alpha;
    if (h_.beta3_warmup > 0.0f && n < h_.beta3_warmup) {
      const double a = n / h_.beta3_warmup;
      auto half_life = [](double beta) { return std::log(0.5) / std::log(beta + 1e-8) - 1.0; };
      b3 = std::pow(0.5, 1.0 / ((1.0 - a) * half_life(b1) + a * half_life(h_.beta3) + 1.0));
    }
    const double bc1 = h_.bias_correction ? 1.0 - std::pow(b1, n) : 1.0;
    const double bc2 = h_.bias_correction ? 1.0 - std::pow(b2, n) : 1.0;
    std::vector<double>& m = t.get("exp_avg");
    std::vector<double>& v = t.get("exp_avg_sq");
    std::vector<double>& slow = t.get("exp_avg_slow");
    for (std::int64_t e = 0; e < t.numel; ++e) {
      m[e] = b1 * m[e] + (1.0 - b1) * g[e];
      slow[e] = b3 * slow[e] + (1.0 - b3) * g[e];
      v[e] = b2 * v[e] + (1.0 - b2) * g[e] * g[e];
      const double update = (m[e] / bc1 + alpha * slow[e]) / (std::sqrt(v[e]) / std::sqrt(bc2) + eps);
      t.p[e] -= lr * (update + t.weight_decay * t.p[e]);
    }
  }

  // Schedule-free AdamW (facebookresearch/schedule_free, AdamWScheduleFree): k = steps before this
  // one; the linear warm-up, lr_max and the weight of the new point in the average; d = g over the
  // bias-corrected sqrt(v) plus eps, plus weight decay at y; y toward z by ckp1 then along d; z
  // along -lr d. z starts at the parameter.
  void schedulefree(RefTensor& t, const std::vector<double>& g, double lr) {
    const double b1 = h_.beta1, b2 = h_.beta2, eps = h_.eps, wd = t.weight_decay;
    const double k = static_cast<double>(t.step - 1);
    if (k < h_.warmup_steps) lr *= (k + 1.0) / h_.warmup_steps;
    t.lr_max = std::max(lr, t.lr_max);
    const double weight = std::pow(k + 1.0, h_.r) * std::pow(t.lr_max, h_.weight_lr_power);
    t.weight_sum += weight;
    const double ckp1 = t.weight_sum != 0.0 ? weight / t.weight_sum : 0.0;
    const double bc2 = 1.0 - std::pow(b2, k + 1.0);
    std::vector<double>& z = t.get("z");
    std::vector<double>& v = t.get("exp_avg_sq");
    if (t.step == 1) z = t.p;
    for (std::int64_t e = 0; e < t.numel; ++e) {
      double& y = t.p[e];
      v[e] = b2 * v[e] + (1.0 - b2) * g[e] * g[e];
      const double d = g[e] / (std::sqrt(v[e] / bc2) + eps) + wd * y;
      y = y + ckp1 * (z[e] - y);
      y += lr * (b1 * (1.0 - ckp1) - 1.0) * d;
      z[e] -= lr * d;
    }
  }

  void interpolate(double weight) {
    for (RefTensor& t : tensors_) {
      if (t.step == 0) continue;
      const std::vector<double>& z = t.get("z");
      for (std::int64_t e = 0; e < t.numel; ++e) t.p[e] += weight * (z[e] - t.p[e]);
    }
  }

  // Muon (torch.optim.Muon, with fp64 Newton-Schulz): torch's lerp momentum, the Nesterov update
  // orthogonalised as a (shape[0], rest) matrix, decoupled decay, lr times the shape factor.
  void muon(RefTensor& t, const std::vector<double>& g, double lr) {
    const double mu = h_.momentum;
    std::vector<double>& buf = t.get("momentum_buffer");
    std::vector<double> u(g.size());
    for (std::int64_t e = 0; e < t.numel; ++e) {
      buf[e] += (1.0 - mu) * (g[e] - buf[e]);
      u[e] = h_.nesterov ? g[e] + mu * (buf[e] - g[e]) : buf[e];
    }
    const std::int64_t rows = t.shape[0], cols = t.numel / rows;
    const std::vector<double> o = newton_schulz(u, rows, cols, h_.ns_a, h_.ns_b, h_.ns_c,
                                                static_cast<int>(h_.ns_steps), h_.eps);
    const double A = static_cast<double>(rows), B = static_cast<double>(cols);
    double factor = 1.0;
    switch (static_cast<int>(h_.adjust_lr)) {
      case 0: factor = std::sqrt(std::max(1.0, A / B)); break;
      case 1: factor = 0.2 * std::sqrt(std::max(A, B)); break;
      case 2: factor = std::sqrt(A / B); break;
      default: throw std::invalid_argument("reference: unknown adjust_lr");
    }
    for (std::int64_t e = 0; e < t.numel; ++e) {
      t.p[e] *= 1.0 - lr * t.weight_decay;
      t.p[e] -= lr * factor * o[e];
    }
  }

  // Muon's AdamW fallback: AdamW with beta1, beta2 and adamw_eps (lr and weight decay come in t).
  void muon_adamw(RefTensor& t, const std::vector<double>& g, double lr) {
    const double b1 = h_.beta1, b2 = h_.beta2, eps = h_.adamw_eps, n = static_cast<double>(t.step);
    const double bc1 = 1.0 - std::pow(b1, n), bc2 = 1.0 - std::pow(b2, n);
    std::vector<double>& m = t.get("exp_avg");
    std::vector<double>& v = t.get("exp_avg_sq");
    for (std::int64_t e = 0; e < t.numel; ++e) {
      t.p[e] *= 1.0 - lr * t.weight_decay;
      m[e] = b1 * m[e] + (1.0 - b1) * g[e];
      v[e] = b2 * v[e] + (1.0 - b2) * g[e] * g[e];
      t.p[e] -= lr / bc1 * m[e] / (std::sqrt(v[e] / bc2) + eps);
    }
  }

 public:
  // Muon's default choice: matrices (rank >= 2) but embeddings and output heads.
  static bool muon_default_orthogonalises(const std::string& name, int rank) {
    for (const char* pattern : {"embed", "wte", "wpe", "lm_head"})
      if (name.find(pattern) != std::string::npos) return false;
    return rank >= 2;
  }
  // The Newton-Schulz iteration of torch's _zeropower_via_newtonschulz in fp64, on a row-major
  // rows x cols matrix: transposed when tall, X = G / max(|G|_F, eps), then `steps` times
  // A = X X^T, B = b A + c A A, X = a X + B X.
  static std::vector<double> newton_schulz(const std::vector<double>& g, std::int64_t rows, std::int64_t cols,
                                           double a, double b, double c, int steps, double eps) {
    const bool tall = rows > cols;
    const std::int64_t s = tall ? cols : rows, l = tall ? rows : cols;
    double norm = 0.0;
    for (double x : g) norm += x * x;
    norm = std::max(std::sqrt(norm), eps);
    std::vector<double> x(static_cast<std::size_t>(s * l)), y(x.size()), A(static_cast<std::size_t>(s * s)), B(A.size());
    for (std::int64_t r = 0; r < s; ++r)
      for (std::int64_t k = 0; k < l; ++k) x[r * l + k] = (tall ? g[k * cols + r] : g[r * l + k]) / norm;
    for (int it = 0; it < steps; ++it) {
      for (std::int64_t i = 0; i < s; ++i)
        for (std::int64_t j = 0; j < s; ++j) {
          double d = 0.0;
          for (std::int64_t k = 0; k < l; ++k) d += x[i * l + k] * x[j * l + k];
          A[i * s + j] = d;
        }
      for (std::int64_t i = 0; i < s; ++i)
        for (std::int64_t j = 0; j < s; ++j) {
          double d = 0.0;
          for (std::int64_t k = 0; k < s; ++k) d += A[i * s + k] * A[k * s + j];
          B[i * s + j] = b * A[i * s + j] + c * d;
        }
      for (std::int64_t i = 0; i < s; ++i)
        for (std::int64_t j = 0; j < l; ++j) {
          double d = 0.0;
          for (std::int64_t k = 0; k < s; ++k) d += B[i * s + k] * x[k * l + j];
          y[i * l + j] = a * x[i * l + j] + d;
        }
      std::swap(x, y);
    }
    std::vector<double> out(g.size());
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t k = 0; k < cols; ++k) out[r * cols + k] = tall ? x[k * l + r] : x[r * cols + k];
    return out;
  }

 private:
  bool orthogonalised(const RefTensor& t) const {
    return algorithm_ == Algorithm::kMuon && muon_default_orthogonalises(t.name, t.rank());
  }

  static double sign(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0); }

  Algorithm algorithm_;
  Hyper h_;
  std::vector<RefTensor> tensors_;
  RefCounters counters_;
};

}  // namespace nibble::testref
