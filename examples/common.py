"""Shared pieces of the example training loops: data, the linear probe, the summary.

Only public sslkernels API is used by the examples; this file uses none at all.
Data ships inside scikit-learn (no download at run time).
"""
from __future__ import annotations

import json
import math
import random
import time
from typing import Dict, Tuple

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

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
