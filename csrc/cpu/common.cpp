#include <algorithm>

#include <cblas.h>

#include "tile_utils.hpp"

namespace sslkernels {
namespace detail {

namespace {
CBLAS_TRANSPOSE trans(bool t) { return t ? CblasTrans : CblasNoTrans; }
}  // namespace

void gemm(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, trans(a_transposed), trans(b_transposed),
                    static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k),
                    alpha, a, static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
                    static_cast<blasint>(ldc));
}

void gemm(bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc) {
  scipy_cblas_dgemm(CblasRowMajor, trans(a_transposed), trans(b_transposed),
                    static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k),
                    alpha, a, static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
                    static_cast<blasint>(ldc));
}

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
}  // namespace sslkernels
