// pybind11 bindings of the KoLeo core (conventions of bindings.cpp: tensors as uintptr_t,
// sizes and strides in elements, keyword-only arguments, GIL released, a status code back).
#include <cstdint>

#include <pybind11/pybind11.h>

#include "sslkernels/koleo.hpp"

namespace py = pybind11;
using namespace sslkernels;

namespace {

KoleoSearch problem(std::uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                    int64_t col_stride, int64_t query_offset, int64_t query_count, int64_t group_size,
                    int64_t topk, double eps) {
  return KoleoSearch{MatrixView{reinterpret_cast<const void*>(x), static_cast<DType>(dtype), rows, cols,
                                row_stride, col_stride},
                     query_offset, query_count, group_size, topk, eps};
}

int neighbors_binding(std::uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                      int64_t col_stride, int64_t query_offset, int64_t query_count, int64_t group_size,
                      int64_t topk, double eps, std::uintptr_t indices, int num_threads) {
  const KoleoSearch p = problem(x, dtype, rows, cols, row_stride, col_stride, query_offset, query_count,
                                group_size, topk, eps);
  py::gil_scoped_release release;
  return static_cast<int>(koleo_neighbors(p, reinterpret_cast<int64_t*>(indices), num_threads));
}

int loss_forward_binding(std::uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                         int64_t col_stride, int64_t query_offset, int64_t query_count, int64_t group_size,
                         int64_t topk, double eps, std::uintptr_t indices, std::uintptr_t loss,
                         int num_threads) {
  const KoleoSearch p = problem(x, dtype, rows, cols, row_stride, col_stride, query_offset, query_count,
                                group_size, topk, eps);
  py::gil_scoped_release release;
  return static_cast<int>(koleo_loss_forward(p, reinterpret_cast<const int64_t*>(indices),
                                             reinterpret_cast<double*>(loss), num_threads));
}

int loss_backward_binding(std::uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                          int64_t col_stride, int64_t query_offset, int64_t query_count, int64_t group_size,
                          int64_t topk, double eps, std::uintptr_t indices, double grad_loss,
                          std::uintptr_t dx, int num_threads) {
  const KoleoSearch p = problem(x, dtype, rows, cols, row_stride, col_stride, query_offset, query_count,
                                group_size, topk, eps);
  py::gil_scoped_release release;
  return static_cast<int>(koleo_loss_backward(p, reinterpret_cast<const int64_t*>(indices), grad_loss,
                                              reinterpret_cast<void*>(dx), num_threads));
}

}  // namespace

void register_koleo(py::module_& m) {
  m.def("koleo_neighbors", &neighbors_binding, py::kw_only(), py::arg("x"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("row_stride"), py::arg("col_stride"), py::arg("query_offset"),
        py::arg("query_count"), py::arg("group_size"), py::arg("topk"), py::arg("eps"), py::arg("indices"),
        py::arg("num_threads"),
        "KoLeo nearest-neighbour search: writes indices[query_count, topk] (int64, best first, ties "
        "to the smaller index); returns a status code.");
  m.def("koleo_loss_forward", &loss_forward_binding, py::kw_only(), py::arg("x"), py::arg("dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("col_stride"), py::arg("query_offset"),
        py::arg("query_count"), py::arg("group_size"), py::arg("topk"), py::arg("eps"), py::arg("indices"),
        py::arg("loss"), py::arg("num_threads"),
        "KoLeo loss -mean log(PairwiseDistance(q, n) + eps) of the given pairs (float64 scalar); "
        "returns a status code.");
  m.def("koleo_loss_backward", &loss_backward_binding, py::kw_only(), py::arg("x"), py::arg("dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("col_stride"), py::arg("query_offset"),
        py::arg("query_count"), py::arg("group_size"), py::arg("topk"), py::arg("eps"), py::arg("indices"),
        py::arg("grad_loss"), py::arg("dx"), py::arg("num_threads"),
        "Its gradient: writes dx [rows, cols] (contiguous, x's dtype; zero for rows not in a pair); "
        "returns a status code.");
}
