// KoLeo regulariser (Sablayrolles et al., as DINOv2/v3 and lightly compute it): the fused
// nearest-neighbour search over L2-normalised rows, and the distance loss on the pairs found.
#pragma once

#include <cstdint>

#include "sslkernels/common.hpp"

namespace sslkernels {

// One search problem. The candidates are the rows of `x` (M x D), each L2-normalised as
// x / max(||x||, eps). The queries are the candidates query_offset .. query_offset +
// query_count - 1. Candidates are cut into groups of `group_size` consecutive rows
// (group_size == M: one group); a query looks only inside its own group, never at itself.
// All queries must lie inside one group per query block: the caller guarantees that
// group_size divides M and that the query range either is the whole of x or lies inside
// one group.
struct KoleoSearch {
  MatrixView x;
  int64_t query_offset;
  int64_t query_count;
  int64_t group_size;
  int64_t topk;
  double eps;
};

// Writes indices[query_count * topk] (int64, row-major): each query's `topk` candidates of
// largest cosine similarity, best first; ties go to the smaller index, so the answer is
// unique and does not depend on the thread count. When the queries are the whole of x the
// similarity tiles are symmetric and each is multiplied once: an off-diagonal tile updates
// the running top-k of its row block and of its column block.
Status koleo_neighbors(const KoleoSearch& search, int64_t* indices, int num_threads);

// The loss of the pairs found: with q_i the query rows, n_ik = x[indices[i, k]] (both
// normalised as above) and dist_ik = || q_i - n_ik + eps ||_2 (torch's PairwiseDistance),
// loss = -mean_ik log(dist_ik + eps). Accumulated in float64 whatever the dtype.
Status koleo_loss_forward(const KoleoSearch& search, const int64_t* indices, double* loss,
                          int num_threads);

// Its gradient with respect to every row of x (dx: M x D contiguous, x's dtype), scaled by
// grad_loss. Rows that are neither a query nor a neighbour get zero. Each row sums its
// contributions in a fixed order (its own pairs, then the pairs naming it as neighbour in
// query order): bitwise the same for any thread count.
Status koleo_loss_backward(const KoleoSearch& search, const int64_t* indices, double grad_loss,
                           void* dx, int num_threads);

}  // namespace sslkernels
