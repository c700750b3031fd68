// The golden set: for every algorithm x state precision (and the rank-1, stochastic-rounding,
// AMSGrad, first-moment, clipping and small-block variants), 20 steps on a fixed parameter set with
// fixed gradients (a NaN step and a SophiaG Hessian update among them), then a fingerprint of the
// saved state file and of the parameters. tests/golden/optimizer_state.txt holds the fingerprints
// of the behaviour users have today: a restructuring of the library must leave every one of them
// unchanged. NIBBLE_GOLDEN_WRITE=<file> writes the current fingerprints instead of checking them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "nibble/optim.hpp"
#include "nibble/rng.hpp"

#include "test_util.hpp"

#ifndef NIBBLE_GOLDEN_FILE
#error "NIBBLE_GOLDEN_FILE must name tests/golden/optimizer_state.txt"
#endif

namespace nibble {
namespace {

namespace fs = std::filesystem;
using Shape = std::vector<std::int64_t>;

// FNV-1a, 64 bits: enough to notice any changed byte (not a defence against crafted files).
std::uint64_t fingerprint(const void* data, std::size_t bytes, std::uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

struct Case {
  std::string name;
  OptimizerOptions options;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  for (Algorithm a : all_algorithms())
    for (Precision p : all_precisions()) {
      OptimizerOptions o;
      o.algorithm = a;
      o.precision = p;
      out.push_back({std::string(algorithm_name(a)) + "/" + std::string(precision_name(p)), o});
    }
  auto variant = [&](std::string name, Algorithm a, Precision p, auto&& edit) {
    OptimizerOptions o;
    o.algorithm = a;
    o.precision = p;
    edit(o);
    out.push_back({std::move(name), o});
  };
  variant("adamw/4bit/rank1", Algorithm::kAdamW, Precision::kInt4, [](OptimizerOptions& o) { o.rank1_second_moment = true; });
  variant("adamw/bf16/stochastic", Algorithm::kAdamW, Precision::kBf16, [](OptimizerOptions& o) {
    o.stochastic_rounding = true;
    o.seed = 7;
  });
  variant("adam/8bit/amsgrad", Algorithm::kAdam, Precision::kInt8, [](OptimizerOptions& o) {
    Hyper h = default_hyper(Algorithm::kAdam);
    h.amsgrad = true;
    o.hyper = h;
  });
  variant("adafactor/8bit/first-moment", Algorithm::kAdafactor, Precision::kInt8, [](OptimizerOptions& o) {
    Hyper h = default_hyper(Algorithm::kAdafactor);
    h.first_moment = true;
    o.hyper = h;
  });
  variant("adamw/8bit/clip", Algorithm::kAdamW, Precision::kInt8, [](OptimizerOptions& o) { o.max_grad_norm = 0.05f; });
  variant("lion/4bit/block64", Algorithm::kLion, Precision::kInt4, [](OptimizerOptions& o) { o.block_size = 64; });
  variant("adamw/8bit/names", Algorithm::kAdamW, Precision::kInt8, [](OptimizerOptions& o) {
    o.full_precision_names = {"emb"};
    o.no_decay_vectors = true;
  });
  variant("adam/fp8/amsgrad", Algorithm::kAdam, Precision::kFp8, [](OptimizerOptions& o) {
    Hyper h = default_hyper(Algorithm::kAdam);
    h.amsgrad = true;
    o.hyper = h;
  });
  return out;
}

// Two groups: a 2-D embedding-like tensor, a 3-D tensor, a vector and a small matrix (kept fp32
// by min_quant_size), then a group with its own lr and weight decay.
struct Params {
  std::vector<Shape> shapes = {{130, 64}, {3, 33, 65}, {4097}, {17, 9}, {257, 33}};
  std::vector<std::string> names = {"emb", "blocks.w", "blocks.b", "head.small", "extra.w"};
  std::vector<std::vector<float>> data, grad;

  Params() {
    Rng rng(2024);
    for (const Shape& s : shapes) {
      std::int64_t n = 1;
      for (std::int64_t d : s) n *= d;
      data.emplace_back(static_cast<std::size_t>(n));
      grad.emplace_back(static_cast<std::size_t>(n));
      for (float& x : data.back()) x = 0.1f * rng.normal();
    }
  }
  std::vector<ParamGroup> groups() {
    ParamGroup a, b;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      ParamGroup& g = i + 1 == shapes.size() ? b : a;
      g.params.push_back({names[i], shapes[i], data[i].data(), grad[i].data()});
    }
    b.lr = 3e-4f;
    b.weight_decay = 0.05f;
    return {a, b};
  }
  void new_grads(int step) {
    Rng rng(1000 + static_cast<std::uint64_t>(step));
    for (auto& g : grad)
      for (float& x : g) x = 0.01f * rng.normal() + 0.002f;
    if (step == 10) grad[2][5] = std::numeric_limits<float>::quiet_NaN();  // a skipped step
  }
};

std::string run(const Case& c, const fs::path& dir) {
  Params params;
  Optimizer opt(params.groups(), c.options);
  std::vector<std::vector<float>> hessian(params.shapes.size());
  for (int step = 0; step < 20; ++step) {
    params.new_grads(step);
    const float lr_scale = 0.5f + 0.025f * static_cast<float>(step);
    opt.step({.grad_scale = step == 15 ? 4.0f : 1.0f, .lr_scale = lr_scale});
    if (c.options.algorithm == Algorithm::kSophiaG && step % 5 == 4) {
      std::vector<const float*> estimates;
      for (std::size_t i = 0; i < params.grad.size(); ++i) {
        hessian[i].resize(params.grad[i].size());
        for (std::size_t e = 0; e < hessian[i].size(); ++e) hessian[i][e] = params.grad[i][e] * params.grad[i][e] * 50.0f;
        estimates.push_back(hessian[i].data());
      }
      opt.update_hessian(estimates);
    }
  }
  const fs::path file = dir / "state.safetensors";
  opt.save(file);
  std::ifstream in(file, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::uint64_t h = fingerprint(bytes.data(), bytes.size());
  for (const auto& d : params.data) h = fingerprint(d.data(), d.size() * sizeof(float), h);
  std::ostringstream text;
  text << std::hex << h << " " << std::dec << bytes.size() << " " << opt.step_count() << "/" << opt.skipped_steps();
  return text.str();
}

std::map<std::string, std::string> read_golden(const fs::path& path) {
  std::map<std::string, std::string> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const std::size_t space = line.find(' ');
    out[line.substr(0, space)] = line.substr(space + 1);
  }
  return out;
}

TEST(GoldenState, EveryAlgorithmAndPrecisionStepsAsRecorded) {
  std::map<std::string, std::string> now;
  {
    const test::TempDir dir;
    for (const Case& c : cases()) now[c.name] = run(c, dir.path());
  }

  if (const char* out = std::getenv("NIBBLE_GOLDEN_WRITE")) {
    std::ofstream file(out);
    file << "# nibble's golden optimizer set (tests/golden_state_test.cpp): case, FNV-1a of the state file\n"
            "# and final parameters, the state file's bytes, steps taken/skipped.\n";
    for (const auto& [name, value] : now) file << name << " " << value << "\n";
    GTEST_SKIP() << "wrote " << now.size() << " fingerprints to " << out;
  }
  const std::map<std::string, std::string> golden = read_golden(NIBBLE_GOLDEN_FILE);
  ASSERT_FALSE(golden.empty()) << "no fingerprints in " << NIBBLE_GOLDEN_FILE;
  for (const auto& [name, value] : now) {
    const auto it = golden.find(name);
    if (it == golden.end()) {
      ADD_FAILURE() << name << ": not in the golden set (a new case? record it with NIBBLE_GOLDEN_WRITE)";
      continue;
    }
    EXPECT_EQ(value, it->second) << name << ": the state file or the parameters changed";
  }
  for (const auto& [name, value] : golden) EXPECT_TRUE(now.count(name)) << name << ": in the golden set, not run";
}

}  // namespace
}  // namespace nibble
