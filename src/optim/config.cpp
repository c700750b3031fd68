// Names, defaults and validation of algorithms and hyperparameters, and the state each
// algorithm keeps per tensor (its slots) with its size in bytes.
#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <ostream>
#include <string>

#include <fmt/format.h>

#include "nibble/error.hpp"
#include "optim/impl.hpp"

namespace nibble {
namespace {

constexpr std::array kAlgorithms = {Algorithm::kSgd,       Algorithm::kAdam,  Algorithm::kAdamW,
                                    Algorithm::kLion,      Algorithm::kAdafactor, Algorithm::kAdamP,
                                    Algorithm::kQhm,       Algorithm::kSophiaG};
constexpr std::array kPrecisions = {Precision::kFp32, Precision::kBf16, Precision::kInt8, Precision::kInt4};

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
  return out;
}

}  // namespace

std::span<const Algorithm> all_algorithms() { return kAlgorithms; }
std::span<const Precision> all_precisions() { return kPrecisions; }

std::string_view algorithm_name(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::kSgd: return "sgd";
    case Algorithm::kAdam: return "adam";
    case Algorithm::kAdamW: return "adamw";
    case Algorithm::kLion: return "lion";
    case Algorithm::kAdafactor: return "adafactor";
    case Algorithm::kAdamP: return "adamp";
    case Algorithm::kQhm: return "qhm";
    case Algorithm::kSophiaG: return "sophiag";
  }
  return "unknown";
}

std::optional<Algorithm> algorithm_from_name(std::string_view name) {
  const std::string n = lower(name);
  for (Algorithm a : kAlgorithms)
    if (algorithm_name(a) == n) return a;
  if (n == "sophia") return Algorithm::kSophiaG;
  return std::nullopt;
}

std::string_view precision_name(Precision precision) {
  switch (precision) {
    case Precision::kFp32: return "fp32";
    case Precision::kBf16: return "bf16";
    case Precision::kInt8: return "8bit";
    case Precision::kInt4: return "4bit";
  }
  return "unknown";
}

std::ostream& operator<<(std::ostream& os, Algorithm algorithm) { return os << algorithm_name(algorithm); }
std::ostream& operator<<(std::ostream& os, Precision precision) { return os << precision_name(precision); }

std::optional<Precision> precision_from_name(std::string_view name) {
  const std::string n = lower(name);
  if (n == "fp32" || n == "32bit" || n == "f32") return Precision::kFp32;
  if (n == "bf16" || n == "16bit") return Precision::kBf16;
  if (n == "8bit" || n == "int8") return Precision::kInt8;
  if (n == "4bit" || n == "int4") return Precision::kInt4;
  return std::nullopt;
}

Hyper default_hyper(Algorithm algorithm) {
  Hyper h;
  switch (algorithm) {
    case Algorithm::kSgd:
      h.momentum = 0.9f;
      break;
    case Algorithm::kAdam:
      break;
    case Algorithm::kAdamW:
      h.weight_decay = 0.01f;
      h.decoupled_weight_decay = true;
      break;
    case Algorithm::kLion:
      h.lr = 1e-4f;
      h.beta2 = 0.99f;
      break;
    case Algorithm::kAdafactor:
      h.eps = 1e-30f;
      break;
    case Algorithm::kAdamP:
      break;
    case Algorithm::kQhm:
      h.momentum = 0.999f;
      break;
    case Algorithm::kSophiaG:
      h.lr = 1e-4f;
      h.beta1 = 0.965f;
      h.beta2 = 0.99f;
      h.weight_decay = 0.1f;
      break;
  }
  return h;
}

void validate_hyper(Algorithm algorithm, const Hyper& h) {
  if (std::find(kAlgorithms.begin(), kAlgorithms.end(), algorithm) == kAlgorithms.end())
    throw InvalidArgument(fmt::format("algorithm {} is not a known algorithm", static_cast<int>(algorithm)));
  const std::string_view algo = algorithm_name(algorithm);
  auto fail = [&](std::string_view what, double value, std::string_view rule) {
    throw InvalidArgument(fmt::format("{}: {} must be {}, got {}", algo, what, rule, value));
  };
  auto finite = [&](std::string_view what, float v) {
    if (!std::isfinite(v)) fail(what, v, "finite");
  };
  auto beta = [&](std::string_view what, float v) {
    finite(what, v);
    if (v < 0.0f || v >= 1.0f) fail(what, v, "in [0, 1)");
  };
  finite("lr", h.lr);
  if (h.lr < 0.0f) fail("lr", h.lr, ">= 0");
  finite("weight_decay", h.weight_decay);
  if (h.weight_decay < 0.0f) fail("weight_decay", h.weight_decay, ">= 0");
  const bool adam_like = algorithm == Algorithm::kAdam || algorithm == Algorithm::kAdamW ||
                         algorithm == Algorithm::kAdamP;
  if (adam_like || algorithm == Algorithm::kLion || algorithm == Algorithm::kSophiaG) {
    beta("beta1", h.beta1);
    beta("beta2", h.beta2);
  }
  if (adam_like || algorithm == Algorithm::kAdafactor) {
    finite("eps", h.eps);
    if (h.eps <= 0.0f) fail("eps", h.eps, "> 0");
  }
  if (h.amsgrad && algorithm != Algorithm::kAdam && algorithm != Algorithm::kAdamW)
    throw InvalidArgument(fmt::format("{}: amsgrad is only for adam and adamw", algo));
  switch (algorithm) {
    case Algorithm::kSgd:
      finite("momentum", h.momentum);
      if (h.momentum < 0.0f || h.momentum > 1.0f) fail("momentum", h.momentum, "in [0, 1]");
      finite("dampening", h.dampening);
      if (h.dampening < 0.0f || h.dampening > 1.0f) fail("dampening", h.dampening, "in [0, 1]");
      if (h.nesterov && (h.momentum <= 0.0f || h.dampening != 0.0f))
        throw InvalidArgument(fmt::format(
            "sgd: nesterov needs momentum > 0 and dampening 0, got momentum {} and dampening {}",
            h.momentum, h.dampening));
      break;
    case Algorithm::kQhm:
      finite("momentum", h.momentum);
      if (h.momentum < 0.0f || h.momentum > 1.0f) fail("momentum", h.momentum, "in [0, 1]");
      finite("nu", h.nu);
      if (h.nu < 0.0f || h.nu > 1.0f) fail("nu", h.nu, "in [0, 1]");
      break;
    case Algorithm::kAdafactor:
      if (h.first_moment) beta("beta1", h.beta1);
      finite("eps2", h.eps2);
      if (h.eps2 < 0.0f) fail("eps2", h.eps2, ">= 0");
      finite("clip_threshold", h.clip_threshold);
      if (h.clip_threshold <= 0.0f) fail("clip_threshold", h.clip_threshold, "> 0");
      finite("decay_rate", h.decay_rate);
      if (h.decay_rate < -1.0f || h.decay_rate >= 0.0f) fail("decay_rate", h.decay_rate, "in [-1, 0)");
      if (h.warmup_init && !h.relative_step)
        throw InvalidArgument("adafactor: warmup_init needs relative_step");
      break;
    case Algorithm::kAdamP:
      finite("delta", h.delta);
      if (h.delta <= 0.0f) fail("delta", h.delta, "> 0");
      finite("wd_ratio", h.wd_ratio);
      if (h.wd_ratio < 0.0f || h.wd_ratio > 1.0f) fail("wd_ratio", h.wd_ratio, "in [0, 1]");
      break;
    case Algorithm::kSophiaG:
      finite("rho", h.rho);
      if (h.rho <= 0.0f) fail("rho", h.rho, "> 0");
      finite("batch_tokens", h.batch_tokens);
      if (h.batch_tokens <= 0.0f) fail("batch_tokens", h.batch_tokens, "> 0");
      break;
    default:
      break;
  }
}

bool is_factored(Algorithm algorithm, std::span<const std::int64_t> shape) {
  return algorithm == Algorithm::kAdafactor && shape.size() >= 2;
}

int slot_specs(Algorithm algorithm, const Hyper& hyper, bool factored, SlotSpec* out) {
  int n = 0;
  switch (algorithm) {
    case Algorithm::kSgd:
      if (hyper.momentum > 0.0f) out[n++] = {"momentum_buffer", true};
      break;
    case Algorithm::kAdam:
    case Algorithm::kAdamW:
      out[n++] = {"exp_avg", true};
      out[n++] = {"exp_avg_sq", false};
      if (hyper.amsgrad) out[n++] = {"max_exp_avg_sq", false};
      break;
    case Algorithm::kAdamP:
      out[n++] = {"exp_avg", true};
      out[n++] = {"exp_avg_sq", false};
      break;
    case Algorithm::kLion:
      out[n++] = {"exp_avg", true};
      break;
    case Algorithm::kAdafactor:
      if (!factored) out[n++] = {"exp_avg_sq", false};
      if (hyper.first_moment) out[n++] = {"exp_avg", true};
      break;
    case Algorithm::kQhm:
      out[n++] = {"momentum_buffer", true};
      break;
    case Algorithm::kSophiaG:
      out[n++] = {"exp_avg", true};
      out[n++] = {"hessian", false};
      break;
  }
  return n;
}

double state_bytes_per_element(Algorithm algorithm, const Hyper& hyper, Precision precision,
                               int block_size, std::span<const std::int64_t> shape, bool rank1) {
  const std::int64_t numel = shape_numel(shape);
  if (numel == 0) return 0.0;
  const bool factored = is_factored(algorithm, shape);
  std::int64_t rows = 1, cols = 1, batch_rows = 1;
  if (!shape.empty()) {
    cols = shape.back();
    rows = numel / std::max<std::int64_t>(cols, 1);
    batch_rows = shape.size() >= 2 ? shape[shape.size() - 2] : 1;
  }
  if (block_size != 0 && (block_size < 16 || block_size > kMaxBlock || (block_size & (block_size - 1))))
    throw InvalidArgument(fmt::format("block_size must be a power of two in [16, {}], got {}", kMaxBlock, block_size));
  if (block_size == 0) block_size = precision == Precision::kInt4 ? 128 : 256;
  SlotSpec specs[kMaxSlots];
  const int n = slot_specs(algorithm, hyper, factored, specs);
  double bytes = 0.0;
  for (int i = 0; i < n; ++i) {
    const std::int64_t blocks = (numel + block_size - 1) / block_size;
    switch (precision) {
      case Precision::kFp32: bytes += 4.0 * numel; break;
      case Precision::kBf16: bytes += 2.0 * numel; break;
      case Precision::kInt8: bytes += numel + 4.0 * blocks; break;
      case Precision::kInt4: {
        const bool r1 = uses_rank1(rank1, algorithm, precision, specs[i].is_signed, shape.size());
        bytes += static_cast<double>((numel + 1) / 2) + (r1 ? 4.0 * (rows + cols) : 4.0 * blocks);
        break;
      }
    }
  }
  if (factored) bytes += 4.0 * (rows + (rows / std::max<std::int64_t>(batch_rows, 1)) * cols);
  return bytes / static_cast<double>(numel);
}

}  // namespace nibble
