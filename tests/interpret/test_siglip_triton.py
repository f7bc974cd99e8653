"""The Triton SigLIP kernels (the CUDA path of `sslkernels::siglip_loss_and_grads`) run by
the Triton interpreter on CPU tensors, through their launcher: the row pass (loss, dimage,
dscale, dbias) and the column pass (dtext), with and without a bias, positives on and off,
and M != N at the launcher level. Interpreter tiles are 16 x 16, BLOCK_K 32, BLOCK_DO 64:
D = 3 one chunk, 65 a chunked S and two output slices.

Oracle: the eager formula in float64 with autograd; a result passes when its error is at
most twice eager's own error in the same dtype plus RESOLUTION[dtype] * max |oracle|.
bfloat16 (garbage tl.dot in the interpreter) is checked on a GPU only.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from tests.interpret.conftest import interpreted_kernels  # noqa: E402
from tests.test_siglip import assert_close_to_reference  # noqa: E402  (the same rule)

pytestmark = pytest.mark.interpret

NAMES = ("loss", "dimage", "dtext", "dscale", "dbias")


@pytest.fixture(scope="module")
def siglip_kernels():
    return interpreted_kernels("siglip")


def _eager(image, text, scale, bias, positives):
    """(loss, dimage, dtext, dscale, dbias) of the open_clip formula, any N x M."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (image, text, scale, bias)]
    logits = leaves[2] * leaves[0] @ leaves[1].T + leaves[3]
    labels = -torch.ones_like(logits)
    if positives:
        labels.diagonal().fill_(1.0)
    loss = -F.logsigmoid(labels * logits).sum() / image.shape[0]
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def _inputs(n, m, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    return image.to(dtype), text.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (7, 7, 65), (33, 33, 16), (20, 37, 65)])
@pytest.mark.parametrize("positives", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_launcher_matches_float64_reference(siglip_kernels, dtype, n, m, d, positives, with_bias):
    image, text = _inputs(n, m, d, dtype)
    scale = torch.tensor(10.0)
    bias = torch.tensor(-10.0) if with_bias else None
    loss, dimage, dtext, dscale, dbias = siglip_kernels.siglip_loss_and_grads(image, text, scale, bias, positives,
                                                                              True)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    assert dimage.dtype == dtext.dtype == wide and loss.dtype == dtype
    zero = torch.tensor(0.0)
    ref = _eager(image.double(), text.double(), scale.double(), (bias if with_bias else zero).double(), positives)
    eager = _eager(image, text, scale.to(dtype), (bias if with_bias else zero).to(dtype), positives)
    got = (loss, dimage, dtext, dscale, dbias)
    for name, f, e, r in zip(NAMES, got, eager, ref):
        if name == "dbias" and not with_bias:
            continue
        assert_close_to_reference(f, e, r, dtype, name)


def test_loss_only_pass_and_strided_input(siglip_kernels):
    image, text = _inputs(21, 21, 40, torch.float32, seed=3)
    strided = torch.empty(21, 80)[:, ::2]
    strided.copy_(image)
    scale, bias = torch.tensor(5.0), torch.tensor(-2.0)
    loss, dimage, dtext, dscale, dbias = siglip_kernels.siglip_loss_and_grads(strided, text, scale, bias, True, False)
    assert dimage.numel() == 0 and dtext.numel() == 0
    ref = _eager(image.double(), text.double(), scale.double(), bias.double(), True)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(dbias, ref[4], rtol=1e-5, atol=0)
