// SIGReg on the CPU. x = proj @ directions is formed one (row block x column block)
// tile at a time through OpenBLAS and consumed in cache:
//
// forward : per column s and knot k, sum_n cos(t_k x_ns) and sum_n sin(t_k x_ns).
//           Each element costs one sin and one cos (of dt * x); the other knots
//           follow by angle addition, all in float64 so the recurrence adds nothing
//           visible to float32's own rounding of x.
// backward: dX_ns = sum_k -t_k sin(t_k x_ns) gc_sk + t_k cos(t_k x_ns) gs_sk with the
//           same recurrence on the recomputed tile, then dproj += dX_tile A_tile^T and
//           ddirections += P_tile^T dX_tile, the tiles walked in Latin-square rounds
//           (no two tiles of a round share a row or a column block), so each output
//           block receives its contributions in one fixed order for any thread count.
#include "sslkernels/sigreg.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "tile_utils.hpp"

// The Lanes vectors below never cross a call that is not inlined (SSLK_INLINE), so the
// note that their ABI differs without AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sslkernels {
namespace {

constexpr int64_t kLanes = 8;  // columns handled together by the epilogue (one AVX-512 double vector)
// Above this |dt * x| the two-part pi/2 reduction below loses float64 accuracy; such
// tiles (|x| in the millions) take the scalar std::sin / std::cos path.
constexpr double kReduceLimit = 1.0e6;

// kLanes float64 lanes as one GCC vector: the epilogue is written on whole vectors, so it
// is SIMD on every target_clones variant (plain arrays came out scalar: GCC unrolled the
// 8-lane loops and then failed to re-vectorise them).
typedef double Lanes __attribute__((vector_size(kLanes * sizeof(double))));
typedef int64_t LaneBits __attribute__((vector_size(kLanes * sizeof(double))));
// Lanes kept in scratch memory (std::vector<double>): only double-aligned.
typedef double StoredLanes __attribute__((vector_size(kLanes * sizeof(double)), aligned(alignof(double)), may_alias));

// Everything that touches Lanes is inlined into the target_clones variants: a Lanes
// passed to a function compiled for another target would not match its ABI.
#define SSLK_INLINE inline __attribute__((always_inline))
#define SSLK_LAMBDA_INLINE __attribute__((always_inline))

SSLK_INLINE Lanes splat(double v) { return Lanes{} + v; }

// sin and cos of `a` (|a| <= kReduceLimit): a = q pi/2 + r with |r| <= pi/4 (Cody-Waite,
// pi/2 split into a 33-bit head, so q * head is exact for |q| < 2^20, and a tail),
// then the minimax polynomials of sin and cos on [-pi/4, pi/4] (about 1 ulp in
// float64). q is rounded by adding 1.5 * 2^52, which leaves q's two's-complement low
// bits in the mantissa: bit 0 swaps sin and cos, the signs follow from bits 0 and 1.
SSLK_INLINE void sincos_reduced(const Lanes& a, Lanes& s, Lanes& c) {
  const double kRound = 6755399441055744.0;  // 1.5 * 2^52
  const Lanes shifted = a * 0.63661977236758134308 + kRound;
  const Lanes q = shifted - kRound;
  const LaneBits quadrant = (LaneBits)shifted;
  const Lanes r = (a - q * 1.57079632673412561417e+00) - q * 6.07710050650619224932e-11;
  const Lanes z = r * r;
  Lanes ps = splat(1.58962301576546568060e-10);
  ps = ps * z - 2.50507477628578072866e-8;
  ps = ps * z + 2.75573136213857245213e-6;
  ps = ps * z - 1.98412698295895385996e-4;
  ps = ps * z + 8.33333333332211858878e-3;
  ps = ps * z - 1.66666666666666307295e-1;
  const Lanes sin_r = r + r * z * ps;
  Lanes pc = splat(-1.13585365213876817300e-11);
  pc = pc * z + 2.08757008419747316778e-9;
  pc = pc * z - 2.75573141792967388112e-7;
  pc = pc * z + 2.48015872888517045348e-5;
  pc = pc * z - 1.38888888888730564116e-3;
  pc = pc * z + 4.16666666666665929218e-2;
  const Lanes cos_r = 1.0 - 0.5 * z + z * z * pc;
  const LaneBits odd = (quadrant & 1) != 0;  // all ones where sin and cos swap
  const LaneBits sin_bits = (LaneBits)sin_r, cos_bits = (LaneBits)cos_r;
  // quadrant 2, 3: -sin; quadrant 1, 2: -cos (the sign bit, xor-ed in)
  const LaneBits sin_sign = (quadrant & 2) << 62;
  const LaneBits cos_sign = ((quadrant + 1) & 2) << 62;
  const LaneBits s_bits = ((odd & cos_bits) | (~odd & sin_bits)) ^ sin_sign;
  const LaneBits c_bits = ((odd & sin_bits) | (~odd & cos_bits)) ^ cos_sign;
  s = (Lanes)s_bits;
  c = (Lanes)c_bits;
}

// max |x| over a tile, and whether any entry is NaN/Inf (x - x is NaN exactly then).
template <typename Acc>
SSLK_MULTIVERSION void tile_range(const Acc* x, int64_t ld, int64_t rows, int64_t cols, double& max_abs,
                                  bool& finite) {
  Acc m = 0, probe = 0;
  for (int64_t n = 0; n < rows; ++n) {
    const Acc* row = x + n * ld;
    for (int64_t s = 0; s < cols; ++s) {
      const Acc a = row[s] < 0 ? -row[s] : row[s];
      m = a > m ? a : m;
      probe += row[s] - row[s];
    }
  }
  max_abs = static_cast<double>(m);
  finite = probe == probe;
}

// cos and sin of t_k x for k = 0 .. knots - 1 and the `kLanes` columns starting at x,
// by angle addition from those of dt * x; fn(k, cos_k, sin_k).
template <bool kReduced, typename Acc, typename Fn>
SSLK_INLINE void for_each_knot(const Acc* x, int64_t knots, double dt, Fn&& fn) {
  Lanes a;
  for (int64_t l = 0; l < kLanes; ++l) a[l] = dt * static_cast<double>(x[l]);
  Lanes c1, s1;
  if constexpr (kReduced) {
    sincos_reduced(a, s1, c1);
  } else {
    for (int64_t l = 0; l < kLanes; ++l) {
      s1[l] = std::sin(a[l]);
      c1[l] = std::cos(a[l]);
    }
  }
  Lanes c = splat(1.0), s = splat(0.0);
  fn(int64_t(0), c, s);
  for (int64_t k = 1; k < knots; ++k) {
    const Lanes next_c = c * c1 - s * s1;
    s = s * c1 + c * s1;
    c = next_c;
    fn(k, c, s);
  }
}

// Adds the tile's column sums of cos(t_k x) and sin(t_k x) to the statistics of its
// columns (layout [column][knot]). `scratch` holds 2 * knots * kLanes doubles. The tile's
// columns are padded to a multiple of kLanes (the padding is ignored).
template <bool kReduced, typename Acc>
SSLK_MULTIVERSION void add_tile_stats(const Acc* x, int64_t ld, int64_t rows, int64_t cols, int64_t knots,
                                      double dt, double* scratch, double* cos_out, double* sin_out) {
  StoredLanes* acc_c = reinterpret_cast<StoredLanes*>(scratch);
  StoredLanes* acc_s = acc_c + knots;
  for (int64_t s0 = 0; s0 < cols; s0 += kLanes) {
    for (int64_t k = 0; k < 2 * knots; ++k) acc_c[k] = splat(0.0);
    for (int64_t n = 0; n < rows; ++n) {
      for_each_knot<kReduced>(x + n * ld + s0, knots, dt, [&](int64_t k, const Lanes& c, const Lanes& s) SSLK_LAMBDA_INLINE {
        acc_c[k] += c;
        acc_s[k] += s;
      });
    }
    const int64_t width = std::min(kLanes, cols - s0);
    for (int64_t l = 0; l < width; ++l) {
      for (int64_t k = 0; k < knots; ++k) {
        cos_out[(s0 + l) * knots + k] += acc_c[k][l];
        sin_out[(s0 + l) * knots + k] += acc_s[k][l];
      }
    }
  }
}

// Overwrites the tile x with dL/dx = sum_k coef_sin[k] sin(t_k x) + coef_cos[k] cos(t_k x),
// the coefficients given per column as [column][knot] (already times -t_k / t_k).
// `scratch` holds 2 * knots * kLanes doubles.
template <bool kReduced, typename Acc>
SSLK_MULTIVERSION void tile_gradient(Acc* x, int64_t ld, int64_t rows, int64_t cols, int64_t knots, double dt,
                                     const double* coef_sin, const double* coef_cos, double* scratch) {
  StoredLanes* cs = reinterpret_cast<StoredLanes*>(scratch);
  StoredLanes* cc = cs + knots;
  for (int64_t s0 = 0; s0 < cols; s0 += kLanes) {
    const int64_t width = std::min(kLanes, cols - s0);
    for (int64_t k = 0; k < knots; ++k) {
      for (int64_t l = 0; l < kLanes; ++l) {
        cs[k][l] = l < width ? coef_sin[(s0 + l) * knots + k] : 0.0;
        cc[k][l] = l < width ? coef_cos[(s0 + l) * knots + k] : 0.0;
      }
    }
    for (int64_t n = 0; n < rows; ++n) {
      Acc* row = x + n * ld + s0;
      Lanes g = splat(0.0);
      for_each_knot<kReduced>(row, knots, dt, [&](int64_t k, const Lanes& c, const Lanes& s) SSLK_LAMBDA_INLINE {
        g += cs[k] * s + cc[k] * c;
      });
      for (int64_t l = 0; l < kLanes; ++l) row[l] = static_cast<Acc>(g[l]);
    }
  }
}

inline int64_t blocks(int64_t size, int64_t tile) { return (size + tile - 1) / tile; }
inline int64_t padded(int64_t cols) { return (cols + kLanes - 1) / kLanes * kLanes; }

// Tile sizes from the sizes alone (never the thread count: results are bitwise the
// same for any thread count). Columns: enough blocks for a round to keep several
// threads busy; rows: 256 (BLAS-friendly), fewer for a short batch.
struct Tiles {
  int64_t rows, cols;
};
inline Tiles choose_tiles(int64_t n, int64_t s) {
  int64_t cols = 256;
  while (cols > 32 && blocks(s, cols) < 8) cols /= 2;
  int64_t rows = 256;
  while (rows > 32 && blocks(n, rows) < 8) rows /= 2;
  return {rows, cols};
}

// How a tile's sin / cos are taken: the vectorised reduction, std::sin / std::cos for
// |dt x| past the reduction's range, or not at all (a non-finite projection).
enum class TilePath { Reduced, Scalar, NonFinite };

template <typename Acc>
struct Operands {
  const SigregProblem& p;
  std::vector<Acc> directions;  // contiguous [D, S]
  bool proj_direct;             // proj rows usable in place by BLAS

  explicit Operands(const SigregProblem& problem) : p(problem) {
    proj_direct = (std::is_same_v<Acc, float> ? p.dtype == DType::Float32 : p.dtype == DType::Float64) &&
                  p.col_stride == 1 && p.row_stride >= p.dim && p.dim > 0;
  }

  // Copies directions to a contiguous Acc matrix; false if any entry is NaN/Inf.
  bool load_directions(int num_threads) {
    const int64_t d = p.dim, s = p.num_directions;
    directions.assign(static_cast<size_t>(d * s), Acc(0));
    int bad = 0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad)
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < s; ++j) {
        const Acc v = detail::load_element<Acc>(p.directions, p.dtype, i * p.dir_row_stride + j * p.dir_col_stride);
        bad |= !std::isfinite(v);
        directions[i * s + j] = v;
      }
    }
    return !bad;
  }

  bool proj_finite(int num_threads) const {
    int bad = 0;
    const int64_t total_rows = p.batch * p.rows;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad)
    for (int64_t r = 0; r < total_rows; ++r) {
      const int64_t base = (r / p.rows) * p.batch_stride + (r % p.rows) * p.row_stride;
      for (int64_t k = 0; k < p.dim; ++k)
        bad |= !std::isfinite(detail::load_element<Acc>(p.proj, p.dtype, base + k * p.col_stride));
    }
    return !bad;
  }

  // Rows [r0, r0 + rows) of proj[b] as an Acc matrix: in place when possible, else
  // converted into `scratch` (rows x D). Returns the pointer; `ld` its row stride.
  const Acc* proj_rows(int64_t b, int64_t r0, int64_t rows, Acc* scratch, int64_t& ld) const {
    const int64_t base = b * p.batch_stride + r0 * p.row_stride;
    if (proj_direct) {
      ld = p.row_stride;
      return static_cast<const Acc*>(p.proj) + base;
    }
    ld = p.dim;
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t k = 0; k < p.dim; ++k)
        scratch[n * p.dim + k] =
            detail::load_element<Acc>(p.proj, p.dtype, base + n * p.row_stride + k * p.col_stride);
    return scratch;
  }

  // x tile = proj[b][r0 : r0 + rows] @ directions[:, c0 : c0 + cols] (row stride padded(cols)),
  // and which sin / cos path it takes. `prows` / `ldp` return the proj rows used.
  TilePath project(int64_t b, int64_t r0, int64_t rows, int64_t c0, int64_t cols, double dt, Acc* proj_scratch,
                   Acc* x, const Acc*& prows, int64_t& ldp) const {
    prows = proj_rows(b, r0, rows, proj_scratch, ldp);
    detail::gemm<Acc>(false, false, rows, cols, p.dim, Acc(1), prows, ldp, directions.data() + c0,
                      p.num_directions, Acc(0), x, padded(cols));
    double max_abs = 0;
    bool finite = true;
    tile_range(x, padded(cols), rows, cols, max_abs, finite);
    if (!finite) return TilePath::NonFinite;
    return max_abs * dt <= kReduceLimit ? TilePath::Reduced : TilePath::Scalar;
  }
};

bool valid(const SigregProblem& p) {
  return p.batch >= 1 && p.rows >= 1 && p.dim >= 1 && p.num_directions >= 1 && p.knots >= 2 &&
         std::isfinite(p.t_max) && p.t_max > 0;
}

template <typename Acc>
Status stats_impl(const SigregProblem& p, double* cos_sum, double* sin_sum, int num_threads) {
  Operands<Acc> ops(p);
  if (!ops.proj_finite(num_threads)) return Status::NonFiniteFirstInput;
  if (!ops.load_directions(num_threads)) return Status::NonFiniteSecondInput;
  const int64_t s_count = p.num_directions, knots = p.knots;
  const double dt = p.t_max / static_cast<double>(knots - 1);
  const Tiles tiles = choose_tiles(p.rows, s_count);
  const int64_t row_blocks = blocks(p.rows, tiles.rows), col_blocks = blocks(s_count, tiles.cols);
  std::fill(cos_sum, cos_sum + p.batch * s_count * knots, 0.0);
  std::fill(sin_sum, sin_sum + p.batch * s_count * knots, 0.0);
  int overflow = 0;
  // Each (batch, column block) owns its statistics and adds its row blocks in order.
#pragma omp parallel num_threads(num_threads) reduction(| : overflow)
  {
    std::vector<Acc> proj_scratch(ops.proj_direct ? 0 : static_cast<size_t>(tiles.rows * p.dim));
    std::vector<Acc> x(static_cast<size_t>(tiles.rows * padded(tiles.cols)), Acc(0));
    std::vector<double> acc(static_cast<size_t>(2 * knots * kLanes));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.batch * col_blocks; ++task) {
      const int64_t b = task / col_blocks, c0 = (task % col_blocks) * tiles.cols;
      const int64_t cols = std::min(tiles.cols, s_count - c0), ld = padded(cols);
      double* cos_out = cos_sum + (b * s_count + c0) * knots;
      double* sin_out = sin_sum + (b * s_count + c0) * knots;
      for (int64_t i = 0; i < row_blocks; ++i) {
        const int64_t r0 = i * tiles.rows, rows = std::min(tiles.rows, p.rows - r0);
        int64_t ldp = 0;
        const Acc* prows = nullptr;
        const TilePath path = ops.project(b, r0, rows, c0, cols, dt, proj_scratch.data(), x.data(), prows, ldp);
        if (path == TilePath::NonFinite) {
          overflow = 1;
          continue;
        }
        if (path == TilePath::Reduced)
          add_tile_stats<true>(x.data(), ld, rows, cols, knots, dt, acc.data(), cos_out, sin_out);
        else
          add_tile_stats<false>(x.data(), ld, rows, cols, knots, dt, acc.data(), cos_out, sin_out);
      }
    }
  }
  return overflow ? Status::NonFiniteResult : Status::Ok;
}

template <typename Acc>
Status backward_impl(const SigregProblem& p, const double* grad_cos, const double* grad_sin, void* dproj,
                     void* ddirections, int num_threads) {
  Operands<Acc> ops(p);
  if (!ops.load_directions(num_threads)) return Status::NonFiniteSecondInput;
  const int64_t n_count = p.rows, d = p.dim, s_count = p.num_directions, knots = p.knots;
  const double dt = p.t_max / static_cast<double>(knots - 1);
  const Tiles tiles = choose_tiles(n_count, s_count);
  const int64_t row_blocks = blocks(n_count, tiles.rows), col_blocks = blocks(s_count, tiles.cols);
  const bool rows_fewer = row_blocks <= col_blocks;
  const int64_t per_round = rows_fewer ? row_blocks : col_blocks;
  const int64_t rounds = rows_fewer ? col_blocks : row_blocks;

  // Gradients are summed in Acc; written in place when the output dtype is Acc.
  const bool same_dtype = std::is_same_v<Acc, float> ? p.dtype == DType::Float32 : p.dtype == DType::Float64;
  std::vector<Acc> dproj_wide(same_dtype ? 0 : static_cast<size_t>(n_count * d));
  std::vector<Acc> ddir_wide(same_dtype || !ddirections ? 0 : static_cast<size_t>(d * s_count));
  Acc* ddir = !ddirections ? nullptr : same_dtype ? static_cast<Acc*>(ddirections) : ddir_wide.data();
  if (ddir) std::fill(ddir, ddir + d * s_count, Acc(0));
  // Coefficients of sin(t_k x) and cos(t_k x) in dL/dx, per batch: [S][knots].
  std::vector<double> coef_sin(static_cast<size_t>(s_count * knots)), coef_cos(coef_sin.size());
  int overflow = 0;

  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < s_count * knots; ++i) {
      const double t = dt * static_cast<double>(i % knots);
      coef_sin[i] = -t * grad_cos[b * s_count * knots + i];
      coef_cos[i] = t * grad_sin[b * s_count * knots + i];
    }
    Acc* dp = same_dtype ? static_cast<Acc*>(dproj) + b * n_count * d : dproj_wide.data();
    std::fill(dp, dp + n_count * d, Acc(0));
#pragma omp parallel num_threads(num_threads) reduction(| : overflow)
    {
      std::vector<Acc> proj_scratch(ops.proj_direct ? 0 : static_cast<size_t>(tiles.rows * d));
      std::vector<Acc> x(static_cast<size_t>(tiles.rows * padded(tiles.cols)), Acc(0));
      std::vector<double> coef(static_cast<size_t>(2 * knots * kLanes));
      for (int64_t r = 0; r < rounds; ++r) {
        // Round r: the q-th block of the shorter side meets block (q + r) mod `rounds`
        // of the other, so no two tiles of a round share a row or a column block.
#pragma omp for schedule(static)
        for (int64_t q = 0; q < per_round; ++q) {
          const int64_t other = (q + r) % rounds;
          const int64_t i = rows_fewer ? q : other, j = rows_fewer ? other : q;
          const int64_t r0 = i * tiles.rows, rows = std::min(tiles.rows, n_count - r0);
          const int64_t c0 = j * tiles.cols, cols = std::min(tiles.cols, s_count - c0), ld = padded(cols);
          int64_t ldp = 0;
          const Acc* prows = nullptr;
          const TilePath path = ops.project(b, r0, rows, c0, cols, dt, proj_scratch.data(), x.data(), prows, ldp);
          if (path == TilePath::NonFinite) {
            overflow = 1;
            continue;
          }
          const double* cs = coef_sin.data() + c0 * knots;
          const double* cc = coef_cos.data() + c0 * knots;
          if (path == TilePath::Reduced)
            tile_gradient<true>(x.data(), ld, rows, cols, knots, dt, cs, cc, coef.data());
          else
            tile_gradient<false>(x.data(), ld, rows, cols, knots, dt, cs, cc, coef.data());
          // dproj[rows] += dX A[:, cols]^T ; ddirections[:, cols] += P[rows]^T dX
          detail::gemm<Acc>(false, true, rows, d, cols, Acc(1), x.data(), ld, ops.directions.data() + c0,
                            s_count, Acc(1), dp + r0 * d, d);
          if (ddir)
            detail::gemm<Acc>(true, false, d, cols, rows, Acc(1), prows, ldp, x.data(), ld, Acc(1), ddir + c0,
                              s_count);
        }
      }
    }
    if (!same_dtype) {
      for (int64_t i = 0; i < n_count * d; ++i)
        detail::store_element<Acc>(dproj, p.dtype, b * n_count * d + i, dproj_wide[i]);
    }
  }
  if (ddir && !same_dtype) {
    for (int64_t i = 0; i < d * s_count; ++i) detail::store_element<Acc>(ddirections, p.dtype, i, ddir_wide[i]);
  }
  return overflow ? Status::NonFiniteResult : Status::Ok;
}

}  // namespace

Status sigreg_stats(const SigregProblem& p, double* cos_sum, double* sin_sum, int num_threads) {
  if (!valid(p)) return Status::BadArgument;
  num_threads = std::max(1, num_threads);
  if (p.dtype == DType::Float64) return stats_impl<double>(p, cos_sum, sin_sum, num_threads);
  return stats_impl<float>(p, cos_sum, sin_sum, num_threads);
}

Status sigreg_stats_backward(const SigregProblem& p, const double* grad_cos, const double* grad_sin,
                             void* dproj, void* ddirections, int num_threads) {
  if (!valid(p)) return Status::BadArgument;
  num_threads = std::max(1, num_threads);
  if (p.dtype == DType::Float64)
    return backward_impl<double>(p, grad_cos, grad_sin, dproj, ddirections, num_threads);
  return backward_impl<float>(p, grad_cos, grad_sin, dproj, ddirections, num_threads);
}

}  // namespace sslkernels
