// Shared by the csrc/bindings_<family>.cpp files. The convention of every binding:
// tensors cross as raw pointers (uintptr_t) plus sizes and element strides, so any
// dtype (bf16 included) passes and the module never links libtorch; every argument is
// named and keyword-only (py::kw_only(), then py::arg), so Python calls with keywords
// and a swapped pair fails loudly instead of silently; the GIL is released around the
// kernel; the kernel's Status comes back as an int (sslkernels/_ext.py reads it).
#pragma once

#include <cstdint>

#include <pybind11/pybind11.h>

#include "sslkernels/common.hpp"

namespace sslkernels::bindings {

template <typename T>
const T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

template <typename T>
T* as_mut_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline MatrixView matrix(std::uintptr_t ptr, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                         int64_t col_stride) {
  return MatrixView{as_ptr<void>(ptr), static_cast<DType>(dtype), rows, cols, row_stride, col_stride};
}

}  // namespace sslkernels::bindings
