// Thread-count independence of the reductions inside a step: AdamP's projection (per-row and
// whole-tensor views), Adafactor's row/column statistics and Muon's Newton-Schulz products must
// give bit-identical parameters with 1, 2 and 3 threads, since every partial sum has a fixed order
// and every product a fixed split.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "nibble/tensor.hpp"

#include "test_util.hpp"

namespace nibble {
namespace {
using test::tensor_name;

using Shape = std::vector<std::int64_t>;

enum class Orthogonal { kNone, kPerRow, kWholeTensor };

// Gradients with the component along p removed per row (AdamP's channel view) or over the whole
// tensor (its layer view), so that the projection is taken; plain random ones otherwise.
void fill_grads(const std::vector<float>& p, std::vector<float>& g, std::int64_t row_len, Orthogonal mode,
                Rng& rng) {
  for (float& x : g) x = rng.normal();
  if (mode == Orthogonal::kNone) return;
  const std::int64_t len = mode == Orthogonal::kPerRow ? row_len : static_cast<std::int64_t>(p.size());
  for (std::size_t r0 = 0; r0 < p.size(); r0 += static_cast<std::size_t>(len)) {
    double gp = 0, pp = 0;
    for (std::size_t e = r0; e < r0 + static_cast<std::size_t>(len); ++e) {
      gp += static_cast<double>(g[e]) * p[e];
      pp += static_cast<double>(p[e]) * p[e];
    }
    for (std::size_t e = r0; e < r0 + static_cast<std::size_t>(len); ++e)
      g[e] = static_cast<float>(g[e] - gp / pp * p[e]);
  }
}

std::vector<std::vector<float>> run(Algorithm algorithm, Precision precision, Orthogonal mode, int threads,
                                    float adamp_delta = 0.1f) {
  omp_set_num_threads(threads);
  // Adafactor's column sums: {300, 1024} and {64, 65} split their rows into 16 groups (300 unevenly),
  // {3, 40, 700} each batch into 5, {5, 9} into one group per row, and {20, 6, 33} sums each of its
  // 20 batches in place.
  const std::vector<Shape> shapes = {{300, 1024}, {64, 65}, {3, 40, 700}, {5, 9}, {20, 6, 33}};
  Rng rng(17);
  std::vector<std::vector<float>> p, g;
  ParamGroup group;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    std::vector<float> x(static_cast<std::size_t>(shape_numel(shapes[i])));
    for (float& v : x) v = 0.1f * rng.normal();
    p.push_back(std::move(x));
    g.emplace_back(p.back().size());
  }
  for (std::size_t i = 0; i < shapes.size(); ++i)
    group.params.push_back({tensor_name(i), shapes[i], p[i].data(), g[i].data()});
  OptimizerOptions options;
  options.algorithm = algorithm;
  options.precision = precision;
  options.hyper = default_hyper(algorithm);
  options.hyper->weight_decay = 0.01f;
  options.hyper->delta = adamp_delta;
  Optimizer opt({group}, options);
  for (int step = 0; step < 4; ++step) {
    for (std::size_t i = 0; i < shapes.size(); ++i) fill_grads(p[i], g[i], shapes[i].back(), mode, rng);
    opt.step();
  }
  return p;
}

struct Case {
  Algorithm algorithm;
  Orthogonal mode;
  const char* name;
};

TEST(StepReductions, BitIdenticalForOneTwoAndThreeThreads) {
  const int saved = omp_get_max_threads();
  const std::vector<Case> cases = {{Algorithm::kAdamP, Orthogonal::kNone, "adamp, no projection"},
                                   {Algorithm::kAdamP, Orthogonal::kPerRow, "adamp, per-row view"},
                                   {Algorithm::kAdamP, Orthogonal::kWholeTensor, "adamp, whole-tensor view"},
                                   {Algorithm::kAdafactor, Orthogonal::kNone, "adafactor"},
                                   // Newton-Schulz's products split the 300 rows into blocks.
                                   {Algorithm::kMuon, Orthogonal::kNone, "muon"}};
  for (const Case& c : cases)
    for (Precision precision : {Precision::kFp32, Precision::kInt8}) {
      SCOPED_TRACE(std::string(c.name) + " " + std::string(precision_name(precision)));
      const auto one = run(c.algorithm, precision, c.mode, 1);
      for (int threads : {2, 3}) {
        const auto other = run(c.algorithm, precision, c.mode, threads);
        for (std::size_t i = 0; i < one.size(); ++i)
          EXPECT_EQ(std::memcmp(one[i].data(), other[i].data(), one[i].size() * sizeof(float)), 0)
              << "tensor " << i << " differs with " << threads << " threads";
      }
    }
  omp_set_num_threads(saved);
}

// The projection must actually be taken, or the AdamP cases above test nothing new: with delta = 1e-12
// AdamP never projects, so the two runs must differ on every tensor.
TEST(StepReductions, OrthogonalGradientsTakeTheProjection) {
  for (Orthogonal mode : {Orthogonal::kPerRow, Orthogonal::kWholeTensor}) {
    const auto plain = run(Algorithm::kAdamP, Precision::kFp32, mode, 2, 1e-12f);
    const auto projected = run(Algorithm::kAdamP, Precision::kFp32, mode, 2, 0.1f);
    for (std::size_t i = 0; i < plain.size(); ++i)
      EXPECT_NE(std::memcmp(plain[i].data(), projected[i].data(), plain[i].size() * sizeof(float)), 0)
          << "tensor " << i << (mode == Orthogonal::kPerRow ? " per-row" : " whole-tensor");
  }
}

}  // namespace
}  // namespace nibble

namespace nibble {
namespace {

// Fills a large stretch of this thread's stack with NaN, where the step's block scratch will sit.
[[gnu::noinline]] void poison_stack() {
  volatile float junk[64 * 1024];
  for (int i = 0; i < 64 * 1024; ++i) junk[i] = std::numeric_limits<float>::quiet_NaN();
  static_cast<void>(junk[0]);  // a volatile read: the stores above must happen
}

// SGD without momentum keeps no buffer, but its rule reads one (times 0): that must be zeros, not
// whatever the scratch memory held before (a NaN there once made every parameter NaN).
TEST(StepScratch, SgdWithoutMomentumIgnoresStaleScratch) {
  omp_set_num_threads(1);
  std::vector<float> p(5000, 1.0f), g(5000, 0.5f);
  ParamGroup group;
  group.params.push_back({"w", {5000}, p.data(), g.data()});
  OptimizerOptions options;
  options.algorithm = Algorithm::kSgd;
  options.hyper = default_hyper(Algorithm::kSgd);
  options.hyper->lr = 0.1f;
  options.hyper->momentum = 0.0f;
  Optimizer opt({group}, options);
  for (int step = 0; step < 3; ++step) {
    poison_stack();
    opt.step();
  }
  for (float x : p) ASSERT_FLOAT_EQ(x, 1.0f - 3 * 0.05f);
}

// Rank-1 4-bit second moments keep one row of column maxima per thread, sized when the optimizer
// is made: a caller that raises OpenMP's thread count afterwards (a framework, another thread's
// setting) must not step past it. Made with 1 thread, stepped with 8: the same parameters as a run
// made and stepped with 1.
TEST(StepScratch, Rank1ScratchHoldsWhenTheThreadCountGrows) {
  const int saved = omp_get_max_threads();
  auto run_rank1 = [](int stepping_threads) {
    omp_set_num_threads(1);
    Rng rng(5);
    std::vector<float> p(64 * 4096), g(p.size());
    for (float& v : p) v = 0.1f * rng.normal();
    ParamGroup group;
    group.params.push_back({"w", {64, 4096}, p.data(), g.data()});
    OptimizerOptions options;
    options.algorithm = Algorithm::kAdamW;
    options.precision = Precision::kInt4;
    options.rank1_second_moment = true;
    Optimizer opt({group}, options);
    omp_set_num_threads(stepping_threads);
    for (int step = 0; step < 3; ++step) {
      for (float& v : g) v = rng.normal();
      opt.step();
    }
    return p;
  };
  const std::vector<float> one = run_rank1(1), eight = run_rank1(8);
  omp_set_num_threads(saved);
  EXPECT_EQ(std::memcmp(one.data(), eight.data(), one.size() * sizeof(float)), 0);
}

}  // namespace
}  // namespace nibble
