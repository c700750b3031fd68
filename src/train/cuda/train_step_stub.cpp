// A build without CUDA: the CUDA training step refuses to exist, saying why; the trainer refuses
// --device cuda before it gets here.
#include "nibble/error.hpp"
#include "train/cuda/train_step.hpp"

namespace nibble::train {
namespace {
[[noreturn]] void missing() { throw DeviceError("this nibble was built without CUDA: no CUDA training engine"); }
}  // namespace

struct CudaTrainStep::Impl {};
CudaTrainStep::CudaTrainStep(model::CudaGpt&, Optimizer&, std::int64_t) { missing(); }
CudaTrainStep::~CudaTrainStep() = default;
float CudaTrainStep::run(const std::int32_t*, const std::int32_t*, float, StepResult&) { missing(); }
bool CudaTrainStep::captured() const { missing(); }

}  // namespace nibble::train
