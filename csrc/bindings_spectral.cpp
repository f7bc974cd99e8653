// pybind11 bindings of the batched singular values (conventions: bindings_common.hpp).
#include <cstdint>

#include <pybind11/pybind11.h>

#include "bindings_common.hpp"
#include "sslkernels/spectral.hpp"

namespace py = pybind11;
using namespace sslkernels;
using sslkernels::bindings::as_mut_ptr;
using sslkernels::bindings::as_ptr;

namespace {

BatchView batch_view(std::uintptr_t ptr, int dtype, int64_t batch, int64_t rows, int64_t cols,
                     int64_t batch_stride, int64_t row_stride, int64_t col_stride) {
  return BatchView{as_ptr<void>(ptr), static_cast<DType>(dtype), batch, rows, cols,
                   batch_stride, row_stride, col_stride};
}

int svdvals_jacobi_binding(std::uintptr_t a, int dtype, int64_t batch, int64_t rows, int64_t cols,
                           int64_t batch_stride, int64_t row_stride, int64_t col_stride,
                           std::uintptr_t s, std::uintptr_t info, int max_sweeps, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(svdvals_jacobi(
      batch_view(a, dtype, batch, rows, cols, batch_stride, row_stride, col_stride),
      as_mut_ptr<void>(s), as_mut_ptr<int32_t>(info), max_sweeps, num_threads));
}

int svdvals_gram_binding(std::uintptr_t a, int dtype, int64_t batch, int64_t rows, int64_t cols,
                         int64_t batch_stride, int64_t row_stride, int64_t col_stride,
                         std::uintptr_t s, std::uintptr_t info, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(svdvals_gram(
      batch_view(a, dtype, batch, rows, cols, batch_stride, row_stride, col_stride),
      as_mut_ptr<void>(s), as_mut_ptr<int32_t>(info), num_threads));
}

int gram_float64_binding(std::uintptr_t a, int dtype, int64_t batch, int64_t rows, int64_t cols,
                         int64_t batch_stride, int64_t row_stride, int64_t col_stride,
                         std::uintptr_t g, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(gram_float64(
      batch_view(a, dtype, batch, rows, cols, batch_stride, row_stride, col_stride),
      as_mut_ptr<double>(g), num_threads));
}

}  // namespace

void register_spectral(py::module_& m) {
  m.def("svdvals_jacobi", &svdvals_jacobi_binding, py::kw_only(), py::arg("a"), py::arg("dtype"),
        py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("batch_stride"),
        py::arg("row_stride"), py::arg("col_stride"), py::arg("s"), py::arg("info"),
        py::arg("max_sweeps"), py::arg("num_threads"),
        "One-sided Jacobi singular values of a batch of (rows >= cols) matrices: writes s[B, cols] "
        "(descending) and info[B] (int32, 1 = sweep budget exhausted); returns a status code.");
  m.def("svdvals_gram", &svdvals_gram_binding, py::kw_only(), py::arg("a"), py::arg("dtype"),
        py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("batch_stride"),
        py::arg("row_stride"), py::arg("col_stride"), py::arg("s"), py::arg("info"),
        py::arg("num_threads"),
        "Singular values through float64 Gram matrices and LAPACK dsyevd, one matrix per thread: "
        "writes s[B, cols] (descending) and info[B]; returns a status code.");
  m.def("gram_float64", &gram_float64_binding, py::kw_only(), py::arg("a"), py::arg("dtype"),
        py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("batch_stride"),
        py::arg("row_stride"), py::arg("col_stride"), py::arg("g"), py::arg("num_threads"),
        "Float64 Gram matrices A^T A of a batch of (rows x cols) matrices: writes g[B, cols, cols]; "
        "returns a status code.");
}
