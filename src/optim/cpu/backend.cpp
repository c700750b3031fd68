// The CPU backend: state in one host arena, steps run by the OpenMP driver (driver.cpp) after the
// shared step policy; the host reads and writes the live state directly.
#include <cmath>

#include <fmt/format.h>

#include "math/step_policy.hpp"
#include "nibble/error.hpp"
#include "optim/impl.hpp"

namespace nibble {
namespace {

class CpuBackend final : public Backend {
 public:
  std::byte* allocate_arena(Optimizer::Impl& impl, std::int64_t bytes) override {
    impl.arena = Buffer(static_cast<std::size_t>(bytes));
    return impl.arena.data();
  }
  void create(Optimizer::Impl& impl) override { cpu::reserve_scratch(impl); }

  StepResult step(Optimizer::Impl& im, const StepOptions& options) override {
    const bool norm_computed = !options.found_inf && (options.grad_square_sum || im.options.check_finite ||
                                                      im.options.max_grad_norm > 0.0f);
    const double square_sum =
        !norm_computed ? 0.0 : options.grad_square_sum ? *options.grad_square_sum : cpu::grad_square_sum(im, {});
    const math::StepDecision decision =
        math::decide_step(options.found_inf, norm_computed, square_sum, options.grad_scale, im.options.max_grad_norm);
    StepResult result;
    result.grad_norm = decision.grad_norm;
    result.skipped = decision.skip;
    if (decision.skip) {
      ++im.skipped;
    } else {
      ++im.steps;
      for (TensorState& t : im.tensors)
        if (t.param.grad != nullptr) ++t.step;
      cpu::step(im, decision.grad_mul, options.lr_scale);
    }
    result.step = im.steps;
    return result;
  }

  double grad_square_sum(Optimizer::Impl& im, std::span<const std::uint8_t> counted) override {
    return cpu::grad_square_sum(im, counted);
  }
  void enqueue_step(Optimizer::Impl&) override {
    throw InvalidArgument("enqueue_step() is for CUDA optimizers; a CPU optimizer steps with step()");
  }
  void enqueue_grad_square_sum(Optimizer::Impl&, std::span<const std::uint8_t>, double*) override {
    throw InvalidArgument("enqueue_grad_square_sum() is for CUDA optimizers; a CPU optimizer returns the sum from "
                          "grad_square_sum()");
  }
  void enqueue_step_with_square_sum(Optimizer::Impl&, const double*) override {
    throw InvalidArgument("enqueue_step_with_square_sum() is for CUDA optimizers; a CPU optimizer takes the sum in "
                          "StepOptions::grad_square_sum");
  }
  DeviceScalars scalars(const Optimizer::Impl&) const override {
    throw InvalidArgument("device_scalars() is for CUDA optimizers; this one runs on the CPU");
  }
  void synchronize(const Optimizer::Impl&) const override {}
  void set_stream(Optimizer::Impl&, void*) override {
    throw InvalidArgument("set_cuda_stream() is for CUDA optimizers; this one runs on the CPU");
  }
  void grad_changed(Optimizer::Impl&, std::size_t) override {}
  void grads_changed(Optimizer::Impl&) override {}

  void update_hessian(Optimizer::Impl& im, std::span<const float* const> estimates) override {
    for (std::size_t i = 0; i < im.tensors.size(); ++i) {
      const float* e = estimates[i];
      if (e == nullptr) continue;
      for (std::int64_t k = 0; k < im.tensors[i].numel; ++k)
        if (!std::isfinite(e[k]))
          throw InvalidArgument(fmt::format("Hessian estimate of '{}' holds {} at element {}",
                                            im.tensors[i].param.name, e[k], k));
    }
    cpu::update_hessian(im, estimates);
  }

  void hyper_changed(Optimizer::Impl&) override {}  // each step reads impl.hyper and the tensors' rates
  void refresh_counters(Optimizer::Impl&) override {}
  HostState host_state(Optimizer::Impl& im) override {
    HostState state;
    state.tensors = &im.tensors;
    return state;
  }
  void commit_host_state(Optimizer::Impl&, HostState&) override {}
  void interpolate_params(Optimizer::Impl& im, float weight) override { cpu::interpolate_params(im, weight); }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace nibble
