// Batched singular values on the CPU.
//
// Small matrices (the op routes min(m, n) <= 48 in float32, <= 128 in float64
// here; above 48 the float32 Gram route below is faster): one-sided Jacobi (Hestenes).
// Each matrix A (rows >= cols) is orthogonalised column pair by column pair,
//   [a_p, a_q] <- [a_p, a_q] [[c, s], [-s, c]],
// with the rotation that makes a_p . a_q = 0; when a whole cyclic sweep finds every
// pair orthogonal to |a_p . a_q| <= tol |a_p| |a_q| (tol = sqrt(rows) * eps), the
// singular values are the column norms. One-sided Jacobi keeps small singular
// values to high relative accuracy (Demmel & Veselic), unlike the Gram route.
//
// Vectorised across matrices: W matrices (16 in float32, 8 in float64 = one
// AVX-512 register) are interleaved element by element,
//   buf[(j * rows + i) * W + w] = A_w[i, j],
// so every step (three dot products, the rotation parameters, the rotation) is
// the same instruction on W lanes, with no horizontal reductions. Lanes whose
// pair is already orthogonal get the identity rotation (c = 1, s = 0). A group
// stops when a sweep rotates nothing in any lane, or after `max_sweeps` sweeps;
// info = 1 marks a matrix that was still rotating in its last sweep.
// Each matrix is scaled by a power of two to max |a_ij| in [1, 2) first, so the
// dot products neither overflow nor underflow; the norms are scaled back exactly.
//
// Tall matrices: G = A^T A accumulated in float64 (row tiles converted to float64,
// OpenBLAS dsyrk); the op takes the eigenvalues of G (sigma = sqrt(max(lambda, 0))).
// Why float64 keeps the small singular values: the eigenvalues of the computed G
// carry an absolute error of about u * sigma_max^2 (u the unit roundoff of the
// accumulation), so sigma_i is resolved down to sqrt(u) * sigma_max. In float32
// (u = 6e-8) that floor is 2.4e-4 sigma_max, which inflates RankMe of a collapsed
// (low-rank) embedding; in float64 (u = 1.1e-16) it is 1e-8 sigma_max, far below
// the 1e-5 we promise. The float64 products of float32 inputs are exact, so the
// only error is the float64 accumulation.
#include "sslkernels/spectral.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include <cblas.h>
#include <lapacke.h>

#include "tile_utils.hpp"

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
#endif

namespace sslkernels {
namespace {

// Load W matrices (batch indices b0 .. b0 + W - 1; missing ones are zero) into the
// interleaved buffer, each scaled by a power of two. Returns false on NaN/Inf.
template <typename T, int W>
bool load_group(const BatchView& a, int64_t b0, T* buf, T* unscale) {
  const int64_t L = a.rows, K = a.cols;
  bool finite = true;
  for (int w = 0; w < W; ++w) {
    const int64_t b = b0 + w;
    if (b >= a.batch) {
      for (int64_t e = 0; e < L * K; ++e) buf[e * W + w] = T(0);
      unscale[w] = T(1);
      continue;
    }
    const int64_t base = b * a.batch_stride;
    T maxabs = 0;
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t i = 0; i < L; ++i) {
        const T v = detail::load_element<T>(a.data, a.dtype, base + i * a.row_stride + j * a.col_stride);
        finite = finite && std::isfinite(v);
        maxabs = std::max(maxabs, std::fabs(v));
        buf[(j * L + i) * W + w] = v;
      }
    }
    if (!finite) return false;
    T scale = 1;
    unscale[w] = 1;
    if (maxabs > 0) {
      const int e = std::ilogb(maxabs);  // maxabs in [2^e, 2^(e+1))
      scale = std::ldexp(T(1), -e);
      unscale[w] = std::ldexp(T(1), e);
    }
    if (scale != T(1))
      for (int64_t e = 0; e < L * K; ++e) buf[e * W + w] *= scale;
  }
  return true;
}

// Cyclic one-sided Jacobi on W interleaved (L x K) matrices. Returns, per lane,
// whether the lane still rotated in the last sweep run (1 = not converged).
// Squared column norms are recomputed at the start of every sweep and updated
// through each rotation (a_p' = a_p - t g, a_q' = a_q + t g, as LAPACK's sgesvj),
// so a pair costs one dot product and the rotation.
template <typename T, int W>
SSLK_MULTIVERSION void jacobi_group(T* buf, int64_t L, int64_t K, int max_sweeps, int32_t* not_converged,
                                    T* nrm) {
  const T tol = std::sqrt(static_cast<T>(L)) * std::numeric_limits<T>::epsilon();
  int32_t rotated[W];
  T negligible[W];
  for (int w = 0; w < W; ++w) rotated[w] = 1;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    for (int w = 0; w < W; ++w) rotated[w] = 0;
    for (int64_t j = 0; j < K; ++j) {
      const T* P = buf + j * L * W;
      T acc[W];
      for (int w = 0; w < W; ++w) acc[w] = T(0);
      for (int64_t i = 0; i < L; ++i) {
#pragma omp simd
        for (int w = 0; w < W; ++w) acc[w] += P[i * W + w] * P[i * W + w];
      }
      for (int w = 0; w < W; ++w) nrm[j * W + w] = acc[w];
    }
    // Columns with |a_j|^2 <= eps^2 |A|_F^2 are rounding noise (their singular
    // values are below eps |A|_F, inside any accuracy we promise): rotating them
    // against each other never settles, so their pairs count as orthogonal.
    for (int w = 0; w < W; ++w) {
      T fro = 0;
      for (int64_t j = 0; j < K; ++j) fro += nrm[j * W + w];
      negligible[w] = fro * std::numeric_limits<T>::epsilon() * std::numeric_limits<T>::epsilon();
    }
    int any_sweep = 0;
    for (int64_t p = 0; p + 1 < K; ++p) {
      T* P = buf + p * L * W;
      T* np = nrm + p * W;
      for (int64_t q = p + 1; q < K; ++q) {
        T* Q = buf + q * L * W;
        T* nq = nrm + q * W;
        T g0[W], g1[W], cs[W], sn[W];  // cs holds tau = s / (1 + c)
        for (int w = 0; w < W; ++w) g0[w] = g1[w] = T(0);
        int64_t i = 0;
        for (; i + 1 < L; i += 2) {  // two accumulators: half the FMA latency chain
#pragma omp simd
          for (int w = 0; w < W; ++w) {
            g0[w] += P[i * W + w] * Q[i * W + w];
            g1[w] += P[(i + 1) * W + w] * Q[(i + 1) * W + w];
          }
        }
        if (i < L) {
#pragma omp simd
          for (int w = 0; w < W; ++w) g0[w] += P[i * W + w] * Q[i * W + w];
        }
        int any = 0;
#pragma omp simd reduction(| : any)
        for (int w = 0; w < W; ++w) {
          const T g = g0[w] + g1[w];
          const T al = np[w], be = nq[w];
          const bool rot = std::fabs(g) > tol * std::sqrt(std::max(al, T(0))) * std::sqrt(std::max(be, T(0))) &&
                           al > negligible[w] && be > negligible[w];
          const T gs = rot ? g : T(1);
          const T zeta = (be - al) / (T(2) * gs);
          const T az = std::fabs(zeta);
          // t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)), without overflow for large |zeta|.
          const T inv = T(1) / std::max(az, T(1));
          const T t_big = inv / (T(1) + std::sqrt(T(1) + inv * inv));
          const T t_small = T(1) / (az + std::sqrt(T(1) + az * az));
          const T t = rot ? std::copysign(az > T(1) ? t_big : t_small, zeta) : T(0);
          const T c = T(1) / std::sqrt(T(1) + t * t);
          cs[w] = (c * t) / (T(1) + c);  // tau = s / (1 + c)
          sn[w] = c * t;
          np[w] = al - t * gs * (rot ? T(1) : T(0));
          nq[w] = be + t * gs * (rot ? T(1) : T(0));
          rotated[w] |= rot ? 1 : 0;
          any |= rot ? 1 : 0;
        }
        if (!any) continue;
        any_sweep = 1;
        for (int64_t r = 0; r < L; ++r) {
#pragma omp simd
          for (int w = 0; w < W; ++w) {
            const T x = P[r * W + w], y = Q[r * W + w];
            // Rutishauser's form of (c x - s y, s x + c y): near convergence the
            // angle is small and the columns change by a small correction, without
            // the rounding of c ~ 1 scaling them whole every rotation.
            P[r * W + w] = x - sn[w] * (y + cs[w] * x);
            Q[r * W + w] = y + sn[w] * (x - cs[w] * y);
          }
        }
      }
    }
    if (!any_sweep) break;
  }
  for (int w = 0; w < W; ++w) not_converged[w] = rotated[w];
}

// Column norms, scaled back, sorted descending, written for the real matrices of the group.
template <typename T, int W>
void store_group(const BatchView& a, int64_t b0, const T* buf, const T* unscale, const int32_t* nc,
                 T* s, int32_t* info) {
  const int64_t L = a.rows, K = a.cols;
  std::vector<T> sv(static_cast<size_t>(K));
  for (int w = 0; w < W && b0 + w < a.batch; ++w) {
    for (int64_t j = 0; j < K; ++j) {
      T acc = 0;
      for (int64_t i = 0; i < L; ++i) {
        const T x = buf[(j * L + i) * W + w];
        acc += x * x;
      }
      sv[j] = std::sqrt(acc) * unscale[w];
    }
    std::sort(sv.begin(), sv.end(), std::greater<T>());
    std::copy(sv.begin(), sv.end(), s + (b0 + w) * K);
    info[b0 + w] = nc[w];
  }
}

template <typename T, int W>
Status jacobi_impl(const BatchView& a, T* s, int32_t* info, int max_sweeps, int num_threads) {
  const int64_t L = a.rows, K = a.cols;
  const int64_t groups = (a.batch + W - 1) / W;
  int bad = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : bad)
  {
    std::vector<T> buf(static_cast<size_t>(L * K * W)), nrm(static_cast<size_t>(K * W));
    T unscale[W];
    int32_t nc[W];
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < groups; ++g) {
      if (bad) continue;
      if (!load_group<T, W>(a, g * W, buf.data(), unscale)) {
        bad = 1;
        continue;
      }
      jacobi_group<T, W>(buf.data(), L, K, max_sweeps, nc, nrm.data());
      store_group<T, W>(a, g * W, buf.data(), unscale, nc, s, info);
    }
  }
  return bad ? Status::NonFiniteFirstInput : Status::Ok;
}

template <typename T>
Status jacobi_dispatch(const BatchView& a, T* s, int32_t* info, int max_sweeps, int num_threads) {
  constexpr int kLanes = 64 / sizeof(T);  // one 512-bit register of matrices
  // Lanes pay off when there are matrices to fill them; a few big ones run one at
  // a time (W = 1: the row loop is the vector loop).
  if (a.batch >= kLanes) return jacobi_impl<T, kLanes>(a, s, info, max_sweeps, num_threads);
  return jacobi_impl<T, 1>(a, s, info, max_sweeps, num_threads);
}

// One row tile of A as contiguous float64 (rows x K). Returns false on NaN/Inf.
bool tile_to_float64(const BatchView& a, int64_t b, int64_t r0, int64_t rows, double* out) {
  const int64_t K = a.cols;
  const int64_t base = b * a.batch_stride;
  bool finite = true;
  if (a.dtype == DType::Float32 && a.col_stride == 1) {
    for (int64_t i = 0; i < rows; ++i) {
      const float* src = static_cast<const float*>(a.data) + base + (r0 + i) * a.row_stride;
      double* dst = out + i * K;
      float bad = 0;
#pragma omp simd reduction(+ : bad)
      for (int64_t j = 0; j < K; ++j) {
        dst[j] = src[j];
        bad += src[j] - src[j];  // NaN iff src[j] is NaN or Inf
      }
      finite = finite && (bad == 0);
    }
    return finite;
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < K; ++j) {
      const double v = detail::load_element<double>(a.data, a.dtype, base + (r0 + i) * a.row_stride + j * a.col_stride);
      finite = finite && std::isfinite(v);
      out[i * K + j] = v;
    }
  return finite;
}

void syrk_accumulate(int64_t K, int64_t rows, const double* tile, double* g) {
  scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<blasint>(K),
                    static_cast<blasint>(rows), 1.0, tile, static_cast<blasint>(K), 1.0, g,
                    static_cast<blasint>(K));
}

void mirror_upper(int64_t K, double* g) {
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < i; ++j) g[i * K + j] = g[j * K + i];
}

}  // namespace

Status svdvals_jacobi(const BatchView& a, void* s, int32_t* info, int max_sweeps, int num_threads) {
  if (a.rows < a.cols || a.cols < 1 || a.batch < 1 || max_sweeps < 1) return Status::BadArgument;
  num_threads = std::max(1, num_threads);
  if (a.dtype == DType::Float64)
    return jacobi_dispatch<double>(a, static_cast<double*>(s), info, max_sweeps, num_threads);
  return jacobi_dispatch<float>(a, static_cast<float*>(s), info, max_sweeps, num_threads);
}

namespace {
// Rows per float64 tile of the Gram accumulation: about 2 MiB per tile; dsyrk stays
// efficient down to a few dozen rows.
int64_t gram_tile_rows(int64_t cols) { return std::max<int64_t>(32, std::min<int64_t>(512, (1 << 18) / cols)); }
// Column block of G in the few-matrices path: a function of K alone (determinism);
// 2048 columns give 8 x 8 blocks, 36 in the upper triangle, for any thread count.
int64_t gram_block_cols(int64_t cols) { return cols <= 256 ? 64 : (cols <= 1024 ? 128 : 256); }
}  // namespace

Status svdvals_gram(const BatchView& a, void* s, int32_t* info, int num_threads) {
  if (a.rows < 1 || a.cols < 1 || a.batch < 1) return Status::BadArgument;
  num_threads = std::max(1, num_threads);
  const int64_t L = a.rows, K = a.cols;
  const int64_t tile = gram_tile_rows(K);
  const int64_t tiles = (L + tile - 1) / tile;
  int bad = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : bad)
  {
    std::vector<double> buf(static_cast<size_t>(std::min(tile, L) * K)), g(static_cast<size_t>(K * K)),
        eig(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.batch; ++b) {
      if (bad) continue;
      std::fill(g.begin(), g.end(), 0.0);
      for (int64_t t = 0; t < tiles && !bad; ++t) {
        const int64_t r0 = t * tile, rows = std::min(tile, L - r0);
        if (!tile_to_float64(a, b, r0, rows, buf.data())) bad = 1;
        else syrk_accumulate(K, rows, buf.data(), g.data());
      }
      if (bad) continue;
      // Eigenvalues only (ascending); sigma = sqrt(max(lambda, 0)), written descending.
      const lapack_int rc = scipy_LAPACKE_dsyevd(LAPACK_ROW_MAJOR, 'N', 'U', static_cast<lapack_int>(K),
                                                 g.data(), static_cast<lapack_int>(K), eig.data());
      info[b] = rc == 0 ? 0 : 1;
      for (int64_t j = 0; j < K; ++j) {
        const double sigma = std::sqrt(std::max(eig[K - 1 - j], 0.0));
        if (a.dtype == DType::Float64) static_cast<double*>(s)[b * K + j] = sigma;
        else static_cast<float*>(s)[b * K + j] = static_cast<float>(sigma);
      }
    }
  }
  return bad ? Status::NonFiniteFirstInput : Status::Ok;
}

Status gram_float64(const BatchView& a, double* g, int num_threads) {
  if (a.rows < 1 || a.cols < 1 || a.batch < 1) return Status::BadArgument;
  num_threads = std::max(1, num_threads);
  const int64_t L = a.rows, K = a.cols;
  const int64_t tile = gram_tile_rows(K);
  const int64_t tiles = (L + tile - 1) / tile;
  int bad = 0;
  if (a.batch >= num_threads) {
    // Many matrices: one per thread at a time.
#pragma omp parallel num_threads(num_threads) reduction(| : bad)
    {
      std::vector<double> buf(static_cast<size_t>(tile * K));
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < a.batch; ++b) {
        double* gb = g + b * K * K;
        std::fill(gb, gb + K * K, 0.0);
        for (int64_t t = 0; t < tiles && !bad; ++t) {
          const int64_t r0 = t * tile, rows = std::min(tile, L - r0);
          if (!tile_to_float64(a, b, r0, rows, buf.data())) bad = 1;
          else syrk_accumulate(K, rows, buf.data(), gb);
        }
        mirror_upper(K, gb);
      }
    }
    return bad ? Status::NonFiniteFirstInput : Status::Ok;
  }
  // Few matrices: G's upper triangle is cut into column blocks whose size depends on K
  // only, and each block G[I, J] += A_t[:, I]^T A_t[:, J] is owned by one thread, which
  // adds the row tiles in order: the same operations on the same operands whatever the
  // thread count, so G is bitwise the same for 1 or many threads (per-thread partial
  // sums would not be). Each thread converts the tiles it reads itself: no barrier, so
  // a descheduled thread (a busy machine) never stalls the others.
  const int64_t cb = gram_block_cols(K);
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t i0 = 0; i0 < K; i0 += cb)
    for (int64_t j0 = i0; j0 < K; j0 += cb) blocks.emplace_back(i0, j0);
  const int nt = static_cast<int>(std::min<int64_t>(num_threads, static_cast<int64_t>(blocks.size())));
  for (int64_t b = 0; b < a.batch && !bad; ++b) {
    double* gb = g + b * K * K;
    std::fill(gb, gb + K * K, 0.0);
#pragma omp parallel num_threads(nt) reduction(| : bad)
    {
      const int tid = omp_get_thread_num(), nthreads = omp_get_num_threads();
      std::vector<double> buf(static_cast<size_t>(std::min(tile, L) * K));
      for (int64_t t = 0; t < tiles && !bad; ++t) {
        const int64_t r0 = t * tile, rows = std::min(tile, L - r0);
        if (!tile_to_float64(a, b, r0, rows, buf.data())) {
          bad = 1;
          break;
        }
        for (size_t k = static_cast<size_t>(tid); k < blocks.size(); k += static_cast<size_t>(nthreads)) {
          const int64_t i0 = blocks[k].first, j0 = blocks[k].second;
          const int64_t ni = std::min(cb, K - i0), nj = std::min(cb, K - j0);
          if (i0 == j0)
            scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<blasint>(ni),
                              static_cast<blasint>(rows), 1.0, buf.data() + i0, static_cast<blasint>(K), 1.0,
                              gb + i0 * K + i0, static_cast<blasint>(K));
          else
            scipy_cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<blasint>(ni),
                              static_cast<blasint>(nj), static_cast<blasint>(rows), 1.0, buf.data() + i0,
                              static_cast<blasint>(K), buf.data() + j0, static_cast<blasint>(K), 1.0,
                              gb + i0 * K + j0, static_cast<blasint>(K));
        }
      }
    }
    mirror_upper(K, gb);
  }
  return bad ? Status::NonFiniteFirstInput : Status::Ok;
}

}  // namespace sslkernels
