// The algorithm table: one entry per optimizer algorithm (its names, defaults, the hyperparameters
// it reads and their valid ranges, the state it keeps, the whole-tensor statistics it needs), and
// one entry per hyperparameter field. The optimizer, the CLI, the C interface (and through it the
// Python package) read these tables; none keeps a list of its own.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "nibble/hyper.hpp"

namespace nibble {

// One field of Hyper: its name (as the C interface's JSON, saved state and Python know it) and its
// member. Exactly one of `number` and `flag` is set. A number with `choices` holds the index of one
// of them (Muon's adjust_lr); the C interface, the CLI and saved state also take it by name.
using HyperNumber = float Hyper::*;
using HyperFlag = bool Hyper::*;
struct HyperField {
  std::string_view name;
  HyperNumber number = nullptr;
  HyperFlag flag = nullptr;
  // A flag that an algorithm which does not read it refuses when set (rather than ignoring it).
  bool refused_unread = false;
  // Written to every state file (the fields of the first state schema); fields added since are
  // written only for the algorithms that read them, so existing algorithms' files do not change.
  bool in_every_file = true;
  std::span<const std::string_view> choices = {};
};
std::span<const HyperField> hyper_fields();
const HyperField* find_hyper_field(std::string_view name);
std::string hyper_field_names();  // "lr, weight_decay, ...", for messages
// The index of the choice `name` of a field with choices; throws InvalidArgument naming the field,
// the name and the choices.
float hyper_choice(const HyperField& field, std::string_view name);
std::string hyper_choice_names(const HyperField& field);  // "original, match_rms_adamw, ..." 

// The valid values of a number an algorithm reads; every range also requires a finite value.
enum class HyperRange : std::uint8_t {
  kFinite,       // any finite value
  kNonNegative,  // >= 0
  kPositive,     // > 0
  kBeta,         // [0, 1)
  kUnit,         // [0, 1]
  kDecayRate,    // [-1, 0)
  kOpenUnit,     // (0, 1)
  kStepCount,    // an integer in [1, 99] (Muon's Newton-Schulz steps)
  kPower,        // [0, 16]   (schedule-free AdamW's weighting powers p and r: its weights
  kSignedPower,  // [-16, 16]  k^r lr_max^p stay within double's range)
  kChoice,       // the index of one of the field's choices
};
struct HyperUse {
  std::string_view name;  // a HyperField's name
  HyperRange range;
};

// One elementwise state tensor an algorithm keeps per parameter. Signed: first moments; unsigned:
// second moments and Hessians (their quantization codebooks differ). always_fp32: a parameter-like
// slot (schedule-free AdamW's z) that steps move by far less than an 8- or 4-bit code step, so it
// stays fp32 at every requested precision, like master weights.
struct StateSlot {
  std::string_view name;
  bool is_signed;
  bool always_fp32 = false;
};
inline constexpr int kMaxStateSlots = 3;

// What an algorithm's step needs beyond element-wise math, each computed over a whole tensor.
enum class Reduction : std::uint8_t {
  kNone,
  kProjection,       // AdamP: cosines of gradient and parameter per row and per tensor
  kFactoredSecond,   // Adafactor: row/column means of g^2 for >= 2-D tensors, update and parameter RMS
  kOrthogonalise,    // Muon: the Newton-Schulz iteration over each matrix's momentum update
};

struct AlgorithmSpec {
  Algorithm id = Algorithm::kSgd;
  std::string_view name = {};   // "adamw": the CLI, the C interface, saved state
  std::string_view alias = {};  // another accepted name, or empty
  std::string_view title = {};  // the algorithm and its paper, for listings
  Hyper defaults = {};          // those of the paper's reference code
  // The numbers it reads besides lr and weight_decay (read by all), validated in this order, and
  // the flags it reads besides maximize (read by all). Numbers read only under a flag (Adafactor's
  // beta1 with first_moment) are validated by `check`.
  std::span<const HyperUse> numbers = {};
  std::span<const std::string_view> flags = {};
  // AdamW: weight decay is decoupled whatever `decoupled_weight_decay` says.
  bool always_decoupled = false;
  // Checks between fields that a range cannot say; throws InvalidArgument naming the values.
  void (*check)(const Hyper&) = nullptr;
  // The state slots it keeps for a tensor; returns the count. matrix_form: the tensor takes the
  // algorithm's matrix form (Adafactor's factored >= 2-D tensors, Muon's orthogonalised matrices).
  int (*slots)(const Hyper&, bool matrix_form, StateSlot* out) = nullptr;
  // A one-line description of its state for listings ("m, v").
  std::string (*state_note)(const Hyper&) = nullptr;
  Reduction reduction = Reduction::kNone;
  // Second moments factored into row and column statistics for tensors of rank >= 2.
  bool factors_matrices = false;
  // Muon: tensors of rank >= 2 are orthogonalised (seen as (shape[0], rest) matrices) as
  // OptimizerOptions::use_muon and adamw_names decide; the others step with its AdamW fallback.
  bool orthogonalises_matrices = false;
  // Its Hessian EMA is written outside the step (update_hessian): no rank-1 scales for it.
  bool hessian_slot = false;
  // Why a tensor split across ranks is refused, for tensors of rank >= 2 (Muon: orthogonalised
  // ones) and of any rank (empty: a split tensor steps like a whole one).
  std::string_view split_refusal_matrix = {};
  std::string_view split_refusal_any = {};
};

std::span<const AlgorithmSpec> algorithm_specs();
// Whether the algorithm reads the hyperparameter (lr, weight_decay and maximize: every one).
bool reads_hyper(const AlgorithmSpec& algorithm, std::string_view field);
const AlgorithmSpec& algorithm_spec(Algorithm algorithm);  // throws InvalidArgument for an unknown value

}  // namespace nibble
