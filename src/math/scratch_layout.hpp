// Where the whole-tensor statistics of AdamP and Adafactor live in a tensor's reduction scratch (an
// array of doubles), for the CPU driver and the CUDA kernels alike. Host+device.
#pragma once

#include <cstdint>

#include "math/common.hpp"

namespace nibble::math {

// AdamP over a (rows, numel / rows) view: per row g.p, g.g (then 1 / (||p|| + eps)) and p.p, then
// the projection's dot products, one per row or per fixed segment of the tensor (`dots` of them).
struct AdamPScratch {
  std::int64_t rows;
  NIBBLE_HD std::int64_t gp() const { return 0; }
  NIBBLE_HD std::int64_t gg() const { return rows; }
  NIBBLE_HD std::int64_t inv_norm() const { return rows; }  // gg's place, once the cosines are known
  NIBBLE_HD std::int64_t pp() const { return 2 * rows; }
  NIBBLE_HD std::int64_t dot() const { return 3 * rows; }
  NIBBLE_HD std::int64_t doubles(std::int64_t dots) const { return 3 * rows + dots; }
};

// Adafactor over a factored (rows, cols) view of `batches` matrices of rows / batches rows: per row
// the sums of g^2 + eps1, p^2 and u^2, per matrix column the sums of g^2 + eps1, then the row and
// column factors; the tensor's totals (sum p^2, sum u^2) after them where a backend keeps them here.
struct AdafactorScratch {
  std::int64_t rows, cols, batches;
  NIBBLE_HD std::int64_t row_sum() const { return 0; }
  NIBBLE_HD std::int64_t row_pp() const { return rows; }
  NIBBLE_HD std::int64_t row_uu() const { return 2 * rows; }
  NIBBLE_HD std::int64_t col_sum() const { return 3 * rows; }
  NIBBLE_HD std::int64_t r_factor() const { return 3 * rows + batches * cols; }
  NIBBLE_HD std::int64_t c_factor() const { return 4 * rows + batches * cols; }
  NIBBLE_HD std::int64_t totals() const { return 4 * rows + 2 * batches * cols; }
  NIBBLE_HD std::int64_t doubles() const { return totals(); }
};

}  // namespace nibble::math
