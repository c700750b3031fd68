// The CPU model ops against plain fp64 references written here: each forward within a stated
// tolerance, each backward against central finite differences (fp64) of L = sum(w * out) for a
// random w; plus attention causality, bad cross-entropy targets and thread-count independence.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "model/cpu/ops.hpp"
#include "model/cpu/vector_math.hpp"
#include "nibble/error.hpp"
#include "nibble/rng.hpp"

namespace nibble::model::cpu {
namespace {

using Vec = std::vector<float>;
using DVec = std::vector<double>;
using Tokens = std::vector<std::int32_t>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Backward tolerance. The finite differences are accurate to ~1e-9 (fp64, step 1e-5, smooth
// functions), so the error is the float backward's own: float roundings in sums of at most ~70
// O(1) terms, measured at most 8e-7. 5e-6 (+ 5e-6 relative) leaves a margin of 5x and still
// catches a wrong or missing term, which is O(1e-2) or larger here.
constexpr double kGradAtol = 5e-6;
constexpr double kGradRtol = 5e-6;

Vec random_vec(Rng& rng, std::size_t n, float scale = 1.0f, float offset = 0.0f) {
  Vec v(n);
  for (float& x : v) x = offset + scale * rng.normal();
  return v;
}

DVec to_double(const Vec& v) { return DVec(v.begin(), v.end()); }

// What a backward added to a gradient buffer that held `prior` (checks the += contract too).
DVec added(const Vec& grad, const Vec& prior) {
  DVec d(grad.size());
  for (std::size_t i = 0; i < grad.size(); ++i) d[i] = static_cast<double>(grad[i]) - prior[i];
  return d;
}

double dot(const DVec& a, const DVec& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Central differences of f at x, one coordinate at a time.
template <class F>
DVec fd_gradient(DVec x, const F& f) {
  constexpr double h = 1e-5;
  DVec g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double up = f(x);
    x[i] = x0 - h;
    const double down = f(x);
    x[i] = x0;
    g[i] = (up - down) / (2.0 * h);
  }
  return g;
}

void expect_close(const DVec& got, const DVec& want, double atol, double rtol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  std::size_t bad = 0, worst = 0;
  double worst_ratio = -1.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]);
    const double ratio = err / (atol + rtol * std::abs(want[i]));
    if (!(ratio <= 1.0)) ++bad;
    if (!(ratio <= worst_ratio)) {
      worst_ratio = ratio;
      worst = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements outside atol " << atol
                     << " + rtol " << rtol << "; worst at " << worst << ": got " << got[worst] << ", want "
                     << want[worst];
}

void expect_close(const Vec& got, const DVec& want, double atol, double rtol, const std::string& what) {
  expect_close(to_double(got), want, atol, rtol, what);
}

// ---- fp64 references, written for clarity -------------------------------------------------------

DVec ref_embedding(const Tokens& tokens, const DVec& wte, const DVec& wpe, std::int64_t B, std::int64_t T,
                   std::int64_t C) {
  DVec out(static_cast<std::size_t>(B * T * C));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t c = 0; c < C; ++c)
        out[(b * T + t) * C + c] = wte[tokens[b * T + t] * C + c] + wpe[t * C + c];
  return out;
}

DVec ref_layernorm(const DVec& in, const DVec& w, const DVec& bias, std::int64_t N, std::int64_t C,
                   DVec* mean = nullptr, DVec* rstd = nullptr) {
  DVec out(in.size());
  for (std::int64_t i = 0; i < N; ++i) {
    double m = 0.0, var = 0.0;
    for (std::int64_t c = 0; c < C; ++c) m += in[i * C + c];
    m /= static_cast<double>(C);
    for (std::int64_t c = 0; c < C; ++c) var += (in[i * C + c] - m) * (in[i * C + c] - m);
    var /= static_cast<double>(C);
    const double s = 1.0 / std::sqrt(var + 1e-5);
    for (std::int64_t c = 0; c < C; ++c) out[i * C + c] = (in[i * C + c] - m) * s * w[c] + bias[c];
    if (mean != nullptr) mean->push_back(m);
    if (rstd != nullptr) rstd->push_back(s);
  }
  return out;
}

DVec ref_matmul(const DVec& in, const DVec& w, const DVec* bias, std::int64_t N, std::int64_t IC,
                std::int64_t OC) {
  DVec out(static_cast<std::size_t>(N * OC));
  for (std::int64_t i = 0; i < N; ++i)
    for (std::int64_t o = 0; o < OC; ++o) {
      double s = bias != nullptr ? (*bias)[o] : 0.0;
      for (std::int64_t k = 0; k < IC; ++k) s += in[i * IC + k] * w[o * IC + k];
      out[i * OC + o] = s;
    }
  return out;
}

DVec ref_attention(const DVec& qkv, std::int64_t B, std::int64_t T, std::int64_t C, std::int64_t NH,
                   DVec* att = nullptr) {
  const std::int64_t hs = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  DVec out(static_cast<std::size_t>(B * T * C), 0.0);
  if (att != nullptr) att->assign(static_cast<std::size_t>(B * NH * T * T), 0.0);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < NH; ++h)
      for (std::int64_t t = 0; t < T; ++t) {
        DVec p(static_cast<std::size_t>(t + 1));
        for (std::int64_t t2 = 0; t2 <= t; ++t2) {
          double s = 0.0;
          for (std::int64_t i = 0; i < hs; ++i)
            s += qkv[(b * T + t) * 3 * C + h * hs + i] * qkv[(b * T + t2) * 3 * C + C + h * hs + i];
          p[t2] = s * scale;
        }
        const double m = *std::max_element(p.begin(), p.end());
        double total = 0.0;
        for (double& x : p) total += (x = std::exp(x - m));
        for (std::int64_t t2 = 0; t2 <= t; ++t2) {
          p[t2] /= total;
          if (att != nullptr) (*att)[((b * NH + h) * T + t) * T + t2] = p[t2];
          for (std::int64_t i = 0; i < hs; ++i)
            out[(b * T + t) * C + h * hs + i] += p[t2] * qkv[(b * T + t2) * 3 * C + 2 * C + h * hs + i];
        }
      }
  return out;
}

DVec ref_gelu(const DVec& in) {
  DVec out(in.size());
  const double k = std::sqrt(2.0 / M_PI);
  for (std::size_t i = 0; i < in.size(); ++i) {
    const double x = in[i];
    out[i] = 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
  }
  return out;
}

DVec ref_gelu_exact(const DVec& in) {
  DVec out(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) out[i] = 0.5 * in[i] * std::erfc(-in[i] / std::sqrt(2.0));
  return out;
}

DVec ref_crossentropy(const DVec& logits, const Tokens& targets, std::int64_t BT, std::int64_t V,
                      DVec* probs = nullptr) {
  DVec losses(static_cast<std::size_t>(BT));
  for (std::int64_t i = 0; i < BT; ++i) {
    const double m = *std::max_element(logits.begin() + i * V, logits.begin() + (i + 1) * V);
    double total = 0.0;
    for (std::int64_t v = 0; v < V; ++v) total += std::exp(logits[i * V + v] - m);
    losses[i] = std::log(total) - (logits[i * V + targets[i]] - m);
    for (std::int64_t v = 0; probs != nullptr && v < V; ++v) probs->push_back(std::exp(logits[i * V + v] - m) / total);
  }
  return losses;
}

// ---- embedding ---------------------------------------------------------------------------------

TEST(ModelOps, EmbeddingMatchesReferenceAndGradientsAccumulateRepeatedTokens) {
  const std::int64_t B = 2, T = 3, C = 5, V = 4;
  // Token 1 three times, token 3 twice, token 2 never.
  const Tokens tokens = {1, 3, 1, 1, 0, 3};
  Rng rng(1);
  const Vec wte = random_vec(rng, V * C), wpe = random_vec(rng, T * C);
  Vec out(B * T * C, kNaN);
  embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
  // One float rounding of a sum of two O(1) values.
  expect_close(out, ref_embedding(tokens, to_double(wte), to_double(wpe), B, T, C), 1e-6, 0.0, "forward");

  const DVec w = to_double(random_vec(rng, out.size()));
  const Vec prior_wte = random_vec(rng, wte.size(), 0.5f), prior_wpe = random_vec(rng, wpe.size(), 0.5f);
  Vec dwte = prior_wte, dwpe = prior_wpe;
  const Vec dout(w.begin(), w.end());
  embedding_backward(dwte.data(), dwpe.data(), dout.data(), tokens.data(), B, T, C);

  const DVec wte_d = to_double(wte), wpe_d = to_double(wpe);
  const DVec g_wte =
      fd_gradient(wte_d, [&](const DVec& x) { return dot(w, ref_embedding(tokens, x, wpe_d, B, T, C)); });
  const DVec g_wpe =
      fd_gradient(wpe_d, [&](const DVec& x) { return dot(w, ref_embedding(tokens, wte_d, x, B, T, C)); });
  expect_close(added(dwte, prior_wte), g_wte, kGradAtol, kGradRtol, "dwte");
  expect_close(added(dwpe, prior_wpe), g_wpe, kGradAtol, kGradRtol, "dwpe");
  for (std::int64_t c = 0; c < C; ++c) EXPECT_EQ(dwte[2 * C + c], prior_wte[2 * C + c]) << "unused token row";
}

// ---- layernorm ---------------------------------------------------------------------------------

void check_layernorm(std::int64_t N, std::int64_t C, std::uint64_t seed) {
  Rng rng(seed);
  // A mean far from zero, so a one-pass E[x^2] - mean^2 variance would show.
  const Vec in = random_vec(rng, N * C, 2.0f, 3.0f);
  const Vec weight = random_vec(rng, C, 0.3f, 1.0f), bias = random_vec(rng, C, 0.3f);
  Vec out(N * C, kNaN), mean(N, kNaN), rstd(N, kNaN);
  layernorm_forward(out.data(), mean.data(), rstd.data(), in.data(), weight.data(), bias.data(), N, C);
  const DVec in_d = to_double(in), w_d = to_double(weight), b_d = to_double(bias);
  DVec ref_mean, ref_rstd;
  const DVec ref = ref_layernorm(in_d, w_d, b_d, N, C, &ref_mean, &ref_rstd);
  // Outputs O(1): a few roundings per term of a C-term float sum.
  expect_close(out, ref, 1e-5, 1e-5, "forward");
  expect_close(mean, ref_mean, 1e-6, 1e-6, "mean");
  expect_close(rstd, ref_rstd, 0.0, 1e-5, "rstd");

  const DVec w = to_double(random_vec(rng, out.size()));
  const Vec dout(w.begin(), w.end());
  const Vec prior_in = random_vec(rng, in.size(), 0.5f), prior_w = random_vec(rng, C, 0.5f),
            prior_b = random_vec(rng, C, 0.5f);
  Vec din = prior_in, dweight = prior_w, dbias = prior_b;
  layernorm_backward(din.data(), dweight.data(), dbias.data(), dout.data(), in.data(), weight.data(), mean.data(),
                     rstd.data(), N, C);
  const DVec g_in = fd_gradient(in_d, [&](const DVec& x) { return dot(w, ref_layernorm(x, w_d, b_d, N, C)); });
  const DVec g_w = fd_gradient(w_d, [&](const DVec& x) { return dot(w, ref_layernorm(in_d, x, b_d, N, C)); });
  const DVec g_b = fd_gradient(b_d, [&](const DVec& x) { return dot(w, ref_layernorm(in_d, w_d, x, N, C)); });
  expect_close(added(din, prior_in), g_in, kGradAtol, kGradRtol, "din");
  expect_close(added(dweight, prior_w), g_w, kGradAtol, kGradRtol, "dweight");
  expect_close(added(dbias, prior_b), g_b, kGradAtol, kGradRtol, "dbias");
}

TEST(ModelOps, LayerNormShortRows) { check_layernorm(4, 7, 2); }

// Without a bias (null): the output is the biased one less the bias, dweight and din unchanged.
TEST(ModelOps, LayerNormWithoutBiasIsLayerNormWithZeroBias) {
  const std::int64_t N = 3, C = 37;
  Rng rng(21);
  const Vec in = random_vec(rng, N * C, 2.0f, 1.0f), weight = random_vec(rng, C, 0.3f, 1.0f);
  const Vec zeros(C, 0.0f);
  Vec with(N * C, kNaN), without(N * C, kNaN), mean(N), rstd(N);
  layernorm_forward(with.data(), mean.data(), rstd.data(), in.data(), weight.data(), zeros.data(), N, C);
  layernorm_forward(without.data(), mean.data(), rstd.data(), in.data(), weight.data(), nullptr, N, C);
  EXPECT_EQ(with, without);
  const Vec dout = random_vec(rng, N * C);
  Vec din_a(N * C, 0.0f), din_b(N * C, 0.0f), dw_a(C, 0.0f), dw_b(C, 0.0f), db(C, 0.0f);
  layernorm_backward(din_a.data(), dw_a.data(), db.data(), dout.data(), in.data(), weight.data(), mean.data(),
                     rstd.data(), N, C);
  layernorm_backward(din_b.data(), dw_b.data(), nullptr, dout.data(), in.data(), weight.data(), mean.data(),
                     rstd.data(), N, C);
  EXPECT_EQ(din_a, din_b);
  EXPECT_EQ(dw_a, dw_b);
}

// 70 channels: the vectorised lanes, their scalar tail and a second, partial column block.
TEST(ModelOps, LayerNormLongRows) { check_layernorm(3, 70, 3); }

// ---- matmul ------------------------------------------------------------------------------------

void check_matmul(std::int64_t N, std::int64_t IC, std::int64_t OC, bool with_bias, std::uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "N " << N << " IC " << IC << " OC " << OC << " bias " << with_bias);
  Rng rng(seed);
  const Vec in = random_vec(rng, N * IC), weight = random_vec(rng, OC * IC, 0.5f), bias = random_vec(rng, OC);
  // NaN in the output: a product without bias must overwrite it, not add to it.
  Vec out(N * OC, kNaN);
  matmul_forward(out.data(), in.data(), weight.data(), with_bias ? bias.data() : nullptr, N, IC, OC);
  const DVec in_d = to_double(in), w_d = to_double(weight), b_d = to_double(bias);
  const DVec* b_ptr = with_bias ? &b_d : nullptr;
  // IC-term float dot products of O(1) values.
  expect_close(out, ref_matmul(in_d, w_d, b_ptr, N, IC, OC), 1e-5, 1e-5, "forward");

  const DVec w = to_double(random_vec(rng, out.size()));
  const Vec dout(w.begin(), w.end());
  const Vec prior_in = random_vec(rng, in.size(), 0.5f), prior_w = random_vec(rng, weight.size(), 0.5f),
            prior_b = random_vec(rng, OC, 0.5f);
  Vec din = prior_in, dweight = prior_w, dbias = prior_b;
  matmul_backward(din.data(), dweight.data(), with_bias ? dbias.data() : nullptr, dout.data(), in.data(),
                  weight.data(), N, IC, OC);
  const DVec g_in = fd_gradient(in_d, [&](const DVec& x) { return dot(w, ref_matmul(x, w_d, b_ptr, N, IC, OC)); });
  const DVec g_w = fd_gradient(w_d, [&](const DVec& x) { return dot(w, ref_matmul(in_d, x, b_ptr, N, IC, OC)); });
  expect_close(added(din, prior_in), g_in, kGradAtol, kGradRtol, "din");
  expect_close(added(dweight, prior_w), g_w, kGradAtol, kGradRtol, "dweight");
  if (with_bias) {
    const DVec g_b = fd_gradient(b_d, [&](const DVec& x) { return dot(w, ref_matmul(in_d, w_d, &x, N, IC, OC)); });
    expect_close(added(dbias, prior_b), g_b, kGradAtol, kGradRtol, "dbias");
  } else {
    EXPECT_EQ(dbias, prior_b);
  }
}

TEST(ModelOps, MatmulWithBias) { check_matmul(5, 7, 3, true, 4); }
TEST(ModelOps, MatmulWithoutBias) { check_matmul(5, 7, 3, false, 5); }
// 70 output channels: the bias gradient's second, partial column block.
TEST(ModelOps, MatmulWideWithBias) { check_matmul(9, 4, 70, true, 6); }

// ---- attention ---------------------------------------------------------------------------------

void check_attention(std::int64_t B, std::int64_t T, std::int64_t C, std::int64_t NH, std::uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "B " << B << " T " << T << " C " << C << " NH " << NH);
  Rng rng(seed);
  const Vec qkv = random_vec(rng, B * T * 3 * C);
  Vec out(B * T * C, kNaN), att(B * NH * T * T, kNaN);
  attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH);
  const DVec qkv_d = to_double(qkv);
  DVec ref_att;
  const DVec ref = ref_attention(qkv_d, B, T, C, NH, &ref_att);
  // Short float dot products and a softmax of at most T terms: errors of a few 1e-7.
  expect_close(out, ref, 1e-5, 1e-5, "forward");
  expect_close(att, ref_att, 1e-6, 1e-5, "att");
  for (std::int64_t bh = 0; bh < B * NH; ++bh)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t t2 = t + 1; t2 < T; ++t2) ASSERT_EQ(att[(bh * T + t) * T + t2], 0.0f) << t << " " << t2;

  const DVec w = to_double(random_vec(rng, out.size()));
  const Vec dout(w.begin(), w.end());
  const Vec prior = random_vec(rng, qkv.size(), 0.5f);
  Vec dqkv = prior;
  // NaN scratch: the backward must not read datt before writing it.
  Vec datt(att.size(), kNaN);
  attention_backward(dqkv.data(), datt.data(), dout.data(), qkv.data(), att.data(), B, T, C, NH);
  const DVec g = fd_gradient(qkv_d, [&](const DVec& x) { return dot(w, ref_attention(x, B, T, C, NH)); });
  expect_close(added(dqkv, prior), g, kGradAtol, kGradRtol, "dqkv");
}

TEST(ModelOps, AttentionTwoHeadsOfFour) { check_attention(2, 5, 8, 2, 7); }

// Head size 12: the vectorised lanes of the dot products and their tail.
TEST(ModelOps, AttentionTwoHeadsOfTwelve) { check_attention(1, 4, 24, 2, 8); }

// 70 positions: two blocks of query rows (64 + 6), the second reading keys of both.
TEST(ModelOps, AttentionAcrossRowBlocks) { check_attention(1, 70, 8, 2, 13); }

TEST(ModelOps, AttentionIsCausal) {
  const std::int64_t B = 2, T = 5, C = 8, NH = 2, t0 = 3;
  Rng rng(9);
  const Vec qkv = random_vec(rng, B * T * 3 * C);
  Vec out(B * T * C), att(B * NH * T * T);
  attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH);
  // New keys and values at position t0 of batch 1.
  Vec changed = qkv;
  for (std::int64_t c = C; c < 3 * C; ++c) changed[(1 * T + t0) * 3 * C + c] += 1.0f;
  Vec out2(out.size()), att2(att.size());
  attention_forward(out2.data(), att2.data(), changed.data(), B, T, C, NH);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) {
      const bool may_change = b == 1 && t >= t0;
      bool same = true;
      for (std::int64_t c = 0; c < C; ++c) same = same && out[(b * T + t) * C + c] == out2[(b * T + t) * C + c];
      EXPECT_EQ(same, !may_change) << "batch " << b << " position " << t;
    }
}

// ---- GELU and residual -------------------------------------------------------------------------

// The branch-free exp and erf behind GELU, on dense grids against fp64, at the bounds their header
// states (measured: 1.0e-7 and 3.3e-7), plus the special values.
TEST(ModelOps, VectorMathMatchesDoublePrecision) {
  double exp_rel = 0, erf_abs = 0, erf_small_rel = 0;
  for (double x = -87.0; x <= 88.0; x += 1e-4) {
    const float f = static_cast<float>(x);
    const double want = std::exp(static_cast<double>(f));
    exp_rel = std::max(exp_rel, std::abs(exp_f(f) - want) / want);
  }
  for (double x = -10.0; x <= 10.0; x += 1e-5) {
    const float f = static_cast<float>(x);
    const double want = std::erf(static_cast<double>(f));
    const double err = std::abs(erf_f(f) - want);
    erf_abs = std::max(erf_abs, err);
    if (std::abs(f) < 0.5f && want != 0.0) erf_small_rel = std::max(erf_small_rel, err / std::abs(want));
  }
  EXPECT_LE(exp_rel, 3e-7);
  EXPECT_LE(erf_abs, 4e-7);
  EXPECT_LE(erf_small_rel, 3e-7);

  constexpr float kInf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(erf_f(kInf), 1.0f);
  EXPECT_EQ(erf_f(-kInf), -1.0f);
  EXPECT_TRUE(std::signbit(erf_f(-0.0f)));
  EXPECT_EQ(exp_f(-kInf), exp_f(-87.0f));  // the documented floor
  EXPECT_GT(exp_f(-87.0f), 0.0f);
  EXPECT_EQ(exp_f(0.0f), 1.0f);
  for (float (*fn)(float) : {exp_f, erf_f}) EXPECT_TRUE(std::isnan(fn(kNaN)));
}

TEST(ModelOps, GeluMatchesReferenceAndFiniteDifferences) {
  Rng rng(10);
  Vec in = random_vec(rng, 40, 2.0f);
  // Beyond +-10 the exponential inside saturates (and is clamped): the results must stay finite.
  for (float x : {-30.0f, -12.0f, -6.0f, -3.0f, -0.5f, 0.0f, 0.5f, 3.0f, 6.0f, 12.0f, 30.0f}) in.push_back(x);
  Vec out(in.size(), kNaN);
  gelu_forward(out.data(), in.data(), static_cast<std::int64_t>(in.size()));
  const DVec in_d = to_double(in);
  // tanhf is good to a few ulp; at x << 0, 1 + tanh cancels, so the bound is absolute.
  expect_close(out, ref_gelu(in_d), 2e-6, 1e-6, "forward");

  const DVec w = to_double(random_vec(rng, in.size()));
  const Vec dout(w.begin(), w.end());
  const Vec prior = random_vec(rng, in.size(), 0.5f);
  Vec din = prior;
  gelu_backward(din.data(), in.data(), dout.data(), static_cast<std::int64_t>(in.size()));
  const DVec g = fd_gradient(in_d, [&](const DVec& x) { return dot(w, ref_gelu(x)); });
  expect_close(added(din, prior), g, kGradAtol, kGradRtol, "din");
}

TEST(ModelOps, ExactGeluMatchesReferenceAndFiniteDifferences) {
  Rng rng(12);
  Vec in = random_vec(rng, 40, 2.0f);
  for (float x : {-6.0f, -3.0f, -0.5f, 0.0f, 0.5f, 3.0f, 6.0f}) in.push_back(x);
  Vec out(in.size(), kNaN);
  gelu_forward(out.data(), in.data(), static_cast<std::int64_t>(in.size()), true);
  const DVec in_d = to_double(in);
  // erff is good to a few ulp; at x << 0, 1 + erf cancels, so the bound is absolute.
  expect_close(out, ref_gelu_exact(in_d), 2e-6, 1e-6, "forward");
  // It is not the tanh approximation, which differs by up to ~5e-4 around |x| = 2.
  Vec approx(in.size());
  gelu_forward(approx.data(), in.data(), static_cast<std::int64_t>(in.size()));
  EXPECT_NE(approx, out);

  const DVec w = to_double(random_vec(rng, in.size()));
  const Vec dout(w.begin(), w.end());
  const Vec prior = random_vec(rng, in.size(), 0.5f);
  Vec din = prior;
  gelu_backward(din.data(), in.data(), dout.data(), static_cast<std::int64_t>(in.size()), true);
  const DVec g = fd_gradient(in_d, [&](const DVec& x) { return dot(w, ref_gelu_exact(x)); });
  expect_close(added(din, prior), g, kGradAtol, kGradRtol, "din");
}

TEST(ModelOps, ResidualIsTheFloatSum) {
  Rng rng(11);
  const Vec a = random_vec(rng, 37), b = random_vec(rng, 37);
  Vec out(a.size(), kNaN);
  residual_forward(out.data(), a.data(), b.data(), static_cast<std::int64_t>(a.size()));
  for (std::size_t i = 0; i < a.size(); ++i) EXPECT_EQ(out[i], a[i] + b[i]) << i;
}

// ---- cross-entropy -----------------------------------------------------------------------------

TEST(ModelOps, CrossEntropyMatchesReferenceAndFiniteDifferences) {
  const std::int64_t BT = 4, V = 11;
  Rng rng(12);
  Vec logits = random_vec(rng, BT * V, 3.0f);
  // Row 2 sits at 1000, where exp overflows unless the maximum is subtracted first.
  for (std::int64_t v = 0; v < V; ++v) logits[2 * V + v] += 1000.0f;
  const Tokens targets = {0, 10, 4, 7};
  Vec losses(BT, kNaN), probs(BT * V, kNaN);
  crossentropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), BT, V);
  const DVec logits_d = to_double(logits);
  DVec ref_probs;
  const DVec ref_losses = ref_crossentropy(logits_d, targets, BT, V, &ref_probs);
  // Probabilities: one exp and one division per element, relative 1e-6; losses are O(1).
  expect_close(probs, ref_probs, 1e-7, 1e-5, "probs");
  expect_close(losses, ref_losses, 1e-5, 1e-5, "losses");
  for (std::int64_t i = 0; i < BT; ++i) {
    double row = 0.0;
    for (std::int64_t v = 0; v < V; ++v) row += probs[i * V + v];
    EXPECT_NEAR(row, 1.0, 1e-6) << "row " << i;
  }

  const float dloss = 0.37f;
  const Vec prior = random_vec(rng, logits.size(), 0.5f);
  Vec dlogits = prior;
  crossentropy_backward(dlogits.data(), probs.data(), targets.data(), dloss, BT, V);
  const DVec g = fd_gradient(logits_d, [&](const DVec& x) {
    const DVec l = ref_crossentropy(x, targets, BT, V);
    double s = 0.0;
    for (double v : l) s += v;
    return static_cast<double>(dloss) * s;
  });
  expect_close(added(dlogits, prior), g, kGradAtol, kGradRtol, "dlogits");
}

TEST(ModelOps, CrossEntropyRejectsTargetsOutsideTheVocabulary) {
  const std::int64_t BT = 3, V = 5;
  const Vec logits(BT * V, 0.5f), probs(BT * V, 0.2f);
  for (const Tokens& targets : {Tokens{0, 4, 5}, Tokens{0, 4, -1}}) {
    Vec losses(BT, -7.0f), out_probs(BT * V, -7.0f), dlogits(BT * V, -7.0f);
    try {
      crossentropy_forward(losses.data(), out_probs.data(), logits.data(), targets.data(), BT, V);
      ADD_FAILURE() << "forward accepted target " << targets[2];
    } catch (const InvalidArgument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("target " + std::to_string(targets[2])), std::string::npos) << msg;
      EXPECT_NE(msg.find("position 2"), std::string::npos) << msg;
    }
    EXPECT_THROW(crossentropy_backward(dlogits.data(), probs.data(), targets.data(), 1.0f, BT, V), InvalidArgument);
    // Rejected before anything was written.
    EXPECT_EQ(losses, Vec(BT, -7.0f));
    EXPECT_EQ(out_probs, Vec(BT * V, -7.0f));
    EXPECT_EQ(dlogits, Vec(BT * V, -7.0f));
  }
}

// ---- thread-count independence -----------------------------------------------------------------

struct ThreadRun {
  Vec att_out, att, dqkv, datt, ln_out, ln_mean, ln_rstd, ln_din, ln_dw, ln_db, dwte, dwpe;
};

ThreadRun run_with_threads(int threads) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  ThreadRun r;
  Rng rng(13);
  {
    const std::int64_t B = 2, T = 64, C = 64, NH = 4;
    const Vec qkv = random_vec(rng, B * T * 3 * C), dout = random_vec(rng, B * T * C);
    r.att_out.assign(B * T * C, 0.0f);
    r.att.assign(B * NH * T * T, 0.0f);
    r.dqkv.assign(qkv.size(), 0.0f);
    r.datt.assign(r.att.size(), 0.0f);
    attention_forward(r.att_out.data(), r.att.data(), qkv.data(), B, T, C, NH);
    attention_backward(r.dqkv.data(), r.datt.data(), dout.data(), qkv.data(), r.att.data(), B, T, C, NH);
  }
  {
    // 200 channels: four column blocks, so two threads split the weight-gradient sums.
    const std::int64_t N = 256, C = 200;
    const Vec in = random_vec(rng, N * C, 2.0f, 1.0f), w = random_vec(rng, C, 0.3f, 1.0f),
              b = random_vec(rng, C), dout = random_vec(rng, N * C);
    r.ln_out.assign(N * C, 0.0f);
    r.ln_mean.assign(N, 0.0f);
    r.ln_rstd.assign(N, 0.0f);
    r.ln_din.assign(N * C, 0.0f);
    r.ln_dw.assign(C, 0.0f);
    r.ln_db.assign(C, 0.0f);
    layernorm_forward(r.ln_out.data(), r.ln_mean.data(), r.ln_rstd.data(), in.data(), w.data(), b.data(), N, C);
    layernorm_backward(r.ln_din.data(), r.ln_dw.data(), r.ln_db.data(), dout.data(), in.data(), w.data(),
                       r.ln_mean.data(), r.ln_rstd.data(), N, C);
  }
  {
    const std::int64_t B = 4, T = 32, C = 200, V = 7;
    Tokens tokens(B * T);
    for (std::int32_t& t : tokens) t = static_cast<std::int32_t>(rng.below(V));
    const Vec dout = random_vec(rng, B * T * C);
    r.dwte.assign(V * C, 0.0f);
    r.dwpe.assign(T * C, 0.0f);
    embedding_backward(r.dwte.data(), r.dwpe.data(), dout.data(), tokens.data(), B, T, C);
  }
  omp_set_num_threads(saved);
  return r;
}

bool bit_equal(const Vec& a, const Vec& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(ModelOps, ResultsDoNotDependOnTheThreadCount) {
  const ThreadRun one = run_with_threads(1), two = run_with_threads(2);
  EXPECT_TRUE(bit_equal(one.att_out, two.att_out));
  EXPECT_TRUE(bit_equal(one.att, two.att));
  EXPECT_TRUE(bit_equal(one.dqkv, two.dqkv));
  EXPECT_TRUE(bit_equal(one.datt, two.datt));
  EXPECT_TRUE(bit_equal(one.ln_out, two.ln_out));
  EXPECT_TRUE(bit_equal(one.ln_mean, two.ln_mean));
  EXPECT_TRUE(bit_equal(one.ln_rstd, two.ln_rstd));
  EXPECT_TRUE(bit_equal(one.ln_din, two.ln_din));
  EXPECT_TRUE(bit_equal(one.ln_dw, two.ln_dw));
  EXPECT_TRUE(bit_equal(one.ln_db, two.ln_db));
  EXPECT_TRUE(bit_equal(one.dwte, two.dwte));
  EXPECT_TRUE(bit_equal(one.dwpe, two.dwpe));
}

}  // namespace
}  // namespace nibble::model::cpu
