// The GPT engine's matrix products on cuBLASLt (ops.cuh: Matmul): row-major activations mapped onto
// cuBLASLt's column-major layouts, the bias fused as an epilogue, GELU and the bias gradient in
// small kernels of our own, and one heuristic query per problem, cached, so a step queries nothing.
#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "core/cuda/check.cuh"
#include "model/cuda/convert.cuh"
#include "model/cuda/gelu.cuh"
#include "model/cuda/ops.cuh"
#include "nibble/error.hpp"

namespace nibble::model::cuda {
namespace {

// NOTE: layouts. A row-major X[R, C] is, to cuBLASLt (column-major), the matrix X^T with C rows,
// R columns and leading dimension C. So every product below is written for the transposes:
//   forward      out^T[OC, N]   = (W^T)^T[OC, IC] * in^T[IC, N]      m=OC k=IC n=N   A=W  (T)  B=in   (N)
//   input grad   din^T[IC, N]   = W^T[IC, OC]     * dout^T[OC, N]    m=IC k=OC n=N   A=W  (N)  B=dout (N)
//   weight grad  dW^T[IC, OC]  += in^T[IC, N]     * (dout^T)^T[N, OC] m=IC k=N  n=OC A=in (N)  B=dout (T)
// The bias epilogue adds a vector over D's rows: OC for the forward, as wanted.

// One workspace per Matmul, so its calls must not overlap on different streams (one stream, or
// streams ordered by events, as a training step is).
constexpr std::size_t kWorkspaceBytes = std::size_t{32} << 20;  // cuBLAS's recommendation for Hopper
constexpr int kHeuristicCandidates = 8;
// NOTE: the alignment preferences cover A, B, C and D but not the bias pointer, and kernels have
// been seen to assume a 16-byte aligned bias; a less aligned bias is added by a broadcast into D
// (beta = 1) instead of the epilogue.
constexpr std::uint32_t kBiasEpilogueAlignment = 16;

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 1 << 16;
// Bias gradient: a block sums kBiasCols columns of one chunk of rows with kBiasLanes row lanes.
// The chunking depends on N only, so every run of a shape adds in the same order.
constexpr int kBiasCols = 32;
constexpr int kBiasLanes = 8;
constexpr std::int64_t kBiasRowsPerChunk = 256;
constexpr std::int64_t kBiasMaxChunks = 64;

[[noreturn]] void throw_cublaslt(const char* call, cublasStatus_t status, const char* file, int line) {
  throw DeviceError(std::string("cuBLASLt call ") + call + " failed: " + cublasLtGetStatusName(status) + " (" +
                    cublasLtGetStatusString(status) + ") at " + file + ":" + std::to_string(line));
}

#define NIBBLE_LT_CALL(call)                                                       \
  do {                                                                             \
    const cublasStatus_t nibble_lt_status = (call);                                \
    if (nibble_lt_status != CUBLAS_STATUS_SUCCESS)                                 \
      throw_cublaslt(#call, nibble_lt_status, __FILE__, __LINE__);                 \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Kernels.

template <class T>
struct alignas(16) Pack16 {
  T v[16 / sizeof(T)];
};

// out[i] = gelu(in[i]); 128-bit loads and stores when both pointers allow them, then a scalar tail.
template <class T>
__global__ void __launch_bounds__(kThreads) gelu_kernel(T* out, const T* in, std::int64_t n, bool vectorized) {
  constexpr int kWidth = 16 / sizeof(T);
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t first = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  std::int64_t tail = 0;
  if (vectorized) {
    const std::int64_t packs = n / kWidth;
    for (std::int64_t p = first; p < packs; p += stride) {
      const Pack16<T> x = reinterpret_cast<const Pack16<T>*>(in)[p];
      Pack16<T> y;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) y.v[j] = from_float<T>(gelu_tanh(to_float(x.v[j])));
      reinterpret_cast<Pack16<T>*>(out)[p] = y;
    }
    tail = packs * kWidth;
  }
  for (std::int64_t i = tail + first; i < n; i += stride) out[i] = from_float<T>(gelu_tanh(to_float(in[i])));
}

// out[r, c] = bias[c] (0 without a bias): the start of a product accumulated with beta = 1, or
// the whole product when IC = 0.
template <class T>
__global__ void __launch_bounds__(kThreads) bias_fill_kernel(T* out, const T* bias, std::int64_t N, std::int64_t OC) {
  const std::int64_t total = N * OC;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    out[i] = bias != nullptr ? bias[i % OC] : from_float<T>(0.0f);
}

// Column sums of dout over one chunk of rows (blockIdx.y): each lane adds its rows in order, then
// lane 0 adds the lanes in order. One chunk: straight into dbias; several: a partial per chunk.
template <class T>
__global__ void __launch_bounds__(kBiasCols * kBiasLanes)
    bias_grad_partial_kernel(float* partials, float* dbias, const T* dout, std::int64_t N, std::int64_t OC,
                             std::int64_t rows_per_chunk) {
  __shared__ float lane_sums[kBiasLanes][kBiasCols];
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * kBiasCols + threadIdx.x;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t row1 = row0 + rows_per_chunk < N ? row0 + rows_per_chunk : N;
  float sum = 0.0f;
  if (col < OC)
    for (std::int64_t r = row0 + threadIdx.y; r < row1; r += kBiasLanes) sum += to_float(dout[r * OC + col]);
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || col >= OC) return;
  float total = lane_sums[0][threadIdx.x];
#pragma unroll
  for (int lane = 1; lane < kBiasLanes; ++lane) total += lane_sums[lane][threadIdx.x];
  if (partials == nullptr)
    dbias[col] += total;
  else
    partials[static_cast<std::int64_t>(blockIdx.y) * OC + col] = total;
}

// dbias[c] += the chunks' partials of column c, in chunk order.
__global__ void __launch_bounds__(kThreads)
    bias_grad_finish_kernel(float* dbias, const float* partials, std::int64_t chunks, std::int64_t OC) {
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= OC) return;
  float total = 0.0f;
  for (std::int64_t c = 0; c < chunks; ++c) total += partials[c * OC + col];
  dbias[col] += total;
}

unsigned grid_for(std::int64_t work) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((work + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

std::uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

template <class T>
void launch_gelu(T* out, const T* in, std::int64_t n, cudaStream_t stream) {
  constexpr std::int64_t kWidth = 16 / sizeof(T);
  const bool vectorized = alignment_of(out) >= 16 && alignment_of(in) >= 16;
  const std::int64_t work = vectorized ? (n + kWidth - 1) / kWidth : n;
  gelu_kernel<T><<<grid_for(work), kThreads, 0, stream>>>(out, in, n, vectorized);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void launch_bias_fill(T* out, const T* bias, std::int64_t N, std::int64_t OC, cudaStream_t stream) {
  bias_fill_kernel<T><<<grid_for(N * OC), kThreads, 0, stream>>>(out, bias, N, OC);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

std::int64_t bias_grad_chunks(std::int64_t N) {
  return std::min((N + kBiasRowsPerChunk - 1) / kBiasRowsPerChunk, kBiasMaxChunks);
}

template <class T>
void launch_bias_grad(float* dbias, const T* dout, std::int64_t N, std::int64_t OC, float* partials,
                      cudaStream_t stream) {
  const std::int64_t chunks = bias_grad_chunks(N);
  const std::int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>((OC + kBiasCols - 1) / kBiasCols), static_cast<unsigned>(chunks));
  const dim3 block(kBiasCols, kBiasLanes);
  bias_grad_partial_kernel<T><<<grid, block, 0, stream>>>(chunks > 1 ? partials : nullptr, dbias, dout, N, OC,
                                                          rows_per_chunk);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
  if (chunks == 1) return;
  bias_grad_finish_kernel<<<static_cast<unsigned>((OC + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      dbias, partials, chunks, OC);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// cuBLASLt plumbing.

template <class T>
constexpr cudaDataType_t data_type() {
  if constexpr (std::is_same_v<T, float>)
    return CUDA_R_32F;
  else
    return CUDA_R_16BF;
}

// One product D = alpha * op(A) * op(B) + beta * C with C = D (same pointer, same layout).
struct Gemm {
  const char* what;  // for messages: "forward", "input gradient", "weight gradient"
  cudaDataType_t ab_type, cd_type;
  cublasComputeType_t compute;
  cublasOperation_t transa, transb;
  std::int64_t m, n, k;
  const void* a;
  std::int64_t lda;  // A is stored m x k (transa N) or k x m (transa T)
  const void* b;
  std::int64_t ldb;  // B is stored k x n (transb N) or n x k (transb T)
  void* d;
  std::int64_t ldd;  // D is m x n
  float beta;
  cublasLtEpilogue_t epilogue;
  const void* bias;
};

using AlgoKey = std::array<std::int64_t, 16>;

struct AlgoChoice {
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
};

// NOTE: the per-instance algorithm cache lives here, keyed by the Matmul's address, because the
// class's members are fixed by ops.cuh. A Matmul is neither copyable nor movable, so its address
// names it for its whole life; the destructor removes the entry.
struct MatmulState {
  int device = 0;
  std::mutex mutex;
  std::map<AlgoKey, AlgoChoice> algos;
};

struct Registry {
  std::mutex mutex;
  std::unordered_map<const Matmul*, std::unique_ptr<MatmulState>> states;
};

Registry& registry() {
  static Registry* const instance = new Registry();  // never destroyed: a static Matmul may outlive it
  return *instance;
}

MatmulState& state_of(const Matmul* matmul, const char* where) {
  MatmulState* state = nullptr;
  {
    Registry& r = registry();
    const std::lock_guard<std::mutex> lock(r.mutex);
    const auto it = r.states.find(matmul);
    if (it == r.states.end()) throw DeviceError(std::string(where) + ": this Matmul has no cuBLASLt state");
    state = it->second.get();
  }
  int device = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  if (device != state->device)
    throw InvalidArgument(std::string(where) + ": the Matmul was created on CUDA device " +
                          std::to_string(state->device) + " but device " + std::to_string(device) + " is current");
  return *state;
}

struct DescDestroy {
  void operator()(cublasLtMatmulDesc_t p) const noexcept { cublasLtMatmulDescDestroy(p); }
};
struct LayoutDestroy {
  void operator()(cublasLtMatrixLayout_t p) const noexcept { cublasLtMatrixLayoutDestroy(p); }
};
struct PreferenceDestroy {
  void operator()(cublasLtMatmulPreference_t p) const noexcept { cublasLtMatmulPreferenceDestroy(p); }
};
using DescPtr = std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDestroy>;
using LayoutPtr = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDestroy>;
using PreferencePtr = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDestroy>;

LayoutPtr make_layout(cudaDataType_t type, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  NIBBLE_LT_CALL(cublasLtMatrixLayoutCreate(&layout, type, static_cast<std::uint64_t>(rows),
                                            static_cast<std::uint64_t>(cols), ld));
  return LayoutPtr(layout);
}

// NOTE: determinism. cuBLASLt gives the same bits on every run for a fixed algorithm, stream and
// workspace; what may differ is how a split-K product is reduced. Every scheme cuBLASLt offers
// reduces in a fixed order (INPLACE serialises the splits through counters; COMPUTE_TYPE and
// OUTPUT_TYPE sum the workspace in a separate pass), but INPLACE and OUTPUT_TYPE round the partial
// sums to D's type: for a bf16 D that loses precision, so bf16 outputs allow only NONE and
// COMPUTE_TYPE. The chosen algorithm's scheme is checked against the mask as well.
std::uint32_t reduction_mask(cudaDataType_t cd_type) {
  std::uint32_t mask = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  if (cd_type == CUDA_R_32F) mask |= CUBLASLT_REDUCTION_SCHEME_INPLACE;
  return mask;
}

AlgoChoice choose_algorithm(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a_layout,
                            cublasLtMatrixLayout_t b_layout, cublasLtMatrixLayout_t d_layout, const Gemm& g,
                            std::size_t workspace_bytes) {
  cublasLtMatmulPreference_t raw = nullptr;
  NIBBLE_LT_CALL(cublasLtMatmulPreferenceCreate(&raw));
  const PreferencePtr pref(raw);
  const std::uint64_t max_workspace = workspace_bytes;
  NIBBLE_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                      &max_workspace, sizeof(max_workspace)));
  const std::uint32_t mask = reduction_mask(g.cd_type);
  NIBBLE_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask,
                                                      sizeof(mask)));
  const std::uint32_t align_a = alignment_of(g.a), align_b = alignment_of(g.b), align_d = alignment_of(g.d);
  NIBBLE_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                      &align_a, sizeof(align_a)));
  NIBBLE_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                      &align_b, sizeof(align_b)));
  NIBBLE_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                      &align_d, sizeof(align_d)));
  NIBBLE_LT_CALL(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                      &align_d, sizeof(align_d)));

  cublasLtMatmulHeuristicResult_t results[kHeuristicCandidates] = {};
  int count = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, desc, a_layout, b_layout, d_layout, d_layout,
                                                               pref.get(), kHeuristicCandidates, results, &count);
  AlgoChoice choice;
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) return choice;
  if (status != CUBLAS_STATUS_SUCCESS)
    throw_cublaslt("cublasLtMatmulAlgoGetHeuristic", status, __FILE__, __LINE__);
  // Results come fastest first; take the first that is valid and reduces in an allowed way.
  for (int i = 0; i < count; ++i) {
    if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > workspace_bytes) continue;
    std::uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
    std::size_t written = 0;
    NIBBLE_LT_CALL(cublasLtMatmulAlgoConfigGetAttribute(&results[i].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                                                        &scheme, sizeof(scheme), &written));
    if (scheme != CUBLASLT_REDUCTION_SCHEME_NONE && (scheme & mask) != scheme) continue;
    choice.found = true;
    choice.algo = results[i].algo;
    break;
  }
  return choice;
}

// Runs one product; false when cuBLASLt has no algorithm for it (remembered, so asked once).
bool run_gemm(MatmulState& state, cublasLtHandle_t handle, void* workspace, std::size_t workspace_bytes,
              const Gemm& g, cudaStream_t stream) {
  cublasLtMatmulDesc_t raw_desc = nullptr;
  NIBBLE_LT_CALL(cublasLtMatmulDescCreate(&raw_desc, g.compute, CUDA_R_32F));
  const DescPtr desc(raw_desc);
  NIBBLE_LT_CALL(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, &g.transa, sizeof(g.transa)));
  NIBBLE_LT_CALL(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, &g.transb, sizeof(g.transb)));
  NIBBLE_LT_CALL(
      cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue)));
  // The bias vector's type defaults to D's type: float for fp32, bf16 for bf16, as passed.
  if (g.bias != nullptr)
    NIBBLE_LT_CALL(
        cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));

  const bool a_plain = g.transa == CUBLAS_OP_N, b_plain = g.transb == CUBLAS_OP_N;
  const LayoutPtr a_layout = make_layout(g.ab_type, a_plain ? g.m : g.k, a_plain ? g.k : g.m, g.lda);
  const LayoutPtr b_layout = make_layout(g.ab_type, b_plain ? g.k : g.n, b_plain ? g.n : g.k, g.ldb);
  const LayoutPtr d_layout = make_layout(g.cd_type, g.m, g.n, g.ldd);

  const AlgoKey key = {g.ab_type,         g.cd_type,         g.compute,         g.transa,
                       g.transb,          g.m,               g.n,               g.k,
                       g.lda,             g.ldb,             g.ldd,             g.epilogue,
                       alignment_of(g.a), alignment_of(g.b), alignment_of(g.d), alignment_of(g.bias)};
  AlgoChoice choice;
  {
    const std::lock_guard<std::mutex> lock(state.mutex);
    const auto it = state.algos.find(key);
    if (it != state.algos.end()) {
      choice = it->second;
    } else {
      choice = choose_algorithm(handle, desc.get(), a_layout.get(), b_layout.get(), d_layout.get(), g, workspace_bytes);
      state.algos.emplace(key, choice);
    }
  }
  if (!choice.found) return false;

  const float alpha = 1.0f;
  const cublasStatus_t status = cublasLtMatmul(handle, desc.get(), &alpha, g.a, a_layout.get(), g.b, b_layout.get(),
                                               &g.beta, g.d, d_layout.get(), g.d, d_layout.get(), &choice.algo,
                                               workspace, workspace_bytes, stream);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) {
    // The heuristic's algorithm refused these operands after all (an epilogue's alignment, say):
    // remembered as none, so that this and later calls take the caller's fallback, or its error.
    const std::lock_guard<std::mutex> lock(state.mutex);
    state.algos[key].found = false;
    return false;
  }
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublaslt("cublasLtMatmul", status, __FILE__, __LINE__);
  return true;
}

[[noreturn]] void throw_no_algorithm(const char* where, const Gemm& g) {
  throw DeviceError(std::string(where) + ": cuBLASLt offers no algorithm for the " + g.what +
                    " product (m=" + std::to_string(g.m) + ", n=" + std::to_string(g.n) + ", k=" +
                    std::to_string(g.k) + ", " + (g.ab_type == CUDA_R_16BF ? "bf16" : "fp32") + " inputs)");
}

void check_sizes(const char* where, std::int64_t N, std::int64_t IC, std::int64_t OC) {
  constexpr std::int64_t kMax = std::numeric_limits<std::int32_t>::max();
  const std::pair<const char*, std::int64_t> sizes[] = {{"N", N}, {"IC", IC}, {"OC", OC}};
  for (const auto& [name, value] : sizes)
    if (value < 0 || value > kMax)
      throw InvalidArgument(std::string(where) + ": size " + name + " = " + std::to_string(value) +
                            " is outside [0, 2^31 - 1]");
}

void require(const void* p, const char* where, const char* name) {
  if (p == nullptr) throw InvalidArgument(std::string(where) + ": " + name + " is null");
}

template <class T>
cublasComputeType_t compute_type(bool allow_tf32) {
  if constexpr (std::is_same_v<T, float>)
    return allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  else
    return CUBLAS_COMPUTE_32F;
}

}  // namespace

Matmul::Matmul(bool allow_tf32) : allow_tf32_(allow_tf32) {
  int device = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  NIBBLE_LT_CALL(cublasLtCreate(&handle_));
  try {
    if (const cudaError_t error = cudaMalloc(&workspace_, kWorkspaceBytes); error != cudaSuccess) {
      cudaGetLastError();
      workspace_ = nullptr;
      std::size_t free = 0, total = 0;
      if (cudaMemGetInfo(&free, &total) != cudaSuccess) cudaGetLastError();  // no stale error for later checks
      if (error == cudaErrorMemoryAllocation)
        throw OutOfMemory("out of GPU memory: the cuBLASLt workspace needs " + std::to_string(kWorkspaceBytes) +
                              " bytes, " + std::to_string(free) + " are free",
                          static_cast<long long>(kWorkspaceBytes), static_cast<long long>(free));
      nibble::cuda::throw_cuda("cudaMalloc", error, __FILE__, __LINE__);
    }
    workspace_bytes_ = kWorkspaceBytes;
    // Zeroed once (split-K counters live in the workspace), and finished before any stream uses it.
    NIBBLE_CUDA_CHECK(cudaMemset(workspace_, 0, workspace_bytes_));
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    auto state = std::make_unique<MatmulState>();
    state->device = device;
    Registry& r = registry();
    const std::lock_guard<std::mutex> lock(r.mutex);
    r.states[this] = std::move(state);
  } catch (...) {
    cudaFree(workspace_);
    cublasLtDestroy(handle_);
    throw;
  }
}

Matmul::~Matmul() {
  try {
    Registry& r = registry();
    const std::lock_guard<std::mutex> lock(r.mutex);
    r.states.erase(this);
  } catch (...) {  // a failed lock leaves a stale entry, nothing worse
  }
  cudaFree(workspace_);
  cublasLtDestroy(handle_);
}

std::size_t Matmul::backward_scratch_bytes(std::int64_t N, std::int64_t OC) {
  if (N < 0 || OC < 0)
    throw InvalidArgument("Matmul::backward_scratch_bytes: negative size N = " + std::to_string(N) +
                          ", OC = " + std::to_string(OC));
  if (N == 0 || OC == 0) return 0;
  const std::int64_t chunks = bias_grad_chunks(N);
  return chunks > 1 ? static_cast<std::size_t>(chunks * OC) * sizeof(float) : 0;
}

template <class T>
void Matmul::forward(T* out, T* pre_gelu, const T* in, const T* weight, const T* bias, std::int64_t N,
                     std::int64_t IC, std::int64_t OC, cudaStream_t stream) {
  constexpr const char* kWhere = "Matmul::forward";
  check_sizes(kWhere, N, IC, OC);
  if (N == 0 || OC == 0) return;
  require(out, kWhere, "out");
  if (IC > 0) {
    require(in, kWhere, "in");
    require(weight, kWhere, "weight");
  }
  if (pre_gelu == out) throw InvalidArgument("Matmul::forward: pre_gelu and out are the same buffer");
  MatmulState& state = state_of(this, kWhere);

  // NOTE: GELU is not fused. cuBLASLt documents its GELU epilogue only as "GELU" (neither the
  // formula nor how tanh is evaluated), and its aux output needs a leading dimension divisible by 8,
  // which OC need not be; our kernel matches the CPU engine's GELU and gelu_backward's input.
  T* product = pre_gelu != nullptr ? pre_gelu : out;
  if (IC == 0) {
    launch_bias_fill(product, bias, N, OC, stream);
  } else {
    Gemm g{"forward", data_type<T>(), data_type<T>(), compute_type<T>(allow_tf32_), CUBLAS_OP_T, CUBLAS_OP_N,
           OC, N, IC, weight, IC, in, IC, product, OC, 0.0f, CUBLASLT_EPILOGUE_DEFAULT, nullptr};
    bool done = false;
    if (bias != nullptr && alignment_of(bias) >= kBiasEpilogueAlignment) {
      g.epilogue = CUBLASLT_EPILOGUE_BIAS;
      g.bias = bias;
      done = run_gemm(state, handle_, workspace_, workspace_bytes_, g, stream);
    }
    if (!done) {
      if (bias != nullptr) {
        launch_bias_fill(product, bias, N, OC, stream);
        g.beta = 1.0f;
      }
      g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
      g.bias = nullptr;
      if (!run_gemm(state, handle_, workspace_, workspace_bytes_, g, stream)) throw_no_algorithm(kWhere, g);
    }
  }
  if (pre_gelu != nullptr) launch_gelu(out, pre_gelu, N * OC, stream);
}

template <class T>
void Matmul::backward(T* din, float* dweight, float* dbias, const T* dout, const T* in, const T* weight,
                      std::int64_t N, std::int64_t IC, std::int64_t OC, void* scratch, cudaStream_t stream) {
  constexpr const char* kWhere = "Matmul::backward";
  check_sizes(kWhere, N, IC, OC);
  if (N == 0) return;
  if (OC == 0) {  // din = dout * weight is a sum over nothing
    if (din != nullptr && IC > 0) {
      state_of(this, kWhere);
      NIBBLE_CUDA_CHECK(cudaMemsetAsync(din, 0, static_cast<std::size_t>(N * IC) * sizeof(T), stream));
    }
    return;
  }
  require(dout, kWhere, "dout");
  if (IC > 0) {
    require(in, kWhere, "in");
    require(dweight, kWhere, "dweight");
    if (din != nullptr) require(weight, kWhere, "weight");
  }
  if (dbias != nullptr && backward_scratch_bytes(N, OC) > 0) {
    require(scratch, kWhere, "scratch (backward_scratch_bytes(N, OC) > 0)");
    if (alignment_of(scratch) < alignof(float)) throw InvalidArgument("Matmul::backward: scratch is not 4-byte aligned");
  }
  MatmulState& state = state_of(this, kWhere);

  if (dbias != nullptr) launch_bias_grad(dbias, dout, N, OC, static_cast<float*>(scratch), stream);
  if (IC == 0) return;
  const cublasComputeType_t compute = compute_type<T>(allow_tf32_);
  if (din != nullptr) {
    const Gemm g{"input gradient", data_type<T>(), data_type<T>(), compute, CUBLAS_OP_N, CUBLAS_OP_N,
                 IC, N, OC, weight, IC, dout, OC, din, IC, 0.0f, CUBLASLT_EPILOGUE_DEFAULT, nullptr};
    if (!run_gemm(state, handle_, workspace_, workspace_bytes_, g, stream)) throw_no_algorithm(kWhere, g);
  }
  // fp32 accumulation into dweight: bf16 A and B with a float C and D is one of cuBLASLt's
  // supported combinations (compute 32F, scale 32F).
  const Gemm g{"weight gradient", data_type<T>(), CUDA_R_32F, compute, CUBLAS_OP_N, CUBLAS_OP_T,
               IC, OC, N, in, IC, dout, OC, dweight, IC, 1.0f, CUBLASLT_EPILOGUE_DEFAULT, nullptr};
  if (!run_gemm(state, handle_, workspace_, workspace_bytes_, g, stream)) throw_no_algorithm(kWhere, g);
}

#define NIBBLE_MATMUL_INSTANTIATE(T)                                                                             \
  template void Matmul::forward<T>(T*, T*, const T*, const T*, const T*, std::int64_t, std::int64_t, std::int64_t, \
                                   cudaStream_t);                                                                \
  template void Matmul::backward<T>(T*, float*, float*, const T*, const T*, const T*, std::int64_t, std::int64_t, \
                                    std::int64_t, void*, cudaStream_t);
NIBBLE_MATMUL_INSTANTIATE(float)
NIBBLE_MATMUL_INSTANTIATE(bf16)
#undef NIBBLE_MATMUL_INSTANTIATE

}  // namespace nibble::model::cuda
