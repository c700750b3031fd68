// The CUDA causal attention (FlashAttention-style; fp32 on CUDA cores, bf16 on tensor cores)
// against the CPU attention, its specification: sequence lengths that are not tile multiples, head
// dims 32, 64 and 128; lse; bitwise determinism and overwrite semantics; causality; misaligned
// pointers; argument checks; indices past 2^31. Label `gpu`: every test skips without a device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
using test::DeviceArray;
using test::DeviceBytes;
using test::DeviceTensor;
using test::round_to_bf16;
using test::Storage;

const char* precision_name(Storage p) { return p == Storage::kF32 ? "fp32" : "bf16"; }

struct Shape {
  std::int64_t B, T, C, NH;
  std::size_t qkv() const { return static_cast<std::size_t>(B * T * 3 * C); }
  std::size_t out() const { return static_cast<std::size_t>(B * T * C); }
  std::size_t lse() const { return static_cast<std::size_t>(B * NH * T); }
  std::int64_t head_dim() const { return C / NH; }
};

std::string describe(const Shape& s, Storage p) {
  return std::string(precision_name(p)) + " B=" + std::to_string(s.B) + " T=" + std::to_string(s.T) +
         " C=" + std::to_string(s.C) + " NH=" + std::to_string(s.NH);
}

void forward(Storage p, DeviceTensor& out, DeviceArray<float>& lse, DeviceTensor& qkv, const Shape& s) {
  if (p == Storage::kF32)
    cuda::attention_forward<float>(out.as<float>(), lse.data(), qkv.as<float>(), s.B, s.T, s.C, s.NH, nullptr);
  else
    cuda::attention_forward<cuda::bf16>(out.as<cuda::bf16>(), lse.data(), qkv.as<cuda::bf16>(), s.B, s.T, s.C, s.NH,
                                        nullptr);
  check(cudaDeviceSynchronize(), "attention_forward");
}

void backward(Storage p, DeviceTensor& dqkv, DeviceTensor& dout, DeviceTensor& qkv, DeviceTensor& out,
              DeviceArray<float>& lse, DeviceBytes& scratch, const Shape& s) {
  if (p == Storage::kF32)
    cuda::attention_backward<float>(dqkv.as<float>(), dout.as<float>(), qkv.as<float>(), out.as<float>(), lse.data(),
                                    s.B, s.T, s.C, s.NH, scratch.data(), nullptr);
  else
    cuda::attention_backward<cuda::bf16>(dqkv.as<cuda::bf16>(), dout.as<cuda::bf16>(), qkv.as<cuda::bf16>(),
                                         out.as<cuda::bf16>(), lse.data(), s.B, s.T, s.C, s.NH, scratch.data(),
                                         nullptr);
  check(cudaDeviceSynchronize(), "attention_backward");
}

// Uniform values in [-spread, spread], rounded to bf16 when the test runs in bf16 (so the CPU
// reference sees exactly the values the GPU reads).
std::vector<float> random_values(std::size_t n, float spread, std::uint32_t seed, Storage p) {
  std::mt19937 gen(seed);
  std::vector<float> v = test::uniform_values(gen, n, -spread, spread);
  if (p == Storage::kBF16)
    for (float& x : v) x = round_to_bf16(x);
  return v;
}

// q and k spread over [-2, 2] so that softmax rows are peaked (scores of a few units) and the
// running maximum changes between tiles; v over [-1, 1].
std::vector<float> random_qkv(const Shape& s, std::uint32_t seed, Storage p) {
  std::vector<float> qkv = random_values(s.qkv(), 2.0f, seed, p);
  for (std::int64_t bt = 0; bt < s.B * s.T; ++bt)
    for (std::int64_t c = 2 * s.C; c < 3 * s.C; ++c) qkv[bt * 3 * s.C + c] *= 0.5f;  // exact in bf16 too
  return qkv;
}

struct Reference {
  std::vector<float> out, att, dqkv;
};

Reference cpu_reference(const std::vector<float>& qkv, const std::vector<float>& dout, const Shape& s) {
  Reference r;
  r.out.resize(s.out());
  r.att.resize(static_cast<std::size_t>(s.B * s.NH * s.T * s.T));
  r.dqkv.assign(s.qkv(), 0.0f);
  std::vector<float> datt(r.att.size());
  cpu::attention_forward(r.out.data(), r.att.data(), qkv.data(), s.B, s.T, s.C, s.NH);
  cpu::attention_backward(r.dqkv.data(), datt.data(), dout.data(), qkv.data(), r.att.data(), s.B, s.T, s.C, s.NH);
  return r;
}

// lse[b, h, t] = log sum_{t2 <= t} exp(q_t . k_t2 / sqrt(HD)), in double on the host.
std::vector<double> host_lse(const std::vector<float>& qkv, const Shape& s) {
  const std::int64_t hd = s.head_dim(), C3 = 3 * s.C;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> lse(s.lse());
  std::vector<double> scores(static_cast<std::size_t>(s.T));
  for (std::int64_t b = 0; b < s.B; ++b)
    for (std::int64_t h = 0; h < s.NH; ++h)
      for (std::int64_t t = 0; t < s.T; ++t) {
        const float* q = &qkv[(b * s.T + t) * C3 + h * hd];
        double maxv = -INFINITY;
        for (std::int64_t t2 = 0; t2 <= t; ++t2) {
          const float* k = &qkv[(b * s.T + t2) * C3 + s.C + h * hd];
          double dot = 0.0;
          for (std::int64_t c = 0; c < hd; ++c) dot += static_cast<double>(q[c]) * k[c];
          scores[t2] = dot * scale;
          maxv = std::max(maxv, scores[t2]);
        }
        double total = 0.0;
        for (std::int64_t t2 = 0; t2 <= t; ++t2) total += std::exp(scores[t2] - maxv);
        lse[(b * s.NH + h) * s.T + t] = maxv + std::log(total);
      }
  return lse;
}

// Every element within rtol * |ref| + scale_tol * max |ref| (NaN fails); reports the worst one.
void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double rtol, double scale_tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double max_ref = 0.0;
  for (float r : ref) max_ref = std::max(max_ref, static_cast<double>(std::fabs(r)));
  std::size_t bad = 0, worst = 0;
  double worst_ratio = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    const double bound = rtol * std::fabs(ref[i]) + scale_tol * max_ref;
    if (!(err <= bound)) ++bad;
    const double ratio = std::isnan(err) ? INFINITY : err / std::max(bound, 1e-30);
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements out of tolerance (max |ref| "
                     << max_ref << "); worst at " << worst << ": got " << got[worst] << ", want " << ref[worst];
}

// NOTE: tolerances. fp32 (CUDA cores, fp32 arithmetic): 1e-4 relative to the element plus 1e-4 of
// the tensor's largest magnitude. Both sides compute in fp32 from the same inputs, but the GPU sums
// in another order (the online softmax rescales partial sums tile by tile, dot products run 4
// channels at a time with fma, D = dout . out replaces the CPU's sum of P * dP): differences are a
// few ulps times the row length, ~1e-6 relative here, so 1e-4 leaves margin without hiding a wrong
// tile or mask (errors of order 1). The absolute part covers elements that are sums of cancelling
// terms (near-zero outputs, dq of row 0). bf16 (tensor cores): 2^-7 (two bf16 unit roundoffs) of
// the element plus 2^-7 of the tensor's largest magnitude. The inputs are rounded to bf16 before
// the CPU runs, so the differences are bf16 roundings inside the GPU computation, each at most
// 2^-8 relative: of every output, of P (operand of P V and P^T dO), of dS (operand of dS K and
// dS^T Q) and of `out` inside D = dout . out. Each moves a sum by at most 2^-8 of the sum of its
// terms' magnitudes, which stays within a small multiple of the tensor's scale; a host emulation of
// these rounding points on the shapes below stays under 0.3 of this bound.
struct Tolerance {
  double rtol, scale_tol;
};
Tolerance tolerance(Storage p) { return p == Storage::kF32 ? Tolerance{1e-4, 1e-4} : Tolerance{0x1p-7, 0x1p-7}; }

std::vector<Shape> shapes() {
  return {
      {2, 7, 64, 2},     // HD 32, one partial tile
      {1, 70, 128, 2},   // HD 64, a full tile and a partial one
      {2, 129, 384, 6},  // HD 64, three tiles, the last of one row
      {3, 100, 96, 3},   // HD 32, two tiles
      {2, 150, 256, 2},  // HD 128 (32-key tiles), five key tiles
  };
}

class AttentionMatchesCpu : public ::testing::TestWithParam<Storage> {};

TEST_P(AttentionMatchesCpu, ForwardBackwardAndLse) {
  NIBBLE_REQUIRE_GPU();
  const Storage p = GetParam();
  const Tolerance tol = tolerance(p);
  std::uint32_t seed = 1;
  for (const Shape& s : shapes()) {
    SCOPED_TRACE(describe(s, p));
    const std::vector<float> qkv = random_qkv(s, seed++, p);
    const std::vector<float> dout = random_values(s.out(), 1.0f, seed++, p);
    const Reference ref = cpu_reference(qkv, dout, s);

    DeviceTensor d_qkv(p, s.qkv()), d_out(p, s.out()), d_dout(p, s.out()), d_dqkv(p, s.qkv());
    DeviceArray<float> d_lse(s.lse());
    DeviceBytes scratch(cuda::attention_backward_scratch_bytes(s.B, s.T, s.C, s.NH));
    d_qkv.upload(qkv);
    d_dout.upload(dout);
    d_dqkv.fill_bytes(0x7f);  // 3.4e38 in both precisions: dqkv must be overwritten, not added to
    forward(p, d_out, d_lse, d_qkv, s);
    backward(p, d_dqkv, d_dout, d_qkv, d_out, d_lse, scratch, s);

    expect_close(d_out.download(), ref.out, tol.rtol, tol.scale_tol, "out");
    expect_close(d_dqkv.download(), ref.dqkv, tol.rtol, tol.scale_tol, "dqkv");

    // lse is fp32 in both precisions and computed from the same (rounded) inputs: errors are those
    // of fp32 dot products and exp/log, ~1e-6 absolute at these magnitudes.
    const std::vector<double> want = host_lse(qkv, s);
    const std::vector<float> got = d_lse.download();
    std::size_t bad = 0;
    for (std::size_t i = 0; i < want.size(); ++i)
      if (!(std::fabs(got[i] - want[i]) <= 2e-5 * (1.0 + std::fabs(want[i])))) ++bad;
    EXPECT_EQ(bad, 0u) << "lse: " << bad << " of " << want.size() << " rows differ from log(sum(exp(scores)))";
  }
}

TEST_P(AttentionMatchesCpu, BitwiseDeterministicAndOverwriting) {
  NIBBLE_REQUIRE_GPU();
  const Storage p = GetParam();
  const Shape s{2, 129, 384, 6};
  const std::vector<float> qkv = random_qkv(s, 11, p);
  const std::vector<float> dout = random_values(s.out(), 1.0f, 12, p);
  DeviceTensor d_qkv(p, s.qkv()), d_out(p, s.out()), d_dout(p, s.out()), d_dqkv(p, s.qkv());
  DeviceArray<float> d_lse(s.lse());
  DeviceBytes scratch(cuda::attention_backward_scratch_bytes(s.B, s.T, s.C, s.NH));
  d_qkv.upload(qkv);
  d_dout.upload(dout);

  forward(p, d_out, d_lse, d_qkv, s);
  const std::vector<float> out1 = d_out.download(), lse1 = d_lse.download();
  d_dqkv.fill_bytes(0x00);
  backward(p, d_dqkv, d_dout, d_qkv, d_out, d_lse, scratch, s);
  const std::vector<float> dqkv1 = d_dqkv.download();

  forward(p, d_out, d_lse, d_qkv, s);
  const std::vector<float> out2 = d_out.download(), lse2 = d_lse.download();
  d_dqkv.fill_bytes(0x3f);  // a different starting content: the result must not depend on it
  backward(p, d_dqkv, d_dout, d_qkv, d_out, d_lse, scratch, s);
  const std::vector<float> dqkv2 = d_dqkv.download();

  EXPECT_EQ(0, std::memcmp(out1.data(), out2.data(), out1.size() * sizeof(float))) << "forward out differs";
  EXPECT_EQ(0, std::memcmp(lse1.data(), lse2.data(), lse1.size() * sizeof(float))) << "forward lse differs";
  EXPECT_EQ(0, std::memcmp(dqkv1.data(), dqkv2.data(), dqkv1.size() * sizeof(float))) << "backward dqkv differs";
}

// Changing q, k and v at positions after t0 leaves out, lse and dq of rows up to t0 bit for bit
// unchanged (masked probabilities are exact zeros), and does change the later rows.
TEST_P(AttentionMatchesCpu, Causal) {
  NIBBLE_REQUIRE_GPU();
  const Storage p = GetParam();
  const Shape s{2, 129, 384, 6};
  const std::int64_t t0 = 70, C3 = 3 * s.C;
  const std::vector<float> qkv = random_qkv(s, 21, p);
  const std::vector<float> dout = random_values(s.out(), 1.0f, 22, p);
  std::vector<float> changed = qkv;
  const std::vector<float> noise = random_qkv(s, 23, p);
  for (std::int64_t b = 0; b < s.B; ++b)
    for (std::int64_t t = t0 + 1; t < s.T; ++t)
      for (std::int64_t c = 0; c < C3; ++c) changed[(b * s.T + t) * C3 + c] = noise[(b * s.T + t) * C3 + c];

  struct Result {
    std::vector<float> out, lse, dqkv;
  };
  auto run = [&](const std::vector<float>& input) {
    DeviceTensor d_qkv(p, s.qkv()), d_out(p, s.out()), d_dout(p, s.out()), d_dqkv(p, s.qkv());
    DeviceArray<float> d_lse(s.lse());
    DeviceBytes scratch(cuda::attention_backward_scratch_bytes(s.B, s.T, s.C, s.NH));
    d_qkv.upload(input);
    d_dout.upload(dout);
    forward(p, d_out, d_lse, d_qkv, s);
    backward(p, d_dqkv, d_dout, d_qkv, d_out, d_lse, scratch, s);
    return Result{d_out.download(), d_lse.download(), d_dqkv.download()};
  };
  const Result a = run(qkv), b = run(changed);

  std::size_t early_diff = 0, late_same = 0;
  for (std::int64_t bb = 0; bb < s.B; ++bb)
    for (std::int64_t t = 0; t < s.T; ++t) {
      const std::size_t o = static_cast<std::size_t>((bb * s.T + t) * s.C);
      const std::size_t dq = static_cast<std::size_t>((bb * s.T + t) * C3);  // dq is the first C of a row
      const bool same = std::memcmp(&a.out[o], &b.out[o], s.C * sizeof(float)) == 0 &&
                        std::memcmp(&a.dqkv[dq], &b.dqkv[dq], s.C * sizeof(float)) == 0;
      if (t <= t0 && !same) ++early_diff;
      if (t > t0 && same) ++late_same;
      for (std::int64_t h = 0; h < s.NH; ++h) {
        const std::size_t l = static_cast<std::size_t>((bb * s.NH + h) * s.T + t);
        if (t <= t0 && std::memcmp(&a.lse[l], &b.lse[l], sizeof(float)) != 0) ++early_diff;
      }
    }
  EXPECT_EQ(early_diff, 0u) << "rows at or before t0 = " << t0 << " changed with later positions";
  EXPECT_EQ(late_same, 0u) << "rows after t0 did not change with their own inputs";
}

// Pointers that are not 16-byte aligned take the scalar load path and give the same bits.
TEST_P(AttentionMatchesCpu, MisalignedPointersGiveTheSameBits) {
  NIBBLE_REQUIRE_GPU();
  const Storage p = GetParam();
  const Shape s{1, 70, 128, 2};
  const std::vector<float> qkv = random_qkv(s, 31, p);
  const std::vector<float> dout = random_values(s.out(), 1.0f, 32, p);
  auto run = [&](std::size_t offset) {
    DeviceTensor d_qkv(p, s.qkv(), offset), d_out(p, s.out(), offset), d_dout(p, s.out(), offset),
        d_dqkv(p, s.qkv(), offset);
    DeviceArray<float> d_lse(s.lse());
    DeviceBytes scratch(cuda::attention_backward_scratch_bytes(s.B, s.T, s.C, s.NH));
    d_qkv.upload(qkv);
    d_dout.upload(dout);
    forward(p, d_out, d_lse, d_qkv, s);
    backward(p, d_dqkv, d_dout, d_qkv, d_out, d_lse, scratch, s);
    std::vector<float> all = d_out.download();
    const std::vector<float> dqkv = d_dqkv.download();
    all.insert(all.end(), dqkv.begin(), dqkv.end());
    return all;
  };
  const std::vector<float> aligned = run(0), misaligned = run(1);
  EXPECT_EQ(0, std::memcmp(aligned.data(), misaligned.data(), aligned.size() * sizeof(float)));
}

INSTANTIATE_TEST_SUITE_P(Precisions, AttentionMatchesCpu, ::testing::Values(Storage::kF32, Storage::kBF16),
                         [](const ::testing::TestParamInfo<Storage>& info) {
                           return std::string(precision_name(info.param));
                         });

TEST(CudaAttention, HeadDims) {
  NIBBLE_REQUIRE_GPU();
  for (std::int64_t hd : {32, 64, 128}) EXPECT_TRUE(cuda::attention_supports_head_dim(hd)) << hd;
  for (std::int64_t hd : {0, 1, 16, 48, 96, 256}) EXPECT_FALSE(cuda::attention_supports_head_dim(hd)) << hd;
}

TEST(CudaAttention, RefusesBadShapesNamingTheValue) {
  NIBBLE_REQUIRE_GPU();
  auto message = [](auto&& call) {
    try {
      call();
    } catch (const InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string("no InvalidArgument");
  };
  // C = 96 over NH = 5 heads: not divisible.
  EXPECT_NE(message([] { cuda::attention_forward<float>(nullptr, nullptr, nullptr, 1, 4, 96, 5, nullptr); }).find("96"),
            std::string::npos);
  // Head dim 48 (C = 96, NH = 2): not compiled.
  EXPECT_NE(
      message([] { cuda::attention_forward<cuda::bf16>(nullptr, nullptr, nullptr, 1, 4, 96, 2, nullptr); }).find("48"),
      std::string::npos);
  EXPECT_NE(message([] {
              cuda::attention_backward<float>(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 4, 96, 2, nullptr,
                                              nullptr);
            }).find("48"),
            std::string::npos);
  EXPECT_NE(message([] {
              cuda::attention_backward<float>(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 4, 128, 0, nullptr,
                                              nullptr);
            }).find("not divisible"),
            std::string::npos);
}

TEST(CudaAttention, EmptyInputsLaunchNothing) {
  NIBBLE_REQUIRE_GPU();
  EXPECT_EQ(cuda::attention_backward_scratch_bytes(0, 16, 128, 2), 0u);
  EXPECT_EQ(cuda::attention_backward_scratch_bytes(2, 0, 128, 2), 0u);
  EXPECT_NO_THROW(cuda::attention_forward<float>(nullptr, nullptr, nullptr, 0, 16, 128, 2, nullptr));
  EXPECT_NO_THROW(cuda::attention_forward<cuda::bf16>(nullptr, nullptr, nullptr, 2, 0, 128, 2, nullptr));
  EXPECT_NO_THROW(
      cuda::attention_backward<float>(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 16, 128, 2, nullptr, nullptr));
  EXPECT_NO_THROW(cuda::attention_backward<cuda::bf16>(nullptr, nullptr, nullptr, nullptr, nullptr, 2, 0, 128, 2,
                                                       nullptr, nullptr));
  check(cudaDeviceSynchronize(), "after empty launches");
}

// B * T * 3C above 2^31 (T = 1, so each row attends only to itself: out = v, dv = dout, dq = dk = 0
// up to rounding): the last batch, whose qkv offsets exceed 2^31 elements, is checked.
TEST(CudaAttention, IndicesPast2To31) {
  NIBBLE_REQUIRE_GPU();
  const Shape s{(std::int64_t{1} << 31) / (3 * 128) + 1024, 1, 128, 2};
  ASSERT_GT(static_cast<double>(s.qkv()), 2147483648.0);
  std::size_t free_bytes = 0, total_bytes = 0;
  check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  const std::size_t need = 2 * s.qkv() * 2 + 2 * s.out() * 2 + s.lse() * 4 +
                           cuda::attention_backward_scratch_bytes(s.B, s.T, s.C, s.NH) + (std::size_t{1} << 30);
  if (free_bytes < need)
    GTEST_SKIP() << "needs " << need / (1 << 20) << " MiB of device memory, " << free_bytes / (1 << 20) << " free";

  const Storage p = Storage::kBF16;
  DeviceTensor d_qkv(p, s.qkv()), d_out(p, s.out()), d_dout(p, s.out()), d_dqkv(p, s.qkv());
  DeviceArray<float> d_lse(s.lse());
  DeviceBytes scratch(cuda::attention_backward_scratch_bytes(s.B, s.T, s.C, s.NH));
  d_qkv.fill_bytes(0);
  d_dout.fill_bytes(0);
  const std::size_t last = static_cast<std::size_t>(s.B - 1);
  const std::vector<float> qkv_row = random_values(static_cast<std::size_t>(3 * s.C), 1.0f, 41, p);
  const std::vector<float> dout_row = random_values(static_cast<std::size_t>(s.C), 1.0f, 42, p);
  d_qkv.upload_at(last * 3 * s.C, qkv_row);
  d_dout.upload_at(last * s.C, dout_row);

  forward(p, d_out, d_lse, d_qkv, s);
  backward(p, d_dqkv, d_dout, d_qkv, d_out, d_lse, scratch, s);

  const std::vector<float> out = d_out.download(last * s.C, s.C);
  const std::vector<float> dqkv = d_dqkv.download(last * 3 * s.C, 3 * s.C);
  const std::vector<float> lse = d_lse.download(last * s.NH, s.NH);
  const std::int64_t hd = s.head_dim();
  for (std::int64_t h = 0; h < s.NH; ++h) {
    double dot = 0.0;
    for (std::int64_t c = 0; c < hd; ++c) dot += static_cast<double>(qkv_row[h * hd + c]) * qkv_row[s.C + h * hd + c];
    const double want = dot / std::sqrt(static_cast<double>(hd));
    EXPECT_NEAR(lse[h], want, 2e-5 * (1.0 + std::fabs(want))) << "head " << h;
  }
  for (std::int64_t c = 0; c < s.C; ++c) {
    EXPECT_EQ(out[c], qkv_row[2 * s.C + c]) << "out channel " << c;
    EXPECT_NEAR(dqkv[c], 0.0f, 1e-3f) << "dq channel " << c;
    EXPECT_NEAR(dqkv[s.C + c], 0.0f, 1e-3f) << "dk channel " << c;
    EXPECT_EQ(dqkv[2 * s.C + c], dout_row[c]) << "dv channel " << c;
  }
  // A row at the start, all zeros: out 0 and dqkv 0.
  const std::vector<float> first_out = d_out.download(0, s.C);
  const std::vector<float> first_dqkv = d_dqkv.download(0, 3 * s.C);
  for (float x : first_out) EXPECT_EQ(x, 0.0f);
  for (float x : first_dqkv) EXPECT_EQ(x, 0.0f);
}

}  // namespace
}  // namespace nibble::model
