// The algorithm table and the hyperparameter table (include/nibble/algorithms.hpp), and the name,
// default and validation functions of include/nibble/optim.hpp that read them. Adding an algorithm
// means one entry here; its math lives in src/math/rules.hpp.
#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <ostream>
#include <string>

#include <fmt/format.h>

#include "nibble/algorithms.hpp"
#include "nibble/error.hpp"
#include "nibble/optim.hpp"

namespace nibble {
namespace {

// In the order of enum AdjustLr.
constexpr std::string_view kAdjustLrChoices[] = {"original", "match_rms_adamw", "spectral_unclamped"};

constexpr std::array kHyperFields = {
    HyperField{"lr", &Hyper::lr},
    HyperField{"weight_decay", &Hyper::weight_decay},
    HyperField{"beta1", &Hyper::beta1},
    HyperField{"beta2", &Hyper::beta2},
    HyperField{"eps", &Hyper::eps},
    HyperField{"momentum", &Hyper::momentum},
    HyperField{"dampening", &Hyper::dampening},
    HyperField{"nesterov", nullptr, &Hyper::nesterov},
    HyperField{"amsgrad", nullptr, &Hyper::amsgrad, true},
    HyperField{"maximize", nullptr, &Hyper::maximize},
    HyperField{"bias_correction", nullptr, &Hyper::bias_correction},
    HyperField{"decoupled_weight_decay", nullptr, &Hyper::decoupled_weight_decay},
    HyperField{"nu", &Hyper::nu},
    HyperField{"eps2", &Hyper::eps2},
    HyperField{"clip_threshold", &Hyper::clip_threshold},
    HyperField{"decay_rate", &Hyper::decay_rate},
    HyperField{"first_moment", nullptr, &Hyper::first_moment},
    HyperField{"relative_step", nullptr, &Hyper::relative_step},
    HyperField{"scale_parameter", nullptr, &Hyper::scale_parameter},
    HyperField{"warmup_init", nullptr, &Hyper::warmup_init},
    HyperField{"delta", &Hyper::delta},
    HyperField{"wd_ratio", &Hyper::wd_ratio},
    HyperField{"rho", &Hyper::rho},
    HyperField{"batch_tokens", &Hyper::batch_tokens},
    HyperField{"beta3", &Hyper::beta3, nullptr, false, false},
    HyperField{"alpha", &Hyper::alpha, nullptr, false, false},
    HyperField{"alpha_warmup", &Hyper::alpha_warmup, nullptr, false, false},
    HyperField{"beta3_warmup", &Hyper::beta3_warmup, nullptr, false, false},
    HyperField{"clip_exponent", &Hyper::clip_exponent, nullptr, false, false},
    HyperField{"warmup_steps", &Hyper::warmup_steps, nullptr, false, false},
    HyperField{"r", &Hyper::r, nullptr, false, false},
    HyperField{"weight_lr_power", &Hyper::weight_lr_power, nullptr, false, false},
    HyperField{"ns_steps", &Hyper::ns_steps, nullptr, false, false},
    HyperField{"ns_a", &Hyper::ns_a, nullptr, false, false},
    HyperField{"ns_b", &Hyper::ns_b, nullptr, false, false},
    HyperField{"ns_c", &Hyper::ns_c, nullptr, false, false},
    HyperField{"adjust_lr", &Hyper::adjust_lr, nullptr, false, false, kAdjustLrChoices},
    HyperField{"adamw_lr", &Hyper::adamw_lr, nullptr, false, false},
    HyperField{"adamw_eps", &Hyper::adamw_eps, nullptr, false, false},
    HyperField{"adamw_weight_decay", &Hyper::adamw_weight_decay, nullptr, false, false},
};

// Defaults: Hyper's own values, changed where the algorithm's reference code differs.
template <class Fn>
constexpr Hyper hyper_with(Fn&& change) {
  Hyper h;
  change(h);
  return h;
}

using R = HyperRange;
constexpr HyperUse kAdamNumbers[] = {{"beta1", R::kBeta}, {"beta2", R::kBeta}, {"eps", R::kPositive}};
constexpr HyperUse kBetas[] = {{"beta1", R::kBeta}, {"beta2", R::kBeta}};
constexpr HyperUse kSgdNumbers[] = {{"momentum", R::kUnit}, {"dampening", R::kUnit}};
constexpr HyperUse kQhmNumbers[] = {{"momentum", R::kUnit}, {"nu", R::kUnit}};
constexpr HyperUse kAdafactorNumbers[] = {
    {"eps", R::kPositive}, {"eps2", R::kNonNegative}, {"clip_threshold", R::kPositive}, {"decay_rate", R::kDecayRate}};
constexpr HyperUse kAdamPNumbers[] = {{"beta1", R::kBeta}, {"beta2", R::kBeta}, {"eps", R::kPositive},
                                      {"delta", R::kPositive}, {"wd_ratio", R::kUnit}};
constexpr HyperUse kSophiaNumbers[] = {
    {"beta1", R::kBeta}, {"beta2", R::kBeta}, {"rho", R::kPositive}, {"batch_tokens", R::kPositive}};

constexpr HyperUse kAdoptNumbers[] = {
    {"beta1", R::kBeta}, {"beta2", R::kBeta}, {"eps", R::kPositive}, {"clip_exponent", R::kFinite}};
constexpr HyperUse kAdemamixNumbers[] = {{"beta1", R::kBeta},  {"beta2", R::kBeta},         {"beta3", R::kBeta},
                                         {"eps", R::kPositive}, {"alpha", R::kNonNegative},
                                         {"alpha_warmup", R::kNonNegative}, {"beta3_warmup", R::kNonNegative}};
// beta1 0 has no x: eval() sets x = y + (1 - 1/beta1) (z - y).
constexpr HyperUse kScheduleFreeNumbers[] = {{"beta1", R::kOpenUnit},         {"beta2", R::kBeta},
                                             {"eps", R::kPositive},       {"warmup_steps", R::kNonNegative},
                                             {"r", R::kSignedPower},      {"weight_lr_power", R::kPower}};
constexpr HyperUse kMuonNumbers[] = {
    {"momentum", R::kUnit},        {"eps", R::kPositive},           {"ns_steps", R::kStepCount},
    {"ns_a", R::kFinite},          {"ns_b", R::kFinite},            {"ns_c", R::kFinite},
    {"adjust_lr", R::kChoice},     {"adamw_lr", R::kNonNegative},   {"beta1", R::kBeta},
    {"beta2", R::kBeta},           {"adamw_eps", R::kPositive},     {"adamw_weight_decay", R::kNonNegative}};

constexpr std::string_view kSgdFlags[] = {"nesterov", "decoupled_weight_decay"};
constexpr std::string_view kAdamFlags[] = {"amsgrad", "bias_correction", "decoupled_weight_decay"};
constexpr std::string_view kAdamWFlags[] = {"amsgrad", "bias_correction"};
constexpr std::string_view kAdafactorFlags[] = {"first_moment", "relative_step", "scale_parameter", "warmup_init"};
constexpr std::string_view kAdamPFlags[] = {"nesterov", "bias_correction"};
constexpr std::string_view kQhmFlags[] = {"decoupled_weight_decay"};
constexpr std::string_view kAdoptFlags[] = {"decoupled_weight_decay"};
constexpr std::string_view kAdemamixFlags[] = {"bias_correction"};
constexpr std::string_view kRAdamFlags[] = {"decoupled_weight_decay"};
constexpr std::string_view kMuonFlags[] = {"nesterov", "bias_correction"};  // bias_correction: the AdamW fallback's

void check_range(std::string_view algo, std::string_view what, float v, HyperRange range);

void check_sgd(const Hyper& h) {
  if (h.nesterov && (h.momentum <= 0.0f || h.dampening != 0.0f))
    throw InvalidArgument(fmt::format(
        "sgd: nesterov needs momentum > 0 and dampening 0, got momentum {} and dampening {}", h.momentum, h.dampening));
}

void check_adafactor(const Hyper& h) {
  if (h.first_moment) check_range("adafactor", "beta1", h.beta1, HyperRange::kBeta);
  if (h.warmup_init && !h.relative_step) throw InvalidArgument("adafactor: warmup_init needs relative_step");
}

int adam_slots(const Hyper& h, bool, StateSlot* out) {
  int n = 0;
  out[n++] = {"exp_avg", true};
  out[n++] = {"exp_avg_sq", false};
  if (h.amsgrad) out[n++] = {"max_exp_avg_sq", false};
  return n;
}

std::string adam_note(const Hyper& h) { return h.amsgrad ? "m, v, max v" : "m, v"; }

constexpr std::array kAlgorithmSpecs = {
    AlgorithmSpec{
        .id = Algorithm::kSgd,
        .name = "sgd",
        .title = "SGD with momentum (torch.optim.SGD semantics)",
        .defaults = hyper_with([](Hyper& h) { h.momentum = 0.9f; }),
        .numbers = kSgdNumbers,
        .flags = kSgdFlags,
        .check = check_sgd,
        .slots = [](const Hyper& h, bool, StateSlot* out) {
          if (h.momentum <= 0.0f) return 0;
          out[0] = {"momentum_buffer", true};
          return 1;
        },
        .state_note = [](const Hyper& h) -> std::string {
          return h.momentum > 0.0f ? "momentum buffer" : "none (momentum 0)";
        },
    },
    AlgorithmSpec{
        .id = Algorithm::kAdam,
        .name = "adam",
        .title = "Adam (Kingma & Ba, 2015)",
        .defaults = Hyper{},
        .numbers = kAdamNumbers,
        .flags = kAdamFlags,
        .slots = adam_slots,
        .state_note = adam_note,
    },
    AlgorithmSpec{
        .id = Algorithm::kAdamW,
        .name = "adamw",
        .title = "AdamW (Loshchilov & Hutter, 2019)",
        .defaults = hyper_with([](Hyper& h) {
          h.weight_decay = 0.01f;
          h.decoupled_weight_decay = true;
        }),
        .numbers = kAdamNumbers,
        .flags = kAdamWFlags,
        .always_decoupled = true,
        .slots = adam_slots,
        .state_note = adam_note,
    },
    AlgorithmSpec{
        .id = Algorithm::kLion,
        .name = "lion",
        .title = "Lion (Chen et al., 2023)",
        .defaults = hyper_with([](Hyper& h) {
          h.lr = 1e-4f;
          h.beta2 = 0.99f;
        }),
        .numbers = kBetas,
        .slots = [](const Hyper&, bool, StateSlot* out) {
          out[0] = {"exp_avg", true};
          return 1;
        },
        .state_note = [](const Hyper&) -> std::string { return "m"; },
    },
    AlgorithmSpec{
        .id = Algorithm::kAdafactor,
        .name = "adafactor",
        .title = "Adafactor (Shazeer & Stern, 2018)",
        .defaults = hyper_with([](Hyper& h) { h.eps = 1e-30f; }),
        .numbers = kAdafactorNumbers,
        .flags = kAdafactorFlags,
        .check = check_adafactor,
        .slots = [](const Hyper& h, bool factored, StateSlot* out) {
          int n = 0;
          if (!factored) out[n++] = {"exp_avg_sq", false};
          if (h.first_moment) out[n++] = {"exp_avg", true};
          return n;
        },
        .state_note = [](const Hyper& h) {
          return std::string(h.first_moment ? "m, " : "") + "factored v (fp32 rows/cols), full v for vectors";
        },
        .reduction = Reduction::kFactoredSecond,
        .factors_matrices = true,
        .split_refusal_matrix = "adafactor's factored second moment keeps row and column means of the whole matrix",
        .split_refusal_any = "adafactor scales and clips its update by the RMS of the whole tensor",
    },
    AlgorithmSpec{
        .id = Algorithm::kAdamP,
        .name = "adamp",
        .title = "AdamP (Heo et al., 2021)",
        .defaults = Hyper{},
        .numbers = kAdamPNumbers,
        .flags = kAdamPFlags,
        .slots = [](const Hyper&, bool, StateSlot* out) {
          out[0] = {"exp_avg", true};
          out[1] = {"exp_avg_sq", false};
          return 2;
        },
        .state_note = [](const Hyper&) -> std::string { return "m, v"; },
        .reduction = Reduction::kProjection,
        .split_refusal_matrix = "adamp's projection test takes cosines over whole rows and over the whole tensor",
    },
    AlgorithmSpec{
        .id = Algorithm::kQhm,
        .name = "qhm",
        .title = "Quasi-hyperbolic momentum (Ma & Yarats, 2019)",
        .defaults = hyper_with([](Hyper& h) { h.momentum = 0.999f; }),
        .numbers = kQhmNumbers,
        .flags = kQhmFlags,
        .slots = [](const Hyper&, bool, StateSlot* out) {
          out[0] = {"momentum_buffer", true};
          return 1;
        },
        .state_note = [](const Hyper&) -> std::string { return "momentum buffer"; },
    },
    AlgorithmSpec{
        .id = Algorithm::kSophiaG,
        .name = "sophiag",
        .alias = "sophia",
        .title = "SophiaG (Liu et al., 2023)",
        .defaults = hyper_with([](Hyper& h) {
          h.lr = 1e-4f;
          h.beta1 = 0.965f;
          h.beta2 = 0.99f;
          h.weight_decay = 0.1f;
        }),
        .numbers = kSophiaNumbers,
        .slots = [](const Hyper&, bool, StateSlot* out) {
          out[0] = {"exp_avg", true};
          out[1] = {"hessian", false};
          return 2;
        },
        .state_note = [](const Hyper&) -> std::string { return "m, hessian EMA"; },
        .hessian_slot = true,
    },
    AlgorithmSpec{
        .id = Algorithm::kAdopt,
        .name = "adopt",
        .title = "ADOPT (Taniguchi et al., 2024)",
        .defaults = hyper_with([](Hyper& h) {
          h.beta2 = 0.9999f;
          h.eps = 1e-6f;
        }),
        .numbers = kAdoptNumbers,
        .flags = kAdoptFlags,
        .slots = [](const Hyper&, bool, StateSlot* out) {
          out[0] = {"exp_avg", true};
          out[1] = {"exp_avg_sq", false};
          return 2;
        },
        .state_note = [](const Hyper&) -> std::string { return "m, v"; },
    },
    AlgorithmSpec{
        .id = Algorithm::kAdEMAMix,
        .name = "ademamix",
        .title = "AdEMAMix (Pagliardini et al., 2024)",
        .defaults = Hyper{},
        .numbers = kAdemamixNumbers,
        .flags = kAdemamixFlags,
        .always_decoupled = true,
        .slots = [](const Hyper&, bool, StateSlot* out) {
          out[0] = {"exp_avg", true};
          out[1] = {"exp_avg_sq", false};
          out[2] = {"exp_avg_slow", true};
          return 3;
        },
        .state_note = [](const Hyper&) -> std::string { return "m, v, slow m"; },
    },
    AlgorithmSpec{
        .id = Algorithm::kAdamWScheduleFree,
        .name = "adamw_schedulefree",
        .alias = "sf_adamw",
        .title = "Schedule-free AdamW (Defazio et al., 2024)",
        .defaults = hyper_with([](Hyper& h) { h.lr = 0.0025f; }),
        .numbers = kScheduleFreeNumbers,
        // z is the parameter's base sequence: an 8- or 4-bit code step would swallow its updates,
        // so it stays fp32 and the requested precision applies to v.
        .slots = [](const Hyper&, bool, StateSlot* out) {
          out[0] = {"z", true, true};
          out[1] = {"exp_avg_sq", false};
          return 2;
        },
        .state_note = [](const Hyper&) -> std::string { return "z (always fp32), v"; },
    },
    AlgorithmSpec{
        .id = Algorithm::kMuon,
        .name = "muon",
        .title = "Muon (Jordan et al., 2024) with its AdamW fallback",
        // torch.optim.Muon's; the fallback's as Keller Jordan's MuonWithAuxAdam.
        .defaults = hyper_with([](Hyper& h) {
          h.weight_decay = 0.1f;
          h.momentum = 0.95f;
          h.nesterov = true;
          h.eps = 1e-7f;
          h.beta2 = 0.95f;
        }),
        .numbers = kMuonNumbers,
        .flags = kMuonFlags,
        .always_decoupled = true,
        .slots = [](const Hyper&, bool orthogonalised, StateSlot* out) {
          if (orthogonalised) {
            out[0] = {"momentum_buffer", true};
            return 1;
          }
          out[0] = {"exp_avg", true};
          out[1] = {"exp_avg_sq", false};
          return 2;
        },
        .state_note = [](const Hyper&) -> std::string { return "momentum buffer (matrices); m, v (AdamW fallback)"; },
        .reduction = Reduction::kOrthogonalise,
        .orthogonalises_matrices = true,
        .split_refusal_matrix = "muon orthogonalises the whole matrix (Newton-Schulz); its AdamW fallback tensors "
                                "may be split",
    },
    AlgorithmSpec{
        .id = Algorithm::kRAdam,
        .name = "radam",
        .title = "RAdam (Liu et al., 2020; torch.optim.RAdam semantics)",
        .defaults = Hyper{},
        .numbers = kAdamNumbers,
        .flags = kRAdamFlags,
        .slots = adam_slots,
        .state_note = adam_note,
    },
};

// The enum's values and the table's order are the same, so a lookup is an index.
constexpr bool table_in_enum_order() {
  for (std::size_t i = 0; i < kAlgorithmSpecs.size(); ++i)
    if (static_cast<std::size_t>(kAlgorithmSpecs[i].id) != i) return false;
  return true;
}
static_assert(table_in_enum_order(), "kAlgorithmSpecs must list the algorithms in the order of enum Algorithm");

constexpr std::array kAlgorithms = [] {
  std::array<Algorithm, kAlgorithmSpecs.size()> out{};
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = kAlgorithmSpecs[i].id;
  return out;
}();

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
  return out;
}

void check_range(std::string_view algo, std::string_view what, float v, HyperRange range) {
  auto fail = [&](std::string_view rule) {
    throw InvalidArgument(fmt::format("{}: {} must be {}, got {}", algo, what, rule, v));
  };
  if (!std::isfinite(v)) fail("finite");
  switch (range) {
    case HyperRange::kFinite:
      break;
    case HyperRange::kNonNegative:
      if (v < 0.0f) fail(">= 0");
      break;
    case HyperRange::kPositive:
      if (v <= 0.0f) fail("> 0");
      break;
    case HyperRange::kBeta:
      if (v < 0.0f || v >= 1.0f) fail("in [0, 1)");
      break;
    case HyperRange::kUnit:
      if (v < 0.0f || v > 1.0f) fail("in [0, 1]");
      break;
    case HyperRange::kDecayRate:
      if (v < -1.0f || v >= 0.0f) fail("in [-1, 0)");
      break;
    case HyperRange::kOpenUnit:
      if (v <= 0.0f || v >= 1.0f) fail("in (0, 1)");
      break;
    case HyperRange::kStepCount:
      if (v < 1.0f || v > 99.0f || v != std::floor(v)) fail("an integer in [1, 99]");
      break;
    case HyperRange::kPower:
      if (v < 0.0f || v > 16.0f) fail("in [0, 16]");
      break;
    case HyperRange::kSignedPower:
      if (v < -16.0f || v > 16.0f) fail("in [-16, 16]");
      break;
    case HyperRange::kChoice: {
      const HyperField* field = find_hyper_field(what);
      const auto n = static_cast<float>(field != nullptr ? field->choices.size() : 0);
      if (v < 0.0f || v >= n || v != std::floor(v))
        fail(fmt::format("the index of one of {} (or its name)", field != nullptr ? hyper_choice_names(*field) : ""));
      break;
    }
  }
}

bool reads_flag(const AlgorithmSpec& spec, std::string_view flag) {
  return std::find(spec.flags.begin(), spec.flags.end(), flag) != spec.flags.end();
}

// "adam and adamw": the algorithms that read a flag, for the message refusing it elsewhere.
std::string readers_of(std::string_view flag) {
  std::string out;
  std::vector<std::string_view> names;
  for (const AlgorithmSpec& s : kAlgorithmSpecs)
    if (reads_flag(s, flag)) names.push_back(s.name);
  for (std::size_t i = 0; i < names.size(); ++i)
    out += fmt::format("{}{}", i == 0 ? "" : (i + 1 == names.size() ? " and " : ", "), names[i]);
  return out;
}

}  // namespace

std::span<const HyperField> hyper_fields() { return kHyperFields; }

std::string hyper_field_names() {
  std::string out;
  for (const HyperField& f : kHyperFields) out += fmt::format("{}{}", out.empty() ? "" : ", ", f.name);
  return out;
}

std::string hyper_choice_names(const HyperField& field) {
  std::string out;
  for (std::string_view c : field.choices) out += fmt::format("{}{}", out.empty() ? "" : ", ", c);
  return out;
}

float hyper_choice(const HyperField& field, std::string_view name) {
  for (std::size_t i = 0; i < field.choices.size(); ++i)
    if (field.choices[i] == name) return static_cast<float>(i);
  throw InvalidArgument(fmt::format("{} must be one of {}, got '{}'", field.name, hyper_choice_names(field), name));
}

const HyperField* find_hyper_field(std::string_view name) {
  for (const HyperField& f : kHyperFields)
    if (f.name == name) return &f;
  return nullptr;
}

std::span<const AlgorithmSpec> algorithm_specs() { return kAlgorithmSpecs; }

bool reads_hyper(const AlgorithmSpec& algorithm, std::string_view field) {
  if (field == "lr" || field == "weight_decay" || field == "maximize") return true;
  for (const HyperUse& use : algorithm.numbers)
    if (use.name == field) return true;
  return reads_flag(algorithm, field);
}

const AlgorithmSpec& algorithm_spec(Algorithm algorithm) {
  const auto i = static_cast<std::size_t>(algorithm);
  if (i >= kAlgorithmSpecs.size())
    throw InvalidArgument(fmt::format("algorithm {} is not a known algorithm", static_cast<int>(algorithm)));
  return kAlgorithmSpecs[i];
}

std::span<const Algorithm> all_algorithms() { return kAlgorithms; }

std::string algorithm_names() {
  std::string out;
  for (const AlgorithmSpec& a : kAlgorithmSpecs) out += fmt::format("{}{}", out.empty() ? "" : ", ", a.name);
  return out;
}

std::string_view algorithm_name(Algorithm algorithm) {
  const auto i = static_cast<std::size_t>(algorithm);
  return i < kAlgorithmSpecs.size() ? kAlgorithmSpecs[i].name : "unknown";
}

std::optional<Algorithm> algorithm_from_name(std::string_view name) {
  const std::string n = lower(name);
  for (const AlgorithmSpec& s : kAlgorithmSpecs)
    if (s.name == n || (!s.alias.empty() && s.alias == n)) return s.id;
  return std::nullopt;
}

std::ostream& operator<<(std::ostream& os, Algorithm algorithm) { return os << algorithm_name(algorithm); }

Hyper default_hyper(Algorithm algorithm) { return algorithm_spec(algorithm).defaults; }

void validate_hyper(Algorithm algorithm, const Hyper& h) {
  const AlgorithmSpec& spec = algorithm_spec(algorithm);
  check_range(spec.name, "lr", h.lr, HyperRange::kNonNegative);
  check_range(spec.name, "weight_decay", h.weight_decay, HyperRange::kNonNegative);
  for (const HyperUse& use : spec.numbers) check_range(spec.name, use.name, h.*(find_hyper_field(use.name)->number), use.range);
  for (const HyperField& f : kHyperFields)
    if (f.refused_unread && h.*f.flag && !reads_flag(spec, f.name))
      throw InvalidArgument(fmt::format("{}: {} is only for {}", spec.name, f.name, readers_of(f.name)));
  if (spec.check != nullptr) spec.check(h);
}

}  // namespace nibble
