// The CUDA training step: the model's micro-batches and the optimizer's step queued on one stream,
// run eagerly once, then captured in a CUDA graph and replayed; the batch goes in and the losses
// and the step's result come out through pinned host memory, so that nothing in the graph waits.
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "core/cuda/check.cuh"
#include "model/loss.hpp"
#include "nibble/error.hpp"
#include "train/cuda/train_step.hpp"

namespace nibble::train {
namespace {

using nibble::cuda::check_cuda;

}  // namespace

struct CudaTrainStep::Impl {
  model::CudaGpt& gpt;
  Optimizer& optimizer;
  std::int64_t accum = 1, bt = 0;
  cudaStream_t stream = nullptr;  // the model's; the optimizer queues its step there too
  DeviceScalars scalars;
  std::int32_t* tokens = nullptr;  // pinned: accum x BT each
  std::int32_t* targets = nullptr;
  float* losses = nullptr;
  struct In {
    float lr_scale, grad_scale;
    int found_inf;
  };
  struct Out {
    int skipped;
    double grad_norm;
    long long steps;
  };
  In* in = nullptr;    // pinned
  Out* out = nullptr;  // pinned
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  std::int64_t runs = 0;

  Impl(model::CudaGpt& g, Optimizer& o, std::int64_t a) : gpt(g), optimizer(o), accum(a) {}
  ~Impl() {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaFreeHost(tokens);
    cudaFreeHost(targets);
    cudaFreeHost(losses);
    cudaFreeHost(in);
    cudaFreeHost(out);
  }

  // The step's work, queued on the model's stream; only device work and pinned-memory copies, so
  // it can be captured.
  void enqueue() {
    gpt.zero_grad();
    for (std::int64_t m = 0; m < accum; ++m)
      gpt.enqueue_micro_batch(tokens + m * bt, targets + m * bt, losses + m * bt, 1.0f / static_cast<float>(accum));
    check_cuda(cudaMemcpyAsync(scalars.lr_scale, &in->lr_scale, 4, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    check_cuda(cudaMemcpyAsync(scalars.grad_scale, &in->grad_scale, 4, cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync");
    check_cuda(cudaMemcpyAsync(scalars.found_inf, &in->found_inf, 4, cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync");
    optimizer.enqueue_step();
    check_cuda(cudaMemcpyAsync(&out->skipped, scalars.skipped_last, 4, cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync");
    check_cuda(cudaMemcpyAsync(&out->grad_norm, scalars.grad_norm, 8, cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync");
    check_cuda(cudaMemcpyAsync(&out->steps, scalars.steps, 8, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  }
};

CudaTrainStep::CudaTrainStep(model::CudaGpt& gpt, Optimizer& optimizer, std::int64_t accum)
    : impl_(std::make_unique<Impl>(gpt, optimizer, accum)) {
  Impl& im = *impl_;
  if (accum <= 0) throw InvalidArgument("accum must be positive, got " + std::to_string(accum));
  if (optimizer.device() != Device::kCuda)
    throw InvalidArgument("a CUDA training step needs a CUDA optimizer; this one runs on the CPU");
  optimizer.set_cuda_stream(gpt.stream());
  im.stream = static_cast<cudaStream_t>(gpt.stream());
  im.scalars = optimizer.device_scalars();
  im.bt = gpt.batch() * gpt.seq();
  const auto n = static_cast<std::size_t>(accum * im.bt);
  check_cuda(cudaMallocHost(&im.tokens, n * 4), "cudaMallocHost");
  check_cuda(cudaMallocHost(&im.targets, n * 4), "cudaMallocHost");
  check_cuda(cudaMallocHost(&im.losses, n * 4), "cudaMallocHost");
  check_cuda(cudaMallocHost(&im.in, sizeof(Impl::In)), "cudaMallocHost");
  check_cuda(cudaMallocHost(&im.out, sizeof(Impl::Out)), "cudaMallocHost");
}

CudaTrainStep::~CudaTrainStep() = default;

bool CudaTrainStep::captured() const { return impl_->exec != nullptr; }

float CudaTrainStep::run(const std::int32_t* tokens, const std::int32_t* targets, float lr_scale, StepResult& result) {
  Impl& im = *impl_;
  const std::int64_t n = im.accum * im.bt;
  im.gpt.check_tokens(tokens, targets, n);
  check_cuda(cudaStreamSynchronize(im.stream), "cudaStreamSynchronize");  // the pinned buffers are free
  std::memcpy(im.tokens, tokens, static_cast<std::size_t>(n) * 4);
  std::memcpy(im.targets, targets, static_cast<std::size_t>(n) * 4);
  *im.in = {lr_scale, 1.0f, 0};
  if (im.runs == 0) {
    // Eagerly first: fills the matrix-product algorithm cache, which capture must not query.
    im.enqueue();
  } else {
    if (im.exec == nullptr) {
      check_cuda(cudaStreamBeginCapture(im.stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
      try {
        im.enqueue();
      } catch (...) {
        cudaGraph_t broken = nullptr;
        cudaStreamEndCapture(im.stream, &broken);
        if (broken != nullptr) cudaGraphDestroy(broken);
        throw;
      }
      check_cuda(cudaStreamEndCapture(im.stream, &im.graph), "cudaStreamEndCapture");
      if (const cudaError_t e = cudaGraphInstantiate(&im.exec, im.graph, 0); e != cudaSuccess) {
        // Not kept half-made: the next step captures afresh.
        cudaGraphDestroy(im.graph);
        im.graph = nullptr;
        im.exec = nullptr;
        check_cuda(e, "cudaGraphInstantiate");
      }
    }
    check_cuda(cudaGraphLaunch(im.exec, im.stream), "cudaGraphLaunch");
  }
  check_cuda(cudaStreamSynchronize(im.stream), "cudaStreamSynchronize");
  ++im.runs;
  result.skipped = im.out->skipped != 0;
  result.grad_norm = im.out->grad_norm;
  result.step = im.out->steps;
  return model::step_loss({im.losses, static_cast<std::size_t>(n)}, im.bt);
}

}  // namespace nibble::train
