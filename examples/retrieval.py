"""Two-tower retrieval with in-batch softmax: `sslkernels.info_nce` with and without its
retrieval terms, on synthetic interactions with a long-tailed item popularity.

In-batch negatives are sampled in proportion to popularity, so a plain in-batch softmax
over-penalises popular items; the paper "Self-supervised Learning for Large-scale Item
Recommendations" (Yao et al.) adds the correction -log q_j to each candidate's logit,
q_j the probability that item j lands in a batch. Popular items also repeat inside a
batch, and a repeat of a user's positive is not a negative: `key_ids` masks it.

    python examples/retrieval.py                 # four runs, ~10 s on 2 cores
    python examples/retrieval.py --max-steps 3   # smoke test

Prints Recall@10 on held-out interactions for the plain loss, each term alone and both,
beside a most-popular baseline, and a `SUMMARY {json}` line.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

import sslkernels


def interactions(num_users: int, num_items: int, per_user: int, g: torch.Generator):
    """(user, item) pairs: item j is drawn for a user with probability proportional to
    popularity_j * exp(u . v_j), popularity a Zipf law; the last pair of each user is held out."""
    dim = 16
    users = torch.randn(num_users, dim, generator=g)
    items = torch.randn(num_items, dim, generator=g)
    popularity = 1.0 / torch.arange(1, num_items + 1, dtype=torch.float64) ** 0.9
    weights = popularity[None, :] * torch.exp((users @ items.T).double() / 2.0)
    picks = torch.multinomial(weights, per_user, replacement=False, generator=g)  # [users, per_user]
    user_ids = torch.arange(num_users)[:, None].expand_as(picks)
    train = (user_ids[:, :-1].reshape(-1), picks[:, :-1].reshape(-1))
    test = (user_ids[:, -1], picks[:, -1])
    return train, test


def recall_at(k: int, user_table, item_table, train, test) -> float:
    """Fraction of held-out items in the user's top k, the user's training items left out."""
    with torch.no_grad():
        u = torch.nn.functional.normalize(user_table.weight, dim=1)
        v = torch.nn.functional.normalize(item_table.weight, dim=1)
        scores = u @ v.T
        scores[train[0], train[1]] = -math.inf
        top = scores.topk(k, dim=1).indices
        return float((top[test[0]] == test[1][:, None]).any(dim=1).float().mean())


def popularity_recall_at(k: int, train, test, num_users: int, num_items: int) -> float:
    """The same recall for the most popular items each user has not seen: the baseline a
    retrieval model has to beat when popularity drives the interactions."""
    counts = torch.bincount(train[1], minlength=num_items).double()
    scores = counts[None, :].expand(num_users, num_items).clone()
    scores[train[0], train[1]] = -math.inf
    top = scores.topk(k, dim=1).indices
    return float((top[test[0]] == test[1][:, None]).any(dim=1).float().mean())


def train_run(use_bias: bool, use_ids: bool, train, test, num_users, num_items, args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    user_table = torch.nn.Embedding(num_users, args.dim)
    item_table = torch.nn.Embedding(num_items, args.dim)
    opt = torch.optim.Adam(list(user_table.parameters()) + list(item_table.parameters()), lr=args.lr)
    # q_j: the chance that a batch slot holds item j, from the training pairs' frequencies
    counts = torch.bincount(train[1], minlength=num_items).double()
    log_q = torch.log(counts.clamp(min=1) / counts.sum()).float()
    pairs = train[0].numel()
    loss = torch.tensor(float("nan"))
    steps = 0
    for _ in range(args.epochs):
        order = torch.randperm(pairs, generator=g)
        for start in range(0, pairs - args.batch + 1, args.batch):
            batch = order[start:start + args.batch]
            users, items = train[0][batch], train[1][batch]
            terms = {}
            if use_bias:
                terms["logit_bias"] = -log_q[items]
            if use_ids:
                terms["key_ids"] = items
            loss = sslkernels.info_nce(user_table(users), item_table(items), temperature=args.temperature, **terms)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps >= args.max_steps:
                break
        if steps >= args.max_steps:
            break
    return {"final_loss": float(loss.detach()), "steps": steps, "recall_at_10": recall_at(10, user_table, item_table,
                                                                                 train, test)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--per-user", type=int, default=12)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true", help="(no progress bar is drawn; kept for the test runner)")
    args = p.parse_args()
    torch.set_num_threads(max(1, args.threads))
    t0 = time.time()
    train, test = interactions(args.users, args.items, args.per_user, torch.Generator().manual_seed(1234))
    popular = popularity_recall_at(10, train, test, args.users, args.items)
    runs = {name: train_run(bias, ids, train, test, args.users, args.items, args)
            for name, bias, ids in (("plain", False, False), ("bias", True, False), ("ids", False, True),
                                    ("corrected", True, True))}
    labels = {"plain": "in-batch softmax", "bias": "+ logit_bias = -log q_j", "ids": "+ key_ids (duplicates masked)",
              "corrected": "+ both"}
    print(f"{'most popular unseen items':32s} Recall@10 {popular:.4f}")
    for name, run in runs.items():
        print(f"{labels[name]:32s} Recall@10 {run['recall_at_10']:.4f} (final loss {run['final_loss']:.3f}, "
              f"{run['steps']} steps)")
    summary = {"recall_popularity": popular, **{f"recall_{k}": v["recall_at_10"] for k, v in runs.items()},
               **{f"final_loss_{k}": v["final_loss"] for k, v in runs.items()},
               "steps": runs["plain"]["steps"], "wall_time_s": time.time() - t0}
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
