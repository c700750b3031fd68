// Muon: the CPU Newton-Schulz iteration against the same iteration in fp64 and against what its
// quintic does to singular values; which tensors Muon orthogonalises and which its AdamW fallback
// steps (names, ranks, use_muon, their lr and weight decay); and its refusals. Its trajectories,
// low-bit budgets, save/load and thread-count independence are in the tests every algorithm runs
// (optim_reference_test, optim_quant_test, optim_state_test, optim_threads_test).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "nibble/algorithms.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "nibble/tensor.hpp"
#include "optim/cpu/newton_schulz.hpp"
#include "reference_optimizers.hpp"
#include "test_util.hpp"

namespace nibble {
namespace {

using Matrix = std::vector<double>;  // row-major

constexpr double kA = 3.4445, kB = -4.7750, kC = 2.0315;
constexpr int kSteps = 5;
constexpr double kEps = 1e-7;

Matrix gaussian(std::int64_t rows, std::int64_t cols, Rng& rng) {
  Matrix m(static_cast<std::size_t>(rows * cols));
  for (double& x : m) x = rng.normal();
  return m;
}

// Orthonormal columns (n x k, k <= n) by modified Gram-Schmidt, twice, in fp64.
Matrix orthonormal(std::int64_t n, std::int64_t k, Rng& rng) {
  Matrix q = gaussian(n, k, rng);
  for (int pass = 0; pass < 2; ++pass)
    for (std::int64_t j = 0; j < k; ++j) {
      for (std::int64_t i = 0; i < j; ++i) {
        double d = 0.0;
        for (std::int64_t r = 0; r < n; ++r) d += q[r * k + i] * q[r * k + j];
        for (std::int64_t r = 0; r < n; ++r) q[r * k + j] -= d * q[r * k + i];
      }
      double norm = 0.0;
      for (std::int64_t r = 0; r < n; ++r) norm += q[r * k + j] * q[r * k + j];
      norm = std::sqrt(norm);
      for (std::int64_t r = 0; r < n; ++r) q[r * k + j] /= norm;
    }
  return q;
}

// U diag(sigma) V^T, rows x cols, with the given singular values (min(rows, cols) of them).
Matrix with_singular_values(std::int64_t rows, std::int64_t cols, const std::vector<double>& sigma, Rng& rng) {
  const std::int64_t k = static_cast<std::int64_t>(sigma.size());
  const Matrix u = orthonormal(rows, k, rng), v = orthonormal(cols, k, rng);
  Matrix m(static_cast<std::size_t>(rows * cols), 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      double s = 0.0;
      for (std::int64_t i = 0; i < k; ++i) s += u[r * k + i] * sigma[i] * v[c * k + i];
      m[r * cols + c] = s;
    }
  return m;
}

// Singular values, largest first: square roots of the eigenvalues of the smaller Gram matrix, by
// cyclic Jacobi rotations in fp64.
std::vector<double> singular_values(const std::vector<float>& m, std::int64_t rows, std::int64_t cols) {
  const bool tall = rows > cols;
  const std::int64_t s = tall ? cols : rows, l = tall ? rows : cols;
  auto at = [&](std::int64_t i, std::int64_t k) {
    return static_cast<double>(tall ? m[k * cols + i] : m[i * cols + k]);
  };
  Matrix g(static_cast<std::size_t>(s * s));
  for (std::int64_t i = 0; i < s; ++i)
    for (std::int64_t j = 0; j < s; ++j) {
      double d = 0.0;
      for (std::int64_t k = 0; k < l; ++k) d += at(i, k) * at(j, k);
      g[i * s + j] = d;
    }
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0.0;
    for (std::int64_t p = 0; p < s; ++p)
      for (std::int64_t q = p + 1; q < s; ++q) off += g[p * s + q] * g[p * s + q];
    if (off < 1e-30) break;
    for (std::int64_t p = 0; p < s; ++p)
      for (std::int64_t q = p + 1; q < s; ++q) {
        const double apq = g[p * s + q];
        if (std::abs(apq) < 1e-300) continue;
        const double theta = (g[q * s + q] - g[p * s + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), sn = t * c;
        for (std::int64_t k = 0; k < s; ++k) {
          const double gkp = g[k * s + p], gkq = g[k * s + q];
          g[k * s + p] = c * gkp - sn * gkq;
          g[k * s + q] = sn * gkp + c * gkq;
        }
        for (std::int64_t k = 0; k < s; ++k) {
          const double gpk = g[p * s + k], gqk = g[q * s + k];
          g[p * s + k] = c * gpk - sn * gqk;
          g[q * s + k] = sn * gpk + c * gqk;
        }
      }
  }
  std::vector<double> out(static_cast<std::size_t>(s));
  for (std::int64_t i = 0; i < s; ++i) out[i] = std::sqrt(std::max(g[i * s + i], 0.0));
  std::sort(out.rbegin(), out.rend());
  return out;
}

// What the quintic does to one normalised singular value.
double quintic(double x, int steps = kSteps) {
  for (int i = 0; i < steps; ++i) x = kA * x + kB * x * x * x + kC * x * x * x * x * x;
  return x;
}

std::vector<float> to_float(const Matrix& m) { return {m.begin(), m.end()}; }

std::vector<float> nibble_ns(const std::vector<float>& g, std::int64_t rows, std::int64_t cols) {
  std::vector<float> work(static_cast<std::size_t>(cpu::newton_schulz_workspace(rows, cols)));
  std::vector<float> out(g.size());
  cpu::newton_schulz(g.data(), rows, cols, {static_cast<float>(kA), static_cast<float>(kB), static_cast<float>(kC),
                                            kSteps, static_cast<float>(kEps)},
                     work.data(), out.data());
  return out;
}

struct Case {
  std::int64_t rows, cols;
};
// Wide, tall, the 3-D view's long rows, and sides past the 64-row blocks of the products.
const Case kCases[] = {{37, 53}, {64, 17}, {4, 198}, {130, 70}, {100, 300}};

// The fp32 iteration follows the fp64 one. Each product rounds its dot products of up to l terms
// of size <= 1 (X's spectral norm stays <= ~1.2) to fp32: ~sqrt(l) u relative, and the iteration
// carries errors on, amplified at most by the quintic's slope (a = 3.44) per step. Measured max
// |fp32 - fp64| over these cases: 2.5e-6 of the largest entry; bound 1e-5 (a transposition or an
// off-by-one coefficient moves the result by O(1) of its entries).
TEST(NewtonSchulz, Fp32EqualsTheFp64IterationOfTheSameQuintic) {
  Rng rng(11);
  for (const Case& c : kCases) {
    SCOPED_TRACE(std::to_string(c.rows) + "x" + std::to_string(c.cols));
    const Matrix g = gaussian(c.rows, c.cols, rng);
    const std::vector<float> gf = to_float(g);
    const std::vector<double> want = testref::RefOptimizer::newton_schulz(Matrix(gf.begin(), gf.end()), c.rows, c.cols,
                                                                          kA, kB, kC, kSteps, kEps);
    const std::vector<float> got = nibble_ns(gf, c.rows, c.cols);
    double scale = 0.0, err = 0.0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      scale = std::max(scale, std::abs(want[i]));
      err = std::max(err, std::abs(got[i] - want[i]));
    }
    EXPECT_LE(err, 1e-5 * scale) << "max error " << err << " of entries up to " << scale;
  }
}

// Its singular values are those of the input, normalised by the Frobenius norm, through the quintic
// five times (the iteration is a matrix polynomial: it keeps the singular vectors); from the
// scalar map: every normalised singular value >= 2e-3 comes out in [0.68, 1.21] (the map's range
// there; Keller Jordan's "roughly Uniform(0.5, 1.5)"), while those below 1e-3 stay below 0.48 (five
// steps multiply a tiny value by at most a^5 = 482: they are not orthogonalised). Checked on
// Gaussian matrices (not square, so no tiny singular values) and ill-conditioned ones, singular
// values spanning 1e-4..1.
TEST(NewtonSchulz, SingularValuesFollowTheQuinticIntoItsBand) {
  Rng rng(12);
  int in_band = 0, below = 0;
  for (const Case& c : kCases) {
    for (bool ill : {false, true}) {
      SCOPED_TRACE(std::to_string(c.rows) + "x" + std::to_string(c.cols) + (ill ? " ill-conditioned" : " gaussian"));
      const std::int64_t s = std::min(c.rows, c.cols);
      std::vector<float> g;
      if (ill) {
        std::vector<double> sigma(static_cast<std::size_t>(s));
        for (std::int64_t i = 0; i < s; ++i) sigma[i] = std::pow(10.0, -4.0 * static_cast<double>(i) / std::max<double>(s - 1, 1));
        g = to_float(with_singular_values(c.rows, c.cols, sigma, rng));
      } else {
        g = to_float(gaussian(c.rows, c.cols, rng));
      }
      const std::vector<double> in = singular_values(g, c.rows, c.cols);
      const std::vector<double> out = singular_values(nibble_ns(g, c.rows, c.cols), c.rows, c.cols);
      double frobenius = 0.0;
      for (double x : in) frobenius += x * x;
      frobenius = std::sqrt(frobenius);
      // The quintic is increasing on [0, 0.6] and maps [0.6, 1] into [0.68, 1.21]: sorting the
      // inputs sorts the outputs except among values that all land in the band.
      std::vector<double> mapped(in.size());
      for (std::size_t i = 0; i < in.size(); ++i) mapped[i] = quintic(in[i] / frobenius);
      std::sort(mapped.rbegin(), mapped.rend());
      for (std::size_t i = 0; i < in.size(); ++i) {
        const double x = in[i] / frobenius;
        // The fp32 iteration's error (above) moves singular values by ~1e-6: measured <= 1.4e-6
        // over these cases, bound 1e-5 absolute plus 1e-5 relative.
        EXPECT_NEAR(out[i], mapped[i], 1e-5 + 1e-5 * mapped[i]) << "singular value " << i << " (input " << x << ")";
        if (x >= 2e-3) {
          EXPECT_GE(out[i], 0.68) << "singular value " << i << " (input " << x << ")";
          EXPECT_LE(out[i], 1.21) << "singular value " << i << " (input " << x << ")";
          ++in_band;
        } else if (x < 1e-3) {
          EXPECT_LT(out[i], 0.48) << "singular value " << i << " (input " << x << ")";
          ++below;
        }
      }
    }
  }
  EXPECT_GT(in_band, 0);
  EXPECT_GT(below, 0) << "no singular value small enough to stay out of the band: the ill-conditioned cases test nothing";
}

// A zero matrix stays zero (eps keeps the normalisation finite).
TEST(NewtonSchulz, ZeroMatrixGivesZero) {
  const std::vector<float> zero(6 * 9, 0.0f);
  for (float x : nibble_ns(zero, 6, 9)) EXPECT_EQ(x, 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Which tensors Muon orthogonalises.

struct Tensors {
  std::vector<std::vector<float>> data, grads;
  ParamGroup group;
};

Tensors make_tensors(const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& specs) {
  Tensors t;
  t.data.reserve(specs.size());
  t.grads.reserve(specs.size());
  for (const auto& [name, shape] : specs) {
    t.data.emplace_back(static_cast<std::size_t>(shape_numel(shape)), 0.5f);
    t.grads.emplace_back(t.data.back().size(), 0.25f);
    t.group.params.push_back({name, shape, t.data.back().data(), t.grads.back().data()});
  }
  return t;
}

OptimizerOptions muon_options() {
  OptimizerOptions o;
  o.algorithm = Algorithm::kMuon;
  return o;
}

const std::vector<std::pair<std::string, std::vector<std::int64_t>>> kModel = {
    {"wte", {50, 16}}, {"wpe", {8, 16}}, {"h.0.attn.weight", {16, 48}}, {"h.0.ln.bias", {16}},
    {"h.0.conv", {4, 3, 5}}, {"model.embed_tokens.weight", {50, 16}}, {"lm_head.weight", {50, 16}}};

std::vector<std::string> first_state(const Optimizer& opt) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < opt.param_count(); ++i) out.push_back(opt.state_names(i).front());
  return out;
}

TEST(MuonTensors, MatricesButEmbeddingsAndHeadsByDefault) {
  Tensors t = make_tensors(kModel);
  const Optimizer opt({t.group}, muon_options());
  const std::vector<std::string> want = {"exp_avg", "exp_avg", "momentum_buffer", "exp_avg", "momentum_buffer",
                                         "exp_avg", "exp_avg"};
  EXPECT_EQ(first_state(opt), want);
  EXPECT_EQ(opt.state_names(2), std::vector<std::string>{"momentum_buffer"});
  EXPECT_EQ(opt.state_names(3), (std::vector<std::string>{"exp_avg", "exp_avg_sq"}));
}

TEST(MuonTensors, AdamwNamesAndUseMuonOverrideTheRule) {
  {
    Tensors t = make_tensors(kModel);
    OptimizerOptions o = muon_options();
    o.adamw_names = {"attn"};  // the embeddings and the head are now orthogonalised, attn is not
    const Optimizer opt({t.group}, o);
    const std::vector<std::string> want = {"momentum_buffer", "momentum_buffer", "exp_avg", "exp_avg",
                                           "momentum_buffer", "momentum_buffer", "momentum_buffer"};
    EXPECT_EQ(first_state(opt), want);
  }
  {
    Tensors t = make_tensors(kModel);
    OptimizerOptions o = muon_options();
    o.use_muon = false;
    const Optimizer opt({t.group}, o);
    for (const std::string& s : first_state(opt)) EXPECT_EQ(s, "exp_avg");
  }
  {
    Tensors t = make_tensors({{"wte", {50, 16}}, {"h.0.conv", {4, 3, 5}}});
    OptimizerOptions o = muon_options();
    o.use_muon = true;
    const Optimizer opt({t.group}, o);
    for (const std::string& s : first_state(opt)) EXPECT_EQ(s, "momentum_buffer");
  }
  Tensors t = make_tensors(kModel);
  OptimizerOptions o = muon_options();
  o.use_muon = true;
  EXPECT_EQ(test::thrown_message<InvalidArgument>([&] { Optimizer({t.group}, o); }),
            "parameter 'h.0.ln.bias' has rank 1: use_muon true orthogonalises every tensor, and Newton-Schulz needs "
            "rank >= 2; give it a group or optimizer without use_muon");
}

// The fallback steps with adamw_lr and adamw_weight_decay unless the group sets lr and weight
// decay, which then apply to both kinds; lr_scale scales both. One step of AdamW from zero state
// moves each element by lr (m / sqrt(v) = sign(g) after bias correction, eps aside), after the
// decay p (1 - lr wd); Muon moves each element of a rank-1 update by lr times its factor.
TEST(MuonTensors, FallbackTakesItsOwnLrAndWeightDecay) {
  Hyper h = default_hyper(Algorithm::kMuon);
  h.lr = 0.02f;
  h.weight_decay = 0.5f;
  h.adamw_lr = 0.003f;
  h.adamw_weight_decay = 0.25f;
  for (bool group_sets : {false, true}) {
    SCOPED_TRACE(group_sets ? "group lr 0.01, weight decay 0.1" : "optimizer's");
    Tensors t = make_tensors({{"bias", {5}}, {"w", {4, 6}}});
    if (group_sets) {
      t.group.lr = 0.01f;
      t.group.weight_decay = 0.1f;
    }
    OptimizerOptions o = muon_options();
    o.hyper = h;
    Optimizer opt({t.group}, o);
    opt.step({.lr_scale = 0.5f});
    const double adam_lr = 0.5 * (group_sets ? 0.01 : 0.003), adam_wd = group_sets ? 0.1 : 0.25;
    const double adam_want = 0.5 * (1.0 - adam_lr * adam_wd) - adam_lr * (1.0 / (1.0 + 1e-10 / 0.25));
    for (float x : t.data[0]) EXPECT_NEAR(x, adam_want, 1e-7);
    // A constant gradient is rank 1: its orthogonalisation is the constant matrix of spectral
    // norm quintic(1) (its only normalised singular value is 1), entries quintic(1) / sqrt(24).
    const double muon_lr = 0.5 * (group_sets ? 0.01 : 0.02), muon_wd = group_sets ? 0.1 : 0.5;
    const double muon_want = 0.5 * (1.0 - muon_lr * muon_wd) - muon_lr * 1.0 * quintic(1.0) / std::sqrt(24.0);
    for (float x : t.data[1]) EXPECT_NEAR(x, muon_want, 1e-6);
  }
}

// Scratch beside the state, as planned and as allocated: on the CPU the largest matrix's update,
// X, Y (its elements each) and A, B (its short side squared each) in fp32; on CUDA every matrix's
// fp32 update, per matrix its index, norm, one norm partial per 64Ki elements (at least 1) and
// bf16 X, Y, A, B, and one cuBLAS workspace. Vectors (the AdamW fallback) need none, and other
// algorithms none.
TEST(MuonTensors, ScratchAsPlannedAndAllocated) {
  Tensors t = make_tensors({{"a", {37, 53}}, {"b", {64, 17}}, {"c", {300, 500}}, {"bias", {64}}});
  const std::int64_t cpu = 4 * (3 * 300 * 500 + 2 * 300 * 300);
  const std::int64_t cuda = 4 * (37 * 53 + 64 * 17 + 300 * 500) + (12 + 8 + 2 * (2 * 37 * 53 + 2 * 37 * 37)) +
                            (12 + 8 + 2 * (2 * 64 * 17 + 2 * 17 * 17)) +
                            (12 + 8 * 3 + 2 * (2 * 300 * 500 + 2 * 300 * 300)) + (32 << 20);
  OptimizerOptions o = muon_options();
  EXPECT_EQ(planned_scratch_bytes(std::span<const ParamGroup>(&t.group, 1), o), cpu);
  {
    // The host memory counters (the bench's measured peak) see the scratch beside the state.
    const std::int64_t before = host_memory_stats().live_bytes;
    Optimizer opt({t.group}, o);
    EXPECT_EQ(opt.state_stats().scratch_bytes, cpu);
    const std::int64_t charged = host_memory_stats().live_bytes - before;
    EXPECT_GE(charged, opt.state_stats().state_bytes + cpu);
    EXPECT_LT(charged, opt.state_stats().state_bytes + cpu + 4096) << "beyond alignment padding";
  }
  o.device = Device::kCuda;
  EXPECT_EQ(planned_scratch_bytes(std::span<const ParamGroup>(&t.group, 1), o), cuda);
  o.algorithm = Algorithm::kAdamW;
  o.hyper.reset();
  EXPECT_EQ(planned_scratch_bytes(std::span<const ParamGroup>(&t.group, 1), o), 0);
}

// ---------------------------------------------------------------------------------------------
// Refusals name the bad value.

TEST(MuonRefusals, HyperparametersOutOfRange) {
  auto message = [](auto&& edit) {
    Hyper h = default_hyper(Algorithm::kMuon);
    edit(h);
    return test::thrown_message<InvalidArgument>([&] { validate_hyper(Algorithm::kMuon, h); });
  };
  EXPECT_EQ(message([](Hyper& h) { h.ns_steps = 0.0f; }), "muon: ns_steps must be an integer in [1, 99], got 0");
  EXPECT_EQ(message([](Hyper& h) { h.ns_steps = 100.0f; }), "muon: ns_steps must be an integer in [1, 99], got 100");
  EXPECT_EQ(message([](Hyper& h) { h.ns_steps = 2.5f; }), "muon: ns_steps must be an integer in [1, 99], got 2.5");
  EXPECT_EQ(message([](Hyper& h) { h.ns_a = std::numeric_limits<float>::quiet_NaN(); }),
            "muon: ns_a must be finite, got nan");
  EXPECT_EQ(message([](Hyper& h) { h.adjust_lr = 3.0f; }),
            "muon: adjust_lr must be the index of one of original, match_rms_adamw, spectral_unclamped (or its "
            "name), got 3");
  EXPECT_EQ(message([](Hyper& h) { h.momentum = 1.5f; }), "muon: momentum must be in [0, 1], got 1.5");
  EXPECT_EQ(message([](Hyper& h) { h.adamw_eps = 0.0f; }), "muon: adamw_eps must be > 0, got 0");
  const HyperField* adjust = find_hyper_field("adjust_lr");
  ASSERT_NE(adjust, nullptr);
  EXPECT_EQ(hyper_choice(*adjust, "spectral_unclamped"), 2.0f);
  EXPECT_EQ(test::thrown_message<InvalidArgument>([&] { hyper_choice(*adjust, "adamw"); }),
            "adjust_lr must be one of original, match_rms_adamw, spectral_unclamped, got 'adamw'");
}

// A matrix split across ranks cannot be orthogonalised piece by piece; a split fallback tensor
// (an embedding, a vector) steps like any AdamW tensor.
TEST(MuonRefusals, SplitMatrixButNotSplitFallback) {
  std::vector<float> data(8 * 16, 0.0f), grad(data.size(), 0.0f);
  Param matrix{"h.0.mlp.weight", {8, 16}, data.data(), grad.data()};
  matrix.global_shape = {16, 16};
  matrix.split = true;
  EXPECT_EQ(test::thrown_message<InvalidArgument>([&] { Optimizer({ParamGroup{{matrix}, {}, {}, {}}}, muon_options()); }),
            "parameter 'h.0.mlp.weight' is split across ranks, and muon orthogonalises the whole matrix "
            "(Newton-Schulz); its AdamW fallback tensors may be split: keep it whole on one rank (a replicated "
            "tensor) or use another algorithm");
  Param embedding = matrix;
  embedding.name = "wte";
  EXPECT_NO_THROW(Optimizer({ParamGroup{{embedding}, {}, {}, {}}}, muon_options()));
}

}  // namespace
}  // namespace nibble
