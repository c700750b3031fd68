// The CUDA kernels around the update pass: the gradient norm and the step's begin (skip decision,
// counters, clip coefficient, per-tensor constants, all on the device so that a captured step
// replays with new scalars), AdamP's cosine test and projection, Adafactor's factored second
// moment and update RMS, rank-1 scale bookkeeping and master-weight set-up. Every sum is taken in
// a fixed order (per-thread strides, then a fixed tree), so repeated runs give identical results.
#include <math_constants.h>

#include <algorithm>
#include <cfloat>

#include "optim/cuda/common.cuh"

namespace nibble::cuda {
namespace {

constexpr int kReduceThreads = 256;
constexpr int kBeginThreads = 1024;

__device__ __forceinline__ double block_max(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] = fmax(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  const double m = shared[0];
  __syncthreads();
  return m;
}

__global__ void set_scalars_kernel(DScalars* scalars, float grad_scale, float lr_scale, int found_inf) {
  scalars->grad_scale = grad_scale;
  scalars->lr_scale = lr_scale;
  scalars->found_inf = found_inf;
}

// Sum of squared gradients per chunk, in double.
__global__ void __launch_bounds__(kReduceThreads) norm_partials_kernel(Tables tb) {
  __shared__ double red[kReduceThreads];
  const DChunk ch = tb.chunks[blockIdx.x];
  const DTensor& t = tb.tensors[ch.tensor];
  double acc = 0.0;
  if (t.grad != nullptr)
    for (std::int64_t e = ch.begin + threadIdx.x; e < ch.end; e += kReduceThreads) {
      const double x = static_cast<double>(load_grad(t, e));
      acc += x * x;
    }
  const double sum = block_sum<kReduceThreads>(acc, red);
  if (threadIdx.x == 0) tb.partials[blockIdx.x] = sum;
}

// The chunk partials summed in begin_step_kernel's order (per-thread strides, then the block's
// tree), those of tensors whose `counted` flag is 0 left out (null: all counted).
__device__ __forceinline__ double partials_total(const Tables& tb, const std::uint8_t* counted, double* red) {
  double total = 0.0;
  for (long long c = threadIdx.x; c < tb.chunk_count; c += kBeginThreads)
    if (counted == nullptr || counted[tb.chunks[c].tensor] != 0) total += tb.partials[c];
  return block_sum<kBeginThreads>(total, red);
}

// One block: the counted gradients' square sum into *out (sharded training sums it over ranks).
__global__ void __launch_bounds__(kBeginThreads) square_sum_kernel(Tables tb, const std::uint8_t* counted, double* out) {
  __shared__ double red[kBeginThreads];
  const double total = partials_total(tb, counted, red);
  if (threadIdx.x == 0) *out = total;
}

// One block: the global norm, the skip decision, the counters and every tensor's constants. With
// `external_total` the norm is that square sum (read now, on the device) instead of the partials.
__global__ void __launch_bounds__(kBeginThreads) begin_step_kernel(Tables tb, StepConfig cfg, int norm_computed,
                                                                   const double* external_total) {
  __shared__ double red[kBeginThreads];
  DScalars& sc = *tb.scalars;
  // As the CPU step: a found inf skips the step without a norm (NaN in the result). The flag is one
  // device word, so every thread takes the same branch around partials_total's barriers.
  const bool found_inf = sc.found_inf != 0;
  const bool computed = norm_computed != 0 && !found_inf;
  double total = 0.0;
  if (computed) total = external_total != nullptr ? *external_total : partials_total(tb, nullptr, red);
  const math::StepDecision decision = math::decide_step(found_inf, computed, total, sc.grad_scale, cfg.max_grad_norm);
  const bool skip = decision.skip;
  const double norm = decision.grad_norm;
  const float grad_mul = decision.grad_mul;
  const float lr_scale = sc.lr_scale;
  __syncthreads();
  if (threadIdx.x == 0) {
    sc.skip = skip ? 1 : 0;
    sc.grad_norm = norm;
    sc.grad_mul = grad_mul;
    if (skip) ++sc.skipped;
    else ++sc.steps;
  }
  if (skip) return;
  for (int i = threadIdx.x; i < tb.tensor_count; i += kBeginThreads) {
    const DTensor& t = tb.tensors[i];
    if (t.grad == nullptr) continue;
    const long long step = ++tb.tensor_steps[i];
    math::fill_step_constants(tb.constants[i], cfg.algorithm, cfg.hyper, t.lr, t.weight_decay, step, grad_mul, lr_scale,
                              cfg.seed, tb.tensor_running + 2 * i);
  }
}

// ---------------------------------------------------------------------------------------------
// AdamP.

// Per segment of a row of the channel view: sums of g * p, g^2 and p^2.
__global__ void __launch_bounds__(kReduceThreads) adamp_row_sums_kernel(Tables tb) {
  __shared__ double red[kReduceThreads];
  const SegmentWork work = segment_work(tb);
  if (work.t == nullptr) return;
  const DChunk seg = work.seg;
  const DTensor& t = *work.t;
  double gp = 0.0, gg = 0.0, pp = 0.0;
  for (std::int64_t e = seg.begin + threadIdx.x; e < seg.end; e += kReduceThreads) {
    const double g = load_grad(t, e), p = load_param(t, e);
    gp += g * p;
    gg += g * g;
    pp += p * p;
  }
  gp = block_sum<kReduceThreads>(gp, red);
  gg = block_sum<kReduceThreads>(gg, red);
  pp = block_sum<kReduceThreads>(pp, red);
  if (threadIdx.x == 0) {
    tb.segment_sums[3 * blockIdx.x] = gp;
    tb.segment_sums[3 * blockIdx.x + 1] = gg;
    tb.segment_sums[3 * blockIdx.x + 2] = pp;
  }
}

__device__ __forceinline__ double row_total(const Tables& tb, const DTensor& t, std::int64_t row, int which) {
  double s = 0.0;
  const std::int64_t first = t.seg0 + row * t.segs_per_row;
  for (std::int64_t k = 0; k < t.segs_per_row; ++k) s += tb.segment_sums[3 * (first + k) + which];
  return s;
}

// One block per tensor: the cosine tests that pick the projection (channel view, whole tensor or
// none), then 1 / (||p|| + eps) per view row.
__global__ void __launch_bounds__(kReduceThreads) adamp_decide_kernel(Tables tb, StepConfig cfg) {
  __shared__ double red[kReduceThreads];
  if (tb.scalars->skip) return;
  const DTensor& t = tb.tensors[blockIdx.x];
  if (t.grad == nullptr || t.view_rows == 0) return;
  const std::int64_t rows = t.view_rows, len = t.numel / rows;
  const double eps = cfg.hyper.eps;
  const math::AdamPScratch at{rows};
  double* gp = t.scratch + at.gp();
  double* gg = t.scratch + at.gg();
  double* pp = t.scratch + at.pp();
  double max_cos = 0.0, sgp = 0.0, sgg = 0.0, spp = 0.0;
  for (std::int64_t r = threadIdx.x; r < rows; r += kReduceThreads) {
    gp[r] = row_total(tb, t, r, 0);
    gg[r] = row_total(tb, t, r, 1);
    pp[r] = row_total(tb, t, r, 2);
    max_cos = fmax(max_cos, fabs(gp[r]) / fmax(sqrt(gg[r]) * sqrt(pp[r]), eps));
    sgp += gp[r];
    sgg += gg[r];
    spp += pp[r];
  }
  max_cos = block_max(max_cos, red);
  sgp = block_sum<kReduceThreads>(sgp, red);
  sgg = block_sum<kReduceThreads>(sgg, red);
  spp = block_sum<kReduceThreads>(spp, red);
  const double layer_cos = fabs(sgp) / fmax(sqrt(sgg) * sqrt(spp), eps);
  int view = 0;
  if (max_cos < cfg.hyper.delta / sqrt(static_cast<double>(len))) view = 1;
  else if (layer_cos < cfg.hyper.delta / sqrt(static_cast<double>(t.numel))) view = 2;
  math::StepConstants& k = tb.constants[blockIdx.x];
  if (threadIdx.x == 0) {
    k.adamp_view = view;
    if (view != 0) k.adamp_decay = 1.0f - k.lr * t.weight_decay * cfg.hyper.wd_ratio;
  }
  if (view == 1) {
    for (std::int64_t r = threadIdx.x; r < rows; r += kReduceThreads) gg[r] = 1.0 / (sqrt(pp[r]) + eps);
  } else if (view == 2 && threadIdx.x == 0) {
    gg[0] = 1.0 / (sqrt(spp) + eps);
  }
}

// The dot products of the projection per view row, from the dot kernel's per-segment sums.
__global__ void __launch_bounds__(kReduceThreads) adamp_dot_finalize_kernel(Tables tb) {
  __shared__ double red[kReduceThreads];
  if (tb.scalars->skip) return;
  const DTensor& t = tb.tensors[blockIdx.x];
  const int view = tb.constants[blockIdx.x].adamp_view;
  if (t.grad == nullptr || t.view_rows == 0 || view == 0) return;
  double* dot = t.scratch + math::AdamPScratch{t.view_rows}.dot();
  if (view == 1) {
    for (std::int64_t r = threadIdx.x; r < t.view_rows; r += kReduceThreads) dot[r] = row_total(tb, t, r, 0);
    return;
  }
  double total = 0.0;
  for (std::int64_t r = threadIdx.x; r < t.view_rows; r += kReduceThreads) total += row_total(tb, t, r, 0);
  total = block_sum<kReduceThreads>(total, red);
  if (threadIdx.x == 0) dot[0] = total;
}

// ---------------------------------------------------------------------------------------------
// Adafactor. Scratch of a factored tensor as on the CPU (math::AdafactorScratch), then sum_pp and
// sum_uu; an unfactored tensor keeps only the two sums.

__device__ __forceinline__ double* adafactor_totals(const DTensor& t) {
  if (!t.factored) return t.scratch;
  return t.scratch + math::AdafactorScratch{t.rows, t.cols, t.rows / t.batch_rows}.totals();
}

// Per row segment: sum of g^2 + eps1 (factored tensors) and of p^2.
__global__ void __launch_bounds__(kReduceThreads) adafactor_row_sums_kernel(Tables tb) {
  __shared__ double red[kReduceThreads];
  const SegmentWork work = segment_work(tb);
  if (work.t == nullptr) return;
  const DChunk seg = work.seg;
  const DTensor& t = *work.t;
  const math::AdafactorStep k = work.k->adafactor;
  double sq = 0.0, pp = 0.0;
  for (std::int64_t e = seg.begin + threadIdx.x; e < seg.end; e += kReduceThreads) {
    if (t.factored) sq += math::adafactor_square(load_grad(t, e), k);
    const double p = load_param(t, e);
    pp += p * p;
  }
  sq = block_sum<kReduceThreads>(sq, red);
  pp = block_sum<kReduceThreads>(pp, red);
  if (threadIdx.x == 0) {
    tb.segment_sums[3 * blockIdx.x] = sq;
    tb.segment_sums[3 * blockIdx.x + 1] = pp;
  }
}

// Per item (a block of rows of one batch, 256 columns): column sums of g^2 + eps1, rows in order.
__global__ void __launch_bounds__(kReduceThreads) adafactor_col_sums_kernel(Tables tb) {
  if (tb.scalars->skip) return;
  const DColItem item = tb.col_items[blockIdx.x];
  const DTensor& t = tb.tensors[item.tensor];
  if (t.grad == nullptr) return;
  const std::int64_t c = item.col_begin + threadIdx.x;
  if (c >= t.cols) return;
  const math::AdafactorStep k = tb.constants[item.tensor].adafactor;
  double acc = 0.0;
  for (std::int64_t r = item.row_begin; r < item.row_end; ++r) acc += math::adafactor_square(load_grad(t, r * t.cols + c), k);
  tb.col_partials[t.colpart0 + static_cast<std::int64_t>(item.row_block) * t.cols + c] = acc;
}

// One block per tensor: the EMAs of row and column means, the row and column factors, and the
// sum of p^2.
__global__ void __launch_bounds__(kReduceThreads) adafactor_finalize_kernel(Tables tb) {
  __shared__ double red[kReduceThreads];
  if (tb.scalars->skip) return;
  const DTensor& t = tb.tensors[blockIdx.x];
  if (t.grad == nullptr || t.numel == 0) return;
  const math::AdafactorStep k = tb.constants[blockIdx.x].adafactor;
  double* totals = adafactor_totals(t);
  double pp = 0.0;
  if (!t.factored) {
    for (std::int64_t s = threadIdx.x; s < t.segs_per_row; s += kReduceThreads) pp += tb.segment_sums[3 * (t.seg0 + s) + 1];
    pp = block_sum<kReduceThreads>(pp, red);
    if (threadIdx.x == 0) totals[0] = pp;
    return;
  }
  const std::int64_t rows = t.rows, cols = t.cols, batches = rows / t.batch_rows;
  const math::AdafactorScratch at{rows, cols, batches};
  double* row_sum = t.scratch + at.row_sum();
  double* col_sum = t.scratch + at.col_sum();
  double* r_factor = t.scratch + at.r_factor();
  double* c_factor = t.scratch + at.c_factor();
  for (std::int64_t r = threadIdx.x; r < rows; r += kReduceThreads) {
    row_sum[r] = row_total(tb, t, r, 0);
    pp += row_total(tb, t, r, 1);
    t.af_row[r] = k.beta2t * t.af_row[r] + k.one_minus_beta2t * static_cast<float>(row_sum[r] / static_cast<double>(cols));
  }
  const std::int64_t blocks_per_batch = t.col_row_blocks;
  for (std::int64_t bc = threadIdx.x; bc < batches * cols; bc += kReduceThreads) {
    const std::int64_t b = bc / cols, c = bc % cols;
    double s = 0.0;
    for (std::int64_t rb = 0; rb < blocks_per_batch; ++rb)
      s += tb.col_partials[t.colpart0 + (b * blocks_per_batch + rb) * cols + c];
    col_sum[bc] = s;
    t.af_col[bc] = k.beta2t * t.af_col[bc] + k.one_minus_beta2t * static_cast<float>(s / static_cast<double>(t.batch_rows));
    c_factor[bc] = 1.0f / sqrtf(t.af_col[bc]);
  }
  pp = block_sum<kReduceThreads>(pp, red);  // also orders the af_row writes before the reads below
  for (std::int64_t b = 0; b < batches; ++b) {
    double mean = 0.0;
    for (std::int64_t r = b * t.batch_rows + threadIdx.x; r < (b + 1) * t.batch_rows; r += kReduceThreads) mean += t.af_row[r];
    mean = block_sum<kReduceThreads>(mean, red);
    const float row_mean = static_cast<float>(mean / static_cast<double>(t.batch_rows));
    for (std::int64_t r = b * t.batch_rows + threadIdx.x; r < (b + 1) * t.batch_rows; r += kReduceThreads)
      r_factor[r] = 1.0f / sqrtf(t.af_row[r] / row_mean);
  }
  if (threadIdx.x == 0) totals[0] = pp;
}

// One block per tensor: the update RMS and the tensor's step scale.
__global__ void __launch_bounds__(kReduceThreads) adafactor_scale_kernel(Tables tb, StepConfig cfg) {
  __shared__ double red[kReduceThreads];
  if (tb.scalars->skip) return;
  const DTensor& t = tb.tensors[blockIdx.x];
  if (t.grad == nullptr || t.numel == 0) return;
  const std::int64_t segs = t.factored ? t.rows * t.segs_per_row : t.segs_per_row;
  double uu = 0.0;
  for (std::int64_t s = threadIdx.x; s < segs; s += kReduceThreads) uu += tb.segment_sums[3 * (t.seg0 + s) + 2];
  uu = block_sum<kReduceThreads>(uu, red);
  if (threadIdx.x != 0) return;
  double* totals = adafactor_totals(t);
  totals[1] = uu;
  math::StepConstants& k = tb.constants[blockIdx.x];
  k.adafactor.scale = math::adafactor_scale(cfg.hyper, t.lr, tb.scalars->lr_scale, tb.tensor_steps[blockIdx.x], totals[0],
                                            uu, static_cast<double>(t.numel), k.adafactor.decay, t.weight_decay);
}

// ---------------------------------------------------------------------------------------------
// Rank-1 scales and master weights.

__global__ void rank1_reset_kernel(Tables tb, const int2* slots) {
  if (tb.scalars->skip) return;
  const int2 entry = slots[blockIdx.x];
  const DTensor& t = tb.tensors[entry.x];
  if (t.grad == nullptr) return;
  const DSlot& s = t.slots[entry.y];
  for (std::int64_t r = threadIdx.x; r < t.rows; r += blockDim.x) s.next_row_max[r] = 0.0f;
  for (std::int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) s.next_col_max[c] = 0.0f;
}

__global__ void rank1_commit_kernel(Tables tb, const int2* slots) {
  if (tb.scalars->skip) return;
  const int2 entry = slots[blockIdx.x];
  const DTensor& t = tb.tensors[entry.x];
  if (t.grad == nullptr) return;
  const DSlot& s = t.slots[entry.y];
  for (std::int64_t r = threadIdx.x; r < t.rows; r += blockDim.x) s.row_max[r] = s.next_row_max[r];
  for (std::int64_t c = threadIdx.x; c < t.cols; c += blockDim.x) s.col_max[c] = s.next_col_max[c];
}

__global__ void master_init_kernel(Tables tb) {
  const DChunk ch = tb.chunks[blockIdx.x];
  const DTensor& t = tb.tensors[ch.tensor];
  if (t.master == nullptr) return;
  for (std::int64_t e = ch.begin + threadIdx.x; e < ch.end; e += blockDim.x)
    t.master[e] = to_float(static_cast<const std::uint16_t*>(t.param)[e], t.param_type);
}

unsigned grid(long long count) { return static_cast<unsigned>(count); }

}  // namespace

void launch_set_scalars(const Tables& tb, float grad_scale, float lr_scale, int found_inf, cudaStream_t stream) {
  set_scalars_kernel<<<1, 1, 0, stream>>>(tb.scalars, grad_scale, lr_scale, found_inf);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_begin_step(const Tables& tb, const StepConfig& config, bool norm, const double* external_total,
                       cudaStream_t stream) {
  if (external_total != nullptr) {
    begin_step_kernel<<<1, kBeginThreads, 0, stream>>>(tb, config, 1, external_total);
  } else {
    if (norm && tb.chunk_count > 0) norm_partials_kernel<<<grid(tb.chunk_count), kReduceThreads, 0, stream>>>(tb);
    begin_step_kernel<<<1, kBeginThreads, 0, stream>>>(tb, config, norm ? 1 : 0, nullptr);
  }
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_grad_square_sum(const Tables& tb, const std::uint8_t* counted, double* out, cudaStream_t stream) {
  if (tb.chunk_count > 0) norm_partials_kernel<<<grid(tb.chunk_count), kReduceThreads, 0, stream>>>(tb);
  square_sum_kernel<<<1, kBeginThreads, 0, stream>>>(tb, counted, out);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_adamp_prepare(const Tables& tb, const StepConfig& config, cudaStream_t stream) {
  if (tb.segment_count == 0) return;
  adamp_row_sums_kernel<<<grid(tb.segment_count), kReduceThreads, 0, stream>>>(tb);
  adamp_decide_kernel<<<grid(tb.tensor_count), kReduceThreads, 0, stream>>>(tb, config);
  launch_adamp_dot(tb, stream);
  adamp_dot_finalize_kernel<<<grid(tb.tensor_count), kReduceThreads, 0, stream>>>(tb);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_adafactor_prepare(const Tables& tb, const StepConfig& config, cudaStream_t stream) {
  if (tb.segment_count == 0) return;
  adafactor_row_sums_kernel<<<grid(tb.segment_count), kReduceThreads, 0, stream>>>(tb);
  if (tb.col_item_count > 0) adafactor_col_sums_kernel<<<grid(tb.col_item_count), kReduceThreads, 0, stream>>>(tb);
  adafactor_finalize_kernel<<<grid(tb.tensor_count), kReduceThreads, 0, stream>>>(tb);
  launch_adafactor_uu(tb, config, stream);
  adafactor_scale_kernel<<<grid(tb.tensor_count), kReduceThreads, 0, stream>>>(tb, config);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_rank1_reset(const Tables& tb, const int2* slots, int count, cudaStream_t stream) {
  if (count == 0) return;
  rank1_reset_kernel<<<grid(count), kReduceThreads, 0, stream>>>(tb, slots);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_rank1_commit(const Tables& tb, const int2* slots, int count, cudaStream_t stream) {
  if (count == 0) return;
  rank1_commit_kernel<<<grid(count), kReduceThreads, 0, stream>>>(tb, slots);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

// Muon: the squared Frobenius norm of each matrix's update in double, in batch.norm_blocks fixed
// segments per matrix (blockIdx.y the matrix, blockIdx.x the segment), each summed by one block
// into its partial; the load kernels add a matrix's partials in segment order. Fixed segments and a
// fixed tree, so the norm does not depend on the launch.
__global__ void __launch_bounds__(kReduceThreads) muon_norm_kernel(Tables tb, NsBatch batch) {
  __shared__ double red[kReduceThreads];
  if (tb.scalars->skip) return;
  const DTensor& t = tb.tensors[batch.tensors[blockIdx.y]];
  if (t.grad == nullptr) return;
  const std::int64_t per = (t.numel + batch.norm_blocks - 1) / batch.norm_blocks;
  const std::int64_t begin = static_cast<std::int64_t>(blockIdx.x) * per;
  const std::int64_t end = begin + per < t.numel ? begin + per : t.numel;
  double acc = 0.0;
  for (std::int64_t e = begin + threadIdx.x; e < end; e += kReduceThreads) {
    const double u = t.muon_update[e];
    acc += u * u;
  }
  const double sum = block_sum<kReduceThreads>(acc, red);
  if (threadIdx.x == 0) batch.partials[static_cast<std::int64_t>(blockIdx.y) * batch.norm_blocks + blockIdx.x] = sum;
}

// max(norm, eps) of matrix j from its partials (in segment order), as a float; every thread of the
// block gets it.
__device__ __forceinline__ float muon_norm_of(const NsBatch& batch, int j, float eps, float* shared) {
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    double sum = 0.0;
    for (int b = 0; b < batch.norm_blocks; ++b) sum += batch.partials[static_cast<std::int64_t>(j) * batch.norm_blocks + b];
    const double norm = sqrt(sum);
    if (blockIdx.x == 0) batch.norms[j] = norm;
    *shared = fmaxf(static_cast<float>(norm), eps);
  }
  __syncthreads();
  return *shared;
}

// X of every matrix of a batch that is wide (or square): X is the update itself (s = rows,
// l = cols, the same layout) divided by max(norm, eps), rounded to bf16. blockIdx.y: the matrix.
__global__ void __launch_bounds__(kReduceThreads) muon_load_kernel(Tables tb, NsBatch batch, float eps) {
  __shared__ float norm_shared;
  if (tb.scalars->skip) return;
  const int j = blockIdx.y;
  const DTensor& t = tb.tensors[batch.tensors[j]];
  if (t.grad == nullptr) return;
  const float norm = muon_norm_of(batch, j, eps, &norm_shared);
  __nv_bfloat16* x = batch.x + static_cast<std::int64_t>(j) * batch.s * batch.l;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; e < t.numel;
       e += static_cast<std::int64_t>(gridDim.x) * kReduceThreads)
    x[e] = __float2bfloat16_rn(t.muon_update[e] / norm);
}

// The same for a tall batch (rows > cols): X (s = cols, l = rows) is the update transposed. Each
// block moves one 32 x 32 tile through shared memory, so that both the update's rows and X's rows
// are read and written along their length (a warp reading the update down a column touched 32
// rows per load). blockIdx.x: the tile, blockIdx.y: the matrix; 32 x 8 threads.
__global__ void __launch_bounds__(kTileSide * kTileRows) muon_load_tall_kernel(Tables tb, NsBatch batch, float eps) {
  __shared__ float tile[kTileSide][kTileSide + 1];  // +1: the column reads fall in distinct banks
  __shared__ float norm_shared;
  if (tb.scalars->skip) return;
  const int j = blockIdx.y;
  const DTensor& t = tb.tensors[batch.tensors[j]];
  if (t.grad == nullptr) return;
  const float norm = muon_norm_of(batch, j, eps, &norm_shared);
  const std::int64_t rows = batch.rows, cols = batch.cols;  // the update's; X is cols x rows
  const std::int64_t col_tiles = (cols + kTileSide - 1) / kTileSide;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) / col_tiles * kTileSide;
  const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.x) % col_tiles * kTileSide;
  for (int k = threadIdx.y; k < kTileSide; k += kTileRows) {
    const std::int64_t r = row0 + k, c = col0 + threadIdx.x;
    if (r < rows && c < cols) tile[k][threadIdx.x] = t.muon_update[r * cols + c];
  }
  __syncthreads();
  __nv_bfloat16* x = batch.x + static_cast<std::int64_t>(j) * batch.s * batch.l;
  for (int k = threadIdx.y; k < kTileSide; k += kTileRows) {
    const std::int64_t xr = col0 + k, xc = row0 + threadIdx.x;  // X's row is the update's column
    if (xr < cols && xc < rows) x[xr * rows + xc] = __float2bfloat16_rn(tile[threadIdx.x][k] / norm);
  }
}

void launch_muon_load(const Tables& tb, const NsBatch& batch, float eps, cudaStream_t stream) {
  if (batch.count == 0) return;
  const auto count = static_cast<unsigned>(batch.count);
  muon_norm_kernel<<<dim3(static_cast<unsigned>(batch.norm_blocks), count), kReduceThreads, 0, stream>>>(tb, batch);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
  const std::int64_t numel = batch.rows * batch.cols;
  if (batch.tall) {
    const std::int64_t tiles = ((batch.rows + kTileSide - 1) / kTileSide) * ((batch.cols + kTileSide - 1) / kTileSide);
    muon_load_tall_kernel<<<dim3(static_cast<unsigned>(tiles), count), dim3(kTileSide, kTileRows), 0, stream>>>(
        tb, batch, eps);
  } else {
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((numel + kReduceThreads - 1) / kReduceThreads, 1024));
    muon_load_kernel<<<dim3(blocks, count), kReduceThreads, 0, stream>>>(tb, batch, eps);
  }
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

void launch_master_init(const Tables& tb, cudaStream_t stream) {
  if (tb.chunk_count == 0) return;
  master_init_kernel<<<grid(tb.chunk_count), kReduceThreads, 0, stream>>>(tb);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace nibble::cuda
