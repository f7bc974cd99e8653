// Attention over gathered rows (masked patches, packed sequences) on the CPU,
// FlashAttention-style: tiles of the rows a sequence reads are loaded into small
// cache-resident buffers (the gather is the tile load), tile products go through
// OpenBLAS, and our own epilogue does the online softmax. Every product is laid out
// as a plain (NN) row-major product: OpenBLAS' small-matrix kernels take those
// without packing, and they are what these short sequences need.
//
// forward : one task per (sequence, head, chunk of query rows); per key tile, K^T and
//           V are loaded once for the chunk, then per query tile S = Q K^T, online
//           max / sum-exp, O += P V; at the end O /= l, lse = m + log l.
// backward: one task per (sequence, head) in a fixed order (FA2 recurrence from the
//           saved lse and D_i = rowsum(dO_i * O_i)), computed transposed so that every
//           product is NN: S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T,
//           dS^T = P^T (dP^T - D), dV += P^T dO, dK += c dS^T Q, dQ^T += c K^T dS^T.
//           Every row's gradient is summed in one thread in one order.
#include "sslkernels/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "tile_utils.hpp"

namespace sslkernels {
namespace {

using detail::exp_vec;

// Tile sizes. Query tiles of at most kQueryTile rows keep the products in OpenBLAS'
// small-matrix range; key tiles go up to kKeyTile, so a ViT-length sequence is one
// key tile (no rescaling); a forward task covers at most kChunk query rows, so that
// K^T and V are loaded once for many query tiles yet long sequences still split.
constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 256;
constexpr int64_t kChunk = 256;

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

inline int64_t element_size(DType dtype) {
  return dtype == DType::Float64 ? 8 : (dtype == DType::Float32 ? 4 : 2);
}

template <typename Acc>
constexpr DType acc_dtype() {
  return std::is_same_v<Acc, double> ? DType::Float64 : DType::Float32;
}

// A tile of `rows` rows (rows r0.. of sequence s on one side, head h) gathered into
// `buffer` as a contiguous Acc matrix [rows x dh]. Always a copy, even for packed
// float32 rows: BLAS reading rows H * Dh apart straight from the input is slower
// than this one streaming pass.
template <typename Acc>
const Acc* load_tile(const AttentionOperand& x, DType dtype, const AttentionRows& side, int64_t s,
                     int64_t r0, int64_t rows, int64_t h, int64_t dh, Acc* buffer, int64_t* ld) {
  // Rows sit H * Dh elements apart (or anywhere, by index): no hardware prefetcher
  // guesses that, so fetch a few rows ahead ourselves.
  constexpr int64_t kAhead = 8;
  const int64_t size = element_size(dtype), bytes = dh * size;
  const char* base = static_cast<const char*>(x.data);
  for (int64_t i = 0; i < rows; ++i) {
    if (i + kAhead < rows) {
      const char* next = base + row_offset(x, side, s, r0 + i + kAhead, h) * size;
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(next + b);
    }
    load_row<Acc>(x.data, dtype, row_offset(x, side, s, r0 + i, h), dh, buffer + i * dh);
  }
  *ld = dh;
  return buffer;
}

// dst[c * ld + r] = src[r * cols + c] for a contiguous src [rows x cols], in 16 x 16
// blocks so that both sides stay in L1.
template <typename Acc>
void transpose(const Acc* src, int64_t rows, int64_t cols, Acc* dst, int64_t ld) {
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ld + r] = src[r * cols + c];
    }
  }
}

// Rows r0.. of sequence s (head h) of a contiguous Acc tile [rows x dh] stored into x,
// a few rows' cache lines claimed ahead (the same scattered pattern as load_tile).
template <typename Acc>
void store_tile(const AttentionOperand& x, DType dtype, const AttentionRows& side, int64_t s, int64_t r0,
                int64_t rows, int64_t h, int64_t dh, const Acc* tile) {
  constexpr int64_t kAhead = 8;
  const int64_t size = element_size(dtype), bytes = dh * size;
  char* base = static_cast<char*>(mutable_data(x));
  for (int64_t i = 0; i < rows; ++i) {
    if (i + kAhead < rows) {
      char* next = base + row_offset(x, side, s, r0 + i + kAhead, h) * size;
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(next + b, 1);
    }
    store_row<Acc>(mutable_data(x), dtype, row_offset(x, side, s, r0 + i, h), dh, tile + i * dh);
  }
}

template <typename Acc>
bool tile_finite(const Acc* tile, int64_t ld, int64_t rows, int64_t dh) {
  for (int64_t i = 0; i < rows; ++i)
    if (!all_finite(tile + i * ld, dh)) return false;
  return true;
}

// Largest of x[0..n), on 64-byte GCC vectors (a max reduction written as a loop stays
// scalar without -ffast-math); each multiversioned caller lowers them to its ISA.
template <typename Acc>
inline Acc max_of(const Acc* x, int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(Acc);
  typedef Acc Vec __attribute__((vector_size(64)));
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  Vec lanes;
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = neg_inf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Vec v;
    std::memcpy(&v, x + j, sizeof v);
    lanes = v > lanes ? v : lanes;
  }
  Acc mx = neg_inf;
  for (int64_t l = 0; l < kLanes; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
  for (; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
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
    const Acc new_max = std::max(row_max[i], max_of(si, n));
    Acc sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const Acc e = exp_vec(si[j] - new_max);
      si[j] = e;
      sum += e;
    }
    rescale[i] = row_max[i] == neg_inf ? Acc(0) : exp_vec(row_max[i] - new_max);  // first tile: 0
    row_sum[i] = row_sum[i] * rescale[i] + sum;
    row_max[i] = new_max;
  }
}

// Transposed tiles S^T, dP^T [n x m] (key rows, query columns): P^T = exp(S^T - lse)
// in place of S^T and dS^T = P^T (dP^T - D) in place of dP^T; each lse comes as its
// parts hi + lo (detail::SplitLse), subtracted in turn.
template <typename Acc>
SSLK_MULTIVERSION void softmax_grad_transposed(Acc* st, Acc* dpt, int64_t n, int64_t m,
                                               const Acc* lse_hi, const Acc* lse_lo, const Acc* delta) {
  for (int64_t r = 0; r < n; ++r) {
    Acc* sr = st + r * m;
    Acc* dr = dpt + r * m;
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      const Acc pr = exp_vec((sr[i] - lse_hi[i]) - lse_lo[i]);
      sr[i] = pr;
      dr[i] = pr * (dr[i] - delta[i]);
    }
  }
}

// lse is float64 for every input dtype (see detail::lse_of).
inline double* lse_at(void* lse, const AttentionProblem& p, int64_t s, int64_t h) {
  return static_cast<double*>(lse) + h * p.lse_head_stride + p.lse_base[s];
}

// Key tile j of sequence s, head h: K and V gathered row-major, K^T [dh x n] beside.
template <typename Acc>
struct KeyTile {
  int64_t c0 = 0, n = 0, ldk = 0, ldv = 0;
  const Acc* k = nullptr;
  const Acc* v = nullptr;
  Acc* kt = nullptr;

  void load(const AttentionProblem& p, int64_t s, int64_t h, const Tiling& tiling, int64_t j,
            Acc* kbuf, Acc* vbuf, Acc* ktbuf) {
    const int64_t dh = p.head_dim, nk = p.key.count[s];
    c0 = tiling.begin(j);
    n = tiling.rows(j, nk);
    k = load_tile<Acc>(p.k, p.dtype, p.key, s, c0, n, h, dh, kbuf, &ldk);
    v = load_tile<Acc>(p.v, p.dtype, p.key, s, c0, n, h, dh, vbuf, &ldv);
    transpose(k, n, dh, ktbuf, n);
    kt = ktbuf;
  }
};

template <typename Acc>
Status forward_impl(const AttentionProblem& p, void* out, void* lse, int num_threads) {
  const int64_t heads = p.heads, dh = p.head_dim;
  const Acc scale = static_cast<Acc>(p.scale);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  // Tasks: (sequence, head, chunk of query rows), only the chunks a sequence's own
  // count needs.
  struct Task {
    int64_t s, h, chunk;
  };
  std::vector<Task> tasks;
  int64_t max_chunk = 1, max_keys = 1;
  for (int64_t s = 0; s < p.num_seq; ++s) {
    const Tiling chunks(p.query.count[s], kChunk);
    max_chunk = std::max(max_chunk, chunks.size);
    max_keys = std::max(max_keys, Tiling(p.key.count[s], kKeyTile).size);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t c = 0; c < chunks.count; ++c) tasks.push_back({s, h, c});
  }
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const AttentionRows out_rows{p.out_base, p.query.count, nullptr, 0};
  const AttentionOperand out_x{out, 0, heads * dh, dh};
  int bad_q = 0, bad_k = 0, bad_v = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : bad_q, bad_k, bad_v)
  {
    std::vector<Acc> qbuf(max_chunk * dh), kbuf(max_keys * dh), vbuf(max_keys * dh), ktbuf(max_keys * dh);
    std::vector<Acc> sbuf(kQueryTile * max_keys), obuf(max_chunk * dh);
    std::vector<Acc> row_max(max_chunk), row_sum(max_chunk), rescale(kQueryTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; ++task) {
      const auto [s, h, chunk] = tasks[task];
      const int64_t nq = p.query.count[s], nk = p.key.count[s];
      const Tiling chunks(nq, kChunk), kt(nk, kKeyTile);
      const int64_t q0 = chunks.begin(chunk), mc = chunks.rows(chunk, nq);
      const Tiling qt(mc, kQueryTile);
      int64_t ldq;
      const Acc* q = load_tile<Acc>(p.q, p.dtype, p.query, s, q0, mc, h, dh, qbuf.data(), &ldq);
      if (!tile_finite(q, ldq, mc, dh)) bad_q = 1;
      std::fill(row_max.begin(), row_max.begin() + mc, neg_inf);
      std::fill(row_sum.begin(), row_sum.begin() + mc, Acc(0));
      std::fill(obuf.begin(), obuf.begin() + mc * dh, Acc(0));
      for (int64_t j = 0; j < kt.count; ++j) {
        KeyTile<Acc> key;
        key.load(p, s, h, kt, j, kbuf.data(), vbuf.data(), ktbuf.data());
        if (chunk == 0) {  // every key row of (s, h) passes through chunk 0 once
          if (!all_finite(key.k, key.n * dh)) bad_k = 1;
          if (!tile_finite(key.v, key.ldv, key.n, dh)) bad_v = 1;
        }
        const int64_t n = key.n;
        for (int64_t i = 0; i < qt.count; ++i) {
          const int64_t r0 = qt.begin(i), m = qt.rows(i, mc);
          Acc* sc = sbuf.data();
          Acc* o = obuf.data() + r0 * dh;
          detail::gemm<Acc>(false, false, m, n, dh, scale, q + r0 * ldq, ldq, key.kt, n, Acc(0), sc, n);
          softmax_step<Acc>(sc, m, n, row_max.data() + r0, row_sum.data() + r0, rescale.data());
          if (j > 0)
            for (int64_t r = 0; r < m; ++r)
              for (int64_t c = 0; c < dh; ++c) o[r * dh + c] *= rescale[r];
          detail::gemm<Acc>(false, false, m, dh, n, Acc(1), sc, n, key.v, key.ldv, Acc(1), o, dh);
        }
      }
      double* lse_row = lse_at(lse, p, s, h) + q0;
      for (int64_t i = 0; i < mc; ++i) {
        Acc* o = obuf.data() + i * dh;
        const Acc inv = row_sum[i] > 0 ? Acc(1) / row_sum[i] : Acc(0);  // no keys: zero row
        for (int64_t c = 0; c < dh; ++c) o[c] *= inv;
        lse_row[i] = detail::lse_of(row_max[i], row_sum[i]);
      }
      store_tile<Acc>(out_x, p.dtype, out_rows, s, q0, mc, h, dh, obuf.data());
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
  int64_t max_rows = 1, max_keys = 1;
  for (int64_t s = 0; s < p.num_seq; ++s) {
    max_rows = std::max(max_rows, p.query.count[s]);
    max_keys = std::max(max_keys, Tiling(p.key.count[s], kKeyTile).size);
  }
  const int64_t num_tasks = p.num_seq * heads;
  // Query-side rows of the output (out, grad_out): contiguous [rows, H, Dh].
  const AttentionRows out_rows{p.out_base, p.query.count, nullptr, 0};
  const AttentionOperand grad_out_x{grad_out, 0, heads * dh, dh};
  const AttentionOperand out_x{out, 0, heads * dh, dh};
#pragma omp parallel num_threads(num_threads)
  {
    // Whole-sequence query side (Q, Q^T, dO, dO^T, dQ^T, lse, D); one key tile
    // (K, K^T, V, dK, dV); one query tile of S^T and dP^T.
    std::vector<Acc> qbuf(max_rows * dh), qtbuf(max_rows * dh), dobuf(max_rows * dh);
    std::vector<Acc> dotbuf(max_rows * dh), dqtbuf(max_rows * dh);
    std::vector<Acc> delta(max_rows);
    std::vector<Acc> kbuf(max_keys * dh), ktbuf(max_keys * dh), vbuf(max_keys * dh);
    std::vector<Acc> dkbuf(max_keys * dh), dvbuf(max_keys * dh);
    std::vector<Acc> stbuf(max_keys * kQueryTile), dptbuf(max_keys * kQueryTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; ++task) {
      const int64_t s = task / heads, h = task % heads;
      const int64_t nq = p.query.count[s], nk = p.key.count[s];
      if (nq == 0 || nk == 0) continue;  // the caller's zeros are the gradient
      const Tiling qt(nq, kQueryTile), kt(nk, kKeyTile);
      int64_t ldq, lddo;
      const Acc* q = load_tile<Acc>(p.q, p.dtype, p.query, s, 0, nq, h, dh, qbuf.data(), &ldq);
      const Acc* d_o = load_tile<Acc>(grad_out_x, p.dtype, out_rows, s, 0, nq, h, dh, dobuf.data(), &lddo);
      Acc* qt_all = qtbuf.data();
      Acc* dot_all = dotbuf.data();
      Acc* dqt = dqtbuf.data();
      const double* saved_lse = lse_at(const_cast<void*>(lse), p, s, h);
      transpose(q, nq, dh, qt_all, nq);
      transpose(d_o, nq, dh, dot_all, nq);
      int64_t ldo;
      const Acc* o = load_tile<Acc>(out_x, p.dtype, out_rows, s, 0, nq, h, dh, dqt, &ldo);  // dQ^T's buffer, free until now
      for (int64_t i = 0; i < nq; ++i) {
        const Acc* g = d_o + i * lddo;
        const Acc* oi = o + i * ldo;
        Acc acc = 0;
        for (int64_t c = 0; c < dh; ++c) acc += g[c] * oi[c];
        delta[i] = acc;
      }
      const detail::SplitLse<Acc> lse_parts(saved_lse, nq);
      std::fill(dqt, dqt + nq * dh, Acc(0));
      for (int64_t j = 0; j < kt.count; ++j) {
        KeyTile<Acc> key;
        key.load(p, s, h, kt, j, kbuf.data(), vbuf.data(), ktbuf.data());
        const int64_t n = key.n;
        Acc* dkt = dkbuf.data();
        Acc* dvt = dvbuf.data();
        for (int64_t i = 0; i < qt.count; ++i) {
          const int64_t r0 = qt.begin(i), m = qt.rows(i, nq);
          Acc* st = stbuf.data();
          Acc* dpt = dptbuf.data();
          const Acc first = i == 0 ? Acc(0) : Acc(1);  // beta: the first q tile overwrites
          detail::gemm<Acc>(false, false, n, m, dh, scale, key.k, key.ldk, qt_all + r0, nq, Acc(0), st, m);
          detail::gemm<Acc>(false, false, n, m, dh, Acc(1), key.v, key.ldv, dot_all + r0, nq, Acc(0), dpt, m);
          softmax_grad_transposed<Acc>(st, dpt, n, m, lse_parts.hi.data() + r0, lse_parts.lo.data() + r0,
                                       delta.data() + r0);
          detail::gemm<Acc>(false, false, n, dh, m, Acc(1), st, m, d_o + r0 * lddo, lddo, first, dvt, dh);
          detail::gemm<Acc>(false, false, n, dh, m, scale, dpt, m, q + r0 * ldq, ldq, first, dkt, dh);
          detail::gemm<Acc>(false, false, dh, m, n, scale, key.kt, n, dpt, m, Acc(1), dqt + r0, nq);
        }
        store_tile<Acc>(dk, p.dtype, p.key, s, key.c0, n, h, dh, dkt);
        store_tile<Acc>(dv, p.dtype, p.key, s, key.c0, n, h, dh, dvt);
      }
      transpose(dqt, dh, nq, qbuf.data(), dh);  // Q is no longer needed: its buffer takes dQ
      store_tile<Acc>(dq, p.dtype, p.query, s, 0, nq, h, dh, qbuf.data());
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
