// Compiles every host+device function of src/math/ for the GPU, so a change that makes the shared
// math unusable in device code fails the build here (CI has nvcc but no GPU). The CUDA optimizer
// kernels will call these same functions; this file launches nothing.
#include "math/bf16.hpp"
#include "math/codebook.hpp"
#include "math/rules.hpp"

namespace nibble::math {

__global__ void math_compile_check_kernel(const Codebook* cb, float* p, const float* g, float* s, std::uint8_t* codes,
                                          std::uint16_t* h, long long n) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  float pi = p[i], m = s[i], v = s[n + i], vmax = s[2 * n + i];
  adam_update<true>(pi, g[i], m, v, vmax, AdamStep{0.9f, 0.1f, 0.999f, 0.001f, 1e-3f, 1.0f, 1e-8f, 0.0f, 1.0f, 1.0f});
  sgd_update(pi, g[i], m, SgdStep{1e-3f, 0.9f, 1.0f, 0.9f, 0.0f, 0.0f, 1.0f, 1.0f});
  lion_update(pi, g[i], m, LionStep{1e-4f, 0.9f, 0.1f, 0.99f, 0.01f, 1.0f, 1.0f});
  qhm_update(pi, g[i], m, QhmStep{1e-3f, 0.999f, 0.001f, 0.7f, 0.3f, 0.0f, 1.0f, 1.0f});
  sophia_update(pi, g[i], m, v, SophiaStep{1e-4f, 0.965f, 0.035f, 204.8f, 1.0f, 1.0f});
  sophia_hessian_update(v, g[i] * g[i], SophiaHessianStep{0.99f, 0.01f});
  const AdamPStep ap{0.9f, 0.1f, 0.999f, 0.001f, 1e-3f, 1.0f, 1e-8f, 0.0f, 1.0f};
  adamp_apply(pi, adamp_perturb(g[i], m, v, ap), 1.0f, 0.0f, 1.0f, 1e-3f);
  const AdafactorStep af{0.5f, 0.5f, 1e-30f, 1.0f, 1e-3f, 0.9f, 0.1f, 1.0f};
  adafactor_apply<true>(pi, adafactor_unfactored(g[i], v, af) + adafactor_factored(g[i], 1.0f, 1.0f, af), m, af);
  p[i] = pi;
  codes[i] = codebook_encode(*cb, m);
  s[i] = codebook_decode(*cb, codes[i]);
  h[i] = static_cast<std::uint16_t>(bf16_round_nearest(v) ^ bf16_round_stochastic(vmax, hash_u32(1, i)));
  s[n + i] = bf16_to_float(h[i]);
}

}  // namespace nibble::math
