"""Drop-in ViT attention on the fused varlen kernel, and `patch_vit` to swap it in."""
from __future__ import annotations

import copy
import inspect
from typing import Optional

import torch
from torch import nn

from sslkernels.functional import varlen_attention

__all__ = ["Attention", "patch_vit"]


class Attention(nn.Module):
    """Multi-head self-attention with the constructor keywords, parameters and
    state_dict keys of timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``norm``,
    ``gate``, ``proj``) and I-JEPA's, computed by :func:`sslkernels.varlen_attention`
    (C++ on the CPU, Triton on CUDA): the N x N attention matrix is never stored.

    * ``forward(x)``: dense ``x [B, N, C]`` -> ``[B, N, dim_out]`` (B sequences of N tokens).
    * ``forward(x, cu_seqlens=..., max_seqlen=...)``: packed ``x [T, C]`` from
      :func:`sslkernels.pack_patches`; each token attends to its own sample's tokens
      only (no truncation, no padding).

    Everything after ``num_heads`` is keyword-only (a positional call in timm's or
    I-JEPA's order raises TypeError instead of landing in the wrong option). timm's
    keywords: ``attn_head_dim``, ``dim_out``, ``qkv_bias``, ``qk_norm`` (``norm_layer``
    over each head's q and k, as timm), ``scale_norm`` (``norm_layer`` over the heads'
    output before ``proj``), ``proj_bias``, ``gated`` (sigmoid gate on the output),
    ``attn_drop``, ``proj_drop``, ``norm_layer``, ``device``, ``dtype``. I-JEPA's:
    ``qk_scale`` (softmax scale, default ``head_dim ** -0.5``) and ``use_sdpa`` (accepted;
    both values compute the same fused attention). ``return_attention=True`` returns
    ``(out, None)``, the calling convention of I-JEPA's ``Block``
    (``y, attn = self.attn(...)``): the fused kernel has no attention matrix to return.
    Attention dropout is not implemented: ``attn_drop > 0`` raises a ValueError in
    training mode (it is a no-op in eval, as in timm). ``attn_mask`` / ``is_causal``
    exist only because timm's ``Block`` passes them (None / False; anything else raises).
    The module can be scripted with ``torch.jit.script`` (the scripted forward calls the
    op directly, without the Python argument checks).

    Usage::

        attn = sslkernels.nn.Attention(384, num_heads=6, qkv_bias=True)
        y = attn(x)                                        # x [B, N, 384]
        p = sslkernels.pack_patches(x, keep)               # keep [B, N] bool or index lists
        y = attn(p.tokens, cu_seqlens=p.cu_seqlens, max_seqlen=p.max_seqlen)   # [T, 384]
        vit = timm.models.VisionTransformer(attn_layer=sslkernels.nn.Attention)
    """

    def __init__(self, dim: int, num_heads: int = 8, *, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, qk_scale: Optional[float] = None, use_sdpa: bool = True,
                 return_attention: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for value, name in ((dim, "dim"), (num_heads, "num_heads"), (attn_head_dim, "attn_head_dim"),
                            (dim_out, "dim_out")):
            if value is None and name in ("attn_head_dim", "dim_out"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads})")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("`norm_layer` must be given when `qk_norm` or `scale_norm` is True (as in timm), "
                             "e.g. norm_layer=torch.nn.LayerNorm")
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.dim_out = dim_out or dim
        self.scale = float(qk_scale) if qk_scale else attn_head_dim ** -0.5
        self.fused_attn = True  # timm's flag; the fused kernel is the only path
        self.use_sdpa = bool(use_sdpa)
        # registered in timm's order, so state_dict keys (and their order) are timm's
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **factory)
        self.q_norm = norm_layer(attn_head_dim, **factory) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **factory) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)  # kept for the module tree of timm / I-JEPA
        self.norm = norm_layer(self.attn_dim, **factory) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **factory) if gated else None
        self.proj = nn.Linear(self.attn_dim, self.dim_out, bias=proj_bias, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.return_attention = bool(return_attention)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False):
        if attn_mask is not None or is_causal:  # timm's Block passes attn_mask=None
            raise NotImplementedError("sslkernels.nn.Attention: `attn_mask` / `is_causal` are not supported; "
                                      "ragged samples go through cu_seqlens (sslkernels.pack_patches)")
        if self.training and self.attn_drop.p > 0:
            raise ValueError(
                f"sslkernels.nn.Attention: attention dropout (attn_drop={self.attn_drop.p}) is not implemented "
                "by the fused kernel; set attn_drop=0.0 (timm's and I-JEPA's default) or call .eval()")
        dense = cu_seqlens is None
        if cu_seqlens is None:  # (tested directly, not through `dense`: TorchScript refines the Optional)
            if x.dim() != 3:
                raise ValueError(f"dense `x` must be [B, N, C], got shape {x.shape}; packed [T, C] input needs "
                                 "`cu_seqlens` and `max_seqlen`")
            b, n = x.shape[0], x.shape[1]
            offsets = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=x.device)
            longest = n
        else:
            if x.dim() != 2:
                raise ValueError(f"packed `x` must be [T, C], got shape {x.shape}")
            if max_seqlen is None:
                raise ValueError("packed input needs `max_seqlen` (PackedPatches.max_seqlen)")
            offsets = cu_seqlens
            longest = max_seqlen
            b, n = 0, 0
        tokens = x.reshape(-1, x.shape[-1])
        qkv = self.qkv(tokens).reshape(-1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)  # strided views of the one projection: no copies
        q, k = self.q_norm(q), self.k_norm(k)
        if torch.jit.is_scripting():
            out = torch.ops.sslkernels.varlen_attention_forward(q, k, v, offsets, longest, self.scale)[0]
        else:
            out = varlen_attention(q, k, v, offsets, int(longest), scale=self.scale)
        out = self.norm(out.reshape(-1, self.attn_dim))
        if self.gate is not None:
            out = out * self.gate(tokens).sigmoid()
        out = self.proj_drop(self.proj(out))
        if dense:
            out = out.reshape(b, n, self.dim_out)
        if not torch.jit.is_scripting():
            if self.return_attention:
                return out, None
        return out

    @classmethod
    def from_module(cls, module: nn.Module) -> "Attention":
        """An ``Attention`` carrying ``module``'s weights, scale and dropout rates
        (a timm or I-JEPA attention: ``qkv`` and ``proj`` Linears, ``num_heads``), and
        its q / k norms, post-attention norm and output gate when it has them (timm's
        ``qk_norm``, ``scale_norm``, ``gated``; copied as they are), with its head width
        and output width (``attn_head_dim``, ``dim_out``).

        Raises NotImplementedError, naming the part, for what this module does not
        compute: other parameters or buffers (BEiT's ``q_bias`` / relative position
        table), forward arguments other than ``x`` / ``attn_mask`` / ``is_causal``
        (timm's ``rope``, V-JEPA's ``mask``), projections whose widths do not fit one
        head layout; and, as a last guard, a module whose output on one small random
        input differs from the swap's."""
        kind = type(module).__name__
        extra = [n for n, _ in module.named_children() if n not in _KNOWN_CHILDREN]
        extra += [n for n, _ in module.named_parameters(recurse=False)]
        extra += [n for n, _ in module.named_buffers(recurse=False)]
        if extra:
            raise NotImplementedError(f"patch_vit: {kind} has parts sslkernels.nn.Attention does not compute: "
                                      f"{', '.join(extra)}")
        extra_args = [n for n in inspect.signature(module.forward).parameters if n not in _KNOWN_ARGS]
        if extra_args:
            raise NotImplementedError(f"patch_vit: {kind}.forward takes {', '.join(extra_args)}, which "
                                      "sslkernels.nn.Attention does not accept")
        qkv, proj = module.qkv, module.proj
        dim, heads = qkv.in_features, int(module.num_heads)
        attn_dim = qkv.out_features // 3
        head_dim = int(getattr(module, "head_dim", attn_dim // heads))
        if qkv.out_features != 3 * heads * head_dim or proj.in_features != heads * head_dim:
            raise NotImplementedError(
                f"patch_vit: {kind} maps dim {dim} -> qkv {qkv.out_features} -> proj {proj.in_features}, which is "
                f"not 3 x {heads} heads x {head_dim} -> {heads} x {head_dim}")
        gate = getattr(module, "gate", None)
        if gate is not None and not (isinstance(gate, nn.Linear) and gate.in_features == dim
                                     and gate.out_features == heads * head_dim
                                     and (gate.bias is None) == (qkv.bias is None)):
            raise NotImplementedError(f"patch_vit: {kind}.gate is {type(gate).__name__}; only timm's Linear "
                                      f"dim -> heads x head_dim gate (with a bias when qkv has one) is supported")
        attn_drop = getattr(module, "attn_drop", 0.0)
        proj_drop = getattr(module, "proj_drop", 0.0)
        new = cls(dim, heads, attn_head_dim=head_dim, dim_out=proj.out_features, qkv_bias=qkv.bias is not None,
                  qk_scale=float(getattr(module, "scale", head_dim ** -0.5)),
                  attn_drop=attn_drop.p if isinstance(attn_drop, nn.Dropout) else float(attn_drop),
                  proj_drop=proj_drop.p if isinstance(proj_drop, nn.Dropout) else float(proj_drop),
                  proj_bias=proj.bias is not None, gated=gate is not None)
        for name in ("q_norm", "k_norm", "norm"):  # the module's own norms, whatever their type
            sub = getattr(module, name, None)
            if sub is not None and not isinstance(sub, nn.Identity):
                setattr(new, name, copy.deepcopy(sub))
        new.to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        new.qkv.load_state_dict(qkv.state_dict())
        new.proj.load_state_dict(proj.state_dict())
        if gate is not None:
            new.gate.load_state_dict(gate.state_dict())
        new.return_attention = _check_same_output(module, new, dim)
        new.train(module.training)
        return new


_KNOWN_CHILDREN = {"qkv", "proj", "attn_drop", "proj_drop", "q_norm", "k_norm", "norm", "gate"}
_KNOWN_ARGS = {"x", "attn_mask", "is_causal"}


def _check_same_output(module: nn.Module, new: "Attention", dim: int) -> bool:
    """Run ``module`` and its swap on one small random input in eval mode, no gradient;
    NotImplementedError if they differ. Returns whether ``module`` returns ``(x, attn)``
    (I-JEPA) rather than ``x`` (timm)."""
    was_training = module.training
    module.eval()
    new.eval()
    w = module.qkv.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, dim, generator=gen).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad():
            ref = module(x)
            out = new(x)
    finally:
        module.train(was_training)
    returns_tuple = isinstance(ref, tuple)
    ref = ref[0] if returns_tuple else ref
    if not isinstance(ref, torch.Tensor) or ref.shape != out.shape:
        raise NotImplementedError(f"patch_vit: {type(module).__name__} returned {type(ref).__name__} "
                                  f"{tuple(getattr(ref, 'shape', ()))}, not [B, N, C] = {tuple(out.shape)}")
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 3e-2
    err = float((out.float() - ref.float()).abs().max())
    scale = float(ref.float().abs().max()) + 1e-6
    if not err <= tol * scale:
        raise NotImplementedError(
            f"patch_vit: {type(module).__name__}'s output differs from sslkernels.nn.Attention with its weights "
            f"(max error {err:.3g} at output scale {scale:.3g}): its forward computes something else")
    return returns_tuple


def _is_vit_attention(module: nn.Module) -> bool:
    return (not isinstance(module, Attention) and isinstance(getattr(module, "qkv", None), nn.Linear)
            and isinstance(getattr(module, "proj", None), nn.Linear) and hasattr(module, "num_heads"))


def patch_vit(model: nn.Module) -> nn.Module:
    """Replace, in place, every timm / I-JEPA-style ViT attention module of ``model``
    (a submodule with ``qkv`` and ``proj`` Linears and ``num_heads``) by
    :class:`Attention` with the same weights; returns ``model``. Dense outputs match
    the original to float32 tolerance, and the state_dict keys stay the same.

    Every swap is checked first (see :meth:`Attention.from_module`: one tiny forward
    of each module on a private generator); if any module can not be swapped, the
    NotImplementedError names it and ``model`` is left untouched. Raises ValueError
    if ``model`` has no such module. Usage::

        model = timm.create_model("vit_base_patch16_224")   # or an I-JEPA ViT
        sslkernels.patch_vit(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    swaps = [(parent, name, Attention.from_module(child))
             for parent in model.modules() for name, child in parent.named_children() if _is_vit_attention(child)]
    if not swaps:
        raise ValueError("patch_vit: `model` has no ViT attention module (qkv and proj Linears, num_heads)")
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return model
