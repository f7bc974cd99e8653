// pybind11 bindings of the SigLIP core: tensors as uintptr_t plus sizes and element
// strides, every argument named (keyword-only), the GIL released, a status code back.
#include <cstdint>

#include <pybind11/pybind11.h>

#include "sslkernels/siglip.hpp"

namespace py = pybind11;
using namespace sslkernels;

namespace {

int siglip_loss_and_grads_binding(std::uintptr_t image, std::uintptr_t text, int dtype, int64_t n,
                                  int64_t m, int64_t d, int64_t image_row_stride,
                                  int64_t image_col_stride, int64_t text_row_stride,
                                  int64_t text_col_stride, double logit_scale, double logit_bias,
                                  bool positives, std::uintptr_t loss, std::uintptr_t dimage,
                                  std::uintptr_t dtext, std::uintptr_t dscale, std::uintptr_t dbias,
                                  int num_threads) {
  const MatrixView x{reinterpret_cast<const void*>(image), static_cast<DType>(dtype), n, d,
                     image_row_stride, image_col_stride};
  const MatrixView y{reinterpret_cast<const void*>(text), static_cast<DType>(dtype), m, d,
                     text_row_stride, text_col_stride};
  py::gil_scoped_release release;
  return static_cast<int>(siglip_loss_and_grads(
      x, y, logit_scale, logit_bias, positives, reinterpret_cast<double*>(loss),
      reinterpret_cast<void*>(dimage), reinterpret_cast<void*>(dtext),
      reinterpret_cast<double*>(dscale), reinterpret_cast<double*>(dbias), num_threads));
}

}  // namespace

void register_siglip(py::module_& m) {
  m.def("siglip_loss_and_grads", &siglip_loss_and_grads_binding, py::kw_only(), py::arg("image"),
        py::arg("text"), py::arg("dtype"), py::arg("n"), py::arg("m"), py::arg("d"),
        py::arg("image_row_stride"), py::arg("image_col_stride"), py::arg("text_row_stride"),
        py::arg("text_col_stride"), py::arg("logit_scale"), py::arg("logit_bias"),
        py::arg("positives"), py::arg("loss"), py::arg("dimage"), py::arg("dtext"),
        py::arg("dscale"), py::arg("dbias"), py::arg("num_threads"),
        "SigLIP sigmoid loss in one sweep over the logit tiles: writes the loss (float64) and, "
        "when dimage / dtext are non-zero, the gradients for grad_loss = 1 (float32, float64 "
        "for float64 inputs; dscale / dbias float64, 0 for none); returns a status code.");
}
