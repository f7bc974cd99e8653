// pybind11 binding of the dtype conversion every kernel stores its results with, for the
// tests (tests/test_conversions.py compares it with torch's over every float16 /
// bfloat16 edge and subnormal). Same conventions as the other bindings: pointers as
// uintptr_t, keyword-only named arguments, GIL released.
#include <cstdint>

#include <pybind11/pybind11.h>

#include "sslkernels/common.hpp"

namespace py = pybind11;

void register_convert(py::module_& m) {
  m.def(
      "convert_from_float32",
      [](std::uintptr_t src, std::uintptr_t dst, int dtype, int64_t count) {
        py::gil_scoped_release release;
        sslkernels::convert_from_float32(reinterpret_cast<const float*>(src), reinterpret_cast<void*>(dst),
                                         static_cast<sslkernels::DType>(dtype), count);
      },
      py::kw_only(), py::arg("src"), py::arg("dst"), py::arg("dtype"), py::arg("count"),
      "dst[i] = src[i] (float32, contiguous) rounded to dtype, as the kernels store results");
}
