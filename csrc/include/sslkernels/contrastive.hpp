// Fused contrastive losses on the CPU: tile products through OpenBLAS, our own
// epilogue (online log-sum-exp, exp, masks) on tiles that stay in cache. No
// (rows x rows) matrix is ever materialised.
#pragma once

#include "sslkernels/common.hpp"

namespace sslkernels {

// NT-Xent (SimCLR) over the 2N rows of cat(z1, z2), temperature t:
//   loss = mean_i [ lse_i - s_{i,pos(i)} ],  lse_i = log sum_{j != i} exp(s_ij),
//   s_ij = zhat_i . zhat_j / t, pos(i) = i +- N, zhat = x / max(|x|, 1e-12) when normalize.
// Writes lse[2N] (float64 whatever the inputs: a float32 lse would cost the backward its
// accuracy at large logits) and the scalar loss.
Status nt_xent_forward(const MatrixView& z1, const MatrixView& z2, double temperature,
                       bool normalize, void* lse, double* loss, int num_threads);

// Gradient of grad_loss * loss with respect to z1 and z2, recomputing the logit tiles
// from the saved lse. dz1 / dz2 are contiguous [N, D] buffers of the inputs' dtype.
Status nt_xent_backward(const MatrixView& z1, const MatrixView& z2, const void* lse,
                        double temperature, bool normalize, double grad_loss, void* dz1,
                        void* dz2, int num_threads);

// Supervised contrastive loss (Khosla et al., "L_out") over the rows of `features`:
//   loss = mean over anchors i of [ lse_i - (1/|P(i)|) sum_{p in P(i)} s_ip ],
//   lse_i = log sum_{a != i} exp(s_ia), P(i) = {p != i : class_ids[p] == class_ids[i]},
// anchors are the rows with |P(i)| > 0; with no anchor the loss is 0 (zero gradient).
// class_ids[i] in [0, num_classes) and class_counts[c] = #{i : class_ids[i] == c}
// (compact ids, e.g. from torch.unique); anything else returns BadArgument.
Status sup_con_forward(const MatrixView& features, const int64_t* class_ids,
                       const int64_t* class_counts, int64_t num_classes, double temperature,
                       bool normalize, void* lse, double* loss, int num_threads);

Status sup_con_backward(const MatrixView& features, const int64_t* class_ids,
                        const int64_t* class_counts, int64_t num_classes, const void* lse,
                        double temperature, bool normalize, double grad_loss, void* dfeatures,
                        int num_threads);

// InfoNCE over queries q [N, D] and keys k [N, D] (k_i is the positive of q_i, the
// other keys its negatives), plus optional shared negatives (a MoCo queue) [K, D]:
//   loss_q = mean_i [ lse_i - s_ii ],  lse_i = log( sum_j exp(s_ij) + sum_n exp(q_i.n / t) ),
//   s_ij = q_i . k_j / t (rows L2-normalised first when normalize).
// symmetric (CLIP): loss = (loss_q + loss_k) / 2 with loss_k = mean_j [ lse'_j - s_jj ],
// lse'_j = log sum_i exp(s_ij) (queries only). lse_query [N]; lse_key [N] when symmetric.
// negatives.rows == 0 means none. per_query > 0: per-query hard negatives instead of a
// shared queue, rows [i per_query, (i + 1) per_query) of `negatives` belong to query i
// (negatives.rows == N per_query). Without in_batch_negatives the other keys are not
// candidates (MoCo, lightly's memory bank: own key + the queue); not with symmetric.
//
// Retrieval terms (`terms`, all optional; not with per_query > 0), over the candidates
// j = keys [0, N) then the queue [N, N + K):
// - bias[N + K] (float64) is added to every query -> key logit of candidate j:
//   s_ij = q_i . x_j / t + bias[j]. The key -> query direction has none.
// - anchor_ids[N] and candidate_ids[N + K] (int64, both or neither): candidate j leaves
//   query i's candidates when anchor_ids[i] == candidate_ids[j], unless j == i and
//   positive_on_diagonal; the same pair leaves key j's candidates (symmetric).
// The target stays key i, even when masked (positive_on_diagonal false: a ring's remote
// block, whose lse and gradients are all that is used).
// lse_key is the key direction's, without bias, in both cases.
struct CandidateTerms {
  const double* bias = nullptr;
  const int64_t* anchor_ids = nullptr;
  const int64_t* candidate_ids = nullptr;
  bool positive_on_diagonal = true;
};

Status info_nce_forward(const MatrixView& query, const MatrixView& key, const MatrixView& negatives,
                        int64_t per_query, double temperature, bool normalize, bool symmetric,
                        bool in_batch_negatives, void* lse_query, void* lse_key, double* loss,
                        int num_threads, const CandidateTerms& terms = {});

// dquery, dkey: contiguous [N, D]; dnegatives: contiguous [K, D] or null to skip it;
// dtemperature: the gradient with respect to t (exact), or null to skip it.
Status info_nce_backward(const MatrixView& query, const MatrixView& key,
                         const MatrixView& negatives, int64_t per_query, const void* lse_query,
                         const void* lse_key,
                         double temperature, bool normalize, bool symmetric,
                         bool in_batch_negatives, double grad_loss, void* dquery, void* dkey,
                         void* dnegatives, double* dtemperature, int num_threads,
                         const CandidateTerms& terms = {});

// The one-direction loss (in-batch keys, optional shared queue: symmetric false,
// in_batch_negatives true, per_query 0) and its gradients for grad_loss = 1, in one
// sweep that multiplies every logit tile once: for training steps, where the
// backward always follows. Conventions as info_nce_backward, except that dquery,
// dkey and dnegatives are float32 (float64 for float64 inputs) whatever the inputs'
// dtype: the caller scales them by the upstream gradient before rounding.
Status info_nce_loss_and_grads(const MatrixView& query, const MatrixView& key,
                               const MatrixView& negatives, double temperature, bool normalize,
                               double* loss, void* dquery, void* dkey, void* dnegatives,
                               double* dtemperature, int num_threads, const CandidateTerms& terms = {});

}  // namespace sslkernels
