// KoLeo: fused nearest-neighbour search over similarity tiles (OpenBLAS), and the loss on
// the pairs found. See include/sslkernels/koleo.hpp for the contract.
#include "sslkernels/koleo.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "tile_utils.hpp"

namespace sslkernels {
namespace {

using detail::load_element;
using detail::store_element;

constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();
constexpr int64_t kMinSymmetricGroup = 2048;

// The strict order of candidates: larger similarity first, then the smaller index. Under a
// strict total order the top-k set is unique, so the result does not depend on the order in
// which tiles are visited (any schedule, any thread count).
template <typename T>
inline bool better(T v, int64_t j, T w, int64_t m) {
  return v > w || (v == w && j < m);
}

// Running top-k of every query: k (value, index) slots per row, best first.
template <typename T>
struct RunningTopK {
  std::vector<T> values;
  std::vector<int64_t> index;
  int64_t k;

  RunningTopK(int64_t rows, int64_t k_)
      : values(static_cast<size_t>(rows * k_), -std::numeric_limits<T>::infinity()),
        index(static_cast<size_t>(rows * k_), kNoIndex),
        k(k_) {}

  T threshold(int64_t row) const { return values[row * k + k - 1]; }

  void offer(int64_t row, T v, int64_t j) {
    T* rv = values.data() + row * k;
    int64_t* ri = index.data() + row * k;
    if (!better(v, j, rv[k - 1], ri[k - 1])) return;
    int64_t p = k - 1;
    while (p > 0 && better(v, j, rv[p - 1], ri[p - 1])) {
      rv[p] = rv[p - 1];
      ri[p] = ri[p - 1];
      --p;
    }
    rv[p] = v;
    ri[p] = j;
  }
};

// x / max(||x||, eps) of every row, in T (float for float32 / half inputs, double for
// float64). False when a row holds NaN or Inf.
template <typename T>
bool normalise_rows(const MatrixView& x, double eps, std::vector<T>& out, int num_threads) {
  const int64_t m = x.rows, d = x.cols;
  out.resize(static_cast<size_t>(m * d));
  int bad = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad)
  for (int64_t i = 0; i < m; ++i) {
    double sum = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      const double v = load_element<double>(x.data, x.dtype, i * x.row_stride + c * x.col_stride);
      sum += v * v;
    }
    if (!std::isfinite(sum)) {
      bad = 1;
      continue;
    }
    const double scale = 1.0 / std::max(std::sqrt(sum), eps);
    for (int64_t c = 0; c < d; ++c)
      out[i * d + c] = static_cast<T>(
          load_element<double>(x.data, x.dtype, i * x.row_stride + c * x.col_stride) * scale);
  }
  return bad == 0;
}

template <typename T>
SSLK_MULTIVERSION T row_max(const T* s, int64_t n) {
  T best = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < n; ++c) best = s[c] > best ? s[c] : best;
  return best;
}

// Offers row r of a tile (values s[0..cols), candidates c0..) to query `row`; `skip` is the
// column of the query itself (or -1).
template <typename T>
void offer_row(RunningTopK<T>& top, int64_t row, const T* s, int64_t c0, int64_t cols, int64_t skip) {
  if (row_max(s, cols) < top.threshold(row)) return;  // the common case once the list fills
  for (int64_t c = 0; c < cols; ++c) {
    if (c == skip || s[c] < top.threshold(row)) continue;
    top.offer(row, s[c], c0 + c);
  }
}

// The column side of an off-diagonal symmetric tile: column c's candidates are the tile's
// rows r0.. . col_max is scratch of `cols` values.
template <typename T>
SSLK_MULTIVERSION void column_max(const T* s, int64_t rows, int64_t cols, T* col_max) {
  for (int64_t c = 0; c < cols; ++c) col_max[c] = s[c];
  for (int64_t r = 1; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) col_max[c] = s[r * cols + c] > col_max[c] ? s[r * cols + c] : col_max[c];
}

template <typename T>
void offer_columns(RunningTopK<T>& top, const T* s, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                   T* col_max) {
  column_max(s, rows, cols, col_max);
  for (int64_t c = 0; c < cols; ++c) {
    if (col_max[c] < top.threshold(c0 + c)) continue;
    for (int64_t r = 0; r < rows; ++r) {
      const T v = s[r * cols + c];
      if (v >= top.threshold(c0 + c)) top.offer(c0 + c, v, r0 + r);
    }
  }
}

template <typename T>
Status search(const KoleoSearch& p, int64_t* indices, int num_threads) {
  const int64_t m = p.x.rows, d = p.x.cols, g = p.group_size, k = p.topk;
  std::vector<T> xn;
  if (!normalise_rows<T>(p.x, p.eps, xn, num_threads)) return Status::NonFiniteFirstInput;
  const int64_t tile = detail::choose_tile_rows(g, d);
  const int64_t blocks = (g + tile - 1) / tile;
  const int64_t groups = m / g;
  const T* base = xn.data();
  // Symmetric tiles (each multiplied once, barriers between rounds) pay from big groups on;
  // the choice depends on the sizes only, never on the thread count.
  const bool symmetric = p.query_offset == 0 && p.query_count == m && g >= kMinSymmetricGroup;
  RunningTopK<T> top(p.query_count, k);

  if (symmetric) {
    const auto rounds = detail::tile_pair_rounds(blocks);
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<T> scratch(static_cast<size_t>(tile * tile + tile));
      T* s = scratch.data();
      T* col_max = s + tile * tile;
      // Diagonal tiles: rows only, the query itself left out.
#pragma omp for schedule(static)
      for (int64_t job = 0; job < groups * blocks; ++job) {
        const int64_t r0 = (job / blocks) * g + (job % blocks) * tile;
        const int64_t rows = std::min(tile, g - (job % blocks) * tile);
        detail::gemm<T>(false, true, rows, rows, d, T(1), base + r0 * d, d, base + r0 * d, d, T(0), s, rows);
        for (int64_t r = 0; r < rows; ++r) {
          s[r * rows + r] = -std::numeric_limits<T>::infinity();
          offer_row(top, r0 + r, s + r * rows, r0, rows, r);
        }
      }
      // Off-diagonal pairs, round by round: the pairs of a round (in every group) touch
      // disjoint row blocks, so each tile updates both of its blocks without races.
      for (const auto& round : rounds) {
        const int64_t pairs = static_cast<int64_t>(round.size());
#pragma omp for schedule(static)
        for (int64_t job = 0; job < groups * pairs; ++job) {
          const auto& pair = round[job % pairs];
          const int64_t g0 = (job / pairs) * g;
          const int64_t r0 = g0 + pair.first * tile, c0 = g0 + pair.second * tile;
          const int64_t rows = std::min(tile, g0 + g - r0), cols = std::min(tile, g0 + g - c0);
          detail::gemm<T>(false, true, rows, cols, d, T(1), base + r0 * d, d, base + c0 * d, d, T(0), s, cols);
          for (int64_t r = 0; r < rows; ++r) offer_row(top, r0 + r, s + r * cols, c0, cols, -1);
          offer_columns(top, s, r0, rows, c0, cols, col_max);
        }
      }
    }
  } else {
    // Each thread owns whole query blocks and sweeps every candidate block of the block's
    // group: no barrier (a busy machine punishes barriers; a small group has few tiles to
    // share), twice the products of the symmetric sweep. Also the route of one rank's
    // slice of a gathered batch.
    struct Job { int64_t r0, rows, g0; };
    std::vector<Job> jobs;
    const int64_t q_end = p.query_offset + p.query_count;
    for (int64_t g0 = (p.query_offset / g) * g; g0 < q_end; g0 += g)
      for (int64_t r0 = std::max(g0, p.query_offset); r0 < std::min(g0 + g, q_end); r0 += tile)
        jobs.push_back({r0, std::min({tile, g0 + g - r0, q_end - r0}), g0});
    const int64_t num_jobs = static_cast<int64_t>(jobs.size());
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<T> scratch(static_cast<size_t>(tile * tile));
      T* s = scratch.data();
#pragma omp for schedule(static)
      for (int64_t job = 0; job < num_jobs; ++job) {
        const Job& jb = jobs[job];
        for (int64_t cb = 0; cb < blocks; ++cb) {
          const int64_t c0 = jb.g0 + cb * tile, cols = std::min(tile, jb.g0 + g - c0);
          detail::gemm<T>(false, true, jb.rows, cols, d, T(1), base + jb.r0 * d, d, base + c0 * d, d, T(0), s, cols);
          for (int64_t r = 0; r < jb.rows; ++r) {
            const int64_t self = jb.r0 + r - c0;
            offer_row(top, jb.r0 + r - p.query_offset, s + r * cols, c0, cols, (self >= 0 && self < cols) ? self : -1);
          }
        }
      }
    }
  }
  std::copy(top.index.begin(), top.index.end(), indices);
  return Status::Ok;
}

bool valid(const KoleoSearch& p) {
  const int64_t m = p.x.rows;
  if (m < 1 || p.x.cols < 1 || p.topk < 1 || p.group_size < 2 || m % p.group_size != 0) return false;
  if (p.topk >= p.group_size || p.query_offset < 0 || p.query_count < 1 || p.query_offset + p.query_count > m)
    return false;
  const bool whole = p.query_offset == 0 && p.query_count == m;
  const int64_t g0 = (p.query_offset / p.group_size) * p.group_size;
  return whole || p.query_offset + p.query_count <= g0 + p.group_size;
}

// Scale 1 / max(||x_i||, eps) and norm of every row, in float64.
void row_norms(const MatrixView& x, std::vector<double>& norm, int num_threads) {
  norm.resize(static_cast<size_t>(x.rows));
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < x.rows; ++i) {
    double sum = 0.0;
    for (int64_t c = 0; c < x.cols; ++c) {
      const double v = load_element<double>(x.data, x.dtype, i * x.row_stride + c * x.col_stride);
      sum += v * v;
    }
    norm[i] = std::sqrt(sum);
  }
}

// u = q_i - n_j + eps (normalised rows, float64) into u[0..D); returns ||u||.
double pair_difference(const MatrixView& x, const std::vector<double>& norm, double eps, int64_t i,
                       int64_t j, double* u) {
  const double si = 1.0 / std::max(norm[i], eps), sj = 1.0 / std::max(norm[j], eps);
  double sum = 0.0;
  for (int64_t c = 0; c < x.cols; ++c) {
    const double a = load_element<double>(x.data, x.dtype, i * x.row_stride + c * x.col_stride) * si;
    const double b = load_element<double>(x.data, x.dtype, j * x.row_stride + c * x.col_stride) * sj;
    u[c] = a - b + eps;
    sum += u[c] * u[c];
  }
  return std::sqrt(sum);
}

bool indices_in_range(const KoleoSearch& p, const int64_t* indices) {
  for (int64_t t = 0; t < p.query_count * p.topk; ++t)
    if (indices[t] < 0 || indices[t] >= p.x.rows) return false;
  return true;
}

}  // namespace

Status koleo_neighbors(const KoleoSearch& p, int64_t* indices, int num_threads) {
  if (!valid(p)) return Status::BadArgument;
  if (p.x.dtype == DType::Float64) return search<double>(p, indices, num_threads);
  return search<float>(p, indices, num_threads);
}

Status koleo_loss_forward(const KoleoSearch& p, const int64_t* indices, double* loss, int num_threads) {
  if (!valid(p) || !indices_in_range(p, indices)) return Status::BadArgument;
  std::vector<double> norm;
  row_norms(p.x, norm, num_threads);
  std::vector<double> terms(static_cast<size_t>(p.query_count));
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<double> u(static_cast<size_t>(p.x.cols));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.query_count; ++i) {
      double sum = 0.0;
      for (int64_t t = 0; t < p.topk; ++t) {
        const double dist = pair_difference(p.x, norm, p.eps, p.query_offset + i, indices[i * p.topk + t], u.data());
        sum += std::log(dist + p.eps);
      }
      terms[i] = sum;
    }
  }
  double total = 0.0;
  for (double t : terms) total += t;  // fixed order: thread-count independent
  *loss = -total / static_cast<double>(p.query_count * p.topk);
  return std::isfinite(*loss) ? Status::Ok : Status::NonFiniteFirstInput;
}

Status koleo_loss_backward(const KoleoSearch& p, const int64_t* indices, double grad_loss, void* dx,
                           int num_threads) {
  if (!valid(p) || !indices_in_range(p, indices)) return Status::BadArgument;
  const int64_t m = p.x.rows, d = p.x.cols, k = p.topk, pairs = p.query_count * k;
  std::vector<double> norm;
  row_norms(p.x, norm, num_threads);
  // Pairs naming each row as neighbour, in query order (a counting sort: stable).
  std::vector<int64_t> start(static_cast<size_t>(m + 1), 0), incoming(static_cast<size_t>(pairs));
  for (int64_t t = 0; t < pairs; ++t) ++start[indices[t] + 1];
  for (int64_t j = 0; j < m; ++j) start[j + 1] += start[j];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < pairs; ++t) incoming[fill[indices[t]]++] = t;
  }
  // d loss / d dist = -1 / (pairs * (dist + eps)); d dist / d u = u / dist (0 at dist = 0,
  // as torch's norm backward).
  const double coef = -grad_loss / static_cast<double>(pairs);
  const auto weight = [&](double dist) { return dist > 0.0 ? coef / ((dist + p.eps) * dist) : 0.0; };
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<double> u(static_cast<size_t>(d)), gn(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < m; ++j) {
      std::fill(gn.begin(), gn.end(), 0.0);
      const int64_t local = j - p.query_offset;
      if (local >= 0 && local < p.query_count) {
        for (int64_t t = 0; t < k; ++t) {
          const double w = weight(pair_difference(p.x, norm, p.eps, j, indices[local * k + t], u.data()));
          for (int64_t c = 0; c < d; ++c) gn[c] += w * u[c];
        }
      }
      for (int64_t e = start[j]; e < start[j + 1]; ++e) {
        const int64_t i = p.query_offset + incoming[e] / k;
        const double w = weight(pair_difference(p.x, norm, p.eps, i, j, u.data()));
        for (int64_t c = 0; c < d; ++c) gn[c] -= w * u[c];
      }
      // Through x / max(||x||, eps): (g - xn (xn . g)) / ||x|| above eps, g / eps below.
      const double nj = norm[j];
      int64_t out = j * d;
      if (nj >= p.eps) {
        double dot = 0.0;
        for (int64_t c = 0; c < d; ++c)
          dot += gn[c] * load_element<double>(p.x.data, p.x.dtype, j * p.x.row_stride + c * p.x.col_stride) / nj;
        for (int64_t c = 0; c < d; ++c) {
          const double xc = load_element<double>(p.x.data, p.x.dtype, j * p.x.row_stride + c * p.x.col_stride) / nj;
          store_element<double>(dx, p.x.dtype, out + c, (gn[c] - xc * dot) / nj);
        }
      } else {
        for (int64_t c = 0; c < d; ++c) store_element<double>(dx, p.x.dtype, out + c, gn[c] / p.eps);
      }
    }
  }
  return Status::Ok;
}

}  // namespace sslkernels
