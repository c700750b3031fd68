// The cuBLASLt matmul (model/cuda/ops.cuh: Matmul) against the CPU engine's matmul_forward and
// matmul_backward: fp32 with and without TF32, bf16, with and without bias, the GELU and its
// pre-activation, odd shapes, misaligned pointers, zero sizes, bit-identical repeats and refused
// arguments. Label `gpu`: every test skips, saying why, on a machine without a CUDA device.
//
// Tolerances. A dot product of k terms has an error bounded by a multiple of its magnitude, the
// same product over |a| and |b| (computed here by the CPU ops on absolute values), so each check is
//   |got - want| <= mag_tol * magnitude + value_tol * |want|.
// - fp32, TF32 off: mag_tol 1e-5. Both sides sum in fp32 in different orders; the worst case is
//   about k * 2^-24 (2.3e-5 for k = 384), the typical error sqrt(k) * 2^-24 ~ 1e-6.
// - fp32, TF32 on: mag_tol 3e-3. Each operand keeps 10 mantissa bits (relative error below 2^-10
//   even when truncated), so each product is off by less than 2 * 2^-10 ~ 2e-3 of its magnitude.
// - bf16: the inputs are bf16 on both sides (the CPU gets the same values widened), accumulation
//   is fp32 (mag_tol 1e-4, room for tensor-core accumulation), and a bf16 result is rounded once
//   to 8 significant bits: value_tol 2^-7 (twice the rounding bound 2^-8). fp32 results of bf16
//   inputs (dweight, dbias) have no value term.
// - The bias gradient is our own fp32 reduction in either mode: mag_tol 1e-5.
// - GELU: out is checked against the CPU's gelu of the pre-activation the GPU returned (so the
//   product's error is not counted twice): fp32 1e-6 * |want| + 1e-6 * |x| (tanhf differs by a few
//   ulps between libm and CUDA), bf16 2^-7 * |want| + 1e-6 * |x|.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "model/cpu/ops.hpp"
#include "model/cuda/ops.cuh"
#include "nibble/device.hpp"
#include "nibble/error.hpp"

#include "gpu/cuda_test_util.hpp"
#include "test_util.hpp"

namespace nibble::model::cuda {
namespace {

using test::check;
using test::DeviceBytes;

// How a T is held on the host: float as itself, bf16 as its 16 bits.
template <class T>
struct Host;
template <>
struct Host<float> {
  using Bits = float;
  static Bits encode(float x) { return x; }
  static float decode(Bits b) { return b; }
  static Bits nan() { return std::nanf(""); }
};
template <>
struct Host<bf16> {
  using Bits = std::uint16_t;
  static Bits encode(float x) { return test::bf16_bits(x); }
  static float decode(Bits b) { return test::bf16_value(b); }
  static Bits nan() { return 0x7fc0u; }
};

// A device array of n elements of T, starting `offset` elements into its allocation (offset 1
// gives pointers that are only element-aligned).
template <class T>
class DeviceArray {
 public:
  using Bits = typename Host<T>::Bits;
  explicit DeviceArray(std::size_t n, std::size_t offset = 0) : n_(n), offset_(offset) {
    check(cudaMalloc(&base_, (n_ + offset_ + 1) * sizeof(Bits)), "cudaMalloc");
  }
  ~DeviceArray() { cudaFree(base_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* data() { return reinterpret_cast<T*>(base_ + offset_); }
  void upload_bits(const std::vector<Bits>& v) {
    if (v.size() != n_) throw std::runtime_error("upload: size mismatch");
    if (n_ > 0) check(cudaMemcpy(base_ + offset_, v.data(), n_ * sizeof(Bits), cudaMemcpyHostToDevice), "upload");
  }
  void upload(const std::vector<float>& v) {  // values already representable in T
    std::vector<Bits> bits(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) bits[i] = Host<T>::encode(v[i]);
    upload_bits(bits);
  }
  void fill_nan() { upload_bits(std::vector<Bits>(n_, Host<T>::nan())); }
  std::vector<Bits> download_bits() const {
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    std::vector<Bits> v(n_);
    if (n_ > 0) check(cudaMemcpy(v.data(), base_ + offset_, n_ * sizeof(Bits), cudaMemcpyDeviceToHost), "download");
    return v;
  }
  std::vector<float> download() const {
    const std::vector<Bits> bits = download_bits();
    std::vector<float> v(bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i) v[i] = Host<T>::decode(bits[i]);
    return v;
  }

 private:
  Bits* base_ = nullptr;
  std::size_t n_, offset_;
};

// Uniform values in [-1, 1), rounded to T so both sides see the same numbers.
template <class T>
std::vector<float> random_values(std::size_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<float> v = test::uniform_values(gen, n, -1.0f, 1.0f);
  for (float& x : v) x = Host<T>::decode(Host<T>::encode(x));
  return v;
}

std::vector<float> absolute(const std::vector<float>& v) {
  std::vector<float> a(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) a[i] = std::fabs(v[i]);
  return a;
}

struct Tolerance {
  double mag;    // times the magnitude (the same sum over absolute values)
  double value;  // times |want|
};

void expect_close(const std::vector<float>& got, const std::vector<float>& want, const std::vector<float>& mag,
                  Tolerance tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int failures = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double bound = tol.mag * mag[i] + tol.value * std::fabs(want[i]) + 1e-30;
    const double err = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(err <= bound) && ++failures <= 5)
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i] << " (error " << err
                    << " > bound " << bound << ")";
  }
  EXPECT_EQ(failures, 0) << what << ": " << failures << " of " << got.size() << " elements out of tolerance";
}

// out against gelu(pre) computed by the CPU engine from the GPU's own pre-activation.
void expect_gelu(const std::vector<float>& out, const std::vector<float>& pre, double value_tol,
                 const std::string& what) {
  std::vector<float> want(pre.size());
  cpu::gelu_forward(want.data(), pre.data(), static_cast<std::int64_t>(pre.size()));
  std::vector<float> mag = absolute(pre);
  expect_close(out, want, mag, {1e-6, value_tol}, what);
}

enum class Mode { kF32, kTF32, kBF16 };

const char* mode_name(Mode mode) {
  return mode == Mode::kF32 ? "fp32" : mode == Mode::kTF32 ? "fp32+tf32" : "bf16";
}

struct Tolerances {
  Tolerance product;     // out, pre_gelu, din (in T)
  Tolerance accumulate;  // dweight (fp32)
  Tolerance bias;        // dbias (fp32, our own reduction)
  double gelu_value;
};

Tolerances tolerances(Mode mode) {
  switch (mode) {
    case Mode::kF32: return {{1e-5, 0.0}, {1e-5, 0.0}, {1e-5, 0.0}, 1e-6};
    case Mode::kTF32: return {{3e-3, 0.0}, {3e-3, 0.0}, {1e-5, 0.0}, 1e-6};
    case Mode::kBF16: break;
  }
  return {{1e-4, 1.0 / 128}, {1e-4, 0.0}, {1e-5, 0.0}, 1.0 / 128};
}

struct Shape {
  std::int64_t N, IC, OC;
};

// The brief's odd shapes, and one with N > 256 rows so the bias gradient goes through its
// per-chunk partials and the second pass.
const Shape kShapes[] = {{7, 96, 65}, {130, 384, 1152}, {1, 16, 8}, {1000, 72, 130}};

std::string label(Mode mode, Shape s, const char* what) {
  return std::string(mode_name(mode)) + " N=" + std::to_string(s.N) + " IC=" + std::to_string(s.IC) +
         " OC=" + std::to_string(s.OC) + " " + what;
}

template <class T>
void check_forward(Mode mode, Shape s, bool with_bias, bool with_gelu, std::size_t offset = 0) {
  const Tolerances tol = tolerances(mode);
  const std::size_t n_in = s.N * s.IC, n_w = s.OC * s.IC, n_out = s.N * s.OC;
  const std::vector<float> in = random_values<T>(n_in, 1), weight = random_values<T>(n_w, 2),
                           bias = random_values<T>(s.OC, 3);
  const float* bias_ptr = with_bias ? bias.data() : nullptr;
  std::vector<float> want(n_out), mag(n_out);
  cpu::matmul_forward(want.data(), in.data(), weight.data(), bias_ptr, s.N, s.IC, s.OC);
  const std::vector<float> abs_in = absolute(in), abs_w = absolute(weight), abs_b = absolute(bias);
  cpu::matmul_forward(mag.data(), abs_in.data(), abs_w.data(), with_bias ? abs_b.data() : nullptr, s.N, s.IC, s.OC);

  DeviceArray<T> d_in(n_in, offset), d_w(n_w, offset), d_b(s.OC, offset), d_out(n_out, offset),
      d_pre(n_out, offset);
  d_in.upload(in);
  d_w.upload(weight);
  d_b.upload(bias);
  d_out.fill_nan();
  d_pre.fill_nan();
  Matmul matmul(mode == Mode::kTF32);
  matmul.forward<T>(d_out.data(), with_gelu ? d_pre.data() : nullptr, d_in.data(), d_w.data(),
                    with_bias ? d_b.data() : nullptr, s.N, s.IC, s.OC, nullptr);
  const std::string what = label(mode, s, with_bias ? "forward+bias" : "forward");
  if (with_gelu) {
    const std::vector<float> pre = d_pre.download();
    expect_close(pre, want, mag, tol.product, what + " pre_gelu");
    expect_gelu(d_out.download(), pre, tol.gelu_value, what + " gelu out");
  } else {
    expect_close(d_out.download(), want, mag, tol.product, what + " out");
  }
}

template <class T>
void check_backward(Mode mode, Shape s, bool with_din, bool with_dbias, std::size_t offset = 0) {
  const Tolerances tol = tolerances(mode);
  const std::size_t n_in = s.N * s.IC, n_w = s.OC * s.IC, n_out = s.N * s.OC;
  const std::vector<float> in = random_values<T>(n_in, 4), weight = random_values<T>(n_w, 5),
                           dout = random_values<T>(n_out, 6);
  // Non-zero starting gradients: the backward accumulates into them.
  const std::vector<float> dweight0 = random_values<float>(n_w, 7), dbias0 = random_values<float>(s.OC, 8);

  std::vector<float> din_want(n_in, 0.0f), dweight_want = dweight0, dbias_want = dbias0;
  cpu::matmul_backward(din_want.data(), dweight_want.data(), dbias_want.data(), dout.data(), in.data(), weight.data(),
                       s.N, s.IC, s.OC);
  std::vector<float> din_mag(n_in, 0.0f), dweight_mag = absolute(dweight0), dbias_mag = absolute(dbias0);
  const std::vector<float> abs_in = absolute(in), abs_w = absolute(weight), abs_dout = absolute(dout);
  cpu::matmul_backward(din_mag.data(), dweight_mag.data(), dbias_mag.data(), abs_dout.data(), abs_in.data(),
                       abs_w.data(), s.N, s.IC, s.OC);

  DeviceArray<T> d_in(n_in, offset), d_w(n_w, offset), d_dout(n_out, offset), d_din(n_in, offset);
  DeviceArray<float> d_dweight(n_w, offset), d_dbias(s.OC, offset);
  d_in.upload(in);
  d_w.upload(weight);
  d_dout.upload(dout);
  d_din.fill_nan();  // the backward overwrites din
  d_dweight.upload(dweight0);
  d_dbias.upload(dbias0);
  DeviceBytes scratch(Matmul::backward_scratch_bytes(s.N, s.OC));
  Matmul matmul(mode == Mode::kTF32);
  matmul.backward<T>(with_din ? d_din.data() : nullptr, d_dweight.data(), with_dbias ? d_dbias.data() : nullptr,
                     d_dout.data(), d_in.data(), d_w.data(), s.N, s.IC, s.OC, scratch.data(), nullptr);
  const std::string what = label(mode, s, "backward");
  if (with_din) expect_close(d_din.download(), din_want, din_mag, tol.product, what + " din");
  expect_close(d_dweight.download(), dweight_want, dweight_mag, tol.accumulate, what + " dweight");
  if (with_dbias)
    expect_close(d_dbias.download(), dbias_want, dbias_mag, tol.bias, what + " dbias");
  else
    EXPECT_EQ(d_dbias.download(), dbias0) << what << ": dbias changed without being asked for";
}

template <class T>
void check_all(Mode mode) {
  for (const Shape& s : kShapes) {
    check_forward<T>(mode, s, false, false);
    check_forward<T>(mode, s, true, false);
    check_forward<T>(mode, s, true, true);
    check_forward<T>(mode, s, false, true);
    check_backward<T>(mode, s, true, true);
    check_backward<T>(mode, s, false, false);
  }
}

TEST(ModelCudaMatmul, Fp32MatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  check_all<float>(Mode::kF32);
}

TEST(ModelCudaMatmul, Tf32MatchesCpuWithinTf32Precision) {
  NIBBLE_REQUIRE_GPU();
  check_all<float>(Mode::kTF32);
}

TEST(ModelCudaMatmul, Bf16MatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  check_all<bf16>(Mode::kBF16);
}

// Pointers one element past an aligned address: cuBLASLt must be told (alignment preferences),
// the bias goes through the broadcast instead of the epilogue, the GELU through its scalar path.
TEST(ModelCudaMatmul, MisalignedPointers) {
  NIBBLE_REQUIRE_GPU();
  for (const Shape& s : {Shape{7, 96, 65}, Shape{130, 384, 1152}}) {
    check_forward<float>(Mode::kF32, s, true, true, 1);
    check_backward<float>(Mode::kF32, s, true, true, 1);
    check_forward<bf16>(Mode::kBF16, s, true, true, 1);
    check_backward<bf16>(Mode::kBF16, s, true, true, 1);
  }
}

// Forward and backward twice on one Matmul (the cached algorithm) and once on a fresh one (a new
// heuristic query): the same bits every time.
template <class T>
void check_deterministic(Mode mode) {
  const Shape s{1000, 384, 1152};
  const std::size_t n_in = s.N * s.IC, n_w = s.OC * s.IC, n_out = s.N * s.OC;
  DeviceArray<T> d_in(n_in), d_w(n_w), d_b(s.OC), d_dout(n_out), d_out(n_out), d_pre(n_out), d_din(n_in);
  DeviceArray<float> d_dweight(n_w), d_dbias(s.OC);
  d_in.upload(random_values<T>(n_in, 11));
  d_w.upload(random_values<T>(n_w, 12));
  d_b.upload(random_values<T>(s.OC, 13));
  d_dout.upload(random_values<T>(n_out, 14));
  const std::vector<float> dweight0 = random_values<float>(n_w, 15), dbias0 = random_values<float>(s.OC, 16);
  DeviceBytes scratch(Matmul::backward_scratch_bytes(s.N, s.OC));
  ASSERT_GT(Matmul::backward_scratch_bytes(s.N, s.OC), 0u);

  using Bits = typename Host<T>::Bits;
  struct Run {
    std::vector<Bits> out, pre, din;
    std::vector<float> dweight, dbias;
  };
  auto run = [&](Matmul& matmul) {
    d_dweight.upload(dweight0);
    d_dbias.upload(dbias0);
    matmul.forward<T>(d_out.data(), d_pre.data(), d_in.data(), d_w.data(), d_b.data(), s.N, s.IC, s.OC, nullptr);
    matmul.backward<T>(d_din.data(), d_dweight.data(), d_dbias.data(), d_dout.data(), d_in.data(), d_w.data(), s.N,
                       s.IC, s.OC, scratch.data(), nullptr);
    return Run{d_out.download_bits(), d_pre.download_bits(), d_din.download_bits(), d_dweight.download(),
               d_dbias.download()};
  };
  Matmul first(mode == Mode::kTF32), second(mode == Mode::kTF32);
  const Run a = run(first), b = run(first), c = run(second);
  for (const Run* r : {&b, &c}) {
    EXPECT_TRUE(std::memcmp(a.out.data(), r->out.data(), n_out * sizeof(Bits)) == 0) << mode_name(mode) << " out";
    EXPECT_TRUE(std::memcmp(a.pre.data(), r->pre.data(), n_out * sizeof(Bits)) == 0) << mode_name(mode) << " pre";
    EXPECT_TRUE(std::memcmp(a.din.data(), r->din.data(), n_in * sizeof(Bits)) == 0) << mode_name(mode) << " din";
    EXPECT_TRUE(std::memcmp(a.dweight.data(), r->dweight.data(), n_w * sizeof(float)) == 0)
        << mode_name(mode) << " dweight";
    EXPECT_TRUE(std::memcmp(a.dbias.data(), r->dbias.data(), s.OC * sizeof(float)) == 0)
        << mode_name(mode) << " dbias";
  }
}

TEST(ModelCudaMatmul, RepeatsAreBitIdentical) {
  NIBBLE_REQUIRE_GPU();
  check_deterministic<float>(Mode::kF32);
  check_deterministic<float>(Mode::kTF32);
  check_deterministic<bf16>(Mode::kBF16);
}

// N = 0 or OC = 0: nothing to compute, gradients untouched; IC = 0: out is the bias, dbias still
// gets dout's column sums; OC = 0: din is a sum over nothing, zero.
TEST(ModelCudaMatmul, ZeroSizes) {
  NIBBLE_REQUIRE_GPU();
  Matmul matmul(false);
  const std::int64_t N = 5, IC = 6, OC = 7;
  DeviceArray<float> out(N * OC), pre(N * OC), bias(OC), dout(N * OC), din(N * IC), dweight(OC * IC), dbias(OC);
  const std::vector<float> b = random_values<float>(OC, 21), g = random_values<float>(N * OC, 22);
  const std::vector<float> dweight0 = random_values<float>(OC * IC, 23), dbias0 = random_values<float>(OC, 24);
  bias.upload(b);
  dout.upload(g);
  dweight.upload(dweight0);
  dbias.upload(dbias0);

  EXPECT_NO_THROW(matmul.forward<float>(nullptr, nullptr, nullptr, nullptr, nullptr, 0, IC, OC, nullptr));
  EXPECT_NO_THROW(matmul.forward<float>(nullptr, nullptr, nullptr, nullptr, nullptr, N, IC, 0, nullptr));
  EXPECT_NO_THROW(matmul.backward<float>(nullptr, dweight.data(), dbias.data(), nullptr, nullptr, nullptr, 0, IC, OC,
                                         nullptr, nullptr));
  EXPECT_EQ(dweight.download(), dweight0);
  EXPECT_EQ(dbias.download(), dbias0);

  out.fill_nan();
  pre.fill_nan();
  matmul.forward<float>(out.data(), pre.data(), nullptr, nullptr, bias.data(), N, 0, OC, nullptr);
  std::vector<float> want(N * OC);
  for (std::int64_t r = 0; r < N; ++r)
    for (std::int64_t c = 0; c < OC; ++c) want[r * OC + c] = b[c];
  EXPECT_EQ(pre.download(), want);
  expect_gelu(out.download(), want, 1e-6, "IC=0 gelu out");
  out.fill_nan();
  matmul.forward<float>(out.data(), nullptr, nullptr, nullptr, nullptr, N, 0, OC, nullptr);
  EXPECT_EQ(out.download(), std::vector<float>(N * OC, 0.0f));

  DeviceBytes scratch(Matmul::backward_scratch_bytes(N, OC));
  matmul.backward<float>(nullptr, nullptr, dbias.data(), dout.data(), nullptr, nullptr, N, 0, OC, scratch.data(),
                         nullptr);
  std::vector<float> dbias_want = dbias0;
  cpu::matmul_backward(nullptr, nullptr, dbias_want.data(), g.data(), nullptr, nullptr, N, 0, OC);
  expect_close(dbias.download(), dbias_want, absolute(dbias_want), {1e-6, 0.0}, "IC=0 dbias");

  din.fill_nan();
  matmul.backward<float>(din.data(), nullptr, nullptr, nullptr, nullptr, nullptr, N, IC, 0, nullptr, nullptr);
  EXPECT_EQ(din.download(), std::vector<float>(N * IC, 0.0f));
}

TEST(ModelCudaMatmul, RefusesBadArguments) {
  NIBBLE_REQUIRE_GPU();
  Matmul matmul(false);
  const std::int64_t N = 1000, IC = 8, OC = 4;
  DeviceArray<float> in(N * IC), w(OC * IC), b(OC), out(N * OC), pre(N * OC), dout(N * OC), din(N * IC),
      dweight(OC * IC), dbias(OC);
  DeviceBytes scratch(Matmul::backward_scratch_bytes(N, OC));
  ASSERT_GT(Matmul::backward_scratch_bytes(N, OC), 0u);
  const std::vector<float> dweight0 = random_values<float>(OC * IC, 31), dbias0 = random_values<float>(OC, 32);
  dweight.upload(dweight0);
  dbias.upload(dbias0);

  EXPECT_THROW(matmul.forward<float>(out.data(), nullptr, in.data(), w.data(), b.data(), -1, IC, OC, nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.forward<float>(out.data(), nullptr, in.data(), w.data(), b.data(), N, -2, OC, nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.forward<float>(out.data(), nullptr, in.data(), w.data(), b.data(), N, IC, std::int64_t{1} << 40,
                                     nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.forward<float>(nullptr, nullptr, in.data(), w.data(), b.data(), N, IC, OC, nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.forward<float>(out.data(), nullptr, nullptr, w.data(), b.data(), N, IC, OC, nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.forward<float>(out.data(), nullptr, in.data(), nullptr, b.data(), N, IC, OC, nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.forward<float>(out.data(), out.data(), in.data(), w.data(), b.data(), N, IC, OC, nullptr),
               InvalidArgument);

  EXPECT_THROW(matmul.backward<float>(din.data(), dweight.data(), dbias.data(), dout.data(), in.data(), w.data(), N,
                                      -1, OC, scratch.data(), nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.backward<float>(din.data(), dweight.data(), dbias.data(), nullptr, in.data(), w.data(), N, IC,
                                      OC, scratch.data(), nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.backward<float>(din.data(), nullptr, dbias.data(), dout.data(), in.data(), w.data(), N, IC, OC,
                                      scratch.data(), nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.backward<float>(din.data(), dweight.data(), dbias.data(), dout.data(), nullptr, w.data(), N, IC,
                                      OC, scratch.data(), nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.backward<float>(din.data(), dweight.data(), dbias.data(), dout.data(), in.data(), nullptr, N,
                                      IC, OC, scratch.data(), nullptr),
               InvalidArgument);
  EXPECT_THROW(matmul.backward<float>(din.data(), dweight.data(), dbias.data(), dout.data(), in.data(), w.data(), N,
                                      IC, OC, nullptr, nullptr),
               InvalidArgument);
  EXPECT_THROW(Matmul::backward_scratch_bytes(-1, OC), InvalidArgument);

  // Refused before any work: the gradients are untouched and the device is healthy.
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(dweight.download(), dweight0);
  EXPECT_EQ(dbias.download(), dbias0);
}

}  // namespace
}  // namespace nibble::model::cuda
