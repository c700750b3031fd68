// The CUDA elementwise and row ops of the GPT engine (src/model/cuda/elementwise.cu) against the
// CPU ops, their specification: forward and backward in fp32 and bf16 on odd shapes, aligned and
// misaligned pointers, determinism, padded cross-entropy rows with in-place gradients, and the
// argument checks. Label `gpu`: every test skips, saying why, on a machine without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/cpu/ops.hpp"
#include "model/cuda/ops.cuh"
#include "nibble/device.hpp"
#include "nibble/error.hpp"

#include "gpu/cuda_test_util.hpp"
#include "test_util.hpp"

namespace nibble::model {
namespace {

using test::check;
using test::DeviceBytes;
using test::DeviceTensor;
using test::round_to_bf16;
using test::Storage;
using test::uniform_values;

// Tolerances. u32 and u16 are the unit roundoffs of fp32 (24-bit significand) and bf16 (8-bit
// significand: 7 stored bits plus the implicit one): rounding to nearest moves a value by at most
// u times its magnitude. Inputs are rounded to the storage type before both sides see them, so a
// bf16 comparison differs from the fp32 one only by the final rounding of a bf16 output, at most
// u16 relative; fp32 outputs computed from bf16 inputs keep the fp32 tolerance.
constexpr double kU32 = 1.0 / (1 << 24);
constexpr double kU16 = 1.0 / (1 << 8);

// Reductions (LayerNorm statistics and gradients, embedding gradients) are summed in another
// order on the GPU. For n terms any two orders differ by at most 2 n u32 sum|term| (Higham's
// first-order bound, for each side), so those comparisons use that bound per element.
double reduction_bound(double terms, double abs_sum) { return 2.0 * terms * kU32 * abs_sum; }

const char* storage_name(Storage s) { return s == Storage::kF32 ? "f32" : "bf16"; }

void sync() { check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

float round_to(Storage s, float f) { return s == Storage::kF32 ? f : round_to_bf16(f); }

std::vector<float> round_to(Storage s, std::vector<float> v) {
  for (float& x : v) x = round_to(s, x);
  return v;
}

class Tokens {
 public:
  explicit Tokens(const std::vector<std::int32_t>& v) : buffer_(v.size() * 4) {
    check(cudaMemcpy(buffer_.data(), v.data(), v.size() * 4, cudaMemcpyHostToDevice), "upload tokens");
  }
  const std::int32_t* get() const { return static_cast<const std::int32_t*>(buffer_.data()); }

 private:
  DeviceBytes buffer_;
};

template <class T>
struct Type {
  using type = T;
};

// Calls fn(Type<T>{}) with the launcher's T for storage s.
template <class Fn>
void dispatch(Storage s, Fn&& fn) {
  if (s == Storage::kF32)
    fn(Type<float>{});
  else
    fn(Type<cuda::bf16>{});
}

std::vector<std::int32_t> random_tokens(std::mt19937& rng, std::size_t n, std::int32_t vocab) {
  std::uniform_int_distribution<std::int32_t> dist(0, vocab - 1);
  std::vector<std::int32_t> v(n);
  for (auto& t : v) t = dist(rng);
  return v;
}

// |got - want| <= tol[i] for each element (NaN never passes).
::testing::AssertionResult within(const std::vector<float>& got, const std::vector<float>& want,
                                  const std::vector<double>& tol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes " << got.size() << " and " << want.size();
  std::size_t bad = 0;
  std::string first;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(diff <= tol[i])) {
      if (bad < 5)
        first += " [" + std::to_string(i) + "] got " + std::to_string(got[i]) + " want " + std::to_string(want[i]) +
                 " (tolerance " + std::to_string(tol[i]) + ")";
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ:" << first;
}

// |got - want| <= atol + rtol |want|.
::testing::AssertionResult close(const std::vector<float>& got, const std::vector<float>& want, double rtol,
                                 double atol) {
  std::vector<double> tol(want.size());
  for (std::size_t i = 0; i < want.size(); ++i) tol[i] = atol + rtol * std::fabs(static_cast<double>(want[i]));
  return within(got, want, tol);
}

::testing::AssertionResult same_bits(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes " << got.size() << " and " << want.size();
  for (std::size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], 4) != 0)
      return ::testing::AssertionFailure() << "first difference at [" << i << "]: " << got[i] << " vs " << want[i];
  return ::testing::AssertionSuccess();
}

class CudaOps : public ::testing::TestWithParam<Storage> {
 protected:
  Storage s() const { return GetParam(); }
  // The output rounding of a T result on top of an fp32 relative tolerance.
  double rtol(double f32) const { return f32 + (s() == Storage::kBF16 ? kU16 : 0.0); }
};

// ---------------------------------------------------------------------------------------------
// Embeddings.

struct EmbeddingShape {
  std::int64_t B, T, C, V;
};

std::string describe(const EmbeddingShape& e, std::size_t offset) {
  return "B " + std::to_string(e.B) + " T " + std::to_string(e.T) + " C " + std::to_string(e.C) + " V " +
         std::to_string(e.V) + " offset " + std::to_string(offset);
}

TEST_P(CudaOps, EmbeddingForwardMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(1);
  // C = 96: 128-bit path; C = 45 and offset 1: scalar path.
  for (const EmbeddingShape e : {EmbeddingShape{2, 7, 96, 65}, EmbeddingShape{3, 5, 45, 11}, EmbeddingShape{1, 1, 8, 3}})
    for (const std::size_t offset : {0, 1}) {
      const std::size_t N = static_cast<std::size_t>(e.B * e.T), C = static_cast<std::size_t>(e.C);
      const auto tokens = random_tokens(rng, N, static_cast<std::int32_t>(e.V));
      const auto wte = round_to(s(), uniform_values(rng, static_cast<std::size_t>(e.V) * C, -1, 1));
      const auto wpe = round_to(s(), uniform_values(rng, static_cast<std::size_t>(e.T) * C, -1, 1));
      DeviceTensor d_wte(s(), wte.size(), offset), d_wpe(s(), wpe.size(), offset), d_out(s(), N * C, offset);
      d_wte.upload(wte);
      d_wpe.upload(wpe);
      Tokens d_tokens(tokens);
      dispatch(s(), [&](auto tag) {
        using T = typename decltype(tag)::type;
        cuda::embedding_forward<T>(d_out.as<T>(), d_tokens.get(), d_wte.as<T>(), d_wpe.as<T>(), e.B, e.T, e.C, nullptr);
      });
      sync();
      std::vector<float> want(N * C);
      cpu::embedding_forward(want.data(), tokens.data(), wte.data(), wpe.data(), e.B, e.T, e.C);
      // One fp32 add of the same two values, then the same rounding: equal bits.
      EXPECT_TRUE(same_bits(d_out.download(), round_to(s(), want))) << describe(e, offset);
    }
}

// Runs the CUDA embedding backward from the given initial gradients; returns (dwte, dwpe).
std::pair<std::vector<float>, std::vector<float>> run_embedding_backward(
    Storage s, const EmbeddingShape& e, const std::vector<std::int32_t>& tokens, const std::vector<float>& dout,
    const std::vector<float>& dwte0, const std::vector<float>& dwpe0, std::size_t offset, bool dirty_scratch) {
  DeviceTensor d_dout(s, dout.size(), offset), d_dwte(Storage::kF32, dwte0.size()), d_dwpe(Storage::kF32, dwpe0.size(), offset);
  d_dout.upload(dout);
  d_dwte.upload(dwte0);
  d_dwpe.upload(dwpe0);
  Tokens d_tokens(tokens);
  const std::size_t bytes = cuda::embedding_backward_scratch_bytes(e.B, e.T, e.V);
  DeviceBytes scratch(bytes);
  if (dirty_scratch) check(cudaMemset(scratch.data(), 0xA5, bytes), "cudaMemset");
  dispatch(s, [&](auto tag) {
    using T = typename decltype(tag)::type;
    cuda::embedding_backward<T>(d_dwte.as<float>(), d_dwpe.as<float>(), d_dout.as<T>(), d_tokens.get(), e.B, e.T, e.C, e.V,
                                scratch.data(), nullptr);
  });
  sync();
  return {d_dwte.download(), d_dwpe.download()};
}

// The tolerance of each dwte element: a reduction over its initial value and the dout rows of
// the positions holding its token (tokens outside [0, V) add nothing).
std::vector<double> dwte_tolerance(const EmbeddingShape& e, const std::vector<std::int32_t>& tokens,
                                   const std::vector<float>& dout, const std::vector<float>& dwte0) {
  const std::size_t C = static_cast<std::size_t>(e.C);
  std::vector<double> abs_sum(dwte0.size()), terms(dwte0.size(), 1.0);
  for (std::size_t i = 0; i < dwte0.size(); ++i) abs_sum[i] = std::fabs(static_cast<double>(dwte0[i]));
  for (std::size_t p = 0; p < tokens.size(); ++p) {
    if (tokens[p] < 0 || tokens[p] >= e.V) continue;
    for (std::size_t c = 0; c < C; ++c) {
      abs_sum[tokens[p] * C + c] += std::fabs(static_cast<double>(dout[p * C + c]));
      terms[tokens[p] * C + c] += 1.0;
    }
  }
  std::vector<double> tol(dwte0.size());
  for (std::size_t i = 0; i < tol.size(); ++i) tol[i] = reduction_bound(terms[i], abs_sum[i]);
  return tol;
}

// Tokens of N positions: `hot` of them token `hot_token`, the rest uniform over [0, V).
std::vector<std::int32_t> skewed_tokens(std::mt19937& rng, std::size_t N, std::int32_t V, std::size_t hot,
                                        std::int32_t hot_token) {
  std::vector<std::int32_t> tokens = random_tokens(rng, N, V);
  for (auto& t : tokens)
    if (t == hot_token) t = (hot_token + 1) % V;
  for (std::size_t i = 0; i < hot; ++i) tokens[i] = hot_token;
  std::shuffle(tokens.begin(), tokens.end(), rng);
  return tokens;
}

TEST_P(CudaOps, EmbeddingBackwardMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(2);
  struct Case {
    EmbeddingShape e;
    std::vector<std::int32_t> tokens;
    const char* what;
  };
  std::vector<Case> cases;
  cases.push_back({{2, 7, 96, 65}, random_tokens(rng, 14, 5), "repeated tokens, short runs"});
  cases.push_back({{2, 40, 33, 7}, random_tokens(rng, 80, 7), "33 columns: a partial column tile"});
  // 3 x 700 positions: several sort tiles and dwte tiles, runs crossing tiles, V > 256 (two radix
  // passes), one token in 45% of the positions (a run summed by the whole block).
  cases.push_back({{3, 700, 45, 300}, skewed_tokens(rng, 2100, 300, 945, 7), "a long run across tiles"});
  // A run of exactly kShortRun = 64 entries (one warp) and one of 65 (the block).
  {
    std::vector<std::int32_t> t(200);
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = i < 64 ? 1 : (i < 129 ? 2 : 3 + static_cast<std::int32_t>(i % 2));
    std::shuffle(t.begin(), t.end(), rng);
    cases.push_back({{1, 200, 40, 5}, t, "runs of 64 and 65"});
  }
  cases.push_back({{4, 256, 64, 50257}, random_tokens(rng, 1024, 50257), "GPT-2 vocabulary (two radix passes), short runs"});
  for (const Case& k : cases)
    for (const std::size_t offset : {0, 1}) {
      const EmbeddingShape& e = k.e;
      const std::size_t N = static_cast<std::size_t>(e.B * e.T), C = static_cast<std::size_t>(e.C);
      const auto dout = round_to(s(), uniform_values(rng, N * C, -1, 1));
      const auto dwte0 = uniform_values(rng, static_cast<std::size_t>(e.V) * C, -1, 1);
      const auto dwpe0 = uniform_values(rng, static_cast<std::size_t>(e.T) * C, -1, 1);
      const auto [dwte, dwpe] = run_embedding_backward(s(), e, k.tokens, dout, dwte0, dwpe0, offset, false);
      std::vector<float> want_dwte = dwte0, want_dwpe = dwpe0;
      cpu::embedding_backward(want_dwte.data(), want_dwpe.data(), dout.data(), k.tokens.data(), e.B, e.T, e.C);
      EXPECT_TRUE(within(dwte, want_dwte, dwte_tolerance(e, k.tokens, dout, dwte0))) << k.what << ", " << describe(e, offset);
      // dwpe adds the same fp32 values in the CPU op's order (b = 0, 1, ...): equal bits.
      EXPECT_TRUE(same_bits(dwpe, want_dwpe)) << k.what << ", " << describe(e, offset);
    }
}

TEST_P(CudaOps, EmbeddingBackwardIsDeterministic) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(3);
  const EmbeddingShape e{3, 700, 45, 300};
  const std::size_t N = 2100, C = 45;
  const auto tokens = skewed_tokens(rng, N, 300, 1200, 11);
  const auto dout = round_to(s(), uniform_values(rng, N * C, -1, 1));
  const auto dwte0 = uniform_values(rng, 300 * C, -1, 1);
  const auto dwpe0 = uniform_values(rng, 700 * C, -1, 1);
  const auto first = run_embedding_backward(s(), e, tokens, dout, dwte0, dwpe0, 0, false);
  const auto second = run_embedding_backward(s(), e, tokens, dout, dwte0, dwpe0, 0, true);  // scratch full of junk
  EXPECT_TRUE(same_bits(first.first, second.first)) << "dwte";
  EXPECT_TRUE(same_bits(first.second, second.second)) << "dwpe";
}

TEST_P(CudaOps, EmbeddingBackwardSkipsTokensOutsideTheVocabulary) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(4);
  const EmbeddingShape e{2, 9, 16, 10};
  const std::size_t N = 18, C = 16;
  auto tokens = random_tokens(rng, N, 10);
  tokens[3] = -1;
  tokens[8] = 10;
  tokens[12] = 1 << 20;
  const auto dout = round_to(s(), uniform_values(rng, N * C, -1, 1));
  const auto dwte0 = uniform_values(rng, 10 * C, -1, 1);
  const auto dwpe0 = uniform_values(rng, 9 * C, -1, 1);
  const auto [dwte, dwpe] = run_embedding_backward(s(), e, tokens, dout, dwte0, dwpe0, 0, false);
  // The reference: the valid positions only for dwte, every position for dwpe.
  std::vector<float> want_dwte = dwte0, want_dwpe = dwpe0;
  for (std::size_t p = 0; p < N; ++p)
    for (std::size_t c = 0; c < C; ++c) {
      if (tokens[p] >= 0 && tokens[p] < 10) want_dwte[tokens[p] * C + c] += dout[p * C + c];
      want_dwpe[(p % 9) * C + c] += dout[p * C + c];
    }
  EXPECT_TRUE(within(dwte, want_dwte, dwte_tolerance(e, tokens, dout, dwte0)));
  EXPECT_TRUE(same_bits(dwpe, want_dwpe));
}

// ---------------------------------------------------------------------------------------------
// LayerNorm.

struct RowShape {
  std::int64_t N, C;
};

std::string describe(const RowShape& r, std::size_t offset) {
  return "N " + std::to_string(r.N) + " C " + std::to_string(r.C) + " offset " + std::to_string(offset);
}

// LayerNorm outputs and row gradients: the row means (sums of C terms of magnitude up to ~2) may
// differ by 2 C u32 mean|term| between summation orders, at most ~1.2e-5 for C = 96; scaled by
// rstd (~1.2) and weight (<= 1.5) that bounds the output difference by ~3e-5 (typical differences
// are ~1e-7).
constexpr double kRowAtol = 3e-5;

TEST_P(CudaOps, LayerNormForwardMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(5);
  for (const RowShape r : {RowShape{14, 96}, RowShape{37, 45}, RowShape{9, 8}})
    for (const std::size_t offset : {0, 1}) {
      const std::size_t N = static_cast<std::size_t>(r.N), C = static_cast<std::size_t>(r.C);
      const auto x = round_to(s(), uniform_values(rng, N * C, -1, 2));  // a mean well away from zero
      const auto w = round_to(s(), uniform_values(rng, C, 0.5f, 1.5f));
      const auto b = round_to(s(), uniform_values(rng, C, -0.5f, 0.5f));
      DeviceTensor d_x(s(), N * C, offset), d_w(s(), C, offset), d_b(s(), C), d_out(s(), N * C);
      DeviceTensor d_mean(Storage::kF32, N), d_rstd(Storage::kF32, N);
      d_x.upload(x);
      d_w.upload(w);
      d_b.upload(b);
      dispatch(s(), [&](auto tag) {
        using T = typename decltype(tag)::type;
        cuda::layernorm_forward<T>(d_out.as<T>(), d_mean.as<float>(), d_rstd.as<float>(), d_x.as<T>(), d_w.as<T>(), d_b.as<T>(),
                                   r.N, r.C, nullptr);
      });
      sync();
      std::vector<float> out(N * C), mean(N), rstd(N);
      cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), r.N, r.C);
      std::vector<double> mean_tol(N);
      for (std::size_t i = 0; i < N; ++i) {
        double abs_sum = 0;
        for (std::size_t c = 0; c < C; ++c) abs_sum += std::fabs(static_cast<double>(x[i * C + c]));
        mean_tol[i] = reduction_bound(static_cast<double>(C), abs_sum / static_cast<double>(C)) + kU32 * std::fabs(mean[i]);
      }
      EXPECT_TRUE(within(d_mean.download(), mean, mean_tol)) << "mean, " << describe(r, offset);
      // rstd: var is a sum of C positive terms (relative difference <= 2 C u32) and does not
      // depend on the mean to first order; rstd halves it: 1e-5 covers C up to ~160 worst case.
      EXPECT_TRUE(close(d_rstd.download(), rstd, 1e-5, 0.0)) << "rstd, " << describe(r, offset);
      EXPECT_TRUE(close(d_out.download(), out, rtol(1e-5), kRowAtol)) << "out, " << describe(r, offset);
    }
}

// Runs the CUDA LayerNorm backward; returns (din, dweight, dbias).
struct LayerNormGrads {
  std::vector<float> din, dweight, dbias;
};

LayerNormGrads run_layernorm_backward(Storage s, const RowShape& r, const std::vector<float>& din0,
                                      const std::vector<float>& dweight0, const std::vector<float>& dbias0,
                                      const std::vector<float>& dout, const std::vector<float>& x,
                                      const std::vector<float>& w, const std::vector<float>& mean,
                                      const std::vector<float>& rstd, std::size_t offset) {
  const std::size_t N = static_cast<std::size_t>(r.N), C = static_cast<std::size_t>(r.C);
  DeviceTensor d_din(s, N * C, offset), d_dout(s, N * C, offset), d_x(s, N * C), d_w(s, C, offset);
  DeviceTensor d_dweight(Storage::kF32, C), d_dbias(Storage::kF32, C), d_mean(Storage::kF32, N), d_rstd(Storage::kF32, N);
  d_din.upload(din0);
  d_dout.upload(dout);
  d_x.upload(x);
  d_w.upload(w);
  d_dweight.upload(dweight0);
  d_dbias.upload(dbias0);
  d_mean.upload(mean);
  d_rstd.upload(rstd);
  DeviceBytes scratch(cuda::layernorm_backward_scratch_bytes(r.N, r.C));
  dispatch(s, [&](auto tag) {
    using T = typename decltype(tag)::type;
    cuda::layernorm_backward<T>(d_din.as<T>(), d_dweight.as<float>(), d_dbias.as<float>(), d_dout.as<T>(), d_x.as<T>(), d_w.as<T>(),
                                d_mean.as<float>(), d_rstd.as<float>(), r.N, r.C, scratch.data(), nullptr);
  });
  sync();
  return {d_din.download(), d_dweight.download(), d_dbias.download()};
}

struct LayerNormCase {
  std::vector<float> din0, dweight0, dbias0, dout, x, w, mean, rstd;
};

LayerNormCase layernorm_case(Storage s, std::mt19937& rng, const RowShape& r) {
  const std::size_t N = static_cast<std::size_t>(r.N), C = static_cast<std::size_t>(r.C);
  LayerNormCase k;
  k.x = round_to(s, uniform_values(rng, N * C, -1, 2));
  k.w = round_to(s, uniform_values(rng, C, 0.5f, 1.5f));
  const auto b = uniform_values(rng, C, -0.5f, 0.5f);
  k.dout = round_to(s, uniform_values(rng, N * C, -1, 1));
  k.din0 = round_to(s, uniform_values(rng, N * C, -1, 1));
  k.dweight0 = uniform_values(rng, C, -1, 1);
  k.dbias0 = uniform_values(rng, C, -1, 1);
  // Both sides get the CPU forward's statistics.
  std::vector<float> out(N * C);
  k.mean.resize(N);
  k.rstd.resize(N);
  cpu::layernorm_forward(out.data(), k.mean.data(), k.rstd.data(), k.x.data(), k.w.data(), b.data(), r.N, r.C);
  return k;
}

TEST_P(CudaOps, LayerNormBackwardMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(6);
  // N = 1000: 32 chunks of 32 rows in the column sums; C = 8: one 128-bit unit per row in bf16.
  for (const RowShape r : {RowShape{14, 96}, RowShape{1000, 45}, RowShape{37, 8}, RowShape{300, 128}})
    for (const std::size_t offset : {0, 1}) {
      const std::size_t N = static_cast<std::size_t>(r.N), C = static_cast<std::size_t>(r.C);
      const LayerNormCase k = layernorm_case(s(), rng, r);
      const LayerNormGrads got =
          run_layernorm_backward(s(), r, k.din0, k.dweight0, k.dbias0, k.dout, k.x, k.w, k.mean, k.rstd, offset);
      std::vector<float> din = k.din0, dweight = k.dweight0, dbias = k.dbias0;
      cpu::layernorm_backward(din.data(), dweight.data(), dbias.data(), k.dout.data(), k.x.data(), k.w.data(),
                              k.mean.data(), k.rstd.data(), r.N, r.C);
      EXPECT_TRUE(close(got.din, din, rtol(1e-5), kRowAtol)) << "din, " << describe(r, offset);
      // The column sums: the terms dout * xhat are the same fp32 products on both sides.
      std::vector<double> tol_w(C), tol_b(C);
      for (std::size_t c = 0; c < C; ++c) {
        double abs_w = std::fabs(static_cast<double>(k.dweight0[c])), abs_b = std::fabs(static_cast<double>(k.dbias0[c]));
        for (std::size_t i = 0; i < N; ++i) {
          const float xhat = (k.x[i * C + c] - k.mean[i]) * k.rstd[i];
          abs_w += std::fabs(static_cast<double>(k.dout[i * C + c] * xhat));
          abs_b += std::fabs(static_cast<double>(k.dout[i * C + c]));
        }
        tol_w[c] = reduction_bound(static_cast<double>(N + 1), abs_w);
        tol_b[c] = reduction_bound(static_cast<double>(N + 1), abs_b);
      }
      EXPECT_TRUE(within(got.dweight, dweight, tol_w)) << "dweight, " << describe(r, offset);
      EXPECT_TRUE(within(got.dbias, dbias, tol_b)) << "dbias, " << describe(r, offset);
    }
}

TEST_P(CudaOps, LayerNormBackwardIsDeterministic) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(7);
  for (const RowShape r : {RowShape{1000, 45}, RowShape{2048, 96}}) {
    const LayerNormCase k = layernorm_case(s(), rng, r);
    const LayerNormGrads a = run_layernorm_backward(s(), r, k.din0, k.dweight0, k.dbias0, k.dout, k.x, k.w, k.mean, k.rstd, 0);
    const LayerNormGrads b = run_layernorm_backward(s(), r, k.din0, k.dweight0, k.dbias0, k.dout, k.x, k.w, k.mean, k.rstd, 0);
    EXPECT_TRUE(same_bits(a.din, b.din)) << "din, " << describe(r, 0);
    EXPECT_TRUE(same_bits(a.dweight, b.dweight)) << "dweight, " << describe(r, 0);
    EXPECT_TRUE(same_bits(a.dbias, b.dbias)) << "dbias, " << describe(r, 0);
  }
}

// ---------------------------------------------------------------------------------------------
// GELU and residual.

// GELU: tanhf (CUDA) and std::tanh (glibc) are each within 2 ulp, so tanh may differ by 4 ulp of
// 1, 2.4e-7, between the sides; everything else rounds the same (no contraction on either side).
// For |x| <= 4 and |dout| <= 1 that moves the forward by at most 0.5 |x| 2.4e-7 <= 5e-7 and the
// backward (through 0.5 (1 + th) and 0.5 x (1 - th^2) k (1 + 3 c x^2)) by at most ~3.3e-6.
constexpr double kGeluForwardAtol = 1e-6;
constexpr double kGeluBackwardAtol = 5e-6;

TEST_P(CudaOps, GeluMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(8);
  for (const std::size_t n : {std::size_t{1001}, std::size_t{8}, std::size_t{3}})
    for (const std::size_t offset : {0, 1}) {
      const auto x = round_to(s(), uniform_values(rng, n, -4, 4));
      const auto dout = round_to(s(), uniform_values(rng, n, -1, 1));
      std::vector<float> out(n), din(n, 0.0f);
      cpu::gelu_forward(out.data(), x.data(), static_cast<std::int64_t>(n));
      cpu::gelu_backward(din.data(), x.data(), dout.data(), static_cast<std::int64_t>(n));  // += onto zeros
      DeviceTensor d_x(s(), n, offset), d_out(s(), n, offset), d_dout(s(), n, offset), d_din(s(), n, offset);
      d_x.upload(x);
      d_dout.upload(dout);
      d_din.upload(std::vector<float>(n, 7.0f));  // overwritten, not accumulated
      dispatch(s(), [&](auto tag) {
        using T = typename decltype(tag)::type;
        const auto len = static_cast<std::int64_t>(n);
        cuda::gelu_forward<T>(d_out.as<T>(), d_x.as<T>(), len, nullptr);
        cuda::gelu_backward<T>(d_din.as<T>(), d_x.as<T>(), d_dout.as<T>(), len, nullptr);
        cuda::gelu_backward<T>(d_dout.as<T>(), d_x.as<T>(), d_dout.as<T>(), len, nullptr);  // in place: din = dout
      });
      sync();
      const std::string what = "n " + std::to_string(n) + " offset " + std::to_string(offset);
      EXPECT_TRUE(close(d_out.download(), out, rtol(1e-5), kGeluForwardAtol)) << "forward, " << what;
      EXPECT_TRUE(close(d_din.download(), din, rtol(1e-5), kGeluBackwardAtol)) << "backward, " << what;
      EXPECT_TRUE(close(d_dout.download(), din, rtol(1e-5), kGeluBackwardAtol)) << "backward in place, " << what;
    }
}

TEST_P(CudaOps, ResidualMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(9);
  for (const std::size_t n : {std::size_t{1001}, std::size_t{16}, std::size_t{5}})
    for (const std::size_t offset : {0, 1}) {
      const auto a = round_to(s(), uniform_values(rng, n, -3, 3));
      const auto b = round_to(s(), uniform_values(rng, n, -3, 3));
      std::vector<float> want(n);
      cpu::residual_forward(want.data(), a.data(), b.data(), static_cast<std::int64_t>(n));
      want = round_to(s(), want);
      DeviceTensor d_a(s(), n, offset), d_b(s(), n), d_out(s(), n, offset);
      d_a.upload(a);
      d_b.upload(b);
      dispatch(s(), [&](auto tag) {
        using T = typename decltype(tag)::type;
        const auto len = static_cast<std::int64_t>(n);
        cuda::residual_forward<T>(d_out.as<T>(), d_a.as<T>(), d_b.as<T>(), len, nullptr);
        cuda::residual_forward<T>(d_a.as<T>(), d_a.as<T>(), d_b.as<T>(), len, nullptr);  // in place
      });
      sync();
      const std::string what = "n " + std::to_string(n) + " offset " + std::to_string(offset);
      // One fp32 add of the same values and the same rounding: equal bits.
      EXPECT_TRUE(same_bits(d_out.download(), want)) << what;
      EXPECT_TRUE(same_bits(d_a.download(), want)) << "in place, " << what;
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

struct CrossEntropyShape {
  std::int64_t BT, V, stride;
};

std::string describe(const CrossEntropyShape& c) {
  return "BT " + std::to_string(c.BT) + " V " + std::to_string(c.V) + " stride " + std::to_string(c.stride);
}

// Losses: log of a sum of V exponentials whose fp32 rounding (summation order, expf within 2 ulp,
// online rescaling) differs by a few times 1e-6 relative between the sides for these V; 1e-5
// absolute and relative covers it. dlogits: softmax * dloss carries the same relative error (the
// max and x - max are the same floats on both sides), so 1e-5 relative, and an absolute floor far
// below the smallest probability here (e^-8 / 3001 ~ 1e-7) times dloss.
constexpr double kLossTol = 1e-5;
constexpr double kDlogitsFloor = 1e-9;
constexpr float kPadding = 1000.0f;  // exact in bf16; would dominate the softmax if it were read

TEST_P(CudaOps, CrossEntropyMatchesCpuOnPaddedRows) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(10);
  // A warp per row up to V = 1024, a block above; strides that allow 128-bit accesses and ones
  // that do not.
  for (const CrossEntropyShape k : {CrossEntropyShape{14, 65, 72}, CrossEntropyShape{14, 65, 65},
                                    CrossEntropyShape{7, 1024, 1024}, CrossEntropyShape{6, 1025, 1032},
                                    CrossEntropyShape{5, 3001, 3008}, CrossEntropyShape{3, 3001, 3001}})
    for (const bool backward : {false, true}) {
      const std::size_t BT = static_cast<std::size_t>(k.BT), V = static_cast<std::size_t>(k.V),
                        stride = static_cast<std::size_t>(k.stride);
      const auto logits = round_to(s(), uniform_values(rng, BT * V, -4, 4));
      std::vector<float> padded(BT * stride, kPadding);
      for (std::size_t i = 0; i < BT; ++i)
        for (std::size_t v = 0; v < V; ++v) padded[i * stride + v] = logits[i * V + v];
      const auto targets = random_tokens(rng, BT, static_cast<std::int32_t>(V));
      const float dloss = 1.0f / static_cast<float>(BT);

      std::vector<float> losses(BT), probs(BT * V), dlogits(BT * V, 0.0f);
      cpu::crossentropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), k.BT, k.V);
      cpu::crossentropy_backward(dlogits.data(), probs.data(), targets.data(), dloss, k.BT, k.V);

      DeviceTensor d_logits(s(), BT * stride), d_losses(Storage::kF32, BT);
      d_logits.upload(padded);
      Tokens d_targets(targets);
      dispatch(s(), [&](auto tag) {
        using T = typename decltype(tag)::type;
        cuda::crossentropy_forward_backward<T>(d_losses.as<float>(), d_logits.as<T>(), d_targets.get(), dloss, backward, k.BT,
                                               k.V, k.stride, nullptr);
      });
      sync();
      const std::string what = describe(k) + (backward ? " backward" : " forward");
      EXPECT_TRUE(close(d_losses.download(), losses, kLossTol, kLossTol)) << "losses, " << what;
      const std::vector<float> after = d_logits.download();
      if (!backward) {
        EXPECT_TRUE(same_bits(after, padded)) << "logits changed by a forward-only call, " << what;
        continue;
      }
      std::vector<float> got(BT * V), padding_after, padding_before;
      for (std::size_t i = 0; i < BT; ++i) {
        for (std::size_t v = 0; v < V; ++v) got[i * V + v] = after[i * stride + v];
        for (std::size_t v = V; v < stride; ++v) {
          padding_after.push_back(after[i * stride + v]);
          padding_before.push_back(padded[i * stride + v]);
        }
      }
      EXPECT_TRUE(close(got, dlogits, rtol(kLossTol), kDlogitsFloor * dloss)) << "dlogits, " << what;
      EXPECT_TRUE(same_bits(padding_after, padding_before)) << "padding written, " << what;
    }
}

// A target outside [0, V) is never read: its loss is NaN and its gradient is softmax * dloss.
TEST_P(CudaOps, CrossEntropyGuardsTargetsOutsideTheVocabulary) {
  NIBBLE_REQUIRE_GPU();
  std::mt19937 rng(11);
  for (const CrossEntropyShape k : {CrossEntropyShape{4, 65, 72}, CrossEntropyShape{4, 2000, 2000}}) {
    const std::size_t BT = 4, V = static_cast<std::size_t>(k.V), stride = static_cast<std::size_t>(k.stride);
    const std::vector<std::int32_t> targets = {3, -1, static_cast<std::int32_t>(V), 1 << 30};
    const auto logits = round_to(s(), uniform_values(rng, BT * V, -4, 4));
    std::vector<float> padded(BT * stride, kPadding);
    for (std::size_t i = 0; i < BT; ++i)
      for (std::size_t v = 0; v < V; ++v) padded[i * stride + v] = logits[i * V + v];
    const float dloss = 0.25f;
    // The reference softmax from the CPU op with a valid stand-in target (row 0 keeps its own).
    const std::vector<std::int32_t> stand_in = {3, 0, 0, 0};
    std::vector<float> losses(BT), probs(BT * V), dlogits(BT * V, 0.0f);
    cpu::crossentropy_forward(losses.data(), probs.data(), logits.data(), stand_in.data(), k.BT, k.V);
    cpu::crossentropy_backward(dlogits.data(), probs.data(), stand_in.data(), dloss, k.BT, k.V);
    for (std::size_t i = 1; i < BT; ++i)  // no onehot term in the guarded rows
      for (std::size_t v = 0; v < V; ++v) dlogits[i * V + v] = probs[i * V + v] * dloss;

    DeviceTensor d_logits(s(), BT * stride), d_losses(Storage::kF32, BT);
    d_logits.upload(padded);
    Tokens d_targets(targets);
    dispatch(s(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      cuda::crossentropy_forward_backward<T>(d_losses.as<float>(), d_logits.as<T>(), d_targets.get(), dloss, true, k.BT, k.V,
                                             k.stride, nullptr);
    });
    sync();
    const std::vector<float> got_losses = d_losses.download();
    EXPECT_NEAR(got_losses[0], losses[0], kLossTol * (1 + std::fabs(losses[0]))) << describe(k);
    for (std::size_t i = 1; i < BT; ++i) EXPECT_TRUE(std::isnan(got_losses[i])) << "row " << i << ", " << describe(k);
    const std::vector<float> after = d_logits.download();
    std::vector<float> got(BT * V);
    for (std::size_t i = 0; i < BT; ++i)
      for (std::size_t v = 0; v < V; ++v) got[i * V + v] = after[i * stride + v];
    EXPECT_TRUE(close(got, dlogits, rtol(kLossTol), kDlogitsFloor * dloss)) << describe(k);
  }
}

INSTANTIATE_TEST_SUITE_P(Storage, CudaOps, ::testing::Values(Storage::kF32, Storage::kBF16),
                         [](const ::testing::TestParamInfo<Storage>& info) { return storage_name(info.param); });

// ---------------------------------------------------------------------------------------------
// Sizes and arguments.

TEST(CudaOpsArguments, ZeroSizesLaunchNothing) {
  NIBBLE_REQUIRE_GPU();
  float* f = nullptr;
  const std::int32_t* tokens = nullptr;
  EXPECT_NO_THROW(cuda::embedding_forward<float>(f, tokens, f, f, 0, 7, 96, nullptr));
  EXPECT_NO_THROW(cuda::embedding_forward<float>(f, tokens, f, f, 2, 7, 0, nullptr));
  EXPECT_EQ(cuda::embedding_backward_scratch_bytes(0, 7, 65), 0u);
  EXPECT_NO_THROW(cuda::embedding_backward<float>(f, f, f, tokens, 2, 0, 96, 65, nullptr, nullptr));
  EXPECT_NO_THROW(cuda::layernorm_forward<float>(f, f, f, f, f, f, 0, 96, nullptr));
  EXPECT_EQ(cuda::layernorm_backward_scratch_bytes(0, 96), 0u);
  EXPECT_NO_THROW(cuda::layernorm_backward<float>(f, f, f, f, f, f, f, f, 0, 96, nullptr, nullptr));
  EXPECT_NO_THROW(cuda::gelu_forward<float>(f, f, 0, nullptr));
  EXPECT_NO_THROW(cuda::gelu_backward<float>(f, f, f, 0, nullptr));
  EXPECT_NO_THROW(cuda::residual_forward<float>(f, f, f, 0, nullptr));
  EXPECT_NO_THROW(cuda::crossentropy_forward_backward<float>(f, f, tokens, 1.0f, true, 0, 65, 72, nullptr));
  sync();
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(CudaOpsArguments, BadArgumentsThrowInvalidArgument) {
  NIBBLE_REQUIRE_GPU();
  DeviceBytes buffer(1 << 16);
  auto* f = static_cast<float*>(buffer.data());
  const auto* tokens = static_cast<const std::int32_t*>(buffer.data());
  EXPECT_THROW(cuda::embedding_forward<float>(f, tokens, f, f, -1, 7, 96, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::embedding_forward<float>(f, nullptr, f, f, 2, 7, 8, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::embedding_backward_scratch_bytes(2, -7, 65), InvalidArgument);
  EXPECT_THROW(cuda::embedding_backward<float>(f, f, f, tokens, 2, 7, 8, 65, nullptr, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::embedding_backward<float>(f, f, f, tokens, 2, 7, 8, 0, f, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::layernorm_forward<float>(f, nullptr, f, f, f, f, 4, 8, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::layernorm_backward_scratch_bytes(4, -1), InvalidArgument);
  EXPECT_THROW(cuda::layernorm_backward<float>(f, f, f, f, f, f, f, f, 4, 8, nullptr, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::gelu_forward<float>(f, f, -3, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::gelu_backward<float>(f, nullptr, f, 3, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::residual_forward<float>(nullptr, f, f, 3, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::crossentropy_forward_backward<float>(f, f, tokens, 1.0f, true, 2, 65, 64, nullptr),
               InvalidArgument);  // stride < V
  EXPECT_THROW(cuda::crossentropy_forward_backward<float>(f, f, tokens, 1.0f, true, 2, 0, 0, nullptr), InvalidArgument);
  EXPECT_THROW(cuda::crossentropy_forward_backward<float>(nullptr, f, tokens, 1.0f, true, 2, 8, 8, nullptr),
               InvalidArgument);
  sync();
}

}  // namespace
}  // namespace nibble::model
