// A build without CUDA: the CUDA engine refuses to exist, saying why; the trainer refuses
// --device cuda before it gets here.
#include "model/gpt_cuda.hpp"
#include "nibble/error.hpp"

namespace nibble::model {
namespace {
[[noreturn]] void missing() { throw DeviceError("this nibble was built without CUDA: no CUDA training engine"); }
}  // namespace

struct CudaGpt::Impl {};

CudaGptMemory cuda_gpt_memory(const GptConfig&, std::int64_t, std::int64_t, CudaPrecision) { missing(); }
CudaGpt::CudaGpt(const GptConfig&, std::int64_t, std::int64_t, CudaGptOptions) { missing(); }
CudaGpt::~CudaGpt() = default;
const GptConfig& CudaGpt::config() const { missing(); }
std::int64_t CudaGpt::batch() const { missing(); }
std::int64_t CudaGpt::seq() const { missing(); }
std::int64_t CudaGpt::param_count() const { missing(); }
const std::vector<ParamTensor>& CudaGpt::layout() const { missing(); }
const CudaGptMemory& CudaGpt::memory() const { missing(); }
void CudaGpt::init(std::uint64_t) { missing(); }
void CudaGpt::set_params(const float*) { missing(); }
void CudaGpt::get_params(float*) const { missing(); }
void CudaGpt::get_grads(float*) const { missing(); }
float CudaGpt::forward(const std::int32_t*, const std::int32_t*) { missing(); }
void CudaGpt::backward(float) { missing(); }
void CudaGpt::zero_grad() { missing(); }
std::vector<float> CudaGpt::logits() const { missing(); }
void CudaGpt::synchronize() const { missing(); }
void* CudaGpt::stream() const { missing(); }
std::vector<ModelTensor> CudaGpt::tensors() { missing(); }
void CudaGpt::check_tokens(const std::int32_t*, const std::int32_t*, std::int64_t) const { missing(); }
void CudaGpt::enqueue_micro_batch(const std::int32_t*, const std::int32_t*, float*, float) { missing(); }

}  // namespace nibble::model
