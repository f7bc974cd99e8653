// pybind11 bindings of the contrastive losses (conventions: bindings_common.hpp).
#include <cstdint>

#include <pybind11/pybind11.h>

#include "bindings_common.hpp"
#include "sslkernels/contrastive.hpp"

namespace py = pybind11;
using namespace sslkernels;
using sslkernels::bindings::as_mut_ptr;
using sslkernels::bindings::as_ptr;
using sslkernels::bindings::matrix;

namespace {

// The query, key and negatives views of the InfoNCE bindings (negatives_rows == 0: no
// shared negatives, the pointer is ignored).
struct InfoNceViews {
  MatrixView query, key, negatives;
};

InfoNceViews info_nce_views(std::uintptr_t query, std::uintptr_t key, std::uintptr_t negatives,
                            int dtype, int64_t n, int64_t d, int64_t negatives_rows,
                            int64_t q_row_stride, int64_t q_col_stride, int64_t k_row_stride,
                            int64_t k_col_stride, int64_t n_row_stride, int64_t n_col_stride) {
  return InfoNceViews{matrix(query, dtype, n, d, q_row_stride, q_col_stride),
                      matrix(key, dtype, n, d, k_row_stride, k_col_stride),
                      matrix(negatives, dtype, negatives_rows, d, n_row_stride, n_col_stride)};
}

int nt_xent_forward_binding(std::uintptr_t z1, std::uintptr_t z2, int dtype, int64_t n, int64_t d,
                            int64_t z1_row_stride, int64_t z1_col_stride, int64_t z2_row_stride,
                            int64_t z2_col_stride, double temperature, bool normalize,
                            std::uintptr_t lse, std::uintptr_t loss, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(nt_xent_forward(
      matrix(z1, dtype, n, d, z1_row_stride, z1_col_stride),
      matrix(z2, dtype, n, d, z2_row_stride, z2_col_stride), temperature, normalize,
      as_mut_ptr<void>(lse), as_mut_ptr<double>(loss), num_threads));
}

int nt_xent_backward_binding(std::uintptr_t z1, std::uintptr_t z2, int dtype, int64_t n, int64_t d,
                             int64_t z1_row_stride, int64_t z1_col_stride, int64_t z2_row_stride,
                             int64_t z2_col_stride, std::uintptr_t lse, double temperature,
                             bool normalize, double grad_loss, std::uintptr_t dz1,
                             std::uintptr_t dz2, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(nt_xent_backward(
      matrix(z1, dtype, n, d, z1_row_stride, z1_col_stride),
      matrix(z2, dtype, n, d, z2_row_stride, z2_col_stride), as_ptr<void>(lse),
      temperature, normalize, grad_loss, as_mut_ptr<void>(dz1), as_mut_ptr<void>(dz2), num_threads));
}

int sup_con_forward_binding(std::uintptr_t features, int dtype, int64_t n, int64_t d,
                            int64_t row_stride, int64_t col_stride, std::uintptr_t class_ids,
                            std::uintptr_t class_counts, int64_t num_classes, double temperature,
                            bool normalize, std::uintptr_t lse, std::uintptr_t loss, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(sup_con_forward(
      matrix(features, dtype, n, d, row_stride, col_stride), as_ptr<int64_t>(class_ids),
      as_ptr<int64_t>(class_counts), num_classes, temperature, normalize, as_mut_ptr<void>(lse),
      as_mut_ptr<double>(loss), num_threads));
}

int sup_con_backward_binding(std::uintptr_t features, int dtype, int64_t n, int64_t d,
                             int64_t row_stride, int64_t col_stride, std::uintptr_t class_ids,
                             std::uintptr_t class_counts, int64_t num_classes, std::uintptr_t lse,
                             double temperature, bool normalize, double grad_loss,
                             std::uintptr_t dfeatures, int num_threads) {
  py::gil_scoped_release release;
  return static_cast<int>(sup_con_backward(
      matrix(features, dtype, n, d, row_stride, col_stride), as_ptr<int64_t>(class_ids),
      as_ptr<int64_t>(class_counts), num_classes, as_ptr<void>(lse), temperature, normalize,
      grad_loss, as_mut_ptr<void>(dfeatures), num_threads));
}

// The retrieval terms from their pointers (0: none).
CandidateTerms candidate_terms(std::uintptr_t bias, std::uintptr_t anchor_ids, std::uintptr_t candidate_ids,
                               bool positive_on_diagonal) {
  return CandidateTerms{as_ptr<double>(bias), as_ptr<int64_t>(anchor_ids), as_ptr<int64_t>(candidate_ids),
                        positive_on_diagonal};
}

int info_nce_forward_binding(std::uintptr_t query, std::uintptr_t key, std::uintptr_t negatives,
                             int dtype, int64_t n, int64_t d, int64_t negatives_rows,
                             int64_t negatives_per_query, int64_t q_row_stride, int64_t q_col_stride,
                             int64_t k_row_stride, int64_t k_col_stride, int64_t n_row_stride,
                             int64_t n_col_stride, double temperature, bool normalize, bool symmetric,
                             bool in_batch_negatives, std::uintptr_t lse_query,
                             std::uintptr_t lse_key, std::uintptr_t loss, std::uintptr_t bias,
                             std::uintptr_t anchor_ids, std::uintptr_t candidate_ids,
                             bool positive_on_diagonal, int num_threads) {
  const CandidateTerms terms = candidate_terms(bias, anchor_ids, candidate_ids, positive_on_diagonal);
  const InfoNceViews v = info_nce_views(query, key, negatives, dtype, n, d, negatives_rows, q_row_stride,
                                        q_col_stride, k_row_stride, k_col_stride, n_row_stride, n_col_stride);
  py::gil_scoped_release release;
  return static_cast<int>(info_nce_forward(
      v.query, v.key, v.negatives, negatives_per_query,
      temperature, normalize, symmetric, in_batch_negatives, as_mut_ptr<void>(lse_query),
      as_mut_ptr<void>(lse_key), as_mut_ptr<double>(loss), num_threads, terms));
}

int info_nce_backward_binding(std::uintptr_t query, std::uintptr_t key, std::uintptr_t negatives,
                              int dtype, int64_t n, int64_t d, int64_t negatives_rows,
                              int64_t negatives_per_query, int64_t q_row_stride, int64_t q_col_stride,
                              int64_t k_row_stride, int64_t k_col_stride, int64_t n_row_stride,
                              int64_t n_col_stride, std::uintptr_t lse_query, std::uintptr_t lse_key,
                              double temperature, bool normalize, bool symmetric,
                              bool in_batch_negatives, double grad_loss, std::uintptr_t dquery,
                              std::uintptr_t dkey, std::uintptr_t dnegatives,
                              std::uintptr_t dtemperature, std::uintptr_t bias,
                              std::uintptr_t anchor_ids, std::uintptr_t candidate_ids,
                              bool positive_on_diagonal, int num_threads) {
  const CandidateTerms terms = candidate_terms(bias, anchor_ids, candidate_ids, positive_on_diagonal);
  const InfoNceViews v = info_nce_views(query, key, negatives, dtype, n, d, negatives_rows, q_row_stride,
                                        q_col_stride, k_row_stride, k_col_stride, n_row_stride, n_col_stride);
  py::gil_scoped_release release;
  return static_cast<int>(info_nce_backward(
      v.query, v.key, v.negatives, negatives_per_query,
      as_ptr<void>(lse_query), as_ptr<void>(lse_key), temperature, normalize, symmetric,
      in_batch_negatives, grad_loss, as_mut_ptr<void>(dquery), as_mut_ptr<void>(dkey),
      as_mut_ptr<void>(dnegatives), as_mut_ptr<double>(dtemperature), num_threads, terms));
}

int info_nce_loss_and_grads_binding(std::uintptr_t query, std::uintptr_t key,
                                    std::uintptr_t negatives, int dtype, int64_t n, int64_t d,
                                    int64_t negatives_rows, int64_t q_row_stride,
                                    int64_t q_col_stride, int64_t k_row_stride, int64_t k_col_stride,
                                    int64_t n_row_stride, int64_t n_col_stride, double temperature,
                                    bool normalize, std::uintptr_t loss, std::uintptr_t dquery,
                                    std::uintptr_t dkey, std::uintptr_t dnegatives,
                                    std::uintptr_t dtemperature, std::uintptr_t bias,
                                    std::uintptr_t anchor_ids, std::uintptr_t candidate_ids, int num_threads) {
  const CandidateTerms terms = candidate_terms(bias, anchor_ids, candidate_ids, true);
  const InfoNceViews v = info_nce_views(query, key, negatives, dtype, n, d, negatives_rows, q_row_stride,
                                        q_col_stride, k_row_stride, k_col_stride, n_row_stride, n_col_stride);
  py::gil_scoped_release release;
  return static_cast<int>(info_nce_loss_and_grads(
      v.query, v.key, v.negatives, temperature,
      normalize, as_mut_ptr<double>(loss), as_mut_ptr<void>(dquery), as_mut_ptr<void>(dkey),
      as_mut_ptr<void>(dnegatives), as_mut_ptr<double>(dtemperature), num_threads, terms));
}

}  // namespace

void register_contrastive(py::module_& m) {
  m.def("nt_xent_forward", &nt_xent_forward_binding, py::kw_only(), py::arg("z1"), py::arg("z2"),
        py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("z1_row_stride"),
        py::arg("z1_col_stride"), py::arg("z2_row_stride"), py::arg("z2_col_stride"),
        py::arg("temperature"), py::arg("normalize"), py::arg("lse"), py::arg("loss"),
        py::arg("num_threads"),
        "Fused NT-Xent forward: writes lse[2N] and the scalar loss (float64); returns a status code.");
  m.def("nt_xent_backward", &nt_xent_backward_binding, py::kw_only(), py::arg("z1"), py::arg("z2"),
        py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("z1_row_stride"),
        py::arg("z1_col_stride"), py::arg("z2_row_stride"), py::arg("z2_col_stride"),
        py::arg("lse"), py::arg("temperature"), py::arg("normalize"), py::arg("grad_loss"),
        py::arg("dz1"), py::arg("dz2"), py::arg("num_threads"),
        "Fused NT-Xent backward: writes dz1, dz2 (contiguous, inputs' dtype); returns a status code.");
  m.def("sup_con_forward", &sup_con_forward_binding, py::kw_only(), py::arg("features"),
        py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"), py::arg("col_stride"),
        py::arg("class_ids"), py::arg("class_counts"), py::arg("num_classes"),
        py::arg("temperature"), py::arg("normalize"), py::arg("lse"), py::arg("loss"),
        py::arg("num_threads"),
        "Fused SupCon forward: writes lse[N] and the scalar loss (float64); returns a status code.");
  m.def("sup_con_backward", &sup_con_backward_binding, py::kw_only(), py::arg("features"),
        py::arg("dtype"), py::arg("n"), py::arg("d"), py::arg("row_stride"), py::arg("col_stride"),
        py::arg("class_ids"), py::arg("class_counts"), py::arg("num_classes"), py::arg("lse"),
        py::arg("temperature"), py::arg("normalize"), py::arg("grad_loss"), py::arg("dfeatures"),
        py::arg("num_threads"),
        "Fused SupCon backward: writes dfeatures (contiguous, inputs' dtype); returns a status code.");
  m.def("info_nce_forward", &info_nce_forward_binding, py::kw_only(), py::arg("query"),
        py::arg("key"), py::arg("negatives"), py::arg("dtype"), py::arg("n"), py::arg("d"),
        py::arg("negatives_rows"), py::arg("negatives_per_query"), py::arg("q_row_stride"),
        py::arg("q_col_stride"), py::arg("k_row_stride"), py::arg("k_col_stride"),
        py::arg("n_row_stride"), py::arg("n_col_stride"), py::arg("temperature"),
        py::arg("normalize"), py::arg("symmetric"), py::arg("in_batch_negatives"),
        py::arg("lse_query"), py::arg("lse_key"), py::arg("loss"),
        py::arg("bias"), py::arg("anchor_ids"), py::arg("candidate_ids"), py::arg("positive_on_diagonal"),
        py::arg("num_threads"),
        "Fused InfoNCE / CLIP forward: writes lse_query[N] (and lse_key[N] when symmetric) and the loss.");
  m.def("info_nce_backward", &info_nce_backward_binding, py::kw_only(), py::arg("query"),
        py::arg("key"), py::arg("negatives"), py::arg("dtype"), py::arg("n"), py::arg("d"),
        py::arg("negatives_rows"), py::arg("negatives_per_query"), py::arg("q_row_stride"),
        py::arg("q_col_stride"), py::arg("k_row_stride"), py::arg("k_col_stride"),
        py::arg("n_row_stride"), py::arg("n_col_stride"), py::arg("lse_query"), py::arg("lse_key"),
        py::arg("temperature"), py::arg("normalize"), py::arg("symmetric"),
        py::arg("in_batch_negatives"), py::arg("grad_loss"), py::arg("dquery"), py::arg("dkey"),
        py::arg("dnegatives"), py::arg("dtemperature"),
        py::arg("bias"), py::arg("anchor_ids"), py::arg("candidate_ids"), py::arg("positive_on_diagonal"),
        py::arg("num_threads"),
        "Fused InfoNCE / CLIP backward: writes dquery, dkey and (if given) dnegatives and dtemperature.");
  m.def("info_nce_loss_and_grads", &info_nce_loss_and_grads_binding, py::kw_only(),
        py::arg("query"), py::arg("key"), py::arg("negatives"), py::arg("dtype"), py::arg("n"),
        py::arg("d"), py::arg("negatives_rows"), py::arg("q_row_stride"), py::arg("q_col_stride"),
        py::arg("k_row_stride"), py::arg("k_col_stride"), py::arg("n_row_stride"),
        py::arg("n_col_stride"), py::arg("temperature"), py::arg("normalize"), py::arg("loss"),
        py::arg("dquery"), py::arg("dkey"), py::arg("dnegatives"), py::arg("dtemperature"),
        py::arg("bias"), py::arg("anchor_ids"), py::arg("candidate_ids"), py::arg("num_threads"),
        "Fused one-direction InfoNCE loss and its gradients (grad_loss = 1) in one sweep: writes "
        "the loss, dquery, dkey and (if given) dnegatives and dtemperature.");
}
