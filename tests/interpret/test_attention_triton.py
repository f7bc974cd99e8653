"""The Triton masked-patch and varlen attention kernels (the CUDA path of
`sslkernels::masked_patch_attention_*` / `sslkernels::varlen_attention_*`) run by the
Triton interpreter on CPU tensors, through their four launchers.

Oracle: `masked_patch_attention_reference` / `varlen_attention_reference` in float64
with autograd. A result passes when its error against the oracle is at most twice eager
PyTorch's own error in the same dtype plus a small floor relative to max |oracle|.
Interpreter tiles are 16 x 16, so L up to 40 gives several query and key tiles with
tails. bfloat16 is checked on a GPU only (`benchmarks/gpu_attention.py`).
"""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the Triton interpreter tests need triton")

from tests._utils import assert_within_eager_error  # noqa: E402
from sslkernels.reference.attention import (  # noqa: E402
    masked_patch_attention_reference,
    varlen_attention_reference,
)

pytestmark = pytest.mark.interpret



@pytest.fixture(scope="module")
def K():
    """`sslkernels.kernels.attention` built in interpreter mode (the folder's conftest set
    TRITON_INTERPRET before anything imported it; re-imported if something came first)."""
    name = "sslkernels.kernels.attention"
    module = sys.modules.get(name) or importlib.import_module(name)
    if not module.INTERPRET:
        module = importlib.reload(module)
    assert module.INTERPRET, "the kernels were not built in interpreter mode"
    return module


# ----------------------------------------------------------------------------- inputs


def _qkv(b, lq, lk, h, dh, seed=0):
    """float64 q [B, Lq, H, Dh], k / v [B, Lk, H, Dh]; q scaled up so softmax is peaked
    (neither uniform nor one-hot)."""
    g = torch.Generator().manual_seed(seed)
    q = 2.0 * torch.randn(b, lq, h, dh, generator=g, dtype=torch.float64)
    k = torch.randn(b, lk, h, dh, generator=g, dtype=torch.float64)
    v = torch.randn(b, lk, h, dh, generator=g, dtype=torch.float64)
    return q, k, v


def _index(counts, width, length, seed):
    """int64 [B, width]: counts[b] unique positions in [0, length) in random order, then -1."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((len(counts), width), -1, dtype=torch.int64)
    for b, c in enumerate(counts):
        idx[b, :c] = torch.randperm(length, generator=g)[:c]
    return idx


def _counts(index):
    return (index >= 0).sum(dim=1, dtype=torch.int32)


def _check(fused, eager, ref64, dtype, what):
    assert fused.dtype == dtype, (what, fused.dtype)
    assert_within_eager_error(fused, eager, ref64, dtype, what)


def _masked_ref(q, k, v, index, kv_index, scale, grad):
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = masked_patch_attention_reference(*xs, index, kv_index, scale)
    grads = torch.autograd.grad(out, xs, grad)
    return (out.detach(),) + grads


def _masked_fused(K, q, k, v, index, kv_index, scale, grad, count=None, kv_count=None):
    count = _counts(index) if count is None else count
    kv_count = _counts(kv_index) if kv_count is None else kv_count
    out, lse = K.masked_patch_attention_forward(q, k, v, index, count, kv_index, kv_count, scale)
    grads = K.masked_patch_attention_backward(grad, q, k, v, index, count, kv_index, kv_count, out, lse, scale)
    return (out, *grads), lse


def _compare(fused, q, k, v, index, kv_index, scale, grad64, dtype):
    eager = _masked_ref(q.to(dtype), k.to(dtype), v.to(dtype), index, kv_index, scale, grad64.to(dtype))
    ref = _masked_ref(q, k, v, index, kv_index, scale, grad64)
    for what, f, e, r in zip(("out", "dq", "dk", "dv"), fused, eager, ref):
        _check(f, e, r, dtype, what)


# ----------------------------------------------------------------------------- masked

# (B, Lq, Lk, H, query counts, K width, key counts or None (= the query index), Kv width)
MASKED = {
    # self-attention, kv_index is index: a zero-count sample, one with a single patch,
    # one covering two full tiles and a tail
    "self": (3, 40, 40, 2, [37, 0, 1], 37, None, None),
    # separate kv index (another L), -1 padding in both, a sample without keys
    "cross": (3, 23, 38, 1, [5, 19, 17], 21, [33, 0, 2], 35),
}


@pytest.mark.parametrize("case", list(MASKED))
@pytest.mark.parametrize("dh", [16, 40, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_masked_matches_float64_reference(K, poisoned_outputs, dtype, dh, case):
    b, lq, lk, h, counts, width, kv_counts, kv_width = MASKED[case]
    q, k, v = _qkv(b, lq, lk, h, dh, seed=dh)
    index = _index(counts, width, lq, seed=1)
    kv_index = index if kv_counts is None else _index(kv_counts, kv_width, lk, seed=2)
    scale = dh ** -0.5
    grad = torch.randn(b, width, h, dh, dtype=torch.float64)
    fused, lse = _masked_fused(K, q.to(dtype), k.to(dtype), v.to(dtype), index, kv_index, scale, grad.to(dtype))
    assert lse.shape == (b, h, width) and lse.dtype == torch.float64
    for g, x in zip(fused[1:], (q, k, v)):
        assert g.shape == x.shape and g.is_contiguous()
    _compare(fused, q, k, v, index, kv_index, scale, grad, dtype)


def test_lse_layout_padding_rows_and_untouched_gradients(K, poisoned_outputs):
    """lse [B, H, K] is the natural log-sum-exp of the scaled logits over the kept keys,
    -inf past the count and for a sample without keys; outputs there are 0; gradient
    rows at positions nobody keeps are exactly 0 (float64: exact to rounding)."""
    b, lq, lk, h, dh = 3, 29, 31, 2, 40
    q, k, v = _qkv(b, lq, lk, h, dh, seed=3)
    index = _index([29, 4, 0], 29, lq, seed=4)
    kv_index = _index([9, 0, 31], 31, lk, seed=5)
    scale = 0.3
    grad = torch.randn(b, 29, h, dh, dtype=torch.float64)
    (out, dq, dk, dv), lse = _masked_fused(K, q, k, v, index, kv_index, scale, grad)
    assert lse.dtype == torch.float64
    for bi in range(b):
        for i in range(index.shape[1]):
            p = int(index[bi, i])
            kv = kv_index[bi][kv_index[bi] >= 0]
            if p < 0 or kv.numel() == 0:
                assert torch.all(lse[bi, :, i] == float("-inf")), (bi, i)
                assert torch.all(out[bi, i] == 0), (bi, i)
                continue
            logits = torch.einsum("hd,jhd->hj", q[bi, p], k[bi, kv]) * scale
            torch.testing.assert_close(lse[bi, :, i], torch.logsumexp(logits, dim=1), rtol=1e-12, atol=1e-12)
    ref = _masked_ref(q, k, v, index, kv_index, scale, grad)
    for what, f, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")
    # sample 1 has no keys: every gradient of it is 0; sample 2 keeps no queries: dk, dv 0
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    assert torch.all(dq[2] == 0) and torch.all(dk[2] == 0) and torch.all(dv[2] == 0)
    kept = torch.zeros(b, lq, dtype=torch.bool)
    for bi in range(b):
        kept[bi, index[bi][index[bi] >= 0]] = True
    assert torch.all(dq[~kept] == 0)


def test_count_bounds_the_work_and_bad_indices_are_ignored(K, poisoned_outputs):
    """The counts, not the -1s, bound each sample: entries past the count are never read
    even when they hold valid positions. Indices outside [0, L) inside the count are
    treated as invalid (no read or write out of bounds; a zero row), and counts larger
    than the index width are clamped. NaN in the upstream gradient of padding rows
    does not leak."""
    b, lq, h, dh = 2, 21, 1, 16
    q, k, v = _qkv(b, lq, lq, h, dh, seed=6)
    full = _index([21, 21], 21, lq, seed=7)  # every entry a valid position
    count = torch.tensor([6, 11], dtype=torch.int32)
    truncated = full.clone()
    truncated[0, 6:] = -1
    truncated[1, 11:] = -1
    grad = torch.randn(b, 21, h, dh, dtype=torch.float64)
    grad[0, 6:] = float("nan")
    grad[1, 11:] = float("nan")
    got, _ = _masked_fused(K, q, k, v, full, full, 0.25, grad, count, count)
    ref = _masked_ref(q, k, v, truncated, truncated, 0.25, torch.nan_to_num(grad))
    for what, f, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")

    bad = truncated.clone()
    bad[0, 2] = lq + 100  # out of range inside the count: an invalid query and key
    bad[1, 5] = -7
    big = torch.tensor([6, 99], dtype=torch.int32)  # clamped to the width 21
    grad = torch.nan_to_num(grad)
    (out, dq, dk, dv), lse = _masked_fused(K, q, k, v, bad, bad, 0.25, grad, big, big)
    assert torch.all(out[0, 2] == 0) and torch.all(out[1, 5] == 0)
    assert torch.all(lse[0, :, 2] == float("-inf"))
    clean = bad.clone()
    clean[0, 2:6] = torch.cat([bad[0, 3:6], torch.tensor([-1])])
    clean[1, 5:11] = torch.cat([bad[1, 6:11], torch.tensor([-1])])
    rg = grad.clone()
    rg[0, 2:6] = torch.cat([grad[0, 3:6], torch.zeros(1, h, dh, dtype=torch.float64)])
    rg[1, 5:11] = torch.cat([grad[1, 6:11], torch.zeros(1, h, dh, dtype=torch.float64)])
    r_out, r_dq, r_dk, r_dv = _masked_ref(q, k, v, clean, clean, 0.25, rg)
    keep0 = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out[0, keep0], r_out[0, :5], rtol=1e-10, atol=1e-12)
    keep1 = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    torch.testing.assert_close(out[1, keep1], r_out[1, :10], rtol=1e-10, atol=1e-12)
    for what, f, r in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def test_all_samples_empty_gives_zeros(K, poisoned_outputs):
    q, k, v = _qkv(2, 9, 9, 2, 16, seed=8)
    index = torch.full((2, 5), -1, dtype=torch.int64)
    grad = torch.randn(2, 5, 2, 16, dtype=torch.float64)
    (out, dq, dk, dv), lse = _masked_fused(K, q, k, v, index, index, 0.25, grad)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    for g in (dq, dk, dv):
        assert torch.all(g == 0)


def test_strided_inputs_are_read_in_place(K, poisoned_outputs):
    """q as a [B, H, L, Dh] buffer seen as [B, L, H, Dh], k a slice of a fused qkv
    projection [B, L, 3, H, Dh] (another L via a slice), v with feature stride 2, a
    strided grad_out."""
    b, l, h, dh = 2, 27, 2, 40
    g = torch.Generator().manual_seed(9)
    q = torch.randn(b, h, l, dh, generator=g, dtype=torch.float64).transpose(1, 2)
    qkv = torch.randn(b, l + 4, 3, h, dh, generator=g, dtype=torch.float64)
    k = qkv[:, 2:, 1]
    v = torch.randn(b, l + 2, h, 2 * dh, generator=g, dtype=torch.float64)[..., ::2]
    index = _index([27, 13], 27, l, seed=10)
    kv_index = _index([20, 25], 25, l + 2, seed=11)
    grad = torch.randn(b, h, 27, dh, generator=g, dtype=torch.float64).transpose(1, 2)
    for x in (q, k, v, grad):
        assert not x.is_contiguous()
    got, _ = _masked_fused(K, q, k, v, index, kv_index, 0.2, grad)
    ref = _masked_ref(q.contiguous(), k.contiguous(), v.contiguous(), index, kv_index, 0.2, grad.contiguous())
    for what, f, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def test_head_dim_above_128_is_refused(K):
    q = torch.zeros(1, 4, 1, 130)
    index = torch.zeros(1, 1, dtype=torch.int64)
    count = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head dim 130"):
        K.masked_patch_attention_forward(q, q, q, index, count, index, count, 0.1)
    with pytest.raises(ValueError, match="head dim 130"):
        K.varlen_attention_forward(q[0], q[0], q[0], torch.tensor([0, 4], dtype=torch.int32), 4, 0.1)


def test_the_rule_rejects_a_wrong_result(K):
    """The tolerance sees a scale off by 2% in float32."""
    q, k, v = _qkv(2, 30, 30, 1, 40, seed=12)
    index = _index([30, 17], 30, 30, seed=13)
    grad = torch.randn(2, 30, 1, 40, dtype=torch.float64)
    f32 = [x.float() for x in (q, k, v)]
    wrong, _ = _masked_fused(K, *f32, index, index, 0.2 * 1.02, grad.float())
    eager = _masked_ref(*f32, index, index, 0.2, grad.float())
    ref = _masked_ref(q, k, v, index, index, 0.2, grad)
    for what, f, e, r in zip(("out", "dq", "dk", "dv"), wrong, eager, ref):
        with pytest.raises(AssertionError):
            _check(f, e, r, torch.float32, what)


# ----------------------------------------------------------------------------- varlen


def _varlen(fn_q, k, v, cu, max_seqlen, scale, grad):
    xs = [x.detach().clone().requires_grad_(True) for x in (fn_q, k, v)]
    out = varlen_attention_reference(*xs, cu, max_seqlen, scale)
    return (out.detach(),) + torch.autograd.grad(out, xs, grad)


@pytest.mark.parametrize("dh", [16, 40, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_varlen_matches_float64_reference(K, poisoned_outputs, dtype, dh):
    lens = [5, 1, 33, 0, 17]  # one token, an empty sequence, tiles with tails
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t, h = int(cu[-1]), 2
    g = torch.Generator().manual_seed(dh)
    q = 2.0 * torch.randn(t, h, dh, generator=g, dtype=torch.float64)
    k, v, grad = (torch.randn(t, h, dh, generator=g, dtype=torch.float64) for _ in range(3))
    scale = dh ** -0.5
    cast = [x.to(dtype) for x in (q, k, v, grad)]
    out, lse = K.varlen_attention_forward(*cast[:3], cu, max(lens), scale)
    assert lse.shape == (h, t) and lse.dtype == torch.float64 and torch.isfinite(lse).all()
    grads = K.varlen_attention_backward(cast[3], *cast[:3], cu, max(lens), out, lse, scale)
    eager = _varlen(*cast[:3], cu, max(lens), scale, cast[3])
    ref = _varlen(q, k, v, cu, max(lens), scale, grad)
    for what, f, e, r in zip(("out", "dq", "dk", "dv"), (out, *grads), eager, ref):
        _check(f, e, r, dtype, what)
    # the lse of token 5 (the one-token sequence) is its own logit
    torch.testing.assert_close(lse[:, 5].double(), scale * (q[5] * k[5]).sum(-1), rtol=2e-3, atol=2e-3)


def test_varlen_strided_packed_qkv_and_wide_max_seqlen(K, poisoned_outputs):
    """q, k, v as views of one packed [T, 3, H, Dh] projection (read in place), a
    max_seqlen above the longest sequence, float64 exactness."""
    lens = [12, 1, 20]
    cu = torch.tensor([0, 12, 13, 33], dtype=torch.int32)
    t, h, dh = 33, 2, 88
    g = torch.Generator().manual_seed(14)
    qkv = torch.randn(t, 3, h, dh, generator=g, dtype=torch.float64)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    grad = torch.randn(t, h, dh, generator=g, dtype=torch.float64)
    out, lse = K.varlen_attention_forward(q, k, v, cu, 40, 0.15)
    grads = K.varlen_attention_backward(grad, q, k, v, cu, 40, out, lse, 0.15)
    ref = _varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, max(lens), 0.15, grad)
    for what, f, r in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- GPU plumbing


def test_gpu_configs_and_pruning(monkeypatch):
    """The autotune families on a copy of the module imported without the interpreter
    (the interpreter never runs them): every config has tiles >= 16, the pruner hands
    each (dtype, precision, head dim) its family (only its first config when autotuning
    is off)."""
    import importlib.util

    import triton

    import sslkernels.kernels.attention as interp

    monkeypatch.delenv("TRITON_INTERPRET")
    spec = importlib.util.spec_from_file_location("_sslk_attention_gpu", interp.__file__)
    m = importlib.util.module_from_spec(spec)
    m.__package__ = "sslkernels.kernels"
    spec.loader.exec_module(m)
    assert not m.INTERPRET
    for kernel, fams in ((m._attn_fwd_kernel, m._FWD), (m._attn_bwd_dkdv_kernel, m._BWD_KV),
                         (m._attn_bwd_dq_kernel, m._BWD_Q)):
        assert isinstance(kernel, triton.runtime.autotuner.Autotuner)
        for dtype, prec, dh, fam in ((torch.bfloat16, "ieee", 64, "half64"), (torch.float16, "ieee", 88, "half128"),
                                     (torch.float32, "tf32", 40, "tf3264"), (torch.float32, "tf32x3", 128, "x3128"),
                                     (torch.float32, "ieee", 16, "fma64"), (torch.float64, "ieee", 96, "fma128")):
            got = kernel.early_config_prune(kernel.configs, {"q_ptr": torch.empty(1, dtype=dtype)},
                                            PRECISION=prec, HEAD_DIM=dh)
            assert got == (fams[fam] if m.AUTOTUNE else fams[fam][:1])
        for c in kernel.configs:
            assert c.kwargs["BLOCK_M"] >= 16 and c.kwargs["BLOCK_N"] >= 16
    # every name left unspecialised is a parameter of its kernel (older Triton looks each one up)
    for kernel, names in ((m._attn_fwd_kernel, m._PER_BATCH_FWD), (m._attn_delta_kernel, m._PER_BATCH_DELTA),
                          (m._attn_bwd_dkdv_kernel, m._PER_BATCH_BWD), (m._attn_bwd_dq_kernel, m._PER_BATCH_BWD)):
        fn = kernel.fn if isinstance(kernel, triton.runtime.autotuner.Autotuner) else kernel
        assert set(names) <= set(fn.arg_names), (fn.arg_names, names)
    assert [m._block_d(d) for d in (16, 40, 64, 80, 88, 96, 128)] == [16, 64, 64, 128, 128, 128, 128]
    assert m._tune_rows(1) == 64 and m._tune_rows(196) == 256 and m._tune_rows(10**6) == 4096
