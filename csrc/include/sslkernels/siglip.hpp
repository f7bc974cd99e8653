// SigLIP's sigmoid loss (open_clip's SigLipLoss) on raw pointers: no Python, no torch.
#pragma once

#include <cstdint>

#include "sslkernels/common.hpp"

namespace sslkernels {

// logits_ij = logit_scale * x_i . y_j + logit_bias, labels_ij = +1 where i == j (when
// `positives`) and -1 elsewhere, loss = -sum_ij log sigmoid(labels_ij logits_ij) / N,
// for x = `image` [N, D] and y = `text` [M, D] (same dtype; M may differ from N: the
// positives are the pairs i == j < min(N, M); `positives` false makes every pair a
// negative, as for another rank's texts).
//
// One sweep over (tile x tile) blocks of the logits computes the loss and, when
// `dimage` / `dtext` are given, every gradient for grad_loss = 1: each logit's
// gradient G_ij = -labels_ij sigmoid(-labels_ij logits_ij) / N is local, so a tile
// needs three products (the logits, G Y into dimage, G^T X into dtext) and nothing
// is kept between tiles. The gradients are float32 (float64 for float64 inputs)
// whatever the inputs' dtype, contiguous [N, D] / [M, D], overwritten; dscale and
// dbias (each may be null) are d loss / d logit_scale and d loss / d logit_bias.
// Bitwise identical results for any num_threads.
Status siglip_loss_and_grads(const MatrixView& image, const MatrixView& text, double logit_scale,
                             double logit_bias, bool positives, double* loss, void* dimage,
                             void* dtext, double* dscale, double* dbias, int num_threads);

}  // namespace sslkernels
