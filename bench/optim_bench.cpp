// Micro-benchmarks: the 8-bit and 4-bit encoders alone, and one optimizer step per algorithm and
// state precision on a flat parameter set. Run: build/bench/nibble_micro --benchmark_filter=...
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "math/codebook.hpp"
#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "optim/impl.hpp"

namespace {

void BM_Encode(benchmark::State& state) {
  const auto id = static_cast<nibble::math::CodebookId>(state.range(0));
  const nibble::math::Codebook& cb = nibble::codebook(id);
  std::vector<float> x(1 << 16);
  nibble::Rng rng(1);
  for (float& v : x) v = rng.uniform() * (state.range(0) % 2 ? 1.0f : 2.0f) - (state.range(0) % 2 ? 0.0f : 1.0f);
  std::vector<std::uint8_t> out(x.size());
  for (auto _ : state) {
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = nibble::math::codebook_encode(cb, x[i]);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(x.size()));
}
BENCHMARK(BM_Encode)->DenseRange(0, nibble::math::kCodebookCount - 1);

// Arguments: indices into nibble::all_algorithms() and nibble::all_precisions().
void BM_Step(benchmark::State& state) {
  const nibble::Algorithm algorithm = nibble::all_algorithms()[static_cast<std::size_t>(state.range(0))];
  const nibble::Precision precision = nibble::all_precisions()[static_cast<std::size_t>(state.range(1))];
  const std::int64_t n = 1 << 24;
  std::vector<float> p(n), g(n);
  nibble::Rng rng(2);
  for (std::int64_t i = 0; i < n; ++i) {
    p[i] = rng.normal() * 0.02f;
    g[i] = rng.normal() * 1e-3f;
  }
  nibble::OptimizerOptions options;
  options.algorithm = algorithm;
  options.precision = precision;
  nibble::ParamGroup group;
  group.params.push_back({"w", {n / 1024, 1024}, p.data(), g.data()});
  nibble::Optimizer opt({group}, options);
  for (auto _ : state) opt.step();
  state.SetItemsProcessed(state.iterations() * n);
  state.SetLabel(std::string(nibble::algorithm_name(algorithm)) + "/" + std::string(nibble::precision_name(precision)));
}
void every_algorithm_and_precision(benchmark::internal::Benchmark* b) {
  for (std::size_t a = 0; a < nibble::all_algorithms().size(); ++a)
    for (std::size_t p = 0; p < nibble::all_precisions().size(); ++p)
      b->Args({static_cast<std::int64_t>(a), static_cast<std::int64_t>(p)});
}
BENCHMARK(BM_Step)->Apply(every_algorithm_and_precision)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
