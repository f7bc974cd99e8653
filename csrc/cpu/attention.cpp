// Attention over gathered rows (masked patches, packed sequences) on the CPU,
// FlashAttention-style: tiles of the rows a sequence reads are loaded into small
// cache-resident buffers (the gather is the tile load), tile products go through
// OpenBLAS, and our own epilogue does the online softmax.
//
// forward : one task per (sequence, head, query tile); online max / sum-exp over the
//           key tiles, O = sum_j P_j V_j / l, lse = m + log l.
// backward: one task per (sequence, head) in a fixed order (FA2 recurrence from the
//           saved lse and D_i = rowsum(dO_i * O_i)): for each key tile, for each query
//           tile, P = exp(S - lse), dV += P^T dO, dS = P (dO V^T - D), dK += c dS^T Q,
//           dQ += c dS K. Every row's gradient is summed in one thread in one order.
#include "sslkernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "tile_utils.hpp"

namespace sslkernels {
namespace {

using detail::exp_vec;

// Largest tiles. A forward task covers at most kForwardQueryTile query rows (so short
// sequences still give every thread work); key tiles and the backward's query tiles
// go up to kTile, so a ViT-length sequence is one tile: no rescaling, few BLAS calls.
constexpr int64_t kForwardQueryTile = 64;
constexpr int64_t kTile = 256;

// Tiles of at most `most` rows that cut n rows as evenly as possible (a 137-row
// sequence becomes 3 x 46, not 64 + 64 + 9). Depends on sizes only.
struct Tiling {
  int64_t count = 0, size = 0;
  Tiling(int64_t n, int64_t most) {
    if (n <= 0) return;
    count = (n + most - 1) / most;
    size = (n + count - 1) / count;
  }
  int64_t begin(int64_t t) const { return t * size; }
  int64_t rows(int64_t t, int64_t n) const { return std::min(size, n - t * size); }
};

// Element offset of row i of sequence s (one side), head h, in tensor x.
inline int64_t row_offset(const AttentionOperand& x, const AttentionRows& r, int64_t s, int64_t i,
                          int64_t h) {
  const int64_t tok = (r.base != nullptr ? r.base[s] : 0) + (r.index != nullptr ? r.index[s * r.index_stride + i] : i);
  return s * x.seq_stride + tok * x.token_stride + h * x.head_stride;
}

// x * 0 is 0 for finite x and NaN for NaN/Inf: a finiteness test the compiler vectorises.
template <typename Acc>
SSLK_MULTIVERSION bool all_finite(const Acc* x, int64_t n) {
  Acc acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] * Acc(0);
  return acc == Acc(0);
}

template <typename Acc, typename Src>
void widen(const Src* src, Acc* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<Src, uint16_t>) {
      dst[i] = static_cast<Acc>(detail::half_to_float(src[i]));
    } else {
      dst[i] = static_cast<Acc>(src[i]);
    }
  }
}

// One row of Dh elements at element offset `at` of `base`, widened to Acc.
template <typename Acc>
void load_row(const void* base, DType dtype, int64_t at, int64_t dh, Acc* dst) {
  switch (dtype) {
    case DType::Float32: widen(static_cast<const float*>(base) + at, dst, dh); return;
    case DType::Float64: widen(static_cast<const double*>(base) + at, dst, dh); return;
    case DType::Float16: widen(static_cast<const uint16_t*>(base) + at, dst, dh); return;
    case DType::BFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + at;
      for (int64_t i = 0; i < dh; ++i) dst[i] = static_cast<Acc>(detail::bfloat16_to_float(src[i]));
      return;
    }
  }
}

template <typename Acc>
void store_row(void* base, DType dtype, int64_t at, int64_t dh, const Acc* src) {
  switch (dtype) {
    case DType::Float32: {
      float* dst = static_cast<float*>(base) + at;
      for (int64_t i = 0; i < dh; ++i) dst[i] = static_cast<float>(src[i]);
      return;
    }
    case DType::Float64: {
      double* dst = static_cast<double*>(base) + at;
      for (int64_t i = 0; i < dh; ++i) dst[i] = static_cast<double>(src[i]);
      return;
    }
    case DType::Float16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + at;
      for (int64_t i = 0; i < dh; ++i) dst[i] = detail::float_to_half(static_cast<float>(src[i]));
      return;
    }
    case DType::BFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + at;
      for (int64_t i = 0; i < dh; ++i) dst[i] = detail::float_to_bfloat16(static_cast<float>(src[i]));
      return;
    }
  }
}

// Gradient operands are outputs: the caller hands over writable memory.
inline void* mutable_data(const AttentionOperand& x) { return const_cast<void*>(x.data); }

template <typename Acc>
constexpr DType acc_dtype() {
  return std::is_same_v<Acc, double> ? DType::Float64 : DType::Float32;
}

// A tile of `rows` rows (rows r0.. of sequence s on one side, head h) as an Acc matrix
// with leading dimension *ld. Packed rows already in the accumulator type are used in
// place (leading dimension: the token stride); anything else is gathered into `buffer`.
template <typename Acc>
const Acc* load_tile(const AttentionOperand& x, DType dtype, const AttentionRows& side, int64_t s,
                     int64_t r0, int64_t rows, int64_t h, int64_t dh, Acc* buffer, int64_t* ld) {
  if (side.index == nullptr && dtype == acc_dtype<Acc>()) {
    *ld = x.token_stride;
    return static_cast<const Acc*>(x.data) + row_offset(x, side, s, r0, h);
  }
  for (int64_t i = 0; i < rows; ++i)
    load_row<Acc>(x.data, dtype, row_offset(x, side, s, r0 + i, h), dh, buffer + i * dh);
  *ld = dh;
  return buffer;
}

template <typename Acc>
bool tile_finite(const Acc* tile, int64_t ld, int64_t rows, int64_t dh) {
  for (int64_t i = 0; i < rows; ++i)
    if (!all_finite(tile + i * ld, dh)) return false;
  return true;
}

// Online-softmax step on a logit tile S [m x n] (already scaled): updates the running
// row max / sum, turns S into exp(S - new max) and returns in `rescale` the factor
// the running output rows must be multiplied by.
template <typename Acc>
SSLK_MULTIVERSION void softmax_step(Acc* s, int64_t m, int64_t n, Acc* row_max, Acc* row_sum,
                                    Acc* rescale) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (int64_t i = 0; i < m; ++i) {
    Acc* si = s + i * n;
    Acc mx = neg_inf;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, si[j]);
    const Acc new_max = std::max(row_max[i], mx);
    Acc sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const Acc e = exp_vec(si[j] - new_max);
      si[j] = e;
      sum += e;
    }
    rescale[i] = exp_vec(row_max[i] - new_max);  // 0 on the first tile (-inf - finite)
    row_sum[i] = row_sum[i] * rescale[i] + sum;
    row_max[i] = new_max;
  }
}

// dS = P * (dP - D) in place of dP, P = exp(S - lse) in place of S.
template <typename Acc>
SSLK_MULTIVERSION void softmax_grad(Acc* s, Acc* dp, int64_t m, int64_t n, const Acc* lse,
                                    const Acc* delta) {
  for (int64_t i = 0; i < m; ++i) {
    Acc* si = s + i * n;
    Acc* di = dp + i * n;
    const Acc l = lse[i], d = delta[i];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc p = exp_vec(si[j] - l);
      si[j] = p;
      di[j] = p * (di[j] - d);
    }
  }
}

template <typename Acc>
Acc* lse_at(void* lse, const AttentionProblem& p, int64_t s, int64_t h) {
  return static_cast<Acc*>(lse) + h * p.lse_head_stride + p.lse_base[s];
}

template <typename Acc>
Status forward_impl(const AttentionProblem& p, void* out, void* lse, int num_threads) {
  const int64_t heads = p.heads, dh = p.head_dim;
  const Acc scale = static_cast<Acc>(p.scale);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  // Tasks: (sequence, head, query tile), only the tiles a sequence's own count needs.
  struct Task {
    int64_t s, h, t;
  };
  std::vector<Task> tasks;
  int64_t max_rows = 1, max_keys = 1;
  for (int64_t s = 0; s < p.num_seq; ++s) {
    const Tiling qt(p.query.count[s], kForwardQueryTile);
    const Tiling kt(p.key.count[s], kTile);
    max_rows = std::max(max_rows, qt.size);
    max_keys = std::max(max_keys, kt.size);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < qt.count; ++t) tasks.push_back({s, h, t});
  }
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  int bad_q = 0, bad_k = 0, bad_v = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : bad_q, bad_k, bad_v)
  {
    std::vector<Acc> qbuf(max_rows * dh), kbuf(max_keys * dh), vbuf(max_keys * dh);
    std::vector<Acc> sbuf(max_rows * max_keys), obuf(max_rows * dh);
    std::vector<Acc> row_max(max_rows), row_sum(max_rows), rescale(max_rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; ++task) {
      const auto [s, h, t] = tasks[task];
      const int64_t nq = p.query.count[s], nk = p.key.count[s];
      const Tiling qt(nq, kForwardQueryTile), kt(nk, kTile);
      const int64_t r0 = qt.begin(t), m = qt.rows(t, nq);
      Acc* lse_row = lse_at<Acc>(lse, p, s, h) + r0;
      int64_t ldq;
      const Acc* q = load_tile<Acc>(p.q, p.dtype, p.query, s, r0, m, h, dh, qbuf.data(), &ldq);
      if (!tile_finite(q, ldq, m, dh)) bad_q = 1;
      std::fill(row_max.begin(), row_max.begin() + m, neg_inf);
      std::fill(row_sum.begin(), row_sum.begin() + m, Acc(0));
      std::fill(obuf.begin(), obuf.begin() + m * dh, Acc(0));
      for (int64_t j = 0; j < kt.count; ++j) {
        const int64_t c0 = kt.begin(j), n = kt.rows(j, nk);
        int64_t ldk, ldv;
        const Acc* k = load_tile<Acc>(p.k, p.dtype, p.key, s, c0, n, h, dh, kbuf.data(), &ldk);
        const Acc* v = load_tile<Acc>(p.v, p.dtype, p.key, s, c0, n, h, dh, vbuf.data(), &ldv);
        if (t == 0) {  // every key row of (s, h) passes through tile 0 once
          if (!tile_finite(k, ldk, n, dh)) bad_k = 1;
          if (!tile_finite(v, ldv, n, dh)) bad_v = 1;
        }
        Acc* sc = sbuf.data();
        detail::gemm<Acc>(false, true, m, n, dh, scale, q, ldq, k, ldk, Acc(0), sc, n);
        softmax_step<Acc>(sc, m, n, row_max.data(), row_sum.data(), rescale.data());
        if (j > 0)
          for (int64_t i = 0; i < m; ++i)
            for (int64_t c = 0; c < dh; ++c) obuf[i * dh + c] *= rescale[i];
        detail::gemm<Acc>(false, false, m, dh, n, Acc(1), sc, n, v, ldv, Acc(1), obuf.data(), dh);
      }
      for (int64_t i = 0; i < m; ++i) {
        Acc* o = obuf.data() + i * dh;
        const Acc inv = row_sum[i] > 0 ? Acc(1) / row_sum[i] : Acc(0);  // no keys: zero row
        for (int64_t c = 0; c < dh; ++c) o[c] *= inv;
        store_row<Acc>(out, p.dtype, ((p.out_base[s] + r0 + i) * heads + h) * dh, dh, o);
        lse_row[i] = row_sum[i] > 0 ? row_max[i] + std::log(row_sum[i]) : neg_inf;
      }
    }
  }
  if (bad_q) return Status::NonFiniteFirstInput;
  if (bad_k) return Status::NonFiniteSecondInput;
  if (bad_v) return Status::NonFiniteThirdInput;
  return Status::Ok;
}

template <typename Acc>
Status backward_impl(const AttentionProblem& p, const void* grad_out, const void* out,
                     const void* lse, const AttentionOperand& dq, const AttentionOperand& dk,
                     const AttentionOperand& dv, int num_threads) {
  const int64_t heads = p.heads, dh = p.head_dim;
  const Acc scale = static_cast<Acc>(p.scale);
  int64_t max_rows = 1, max_q_tile = 1, max_keys = 1;
  for (int64_t s = 0; s < p.num_seq; ++s) {
    max_rows = std::max(max_rows, p.query.count[s]);
    max_q_tile = std::max(max_q_tile, Tiling(p.query.count[s], kTile).size);
    max_keys = std::max(max_keys, Tiling(p.key.count[s], kTile).size);
  }
  const int64_t num_tasks = p.num_seq * heads;
  // Query-side rows of the output (out, grad_out): contiguous [rows, H, Dh].
  const AttentionRows out_rows{p.out_base, p.query.count, nullptr, 0};
  const AttentionOperand grad_out_x{grad_out, 0, heads * dh, dh};
#pragma omp parallel num_threads(num_threads)
  {
    // Whole-sequence query side (Q, dO, dQ, lse, D); one key tile (K, V, dK, dV).
    std::vector<Acc> qbuf(max_rows * dh), dobuf(max_rows * dh), dqbuf(max_rows * dh);
    std::vector<Acc> obuf(dh), lse_buf(max_rows), delta(max_rows);
    std::vector<Acc> kbuf(max_keys * dh), vbuf(max_keys * dh), dkbuf(max_keys * dh), dvbuf(max_keys * dh);
    std::vector<Acc> sbuf(max_q_tile * max_keys), dpbuf(max_q_tile * max_keys);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; ++task) {
      const int64_t s = task / heads, h = task % heads;
      const int64_t nq = p.query.count[s], nk = p.key.count[s];
      if (nq == 0 || nk == 0) continue;  // the caller's zeros are the gradient
      const Tiling qt(nq, kTile), kt(nk, kTile);
      int64_t ldq, lddo;
      const Acc* q = load_tile<Acc>(p.q, p.dtype, p.query, s, 0, nq, h, dh, qbuf.data(), &ldq);
      const Acc* d_o = load_tile<Acc>(grad_out_x, p.dtype, out_rows, s, 0, nq, h, dh, dobuf.data(), &lddo);
      const Acc* saved_lse = lse_at<Acc>(const_cast<void*>(lse), p, s, h);
      for (int64_t i = 0; i < nq; ++i) {
        load_row<Acc>(out, p.dtype, ((p.out_base[s] + i) * heads + h) * dh, dh, obuf.data());
        const Acc* g = d_o + i * lddo;
        Acc acc = 0;
        for (int64_t c = 0; c < dh; ++c) acc += g[c] * obuf[c];
        delta[i] = acc;
        lse_buf[i] = saved_lse[i];
      }
      std::fill(dqbuf.begin(), dqbuf.begin() + nq * dh, Acc(0));
      for (int64_t j = 0; j < kt.count; ++j) {
        const int64_t c0 = kt.begin(j), n = kt.rows(j, nk);
        int64_t ldk, ldv;
        const Acc* k = load_tile<Acc>(p.k, p.dtype, p.key, s, c0, n, h, dh, kbuf.data(), &ldk);
        const Acc* v = load_tile<Acc>(p.v, p.dtype, p.key, s, c0, n, h, dh, vbuf.data(), &ldv);
        Acc* dkt = dkbuf.data();
        Acc* dvt = dvbuf.data();
        for (int64_t i = 0; i < qt.count; ++i) {
          const int64_t r0 = qt.begin(i), m = qt.rows(i, nq);
          const Acc* qi = q + r0 * ldq;
          const Acc* doi = d_o + r0 * lddo;
          Acc* sc = sbuf.data();
          Acc* dps = dpbuf.data();
          const Acc first = i == 0 ? Acc(0) : Acc(1);  // beta: the first q tile overwrites
          detail::gemm<Acc>(false, true, m, n, dh, scale, qi, ldq, k, ldk, Acc(0), sc, n);
          detail::gemm<Acc>(false, true, m, n, dh, Acc(1), doi, lddo, v, ldv, Acc(0), dps, n);
          softmax_grad<Acc>(sc, dps, m, n, lse_buf.data() + r0, delta.data() + r0);
          detail::gemm<Acc>(true, false, n, dh, m, Acc(1), sc, n, doi, lddo, first, dvt, dh);
          detail::gemm<Acc>(true, false, n, dh, m, scale, dps, n, qi, ldq, first, dkt, dh);
          detail::gemm<Acc>(false, false, m, dh, n, scale, dps, n, k, ldk, Acc(1), dqbuf.data() + r0 * dh, dh);
        }
        for (int64_t r = 0; r < n; ++r) {
          store_row<Acc>(mutable_data(dk), p.dtype, row_offset(dk, p.key, s, c0 + r, h), dh, dkt + r * dh);
          store_row<Acc>(mutable_data(dv), p.dtype, row_offset(dv, p.key, s, c0 + r, h), dh, dvt + r * dh);
        }
      }
      for (int64_t i = 0; i < nq; ++i)
        store_row<Acc>(mutable_data(dq), p.dtype, row_offset(dq, p.query, s, i, h), dh, dqbuf.data() + i * dh);
    }
  }
  return Status::Ok;
}

bool valid_problem(const AttentionProblem& p) {
  if (p.num_seq < 0 || p.heads < 1 || p.head_dim < 1 || !std::isfinite(p.scale)) return false;
  for (int64_t s = 0; s < p.num_seq; ++s)
    if (p.query.count[s] < 0 || p.key.count[s] < 0) return false;
  return true;
}

}  // namespace

Status attention_forward(const AttentionProblem& p, void* out, void* lse, int num_threads) {
  if (!valid_problem(p)) return Status::BadArgument;
  if (p.dtype == DType::Float64) return forward_impl<double>(p, out, lse, num_threads);
  return forward_impl<float>(p, out, lse, num_threads);
}

Status attention_backward(const AttentionProblem& p, const void* grad_out, const void* out,
                          const void* lse, const AttentionOperand& dq, const AttentionOperand& dk,
                          const AttentionOperand& dv, int num_threads) {
  if (!valid_problem(p)) return Status::BadArgument;
  if (p.dtype == DType::Float64)
    return backward_impl<double>(p, grad_out, out, lse, dq, dk, dv, num_threads);
  return backward_impl<float>(p, grad_out, out, lse, dq, dk, dv, num_threads);
}

}  // namespace sslkernels
