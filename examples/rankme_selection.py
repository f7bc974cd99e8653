"""Does RankMe pick good SimCLR hyperparameters without labels? A sweep on digits.

    python examples/rankme_selection.py            # 20 runs of simclr.py's training, ~5-7 min on 2 cores
    python examples/rankme_selection.py --epochs 5 --temperatures 0.1 0.5 --lrs 1e-3

Each run trains SimCLR (``simclr.train``, imported, not copied) with one
(temperature, learning rate) pair from a grid fixed before any run was looked at,
then records

* RankMe of the training embeddings: the ``RankMeMonitor``'s last evaluation,
  RankMe of the encoder's features of the (clean, unlabelled) training images
  after the last epoch -- chosen in advance as the selection criterion;
* linear-probe test accuracy (labels: used for judging only).

Then it reports the Spearman correlation between RankMe and probe accuracy, and the
regret of picking the run with the highest RankMe (best accuracy minus that run's
accuracy), writes a CSV and a scatter plot (PNG).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
from typing import Dict, List

import numpy as np
from scipy.stats import spearmanr

import common
import simclr

#: The grid, fixed before the first run: temperatures from SimCLR's usual 0.1-0.5 out to
#: 0.05 and 1.0 (where NT-Xent is known to under-use dimensions), learning rates from
#: under-trained (3e-4 over ~240 steps) to aggressive (1e-2).
TEMPERATURES = (0.05, 0.1, 0.2, 0.5, 1.0)
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES),
                   help=f"NT-Xent temperatures (default {TEMPERATURES})")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LEARNING_RATES),
                   help=f"peak learning rates (default {LEARNING_RATES})")
    p.add_argument("--epochs", type=int, default=60, help="epochs per run (60, simclr.py's default)")
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per run (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"), help="where the CSV and PNG go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def plot(rows: List[Dict], chosen: Dict, rho: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({r["temperature"] for r in rows})
    lrs = sorted({r["lr"] for r in rows})
    markers = "osD^v<>p*h"
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    for r in rows:
        ti, li = temps.index(r["temperature"]), lrs.index(r["lr"])
        ax.scatter(r["rankme"], 100 * r["probe_acc"], color=cmap(ti / max(1, len(temps) - 1)),
                   marker=markers[li % len(markers)], s=46, edgecolor="k", linewidth=0.4)
    ax.scatter(chosen["rankme"], 100 * chosen["probe_acc"], s=220, facecolor="none", edgecolor="red",
               linewidth=1.5, label="highest RankMe (chosen)")
    for ti, t in enumerate(temps):
        ax.scatter([], [], color=cmap(ti / max(1, len(temps) - 1)), marker="o", label=f"t={t:g}")
    for li, lr in enumerate(lrs):
        ax.scatter([], [], color="grey", marker=markers[li % len(markers)], label=f"lr={lr:g}")
    ax.set_xlabel("RankMe of training-set features (monitor, last epoch)")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_title(f"SimCLR on digits, {len(rows)} runs: Spearman {rho:.2f}")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    timer = common.Timer()
    os.makedirs(args.out_dir, exist_ok=True)
    data = common.digits_split()
    grid = list(itertools.product(args.temperatures, args.lrs))
    rows = []
    for i, (t, lr) in enumerate(grid):
        run = simclr.train(temperature=t, lr=lr, epochs=args.epochs, seed=args.seed, max_steps=args.max_steps,
                           threads=args.threads, progress=not args.no_progress, data=data)
        acc = simclr.probe(run["model"], data)
        row = {"temperature": t, "lr": lr, "rankme": run["rankme"],
               "probe_acc": acc, "final_loss": run["final_loss"], "steps": run["steps"],
               "train_time_s": run["train_time_s"]}
        rows.append(row)
        print(f"[{i + 1:2d}/{len(grid)}] t={t:<5g} lr={lr:<7g} rankme={row['rankme']:6.2f} "
              f"probe={acc:.4f}  loss={row['final_loss']:.3f}  "
              f"{row['train_time_s']:.0f}s", flush=True)

    rank = np.array([r["rankme"] for r in rows])
    acc = np.array([r["probe_acc"] for r in rows])
    rho = float(spearmanr(rank, acc).statistic) if len(rows) > 2 else float("nan")
    chosen = rows[int(np.argmax(rank))]
    best = rows[int(np.argmax(acc))]

    csv_path = os.path.join(args.out_dir, "rankme_selection.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png_path = os.path.join(args.out_dir, "rankme_selection.png")
    plot(rows, chosen, rho, png_path)

    summary = {
        "runs": len(rows),
        "spearman": rho,
        "regret_points": 100 * (best["probe_acc"] - chosen["probe_acc"]),
        "chosen": f"t={chosen['temperature']:g} lr={chosen['lr']:g}",
        "chosen_probe_acc": chosen["probe_acc"],
        "best": f"t={best['temperature']:g} lr={best['lr']:g}",
        "best_probe_acc": best["probe_acc"],
        "median_probe_acc": float(np.median(acc)),
        "worst_probe_acc": float(acc.min()),
        "csv": os.path.relpath(csv_path),
        "png": os.path.relpath(png_path),
        "wall_time_s": timer(),
    }
    common.print_summary("RankMe as a label-free selector of SimCLR runs (digits)", summary)
    return summary


if __name__ == "__main__":
    main()
