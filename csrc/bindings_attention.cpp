// pybind11 bindings of the attention core (conventions: bindings_common.hpp).
//
// q, k, v (and dq, dk, dv, laid out the same way) are a pointer plus (seq, token, head)
// element strides, with a unit stride over Dh. Row maps query_* / key_*: int64
// pointers base[S] (0 for none), count[S], index[S, index_stride] (0 for none); the
// output's row maps out_base[S], lse_base[S] (int64) and lse_head_stride.
#include <cstdint>

#include <pybind11/pybind11.h>

#include "bindings_common.hpp"
#include "sslkernels/attention.hpp"

namespace py = pybind11;
using namespace sslkernels;
using sslkernels::bindings::as_ptr;

namespace {

AttentionOperand operand(std::uintptr_t data, int64_t seq_stride, int64_t token_stride,
                         int64_t head_stride) {
  return AttentionOperand{as_ptr<void>(data), seq_stride, token_stride, head_stride};
}

AttentionRows rows(std::uintptr_t base, std::uintptr_t count, std::uintptr_t index,
                   int64_t index_stride) {
  return AttentionRows{as_ptr<int64_t>(base), as_ptr<int64_t>(count), as_ptr<int64_t>(index),
                       index_stride};
}

// The problem's arguments, in the order every binding below takes them.
#define SSLK_PROBLEM_PARAMS                                                                    \
  int dtype, int64_t num_seq, int64_t heads, int64_t head_dim, std::uintptr_t q,              \
      int64_t q_seq_stride, int64_t q_token_stride, int64_t q_head_stride, std::uintptr_t k,  \
      int64_t k_seq_stride, int64_t k_token_stride, int64_t k_head_stride, std::uintptr_t v,  \
      int64_t v_seq_stride, int64_t v_token_stride, int64_t v_head_stride,                    \
      std::uintptr_t query_base, std::uintptr_t query_count, std::uintptr_t query_index,      \
      int64_t query_index_stride, std::uintptr_t key_base, std::uintptr_t key_count,          \
      std::uintptr_t key_index, int64_t key_index_stride, std::uintptr_t out_base,            \
      std::uintptr_t lse_base, int64_t lse_head_stride, double scale

#define SSLK_PROBLEM_ARGS                                                                      \
  AttentionProblem {                                                                           \
    num_seq, heads, head_dim, static_cast<DType>(dtype),                                      \
        operand(q, q_seq_stride, q_token_stride, q_head_stride),                              \
        operand(k, k_seq_stride, k_token_stride, k_head_stride),                              \
        operand(v, v_seq_stride, v_token_stride, v_head_stride),                              \
        rows(query_base, query_count, query_index, query_index_stride),                       \
        rows(key_base, key_count, key_index, key_index_stride), as_ptr<int64_t>(out_base),    \
        as_ptr<int64_t>(lse_base), lse_head_stride, scale                                     \
  }

#define SSLK_PROBLEM_PY_ARGS                                                                   \
  py::arg("dtype"), py::arg("num_seq"), py::arg("heads"), py::arg("head_dim"), py::arg("q"),  \
      py::arg("q_seq_stride"), py::arg("q_token_stride"), py::arg("q_head_stride"),          \
      py::arg("k"), py::arg("k_seq_stride"), py::arg("k_token_stride"),                       \
      py::arg("k_head_stride"), py::arg("v"), py::arg("v_seq_stride"),                        \
      py::arg("v_token_stride"), py::arg("v_head_stride"), py::arg("query_base"),             \
      py::arg("query_count"), py::arg("query_index"), py::arg("query_index_stride"),          \
      py::arg("key_base"), py::arg("key_count"), py::arg("key_index"),                        \
      py::arg("key_index_stride"), py::arg("out_base"), py::arg("lse_base"),                  \
      py::arg("lse_head_stride"), py::arg("scale")

int attention_forward_binding(SSLK_PROBLEM_PARAMS, std::uintptr_t out, std::uintptr_t lse,
                              int num_threads) {
  const AttentionProblem p = SSLK_PROBLEM_ARGS;
  py::gil_scoped_release release;
  return static_cast<int>(attention_forward(p, reinterpret_cast<void*>(out),
                                            reinterpret_cast<void*>(lse), num_threads));
}

int attention_backward_binding(SSLK_PROBLEM_PARAMS, std::uintptr_t grad_out, std::uintptr_t out,
                               std::uintptr_t lse, std::uintptr_t dq, int64_t dq_seq_stride,
                               int64_t dq_token_stride, int64_t dq_head_stride, std::uintptr_t dk,
                               int64_t dk_seq_stride, int64_t dk_token_stride,
                               int64_t dk_head_stride, std::uintptr_t dv, int64_t dv_seq_stride,
                               int64_t dv_token_stride, int64_t dv_head_stride, int num_threads) {
  const AttentionProblem p = SSLK_PROBLEM_ARGS;
  const AttentionOperand gq = operand(dq, dq_seq_stride, dq_token_stride, dq_head_stride);
  const AttentionOperand gk = operand(dk, dk_seq_stride, dk_token_stride, dk_head_stride);
  const AttentionOperand gv = operand(dv, dv_seq_stride, dv_token_stride, dv_head_stride);
  py::gil_scoped_release release;
  return static_cast<int>(attention_backward(p, as_ptr<void>(grad_out), as_ptr<void>(out),
                                             as_ptr<void>(lse), gq, gk, gv, num_threads));
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_forward", &attention_forward_binding, py::kw_only(), SSLK_PROBLEM_PY_ARGS,
        py::arg("out"), py::arg("lse"), py::arg("num_threads"),
        "Attention over gathered rows (masked patches / packed sequences): writes out and lse; "
        "returns a status code.");
  m.def("attention_backward", &attention_backward_binding, py::kw_only(), SSLK_PROBLEM_PY_ARGS,
        py::arg("grad_out"), py::arg("out"), py::arg("lse"), py::arg("dq"),
        py::arg("dq_seq_stride"), py::arg("dq_token_stride"), py::arg("dq_head_stride"),
        py::arg("dk"), py::arg("dk_seq_stride"), py::arg("dk_token_stride"),
        py::arg("dk_head_stride"), py::arg("dv"), py::arg("dv_seq_stride"),
        py::arg("dv_token_stride"), py::arg("dv_head_stride"), py::arg("num_threads"),
        "Its backward: writes dq, dk, dv at the rows read (the caller zeroes the rest); "
        "returns a status code.");
}
