"""Drop-in modules against the real packages they replace, loaded from their own source."""
import pytest
import torch
import torch.nn.functional as F

import sslkernels
from tests._utils import import_bypassing_init, loss_and_grads


def _open_clip_loss():
    return import_bypassing_init("open_clip.loss")


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss_matches_open_clip(scale):
    theirs = _open_clip_loss().ClipLoss()
    ours = sslkernels.nn.ClipLoss()
    img = F.normalize(torch.randn(64, 32), dim=1)
    txt = F.normalize(img + 0.6 * torch.randn(64, 32), dim=1)
    logit_scale = torch.tensor(scale)
    expected = loss_and_grads(theirs, img, txt, logit_scale)
    got = loss_and_grads(ours, img, txt, logit_scale)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_clip_loss_output_dict_and_unbuilt_options():
    img, txt = F.normalize(torch.randn(4, 3), dim=1), F.normalize(torch.randn(4, 3), dim=1)
    out = sslkernels.nn.ClipLoss()(img, txt, torch.tensor(10.0), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    with pytest.raises(NotImplementedError, match="use_horovod"):
        sslkernels.nn.ClipLoss(world_size=2, rank=1, use_horovod=True)
    with pytest.raises(ValueError, match="not initialised"):  # world_size > 1 needs torch.distributed
        sslkernels.nn.ClipLoss(world_size=2, rank=1)(img, txt, torch.tensor(10.0))
    with pytest.raises(ValueError, match="rank"):
        sslkernels.nn.ClipLoss(world_size=2, rank=2)
    with pytest.raises(NotImplementedError, match="logit_bias"):  # a per-column bias is not a shift
        sslkernels.nn.ClipLoss()(img, txt, torch.tensor(10.0), logit_bias=torch.randn(4))


def test_info_nce_loss_module_learns_temperature():
    module = sslkernels.nn.InfoNCELoss(temperature=0.1, learnable_temperature=True)
    assert set(module.state_dict()) == {"log_temperature"}
    q, k, queue = torch.randn(32, 8), torch.randn(32, 8), torch.randn(40, 8)
    module(q, k, queue).backward()
    assert module.log_temperature.grad is not None and torch.isfinite(module.log_temperature.grad)
    fixed = sslkernels.nn.InfoNCELoss(temperature=0.1)
    torch.testing.assert_close(fixed(q, k, queue), sslkernels.info_nce(q, k, 0.1, queue))
    assert dict(fixed.state_dict()) == {}


def _lightly_ntxent_class():
    return import_bypassing_init(
        "lightly.loss.ntx_ent_loss",
        extra_packages=("lightly.models", "lightly.models.modules", "lightly.utils"),
        stub_modules=("lightly.models.utils",),
    ).NTXentLoss


def test_ntxent_memory_bank_matches_lightly_over_steps():
    Lightly = _lightly_ntxent_class()
    theirs = Lightly(temperature=0.2, memory_bank_size=(37, 16))
    ours = sslkernels.nn.NTXentLoss(temperature=0.2, memory_bank_size=(37, 16))
    assert dict(ours.state_dict()) == dict(theirs.state_dict()) == {}  # both banks are non-persistent
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    ours.memory_bank.bank.copy_(theirs.memory_bank.bank)
    for step in range(4):  # batch 10 into a bank of 37: the pointer wraps on step 3
        out0, out1 = torch.randn(10, 16), torch.randn(10, 16)
        expected = loss_and_grads(theirs, out0, out1)
        got = loss_and_grads(ours, out0, out1)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)
        assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr), step


def test_ntxent_memory_bank_not_updated_without_grad_and_bad_sizes():
    loss = sslkernels.nn.NTXentLoss(memory_bank_size=(8, 4))
    before = loss.memory_bank.bank.clone()
    with torch.no_grad():
        loss(torch.randn(3, 4), torch.randn(3, 4))
    assert torch.equal(loss.memory_bank.bank, before) and int(loss.memory_bank.bank_ptr) == 0
    for bad in (4096, (8,), (-1, 4), (8, -4), (8, 4, 2)):
        with pytest.raises(ValueError, match="memory_bank_size"):
            sslkernels.nn.NTXentLoss(memory_bank_size=bad)
