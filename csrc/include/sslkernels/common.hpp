// Shared types for the sslkernels CPU core: plain C++ on raw pointers, no Python, no torch.
#pragma once

#include <cstdint>

namespace sslkernels {

// Element types a kernel can read or write. Reduced-precision inputs are widened
// to float32 tile by tile; float64 inputs are computed in float64 (gradcheck).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// A strided 2-D view of caller-owned memory. Strides are in elements.
struct MatrixView {
  const void* data;
  DType dtype;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t col_stride;
};

// Kernels return a status instead of throwing across the C boundary; the Python
// layer turns each code into an exception that names the argument.
enum class Status : int {
  Ok = 0,
  NonFiniteFirstInput = 1,   // NaN/Inf in the first matrix argument
  NonFiniteSecondInput = 2,  // NaN/Inf in the second matrix argument
  NonFiniteResult = 3,       // finite inputs whose logits overflow the accumulator
  BadArgument = 4,           // sizes or dtypes the kernel does not accept
  NonFiniteThirdInput = 5,   // NaN/Inf in the third matrix argument
};

// dst[i] = src[i] rounded to `dtype` (to nearest even), exactly as every kernel stores its
// results: exposed so that the tests compare it with torch's own conversion.
void convert_from_float32(const float* src, void* dst, DType dtype, int64_t count);

}  // namespace sslkernels
