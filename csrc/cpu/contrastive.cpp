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
#include <memory>
#include <type_traits>
#include <vector>

#include "tile_utils.hpp"

namespace sslkernels {
namespace {

using detail::exp_vec;
using detail::lse_of;
using detail::SplitLse;

constexpr double kNormEps = 1e-12;  // F.normalize's eps

// The rows of one or more [n_k, D] matrices stacked into one contiguous
// accumulator-typed matrix, each row L2-normalised when asked; `norms` keeps |x_i|
// for the normalisation backward.
template <typename Acc>
struct StackedRows {
  std::vector<Acc> z, norms;
  int64_t m = 0, d = 0;
  const Acc* row(int64_t i) const { return z.data() + i * d; }
};

// Which part (and row within it) stacked row i comes from.
inline std::pair<int, int64_t> locate(const MatrixView* parts, int num_parts, int64_t i) {
  int k = 0;
  while (k + 1 < num_parts && i >= parts[k].rows) i -= parts[k++].rows;
  return {k, i};
}

// A NaN/Inf in part 0 reports NonFiniteFirstInput, in part 1 NonFiniteSecondInput.
template <typename Acc>
Status load_rows(const MatrixView* parts, int num_parts, bool normalize, StackedRows<Acc>& out,
                 int num_threads) {
  out.d = parts[0].cols;
  out.m = 0;
  for (int k = 0; k < num_parts; ++k) out.m += parts[k].rows;
  const int64_t m = out.m, d = out.d;
  out.z.assign(static_cast<size_t>(m * d), Acc(0));
  out.norms.assign(static_cast<size_t>(m), Acc(1));
  int bad_first = 0, bad_second = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad_first, bad_second)
  for (int64_t i = 0; i < m; ++i) {
    const auto [part, r] = locate(parts, num_parts, i);
    const MatrixView& src = parts[part];
    Acc* dst = out.z.data() + i * d;
    // The squared norm in float64 and each element divided by the norm (F.normalize's
    // x / max(|x|, eps)), not multiplied by a rounded 1 / |x|: that reciprocal's rounding
    // scales the whole row by one error, which every logit of a peaked softmax (t = 0.07)
    // carries into p_ii and hence into its small, cancelling gradient 1 - p_ii.
    double sq = 0;
    bool finite = true;
    for (int64_t k = 0; k < d; ++k) {
      const Acc v = detail::load_element<Acc>(src.data, src.dtype, r * src.row_stride + k * src.col_stride);
      finite = finite && std::isfinite(v);
      dst[k] = v;
      sq += static_cast<double>(v) * static_cast<double>(v);
    }
    if (!finite) {
      if (part == 0) bad_first = 1; else bad_second = 1;
      continue;
    }
    const double norm = std::sqrt(sq);
    out.norms[i] = static_cast<Acc>(norm);
    if (normalize) {
      const double denom = std::max(norm, kNormEps);
      for (int64_t k = 0; k < d; ++k) dst[k] = static_cast<Acc>(static_cast<double>(dst[k]) / denom);
    }
  }
  if (bad_first) return Status::NonFiniteFirstInput;
  if (bad_second) return Status::NonFiniteSecondInput;
  return Status::Ok;
}

// Online log-sum-exp state of one row: running max and sum of exp(s - max).
template <typename Acc>
struct RowStats {
  std::vector<Acc> max;
  std::vector<double> sum;  // float64: see fold_tile
  explicit RowStats(int64_t m)
      : max(static_cast<size_t>(m), -std::numeric_limits<Acc>::infinity()),
        sum(static_cast<size_t>(m), 0.0) {}
};

// max(init, s[0..n)). Written as a compare-select: GCC vectorises this reduction
// well, while `std::max` under `omp simd reduction(max)` ran 18x slower (AVX-512).
template <typename Acc>
SSLK_MULTIVERSION Acc max_of(const Acc* s, int64_t n, Acc init) {
  Acc mx = init;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

// Fold a tile S [rows x cols] into the stats of its rows (row view) and, when
// `columns_too`, of its columns (column view, the transposed tile). The sums of
// exp(s - max) are float64 (each term still the accumulator's exp): a peaked softmax's
// sum is 1 + a small rest, which a float sum rounds at 1's ulp, 6e-8, into every p of
// the row, and the gradient, 1 - p_ii, is small enough for that to show (2-3x eager's
// error at t = 0.07); the rescaling factor exp(old max - new max) likewise.
template <typename Acc>
SSLK_MULTIVERSION void fold_tile(const Acc* s, int64_t rows, int64_t cols, Acc* row_max, double* row_sum,
                                 Acc* col_max, double* col_sum, bool columns_too, Acc* col_scratch) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  // Pass 1: tile maxima, rows and columns at once.
  Acc* tile_col_max = col_scratch;
  if (columns_too)
    for (int64_t j = 0; j < cols; ++j) tile_col_max[j] = col_max[j];
  for (int64_t i = 0; i < rows; ++i) {
    const Acc* si = s + i * cols;
    const Acc mx = max_of(si, cols, neg_inf);
    if (columns_too)
      for (int64_t j = 0; j < cols; ++j) tile_col_max[j] = si[j] > tile_col_max[j] ? si[j] : tile_col_max[j];
    // Row update; a row whose candidates are all masked so far keeps -inf.
    const Acc new_max = std::max(row_max[i], mx);
    if (new_max == neg_inf) continue;
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < cols; ++j) acc += static_cast<double>(exp_vec(si[j] - new_max));
    row_sum[i] = row_sum[i] * std::exp(static_cast<double>(row_max[i]) - static_cast<double>(new_max)) + acc;
    row_max[i] = new_max;
  }
  if (!columns_too) return;
  // Pass 2: column sums against the new column maxima.
  std::vector<double> col_acc(static_cast<size_t>(cols), 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const Acc* si = s + i * cols;
    for (int64_t j = 0; j < cols; ++j) col_acc[j] += static_cast<double>(exp_vec(si[j] - tile_col_max[j]));
  }
  for (int64_t j = 0; j < cols; ++j) {
    if (tile_col_max[j] == neg_inf) continue;
    col_sum[j] = col_sum[j] * std::exp(static_cast<double>(col_max[j]) - static_cast<double>(tile_col_max[j])) +
                 col_acc[j];
    col_max[j] = tile_col_max[j];
  }
}

// W_ij = w_i exp(S_ij - lse_i) + w_j exp(S_ij - lse_j) in place: the weight of pair
// (i, j) in the gradient of sum_i w_i lse_i + sum_j w_j lse_j. Without column
// statistics (lse_cols null) only the row term: W_ij = w_i exp(S_ij - lse_i). Each lse
// comes as its two parts hi + lo (SplitLse), subtracted in turn.
template <typename Acc>
SSLK_MULTIVERSION void softmax_weights(Acc* s, int64_t rows, int64_t cols, const Acc* hi_rows,
                                       const Acc* lo_rows, const Acc* hi_cols, const Acc* lo_cols,
                                       const Acc* w_rows, const Acc* w_cols) {
  for (int64_t i = 0; i < rows; ++i) {
    Acc* si = s + i * cols;
    const Acc hi = hi_rows[i], lo = lo_rows[i], wi = w_rows[i];
    if (hi_cols != nullptr) {
      for (int64_t j = 0; j < cols; ++j)
        si[j] = wi * exp_vec((si[j] - hi) - lo) + w_cols[j] * exp_vec((si[j] - hi_cols[j]) - lo_cols[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) si[j] = wi * exp_vec((si[j] - hi) - lo);
    }
  }
}

// A diagonal tile's S_ij and S_ji are two GEMM elements that may round differently
// (OpenBLAS's edge kernels): both passes take the upper triangle for both, so that
// the backward recomputes exactly the logits the forward's lse came from (one ulp of a
// logit of 1e4 is 8e-3 relative in exp(s - lse)). Only the diagonal tiles pay this.
template <typename Acc>
void mirror_upper_triangle(Acc* s, int64_t rows, int64_t ld) {
  for (int64_t i = 1; i < rows; ++i)
    for (int64_t j = 0; j < i; ++j) s[i * ld + j] = s[j * ld + i];
}

// w p - 1 for p = exp(s - lse), the positive's weight minus its one-hot target, as
// w expm1(s - lse) + (w - 1): a peaked softmax has p within a few ulps of 1, where
// exp(...) - 1 (or p_row + p_col - 2, rounded at 2) keeps only the rounding of p and
// loses the small 1 - p that the whole gradient is (eager pays p's rounding once).
template <typename Acc>
Acc positive_weight(Acc s, Acc hi, Acc lo, Acc w) {
  return w * std::expm1((s - hi) - lo) + (w - Acc(1));
}

inline int64_t nt_xent_positive(int64_t i, int64_t n) { return i < n ? i + n : i - n; }

// lse_i = log sum_{j != i} exp(z_i . z_j / t) for every stacked row: each symmetric
// tile is multiplied once and folded into its rows (row view) and its columns. With
// `partner_logit`, it also keeps s_{i, i +- half} (NT-Xent's positive) as that tile holds it,
// so that the loss subtracts the very logit its lse was taken over.
template <typename Acc>
void symmetric_row_lse(const StackedRows<Acc>& rows, Acc inv_t, double* lse, int num_threads,
                       Acc* partner_logit = nullptr, int64_t half = 0) {
  const int64_t m = rows.m, d = rows.d;
  const int64_t tile = detail::choose_tile_rows(m, d);
  RowStats<Acc> stats(m);
  Acc* row_max = stats.max.data();
  double* row_sum = stats.sum.data();
  const Acc* z = rows.z.data();
  // Scratch per thread: one logit tile plus a column vector for fold_tile.
  detail::for_each_symmetric_tile<Acc>(
      m, tile, tile * tile + tile, num_threads,
      [&](Acc* scratch, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
        Acc* s = scratch;
        detail::gemm<Acc>(false, true, nr, nc, d, inv_t, z + r0 * d, d, z + c0 * d, d, Acc(0), s, nc);
        const bool diagonal = r0 == c0;
        if (diagonal) {  // self-similarity masked; symmetric, so the row view suffices
          mirror_upper_triangle(s, nr, nc);
          for (int64_t i = 0; i < nr; ++i) s[i * nc + i] = -std::numeric_limits<Acc>::infinity();
        }
        // The pair (i, i + half) lies in exactly one tile of the upper triangle: row i's view.
        for (int64_t i = 0; partner_logit != nullptr && i < nr; ++i) {
          const int64_t j = nt_xent_positive(r0 + i, half);
          if (j > r0 + i && j >= c0 && j < c0 + nc) partner_logit[r0 + i] = partner_logit[j] = s[i * nc + (j - c0)];
        }
        fold_tile<Acc>(s, nr, nc, row_max + r0, row_sum + r0, row_max + c0, row_sum + c0,
                       !diagonal, scratch + tile * tile);
      });
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < m; ++i) lse[i] = lse_of(row_max[i], row_sum[i]);
}

// dz += coeff * W Z with W from softmax_weights (zero diagonal): the gradient of
// coeff * t * sum_i w_i lse_i with respect to the (normalised) rows. With `partner`
// (NT-Xent: row i's positive), W_{i,partner(i)} -= 2 as well, the positive logit's
// share of both rows' losses: the difference p_ij + p_ji - 2 is taken per element,
// where it is exact, instead of subtracting 2 z_pos from the accumulated W Z (which
// cancels to the small gradient of a peaked softmax and keeps W Z's rounding).
template <typename Acc>
void accumulate_lse_gradient(const StackedRows<Acc>& rows, const double* lse, const Acc* weight,
                             Acc inv_t, Acc coeff, Acc* dz, int num_threads,
                             int64_t (*partner)(int64_t, int64_t) = nullptr, int64_t half = 0) {
  const int64_t m = rows.m, d = rows.d;
  const SplitLse<Acc> split(lse, m);
  const Acc* hi = split.hi.data();
  const Acc* lo = split.lo.data();
  const int64_t tile = detail::choose_tile_rows(m, d);
  const Acc* z = rows.z.data();
  detail::for_each_symmetric_tile<Acc>(
      m, tile, tile * tile, num_threads,
      [&](Acc* w, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
        const Acc* zr = z + r0 * d;
        const Acc* zc = z + c0 * d;
        detail::gemm<Acc>(false, true, nr, nc, d, inv_t, zr, d, zc, d, Acc(0), w, nc);
        if (r0 == c0) mirror_upper_triangle(w, nr, nc);
        // The positives' logits, before softmax_weights overwrites them.
        std::vector<std::pair<int64_t, Acc>> positives;
        if (partner != nullptr)
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t j = partner(r0 + i, half);
            if (j >= c0 && j < c0 + nc) positives.emplace_back(i * nc + (j - c0), w[i * nc + (j - c0)]);
          }
        softmax_weights<Acc>(w, nr, nc, hi + r0, lo + r0, hi + c0, lo + c0, weight + r0, weight + c0);
        if (r0 == c0)
          for (int64_t i = 0; i < nr; ++i) w[i * nc + i] = 0;  // no self-pairs
        for (const auto& [at, s_pos] : positives) {  // (w_i p_ij - 1) + (w_j p_ji - 1)
          const int64_t i = at / nc, j = at % nc;
          w[at] = positive_weight(s_pos, hi[r0 + i], lo[r0 + i], weight[r0 + i]) +
                  positive_weight(s_pos, hi[c0 + j], lo[c0 + j], weight[c0 + j]);
        }
        detail::gemm<Acc>(false, false, nr, d, nc, coeff, w, nc, zc, d, Acc(1), dz + r0 * d, d);
        // A diagonal tile's W is symmetric and already holds both directions.
        if (r0 != c0)
          detail::gemm<Acc>(true, false, nc, d, nr, coeff, w, nc, zr, d, Acc(1), dz + c0 * d, d);
      });
}

// Back through x / max(|x|, eps) (when normalising) and out in the inputs' dtype:
// stacked row i goes to row r of outs[part] (contiguous [n_part, D]).
template <typename Acc>
void store_input_gradient(const StackedRows<Acc>& rows, bool normalize, Acc* dz,
                          const MatrixView* parts, void* const* outs, int num_parts,
                          int num_threads) {
  const int64_t m = rows.m, d = rows.d;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    Acc* g = dz + i * d;
    const Acc* zi = rows.row(i);
    if (normalize) {
      const Acc norm = rows.norms[i];
      if (norm > static_cast<Acc>(kNormEps)) {
        Acc proj = 0;
        for (int64_t k = 0; k < d; ++k) proj += zi[k] * g[k];
        for (int64_t k = 0; k < d; ++k) g[k] = (g[k] - zi[k] * proj) / norm;
      } else {
        for (int64_t k = 0; k < d; ++k) g[k] /= static_cast<Acc>(kNormEps);
      }
    }
    const auto [part, r] = locate(parts, num_parts, i);
    for (int64_t k = 0; k < d; ++k) detail::store_element<Acc>(outs[part], parts[part].dtype, r * d + k, g[k]);
  }
}

template <typename Acc>
Acc dot(const Acc* a, const Acc* b, int64_t d) {
  Acc acc = 0;
  for (int64_t k = 0; k < d; ++k) acc += a[k] * b[k];
  return acc;
}

// Sums of per-row terms are taken serially so they do not depend on the thread count.
inline double serial_sum(const std::vector<double>& terms) {
  double total = 0;
  for (double t : terms) total += t;
  return total;
}

inline double mean_or_zero(const std::vector<double>& terms, int64_t count) {
  return count > 0 ? serial_sum(terms) / static_cast<double>(count) : 0.0;
}

// ------------------------------------------------------------------------- NT-Xent
// Rows i and i +- N of cat(z1, z2) are each other's positive; every row is an anchor.

template <typename Acc>
Status nt_xent_forward_impl(const MatrixView (&parts)[2], double temperature, bool normalize,
                            double* lse, double* loss, int num_threads) {
  StackedRows<Acc> rows;
  const Status st = load_rows<Acc>(parts, 2, normalize, rows, num_threads);
  if (st != Status::Ok) return st;
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  const int64_t m = rows.m, n = parts[0].rows;
  std::vector<Acc> positive(static_cast<size_t>(m));
  symmetric_row_lse<Acc>(rows, inv_t, lse, num_threads, positive.data(), n);
  std::vector<double> row_loss(static_cast<size_t>(m));
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < m; ++i) row_loss[i] = lse[i] - static_cast<double>(positive[i]);
  *loss = mean_or_zero(row_loss, m);
  return std::isfinite(*loss) ? Status::Ok : Status::NonFiniteResult;
}

template <typename Acc>
Status nt_xent_backward_impl(const MatrixView (&parts)[2], const double* lse, double temperature,
                             bool normalize, double grad_loss, void* const (&outs)[2],
                             int num_threads) {
  StackedRows<Acc> rows;
  const Status st = load_rows<Acc>(parts, 2, normalize, rows, num_threads);
  if (st != Status::Ok) return st;
  const int64_t m = rows.m, d = rows.d, n = parts[0].rows;
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  const Acc coeff = static_cast<Acc>(grad_loss / (temperature * static_cast<double>(m)));
  const std::vector<Acc> weight(static_cast<size_t>(m), Acc(1));
  std::vector<Acc> dz(static_cast<size_t>(m * d), Acc(0));
  // The positive logit s_{i,pos(i)} appears in the losses of rows i and pos(i): - 2 in W.
  accumulate_lse_gradient<Acc>(rows, lse, weight.data(), inv_t, coeff, dz.data(), num_threads,
                               nt_xent_positive, n);
  store_input_gradient<Acc>(rows, normalize, dz.data(), parts, outs, 2, num_threads);
  return Status::Ok;
}

// ------------------------------------------------------------------------- SupCon
// Anchor i (a row whose class has other members) has positives P(i) = its class
// minus itself; sum_{p in P(i)} z_i . z_p = z_i . (C_y - z_i) with C_y the class sum,
// so the positives cost O(N D) and never touch a tile.

template <typename Acc>
struct ClassSums {
  std::vector<Acc> sum;  // [num_classes, D]
  std::vector<Acc> anchor_weight;  // 1 for rows with positives, else 0
  int64_t anchors = 0;
};

template <typename Acc>
ClassSums<Acc> class_sums(const StackedRows<Acc>& rows, const int64_t* class_ids,
                          const int64_t* class_counts, int64_t num_classes) {
  ClassSums<Acc> out;
  out.sum.assign(static_cast<size_t>(num_classes * rows.d), Acc(0));
  out.anchor_weight.assign(static_cast<size_t>(rows.m), Acc(0));
  for (int64_t i = 0; i < rows.m; ++i) {  // serial: a fixed summation order
    Acc* c = out.sum.data() + class_ids[i] * rows.d;
    const Acc* zi = rows.row(i);
    for (int64_t k = 0; k < rows.d; ++k) c[k] += zi[k];
    if (class_counts[class_ids[i]] > 1) {
      out.anchor_weight[i] = 1;
      ++out.anchors;
    }
  }
  return out;
}

bool valid_classes(int64_t m, const int64_t* class_ids, const int64_t* class_counts,
                   int64_t num_classes) {
  if (num_classes < 1) return false;
  std::vector<int64_t> seen(static_cast<size_t>(num_classes), 0);
  for (int64_t i = 0; i < m; ++i) {
    if (class_ids[i] < 0 || class_ids[i] >= num_classes) return false;
    ++seen[class_ids[i]];
  }
  for (int64_t c = 0; c < num_classes; ++c)
    if (seen[c] != class_counts[c]) return false;
  return true;
}

template <typename Acc>
Status sup_con_forward_impl(const MatrixView& features, const int64_t* class_ids,
                            const int64_t* class_counts, int64_t num_classes, double temperature,
                            bool normalize, double* lse, double* loss, int num_threads) {
  StackedRows<Acc> rows;
  const Status st = load_rows<Acc>(&features, 1, normalize, rows, num_threads);
  if (st != Status::Ok) return st;
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  symmetric_row_lse<Acc>(rows, inv_t, lse, num_threads);
  const ClassSums<Acc> classes = class_sums(rows, class_ids, class_counts, num_classes);
  const int64_t m = rows.m, d = rows.d;
  std::vector<double> row_loss(static_cast<size_t>(m), 0.0);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    if (classes.anchor_weight[i] == 0) continue;
    const Acc* zi = rows.row(i);
    const Acc* c = classes.sum.data() + class_ids[i] * d;
    Acc pos = 0;
    for (int64_t k = 0; k < d; ++k) pos += zi[k] * (c[k] - zi[k]);
    const Acc mean_positive = pos * inv_t / static_cast<Acc>(class_counts[class_ids[i]] - 1);
    row_loss[i] = lse[i] - static_cast<double>(mean_positive);
  }
  *loss = mean_or_zero(row_loss, classes.anchors);
  return std::isfinite(*loss) ? Status::Ok : Status::NonFiniteResult;
}

template <typename Acc>
Status sup_con_backward_impl(const MatrixView& features, const int64_t* class_ids,
                             const int64_t* class_counts, int64_t num_classes, const double* lse,
                             double temperature, bool normalize, double grad_loss, void* dfeatures,
                             int num_threads) {
  StackedRows<Acc> rows;
  const Status st = load_rows<Acc>(&features, 1, normalize, rows, num_threads);
  if (st != Status::Ok) return st;
  const ClassSums<Acc> classes = class_sums(rows, class_ids, class_counts, num_classes);
  const int64_t m = rows.m, d = rows.d;
  std::vector<Acc> dz(static_cast<size_t>(m * d), Acc(0));
  if (classes.anchors > 0) {  // no anchor: the loss is the constant 0
    const Acc inv_t = static_cast<Acc>(1.0 / temperature);
    const Acc coeff = static_cast<Acc>(
        grad_loss / (temperature * static_cast<double>(classes.anchors)));
    accumulate_lse_gradient<Acc>(rows, lse, classes.anchor_weight.data(), inv_t, coeff, dz.data(),
                                 num_threads);
    // Each positive pair (i, p) of a class of size n_c enters the losses of i and p
    // with weight 1 / (n_c - 1).
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      if (classes.anchor_weight[i] == 0) continue;
      const Acc* zi = rows.row(i);
      const Acc* c = classes.sum.data() + class_ids[i] * d;
      const Acc scale = 2 * coeff / static_cast<Acc>(class_counts[class_ids[i]] - 1);
      Acc* g = dz.data() + i * d;
      for (int64_t k = 0; k < d; ++k) g[k] -= scale * (c[k] - zi[k]);
    }
  }
  void* const outs[1] = {dfeatures};
  store_input_gradient<Acc>(rows, normalize, dz.data(), &features, outs, 1, num_threads);
  return Status::Ok;
}

// ------------------------------------------------------------------------- InfoNCE
// Queries against keys (positives on the diagonal) and an optional shared queue.
// The (query x key) tiles are walked in Latin-square rounds: one product per tile
// serves the query direction (row view) and, for CLIP, the key direction (column
// view). Queue tiles only have the row view (the queue is never an anchor).

template <typename Acc>
struct InfoNceRows {
  StackedRows<Acc> query, key, negatives;
};

Status as_argument(Status st, Status first_means) {
  return st == Status::NonFiniteFirstInput ? first_means : st;
}

template <typename Acc>
Status load_info_nce(const MatrixView& query, const MatrixView& key, const MatrixView& negatives,
                     bool normalize, InfoNceRows<Acc>& rows, int num_threads) {
  Status st = load_rows<Acc>(&query, 1, normalize, rows.query, num_threads);
  if (st != Status::Ok) return st;
  st = load_rows<Acc>(&key, 1, normalize, rows.key, num_threads);
  if (st != Status::Ok) return as_argument(st, Status::NonFiniteSecondInput);
  if (negatives.rows > 0) {
    st = load_rows<Acc>(&negatives, 1, normalize, rows.negatives, num_threads);
    if (st != Status::Ok) return as_argument(st, Status::NonFiniteThirdInput);
  }
  return Status::Ok;
}

// s_ii = q_i . k_i / t for every query. With a shared queue (`like_queue_tiles`) they come
// out of the same BLAS product as the queue tiles (same row block of queries, same
// alpha), not a plain dot: a queue row equal to the key then gives the very same logit
// and the two tie exactly (lightly's bank of the previous keys gives log 2 there, where
// a few ulps of 1 / t would show). Per-query negatives are plain dots, and so are the
// positives beside them. Forward and backward both take the logits from here.
template <typename Acc>
std::vector<Acc> own_key_logits(const InfoNceRows<Acc>& rows, Acc inv_t, int64_t tile, bool like_queue_tiles,
                                int num_threads) {
  const int64_t n = rows.query.m, d = rows.query.d;
  std::vector<Acc> logits(static_cast<size_t>(n));
  if (!like_queue_tiles) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) logits[i] = dot(rows.query.row(i), rows.key.row(i), d) * inv_t;
    return logits;
  }
  const Acc* q = rows.query.z.data();
  const Acc* kz = rows.key.z.data();
  const int64_t row_blocks = (n + tile - 1) / tile;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> block(static_cast<size_t>(tile * tile));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < row_blocks; ++b) {
      const int64_t r0 = b * tile, nr = std::min(tile, n - r0);
      detail::gemm<Acc>(false, true, nr, nr, d, inv_t, q + r0 * d, d, kz + r0 * d, d, Acc(0), block.data(), nr);
      for (int64_t i = 0; i < nr; ++i) logits[r0 + i] = block[i * nr + i];
    }
  }
  return logits;
}

// The body of TileTerms::apply, branch-free per element so that it vectorises (a tile pass
// costs about 1/D of its product): bias[j] added, then -inf where candidate j has row i's
// anchor id, row i's own key (j = i, column i - c0) restored when it is the positive.
template <typename Acc>
SSLK_MULTIVERSION void apply_tile_terms(Acc* s, int64_t ld, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                                        const Acc* bias, const int64_t* anchor_ids, const int64_t* candidate_ids,
                                        bool positive_on_diagonal) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (int64_t i = 0; i < nr; ++i) {
    Acc* si = s + i * ld;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) si[j] += bias[j];
    }
    if (candidate_ids == nullptr) continue;
    const int64_t anchor = anchor_ids[r0 + i], own = r0 + i - c0;
    const bool keep_own = positive_on_diagonal && own >= 0 && own < nc;
    const Acc own_logit = keep_own ? si[own] : Acc(0);
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) si[j] = candidate_ids[j] == anchor ? neg_inf : si[j];
    if (keep_own) si[own] = own_logit;
  }
}

// CandidateTerms in the accumulator's type, applied to each logit tile right after its
// product: bias[j] added to query i's logit of candidate j, -inf where the pair's ids
// match (a duplicate of the positive). -inf entries are what fold_tile, softmax_weights
// and online_exp_row already skip: exp(-inf) = 0, in the lse and in every gradient.
template <typename Acc>
struct TileTerms {
  std::vector<Acc> bias;  // empty: no bias
  const int64_t* anchor_ids;
  const int64_t* candidate_ids;
  bool positive_on_diagonal;

  TileTerms(const CandidateTerms& t, int64_t candidates)
      : anchor_ids(t.anchor_ids), candidate_ids(t.candidate_ids), positive_on_diagonal(t.positive_on_diagonal) {
    if (t.bias != nullptr) bias.assign(t.bias, t.bias + candidates);
  }
  Acc bias_of(int64_t j) const { return bias.empty() ? Acc(0) : bias[static_cast<size_t>(j)]; }
  bool masked(int64_t i, int64_t j) const {
    return anchor_ids != nullptr && anchor_ids[i] == candidate_ids[j] && !(positive_on_diagonal && i == j);
  }
  // s [nr x nc], row stride ld: queries r0.. against candidates c0.. (keys from 0, the queue from N).
  void apply(Acc* s, int64_t ld, int64_t r0, int64_t nr, int64_t c0, int64_t nc) const {
    apply_tile_terms(s, ld, r0, nr, c0, nc, bias.empty() ? nullptr : bias.data() + c0, anchor_ids,
                     candidate_ids != nullptr ? candidate_ids + c0 : nullptr, positive_on_diagonal);
  }
  // Query i's own-key logit s_ii (raw) with its terms.
  Acc own(int64_t i, Acc s_ii) const {
    return masked(i, i) ? -std::numeric_limits<Acc>::infinity() : s_ii + bias_of(i);
  }
};

template <typename Acc>
Status info_nce_forward_impl(const MatrixView& query, const MatrixView& key,
                             const MatrixView& negatives, int64_t per_query, double temperature,
                             bool normalize,
                             bool symmetric, bool in_batch_negatives, double* lse_query,
                             double* lse_key, double* loss, int num_threads, const CandidateTerms& candidate_terms) {
  InfoNceRows<Acc> rows;
  const Status st = load_info_nce<Acc>(query, key, negatives, normalize, rows, num_threads);
  if (st != Status::Ok) return st;
  const int64_t n = query.rows, d = query.cols, k = negatives.rows;
  const TileTerms<Acc> terms(candidate_terms, n + k);
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  const int64_t tile = detail::choose_tile_rows(n, d);
  RowStats<Acc> q_stats(n), k_stats(n);
  const Acc* q = rows.query.z.data();
  const Acc* kz = rows.key.z.data();
  // The positives s_ii: from the in-batch tiles (the very logits the lse was taken
  // over, bias included), else own_key_logits (raw, the bias added below).
  std::vector<Acc> own_logit(static_cast<size_t>(n));
  if (in_batch_negatives) {
    detail::for_each_bipartite_tile<Acc>(
        n, n, tile, tile * tile + tile, num_threads, /*columns_shared=*/symmetric,
        [&](Acc* scratch, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
          detail::gemm<Acc>(false, true, nr, nc, d, inv_t, q + r0 * d, d, kz + c0 * d, d, Acc(0),
                            scratch, nc);
          // Biased for both views: the key direction's lse_j comes out shifted by bias_j.
          terms.apply(scratch, nc, r0, nr, c0, nc);
          for (int64_t i = std::max(r0, c0); i < std::min(r0 + nr, c0 + nc); ++i)
            own_logit[i] = scratch[(i - r0) * nc + (i - c0)];
          fold_tile<Acc>(scratch, nr, nc, q_stats.max.data() + r0, q_stats.sum.data() + r0,
                         k_stats.max.data() + c0, k_stats.sum.data() + c0, symmetric,
                         scratch + tile * tile);
        });
  } else {  // only the own key: the statistics start from the positive logit
    own_logit = own_key_logits<Acc>(rows, inv_t, tile, per_query == 0, num_threads);
    for (int64_t i = 0; i < n; ++i) {
      q_stats.max[i] = terms.own(i, own_logit[i]);
      q_stats.sum[i] = q_stats.max[i] == -std::numeric_limits<Acc>::infinity() ? 0 : 1;
    }
  }
  if (k > 0 && per_query > 0) {  // hard negatives: rows [i M, (i + 1) M) belong to query i
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<Acc> logits(static_cast<size_t>(per_query));
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < per_query; ++j)
          logits[j] = dot(rows.query.row(i), rows.negatives.row(i * per_query + j), d) * inv_t;
        fold_tile<Acc>(logits.data(), 1, per_query, q_stats.max.data() + i, q_stats.sum.data() + i,
                       nullptr, nullptr, false, nullptr);
      }
    }
  } else if (k > 0) {
    const Acc* nz = rows.negatives.z.data();
    detail::for_each_bipartite_tile<Acc>(
        n, k, tile, tile * tile + tile, num_threads, /*columns_shared=*/false,
        [&](Acc* scratch, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
          detail::gemm<Acc>(false, true, nr, nc, d, inv_t, q + r0 * d, d, nz + c0 * d, d, Acc(0),
                            scratch, nc);
          terms.apply(scratch, nc, r0, nr, n + c0, nc);
          fold_tile<Acc>(scratch, nr, nc, q_stats.max.data() + r0, q_stats.sum.data() + r0,
                         nullptr, nullptr, false, scratch + tile * tile);
        });
  }
  std::vector<double> row_loss(static_cast<size_t>(n));
  // A row whose every candidate is masked (a ring's remote block of duplicates, with
  // positive_on_diagonal false) has lse = -inf and a loss term of -inf: its value, not an
  // overflow. Only a non-finite term of a row that has candidates is refused.
  int overflow = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : overflow)
  for (int64_t i = 0; i < n; ++i) {
    Acc target = in_batch_negatives ? own_logit[i] : own_logit[i] + terms.bias_of(i);
    if (target == -std::numeric_limits<Acc>::infinity())  // masked (a ring's remote block): the target stays
      target = dot(rows.query.row(i), rows.key.row(i), d) * inv_t + terms.bias_of(i);
    const double positive = static_cast<double>(target);
    lse_query[i] = lse_of(q_stats.max[i], q_stats.sum[i]);
    // (max - positive) + log(sum) rather than lse - positive: the shifted terms keep
    // their accuracy when the loss is small (a tie with the positive gives log 2 exactly).
    double term = (static_cast<double>(q_stats.max[i]) - positive) + std::log(static_cast<double>(q_stats.sum[i]));
    if (symmetric) {  // the column statistics and the positive both carry bias_i: it cancels
      const double shifted = lse_of(k_stats.max[i], k_stats.sum[i]);
      lse_key[i] = shifted - static_cast<double>(terms.bias_of(i));
      term = 0.5 * (term + shifted - positive);
    }
    const bool no_candidates = q_stats.sum[i] == 0 || (symmetric && k_stats.sum[i] == 0);
    overflow |= !no_candidates && !std::isfinite(term);
    row_loss[i] = term;
  }
  *loss = mean_or_zero(row_loss, n);
  return overflow == 0 ? Status::Ok : Status::NonFiniteResult;
}

template <typename Acc>
Status info_nce_backward_impl(const MatrixView& query, const MatrixView& key,
                              const MatrixView& negatives, int64_t per_query, const double* lse_query,
                              const double* lse_key, double temperature, bool normalize,
                              bool symmetric, bool in_batch_negatives, double grad_loss,
                              void* dquery, void* dkey, void* dnegatives, double* dtemperature,
                              int num_threads, const CandidateTerms& candidate_terms) {
  InfoNceRows<Acc> rows;
  const Status st = load_info_nce<Acc>(query, key, negatives, normalize, rows, num_threads);
  if (st != Status::Ok) return st;
  const int64_t n = query.rows, d = query.cols, k = negatives.rows;
  const TileTerms<Acc> terms(candidate_terms, n + k);
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  // Each direction is a mean over N anchors; CLIP averages the two directions.
  const double directions = symmetric ? 2.0 : 1.0;
  const Acc coeff = static_cast<Acc>(grad_loss / (temperature * static_cast<double>(n) * directions));
  const int64_t tile = detail::choose_tile_rows(n, d);
  const std::vector<Acc> ones(static_cast<size_t>(std::max(n, int64_t(1))), Acc(1));
  std::vector<Acc> dq(static_cast<size_t>(n * d), Acc(0)), dk(static_cast<size_t>(n * d), Acc(0));
  std::vector<Acc> dn(dnegatives != nullptr ? static_cast<size_t>(k * d) : 0, Acc(0));
  const Acc* q = rows.query.z.data();
  const Acc* kz = rows.key.z.data();
  std::vector<Acc> own_logit;  // without in-batch keys: the positives as the forward took them
  // The tiles hold biased logits, so the key direction's columns take lse_j + bias_j.
  std::vector<double> key_lse(symmetric ? static_cast<size_t>(n) : 0);
  for (int64_t j = 0; j < static_cast<int64_t>(key_lse.size()); ++j)
    key_lse[j] = lse_key[j] + static_cast<double>(terms.bias_of(j));
  const SplitLse<Acc> q_lse(lse_query, n), k_lse(key_lse.data(), symmetric ? n : 0);
  const Acc* q_hi = q_lse.hi.data();
  const Acc* q_lo = q_lse.lo.data();
  if (in_batch_negatives) {
    detail::for_each_bipartite_tile<Acc>(
        n, n, tile, tile * tile, num_threads, /*columns_shared=*/true,
        [&](Acc* w, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
          detail::gemm<Acc>(false, true, nr, nc, d, inv_t, q + r0 * d, d, kz + c0 * d, d, Acc(0), w, nc);
          terms.apply(w, nc, r0, nr, c0, nc);
          const int64_t diag_begin = std::max(r0, c0), diag_end = std::min(r0 + nr, c0 + nc);
          std::vector<Acc> s_pos(static_cast<size_t>(std::max(diag_end - diag_begin, int64_t(0))));
          for (int64_t i = diag_begin; i < diag_end; ++i) s_pos[i - diag_begin] = w[(i - r0) * nc + (i - c0)];
          softmax_weights<Acc>(w, nr, nc, q_hi + r0, q_lo + r0, symmetric ? k_lse.hi.data() + c0 : nullptr,
                               symmetric ? k_lse.lo.data() + c0 : nullptr, ones.data(), ones.data());
          // The positive s_ii, p_ii - 1 once per direction, per element (positive_weight)
          // rather than from the accumulated gradient, where it cancels.
          for (int64_t i = diag_begin; i < diag_end; ++i) {
            const Acc s_ii = s_pos[i - diag_begin];
            Acc w_ii = positive_weight(s_ii, q_hi[i], q_lo[i], Acc(1));
            if (symmetric) w_ii += positive_weight(s_ii, k_lse.hi[i], k_lse.lo[i], Acc(1));
            w[(i - r0) * nc + (i - c0)] = w_ii;
          }
          detail::gemm<Acc>(false, false, nr, d, nc, coeff, w, nc, kz + c0 * d, d, Acc(1),
                            dq.data() + r0 * d, d);
          detail::gemm<Acc>(true, false, nc, d, nr, coeff, w, nc, q + r0 * d, d, Acc(1),
                            dk.data() + c0 * d, d);
        });
  } else {  // only the own key among the candidates: p_ii for query i and key i
    own_logit = own_key_logits<Acc>(rows, inv_t, tile, per_query == 0, num_threads);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const Acc s_ii = terms.own(i, own_logit[i]);
      const Acc w = positive_weight(s_ii, q_hi[i], q_lo[i], Acc(1));  // p - 1 (one direction)
      for (int64_t c = 0; c < d; ++c) {
        dq[i * d + c] += coeff * w * kz[i * d + c];
        dk[i * d + c] += coeff * w * q[i * d + c];
      }
    }
  }
  if (k > 0 && per_query > 0) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const Acc* qi = rows.query.row(i);
      for (int64_t j = 0; j < per_query; ++j) {
        const int64_t r = i * per_query + j;
        const Acc* nr = rows.negatives.row(r);
        const Acc logit = dot(qi, nr, d) * inv_t;
        const Acc p = exp_vec((logit - q_hi[i]) - q_lo[i]);
        for (int64_t c = 0; c < d; ++c) dq[i * d + c] += coeff * p * nr[c];
        if (!dn.empty())
          for (int64_t c = 0; c < d; ++c) dn[r * d + c] = coeff * p * qi[c];
      }
    }
  } else if (k > 0) {
    const Acc* nz = rows.negatives.z.data();
    detail::for_each_bipartite_tile<Acc>(
        n, k, tile, tile * tile, num_threads, /*columns_shared=*/!dn.empty(),
        [&](Acc* w, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
          detail::gemm<Acc>(false, true, nr, nc, d, inv_t, q + r0 * d, d, nz + c0 * d, d, Acc(0), w, nc);
          terms.apply(w, nc, r0, nr, n + c0, nc);
          softmax_weights<Acc>(w, nr, nc, q_hi + r0, q_lo + r0, nullptr, nullptr, ones.data(), nullptr);
          detail::gemm<Acc>(false, false, nr, d, nc, coeff, w, nc, nz + c0 * d, d, Acc(1),
                            dq.data() + r0 * d, d);
          if (!dn.empty())
            detail::gemm<Acc>(true, false, nc, d, nr, coeff, w, nc, q + r0 * d, d, Acc(1),
                              dn.data() + c0 * d, d);
        });
  }
  // Every logit (both directions, the queue, hard negatives) is one query's row times a
  // candidate over t, plus a constant: scaling the (unit) queries and t together leaves
  // the loss unchanged, so d loss / d t = -(1/t) sum_i q_i . d loss / d q_i, with each
  // weight's p - 1 already taken per element in dq, and the bias left out by itself.
  std::vector<double> temperature_terms(static_cast<size_t>(n));
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    temperature_terms[i] = static_cast<double>(dot(rows.query.row(i), dq.data() + i * d, d));
  if (dtemperature != nullptr) *dtemperature = -serial_sum(temperature_terms) / temperature;
  void* const q_out[1] = {dquery};
  void* const k_out[1] = {dkey};
  store_input_gradient<Acc>(rows.query, normalize, dq.data(), &query, q_out, 1, num_threads);
  store_input_gradient<Acc>(rows.key, normalize, dk.data(), &key, k_out, 1, num_threads);
  if (!dn.empty()) {
    void* const n_out[1] = {dnegatives};
    store_input_gradient<Acc>(rows.negatives, normalize, dn.data(), &negatives, n_out, 1, num_threads);
  }
  return Status::Ok;
}

// ---------------------------------------------- InfoNCE, loss and gradients in one sweep
// The one-direction loss with in-batch keys and an optional shared queue, for
// grad_loss = 1 (autograd scales the result). The backward above recomputes every
// logit tile; here each tile is multiplied once. A strip of up to `kStripRows` queries
// walks all candidate tiles: the epilogue keeps an online max / sum-exp per row and
// the query gradient accumulates flash-attention style (rescaled when a row's max
// grows), so the queue tiles are used once and dropped. The key gradient needs each
// row's final lse, so the strip's key probabilities are kept (strip rows x N, and the
// queue's too when it wants a gradient; at most kStripBytes through fewer rows for a
// big N, down to 16 rows, i.e. past kStripBytes only when N + K > 2^18) until the
// strip is done. A small N gets strips of 32 rows or more, at least 16 strips when N
// allows, so that several threads share the work. Strips run in waves of one strip per thread (so at most
// threads x kStripBytes kept); after each wave the column gradients of its strips are
// added per column block in strip order, so every sum has the same order whatever
// the thread count (bitwise-reproducible results). GEMM work: the logits, the query
// gradient and the key (and queue) gradient once each; with a queue of 2N that is 7
// products of N x N x D size, as eager autograd does, against 10 for the forward
// plus the recomputing backward.

constexpr int64_t kStripRows = 256;
constexpr int64_t kColumnTile = 512;
constexpr int64_t kStripBytes = int64_t(16) << 20;  // kept probabilities of one strip

// One candidate matrix (the keys, or the queue) and where its columns of the kept
// probabilities start (-1 when it needs no column gradient).
template <typename Acc>
struct CandidateSegment {
  const Acc* rows;
  int64_t count;
  int64_t first_candidate;  // its first column among the candidates (keys 0, the queue N)
  int64_t kept_offset;
  Acc* column_grad;
};

// Row stride of a buffer of `width` columns, 16 elements (a float32 cache line) past a
// multiple of 256: power-of-two strides put every row of a tile in the same cache sets.
inline int64_t padded_stride(int64_t width) { return (width + 255) / 256 * 256 + 16; }

template <typename Acc>
bool all_finite(const std::vector<Acc>& x, int num_threads) {
  int bad = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad)
  for (int64_t i = 0; i < static_cast<int64_t>(x.size()); ++i) bad |= !std::isfinite(x[i]);
  return bad == 0;
}

template <typename Acc>
struct ColumnJob {
  Acc* grad;            // first row of the column gradient this tile feeds
  int64_t kept_column;  // its first column in the kept probabilities
  int64_t width;
};

// One row of a fresh logit tile into the row's online state: the max grows to cover
// the tile (rescaling the sum and the accumulated gradient row), and the logits
// become exp(s - max) in place. Returns that max. `others` is the same sum without the
// row's positive, column `positive` of this tile (-1: not in this tile), whose exp is left
// out of the tile (0) so that the gradient row accumulates the negatives only: the
// positive's weight p - 1 = -others / sum is formed at the end without cancelling.
template <typename Acc>
SSLK_MULTIVERSION Acc online_exp_row(Acc* s, int64_t cols, Acc& max, Acc& sum, Acc& others, int64_t positive,
                                     Acc* grad_row, int64_t d) {
  const Acc mx = max_of(s, cols, max);
  if (mx == -std::numeric_limits<Acc>::infinity()) {  // every logit so far -inf: nothing to add
    for (int64_t j = 0; j < cols; ++j) s[j] = 0;
    return mx;
  }
  if (mx > max) {
    if (sum > 0) {  // earlier tiles were taken against a smaller max
      const Acc f = exp_vec(max - mx);
      sum *= f;
      others *= f;
      for (int64_t c = 0; c < d; ++c) grad_row[c] *= f;
    }
    max = mx;
  }
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) s[j] = exp_vec(s[j] - mx);
  Acc own = 0;
  if (positive >= 0) {
    own = s[positive];
    s[positive] = 0;
  }
  Acc acc_others = 0;
#pragma omp simd reduction(+ : acc_others)
  for (int64_t j = 0; j < cols; ++j) acc_others += s[j];
  sum += acc_others + own;
  others += acc_others;
  return mx;
}

template <typename Acc>
Status info_nce_loss_and_grads_impl(const MatrixView& query, const MatrixView& key,
                                    const MatrixView& negatives, double temperature, bool normalize,
                                    double* loss, void* dquery, void* dkey, void* dnegatives,
                                    double* dtemperature, int num_threads, const CandidateTerms& candidate_terms) {
  InfoNceRows<Acc> rows;
  const Status st = load_info_nce<Acc>(query, key, negatives, normalize, rows, num_threads);
  if (st != Status::Ok) return st;
  const int64_t n = query.rows, d = query.cols, k = negatives.rows;
  const TileTerms<Acc> terms(candidate_terms, n + k);
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
  const Acc coeff = static_cast<Acc>(1.0 / (temperature * static_cast<double>(n)));
  const bool queue_grad = dnegatives != nullptr && k > 0;
  std::vector<Acc> dq(static_cast<size_t>(n * d), Acc(0)), dk(static_cast<size_t>(n * d), Acc(0));
  std::vector<Acc> dn(queue_grad ? static_cast<size_t>(k * d) : 0, Acc(0));
  std::vector<CandidateSegment<Acc>> segments{{rows.key.z.data(), n, 0, 0, dk.data()}};
  if (k > 0)
    segments.push_back({rows.negatives.z.data(), k, n, queue_grad ? n : -1, queue_grad ? dn.data() : nullptr});
  const int64_t kept_width = n + (queue_grad ? k : 0);
  const int64_t kept_ld = padded_stride(kept_width);
  // Rows per strip from the sizes only (never the thread count: results stay bitwise
  // equal for any thread count): kStripRows, fewer (a multiple of 16) when the kept
  // probabilities of that many rows would pass kStripBytes.
  const int64_t fitting = kStripBytes / (kept_ld * static_cast<int64_t>(sizeof(Acc))) / 16 * 16;
  const int64_t sixteenth = std::max<int64_t>(32, (n + 255) / 256 * 16);  // ceil(n / 16), rounded up to 16
  const int64_t strip_rows = std::min({kStripRows, std::max<int64_t>(16, fitting), sixteenth, n});
  const int64_t strips = (n + strip_rows - 1) / strip_rows;
  const int64_t wave = std::min(static_cast<int64_t>(num_threads), strips);
  // Every kept entry is written before it is read: no zero fill (up to 16 MiB a thread).
  const std::unique_ptr<Acc[]> kept(new Acc[static_cast<size_t>(wave * strip_rows * kept_ld)]);
  std::vector<Acc> scaled_queries(static_cast<size_t>(wave * strip_rows * d));
  std::vector<double> lse(static_cast<size_t>(n));
  std::vector<Acc> expect(static_cast<size_t>(n));
  // Each query's own logit as its tile holds it (bias included): the loss lse - s_ii then
  // subtracts the very logit the lse was taken over (a lone candidate gives exactly 0).
  std::vector<Acc> positive_logit(static_cast<size_t>(n));
  const Acc* q = rows.query.z.data();
  // One job per kept column tile: its rows of the column gradient.
  std::vector<ColumnJob<Acc>> column_jobs;
  for (const auto& seg : segments)
    for (int64_t c0 = 0; seg.kept_offset >= 0 && c0 < seg.count; c0 += kColumnTile)
      column_jobs.push_back({seg.column_grad + c0 * d, seg.kept_offset + c0, std::min(kColumnTile, seg.count - c0)});
  const int64_t kept_tiles = static_cast<int64_t>(column_jobs.size());

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> dropped(k > 0 && !queue_grad ? static_cast<size_t>(strip_rows * padded_stride(std::min(kColumnTile, k))) : 0);  // a queue tile
    std::vector<Acc> row_max(static_cast<size_t>(strip_rows)), row_sum(static_cast<size_t>(strip_rows));
    std::vector<Acc> row_others(static_cast<size_t>(strip_rows));  // row_sum without the positive
    // The max each kept tile's exps were taken against, per row (fixed up at the end).
    std::vector<Acc> tile_shift(static_cast<size_t>(strip_rows * kept_tiles));
    for (int64_t w0 = 0; w0 < strips; w0 += wave) {
#pragma omp for schedule(static)
      for (int64_t s = w0; s < std::min(strips, w0 + wave); ++s) {
        const int64_t r0 = s * strip_rows, nr = std::min(strip_rows, n - r0);
        Acc* p = kept.get() + (s - w0) * strip_rows * kept_ld;
        Acc* gq = dq.data() + r0 * d;
        std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<Acc>::infinity());
        std::fill(row_sum.begin(), row_sum.end(), Acc(0));
        std::fill(row_others.begin(), row_others.end(), Acc(0));
        int64_t kept_index = 0;  // kept tiles come in column_jobs' order
        for (const auto& seg : segments) {
          for (int64_t c0 = 0; c0 < seg.count; c0 += kColumnTile) {
            const int64_t nc = std::min(kColumnTile, seg.count - c0);
            const bool keep = seg.kept_offset >= 0;
            Acc* t = keep ? p + seg.kept_offset + c0 : dropped.data();
            const int64_t ldt = keep ? kept_ld : padded_stride(nc);
            const Acc* cand = seg.rows + c0 * d;
            detail::gemm<Acc>(false, true, nr, nc, d, inv_t, q + r0 * d, d, cand, d, Acc(0), t, ldt);
            terms.apply(t, ldt, r0, nr, seg.first_candidate + c0, nc);
            for (int64_t i = 0; i < nr; ++i) {
              Acc* ti = t + i * ldt;
              // query r0 + i's positive is key r0 + i
              const int64_t own = seg.kept_offset == 0 && r0 + i >= c0 && r0 + i < c0 + nc ? r0 + i - c0 : -1;
              if (own >= 0) positive_logit[r0 + i] = ti[own];
              const Acc shift = online_exp_row(ti, nc, row_max[i], row_sum[i], row_others[i], own, gq + i * d, d);
              if (keep) tile_shift[i * kept_tiles + kept_index] = shift;
            }
            if (keep) ++kept_index;
            // Query gradient, still against this strip's running maxima.
            detail::gemm<Acc>(false, false, nr, d, nc, Acc(1), t, ldt, cand, d, Acc(1), gq, d);
          }
        }
        Acc* sq = scaled_queries.data() + (s - w0) * strip_rows * d;
        for (int64_t i = 0; i < nr; ++i) {
          // Kept tiles exponentiated before the row's max settled get rescaled.
          for (int64_t tix = 0; tix < kept_tiles; ++tix) {
            const Acc shift = tile_shift[i * kept_tiles + tix];
            if (shift == row_max[i]) continue;
            const Acc f = exp_vec(shift - row_max[i]);
            Acc* ti = p + i * kept_ld + column_jobs[tix].kept_column;
            for (int64_t j = 0; j < column_jobs[tix].width; ++j) ti[j] *= f;
          }
          // The positive's weight p_ii - 1 = -others / sum, formed without cancelling: into
          // the kept probabilities (key gradient) and the gradient row (query gradient).
          p[i * kept_ld + r0 + i] = -row_others[i];
          const Acc* ki = rows.key.row(r0 + i);
          for (int64_t col = 0; col < d; ++col) gq[i * d + col] -= row_others[i] * ki[col];
          // sum_j (p_ij - [j = i]) s_ij = q_i . (the gradient row) / t: E_i[s] - s_ii,
          // the temperature gradient's term, from the accumulated gradient row.
          expect[r0 + i] = dot(q + (r0 + i) * d, gq + i * d, d) * inv_t / row_sum[i];
          const Acc c = coeff / row_sum[i];
          for (int64_t col = 0; col < d; ++col) {
            gq[i * d + col] *= c;
            sq[i * d + col] = c * q[(r0 + i) * d + col];
          }
          lse[r0 + i] = lse_of(row_max[i], row_sum[i]);
        }
      }
      // Column gradients of this wave, per column block, strips in order.
#pragma omp for schedule(static)
      for (int64_t b = 0; b < static_cast<int64_t>(column_jobs.size()); ++b) {
        const ColumnJob<Acc>& job = column_jobs[b];
        for (int64_t s = w0; s < std::min(strips, w0 + wave); ++s) {
          const int64_t nr = std::min(strip_rows, n - s * strip_rows);
          const Acc* p = kept.get() + (s - w0) * strip_rows * kept_ld + job.kept_column;
          const Acc* sq = scaled_queries.data() + (s - w0) * strip_rows * d;
          detail::gemm<Acc>(true, false, job.width, d, nr, Acc(1), p, kept_ld, sq, d, Acc(1),
                            job.grad, d);
        }
      }
    }
  }
  // Positive terms, loss and the temperature gradient, serially summed.
  std::vector<double> row_loss(static_cast<size_t>(n)), temperature_terms(static_cast<size_t>(n));
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    row_loss[i] = lse[i] - static_cast<double>(positive_logit[i]);
    temperature_terms[i] = static_cast<double>(expect[i]);  // the positive is in it already
  }
  *loss = mean_or_zero(row_loss, n);
  if (!std::isfinite(*loss)) return Status::NonFiniteResult;
  const double temperature_grad = -static_cast<double>(coeff) * serial_sum(temperature_terms);
  // The query gradient sums unnormalised exps times candidates: with huge unnormalised
  // inputs it can overflow where the loss does not; say so instead of returning NaN.
  if (!std::isfinite(temperature_grad) || !all_finite(dq, num_threads) || !all_finite(dk, num_threads) ||
      !all_finite(dn, num_threads))
    return Status::NonFiniteResult;
  if (dtemperature != nullptr) *dtemperature = temperature_grad;
  // Gradients leave in the accumulator's dtype: autograd scales them by the upstream
  // gradient later (a loss scale of 2^16 under fp16 AMP), so they must not be rounded
  // to a half type, where the small ones would underflow, before that.
  const auto wide = [](MatrixView v) {
    v.dtype = std::is_same_v<Acc, double> ? DType::Float64 : DType::Float32;
    return v;
  };
  const MatrixView q_view = wide(query), k_view = wide(key), n_view = wide(negatives);
  void* const q_out[1] = {dquery};
  void* const k_out[1] = {dkey};
  store_input_gradient<Acc>(rows.query, normalize, dq.data(), &q_view, q_out, 1, num_threads);
  store_input_gradient<Acc>(rows.key, normalize, dk.data(), &k_view, k_out, 1, num_threads);
  if (queue_grad) {
    void* const n_out[1] = {dnegatives};
    store_input_gradient<Acc>(rows.negatives, normalize, dn.data(), &n_view, n_out, 1, num_threads);
  }
  return Status::Ok;
}

bool valid_matrix(const MatrixView& z) { return z.rows >= 1 && z.cols >= 1; }
bool valid_temperature(double t) { return std::isfinite(t) && t > 0; }

bool valid_pair(const MatrixView& z1, const MatrixView& z2, double temperature) {
  return valid_matrix(z1) && z1.rows == z2.rows && z1.cols == z2.cols && z1.dtype == z2.dtype &&
         valid_temperature(temperature);
}

}  // namespace

Status nt_xent_forward(const MatrixView& z1, const MatrixView& z2, double temperature,
                       bool normalize, void* lse, double* loss, int num_threads) {
  if (!valid_pair(z1, z2, temperature)) return Status::BadArgument;
  const MatrixView parts[2] = {z1, z2};
  num_threads = std::max(1, num_threads);
  if (z1.dtype == DType::Float64)
    return nt_xent_forward_impl<double>(parts, temperature, normalize, static_cast<double*>(lse),
                                        loss, num_threads);
  return nt_xent_forward_impl<float>(parts, temperature, normalize, static_cast<double*>(lse), loss,
                                     num_threads);
}

Status nt_xent_backward(const MatrixView& z1, const MatrixView& z2, const void* lse,
                        double temperature, bool normalize, double grad_loss, void* dz1,
                        void* dz2, int num_threads) {
  if (!valid_pair(z1, z2, temperature) || !std::isfinite(grad_loss)) return Status::BadArgument;
  const MatrixView parts[2] = {z1, z2};
  void* const outs[2] = {dz1, dz2};
  num_threads = std::max(1, num_threads);
  if (z1.dtype == DType::Float64)
    return nt_xent_backward_impl<double>(parts, static_cast<const double*>(lse), temperature,
                                         normalize, grad_loss, outs, num_threads);
  return nt_xent_backward_impl<float>(parts, static_cast<const double*>(lse), temperature, normalize,
                                      grad_loss, outs, num_threads);
}

Status sup_con_forward(const MatrixView& features, const int64_t* class_ids,
                       const int64_t* class_counts, int64_t num_classes, double temperature,
                       bool normalize, void* lse, double* loss, int num_threads) {
  if (!valid_matrix(features) || !valid_temperature(temperature) ||
      !valid_classes(features.rows, class_ids, class_counts, num_classes))
    return Status::BadArgument;
  num_threads = std::max(1, num_threads);
  if (features.dtype == DType::Float64)
    return sup_con_forward_impl<double>(features, class_ids, class_counts, num_classes, temperature,
                                        normalize, static_cast<double*>(lse), loss, num_threads);
  return sup_con_forward_impl<float>(features, class_ids, class_counts, num_classes, temperature,
                                     normalize, static_cast<double*>(lse), loss, num_threads);
}

Status sup_con_backward(const MatrixView& features, const int64_t* class_ids,
                        const int64_t* class_counts, int64_t num_classes, const void* lse,
                        double temperature, bool normalize, double grad_loss, void* dfeatures,
                        int num_threads) {
  if (!valid_matrix(features) || !valid_temperature(temperature) || !std::isfinite(grad_loss) ||
      !valid_classes(features.rows, class_ids, class_counts, num_classes))
    return Status::BadArgument;
  num_threads = std::max(1, num_threads);
  if (features.dtype == DType::Float64)
    return sup_con_backward_impl<double>(features, class_ids, class_counts, num_classes,
                                         static_cast<const double*>(lse), temperature, normalize,
                                         grad_loss, dfeatures, num_threads);
  return sup_con_backward_impl<float>(features, class_ids, class_counts, num_classes,
                                      static_cast<const double*>(lse), temperature, normalize,
                                      grad_loss, dfeatures, num_threads);
}

bool valid_info_nce(const MatrixView& query, const MatrixView& key, const MatrixView& negatives,
                    int64_t per_query, double temperature) {
  return valid_pair(query, key, temperature) && per_query >= 0 &&
         (negatives.rows == 0 || (negatives.rows > 0 && negatives.cols == query.cols &&
                                  negatives.dtype == query.dtype)) &&
         (per_query == 0 || negatives.rows == query.rows * per_query);
}

// The terms index the keys and a shared queue: per-query negatives have no shared columns.
bool valid_terms(const CandidateTerms& terms, const MatrixView& query, const MatrixView& negatives,
                 int64_t per_query) {
  const bool any = terms.bias != nullptr || terms.anchor_ids != nullptr || terms.candidate_ids != nullptr;
  if (!any) return true;
  if (per_query > 0 || (terms.anchor_ids == nullptr) != (terms.candidate_ids == nullptr)) return false;
  const int64_t candidates = query.rows + negatives.rows;
  for (int64_t j = 0; terms.bias != nullptr && j < candidates; ++j)
    if (!std::isfinite(terms.bias[j])) return false;
  return true;
}

Status info_nce_forward(const MatrixView& query, const MatrixView& key, const MatrixView& negatives,
                        int64_t per_query, double temperature, bool normalize, bool symmetric,
                        bool in_batch_negatives, void* lse_query, void* lse_key, double* loss,
                        int num_threads, const CandidateTerms& terms) {
  if (!valid_info_nce(query, key, negatives, per_query, temperature) || (symmetric && lse_key == nullptr) ||
      (symmetric && !in_batch_negatives) || !valid_terms(terms, query, negatives, per_query))
    return Status::BadArgument;
  num_threads = std::max(1, num_threads);
  if (query.dtype == DType::Float64)
    return info_nce_forward_impl<double>(query, key, negatives, per_query, temperature, normalize, symmetric,
                                         in_batch_negatives, static_cast<double*>(lse_query), static_cast<double*>(lse_key),
                                         loss, num_threads, terms);
  return info_nce_forward_impl<float>(query, key, negatives, per_query, temperature, normalize, symmetric,
                                      in_batch_negatives, static_cast<double*>(lse_query), static_cast<double*>(lse_key),
                                      loss, num_threads, terms);
}

Status info_nce_backward(const MatrixView& query, const MatrixView& key,
                         const MatrixView& negatives, int64_t per_query, const void* lse_query,
                         const void* lse_key,
                         double temperature, bool normalize, bool symmetric,
                         bool in_batch_negatives, double grad_loss, void* dquery, void* dkey,
                         void* dnegatives, double* dtemperature, int num_threads, const CandidateTerms& terms) {
  if (!valid_info_nce(query, key, negatives, per_query, temperature) || !std::isfinite(grad_loss) ||
      (symmetric && lse_key == nullptr) || (symmetric && !in_batch_negatives) ||
      !valid_terms(terms, query, negatives, per_query))
    return Status::BadArgument;
  if (negatives.rows == 0) dnegatives = nullptr;
  num_threads = std::max(1, num_threads);
  if (query.dtype == DType::Float64)
    return info_nce_backward_impl<double>(query, key, negatives, per_query,
                                          static_cast<const double*>(lse_query),
                                          static_cast<const double*>(lse_key), temperature, normalize,
                                          symmetric, in_batch_negatives, grad_loss, dquery, dkey, dnegatives, dtemperature,
                                          num_threads, terms);
  return info_nce_backward_impl<float>(query, key, negatives, per_query,
                                       static_cast<const double*>(lse_query),
                                       static_cast<const double*>(lse_key), temperature, normalize,
                                       symmetric, in_batch_negatives, grad_loss, dquery, dkey, dnegatives, dtemperature,
                                       num_threads, terms);
}

Status info_nce_loss_and_grads(const MatrixView& query, const MatrixView& key,
                               const MatrixView& negatives, double temperature, bool normalize,
                               double* loss, void* dquery, void* dkey, void* dnegatives,
                               double* dtemperature, int num_threads, const CandidateTerms& terms) {
  if (!valid_info_nce(query, key, negatives, 0, temperature) || !valid_terms(terms, query, negatives, 0))
    return Status::BadArgument;
  if (negatives.rows == 0) dnegatives = nullptr;
  num_threads = std::max(1, num_threads);
  if (query.dtype == DType::Float64)
    return info_nce_loss_and_grads_impl<double>(query, key, negatives, temperature, normalize, loss,
                                                dquery, dkey, dnegatives, dtemperature, num_threads, terms);
  return info_nce_loss_and_grads_impl<float>(query, key, negatives, temperature, normalize, loss,
                                             dquery, dkey, dnegatives, dtemperature, num_threads, terms);
}

}  // namespace sslkernels
