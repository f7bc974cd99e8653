"""Masked-patch attention and packed varlen attention: the fused CPU path against the
float64 eager oracle, autograd, opcheck, compile with changing lengths, bad input,
determinism and what autograd keeps."""
from __future__ import annotations

import pytest
import torch

import sslkernels
from sslkernels.reference import masked_patch_attention_reference, varlen_attention_reference
from tests._utils import assert_within_eager_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _index(counts, length, width=None, generator=None):
    """Kept positions per sample (random, unique), padded with -1 to `width`."""
    width = max(counts) if width is None else width
    index = torch.full((len(counts), width), -1, dtype=torch.int64)
    for b, c in enumerate(counts):
        index[b, :c] = torch.randperm(length, generator=generator)[:c]
    return index


def _qkv(b, length, h, dh, dtype, lk=None):
    lk = length if lk is None else lk
    return (torch.randn(b, length, h, dh).to(dtype), torch.randn(b, lk, h, dh).to(dtype),
            torch.randn(b, lk, h, dh).to(dtype))


def _out_and_grads(fn, q, k, v, *args, grad_out=None, **kwargs):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves, *args, **kwargs)
    g = grad_out.to(out.dtype) if grad_out is not None else torch.ones_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    return (out.detach(), *grads)


def _check_against_reference(fused_fn, ref_fn, q, k, v, args, dtype, kwargs=None):
    kwargs = kwargs or {}
    ref64 = _out_and_grads(ref_fn, q.double(), k.double(), v.double(), *args, **kwargs)
    grad_out = torch.randn(ref64[0].shape, dtype=torch.float64)
    ref64 = _out_and_grads(ref_fn, q.double(), k.double(), v.double(), *args, grad_out=grad_out, **kwargs)
    fused = _out_and_grads(fused_fn, q, k, v, *args, grad_out=grad_out, **kwargs)
    eager = _out_and_grads(ref_fn, q, k, v, *args, grad_out=grad_out, **kwargs)
    # dq / dk cancel to exactly 0 where a row has one key (p = 1): the size of their terms,
    # scale |dO| |v| |k or q|, is the floor there (_utils.rounding_floor)
    norm = {n: float(x.double().norm(dim=-1).max()) if x.numel() else 0.0
            for n, x in (("q", q), ("k", k), ("v", v), ("g", grad_out))}
    scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    terms = {"dq": scale * norm["g"] * norm["v"] * norm["k"], "dk": scale * norm["g"] * norm["v"] * norm["q"]}
    for what, f, e, r in zip(("out", "dq", "dk", "dv"), fused, eager, ref64):
        assert f.dtype == dtype and f.shape == r.shape, what
        assert_within_eager_error(f, e, r, dtype, what, terms.get(what, 0.0))
    return fused


# ------------------------------------------------------------------ masked: numerics

MASKED_CASES = [
    # (B, L, H, Dh, counts)
    (3, 11, 2, 40, [11, 1, 0]),
    (4, 37, 3, 80, [37, 20, 1, 5]),
    (2, 57, 2, 88, [57, 30]),
    (2, 97, 1, 96, [1, 97]),
    (3, 33, 2, 16, [0, 17, 33]),
    (2, 65, 2, 128, [64, 65]),
    (2, 301, 2, 64, [300, 129]),    # more than one key tile
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MASKED_CASES, ids=lambda c: f"B{c[0]}L{c[1]}H{c[2]}D{c[3]}")
def test_masked_matches_float64_reference(case, dtype, poisoned_outputs):
    b, length, h, dh, counts = case
    q, k, v = _qkv(b, length, h, dh, dtype)
    index = _index(counts, length, width=max(counts) + 2)   # extra padding columns
    fused = _check_against_reference(
        sslkernels.masked_patch_attention, masked_patch_attention_reference, q, k, v, (index,), dtype)
    out, dq, dk, dv = fused
    kept = index >= 0
    assert torch.all(out[~kept] == 0), "padding rows must be zero"
    for b_, c in enumerate(counts):
        mask = torch.ones(length, dtype=torch.bool)
        mask[index[b_, :c]] = False
        for g in (dq, dk, dv):
            assert torch.all(g[b_, mask] == 0), "patches nobody keeps must get a zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_separate_kv_index(dtype):
    b, length, lk, h, dh = 3, 23, 31, 2, 40
    q, k, v = _qkv(b, length, h, dh, dtype, lk=lk)
    index = _index([5, 23, 0], length)
    kv_index = _index([31, 1, 12], lk, width=33)
    _check_against_reference(sslkernels.masked_patch_attention, masked_patch_attention_reference,
                             q, k, v, (index,), dtype, {"kv_index": kv_index})


def test_masked_sample_without_keys_gives_zero_rows_and_grads():
    q, k, v = _qkv(2, 9, 2, 16, torch.float64)
    index = _index([4, 3], 9)
    kv_index = _index([5, 0], 9, width=5)
    out, dq, dk, dv = _out_and_grads(sslkernels.masked_patch_attention, q, k, v, index, kv_index=kv_index)
    ref = _out_and_grads(masked_patch_attention_reference, q, k, v, index, kv_index=kv_index)
    assert torch.all(out[1] == 0) and torch.all(dq[1] == 0) and torch.all(dk[1] == 0)
    for f, r in zip((out, dq, dk, dv), ref):
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f, r)


def test_masked_scale_and_strided_inputs():
    b, length, h, dh = 2, 19, 3, 24
    qkv = torch.randn(b, length, 3, h, dh, dtype=torch.float64)
    q, k, v = qkv.unbind(2)                       # token stride 3 * H * Dh, as from a fused qkv Linear
    assert not q.is_contiguous()
    index = _index([19, 7], length)
    for scale in (None, 0.05, 1.3):
        fused = _out_and_grads(sslkernels.masked_patch_attention, q, k, v, index, scale=scale)
        ref = _out_and_grads(masked_patch_attention_reference, q.contiguous(), k.contiguous(), v.contiguous(),
                             index, scale=scale)
        for f, r in zip(fused, ref):
            torch.testing.assert_close(f, r)


# ------------------------------------------------------------------ varlen: numerics

VARLEN_CASES = [
    # (lengths, H, Dh)
    ([5, 0, 7, 1], 2, 40),
    ([33], 3, 80),
    ([17, 64, 65], 2, 88),
    ([1, 1, 1], 1, 96),
    ([300, 3], 2, 16),
    ([129, 40], 1, 128),
]


def _cu(lengths, dtype=torch.int32):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"n{len(c[0])}H{c[1]}D{c[2]}")
def test_varlen_matches_float64_reference(case, dtype, poisoned_outputs):
    lengths, h, dh = case
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, dh).to(dtype) for _ in range(3))
    for cu in (_cu(lengths), _cu(lengths, torch.int64)):
        _check_against_reference(sslkernels.varlen_attention, varlen_attention_reference, q, k, v,
                                 (cu, max(lengths)), dtype)


def test_varlen_equals_masked_on_contiguous_patches():
    """The same attention asked two ways: packed sequences, and each sequence's tokens
    kept by index in its own padded sample."""
    lengths, h, dh = [7, 12, 3], 2, 40
    q, k, v = (torch.randn(sum(lengths), h, dh, dtype=torch.float64) for _ in range(3))
    cu = _cu(lengths)
    packed = sslkernels.varlen_attention(q, k, v, cu, max(lengths))
    width = max(lengths)
    pad = lambda x: torch.stack([torch.nn.functional.pad(x[a:b], (0, 0, 0, 0, 0, width - (b - a)))  # noqa: E731
                                 for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    index = _index(lengths, width)
    index = torch.where(index >= 0, torch.arange(width).expand_as(index), index)
    masked = sslkernels.masked_patch_attention(pad(q), pad(k), pad(v), index)
    torch.testing.assert_close(torch.cat([masked[i, :n] for i, n in enumerate(lengths)]), packed)


def test_varlen_strided_inputs_and_broadcast_grad():
    """q, k, v as views of one packed qkv projection [T, 3, H, Dh], and the stride-0
    gradient that out.sum().backward() sends."""
    lengths, h, dh = [6, 1, 9], 2, 24
    qkv = torch.randn(sum(lengths), 3, h, dh, dtype=torch.float64, requires_grad=True)
    cu = _cu(lengths, torch.int64)
    sslkernels.varlen_attention(*qkv.unbind(1), cu, 9).sum().backward()
    ours = qkv.grad.clone()
    qkv.grad = None
    varlen_attention_reference(*qkv.unbind(1), cu, 9).sum().backward()
    torch.testing.assert_close(ours, qkv.grad)


def test_masked_padding_columns_are_free_of_effect():
    """The same kept sets with far more -1 columns than patches: same result."""
    q, k, v = _qkv(2, 10, 2, 16, torch.float64)
    index = _index([3, 7], 10)
    wide = torch.cat([index, torch.full((2, 40), -1)], dim=1)
    narrow = _out_and_grads(sslkernels.masked_patch_attention, q, k, v, index)
    padded = _out_and_grads(sslkernels.masked_patch_attention, q, k, v, wide)
    torch.testing.assert_close(padded[0][:, :7], narrow[0])
    assert torch.all(padded[0][:, 7:] == 0)
    for a, b in zip(narrow[1:], padded[1:]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ autograd, ops, compile


def test_gradcheck_float64():
    q, k, v = (x.requires_grad_() for x in _qkv(2, 6, 2, 5, torch.float64))
    index = _index([4, 1], 6, width=5)
    kv_index = _index([3, 6], 6)
    assert torch.autograd.gradcheck(
        lambda a, b, c: sslkernels.masked_patch_attention(a, b, c, index, kv_index, scale=0.7), (q, k, v))
    qv, kv, vv = (torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = _cu([4, 0, 5])
    assert torch.autograd.gradcheck(lambda a, b, c: sslkernels.varlen_attention(a, b, c, cu, 5), (qv, kv, vv))


def test_opcheck():
    q, k, v = (x.requires_grad_() for x in _qkv(2, 7, 2, 8, torch.float32))
    index = _index([5, 2], 7)
    kv_index = _index([7, 3], 7)
    ops = torch.ops.sslkernels
    torch.library.opcheck(ops.masked_patch_attention_forward.default, (q, k, v, index, kv_index, 0.4))
    out, lse = ops.masked_patch_attention_forward(q.detach(), k.detach(), v.detach(), index, kv_index, 0.4)
    torch.library.opcheck(ops.masked_patch_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), index, kv_index, out, lse, 0.4))
    qv, kv, vv = (torch.randn(9, 2, 8, requires_grad=True) for _ in range(3))
    cu = _cu([4, 5])
    torch.library.opcheck(ops.varlen_attention_forward.default, (qv, kv, vv, cu, 5, 0.3))
    out, lse = ops.varlen_attention_forward(qv.detach(), kv.detach(), vv.detach(), cu, 5, 0.3)
    torch.library.opcheck(ops.varlen_attention_backward.default,
                          (torch.randn_like(out), qv.detach(), kv.detach(), vv.detach(), cu, 5, out, lse, 0.3))


def _compile_counter():
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend("inductor")


@pytest.mark.slow
def test_compile_masked_changing_counts_no_recompile():
    torch._dynamo.reset()
    counter = _compile_counter()

    def step(q, k, v, index):
        return (sslkernels.masked_patch_attention(q, k, v, index) * 2.0).sum()

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(1)
    for counts in ([9, 4, 12], [3, 3, 3], [12, 1, 0], [7, 11, 2]):
        q, k, v = (x.requires_grad_() for x in _qkv(3, 12, 2, 16, torch.float32))
        index = _index(counts, 12, generator=gen)
        torch._dynamo.mark_dynamic(index, 1)
        loss = compiled(q, k, v, index)
        loss.backward()
        expected = _out_and_grads(lambda a, b, c: step(a, b, c, index), q.detach(), k.detach(), v.detach())
        torch.testing.assert_close(loss.detach(), expected[0])
        torch.testing.assert_close(q.grad, expected[1])
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for 4 batches"


@pytest.mark.slow
@pytest.mark.parametrize("bound", ["fixed", "per_batch"])
def test_compile_varlen_changing_lengths_no_recompile(bound):
    """T marked dynamic on q, k, v, cu_seqlens. A fixed upper bound as max_seqlen: one
    compile for every batch. A max_seqlen that changes per batch: dynamo recompiles once
    (automatic dynamic makes the int symbolic), then never again."""
    torch._dynamo.reset()
    counter = _compile_counter()

    def step(q, k, v, cu, max_seqlen):
        return (sslkernels.varlen_attention(q, k, v, cu, max_seqlen) * 2.0).sum()

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    frames = []
    for lengths in ([5, 9], [3, 3, 8], [17], [2, 6, 1, 4], [11, 12]):
        t = sum(lengths)
        q, k, v = (torch.randn(t, 2, 16, requires_grad=True) for _ in range(3))
        cu = _cu(lengths)
        for x in (q, k, v, cu):
            torch._dynamo.mark_dynamic(x, 0)
        max_seqlen = 32 if bound == "fixed" else max(lengths)
        loss = compiled(q, k, v, cu, max_seqlen)
        loss.backward()
        expected = _out_and_grads(lambda a, b, c: step(a, b, c, cu, max_seqlen), q.detach(), k.detach(), v.detach())
        torch.testing.assert_close(loss.detach(), expected[0])
        torch.testing.assert_close(k.grad, expected[2])
        frames.append(counter.frame_count)
    expected_frames = [1] * 5 if bound == "fixed" else [1] + [2] * 4
    assert frames == expected_frames, f"compiled frames after each batch: {frames}"


def test_saves_nothing_of_attention_size():
    b, length, h, dh = 2, 200, 1, 4    # K * Kv = 40000 per sample, far above the inputs
    q, k, v = (x.requires_grad_() for x in _qkv(b, length, h, dh, torch.float32))
    index = _index([200, 150], length)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sslkernels.masked_patch_attention(q, k, v, index)
    out.sum().backward()
    assert saved, "the hook saw nothing: autograd recording is broken"
    assert max(saved) <= b * length * h * dh, f"saved sizes {saved}: something [B, K, Kv] was kept"
    # The hook does see an attention matrix where one is kept (I-JEPA's manual attention).
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        torch.softmax(qh @ kh.transpose(-1, -2), dim=-1) @ v.transpose(1, 2)
    assert max(saved) >= b * length * length


def test_deterministic_and_thread_count_independent():
    q, k, v = _qkv(5, 50, 3, 40, torch.float32)
    index = _index([50, 13, 1, 0, 37], 50)
    qv, kv, vv = (torch.randn(120, 3, 40) for _ in range(3))
    cu = _cu([60, 1, 59])
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(_out_and_grads(sslkernels.masked_patch_attention, q, k, v, index)
                           + _out_and_grads(sslkernels.varlen_attention, qv, kv, vv, cu, 60))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ bad input


def _masked_args(**change):
    q, k, v = _qkv(2, 6, 2, 16, torch.float32)
    args = dict(q=q, k=k, v=v, index=_index([4, 2], 6), kv_index=None, scale=None)
    args.update(change)
    return args


def _nan_at(x):
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    return x


MASKED_BAD = [
    (dict(index=torch.tensor([[0, 6, -1], [1, 2, -1]])), ValueError, "`index` holds 6, out of range"),
    (dict(index=torch.tensor([[0, -2, -1], [1, 2, -1]])), ValueError, "`index` holds -2"),
    (dict(index=torch.tensor([[0, 3, 3], [1, 2, -1]])), ValueError, "`index` holds a position twice"),
    (dict(index=torch.tensor([[0, -1, 3], [1, 2, -1]])), ValueError, "`index`: -1 may only pad the end"),
    (dict(index=torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)), TypeError, "`index` must be int64"),
    (dict(index=torch.tensor([[0.0, 1.0], [1.0, 2.0]])), TypeError, "`index` must be int64"),
    (dict(index=torch.tensor([0, 1, 2])), ValueError, r"`index` must have shape \[B=2, K\]"),
    (dict(index=torch.zeros(3, 2, dtype=torch.int64)), ValueError, r"`index` must have shape \[B=2, K\]"),
    (dict(kv_index=torch.tensor([[0, 0], [1, -1]])), ValueError, "`kv_index` holds a position twice"),
    (dict(kv_index=torch.tensor([[7, 0], [1, -1]])), ValueError, "`kv_index` holds 7"),
    (dict(q=torch.randn(2, 6, 2, 8)), ValueError, "`q` and `k` must agree"),
    (dict(k=torch.randn(3, 6, 2, 16)), ValueError, "`k` and `v` must have the same shape"),
    (dict(v=torch.randn(2, 6, 2, 16, dtype=torch.float64)), TypeError, "`k` and `v` must share a dtype"),
    (dict(q=torch.randn(6, 2, 16)), ValueError, "`q` must be 4-D"),
    (dict(q=torch.randint(0, 3, (2, 6, 2, 16))), TypeError, "`q` must be float"),
    (dict(q=[1.0]), TypeError, "`q` must be a torch.Tensor"),
    (dict(q=torch.randn(2, 6, 2, 300), k=torch.randn(2, 6, 2, 300), v=torch.randn(2, 6, 2, 300)),
     ValueError, "head dim 300 is out of range"),
    (dict(scale=float("nan")), ValueError, "`scale` must be finite"),
    (dict(scale="0.1"), TypeError, "`scale` must be a real number"),
    (dict(q=_nan_at(torch.randn(2, 6, 2, 16)), index=torch.tensor([[0, 1], [2, -1]])), ValueError,
     "`q` contains NaN or Inf"),
    (dict(k=_nan_at(torch.randn(2, 6, 2, 16)), index=torch.tensor([[0, 1], [2, -1]])), ValueError,
     "`k` contains NaN or Inf"),
]


@pytest.mark.parametrize("change,exc,match", MASKED_BAD, ids=range(len(MASKED_BAD)))
def test_masked_bad_input_raises(change, exc, match):
    with pytest.raises(exc, match=match):
        sslkernels.masked_patch_attention(**_masked_args(**change))


def test_masked_inf_in_v_raises():
    args = _masked_args(index=torch.tensor([[0, 1], [2, -1]]))
    args["v"][1, 2, 1, 3] = float("inf")
    with pytest.raises(ValueError, match="`v` contains NaN or Inf"):
        sslkernels.masked_patch_attention(**args)


def _varlen_args(**change):
    args = dict(q=torch.randn(10, 2, 16), k=torch.randn(10, 2, 16), v=torch.randn(10, 2, 16),
                cu_seqlens=_cu([4, 6]), max_seqlen=6, scale=None)
    args.update(change)
    return args


VARLEN_BAD = [
    (dict(cu_seqlens=torch.tensor([0, 7, 4, 10], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "must end at the number of tokens"),
    (dict(cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.float32)), TypeError, "int32 or int64"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, r"\[B \+ 1\]"),
    (dict(max_seqlen=5), ValueError, "shorter than the longest sequence"),
    (dict(max_seqlen=6.0), TypeError, "`max_seqlen` must be an int"),
    (dict(k=torch.randn(11, 2, 16), v=torch.randn(11, 2, 16)), ValueError, "same shape"),
    (dict(q=torch.randn(10, 3, 16)), ValueError, "`q` and `k` must agree"),
    (dict(q=torch.randn(2, 10, 2, 16)), ValueError, "`q` must be 3-D"),
    (dict(v=torch.randn(10, 2, 16, dtype=torch.float16)), TypeError, "share a dtype"),
    (dict(q=torch.randn(10, 2, 0), k=torch.randn(10, 2, 0), v=torch.randn(10, 2, 0)), ValueError, "head dim 0"),
    (dict(q=torch.full((10, 2, 16), float("inf"))), ValueError, "`q` contains NaN or Inf"),
]


@pytest.mark.parametrize("change,exc,match", VARLEN_BAD, ids=range(len(VARLEN_BAD)))
def test_varlen_bad_input_raises(change, exc, match):
    with pytest.raises(exc, match=match):
        sslkernels.varlen_attention(**_varlen_args(**change))


def test_head_dims_across_the_cpu_range():
    for dh in (1, 3, 200, 256):
        q, k, v = _qkv(2, 9, 1, dh, torch.float64)
        index = _index([9, 4], 9)
        for f, r in zip(_out_and_grads(sslkernels.masked_patch_attention, q, k, v, index),
                        _out_and_grads(masked_patch_attention_reference, q, k, v, index)):
            torch.testing.assert_close(f, r)


def test_ops_called_directly_check_their_index():
    """The C++ core trusts its rows: every op, backward included, checks them first."""
    q, k, v = _qkv(2, 6, 2, 16, torch.float32)
    good = _index([4, 2], 6)
    out, lse = torch.ops.sslkernels.masked_patch_attention_forward(q, k, v, good, good, 0.25)
    bad = good.clone()
    bad[1, 0] = 6
    with pytest.raises(ValueError, match="`index` holds 6"):
        torch.ops.sslkernels.masked_patch_attention_backward(out, q, k, v, bad, good, out, lse, 0.25)
    with pytest.raises(ValueError, match="`kv_index` holds 6"):
        torch.ops.sslkernels.masked_patch_attention_backward(out, q, k, v, good, bad, out, lse, 0.25)
    qv, kv, vv = (torch.randn(10, 2, 16) for _ in range(3))
    out, lse = torch.ops.sslkernels.varlen_attention_forward(qv, kv, vv, _cu([4, 6]), 6, 0.25)
    with pytest.raises(ValueError, match="must end at the number of tokens"):
        torch.ops.sslkernels.varlen_attention_backward(out, qv, kv, vv, _cu([4, 7]), 7, out, lse, 0.25)
