"""sslkernels.nn.Attention, patch_vit (timm and an I-JEPA-style ViT) and the packed JEPA
context encoder."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sslkernels
from sslkernels.masks import multiblock_masks
from tests._timm import import_timm

TOL = dict(rtol=2e-5, atol=2e-6)


def eager_attention(module, x):
    """The timm / I-JEPA attention written out: qkv, q k^T * scale, softmax, @ v, proj."""
    b, n, c = x.shape
    h = module.num_heads
    qkv = module.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1) * module.scale).softmax(dim=-1)
    return module.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class IJEPAAttention(nn.Module):
    """I-JEPA's Attention layout (src/models/vision_transformer.py): returns (x, attn)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        return eager_attention(self, x), None


class IJEPABlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = IJEPAAttention(dim, num_heads, qkv_bias=True, qk_scale=0.3)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y, _ = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x))


def test_dense_forward_matches_eager_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    m = sslkernels.nn.Attention(48, num_heads=6, qkv_bias=True).eval()
    assert sorted(m.state_dict()) == ["proj.bias", "proj.weight", "qkv.bias", "qkv.weight"]
    x = torch.randn(3, 17, 48, requires_grad=True)
    out = m(x)
    ref = eager_attention(m, x)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, m.qkv.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, m.qkv.weight), g)
    torch.testing.assert_close(gx, rx, **TOL)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


def test_packed_forward_equals_each_sample_alone():
    torch.manual_seed(1)
    m = sslkernels.nn.Attention(32, num_heads=4).eval()
    x = torch.randn(3, 9, 32)
    keep = [torch.tensor([4, 0, 7]), torch.tensor([2]), torch.arange(9)]
    p = sslkernels.pack_patches(x, keep)
    out = m(p.tokens, cu_seqlens=p.cu_seqlens, max_seqlen=p.max_seqlen)
    for b in range(3):
        alone = m(x[b, keep[b]][None])[0]
        torch.testing.assert_close(out[p.cu_seqlens[b]:p.cu_seqlens[b + 1]], alone, **TOL)


def test_attention_errors():
    with pytest.raises(ValueError, match="divisible"):
        sslkernels.nn.Attention(30, num_heads=4)
    m = sslkernels.nn.Attention(16, num_heads=2, attn_drop=0.1)
    with pytest.raises(ValueError, match="attn_drop=0.1"):
        m(torch.randn(1, 3, 16))
    m.eval()
    assert m(torch.randn(1, 3, 16)).shape == (1, 3, 16)  # a no-op in eval, as in timm
    with pytest.raises(ValueError, match="max_seqlen"):
        m(torch.randn(4, 16), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        m(torch.randn(4, 16))


def test_patch_vit_ijepa_style_keeps_outputs_and_calling_convention():
    torch.manual_seed(2)
    model = nn.Sequential(*[IJEPABlock(24, 3) for _ in range(2)]).eval()
    x = torch.randn(2, 13, 24)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert sslkernels.patch_vit(model) is model
    assert all(isinstance(b.attn, sslkernels.nn.Attention) and b.attn.return_attention for b in model)
    assert model[0].attn.scale == 0.3
    after_state = model.state_dict()
    assert sorted(after_state) == sorted(state) and all(torch.equal(after_state[k], v) for k, v in state.items())
    torch.testing.assert_close(model(x), before, **TOL)


def test_patch_vit_refuses_what_it_cannot_carry():
    with pytest.raises(ValueError, match="no ViT attention"):
        sslkernels.patch_vit(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="`model`"):
        sslkernels.patch_vit("vit")
    blk = IJEPABlock(8, 2)
    blk.attn.q_norm = nn.LayerNorm(4)  # a norm its forward never applies: the output check refuses the swap
    with pytest.raises(NotImplementedError, match="computes something else"):
        sslkernels.patch_vit(blk)


@pytest.fixture(scope="module")
def timm():
    mod = import_timm()
    if mod is None:
        pytest.skip("timm is not installed (scripts/setup.sh installs it)")
    return mod


def test_patch_vit_on_timm_vision_transformer(timm):
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=10).eval()
    img = torch.randn(2, 3, 32, 32)
    before = model(img)
    keys = sorted(model.state_dict())
    sslkernels.patch_vit(model)
    assert sum(isinstance(m, sslkernels.nn.Attention) for m in model.modules()) == len(model.blocks)
    assert sorted(model.state_dict()) == keys  # the same checkpoint loads
    torch.testing.assert_close(model(img), before, rtol=1e-4, atol=1e-5)
    model.train()
    model(img).square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_patch_vit_carries_timm_qk_norm(timm):
    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, qk_norm=True,
                              num_classes=10).eval()
    with torch.no_grad():  # LayerNorms start at weight 1 / bias 0: move them so they count
        for blk in model.blocks:
            for p in list(blk.attn.q_norm.parameters()) + list(blk.attn.k_norm.parameters()):
                p.add_(0.2 * torch.randn_like(p))
    img = torch.randn(2, 3, 32, 32)
    before = model(img)
    keys = list(model.state_dict())
    sslkernels.patch_vit(model)
    assert all(isinstance(b.attn, sslkernels.nn.Attention) for b in model.blocks)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(img), before, rtol=1e-4, atol=1e-5)


def test_jepa_context_encoder_sees_every_visible_patch():
    torch.manual_seed(4)
    b, grid, dim = 6, (8, 8), 32
    context, _ = multiblock_masks(b, grid=grid, generator=torch.Generator().manual_seed(5))
    counts = context.sum(1)
    assert len(set(counts.tolist())) > 1
    enc = sslkernels.nn.PackedViTEncoder(dim, depth=2, num_heads=4).eval()
    x = torch.randn(b, grid[0] * grid[1], dim)
    tokens, packed = enc(x, context)
    assert tokens.shape == (int(counts.sum()), dim)  # I-JEPA's collator keeps b * min(counts)
    assert int(counts.sum()) > b * int(counts.min())
    # the same result as running each sample alone through the same blocks
    for i in range(b):
        alone, _ = enc(x[i:i + 1], context[i:i + 1])
        torch.testing.assert_close(tokens[packed.cu_seqlens[i]:packed.cu_seqlens[i + 1]], alone, **TOL)
    # the last visible patch of the longest sample (the first one truncation drops) reaches it
    longest = int(counts.argmax())
    last = int(context[longest].nonzero().max())
    x2 = x.clone()
    x2[longest, last] += 1.0
    tokens2, _ = enc(x2, context)
    lo, hi = int(packed.cu_seqlens[longest]), int(packed.cu_seqlens[longest + 1])
    assert not torch.allclose(tokens2[lo:hi], tokens[lo:hi])
    assert torch.equal(tokens2[:lo], tokens[:lo]) and torch.equal(tokens2[hi:], tokens[hi:])
    full = sslkernels.unpack_patches(tokens, packed)
    assert full.shape == x.shape and bool((full[~context] == 0).all())


class _WrongScaleAttention(IJEPAAttention):
    """qkv / proj / num_heads like I-JEPA's, but its forward uses another scale than `scale`."""

    def forward(self, x):
        self.scale, real = 1.7, self.scale
        try:
            return eager_attention(self, x), None
        finally:
            self.scale = real


def test_patch_vit_refuses_a_forward_that_computes_something_else():
    model = nn.Sequential(_WrongScaleAttention(16, 2))
    with pytest.raises(NotImplementedError, match="_WrongScaleAttention's output differs"):
        sslkernels.patch_vit(model)
    assert isinstance(model[0], _WrongScaleAttention)  # nothing half-swapped


@pytest.mark.parametrize("make", [
    lambda t: t.layers.Attention(32, 4, gated=True, qkv_bias=True),
    lambda t: t.layers.Attention(32, 4, attn_head_dim=16),
    lambda t: t.layers.Attention(32, 4, dim_out=16),
    lambda t: t.layers.Attention(32, 4, scale_norm=True, norm_layer=nn.LayerNorm),
    lambda t: t.layers.Attention(32, 4, qk_norm=True, scale_norm=True, gated=True, attn_head_dim=6, dim_out=20,
                                 norm_layer=nn.LayerNorm),
], ids=["gated", "attn_head_dim", "dim_out", "scale_norm", "all"])
def test_patch_vit_carries_timm_attention_options(timm, make):
    torch.manual_seed(10)
    model = nn.Sequential(make(timm)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 7, 32)
    before = model(x)
    keys = list(model.state_dict())
    sslkernels.patch_vit(model)
    assert isinstance(model[0], sslkernels.nn.Attention) and list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda t: t.layers.AttentionRope(32, 4), "forward takes rope"),
    (lambda t: __import__("timm.models.beit", fromlist=["Attention"]).Attention(32, 4, qkv_bias=True,
                                                                               window_size=(3, 3)),
     "q_bias, v_bias, relative_position_bias_table"),
])
def test_patch_vit_refuses_timm_variants_it_does_not_compute(timm, make, match):
    with pytest.raises(NotImplementedError, match=match):
        sslkernels.patch_vit(nn.Sequential(make(timm)))


@pytest.mark.parametrize("fused", [True, False])
def test_patch_vit_timm_attention_without_proj_bias(timm, fused):
    torch.manual_seed(6)
    model = nn.Sequential(timm.layers.Attention(40, 5, qkv_bias=True, proj_bias=False)).eval()
    model[0].fused_attn = fused  # timm's SDPA path and its manual path
    x = torch.randn(3, 11, 40)
    before = model(x)
    sslkernels.patch_vit(model)
    assert isinstance(model[0], sslkernels.nn.Attention) and model[0].proj.bias is None
    assert not model[0].return_attention
    torch.testing.assert_close(model(x), before, **TOL)


def test_jepa_context_encoder_equals_an_eager_dense_reference():
    """Each sample's packed output equals its visible patches run alone through the same
    blocks written out eagerly (LayerNorm, q k^T softmax, MLP): the packing adds nothing
    and loses nothing."""
    torch.manual_seed(7)
    b, grid, dim = 5, (7, 9), 24
    context, _ = multiblock_masks(b, grid=grid, generator=torch.Generator().manual_seed(8))
    enc = sslkernels.nn.PackedViTEncoder(dim, depth=3, num_heads=3).eval()
    x = torch.randn(b, grid[0] * grid[1], dim)
    tokens, packed = enc(x, context)
    for i in range(b):
        h = x[i][context[i]][None]
        for blk in enc.blocks:
            h = h + eager_attention(blk.attn, blk.norm1(h))
            h = h + blk.mlp(blk.norm2(h))
        ref = enc.norm(h)[0]
        torch.testing.assert_close(tokens[packed.cu_seqlens[i]:packed.cu_seqlens[i + 1]], ref, rtol=1e-4, atol=1e-5)


def test_patch_vit_is_all_or_nothing():
    model = nn.Sequential(IJEPABlock(16, 2), IJEPABlock(16, 2))
    model[1].attn = _WrongScaleAttention(16, 2)
    with pytest.raises(NotImplementedError, match="_WrongScaleAttention"):
        sslkernels.patch_vit(model)
    assert type(model[0].attn) is IJEPAAttention  # the first block was not swapped either
