// pybind11 bindings of the CPU core. Tensors cross as raw pointers (uintptr_t)
// plus sizes and element strides, so any dtype (bf16 included) passes and the
// module never links libtorch. The GIL is released around every kernel.
#include <cstdint>

#include <pybind11/pybind11.h>

#include "sslkernels/contrastive.hpp"
#include "sslkernels/spectral.hpp"

extern "C" void scipy_openblas_set_num_threads(int num_threads);
void register_attention(pybind11::module_& m);  // bindings_attention.cpp
void register_convert(pybind11::module_& m);    // bindings_convert.cpp

namespace py = pybind11;
using namespace sslkernels;

namespace {

MatrixView matrix(std::uintptr_t ptr, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                  int64_t col_stride) {
  return MatrixView{reinterpret_cast<const void*>(ptr), static_cast<DType>(dtype), rows, cols,
                    row_stride, col_stride};
}

int nt_xent_forward_binding(std::uintptr_t z1, std::uintptr_t z2, int dtype, int64_t n, int64_t d,
                            int64_t z1_row_stride, int64_t z1_col_stride, int64_t z2_row_stride,
                            int64_t z2_col_stride, double temperature, bool normalize,
                            std::uintptr_t lse, std::uintptr_t loss, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(nt_xent_forward(
      matrix(z1, dtype, n, d, z1_row_stride, z1_col_stride),
      matrix(z2, dtype, n, d, z2_row_stride, z2_col_stride), temperature, normalize,
      reinterpret_cast<void*>(lse), reinterpret_cast<double*>(loss), num_threads));
}

int nt_xent_backward_binding(std::uintptr_t z1, std::uintptr_t z2, int dtype, int64_t n, int64_t d,
                             int64_t z1_row_stride, int64_t z1_col_stride, int64_t z2_row_stride,
                             int64_t z2_col_stride, std::uintptr_t lse, double temperature,
                             bool normalize, double grad_loss, std::uintptr_t dz1,
                             std::uintptr_t dz2, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(nt_xent_backward(
      matrix(z1, dtype, n, d, z1_row_stride, z1_col_stride),
      matrix(z2, dtype, n, d, z2_row_stride, z2_col_stride), reinterpret_cast<const void*>(lse),
      temperature, normalize, grad_loss, reinterpret_cast<void*>(dz1),
      reinterpret_cast<void*>(dz2), num_threads));
}

int sup_con_forward_binding(std::uintptr_t features, int dtype, int64_t n, int64_t d,
                            int64_t row_stride, int64_t col_stride, std::uintptr_t class_ids,
                            std::uintptr_t class_counts, int64_t num_classes, double temperature,
                            bool normalize, std::uintptr_t lse, std::uintptr_t loss, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(sup_con_forward(
      matrix(features, dtype, n, d, row_stride, col_stride),
      reinterpret_cast<const int64_t*>(class_ids), reinterpret_cast<const int64_t*>(class_counts),
      num_classes, temperature, normalize, reinterpret_cast<void*>(lse),
      reinterpret_cast<double*>(loss), num_threads));
}

int sup_con_backward_binding(std::uintptr_t features, int dtype, int64_t n, int64_t d,
                             int64_t row_stride, int64_t col_stride, std::uintptr_t class_ids,
                             std::uintptr_t class_counts, int64_t num_classes, std::uintptr_t lse,
                             double temperature, bool normalize, double grad_loss,
                             std::uintptr_t dfeatures, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(sup_con_backward(
      matrix(features, dtype, n, d, row_stride, col_stride),
      reinterpret_cast<const int64_t*>(class_ids), reinterpret_cast<const int64_t*>(class_counts),
      num_classes, reinterpret_cast<const void*>(lse), temperature, normalize, grad_loss,
      reinterpret_cast<void*>(dfeatures), num_threads));
}

// negatives_rows == 0: no shared negatives (the pointer is ignored).
int info_nce_forward_binding(std::uintptr_t query, std::uintptr_t key, std::uintptr_t negatives,
                             int dtype, int64_t n, int64_t d, int64_t negatives_rows,
                             int64_t negatives_per_query,
                             int64_t q_row_stride, int64_t q_col_stride, int64_t k_row_stride,
                             int64_t k_col_stride, int64_t n_row_stride, int64_t n_col_stride,
                             double temperature, bool normalize, bool symmetric,
                             bool in_batch_negatives, std::uintptr_t lse_query,
                             std::uintptr_t lse_key, std::uintptr_t loss, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(info_nce_forward(
      matrix(query, dtype, n, d, q_row_stride, q_col_stride),
      matrix(key, dtype, n, d, k_row_stride, k_col_stride),
      matrix(negatives, dtype, negatives_rows, d, n_row_stride, n_col_stride), negatives_per_query,
      temperature,
      normalize, symmetric, in_batch_negatives, reinterpret_cast<void*>(lse_query),
      reinterpret_cast<void*>(lse_key),
      reinterpret_cast<double*>(loss), num_threads));
}

int info_nce_backward_binding(std::uintptr_t query, std::uintptr_t key, std::uintptr_t negatives,
                              int dtype, int64_t n, int64_t d, int64_t negatives_rows,
                             int64_t negatives_per_query,
                              int64_t q_row_stride, int64_t q_col_stride, int64_t k_row_stride,
                              int64_t k_col_stride, int64_t n_row_stride, int64_t n_col_stride,
                              std::uintptr_t lse_query, std::uintptr_t lse_key, double temperature,
                              bool normalize, bool symmetric, bool in_batch_negatives,
                              double grad_loss,
                              std::uintptr_t dquery, std::uintptr_t dkey,
                              std::uintptr_t dnegatives, std::uintptr_t dtemperature,
                              int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(info_nce_backward(
      matrix(query, dtype, n, d, q_row_stride, q_col_stride),
      matrix(key, dtype, n, d, k_row_stride, k_col_stride),
      matrix(negatives, dtype, negatives_rows, d, n_row_stride, n_col_stride), negatives_per_query,
      reinterpret_cast<const void*>(lse_query), reinterpret_cast<const void*>(lse_key), temperature,
      normalize, symmetric, in_batch_negatives, grad_loss, reinterpret_cast<void*>(dquery), reinterpret_cast<void*>(dkey),
      reinterpret_cast<void*>(dnegatives), reinterpret_cast<double*>(dtemperature), num_threads));
}

int info_nce_loss_and_grads_binding(std::uintptr_t query, std::uintptr_t key,
                                    std::uintptr_t negatives, int dtype, int64_t n, int64_t d,
                                    int64_t negatives_rows, int64_t q_row_stride,
                                    int64_t q_col_stride, int64_t k_row_stride, int64_t k_col_stride,
                                    int64_t n_row_stride, int64_t n_col_stride, double temperature,
                                    bool normalize, std::uintptr_t loss, std::uintptr_t dquery,
                                    std::uintptr_t dkey, std::uintptr_t dnegatives,
                                    std::uintptr_t dtemperature, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(info_nce_loss_and_grads(
      matrix(query, dtype, n, d, q_row_stride, q_col_stride),
      matrix(key, dtype, n, d, k_row_stride, k_col_stride),
      matrix(negatives, dtype, negatives_rows, d, n_row_stride, n_col_stride), temperature, normalize,
      reinterpret_cast<double*>(loss), reinterpret_cast<void*>(dquery), reinterpret_cast<void*>(dkey),
      reinterpret_cast<void*>(dnegatives), reinterpret_cast<double*>(dtemperature), num_threads));
}

BatchView batch_view(std::uintptr_t ptr, int dtype, int64_t batch, int64_t rows, int64_t cols,
                     int64_t batch_stride, int64_t row_stride, int64_t col_stride) {
  return BatchView{reinterpret_cast<const void*>(ptr), static_cast<DType>(dtype), batch, rows, cols,
                   batch_stride, row_stride, col_stride};
}

int svdvals_jacobi_binding(std::uintptr_t a, int dtype, int64_t batch, int64_t rows, int64_t cols,
                           int64_t batch_stride, int64_t row_stride, int64_t col_stride,
                           std::uintptr_t s, std::uintptr_t info, int max_sweeps, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(svdvals_jacobi(
      batch_view(a, dtype, batch, rows, cols, batch_stride, row_stride, col_stride),
      reinterpret_cast<void*>(s), reinterpret_cast<int32_t*>(info), max_sweeps, num_threads));
}

int svdvals_gram_binding(std::uintptr_t a, int dtype, int64_t batch, int64_t rows, int64_t cols,
                         int64_t batch_stride, int64_t row_stride, int64_t col_stride,
                         std::uintptr_t s, std::uintptr_t info, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(svdvals_gram(
      batch_view(a, dtype, batch, rows, cols, batch_stride, row_stride, col_stride),
      reinterpret_cast<void*>(s), reinterpret_cast<int32_t*>(info), num_threads));
}

int gram_float64_binding(std::uintptr_t a, int dtype, int64_t batch, int64_t rows, int64_t cols,
                         int64_t batch_stride, int64_t row_stride, int64_t col_stride,
                         std::uintptr_t g, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(gram_float64(
      batch_view(a, dtype, batch, rows, cols, batch_stride, row_stride, col_stride),
      reinterpret_cast<double*>(g), num_threads));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslkernels CPU core (C++, OpenBLAS tile products, OpenMP over tiles)";
  // Our kernels parallelise over tiles; BLAS stays single-threaded inside them.
  scipy_openblas_set_num_threads(1);
  m.def("nt_xent_forward", &nt_xent_forward_binding,
        "Fused NT-Xent forward: writes lse[2N] and the scalar loss (float64); returns a status code.");
  m.def("nt_xent_backward", &nt_xent_backward_binding,
        "Fused NT-Xent backward: writes dz1, dz2 (contiguous, inputs' dtype); returns a status code.");
  m.def("sup_con_forward", &sup_con_forward_binding,
        "Fused SupCon forward: writes lse[N] and the scalar loss (float64); returns a status code.");
  m.def("sup_con_backward", &sup_con_backward_binding,
        "Fused SupCon backward: writes dfeatures (contiguous, inputs' dtype); returns a status code.");
  m.def("info_nce_forward", &info_nce_forward_binding,
        "Fused InfoNCE / CLIP forward: writes lse_query[N] (and lse_key[N] when symmetric) and the loss.");
  m.def("info_nce_backward", &info_nce_backward_binding,
        "Fused InfoNCE / CLIP backward: writes dquery, dkey and (if given) dnegatives and dtemperature.");
  m.def("info_nce_loss_and_grads", &info_nce_loss_and_grads_binding,
        "Fused one-direction InfoNCE loss and its gradients (grad_loss = 1) in one sweep: writes "
        "the loss, dquery, dkey and (if given) dnegatives and dtemperature.");
  m.def("svdvals_jacobi", &svdvals_jacobi_binding,
        "One-sided Jacobi singular values of a batch of (rows >= cols) matrices: writes s[B, cols] "
        "(descending) and info[B] (int32, 1 = sweep budget exhausted); returns a status code.");
  m.def("svdvals_gram", &svdvals_gram_binding,
        "Singular values through float64 Gram matrices and LAPACK dsyevd, one matrix per thread: "
        "writes s[B, cols] (descending) and info[B]; returns a status code.");
  m.def("gram_float64", &gram_float64_binding,
        "Float64 Gram matrices A^T A of a batch of (rows x cols) matrices: writes g[B, cols, cols]; "
        "returns a status code.");
  register_attention(m);
  register_convert(m);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
