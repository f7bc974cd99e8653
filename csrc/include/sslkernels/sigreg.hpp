// SIGReg (LeJEPA's sketched isotropic Gaussian regulariser) on the CPU: the
// characteristic-function statistics of x = proj @ directions at evenly spaced
// knots, and their backward, without ever holding x (N x S) whole, let alone the
// N x S x knots tensor an eager implementation builds.
#pragma once

#include <cstdint>

#include "sslkernels/common.hpp"

namespace sslkernels {

// proj: `batch` matrices [rows x dim], element (b, n, d) at
// proj[b * batch_stride + n * row_stride + d * col_stride];
// directions: [dim x num_directions], element (d, s) at
// directions[d * dir_row_stride + s * dir_col_stride], same dtype as proj.
// Knots t_k = k * t_max / (knots - 1), k = 0 .. knots - 1.
struct SigregProblem {
  const void* proj;
  const void* directions;
  DType dtype;
  int64_t batch, rows, dim, num_directions;
  int64_t batch_stride, row_stride, col_stride;
  int64_t dir_row_stride, dir_col_stride;
  int64_t knots;
  double t_max;
};

// cos_sum[(b * S + s) * knots + k] = sum_n cos(t_k x_bns), sin_sum likewise with sin,
// in float64. Two transcendentals per element (cos and sin of dt * x); the other knots
// follow by angle addition in float64. Bitwise identical for any thread count.
// Status: NonFiniteFirstInput / NonFiniteSecondInput for NaN/Inf in proj / directions,
// NonFiniteResult when finite inputs give a non-finite projection, BadArgument for sizes.
Status sigreg_stats(const SigregProblem& p, double* cos_sum, double* sin_sum, int num_threads);

// The backward of sigreg_stats: given dL/dcos_sum and dL/dsin_sum ([B, S, knots],
// float64), dL/dx_bns = sum_k -t_k sin(t_k x) g_cos + t_k cos(t_k x) g_sin, recomputed tile by
// tile, then dproj = dX directions^T (written to dproj, contiguous [B, N, D], proj's
// dtype) and, when ddirections is not null, ddirections = sum_b proj_b^T dX_b
// (contiguous [D, S], proj's dtype).
Status sigreg_stats_backward(const SigregProblem& p, const double* grad_cos, const double* grad_sin,
                             void* dproj, void* ddirections, int num_threads);

}  // namespace sslkernels
