// A build without CUDA: asking for a CUDA optimizer is refused here, saying what is missing.
#include "nibble/error.hpp"
#include "optim/impl.hpp"

namespace nibble {

std::unique_ptr<Backend> make_cuda_backend() {
  throw DeviceError("a CUDA optimizer was asked for, but this nibble was built without CUDA (no nvcc at build time)");
}

}  // namespace nibble
