// Optimizer state and the inputs an optimizer must refuse. Save -> load -> continue equals an
// uninterrupted run bit for bit (every algorithm x precision, rank-1 4-bit, stochastic bf16);
// mismatched, truncated, corrupted and edited checkpoints fail with nibble's errors and change
// nothing; non-finite gradients skip a step without a trace; bad hyperparameters, options and
// parameter lists are refused with a message that names the bad value; hyperparameters changed
// between steps continue as an optimizer made with them.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <typeinfo>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/algorithms.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"
#include "nibble/rng.hpp"
#include "nibble/safetensors.hpp"
#include "nibble/tensor.hpp"

#include "test_util.hpp"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using Shape = std::vector<std::int64_t>;
using Arrays = std::vector<std::vector<float>>;
using test::Bytes;
using test::read_bytes;
using test::TempDir;
using test::thrown_message;
using test::write_file;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Files.

// Rewrites a checkpoint through nibble's own safetensors writer after `edit` changed its metadata
// or tensors (tensors stay in data-offset order).
void rewrite(const fs::path& from, const fs::path& to,
             const std::function<void(std::map<std::string, std::string>&, std::vector<NamedTensor>&)>& edit) {
  SafetensorsFile file = load_safetensors(from);
  edit(file.metadata, file.tensors);
  std::vector<TensorView> views;
  for (const NamedTensor& t : file.tensors) views.push_back({t.name, t.tensor.dtype(), t.tensor.shape(), t.tensor.data()});
  save_safetensors(to, views, file.metadata);
}

NamedTensor& tensor_named(std::vector<NamedTensor>& tensors, const std::string& name) {
  for (NamedTensor& t : tensors)
    if (t.name == name) return t;
  throw std::runtime_error("test: checkpoint has no tensor " + name);
}

void erase_tensor(std::vector<NamedTensor>& tensors, const std::string& name) {
  tensor_named(tensors, name);
  std::erase_if(tensors, [&](const NamedTensor& t) { return t.name == name; });
}

// ---------------------------------------------------------------------------------------------
// Errors.

void expect_mentions(const std::string& message, std::initializer_list<std::string_view> parts,
                     const std::string& what) {
  for (std::string_view part : parts)
    EXPECT_NE(message.find(part), std::string::npos)
        << what << ": message does not mention '" << part << "': " << message;
}

// ---------------------------------------------------------------------------------------------
// Optimizers over their own parameters.

struct RunSetup {
  Algorithm algorithm = Algorithm::kAdamW;
  std::optional<Hyper> hyper;  // unset: rich_hyper(algorithm)
  Precision precision = Precision::kFp32;
  // Odd sizes: 4097 ends one element into a block (and a lone nibble at 4 bits), 65x129 is a
  // rank-2 tensor with odd rows and columns, 3x5 stays fp32 (below min_quant_size), 3x7x200 is
  // rank 3 (Adafactor factors it per batch of 7x200).
  std::vector<Shape> shapes = {{4097}, {65, 129}, {3, 5}, {3, 7, 200}};
  std::vector<std::string> names;  // empty: w0, w1, ...
  int block_size = 0;
  std::int64_t min_quant_size = 4096;
  bool rank1 = false;
  bool stochastic = false;
  bool check_finite = true;
  float max_grad_norm = 0.0f;
  std::uint64_t seed = 1234;
};

// The defaults with every optional state slot on and weight decay everywhere, so that as much
// state as possible has to survive a round trip.
Hyper rich_hyper(Algorithm a) {
  Hyper h = default_hyper(a);
  if (a == Algorithm::kAdam) h.amsgrad = true;
  if (a == Algorithm::kAdafactor) h.first_moment = true;
  if (h.weight_decay == 0.0f) h.weight_decay = 0.01f;
  if (a == Algorithm::kSgd || a == Algorithm::kQhm) h.lr = 0.05f;
  return h;
}

std::string label(const RunSetup& s) {
  std::string out = std::string(algorithm_name(s.algorithm)) + "/" + std::string(precision_name(s.precision));
  if (s.rank1) out += "/rank1";
  if (s.stochastic) out += "/stochastic";
  if (s.block_size) out += "/block" + std::to_string(s.block_size);
  return out;
}

Arrays initial_params(const std::vector<Shape>& shapes, std::uint64_t seed) {
  Rng rng(seed);
  Arrays out;
  for (const Shape& s : shapes) {
    std::vector<float> v(static_cast<std::size_t>(shape_numel(s)));
    for (float& x : v) x = rng.uniform() - 0.5f;
    out.push_back(std::move(v));
  }
  return out;
}

struct Run {
  RunSetup setup;
  Arrays p, g, h;
  std::unique_ptr<Optimizer> opt;
};

std::unique_ptr<Run> make_run(const RunSetup& s, const Arrays& init) {
  auto r = std::make_unique<Run>();
  r->setup = s;
  r->p = init;
  for (const auto& x : init) {
    r->g.emplace_back(x.size(), 0.0f);
    r->h.emplace_back(x.size(), 0.0f);
  }
  ParamGroup group;
  for (std::size_t i = 0; i < s.shapes.size(); ++i) {
    const std::string name = i < s.names.size() ? s.names[i] : std::string("w").append(std::to_string(i));
    group.params.push_back({name, s.shapes[i], r->p[i].data(), r->g[i].data()});
  }
  OptimizerOptions o;
  o.algorithm = s.algorithm;
  o.hyper = s.hyper ? *s.hyper : rich_hyper(s.algorithm);
  o.precision = s.precision;
  o.block_size = s.block_size;
  o.min_quant_size = s.min_quant_size;
  o.rank1_second_moment = s.rank1;
  o.stochastic_rounding = s.stochastic;
  o.seed = s.seed;
  o.check_finite = s.check_finite;
  o.max_grad_norm = s.max_grad_norm;
  r->opt = std::make_unique<Optimizer>(std::vector<ParamGroup>{std::move(group)}, o);
  return r;
}

// Gradients of iteration `it`: a pull towards zero (so the parameters feed back into the
// gradients, as in training: any divergence between two runs grows) plus seeded noise.
void fill_grads(Run& r, int it) {
  Rng rng(0x5eed0000ull + static_cast<std::uint64_t>(it) * 7919u);
  for (std::size_t i = 0; i < r.p.size(); ++i)
    for (std::size_t e = 0; e < r.p[i].size(); ++e)
      r.g[i][e] = 0.5f * r.p[i][e] + 0.25f * (rng.uniform() - 0.5f);
}

void update_hessian_gg(Run& r) {
  std::vector<const float*> estimates;
  for (std::size_t i = 0; i < r.g.size(); ++i) {
    for (std::size_t e = 0; e < r.g[i].size(); ++e) r.h[i][e] = r.g[i][e] * r.g[i][e];
    estimates.push_back(r.h[i].data());
  }
  r.opt->update_hessian(estimates);
}

// One training iteration. SophiaG folds in a Hessian estimate g*g before the step of every even
// iteration (so a resumed run's first call after load() is update_hessian()).
StepResult advance(Run& r, int it) {
  fill_grads(r, it);
  if (r.setup.algorithm == Algorithm::kSophiaG && it % 2 == 0) update_hessian_gg(r);
  return r.opt->step();
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

std::string first_difference(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return "sizes " + std::to_string(a.size()) + " and " + std::to_string(b.size());
  for (std::size_t k = 0; k < a.size(); ++k)
    if (std::memcmp(&a[k], &b[k], sizeof(float)) != 0)
      return "element " + std::to_string(k) + ": " + std::to_string(a[k]) + " vs " + std::to_string(b[k]);
  return "none";
}

// Parameters, step counts and every state tensor (dequantized) equal bit for bit.
::testing::AssertionResult identical(const Run& a, const Run& b, bool compare_skipped = true) {
  if (a.opt->step_count() != b.opt->step_count())
    return ::testing::AssertionFailure() << "step_count " << a.opt->step_count() << " vs " << b.opt->step_count();
  if (compare_skipped && a.opt->skipped_steps() != b.opt->skipped_steps())
    return ::testing::AssertionFailure() << "skipped_steps " << a.opt->skipped_steps() << " vs "
                                         << b.opt->skipped_steps();
  for (std::size_t i = 0; i < a.p.size(); ++i) {
    if (!same_bits(a.p[i], b.p[i]))
      return ::testing::AssertionFailure() << "parameter " << i << " differs at " << first_difference(a.p[i], b.p[i]);
    const std::vector<std::string> names = a.opt->state_names(i);
    if (names != b.opt->state_names(i)) return ::testing::AssertionFailure() << "state names of " << i << " differ";
    for (const std::string& name : names) {
      const std::vector<float> va = a.opt->state_values(i, name), vb = b.opt->state_values(i, name);
      if (!same_bits(va, vb))
        return ::testing::AssertionFailure() << "state '" << name << "' of parameter " << i << " differs at "
                                             << first_difference(va, vb);
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// 1. Save -> load -> continue equals an uninterrupted run bit for bit.

std::vector<RunSetup> round_trip_setups(Algorithm a) {
  std::vector<RunSetup> out;
  for (Precision p : all_precisions()) {
    RunSetup s;
    s.algorithm = a;
    s.precision = p;
    out.push_back(s);
  }
  RunSetup rank1;
  rank1.algorithm = a;
  rank1.precision = Precision::kInt4;
  rank1.rank1 = true;
  out.push_back(rank1);
  RunSetup stochastic;
  stochastic.algorithm = a;
  stochastic.precision = Precision::kBf16;
  stochastic.stochastic = true;
  out.push_back(stochastic);
  RunSetup block;  // a non-default block size, smaller than the 4097 tail
  block.algorithm = a;
  block.precision = Precision::kInt8;
  block.block_size = 64;
  out.push_back(block);
  return out;
}

class StateRoundTrip : public ::testing::TestWithParam<Algorithm> {};

TEST_P(StateRoundTrip, SaveLoadContinueEqualsUninterruptedRunBitForBit) {
  TempDir dir;
  for (const RunSetup& setup : round_trip_setups(GetParam())) {
    SCOPED_TRACE(label(setup));
    const Arrays init = initial_params(setup.shapes, 42);
    auto u = make_run(setup, init);  // the uninterrupted run
    for (int it = 0; it < 6; ++it) {
      if (it == 3) {  // a skipped step: skipped_steps must survive the round trip too
        fill_grads(*u, it);
        u->g[1].back() = kNaN;
        ASSERT_TRUE(u->opt->step().skipped);
      }
      if (it == 4) u->opt->set_grad(2, nullptr);  // w2 misses a step: its own step count lags
      advance(*u, it);
      if (it == 4) u->opt->set_grad(2, u->g[2].data());
    }
    ASSERT_EQ(u->opt->step_count(), 6);
    ASSERT_EQ(u->opt->skipped_steps(), 1);
    const fs::path saved = dir / "state.safetensors";
    u->opt->save(saved);

    auto r = make_run(setup, u->p);  // resumed: fresh optimizer over a copy of the parameters
    r->opt->load(saved);
    EXPECT_EQ(r->opt->step_count(), 6);
    EXPECT_EQ(r->opt->skipped_steps(), 1);
    ASSERT_TRUE(identical(*u, *r)) << "right after load";
    auto fresh = make_run(setup, u->p);  // control: the same parameters without the saved state

    for (int it = 6; it < 12; ++it) {
      const StepResult ru = advance(*u, it), rr = advance(*r, it);
      advance(*fresh, it);
      EXPECT_FALSE(ru.skipped);
      EXPECT_EQ(ru.step, rr.step);
      EXPECT_EQ(std::memcmp(&ru.grad_norm, &rr.grad_norm, sizeof(double)), 0) << "iteration " << it;
    }
    EXPECT_EQ(r->opt->step_count(), 12);
    EXPECT_EQ(r->opt->skipped_steps(), 1);
    EXPECT_TRUE(identical(*u, *r)) << "after six more steps";
    // The saved state must matter, or the comparison above proves nothing.
    bool differs = false;
    for (std::size_t i = 0; i < u->p.size(); ++i) differs = differs || !same_bits(u->p[i], fresh->p[i]);
    EXPECT_TRUE(differs) << "a run without the saved state ends where the resumed one does";

    // Everything save() writes (per-tensor step counts included) agrees too.
    u->opt->save(dir / "u.safetensors");
    r->opt->save(dir / "r.safetensors");
    EXPECT_TRUE(read_bytes(dir / "u.safetensors") == read_bytes(dir / "r.safetensors"));
  }
}

INSTANTIATE_TEST_SUITE_P(AllAlgorithms, StateRoundTrip, ::testing::ValuesIn(all_algorithms()),
                         [](const ::testing::TestParamInfo<Algorithm>& info) {
                           return std::string(algorithm_name(info.param));
                         });

TEST(StateRoundTrip, SavingTwiceOverwritesAndStateSurvivesSeveralRoundTrips) {
  // Save/load every two steps, each time into a fresh optimizer: still the uninterrupted run.
  TempDir dir;
  RunSetup setup;
  setup.algorithm = Algorithm::kAdamW;
  setup.precision = Precision::kInt4;
  setup.rank1 = true;
  const Arrays init = initial_params(setup.shapes, 5);
  auto u = make_run(setup, init);
  auto r = make_run(setup, init);
  for (int it = 0; it < 10; ++it) {
    advance(*u, it);
    advance(*r, it);
    if (it % 2 == 1) {
      r->opt->save(dir / "ckpt.safetensors");  // same path every time: atomically replaced
      auto next = make_run(setup, r->p);
      next->opt->load(dir / "ckpt.safetensors");
      r = std::move(next);
    }
  }
  EXPECT_TRUE(identical(*u, *r));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir / ""), fs::directory_iterator()), 1)
      << "save() left temporary files behind";
}

// ---------------------------------------------------------------------------------------------
// 2. Mismatched checkpoints fail with StateMismatch, name the mismatch and change nothing.

struct MismatchCase {
  std::string label;
  RunSetup saved;   // the optimizer that wrote the checkpoint
  RunSetup target;  // the optimizer that tries to load it
  std::vector<std::string> mentions;
};

std::vector<MismatchCase> mismatch_cases() {
  RunSetup base;
  base.algorithm = Algorithm::kAdamW;
  base.precision = Precision::kInt8;
  base.shapes = {{4097}, {65, 129}, {3, 5}};
  RunSetup four = base;
  four.precision = Precision::kInt4;
  RunSetup four_rank1 = four;
  four_rank1.rank1 = true;

  std::vector<MismatchCase> out;
  auto add = [&](std::string name, const RunSetup& saved, auto&& tweak, std::vector<std::string> mentions) {
    RunSetup target = saved;
    tweak(target);
    out.push_back({std::move(name), saved, target, std::move(mentions)});
  };
  add("other algorithm", base, [](RunSetup& s) { s.algorithm = Algorithm::kLion; }, {"adamw", "lion"});
  add("adam vs adamw", base,
      [](RunSetup& s) {
        s.algorithm = Algorithm::kAdam;
        s.hyper = rich_hyper(Algorithm::kAdamW);
        s.hyper->decoupled_weight_decay = false;
      },
      {"adamw", "adam"});
  add("4bit into 8bit", four, [](RunSetup& s) { s.precision = Precision::kInt8; }, {"4bit", "8bit"});
  add("8bit into 4bit", base, [](RunSetup& s) { s.precision = Precision::kInt4; }, {"8bit", "4bit"});
  add("8bit into fp32", base, [](RunSetup& s) { s.precision = Precision::kFp32; }, {"8bit", "fp32"});
  add("8bit into bf16", base, [](RunSetup& s) { s.precision = Precision::kBf16; }, {"8bit", "bf16"});
  add("block size 256 vs 128", base, [](RunSetup& s) { s.block_size = 128; }, {"block", "256", "128"});
  add("block size 256 vs 4096", base, [](RunSetup& s) { s.block_size = 4096; }, {"block", "256", "4096"});
  add("transposed shape", base, [](RunSetup& s) { s.shapes[1] = {129, 65}; }, {"[65,129]", "[129,65]"});
  add("same numel, other rank", base, [](RunSetup& s) { s.shapes[0] = {1, 4097}; }, {"[4097]", "[1,4097]"});
  add("fewer parameters", base, [](RunSetup& s) { s.shapes.pop_back(); }, {"3 parameters", "2"});
  add("more parameters", base, [](RunSetup& s) { s.shapes.push_back({7}); }, {"3 parameters", "4"});
  add("other name", base, [](RunSetup& s) { s.names = {"w0", "v1", "w2"}; }, {"w1", "v1"});
  add("parameters in another order", base,
      [](RunSetup& s) {
        s.shapes = {{65, 129}, {4097}, {3, 5}};
        s.names = {"w1", "w0", "w2"};
      },
      {"parameter 0", "w0", "w1"});
  add("min_quant_size keeps w0 at fp32", base, [](RunSetup& s) { s.min_quant_size = 5000; }, {"8bit", "fp32"});
  add("amsgrad adds a state tensor", base, [](RunSetup& s) {
        s.hyper = rich_hyper(Algorithm::kAdamW);
        s.hyper->amsgrad = true;
      },
      {"max_exp_avg_sq"});
  add("rank1 on vs off", four, [](RunSetup& s) { s.rank1 = true; }, {"rank1", "false", "true"});
  add("rank1 off vs on", four_rank1, [](RunSetup& s) { s.rank1 = false; }, {"rank1", "false", "true"});
  // fp8 codes are bytes like 8-bit's: the layout's precision and codebook names keep them apart.
  RunSetup fp8 = base;
  fp8.precision = Precision::kFp8;
  add("fp8 into 8bit", fp8, [](RunSetup& s) { s.precision = Precision::kInt8; }, {"fp8", "8bit", "fp8_e4m3"});
  add("8bit into fp8", base, [](RunSetup& s) { s.precision = Precision::kFp8; }, {"fp8", "8bit", "dynamic_signed_8"});
  return out;
}

TEST(StateMismatch, EveryMismatchThrowsNamesItAndChangesNothing) {
  TempDir dir;
  for (const MismatchCase& c : mismatch_cases()) {
    SCOPED_TRACE(c.label);
    const fs::path ckpt = dir / "ckpt.safetensors";
    {
      auto writer = make_run(c.saved, initial_params(c.saved.shapes, 1));
      for (int it = 0; it < 3; ++it) advance(*writer, it);
      writer->opt->save(ckpt);
    }
    // A (attempts the load) and B (never does) start equal and have state of their own.
    const Arrays init = initial_params(c.target.shapes, 2);
    auto a = make_run(c.target, init);
    auto b = make_run(c.target, init);
    for (int it = 100; it < 102; ++it) {
      advance(*a, it);
      advance(*b, it);
    }
    const std::string message = thrown_message<StateMismatch>([&] { a->opt->load(ckpt); }, c.label);
    for (const std::string& m : c.mentions) expect_mentions(message, {m}, c.label);
    EXPECT_TRUE(identical(*a, *b)) << "the failed load changed the optimizer";
    advance(*a, 102);
    advance(*b, 102);
    EXPECT_TRUE(identical(*a, *b)) << "the step after the failed load differs";
  }
}

TEST(StateMismatch, MatchingOptimizerWithOtherHyperparametersLoads) {
  // Hyperparameters are the constructor's (a resumed run may change lr); only the state must fit.
  TempDir dir;
  RunSetup saved;
  saved.precision = Precision::kInt8;
  auto writer = make_run(saved, initial_params(saved.shapes, 1));
  for (int it = 0; it < 3; ++it) advance(*writer, it);
  writer->opt->save(dir / "ckpt.safetensors");
  RunSetup target = saved;
  target.hyper = rich_hyper(saved.algorithm);
  target.hyper->lr *= 0.5f;
  auto r = make_run(target, writer->p);
  EXPECT_NO_THROW(r->opt->load(dir / "ckpt.safetensors"));
  EXPECT_EQ(r->opt->step_count(), 3);
  EXPECT_TRUE(same_bits(r->opt->state_values(0, "exp_avg"), writer->opt->state_values(0, "exp_avg")));
}

// ---------------------------------------------------------------------------------------------
// 3. Truncated, corrupted and edited checkpoints.

// Small optimizers whose checkpoints are a few kilobytes, one per kind of stored tensor: 8-bit
// codes and absmax, fp32 state, 4-bit codes, Adafactor's factored rows/columns, rank-1
// row/column maxima, bf16 state.
std::vector<RunSetup> corrupt_setups() {
  std::vector<RunSetup> out;
  RunSetup a;  // 8-bit codes + absmax (3 blocks of 16), fp32 state for the 3x5 tensor
  a.algorithm = Algorithm::kAdamW;
  a.precision = Precision::kInt8;
  a.block_size = 16;
  a.min_quant_size = 32;
  a.shapes = {{40}, {3, 5}};
  out.push_back(a);
  RunSetup b;  // Adafactor: factored fp32 rows/columns and a 4-bit first moment; 4-bit 1-D state
  b.algorithm = Algorithm::kAdafactor;
  b.precision = Precision::kInt4;
  b.block_size = 16;
  b.min_quant_size = 16;
  b.shapes = {{4, 6}, {17}};
  out.push_back(b);
  RunSetup c;  // 4-bit with rank-1 row/column maxima
  c.algorithm = Algorithm::kAdam;
  c.precision = Precision::kInt4;
  c.rank1 = true;
  c.block_size = 16;
  c.min_quant_size = 16;
  c.shapes = {{6, 8}, {5}};
  out.push_back(c);
  RunSetup d;  // bf16 (stochastic) SophiaG with a Hessian
  d.algorithm = Algorithm::kSophiaG;
  d.precision = Precision::kBf16;
  d.stochastic = true;
  d.min_quant_size = 16;
  d.shapes = {{3, 7}, {2}};
  out.push_back(d);
  return out;
}

// A checkpoint after 12 steps and 11 skipped steps (two-digit counts in the metadata).
std::unique_ptr<Run> checkpointed_run(const RunSetup& s, const fs::path& path) {
  auto r = make_run(s, initial_params(s.shapes, 3));
  for (int it = 0; it < 12; ++it) {
    if (it < 11) {
      fill_grads(*r, it);
      r->g[0][0] = kInf;
      r->opt->step();
    }
    advance(*r, it);
  }
  r->opt->save(path);
  return r;
}

std::optional<std::int64_t> strict_integer(const std::string& text) {
  std::int64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return v;
}

// After a load that succeeded: what the optimizer holds (as save() writes it) is what the loaded
// file says. Only "hyper" may differ: it records the writer's hyperparameters, and load() keeps
// the optimizer's own.
::testing::AssertionResult faithful(const Bytes& loaded, const Bytes& resaved) {
  const SafetensorsFile a = parse_safetensors(loaded), b = parse_safetensors(resaved);
  if (a.tensors.size() != b.tensors.size())
    return ::testing::AssertionFailure() << a.tensors.size() << " tensors loaded, " << b.tensors.size() << " held";
  for (const NamedTensor& t : b.tensors) {
    const Tensor* x = a.find(t.name);
    if (x == nullptr) return ::testing::AssertionFailure() << "loaded file has no " << t.name;
    if (x->dtype() != t.tensor.dtype() || x->shape() != t.tensor.shape() ||
        std::memcmp(x->data(), t.tensor.data(), t.tensor.nbytes()) != 0)
      return ::testing::AssertionFailure() << "tensor " << t.name << " is not what the file holds";
  }
  for (const auto& [key, value] : b.metadata) {
    if (key == "hyper") continue;
    const auto it = a.metadata.find(key);
    if (it == a.metadata.end()) return ::testing::AssertionFailure() << "loaded file has no metadata " << key;
    bool same = it->second == value;
    if (key == "layout") {
      const auto x = nlohmann::json::parse(it->second, nullptr, false);
      same = !x.is_discarded() && x == nlohmann::json::parse(value);
    } else if (key == "step" || key == "skipped") {
      same = strict_integer(it->second).has_value() && strict_integer(it->second) == strict_integer(value);
    }
    if (!same)
      return ::testing::AssertionFailure() << "metadata " << key << " '" << it->second << "' was loaded as '"
                                           << value << "'";
  }
  return ::testing::AssertionSuccess();
}

// Loads `bytes` into `r` (which holds the state of `original`). Either it throws a nibble::Error
// and save() still writes `original` byte for byte, or it succeeds faithfully; then the original
// state is loaded back. Returns whether the load succeeded.
bool load_mutation(Run& r, const TempDir& dir, const Bytes& original, const Bytes& bytes, const std::string& what) {
  const fs::path mutated = dir / "mutated.safetensors";
  const fs::path check = dir / "check.safetensors";
  write_file(mutated, bytes);
  bool ok = false;
  try {
    r.opt->load(mutated);
    ok = true;
  } catch (const Error&) {
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": threw " << typeid(e).name() << " (" << e.what() << "), not a nibble::Error";
  }
  r.opt->save(check);
  if (!ok) {
    EXPECT_TRUE(read_bytes(check) == original) << what << ": a failed load changed the optimizer";
  } else {
    EXPECT_TRUE(faithful(bytes, read_bytes(check))) << what;
    write_file(mutated, original);
    r.opt->load(mutated);
  }
  return ok;
}

TEST(StateCorrupt, TruncatedOrExtendedFilesAreRejectedAndChangeNothing) {
  TempDir dir;
  for (const RunSetup& setup : corrupt_setups()) {
    SCOPED_TRACE(label(setup));
    auto r = checkpointed_run(setup, dir / "ckpt.safetensors");
    const Bytes original = read_bytes(dir / "ckpt.safetensors");
    ASSERT_GT(original.size(), 64u);
    std::uint64_t header = 0;
    std::memcpy(&header, original.data(), 8);
    std::vector<std::size_t> lengths;
    for (std::size_t n = 0; n <= 17; ++n) lengths.push_back(n);
    for (std::size_t d = 0; d < 7; ++d) lengths.push_back(8 + header - 3 + d);
    for (std::size_t k = 1; k < 40; ++k) lengths.push_back(original.size() * k / 40);
    lengths.push_back(original.size() - 1);
    for (std::size_t n : lengths) {
      const Bytes cut(original.begin(), original.begin() + static_cast<std::ptrdiff_t>(std::min(n, original.size() - 1)));
      EXPECT_FALSE(load_mutation(*r, dir, original, cut, "truncated to " + std::to_string(cut.size())))
          << "a checkpoint truncated to " << cut.size() << " of " << original.size() << " bytes loaded";
    }
    for (std::size_t extra : {1u, 8u}) {
      Bytes longer = original;
      longer.insert(longer.end(), extra, 0);
      EXPECT_FALSE(load_mutation(*r, dir, original, longer, "extended"));
    }
    fs::remove(dir / "mutated.safetensors");
    const std::string missing = thrown_message<IoError>([&] { r->opt->load(dir / "mutated.safetensors"); }, "missing");
    expect_mentions(missing, {"mutated.safetensors"}, "missing file");
    thrown_message<IoError>([&] { r->opt->load(dir / ""); }, "a directory");
    thrown_message<IoError>([&] { r->opt->save(dir / "no_such_dir" / "x.safetensors"); }, "save into a missing dir");
    r->opt->save(dir / "check.safetensors");
    EXPECT_TRUE(read_bytes(dir / "check.safetensors") == original);
  }
}

TEST(StateCorrupt, ByteFlipsAreRejectedOrLoadedFaithfully) {
  TempDir dir;
  for (const RunSetup& setup : corrupt_setups()) {
    SCOPED_TRACE(label(setup));
    auto r = checkpointed_run(setup, dir / "ckpt.safetensors");
    const Bytes original = read_bytes(dir / "ckpt.safetensors");
    std::uint64_t header = 0;
    std::memcpy(&header, original.data(), 8);
    const std::size_t data_begin = 8 + static_cast<std::size_t>(header);
    const std::string header_text(original.begin() + 8, original.begin() + static_cast<std::ptrdiff_t>(data_begin));

    // Positions: the length prefix, the digits of the step counts, the header's padding, then a
    // seeded spread over the header and the data.
    std::vector<std::size_t> positions;
    for (std::size_t i = 0; i < 8; ++i) positions.push_back(i);
    for (const char* key : {"\"step\":\"", "\"skipped\":\""}) {
      const std::size_t at = header_text.find(key);
      ASSERT_NE(at, std::string::npos) << key;
      for (std::size_t i = 0; i < 3; ++i) positions.push_back(8 + at + std::strlen(key) + i);
    }
    const std::size_t last = header_text.find_last_not_of(' ');
    for (std::size_t i = last + 1; i < header_text.size(); ++i) positions.push_back(8 + i);
    const std::size_t directed = positions.size();  // these get every value below; the rest fewer
    Rng rng(99);
    for (int i = 0; i < 36; ++i) positions.push_back(8 + rng.below(header));
    for (int i = 0; i < 24; ++i) positions.push_back(data_begin + rng.below(original.size() - data_begin));

    const std::array<std::uint8_t, 6> fixed = {0x00, 0xff, ' ', '"', '-', 'x'};
    int loaded = 0, rejected = 0;
    for (std::size_t k = 0; k < positions.size(); ++k) {
      const std::size_t pos = positions[k];
      const std::uint8_t old = original[pos];
      const std::uint8_t values[] = {static_cast<std::uint8_t>(old ^ 0x01), static_cast<std::uint8_t>(old ^ 0x80),
                                     static_cast<std::uint8_t>(old ^ 0x40), fixed[k % fixed.size()],
                                     static_cast<std::uint8_t>('0' + k % 10)};
      for (std::size_t v = k < directed ? 0 : k % 2; v < std::size(values); v += (k < directed ? 1 : 2)) {
        if (values[v] == old) continue;
        Bytes bytes = original;
        bytes[pos] = values[v];
        const bool ok = load_mutation(*r, dir, original, bytes,
                                      "byte " + std::to_string(pos) + " set to " + std::to_string(values[v]));
        (ok ? loaded : rejected) += 1;
      }
    }
    // Both outcomes occur (code bytes load, broken JSON does not): the loop tests both paths.
    EXPECT_GT(loaded, 0);
    EXPECT_GT(rejected, 0);
  }
}

TEST(StateCorrupt, HeaderPaddingAndWhitespaceDoNotMatter) {
  TempDir dir;
  const RunSetup setup = corrupt_setups()[0];
  auto r = checkpointed_run(setup, dir / "ckpt.safetensors");
  const Bytes original = read_bytes(dir / "ckpt.safetensors");
  std::uint64_t header = 0;
  std::memcpy(&header, original.data(), 8);
  // Rewrite the header as pretty-printed JSON padded with extra spaces: same content.
  const std::string text(original.begin() + 8, original.begin() + 8 + static_cast<std::ptrdiff_t>(header));
  std::string pretty = nlohmann::json::parse(text).dump(2) + "\n\t  ";
  pretty.append((8 - pretty.size() % 8) % 8, ' ');
  Bytes bytes(8);
  const std::uint64_t n = pretty.size();
  std::memcpy(bytes.data(), &n, 8);
  bytes.insert(bytes.end(), pretty.begin(), pretty.end());
  bytes.insert(bytes.end(), original.begin() + 8 + static_cast<std::ptrdiff_t>(header), original.end());
  auto other = make_run(setup, r->p);
  write_file(dir / "pretty.safetensors", bytes);
  ASSERT_NO_THROW(other->opt->load(dir / "pretty.safetensors"));
  EXPECT_TRUE(identical(*r, *other));
}

// One edit of a checkpoint and what load() must say about it.
struct Edit {
  std::string label;
  std::function<void(std::map<std::string, std::string>&, std::vector<NamedTensor>&)> apply;
  enum Kind { kFormat, kMismatch } kind;
  std::vector<std::string> mentions;
};

template <class T>
T* data_of(std::vector<NamedTensor>& tensors, const std::string& name) {
  return tensor_named(tensors, name).tensor.template data_as<T>();
}

std::vector<Edit> edits(const RunSetup& s) {
  using Meta = std::map<std::string, std::string>;
  using Tensors = std::vector<NamedTensor>;
  std::vector<Edit> out;
  auto meta = [&](std::string label, std::string key, std::optional<std::string> value, Edit::Kind kind,
                  std::vector<std::string> mentions) {
    out.push_back({std::move(label),
                   [key, value](Meta& m, Tensors&) {
                     if (value)
                       m[key] = *value;
                     else
                       m.erase(key);
                   },
                   kind, std::move(mentions)});
  };
  const std::string algo(algorithm_name(s.algorithm));
  meta("schema_version 2", "schema_version", "2", Edit::kFormat, {"schema version", "'2'"});
  meta("schema_version 0", "schema_version", "0", Edit::kFormat, {"schema version", "'0'"});
  meta("schema_version empty", "schema_version", "", Edit::kFormat, {"schema version"});
  meta("schema_version missing", "schema_version", std::nullopt, Edit::kFormat, {"schema_version"});
  meta("format other", "format", "torch.optimizer", Edit::kFormat, {"torch.optimizer"});
  meta("format missing", "format", std::nullopt, Edit::kFormat, {"format"});
  const std::string other = s.algorithm == Algorithm::kLion ? "adamw" : "lion";
  meta("algorithm other", "algorithm", other, Edit::kMismatch, {other, algo});
  meta("algorithm unknown", "algorithm", "rmsprop", Edit::kMismatch, {"rmsprop", algo});
  meta("algorithm missing", "algorithm", std::nullopt, Edit::kFormat, {"algorithm"});
  meta("step negative", "step", "-1", Edit::kFormat, {"step", "-1"});
  meta("step not a number", "step", "twelve", Edit::kFormat, {"step", "twelve"});
  meta("step with trailing junk", "step", "12x", Edit::kFormat, {"step", "12x"});
  meta("step with leading space", "step", " 12", Edit::kFormat, {"step"});
  meta("step float", "step", "12.0", Edit::kFormat, {"step", "12.0"});
  meta("step overflows", "step", "99999999999999999999", Edit::kFormat, {"step", "99999999999999999999"});
  meta("step below the tensors' steps", "step", "3", Edit::kFormat, {"step count 12", "out of range"});
  meta("step missing", "step", std::nullopt, Edit::kFormat, {"step"});
  meta("skipped negative", "skipped", "-2", Edit::kFormat, {"skipped", "-2"});
  meta("skipped with trailing junk", "skipped", "1x", Edit::kFormat, {"skipped", "1x"});
  meta("skipped missing", "skipped", std::nullopt, Edit::kFormat, {"skipped"});
  meta("hyper not JSON", "hyper", "not json at all {", Edit::kFormat, {"hyper", "not valid JSON"});
  meta("hyper not an object", "hyper", "[0.9]", Edit::kFormat, {"hyper", "array"});
  meta("hyper holds text", "hyper", "{\"beta1\": \"0.9\"}", Edit::kFormat, {"hyper", "beta1"});
  meta("hyper missing", "hyper", std::nullopt, Edit::kFormat, {"hyper"});
  meta("layout not JSON", "layout", "[{", Edit::kFormat, {"layout"});
  meta("layout empty list", "layout", "[]", Edit::kMismatch, {"0 parameters"});
  meta("layout not a list", "layout", "{}", Edit::kMismatch, {"parameters"});
  meta("layout missing", "layout", std::nullopt, Edit::kFormat, {"layout"});
  out.push_back({"layout with another block",
                 [](Meta& m, Tensors&) {
                   auto j = nlohmann::json::parse(m["layout"]);
                   j[0]["block"] = 32;
                   m["layout"] = j.dump();
                 },
                 Edit::kMismatch, {"parameter 0", "\"block\":32"}});

  out.push_back({"steps entry negative", [](Meta&, Tensors& t) { data_of<std::int64_t>(t, "steps")[1] = -1; },
                 Edit::kFormat, {"step count -1", "parameter 1"}});
  out.push_back({"steps entry above the step count",
                 [](Meta&, Tensors& t) { data_of<std::int64_t>(t, "steps")[0] = 13; }, Edit::kFormat,
                 {"step count 13", "parameter 0"}});
  out.push_back({"steps as i32",
                 [](Meta&, Tensors& t) {
                   NamedTensor& n = tensor_named(t, "steps");
                   n.tensor = Tensor(DType::I32, n.tensor.shape());
                 },
                 Edit::kMismatch, {"steps", "I32"}});
  out.push_back({"steps missing", [](Meta&, Tensors& t) { erase_tensor(t, "steps"); }, Edit::kMismatch, {"tensors"}});
  out.push_back({"extra tensor",
                 [](Meta&, Tensors& t) { t.push_back({"state.9.extra", Tensor(DType::F32, {1})}); },
                 Edit::kMismatch, {"tensors"}});

  // The state tensors this setup stores, from its own layout.
  const std::string first = "state.0.exp_avg";  // the first slot of tensor 0 in every corrupt_setups() entry
  const bool quantized0 = s.precision == Precision::kInt8 || s.precision == Precision::kInt4;
  const std::string stored0 = quantized0 ? first + ".codes" : first;
  out.push_back({"state tensor deleted", [stored0](Meta&, Tensors& t) { erase_tensor(t, stored0); }, Edit::kMismatch,
                 {"tensors"}});
  out.push_back({"state tensor renamed",
                 [stored0](Meta&, Tensors& t) { tensor_named(t, stored0).name = "state.0.renamed"; },
                 Edit::kFormat, {stored0}});
  out.push_back({"state tensor one element longer",
                 [stored0](Meta&, Tensors& t) {
                   NamedTensor& n = tensor_named(t, stored0);
                   n.tensor = Tensor(n.tensor.dtype(), {n.tensor.numel() + 1});
                 },
                 Edit::kMismatch, {stored0}});
  out.push_back({"state tensor in another dtype",
                 [stored0](Meta&, Tensors& t) {
                   NamedTensor& n = tensor_named(t, stored0);
                   n.tensor = Tensor(n.tensor.dtype() == DType::F32 ? DType::I32 : DType::F32, n.tensor.shape());
                 },
                 Edit::kMismatch, {stored0}});
  // Non-finite and negative values where they cannot be.
  if (s.precision == Precision::kFp32 || s.precision == Precision::kBf16) {
    const bool bf16 = s.precision == Precision::kBf16;
    out.push_back({"state holds NaN",
                   [first, bf16](Meta&, Tensors& t) {
                     if (bf16)
                       data_of<std::uint16_t>(t, first)[2] = 0x7fc0;
                     else
                       data_of<float>(t, first)[2] = kNaN;
                   },
                   Edit::kFormat, {first, "NaN"}});
  }
  // fp32 tensor 1 of setup 0 (3x5 below min_quant_size) and the quantized scales.
  if (s.algorithm == Algorithm::kAdamW) {
    out.push_back({"fp32 state holds inf", [](Meta&, Tensors& t) { data_of<float>(t, "state.1.exp_avg")[14] = -kInf; },
                   Edit::kFormat, {"state.1.exp_avg", "inf"}});
    out.push_back({"second moment negative",
                   [](Meta&, Tensors& t) { data_of<float>(t, "state.1.exp_avg_sq")[3] = -1e-3f; }, Edit::kFormat,
                   {"state.1.exp_avg_sq", "negative"}});
    out.push_back({"absmax NaN", [](Meta&, Tensors& t) { data_of<float>(t, "state.0.exp_avg.absmax")[1] = kNaN; },
                   Edit::kFormat, {"state.0.exp_avg.absmax"}});
    out.push_back({"absmax negative",
                   [](Meta&, Tensors& t) { data_of<float>(t, "state.0.exp_avg.absmax")[2] = -0.5f; }, Edit::kFormat,
                   {"state.0.exp_avg.absmax", "negative"}});
    out.push_back({"codebook value changed",
                   [](Meta&, Tensors& t) { data_of<float>(t, "codebook.dynamic_signed_8")[100] += 1e-6f; },
                   Edit::kMismatch, {"codebook.dynamic_signed_8"}});
    out.push_back({"codebook missing", [](Meta&, Tensors& t) { erase_tensor(t, "codebook.dynamic_unsigned_8"); },
                   Edit::kFormat, {"codebook.dynamic_unsigned_8"}});
  }
  if (s.algorithm == Algorithm::kAdafactor) {
    out.push_back({"factored row negative",
                   [](Meta&, Tensors& t) { data_of<float>(t, "state.0.exp_avg_sq_row")[1] = -1.0f; }, Edit::kFormat,
                   {"state.0.exp_avg_sq_row", "negative"}});
    out.push_back({"factored column negative",
                   [](Meta&, Tensors& t) { data_of<float>(t, "state.0.exp_avg_sq_col")[5] = -1.0f; }, Edit::kFormat,
                   {"state.0.exp_avg_sq_col", "negative"}});
  }
  if (s.rank1) {
    out.push_back({"row max negative",
                   [](Meta&, Tensors& t) { data_of<float>(t, "state.0.exp_avg_sq.row_max")[0] = -1.0f; },
                   Edit::kFormat, {"state.0.exp_avg_sq.row_max", "negative"}});
    out.push_back({"column max inf",
                   [](Meta&, Tensors& t) { data_of<float>(t, "state.0.exp_avg_sq.col_max")[7] = kInf; },
                   Edit::kFormat, {"state.0.exp_avg_sq.col_max"}});
  }
  return out;
}

TEST(StateCorrupt, EditedCheckpointsAreRejectedWithTheRightErrorAndChangeNothing) {
  TempDir dir;
  for (const RunSetup& setup : corrupt_setups()) {
    SCOPED_TRACE(label(setup));
    const fs::path ckpt = dir / "ckpt.safetensors", edited = dir / "edited.safetensors";
    auto r = checkpointed_run(setup, ckpt);
    auto control = make_run(setup, r->p);
    control->opt->load(ckpt);
    const Bytes original = read_bytes(ckpt);
    // The rewrite itself is harmless: what fails below fails because of the edit.
    rewrite(ckpt, edited, [](auto&, auto&) {});
    ASSERT_NO_THROW(r->opt->load(edited));
    for (const Edit& e : edits(setup)) {
      SCOPED_TRACE(e.label);
      rewrite(ckpt, edited, e.apply);
      std::string message;
      if (e.kind == Edit::kFormat)
        message = thrown_message<FormatError>([&] { r->opt->load(edited); }, e.label);
      else
        message = thrown_message<StateMismatch>([&] { r->opt->load(edited); }, e.label);
      for (const std::string& m : e.mentions) expect_mentions(message, {m}, e.label);
      r->opt->save(dir / "check.safetensors");
      EXPECT_TRUE(read_bytes(dir / "check.safetensors") == original) << e.label << " changed the optimizer";
    }
    // And behaviourally: the next steps are those of an optimizer that never saw the edits.
    for (int it = 12; it < 14; ++it) {
      advance(*r, it);
      advance(*control, it);
    }
    EXPECT_TRUE(identical(*r, *control));
  }
}

TEST(StateCorrupt, NegativeSecondMomentsAreRefusedBeforeTheyPoisonTheParameters) {
  // Why load() refuses negative second moments: an Adam step divides by sqrt(v), so one negative
  // value (a flipped sign bit) would turn the parameter into NaN at the next step. At fp32 (the
  // value itself), 8-bit and fp8 (a block's absmax).
  TempDir dir;
  for (Precision precision : {Precision::kFp32, Precision::kInt8, Precision::kFp8}) {
    RunSetup s = corrupt_setups()[0];
    s.precision = precision;
    auto r = checkpointed_run(s, dir / "ckpt.safetensors");
    const std::string v = precision == Precision::kFp32 ? "state.0.exp_avg_sq" : "state.0.exp_avg_sq.absmax";
    rewrite(dir / "ckpt.safetensors", dir / "neg.safetensors",
            [&](auto&, std::vector<NamedTensor>& t) { data_of<float>(t, v)[0] = -data_of<float>(t, v)[0] - 1e-3f; });
    auto fresh = make_run(s, r->p);
    const std::string message = thrown_message<FormatError>([&] { fresh->opt->load(dir / "neg.safetensors"); }, v);
    expect_mentions(message, {v}, "negative " + v);
    EXPECT_EQ(fresh->opt->step_count(), 0);
    advance(*fresh, 20);
    for (float x : fresh->p[0]) ASSERT_TRUE(std::isfinite(x));
  }
}

TEST(StateCorrupt, Fp8NanCodesAreRefused) {
  // e4m3's 0x7f and 0xff decode to NaN and the encoder never writes them (NaN encodes as 0): a
  // file holding one is corrupt, and loading it would turn the parameters into NaN.
  TempDir dir;
  RunSetup s = corrupt_setups()[0];
  s.precision = Precision::kFp8;
  auto r = checkpointed_run(s, dir / "ckpt.safetensors");
  const std::string codes = "state.0.exp_avg.codes";
  for (std::uint8_t bad : {std::uint8_t{0x7f}, std::uint8_t{0xff}}) {
    rewrite(dir / "ckpt.safetensors", dir / "nan.safetensors",
            [&](auto&, std::vector<NamedTensor>& t) { data_of<std::uint8_t>(t, codes)[3] = bad; });
    auto fresh = make_run(s, r->p);
    const std::string message = thrown_message<FormatError>([&] { fresh->opt->load(dir / "nan.safetensors"); }, codes);
    expect_mentions(message, {codes, "element 3", "NaN"}, "NaN code");
    EXPECT_EQ(fresh->opt->step_count(), 0);
  }
  // The same byte is an ordinary code of the 8-bit tree map.
  s.precision = Precision::kInt8;
  auto tree = checkpointed_run(s, dir / "tree.safetensors");
  rewrite(dir / "tree.safetensors", dir / "tree_0x7f.safetensors",
          [&](auto&, std::vector<NamedTensor>& t) { data_of<std::uint8_t>(t, codes)[3] = 0x7f; });
  auto fresh = make_run(s, tree->p);
  EXPECT_NO_THROW(fresh->opt->load(dir / "tree_0x7f.safetensors"));
}

// ---------------------------------------------------------------------------------------------
// 4. Non-finite gradients skip the step and leave no trace.

TEST(NonFiniteGradients, SkippedStepChangesNothingAndTheNextStepIsUnaffected) {
  struct Spot {
    std::size_t tensor;
    int where;  // 0 first, 1 middle, 2 last element
    float value;
  };
  const Spot spots[] = {{0, 0, kNaN}, {0, 2, kInf}, {1, 1, -kInf}, {1, 2, kNaN}, {2, 2, kInf}};
  for (Algorithm algorithm : {Algorithm::kAdamW, Algorithm::kLion, Algorithm::kAdafactor, Algorithm::kSgd,
                              Algorithm::kSophiaG}) {
    for (Precision precision : {Precision::kFp32, Precision::kInt8, Precision::kFp8}) {
      RunSetup setup;
      setup.algorithm = algorithm;
      setup.precision = precision;
      setup.shapes = {{4097}, {65, 129}, {3, 5}};
      const Arrays init = initial_params(setup.shapes, 8);
      for (const Spot& spot : spots) {
        SCOPED_TRACE(label(setup) + " bad value " + std::to_string(spot.value) + " in tensor " +
                     std::to_string(spot.tensor) + " at " + std::to_string(spot.where));
        auto a = make_run(setup, init);  // sees the bad step
        auto b = make_run(setup, init);  // never does
        auto before = make_run(setup, init);
        for (int it = 0; it < 3; ++it) {
          advance(*a, it);
          advance(*b, it);
          advance(*before, it);
        }
        fill_grads(*a, 3);
        std::vector<float>& g = a->g[spot.tensor];
        g[spot.where == 0 ? 0 : (spot.where == 1 ? g.size() / 2 : g.size() - 1)] = spot.value;
        const StepResult res = a->opt->step();
        EXPECT_TRUE(res.skipped);
        EXPECT_FALSE(std::isfinite(res.grad_norm));
        EXPECT_EQ(res.step, 3);
        EXPECT_EQ(a->opt->skipped_steps(), 1);
        EXPECT_TRUE(identical(*a, *before, false)) << "the skipped step changed something";
        for (int it = 3; it < 5; ++it) {
          advance(*a, it);
          advance(*b, it);
        }
        EXPECT_EQ(a->opt->skipped_steps(), 1);
        EXPECT_TRUE(identical(*a, *b, false)) << "the steps after the skipped one differ";
      }
    }
  }
}

// Finite gradients whose g / grad_scale overflows float: the norm is summed in double, where it is
// finite, so the step policy skips any norm beyond float range (math::decide_step), as AMP's
// scaler skips a step whose unscaled fp32 gradients hold inf.
TEST(NonFiniteGradients, OverflowAfterUnscalingIsSkippedToo) {
  // Finite gradients whose grad / grad_scale overflows, as with a loss scale that is too small.
  RunSetup setup;
  setup.shapes = {{4097}, {3, 5}};
  const Arrays init = initial_params(setup.shapes, 9);
  auto a = make_run(setup, init), before = make_run(setup, init);
  advance(*a, 0);
  advance(*before, 0);
  fill_grads(*a, 1);
  a->g[1][4] = 1e30f;
  StepOptions o;
  o.grad_scale = 1e-20f;
  EXPECT_TRUE(a->opt->step(o).skipped);
  for (const auto& p : a->p)
    for (float x : p) ASSERT_TRUE(std::isfinite(x)) << "the step made the parameters non-finite";
  EXPECT_TRUE(identical(*a, *before, false));
  EXPECT_EQ(a->opt->skipped_steps(), 1);
}

// A finite gradient whose square overflows float (|g| > sqrt(FLT_MAX) = 1.84e19) would put inf in a
// second moment (8-bit: NaN in its whole block) and make every later save unloadable: the step is
// skipped like a non-finite one. Just below the limit it is taken, and the state stays finite; with
// clipping the applied gradient is small, and the step is taken too.
TEST(NonFiniteGradients, GradientsWhoseSquaresOverflowAreSkipped) {
  for (Precision precision : {Precision::kFp32, Precision::kBf16, Precision::kInt8, Precision::kFp8}) {
    SCOPED_TRACE(std::string(precision_name(precision)));
    RunSetup setup;
    setup.shapes = {{4097}};
    setup.precision = precision;
    const Arrays init = initial_params(setup.shapes, 6);
    auto a = make_run(setup, init), before = make_run(setup, init);
    advance(*a, 0);
    advance(*before, 0);
    fill_grads(*a, 1);
    a->g[0][7] = 1e20f;
    const StepResult res = a->opt->step();
    EXPECT_TRUE(res.skipped);
    EXPECT_TRUE(std::isfinite(res.grad_norm) && res.grad_norm >= 1e20) << res.grad_norm;
    EXPECT_TRUE(identical(*a, *before, false)) << "the skipped step changed something";
    a->g[0][7] = 1e19f;
    EXPECT_FALSE(a->opt->step().skipped);
    for (const std::string& name : a->opt->state_names(0))
      for (float v : a->opt->state_values(0, name)) ASSERT_TRUE(std::isfinite(v)) << name;
    setup.max_grad_norm = 1.0f;
    auto c = make_run(setup, init);
    advance(*c, 0);
    fill_grads(*c, 1);
    c->g[0][7] = 1e20f;
    EXPECT_FALSE(c->opt->step().skipped);
    for (const std::string& name : c->opt->state_names(0))
      for (float v : c->opt->state_values(0, name)) ASSERT_TRUE(std::isfinite(v)) << name;
  }
}

// found_inf (an AMP scaler's verdict) skips a step with finite gradients, computes no norm and
// changes nothing; the CUDA backend's device flag does the same (tests/gpu/optim_cuda_test.cpp).
TEST(NonFiniteGradients, FoundInfSkipsWithoutANorm) {
  RunSetup setup;
  setup.shapes = {{4097}, {3, 5}};
  setup.precision = Precision::kInt8;
  const Arrays init = initial_params(setup.shapes, 5);
  auto a = make_run(setup, init), before = make_run(setup, init);
  advance(*a, 0);
  advance(*before, 0);
  fill_grads(*a, 1);
  StepOptions o;
  o.found_inf = true;
  const StepResult res = a->opt->step(o);
  EXPECT_TRUE(res.skipped);
  EXPECT_TRUE(std::isnan(res.grad_norm)) << res.grad_norm;
  EXPECT_EQ(res.step, 1);
  EXPECT_EQ(a->opt->skipped_steps(), 1);
  EXPECT_TRUE(identical(*a, *before, false)) << "the skipped step changed something";
}

TEST(NonFiniteGradients, CheckFiniteOffLetsTheStepThrough) {
  // The flag is what skips: with it off (and no clipping) a NaN step is taken (and counted).
  RunSetup setup;
  setup.shapes = {{40}};
  setup.check_finite = false;
  auto a = make_run(setup, initial_params(setup.shapes, 1));
  fill_grads(*a, 0);
  a->g[0][3] = kNaN;
  const StepResult res = a->opt->step();
  EXPECT_FALSE(res.skipped);
  EXPECT_EQ(a->opt->step_count(), 1);
  EXPECT_TRUE(std::isnan(a->p[0][3]));
}

TEST(NonFiniteGradients, BadGradScaleOrLrScaleThrowsAndChangesNothing) {
  RunSetup setup;
  setup.shapes = {{4097}, {3, 5}};
  const Arrays init = initial_params(setup.shapes, 4);
  auto a = make_run(setup, init), b = make_run(setup, init);
  advance(*a, 0);
  advance(*b, 0);
  fill_grads(*a, 1);
  for (float scale : {0.0f, -0.0f, -1.0f, kNaN, kInf, -kInf}) {
    StepOptions o;
    o.grad_scale = scale;
    const std::string m = thrown_message<InvalidArgument>([&] { a->opt->step(o); }, "grad_scale");
    expect_mentions(m, {"grad_scale"}, "grad_scale " + std::to_string(scale));
  }
  for (float scale : {-1.0f, kNaN, kInf}) {
    StepOptions o;
    o.lr_scale = scale;
    const std::string m = thrown_message<InvalidArgument>([&] { a->opt->step(o); }, "lr_scale");
    expect_mentions(m, {"lr_scale"}, "lr_scale " + std::to_string(scale));
  }
  EXPECT_EQ(a->opt->skipped_steps(), 0);
  EXPECT_TRUE(identical(*a, *b));
  advance(*a, 1);
  advance(*b, 1);
  EXPECT_TRUE(identical(*a, *b));
}

// ---------------------------------------------------------------------------------------------
// 5. Bad construction input.

struct Tiny {
  std::vector<float> w = std::vector<float>(32, 0.5f), g = std::vector<float>(32, 0.1f);
  std::vector<float> w2 = std::vector<float>(6, 0.5f), g2 = std::vector<float>(6, 0.1f);
  std::vector<float> spare = std::vector<float>(8, 0.5f);
  std::vector<ParamGroup> groups() {
    ParamGroup group;
    group.params.push_back({"w", {4, 8}, w.data(), g.data()});
    group.params.push_back({"b", {6}, w2.data(), g2.data()});
    return {group};
  }
};

OptimizerOptions with_hyper(Algorithm a, const std::function<void(Hyper&)>& tweak) {
  OptimizerOptions o;
  o.algorithm = a;
  Hyper h = default_hyper(a);
  tweak(h);
  o.hyper = h;
  return o;
}

struct HyperCase {
  Algorithm algorithm;
  std::string field;
  std::function<void(Hyper&)> tweak;
  std::string value;  // as the message must show it
};

TEST(Validation, HyperparametersOutOfRangeAreRefusedByName) {
  std::vector<HyperCase> cases;
  for (Algorithm a : all_algorithms()) {
    cases.push_back({a, "lr", [](Hyper& h) { h.lr = -0.5f; }, "-0.5"});
    cases.push_back({a, "lr", [](Hyper& h) { h.lr = kNaN; }, "nan"});
    cases.push_back({a, "lr", [](Hyper& h) { h.lr = kInf; }, "inf"});
    cases.push_back({a, "weight_decay", [](Hyper& h) { h.weight_decay = -0.25f; }, "-0.25"});
    cases.push_back({a, "weight_decay", [](Hyper& h) { h.weight_decay = kNaN; }, "nan"});
  }
  for (Algorithm a : {Algorithm::kAdam, Algorithm::kAdamW, Algorithm::kAdamP, Algorithm::kLion, Algorithm::kSophiaG}) {
    cases.push_back({a, "beta1", [](Hyper& h) { h.beta1 = -0.5f; }, "-0.5"});
    cases.push_back({a, "beta1", [](Hyper& h) { h.beta1 = 1.0f; }, "1"});
    cases.push_back({a, "beta2", [](Hyper& h) { h.beta2 = 1.0f; }, "1"});
    cases.push_back({a, "beta2", [](Hyper& h) { h.beta2 = 1.5f; }, "1.5"});
    cases.push_back({a, "beta2", [](Hyper& h) { h.beta2 = kNaN; }, "nan"});
  }
  for (Algorithm a : {Algorithm::kAdam, Algorithm::kAdamW, Algorithm::kAdamP, Algorithm::kAdafactor}) {
    cases.push_back({a, "eps", [](Hyper& h) { h.eps = 0.0f; }, "got 0"});
    cases.push_back({a, "eps", [](Hyper& h) { h.eps = -1.0f; }, "-1"});
  }
  for (Algorithm a : {Algorithm::kSgd, Algorithm::kLion, Algorithm::kAdafactor, Algorithm::kAdamP, Algorithm::kQhm,
                      Algorithm::kSophiaG})
    cases.push_back({a, "amsgrad", [](Hyper& h) { h.amsgrad = true; }, "amsgrad"});
  const Algorithm sgd = Algorithm::kSgd, qhm = Algorithm::kQhm, af = Algorithm::kAdafactor,
                  adamp = Algorithm::kAdamP, sophia = Algorithm::kSophiaG;
  cases.push_back({sgd, "momentum", [](Hyper& h) { h.momentum = -0.5f; }, "-0.5"});
  cases.push_back({sgd, "momentum", [](Hyper& h) { h.momentum = 1.5f; }, "1.5"});
  cases.push_back({sgd, "dampening", [](Hyper& h) { h.dampening = 1.5f; }, "1.5"});
  cases.push_back({sgd, "dampening", [](Hyper& h) { h.dampening = -0.5f; }, "-0.5"});
  cases.push_back({sgd, "nesterov", [](Hyper& h) { h.nesterov = true; h.momentum = 0.0f; }, "momentum 0"});
  cases.push_back({sgd, "nesterov", [](Hyper& h) { h.nesterov = true; h.dampening = 0.5f; }, "dampening 0.5"});
  cases.push_back({qhm, "momentum", [](Hyper& h) { h.momentum = 1.5f; }, "1.5"});
  cases.push_back({qhm, "nu", [](Hyper& h) { h.nu = 1.5f; }, "1.5"});
  cases.push_back({qhm, "nu", [](Hyper& h) { h.nu = -0.5f; }, "-0.5"});
  cases.push_back({qhm, "nu", [](Hyper& h) { h.nu = kNaN; }, "nan"});
  cases.push_back({af, "beta1", [](Hyper& h) { h.first_moment = true; h.beta1 = 1.0f; }, "1"});
  cases.push_back({af, "eps2", [](Hyper& h) { h.eps2 = -1.0f; }, "-1"});
  cases.push_back({af, "clip_threshold", [](Hyper& h) { h.clip_threshold = 0.0f; }, "got 0"});
  cases.push_back({af, "clip_threshold", [](Hyper& h) { h.clip_threshold = -1.0f; }, "-1"});
  cases.push_back({af, "decay_rate", [](Hyper& h) { h.decay_rate = 0.0f; }, "got 0"});
  cases.push_back({af, "decay_rate", [](Hyper& h) { h.decay_rate = -1.5f; }, "-1.5"});
  cases.push_back({af, "decay_rate", [](Hyper& h) { h.decay_rate = 0.5f; }, "0.5"});
  cases.push_back({af, "warmup_init", [](Hyper& h) { h.warmup_init = true; h.relative_step = false; }, "relative_step"});
  cases.push_back({adamp, "delta", [](Hyper& h) { h.delta = 0.0f; }, "got 0"});
  cases.push_back({adamp, "delta", [](Hyper& h) { h.delta = -0.5f; }, "-0.5"});
  cases.push_back({adamp, "wd_ratio", [](Hyper& h) { h.wd_ratio = 1.5f; }, "1.5"});
  cases.push_back({adamp, "wd_ratio", [](Hyper& h) { h.wd_ratio = -0.5f; }, "-0.5"});
  cases.push_back({sophia, "rho", [](Hyper& h) { h.rho = 0.0f; }, "got 0"});
  cases.push_back({sophia, "rho", [](Hyper& h) { h.rho = -0.5f; }, "-0.5"});
  cases.push_back({sophia, "rho", [](Hyper& h) { h.rho = kInf; }, "inf"});
  cases.push_back({sophia, "batch_tokens", [](Hyper& h) { h.batch_tokens = 0.0f; }, "got 0"});
  cases.push_back({sophia, "batch_tokens", [](Hyper& h) { h.batch_tokens = -5.0f; }, "-5"});
  const Algorithm sf = Algorithm::kAdamWScheduleFree;
  cases.push_back({sf, "warmup_steps", [](Hyper& h) { h.warmup_steps = -1.0f; }, "-1"});
  cases.push_back({sf, "warmup_steps", [](Hyper& h) { h.warmup_steps = kNaN; }, "nan"});
  cases.push_back({sf, "weight_lr_power", [](Hyper& h) { h.weight_lr_power = -2.0f; }, "-2"});
  cases.push_back({sf, "r", [](Hyper& h) { h.r = kInf; }, "inf"});
  cases.push_back({sf, "beta1", [](Hyper& h) { h.beta1 = 1.0f; }, "1"});
  cases.push_back({sf, "beta1", [](Hyper& h) { h.beta1 = 0.0f; }, "got 0"});
  cases.push_back({sf, "beta2", [](Hyper& h) { h.beta2 = kNaN; }, "nan"});
  cases.push_back({sf, "eps", [](Hyper& h) { h.eps = 0.0f; }, "got 0"});

  Tiny t;
  for (const HyperCase& c : cases) {
    const std::string what = std::string(algorithm_name(c.algorithm)) + " " + c.field + " " + c.value;
    const OptimizerOptions o = with_hyper(c.algorithm, c.tweak);
    const std::string m1 = thrown_message<InvalidArgument>([&] { Optimizer opt(t.groups(), o); }, what);
    expect_mentions(m1, {c.field, c.value}, what);
    const std::string m2 = thrown_message<InvalidArgument>([&] { validate_hyper(c.algorithm, *o.hyper); }, what);
    EXPECT_EQ(m1, m2);
  }
}

TEST(Validation, BoundaryHyperparametersAreAccepted) {
  // The rules are no stricter than stated: edge values inside the ranges construct and step.
  Tiny t;
  std::vector<std::pair<Algorithm, std::function<void(Hyper&)>>> ok;
  for (Algorithm a : all_algorithms()) {
    ok.push_back({a, [](Hyper& h) { h.lr = 0.0f; h.weight_decay = 0.0f; }});
    ok.push_back({a, [](Hyper&) {}});
  }
  for (Algorithm a : {Algorithm::kAdam, Algorithm::kAdamW, Algorithm::kAdamP, Algorithm::kLion, Algorithm::kSophiaG})
    ok.push_back({a, [](Hyper& h) { h.beta1 = 0.0f; h.beta2 = 0.0f; }});
  ok.push_back({Algorithm::kSgd, [](Hyper& h) { h.momentum = 1.0f; h.dampening = 1.0f; }});
  ok.push_back({Algorithm::kSgd, [](Hyper& h) { h.momentum = 0.0f; }});
  ok.push_back({Algorithm::kQhm, [](Hyper& h) { h.nu = 0.0f; h.momentum = 0.0f; }});
  ok.push_back({Algorithm::kQhm, [](Hyper& h) { h.nu = 1.0f; h.momentum = 1.0f; }});
  ok.push_back({Algorithm::kAdafactor, [](Hyper& h) { h.decay_rate = -1.0f; h.eps2 = 0.0f; }});
  ok.push_back({Algorithm::kAdamP, [](Hyper& h) { h.wd_ratio = 0.0f; }});
  ok.push_back({Algorithm::kAdamP, [](Hyper& h) { h.wd_ratio = 1.0f; }});
  for (auto& [a, tweak] : ok) {
    SCOPED_TRACE(std::string(algorithm_name(a)));
    const OptimizerOptions o = with_hyper(a, tweak);
    EXPECT_NO_THROW(validate_hyper(a, *o.hyper));
    EXPECT_NO_THROW({
      Optimizer opt(t.groups(), o);
      opt.step();
    });
  }
}

TEST(Validation, BadOptionsAreRefusedByName) {
  Tiny t;
  auto refuse = [&](const std::string& what, const std::function<void(OptimizerOptions&)>& tweak,
                    std::initializer_list<std::string_view> mentions) {
    OptimizerOptions o;
    tweak(o);
    const std::string m = thrown_message<InvalidArgument>([&] { Optimizer opt(t.groups(), o); }, what);
    expect_mentions(m, mentions, what);
  };
  for (int block : {100, 8, 1 << 20, -16, 0x7fffffff, 4097, 8192, 1, 15})
    refuse("block_size " + std::to_string(block), [block](OptimizerOptions& o) { o.block_size = block; },
           {"block_size", std::to_string(block)});
  refuse("min_quant_size", [](OptimizerOptions& o) { o.min_quant_size = -1; }, {"min_quant_size", "-1"});
  refuse("max_grad_norm", [](OptimizerOptions& o) { o.max_grad_norm = -1.0f; }, {"max_grad_norm", "-1"});
  refuse("max_grad_norm nan", [](OptimizerOptions& o) { o.max_grad_norm = kNaN; }, {"max_grad_norm", "nan"});
  refuse("max_grad_norm inf", [](OptimizerOptions& o) { o.max_grad_norm = kInf; }, {"max_grad_norm", "inf"});
  refuse("unknown algorithm", [](OptimizerOptions& o) { o.algorithm = static_cast<Algorithm>(200); },
         {"algorithm", "200"});
  refuse("unknown precision", [](OptimizerOptions& o) { o.precision = static_cast<Precision>(9); }, {"precision", "9"});
  EXPECT_THROW(validate_hyper(static_cast<Algorithm>(200), Hyper{}), InvalidArgument);

  // Accepted: every power of two in range, at each quantized precision.
  for (int block = 16; block <= 4096; block *= 2)
    for (Precision p : {Precision::kInt8, Precision::kInt4, Precision::kFp8}) {
      OptimizerOptions o;
      o.block_size = block;
      o.precision = p;
      o.min_quant_size = 0;
      EXPECT_NO_THROW(Optimizer(t.groups(), o)) << block;
    }
}

TEST(Validation, BadParameterListsAreRefusedByName) {
  Tiny t;
  auto refuse = [&](const std::string& what, std::vector<ParamGroup> groups,
                    std::initializer_list<std::string_view> mentions, OptimizerOptions o = {}) {
    const std::string m = thrown_message<InvalidArgument>([&] { Optimizer opt(std::move(groups), o); }, what);
    expect_mentions(m, mentions, what);
  };
  refuse("no groups", {}, {"no parameter groups"});
  refuse("only empty groups", {ParamGroup{}, ParamGroup{}}, {"empty"});
  {
    auto g = t.groups();
    g[0].params[1].data = nullptr;
    refuse("null data", g, {"'b'", "no data"});
  }
  {
    auto g = t.groups();
    g[0].params[1].shape = {3, -2};
    refuse("negative extent", g, {"'b'", "-2"});
  }
  {
    auto g = t.groups();
    g[0].params[1].name = "w";
    refuse("duplicate name", g, {"'w'", "twice"});
  }
  {
    auto g = t.groups();
    ParamGroup other;
    other.params.push_back({"w", {2}, t.spare.data(), nullptr});
    g.push_back(other);
    refuse("duplicate name across groups", g, {"'w'", "twice"});
  }
  {
    auto g = t.groups();
    g[0].params[1].data = t.w.data();
    refuse("same data twice", g, {"'b'", "'w'", "twice"});
  }
  {
    auto g = t.groups();
    g[0].params[1].shape = {std::int64_t{1} << 25, std::int64_t{1} << 24};  // 2^49 elements (never touched)
    refuse("too many elements", g, {"'b'", "562949953421312", "2^48"});
    const std::string m = thrown_message<InvalidArgument>(
        [&] { (void)planned_state_bytes(g, OptimizerOptions{}); }, "planned_state_bytes of 2^49 elements");
    expect_mentions(m, {"'b'", "2^48"}, "planned_state_bytes");
  }
  {
    auto g = t.groups();
    g[0].params[1].data = t.w.data() + 30;  // 6 elements from w's 31st: two of them are w's
    refuse("overlapping data", g, {"'w'", "'b'", "overlap"});
  }
  {
    auto g = t.groups();
    g[0].params[1].name = "b\xff\xfe";
    refuse("name not UTF-8", g, {"UTF-8"});
  }
  {
    auto g = t.groups();
    g[0].lr = -0.5f;
    refuse("group lr", g, {"lr", "group 0", "-0.5"});
  }
  {
    auto g = t.groups();
    g[0].lr = kNaN;
    refuse("group lr nan", g, {"lr", "nan"});
  }
  {
    auto g = t.groups();
    g[0].weight_decay = -1.0f;
    refuse("group weight_decay", g, {"weight_decay", "-1"});
  }
  {
    auto g = t.groups();
    g[0].precision = static_cast<Precision>(7);
    refuse("group precision", g, {"precision", "7"});
  }

  // Accepted: a zero-size parameter without data, an empty group next to a full one, unnamed
  // parameters (named param.<index>), a parameter without a gradient.
  auto g = t.groups();
  g[0].params.push_back({"empty", {0, 5}, nullptr, nullptr});
  g[0].params.push_back({"", {2}, t.spare.data() + 4, nullptr});
  g.push_back(ParamGroup{});
  std::unique_ptr<Optimizer> opt;
  ASSERT_NO_THROW(opt = std::make_unique<Optimizer>(g, OptimizerOptions{}));
  EXPECT_EQ(opt->param_count(), 4u);
  EXPECT_EQ(opt->param(3).name, "param.3");
  EXPECT_NO_THROW(opt->step());
}

TEST(Validation, BadCallsAfterConstructionAreRefusedAndChangeNothing) {
  TempDir dir;
  // update_hessian: wrong optimizer, wrong count, non-finite estimate.
  RunSetup s;
  s.algorithm = Algorithm::kSophiaG;
  s.precision = Precision::kInt8;
  s.shapes = {{4097}, {3, 5}};
  const Arrays init = initial_params(s.shapes, 6);
  auto a = make_run(s, init), b = make_run(s, init);
  for (int it = 0; it < 3; ++it) {
    advance(*a, it);
    advance(*b, it);
  }
  std::vector<float> ones0(4097, 1.0f), ones1(15, 1.0f);
  const float* one[] = {ones0.data()};
  const float* three[] = {ones0.data(), ones1.data(), ones1.data()};
  std::string m = thrown_message<InvalidArgument>([&] { a->opt->update_hessian(one); }, "one estimate");
  expect_mentions(m, {"2", "1"}, "one estimate");
  m = thrown_message<InvalidArgument>([&] { a->opt->update_hessian({}); }, "no estimates");
  expect_mentions(m, {"2", "0"}, "no estimates");
  m = thrown_message<InvalidArgument>([&] { a->opt->update_hessian(three); }, "three estimates");
  expect_mentions(m, {"2", "3"}, "three estimates");
  ones1[14] = kNaN;
  const float* bad[] = {ones0.data(), ones1.data()};
  m = thrown_message<InvalidArgument>([&] { a->opt->update_hessian(bad); }, "NaN estimate");
  expect_mentions(m, {"w1", "nan", "14"}, "NaN estimate");
  EXPECT_TRUE(identical(*a, *b));
  advance(*a, 3);
  advance(*b, 3);
  EXPECT_TRUE(identical(*a, *b));

  RunSetup adam;
  adam.shapes = {{8}};
  auto c = make_run(adam, initial_params(adam.shapes, 1));
  const float* est[] = {c->g[0].data()};
  m = thrown_message<InvalidArgument>([&] { c->opt->update_hessian(est); }, "update_hessian on adamw");
  expect_mentions(m, {"sophiag", "adamw"}, "update_hessian on adamw");

  // Indexes and names out of range.
  m = thrown_message<InvalidArgument>([&] { c->opt->set_grad(1, nullptr); }, "set_grad");
  expect_mentions(m, {"1"}, "set_grad");
  thrown_message<InvalidArgument>([&] { c->opt->param(5); }, "param");
  thrown_message<InvalidArgument>([&] { c->opt->state_names(1); }, "state_names");
  m = thrown_message<InvalidArgument>([&] { c->opt->state_values(0, "exp_avg_sqq"); }, "state_values");
  expect_mentions(m, {"exp_avg_sqq"}, "state_values");
}


// ---------------------------------------------------------------------------------------------
// 6. Hyperparameters changed between steps (set_hyper).

// Every number the algorithm reads moved to another valid value, and every flag it reads toggled
// where the result is valid, except amsgrad and first_moment (they decide the state kept).
Hyper moved_hyper(Algorithm a, const Hyper& from) {
  const AlgorithmSpec& spec = algorithm_spec(a);
  Hyper h = from;
  h.lr = from.lr * 0.5f;
  h.weight_decay = from.weight_decay + 0.02f;
  for (const HyperUse& use : spec.numbers) {
    const HyperField* f = find_hyper_field(use.name);
    float& v = h.*f->number;
    switch (use.range) {
      case HyperRange::kBeta: case HyperRange::kUnit: case HyperRange::kOpenUnit: v = v > 0.0f ? v * 0.95f : 0.1f; break;
      case HyperRange::kPositive: case HyperRange::kNonNegative: v = v > 0.0f ? v * 1.5f : 0.25f; break;
      case HyperRange::kFinite: v = v * 1.1f + 0.01f; break;
      case HyperRange::kDecayRate: v = v == -0.7f ? -0.6f : -0.7f; break;
      case HyperRange::kStepCount: v = v == 4.0f ? 5.0f : 4.0f; break;
      case HyperRange::kPower: case HyperRange::kSignedPower: v += 0.5f; break;
      case HyperRange::kChoice: v = std::fmod(v + 1.0f, static_cast<float>(f->choices.size())); break;
    }
  }
  for (std::string_view name : spec.flags) {
    if (name == "amsgrad" || name == "first_moment") continue;
    Hyper toggled = h;
    toggled.*find_hyper_field(name)->flag = !(h.*find_hyper_field(name)->flag);
    try {
      validate_hyper(a, toggled);
      h = toggled;
    } catch (const InvalidArgument&) {  // e.g. SGD's nesterov without momentum
    }
  }
  validate_hyper(a, h);
  return h;
}

class HyperChange : public ::testing::TestWithParam<Algorithm> {};

TEST_P(HyperChange, SetHyperEqualsAnOptimizerMadeWithTheNewValues) {
  // An optimizer whose hyperparameters change after three steps continues as one made with the
  // new values and loaded with its state: every field the algorithm reads, every precision.
  TempDir dir;
  for (Precision precision : all_precisions()) {
    RunSetup setup;
    setup.algorithm = GetParam();
    setup.precision = precision;
    SCOPED_TRACE(label(setup));
    const Hyper before = rich_hyper(setup.algorithm), after = moved_hyper(setup.algorithm, before);
    auto a = make_run(setup, initial_params(setup.shapes, 9));
    for (int it = 0; it < 3; ++it) advance(*a, it);
    a->opt->save(dir / "three.safetensors");
    auto unchanged = make_run(setup, a->p);  // control: continues with the old values
    unchanged->opt->load(dir / "three.safetensors");
    a->opt->set_hyper(after);
    EXPECT_EQ(a->opt->hyper().lr, after.lr);
    RunSetup made = setup;
    made.hyper = after;
    auto b = make_run(made, a->p);
    b->opt->load(dir / "three.safetensors");
    for (int it = 3; it < 7; ++it) {
      advance(*a, it);
      advance(*b, it);
      advance(*unchanged, it);
    }
    EXPECT_TRUE(identical(*a, *b));
    bool differs = false;
    for (std::size_t i = 0; i < a->p.size(); ++i) differs = differs || !same_bits(a->p[i], unchanged->p[i]);
    EXPECT_TRUE(differs) << "the new hyperparameters changed nothing";
    // A save records the values in use.
    a->opt->save(dir / "a.safetensors");
    b->opt->save(dir / "b.safetensors");
    EXPECT_TRUE(read_bytes(dir / "a.safetensors") == read_bytes(dir / "b.safetensors"));
  }
}

INSTANTIATE_TEST_SUITE_P(AllAlgorithms, HyperChange, ::testing::ValuesIn(all_algorithms()),
                         [](const ::testing::TestParamInfo<Algorithm>& info) {
                           return std::string(algorithm_name(info.param));
                         });

TEST(HyperChange, GroupsKeepTheirOwnRatesAndExemptTensorsStayUndecayed) {
  // Group 0 sets its own lr and weight decay, group 1 takes the optimizer's; "b" is exempt from
  // weight decay by name. After set_hyper only group 1's rates follow.
  struct Setup {
    std::vector<float> w0 = std::vector<float>(24, 0.5f), w1 = std::vector<float>(24, 0.5f), b = std::vector<float>(6, 0.5f);
    std::vector<float> g0 = std::vector<float>(24, 0.1f), g1 = std::vector<float>(24, -0.2f), gb = std::vector<float>(6, 0.3f);
    std::unique_ptr<Optimizer> opt;
    explicit Setup(const Hyper& hyper) {
      ParamGroup own, shared;
      own.params.push_back({"w0", {4, 6}, w0.data(), g0.data()});
      own.lr = 0.01f;
      own.weight_decay = 0.5f;
      shared.params.push_back({"w1", {4, 6}, w1.data(), g1.data()});
      shared.params.push_back({"b", {6}, b.data(), gb.data()});
      OptimizerOptions o;
      o.algorithm = Algorithm::kAdamW;
      o.hyper = hyper;
      o.no_decay_names = {"b"};
      opt = std::make_unique<Optimizer>(std::vector<ParamGroup>{own, shared}, o);
    }
  };
  Hyper before = default_hyper(Algorithm::kAdamW), after = before;
  after.lr = 0.2f;
  after.weight_decay = 0.3f;
  Setup changed(before), made(after), own_only(before);
  changed.opt->set_hyper(after);
  for (int it = 0; it < 3; ++it) {
    changed.opt->step();
    made.opt->step();
    own_only.opt->step();
  }
  EXPECT_TRUE(same_bits(changed.w0, own_only.w0)) << "group 0's own lr and weight decay were replaced";
  EXPECT_TRUE(same_bits(changed.w1, made.w1));
  EXPECT_TRUE(same_bits(changed.b, made.b));
  // The exempt tensor stays undecayed: its weight decay is not the new 0.3.
  Hyper undecayed = after;
  undecayed.weight_decay = 0.0f;
  Setup no_decay(undecayed);
  for (int it = 0; it < 3; ++it) no_decay.opt->step();
  EXPECT_TRUE(same_bits(changed.b, no_decay.b));
  EXPECT_FALSE(same_bits(changed.w1, no_decay.w1));
}

TEST(HyperChange, RefusedChangesNameTheFieldAndChangeNothing) {
  struct Case {
    Algorithm algorithm;
    std::function<void(Hyper&)> tweak;
    std::vector<std::string> mentions;
    bool eval = false;
  };
  const std::vector<Case> cases = {
      {Algorithm::kAdam, [](Hyper& h) { h.amsgrad = !h.amsgrad; }, {"adam", "amsgrad", "state"}},
      {Algorithm::kAdafactor, [](Hyper& h) { h.first_moment = !h.first_moment; }, {"adafactor", "first_moment"}},
      {Algorithm::kAdamW, [](Hyper& h) { h.beta1 = 1.0f; }, {"adamw", "beta1", "1"}},
      {Algorithm::kAdamW, [](Hyper& h) { h.eps = kNaN; }, {"eps", "nan"}},
      {Algorithm::kLion, [](Hyper& h) { h.beta2 = -0.5f; }, {"lion", "beta2", "-0.5"}},
      {Algorithm::kMuon, [](Hyper& h) { h.ns_steps = 2.5f; }, {"muon", "ns_steps", "2.5"}},
      {Algorithm::kSgd, [](Hyper& h) { h.amsgrad = true; }, {"amsgrad"}},
      {Algorithm::kAdamWScheduleFree, [](Hyper& h) { h.beta1 = 0.8f; }, {"beta1", "eval mode", "train"}, true},
  };
  for (const Case& c : cases) {
    RunSetup setup;
    setup.algorithm = c.algorithm;
    setup.precision = Precision::kInt8;
    SCOPED_TRACE(label(setup) + " " + c.mentions.front());
    auto a = make_run(setup, initial_params(setup.shapes, 3));
    auto twin = make_run(setup, a->p);
    for (int it = 0; it < 2; ++it) {
      advance(*a, it);
      advance(*twin, it);
    }
    if (c.eval) a->opt->eval();
    Hyper h = a->opt->hyper();
    c.tweak(h);
    const Hyper held = a->opt->hyper();
    const std::string m = thrown_message<InvalidArgument>([&] { a->opt->set_hyper(h); }, "set_hyper");
    for (const std::string& part : c.mentions) expect_mentions(m, {part}, "set_hyper");
    EXPECT_EQ(std::memcmp(&held, &a->opt->hyper(), sizeof(Hyper)), 0) << "a refused set_hyper changed hyper()";
    if (c.eval) {  // the twin takes the same (rounding) round trip through x
      a->opt->train();
      twin->opt->eval();
      twin->opt->train();
    }
    for (int it = 2; it < 4; ++it) {
      advance(*a, it);
      advance(*twin, it);
    }
    EXPECT_TRUE(identical(*a, *twin));
  }
  // In train mode schedule-free AdamW's beta1 may change; eval() and train() then use the new one.
  RunSetup sf;
  sf.algorithm = Algorithm::kAdamWScheduleFree;
  auto a = make_run(sf, initial_params(sf.shapes, 4));
  for (int it = 0; it < 2; ++it) advance(*a, it);
  Hyper h = a->opt->hyper();
  h.beta1 = 0.8f;
  a->opt->set_hyper(h);
  const Arrays y = a->p;
  a->opt->eval();
  a->opt->train();
  for (std::size_t i = 0; i < y.size(); ++i)
    for (std::size_t e = 0; e < y[i].size(); ++e) ASSERT_NEAR(a->p[i][e], y[i][e], 1e-6f) << "parameter " << i;
}

}  // namespace
}  // namespace nibble
