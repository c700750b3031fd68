// CPU driver of every optimizer: one OpenMP parallel region walks the chunk table of all tensors;
// each block of state is dequantized into registers-sized local arrays, updated by the rule in
// src/math/rules.hpp and quantized back. Reductions are summed per chunk or per row in a fixed
// order, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include <fmt/format.h>

#include "math/bf16.hpp"
#include "math/codebook.hpp"
#include "math/rules.hpp"
#include "math/scratch_layout.hpp"
#include "nibble/error.hpp"
#include "optim/cpu/codec_simd.hpp"
#include "optim/cpu/newton_schulz.hpp"
#include "optim/impl.hpp"
#include "optim/state_layout.hpp"

namespace nibble::cpu {
namespace {

using math::Codebook;

// NOTE: long double-precision sums use kSumLanes independent accumulators (AVX2 registers), so
// the adds pipeline instead of waiting on each other; their order is fixed, so sums do not depend
// on the thread count.
constexpr int kSumLanes = 16;
constexpr int kColumnTile = 32;
double sum_lanes(const double (&a)[kSumLanes]) {
  double s = 0.0;
  for (double x : a) s += x;
  return s;
}

std::uint8_t nibble_at(const std::uint8_t* codes, std::int64_t e) {
  return static_cast<std::uint8_t>((codes[e >> 1] >> ((e & 1) * 4)) & 0xfu);
}

float rank1_scale(const float* row_max, const float* col_max, std::int64_t e, std::int64_t cols) {
  return math::min_f(row_max[e / cols], col_max[e % cols]);
}

// The block's state as floats: the fp32 state itself when `in_place`, else decoded into `local`.
float* load_block(const TensorState& t, const Slot& s, std::int64_t begin, std::int64_t n,
                  float* __restrict local, bool in_place) {
  switch (s.storage) {
    case math::StateStorage::kF32:
      if (in_place) return s.f32 + begin;
      std::memcpy(local, s.f32 + begin, static_cast<std::size_t>(n) * sizeof(float));
      return local;
    case math::StateStorage::kBf16: {
      decode_bf16(s.bf16 + begin, local, n);
      return local;
    }
    case math::StateStorage::kCodes8: {
      const Codebook& cb = codebook(s.codebook);
      decode8_block(cb, s.codes + begin, s.absmax[begin / t.block], local, n);
      return local;
    }
    case math::StateStorage::kCodes4: {
      const Codebook& cb = codebook(s.codebook);
      if (s.rank1) {
        for (std::int64_t i = 0; i < n; ++i) {
          const std::int64_t e = begin + i;
          local[i] = cb.values[nibble_at(s.codes, e)] * rank1_scale(s.row_max, s.col_max, e, t.cols);
        }
        return local;
      }
      decode4_block(cb, s.codes + begin / 2, s.absmax[begin / t.block], local, n);
      return local;
    }
  }
  return local;
}

void store_block(const TensorState& t, const Slot& s, std::int64_t begin, std::int64_t n,
                 const float* __restrict x, std::uint64_t seed, int slot_index,
                 bool stochastic) {
  switch (s.storage) {
    case math::StateStorage::kF32:
      if (x != s.f32 + begin) std::memcpy(s.f32 + begin, x, static_cast<std::size_t>(n) * sizeof(float));
      return;
    case math::StateStorage::kBf16: {
      std::uint16_t* __restrict h = s.bf16 + begin;
      if (stochastic) {
        const std::uint64_t base = static_cast<std::uint64_t>(t.offset + begin) * kMaxSlots + slot_index;
        for (std::int64_t i = 0; i < n; ++i)
          h[i] = math::bf16_round_stochastic(x[i], math::hash_u32(seed, base + i * kMaxSlots));
      } else {
        encode_bf16(x, h, n);
      }
      return;
    }
    case math::StateStorage::kCodes8: {
      const Codebook& cb = codebook(s.codebook);
      const float absmax = block_absmax(x, n);
      const float inv = math::block_inverse(absmax);
      s.absmax[begin / t.block] = absmax;
      // A positive inv bounds every x * inv by 1 plus rounding (absmax is then finite and normal:
      // block_absmax is NaN or inf when an element is).
      encode8_block(cb, x, inv, s.codes + begin, n, inv > 0.0f);
      return;
    }
    case math::StateStorage::kCodes4: {
      const Codebook& cb = codebook(s.codebook);
      std::uint8_t* __restrict c = s.codes + begin / 2;
      if (s.rank1) {
        for (std::int64_t i = 0; i < n; i += 2) {
          std::uint8_t pair = 0;
          for (std::int64_t k = 0; k < 2 && i + k < n; ++k) {
            const std::int64_t e = begin + i + k;
            const float scale = rank1_scale(s.next_row_max, s.next_col_max, e, t.cols);
            const float y = scale > 0.0f ? x[i + k] / scale : 0.0f;
            pair = static_cast<std::uint8_t>(pair | (math::codebook_encode(cb, y) << (4 * k)));
          }
          c[i / 2] = pair;
        }
        return;
      }
      const float absmax = block_absmax(x, n);
      const float inv = math::block_inverse(absmax);
      s.absmax[begin / t.block] = absmax;
      encode4_block(cb, x, inv, c, n);
      return;
    }
  }
}

struct BlockScratch {
  alignas(64) float state[kMaxSlots][kMaxBlock];
  alignas(64) float param[kMaxBlock];
};

// Walks the blocks of t that overlap [lo, hi), several at a time: `body(begin, n, p, g, s)` sees a
// span of whole blocks, kSpanElements or one block if larger. p and g point at the tensor's arrays
// (p at a private copy when !commit), s[k] at the span's state as floats; a slot below
// `read_slots` that t does not keep holds zeros. Each block is still decoded and encoded on its own
// (a quantized block has its own absmax). Spans of 1024 keep the scratch of three slots, p and g in
// L1 and pay the body's call and loop set-up once per 4 blocks of 256: AdamW fp32 10% faster in
// cache; spans of 4096 spilled to L2 and made 8-bit state 7% slower. With commit, updated state is
// written back for slots in `store_mask`.
constexpr std::int64_t kSpanElements = 1024;

template <class Body>
void for_blocks(const Optimizer::Impl& impl, TensorState& t, std::int64_t lo, std::int64_t hi,
                bool commit, unsigned store_mask, BlockScratch& scratch, Body&& body, int read_slots = kMaxSlots) {
  const StepConstants& k = impl.constants[&t - impl.tensors.data()];
  const bool stochastic = impl.options.stochastic_rounding;
  const std::int64_t block = t.block;
  const std::int64_t span = std::max<std::int64_t>(block, kSpanElements / block * block);
  const std::int64_t end = std::min(t.numel, (hi + block - 1) / block * block);
  for (std::int64_t b = (lo / block) * block; b < end; b += span) {
    const std::int64_t n = std::min(span, end - b);
    float* s[kMaxSlots];
    for (int j = 0; j < kMaxSlots; ++j) {
      s[j] = scratch.state[j];
      if (j < t.slot_count) {
        const Slot& slot = t.slots[j];
        if (commit && slot.storage == math::StateStorage::kF32) {
          s[j] = slot.f32 + b;  // fp32 state is stepped in place
        } else if (slot.storage == math::StateStorage::kCodes8) {
          decode8_blocks(codebook(slot.codebook), slot.codes + b, slot.absmax + b / block, block, scratch.state[j], n);
        } else if (slot.storage == math::StateStorage::kCodes4 && !slot.rank1) {
          decode4_blocks(codebook(slot.codebook), slot.codes + b / 2, slot.absmax + b / block, block, scratch.state[j], n);
        } else {
          for (std::int64_t o = 0; o < n; o += block)
            load_block(t, slot, b + o, std::min(block, n - o), scratch.state[j] + o, false);
        }
      } else if (j < read_slots) {
        // A rule may read a slot its algorithm does not keep (SGD without momentum reads its
        // buffer times 0): zeros, not whatever the scratch held, which could be inf or NaN. Slots
        // the rule never reads are left as they are (AdamW's AMSGrad maximum: a fill per block
        // cost 8% of its in-cache step).
        std::fill_n(scratch.state[j], n, 0.0f);
      }
    }
    float* p = static_cast<float*>(t.param.data) + b;
    if (!commit) {
      std::memcpy(scratch.param, p, static_cast<std::size_t>(n) * sizeof(float));
      p = scratch.param;
    }
    body(b, n, p, static_cast<const float*>(t.param.grad) + b, s);
    if (commit)
      for (int j = 0; j < t.slot_count; ++j)
        if (store_mask & (1u << j)) {
          const Slot& slot = t.slots[j];
          if (slot.storage == math::StateStorage::kCodes8) {
            encode8_blocks(codebook(slot.codebook), s[j], block, slot.codes + b, slot.absmax + b / block, n);
            continue;
          }
          if (slot.storage == math::StateStorage::kCodes4 && !slot.rank1) {
            encode4_blocks(codebook(slot.codebook), s[j], block, slot.codes + b / 2, slot.absmax + b / block, n);
            continue;
          }
          for (std::int64_t o = 0; o < n; o += block)
            store_block(t, slot, b + o, std::min(block, n - o), s[j] + o, k.rounding_seed, j, stochastic);
        }
  }
}

// Splits rows [0, rows) of a (rows, row_len) view among the threads of the enclosing parallel
// region; each row is handled by exactly one thread.
template <class Fn>
void for_my_rows(std::int64_t rows, Fn&& fn) {
  const int threads = omp_get_num_threads();
  const int me = omp_get_thread_num();
  const std::int64_t r0 = rows * me / threads;
  const std::int64_t r1 = rows * (me + 1) / threads;
  if (r0 < r1) fn(r0, r1);
}

// fn(chunk index, chunk, tensor, scratch) for the chunks of every tensor `wanted(tensor index)`
// accepts, split statically among the threads of one parallel region. When they hold fewer
// elements than one chunk, the calling thread runs them alone: waking the other threads cost more
// than such a pass (148 tensors of 16 elements, from Python on 2 cores: 590 us per AdamW step with
// OMP_WAIT_POLICY=passive, 300 with libgomp's default spin, 230 on one thread). Every chunk is
// computed alike on any number of threads, so the results are the same.
template <class Wanted, class Fn>
void parallel_chunks_of(Optimizer::Impl& impl, Wanted&& wanted, Fn&& fn) {
  const std::int64_t count = static_cast<std::int64_t>(impl.chunks.size());
  std::int64_t elements = 0;
  for (std::int64_t c = 0; c < count && elements < kChunkElements; ++c)
    if (wanted(impl.chunks[c].tensor)) elements += impl.chunks[c].end - impl.chunks[c].begin;
#pragma omp parallel if (elements >= kChunkElements)
  {
    BlockScratch scratch;
#pragma omp for schedule(static)
    for (std::int64_t c = 0; c < count; ++c) {
      const Chunk& ch = impl.chunks[c];
      if (!wanted(ch.tensor)) continue;
      fn(c, ch, impl.tensors[ch.tensor], scratch);
    }
  }
}

// The chunks of the tensors that have a gradient this step.
template <class Fn>
void parallel_chunks(Optimizer::Impl& impl, Fn&& fn) {
  parallel_chunks_of(impl, [&](int i) { return impl.tensors[i].param.grad != nullptr; }, fn);
}

// ---------------------------------------------------------------------------------------------
// Step constants.

std::int64_t adamp_view_rows(const TensorState& t) {
  return t.param.shape.empty() ? 1 : t.param.shape[0];
}

void fill_constants(Optimizer::Impl& impl, float grad_mul, float lr_scale) {
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    TensorState& t = impl.tensors[i];
    math::fill_step_constants(impl.constants[i], impl.options.algorithm, impl.hyper, t.lr, t.weight_decay, t.step,
                              grad_mul, lr_scale, impl.options.seed,
                              t.param.grad != nullptr ? t.running.data() : nullptr);
  }
}

// ---------------------------------------------------------------------------------------------
// AdamP: cosine test per view, then the projection's per-row dot products.

void adamp_prepare(Optimizer::Impl& impl) {
  const Hyper& h = impl.hyper;
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    TensorState& t = impl.tensors[i];
    StepConstants& k = impl.constants[i];
    k.adamp_view = 0;
    if (t.param.grad == nullptr || t.param.shape.size() < 2 || t.numel == 0) continue;
    const std::int64_t rows = adamp_view_rows(t);
    const std::int64_t len = t.numel / rows;
    const math::AdamPScratch at{rows};
    double* gp = t.scratch.data() + at.gp();
    double* gg = t.scratch.data() + at.gg();
    double* pp = t.scratch.data() + at.pp();
    double* dot = t.scratch.data() + at.dot();
    const float* p = static_cast<const float*>(t.param.data);
    const float* g = static_cast<const float*>(t.param.grad);
#pragma omp parallel
    for_my_rows(rows, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t r = r0; r < r1; ++r) {
        double a = 0, b = 0, c = 0;
        const float* pr = p + r * len;
        const float* gr = g + r * len;
#pragma omp simd reduction(+ : a, b, c)
        for (std::int64_t e = 0; e < len; ++e) {
          a += static_cast<double>(gr[e]) * pr[e];
          b += static_cast<double>(gr[e]) * gr[e];
          c += static_cast<double>(pr[e]) * pr[e];
        }
        gp[r] = a;
        gg[r] = b;
        pp[r] = c;
      }
    });
    const double eps = h.eps;
    double max_cos = 0, sgp = 0, sgg = 0, spp = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      max_cos = std::max(max_cos, std::fabs(gp[r]) / std::max(std::sqrt(gg[r]) * std::sqrt(pp[r]), eps));
      sgp += gp[r];
      sgg += gg[r];
      spp += pp[r];
    }
    const double layer_cos = std::fabs(sgp) / std::max(std::sqrt(sgg) * std::sqrt(spp), eps);
    if (max_cos < h.delta / std::sqrt(static_cast<double>(len))) {
      k.adamp_view = 1;
    } else if (layer_cos < h.delta / std::sqrt(static_cast<double>(t.numel))) {
      k.adamp_view = 2;
    } else {
      continue;
    }
    k.adamp_decay = 1.0f - k.lr * t.weight_decay * h.wd_ratio;
    // inv_norm per view row into gg (reused), dot products of p * inv_norm with the perturbation.
    const std::int64_t vrows = k.adamp_view == 1 ? rows : 1;
    const std::int64_t vlen = t.numel / vrows;
    for (std::int64_t r = 0; r < vrows; ++r)
      gg[r] = 1.0 / (std::sqrt(k.adamp_view == 1 ? pp[r] : spp) + eps);
    // Each view row is summed by one thread, in element order: deterministic.
    const std::int64_t segments = (t.numel + kChunkElements - 1) / kChunkElements;
#pragma omp parallel
    {
      BlockScratch scratch;
      if (vrows == 1) {
        // One row: partial sums over fixed segments of the tensor, combined in segment order, so
        // the sum does not depend on the thread count.
        const float inv = static_cast<float>(gg[0]);
#pragma omp for schedule(static)
        for (std::int64_t seg = 0; seg < segments; ++seg) {
          const std::int64_t lo = seg * kChunkElements, hi = std::min(t.numel, lo + kChunkElements);
          double part = 0;
          for_blocks(impl, t, lo, hi, false, 0, scratch,
                     [&](std::int64_t, std::int64_t n, float* pb, const float* gb, float** s) {
                       for (std::int64_t e = 0; e < n; ++e) {
                         const float perturb = math::adamp_perturb(gb[e], s[0][e], s[1][e], k.adamp);
                         part += static_cast<double>(pb[e] * inv) * perturb;
                       }
                     });
          dot[seg] = part;
        }
      } else {
        for_my_rows(vrows, [&](std::int64_t r0, std::int64_t r1) {
          for (std::int64_t r = r0; r < r1; ++r) dot[r] = 0.0;
          for_blocks(impl, t, r0 * vlen, r1 * vlen, false, 0, scratch,
                     [&](std::int64_t b, std::int64_t n, float* pb, const float* gb, float** s) {
                       const std::int64_t i0 = std::max(r0 * vlen, b) - b;
                       const std::int64_t i1 = std::min(r1 * vlen, b + n) - b;
                       for (std::int64_t e = i0; e < i1; ++e) {
                         const std::int64_t r = (b + e) / vlen;
                         const float perturb = math::adamp_perturb(gb[e], s[0][e], s[1][e], k.adamp);
                         dot[r] += static_cast<double>(pb[e] * static_cast<float>(gg[r])) * perturb;
                       }
                     });
        });
      }
#pragma omp barrier
#pragma omp single
      if (vrows == 1) {
        double total = 0;
        for (std::int64_t seg = 0; seg < segments; ++seg) total += dot[seg];
        dot[0] = total;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Rank-1 scales: a dry run of the update finds each row's and column's maximum of the new
// second moment; the apply pass then quantizes with them.

template <class Rule>
void rank1_prepare(Optimizer::Impl& impl, Rule&& rule) {
  for (TensorState& t : impl.tensors) {
    if (t.param.grad == nullptr) continue;
    for (int j = 0; j < t.slot_count; ++j) {
      Slot& s = t.slots[j];
      if (!s.rank1) continue;
      const std::int64_t cols = t.cols;
      std::fill(s.next_row_max, s.next_row_max + t.rows, 0.0f);
      std::fill(s.next_col_max, s.next_col_max + cols, 0.0f);
      // At most the threads thread_scratch has a row for (the count when the optimizer was made; a
      // caller may raise OpenMP's since). The maxima are exact in any order: any count gives them.
#pragma omp parallel num_threads(impl.threads)
      {
        BlockScratch scratch;
        float* col = impl.thread_scratch.data() + static_cast<std::size_t>(omp_get_thread_num()) * impl.max_cols;
        std::fill(col, col + cols, 0.0f);
        for_my_rows(t.rows, [&](std::int64_t r0, std::int64_t r1) {
          for_blocks(impl, t, r0 * cols, r1 * cols, false, 0, scratch,
                     [&](std::int64_t b, std::int64_t n, float* pb, const float* gb, float** sv) {
                       rule(t, b, n, pb, gb, sv);
                       const std::int64_t i0 = std::max(r0 * cols, b) - b;
                       const std::int64_t i1 = std::min(r1 * cols, b + n) - b;
                       for (std::int64_t e = i0; e < i1; ++e) {
                         const std::int64_t idx = b + e;
                         const float a = math::abs_f(sv[j][e]);
                         float& rm = s.next_row_max[idx / cols];
                         rm = math::max_f(rm, a);
                         float& cm = col[idx % cols];
                         cm = math::max_f(cm, a);
                       }
                     });
        });
#pragma omp critical(nibble_rank1)
        for (std::int64_t c = 0; c < cols; ++c) s.next_col_max[c] = math::max_f(s.next_col_max[c], col[c]);
      }
    }
  }
}

void rank1_commit(Optimizer::Impl& impl) {
  for (TensorState& t : impl.tensors) {
    if (t.param.grad == nullptr) continue;
    for (int j = 0; j < t.slot_count; ++j) {
      Slot& s = t.slots[j];
      if (!s.rank1) continue;
      std::copy(s.next_row_max, s.next_row_max + t.rows, s.row_max);
      std::copy(s.next_col_max, s.next_col_max + t.cols, s.col_max);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The elementwise part of every algorithm, over one block.

template <class R>
inline constexpr bool kNoBlockRuleFor = false;

// The update of one block by rule R (with its variant): the element-wise rules in one loop, AdamP
// and Adafactor with the statistics their prepare passes left in the tensor's scratch.
template <class R, bool kVariant>
struct BlockRule {
  const Optimizer::Impl& impl;
  float* muon_update = nullptr;  // Muon: the orthogonalised matrix's update, from its first element
  void operator()(const TensorState& t, std::int64_t b, std::int64_t n, float* __restrict p,
                  const float* __restrict g, float** s) const {
    const StepConstants& k = impl.constants[&t - impl.tensors.data()];
    float* __restrict s0 = s[0];
    float* __restrict s1 = s[1];
    float* __restrict s2 = s[2];
    if constexpr (R::kElementwise) {
      // Constants copied to a local: through the reference the compiler must assume the stores
      // alias them, reloads them every element and does not vectorise.
      const auto c = R::constants(k);
      for (std::int64_t i = 0; i < n; ++i) R::template update<kVariant>(p[i], g[i], s0[i], s1[i], s2[i], c);
    } else if constexpr (std::is_same_v<R, math::AdamPRule>) {
      const math::AdamPStep ka = k.adamp;
      const float adamp_decay = k.adamp_decay;
      if (k.adamp_view == 0) {
        for (std::int64_t i = 0; i < n; ++i) {
          const float perturb = math::adamp_perturb(g[i], s0[i], s1[i], ka);
          math::adamp_apply(p[i], perturb, 0.0f, 0.0f, adamp_decay, ka.step_size);
        }
      } else {
        const math::AdamPScratch at{adamp_view_rows(t)};
        const double* gg = t.scratch.data() + at.inv_norm();
        const double* dot = t.scratch.data() + at.dot();
        const std::int64_t vlen = k.adamp_view == 1 ? t.numel / adamp_view_rows(t) : t.numel;
        // Row by row, so that the inner loop has loop-invariant projection terms.
        for (std::int64_t i = 0; i < n;) {
          const std::int64_t r = (b + i) / vlen;
          const std::int64_t end = std::min(n, (r + 1) * vlen - b);
          const float ggr = static_cast<float>(gg[r]), dotr = static_cast<float>(dot[r]);
          for (; i < end; ++i) {
            const float perturb = math::adamp_perturb(g[i], s0[i], s1[i], ka);
            math::adamp_apply(p[i], perturb, ggr, dotr, adamp_decay, ka.step_size);
          }
        }
      }
    } else if constexpr (std::is_same_v<R, math::AdafactorRule>) {
      const math::AdafactorStep ka = k.adafactor;
      if (t.factored) {
        const std::int64_t rows = t.rows, cols = t.cols, batches = rows / t.batch_rows;
        const math::AdafactorScratch at{rows, cols, batches};
        const double* r_factor = t.scratch.data() + at.r_factor();
        // The column factors as floats (adafactor_step's copy, made for this tensor this step).
        const float* c_factor = impl.column_factors.data();
        float* __restrict m = s0;
        // Row by row: one division per row segment, and a contiguous inner loop over columns.
        for (std::int64_t i = 0; i < n;) {
          const std::int64_t e = b + i, r = e / cols, c0 = e % cols;
          const std::int64_t len = std::min(n - i, cols - c0);
          const float rf = static_cast<float>(r_factor[r]);
          const float* __restrict cf = c_factor + (r / t.batch_rows) * cols + c0;
          float* __restrict pr = p + i;
          const float* __restrict gr = g + i;
          float* __restrict mr = m + i;
          for (std::int64_t j = 0; j < len; ++j)
            math::adafactor_apply<kVariant>(pr[j], math::adafactor_factored(gr[j], rf, cf[j], ka), mr[j], ka);
          i += len;
        }
      } else {
        for (std::int64_t i = 0; i < n; ++i) {
          const float u = math::adafactor_unfactored(g[i], s0[i], ka);
          math::adafactor_apply<kVariant>(p[i], u, s1[i], ka);
        }
      }
    } else if constexpr (std::is_same_v<R, math::MuonRule>) {
      if (t.orthogonalised) {
        const math::MuonStep km = k.muon;
        float* __restrict u = muon_update + b;
        for (std::int64_t i = 0; i < n; ++i) u[i] = math::muon_momentum(g[i], s0[i], km);
      } else {
        const math::AdamStep ka = k.adam;
        for (std::int64_t i = 0; i < n; ++i) math::adam_update<false>(p[i], g[i], s0[i], s1[i], s2[i], ka);
      }
    } else {
      static_assert(kNoBlockRuleFor<R>, "BlockRule: a rule that is neither element-wise nor AdamP, Adafactor or Muon");
    }
  }
};

// ---------------------------------------------------------------------------------------------
// bf16 state of an element-wise rule, in tiles.
//
// NOTE: bf16 has no blocks, so the block walk's per-block load and store dispatch buys nothing:
// each tile of kBf16Tile elements is widened into a local array per slot (AVX2), stepped by the
// rule's loop and rounded back (AVX2). Tiles of 512 keep the five arrays a tile touches (three
// slots, p, g) in L1; in cache, one thread, AdamW bf16 took 0.79 ms per 1M parameters against the
// block walk's 0.89-0.91 (tiles of 16, 64, 128, 256: 1.11, 0.92, 0.87, 0.82; one loop widening,
// updating and rounding each element did not vectorise). The float operations per element are the
// block walk's, so the bits are too. Stochastic rounding keeps the block walk (its hash stream is
// per slot and element).
constexpr std::int64_t kBf16Tile = 512;

// Whether t steps in bf16 tiles: every slot bf16, rounded to nearest, and none that the rule reads
// missing (the block walk gives those zeros).
bool steps_bf16_in_tiles(const Optimizer::Impl& impl, const TensorState& t, int read_slots) {
  if (impl.options.stochastic_rounding || t.slot_count == 0 || t.slot_count < read_slots) return false;
  for (int j = 0; j < t.slot_count; ++j)
    if (t.slots[j].storage != math::StateStorage::kBf16) return false;
  return true;
}

template <class R, bool kVariant, int kSlots>
void step_bf16_slots(const StepConstants& k, TensorState& t, std::int64_t lo, std::int64_t hi) {
  static_assert(kSlots >= 1 && kSlots <= kMaxSlots);
  const auto c = R::constants(k);
  constexpr int kWritten = R::kWrittenSlots < kSlots ? R::kWrittenSlots : kSlots;
  alignas(64) float a[kMaxSlots][kBf16Tile];
  std::uint16_t* h[kMaxSlots] = {};
  for (int j = 0; j < kSlots; ++j) h[j] = t.slots[j].bf16;
  float* const param = static_cast<float*>(t.param.data);
  const float* const grad = static_cast<const float*>(t.param.grad);
  for (std::int64_t b = lo; b < hi; b += kBf16Tile) {
    const std::int64_t n = std::min(kBf16Tile, hi - b);
    for (int j = 0; j < kSlots; ++j) decode_bf16(h[j] + b, a[j], n);
    float* __restrict p = param + b;
    const float* __restrict g = grad + b;
    float* __restrict s0 = a[0];
    float* __restrict s1 = a[1];
    float* __restrict s2 = a[2];
    for (std::int64_t i = 0; i < n; ++i) R::template update<kVariant>(p[i], g[i], s0[i], s1[i], s2[i], c);
    for (int j = 0; j < kWritten; ++j) encode_bf16(a[j], h[j] + b, n);
  }
}

// The elements of t in [lo, hi) widened to whole blocks, as for_blocks walks them.
template <class R, bool kVariant>
void step_bf16_in_tiles(const Optimizer::Impl& impl, TensorState& t, std::int64_t lo, std::int64_t hi) {
  const StepConstants& k = impl.constants[&t - impl.tensors.data()];
  const std::int64_t block = t.block;
  const std::int64_t first = lo / block * block;
  const std::int64_t end = std::min(t.numel, (hi + block - 1) / block * block);
  if (first >= end) return;
  switch (t.slot_count) {
    case 1: return step_bf16_slots<R, kVariant, 1>(k, t, first, end);
    case 2: return step_bf16_slots<R, kVariant, 2>(k, t, first, end);
    default: return step_bf16_slots<R, kVariant, 3>(k, t, first, end);
  }
}

// ---------------------------------------------------------------------------------------------
// Adafactor, one tensor at a time: its statistics, the update's RMS and its update run back to
// back in one parallel region, so that a tensor small enough for the last-level cache can still be
// there for the later passes, and one pass of the gradient gives both the row and the column sums.
// GPT-2 124M, 2 threads, interleaved runs: fastest step 106-116 ms before (row pass, strided column
// pass, RMS pass, then every tensor's update: the gradient read four times), 90-95 after; 70-90
// with the float column factors and without the zero-filled slots (the same runs' noise). The
// three passes left are what the math needs: the factors need every row and column sum, the
// update's RMS needs the factors, and the update needs the RMS. Taking the RMS pass's rows in
// reverse, to meet the rows the statistics pass left in cache first, made the step 15% slower.
//
// NOTE: column sums over fixed row groups. Each group of rows (within one batch of the
// (batches, batch_rows, cols) view) adds its rows in order into its own column partials, and the
// partials are added in group order; the groups depend on the shape alone, so the sums do not
// depend on the thread count. At most kColumnGroups groups per tensor: when the batches are fewer,
// each batch is split into kColumnGroups / batches groups (at most one per row) and the partials
// take impl.column_partials; otherwise one group per batch sums straight into its column sums.
constexpr std::int64_t kColumnGroups = 16;

std::int64_t adafactor_parts(const TensorState& t) {
  const std::int64_t batches = t.rows / t.batch_rows;
  return std::clamp<std::int64_t>(kColumnGroups / batches, 1, t.batch_rows);
}

// The doubles impl.column_partials needs for t's column partials (0 when it sums in place); it
// grows to the largest on the first step, and also holds the chunk sums of unfactored tensors.
std::int64_t adafactor_partial_doubles(const TensorState& t) {
  if (!t.factored) return 0;
  const std::int64_t parts = adafactor_parts(t);
  return parts > 1 ? (t.rows / t.batch_rows) * parts * t.cols : 0;
}

// Row sums of g^2 + eps1 and of p^2 for rows [r0, r1), and their column sums added into col.
void adafactor_row_group(const TensorState& t, const math::AdafactorStep& k, std::int64_t r0, std::int64_t r1,
                         double* __restrict row_sum, double* __restrict row_pp, double* __restrict col) {
  const std::int64_t cols = t.cols;
  const float* p = static_cast<const float*>(t.param.data);
  const float* g = static_cast<const float*>(t.param.grad);
  for (std::int64_t r = r0; r < r1; ++r) {
    double a[kSumLanes] = {}, c[kSumLanes] = {};
    const float* __restrict gr = g + r * cols;
    const float* __restrict pr = p + r * cols;
    std::int64_t e = 0;
    for (; e + kSumLanes <= cols; e += kSumLanes)
      for (int l = 0; l < kSumLanes; ++l) {
        const float square = math::adafactor_square(gr[e + l], k);
        a[l] += square;
        col[e + l] += square;
        c[l] += static_cast<double>(pr[e + l]) * pr[e + l];
      }
    for (int l = 0; e < cols; ++e, ++l) {
      const float square = math::adafactor_square(gr[e], k);
      a[l] += square;
      col[e] += square;
      c[l] += static_cast<double>(pr[e]) * pr[e];
    }
    row_sum[r] = sum_lanes(a);
    row_pp[r] = sum_lanes(c);
  }
}

// The EMAs of the row and column means, the factors r = 1/sqrt(row / mean(row)) and
// c = 1/sqrt(col), from the sums of this step (one thread). The column factors also go to
// column_factors as floats (they are floats held in doubles), which the later passes read: the
// double-to-float conversion per element was a sixth of the RMS pass's instructions.
void adafactor_factors(TensorState& t, const math::AdafactorStep& k, const math::AdafactorScratch& at,
                       float* __restrict column_factors) {
  const std::int64_t rows = t.rows, cols = t.cols, batches = rows / t.batch_rows;
  const double* row_sum = t.scratch.data() + at.row_sum();
  const double* col_sum = t.scratch.data() + at.col_sum();
  double* r_factor = t.scratch.data() + at.r_factor();
  double* c_factor = t.scratch.data() + at.c_factor();
  const float b2 = k.beta2t, one_b2 = k.one_minus_beta2t;
  for (std::int64_t r = 0; r < rows; ++r)
    t.af_row[r] = b2 * t.af_row[r] + one_b2 * static_cast<float>(row_sum[r] / static_cast<double>(cols));
  for (std::int64_t bc = 0; bc < batches * cols; ++bc)
    t.af_col[bc] = b2 * t.af_col[bc] + one_b2 * static_cast<float>(col_sum[bc] / static_cast<double>(t.batch_rows));
  for (std::int64_t b = 0; b < batches; ++b) {
    double mean = 0;
    for (std::int64_t r = b * t.batch_rows; r < (b + 1) * t.batch_rows; ++r) mean += t.af_row[r];
    const float row_mean = static_cast<float>(mean / static_cast<double>(t.batch_rows));
    for (std::int64_t r = b * t.batch_rows; r < (b + 1) * t.batch_rows; ++r)
      r_factor[r] = 1.0f / sqrtf(t.af_row[r] / row_mean);
  }
  for (std::int64_t bc = 0; bc < batches * cols; ++bc) {
    column_factors[bc] = 1.0f / sqrtf(t.af_col[bc]);
    c_factor[bc] = column_factors[bc];
  }
}

// Rows [r0, r1): the sums of squares of the factored update u = g * r * c.
void adafactor_update_squares(TensorState& t, const math::AdafactorStep& k, const math::AdafactorScratch& at,
                              const float* c_factor, std::int64_t r0, std::int64_t r1) {
  const std::int64_t cols = t.cols;
  const float* g = static_cast<const float*>(t.param.grad);
  const double* r_factor = t.scratch.data() + at.r_factor();
  double* row_uu = t.scratch.data() + at.row_uu();
  for (std::int64_t r = r0; r < r1; ++r) {
    const float rf = static_cast<float>(r_factor[r]);
    const float* __restrict cf = c_factor + (r / t.batch_rows) * cols;
    const float* __restrict gr = g + r * cols;
    double a[kSumLanes] = {};
    std::int64_t c = 0;
    for (; c + kSumLanes <= cols; c += kSumLanes)
      for (int l = 0; l < kSumLanes; ++l) {
        const float u = math::adafactor_factored(gr[c + l], rf, cf[c + l], k);
        a[l] += static_cast<double>(u) * u;
      }
    for (int l = 0; c < cols; ++c, ++l) {
      const float u = math::adafactor_factored(gr[c], rf, cf[c], k);
      a[l] += static_cast<double>(u) * u;
    }
    row_uu[r] = sum_lanes(a);
  }
}

// Unfactored (rank < 2): the sums of p^2 and of the update's squares, per chunk of the tensor
// (fixed by its size) in kSumLanes lanes, into partials[2 c] and partials[2 c + 1] for its c-th
// chunk; the caller adds them in chunk order, so the sums do not depend on the thread count.
// Inside the tensor's parallel region: the chunks are shared among its threads. One thread in
// element order, with one accumulator, took 4.8 ms for a 1M-element vector (AdamW: 0.45).
void adafactor_unfactored_sums(const Optimizer::Impl& impl, TensorState& t, const math::AdafactorStep& k,
                               std::size_t chunk_begin, std::size_t chunk_end, double* partials,
                               BlockScratch& scratch) {
  const float* p = static_cast<const float*>(t.param.data);
#pragma omp for schedule(static)
  for (std::size_t c = chunk_begin; c < chunk_end; ++c) {
    const Chunk& ch = impl.chunks[c];
    double pp[kSumLanes] = {}, uu[kSumLanes] = {};
    std::int64_t e = ch.begin;
    for (; e + kSumLanes <= ch.end; e += kSumLanes)
      for (int l = 0; l < kSumLanes; ++l) pp[l] += static_cast<double>(p[e + l]) * p[e + l];
    for (int l = 0; e < ch.end; ++e, ++l) pp[l] += static_cast<double>(p[e]) * p[e];
    // Each span's lanes are summed in locals (through the captured array, or with k read through
    // its reference, the compiler must assume the state's stores alias them and does not
    // vectorise), then added into the chunk's lanes.
    const math::AdafactorStep kk = k;
    for_blocks(impl, t, ch.begin, ch.end, false, 0, scratch,
               [&](std::int64_t, std::int64_t n, float*, const float* __restrict gb, float** sv) {
                 float* __restrict v = sv[0];
                 double a[kSumLanes] = {};
                 std::int64_t i = 0;
                 for (; i + kSumLanes <= n; i += kSumLanes)
                   for (int l = 0; l < kSumLanes; ++l) {
                     const float u = math::adafactor_unfactored(gb[i + l], v[i + l], kk);
                     a[l] += static_cast<double>(u) * u;
                   }
                 for (int l = 0; i < n; ++i, ++l) {
                   const float u = math::adafactor_unfactored(gb[i], v[i], kk);
                   a[l] += static_cast<double>(u) * u;
                 }
                 for (int l = 0; l < kSumLanes; ++l) uu[l] += a[l];
               },
               1);
    partials[2 * (c - chunk_begin)] = sum_lanes(pp);
    partials[2 * (c - chunk_begin) + 1] = sum_lanes(uu);
  }
}

template <bool kVariant>
void adafactor_step(Optimizer::Impl& impl, const BlockRule<math::AdafactorRule, kVariant>& rule, float lr_scale,
                    unsigned store_mask) {
  const Hyper& h = impl.hyper;
  std::size_t first_chunk = 0;
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    TensorState& t = impl.tensors[i];
    const std::size_t chunk_begin = first_chunk;
    while (first_chunk < impl.chunks.size() && impl.chunks[first_chunk].tensor == static_cast<int>(i)) ++first_chunk;
    if (t.param.grad == nullptr || t.numel == 0) continue;
    StepConstants& k = impl.constants[i];
    const std::int64_t rows = t.rows, cols = t.cols, batches = rows / t.batch_rows;
    const std::int64_t parts = t.factored ? adafactor_parts(t) : 1;
    const math::AdafactorScratch at{rows, cols, batches};
    const auto partials = t.factored ? static_cast<std::size_t>(adafactor_partial_doubles(t))
                                     : 2 * (first_chunk - chunk_begin);
    // Sized when the optimizer was made (reserve_scratch): a step allocates nothing.
    if (impl.column_partials.size() < partials ||
        (t.factored && impl.column_factors.size() < static_cast<std::size_t>(batches * cols)))
      throw Error(fmt::format("parameter '{}': Adafactor's scratch was not reserved for it", t.param.name));
    double sum_pp = 0.0, sum_uu = 0.0;
#pragma omp parallel if (t.numel >= kChunkElements)
    {
      BlockScratch scratch;
      if (t.factored) {
        double* row_sum = t.scratch.data() + at.row_sum();
        double* row_pp = t.scratch.data() + at.row_pp();
        double* col_sum = t.scratch.data() + at.col_sum();
        for_my_rows(batches * parts, [&](std::int64_t g0, std::int64_t g1) {
          for (std::int64_t group = g0; group < g1; ++group) {
            const std::int64_t b = group / parts, part = group % parts;
            double* col = parts > 1 ? impl.column_partials.data() + group * cols : col_sum + b * cols;
            std::fill_n(col, cols, 0.0);
            adafactor_row_group(t, k.adafactor, b * t.batch_rows + t.batch_rows * part / parts,
                                b * t.batch_rows + t.batch_rows * (part + 1) / parts, row_sum, row_pp, col);
          }
        });
#pragma omp barrier
#pragma omp single
        {
          if (parts > 1)
            for (std::int64_t b = 0; b < batches; ++b)
              for (std::int64_t c = 0; c < cols; ++c) {
                double sum = 0.0;
                for (std::int64_t part = 0; part < parts; ++part)
                  sum += impl.column_partials[static_cast<std::size_t>((b * parts + part) * cols + c)];
                col_sum[b * cols + c] = sum;
              }
          adafactor_factors(t, k.adafactor, at, impl.column_factors.data());
        }
        for_my_rows(rows, [&](std::int64_t r0, std::int64_t r1) {
          adafactor_update_squares(t, k.adafactor, at, impl.column_factors.data(), r0, r1);
        });
#pragma omp barrier
#pragma omp single
        {
          for (std::int64_t r = 0; r < rows; ++r) {
            sum_pp += t.scratch[static_cast<std::size_t>(at.row_pp() + r)];
            sum_uu += t.scratch[static_cast<std::size_t>(at.row_uu() + r)];
          }
        }
      } else {
        adafactor_unfactored_sums(impl, t, k.adafactor, chunk_begin, first_chunk, impl.column_partials.data(), scratch);
#pragma omp single
        for (std::size_t c = 0; c < 2 * (first_chunk - chunk_begin); c += 2) {
          sum_pp += impl.column_partials[c];
          sum_uu += impl.column_partials[c + 1];
        }
      }
#pragma omp single
      k.adafactor.scale = math::adafactor_scale(h, t.lr, lr_scale, t.step, sum_pp, sum_uu,
                                                static_cast<double>(t.numel), k.adafactor.decay, t.weight_decay);
#pragma omp for schedule(static)
      for (std::size_t c = chunk_begin; c < first_chunk; ++c)
        for_blocks(impl, t, impl.chunks[c].begin, impl.chunks[c].end, true, store_mask, scratch,
                   [&](std::int64_t b, std::int64_t n, float* p, const float* g, float** s) { rule(t, b, n, p, g, s); },
                   math::AdafactorRule::read_slots(kVariant));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Muon: per orthogonalised matrix, the momentum pass writes the update into impl.ns_scratch, the
// Newton-Schulz iteration orthogonalises it there, and the apply pass steps the parameter.

void muon_matrices(Optimizer::Impl& impl, BlockRule<math::MuonRule, false>& rule, unsigned store_mask) {
  const Hyper& h = impl.hyper;
  const NewtonSchulz ns{h.ns_a, h.ns_b, h.ns_c, static_cast<int>(h.ns_steps), h.eps};
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    TensorState& t = impl.tensors[i];
    if (!t.orthogonalised || t.param.grad == nullptr || t.numel == 0) continue;
    float* u = reinterpret_cast<float*>(impl.ns_scratch.data());
    rule.muon_update = u;
    parallel_chunks_of(impl, [&](int index) { return static_cast<std::size_t>(index) == i; },
                       [&](std::int64_t, const Chunk& ch, TensorState& tc, BlockScratch& scratch) {
                         for_blocks(
                             impl, tc, ch.begin, ch.end, true, store_mask, scratch,
                             [&](std::int64_t b, std::int64_t n, float* p, const float* g, float** s) {
                               rule(tc, b, n, p, g, s);
                             },
                             math::MuonRule::read_slots(false));
                       });
    const std::int64_t rows = t.param.shape[0], cols = t.numel / rows;
    newton_schulz(u, rows, cols, ns, u + t.numel, u);
    const math::MuonStep& k = impl.constants[i].muon;
    const float step = static_cast<float>(static_cast<double>(k.lr) *
                                          math::muon_lr_factor(h.adjust_lr, static_cast<double>(rows),
                                                               static_cast<double>(cols)));
    const float decay = k.decay;
    float* __restrict p = static_cast<float*>(t.param.data);
    const std::int64_t numel = t.numel;
#pragma omp parallel for schedule(static)
    for (std::int64_t e = 0; e < numel; ++e) math::muon_apply(p[e], u[e], decay, step);
  }
}

}  // namespace

void reserve_scratch(Optimizer::Impl& impl) {
  if (impl.options.algorithm != Algorithm::kAdafactor) return;
  std::size_t partials = 0, factors = 0, first_chunk = 0;
  for (std::size_t i = 0; i < impl.tensors.size(); ++i) {
    const TensorState& t = impl.tensors[i];
    const std::size_t chunk_begin = first_chunk;
    while (first_chunk < impl.chunks.size() && impl.chunks[first_chunk].tensor == static_cast<int>(i)) ++first_chunk;
    if (t.numel == 0) continue;
    if (t.factored) {
      partials = std::max(partials, static_cast<std::size_t>(adafactor_partial_doubles(t)));
      factors = std::max(factors, static_cast<std::size_t>(t.rows / t.batch_rows * t.cols));
    } else {
      partials = std::max(partials, 2 * (first_chunk - chunk_begin));
    }
  }
  impl.column_partials.assign(partials, 0.0);
  impl.column_factors.assign(factors, 0.0f);
}

double grad_square_sum(Optimizer::Impl& impl, std::span<const std::uint8_t> counted) {
  parallel_chunks(impl, [&](std::int64_t c, const Chunk& ch, TensorState& t, BlockScratch&) {
    // Independent accumulators (see kSumLanes): a single one ran this pass at half the copy
    // bandwidth.
    const float* __restrict g = static_cast<const float*>(t.param.grad);
    double acc[kSumLanes] = {};
    std::int64_t e = ch.begin;
    for (; e + kSumLanes <= ch.end; e += kSumLanes)
      for (int k = 0; k < kSumLanes; ++k) {
        const double x = static_cast<double>(g[e + k]);
        acc[k] += x * x;
      }
    for (int k = 0; e < ch.end; ++e, ++k) {
      const double x = static_cast<double>(g[e]);
      acc[k] += x * x;
    }
    impl.chunk_partials[c] = sum_lanes(acc);
  });
  double total = 0.0;
  for (std::size_t c = 0; c < impl.chunks.size(); ++c) {
    const int i = impl.chunks[c].tensor;
    if (impl.tensors[i].param.grad != nullptr && (counted.empty() || counted[i] != 0)) total += impl.chunk_partials[c];
  }
  return total;
}

void step(Optimizer::Impl& impl, float grad_mul, float lr_scale) {
  fill_constants(impl, grad_mul, lr_scale);
  bool any_rank1 = false;
  for (const TensorState& t : impl.tensors)
    for (int j = 0; j < t.slot_count; ++j) any_rank1 = any_rank1 || t.slots[j].rank1;
  math::visit_rule(math::Rules{}, impl.options.algorithm, impl.hyper, [&]<class R, bool kVariant>() {
    BlockRule<R, kVariant> rule{impl};
    if constexpr (std::is_same_v<R, math::AdamPRule>) adamp_prepare(impl);
    constexpr unsigned store_mask = (1u << R::kWrittenSlots) - 1;
    // Adafactor keeps no rank-1 slot: its only second-moment slot belongs to tensors of rank < 2.
    if constexpr (std::is_same_v<R, math::AdafactorRule>) return adafactor_step(impl, rule, lr_scale, store_mask);
    if (any_rank1) rank1_prepare(impl, rule);
    // Muon's orthogonalised matrices step one by one after the others (its AdamW fallback).
    parallel_chunks_of(
        impl, [&](int i) { return impl.tensors[i].param.grad != nullptr && !impl.tensors[i].orthogonalised; },
        [&](std::int64_t, const Chunk& ch, TensorState& t, BlockScratch& scratch) {
          if constexpr (R::kElementwise) {
            if (steps_bf16_in_tiles(impl, t, R::read_slots(kVariant))) {
              step_bf16_in_tiles<R, kVariant>(impl, t, ch.begin, ch.end);
              return;
            }
          }
          for_blocks(
              impl, t, ch.begin, ch.end, true, store_mask, scratch,
              [&](std::int64_t b, std::int64_t n, float* p, const float* g, float** s) { rule(t, b, n, p, g, s); },
              R::read_slots(kVariant));
        });
    if constexpr (std::is_same_v<R, math::MuonRule>) muon_matrices(impl, rule, store_mask);
  });
  if (any_rank1) rank1_commit(impl);
}

void update_hessian(Optimizer::Impl& impl, std::span<const float* const> estimates) {
  const math::SophiaHessianStep k{impl.hyper.beta2, 1.0f - impl.hyper.beta2};
  parallel_chunks_of(
      impl, [&](int i) { return estimates[i] != nullptr; },
      [&](std::int64_t, const Chunk& ch, TensorState& t, BlockScratch& scratch) {
        const float* est = estimates[ch.tensor];
        const std::int64_t block = t.block;
        for (std::int64_t b = ch.begin; b < ch.end; b += block) {
          const std::int64_t n = std::min(block, t.numel - b);
          float* h = load_block(t, t.slots[1], b, n, scratch.state[1], true);
          for (std::int64_t i = 0; i < n; ++i) math::sophia_hessian_update(h[i], est[b + i], k);
          store_block(t, t.slots[1], b, n, h, math::rounding_seed(impl.options.seed, t.step) ^ 0x5f3759dfull, 1,
                      impl.options.stochastic_rounding);
        }
      });
}

void interpolate_params(Optimizer::Impl& impl, float weight) {
  parallel_chunks_of(
      impl, [&](int i) { return impl.tensors[i].step > 0; },
      [&](std::int64_t, const Chunk& ch, TensorState& t, BlockScratch&) {
        float* p = static_cast<float*>(t.param.data);
        const float* z = t.slots[0].f32;
        for (std::int64_t e = ch.begin; e < ch.end; ++e) p[e] = math::lerp_f(p[e], z[e], weight);
      });
}

void read_slot(const TensorState& t, const Slot& slot, float* out) {
  BlockScratch scratch;
  for (std::int64_t b = 0; b < t.numel; b += t.block) {
    const std::int64_t n = std::min<std::int64_t>(t.block, t.numel - b);
    const float* v = load_block(t, slot, b, n, scratch.state[0], false);
    std::memcpy(out + b, v, static_cast<std::size_t>(n) * sizeof(float));
  }
}

// NOTE: a block's absmax is the magnitude of one of its elements when it was quantized, but that
// element decodes to less than absmax when its code is not +-1 (the signed maps have +1 and no
// -1). Putting +-absmax back on the first element whose code +-1 re-encodes to (e.g. a -absmax
// element, which encodes to the most negative code) makes write_slot find the same absmax, and
// with it the same codes, whenever it is given the same blocks.
void read_slot_portable(const TensorState& t, const Slot& slot, float* out) {
  read_slot(t, slot, out);
  if (!is_quantized(slot.precision) || slot.rank1) return;
  const Codebook& cb = codebook(slot.codebook);
  const std::uint8_t code_of_plus_one = math::codebook_encode(cb, 1.0f);
  const std::uint8_t code_of_minus_one = math::codebook_encode(cb, -1.0f);
  for (std::int64_t b = 0; b < t.numel; b += t.block) {
    const std::int64_t n = std::min<std::int64_t>(t.block, t.numel - b);
    const float absmax = slot.absmax[b / t.block];
    if (!(absmax > 0.0f) || block_absmax(out + b, n) == absmax) continue;
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t e = b + i;
      const std::uint8_t code = slot.storage == math::StateStorage::kCodes8 ? slot.codes[e] : nibble_at(slot.codes, e);
      if (code == code_of_minus_one && cb.values[code] < 0.0f) {
        out[e] = -absmax;
        break;
      }
      if (code == code_of_plus_one && cb.values[code] > 0.0f) {
        out[e] = absmax;
        break;
      }
    }
  }
}

void write_slot(const TensorState& t, Slot& slot, const float* values) {
  if (slot.rank1)
    throw InvalidArgument(fmt::format("parameter '{}': state '{}' is 4-bit rank-1 scaled, which cannot be set from "
                                      "values", t.param.name, slot.name));
  BlockScratch scratch;
  for (std::int64_t b = 0; b < t.numel; b += t.block) {
    const std::int64_t n = std::min<std::int64_t>(t.block, t.numel - b);
    std::memcpy(scratch.state[0], values + b, static_cast<std::size_t>(n) * sizeof(float));
    store_block(t, slot, b, n, scratch.state[0], 0, 0, false);
  }
}

}  // namespace nibble::cpu
