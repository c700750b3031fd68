// The GPT model on the CPU: parameter layout, activation arena, forward and backward passes.
// Layout and initialisation follow GPT-2 (Radford et al. 2019): pre-norm blocks, GELU MLP of 4x
// width, final LayerNorm, output head tied to the token embedding.
#include "model/gpt.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "math/common.hpp"
#include "model/cpu/ops.hpp"
#include "model/loss.hpp"
#include "model/param_views.hpp"
#include "nibble/error.hpp"
#include "nibble/rng.hpp"

namespace nibble::model {

namespace ops = nibble::model::cpu;

GptConfig gpt_preset(std::string_view name) {
  struct Preset {
    std::string_view name;
    std::int64_t layers, heads, width, context;
  };
  static constexpr Preset kPresets[] = {
      {"tiny", 2, 2, 64, 64},        {"char", 6, 6, 384, 256},    {"small", 12, 12, 768, 512},
      {"medium", 24, 16, 1024, 512}, {"large", 36, 20, 1280, 512}, {"xl", 48, 25, 1600, 512},
      {"2.7b", 32, 32, 2560, 512}};
  for (const Preset& p : kPresets)
    if (p.name == name) return GptConfig{p.layers, p.heads, p.width, p.context, 0, 0.0f};
  throw InvalidArgument(fmt::format("unknown model preset '{}' (known: {})", name, gpt_preset_names()));
}

std::string_view gpt_preset_names() { return "tiny, char, small, medium, large, xl, 2.7b"; }

std::string_view gelu_name(Gelu gelu) { return gelu == Gelu::kExact ? "exact" : "tanh"; }

Gelu gelu_from_name(std::string_view name) {
  if (name == "tanh") return Gelu::kTanh;
  if (name == "exact") return Gelu::kExact;
  throw InvalidArgument(fmt::format("unknown GELU '{}' (known: tanh, exact)", name));
}

void validate(const GptConfig& c) {
  auto positive = [](const char* what, std::int64_t v) {
    if (v <= 0) throw InvalidArgument(fmt::format("model {} must be positive, got {}", what, v));
  };
  positive("layers", c.layers);
  positive("heads", c.heads);
  positive("width", c.width);
  positive("context", c.context);
  positive("vocab", c.vocab);
  if (c.width % c.heads != 0)
    throw InvalidArgument(fmt::format("model width {} is not divisible by heads {}", c.width, c.heads));
  if (!(c.dropout >= 0.0f && c.dropout < 1.0f))
    throw InvalidArgument(fmt::format("dropout must be in [0, 1), got {}", c.dropout));
  if (c.gelu != Gelu::kTanh && c.gelu != Gelu::kExact)
    throw InvalidArgument(fmt::format("model GELU {} is not one of tanh, exact", static_cast<int>(c.gelu)));
}

std::vector<ParamTensor> gpt_param_layout(const GptConfig& c) {
  const std::int64_t C = c.width, V = c.vocab;
  std::vector<ParamTensor> out;
  std::int64_t offset = 0;
  auto add = [&](std::string name, std::vector<std::int64_t> shape) {
    if (!c.bias && name.ends_with(".bias")) return;
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    out.push_back({std::move(name), std::move(shape), offset});
    offset += n;
  };
  add("wte", {V, C});
  add("wpe", {c.context, C});
  for (std::int64_t l = 0; l < c.layers; ++l) {
    const std::string h = fmt::format("h.{}.", l);
    add(h + "ln_1.weight", {C});
    add(h + "ln_1.bias", {C});
    add(h + "attn.c_attn.weight", {3 * C, C});
    add(h + "attn.c_attn.bias", {3 * C});
    add(h + "attn.c_proj.weight", {C, C});
    add(h + "attn.c_proj.bias", {C});
    add(h + "ln_2.weight", {C});
    add(h + "ln_2.bias", {C});
    add(h + "mlp.c_fc.weight", {4 * C, C});
    add(h + "mlp.c_fc.bias", {4 * C});
    add(h + "mlp.c_proj.weight", {C, 4 * C});
    add(h + "mlp.c_proj.bias", {C});
  }
  add("ln_f.weight", {C});
  add("ln_f.bias", {C});
  return out;
}

std::int64_t gpt_param_count(const GptConfig& c) {
  const std::vector<ParamTensor> layout = gpt_param_layout(c);
  std::int64_t n = 1;
  for (std::int64_t d : layout.back().shape) n *= d;
  return layout.back().offset + n;
}

// NOTE: activations as offsets into one float arena: the forward values first, then a second set
// of the same size for their gradients. Everything a step needs is counted here, so the memory
// of training is known (and reported) before the first step.
struct Gpt::Acts {
  struct Layer {
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *atty, *att, *attproj, *res2, *ln2, *ln2_mean, *ln2_rstd, *fch,
        *fch_gelu, *fcproj, *res3;
  };
  float* encoded;
  std::vector<Layer> layers;
  float *lnf, *lnf_mean, *lnf_rstd, *logits, *probs, *losses, *datt;
  std::int64_t floats = 0;

  Acts(const GptConfig& c, std::int64_t B, std::int64_t T, float* base) {
    const std::int64_t C = c.width, V = c.vocab, NH = c.heads, BT = B * T;
    auto take = [&](std::int64_t n) {
      float* p = base ? base + floats : nullptr;
      floats += (n + 15) / 16 * 16;  // 64-byte aligned pieces
      return p;
    };
    encoded = take(BT * C);
    layers.resize(static_cast<std::size_t>(c.layers));
    for (Layer& l : layers) {
      l.ln1 = take(BT * C);
      l.ln1_mean = take(BT);
      l.ln1_rstd = take(BT);
      l.qkv = take(BT * 3 * C);
      l.atty = take(BT * C);
      l.att = take(B * NH * T * T);
      l.attproj = take(BT * C);
      l.res2 = take(BT * C);
      l.ln2 = take(BT * C);
      l.ln2_mean = take(BT);
      l.ln2_rstd = take(BT);
      l.fch = take(BT * 4 * C);
      l.fch_gelu = take(BT * 4 * C);
      l.fcproj = take(BT * C);
      l.res3 = take(BT * C);
    }
    lnf = take(BT * C);
    lnf_mean = take(BT);
    lnf_rstd = take(BT);
    logits = take(BT * V);
    probs = take(BT * V);
    losses = take(BT);
    datt = take(B * NH * T * T);  // attention backward scratch
  }
};

std::int64_t gpt_activation_floats(const GptConfig& c, std::int64_t B, std::int64_t T) {
  return 2 * Gpt::Acts(c, B, T, nullptr).floats;
}

namespace {

// NOTE: dropout masks from a counter-based hash of (seed, site, element) instead of stored masks:
// the backward regenerates the same mask, costing no memory, and a resumed run draws the same.
bool dropout_keep(std::uint64_t seed, std::uint64_t site, std::int64_t i, std::uint32_t threshold) {
  return math::hash_u32(seed ^ (site * 0x9e3779b97f4a7c15ull), static_cast<std::uint64_t>(i)) >= threshold;
}

void dropout_apply(float* x, std::int64_t n, float p, std::uint64_t seed, std::uint64_t site) {
  const auto threshold = static_cast<std::uint32_t>(static_cast<double>(p) * 4294967296.0);
  const float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) x[i] = dropout_keep(seed, site, i, threshold) ? x[i] * scale : 0.0f;
}

}  // namespace

Gpt::Gpt(const GptConfig& config, std::int64_t batch, std::int64_t seq)
    : config_(config), batch_(batch), seq_(seq) {
  validate(config_);
  if (batch <= 0) throw InvalidArgument(fmt::format("batch size must be positive, got {}", batch));
  if (seq <= 0 || seq > config.context)
    throw InvalidArgument(fmt::format("sequence length must be in [1, context {}], got {}", config.context, seq));
  layout_ = gpt_param_layout(config_);
  param_count_ = gpt_param_count(config_);
  params_ = Buffer(static_cast<std::size_t>(param_count_) * sizeof(float));
  grads_ = Buffer(static_cast<std::size_t>(param_count_) * sizeof(float));
  act_floats_ = Acts(config_, batch_, seq_, nullptr).floats;
  acts_ = Buffer(static_cast<std::size_t>(2 * act_floats_) * sizeof(float));
}

void gpt_init_params(const GptConfig& config, const std::vector<ParamTensor>& layout, float* p, std::uint64_t seed) {
  Rng rng(seed);
  const float residual_scale = 1.0f / std::sqrt(2.0f * static_cast<float>(config.layers));
  for (const ParamTensor& t : layout) {
    std::int64_t n = 1;
    for (std::int64_t d : t.shape) n *= d;
    float* x = p + t.offset;
    const bool is_ln = t.name.find("ln_") != std::string::npos;
    if (t.name.ends_with(".bias")) {
      std::fill(x, x + n, 0.0f);
    } else if (is_ln) {
      std::fill(x, x + n, 1.0f);
    } else {
      const float std = t.name.ends_with("c_proj.weight") ? 0.02f * residual_scale : 0.02f;
      for (std::int64_t i = 0; i < n; ++i) x[i] = std * rng.normal();
    }
  }
}

void Gpt::init(std::uint64_t seed) { gpt_init_params(config_, layout_, params(), seed); }

void Gpt::zero_grad() { std::memset(grads_.data(), 0, grads_.size()); }

const float* Gpt::logits() const {
  const Acts a(config_, batch_, seq_, const_cast<float*>(reinterpret_cast<const float*>(acts_.data())));
  return a.logits;
}

const float* Gpt::probs() const {
  const Acts a(config_, batch_, seq_, const_cast<float*>(reinterpret_cast<const float*>(acts_.data())));
  return a.probs;
}

std::vector<ModelTensor> Gpt::tensors() {
  std::vector<ModelTensor> out;
  for (const ParamTensor& t : layout_) out.push_back({t.name, t.shape, params() + t.offset, grads() + t.offset});
  return out;
}

float Gpt::forward(const std::int32_t* tokens, const std::int32_t* targets, bool training,
                   std::uint64_t dropout_seed) {
  const std::int64_t B = batch_, T = seq_, C = config_.width, V = config_.vocab, NH = config_.heads;
  const std::int64_t BT = B * T;
  for (std::int64_t i = 0; i < BT; ++i)
    if (tokens[i] < 0 || tokens[i] >= V)
      throw InvalidArgument(fmt::format("token {} at position {} is outside the vocabulary of {}", tokens[i], i, V));
  tokens_ = tokens;
  targets_ = targets;
  training_ = training && config_.dropout > 0.0f;
  dropout_seed_ = dropout_seed;
  const float drop = config_.dropout;

  ParamViews<float> w(config_, layout_, params());
  Acts a(config_, B, T, reinterpret_cast<float*>(acts_.data()));
  ops::embedding_forward(a.encoded, tokens, w.wte, w.wpe, B, T, C);
  if (training_) dropout_apply(a.encoded, BT * C, drop, dropout_seed, 0);
  const float* residual = a.encoded;
  for (std::int64_t l = 0; l < config_.layers; ++l) {
    const ParamViews<float>::Layer& lw = w.layers[static_cast<std::size_t>(l)];
    const Acts::Layer& la = a.layers[static_cast<std::size_t>(l)];
    ops::layernorm_forward(la.ln1, la.ln1_mean, la.ln1_rstd, residual, lw.ln1w, lw.ln1b, BT, C);
    ops::matmul_forward(la.qkv, la.ln1, lw.qkvw, lw.qkvb, BT, C, 3 * C);
    ops::attention_forward(la.atty, la.att, la.qkv, B, T, C, NH);
    ops::matmul_forward(la.attproj, la.atty, lw.attprojw, lw.attprojb, BT, C, C);
    if (training_) dropout_apply(la.attproj, BT * C, drop, dropout_seed, 1 + 2 * static_cast<std::uint64_t>(l));
    ops::residual_forward(la.res2, residual, la.attproj, BT * C);
    ops::layernorm_forward(la.ln2, la.ln2_mean, la.ln2_rstd, la.res2, lw.ln2w, lw.ln2b, BT, C);
    ops::matmul_forward(la.fch, la.ln2, lw.fcw, lw.fcb, BT, C, 4 * C);
    ops::gelu_forward(la.fch_gelu, la.fch, BT * 4 * C, config_.gelu == Gelu::kExact);
    ops::matmul_forward(la.fcproj, la.fch_gelu, lw.fcprojw, lw.fcprojb, BT, 4 * C, C);
    if (training_) dropout_apply(la.fcproj, BT * C, drop, dropout_seed, 2 + 2 * static_cast<std::uint64_t>(l));
    ops::residual_forward(la.res3, la.res2, la.fcproj, BT * C);
    residual = la.res3;
  }
  ops::layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, residual, w.lnfw, w.lnfb, BT, C);
  ops::matmul_forward(a.logits, a.lnf, w.wte, nullptr, BT, C, V);
  if (targets == nullptr) {
    // Probabilities only: a cross-entropy against target 0, whose loss is ignored.
    std::vector<std::int32_t> zeros(static_cast<std::size_t>(BT), 0);
    ops::crossentropy_forward(a.losses, a.probs, a.logits, zeros.data(), BT, V);
    return 0.0f;
  }
  ops::crossentropy_forward(a.losses, a.probs, a.logits, targets, BT, V);
  return mean_token_loss({a.losses, static_cast<std::size_t>(BT)});
}

void Gpt::backward(float loss_scale, const std::int32_t* targets) {
  if (targets != nullptr) targets_ = targets;
  if (targets_ == nullptr) throw InvalidArgument("backward needs targets, from the forward pass or given");
  const std::int64_t V0 = config_.vocab;
  for (std::int64_t i = 0; targets != nullptr && i < batch_ * seq_; ++i)
    if (targets[i] < 0 || targets[i] >= V0)
      throw InvalidArgument(fmt::format("target {} at position {} is outside the vocabulary of {}", targets[i], i, V0));
  const std::int64_t B = batch_, T = seq_, C = config_.width, V = config_.vocab, NH = config_.heads;
  const std::int64_t BT = B * T;
  const float drop = config_.dropout;
  ParamViews<float> w(config_, layout_, params());
  ParamViews<float> dw(config_, layout_, grads());
  float* base = reinterpret_cast<float*>(acts_.data());
  Acts a(config_, B, T, base);
  Acts d(config_, B, T, base + act_floats_);
  std::memset(base + act_floats_, 0, static_cast<std::size_t>(act_floats_) * sizeof(float));

  ops::crossentropy_backward(d.logits, a.probs, targets_, loss_scale / static_cast<float>(BT), BT, V);
  ops::matmul_backward(d.lnf, dw.wte, nullptr, d.logits, a.lnf, w.wte, BT, C, V);
  const float* residual = config_.layers > 0 ? a.layers.back().res3 : a.encoded;
  float* dresidual = config_.layers > 0 ? d.layers.back().res3 : d.encoded;
  ops::layernorm_backward(dresidual, dw.lnfw, dw.lnfb, d.lnf, residual, w.lnfw, a.lnf_mean, a.lnf_rstd, BT, C);
  for (std::int64_t l = config_.layers - 1; l >= 0; --l) {
    const auto li = static_cast<std::size_t>(l);
    const ParamViews<float>::Layer& lw = w.layers[li];
    const ParamViews<float>::Layer& lg = dw.layers[li];
    const Acts::Layer& la = a.layers[li];
    const Acts::Layer& ld = d.layers[li];
    const float* res_in = l == 0 ? a.encoded : a.layers[li - 1].res3;
    float* dres_in = l == 0 ? d.encoded : d.layers[li - 1].res3;
    // res3 = res2 + fcproj: both receive dres3.
    for (std::int64_t i = 0; i < BT * C; ++i) {
      ld.res2[i] += ld.res3[i];
      ld.fcproj[i] += ld.res3[i];
    }
    if (training_) dropout_apply(ld.fcproj, BT * C, drop, dropout_seed_, 2 + 2 * static_cast<std::uint64_t>(l));
    ops::matmul_backward(ld.fch_gelu, lg.fcprojw, lg.fcprojb, ld.fcproj, la.fch_gelu, lw.fcprojw, BT, 4 * C, C);
    ops::gelu_backward(ld.fch, la.fch, ld.fch_gelu, BT * 4 * C, config_.gelu == Gelu::kExact);
    ops::matmul_backward(ld.ln2, lg.fcw, lg.fcb, ld.fch, la.ln2, lw.fcw, BT, C, 4 * C);
    ops::layernorm_backward(ld.res2, lg.ln2w, lg.ln2b, ld.ln2, la.res2, lw.ln2w, la.ln2_mean, la.ln2_rstd, BT, C);
    // res2 = res_in + attproj.
    for (std::int64_t i = 0; i < BT * C; ++i) {
      dres_in[i] += ld.res2[i];
      ld.attproj[i] += ld.res2[i];
    }
    if (training_) dropout_apply(ld.attproj, BT * C, drop, dropout_seed_, 1 + 2 * static_cast<std::uint64_t>(l));
    ops::matmul_backward(ld.atty, lg.attprojw, lg.attprojb, ld.attproj, la.atty, lw.attprojw, BT, C, C);
    ops::attention_backward(ld.qkv, d.datt, ld.atty, la.qkv, la.att, B, T, C, NH);
    ops::matmul_backward(ld.ln1, lg.qkvw, lg.qkvb, ld.qkv, la.ln1, lw.qkvw, BT, C, 3 * C);
    ops::layernorm_backward(dres_in, lg.ln1w, lg.ln1b, ld.ln1, res_in, lw.ln1w, la.ln1_mean, la.ln1_rstd, BT, C);
  }
  if (training_) dropout_apply(d.encoded, BT * C, drop, dropout_seed_, 0);
  ops::embedding_backward(dw.wte, dw.wpe, d.encoded, tokens_, B, T, C);
}

}  // namespace nibble::model
