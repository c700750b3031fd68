// The CUDA optimizer backend against the CPU backend, which is its specification: every algorithm
// x state precision on odd sizes, 16-bit parameters and gradients, master weights, CUDA graph
// capture against eager steps, state saved on one device and loaded on the other, skipped steps,
// SophiaG's Hessian, schedule-free AdamW's train/eval, hyperparameters changed between steps, and a
// tensor above 2^31 elements. Label
// `gpu`: every test skips, saying why, on a machine without a CUDA device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "nibble/device.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "nibble/tensor.hpp"

#include "test_util.hpp"
#include "gpu/cuda_test_util.hpp"

namespace nibble {
namespace {

using test::bf16_bits;
using test::bf16_value;
using test::check;
using test::scratch_dir;
using test::DeviceArray;
using test::tensor_name;

float from_f16(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float f = 0.0f;
  if (exp == 0) f = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31) f = man ? NAN : INFINITY;
  else f = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
}

using Shape = std::vector<std::int64_t>;

// Odd sizes around every block size, a million-element tensor, and 2-D/3-D shapes (Adafactor's
// factored statistics, AdamP's views, rank-1 scales).
std::vector<Shape> odd_shapes() {
  return {{1}, {7}, {127}, {129}, {255}, {257}, {4097}, {1000003}, {33, 65}, {3, 17, 33}, {130, 300}};
}

// The same parameters and gradients on the host (for the CPU optimizer) and on the device.
struct Twin {
  std::vector<Shape> shapes;
  std::vector<std::vector<float>> host_p, host_g;
  std::vector<std::unique_ptr<DeviceArray<float>>> dev_p, dev_g;
  Rng rng{7};

  explicit Twin(std::vector<Shape> s) : shapes(std::move(s)) {
    for (const Shape& shape : shapes) {
      const auto n = static_cast<std::size_t>(shape_numel(shape));
      std::vector<float> p(n);
      for (float& x : p) x = 0.1f * rng.normal();
      host_p.push_back(p);
      host_g.emplace_back(n);
      dev_p.push_back(std::make_unique<DeviceArray<float>>(n));
      dev_g.push_back(std::make_unique<DeviceArray<float>>(n));
      dev_p.back()->upload(p);
    }
  }
  void new_grads() {
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      for (float& x : host_g[i]) x = 0.01f * rng.normal();
      dev_g[i]->upload(host_g[i]);
    }
  }
  ParamGroup host_group() {
    ParamGroup g;
    for (std::size_t i = 0; i < shapes.size(); ++i)
      g.params.push_back({tensor_name(i), shapes[i], host_p[i].data(), host_g[i].data()});
    return g;
  }
  ParamGroup device_group() {
    ParamGroup g;
    for (std::size_t i = 0; i < shapes.size(); ++i)
      g.params.push_back({tensor_name(i), shapes[i], dev_p[i]->data(), dev_g[i]->data()});
    return g;
  }
};

OptimizerOptions options_for(Algorithm algorithm, Precision precision, Device device) {
  OptimizerOptions o;
  o.algorithm = algorithm;
  o.precision = precision;
  o.hyper = default_hyper(algorithm);
  o.hyper->weight_decay = 0.01f;
  if (algorithm == Algorithm::kSgd || algorithm == Algorithm::kQhm) o.hyper->momentum = 0.9f;
  o.min_quant_size = 0;  // quantize even the 1-element tensor: the tails are what is tested
  o.device = device;
  return o;
}

// A non-blocking stream, and one optimizer step captured on it as a CUDA graph; freed at scope exit.
struct CapturedStep {
  cudaStream_t stream = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CapturedStep() { check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"); }
  CapturedStep(const CapturedStep&) = delete;
  CapturedStep& operator=(const CapturedStep&) = delete;
  ~CapturedStep() {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
  // `opt` must queue on `stream` (OptimizerOptions::cuda_stream).
  void capture(Optimizer& opt) {
    check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
    opt.enqueue_step();
    check(cudaStreamEndCapture(stream, &graph), "end capture");
    check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  }
  void replay() {
    check(cudaGraphLaunch(exec, stream), "graph launch");
    check(cudaStreamSynchronize(stream), "sync");
  }
};

// Algorithms whose step has no cross-element reduction in float: the GPU must equal the CPU bit for
// bit (same rules, same codecs, no fma on either side). AdamP and Adafactor sum in double in
// another order, so their per-tensor scalars may differ in the last bits.
bool exact(Algorithm a) { return a != Algorithm::kAdamP && a != Algorithm::kAdafactor; }

struct Mismatch {
  std::int64_t count = 0, total = 0;
  double worst = 0.0;
};

Mismatch compare(const std::vector<float>& gpu, const std::vector<float>& cpu, double atol, double rtol) {
  Mismatch m;
  m.total = static_cast<std::int64_t>(cpu.size());
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double d = std::fabs(static_cast<double>(gpu[i]) - cpu[i]);
    const bool same_bits = std::memcmp(&gpu[i], &cpu[i], 4) == 0;
    if (!same_bits && !(d <= atol + rtol * std::fabs(cpu[i]))) ++m.count;
    if (!same_bits) m.worst = std::max(m.worst, d);
  }
  return m;
}

struct Case {
  Algorithm algorithm;
  Precision precision;
};

class CudaMatchesCpu : public ::testing::TestWithParam<Case> {};

TEST_P(CudaMatchesCpu, ParametersAndStateAfterFiveSteps) {
  NIBBLE_REQUIRE_GPU();
  const auto [algorithm, precision] = GetParam();
  Twin twin(odd_shapes());
  Optimizer cpu({twin.host_group()}, options_for(algorithm, precision, Device::kCpu));
  Optimizer gpu({twin.device_group()}, options_for(algorithm, precision, Device::kCuda));
  const bool bit_exact = exact(algorithm);
  // Reduction algorithms: parameters to 1e-5 relative; quantized state may move a code to its
  // neighbour when a scale differs in the last bit, so up to 1% of state elements may differ.
  const double p_atol = bit_exact ? 0.0 : 1e-6, p_rtol = bit_exact ? 0.0 : 1e-5;
  for (int step = 0; step < 5; ++step) {
    twin.new_grads();
    const StepResult a = cpu.step();
    const StepResult b = gpu.step();
    ASSERT_EQ(a.skipped, b.skipped);
    ASSERT_EQ(a.step, b.step);
    EXPECT_NEAR(a.grad_norm, b.grad_norm, 1e-9 * std::fabs(a.grad_norm)) << "step " << step;
    for (std::size_t i = 0; i < twin.shapes.size(); ++i) {
      const Mismatch m = compare(twin.dev_p[i]->download(), twin.host_p[i], p_atol, p_rtol);
      ASSERT_EQ(m.count, 0) << "tensor " << i << " step " << step << ": " << m.count << " of " << m.total
                            << " parameters differ, worst " << m.worst;
    }
  }
  for (std::size_t i = 0; i < twin.shapes.size(); ++i)
    for (const std::string& name : cpu.state_names(i)) {
      const Mismatch m = compare(gpu.state_values(i, name), cpu.state_values(i, name), bit_exact ? 0.0 : 1e-7,
                                 bit_exact ? 0.0 : 1e-4);
      if (bit_exact || precision == Precision::kFp32)
        EXPECT_EQ(m.count, 0) << "tensor " << i << " state " << name << ": worst " << m.worst;
      else
        EXPECT_LE(m.count, m.total / 100 + 1) << "tensor " << i << " state " << name << ": worst " << m.worst;
    }
  EXPECT_EQ(gpu.state_stats().state_bytes, cpu.state_stats().state_bytes);
}

// Muon runs Newton-Schulz in bf16 on the GPU and in fp32 on the CPU: CudaMuon below.
std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (Algorithm a : all_algorithms())
    for (Precision p : all_precisions())
      if (a != Algorithm::kMuon) cases.push_back({a, p});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(AllAlgorithmsAndPrecisions, CudaMatchesCpu, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string name(algorithm_name(info.param.algorithm));
                           name += "_";
                           name += precision_name(info.param.precision);
                           return name;
                         });

// Muon: its shapes (wide, tall, a 3-D one seen as (3, 561), two matrices of one shape batched
// together, a tall one whose norm takes two partial sums (over 64Ki elements), edges that are not
// multiples of the 32-wide transpose tiles) beside vectors for its AdamW fallback.
std::vector<Shape> muon_shapes() {
  return {{7}, {4097}, {33, 65}, {65, 33}, {3, 17, 33}, {130, 300}, {64, 48}, {64, 48}, {300, 257}};
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// The GPU's Muon against the CPU's: the AdamW fallback tensors and every momentum buffer (which
// depends on the gradients alone) bit for bit; the orthogonalised matrices' parameters within the
// bf16 rounding of the GPU's Newton-Schulz: after 5 steps, max |p_gpu - p_cpu| <= 5% of the
// largest distance the CPU moved a parameter of that matrix (torch.optim.Muon's bf16 iteration
// measured 1.9% of it after 20 steps against nibble's fp32 CPU one, python/tests/test_optim.py).
// One parameter of a GPU Muon against the CPU's: an AdamW fallback vector bit for bit, an
// orthogonalised matrix within 5% of the largest distance the CPU moved one of its elements.
void expect_muon_param_matches(Twin& twin, const std::vector<std::vector<float>>& start, std::size_t i) {
  const std::vector<float> got = twin.dev_p[i]->download();
  if (twin.shapes[i].size() < 2) {
    EXPECT_EQ(compare(got, twin.host_p[i], 0.0, 0.0).count, 0);
    return;
  }
  const double moved = max_abs_diff(twin.host_p[i], start[i]);
  ASSERT_GT(moved, 0.0);
  EXPECT_LE(max_abs_diff(got, twin.host_p[i]), 0.05 * moved) << "moved " << moved;
}

TEST(CudaMuon, MatchesCpuWithinBf16NewtonSchulz) {
  NIBBLE_REQUIRE_GPU();
  for (Precision precision : all_precisions()) {
    SCOPED_TRACE(std::string(precision_name(precision)));
    Twin twin(muon_shapes());
    const std::vector<std::vector<float>> start = twin.host_p;
    OptimizerOptions oc = options_for(Algorithm::kMuon, precision, Device::kCpu);
    oc.hyper->lr = 2e-2f;
    OptimizerOptions og = oc;
    og.device = Device::kCuda;
    Optimizer cpu({twin.host_group()}, oc);
    Optimizer gpu({twin.device_group()}, og);
    for (int step = 0; step < 5; ++step) {
      twin.new_grads();
      cpu.step();
      gpu.step();
    }
    for (std::size_t i = 0; i < twin.shapes.size(); ++i) {
      SCOPED_TRACE("tensor " + std::to_string(i));
      expect_muon_param_matches(twin, start, i);
      for (const std::string& name : cpu.state_names(i))
        EXPECT_EQ(compare(gpu.state_values(i, name), cpu.state_values(i, name), 0.0, 0.0).count, 0) << name;
    }
  }
}

// Matrices of one shape go through one strided-batched GEMM per product; stepped one per
// optimizer (a batch of one) they give the same parameters. cuBLAS may choose another kernel for
// another batch count, whose bf16 results may differ in rounding: within 1% of the distance moved.
TEST(CudaMuon, BatchedEqualsOneByOne) {
  NIBBLE_REQUIRE_GPU();
  const std::vector<Shape> shapes = {{96, 40}, {96, 40}, {96, 40}};
  Twin together(shapes), alone(shapes);  // same seed: same parameters and gradients
  const std::vector<std::vector<float>> start = together.host_p;
  OptimizerOptions o = options_for(Algorithm::kMuon, Precision::kFp32, Device::kCuda);
  Optimizer batched({together.device_group()}, o);
  std::vector<std::unique_ptr<Optimizer>> single;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    ParamGroup g;
    g.params.push_back({tensor_name(i), shapes[i], alone.dev_p[i]->data(), alone.dev_g[i]->data()});
    single.push_back(std::make_unique<Optimizer>(std::vector<ParamGroup>{g}, o));
  }
  for (int step = 0; step < 3; ++step) {
    together.new_grads();
    alone.new_grads();
    batched.step();
    for (auto& opt : single) opt->step();
  }
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const std::vector<float> a = together.dev_p[i]->download(), b = alone.dev_p[i]->download();
    EXPECT_LE(max_abs_diff(a, b), 0.01 * max_abs_diff(a, start[i])) << "tensor " << i;
  }
}

// Muon's step (its Newton-Schulz GEMMs included) captured in a CUDA graph and replayed equals
// eager steps.
TEST(CudaMuon, GraphReplayEqualsEagerSteps) {
  NIBBLE_REQUIRE_GPU();
  Twin eager_twin(muon_shapes()), graph_twin(muon_shapes());
  CapturedStep cap;
  OptimizerOptions oe = options_for(Algorithm::kMuon, Precision::kInt8, Device::kCuda);
  OptimizerOptions og = oe;
  og.cuda_stream = cap.stream;
  Optimizer eager({eager_twin.device_group()}, oe);
  Optimizer captured({graph_twin.device_group()}, og);
  cap.capture(captured);
  for (int step = 0; step < 4; ++step) {
    eager_twin.new_grads();
    graph_twin.new_grads();
    eager.step();
    cap.replay();
  }
  for (std::size_t i = 0; i < eager_twin.shapes.size(); ++i)
    EXPECT_EQ(compare(graph_twin.dev_p[i]->download(), eager_twin.dev_p[i]->download(), 0.0, 0.0).count, 0)
        << "tensor " << i;
}

// set_hyper between steps on the GPU equals it on the CPU: new betas, lr and weight decay reach
// the step configuration and the tensor table (bit for bit for algorithms without reductions);
// Muon's new shape factor and fallback lr reach its matrices (within its bf16 tolerance above).
TEST(CudaMatchesCpu, HyperparametersChangedBetweenSteps) {
  NIBBLE_REQUIRE_GPU();
  const std::vector<Case> cases = {{Algorithm::kAdamW, Precision::kInt8}, {Algorithm::kLion, Precision::kFp32},
                                   {Algorithm::kAdEMAMix, Precision::kFp8}, {Algorithm::kSgd, Precision::kBf16},
                                   {Algorithm::kMuon, Precision::kFp32}};
  for (const auto& [algorithm, precision] : cases) {
    SCOPED_TRACE(std::string(algorithm_name(algorithm)) + "/" + std::string(precision_name(precision)));
    const bool muon = algorithm == Algorithm::kMuon;
    Twin twin(muon ? muon_shapes() : odd_shapes());
    Optimizer cpu({twin.host_group()}, options_for(algorithm, precision, Device::kCpu));
    Optimizer gpu({twin.device_group()}, options_for(algorithm, precision, Device::kCuda));
    const std::vector<std::vector<float>> start = twin.host_p;
    for (int step = 0; step < 5; ++step) {
      if (step == 2) {
        Hyper h = cpu.hyper();
        h.lr *= 0.5f;
        h.weight_decay = 0.05f;
        h.beta1 = 0.8f;
        h.momentum = 0.7f;
        h.adjust_lr = 1.0f;  // Muon: match_rms_adamw
        h.adamw_lr = 1e-3f;
        cpu.set_hyper(h);
        gpu.set_hyper(h);
      }
      twin.new_grads();
      cpu.step();
      gpu.step();
    }
    for (std::size_t i = 0; i < twin.shapes.size(); ++i) {
      SCOPED_TRACE("tensor " + std::to_string(i));
      if (muon)
        expect_muon_param_matches(twin, start, i);
      else
        EXPECT_EQ(compare(twin.dev_p[i]->download(), twin.host_p[i], 0.0, 0.0).count, 0);
    }
  }
}

// Options that change the kernels' paths: AMSGrad (a third slot), Adafactor's first moment,
// rank-1 4-bit second moments, bf16 stochastic rounding, block 64 and 4096, clipping.
TEST(CudaMatchesCpu, KernelOptions) {
  NIBBLE_REQUIRE_GPU();
  struct Variant {
    const char* name;
    Algorithm algorithm;
    Precision precision;
    void (*edit)(OptimizerOptions&);
  };
  const Variant variants[] = {
      {"amsgrad 8bit", Algorithm::kAdamW, Precision::kInt8, [](OptimizerOptions& o) { o.hyper->amsgrad = true; }},
      {"adafactor first moment", Algorithm::kAdafactor, Precision::kInt8,
       [](OptimizerOptions& o) { o.hyper->first_moment = true; }},
      {"rank1 4bit", Algorithm::kAdamW, Precision::kInt4, [](OptimizerOptions& o) { o.rank1_second_moment = true; }},
      {"stochastic bf16", Algorithm::kAdamW, Precision::kBf16,
       [](OptimizerOptions& o) { o.stochastic_rounding = true; o.seed = 99; }},
      {"block 64", Algorithm::kLion, Precision::kInt8, [](OptimizerOptions& o) { o.block_size = 64; }},
      {"block 4096", Algorithm::kAdamW, Precision::kInt8, [](OptimizerOptions& o) { o.block_size = 4096; }},
      {"block 16 4bit", Algorithm::kSgd, Precision::kInt4, [](OptimizerOptions& o) { o.block_size = 16; }},
      {"nesterov maximize", Algorithm::kSgd, Precision::kFp32,
       [](OptimizerOptions& o) { o.hyper->nesterov = true; o.hyper->maximize = true; }},
      {"amsgrad fp8", Algorithm::kAdamW, Precision::kFp8, [](OptimizerOptions& o) { o.hyper->amsgrad = true; }},
      {"block 16 fp8", Algorithm::kLion, Precision::kFp8, [](OptimizerOptions& o) { o.block_size = 16; }},
      {"block 4096 fp8", Algorithm::kAdamW, Precision::kFp8, [](OptimizerOptions& o) { o.block_size = 4096; }},
  };
  for (const Variant& v : variants) {
    SCOPED_TRACE(v.name);
    Twin twin(odd_shapes());
    OptimizerOptions oc = options_for(v.algorithm, v.precision, Device::kCpu);
    v.edit(oc);
    OptimizerOptions og = oc;
    og.device = Device::kCuda;
    Optimizer cpu({twin.host_group()}, oc);
    Optimizer gpu({twin.device_group()}, og);
    const bool bit_exact = exact(v.algorithm);
    for (int step = 0; step < 4; ++step) {
      twin.new_grads();
      cpu.step();
      gpu.step();
    }
    for (std::size_t i = 0; i < twin.shapes.size(); ++i) {
      const Mismatch m = compare(twin.dev_p[i]->download(), twin.host_p[i], bit_exact ? 0.0 : 1e-6, bit_exact ? 0.0 : 1e-5);
      EXPECT_EQ(m.count, 0) << "tensor " << i << ": worst " << m.worst;
    }
  }
}

// AdamW fp32 clipping at a global norm of 0.05 (Twin's gradients exceed it), on the CPU and on CUDA.
struct ClippingOptions {
  OptimizerOptions cpu, gpu;
};
ClippingOptions clipping_options() {
  ClippingOptions o{options_for(Algorithm::kAdamW, Precision::kFp32, Device::kCpu), {}};
  o.cpu.max_grad_norm = 0.05f;
  o.gpu = o.cpu;
  o.gpu.device = Device::kCuda;
  return o;
}

// Global-norm clipping: the norm is summed in another order on the GPU, so the clip coefficient
// (and everything after it) agrees to float rounding, not bit for bit.
TEST(CudaMatchesCpu, GlobalNormClipping) {
  NIBBLE_REQUIRE_GPU();
  Twin twin(odd_shapes());
  const ClippingOptions o = clipping_options();
  Optimizer cpu({twin.host_group()}, o.cpu);
  Optimizer gpu({twin.device_group()}, o.gpu);
  for (int step = 0; step < 3; ++step) {
    twin.new_grads();
    const double na = cpu.step().grad_norm, nb = gpu.step().grad_norm;
    EXPECT_NEAR(na, nb, 1e-9 * na);
    ASSERT_GT(na, 0.05) << "the test means clipping to be active";
  }
  for (std::size_t i = 0; i < twin.shapes.size(); ++i)
    EXPECT_EQ(compare(twin.dev_p[i]->download(), twin.host_p[i], 1e-7, 1e-5).count, 0) << "tensor " << i;
}

// bf16 and fp16 parameters with bf16 gradients: the CPU steps fp32 copies that are re-set to the
// GPU's rounded parameters after every step (as PyTorch's optimizer tests resync), so each step
// is compared on its own: the GPU's 16-bit parameter must be the rounding of the CPU's result.
TEST(CudaParamDtypes, Bf16AndF16ParametersWithBf16Gradients) {
  NIBBLE_REQUIRE_GPU();
  for (DType dtype : {DType::BF16, DType::F16}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    const std::vector<Shape> shapes = {{7}, {4097}, {33, 65}};
    Rng rng(3);
    std::vector<std::vector<float>> hp, hg;
    std::vector<std::unique_ptr<DeviceArray<std::uint16_t>>> dp, dg;
    ParamGroup host, dev;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const auto n = static_cast<std::size_t>(shape_numel(shapes[i]));
      std::vector<std::uint16_t> bits(n);
      std::vector<float> p(n);
      for (std::size_t e = 0; e < n; ++e) {
        bits[e] = bf16_bits(0.1f * rng.normal());
        p[e] = bf16_value(bits[e]);
        if (dtype == DType::F16) {  // a value exactly representable in both formats
          p[e] = std::ldexp(std::round(std::ldexp(p[e], 10)), -10);
          bits[e] = 0;
        }
      }
      hp.push_back(p);
      hg.emplace_back(n);
      dp.push_back(std::make_unique<DeviceArray<std::uint16_t>>(n));
      dg.push_back(std::make_unique<DeviceArray<std::uint16_t>>(n));
      if (dtype == DType::BF16) {
        dp.back()->upload(bits);
      } else {
        // fp16 bits of the host values: they are multiples of 2^-10 below 1, exact in fp16.
        std::vector<std::uint16_t> h(n);
        for (std::size_t e = 0; e < n; ++e) {
          const float v = p[e];
          int exp = 0;
          const float m = std::frexp(std::fabs(v), &exp);  // v = m * 2^exp, m in [0.5, 1)
          std::uint16_t out = v < 0 ? 0x8000u : 0u;
          if (v != 0.0f) {
            if (exp - 1 >= -14) out |= static_cast<std::uint16_t>(((exp - 1 + 15) << 10) | (static_cast<int>(std::ldexp(m, 11)) & 0x3ff));
            else out |= static_cast<std::uint16_t>(std::ldexp(std::fabs(v), 24));
          }
          h[e] = out;
          EXPECT_EQ(from_f16(out), v) << "test set-up: fp16 encoding of " << v;
        }
        dp.back()->upload(h);
      }
      host.params.push_back({tensor_name(i), shapes[i], hp[i].data(), hg[i].data()});
      Param param{tensor_name(i), shapes[i], dp[i]->data(), dg[i]->data()};
      param.dtype = dtype;
      param.grad_dtype = DType::BF16;
      dev.params.push_back(param);
    }
    Optimizer cpu({host}, options_for(Algorithm::kAdamW, Precision::kInt8, Device::kCpu));
    Optimizer gpu({dev}, options_for(Algorithm::kAdamW, Precision::kInt8, Device::kCuda));
    for (int step = 0; step < 4; ++step) {
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        std::vector<std::uint16_t> gbits(hg[i].size());
        for (std::size_t e = 0; e < gbits.size(); ++e) {
          gbits[e] = bf16_bits(0.01f * rng.normal());
          hg[i][e] = bf16_value(gbits[e]);
        }
        dg[i]->upload(gbits);
      }
      cpu.step();
      gpu.step();
      for (std::size_t i = 0; i < shapes.size(); ++i) {
        const std::vector<std::uint16_t> got = dp[i]->download();
        std::int64_t bad = 0;
        for (std::size_t e = 0; e < got.size(); ++e) {
          const float gpu_value = dtype == DType::BF16 ? bf16_value(got[e]) : from_f16(got[e]);
          // The GPU rounded the same fp32 result: within half an ulp of the 16-bit format.
          const float ulp = dtype == DType::BF16 ? std::ldexp(1.0f, std::ilogb(hp[i][e]) - 7)
                                                 : std::ldexp(1.0f, std::max(std::ilogb(hp[i][e]), -14) - 10);
          if (!(std::fabs(gpu_value - hp[i][e]) <= 0.5f * ulp)) ++bad;
          hp[i][e] = gpu_value;  // resync
        }
        EXPECT_EQ(bad, 0) << "tensor " << i << " step " << step;
      }
    }
  }
}

// Master weights: the fp32 copy steps exactly as the CPU's fp32 parameters, and the bf16
// parameter is its round-to-nearest-even.
TEST(CudaParamDtypes, MasterWeightsStepLikeFp32) {
  NIBBLE_REQUIRE_GPU();
  const std::vector<Shape> shapes = {{129}, {1000003}, {64, 300}};
  Rng rng(5);
  std::vector<std::vector<float>> hp, hg;
  std::vector<std::unique_ptr<DeviceArray<std::uint16_t>>> dp;
  std::vector<std::unique_ptr<DeviceArray<float>>> dg;
  ParamGroup host, dev;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const auto n = static_cast<std::size_t>(shape_numel(shapes[i]));
    std::vector<std::uint16_t> bits(n);
    std::vector<float> p(n);
    for (std::size_t e = 0; e < n; ++e) {
      bits[e] = bf16_bits(0.1f * rng.normal());
      p[e] = bf16_value(bits[e]);
    }
    hp.push_back(p);
    hg.emplace_back(n);
    dp.push_back(std::make_unique<DeviceArray<std::uint16_t>>(n));
    dg.push_back(std::make_unique<DeviceArray<float>>(n));
    dp.back()->upload(bits);
    host.params.push_back({tensor_name(i), shapes[i], hp[i].data(), hg[i].data()});
    Param param{tensor_name(i), shapes[i], dp[i]->data(), dg[i]->data()};
    param.dtype = DType::BF16;
    dev.params.push_back(param);
  }
  OptimizerOptions og = options_for(Algorithm::kLion, Precision::kFp32, Device::kCuda);
  og.master_weights = true;
  Optimizer cpu({host}, options_for(Algorithm::kLion, Precision::kFp32, Device::kCpu));
  Optimizer gpu({dev}, og);
  for (int step = 0; step < 5; ++step) {
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      for (float& x : hg[i]) x = 0.01f * rng.normal();
      dg[i]->upload(hg[i]);
    }
    cpu.step();
    gpu.step();
  }
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const std::vector<float> master = gpu.state_values(i, "master");
    EXPECT_EQ(compare(master, hp[i], 0.0, 0.0).count, 0) << "tensor " << i;
    const std::vector<std::uint16_t> bits = dp[i]->download();
    for (std::size_t e = 0; e < bits.size(); ++e) ASSERT_EQ(bits[e], bf16_bits(master[e])) << "tensor " << i << " element " << e;
  }
}

// A step captured in a CUDA graph and replayed, with the schedule's lr written to device memory
// before each replay, equals eager steps with the same lr.
TEST(CudaGraph, ReplayEqualsEagerSteps) {
  NIBBLE_REQUIRE_GPU();
  for (Precision precision : {Precision::kFp32, Precision::kInt8, Precision::kInt4, Precision::kFp8}) {
    SCOPED_TRACE(std::string(precision_name(precision)));
    Twin eager_twin(odd_shapes());
    Twin graph_twin(odd_shapes());  // same seed: same parameters and gradients
    CapturedStep cap;
    cudaStream_t stream = cap.stream;
    OptimizerOptions oe = options_for(Algorithm::kAdamW, precision, Device::kCuda);
    OptimizerOptions og = oe;
    og.cuda_stream = stream;
    Optimizer eager({eager_twin.device_group()}, oe);
    Optimizer captured({graph_twin.device_group()}, og);
    const DeviceScalars s = captured.device_scalars();
    cap.capture(captured);
    for (int step = 0; step < 6; ++step) {
      eager_twin.new_grads();
      graph_twin.new_grads();
      const float lr_scale = 1.0f - 0.1f * static_cast<float>(step);
      const float grad_scale = step == 3 ? 1024.0f : 1.0f;
      eager.step({.grad_scale = grad_scale, .lr_scale = lr_scale});
      const int no_inf = 0;
      check(cudaMemcpyAsync(s.lr_scale, &lr_scale, sizeof lr_scale, cudaMemcpyHostToDevice, stream), "lr");
      check(cudaMemcpyAsync(s.grad_scale, &grad_scale, sizeof grad_scale, cudaMemcpyHostToDevice, stream), "scale");
      check(cudaMemcpyAsync(s.found_inf, &no_inf, sizeof no_inf, cudaMemcpyHostToDevice, stream), "found_inf");
      cap.replay();
    }
    for (std::size_t i = 0; i < eager_twin.shapes.size(); ++i)
      EXPECT_EQ(compare(graph_twin.dev_p[i]->download(), eager_twin.dev_p[i]->download(), 0.0, 0.0).count, 0)
          << "tensor " << i;
    EXPECT_EQ(captured.step_count(), 6);
  }
}

// found_inf set on the device, and an inf in a gradient, each skip the step: nothing changes and
// the skipped count advances.
TEST(CudaSkip, NonFiniteGradientsAndFoundInfLeaveEverythingUnchanged) {
  NIBBLE_REQUIRE_GPU();
  Twin twin({{4097}, {33, 65}});
  Optimizer gpu({twin.device_group()}, options_for(Algorithm::kAdamW, Precision::kInt8, Device::kCuda));
  twin.new_grads();
  gpu.step();
  const std::vector<float> before = twin.dev_p[0]->download();
  const std::vector<float> m_before = gpu.state_values(0, "exp_avg");
  twin.host_g[1][5] = INFINITY;
  twin.dev_g[1]->upload(twin.host_g[1]);
  const StepResult r = gpu.step();
  EXPECT_TRUE(r.skipped);
  EXPECT_FALSE(std::isfinite(r.grad_norm));
  EXPECT_EQ(r.step, 1);
  EXPECT_EQ(gpu.skipped_steps(), 1);
  EXPECT_EQ(compare(twin.dev_p[0]->download(), before, 0.0, 0.0).count, 0);
  EXPECT_EQ(compare(gpu.state_values(0, "exp_avg"), m_before, 0.0, 0.0).count, 0);
  // found_inf from an AMP scaler: written on the device, read by enqueue_step().
  twin.new_grads();
  const DeviceScalars s = gpu.device_scalars();
  const int one = 1;
  check(cudaMemcpy(s.found_inf, &one, sizeof one, cudaMemcpyHostToDevice), "found_inf");
  gpu.enqueue_step();
  gpu.synchronize();
  EXPECT_EQ(gpu.skipped_steps(), 2);
  EXPECT_EQ(gpu.step_count(), 1);
  EXPECT_EQ(compare(twin.dev_p[0]->download(), before, 0.0, 0.0).count, 0);
  // No norm is computed for a step found_inf skips, as on the CPU (its grad_norm is NaN there).
  double norm = 0.0;
  check(cudaMemcpy(&norm, s.grad_norm, sizeof norm, cudaMemcpyDeviceToHost), "grad_norm");
  EXPECT_TRUE(std::isnan(norm)) << norm;
}

// State saved from the GPU loads into a CPU optimizer and the two continue identically; and the
// reverse.
TEST(CudaState, SaveOnOneDeviceLoadOnTheOther) {
  NIBBLE_REQUIRE_GPU();
  const auto dir = scratch_dir("nibble_cuda_state_test");
  std::filesystem::create_directories(dir);
  for (Precision precision : {Precision::kFp32, Precision::kBf16, Precision::kInt8, Precision::kInt4, Precision::kFp8}) {
    SCOPED_TRACE(std::string(precision_name(precision)));
    Twin a(odd_shapes());
    Twin b(odd_shapes());
    Optimizer gpu({a.device_group()}, options_for(Algorithm::kAdamW, precision, Device::kCuda));
    for (int step = 0; step < 3; ++step) {
      a.new_grads();
      gpu.step();
    }
    gpu.save(dir / "gpu.safetensors");
    Optimizer cpu({b.host_group()}, options_for(Algorithm::kAdamW, precision, Device::kCpu));
    cpu.load(dir / "gpu.safetensors");
    for (std::size_t i = 0; i < a.shapes.size(); ++i) b.host_p[i] = a.dev_p[i]->download();
    EXPECT_EQ(cpu.step_count(), 3);
    for (int step = 0; step < 2; ++step) {
      a.new_grads();
      for (std::size_t i = 0; i < a.shapes.size(); ++i) b.host_g[i] = a.host_g[i];
      gpu.step();
      cpu.step();
    }
    for (std::size_t i = 0; i < a.shapes.size(); ++i)
      EXPECT_EQ(compare(a.dev_p[i]->download(), b.host_p[i], 0.0, 0.0).count, 0) << "tensor " << i;
    // CPU -> GPU: a fresh GPU optimizer loads the CPU's state and matches the CPU's next step.
    cpu.save(dir / "cpu.safetensors");
    Twin c(odd_shapes());
    Optimizer gpu2({c.device_group()}, options_for(Algorithm::kAdamW, precision, Device::kCuda));
    gpu2.load(dir / "cpu.safetensors");
    for (std::size_t i = 0; i < c.shapes.size(); ++i) c.dev_p[i]->upload(b.host_p[i]);
    a.new_grads();
    for (std::size_t i = 0; i < c.shapes.size(); ++i) {
      b.host_g[i] = a.host_g[i];
      c.dev_g[i]->upload(a.host_g[i]);
    }
    cpu.step();
    gpu2.step();
    EXPECT_EQ(gpu2.step_count(), 6);
    for (std::size_t i = 0; i < c.shapes.size(); ++i)
      EXPECT_EQ(compare(c.dev_p[i]->download(), b.host_p[i], 0.0, 0.0).count, 0) << "tensor " << i;
  }
  std::filesystem::remove_all(dir);
}

// Schedule-free AdamW: lr_max and weight_sum advance on the device as on the host, eval() and
// train() move the parameters as the CPU does (bit for bit), and a state saved on the GPU (in eval
// mode, its running sums included) continues on the CPU exactly.
TEST(CudaScheduleFree, TrainEvalAndStateMatchCpu) {
  NIBBLE_REQUIRE_GPU();
  const auto dir = scratch_dir("nibble_cuda_sf_test");
  std::filesystem::create_directories(dir);
  for (Precision precision : {Precision::kFp32, Precision::kInt8}) {
    SCOPED_TRACE(std::string(precision_name(precision)));
    Twin twin(odd_shapes());
    OptimizerOptions co = options_for(Algorithm::kAdamWScheduleFree, precision, Device::kCpu);
    co.hyper->warmup_steps = 3.0f;
    OptimizerOptions go = co;
    go.device = Device::kCuda;
    Optimizer cpu({twin.host_group()}, co);
    Optimizer gpu({twin.device_group()}, go);
    auto expect_same = [&](const char* when) {
      for (std::size_t i = 0; i < twin.shapes.size(); ++i)
        EXPECT_EQ(compare(twin.dev_p[i]->download(), twin.host_p[i], 0.0, 0.0).count, 0) << when << " tensor " << i;
    };
    for (int step = 0; step < 6; ++step) {
      twin.new_grads();
      cpu.step();
      gpu.step();
      if (step == 2) {
        cpu.eval();
        gpu.eval();
        expect_same("eval");
        cpu.train();
        gpu.train();
        expect_same("train");
      }
    }
    expect_same("after six steps");
    gpu.eval();
    EXPECT_THROW(gpu.step(), InvalidArgument);
    gpu.save(dir / "sf.safetensors");
    Twin other(odd_shapes());
    Optimizer cpu2({other.host_group()}, co);
    cpu2.load(dir / "sf.safetensors");
    EXPECT_FALSE(cpu2.training());
    for (std::size_t i = 0; i < twin.shapes.size(); ++i) other.host_p[i] = twin.dev_p[i]->download();
    gpu.train();
    cpu2.train();
    twin.new_grads();
    for (std::size_t i = 0; i < twin.shapes.size(); ++i) other.host_g[i] = twin.host_g[i];
    gpu.step();
    cpu2.step();
    for (std::size_t i = 0; i < twin.shapes.size(); ++i)
      EXPECT_EQ(compare(twin.dev_p[i]->download(), other.host_p[i], 0.0, 0.0).count, 0) << "resumed tensor " << i;
  }
  std::filesystem::remove_all(dir);
}

TEST(CudaSophia, HessianUpdateMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  for (Precision precision : {Precision::kFp32, Precision::kInt8, Precision::kFp8}) {
    Twin twin(odd_shapes());
    Optimizer cpu({twin.host_group()}, options_for(Algorithm::kSophiaG, precision, Device::kCpu));
    Optimizer gpu({twin.device_group()}, options_for(Algorithm::kSophiaG, precision, Device::kCuda));
    std::vector<std::unique_ptr<DeviceArray<float>>> dev_h;
    std::vector<const float*> host_ptrs, dev_ptrs;
    for (std::size_t i = 0; i < twin.shapes.size(); ++i) dev_h.push_back(std::make_unique<DeviceArray<float>>(twin.host_p[i].size()));
    for (int step = 0; step < 3; ++step) {
      twin.new_grads();
      cpu.step();
      gpu.step();
      host_ptrs.clear();
      dev_ptrs.clear();
      for (std::size_t i = 0; i < twin.shapes.size(); ++i) {
        dev_h[i]->upload(twin.host_g[i]);  // any estimates will do: the gradients
        host_ptrs.push_back(twin.host_g[i].data());
        dev_ptrs.push_back(dev_h[i]->data());
      }
      cpu.update_hessian(host_ptrs);
      gpu.update_hessian(dev_ptrs);
    }
    for (std::size_t i = 0; i < twin.shapes.size(); ++i) {
      EXPECT_EQ(compare(gpu.state_values(i, "hessian"), cpu.state_values(i, "hessian"), 0.0, 0.0).count, 0);
      EXPECT_EQ(compare(twin.dev_p[i]->download(), twin.host_p[i], 0.0, 0.0).count, 0);
    }
    // A non-finite estimate is refused before anything changes.
    std::vector<float> bad = twin.host_g[0];
    bad[0] = NAN;
    dev_h[0]->upload(bad);
    const std::vector<float> h_before = gpu.state_values(0, "hessian");
    EXPECT_THROW(gpu.update_hessian(dev_ptrs), InvalidArgument);
    EXPECT_EQ(compare(gpu.state_values(0, "hessian"), h_before, 0.0, 0.0).count, 0);
  }
}

// Host memory handed to a CUDA optimizer is refused by name.
TEST(CudaErrors, HostPointersAreRefused) {
  NIBBLE_REQUIRE_GPU();
  std::vector<float> p(10), g(10);
  ParamGroup group;
  group.params.push_back({"w", {10}, p.data(), g.data()});
  try {
    Optimizer opt({group}, options_for(Algorithm::kAdamW, Precision::kFp32, Device::kCuda));
    FAIL() << "a host pointer was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'w'"), std::string::npos) << e.what();
  }
}

// One tensor of 2^31 + 5 elements (int64 indexing everywhere): elements on both sides of 2^31
// step exactly as the same values stepped by the CPU in a small tensor.
TEST(CudaLarge, TensorAbove2To31Elements) {
  NIBBLE_REQUIRE_GPU();
  const std::int64_t n = (std::int64_t{1} << 31) + 5;
  std::size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  const std::size_t need = static_cast<std::size_t>(n) * 4 * 4 + (std::size_t{1} << 30);  // p, g, m, v
  if (free < need) GTEST_SKIP() << "needs " << need << " bytes of GPU memory, " << free << " free";
  constexpr std::int64_t kPattern = 1 << 20;
  Rng rng(11);
  std::vector<float> pp(kPattern), gp(kPattern);
  for (float& x : pp) x = 0.1f * rng.normal();
  for (float& x : gp) x = 0.01f * rng.normal();
  DeviceArray<float> p(static_cast<std::size_t>(n)), g(static_cast<std::size_t>(n));
  for (std::int64_t off = 0; off < n; off += kPattern) {
    const std::int64_t len = std::min(kPattern, n - off);
    check(cudaMemcpy(p.data() + off, pp.data(), len * 4, cudaMemcpyHostToDevice), "fill p");
    check(cudaMemcpy(g.data() + off, gp.data(), len * 4, cudaMemcpyHostToDevice), "fill g");
  }
  ParamGroup group;
  group.params.push_back({"huge", {n}, p.data(), g.data()});
  Optimizer gpu({group}, options_for(Algorithm::kAdamW, Precision::kFp32, Device::kCuda));
  gpu.step();
  gpu.step();
  // The CPU reference: the pattern itself, stepped twice.
  std::vector<float> cp = pp, cg = gp;
  ParamGroup host;
  host.params.push_back({"huge", {kPattern}, cp.data(), cg.data()});
  Optimizer cpu({host}, options_for(Algorithm::kAdamW, Precision::kFp32, Device::kCpu));
  cpu.step();
  cpu.step();
  for (std::int64_t e : {std::int64_t{0}, (std::int64_t{1} << 31) - 1, std::int64_t{1} << 31, n - 1}) {
    float got = 0.0f;
    check(cudaMemcpy(&got, p.data() + e, 4, cudaMemcpyDeviceToHost), "read back");
    EXPECT_EQ(got, cp[static_cast<std::size_t>(e % kPattern)]) << "element " << e;
  }
}

// Sharded training on CUDA without host round trips: the square sum queued into device memory
// equals the CPU's (all tensors, and with counted flags); a step that reads its own sum equals a
// plain step bit for bit (same sum, same order); one that reads 4x its sum, with clipping on,
// clips as the CPU does given that sum; an inf sum (another rank's gradient was not finite) skips
// it with nothing changed.
TEST(CudaSharded, DeviceSquareSumAndTheStepThatReadsIt) {
  NIBBLE_REQUIRE_GPU();
  Twin twin(odd_shapes());
  Twin plain_twin(odd_shapes());  // same seed: same parameters and gradients
  const ClippingOptions o = clipping_options();
  Optimizer cpu({twin.host_group()}, o.cpu);
  Optimizer gpu({twin.device_group()}, o.gpu);
  Optimizer plain({plain_twin.device_group()}, o.gpu);
  DeviceArray<double> sum(1), given(1);

  twin.new_grads();
  plain_twin.new_grads();
  gpu.enqueue_grad_square_sum({}, sum.data());
  gpu.synchronize();
  const double all = cpu.grad_square_sum();
  EXPECT_NEAR(sum.download()[0], all, 1e-12 * all);
  std::vector<std::uint8_t> counted(twin.shapes.size(), 1);
  counted[7] = 0;  // the million-element tensor
  gpu.enqueue_grad_square_sum(counted, sum.data());
  gpu.synchronize();
  const double part = cpu.grad_square_sum(counted);
  EXPECT_NEAR(sum.download()[0], part, 1e-12 * all);
  EXPECT_LT(part, 0.5 * all) << "the flag left out most of the sum";

  // Step 1: its own sum, against a plain step.
  gpu.enqueue_grad_square_sum({}, sum.data());
  gpu.enqueue_step_with_square_sum(sum.data());
  gpu.synchronize();
  plain.step();
  cpu.step();
  for (std::size_t i = 0; i < twin.shapes.size(); ++i)
    EXPECT_EQ(compare(twin.dev_p[i]->download(), plain_twin.dev_p[i]->download(), 0.0, 0.0).count, 0)
        << "tensor " << i;

  // Step 2: 4x its sum, as if three more ranks held as much; the CPU is given the same.
  twin.new_grads();
  plain_twin.new_grads();
  const double cpu_sum = cpu.grad_square_sum();
  StepOptions so;
  so.grad_square_sum = 4.0 * cpu_sum;
  const double cpu_norm = cpu.step(so).grad_norm;
  given.upload({4.0 * cpu_sum});
  gpu.enqueue_step_with_square_sum(given.data());
  gpu.synchronize();
  plain.step();
  double gpu_norm = 0.0;
  check(cudaMemcpy(&gpu_norm, gpu.device_scalars().grad_norm, sizeof gpu_norm, cudaMemcpyDeviceToHost), "norm");
  EXPECT_NEAR(gpu_norm, cpu_norm, 1e-12 * cpu_norm);
  EXPECT_NEAR(gpu_norm, 2.0 * std::sqrt(cpu_sum), 1e-9 * gpu_norm);
  Mismatch moved;
  for (std::size_t i = 0; i < twin.shapes.size(); ++i) {
    EXPECT_EQ(compare(twin.dev_p[i]->download(), twin.host_p[i], 1e-7, 1e-5).count, 0) << "tensor " << i;
    moved.count += compare(twin.dev_p[i]->download(), plain_twin.dev_p[i]->download(), 0.0, 0.0).count;
  }
  EXPECT_GT(moved.count, 0) << "the given sum clipped harder than the own one";

  // Step 3: an inf sum skips the step.
  twin.new_grads();
  const std::vector<float> before = twin.dev_p[0]->download();
  given.upload({INFINITY});
  gpu.enqueue_step_with_square_sum(given.data());
  gpu.synchronize();
  EXPECT_EQ(gpu.skipped_steps(), 1);
  EXPECT_EQ(gpu.step_count(), 2);
  EXPECT_EQ(compare(twin.dev_p[0]->download(), before, 0.0, 0.0).count, 0);

  // Bad input: host memory, a wrong flag count.
  double host = 0.0;
  EXPECT_THROW(gpu.enqueue_grad_square_sum({}, &host), InvalidArgument);
  EXPECT_THROW(gpu.enqueue_step_with_square_sum(&host), InvalidArgument);
  const std::vector<std::uint8_t> short_flags(2, 1);
  EXPECT_THROW(gpu.enqueue_grad_square_sum(short_flags, sum.data()), InvalidArgument);
}

}  // namespace
}  // namespace nibble
