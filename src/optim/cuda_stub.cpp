// A build without CUDA: the optimizer refuses Device::kCuda before it gets here, so these only
// keep the link whole; each says what is missing if it is ever reached.
#include "nibble/error.hpp"
#include "optim/impl.hpp"

namespace nibble::cuda {
namespace {
[[noreturn]] void missing() { throw DeviceError("this nibble was built without CUDA (no nvcc at build time)"); }
}  // namespace

std::byte* allocate_arena(Optimizer::Impl&, std::int64_t) { missing(); }
void create(Optimizer::Impl&) { missing(); }
void set_scalars(Optimizer::Impl&, float, float, bool) { missing(); }
void set_grads(Optimizer::Impl&) { missing(); }
void set_stream(Optimizer::Impl&, void*) { missing(); }
void enqueue_step(Optimizer::Impl&) { missing(); }
StepResult read_result(Optimizer::Impl&) { missing(); }
void pull_counters(Optimizer::Impl&, std::vector<TensorState>&) { missing(); }
void push_counters(Optimizer::Impl&) { missing(); }
void set_grad(Optimizer::Impl&, std::size_t) { missing(); }
std::int64_t update_hessian(Optimizer::Impl&, std::span<const float* const>) { missing(); }
void download(const Optimizer::Impl&, std::byte*) { missing(); }
void upload(Optimizer::Impl&, const std::byte*) { missing(); }
std::byte* arena_base(const Optimizer::Impl&) { missing(); }
DeviceScalars scalars(const Optimizer::Impl&) { missing(); }
void synchronize(const Optimizer::Impl&) { missing(); }
void destroy(DeviceState*) {}

}  // namespace nibble::cuda
