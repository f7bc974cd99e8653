// SigLIP's sigmoid loss on the CPU, loss and gradients in one sweep.
//
// The (N x M) logits are cut into (tile x tile) blocks. A block's logits come from
// one BLAS product, S = scale X_I Y_J^T; the epilogue turns each logit into its loss
// term softplus(-label * l) and, in place, into G'_ij = -label sigmoid(-label l) (the
// gradient times N); two more products add G' Y_J to dX_I and G'^T X_I to dY_J. The
// blocks run in the Latin-square rounds of for_each_bipartite_tile (no two blocks of
// a round share a row block or a column block), so the gradient rows need no atomics
// and every row / column block receives its contributions in the same order whatever
// the thread count: the results are bitwise reproducible.
//
// After the sweep: dscale = sum_ij G_ij x_i.y_j = (1/N) sum_i x_i . (G' Y)_i (from the
// unscaled dX, no per-logit product kept), dbias = (1/N) sum_ij G'_ij, and the
// gradients are scaled by scale / N.
#include "sslkernels/siglip.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "tile_utils.hpp"

namespace sslkernels {
namespace {

using detail::exp_vec;

// log(1 + e) for e in [0, 1]: 2 atanh(t) with t = e / (2 + e) <= 1/3, so the odd series
// converges by (1/9) a term; through t^13 the relative error is below 2e-8. Unlike
// log(1 + e) through a log it keeps full relative accuracy for tiny e, and it
// vectorises (no libm call).
inline float log1p_unit(float e) {
  const float t = e / (2.0f + e);
  const float t2 = t * t;
  float p = 1.0f / 13.0f;
  p = p * t2 + 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  return 2.0f * t * p;
}

inline double log1p_unit(double e) { return std::log1p(e); }

// softplus(l) = -log sigmoid(-l) and sigmoid(l) from one exp(-|l|): the loss term and
// G' of a negative pair (label -1). Stable for every finite l.
template <typename Acc>
inline void negative_pair(Acc l, Acc& term, Acc& grad) {
  const Acc e = exp_vec(-std::fabs(l));
  const Acc r = Acc(1) / (Acc(1) + e);
  term = std::max(l, Acc(0)) + log1p_unit(e);
  grad = l >= Acc(0) ? r : e * r;
}

// The positive pair (label +1): softplus(-l) and -sigmoid(-l).
template <typename Acc>
inline void positive_pair(Acc l, Acc& term, Acc& grad) {
  const Acc e = exp_vec(-std::fabs(l));
  const Acc r = Acc(1) / (Acc(1) + e);
  term = std::max(-l, Acc(0)) + log1p_unit(e);
  grad = -(l >= Acc(0) ? e * r : r);
}

// Negative pairs s[0..n) (scaled logits without the bias): returns the sum of their
// loss terms, adds the sum of G' to `grad_sum`, and leaves G' in s.
template <typename Acc>
SSLK_MULTIVERSION Acc negative_span(Acc* s, int64_t n, Acc bias, Acc& grad_sum) {
  Acc loss = 0, gsum = 0;
#pragma omp simd reduction(+ : loss, gsum)
  for (int64_t j = 0; j < n; ++j) {
    Acc term, grad;
    negative_pair(s[j] + bias, term, grad);
    loss += term;
    gsum += grad;
    s[j] = grad;
  }
  grad_sum += gsum;
  return loss;
}

// Rows of an operand as a contiguous-in-features Acc matrix: read in place when the
// dtype is Acc's and the features are unit-stride, else converted into `storage`.
// Returns false when an entry is NaN or Inf.
template <typename Acc>
bool load_operand(const MatrixView& v, std::vector<Acc>& storage, const Acc*& rows, int64_t& ld,
                  int num_threads) {
  const bool in_place = v.col_stride == 1 && v.row_stride >= v.cols &&
                        ((std::is_same_v<Acc, float> && v.dtype == DType::Float32) ||
                         (std::is_same_v<Acc, double> && v.dtype == DType::Float64));
  int bad = 0;
  if (in_place) {
    rows = static_cast<const Acc*>(v.data);
    ld = v.row_stride;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad)
    for (int64_t i = 0; i < v.rows; ++i) {
      const Acc* r = rows + i * ld;
      int row_bad = 0;
#pragma omp simd reduction(| : row_bad)
      for (int64_t k = 0; k < v.cols; ++k) row_bad |= !std::isfinite(r[k]);
      bad |= row_bad;
    }
    return bad == 0;
  }
  storage.resize(static_cast<size_t>(v.rows * v.cols));
  ld = v.cols;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad)
  for (int64_t i = 0; i < v.rows; ++i) {
    Acc* dst = storage.data() + i * v.cols;
    for (int64_t k = 0; k < v.cols; ++k) {
      const Acc x = detail::load_element<Acc>(v.data, v.dtype, i * v.row_stride + k * v.col_stride);
      bad |= !std::isfinite(x);
      dst[k] = x;
    }
  }
  rows = storage.data();
  return bad == 0;
}

template <typename Acc>
bool all_finite(const Acc* x, int64_t count, int num_threads) {
  int bad = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad)
  for (int64_t i = 0; i < count; ++i) bad |= !std::isfinite(x[i]);
  return bad == 0;
}

template <typename Acc>
Status siglip_impl(const MatrixView& image, const MatrixView& text, double logit_scale,
                   double logit_bias, bool positives, double* loss, Acc* dx, Acc* dy,
                   double* dscale, double* dbias, int num_threads) {
  const int64_t n = image.rows, m = text.rows, d = image.cols;
  std::vector<Acc> x_storage, y_storage;
  const Acc *x = nullptr, *y = nullptr;
  int64_t ldx = 0, ldy = 0;
  if (!load_operand<Acc>(image, x_storage, x, ldx, num_threads)) return Status::NonFiniteFirstInput;
  if (!load_operand<Acc>(text, y_storage, y, ldy, num_threads)) return Status::NonFiniteSecondInput;
  const bool grads = dx != nullptr;
  if (grads) {
    std::fill(dx, dx + n * d, Acc(0));
    std::fill(dy, dy + m * d, Acc(0));
  }
  const Acc scale = static_cast<Acc>(logit_scale), bias = static_cast<Acc>(logit_bias);
  // Tiles from the sizes only (never the thread count). Large batches take 512 x 512
  // tiles (1 MiB of float32 logits, one core's L2 here): half the barrier rounds and a
  // quarter of the BLAS calls of 256 x 256, which ran 10-20% slower at N = 8192, D = 256
  // (2 threads, loaded machine: provisional).
  int64_t tile = detail::choose_tile_rows(std::max(n, m), d);
  if (d <= 256 && std::max(n, m) >= 16 * 512) tile = 512;
  // Per row: the sum of its loss terms and of its G' (each row block is in one tile
  // per round, so these need no atomics; float64 across tiles).
  std::vector<double> row_loss(static_cast<size_t>(n), 0.0), row_grad(static_cast<size_t>(n), 0.0);
  const auto block = [&](Acc* s, int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
    detail::gemm<Acc>(false, true, rows, cols, d, scale, x + r0 * ldx, ldx, y + c0 * ldy, ldy, Acc(0),
                      s, cols);
    for (int64_t i = 0; i < rows; ++i) {
      Acc* si = s + i * cols;
      const int64_t diag = positives ? r0 + i - c0 : -1;  // column of the positive pair, if here
      Acc gsum = 0, lsum;
      if (diag >= 0 && diag < cols) {
        Acc term, grad;
        positive_pair(si[diag] + bias, term, grad);
        lsum = negative_span(si, diag, bias, gsum) + term +
               negative_span(si + diag + 1, cols - diag - 1, bias, gsum);
        si[diag] = grad;
        gsum += grad;
      } else {
        lsum = negative_span(si, cols, bias, gsum);
      }
      row_loss[r0 + i] += static_cast<double>(lsum);
      row_grad[r0 + i] += static_cast<double>(gsum);
    }
    if (!grads) return;
    detail::gemm<Acc>(false, false, rows, d, cols, Acc(1), s, cols, y + c0 * ldy, ldy, Acc(1),
                      dx + r0 * d, d);
    detail::gemm<Acc>(true, false, cols, d, rows, Acc(1), s, cols, x + r0 * ldx, ldx, Acc(1),
                      dy + c0 * d, d);
  };
  // Loss only: each thread owns whole row blocks, no barriers; with gradients the
  // column blocks are shared, so the conflict-free rounds.
  detail::for_each_bipartite_tile<Acc>(n, m, tile, tile * tile, num_threads, grads, block);

  const double inv_n = 1.0 / static_cast<double>(n);
  double loss_sum = 0, grad_sum = 0;
  for (int64_t i = 0; i < n; ++i) {  // serial: a fixed order
    loss_sum += row_loss[i];
    grad_sum += row_grad[i];
  }
  *loss = loss_sum * inv_n;
  if (!std::isfinite(*loss)) return Status::NonFiniteResult;
  if (dbias != nullptr) *dbias = grad_sum * inv_n;
  if (!grads) return Status::Ok;
  // sum_ij G'_ij x_i . y_j from the unscaled dX rows, in float64.
  std::vector<double> row_dot(static_cast<size_t>(n));
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    double acc = 0;
    for (int64_t k = 0; k < d; ++k) acc += static_cast<double>(x[i * ldx + k]) * static_cast<double>(dx[i * d + k]);
    row_dot[i] = acc;
  }
  double dot_sum = 0;
  for (int64_t i = 0; i < n; ++i) dot_sum += row_dot[i];
  if (dscale != nullptr) *dscale = dot_sum * inv_n;
  const Acc coeff = static_cast<Acc>(logit_scale * inv_n);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < n * d; ++i) dx[i] *= coeff;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < m * d; ++i) dy[i] *= coeff;
  // |G'| <= 1, so only huge finite inputs overflow the gradient sums: say so, not NaN.
  if (!std::isfinite(dot_sum) || !all_finite(dx, n * d, num_threads) || !all_finite(dy, m * d, num_threads))
    return Status::NonFiniteResult;
  return Status::Ok;
}

}  // namespace

Status siglip_loss_and_grads(const MatrixView& image, const MatrixView& text, double logit_scale,
                             double logit_bias, bool positives, double* loss, void* dimage,
                             void* dtext, double* dscale, double* dbias, int num_threads) {
  if (image.rows < 1 || text.rows < 1 || image.cols < 1 || image.cols != text.cols ||
      image.dtype != text.dtype || loss == nullptr || (dimage == nullptr) != (dtext == nullptr) ||
      !std::isfinite(logit_scale) || !std::isfinite(logit_bias))
    return Status::BadArgument;
  num_threads = std::max(1, num_threads);
  // A small problem (under ~4M multiply-adds, a few ms on one core) runs on one thread:
  // waking the others for each of its parallel regions costs more on a busy machine.
  // The results are the same bitwise for any thread count, so this changes no value.
  if (image.rows * text.rows * image.cols < (int64_t(1) << 22)) num_threads = 1;
  if (image.dtype == DType::Float64)
    return siglip_impl<double>(image, text, logit_scale, logit_bias, positives, loss,
                               static_cast<double*>(dimage), static_cast<double*>(dtext), dscale,
                               dbias, num_threads);
  return siglip_impl<float>(image, text, logit_scale, logit_bias, positives, loss,
                            static_cast<float*>(dimage), static_cast<float*>(dtext), dscale, dbias,
                            num_threads);
}

}  // namespace sslkernels
