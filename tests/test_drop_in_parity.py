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


def _pml_reducers():
    return pytest.importorskip("pytorch_metric_learning.reducers")


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


# ---------------------------------------------------------------- SupConLoss averaging


def _separable_batch(dtype=torch.float32, seed=0):
    """Rows 0..11: six pairs of near-duplicates along orthonormal directions, every
    other row at cosine <= 0 (loss below 3e-8 at t = 0.05: zero in float32 for pml);
    rows 12..51: three noisy classes in the other directions, at cosine ~ -0.3 to
    every pair (loss of order 1). pml averages over the second group only."""
    gen = torch.Generator().manual_seed(seed)
    d = 24
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    pairs = basis[:6]
    clean = torch.cat([pairs, pairs + 1e-4 * torch.randn(6, d - 6, generator=gen, dtype=torch.float64) @ basis[6:]])
    classes = torch.arange(40) % 3
    noisy = (-basis[:6].sum(0) + 2 * basis[6 + classes]
             + 0.5 * torch.randn(40, d - 6, generator=gen, dtype=torch.float64) @ basis[6:])
    x = torch.cat([clean, noisy]).to(dtype)
    labels = torch.cat([torch.arange(6).repeat(2), 100 + classes])
    return x, labels


@pytest.mark.parametrize("temperature", [0.05, 0.01])
def test_sup_con_nonzero_averaging_matches_pml_on_separable_data(temperature):
    losses = _pml_losses()
    x, labels = _separable_batch()
    ours, theirs = sslkernels.nn.SupConLoss(temperature), losses.SupConLoss(temperature)
    _assert_same_loss_and_grads(ours, theirs, x, labels, rtol=2e-4, atol=1e-6)
    # the paper's mean counts the twelve zero-loss anchors too: 52 anchors against pml's 40
    mean = float(sslkernels.sup_con(x, labels, temperature, reduction="mean"))
    assert float(ours(x, labels)) == pytest.approx(mean * 52 / 40, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.05, 0.01])
def test_sup_con_nonzero_never_negative_when_every_loss_rounds_to_zero(temperature):
    losses = _pml_losses()
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        basis = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0][:8]
        x = torch.cat([basis, basis + 1e-5 * torch.randn(8, 16, generator=gen)])
        labels = torch.arange(8).repeat(2)
        got = loss_and_grads(lambda a: sslkernels.nn.SupConLoss(temperature)(a, labels), x)
        expected = loss_and_grads(lambda a: losses.SupConLoss(temperature)(a, labels), x)
        assert float(got[0]) >= 0.0, trial
        # both are zero up to the loss's own rounding (1/t in float32)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=4 * torch.finfo(torch.float32).eps / temperature)


def test_sup_con_small_but_clear_anchor_losses_are_counted_as_pml_counts_them():
    """Pairs of near-duplicates whose losses spread over 5e-5 .. 0.1 at t = 0.05 (far
    above the rounding level): pml and ours keep every anchor."""
    losses = _pml_losses()
    gen = torch.Generator().manual_seed(4)
    centers = F.normalize(torch.randn(100, 16, generator=gen), dim=1)
    x = torch.cat([centers, centers + 1e-3 * torch.randn(100, 16, generator=gen)])
    labels = torch.arange(100).repeat(2)
    per_anchor = losses.SupConLoss(0.05, reducer=_pml_reducers().DoNothingReducer())(x, labels)["loss"]["losses"]
    assert 5e-5 <= float(per_anchor.min()) and float(per_anchor.max()) < 0.1
    # both round each anchor's loss at a few ulps of 1 / t in float32
    _assert_same_loss_and_grads(sslkernels.nn.SupConLoss(0.05), losses.SupConLoss(0.05), x, labels,
                                rtol=1e-4, atol=8 * torch.finfo(torch.float32).eps / 0.05)


def test_sup_con_nonzero_equals_mean_when_no_anchor_is_zero():
    x = torch.randn(77, 13, dtype=torch.float64)
    labels = torch.randint(0, 6, (77,))
    for a, b in zip(loss_and_grads(lambda z: sslkernels.sup_con(z, labels, 0.1, reduction="nonzero"), x),
                    loss_and_grads(lambda z: sslkernels.sup_con(z, labels, 0.1, reduction="mean"), x)):
        torch.testing.assert_close(a, b)


def test_sup_con_nonzero_float64_against_pml_and_gradcheck():
    losses = _pml_losses()
    x, labels = _separable_batch(torch.float64)
    _assert_same_loss_and_grads(sslkernels.nn.SupConLoss(0.05), losses.SupConLoss(0.05), x, labels,
                                rtol=1e-9, atol=1e-12)
    small = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    small_labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 0, 4])
    assert torch.autograd.gradcheck(lambda a: sslkernels.sup_con(a, small_labels, 0.3, reduction="nonzero"), (small,))


@pytest.mark.parametrize("labels", [torch.zeros(6, dtype=torch.long), torch.arange(6), torch.tensor([4])],
                         ids=["one_class", "no_positive", "batch_of_one"])
def test_sup_con_degenerate_batches_match_pml(labels):
    losses = _pml_losses()
    x = torch.randn(labels.numel(), 5)
    got = loss_and_grads(lambda a: sslkernels.nn.SupConLoss()(a, labels), x)
    expected = loss_and_grads(lambda a: losses.SupConLoss()(a, labels), x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
        assert torch.equal(a, torch.zeros_like(a))


def test_sup_con_nonzero_op_checks_and_saves_nothing_quadratic():
    x = torch.randn(13, 6)
    labels = torch.randint(0, 4, (13,))
    _, lse = torch.ops.sslkernels.sup_con_forward(x, labels, 0.2, True)
    torch.library.opcheck(torch.ops.sslkernels.sup_con_anchor_losses.default, (x, labels, lse, 0.2, True))
    n, d = 300, 8
    big = torch.randn(n, d, requires_grad=True)
    big_labels = torch.randint(0, 10, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = sslkernels.sup_con(big, big_labels, reduction="nonzero")
    loss.backward()
    assert saved and max(saved) <= n * d


@pytest.mark.slow
def test_sup_con_nonzero_compiles_fullgraph():
    x, labels = _separable_batch()
    fn = lambda a, y: sslkernels.sup_con(a, y, 0.05, reduction="nonzero")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, labels), fn(x, labels))


def test_sup_con_reduction_argument_errors():
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        sslkernels.sup_con(torch.randn(4, 3), torch.arange(4), reduction="sum")
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        sslkernels.nn.SupConLoss(reduction="avg")
    with pytest.raises(NotImplementedError, match="reduction='mean'"):
        sslkernels.nn.SupConLoss(gather_distributed=True)


# ---------------------------------------------------------------- ClipLoss


def _open_clip_loss_class():
    return import_bypassing_init("open_clip.loss").ClipLoss


def _clip_inputs(n=33, d=12, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=1)
    txt = F.normalize(img + 0.7 * torch.randn(n, d, generator=gen, dtype=dtype), dim=1)
    return img, txt


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "[1]"])
@pytest.mark.parametrize("scale", [1.0, 100.0, 250.0])  # 250: above CLIP's cap, which the loss does not apply
def test_clip_loss_scale_shapes_and_no_clamp_match_open_clip(shape, scale):
    img, txt = _clip_inputs()
    logit_scale = torch.full(shape, scale)
    got = loss_and_grads(sslkernels.nn.ClipLoss(), img, txt, logit_scale)
    expected = loss_and_grads(_open_clip_loss_class()(), img, txt, logit_scale)
    assert got[-1].shape == expected[-1].shape == shape  # the scale's gradient in its own shape
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_clip_loss_python_float_scale_matches_open_clip():
    img, txt = _clip_inputs()
    got = loss_and_grads(lambda a, b: sslkernels.nn.ClipLoss()(a, b, 14.3), img, txt)
    expected = loss_and_grads(lambda a, b: _open_clip_loss_class()()(a, b, 14.3), img, txt)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(), (1,)], ids=["0-dim", "[1]"])
def test_clip_loss_logit_bias_matches_open_clip(bias_shape):
    img, txt = _clip_inputs(dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.full(bias_shape, -10.0, dtype=torch.float64)
    got = loss_and_grads(sslkernels.nn.ClipLoss(), img, txt, scale, bias)
    expected = loss_and_grads(_open_clip_loss_class()(), img, txt, scale, bias)
    assert got[-1].shape == expected[-1].shape == bias_shape
    assert torch.equal(got[-1], torch.zeros(bias_shape, dtype=torch.float64))  # a shift: exactly no gradient
    for a, b in zip(got, expected):  # open_clip's bias gradient is 0 up to rounding
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the number form too
    torch.testing.assert_close(sslkernels.nn.ClipLoss()(img, txt, scale, -10.0), _open_clip_loss_class()()(img, txt, scale, -10.0))


def test_clip_loss_output_dict_matches_open_clip():
    img, txt = _clip_inputs()
    ours = sslkernels.nn.ClipLoss()(img, txt, torch.tensor(20.0), output_dict=True)
    theirs = _open_clip_loss_class()()(img, txt, torch.tensor(20.0), output_dict=True)
    assert set(ours) == set(theirs) == {"contrastive_loss"}
    torch.testing.assert_close(ours["contrastive_loss"], theirs["contrastive_loss"])


@pytest.mark.parametrize("scale,bias,exc,match", [
    (torch.tensor([1.0, 2.0]), None, NotImplementedError, "logit_scale"),
    (torch.tensor(0.0), None, ValueError, "logit_scale"),
    (torch.tensor(float("inf")), None, ValueError, "logit_scale"),
    (torch.tensor(5), None, TypeError, "logit_scale"),
    (10.0, torch.tensor(float("nan")), ValueError, "logit_bias"),
    (10.0, "x", TypeError, "logit_bias"),
])
def test_clip_loss_bad_scale_or_bias_raises(scale, bias, exc, match):
    img, txt = _clip_inputs(n=5, d=3)
    with pytest.raises(exc, match=match):
        sslkernels.nn.ClipLoss()(img, txt, scale, bias)


# ---------------------------------------------------------------- NTXentLoss memory bank


def _lightly_ntxent_class():
    return import_bypassing_init(
        "lightly.loss.ntx_ent_loss",
        extra_packages=("lightly.models", "lightly.models.modules", "lightly.utils"),
        stub_modules=("lightly.models.utils",),
    ).NTXentLoss


LOG2_FLOAT32 = float(torch.tensor(math.log(2), dtype=torch.float32))


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_ntxent_bank_holding_the_positive_gives_exactly_log_2(batch):
    """A bank of 1 that holds the normalised positive (enqueued by the previous step):
    the positive and the bank row tie, so every row's loss is log 2, exactly, as in
    lightly. Many random trials: a few ulps of 1 / t between the two logits showed up
    in 13-38 % of them before."""
    Lightly = _lightly_ntxent_class()
    gen = torch.Generator().manual_seed(11)
    for trial in range(60):
        d = 1 + (trial * 13) % 130
        out0 = torch.randn(batch, d, generator=gen)
        out1 = torch.randn(1, d, generator=gen).repeat(batch, 1)
        # lightly's own mean over rows rounds in float32 past one row; ours sums in float64
        for cls in (Lightly, sslkernels.nn.NTXentLoss) if batch == 1 else (sslkernels.nn.NTXentLoss,):
            loss = cls(temperature=0.1, memory_bank_size=(1, d))
            loss(out0.clone().requires_grad_(), out1)  # enqueues normalize(out1)
            assert float(loss(out0, out1)) == LOG2_FLOAT32, (cls.__module__, trial, d)


@pytest.mark.parametrize("size", [0, (0, 16), [0, 16], (0,)])
def test_ntxent_empty_bank_is_no_bank_as_in_lightly(size):
    Lightly = _lightly_ntxent_class()
    theirs, ours = Lightly(0.3, memory_bank_size=size), sslkernels.nn.NTXentLoss(0.3, memory_bank_size=size)
    assert ours.memory_bank is None
    out0, out1 = torch.randn(9, 16), torch.randn(9, 16)
    for a, b in zip(loss_and_grads(ours, out0, out1), loss_and_grads(theirs, out0, out1)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [4096, (-1, 16), (8, 4, 2)])
def test_ntxent_bank_sizes_lightly_refuses_are_refused(size):
    Lightly = _lightly_ntxent_class()
    with pytest.raises(ValueError):
        Lightly(memory_bank_size=size)
    with pytest.raises(ValueError, match="memory_bank_size"):
        sslkernels.nn.NTXentLoss(memory_bank_size=size)


def test_ntxent_bank_gradients_match_lightly_float64():
    Lightly = _lightly_ntxent_class()
    theirs = Lightly(temperature=0.07, memory_bank_size=(19, 6))
    ours = sslkernels.nn.NTXentLoss(temperature=0.07, memory_bank_size=(19, 6))
    theirs.memory_bank.bank = theirs.memory_bank.bank.double()
    ours.memory_bank.bank = ours.memory_bank.bank.double()
    ours.memory_bank.bank.copy_(theirs.memory_bank.bank)
    for step in range(3):
        out0, out1 = torch.randn(8, 6, dtype=torch.float64) * 3, torch.randn(8, 6, dtype=torch.float64)
        for a, b in zip(loss_and_grads(ours, out0, out1), loss_and_grads(theirs, out0, out1)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- Attention (timm / I-JEPA)


@pytest.fixture(scope="module")
def timm():
    from tests._timm import import_timm

    mod = import_timm()
    if mod is None:
        pytest.skip("timm is not installed (scripts/setup.sh installs it)")
    return mod


def _small_vit(timm, **kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(7)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5,
                             **kw).eval()


def test_attention_accepts_every_timm_keyword(timm):
    import inspect

    from timm.layers import Attention as TimmAttention

    theirs = set(inspect.signature(TimmAttention.__init__).parameters) - {"self"}
    ours = inspect.signature(sslkernels.nn.Attention.__init__).parameters
    assert theirs <= set(ours), theirs - set(ours)
    after_heads = [n for n in ours if n not in ("self", "dim", "num_heads")]
    assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in after_heads)
    for name in ("qk_scale", "use_sdpa", "return_attention"):  # I-JEPA's
        assert name in ours


def test_attention_positional_options_raise_type_error():
    with pytest.raises(TypeError):
        sslkernels.nn.Attention(24, 3, True)  # timm's third positional is attn_head_dim, I-JEPA's qkv_bias
    with pytest.raises(TypeError):
        sslkernels.nn.Attention(24, 3, None, None, True)


@pytest.mark.parametrize("options", [{}, {"qk_norm": True}, {"qkv_bias": False, "proj_bias": False}],
                         ids=["default", "qk_norm", "no_bias"])
def test_vision_transformer_with_our_attention_layer_matches_timm(timm, options):
    theirs = _small_vit(timm, **options)
    ours = _small_vit(timm, attn_layer=sslkernels.nn.Attention, **options)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same keys, same order
    ours.load_state_dict(theirs.state_dict())
    img = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(ours(img), theirs(img), rtol=1e-4, atol=1e-5)
    ours.train(), theirs.train()
    for a, b in zip(loss_and_grads(lambda x: ours(x).square().sum(), img),
                    loss_and_grads(lambda x: theirs(x).square().sum(), img)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_timm_options_match_timm_attention(timm):
    from timm.layers import Attention as TimmAttention

    kw = dict(attn_head_dim=5, dim_out=14, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True,
              norm_layer=torch.nn.LayerNorm)
    torch.manual_seed(8)
    theirs = TimmAttention(12, num_heads=3, **kw).eval()
    ours = sslkernels.nn.Attention(12, num_heads=3, **kw).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():  # LayerNorms start at 1 / 0: move them off so the norms count
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_attention_qk_norm_needs_norm_layer_as_timm():
    with pytest.raises(ValueError, match="norm_layer"):
        sslkernels.nn.Attention(24, 3, qk_norm=True)


def test_attention_ijepa_keywords():
    torch.manual_seed(9)
    m = sslkernels.nn.Attention(24, num_heads=3, qkv_bias=True, qk_scale=0.25, attn_drop=0.0, proj_drop=0.0,
                                use_sdpa=False, return_attention=True).eval()
    x = torch.randn(2, 5, 24)
    out, attn = m(x)
    assert attn is None and m.scale == 0.25
    b, n, c = x.shape
    q, k, v = m.qkv(x).reshape(b, n, 3, 3, 8).permute(2, 0, 3, 1, 4)
    ref = m.proj(((q @ k.transpose(-2, -1)) * 0.25).softmax(-1).matmul(v).transpose(1, 2).reshape(b, n, c))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["patch_vit", "attn_layer"])
def test_timm_vit_with_our_attention_is_scriptable(timm, how):
    theirs = _small_vit(timm)
    if how == "patch_vit":
        ours = sslkernels.patch_vit(_small_vit(timm))
    else:
        ours = _small_vit(timm, attn_layer=sslkernels.nn.Attention)
        ours.load_state_dict(theirs.state_dict())
    scripted = torch.jit.script(ours)
    img = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(scripted(img), theirs(img), rtol=1e-4, atol=1e-5)
    scripted.train()
    loss = scripted(img).square().sum()
    loss.backward()  # the op's autograd works under TorchScript too
    assert ours.blocks[0].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------- edge cases and the differences that remain


def test_batch_of_one_matches_the_packages():
    Lightly, Clip = _lightly_ntxent_class(), _open_clip_loss_class()
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    for got, expected in ((loss_and_grads(sslkernels.nn.NTXentLoss(), a, b), loss_and_grads(Lightly(), a, b)),
                          (loss_and_grads(sslkernels.nn.ClipLoss(), F.normalize(a, dim=1), F.normalize(b, dim=1),
                                          torch.tensor(10.0)),
                           loss_and_grads(Clip(), F.normalize(a, dim=1), F.normalize(b, dim=1), torch.tensor(10.0)))):
        for x, y in zip(got, expected):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_ntxent_bank_float64_where_lightly_raises():
    """A documented difference: lightly's bank is float32 and its einsum refuses float64
    outputs; ours casts the bank to the outputs' dtype."""
    Lightly = _lightly_ntxent_class()
    out0, out1 = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        Lightly(memory_bank_size=(5, 8))(out0, out1)
    assert sslkernels.nn.NTXentLoss(memory_bank_size=(5, 8))(out0, out1).dtype == torch.float64


def test_negative_temperature_lightly_takes_is_refused():
    """A documented difference: lightly only refuses |t| < 1e-8; a negative temperature
    turns the loss upside down, so ours refuses t <= 0."""
    Lightly = _lightly_ntxent_class()
    assert torch.isfinite(Lightly(temperature=-0.5)(torch.randn(3, 4), torch.randn(3, 4)))
    with pytest.raises(ValueError, match="temperature"):
        sslkernels.nn.NTXentLoss(temperature=-0.5)


@pytest.mark.parametrize("which", ["ntxent", "supcon", "clip"])
def test_non_finite_inputs_raise_where_the_packages_return_nan(which):
    """A documented difference: the packages return NaN for a NaN input; ours names it."""
    x = torch.randn(6, 4)
    x[2, 1] = float("nan")
    y = F.normalize(torch.randn(6, 4), dim=1)
    if which == "ntxent":
        assert torch.isnan(_lightly_ntxent_class()()(x, y))
        call = lambda: sslkernels.nn.NTXentLoss()(x, y)  # noqa: E731
    elif which == "supcon":
        labels = torch.tensor([0, 0, 1, 1, 2, 2])
        assert torch.isnan(_pml_losses().SupConLoss()(x, labels))
        call = lambda: sslkernels.nn.SupConLoss()(x, labels)  # noqa: E731
    else:
        assert torch.isnan(_open_clip_loss_class()()(x, y, torch.tensor(10.0)))
        call = lambda: sslkernels.nn.ClipLoss()(x, y, torch.tensor(10.0))  # noqa: E731
    with pytest.raises(ValueError, match="NaN"):
        call()
