"""SimCLR on scikit-learn's digits with sslkernels' fused NT-Xent loss and RankMe monitor.

    python examples/simclr.py                      # ~1-2 min on 2 CPU cores
    python examples/simclr.py --epochs 5 --temperature 0.2 --seed 1

The two lines that differ from a lightly SimCLR loop:

    from sslkernels.nn import NTXentLoss            # was: from lightly.loss import NTXentLoss
    monitor = sslkernels.RankMeMonitor(every=1, max_samples=len(x_train))
    ...
    monitor(encoder(x_train))   # once per epoch: RankMe of the training set's features, no labels

Self-supervised training sees the 70 % training split only (no labels). At the end
a logistic-regression probe on the frozen encoder's features is scored on the 30 %
test split, beside the same probe on the encoder at random initialisation (the
floor to beat) and on the raw pixels (the reference).
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import sslkernels
from sslkernels.nn import NTXentLoss

import common


class Encoder(nn.Module):
    """A small CNN ending in global average pooling, [B, 1, 8, 8] -> [B, dim].

    Random 3x3 filters pooled over the image are already good features for digits
    (a probe on 128 random pooled channels scores ~0.98), so the representation is
    kept narrow: ``dim`` = 16 pooled channels, whose random-init probe is ~0.8.
    What the probe finds above that was learned.
    """

    def __init__(self, width: int = 32, dim: int = 16):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(*block(1, w), *block(w, 2 * w), nn.MaxPool2d(2),   # 8x8 -> 4x4
                                 *block(2 * w, dim), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dim = dim

    def forward(self, x):
        return self.net(x)


class SimCLR(nn.Module):
    def __init__(self, width: int = 32, dim: int = 16, proj_hidden: int = 64, proj_dim: int = 32):
        super().__init__()
        self.encoder = Encoder(width, dim)
        self.projector = nn.Sequential(nn.Linear(dim, proj_hidden), nn.BatchNorm1d(proj_hidden),
                                       nn.ReLU(inplace=True), nn.Linear(proj_hidden, proj_dim))

    def forward(self, x):
        h = self.encoder(x)
        return h, self.projector(h)


def augment(x: torch.Tensor, g: torch.Generator, max_shift: float = 1.0, crop: tuple = (0.7, 1.0),
            max_rot_deg: float = 15.0, noise: float = 0.1) -> torch.Tensor:
    """Random view of a batch of 8x8 digits [B, 1, 8, 8], one affine warp per image:

    * crop and resize: a square crop of side ``s * 8`` (s in ``crop``) at a random
      place inside the image, resized back to 8x8 (bilinear);
    * shift: up to ``max_shift`` pixels on each axis (zeros come in);
    * rotation: up to ``max_rot_deg`` degrees either way;
    * Gaussian pixel noise of std ``noise``, and a random contrast in [0.8, 1.2].
    """
    b = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=g)

    s = u(*crop)                                    # crop side, fraction of the image
    cx, cy = u(-1, 1) * (1 - s), u(-1, 1) * (1 - s)  # crop centre (normalised coords), crop stays inside
    px = 2.0 / x.shape[-1]                          # one pixel in normalised coords
    tx, ty = cx + u(-max_shift, max_shift) * px, cy + u(-max_shift, max_shift) * px
    a = u(-max_rot_deg, max_rot_deg) * math.pi / 180
    cos, sin = torch.cos(a) * s, torch.sin(a) * s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out * u(0.8, 1.2)[:, None, None, None]
    return out + noise * torch.randn(out.shape, generator=g)


def train(temperature: float = 0.2, lr: float = 2e-3, epochs: int = 60, batch_size: int = 256,
          width: int = 32, dim: int = 16, weight_decay: float = 1e-4, seed: int = 0,
          max_steps: Optional[int] = None, threads: int = 2, progress: bool = True,
          data=None) -> Dict:
    """Train SimCLR on the digits training split; the function the RankMe study imports.

    Returns a dict: ``model``, ``history`` (per-epoch loss and RankMe), ``final_loss``,
    ``rankme`` (the monitor's last evaluation: RankMe of the encoder's features of
    the clean training images after the last epoch), ``steps``, ``train_time_s``.
    """
    g = common.setup(seed, threads)
    x_train, _, _, _ = data if data is not None else common.digits_split()
    n = len(x_train)  # the loop drops the last partial batch: BatchNorm and NT-Xent like full batches

    model = SimCLR(width, dim)
    criterion = NTXentLoss(temperature=temperature)  # sslkernels' fused loss, lightly's signature
    # sslkernels' label-free monitor: RankMe of the n most recent rows, evaluated on every call.
    monitor = sslkernels.RankMeMonitor(every=1, max_samples=n)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def evaluate_rankme():
        # RankMe of the encoder's features of the clean training images (no labels), once per epoch.
        model.eval()
        result = monitor(common.embed_tensor(model.encoder, x_train))
        model.train()
        return result["rankme"]

    def loss_fn(x, step, total):
        _, z1 = model(augment(x, g))
        _, z2 = model(augment(x, g))
        return criterion(z1, z2)

    model.train()
    run = common.train_loop(x_train, opt, loss_fn, evaluate_rankme, g, epochs=epochs, batch_size=batch_size, lr=lr,
                            warmup=20, max_steps=max_steps, desc=f"simclr t={temperature:g} lr={lr:g}",
                            progress=progress)
    model.eval()
    return {"model": model, **run}


def probe(model: SimCLR, data) -> float:
    model.eval()
    return common.probe(model.encoder, data)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60, help="passes over the training split (default 60)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step; each gives two views (256)")
    p.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature (0.2)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate, cosine decay (2e-3)")
    p.add_argument("--width", type=int, default=32, help="CNN width (32)")
    p.add_argument("--dim", type=int, default=16, help="representation dims: pooled channels the probe sees (16)")
    return common.parse_run_args(p, argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    timer = common.Timer()
    data = common.digits_split()
    run = train(temperature=args.temperature, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                width=args.width, dim=args.dim, seed=args.seed, max_steps=args.max_steps, threads=args.threads,
                progress=not args.no_progress, data=data)
    acc = probe(run["model"], data)
    common.setup(args.seed, args.threads)
    acc_random = probe(SimCLR(args.width, args.dim), data)  # same architecture, same seed, untrained
    acc_raw = common.raw_probe(data)
    return common.report("SimCLR on digits (sslkernels.nn.NTXentLoss + RankMeMonitor)", run,
                         run["model"].encoder.dim, acc, acc_random, acc_raw, timer)


if __name__ == "__main__":
    main()
