// pybind11 bindings of the attention core (same conventions as bindings.cpp: tensors
// as uintptr_t, sizes in elements, GIL released, a status code back).
#include <cstdint>

#include <pybind11/pybind11.h>

#include "sslkernels/attention.hpp"

namespace py = pybind11;
using namespace sslkernels;

namespace {

template <typename T>
const T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

AttentionOperand operand(std::uintptr_t data, const py::tuple& strides) {
  return AttentionOperand{as_ptr<void>(data), strides[0].cast<int64_t>(), strides[1].cast<int64_t>(),
                          strides[2].cast<int64_t>()};
}

AttentionRows rows(const py::tuple& r) {  // (base or 0, count, index or 0, index_stride)
  return AttentionRows{as_ptr<int64_t>(r[0].cast<std::uintptr_t>()),
                       as_ptr<int64_t>(r[1].cast<std::uintptr_t>()),
                       as_ptr<int64_t>(r[2].cast<std::uintptr_t>()), r[3].cast<int64_t>()};
}

// q, k, v: (pointer, (seq_stride, token_stride, head_stride)); query_rows / key_rows:
// (base, count, index, index_stride) with int64 pointers, 0 for none; the row maps of
// the output: out_base, lse_base (int64 [S]) and lse_head_stride.
AttentionProblem problem(int dtype, int64_t num_seq, int64_t heads, int64_t head_dim,
                         const py::tuple& q, const py::tuple& k, const py::tuple& v,
                         const py::tuple& query_rows, const py::tuple& key_rows,
                         std::uintptr_t out_base, std::uintptr_t lse_base, int64_t lse_head_stride,
                         double scale) {
  return AttentionProblem{num_seq, heads, head_dim, static_cast<DType>(dtype),
                          operand(q[0].cast<std::uintptr_t>(), q[1].cast<py::tuple>()),
                          operand(k[0].cast<std::uintptr_t>(), k[1].cast<py::tuple>()),
                          operand(v[0].cast<std::uintptr_t>(), v[1].cast<py::tuple>()),
                          rows(query_rows), rows(key_rows), as_ptr<int64_t>(out_base),
                          as_ptr<int64_t>(lse_base), lse_head_stride, scale};
}

int attention_forward_binding(int dtype, int64_t num_seq, int64_t heads, int64_t head_dim,
                              const py::tuple& q, const py::tuple& k, const py::tuple& v,
                              const py::tuple& query_rows, const py::tuple& key_rows,
                              std::uintptr_t out_base, std::uintptr_t lse_base,
                              int64_t lse_head_stride, double scale, std::uintptr_t out,
                              std::uintptr_t lse, int num_threads) {
  const AttentionProblem p = problem(dtype, num_seq, heads, head_dim, q, k, v, query_rows, key_rows,
                                     out_base, lse_base, lse_head_stride, scale);
  py::gil_scoped_release release;
  return static_cast<int>(attention_forward(p, reinterpret_cast<void*>(out),
                                            reinterpret_cast<void*>(lse), num_threads));
}

// dq, dk, dv: (pointer, strides) like q, k, v.
int attention_backward_binding(int dtype, int64_t num_seq, int64_t heads, int64_t head_dim,
                               const py::tuple& q, const py::tuple& k, const py::tuple& v,
                               const py::tuple& query_rows, const py::tuple& key_rows,
                               std::uintptr_t out_base, std::uintptr_t lse_base,
                               int64_t lse_head_stride, double scale, std::uintptr_t grad_out,
                               std::uintptr_t out, std::uintptr_t lse, const py::tuple& dq,
                               const py::tuple& dk, const py::tuple& dv, int num_threads) {
  const AttentionProblem p = problem(dtype, num_seq, heads, head_dim, q, k, v, query_rows, key_rows,
                                     out_base, lse_base, lse_head_stride, scale);
  const AttentionOperand gq = operand(dq[0].cast<std::uintptr_t>(), dq[1].cast<py::tuple>());
  const AttentionOperand gk = operand(dk[0].cast<std::uintptr_t>(), dk[1].cast<py::tuple>());
  const AttentionOperand gv = operand(dv[0].cast<std::uintptr_t>(), dv[1].cast<py::tuple>());
  py::gil_scoped_release release;
  return static_cast<int>(attention_backward(p, as_ptr<void>(grad_out), as_ptr<void>(out),
                                             as_ptr<void>(lse), gq, gk, gv, num_threads));
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_forward", &attention_forward_binding,
        "Attention over gathered rows (masked patches / packed sequences): writes out and lse; "
        "returns a status code.");
  m.def("attention_backward", &attention_backward_binding,
        "Its backward: writes dq, dk, dv at the rows read (the caller zeroes the rest); "
        "returns a status code.");
}
