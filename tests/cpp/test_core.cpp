// Pure C++ driver of the CPU core (no Python, no torch): every entry point of
// csrc/include/sslkernels/*.hpp on odd sizes and strided views, against naive
// double-precision loops written here, plus the error statuses. Built under
// ASan/UBSan by scripts/sanitize.sh (CTest target `sslkernels_core`); buffers are
// exact-size std::vectors so a read or write past an end is reported.
// Exit status: 0 when every check passes, 1 otherwise (each failure is printed).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "sslkernels/attention.hpp"
#include "sslkernels/contrastive.hpp"
#include "sslkernels/spectral.hpp"

// OpenBLAS stays single-threaded inside the kernels' OpenMP regions (as the Python module sets it).
extern "C" void scipy_openblas_set_num_threads(int num_threads);

using namespace sslkernels;
using Vec = std::vector<double>;

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

void check_close(double got, double want, double tol, const std::string& what) {
  const bool ok = std::isfinite(got) && std::fabs(got - want) <= tol;
  if (!ok) std::printf("  got %.12g want %.12g (tol %.3g)\n", got, want, tol);
  check(ok, what);
}

// Largest |a - b| over two equal-length arrays, and the largest |b|.
double max_err(const Vec& a, const Vec& b) {
  double e = 0;
  for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::isfinite(a[i]) ? std::fabs(a[i] - b[i]) : INFINITY);
  return e;
}
double max_abs(const Vec& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::fabs(x));
  return m;
}

void check_all_close(const Vec& got, const Vec& want, double rel, const std::string& what) {
  const double tol = rel * std::max(1.0, max_abs(want));
  const double err = max_err(got, want);
  if (!(err <= tol)) std::printf("  max error %.3g > tol %.3g\n", err, tol);
  check(err <= tol, what);
}

std::mt19937_64 rng(12345);
Vec randn(size_t n, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  Vec v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Storage of a logical rows x cols matrix in one of three layouts, so the kernels'
// stride handling is exercised: 0 row-major, 1 padded rows, 2 column-major.
template <typename T>
struct Stored {
  std::vector<T> buf;
  int64_t rows, cols, rs, cs;
  Stored(const Vec& m, int64_t r, int64_t c, int layout) : rows(r), cols(c) {
    if (layout == 0) { rs = c; cs = 1; buf.assign(static_cast<size_t>(r * c), T(0)); }
    else if (layout == 1) { rs = c + 3; cs = 1; buf.assign(static_cast<size_t>((r - 1) * rs + c), T(0)); }
    else { rs = 1; cs = r; buf.assign(static_cast<size_t>(r * c), T(0)); }
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) buf[i * rs + j * cs] = static_cast<T>(m[i * c + j]);
  }
  Vec logical() const {  // the values as stored (rounded to T)
    Vec m(static_cast<size_t>(rows * cols));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) m[i * cols + j] = static_cast<double>(buf[i * rs + j * cs]);
    return m;
  }
  MatrixView view(DType dt) const { return MatrixView{buf.data(), dt, rows, cols, rs, cs}; }
};

template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::Float32; }
template <> DType dtype_of<double>() { return DType::Float64; }

template <typename T>
Vec to_vec(const std::vector<T>& x) { return Vec(x.begin(), x.end()); }

// Rows of m (rows x d) L2-normalised with eps 1e-12 (F.normalize).
Vec normalized(const Vec& m, int64_t rows, int64_t d, bool normalize) {
  if (!normalize) return m;
  Vec out(m);
  for (int64_t i = 0; i < rows; ++i) {
    double s = 0;
    for (int64_t c = 0; c < d; ++c) s += m[i * d + c] * m[i * d + c];
    const double norm = std::max(std::sqrt(s), 1e-12);
    for (int64_t c = 0; c < d; ++c) out[i * d + c] = m[i * d + c] / norm;
  }
  return out;
}

double dot(const Vec& a, int64_t i, const Vec& b, int64_t j, int64_t d) {
  double s = 0;
  for (int64_t c = 0; c < d; ++c) s += a[i * d + c] * b[j * d + c];
  return s;
}

double log_sum_exp(const Vec& x) {
  double m = -INFINITY;
  for (double v : x) m = std::max(m, v);
  double s = 0;
  for (double v : x) s += std::exp(v - m);
  return m + std::log(s);
}

// Central differences of a scalar function of a vector, in double, at up to 40
// coordinates spread over x (the first, the last and evenly between), compared with the
// kernel's gradient `got` at the same coordinates.
void check_grad(const Vec& got, const std::function<double(const Vec&)>& f, Vec x, double rel,
                const std::string& what, double h = 1e-6) {
  const size_t n = x.size(), picks = std::min<size_t>(n, 40);
  Vec want, have;
  for (size_t p = 0; p < picks; ++p) {
    const size_t i = picks == 1 ? 0 : p * (n - 1) / (picks - 1);
    const double x0 = x[i];
    x[i] = x0 + h; const double up = f(x);
    x[i] = x0 - h; const double down = f(x);
    x[i] = x0;
    want.push_back((up - down) / (2 * h));
    have.push_back(got[i]);
  }
  check_all_close(have, want, rel, what);
}

// ------------------------------------------------------------------ NT-Xent

double nt_xent_ref(const Vec& z1, const Vec& z2, int64_t n, int64_t d, double t, bool normalize,
                   Vec* lse = nullptr) {
  Vec z(z1);
  z.insert(z.end(), z2.begin(), z2.end());
  z = normalized(z, 2 * n, d, normalize);
  double loss = 0;
  if (lse) lse->assign(static_cast<size_t>(2 * n), 0);
  for (int64_t i = 0; i < 2 * n; ++i) {
    Vec row;
    for (int64_t j = 0; j < 2 * n; ++j)
      if (j != i) row.push_back(dot(z, i, z, j, d) / t);
    const double l = log_sum_exp(row);
    if (lse) (*lse)[i] = l;
    loss += l - dot(z, i, z, i < n ? i + n : i - n, d) / t;
  }
  return loss / (2 * n);
}

template <typename T>
void test_nt_xent(int64_t n, int64_t d, double t, bool normalize, int layout, int threads) {
  const std::string tag = "nt_xent<" + std::string(sizeof(T) == 8 ? "f64" : "f32") + "> n=" +
                          std::to_string(n) + " d=" + std::to_string(d) + " t=" + std::to_string(t) +
                          " layout=" + std::to_string(layout) + " threads=" + std::to_string(threads);
  const Stored<T> a(randn(n * d), n, d, layout), b(randn(n * d), n, d, (layout + 1) % 3);
  const Vec z1 = a.logical(), z2 = b.logical();
  Vec lse_ref;
  const double want = nt_xent_ref(z1, z2, n, d, t, normalize, &lse_ref);
  std::vector<double> lse(static_cast<size_t>(2 * n), NAN);
  double loss = NAN;
  const DType dt = dtype_of<T>();
  check(nt_xent_forward(a.view(dt), b.view(dt), t, normalize, lse.data(), &loss, threads) == Status::Ok,
        tag + " forward status");
  const double rel = sizeof(T) == 8 ? 1e-10 : 2e-5 * std::max(1.0, 1.0 / t);
  check_close(loss, want, rel * std::max(1.0, std::fabs(want)), tag + " loss");
  check_all_close(to_vec(lse), lse_ref, rel, tag + " lse");

  const double grad_loss = 0.75;
  std::vector<T> dz1(static_cast<size_t>(n * d), T(NAN)), dz2(static_cast<size_t>(n * d), T(NAN));
  check(nt_xent_backward(a.view(dt), b.view(dt), lse.data(), t, normalize, grad_loss, dz1.data(),
                         dz2.data(), threads) == Status::Ok,
        tag + " backward status");
  Vec both(z1);
  both.insert(both.end(), z2.begin(), z2.end());
  const auto f = [&](const Vec& x) {
    return grad_loss * nt_xent_ref(Vec(x.begin(), x.begin() + n * d), Vec(x.begin() + n * d, x.end()), n, d,
                                   t, normalize);
  };
  Vec got = to_vec(dz1);
  got.insert(got.end(), dz2.begin(), dz2.end());
  check_grad(got, f, both, sizeof(T) == 8 ? 1e-6 : 1e-3 * std::max(1.0, 1.0 / t), tag + " gradient");
}

// ------------------------------------------------------------------ SupCon

double sup_con_ref(const Vec& f, const std::vector<int64_t>& ids, int64_t n, int64_t d, double t,
                   bool normalize, Vec* lse = nullptr) {
  const Vec z = normalized(f, n, d, normalize);
  double total = 0;
  int64_t anchors = 0;
  if (lse) lse->assign(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) {
    Vec row;
    double pos = 0;
    int64_t npos = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (j == i) continue;
      row.push_back(dot(z, i, z, j, d) / t);
      if (ids[j] == ids[i]) { pos += dot(z, i, z, j, d) / t; ++npos; }
    }
    const double l = n > 1 ? log_sum_exp(row) : -INFINITY;
    if (lse) (*lse)[i] = l;
    if (npos > 0) { total += l - pos / npos; ++anchors; }
  }
  return anchors ? total / anchors : 0.0;
}

template <typename T>
void test_sup_con(int64_t n, int64_t d, int64_t classes, double t, int layout, int threads) {
  const std::string tag = "sup_con<" + std::string(sizeof(T) == 8 ? "f64" : "f32") + "> n=" +
                          std::to_string(n) + " d=" + std::to_string(d) + " classes=" + std::to_string(classes) +
                          " threads=" + std::to_string(threads);
  const Stored<T> a(randn(n * d), n, d, layout);
  const Vec f = a.logical();
  std::vector<int64_t> ids(static_cast<size_t>(n)), counts(static_cast<size_t>(classes), 0);
  for (int64_t i = 0; i < n; ++i) { ids[i] = (i * 7 + 3) % classes; ++counts[ids[i]]; }
  Vec lse_ref;
  const double want = sup_con_ref(f, ids, n, d, t, true, &lse_ref);
  std::vector<double> lse(static_cast<size_t>(n), NAN);
  double loss = NAN;
  const DType dt = dtype_of<T>();
  check(sup_con_forward(a.view(dt), ids.data(), counts.data(), classes, t, true, lse.data(), &loss, threads) ==
            Status::Ok, tag + " forward status");
  const double rel = sizeof(T) == 8 ? 1e-10 : 2e-5 * std::max(1.0, 1.0 / t);
  check_close(loss, want, rel * std::max(1.0, std::fabs(want)), tag + " loss");
  if (n > 1) check_all_close(to_vec(lse), lse_ref, rel, tag + " lse");
  std::vector<T> df(static_cast<size_t>(n * d), T(NAN));
  check(sup_con_backward(a.view(dt), ids.data(), counts.data(), classes, lse.data(), t, true, 1.0, df.data(),
                         threads) == Status::Ok, tag + " backward status");
  const auto fn = [&](const Vec& x) { return sup_con_ref(x, ids, n, d, t, true); };
  check_grad(to_vec(df), fn, f, sizeof(T) == 8 ? 1e-6 : 1e-3 * std::max(1.0, 1.0 / t), tag + " gradient");

  // Class ids out of range and counts that do not match are rejected, never read past.
  std::vector<int64_t> bad_ids(ids);
  bad_ids[n - 1] = classes;
  check(sup_con_forward(a.view(dt), bad_ids.data(), counts.data(), classes, t, true, lse.data(), &loss, threads) ==
            Status::BadArgument, tag + " class id out of range -> BadArgument");
  bad_ids[n - 1] = -1;
  check(sup_con_forward(a.view(dt), bad_ids.data(), counts.data(), classes, t, true, lse.data(), &loss, threads) ==
            Status::BadArgument, tag + " negative class id -> BadArgument");
  std::vector<int64_t> bad_counts(counts);
  bad_counts[0] += 1;
  check(sup_con_forward(a.view(dt), ids.data(), bad_counts.data(), classes, t, true, lse.data(), &loss, threads) ==
            Status::BadArgument, tag + " wrong class counts -> BadArgument");
}

// ------------------------------------------------------------------ InfoNCE

struct InfoNceCase {
  int64_t n, d, k, per_query;
  bool symmetric, in_batch, normalize;
};

// negatives: k rows (shared) or n * per_query rows (per query), d columns.
double info_nce_ref(const Vec& q0, const Vec& k0, const Vec& neg0, const InfoNceCase& c, double t) {
  const int64_t n = c.n, d = c.d;
  const int64_t rows = c.per_query ? n * c.per_query : c.k;
  const Vec q = normalized(q0, n, d, c.normalize), k = normalized(k0, n, d, c.normalize);
  const Vec neg = normalized(neg0, rows, d, c.normalize);
  double loss_q = 0, loss_k = 0;
  for (int64_t i = 0; i < n; ++i) {
    Vec row;
    for (int64_t j = 0; j < n; ++j)
      if (c.in_batch || j == i) row.push_back(dot(q, i, k, j, d) / t);
    const int64_t lo = c.per_query ? i * c.per_query : 0, hi = c.per_query ? (i + 1) * c.per_query : rows;
    for (int64_t m = lo; m < hi; ++m) row.push_back(dot(q, i, neg, m, d) / t);
    loss_q += log_sum_exp(row) - dot(q, i, k, i, d) / t;
  }
  if (!c.symmetric) return loss_q / n;
  for (int64_t j = 0; j < n; ++j) {
    Vec col;
    for (int64_t i = 0; i < n; ++i) col.push_back(dot(q, i, k, j, d) / t);
    loss_k += log_sum_exp(col) - dot(q, j, k, j, d) / t;
  }
  return 0.5 * (loss_q + loss_k) / n;
}

template <typename T>
void test_info_nce(const InfoNceCase& c, double t, int threads) {
  const std::string tag = "info_nce<" + std::string(sizeof(T) == 8 ? "f64" : "f32") + "> n=" +
                          std::to_string(c.n) + " d=" + std::to_string(c.d) + " k=" + std::to_string(c.k) +
                          " per_query=" + std::to_string(c.per_query) + " sym=" + std::to_string(c.symmetric) +
                          " in_batch=" + std::to_string(c.in_batch) + " threads=" + std::to_string(threads);
  const int64_t n = c.n, d = c.d, rows = c.per_query ? n * c.per_query : c.k;
  const Stored<T> q(randn(n * d), n, d, 0), k(randn(n * d), n, d, 2);
  const Stored<T> neg(randn(std::max<int64_t>(rows, 1) * d), std::max<int64_t>(rows, 1), d, 1);
  const DType dt = dtype_of<T>();
  MatrixView nv = neg.view(dt);
  if (rows == 0) nv.rows = 0;
  const Vec qv = q.logical(), kv = k.logical();
  const Vec negv = rows ? neg.logical() : Vec();
  const double want = info_nce_ref(qv, kv, negv, c, t);
  std::vector<double> lse_q(static_cast<size_t>(n), NAN), lse_k(static_cast<size_t>(n), NAN);
  double loss = NAN;
  check(info_nce_forward(q.view(dt), k.view(dt), nv, c.per_query, t, c.normalize, c.symmetric, c.in_batch,
                         lse_q.data(), c.symmetric ? lse_k.data() : nullptr, &loss, threads) == Status::Ok,
        tag + " forward status");
  const double rel = sizeof(T) == 8 ? 1e-10 : 2e-5 * std::max(1.0, 1.0 / t);
  check_close(loss, want, rel * std::max(1.0, std::fabs(want)), tag + " loss");

  const double grad_loss = 1.25;
  std::vector<T> dq(static_cast<size_t>(n * d), T(NAN)), dk(static_cast<size_t>(n * d), T(NAN));
  std::vector<T> dneg(static_cast<size_t>(std::max<int64_t>(rows, 1) * d), T(NAN));
  double dtemp = NAN;
  check(info_nce_backward(q.view(dt), k.view(dt), nv, c.per_query, lse_q.data(),
                          c.symmetric ? lse_k.data() : nullptr, t, c.normalize, c.symmetric, c.in_batch, grad_loss,
                          dq.data(), dk.data(), rows ? dneg.data() : nullptr, &dtemp, threads) == Status::Ok,
        tag + " backward status");
  Vec all(qv);
  all.insert(all.end(), kv.begin(), kv.end());
  all.insert(all.end(), negv.begin(), negv.end());
  const auto f = [&](const Vec& x) {
    return grad_loss * info_nce_ref(Vec(x.begin(), x.begin() + n * d), Vec(x.begin() + n * d, x.begin() + 2 * n * d),
                                    Vec(x.begin() + 2 * n * d, x.end()), c, t);
  };
  Vec got = to_vec(dq);
  got.insert(got.end(), dk.begin(), dk.end());
  if (rows) got.insert(got.end(), dneg.begin(), dneg.end());
  const double grel = sizeof(T) == 8 ? 1e-6 : 1e-3 * std::max(1.0, 1.0 / t);
  check_grad(got, f, all, grel, tag + " gradient");
  const double h = 1e-6 * t;
  const double dt_num = grad_loss * (info_nce_ref(qv, kv, negv, c, t + h) - info_nce_ref(qv, kv, negv, c, t - h)) / (2 * h);
  check_close(dtemp, dt_num, grel * std::max(1.0, std::fabs(dt_num)), tag + " d/dtemperature");
}

// ------------------------------------------------------------------ singular values

// Eigenvalues of a symmetric k x k matrix by cyclic Jacobi rotations (double), descending.
Vec symmetric_eigenvalues(Vec a, int64_t k) {
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (int64_t p = 0; p < k; ++p)
      for (int64_t q = p + 1; q < k; ++q) off += a[p * k + q] * a[p * k + q];
    if (off < 1e-300) break;
    for (int64_t p = 0; p < k; ++p)
      for (int64_t q = p + 1; q < k; ++q) {
        const double apq = a[p * k + q];
        if (apq == 0) continue;
        const double theta = (a[q * k + q] - a[p * k + p]) / (2 * apq);
        const double tt = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double cs = 1 / std::sqrt(tt * tt + 1), sn = tt * cs;
        for (int64_t r = 0; r < k; ++r) {  // A <- A J
          const double arp = a[r * k + p], arq = a[r * k + q];
          a[r * k + p] = cs * arp - sn * arq;
          a[r * k + q] = sn * arp + cs * arq;
        }
        for (int64_t r = 0; r < k; ++r) {  // A <- J^T A
          const double apr = a[p * k + r], aqr = a[q * k + r];
          a[p * k + r] = cs * apr - sn * aqr;
          a[q * k + r] = sn * apr + cs * aqr;
        }
      }
  }
  Vec e(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) e[i] = a[i * k + i];
  std::sort(e.begin(), e.end(), std::greater<double>());
  return e;
}

// Gram matrix A^T A of matrix b of a [batch, rows, cols] logical (row-major) array.
Vec gram_ref(const Vec& m, int64_t b, int64_t rows, int64_t cols) {
  Vec g(static_cast<size_t>(cols * cols), 0);
  const double* a = m.data() + b * rows * cols;
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double s = 0;
      for (int64_t r = 0; r < rows; ++r) s += a[r * cols + i] * a[r * cols + j];
      g[i * cols + j] = s;
    }
  return g;
}

template <typename T>
void test_svdvals(int64_t batch, int64_t rows, int64_t cols, bool transposed, int threads) {
  const std::string tag = "svdvals<" + std::string(sizeof(T) == 8 ? "f64" : "f32") + "> batch=" +
                          std::to_string(batch) + " " + std::to_string(rows) + "x" + std::to_string(cols) +
                          (transposed ? " (strided)" : "") + " threads=" + std::to_string(threads);
  // Logical [batch, rows, cols]; stored row-major, or each matrix column-major with a
  // padded batch stride (how the Python layer passes a wide matrix as its transpose).
  Vec logical = randn(batch * rows * cols);
  for (int64_t b = 0; b < batch; ++b)  // spread the singular values over decades
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) logical[(b * rows + r) * cols + c] *= std::pow(10.0, -2.0 * c / cols);
  const int64_t bs = rows * cols + (transposed ? 5 : 0);
  std::vector<T> buf(static_cast<size_t>((batch - 1) * bs + rows * cols), T(0));
  const int64_t rs = transposed ? 1 : cols, cs = transposed ? rows : 1;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        buf[b * bs + r * rs + c * cs] = static_cast<T>(logical[(b * rows + r) * cols + c]);
        logical[(b * rows + r) * cols + c] = static_cast<double>(buf[b * bs + r * rs + c * cs]);
      }
  const BatchView view{buf.data(), dtype_of<T>(), batch, rows, cols, bs, rs, cs};
  std::vector<T> sj(static_cast<size_t>(batch * cols), T(NAN)), sg(static_cast<size_t>(batch * cols), T(NAN));
  std::vector<int32_t> ij(static_cast<size_t>(batch), -7), ig(static_cast<size_t>(batch), -7);
  std::vector<double> g(static_cast<size_t>(batch * cols * cols), NAN);
  check(svdvals_jacobi(view, sj.data(), ij.data(), 30, threads) == Status::Ok, tag + " jacobi status");
  check(svdvals_gram(view, sg.data(), ig.data(), threads) == Status::Ok, tag + " gram status");
  check(gram_float64(view, g.data(), threads) == Status::Ok, tag + " gram_float64 status");
  for (int64_t b = 0; b < batch; ++b) {
    const Vec gr = gram_ref(logical, b, rows, cols);
    check_all_close(Vec(g.begin() + b * cols * cols, g.begin() + (b + 1) * cols * cols), gr, 1e-12,
                    tag + " gram_float64 b=" + std::to_string(b));
    Vec s = symmetric_eigenvalues(gr, cols);
    for (auto& x : s) x = std::sqrt(std::max(x, 0.0));
    const double smax = s[0];
    const double tol = (sizeof(T) == 8 ? 1e-7 : 1e-5) * smax;  // the documented promise (x sigma_max)
    const Vec got_j(sj.begin() + b * cols, sj.begin() + (b + 1) * cols);
    const Vec got_g(sg.begin() + b * cols, sg.begin() + (b + 1) * cols);
    check(max_err(got_j, s) <= tol, tag + " jacobi values b=" + std::to_string(b));
    check(max_err(got_g, s) <= tol, tag + " gram values b=" + std::to_string(b));
    check(ij[b] == 0 && ig[b] == 0, tag + " info == 0 b=" + std::to_string(b));
    check(std::is_sorted(got_j.rbegin(), got_j.rend()), tag + " jacobi descending");
  }
  // Status codes: NaN, a wide view, no matrices, no sweeps.
  const T saved = buf[0];
  buf[0] = std::numeric_limits<T>::quiet_NaN();
  check(svdvals_jacobi(view, sj.data(), ij.data(), 30, threads) == Status::NonFiniteFirstInput, tag + " jacobi NaN");
  check(svdvals_gram(view, sg.data(), ig.data(), threads) == Status::NonFiniteFirstInput, tag + " gram NaN");
  buf[0] = std::numeric_limits<T>::infinity();
  check(svdvals_jacobi(view, sj.data(), ij.data(), 30, threads) == Status::NonFiniteFirstInput, tag + " jacobi Inf");
  buf[0] = saved;
  BatchView bad = view;
  bad.batch = 0;
  check(svdvals_jacobi(bad, sj.data(), ij.data(), 30, threads) == Status::BadArgument, tag + " batch 0");
  check(svdvals_gram(bad, sg.data(), ig.data(), threads) == Status::BadArgument, tag + " gram batch 0");
  check(svdvals_jacobi(view, sj.data(), ij.data(), 0, threads) == Status::BadArgument, tag + " max_sweeps 0");
  if (rows > cols) {
    bad = view;
    std::swap(bad.rows, bad.cols);
    check(svdvals_jacobi(bad, sj.data(), ij.data(), 30, threads) == Status::BadArgument, tag + " wide view");
  }
}

void test_jacobi_budget() {
  // One sweep cannot converge a random 24 x 24 matrix: info must say so.
  const int64_t m = 24;
  Vec a = randn(m * m);
  std::vector<float> buf(a.begin(), a.end());
  const BatchView view{buf.data(), DType::Float32, 1, m, m, m * m, m, 1};
  std::vector<float> s(static_cast<size_t>(m));
  std::vector<int32_t> info(1, -7);
  check(svdvals_jacobi(view, s.data(), info.data(), 1, 1) == Status::Ok && info[0] == 1,
        "svdvals_jacobi: max_sweeps=1 reports info=1");
}

// ------------------------------------------------------------------ attention

// Masked-patch problem: S samples of L tokens, H heads, Dh dims; query rows of sample s
// are index[s, 0:count[s]] (unique, the rest -1), key rows likewise.
struct AttnCase {
  int64_t S, L, Lk, H, Dh, Kq, Kk;
};

template <typename T>
void test_attention(const AttnCase& c, int threads) {
  const std::string tag = "attention<" + std::string(sizeof(T) == 8 ? "f64" : "f32") + "> S=" +
                          std::to_string(c.S) + " L=" + std::to_string(c.L) + " H=" + std::to_string(c.H) +
                          " Dh=" + std::to_string(c.Dh) + " threads=" + std::to_string(threads);
  const int64_t S = c.S, H = c.H, Dh = c.Dh;
  const int64_t qsz = S * c.L * H * Dh, ksz = S * c.Lk * H * Dh;
  Vec qv = randn(qsz), kv = randn(ksz), vv = randn(ksz);
  std::vector<T> q(qv.begin(), qv.end()), k(kv.begin(), kv.end()), v(vv.begin(), vv.end());
  for (int64_t i = 0; i < qsz; ++i) qv[i] = q[i];
  for (int64_t i = 0; i < ksz; ++i) { kv[i] = k[i]; vv[i] = v[i]; }
  // Index rows: sample s keeps a shuffled subset, count varies (sample 0 may keep 0 keys).
  std::vector<int64_t> qi(static_cast<size_t>(S * c.Kq), -1), ki(static_cast<size_t>(S * c.Kk), -1);
  std::vector<int64_t> qc(static_cast<size_t>(S)), kc(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) {
    std::vector<int64_t> perm(static_cast<size_t>(c.L)), permk(static_cast<size_t>(c.Lk));
    for (int64_t i = 0; i < c.L; ++i) perm[i] = i;
    for (int64_t i = 0; i < c.Lk; ++i) permk[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    std::shuffle(permk.begin(), permk.end(), rng);
    qc[s] = c.Kq - (s % 3);
    kc[s] = s == 0 ? 0 : c.Kk - (s % 2);
    for (int64_t i = 0; i < qc[s]; ++i) qi[s * c.Kq + i] = perm[i];
    for (int64_t i = 0; i < kc[s]; ++i) ki[s * c.Kk + i] = permk[i];
  }
  std::vector<int64_t> out_base(static_cast<size_t>(S)), lse_base(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) { out_base[s] = s * c.Kq; lse_base[s] = s * H * c.Kq; }
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
  const AttentionOperand Q{q.data(), c.L * H * Dh, H * Dh, Dh}, K{k.data(), c.Lk * H * Dh, H * Dh, Dh},
      V{v.data(), c.Lk * H * Dh, H * Dh, Dh};
  AttentionProblem p{S, H, Dh, dtype_of<T>(), Q, K, V, AttentionRows{nullptr, qc.data(), qi.data(), c.Kq},
                     AttentionRows{nullptr, kc.data(), ki.data(), c.Kk}, out_base.data(), lse_base.data(),
                     c.Kq, scale};
  const int64_t out_rows = S * c.Kq;
  std::vector<T> out(static_cast<size_t>(out_rows * H * Dh), T(0));
  std::vector<double> lse(static_cast<size_t>(S * H * c.Kq), 0.0);
  check(attention_forward(p, out.data(), lse.data(), threads) == Status::Ok, tag + " forward status");
  const Vec g = randn(out_rows * H * Dh);  // upstream gradient
  // f(q, k, v) = sum(out * g), in double, on the logical tensors.
  const auto forward_ref = [&](const Vec& qx, const Vec& kx, const Vec& vx, Vec* o) {
    double f = 0;
    if (o) o->assign(static_cast<size_t>(out_rows * H * Dh), 0);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < qc[s]; ++i)
        for (int64_t h = 0; h < H; ++h) {
          const double* qr = qx.data() + ((s * c.L + qi[s * c.Kq + i]) * H + h) * Dh;
          Vec logits;
          for (int64_t j = 0; j < kc[s]; ++j) {
            const double* kr = kx.data() + ((s * c.Lk + ki[s * c.Kk + j]) * H + h) * Dh;
            double d = 0;
            for (int64_t e = 0; e < Dh; ++e) d += qr[e] * kr[e];
            logits.push_back(scale * d);
          }
          const double l = kc[s] ? log_sum_exp(logits) : 0;
          for (int64_t e = 0; e < Dh; ++e) {
            double acc = 0;
            for (int64_t j = 0; j < kc[s]; ++j)
              acc += std::exp(logits[j] - l) * vx[((s * c.Lk + ki[s * c.Kk + j]) * H + h) * Dh + e];
            const int64_t o_at = ((out_base[s] + i) * H + h) * Dh + e;
            if (o) (*o)[o_at] = acc;
            f += acc * g[o_at];
          }
        }
    return f;
  };
  Vec oref;
  forward_ref(qv, kv, vv, &oref);
  // Padding rows (beyond each sample's count) are not written: compare written rows only.
  Vec got_o(oref.size(), 0);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t i = 0; i < qc[s]; ++i)
      for (int64_t x = 0; x < H * Dh; ++x) got_o[(out_base[s] + i) * H * Dh + x] = out[(out_base[s] + i) * H * Dh + x];
  check_all_close(got_o, oref, sizeof(T) == 8 ? 1e-10 : 1e-5, tag + " output");

  std::vector<T> gout(g.begin(), g.end());
  std::vector<T> dq(q.size(), T(0)), dk(k.size(), T(0)), dv(v.size(), T(0));
  const AttentionOperand DQ{dq.data(), c.L * H * Dh, H * Dh, Dh}, DK{dk.data(), c.Lk * H * Dh, H * Dh, Dh},
      DV{dv.data(), c.Lk * H * Dh, H * Dh, Dh};
  check(attention_backward(p, gout.data(), out.data(), lse.data(), DQ, DK, DV, threads) == Status::Ok,
        tag + " backward status");
  const double grel = sizeof(T) == 8 ? 1e-6 : 1e-3;
  check_grad(to_vec(dq), [&](const Vec& x) { return forward_ref(x, kv, vv, nullptr); }, qv, grel, tag + " dq");
  check_grad(to_vec(dk), [&](const Vec& x) { return forward_ref(qv, x, vv, nullptr); }, kv, grel, tag + " dk");
  check_grad(to_vec(dv), [&](const Vec& x) { return forward_ref(qv, kv, x, nullptr); }, vv, grel, tag + " dv");

  // Status codes: NaN in a row that is read names its operand; bad sizes are rejected.
  const int64_t read_q = ((1 * c.L + qi[1 * c.Kq]) * H) * Dh, read_k = ((1 * c.Lk + ki[1 * c.Kk]) * H) * Dh;
  const T sq = q[read_q];
  q[read_q] = std::numeric_limits<T>::quiet_NaN();
  check(attention_forward(p, out.data(), lse.data(), threads) == Status::NonFiniteFirstInput, tag + " NaN in q");
  q[read_q] = sq;
  const T sk = k[read_k];
  k[read_k] = std::numeric_limits<T>::infinity();
  check(attention_forward(p, out.data(), lse.data(), threads) == Status::NonFiniteSecondInput, tag + " Inf in k");
  k[read_k] = sk;
  const T sv = v[read_k];
  v[read_k] = std::numeric_limits<T>::quiet_NaN();
  check(attention_forward(p, out.data(), lse.data(), threads) == Status::NonFiniteThirdInput, tag + " NaN in v");
  v[read_k] = sv;
  AttentionProblem bad = p;
  bad.heads = 0;
  check(attention_forward(bad, out.data(), lse.data(), threads) == Status::BadArgument, tag + " heads 0");
  bad = p;
  bad.scale = NAN;
  check(attention_forward(bad, out.data(), lse.data(), threads) == Status::BadArgument, tag + " NaN scale");
  std::vector<int64_t> neg_count(qc);
  neg_count[0] = -1;
  bad = p;
  bad.query.count = neg_count.data();
  check(attention_forward(bad, out.data(), lse.data(), threads) == Status::BadArgument, tag + " negative count");
}

// ------------------------------------------------------------------ statuses of the losses

void test_loss_statuses() {
  const int64_t n = 5, d = 3;
  const Stored<float> a(randn(n * d), n, d, 0), b(randn(n * d), n, d, 0);
  std::vector<double> lse(2 * n);
  std::vector<float> dz1(n * d), dz2(n * d);
  double loss = 0;
  const MatrixView va = a.view(DType::Float32), vb = b.view(DType::Float32);
  for (double t : {0.0, -1.0, static_cast<double>(NAN), static_cast<double>(INFINITY)})
    check(nt_xent_forward(va, vb, t, true, lse.data(), &loss, 1) == Status::BadArgument,
          "nt_xent temperature " + std::to_string(t) + " -> BadArgument");
  MatrixView shorter = vb;
  shorter.rows = n - 1;
  check(nt_xent_forward(va, shorter, 0.5, true, lse.data(), &loss, 1) == Status::BadArgument,
        "nt_xent row mismatch -> BadArgument");
  MatrixView other_type = vb;
  other_type.dtype = DType::Float64;
  check(nt_xent_forward(va, other_type, 0.5, true, lse.data(), &loss, 1) == Status::BadArgument,
        "nt_xent dtype mismatch -> BadArgument");
  MatrixView empty = va;
  empty.rows = 0;
  check(nt_xent_forward(empty, empty, 0.5, true, lse.data(), &loss, 1) == Status::BadArgument,
        "nt_xent zero rows -> BadArgument");
  check(nt_xent_backward(va, vb, lse.data(), 0.5, true, NAN, dz1.data(), dz2.data(), 1) == Status::BadArgument,
        "nt_xent NaN grad_loss -> BadArgument");
  // NaN / Inf inputs name the operand.
  Stored<float> nan_a(a);
  nan_a.buf[4] = NAN;
  check(nt_xent_forward(nan_a.view(DType::Float32), vb, 0.5, true, lse.data(), &loss, 1) ==
            Status::NonFiniteFirstInput, "nt_xent NaN in z1 -> NonFiniteFirstInput");
  Stored<float> inf_b(b);
  inf_b.buf[n * d - 1] = -INFINITY;
  check(nt_xent_forward(va, inf_b.view(DType::Float32), 0.5, true, lse.data(), &loss, 1) ==
            Status::NonFiniteSecondInput, "nt_xent Inf in z2 -> NonFiniteSecondInput");
  // Unnormalised huge inputs overflow the float32 logits: NonFiniteResult, never NaN.
  Stored<float> huge(a);
  for (auto& x : huge.buf) x *= 1e19f;
  const Status st = nt_xent_forward(huge.view(DType::Float32), huge.view(DType::Float32), 0.5, false, lse.data(), &loss, 1);
  check(st == Status::NonFiniteResult || (st == Status::Ok && std::isfinite(loss)),
        "nt_xent overflowing logits -> NonFiniteResult (or a finite loss)");
  // InfoNCE argument checks.
  std::vector<float> lq(n), lk(n);
  const MatrixView none{nullptr, DType::Float32, 0, d, d, 1};
  check(info_nce_forward(va, vb, none, 0, 0.1, true, true, true, lq.data(), nullptr, &loss, 1) == Status::BadArgument,
        "info_nce symmetric without lse_key -> BadArgument");
  check(info_nce_forward(va, vb, none, 0, 0.1, true, true, false, lq.data(), lk.data(), &loss, 1) ==
            Status::BadArgument, "info_nce symmetric without in-batch negatives -> BadArgument");
  const Stored<float> neg(randn(4 * d), 4, d, 0);
  check(info_nce_forward(va, vb, neg.view(DType::Float32), 3, 0.1, true, false, true, lq.data(), nullptr, &loss, 1) ==
            Status::BadArgument, "info_nce per-query rows != N * M -> BadArgument");
  check(info_nce_forward(va, vb, neg.view(DType::Float32), -1, 0.1, true, false, true, lq.data(), nullptr, &loss, 1) ==
            Status::BadArgument, "info_nce negative per_query -> BadArgument");
  Stored<float> nan_neg(neg);
  nan_neg.buf[2] = NAN;
  const Status sn = info_nce_forward(va, vb, nan_neg.view(DType::Float32), 0, 0.1, true, false, true, lq.data(),
                                     nullptr, &loss, 1);
  check(sn == Status::NonFiniteThirdInput, "info_nce NaN in negatives -> NonFiniteThirdInput");
  // InfoNCE retrieval terms: both id arrays or neither, finite biases, shared candidates only.
  std::vector<double> lse_q(n), lse_k(n), bias(static_cast<size_t>(n + 4), 0.5);
  std::vector<int64_t> same_ids(static_cast<size_t>(n + 4), 7);
  CandidateTerms half_ids;
  half_ids.anchor_ids = same_ids.data();
  check(info_nce_forward(va, vb, none, 0, 0.1, true, false, true, lse_q.data(), nullptr, &loss, 1, half_ids) ==
            Status::BadArgument, "info_nce anchor ids without candidate ids -> BadArgument");
  CandidateTerms bad_bias;
  bias[1] = NAN;
  bad_bias.bias = bias.data();
  check(info_nce_forward(va, vb, none, 0, 0.1, true, false, true, lse_q.data(), nullptr, &loss, 1, bad_bias) ==
            Status::BadArgument, "info_nce NaN bias -> BadArgument");
  bias[1] = 0.5;
  CandidateTerms ids_only;
  ids_only.anchor_ids = same_ids.data();
  ids_only.candidate_ids = same_ids.data();
  const Stored<float> hard(randn(n * 2 * d), n * 2, d, 0);
  check(info_nce_forward(va, vb, hard.view(DType::Float32), 2, 0.1, true, false, true, lse_q.data(), nullptr, &loss,
                         1, ids_only) == Status::BadArgument, "info_nce terms with per-query negatives -> BadArgument");
  // Every candidate a duplicate of the positive: each row's loss is exactly 0, both directions,
  // with the bias cancelling (the positive carries it too).
  CandidateTerms all_dup = ids_only;
  all_dup.bias = bias.data();
  check(info_nce_forward(va, vb, neg.view(DType::Float32), 0, 0.1, true, false, true, lse_q.data(), nullptr, &loss,
                         1, all_dup) == Status::Ok && loss == 0.0, "info_nce all duplicates (queue) -> loss exactly 0");
  check(info_nce_forward(va, vb, none, 0, 0.1, true, true, true, lse_q.data(), lse_k.data(), &loss, 2, all_dup) ==
            Status::Ok && loss == 0.0, "CLIP all duplicates -> loss exactly 0");
  // SupCon: no classes.
  std::vector<int64_t> ids(n, 0), counts(1, n);
  check(sup_con_forward(va, ids.data(), counts.data(), 0, 0.1, true, lse.data(), &loss, 1) == Status::BadArgument,
        "sup_con zero classes -> BadArgument");
}

}  // namespace

// `--overflow`: hand nt_xent_forward an lse buffer one element short. Under ASan this must
// print a heap-buffer-overflow report (CTest `sanitizer_sees_overflow` passes only on that
// report): proof that the sanitizer is live in the kernels.
int overflow_on_purpose() {
  const int64_t n = 5, d = 3;
  const Stored<float> a(randn(n * d), n, d, 0);
  std::vector<double> lse(static_cast<size_t>(2 * n - 1));
  double loss = 0;
  nt_xent_forward(a.view(DType::Float32), a.view(DType::Float32), 0.5, true, lse.data(), &loss, 1);
  std::printf("no sanitizer report for a write past the end\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--overflow") == 0) return overflow_on_purpose();
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // failures show even if a sanitizer aborts later
  scipy_openblas_set_num_threads(1);
  // Sizes around the tile boundaries (64 / 128 / 256 rows), 1, and odd feature dims;
  // thread counts 1 and 2.
  for (int threads : {1, 2}) {
    for (int64_t n : {1, 2, 7, 65}) {
      test_nt_xent<float>(n, 3, 0.5, true, static_cast<int>(n % 3), threads);
      test_nt_xent<double>(n, 5, 0.1, true, static_cast<int>((n + 1) % 3), threads);
    }
    test_nt_xent<double>(9, 4, 2.0, false, 1, threads);
    test_nt_xent<float>(33, 130, 0.07, true, 2, threads);

    test_sup_con<double>(1, 3, 1, 0.1, 0, threads);
    test_sup_con<double>(9, 5, 3, 0.1, 1, threads);
    test_sup_con<float>(31, 7, 4, 0.5, 2, threads);
    test_sup_con<double>(6, 4, 6, 0.2, 0, threads);  // every anchor alone: loss 0

    test_info_nce<double>({7, 5, 0, 0, false, true, true}, 0.07, threads);
    test_info_nce<double>({6, 4, 5, 0, false, true, true}, 0.2, threads);
    test_info_nce<double>({5, 3, 4, 0, false, false, true}, 0.3, threads);
    test_info_nce<double>({5, 3, 0, 2, false, true, true}, 0.3, threads);
    test_info_nce<double>({8, 6, 0, 0, true, true, false}, 0.5, threads);
    test_info_nce<double>({1, 3, 3, 0, true, true, true}, 0.5, threads);
    test_info_nce<float>({17, 9, 11, 0, true, true, true}, 0.1, threads);

    test_svdvals<float>(3, 9, 5, false, threads);
    test_svdvals<float>(5, 7, 7, true, threads);
    test_svdvals<double>(2, 13, 6, true, threads);
    test_svdvals<float>(1, 1, 1, false, threads);
    test_svdvals<double>(17, 40, 33, false, threads);
    test_svdvals<float>(9, 300, 11, false, threads);  // taller than the Gram tiles

    test_attention<double>({3, 6, 5, 2, 3, 4, 5}, threads);
    test_attention<float>({4, 9, 9, 3, 5, 7, 6}, threads);
  }
  test_jacobi_budget();
  test_loss_statuses();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
