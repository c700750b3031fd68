// nibble::Optimizer against the plain fp64 reference in reference_optimizers.hpp: every algorithm
// with fp32 and bf16 state, 20+ steps on odd 1-D sizes and 2-D/3-D shapes, fresh seeded gradients
// each step, parameters and state compared after every step. Also: missing gradients, parameter
// groups, no-decay masks, lr_scale, grad_scale, global-norm clipping and thread counts.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "reference_optimizers.hpp"

namespace nibble {
namespace {

using testref::RefOptimizer;
using testref::RefTensor;
using Shape = std::vector<std::int64_t>;

constexpr int kSteps = 20;

std::int64_t numel_of(const Shape& s) {
  std::int64_t n = 1;
  for (std::int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i) out += 'x';
    out += std::to_string(s[i]);
  }
  return out.empty() ? "scalar" : out;
}

// The odd 1-D sizes (one element, below/above a 256-element block, one past a 4096 boundary,
// a prime over a million that spans many 65536-element chunks) and shapes whose rank >= 2 runs
// Adafactor's factored and AdamP's projection paths (the 3-D one factors per batch of rows).
const std::vector<Shape> kAllShapes = {{1}, {7}, {255}, {257}, {4097}, {1000003}, {3, 5}, {64, 65}, {300, 1024}, {4, 6, 33}};
std::vector<Shape> small_shapes() {
  std::vector<Shape> out;
  for (const Shape& s : kAllShapes)
    if (numel_of(s) < 1000000) out.push_back(s);
  return out;
}

// Gradient-like numbers from one 64-bit draw (Box-Muller for tens of millions of values per case
// would dominate the run time): a scaled Irwin-Hall(3) sum with mean 0 and variance 1, an exact
// zero 1/128 of the time and a 16x outlier 1/128 of the time.
float draw(Rng& rng) {
  const std::uint64_t r = rng.next_u64();
  const double s = static_cast<double>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff)) / 65536.0 - 1.5;
  const unsigned tag = static_cast<unsigned>(r >> 57);
  if (tag == 0) return 0.0f;
  const float x = static_cast<float>(2.0 * s);
  return tag == 1 ? 16.0f * x : x;
}

// Removes from g, per row of a (rows, len) view, its component along p: the cosine of the two
// is then ~1e-7, far below AdamP's threshold delta / sqrt(len).
void orthogonalize(float* g, const float* p, std::int64_t rows, std::int64_t len) {
  for (std::int64_t r = 0; r < rows; ++r) {
    double gp = 0.0, pp = 0.0;
    for (std::int64_t e = r * len; e < (r + 1) * len; ++e) {
      gp += static_cast<double>(g[e]) * p[e];
      pp += static_cast<double>(p[e]) * p[e];
    }
    const double c = pp > 0.0 ? gp / pp : 0.0;
    for (std::int64_t e = r * len; e < (r + 1) * len; ++e) g[e] = static_cast<float>(g[e] - c * p[e]);
  }
}

// ------------------------------------------------------------------------------------------------
// Comparison with a stated tolerance: |got - want| <= rtol |want| + atol rms(want), where rms is
// the tensor's RMS (so atol is relative to the tensor's own scale: a state of magnitude 1e-4 is
// judged as strictly as one of magnitude 1), for all but max_bad elements.

struct Tol {
  double rtol = 0.0;
  double atol = 0.0;
  std::int64_t max_bad = 0;   // elements allowed outside the bound, plus
  double bad_fraction = 0.0;  // this fraction of the tensor's elements
  double disp_atol = 0.0;     // parameters: x rms of their displacement from the start
};

double rms(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return v.empty() ? 0.0 : std::sqrt(s / static_cast<double>(v.size()));
}

double rms_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return a.empty() ? 0.0 : std::sqrt(s / static_cast<double>(a.size()));
}

// Worst err / bound seen, printed when NIBBLE_REF_VERBOSE is set (to re-derive tolerances).
struct Worst {
  double ratio = 0.0;
  std::string where;
  double bad_fraction = 0.0;  // largest fraction of a tensor outside its bound (within allowance)
  void note(double r, const std::string& w, double bad) {
    bad_fraction = std::max(bad_fraction, bad);
    if (r > ratio) {
      ratio = r;
      where = w;
    }
  }
};

// `base` (the initial parameters) adds disp_atol x rms(want - base) to the bound.
testing::AssertionResult close_to(const float* got, std::size_t n, const std::vector<double>& want, const Tol& tol,
                                  Worst* worst = nullptr, const std::string& what = "",
                                  const std::vector<double>* base = nullptr) {
  if (want.size() != n) return testing::AssertionFailure() << "size " << n << " != reference size " << want.size();
  const double atol = tol.atol * rms(want) + (base ? tol.disp_atol * rms_diff(want, *base) : 0.0);
  std::int64_t bad = 0;
  std::size_t first = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= tol.rtol * std::abs(want[i]) + atol) && bad++ == 0) first = i;  // NaN fails
  }
  if (worst) {
    double worst_ratio = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      const double err = std::abs(static_cast<double>(got[i]) - want[i]);
      const double bound = tol.rtol * std::abs(want[i]) + atol;
      if (err <= bound && bound > 0.0) worst_ratio = std::max(worst_ratio, err / bound);
    }
    worst->note(worst_ratio, what, static_cast<double>(bad) / static_cast<double>(std::max<std::size_t>(n, 1)));
  }
  const std::int64_t allowed = tol.max_bad + static_cast<std::int64_t>(tol.bad_fraction * static_cast<double>(n));
  if (bad <= allowed) return testing::AssertionSuccess();
  return testing::AssertionFailure() << bad << " of " << n << " elements outside rtol " << tol.rtol << " / atol "
                                     << tol.atol << " x rms " << rms(want) << " (allowed " << allowed
                                     << "); first at " << first << ": got " << got[first] << ", want " << want[first];
}

testing::AssertionResult close_to(const std::vector<float>& got, const std::vector<double>& want, const Tol& tol,
                                  Worst* worst = nullptr, const std::string& what = "",
                                  const std::vector<double>* base = nullptr) {
  return close_to(got.data(), got.size(), want, tol, worst, what, base);
}

// ------------------------------------------------------------------------------------------------
// A nibble optimizer and the reference, stepped in lockstep on the same fp32 gradients.

struct TensorSpec {
  std::string name;
  Shape shape;
  int group = 0;
};

struct GroupSpec {
  std::optional<float> lr;
  std::optional<float> weight_decay;
};

bool name_has(const std::string& name, const std::vector<std::string>& patterns) {
  for (const std::string& p : patterns)
    if (!p.empty() && name.find(p) != std::string::npos) return true;
  return false;
}

class Harness {
 public:
  Harness(Algorithm algorithm, const Hyper& hyper, std::vector<TensorSpec> specs, std::vector<GroupSpec> groups,
          OptimizerOptions options, std::uint64_t seed)
      : algorithm_(algorithm), specs_(std::move(specs)), options_(options), rng_(seed) {
    options_.algorithm = algorithm;
    options_.hyper = hyper;
    for (std::size_t i = 1; i < specs_.size(); ++i)
      if (specs_[i].group < specs_[i - 1].group) throw std::invalid_argument("specs must be ordered by group");
    const std::size_t n = specs_.size();
    params_.resize(n);
    grads_.resize(n);
    has_grad_.assign(n, true);
    std::vector<ParamGroup> pg(groups.size());
    std::vector<RefTensor> ref;
    for (std::size_t i = 0; i < n; ++i) {
      const TensorSpec& s = specs_[i];
      const std::int64_t numel = numel_of(s.shape);
      params_[i].resize(static_cast<std::size_t>(numel));
      for (float& x : params_[i]) x = draw(rng_);
      grads_[i].assign(static_cast<std::size_t>(std::max<std::int64_t>(numel, 1)), 0.0f);
      pg[s.group].params.push_back({s.name, s.shape, numel ? params_[i].data() : nullptr, grads_[i].data()});
      RefTensor t;
      t.name = s.name;
      t.shape = s.shape;
      t.p.assign(params_[i].begin(), params_[i].end());
      // Muon's AdamW fallback tensors take its own lr and weight decay unless the group sets them.
      const bool fallback = algorithm == Algorithm::kMuon &&
                            !RefOptimizer::muon_default_orthogonalises(s.name, static_cast<int>(s.shape.size()));
      t.lr = groups[s.group].lr.value_or(fallback ? hyper.adamw_lr : hyper.lr);
      t.weight_decay = groups[s.group].weight_decay.value_or(fallback ? hyper.adamw_weight_decay : hyper.weight_decay);
      if (name_has(s.name, options_.no_decay_names) || (options_.no_decay_vectors && s.shape.size() < 2))
        t.weight_decay = 0.0;
      ref.push_back(std::move(t));
    }
    for (std::size_t g = 0; g < groups.size(); ++g) {
      pg[g].lr = groups[g].lr;
      pg[g].weight_decay = groups[g].weight_decay;
    }
    opt_ = std::make_unique<Optimizer>(std::move(pg), options_);
    ref_ = std::make_unique<RefOptimizer>(algorithm, hyper, std::move(ref));
    for (const RefTensor& t : ref_->tensors()) p0_.push_back(t.p);
  }

  Optimizer& opt() { return *opt_; }
  RefOptimizer& ref() { return *ref_; }
  std::size_t size() const { return specs_.size(); }
  const TensorSpec& spec(std::size_t i) const { return specs_[i]; }
  std::vector<float>& params(std::size_t i) { return params_[i]; }
  std::vector<float>& grads(std::size_t i) { return grads_[i]; }

  // Fresh gradients for every tensor, scaled per tensor by 1, 1e-2 or 4 and by `factor`. For AdamP,
  // tensors of rank >= 2 cycle through row-orthogonal (channel projection), whole-tensor
  // orthogonal (layer projection) and weight-aligned (no projection) gradients.
  void draw_grads(int step, float factor = 1.0f) {
    static constexpr float kScale[3] = {1.0f, 1e-2f, 4.0f};
    for (std::size_t i = 0; i < size(); ++i) {
      const std::int64_t n = numel_of(specs_[i].shape);
      float* g = grads_[i].data();
      const float* p = params_[i].data();
      const float s = kScale[i % 3] * factor;
      for (std::int64_t e = 0; e < n; ++e) g[e] = draw(rng_);
      if (algorithm_ == Algorithm::kAdamP && specs_[i].shape.size() >= 2 && n > 0) {
        const std::int64_t rows = specs_[i].shape[0];
        switch ((static_cast<std::size_t>(step) + i) % 3) {
          case 0: orthogonalize(g, p, rows, n / rows); break;
          case 1: orthogonalize(g, p, 1, n); break;
          default:
            for (std::int64_t e = 0; e < n; ++e) g[e] += p[e];
            break;
        }
      }
      for (std::int64_t e = 0; e < n; ++e) g[e] *= s;
    }
  }

  void set_has_grad(std::size_t i, bool has) {
    has_grad_[i] = has;
    opt_->set_grad(i, has ? grads_[i].data() : nullptr);
  }

  std::vector<const float*> grad_ptrs() const {
    std::vector<const float*> out(size());
    for (std::size_t i = 0; i < size(); ++i) out[i] = has_grad_[i] ? grads_[i].data() : nullptr;
    return out;
  }

  // Steps nibble and, unless track_reference(false), the reference.
  StepResult step(const StepOptions& so = {}) {
    const StepResult r = opt_->step(so);
    if (track_reference_) ref_norm_ = ref_->step(grad_ptrs(), so.grad_scale, so.lr_scale, options_.max_grad_norm);
    return r;
  }
  void track_reference(bool on) { track_reference_ = on; }
  double ref_norm() const { return ref_norm_; }

  // SophiaG's Hessian estimate: g * g of the current gradients (non-negative, like a
  // Gauss-Newton-Bartlett estimate), for the tensors that have a gradient.
  void update_hessian() {
    estimates_.resize(size());
    std::vector<const float*> ptrs(size(), nullptr);
    for (std::size_t i = 0; i < size(); ++i) {
      estimates_[i].resize(grads_[i].size());
      for (std::size_t e = 0; e < grads_[i].size(); ++e) estimates_[i][e] = grads_[i][e] * grads_[i][e];
      if (has_grad_[i]) ptrs[i] = estimates_[i].data();
    }
    opt_->update_hessian(ptrs);
    if (track_reference_) ref_->update_hessian(ptrs);
  }

  // The reference takes nibble's parameters and (dequantized) state, so that the next step is
  // compared in isolation.
  void resync() {
    for (std::size_t i = 0; i < size(); ++i) {
      RefTensor& t = ref_->tensors()[i];
      t.p.assign(params_[i].begin(), params_[i].end());
      for (const std::string& name : t.state_names) {
        const std::vector<float> v = opt_->state_values(i, name);
        t.get(name).assign(v.begin(), v.end());
      }
    }
  }

  // Parameters and every state tensor of tensor i against the reference; also that nibble reports
  // exactly the state names the reference keeps.
  testing::AssertionResult compare_tensor(std::size_t i, const Tol& param_tol, const Tol& state_tol,
                                          Worst* worst = nullptr) {
    const RefTensor& t = ref_->tensors()[i];
    const std::string where = specs_[i].name + " (" + shape_str(specs_[i].shape) + ")";
    auto r = close_to(params_[i], t.p, param_tol, worst, where + " param", &p0_[i]);
    if (!r) return testing::AssertionFailure() << where << " param: " << r.message();
    std::vector<std::string> names = opt_->state_names(i), want = t.state_names;
    std::sort(names.begin(), names.end());
    std::sort(want.begin(), want.end());
    if (names != want) {
      std::ostringstream os;
      for (const auto& s : names) os << s << " ";
      return testing::AssertionFailure() << where << ": nibble keeps state [" << os.str() << "]";
    }
    for (const std::string& name : t.state_names) {
      r = close_to(opt_->state_values(i, name), t.get(name), state_tol, worst, where + " " + name);
      if (!r) return testing::AssertionFailure() << where << " " << name << ": " << r.message();
    }
    return testing::AssertionSuccess();
  }

  testing::AssertionResult compare(const Tol& param_tol, const Tol& state_tol, Worst* worst = nullptr) {
    for (std::size_t i = 0; i < size(); ++i) {
      auto r = compare_tensor(i, param_tol, state_tol, worst);
      if (!r) return r;
    }
    return testing::AssertionSuccess();
  }

  // Parameters followed by every state tensor of tensor i, as nibble holds them.
  std::vector<std::vector<float>> snapshot(std::size_t i) const {
    std::vector<std::vector<float>> out{params_[i]};
    for (const std::string& name : opt_->state_names(i)) out.push_back(opt_->state_values(i, name));
    return out;
  }

 private:
  Algorithm algorithm_;
  std::vector<TensorSpec> specs_;
  OptimizerOptions options_;
  Rng rng_;
  std::vector<std::vector<float>> params_, grads_, estimates_;
  std::vector<std::vector<double>> p0_;
  std::vector<bool> has_grad_;
  std::unique_ptr<Optimizer> opt_;
  std::unique_ptr<RefOptimizer> ref_;
  double ref_norm_ = 0.0;
  bool track_reference_ = true;
};

std::vector<TensorSpec> specs_for(const std::vector<Shape>& shapes) {
  std::vector<TensorSpec> out;
  for (const Shape& s : shapes) {
    std::string name = "t";
    name += std::to_string(out.size());
    name += '.';
    name += shape_str(s);
    out.push_back({std::move(name), s, 0});
  }
  return out;
}

// The tensors an algorithm is checked on. Muon: its matrices at odd shapes, wide and tall, and the
// 3-D one seen as (4, 198), instead of the larger 2-D ones (the fp64 Newton-Schulz reference is
// cubic), and an embedding, which its AdamW fallback steps like the vectors.
std::vector<TensorSpec> specs_of(Algorithm algorithm, const std::vector<Shape>& shapes) {
  if (algorithm != Algorithm::kMuon) return specs_for(shapes);
  std::vector<Shape> kept;
  for (const Shape& s : shapes)
    if (s.size() != 2 || numel_of(s) < 1000) kept.push_back(s);
  kept.push_back({37, 53});
  kept.push_back({64, 17});
  std::vector<TensorSpec> out = specs_for(kept);
  out.push_back({"wte", {50, 24}, 0});
  return out;
}

// ------------------------------------------------------------------------------------------------
// Tolerances.
//
// fp32 state, free-running (the reference is never reset, so rounding accumulates): nibble runs
// each update in fp32 (unit roundoff u = 6e-8). A parameter is rounded once per step (<= 20
// half-ulps over 20 steps: 6e-7 relative) and its update adds a few roundings of lr * O(1); moment
// EMAs contract their past errors and a second moment accumulates ~2 u per step (2.4e-6 after
// 20). Hence rtol 1e-5. An element whose state has cancelled to near zero keeps the absolute error
// of the largest terms in its history, and the gradients here carry 16x outliers (64x the RMS
// of the smallest-scaled tensors' neighbours): ~16 x 3 u x rms = 3e-6 x rms, hence atol 1e-5 x rms
// (atol is relative to the tensor's own RMS so a state of scale 1e-4 is judged as strictly as one
// of scale 1). The largest error measured is ~0.3 of these bounds (NIBBLE_REF_VERBOSE=1 prints it),
// and a semantic slip (a bias correction a step off, a decay applied twice) is ~1000x larger.
constexpr Tol kFp32Param{1e-5, 1e-5, 0};
constexpr Tol kFp32State{1e-5, 1e-5, 0};

// bf16 state, resynchronised: before every step the reference takes nibble's parameters and its
// dequantized state, so one step is checked in isolation. nibble computes the update in fp32 from
// the bf16 inputs and rounds only what it stores, so the parameters must agree as tightly as in
// fp32, and every stored state value must be the round-to-nearest bf16 of the exact value: within
// half an ulp, i.e. 2^-8 relative (8 significant bits) plus the fp32 error above. Truncation
// instead of rounding (up to 2^-7) or a state stored from the wrong value would fail.
constexpr Tol kBf16ResyncParam{1e-5, 1e-5, 0};
constexpr Tol kBf16ResyncState{0x1.0p-8 * 1.001, 1e-5, 0};

// bf16 state, free-running over 20 steps: each step rounds every state value by up to 2^-8
// relative. A slow EMA such as Adam's v (beta2 = 0.999) keeps almost all past roundings: up to
// ~20 x 3.9e-3 = 8e-2 in the worst case (random-walk ~2e-2); first moments forget theirs at
// 1 - beta1 but keep the absolute rounding of past outliers after cancelling. Parameters stay
// fp32 and take per step an error of a few percent of that step's update (lr * O(1), or lr * |buf|
// for SGD, whose buffer carries the outliers), accumulating over 20 steps. The bounds below hold
// for all but 1 element in 1000 (those whose history holds a 16x outlier that later cancelled,
// the bitsandbytes "at most N non-close elements" rule); the resync test above is the exact check.
constexpr Tol kBf16Param{1e-3, 1e-3, 0, 0.0, 5e-2};
constexpr Tol kBf16State{8e-2, 2e-2, 0};

// Lion and SophiaG step by the sign of a momentum (SophiaG while its Hessian EMA is zero or the
// ratio is clipped): when that momentum is within rounding of zero, two implementations may take
// opposite signs and the parameter differs by 2 lr from then on, while the state stays close.
// With fp32 arithmetic such a tie needs |c| < ~1e-7 of its terms, which the draws here essentially
// never produce: we allow 2 per tensor. Free-running bf16 state carries a 4e-3 rounding, so ties
// are ~1e4 times likelier; there the 1-in-1000 allowance applies to every algorithm.
enum class Mode { kFreeRunning, kResync };

Tol param_tol(Algorithm a, Precision p, Mode mode) {
  const std::int64_t ties = a == Algorithm::kLion || a == Algorithm::kSophiaG ? 2 : 0;
  if (p == Precision::kFp32) return {kFp32Param.rtol, kFp32Param.atol, ties};
  if (mode == Mode::kResync) return {kBf16ResyncParam.rtol, kBf16ResyncParam.atol, ties};
  return {kBf16Param.rtol, kBf16Param.atol, ties, 1e-3, kBf16Param.disp_atol};
}
Tol state_tol(Precision p, Mode mode) {
  if (p == Precision::kFp32) return kFp32State;
  if (mode == Mode::kResync) return kBf16ResyncState;
  return {kBf16State.rtol, kBf16State.atol, 0, 1e-3};
}

bool verbose() { return std::getenv("NIBBLE_REF_VERBOSE") != nullptr; }

// ------------------------------------------------------------------------------------------------
// Hyperparameter settings: each algorithm's defaults plus variants that turn on every option;
// every algorithm gets weight decay and maximize in at least one. The first setting of each
// runs on every shape including the million-element one; the rest skip it to bound run time.

struct Setting {
  std::string name;
  Hyper hyper;
};

Hyper with(Algorithm a, const std::function<void(Hyper&)>& edit) {
  Hyper h = default_hyper(a);
  edit(h);
  return h;
}

std::vector<Setting> settings_for(Algorithm a) {
  using A = Algorithm;
  switch (a) {
    case A::kSgd:
      return {{"momentum_l2", with(a, [](Hyper& h) { h.lr = 1e-2f; h.momentum = 0.9f; h.weight_decay = 1e-2f; })},
              {"nesterov_decoupled_maximize", with(a, [](Hyper& h) {
                 h.lr = 2e-2f; h.momentum = 0.9f; h.nesterov = true; h.weight_decay = 5e-2f;
                 h.decoupled_weight_decay = true; h.maximize = true; })},
              {"dampening_l2_maximize", with(a, [](Hyper& h) {
                 h.lr = 1e-2f; h.momentum = 0.8f; h.dampening = 0.3f; h.weight_decay = 1e-2f; h.maximize = true; })},
              {"no_momentum_decoupled", with(a, [](Hyper& h) {
                 h.lr = 5e-2f; h.momentum = 0.0f; h.weight_decay = 0.1f; h.decoupled_weight_decay = true; })}};
    case A::kAdam:
      return {{"l2", with(a, [](Hyper& h) { h.weight_decay = 1e-2f; })},
              {"amsgrad_maximize", with(a, [](Hyper& h) {
                 h.lr = 2e-3f; h.beta1 = 0.8f; h.beta2 = 0.99f; h.amsgrad = true; h.weight_decay = 0.1f;
                 h.maximize = true; })},
              {"no_bias_correction", with(a, [](Hyper& h) {
                 h.lr = 1e-2f; h.eps = 1e-6f; h.bias_correction = false; h.weight_decay = 1e-3f; })}};
    case A::kAdamW:
      return {{"default", with(a, [](Hyper&) {})},
              {"amsgrad_maximize", with(a, [](Hyper& h) {
                 h.lr = 3e-3f; h.amsgrad = true; h.weight_decay = 0.1f; h.maximize = true; })},
              // AdamW is decoupled whatever the flag says.
              {"flag_says_coupled", with(a, [](Hyper& h) {
                 h.lr = 1e-2f; h.weight_decay = 0.2f; h.decoupled_weight_decay = false; })}};
    case A::kLion:
      return {{"default_wd", with(a, [](Hyper& h) { h.weight_decay = 0.1f; })},
              {"maximize", with(a, [](Hyper& h) {
                 h.lr = 3e-4f; h.beta1 = 0.95f; h.beta2 = 0.98f; h.weight_decay = 1.0f; h.maximize = true; })}};
    case A::kAdafactor:
      return {{"relative_step", with(a, [](Hyper& h) { h.weight_decay = 1e-2f; })},
              {"fixed_lr_first_moment_maximize", with(a, [](Hyper& h) {
                 h.relative_step = false; h.scale_parameter = false; h.lr = 1e-2f; h.first_moment = true;
                 h.beta1 = 0.9f; h.weight_decay = 0.1f; h.maximize = true; })},
              {"warmup_init_first_moment", with(a, [](Hyper& h) {
                 h.warmup_init = true; h.first_moment = true; h.beta1 = 0.5f; h.clip_threshold = 0.5f; })},
              {"fixed_lr_scaled", with(a, [](Hyper& h) {
                 h.relative_step = false; h.lr = 3e-2f; h.decay_rate = -0.5f; h.eps = 1e-20f; h.eps2 = 1e-2f;
                 h.weight_decay = 0.05f; })}};
    case A::kAdamP:
      return {{"default_wd", with(a, [](Hyper& h) { h.weight_decay = 1e-2f; })},
              {"nesterov_maximize", with(a, [](Hyper& h) {
                 h.lr = 2e-3f; h.nesterov = true; h.weight_decay = 0.1f; h.wd_ratio = 0.2f; h.maximize = true; })},
              {"no_bias_correction", with(a, [](Hyper& h) {
                 h.lr = 1e-3f; h.bias_correction = false; h.delta = 0.2f; h.weight_decay = 0.05f; })}};
    case A::kQhm:
      return {{"l2", with(a, [](Hyper& h) { h.lr = 1e-2f; h.weight_decay = 1e-2f; })},
              {"decoupled_maximize", with(a, [](Hyper& h) {
                 h.lr = 2e-2f; h.momentum = 0.9f; h.nu = 0.5f; h.weight_decay = 5e-2f;
                 h.decoupled_weight_decay = true; h.maximize = true; })}};
    case A::kSophiaG:
      return {{"default", with(a, [](Hyper&) {})},
              // batch_tokens 10: rho * bs * h is small, so most ratios clip to 1.
              {"small_batch_maximize", with(a, [](Hyper& h) {
                 h.lr = 3e-4f; h.batch_tokens = 10.0f; h.weight_decay = 0.2f; h.maximize = true; })}};
    case A::kAdopt:
      // clip_exponent 0: every normalised gradient clipped to +-1, so the clip is exercised.
      return {{"default_l2", with(a, [](Hyper& h) { h.weight_decay = 1e-2f; })},
              {"decoupled_tight_clip_maximize", with(a, [](Hyper& h) {
                 h.lr = 2e-3f; h.beta1 = 0.8f; h.beta2 = 0.99f; h.clip_exponent = 0.0f; h.weight_decay = 0.1f;
                 h.decoupled_weight_decay = true; h.maximize = true; })},
              {"no_clip", with(a, [](Hyper& h) { h.lr = 1e-3f; h.clip_exponent = -1.0f; h.eps = 1e-3f; })}};
    case A::kAdEMAMix:
      return {{"default_wd", with(a, [](Hyper& h) { h.weight_decay = 1e-2f; })},
              // Warm-ups of 12 and 15 of the 20 steps: alpha and beta3 are still rising for most of them.
              {"warmup_maximize", with(a, [](Hyper& h) {
                 h.lr = 2e-3f; h.alpha = 5.0f; h.beta3 = 0.999f; h.alpha_warmup = 12.0f; h.beta3_warmup = 15.0f;
                 h.weight_decay = 0.1f; h.maximize = true; })},
              {"no_bias_correction", with(a, [](Hyper& h) {
                 h.lr = 1e-3f; h.bias_correction = false; h.alpha = 8.0f; h.eps = 1e-6f; })}};
    case A::kAdamWScheduleFree:
      return {{"default_wd", with(a, [](Hyper& h) { h.weight_decay = 1e-2f; })},
              // A warm-up of 8 of the 20 steps, weights growing as step^0.5 and linearly in lr_max.
              {"warmup_r_power_maximize", with(a, [](Hyper& h) {
                 h.lr = 1e-2f; h.beta1 = 0.8f; h.beta2 = 0.99f; h.warmup_steps = 8.0f; h.r = 0.5f;
                 h.weight_lr_power = 1.0f; h.weight_decay = 0.05f; h.maximize = true; })},
              // Still warming up at the last step; an unweighted average (ckp1 = 1 / step).
              {"long_warmup_unweighted", with(a, [](Hyper& h) {
                 h.lr = 5e-3f; h.eps = 1e-6f; h.warmup_steps = 25.0f; h.weight_lr_power = 0.0f; })}};
    case A::kRAdam:
      // rho_t passes 5 at step 6 with beta2 0.999 and 0.99 alike: the run takes five unrectified
      // steps, then rectified ones.
      return {{"l2", with(a, [](Hyper& h) { h.weight_decay = 1e-2f; })},
              {"decoupled_maximize", with(a, [](Hyper& h) {
                 h.lr = 2e-3f; h.beta1 = 0.8f; h.beta2 = 0.99f; h.weight_decay = 0.1f;
                 h.decoupled_weight_decay = true; h.maximize = true; })}};
    case A::kMuon:
      // The fallback's lr raised to Muon's scale so that its steps show beside Muon's.
      return {{"default", with(a, [](Hyper& h) { h.adamw_lr = 1e-3f; h.adamw_weight_decay = 0.05f; })},
              {"plain_momentum_match_rms_maximize", with(a, [](Hyper& h) {
                 h.lr = 2e-2f; h.nesterov = false; h.momentum = 0.9f; h.adjust_lr = 1.0f; h.weight_decay = 0.01f;
                 h.beta1 = 0.8f; h.beta2 = 0.99f; h.adamw_eps = 1e-8f; h.maximize = true; })},
              {"spectral_three_steps", with(a, [](Hyper& h) {
                 h.lr = 1e-2f; h.adjust_lr = 2.0f; h.ns_steps = 3.0f; h.ns_a = 2.0f; h.ns_b = -1.5f; h.ns_c = 0.5f;
                 h.eps = 1e-5f; })}};
  }
  return {};
}

std::string param_name(const testing::TestParamInfo<std::tuple<Algorithm, Precision>>& info) {
  return std::string(algorithm_name(std::get<0>(info.param))) + "_" +
         std::string(precision_name(std::get<1>(info.param)));
}

// ------------------------------------------------------------------------------------------------

class AgainstReference : public testing::TestWithParam<std::tuple<Algorithm, Precision>> {};

// Runs one setting for kSteps steps, comparing after every step; returns false on the first
// failing step (later steps would only repeat it).
bool run_setting(Algorithm algorithm, Precision precision, Mode mode, const Setting& setting,
                 const std::vector<Shape>& shapes, std::uint64_t seed) {
  const std::string label = std::string(algorithm_name(algorithm)) + " / " + std::string(precision_name(precision)) +
                            (mode == Mode::kResync ? " resync / " : " / ") + setting.name;
  SCOPED_TRACE(label);
  OptimizerOptions options;
  options.precision = precision;
  options.min_quant_size = 0;  // small tensors too hold their state at `precision`
  Harness h(algorithm, setting.hyper, specs_of(algorithm, shapes), {GroupSpec{}}, options, seed);
  for (std::size_t i = 0; i < h.size(); ++i) {
    EXPECT_EQ(h.opt().state_precision(i), precision) << h.spec(i).name;
    if (h.opt().state_precision(i) != precision) return false;
  }
  Worst worst;
  Worst* w = verbose() ? &worst : nullptr;
  for (int step = 1; step <= kSteps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    h.draw_grads(step);
    // The Hessian EMA is refreshed every third step, from step 2 on: step 1 runs on h = 0.
    if (algorithm == Algorithm::kSophiaG && step % 3 == 2) h.update_hessian();
    const StepResult r = h.step();
    EXPECT_FALSE(r.skipped);
    EXPECT_EQ(r.step, step);
    const testing::AssertionResult res =
        h.compare(param_tol(algorithm, precision, mode), state_tol(precision, mode), w);
    EXPECT_TRUE(res);
    if (!res) return false;
    if (mode == Mode::kResync) h.resync();
  }
  if (verbose())
    std::printf("[ worst ] %-48s %.3f of tolerance at %s; up to %.1e of a tensor outside\n", label.c_str(),
                worst.ratio, worst.where.c_str(), worst.bad_fraction);
  // The branches this setting is meant to exercise really ran (in the reference).
  const testref::RefCounters& c = h.ref().counters();
  if (algorithm == Algorithm::kAdamP) {
    EXPECT_GT(c.adamp_views[0], 0) << "no unprojected step of a rank >= 2 tensor";
    EXPECT_GT(c.adamp_views[1], 0) << "no channel-view projection";
    EXPECT_GT(c.adamp_views[2], 0) << "no whole-tensor projection";
  }
  if (algorithm == Algorithm::kAdafactor) {
    EXPECT_GT(c.adafactor_unclipped, 0);
    if (setting.name != "fixed_lr_scaled") {
      EXPECT_GT(c.adafactor_clipped, 0) << "update clipping never triggered";
    }
  }
  if (algorithm == Algorithm::kSophiaG) {
    EXPECT_GT(c.sophia_full, 0) << "no clipped (sign) step";
    EXPECT_GT(c.sophia_ratio, 0) << "no unclipped ratio step";
  }
  if (algorithm == Algorithm::kSgd && setting.hyper.momentum > 0.0f) {
    EXPECT_GT(c.sgd_first_steps, 0);
  }
  return true;
}

// fp32 state: every setting free-running. bf16 state: every setting resynchronised, and the
// first setting also free-running (drift stays bounded). The first setting of each algorithm
// runs on every shape including the million-element one; the rest skip it to bound run time.
TEST_P(AgainstReference, TracksFp64ReferenceEveryStep) {
  const auto [algorithm, precision] = GetParam();
  const std::vector<Setting> settings = settings_for(algorithm);
  for (std::size_t si = 0; si < settings.size(); ++si) {
    const std::vector<Shape> shapes = si == 0 ? kAllShapes : small_shapes();
    if (precision == Precision::kFp32) {
      run_setting(algorithm, precision, Mode::kFreeRunning, settings[si], shapes, 1000 + si);
    } else {
      run_setting(algorithm, precision, Mode::kResync, settings[si], shapes, 2000 + si);
      if (si == 0) run_setting(algorithm, precision, Mode::kFreeRunning, settings[si], shapes, 3000 + si);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllAlgorithms, AgainstReference,
                         testing::Combine(testing::ValuesIn(all_algorithms().begin(), all_algorithms().end()),
                                          testing::Values(Precision::kFp32, Precision::kBf16)),
                         param_name);

// ------------------------------------------------------------------------------------------------
// Options and step arguments, fp32 state, every algorithm.

// The first setting of each algorithm with weight decay on; Adafactor on a fixed lr so that group
// lr and lr_scale take effect (with relative_step, its lr is min(1e-2, 1/sqrt(t)) whatever they are).
Hyper decaying_hyper(Algorithm a) {
  Hyper h = settings_for(a).front().hyper;
  h.weight_decay = 0.05f;
  if (a == Algorithm::kAdafactor) {
    h.relative_step = false;
    h.lr = 1e-2f;
  }
  return h;
}

std::string trace(Algorithm a) { return std::string(algorithm_name(a)); }

testing::AssertionResult bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return testing::AssertionFailure() << "sizes " << a.size() << " and " << b.size();
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0)
      return testing::AssertionFailure() << "element " << i << ": " << a[i] << " vs " << b[i];
  return testing::AssertionSuccess();
}

testing::AssertionResult same_tensor(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return testing::AssertionFailure() << a.size() << " vs " << b.size() << " arrays";
  for (std::size_t k = 0; k < a.size(); ++k) {
    auto r = bitwise_equal(a[k], b[k]);
    if (!r) return testing::AssertionFailure() << (k == 0 ? "param" : "state " + std::to_string(k - 1)) << ": " << r.message();
  }
  return testing::AssertionSuccess();
}

void maybe_update_hessian(Harness& h, Algorithm a, int step) {
  if (a == Algorithm::kSophiaG && step % 3 == 2) h.update_hessian();
}

// A tensor without a gradient is left exactly as it was, parameters and state, while the others
// step; its own step count (bias corrections, Adafactor's beta2_t, SGD's first step) continues
// from where it stopped when the gradient returns.
TEST(OptimizerOptions, MissingGradientLeavesTensorAloneAndKeepsItsStepCount) {
  const std::vector<TensorSpec> specs = {
      {"a", {257}}, {"b", {64, 65}}, {"c", {4097}}, {"d", {3, 5}}, {"e", {4, 6, 33}}};
  // Steps at which a tensor has no gradient: e misses the first step (its first step is the
  // optimizer's second), d misses step 2, b misses steps 4-6 and returns at step 7.
  auto missing = [](std::size_t i, int step) {
    return (i == 4 && step == 1) || (i == 3 && step == 2) || (i == 1 && step >= 4 && step <= 6);
  };
  for (Algorithm a : all_algorithms()) {
    SCOPED_TRACE(trace(a));
    Harness h(a, decaying_hyper(a), specs, {GroupSpec{}}, {}, 7);
    for (int step = 1; step <= 10; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      h.draw_grads(step);
      std::vector<std::vector<std::vector<float>>> before(h.size());
      for (std::size_t i = 0; i < h.size(); ++i) {
        h.set_has_grad(i, !missing(i, step));
        if (missing(i, step)) before[i] = h.snapshot(i);
      }
      maybe_update_hessian(h, a, step);
      // Stepping tensor b as if its count were the optimizer's: must be told apart from nibble.
      std::optional<RefOptimizer> global_count;
      if (step == 7) {
        global_count = h.ref();
        global_count->tensors()[1].step = 6;
      }
      const StepResult r = h.step();
      EXPECT_EQ(r.step, step);
      EXPECT_EQ(h.opt().step_count(), step);
      for (std::size_t i = 0; i < h.size(); ++i)
        if (missing(i, step)) {
          EXPECT_TRUE(same_tensor(before[i], h.snapshot(i))) << h.spec(i).name << " changed without a gradient";
        }
      const auto res = h.compare(param_tol(a, Precision::kFp32, Mode::kFreeRunning), kFp32State);
      ASSERT_TRUE(res);
      if (global_count && a != Algorithm::kLion && a != Algorithm::kQhm && a != Algorithm::kSophiaG &&
          a != Algorithm::kSgd && a != Algorithm::kMuon) {
        // Only the bias-corrected (and Adafactor's step-dependent) rules can tell the counts apart.
        global_count->step(h.grad_ptrs());
        EXPECT_FALSE(close_to(h.params(1), global_count->tensors()[1].p, kFp32Param))
            << "the test cannot tell a per-tensor step count from the optimizer's";
      }
    }
    if (a == Algorithm::kSgd) {
      EXPECT_EQ(h.ref().counters().sgd_first_steps, 5) << "every tensor's first step sets its buffer";
    }
  }
}

// Groups override lr and weight decay; a group that sets neither takes the optimizer's.
TEST(OptimizerOptions, ParamGroupsUseTheirOwnLrAndWeightDecay) {
  for (Algorithm a : all_algorithms()) {
    SCOPED_TRACE(trace(a));
    const Hyper hy = decaying_hyper(a);
    const std::vector<GroupSpec> groups = {GroupSpec{}, GroupSpec{3.0f * hy.lr, 0.2f}, GroupSpec{0.5f * hy.lr, 0.0f},
                                           GroupSpec{std::nullopt, 0.3f}};
    const std::vector<TensorSpec> specs = {{"w0", {64, 65}, 0}, {"b0", {7}, 0},  {"w1", {3, 5}, 1},
                                           {"b1", {257}, 1},    {"w2", {4097}, 2}, {"w3", {4, 6, 33}, 3}};
    Harness h(a, hy, specs, groups, {}, 11);
    EXPECT_EQ(h.ref().tensors()[2].lr, static_cast<double>(3.0f * hy.lr));
    for (int step = 1; step <= 12; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      h.draw_grads(step);
      maybe_update_hessian(h, a, step);
      h.step();
      ASSERT_TRUE(h.compare(param_tol(a, Precision::kFp32, Mode::kFreeRunning), kFp32State));
    }
  }
}

// no_decay_vectors turns weight decay off for rank < 2 tensors and no_decay_names for names that
// contain a pattern, in every group (a group's own weight_decay does not bring it back).
TEST(OptimizerOptions, NoDecayMasks) {
  OptimizerOptions options;
  options.no_decay_vectors = true;
  options.no_decay_names = {"bias", "norm"};
  const std::vector<TensorSpec> specs = {{"layer.weight", {64, 65}, 0}, {"layer.bias", {65}, 0},
                                         {"emb", {257}, 0},             {"norm.scale", {4, 6, 33}, 0},
                                         {"head.weight", {3, 5}, 1},    {"head.bias", {2, 7}, 1}};
  const std::vector<double> expected_wd = {0.05, 0.0, 0.0, 0.0, 0.3, 0.0};
  for (Algorithm a : all_algorithms()) {
    SCOPED_TRACE(trace(a));
    Harness h(a, decaying_hyper(a), specs, {GroupSpec{}, GroupSpec{std::nullopt, 0.3f}}, options, 13);
    for (std::size_t i = 0; i < specs.size(); ++i)
      ASSERT_NEAR(h.ref().tensors()[i].weight_decay, expected_wd[i], 1e-7) << specs[i].name;
    // The same run without masks, to show the masks change the result beyond the tolerance.
    Harness unmasked(a, decaying_hyper(a), specs, {GroupSpec{}, GroupSpec{std::nullopt, 0.3f}}, {}, 13);
    for (int step = 1; step <= 10; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      h.draw_grads(step);
      unmasked.draw_grads(step);
      maybe_update_hessian(h, a, step);
      maybe_update_hessian(unmasked, a, step);
      h.step();
      unmasked.step();
      ASSERT_TRUE(h.compare(param_tol(a, Precision::kFp32, Mode::kFreeRunning), kFp32State));
    }
    for (std::size_t i : {1u, 2u, 3u, 5u})
      EXPECT_FALSE(close_to(h.params(i), unmasked.ref().tensors()[i].p, kFp32Param))
          << specs[i].name << ": decay or not is invisible to this test";
  }
}

// lr_scale multiplies every group's lr, each step anew (0 included).
TEST(StepOptions, LrScaleMultipliesEveryGroupsLr) {
  const std::vector<float> schedule = {1.0f, 0.5f, 0.25f, 2.0f, 0.0f, 1.5f, 1.0f, 0.1f, 3.0f, 1.0f};
  for (Algorithm a : all_algorithms()) {
    SCOPED_TRACE(trace(a));
    const Hyper hy = decaying_hyper(a);
    Harness h(a, hy, {{"w", {64, 65}, 0}, {"b", {257}, 0}, {"v", {4097}, 1}}, {GroupSpec{}, GroupSpec{2.0f * hy.lr, 0.1f}},
              {}, 17);
    for (int step = 1; step <= static_cast<int>(schedule.size()); ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      h.draw_grads(step);
      maybe_update_hessian(h, a, step);
      const std::vector<std::vector<float>> before = h.snapshot(0);
      StepOptions so;
      so.lr_scale = schedule[step - 1];
      h.step(so);
      ASSERT_TRUE(h.compare(param_tol(a, Precision::kFp32, Mode::kFreeRunning), kFp32State));
      // Schedule-free AdamW's average still takes in z at lr 0 (its weight is lr_max's): y moves.
      if (so.lr_scale == 0.0f && a != Algorithm::kAdamWScheduleFree) {
        EXPECT_TRUE(bitwise_equal(before[0], h.params(0))) << "lr 0 moved a parameter";
      }
    }
  }
}

// Dividing by grad_scale inside the step equals handing over pre-divided gradients: exactly, for a
// power-of-two scale (then g * s / s == g in floating point), including the reported norm.
TEST(StepOptions, GradScaleEqualsPreDividedGradientsExactly) {
  const std::vector<TensorSpec> specs = {{"a", {257}}, {"b", {64, 65}}, {"c", {4, 6, 33}}, {"d", {4097}}};
  constexpr float kScale = 1024.0f;
  for (Algorithm a : all_algorithms())
    for (const Setting& setting : settings_for(a)) {
      SCOPED_TRACE(trace(a) + " / " + setting.name);
      Harness scaled(a, setting.hyper, specs, {GroupSpec{}}, {}, 19);
      Harness plain(a, setting.hyper, specs, {GroupSpec{}}, {}, 19);
      plain.track_reference(false);
      for (int step = 1; step <= 6; ++step) {
        SCOPED_TRACE("step " + std::to_string(step));
        scaled.draw_grads(step);
        plain.draw_grads(step);
        // SophiaG: the same Hessian estimate for both (the unscaled gradients squared).
        maybe_update_hessian(scaled, a, step);
        maybe_update_hessian(plain, a, step);
        for (std::size_t i = 0; i < specs.size(); ++i)
          for (float& g : scaled.grads(i)) g *= kScale;
        StepOptions so;
        so.grad_scale = kScale;
        const StepResult rs = scaled.step(so);
        const StepResult rp = plain.step();
        EXPECT_EQ(rs.grad_norm, rp.grad_norm);
        for (std::size_t i = 0; i < specs.size(); ++i) ASSERT_TRUE(same_tensor(scaled.snapshot(i), plain.snapshot(i)));
        // And the scaled run still follows the reference, which divides by grad_scale itself.
        ASSERT_TRUE(scaled.compare(param_tol(a, Precision::kFp32, Mode::kFreeRunning), kFp32State));
      }
    }
}

// max_grad_norm clips every gradient by max_norm / (norm + 1e-6) when that is below 1, the norm
// taken over all tensors that have a gradient, after dividing by grad_scale; the step reports the
// norm before clipping. Gradients alternate between 4x and 1/4 of a norm near the limit, so
// clipping is on in some steps and off in others.
TEST(OptimizerOptions, MaxGradNormClipsByTheGlobalNorm) {
  const std::vector<TensorSpec> specs = {{"a", {257}}, {"b", {64, 65}}, {"c", {4097}}, {"d", {3, 5}}};
  OptimizerOptions options;
  options.max_grad_norm = 150.0f;  // the unscaled norm of these gradients / 3 is ~150
  for (Algorithm a : all_algorithms()) {
    SCOPED_TRACE(trace(a));
    Harness h(a, decaying_hyper(a), specs, {GroupSpec{}}, options, 23);
    RefOptimizer unclipped = h.ref();
    for (int step = 1; step <= 10; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      h.draw_grads(step, step % 2 ? 4.0f : 0.25f);
      h.set_has_grad(2, step != 3);  // the norm covers only tensors that have a gradient
      maybe_update_hessian(h, a, step);
      if (a == Algorithm::kSophiaG && step % 3 == 2) unclipped.update_hessian(h.grad_ptrs());
      StepOptions so;
      so.grad_scale = 3.0f;
      const StepResult r = h.step(so);
      unclipped.step(h.grad_ptrs(), so.grad_scale);
      EXPECT_NEAR(r.grad_norm, h.ref_norm(), 1e-6 * h.ref_norm());  // 1/grad_scale is rounded to fp32
      ASSERT_TRUE(h.compare(param_tol(a, Precision::kFp32, Mode::kFreeRunning), kFp32State));
    }
    const std::int64_t clipped = h.ref().counters().clipped_steps;
    EXPECT_GT(clipped, 0);
    EXPECT_LT(clipped, 10);
    bool differs = false;
    for (std::size_t i = 0; i < specs.size(); ++i) differs = differs || !close_to(h.params(i), unclipped.tensors()[i].p, kFp32Param);
    EXPECT_TRUE(differs) << "clipping is invisible to this test";
  }
}

// The step's result does not depend on the number of OpenMP threads (each optimizer is built
// under the thread count it runs with), for every algorithm and state precision, on tensors that
// span several chunks and AdamP/Adafactor reductions.
TEST(Threads, ResultsAreIdenticalForOneTwoAndThreeThreads) {
  struct Config {
    const char* name;
    Precision precision;
    bool rank1 = false;
    bool stochastic = false;
  };
  const std::vector<Config> configs = {{"fp32", Precision::kFp32},
                                       {"bf16", Precision::kBf16},
                                       {"bf16_stochastic", Precision::kBf16, false, true},
                                       {"8bit", Precision::kInt8},
                                       {"4bit", Precision::kInt4},
                                       {"4bit_rank1", Precision::kInt4, true},
                                       {"fp8", Precision::kFp8}};
  const std::vector<TensorSpec> specs = {{"a", {7}},       {"b", {4097}},  {"c", {1, 4097}}, {"d", {64, 65}},
                                         {"e", {48, 1024}}, {"f", {4, 6, 33}}, {"g", {140003}}};
  const int saved = omp_get_max_threads();
  for (Algorithm a : all_algorithms())
    for (const Config& c : configs) {
      SCOPED_TRACE(trace(a) + " / " + c.name);
      OptimizerOptions options;
      options.precision = c.precision;
      options.rank1_second_moment = c.rank1;
      options.stochastic_rounding = c.stochastic;
      options.max_grad_norm = 100.0f;
      std::vector<std::vector<std::vector<float>>> first;
      for (int threads : {1, 2, 3}) {
        SCOPED_TRACE(std::to_string(threads) + " threads");
        omp_set_num_threads(threads);
        Harness h(a, settings_for(a).front().hyper, specs, {GroupSpec{}}, options, 29);
        h.track_reference(false);
        for (int step = 1; step <= 5; ++step) {
          h.draw_grads(step);
          maybe_update_hessian(h, a, step);
          h.step();
        }
        std::vector<std::vector<std::vector<float>>> now;
        for (std::size_t i = 0; i < specs.size(); ++i) now.push_back(h.snapshot(i));
        if (first.empty()) {
          first = std::move(now);
          continue;
        }
        for (std::size_t i = 0; i < specs.size(); ++i) EXPECT_TRUE(same_tensor(first[i], now[i])) << specs[i].name;
      }
    }
  omp_set_num_threads(saved);
}

// Below min_quant_size (and for names in full_precision_names) a tensor keeps fp32 state even when
// bf16 is asked for, and then tracks the reference as tightly as fp32 does.
TEST(OptimizerOptions, SmallTensorsKeepFp32StateUnderBf16) {
  OptimizerOptions options;
  options.precision = Precision::kBf16;  // min_quant_size stays at its default, 4096
  options.full_precision_names = {"keep"};
  const std::vector<TensorSpec> specs = {{"a", {7}}, {"b", {4095}}, {"c", {4096}}, {"d", {64, 64}}, {"keep.w", {8192}}};
  const std::vector<Precision> expected = {Precision::kFp32, Precision::kFp32, Precision::kBf16, Precision::kBf16,
                                           Precision::kFp32};
  for (Algorithm a : {Algorithm::kAdamW, Algorithm::kLion, Algorithm::kSophiaG}) {
    SCOPED_TRACE(trace(a));
    Harness h(a, settings_for(a).front().hyper, specs, {GroupSpec{}}, options, 31);
    for (std::size_t i = 0; i < specs.size(); ++i) ASSERT_EQ(h.opt().state_precision(i), expected[i]) << specs[i].name;
    for (int step = 1; step <= kSteps; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      h.draw_grads(step);
      maybe_update_hessian(h, a, step);
      h.step();
      for (std::size_t i = 0; i < specs.size(); ++i) {
        const bool fp32 = expected[i] == Precision::kFp32;
        const Mode mode = Mode::kFreeRunning;
        ASSERT_TRUE(h.compare_tensor(i, param_tol(a, expected[i], mode), state_tol(expected[i], mode))) << fp32;
      }
    }
  }
}

}  // namespace
}  // namespace nibble
