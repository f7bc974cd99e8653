// Batched singular values on the CPU: one-sided (Hestenes) Jacobi for small
// matrices, vectorised across matrices, and a float64 Gram for tall ones.
#pragma once

#include <cstdint>

#include "sslkernels/common.hpp"

namespace sslkernels {

// `batch` matrices, each `rows x cols` with rows >= cols (the caller passes a wide
// matrix as its transpose by swapping the strides). Element (b, i, j) lives at
// data[b * batch_stride + i * row_stride + j * col_stride].
struct BatchView {
  const void* data;
  DType dtype;
  int64_t batch;
  int64_t rows;
  int64_t cols;
  int64_t batch_stride;
  int64_t row_stride;
  int64_t col_stride;
};

// One-sided Jacobi: singular values of every matrix, descending, written to
// s[b * cols + j] (double for float64 input, float otherwise). info[b] = 0 when a
// full sweep rotated nothing (converged), 1 when `max_sweeps` sweeps ran out first.
// Returns NonFiniteFirstInput if any element is NaN/Inf (outputs then undefined).
Status svdvals_jacobi(const BatchView& a, void* s, int32_t* info, int max_sweeps, int num_threads);

// Gram route, one matrix per thread: G = A^T A in float64 (below), then LAPACK
// dsyevd eigenvalues; s[b * cols + j] = sqrt(max(lambda, 0)) descending (double
// for float64 input, float otherwise); info[b] = 1 if dsyevd failed.
Status svdvals_gram(const BatchView& a, void* s, int32_t* info, int num_threads);

// Gram matrices in float64: g[b] = A_b^T A_b, (cols x cols), full symmetric,
// accumulated from float64 copies of row tiles with OpenBLAS dsyrk.
Status gram_float64(const BatchView& a, double* g, int num_threads);

}  // namespace sslkernels
