// The CUDA GPT: one device allocation carved into parameters (T), parameter gradients (fp32),
// forward activations, the backward's few activation-gradient buffers and op scratch; forward
// and backward call the ops of ops.cuh in the order of the CPU engine (model/gpt.cpp).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/cuda/check.cuh"
#include "math/bf16.hpp"
#include "model/cuda/ops.cuh"
#include "model/gpt_cuda.hpp"
#include "model/loss.hpp"
#include "model/param_views.hpp"
#include "nibble/error.hpp"

namespace nibble::model {
namespace {

using nibble::cuda::check_cuda;

// NOTE: copies go to the model's (non-blocking) stream and are waited for there; a synchronous
// cudaMemcpy runs on the legacy stream, which that stream is not ordered after.
void copy_and_wait(void* to, const void* from, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  check_cuda(cudaMemcpyAsync(to, from, bytes, kind, stream), "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

std::int64_t align256(std::int64_t bytes) { return (bytes + 255) / 256 * 256; }

// Pieces of the one allocation, as byte offsets; a null base only measures.
struct Carver {
  std::byte* base = nullptr;
  std::int64_t bytes = 0;
  template <class X>
  X* take(std::int64_t count) {
    X* p = base ? reinterpret_cast<X*>(base + bytes) : nullptr;
    bytes += align256(count * static_cast<std::int64_t>(sizeof(X)));
    return p;
  }
};

template <class T>
struct Layout {
  struct Layer {
    T *ln1, *qkv, *atty, *attproj, *res2, *ln2, *fch, *fch_gelu, *fcproj, *res3;
    float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd, *lse;
  };
  // Parameters and their gradients, in gpt_param_layout order.
  T* params;
  float* grads;
  // Forward activations.
  T* encoded;
  std::vector<Layer> layers;
  T *lnf, *logits;
  float *lnf_mean, *lnf_rstd, *losses;
  std::int32_t *tokens, *targets;
  // Backward: the residual stream's gradient and reused per-layer buffers.
  T *dresid, *dbtc, *dbt4c, *dqkv;
  void* scratch;
  std::int64_t param_bytes = 0, grad_bytes = 0, act_bytes = 0, scratch_bytes = 0;

  Layout(const GptConfig& c, std::int64_t B, std::int64_t Tn, std::int64_t count, std::byte* base) {
    const std::int64_t C = c.width, V = c.vocab, NH = c.heads, BT = B * Tn;
    Carver k{base};
    params = k.take<T>(count);
    param_bytes = k.bytes;
    grads = k.take<float>(count);
    grad_bytes = k.bytes - param_bytes;
    const std::int64_t before_acts = k.bytes;
    encoded = k.take<T>(BT * C);
    layers.resize(static_cast<std::size_t>(c.layers));
    for (Layer& l : layers) {
      l.ln1 = k.take<T>(BT * C);
      l.ln1_mean = k.take<float>(BT);
      l.ln1_rstd = k.take<float>(BT);
      l.qkv = k.take<T>(BT * 3 * C);
      l.atty = k.take<T>(BT * C);
      l.lse = k.take<float>(B * NH * Tn);
      l.attproj = k.take<T>(BT * C);
      l.res2 = k.take<T>(BT * C);
      l.ln2 = k.take<T>(BT * C);
      l.ln2_mean = k.take<float>(BT);
      l.ln2_rstd = k.take<float>(BT);
      l.fch = k.take<T>(BT * 4 * C);
      l.fch_gelu = k.take<T>(BT * 4 * C);
      l.fcproj = k.take<T>(BT * C);
      l.res3 = k.take<T>(BT * C);
    }
    lnf = k.take<T>(BT * C);
    lnf_mean = k.take<float>(BT);
    lnf_rstd = k.take<float>(BT);
    logits = k.take<T>(BT * V);
    losses = k.take<float>(BT);
    tokens = k.take<std::int32_t>(BT);
    targets = k.take<std::int32_t>(BT);
    dresid = k.take<T>(BT * C);
    dbtc = k.take<T>(BT * C);
    dbt4c = k.take<T>(BT * 4 * C);
    dqkv = k.take<T>(BT * 3 * C);
    act_bytes = k.bytes - before_acts;
    const std::size_t scratch_needed = std::max({model::cuda::embedding_backward_scratch_bytes(B, Tn, V),
                                                 model::cuda::layernorm_backward_scratch_bytes(BT, C),
                                                 model::cuda::attention_backward_scratch_bytes(B, Tn, C, NH),
                                                 // the widest bias gradient (the lm head has none)
                                                 model::cuda::Matmul::backward_scratch_bytes(BT, 4 * C),
                                                 std::size_t{256}});
    scratch = k.take<std::byte>(static_cast<std::int64_t>(scratch_needed));
    scratch_bytes = k.bytes - before_acts - act_bytes;
  }
};

constexpr std::int64_t kMatmulWorkspace = std::int64_t{32} << 20;  // Matmul's own allocation

}  // namespace

struct CudaGpt::Impl {
  GptConfig config;
  std::int64_t batch = 0, seq = 0, count = 0;
  CudaGptOptions options;
  std::vector<ParamTensor> layout;
  CudaGptMemory memory;
  std::byte* base = nullptr;
  cudaStream_t stream = nullptr;
  bool own_stream = false;
  std::unique_ptr<model::cuda::Matmul> matmul;
  bool have_targets = false;

  ~Impl() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    cudaFree(base);
    if (own_stream) cudaStreamDestroy(stream);
  }

  template <class T>
  Layout<T> carve() const {
    return Layout<T>(config, batch, seq, count, base);
  }

  template <class T>
  void enqueue_forward(bool with_targets);
  template <class T>
  float forward(const std::int32_t* tokens, const std::int32_t* targets);
  template <class T>
  void backward(float loss_scale);
  template <class T>
  void enqueue_micro_batch(const std::int32_t* tokens, const std::int32_t* targets, float* token_losses,
                           float loss_scale);
};

CudaGptMemory cuda_gpt_memory(const GptConfig& config, std::int64_t batch, std::int64_t seq, CudaPrecision precision) {
  validate(config);
  const std::int64_t count = gpt_param_count(config);
  CudaGptMemory m;
  auto fill = [&](const auto& l) {
    m.params = l.param_bytes;
    m.grads = l.grad_bytes;
    m.activations = l.act_bytes;
    m.workspace = l.scratch_bytes + kMatmulWorkspace;
  };
  if (precision == CudaPrecision::kBf16) fill(Layout<__nv_bfloat16>(config, batch, seq, count, nullptr));
  else fill(Layout<float>(config, batch, seq, count, nullptr));
  return m;
}

CudaGpt::CudaGpt(const GptConfig& config, std::int64_t batch, std::int64_t seq, CudaGptOptions options)
    : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  validate(config);
  if (config.dropout > 0.0f)
    throw InvalidArgument("dropout " + std::to_string(config.dropout) + " is not available on the CUDA engine; use 0");
  if (!config.bias || config.gelu != Gelu::kTanh)
    throw InvalidArgument("the CUDA engine trains GPT-2's model only (biases, tanh GELU); a model without biases or "
                          "with the exact GELU runs on the CPU engine");
  if (batch <= 0) throw InvalidArgument("batch size must be positive, got " + std::to_string(batch));
  if (seq <= 0 || seq > config.context)
    throw InvalidArgument("sequence length must be in [1, context " + std::to_string(config.context) + "], got " +
                          std::to_string(seq));
  if (!model::cuda::attention_supports_head_dim(config.width / config.heads))
    throw InvalidArgument("head dimension " + std::to_string(config.width / config.heads) +
                          " (width / heads) is not one the CUDA attention kernels take (32, 64, 128)");
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    cudaGetLastError();
    throw DeviceError("the CUDA GPT engine needs a CUDA device, and none is visible");
  }
  im.config = config;
  im.batch = batch;
  im.seq = seq;
  im.options = options;
  im.layout = gpt_param_layout(config);
  im.count = gpt_param_count(config);
  im.stream = static_cast<cudaStream_t>(options.stream);
  if (im.stream == nullptr) {
    // A stream of its own (not the legacy default stream), so that a training step can be captured
    // in a CUDA graph.
    check_cuda(cudaStreamCreateWithFlags(&im.stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    im.own_stream = true;
  }
  im.memory = cuda_gpt_memory(config, batch, seq, options.precision);
  const std::int64_t bytes = im.memory.total() - kMatmulWorkspace;
  if (const cudaError_t e = cudaMalloc(&im.base, static_cast<std::size_t>(bytes)); e != cudaSuccess) {
    cudaGetLastError();
    std::size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) cudaGetLastError();  // no stale error for later checks
    if (e == cudaErrorMemoryAllocation)
      throw OutOfMemory("out of GPU memory: the model needs " + std::to_string(im.memory.total()) + " bytes (params " +
                            std::to_string(im.memory.params) + ", grads " + std::to_string(im.memory.grads) +
                            ", activations " + std::to_string(im.memory.activations) + ", workspace " +
                            std::to_string(im.memory.workspace) + "), " + std::to_string(free) + " are free",
                        im.memory.total(), static_cast<long long>(free));
    check_cuda(e, "cudaMalloc");
  }
  check_cuda(cudaMemsetAsync(im.base, 0, static_cast<std::size_t>(bytes), im.stream), "cudaMemsetAsync");
  im.matmul = std::make_unique<model::cuda::Matmul>(options.precision == CudaPrecision::kFp32 && options.allow_tf32);
}

CudaGpt::~CudaGpt() = default;

const GptConfig& CudaGpt::config() const { return impl_->config; }
std::int64_t CudaGpt::batch() const { return impl_->batch; }
std::int64_t CudaGpt::seq() const { return impl_->seq; }
std::int64_t CudaGpt::param_count() const { return impl_->count; }
const std::vector<ParamTensor>& CudaGpt::layout() const { return impl_->layout; }
const CudaGptMemory& CudaGpt::memory() const { return impl_->memory; }

void CudaGpt::init(std::uint64_t seed) {
  std::vector<float> host(static_cast<std::size_t>(impl_->count));
  gpt_init_params(impl_->config, impl_->layout, host.data(), seed);
  set_params(host.data());
}

void CudaGpt::set_params(const float* host) {
  Impl& im = *impl_;
  const auto n = static_cast<std::size_t>(im.count);
  if (im.options.precision == CudaPrecision::kFp32) {
    copy_and_wait(im.carve<float>().params, host, n * sizeof(float), cudaMemcpyHostToDevice, im.stream);
    return;
  }
  std::vector<std::uint16_t> bits(n);
  for (std::size_t i = 0; i < n; ++i) bits[i] = math::bf16_round_nearest(host[i]);
  copy_and_wait(im.carve<__nv_bfloat16>().params, bits.data(), n * 2, cudaMemcpyHostToDevice, im.stream);
}

void CudaGpt::get_params(float* host) const {
  const Impl& im = *impl_;
  const auto n = static_cast<std::size_t>(im.count);
  if (im.options.precision == CudaPrecision::kFp32) {
    copy_and_wait(host, im.carve<float>().params, n * sizeof(float), cudaMemcpyDeviceToHost, im.stream);
    return;
  }
  std::vector<std::uint16_t> bits(n);
  copy_and_wait(bits.data(), im.carve<__nv_bfloat16>().params, n * 2, cudaMemcpyDeviceToHost, im.stream);
  for (std::size_t i = 0; i < n; ++i) host[i] = math::bf16_to_float(bits[i]);
}

void CudaGpt::get_grads(float* host) const {
  const Impl& im = *impl_;
  const float* grads = im.options.precision == CudaPrecision::kFp32 ? im.carve<float>().grads
                                                                     : im.carve<__nv_bfloat16>().grads;
  copy_and_wait(host, grads, static_cast<std::size_t>(im.count) * sizeof(float), cudaMemcpyDeviceToHost, im.stream);
}

void CudaGpt::zero_grad() {
  Impl& im = *impl_;
  float* grads = im.options.precision == CudaPrecision::kFp32 ? im.carve<float>().grads
                                                               : im.carve<__nv_bfloat16>().grads;
  check_cuda(cudaMemsetAsync(grads, 0, static_cast<std::size_t>(im.count) * sizeof(float), im.stream),
             "cudaMemsetAsync");
}

std::vector<float> CudaGpt::logits() const {
  const Impl& im = *impl_;
  const std::int64_t n = im.batch * im.seq * im.config.vocab;
  std::vector<float> out(static_cast<std::size_t>(n));
  if (im.options.precision == CudaPrecision::kFp32) {
    copy_and_wait(out.data(), im.carve<float>().logits, out.size() * 4, cudaMemcpyDeviceToHost, im.stream);
  } else {
    std::vector<std::uint16_t> bits(out.size());
    copy_and_wait(bits.data(), im.carve<__nv_bfloat16>().logits, bits.size() * 2, cudaMemcpyDeviceToHost, im.stream);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = math::bf16_to_float(bits[i]);
  }
  return out;
}

void* CudaGpt::stream() const { return impl_->stream; }

void CudaGpt::synchronize() const { check_cuda(cudaStreamSynchronize(impl_->stream), "cudaStreamSynchronize"); }

std::vector<ModelTensor> CudaGpt::tensors() {
  Impl& im = *impl_;
  std::vector<ModelTensor> out;
  const bool bf16 = im.options.precision == CudaPrecision::kBf16;
  std::byte* params = bf16 ? reinterpret_cast<std::byte*>(im.carve<__nv_bfloat16>().params)
                           : reinterpret_cast<std::byte*>(im.carve<float>().params);
  float* grads = bf16 ? im.carve<__nv_bfloat16>().grads : im.carve<float>().grads;
  const std::int64_t element = bf16 ? 2 : 4;
  for (const ParamTensor& t : im.layout)
    out.push_back({t.name, t.shape, params + t.offset * element, grads + t.offset, bf16 ? DType::BF16 : DType::F32});
  return out;
}

void CudaGpt::check_tokens(const std::int32_t* tokens, const std::int32_t* targets, std::int64_t n) const {
  const std::int64_t V = impl_->config.vocab;
  for (std::int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V)
      throw InvalidArgument("token " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                            " is outside the vocabulary of " + std::to_string(V));
    if (targets != nullptr && (targets[i] < 0 || targets[i] >= V))
      throw InvalidArgument("target " + std::to_string(targets[i]) + " at position " + std::to_string(i) +
                            " is outside the vocabulary of " + std::to_string(V));
  }
}

// The forward's kernels over the tokens (and targets) already in device memory; no host work.
template <class T>
void CudaGpt::Impl::enqueue_forward(bool with_targets) {
  namespace ops = model::cuda;
  const std::int64_t B = batch, Tn = seq, C = config.width, V = config.vocab, NH = config.heads, BT = B * Tn;
  Layout<T> a = carve<T>();
  ParamViews<T> w(config, layout, a.params);
  ops::embedding_forward(a.encoded, a.tokens, w.wte, w.wpe, B, Tn, C, stream);
  const T* residual = a.encoded;
  for (std::int64_t l = 0; l < config.layers; ++l) {
    const auto& lw = w.layers[static_cast<std::size_t>(l)];
    const auto& la = a.layers[static_cast<std::size_t>(l)];
    ops::layernorm_forward(la.ln1, la.ln1_mean, la.ln1_rstd, residual, lw.ln1w, lw.ln1b, BT, C, stream);
    matmul->forward<T>(la.qkv, nullptr, la.ln1, lw.qkvw, lw.qkvb, BT, C, 3 * C, stream);
    ops::attention_forward(la.atty, la.lse, la.qkv, B, Tn, C, NH, stream);
    matmul->forward<T>(la.attproj, nullptr, la.atty, lw.attprojw, lw.attprojb, BT, C, C, stream);
    ops::residual_forward(la.res2, residual, la.attproj, BT * C, stream);
    ops::layernorm_forward(la.ln2, la.ln2_mean, la.ln2_rstd, la.res2, lw.ln2w, lw.ln2b, BT, C, stream);
    matmul->forward<T>(la.fch_gelu, la.fch, la.ln2, lw.fcw, lw.fcb, BT, C, 4 * C, stream);
    matmul->forward<T>(la.fcproj, nullptr, la.fch_gelu, lw.fcprojw, lw.fcprojb, BT, 4 * C, C, stream);
    ops::residual_forward(la.res3, la.res2, la.fcproj, BT * C, stream);
    residual = la.res3;
  }
  ops::layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, residual, w.lnfw, w.lnfb, BT, C, stream);
  matmul->forward<T>(a.logits, nullptr, a.lnf, w.wte, nullptr, BT, C, V, stream);
  if (with_targets) ops::crossentropy_forward_backward(a.losses, a.logits, a.targets, 0.0f, false, BT, V, V, stream);
  have_targets = with_targets;
}

template <class T>
float CudaGpt::Impl::forward(const std::int32_t* tokens, const std::int32_t* targets) {
  const std::int64_t BT = batch * seq;
  Layout<T> a = carve<T>();
  check_cuda(cudaMemcpyAsync(a.tokens, tokens, static_cast<std::size_t>(BT) * 4, cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync");
  if (targets != nullptr)
    check_cuda(cudaMemcpyAsync(a.targets, targets, static_cast<std::size_t>(BT) * 4, cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync");
  enqueue_forward<T>(targets != nullptr);
  if (targets == nullptr) {
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    return 0.0f;
  }
  std::vector<float> losses(static_cast<std::size_t>(BT));
  check_cuda(cudaMemcpyAsync(losses.data(), a.losses, losses.size() * 4, cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return mean_token_loss(losses);
}

template <class T>
void CudaGpt::Impl::backward(float loss_scale) {
  namespace ops = model::cuda;
  if (!have_targets) throw InvalidArgument("backward needs a forward with targets");
  const std::int64_t B = batch, Tn = seq, C = config.width, V = config.vocab, NH = config.heads, BT = B * Tn;
  Layout<T> a = carve<T>();
  ParamViews<T> w(config, layout, a.params);
  ParamViews<float> dw(config, layout, a.grads);  // the fp32 parameter gradients, same layout
  // The logits become their gradient in place: (softmax - onehot) * loss_scale / BT.
  ops::crossentropy_forward_backward(a.losses, a.logits, a.targets, loss_scale / static_cast<float>(BT), true, BT, V,
                                     V, stream);
  check_cuda(cudaMemsetAsync(a.dresid, 0, static_cast<std::size_t>(BT * C) * sizeof(T), stream), "cudaMemsetAsync");
  matmul->backward<T>(a.dbtc, dw.wte, nullptr, a.logits, a.lnf, w.wte, BT, C, V, a.scratch, stream);
  const T* last = config.layers > 0 ? a.layers.back().res3 : a.encoded;
  ops::layernorm_backward(a.dresid, dw.lnfw, dw.lnfb, a.dbtc, last, w.lnfw, a.lnf_mean, a.lnf_rstd, BT, C, a.scratch,
                          stream);
  for (std::int64_t l = config.layers - 1; l >= 0; --l) {
    const auto li = static_cast<std::size_t>(l);
    const auto& lw = w.layers[li];
    const auto& la = a.layers[li];
    const auto& lg = dw.layers[li];
    const T* res_in = l == 0 ? a.encoded : a.layers[li - 1].res3;
    // res3 = res2 + fcproj: both get dresid; the MLP branch first.
    matmul->backward<T>(a.dbt4c, lg.fcprojw, lg.fcprojb, a.dresid, la.fch_gelu, lw.fcprojw, BT, 4 * C, C, a.scratch, stream);
    ops::gelu_backward(a.dbt4c, la.fch, a.dbt4c, BT * 4 * C, stream);
    matmul->backward<T>(a.dbtc, lg.fcw, lg.fcb, a.dbt4c, la.ln2, lw.fcw, BT, C, 4 * C, a.scratch, stream);
    ops::layernorm_backward(a.dresid, lg.ln2w, lg.ln2b, a.dbtc, la.res2, lw.ln2w, la.ln2_mean, la.ln2_rstd, BT, C,
                            a.scratch, stream);
    // res2 = res_in + attproj: the attention branch.
    matmul->backward<T>(a.dbtc, lg.attprojw, lg.attprojb, a.dresid, la.atty, lw.attprojw, BT, C, C, a.scratch, stream);
    ops::attention_backward(a.dqkv, a.dbtc, la.qkv, la.atty, la.lse, B, Tn, C, NH, a.scratch, stream);
    matmul->backward<T>(a.dbtc, lg.qkvw, lg.qkvb, a.dqkv, la.ln1, lw.qkvw, BT, C, 3 * C, a.scratch, stream);
    ops::layernorm_backward(a.dresid, lg.ln1w, lg.ln1b, a.dbtc, res_in, lw.ln1w, la.ln1_mean, la.ln1_rstd, BT, C,
                            a.scratch, stream);
  }
  ops::embedding_backward(dw.wte, dw.wpe, a.dresid, a.tokens, B, Tn, C, V, a.scratch, stream);
  have_targets = false;  // the logits now hold their gradient
}

float CudaGpt::forward(const std::int32_t* tokens, const std::int32_t* targets) {
  check_tokens(tokens, targets, impl_->batch * impl_->seq);
  if (impl_->options.precision == CudaPrecision::kBf16) return impl_->forward<__nv_bfloat16>(tokens, targets);
  return impl_->forward<float>(tokens, targets);
}

void CudaGpt::backward(float loss_scale) {
  if (impl_->options.precision == CudaPrecision::kBf16) return impl_->backward<__nv_bfloat16>(loss_scale);
  impl_->backward<float>(loss_scale);
}

template <class T>
void CudaGpt::Impl::enqueue_micro_batch(const std::int32_t* tokens, const std::int32_t* targets, float* token_losses,
                                        float loss_scale) {
  Layout<T> a = carve<T>();
  const auto bytes = static_cast<std::size_t>(batch * seq) * 4;
  check_cuda(cudaMemcpyAsync(a.tokens, tokens, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
  check_cuda(cudaMemcpyAsync(a.targets, targets, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
  enqueue_forward<T>(true);
  check_cuda(cudaMemcpyAsync(token_losses, a.losses, bytes, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  backward<T>(loss_scale);
}

void CudaGpt::enqueue_micro_batch(const std::int32_t* tokens, const std::int32_t* targets, float* token_losses,
                                  float loss_scale) {
  if (impl_->options.precision == CudaPrecision::kBf16)
    return impl_->enqueue_micro_batch<__nv_bfloat16>(tokens, targets, token_losses, loss_scale);
  impl_->enqueue_micro_batch<float>(tokens, targets, token_losses, loss_scale);
}

}  // namespace nibble::model
