"""The performance model of benchmarks/GPU_MODEL.md, computed (not typed in): per Triton
kernel at its timed shapes, the flops, the fewest bytes, the exp count, the floors on an
H200 and the programs launched against its 132 SMs, with the pinned (first) config of each
kernel family read from the kernel modules.

    python -m benchmarks.gpu.model                 # prints the markdown table of GPU_MODEL.md
    python -m benchmarks.gpu.model --against CSV   # predicted floor against a device run's CSV

Ceilings (KINDS.md, measured on these cards): ~790 TFLOP/s bf16 dense, ~4.3 TB/s copy.
fp32 products run as tf32x3 (three TF32 products): ~1/3 of the TF32 rate, itself half of
bf16's. exp2 on the special-function units: 16 per clock per SM (Hopper), 132 SMs at
~1.98 GHz (the clock read after a product on these cards)."""
from __future__ import annotations

import math

import torch

BF16_FLOPS = 790e12
TF32X3_FLOPS = 790e12 / 2 / 3
FP32_FMA_FLOPS = 67e12  # datasheet (no tensor cores): a lead
FP64_FLOPS = 67e12  # datasheet fp64 tensor-core rate: a lead, not measured here
BYTES_PER_S = 4.3e12
SMS = 132
CLOCK_HZ = 1.98e9
EXP_PER_S = 16 * SMS * CLOCK_HZ


def _pinned(families, d, dtype, prec="ieee"):
    from sslkernels.kernels import contrastive as K

    return K._family_configs(families, d, dtype, prec)[0]


def _entry(kernel, shape, dtype, flops, nbytes, exps, programs, rate, note=""):
    t_mm = flops / rate * 1e3
    t_mem = nbytes / BYTES_PER_S * 1e3
    t_exp = exps / EXP_PER_S * 1e3
    floor = max(t_mm, t_mem, t_exp)
    bound = {t_mm: "products", t_mem: "bytes", t_exp: "exp"}[floor]
    return dict(kernel=kernel, shape=shape, dtype=dtype, gflop=flops / 1e9, mb=nbytes / 2**20, gexp=exps / 1e9,
                t_mm=t_mm, t_mem=t_mem, t_exp=t_exp, floor=floor, bound=bound, programs=programs,
                per_sm=programs / SMS, note=note)


def nt_xent_entries():
    from sslkernels.kernels import contrastive as K

    out = []
    for dt, dtype, rate, elt in (("bf16", torch.bfloat16, BF16_FLOPS, 2), ("fp32", torch.float32, TF32X3_FLOPS, 4)):
        prec = "ieee" if dtype != torch.float32 else K.FP32_PRECISION
        for d in (128, 256):
            for n in (1024, 4096, 8192, 32768):
                m = 2 * n
                fam, fmeta, bmeta = K._plan(d, dtype, True, prec)
                fcfg = _pinned(K._FWD_FAMILIES, d, dtype, prec)
                bcfg = _pinned(K._BWD_FAMILIES, d, dtype, prec)
                block_do = bmeta.get("BLOCK_DO", d) or d
                slices = math.ceil(d / block_do)  # output-feature slices (S recomputed per slice)
                # the column sweep's split (lead 2) and its fp32 scratch, written once and read once
                programs = 2 * math.ceil(n / bcfg.kwargs["BLOCK_M"]) * slices
                col_splits = K._column_splits(programs, 2 * math.ceil(n / bcfg.kwargs["BLOCK_N"]), m * d * 4, SMS)
                scratch = 2 * col_splits * m * d * 4 if col_splits > 1 else 0
                shape = f"N={n} D={d}"
                fprograms = 2 * math.ceil(n / fcfg.kwargs["BLOCK_M"])
                fsplits = K._column_splits(fprograms, 2 * math.ceil(n / fcfg.kwargs["BLOCK_N"]), 3 * m * 4, SMS)
                partials = 2 * 3 * fsplits * m * 4 if fsplits > 1 else 0  # (max, rest, positive) per split
                out.append(_entry("nt_xent fwd", shape, dt, 2 * m * m * d, m * d * elt + 8 * m + partials, m * m,
                                  fprograms * fsplits, rate,
                                  f"{fam} BLOCK_M {fcfg.kwargs['BLOCK_M']}, {fsplits} column split(s)"))
                out.append(_entry("nt_xent bwd", shape, dt, 2 * m * m * d * slices + 2 * m * m * d,
                                  2 * m * d * elt + 4 * m + scratch, 2 * m * m,
                                  programs * col_splits, rate,
                                  f"BLOCK_M {bcfg.kwargs['BLOCK_M']}, {slices} output slice(s), "
                                  f"{col_splits} column split(s)"))
    return out


def lse_entries():
    """SupCon N=8192 D=128, InfoNCE N=8192 D=256 K=16384 (detached queue), CLIP N=8192 D=256."""
    from sslkernels.kernels import contrastive as K

    out = []
    for dt, dtype, rate, elt in (("bf16", torch.bfloat16, BF16_FLOPS, 2), ("fp32", torch.float32, TF32X3_FLOPS, 4)):
        prec = "ieee" if dtype != torch.float32 else K.FP32_PRECISION
        n = 8192
        d = 128
        f = _pinned(K._LSE_FWD_FAMILIES, d, dtype, prec).kwargs["BLOCK_M"]
        b = _pinned(K._LSE_BWD_FAMILIES, d, dtype, prec).kwargs["BLOCK_M"]
        out.append(_entry("sup_con fwd", f"N={n} D={d} C=100", dt, 2 * n * n * d, n * d * elt + 16 * n, n * n,
                          math.ceil(n / f), rate, "+ positives' logits summed in-tile"))
        out.append(_entry("sup_con bwd", f"N={n} D={d} C=100", dt, 4 * n * n * d, 2 * n * d * elt + 16 * n, 2 * n * n,
                          math.ceil(n / b), rate, "W from both rows' lse, as NT-Xent"))
        d, k = 256, 16384
        f = _pinned(K._LSE_FWD_FAMILIES, d, dtype, prec).kwargs["BLOCK_M"]
        b = _pinned(K._LSE_BWD_FAMILIES, d, dtype, prec).kwargs["BLOCK_M"]
        cand = n + k
        out.append(_entry("info_nce fwd", f"N={n} D={d} K={k}", dt, 2 * n * cand * d,
                          (2 * n + k) * d * elt + 8 * n, n * cand, math.ceil(n / f), rate))
        out.append(_entry("info_nce bwd", f"N={n} D={d} K={k}", dt, 4 * n * cand * d + 4 * n * n * d,
                          (4 * n + k) * d * elt + 8 * n, n * cand + n * n, 2 * math.ceil(n / b), rate,
                          "dquery pass over N + K, dkey column pass over N"))
        # one sweep (lead 6): S once, the key columns' (max, sum) per row block written and merged
        acc_elt = 4
        part = 2 * K._col_part_row_blocks(n, d, dtype) * n * acc_elt
        out.append(_entry("clip fwd", f"N={n} D={d} K=0", dt, 2 * n * n * d,
                          2 * n * d * elt + 16 * n + 2 * part, 2 * n * n,
                          math.ceil(n / f), rate,
                          f"one sweep + merge ({part / 2**20:.1f} MB of column partials, written and read once)"))
        out.append(_entry("clip[two-pass] fwd", f"N={n} D={d} K=0", dt, 4 * n * n * d, 2 * n * d * elt + 16 * n,
                          2 * n * n, 2 * math.ceil(n / f), rate, "two directions: two passes (CLIP_ONE_SWEEP=False)"))
        out.append(_entry("clip bwd", f"N={n} D={d} K=0", dt, 8 * n * n * d, 4 * n * d * elt + 16 * n, 4 * n * n,
                          2 * math.ceil(n / b), rate, "dquery and dkey passes, each S + W B"))
    return out


def attention_entries():
    from sslkernels._benchmark import _kept_patches
    from sslkernels.kernels import attention as A

    out = []
    s = {"b": 32, "l": 196, "h": 12, "dh": 64, "lo": 78, "hi": 196}
    _, _, _, index = _kept_patches(s, torch.float32, torch.device("cpu"))
    counts = (index >= 0).sum(1).double()
    sq = float((counts * counts).sum()) * s["h"]
    kept = float(counts.sum()) * s["h"]
    for dt, dtype, rate, elt in (("bf16", torch.bfloat16, BF16_FLOPS, 2), ("fp32", torch.float32, TF32X3_FLOPS, 4)):
        prec = "ieee" if dtype != torch.float32 else "tf32x3"
        fam = A._family(dtype, prec, s["dh"])
        bm = A._FWD[fam][0].kwargs["BLOCK_M"]
        rows = index.shape[1]
        progs = math.ceil(rows / bm) * s["b"] * s["h"]
        dh = s["dh"]
        shape = "B=32 L=196 H=12 Dh=64 kept~U[78,196]"
        out.append(_entry("masked_patch_attention fwd", shape, dt, 4 * sq * dh, (4 * kept * dh) * elt + 4 * kept,
                          sq, progs, rate, f"{fam} BLOCK_M {bm}; work over the kept pairs only"))
        out.append(_entry("masked_patch_attention bwd", shape, dt, 14 * sq * dh, (8 * kept * dh) * elt + 8 * kept,
                          2 * sq, 2 * progs, rate, "3 kernels, 7 tile products (deterministic dq)"))
        t = 32 * 147 * 12
        out.append(_entry("varlen_attention fwd", "B=32 n=147 H=12 Dh=64", dt, 4 * 147 * t * dh,
                          4 * t * dh * elt + 4 * t, 147 * t, math.ceil(147 / bm) * 32 * 12, rate))
        out.append(_entry("varlen_attention bwd", "B=32 n=147 H=12 Dh=64", dt, 14 * 147 * t * dh,
                          8 * t * dh * elt + 8 * t, 2 * 147 * t, 2 * math.ceil(147 / bm) * 32 * 12, rate))
    return out


def spectral_entries():
    out = []
    for b, n, sweeps in ((4096, 32, 9), (512, 128, 11)):
        rounds = n - 1 + (n % 2)
        flops = b * sweeps * rounds * 10 * n * n  # ~10 M N flops per round (gamma, rotation, norms)
        out.append(_entry("svdvals", f"B={b} {n}x{n}", "fp32", flops, b * n * n * 4 + b * n * 4, 0, b,
                          FP32_FMA_FLOPS, f"Jacobi, ~{sweeps} sweeps (random matrices); FMA units"))
    m, n = 25600, 2048
    out.append(_entry("rankme", f"N={m} D={n} rank={n}", "fp32", 2 * m * n * n, m * n * 4 + 2 * m * n * 8, 0,
                      0, FP64_FLOPS, "Gram route: float64 Gram (cuBLAS) + eigvalsh 2048 (cuSOLVER, not modelled)"))
    return out


def entries():
    return nt_xent_entries() + lse_entries() + attention_entries() + spectral_entries()


def markdown(rows) -> str:
    head = ("| kernel | shape | dtype | GFLOP | MB | G exp | products ms | bytes ms | exp ms | floor ms "
            "(bound) | programs (per SM) | note |\n|" + "---|" * 12 + "\n")
    body = "".join(
        f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['gflop']:.1f} | {r['mb']:.1f} | {r['gexp']:.3f} | "
        f"{r['t_mm']:.3f} | {r['t_mem']:.4f} | {r['t_exp']:.3f} | **{r['floor']:.3f}** ({r['bound']}) | "
        f"{r['programs']} ({r['per_sm']:.2f}) | {r['note']} |\n" for r in rows)
    return head + body


def floors_by_row(rows=None) -> dict:
    """(op, case, dtype, pass) as the device CSV names them -> the predicted floor in ms
    (fwdbwd = fwd + bwd floors)."""
    floors = {}
    for r in rows if rows is not None else entries():
        op, _, which = r["kernel"].rpartition(" ")
        if which not in ("fwd", "bwd"):
            op, which = r["kernel"], "fwd"
        floors[(op, r["shape"], r["dtype"], which)] = r["floor"]
    for (op, shape, dt, which), ms in list(floors.items()):
        bwd = [(o, shape, dt, "bwd") for o in (op, op.split("[")[0]) if (o, shape, dt, "bwd") in floors]
        if which == "fwd" and bwd:  # (a variant's forward beside the op's backward: "clip[two-pass]")
            floors[(op, shape, dt, "fwdbwd")] = ms + floors[bwd[0]]
    return floors


def against(csv_path: str) -> str:
    """Markdown: each timed row of a device CSV beside its predicted floor."""
    from benchmarks.gpu._core import read_csv

    floors = floors_by_row()
    lines = ["| op | case | dtype | pass | floor ms | fused ms | fused / floor | eager ms |", "|" + "---|" * 8]
    for r in read_csv(csv_path):
        key = (r["op"], r["case"], r["dtype"], r["pass"])
        if key not in floors:  # a variant of an op ("info_nce[moco]") against the op's floor
            key = (r["op"].split("[")[0], *key[1:])
        if key not in floors or not r["fused_ms"]:
            continue
        try:
            ratio = f"{float(r['fused_ms']) / floors[key]:.1f}x"
        except ValueError:
            ratio = "-"
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['pass']} | {floors[key]:.3f} | "
                     f"{r['fused_ms']} | {ratio} | {r['eager_ms'] or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--against":
        print(against(sys.argv[2]), end="")
    else:
        print(markdown(entries()), end="")
