// NT-Xent on the CPU. Both passes walk the upper triangle of the (2N x 2N) logit
// matrix one symmetric tile pair at a time: S = Z_I Z_J^T / t is multiplied once
// and serves row block I (row-wise) and row block J (column-wise).
//
// forward : online max / sum-exp per row, from the row and column view of each tile.
// backward: dZ = c * (W Z - 2 Z_pos), W_ij = exp(s_ij - lse_i) + exp(s_ij - lse_j)
//           (symmetric), c = grad / (t * 2N); then back through the L2 normalisation.
#include "sslkernels/contrastive.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tile_utils.hpp"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define SSLK_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SSLK_MULTIVERSION
#endif

namespace sslkernels {
namespace {

using detail::exp_vec;

constexpr double kNormEps = 1e-12;  // F.normalize's eps

// The 2N rows of cat(z1, z2) as a contiguous accumulator-typed matrix, each row
// L2-normalised when asked. `norms` keeps |x_i| for the normalisation backward.
template <typename Acc>
Status load_stacked_rows(const MatrixView& z1, const MatrixView& z2, bool normalize,
                         std::vector<Acc>& rows, std::vector<Acc>& norms, int num_threads) {
  const int64_t n = z1.rows, d = z1.cols, m = 2 * n;
  rows.assign(static_cast<size_t>(m * d), Acc(0));
  norms.assign(static_cast<size_t>(m), Acc(1));
  int bad_first = 0, bad_second = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad_first, bad_second)
  for (int64_t i = 0; i < m; ++i) {
    const MatrixView& src = i < n ? z1 : z2;
    const int64_t r = i < n ? i : i - n;
    Acc* out = rows.data() + i * d;
    Acc sq = 0;
    bool finite = true;
    for (int64_t k = 0; k < d; ++k) {
      const Acc v = detail::load_element<Acc>(src.data, src.dtype, r * src.row_stride + k * src.col_stride);
      finite = finite && std::isfinite(v);
      out[k] = v;
      sq += v * v;
    }
    if (!finite) {
      if (i < n) bad_first = 1; else bad_second = 1;
      continue;
    }
    const Acc norm = std::sqrt(sq);
    norms[i] = norm;
    if (normalize) {
      const Acc inv = Acc(1) / std::max(norm, static_cast<Acc>(kNormEps));
      for (int64_t k = 0; k < d; ++k) out[k] *= inv;
    }
  }
  if (bad_first) return Status::NonFiniteFirstInput;
  if (bad_second) return Status::NonFiniteSecondInput;
  return Status::Ok;
}

// Online log-sum-exp state of one row: running max and sum of exp(s - max).
template <typename Acc>
struct RowStats {
  std::vector<Acc> max, sum;
  explicit RowStats(int64_t m)
      : max(static_cast<size_t>(m), -std::numeric_limits<Acc>::infinity()),
        sum(static_cast<size_t>(m), Acc(0)) {}
};

// Fold a tile S [rows x cols] into the stats of its rows (row view) and, when
// `columns_too`, of its columns (column view, the transposed tile).
template <typename Acc>
SSLK_MULTIVERSION void fold_tile(const Acc* s, int64_t rows, int64_t cols, Acc* row_max, Acc* row_sum,
                                 Acc* col_max, Acc* col_sum, bool columns_too, Acc* col_scratch) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  // Pass 1: tile maxima, rows and columns at once.
  Acc* tile_col_max = col_scratch;
  if (columns_too)
    for (int64_t j = 0; j < cols; ++j) tile_col_max[j] = col_max[j];
  for (int64_t i = 0; i < rows; ++i) {
    const Acc* si = s + i * cols;
    Acc mx = neg_inf;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, si[j]);
    if (columns_too)
      for (int64_t j = 0; j < cols; ++j) tile_col_max[j] = std::max(tile_col_max[j], si[j]);
    // Row update; a row whose candidates are all masked so far keeps -inf.
    const Acc new_max = std::max(row_max[i], mx);
    if (new_max == neg_inf) continue;
    Acc acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < cols; ++j) acc += exp_vec(si[j] - new_max);
    row_sum[i] = row_sum[i] * exp_vec(row_max[i] - new_max) + acc;
    row_max[i] = new_max;
  }
  if (!columns_too) return;
  // Pass 2: column sums against the new column maxima.
  Acc* col_acc = col_scratch + cols;
  for (int64_t j = 0; j < cols; ++j) col_acc[j] = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const Acc* si = s + i * cols;
    for (int64_t j = 0; j < cols; ++j) col_acc[j] += exp_vec(si[j] - tile_col_max[j]);
  }
  for (int64_t j = 0; j < cols; ++j) {
    if (tile_col_max[j] == neg_inf) continue;
    col_sum[j] = col_sum[j] * exp_vec(col_max[j] - tile_col_max[j]) + col_acc[j];
    col_max[j] = tile_col_max[j];
  }
}

// W = exp(S - lse_rows[:, None]) + exp(S - lse_cols[None, :]) in place.
template <typename Acc>
SSLK_MULTIVERSION void softmax_weights(Acc* s, int64_t rows, int64_t cols, const Acc* lse_rows,
                                       const Acc* lse_cols) {
  for (int64_t i = 0; i < rows; ++i) {
    Acc* si = s + i * cols;
    const Acc li = lse_rows[i];
    for (int64_t j = 0; j < cols; ++j) si[j] = exp_vec(si[j] - li) + exp_vec(si[j] - lse_cols[j]);
  }
}

template <typename Acc>
Status forward_impl(const MatrixView& z1, const MatrixView& z2, double temperature, bool normalize,
                    Acc* lse, double* loss, int num_threads) {
  num_threads = std::max(1, num_threads);
  const int64_t n = z1.rows, d = z1.cols, m = 2 * n;
  std::vector<Acc> z, norms;
  Status st = load_stacked_rows<Acc>(z1, z2, normalize, z, norms, num_threads);
  if (st != Status::Ok) return st;

  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  const int64_t tile = detail::choose_tile_rows(m, d);
  RowStats<Acc> stats(m);
  Acc* row_max = stats.max.data();
  Acc* row_sum = stats.sum.data();

  // Scratch per thread: one logit tile plus two column vectors for fold_tile.
  detail::for_each_symmetric_tile<Acc>(
      m, tile, tile * tile + 2 * tile, num_threads,
      [&](Acc* scratch, int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
        Acc* s = scratch;
        detail::gemm<Acc>(false, true, rows, cols, d, inv_t, z.data() + r0 * d, d,
                          z.data() + c0 * d, d, Acc(0), s, cols);
        if (r0 == c0) {
          // Diagonal tile: self-similarity masked; symmetric, so the row view suffices.
          for (int64_t i = 0; i < rows; ++i) s[i * cols + i] = -std::numeric_limits<Acc>::infinity();
          fold_tile<Acc>(s, rows, cols, row_max + r0, row_sum + r0, nullptr, nullptr, false,
                         scratch + tile * tile);
        } else {
          fold_tile<Acc>(s, rows, cols, row_max + r0, row_sum + r0, row_max + c0, row_sum + c0,
                         true, scratch + tile * tile);
        }
      });

  // Per-row loss, then a serial sum so the result does not depend on the thread count.
  std::vector<double> row_loss(static_cast<size_t>(m));
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    const Acc l = stats.max[i] + std::log(stats.sum[i]);
    lse[i] = l;
    const int64_t pos = i < n ? i + n : i - n;
    const Acc* zi = z.data() + i * d;
    const Acc* zp = z.data() + pos * d;
    Acc dot = 0;
    for (int64_t k = 0; k < d; ++k) dot += zi[k] * zp[k];
    row_loss[i] = static_cast<double>(l) - static_cast<double>(dot * inv_t);
  }
  double total = 0;
  for (int64_t i = 0; i < m; ++i) total += row_loss[i];
  *loss = total / static_cast<double>(m);
  if (!std::isfinite(*loss)) return Status::NonFiniteResult;
  return Status::Ok;
}

template <typename Acc>
Status backward_impl(const MatrixView& z1, const MatrixView& z2, const Acc* lse, double temperature,
                     bool normalize, double grad_loss, void* dz1, void* dz2, int num_threads) {
  num_threads = std::max(1, num_threads);
  const int64_t n = z1.rows, d = z1.cols, m = 2 * n;
  std::vector<Acc> z, norms;
  Status st = load_stacked_rows<Acc>(z1, z2, normalize, z, norms, num_threads);
  if (st != Status::Ok) return st;

  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  const Acc coeff = static_cast<Acc>(grad_loss / (temperature * static_cast<double>(m)));
  const int64_t tile = detail::choose_tile_rows(m, d);
  std::vector<Acc> dz(static_cast<size_t>(m * d), Acc(0));

  detail::for_each_symmetric_tile<Acc>(
      m, tile, tile * tile, num_threads,
      [&](Acc* w, int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
        const Acc* zr = z.data() + r0 * d;
        const Acc* zc = z.data() + c0 * d;
        detail::gemm<Acc>(false, true, rows, cols, d, inv_t, zr, d, zc, d, Acc(0), w, cols);
        softmax_weights<Acc>(w, rows, cols, lse + r0, lse + c0);
        if (r0 == c0)
          for (int64_t i = 0; i < rows; ++i) w[i * cols + i] = 0;  // no self-pairs
        detail::gemm<Acc>(false, false, rows, d, cols, coeff, w, cols, zc, d, Acc(1),
                          dz.data() + r0 * d, d);
        // A diagonal tile's W is symmetric and already holds both directions.
        if (r0 != c0)
          detail::gemm<Acc>(true, false, cols, d, rows, coeff, w, cols, zr, d, Acc(1),
                            dz.data() + c0 * d, d);
      });

  // Positive pairs, then back through x / max(|x|, eps), written in the inputs' dtype.
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    const int64_t pos = i < n ? i + n : i - n;
    Acc* g = dz.data() + i * d;
    const Acc* zi = z.data() + i * d;
    const Acc* zp = z.data() + pos * d;
    for (int64_t k = 0; k < d; ++k) g[k] -= 2 * coeff * zp[k];
    if (normalize) {
      const Acc norm = norms[i];
      if (norm > static_cast<Acc>(kNormEps)) {
        Acc proj = 0;
        for (int64_t k = 0; k < d; ++k) proj += zi[k] * g[k];
        for (int64_t k = 0; k < d; ++k) g[k] = (g[k] - zi[k] * proj) / norm;
      } else {
        for (int64_t k = 0; k < d; ++k) g[k] /= static_cast<Acc>(kNormEps);
      }
    }
    void* out = i < n ? dz1 : dz2;
    const int64_t r = i < n ? i : i - n;
    const DType dtype = i < n ? z1.dtype : z2.dtype;
    for (int64_t k = 0; k < d; ++k) detail::store_element<Acc>(out, dtype, r * d + k, g[k]);
  }
  return Status::Ok;
}

bool valid_pair(const MatrixView& z1, const MatrixView& z2, double temperature) {
  return z1.rows >= 1 && z1.cols >= 1 && z1.rows == z2.rows && z1.cols == z2.cols &&
         z1.dtype == z2.dtype && std::isfinite(temperature) && temperature > 0;
}

}  // namespace

Status nt_xent_forward(const MatrixView& z1, const MatrixView& z2, double temperature,
                       bool normalize, void* lse, double* loss, int num_threads) {
  if (!valid_pair(z1, z2, temperature)) return Status::BadArgument;
  if (z1.dtype == DType::Float64)
    return forward_impl<double>(z1, z2, temperature, normalize, static_cast<double*>(lse), loss,
                                num_threads);
  return forward_impl<float>(z1, z2, temperature, normalize, static_cast<float*>(lse), loss,
                             num_threads);
}

Status nt_xent_backward(const MatrixView& z1, const MatrixView& z2, const void* lse,
                        double temperature, bool normalize, double grad_loss, void* dz1,
                        void* dz2, int num_threads) {
  if (!valid_pair(z1, z2, temperature) || !std::isfinite(grad_loss)) return Status::BadArgument;
  if (z1.dtype == DType::Float64)
    return backward_impl<double>(z1, z2, static_cast<const double*>(lse), temperature, normalize,
                                 grad_loss, dz1, dz2, num_threads);
  return backward_impl<float>(z1, z2, static_cast<const float*>(lse), temperature, normalize,
                              grad_loss, dz1, dz2, num_threads);
}

}  // namespace sslkernels
