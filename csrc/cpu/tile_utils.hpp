// Internal helpers shared by the CPU kernels: element conversion, a vectorisable
// exp, BLAS tile products, and the race-free tile-pair schedule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "sslkernels/common.hpp"

// Hot epilogue loops are compiled for AVX-512, AVX2 and a baseline, picked at load
// time, so one wheel runs everywhere and still vectorises where it can.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define SSLK_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SSLK_MULTIVERSION
#endif

namespace sslkernels {
namespace detail {

// ---- element conversion -------------------------------------------------------

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal half: renormalise
      int shift = 0;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        ++shift;
      }
      mantissa &= 0x3ffu;
      bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13);
    }
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u);
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // overflows to inf
  if (abs < 0x38800000u) {                         // half subnormal or zero
    if (abs < 0x33000000u) return sign;
    // value = mant 2^(e - 150) = half_mant 2^-24: half_mant = mant >> (126 - e), 14..25
    // bits dropped (the shift was one too many before: every subnormal came out halved).
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    // value = mant * 2^(e - 150) and a subnormal half counts units of 2^-24: shift by 126 - e
    const int shift = 126 - static_cast<int>(abs >> 23);
    uint32_t half_mant = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++half_mant;
    return sign | static_cast<uint16_t>(half_mant);
  }
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

inline float bfloat16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bfloat16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

template <typename Acc>
inline Acc load_element(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::Float32: return static_cast<Acc>(static_cast<const float*>(base)[offset]);
    case DType::Float64: return static_cast<Acc>(static_cast<const double*>(base)[offset]);
    case DType::Float16: return static_cast<Acc>(half_to_float(static_cast<const uint16_t*>(base)[offset]));
    case DType::BFloat16: return static_cast<Acc>(bfloat16_to_float(static_cast<const uint16_t*>(base)[offset]));
  }
  return Acc(0);
}

template <typename Acc>
inline void store_element(void* base, DType dtype, int64_t offset, Acc value) {
  switch (dtype) {
    case DType::Float32: static_cast<float*>(base)[offset] = static_cast<float>(value); return;
    case DType::Float64: static_cast<double*>(base)[offset] = static_cast<double>(value); return;
    case DType::Float16: static_cast<uint16_t*>(base)[offset] = float_to_half(static_cast<float>(value)); return;
    case DType::BFloat16: static_cast<uint16_t*>(base)[offset] = float_to_bfloat16(static_cast<float>(value)); return;
  }
}

// ---- exp that the compiler vectorises ------------------------------------------
// exp(x) = 2^k * exp(r), |r| <= ln2/2, with a degree-6 polynomial for exp(r)
// (about 1 ulp in float32). Arguments below the float32 range give exactly 0,
// including -inf, so masked logits need no branch.
inline float exp_vec(float x) {
  const float lo = -87.3365447f, hi = 88.0f;
  const float underflow = x < lo ? 0.0f : 1.0f;
  x = x < lo ? lo : (x > hi ? hi : x);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // NaN x leaves k NaN: converting that to int is undefined (UBSan), so the exponent
  // takes 0 instead; p is NaN already, so NaN still comes out.
  const int32_t bits = (static_cast<int32_t>(k == k ? k : 0.0f) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale * underflow;
}

inline double exp_vec(double x) { return std::exp(x); }

// ---- BLAS tile products (row-major) ---------------------------------------------

// C[m x n] = alpha * op(A) * op(B) + beta * C, op(X) = X^T when X is marked transposed.
// Defined for float (sgemm) and double (dgemm).
template <typename T>
void gemm(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// ---- race-free schedule of tile pairs -------------------------------------------
// Round-robin tournament (circle method) over `num_blocks` row blocks: every
// unordered pair {I, J}, I != J, appears in exactly one round, and the pairs of a
// round touch disjoint blocks. Threads split a round and meet at a barrier, so a
// symmetric tile can update both of its row blocks with no atomics and no
// per-thread copies, and the order in which any block receives its contributions
// does not depend on the thread count (bitwise-reproducible results).
std::vector<std::vector<std::pair<int64_t, int64_t>>> tile_pair_rounds(int64_t num_blocks);

// Runs fn(scratch, r0, rows, c0, cols) on every tile of the upper block triangle of
// an (m x m) symmetric matrix cut into `tile`-row blocks: first the diagonal tiles
// (r0 == c0), then the off-diagonal pairs round by round. Within a phase no two
// concurrent calls share a row block, so fn may update the rows of both blocks.
// `scratch` is a per-thread buffer of `scratch_size` elements.
template <typename Acc, typename TileFn>
void for_each_symmetric_tile(int64_t m, int64_t tile, int64_t scratch_size, int num_threads,
                             TileFn fn) {
  const int64_t num_blocks = (m + tile - 1) / tile;
  const auto rounds = tile_pair_rounds(num_blocks);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> scratch(static_cast<size_t>(scratch_size));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int64_t r0 = b * tile, rows = std::min(tile, m - r0);
      fn(scratch.data(), r0, rows, r0, rows);
    }
    for (const auto& round : rounds) {
      const int64_t pairs = static_cast<int64_t>(round.size());
#pragma omp for schedule(static)
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t r0 = round[p].first * tile, c0 = round[p].second * tile;
        fn(scratch.data(), r0, std::min(tile, m - r0), c0, std::min(tile, m - c0));
      }
    }
  }
}

// Runs fn(scratch, r0, rows, c0, cols) on every tile of a (row_count x col_count)
// matrix cut into `tile` blocks both ways, in rounds whose tiles share no row block
// and no column block (a Latin square over the larger block count: in round r the
// b-th block of the smaller side meets block (b + r) mod larger of the other side).
// fn may update per-row and per-column state of its tile without races, every
// round keeps all threads busy, and each block receives its contributions in a
// fixed order whatever the thread count.
// With `columns_shared` false, fn only touches its row block's state: each thread
// then owns whole row blocks and walks every column block with no barrier at all
// (barriers are what a busy machine punishes).
template <typename Acc, typename TileFn>
void for_each_bipartite_tile(int64_t row_count, int64_t col_count, int64_t tile,
                             int64_t scratch_size, int num_threads, bool columns_shared,
                             TileFn fn) {
  const int64_t row_blocks = (row_count + tile - 1) / tile;
  const int64_t col_blocks = (col_count + tile - 1) / tile;
  if (!columns_shared) {
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<Acc> scratch(static_cast<size_t>(scratch_size));
#pragma omp for schedule(static)
      for (int64_t i = 0; i < row_blocks; ++i) {
        const int64_t r0 = i * tile;
        for (int64_t j = 0; j < col_blocks; ++j) {
          const int64_t c0 = j * tile;
          fn(scratch.data(), r0, std::min(tile, row_count - r0), c0, std::min(tile, col_count - c0));
        }
      }
    }
    return;
  }
  const bool rows_smaller = row_blocks <= col_blocks;
  const int64_t smaller = rows_smaller ? row_blocks : col_blocks;
  const int64_t larger = rows_smaller ? col_blocks : row_blocks;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<Acc> scratch(static_cast<size_t>(scratch_size));
    for (int64_t r = 0; r < larger; ++r) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < smaller; ++b) {
        const int64_t other = (b + r) % larger;
        const int64_t i = rows_smaller ? b : other, j = rows_smaller ? other : b;
        const int64_t r0 = i * tile, c0 = j * tile;
        fn(scratch.data(), r0, std::min(tile, row_count - r0), c0, std::min(tile, col_count - c0));
      }
    }
  }
}

// Tile height for a (rows x rows) logit matrix over `cols` features: big enough to
// keep BLAS efficient, small enough that a round has pairs for several threads.
int64_t choose_tile_rows(int64_t rows, int64_t cols);


// Saved log-sum-exps are float64 whatever the inputs: a float32 lse of a row whose
// logits are ~1e4 is off by up to half an ulp, 5e-4, and every probability recomputed
// from it by that much relative (the backward's gradients then lose 4 digits against
// eager's). Forward: lse = max + log(sum) in float64 from the accumulator's stats.
template <typename Acc, typename Sum>
inline double lse_of(Acc max, Sum sum) {
  return sum > 0 ? static_cast<double>(max) + std::log(static_cast<double>(sum))
                 : -std::numeric_limits<double>::infinity();
}

// Backward: each saved lse split into accumulator-typed parts, lse = hi + lo, so that
// p = exp((s - hi) - lo) stays in the accumulator's type per element: s - hi is exact
// (Sterbenz) for every logit near its row's lse, the ones whose p matters.
template <typename Acc>
struct SplitLse {
  std::vector<Acc> hi, lo;
  SplitLse(const double* lse, int64_t m) : hi(static_cast<size_t>(m)), lo(static_cast<size_t>(m)) {
    for (int64_t i = 0; i < m; ++i) {
      hi[i] = static_cast<Acc>(lse[i]);
      lo[i] = std::isfinite(lse[i]) ? static_cast<Acc>(lse[i] - static_cast<double>(hi[i])) : Acc(0);
    }
  }
};

}  // namespace detail
}  // namespace sslkernels
