#include <algorithm>
#include <type_traits>

#include <cblas.h>

#include "tile_utils.hpp"

namespace sslkernels {
namespace detail {

namespace {
CBLAS_TRANSPOSE trans(bool t) { return t ? CblasTrans : CblasNoTrans; }
}  // namespace

template <typename T>
void gemm(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  // OpenBLAS takes 32-bit sizes; tiles are far below that.
  const auto i32 = [](int64_t v) { return static_cast<blasint>(v); };
  if constexpr (std::is_same_v<T, float>) {
    scipy_cblas_sgemm(CblasRowMajor, trans(a_transposed), trans(b_transposed), i32(m), i32(n),
                      i32(k), alpha, a, i32(lda), b, i32(ldb), beta, c, i32(ldc));
  } else {
    scipy_cblas_dgemm(CblasRowMajor, trans(a_transposed), trans(b_transposed), i32(m), i32(n),
                      i32(k), alpha, a, i32(lda), b, i32(ldb), beta, c, i32(ldc));
  }
}
template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

std::vector<std::vector<std::pair<int64_t, int64_t>>> tile_pair_rounds(int64_t num_blocks) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  if (num_blocks < 2) return rounds;
  // An odd count gets a phantom block; pairs with it are byes.
  const int64_t n = num_blocks + (num_blocks % 2);
  const int64_t ring = n - 1;
  for (int64_t r = 0; r < ring; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    const int64_t fixed_partner = r;
    if (n - 1 < num_blocks) round.emplace_back(std::min(fixed_partner, n - 1), std::max(fixed_partner, n - 1));
    for (int64_t s = 1; s < n / 2; ++s) {
      const int64_t a = (r + s) % ring;
      const int64_t b = (r - s + ring) % ring;
      if (a < num_blocks && b < num_blocks) round.emplace_back(std::min(a, b), std::max(a, b));
    }
    rounds.push_back(std::move(round));
  }
  return rounds;
}

int64_t choose_tile_rows(int64_t rows, int64_t cols) {
  // 256 x 256 float32 logits (256 KiB) plus two row blocks stay in L2 for D <= 256.
  int64_t tile = cols > 512 ? 128 : 256;
  // Smaller tiles for small problems, so a round has pairs for several threads. The
  // choice depends on the sizes only, never on the thread count: results are
  // bitwise identical whatever torch.get_num_threads() says.
  while (tile > 64 && (rows + tile - 1) / tile < 16) tile /= 2;
  return tile;
}

}  // namespace detail
void convert_from_float32(const float* src, void* dst, DType dtype, int64_t count) {
  for (int64_t i = 0; i < count; ++i) detail::store_element<float>(dst, dtype, i, src[i]);
}

}  // namespace sslkernels
