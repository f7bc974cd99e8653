// Attention over gathered rows on the CPU: masked-patch attention (each sample keeps
// its own list of patch positions) and packed variable-length attention are one
// kernel. A sequence s reads its rows straight from the [tokens, H, Dh] inputs at
// token base[s] + position, position = index[s, i] (masked patches) or i (packed);
// no gathered or padded copy of q, k, v is ever made. Work is proportional to each
// sequence's own row counts.
#pragma once

#include "sslkernels/common.hpp"

namespace sslkernels {

// The rows one side (queries, or keys/values) of every sequence reads: row i of
// sequence s is token base[s] + position, position = index[s * index_stride + i]
// (masked patches) or i (index null: packed sequences). base null means 0.
struct AttentionRows {
  const int64_t* base;   // [S] or null
  const int64_t* count;  // [S] rows of sequence s
  const int64_t* index;  // [S, index_stride] or null
  int64_t index_stride;
};

// A [S?, tokens, H, Dh] tensor with unit stride over Dh: element (s, token, h, c) is at
// s * seq_stride + token * token_stride + h * head_stride + c (seq_stride 0 for packed
// [T, H, Dh] tensors).
struct AttentionOperand {
  const void* data;
  int64_t seq_stride, token_stride, head_stride;
};

// One attention problem on q, k, v of `dtype`. out (and grad_out) are contiguous
// [rows, H, Dh], query row i of sequence s being row out_base[s] + i;
// lse[h * lse_head_stride + lse_base[s] + i] is float64 whatever the inputs (a float32 lse of
// logits ~1e4 would cost the backward its accuracy).
struct AttentionProblem {
  int64_t num_seq, heads, head_dim;
  DType dtype;
  AttentionOperand q, k, v;
  AttentionRows query, key;
  const int64_t* out_base;  // [S]
  const int64_t* lse_base;  // [S]
  int64_t lse_head_stride;
  double scale;
};

// out[s, i] = sum_j softmax_j(scale q_i . k_j) v_j over the sequence's keys; a query
// row of a sequence without keys gets 0 and lse = -inf. Writes only the query rows
// of each sequence (the caller zeroes padding). NaN/Inf in a row that is read:
// NonFiniteFirstInput (q), NonFiniteSecondInput (k), NonFiniteThirdInput (v).
Status attention_forward(const AttentionProblem& p, void* out, void* lse, int num_threads);

// Gradients with respect to the rows that were read, written (not added) into dq, dk,
// dv (laid out like q, k, v: same strides) at the same tokens; the caller zeroes the tokens no sequence reads. Positions
// must be unique within a sequence. One task per (sequence, head) in a fixed order:
// bitwise identical results whatever the thread count.
Status attention_backward(const AttentionProblem& p, const void* grad_out, const void* out,
                          const void* lse, const AttentionOperand& dq, const AttentionOperand& dk,
                          const AttentionOperand& dv, int num_threads);

}  // namespace sslkernels
