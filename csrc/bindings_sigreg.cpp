// pybind11 bindings of the SIGReg core (conventions of bindings.cpp: tensors as
// uintptr_t plus sizes and element strides, GIL released, a status code back;
// every argument named and keyword-only).
#include <cstdint>

#include <pybind11/pybind11.h>

#include "sslkernels/sigreg.hpp"

namespace py = pybind11;
using namespace sslkernels;

namespace {

SigregProblem problem(std::uintptr_t proj, std::uintptr_t directions, int dtype, int64_t batch, int64_t rows,
                      int64_t dim, int64_t num_directions, int64_t batch_stride, int64_t row_stride,
                      int64_t col_stride, int64_t dir_row_stride, int64_t dir_col_stride, int64_t knots,
                      double t_max) {
  return SigregProblem{reinterpret_cast<const void*>(proj), reinterpret_cast<const void*>(directions),
                       static_cast<DType>(dtype), batch, rows, dim, num_directions, batch_stride, row_stride,
                       col_stride, dir_row_stride, dir_col_stride, knots, t_max};
}

int sigreg_stats_binding(std::uintptr_t proj, std::uintptr_t directions, int dtype, int64_t batch, int64_t rows,
                         int64_t dim, int64_t num_directions, int64_t batch_stride, int64_t row_stride,
                         int64_t col_stride, int64_t dir_row_stride, int64_t dir_col_stride, int64_t knots,
                         double t_max, std::uintptr_t cos_sum, std::uintptr_t sin_sum, int num_threads) {
  const SigregProblem p = problem(proj, directions, dtype, batch, rows, dim, num_directions, batch_stride,
                                  row_stride, col_stride, dir_row_stride, dir_col_stride, knots, t_max);
  py::gil_scoped_release release;
  return static_cast<int>(sigreg_stats(p, reinterpret_cast<double*>(cos_sum), reinterpret_cast<double*>(sin_sum),
                                       num_threads));
}

int sigreg_stats_backward_binding(std::uintptr_t proj, std::uintptr_t directions, int dtype, int64_t batch,
                                  int64_t rows, int64_t dim, int64_t num_directions, int64_t batch_stride,
                                  int64_t row_stride, int64_t col_stride, int64_t dir_row_stride,
                                  int64_t dir_col_stride, int64_t knots, double t_max, std::uintptr_t grad_cos,
                                  std::uintptr_t grad_sin, std::uintptr_t dproj, std::uintptr_t ddirections,
                                  int num_threads) {
  const SigregProblem p = problem(proj, directions, dtype, batch, rows, dim, num_directions, batch_stride,
                                  row_stride, col_stride, dir_row_stride, dir_col_stride, knots, t_max);
  py::gil_scoped_release release;
  return static_cast<int>(sigreg_stats_backward(
      p, reinterpret_cast<const double*>(grad_cos), reinterpret_cast<const double*>(grad_sin),
      reinterpret_cast<void*>(dproj), reinterpret_cast<void*>(ddirections), num_threads));
}

}  // namespace

void register_sigreg(py::module_& m) {
  m.def("sigreg_stats", &sigreg_stats_binding, py::kw_only(), py::arg("proj"), py::arg("directions"),
        py::arg("dtype"), py::arg("batch"), py::arg("rows"), py::arg("dim"), py::arg("num_directions"),
        py::arg("batch_stride"), py::arg("row_stride"), py::arg("col_stride"), py::arg("dir_row_stride"),
        py::arg("dir_col_stride"), py::arg("knots"), py::arg("t_max"), py::arg("cos_sum"), py::arg("sin_sum"),
        py::arg("num_threads"),
        "SIGReg statistics: writes cos_sum / sin_sum [B, S, knots] (float64) of x = proj @ directions; "
        "returns a status code.");
  m.def("sigreg_stats_backward", &sigreg_stats_backward_binding, py::kw_only(), py::arg("proj"),
        py::arg("directions"), py::arg("dtype"), py::arg("batch"), py::arg("rows"), py::arg("dim"),
        py::arg("num_directions"), py::arg("batch_stride"), py::arg("row_stride"), py::arg("col_stride"),
        py::arg("dir_row_stride"), py::arg("dir_col_stride"), py::arg("knots"), py::arg("t_max"),
        py::arg("grad_cos"), py::arg("grad_sin"), py::arg("dproj"), py::arg("ddirections"),
        py::arg("num_threads"),
        "Backward of sigreg_stats: writes dproj [B, N, D] and, when ddirections is not 0, "
        "ddirections [D, S] (contiguous, proj's dtype); returns a status code.");
}
