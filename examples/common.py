"""Shared pieces of the example training loops: data, the linear probe, the summary.

Only public sslkernels API is used by the examples; this file uses none at all.
Data ships inside scikit-learn (no download at run time).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

#: The fixed split every example probes on: stratified, 70 % train / 30 % test.
SPLIT_SEED = 0
TEST_FRACTION = 0.3


def setup(seed: int, threads: int = 2) -> torch.Generator:
    """Seed Python, NumPy and torch; cap torch's threads (the machine is shared). Returns a torch generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(threads)))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def digits_split() -> Tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """sklearn's digits (1797 8x8 images, 10 classes) as [N, 1, 8, 8] float32 in [0, 1], split 70/30.

    Returns (x_train, x_test, y_train, y_test). Self-supervised training sees x_train only.
    """
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    idx_tr, idx_te = train_test_split(np.arange(len(x)), test_size=TEST_FRACTION, stratify=d.target,
                                      random_state=SPLIT_SEED)
    return torch.from_numpy(x[idx_tr]), torch.from_numpy(x[idx_te]), d.target[idx_tr], d.target[idx_te]


def tabular_split(name: str) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """sklearn's breast cancer (569 x 30, 2 classes) or wine (178 x 13, 3 classes), split 70/30,
    each feature standardised with the training split's mean and std."""
    loader = {"breast_cancer": load_breast_cancer, "wine": load_wine}[name]
    d = loader()
    x = d.data.astype(np.float32)
    idx_tr, idx_te = train_test_split(np.arange(len(x)), test_size=TEST_FRACTION, stratify=d.target,
                                      random_state=SPLIT_SEED)
    mu, sd = x[idx_tr].mean(0), x[idx_tr].std(0) + 1e-6
    x = (x - mu) / sd
    return torch.from_numpy(x[idx_tr]), torch.from_numpy(x[idx_te]), d.target[idx_tr], d.target[idx_te]


def linear_probe(f_train, y_train, f_test, y_test) -> float:
    """Test accuracy of logistic regression on frozen features (standardised on the training split)."""
    f_train = np.asarray(f_train, dtype=np.float64).reshape(len(f_train), -1)
    f_test = np.asarray(f_test, dtype=np.float64).reshape(len(f_test), -1)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
    clf.fit(f_train, y_train)
    return float(clf.score(f_test, y_test))


def probe(fn, data) -> float:
    """``linear_probe`` on ``fn``'s features of a ``(x_train, x_test, y_train, y_test)`` split."""
    x_tr, x_te, y_tr, y_te = data
    return linear_probe(embed(fn, x_tr), y_tr, embed(fn, x_te), y_te)


def raw_probe(data) -> float:
    """``linear_probe`` on the inputs themselves: the reference a user knows."""
    x_tr, x_te, y_tr, y_te = data
    return linear_probe(x_tr.numpy(), y_tr, x_te.numpy(), y_te)


@torch.no_grad()
def embed(fn, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """fn over x in batches (no grad), as a float64 NumPy array."""
    return embed_tensor(fn, x, batch_size).double().numpy()


@torch.no_grad()
def embed_tensor(fn, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """fn over x in batches (no grad), as a tensor."""
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def cosine_lr(step: int, total: int, base: float, warmup: int = 0) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def parse_run_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Add the options every example takes last (--max-steps, --seed, --threads,
    --no-progress) to ``p``, and parse ``argv``."""
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (for smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def train_loop(x_train: torch.Tensor, opt: torch.optim.Optimizer, loss_fn: Callable, evaluate: Callable,
               g: torch.Generator, *, epochs: int, batch_size: int, lr: float, warmup: int,
               max_steps: Optional[int] = None, after_step: Optional[Callable] = None, desc: str = "",
               progress: bool = True) -> Dict:
    """The examples' loop: each epoch a fresh permutation of ``x_train`` (``g``), cut into
    full batches (the last partial one is dropped); per step the cosine learning rate
    (``warmup`` steps of it at most, never more than a tenth of the run), ``loss =
    loss_fn(x, step, total)``, a backward pass and ``opt.step()``, then ``after_step(step,
    total)`` (e.g. an EMA update); after each epoch ``evaluate()`` gives the RankMe logged.

    Returns ``history`` (per-epoch mean loss and RankMe), ``final_loss`` (the last step's),
    ``rankme`` (the last evaluation), ``steps``, ``train_time_s``.
    """
    n = len(x_train)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    warmup = min(warmup, total // 10)
    history, step, loss_sum, loss_n, last_loss = [], 0, 0.0, 0, float("nan")
    timer = Timer()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, file=sys.stdout, dynamic_ncols=True)
    while step < total:
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            if step >= total:
                break
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup=warmup) * group.get("lr_scale", 1.0)
            loss = loss_fn(x_train[perm[i * batch_size:(i + 1) * batch_size]], step, total)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(step, total)
            step += 1
            last_loss = loss.item()
            loss_sum, loss_n = loss_sum + last_loss, loss_n + 1
            bar.update(1)
        history.append({"epoch": len(history) + 1, "step": step, "loss": loss_sum / max(loss_n, 1),
                        "rankme": evaluate()})
        loss_sum, loss_n = 0.0, 0
        bar.set_postfix(loss=f"{history[-1]['loss']:.4g}", rankme=f"{history[-1]['rankme']:.2f}")
    bar.close()
    return {"history": history, "final_loss": last_loss, "rankme": history[-1]["rankme"] if history else float("nan"),
            "steps": step, "train_time_s": timer()}


def report(title: str, run: Dict, rankme_max: int, acc: float, acc_random: float, acc_raw: float,
           timer: "Timer", **extra) -> Dict:
    """The summary every example prints (``print_summary``) and returns: the run's loss and
    RankMe, the three probes, ``extra`` keys, then steps, epochs and times."""
    summary = {
        "final_loss": run["final_loss"],
        "rankme": run["rankme"],
        "rankme_max": rankme_max,
        "probe_acc": acc,
        "probe_acc_random_init": acc_random,
        "raw_logreg_acc": acc_raw,
        **extra,
        "steps": run["steps"],
        "epochs": len(run["history"]),
        "train_time_s": run["train_time_s"],
        "wall_time_s": timer(),
    }
    print_summary(title, summary)
    return summary


#: Keys every example's summary holds (tests check them).
SUMMARY_KEYS = ("final_loss", "rankme", "probe_acc", "probe_acc_random_init", "raw_logreg_acc", "wall_time_s")


def print_summary(title: str, summary: Dict) -> None:
    """A readable table, then one machine-readable line ``SUMMARY {json}``."""
    print(f"\n== {title} ==")
    width = max(len(k) for k in summary)
    for k, val in summary.items():
        shown = f"{val:.4f}" if isinstance(val, float) else str(val)
        print(f"  {k:<{width}}  {shown}")
    print("SUMMARY " + json.dumps(summary, sort_keys=False, default=str))
