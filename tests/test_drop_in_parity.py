"""Drop-ins against the real packages, on what a user meets beyond random inputs:
label types, averaging, scale shapes, the bank's ties, constructor keywords.
Each test runs the real package's own class (pytorch-metric-learning, open_clip,
lightly, timm) beside ours on the same inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import sslkernels
from tests._utils import import_bypassing_init, loss_and_grads


def _pml_losses():
    return pytest.importorskip("pytorch_metric_learning.losses")


def _assert_same_loss_and_grads(ours, theirs, x, *rest, rtol=1e-4, atol=1e-6):
    """Loss and gradient of `x` (the other arguments, float labels included, are constants)."""
    got = loss_and_grads(lambda a: ours(a, *rest), x)
    expected = loss_and_grads(lambda a: theirs(a, *rest), x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- SupConLoss labels


def _label_variants(ids: torch.Tensor):
    """The same partition of rows written in every label type pml takes."""
    halves = torch.where(torch.arange(ids.numel()) % 2 == 0, torch.tensor(-0.0), torch.tensor(0.0))
    return {
        "int32": ids.to(torch.int32),
        "uint8": ids.to(torch.uint8),
        "float32": ids.float() * 0.37 - 1.0,
        "float16": ids.half() * 0.5,
        "bfloat16": ids.bfloat16(),
        "float64_fractional": ids.double() / 3.0,
        "signed_zero": torch.where(ids == 0, halves, ids.float()),  # -0.0 == 0.0 by value
        "inf": torch.where(ids == 1, torch.tensor(float("inf")), ids.float()),
    }


@pytest.mark.parametrize("kind", list(_label_variants(torch.arange(3))))
def test_sup_con_labels_of_every_type_match_pml(kind):
    losses = _pml_losses()
    torch.manual_seed(1)
    x = torch.randn(41, 9)
    ids = torch.randint(0, 5, (41,))
    labels = _label_variants(ids)[kind]
    _assert_same_loss_and_grads(sslkernels.nn.SupConLoss(0.2), losses.SupConLoss(0.2), x, labels)


def test_sup_con_bool_labels_match_pml():
    losses = _pml_losses()
    x = torch.randn(30, 5)
    labels = torch.rand(30) > 0.4
    _assert_same_loss_and_grads(sslkernels.nn.SupConLoss(0.3), losses.SupConLoss(0.3), x, labels)


def test_sup_con_float_labels_compare_by_value_not_by_truncation():
    # 0.2 and 0.7 are two classes; an int cast would merge them into class 0
    x = torch.randn(8, 4, dtype=torch.float64)
    labels = torch.tensor([0.2, 0.7, 0.2, 0.7, 1.5, 1.5, 0.2, 0.7], dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    for f, r in zip(loss_and_grads(lambda a: sslkernels.sup_con(a, labels), x),
                    loss_and_grads(lambda a: sslkernels.sup_con(a, ids), x)):
        torch.testing.assert_close(f, r)


@pytest.mark.parametrize("bad,exc,match", [
    (torch.tensor([0.0, float("nan"), 0.0, 1.0]), ValueError, "contains NaN"),
    (torch.zeros(4, dtype=torch.complex64), TypeError, "real floating-point"),
])
def test_sup_con_refuses_nan_and_complex_labels(bad, exc, match):
    with pytest.raises(exc, match=match):
        sslkernels.nn.SupConLoss()(torch.randn(4, 3), bad)
