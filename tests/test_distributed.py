"""Cross-process negatives: 2 and 3 Gloo ranks on 127.0.0.1 against the one-process loss.

One spawn per world size runs every case (process start-up dominates the time);
each rank saves its losses and gradients, and the parent compares them with the
eager float64 reference on the concatenated batch. The contract: the DDP average
of the ranks' gradients is the single-process gradient, i.e. rank r's gradient of
its own slice, divided by W, is the single-process gradient of that slice, and the
ranks' mean gradient of a replicated tensor (temperature, queue, logit scale) is
the single-process one. Every case runs in both modes (``NAME`` for all_gather,
``NAME@ring``), against the same expectations: the modes return the same values
and gradients. lightly and open_clip, run inside the same ranks, are second
oracles for the drop-in modules.
"""
from __future__ import annotations

import inspect
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from sslkernels.reference.contrastive import info_nce_reference, nt_xent_reference, sup_con_reference
from tests._utils import run_gloo_ranks

B, D, M, K = 5, 7, 3, 11  # rows per rank, features, hard negatives per query, queue rows
EVEN = 4  # rows per rank of the sup_con_even case (B is odd; ring SupCon splits the rows in two)
T_NTX, T_SUP, T_NCE, SCALE = 0.3, 0.2, 0.15, 12.0
JOIN_TIMEOUT_S = 150
torch.distributed.is_available() or pytest.skip("torch.distributed is not available", allow_module_level=True)


def _data(world: int) -> dict:
    """The concatenated batch (float64) every rank slices; same in the parent."""
    g = torch.Generator().manual_seed(1234 + world)
    n = world * B
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = r(n, D)
    img = F.normalize(r(n, D), dim=1)
    return {
        "z1": r(n, D), "z2": r(n, D), "feats": r(n, D),
        "labels": torch.randint(0, 3, (n,), generator=g),
        # anchors whose positives are all on another rank, and labels seen once (no positive anywhere)
        "rare": torch.arange(n) % (n // 2 + 1),
        "q": q, "k": q + 0.7 * r(n, D), "queue": r(K, D), "hard": r(n, M, D),
        "img": img, "txt": F.normalize(img + 0.8 * r(n, D), dim=1),
        "x": r(2 * n, D),
        # info_nce's retrieval terms: few ids, so duplicates sit on every rank and in the queue
        "ids": torch.randint(0, 4, (n,), generator=g), "queue_ids": torch.randint(0, 4, (K,), generator=g),
        "bias": 0.5 * r(n + K),
        # every key id 0 but the last: each remote block of keys (and of queries) holds only
        # duplicates of an id-0 anchor, so the ring's block call has rows with no candidate
        "dup_ids": (torch.arange(n) == n - 1).long(), "dup_queue_ids": torch.arange(K) % 2,
    }


def _local(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[rank * B:(rank + 1) * B]


def _even(x: torch.Tensor, world: int) -> torch.Tensor:
    """The concatenated batch of the sup_con_even case: each rank's first EVEN rows."""
    return torch.cat([_local(x, r)[:EVEN] for r in range(world)])


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _run(fn, named: dict) -> dict:
    """loss and the gradient of every leaf in `named` that requires grad."""
    leaves = {k: _leaf(v) if v.is_floating_point() else v for k, v in named.items()}
    loss = fn(**leaves)
    wrt = [k for k, v in leaves.items() if v.is_floating_point()]
    grads = torch.autograd.grad(loss, [leaves[k] for k in wrt])
    return {"loss": loss.detach(), **{k: g for k, g in zip(wrt, grads)}}


MODES = ("all_gather", "ring")


def _name(case: str, mode: str) -> str:
    return case if mode == "all_gather" else f"{case}@{mode}"


def _cases(rank: int, world: int, mode: str):
    """(name, fn(**tensors) -> loss, tensors) run identically on every rank."""
    import sslkernels
    from sslkernels import functional as sf

    grp = torch.distributed.group.WORLD
    d = _data(world)
    loc = {k: _local(d[k], rank) for k in ("z1", "z2", "feats", "labels", "rare", "q", "k", "hard", "img", "txt")}
    temp = torch.tensor(T_NCE, dtype=torch.float64)
    scale = torch.tensor(SCALE, dtype=torch.float64)
    yield "nt_xent", lambda z1, z2: sf.nt_xent(z1, z2, T_NTX, process_group=grp, mode=mode), {
        "z1": loc["z1"], "z2": loc["z2"]}
    yield "sup_con", lambda feats, labels: sf.sup_con(feats, labels, T_SUP, process_group=grp, mode=mode), {
        "feats": loc["feats"], "labels": loc["labels"]}
    yield "sup_con_rare", lambda feats, labels: sf.sup_con(feats, labels, T_SUP, process_group=grp, mode=mode), {
        "feats": loc["feats"], "labels": loc["rare"]}
    yield "sup_con_even", lambda feats, labels: sf.sup_con(feats, labels, T_SUP, process_group=grp, mode=mode), {
        "feats": loc["feats"][:EVEN], "labels": loc["rare"][:EVEN]}
    yield "info_nce_queue", lambda q, k, queue, temp: sf.info_nce(
        q, k, temp, queue, process_group=grp, mode=mode), {"q": loc["q"], "k": loc["k"], "queue": d["queue"],
                                                           "temp": temp}
    yield "info_nce_symmetric", lambda q, k, temp: sf.info_nce(
        q, k, temp, symmetric=True, process_group=grp, mode=mode), {"q": loc["q"], "k": loc["k"], "temp": temp}
    yield "info_nce_hard", lambda q, k, hard: sf.info_nce(q, k, T_NCE, hard, process_group=grp, mode=mode), {
        "q": loc["q"], "k": loc["k"], "hard": loc["hard"]}
    n = world * B
    local_bias = _local(d["bias"][:n], rank)
    terms = dict(key_ids=_local(d["ids"], rank), queue_ids=d["queue_ids"],
                 logit_bias=torch.cat([local_bias, d["bias"][n:]]))
    yield "info_nce_terms", lambda q, k, queue, temp: sf.info_nce(
        q, k, temp, queue, process_group=grp, mode=mode, **terms), {"q": loc["q"], "k": loc["k"],
                                                                    "queue": d["queue"], "temp": temp}
    yield "info_nce_terms_symmetric", lambda q, k, temp: sf.info_nce(
        q, k, temp, symmetric=True, process_group=grp, mode=mode, logit_bias=local_bias,
        key_ids=terms["key_ids"]), {"q": loc["q"], "k": loc["k"], "temp": temp}

    def updated_after_forward(q, k, temp):
        """The caller updates its bias and ids in place between forward and backward (a
        running -log q_j estimate): the gradient is still that of the values the loss saw."""
        bias, ids = local_bias.clone(), terms["key_ids"].clone()
        loss = sf.info_nce(q, k, temp, symmetric=True, process_group=grp, mode=mode, logit_bias=bias, key_ids=ids)
        bias.add_(2.0)
        ids.fill_(0)
        return loss

    yield "info_nce_terms_symmetric_updated", updated_after_forward, {"q": loc["q"], "k": loc["k"], "temp": temp}
    dup_terms = dict(key_ids=_local(d["dup_ids"], rank), queue_ids=d["dup_queue_ids"])
    yield "info_nce_terms_dups_symmetric_queue", lambda q, k, queue, temp: sf.info_nce(
        q, k, temp, queue, symmetric=True, process_group=grp, mode=mode, **dup_terms), {
        "q": loc["q"], "k": loc["k"], "queue": d["queue"], "temp": temp}
    yield "info_nce_terms_bias_only", lambda q, k, queue, temp: sf.info_nce(
        q, k, temp, queue, process_group=grp, mode=mode, logit_bias=terms["logit_bias"]), {
        "q": loc["q"], "k": loc["k"], "queue": d["queue"], "temp": temp}
    yield "info_nce_terms_moco", lambda q, k, queue, temp: sf.info_nce(
        q, k, temp, queue, in_batch_negatives=False, process_group=grp, mode=mode, **terms), {
        "q": loc["q"], "k": loc["k"], "queue": d["queue"], "temp": temp}
    yield "info_nce_moco", lambda q, k, queue: sf.info_nce(
        q, k, T_NCE, queue, in_batch_negatives=False, process_group=grp, mode=mode), {
        "q": loc["q"], "k": loc["k"], "queue": d["queue"]}
    ntx = sslkernels.nn.NTXentLoss(T_NTX, gather_distributed=True, distributed_mode=mode)
    yield "NTXentLoss", lambda z1, z2: ntx(z1, z2), {"z1": loc["z1"], "z2": loc["z2"]}
    sup = sslkernels.nn.SupConLoss(T_SUP, gather_distributed=True, distributed_mode=mode, reduction="mean")
    yield "SupConLoss", lambda feats, labels: sup(feats, labels), {"feats": loc["feats"], "labels": loc["labels"]}
    nce = sslkernels.nn.InfoNCELoss(T_NCE, symmetric=True, gather_distributed=True, distributed_mode=mode)
    yield "InfoNCELoss", lambda q, k: nce(q, k), {"q": loc["q"], "k": loc["k"]}
    for local_loss in (True, False):
        for with_grad in (True, False) if mode == "all_gather" else (True,):
            clip = sslkernels.nn.ClipLoss(local_loss, with_grad, rank=rank, world_size=world, distributed_mode=mode)
            yield f"ClipLoss_{local_loss}_{with_grad}", lambda img, txt, scale, c=clip: c(img, txt, scale), {
                "img": loc["img"], "txt": loc["txt"], "scale": scale}


HALF = (torch.bfloat16, torch.float16)
HALF_CASES = ("nt_xent", "sup_con", "info_nce_symmetric", "info_nce_terms_symmetric")


def _half_cases(rank: int, world: int, mode: str):
    """HALF_CASES in float16 / bfloat16 (learnable float64 temperature), named NAME@MODE@DTYPE."""
    for name, fn, tensors in _cases(rank, world, mode):
        if name in HALF_CASES:
            for dtype in HALF:
                half = {k: v.to(dtype) if v.is_floating_point() and v.dim() else v for k, v in tensors.items()}
                yield f"{name}@{mode}@{dtype}", fn, half


class _CommLog:
    """In ring mode: no all-gather of features (only the one-int batch-size check) and no
    point-to-point tensor larger than a rank's own block; records what was sent."""

    def __init__(self):
        self.p2p_numel, self.p2p_calls, self.all_gather_numel = 0, 0, 0

    def __enter__(self):
        import torch.distributed.nn.functional as dnf

        dist = torch.distributed
        self.saved = dist.all_gather, dist.batch_isend_irecv, dnf.all_gather

        def all_gather(parts, x, *args, **kwargs):
            self.all_gather_numel = max(self.all_gather_numel, x.numel())
            return self.saved[0](parts, x, *args, **kwargs)

        def batch_isend_irecv(ops):
            self.p2p_calls += 1
            self.p2p_numel = max([self.p2p_numel] + [op.tensor.numel() for op in ops])
            return self.saved[1](ops)

        def gather_with_grad(*args, **kwargs):
            raise AssertionError("ring mode all-gathered features with gradient")

        dist.all_gather, dist.batch_isend_irecv, dnf.all_gather = all_gather, batch_isend_irecv, gather_with_grad
        return self

    def __exit__(self, *exc):
        import torch.distributed.nn.functional as dnf

        torch.distributed.all_gather, torch.distributed.batch_isend_irecv, dnf.all_gather = self.saved


def _concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _oracle_cases(rank: int, world: int):
    """lightly's and open_clip's own losses on the same ranks and inputs."""
    from tests._utils import import_bypassing_init

    d = _data(world)
    lightly_cls = import_bypassing_init(
        "lightly.loss.ntx_ent_loss",
        extra_packages=("lightly.models", "lightly.models.modules", "lightly.utils"),
        stub_modules=("lightly.models.utils",),
    ).NTXentLoss
    theirs = lightly_cls(T_NTX, gather_distributed=True)
    yield "lightly_NTXentLoss", lambda z1, z2: theirs(z1, z2), {"z1": _local(d["z1"], rank), "z2": _local(d["z2"], rank)}
    # lightly's memory bank with gather_distributed: every rank enqueues the gathered out1
    theirs_bank = lightly_cls(T_NTX, memory_bank_size=(2 * world * B + 1, D), gather_distributed=True)
    # lightly.models.utils (stubbed: it needs torchvision) holds the bank's all-gather without grad
    stub = inspect.unwrap(type(theirs_bank.memory_bank)._dequeue_and_enqueue).__globals__["utils"]
    stub.concat_all_gather = _concat_all_gather
    import sslkernels

    ours_bank = sslkernels.nn.NTXentLoss(T_NTX, memory_bank_size=(2 * world * B + 1, D), gather_distributed=True)
    start = F.normalize(theirs_bank.memory_bank.bank.to(torch.float64), dim=1)  # unit rows in float64:
    theirs_bank.memory_bank.bank = start.clone()  # the fused loss normalises the bank rows, lightly does not
    ours_bank.memory_bank.bank = start.clone()
    for step, (z1, z2) in enumerate([(d["z1"], d["z2"]), (d["z2"], d["feats"])]):
        for who, loss in (("lightly", theirs_bank), ("ours", ours_bank)):
            yield f"bank_{who}_{step}", lambda z1, z2, m=loss: m(z1, z2), {"z1": _local(z1, rank), "z2": _local(z2, rank)}
    yield "bank_state", None, {"lightly": theirs_bank.memory_bank.bank.clone(),
                               "ours": ours_bank.memory_bank.bank.clone(),
                               "lightly_ptr": theirs_bank.memory_bank.bank_ptr.clone(),
                               "ours_ptr": ours_bank.memory_bank.bank_ptr.clone()}
    open_clip_loss = import_bypassing_init("open_clip.loss")
    for local_loss in (True, False):
        for with_grad in (True, False):
            clip = open_clip_loss.ClipLoss(local_loss, with_grad, rank=rank, world_size=world)
            yield f"open_clip_{local_loss}_{with_grad}", lambda img, txt, scale, c=clip: c(img, txt, scale), {
                "img": _local(d["img"], rank), "txt": _local(d["txt"], rank),
                "scale": torch.tensor(SCALE, dtype=torch.float64)}


def _error_cases(rank: int, world: int):
    """Each returns the error text (every rank must raise)."""
    import sslkernels
    from sslkernels import functional as sf

    grp = torch.distributed.group.WORLD
    rows = B + (rank == world - 1)  # the last rank has one more row
    x = torch.randn(rows, D, dtype=torch.float64)
    labels = torch.zeros(rows, dtype=torch.int64)
    yield "size_nt_xent", lambda: sf.nt_xent(x, x, process_group=grp)
    yield "size_sup_con", lambda: sf.sup_con(x, labels, process_group=grp)
    yield "size_info_nce", lambda: sf.info_nce(x, x, process_group=grp)
    yield "size_clip", lambda: sslkernels.nn.ClipLoss(True, True, rank=rank, world_size=world)(
        x, x, torch.tensor(SCALE))
    yield "ring_size_nt_xent", lambda: sf.nt_xent(x, x, process_group=grp, mode="ring")
    yield "ring_size_sup_con", lambda: sf.sup_con(x, labels, process_group=grp, mode="ring")
    yield "ring_size_info_nce", lambda: sf.info_nce(x, x, symmetric=True, process_group=grp, mode="ring")
    yield "ring_size_clip", lambda: sslkernels.nn.ClipLoss(True, True, rank=rank, world_size=world,
                                                           distributed_mode="ring")(x, x, torch.tensor(SCALE))
    yield "ring_clip_detached", lambda: sslkernels.nn.ClipLoss(False, False, rank=rank, world_size=world,
                                                               distributed_mode="ring")
    yield "bad_group", lambda: sf.nt_xent(x[:B], x[:B], process_group="world")


def _subgroup_case(rank: int, world: int) -> dict:
    """Ranks 0 and W-1 as their own process group (group ranks are not global ranks):
    NT-Xent and symmetric InfoNCE in ring mode; {} on the ranks outside it. (all_gather
    mode is not run here: on Gloo, torch.distributed.nn.functional.all_gather's backward
    passes group ranks to dist.scatter as global ranks, and fails on such a group.)"""
    from sslkernels import functional as sf

    members = [0, world - 1]
    grp = torch.distributed.new_group(members)  # every rank must call it
    if rank not in members:
        return {}
    d = _data(world)
    z1, z2, q, k = (_local(d[n], rank) for n in ("z1", "z2", "q", "k"))
    temp = torch.tensor(T_NCE, dtype=torch.float64)
    return {
        "nt_xent": _run(lambda z1, z2: sf.nt_xent(z1, z2, T_NTX, process_group=grp, mode="ring"),
                        {"z1": z1, "z2": z2}),
        "info_nce": _run(lambda q, k, temp: sf.info_nce(q, k, temp, symmetric=True, process_group=grp, mode="ring"),
                         {"q": q, "k": k, "temp": temp}),
    }


def _ddp_case(rank: int, world: int, mode: str) -> dict:
    """A Linear layer under DDP with NTXentLoss(gather_distributed=True): DDP's averaged
    parameter gradient must be the one-process gradient."""
    import sslkernels

    torch.manual_seed(7)
    model = torch.nn.Linear(D, D, dtype=torch.float64)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x = _data(world)["x"]
    n = world * B
    x0, x1 = _local(x[:n], rank), _local(x[n:], rank)
    y0, y1 = ddp(torch.cat([x0, x1])).chunk(2)
    sslkernels.nn.NTXentLoss(T_NTX, gather_distributed=True, distributed_mode=mode)(y0, y1).backward()
    return {"weight": model.weight.grad.clone(), "bias": model.bias.grad.clone()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    result = {}
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=60),
        )
        for name, fn, tensors in _cases(rank, world, "all_gather"):
            result[name] = _run(fn, tensors)
        with _CommLog() as log:
            for name, fn, tensors in _cases(rank, world, "ring"):
                result[_name(name, "ring")] = _run(fn, tensors)
        for mode in MODES:
            for name, fn, tensors in _half_cases(rank, world, mode):
                result[name] = _run(fn, tensors)
        result["ring_comm"] = vars(log).copy()
        result["ring_comm"].pop("saved")
        try:
            for name, fn, tensors in _oracle_cases(rank, world):
                result[name] = _run(fn, tensors) if fn is not None else tensors
        except BaseException as exc:  # pytest.skip when a package is missing
            if type(exc).__name__ != "Skipped":
                raise
            result["oracle_skipped"] = str(exc)
        for name, fn in _error_cases(rank, world):
            try:
                fn()
                result[name] = None
            except Exception as exc:  # noqa: BLE001 (the type is checked by the parent)
                result[name] = (type(exc).__name__, str(exc))
        torch.distributed.barrier()  # the group still works after the errors: nobody hangs
        result["subgroup"] = _subgroup_case(rank, world)
        result["ddp"] = _ddp_case(rank, world, "all_gather")
        result["ddp@ring"] = _ddp_case(rank, world, "ring")
        torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


_RESULTS = {}


def _results(world: int, tmp_path_factory) -> list:
    """Every rank's result dict, from one spawn per world size (cached)."""
    if world not in _RESULTS:
        out = str(tmp_path_factory.mktemp(f"world{world}"))
        _RESULTS[world] = run_gloo_ranks(_worker, world, out, "tests.test_distributed", JOIN_TIMEOUT_S)
    return _RESULTS[world]


# ---------------------------------------------------------------- the one-process oracles


def _global(world: int):
    """name -> (reference loss fn on the concatenated batch, its tensors, local-value fn or None).

    The local-value fn gives rank r's expected value for the losses that return the
    mean over the rank's own anchors; None means every rank returns the global loss.
    """
    d = _data(world)
    temp = torch.tensor(T_NCE, dtype=torch.float64)
    scale = torch.tensor(SCALE, dtype=torch.float64)

    def nce_local(r, q, k, temp, queue=None, symmetric=False):
        qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
        cand = torch.cat([kn] + ([F.normalize(queue, dim=1)] if queue is not None else []))
        tgt = torch.arange(r * B, (r + 1) * B)
        loss = F.cross_entropy(_local(qn, r) @ cand.T / temp, tgt)
        if symmetric:
            loss = 0.5 * (loss + F.cross_entropy(_local(kn, r) @ qn.T / temp, tgt))
        return loss

    n = world * B
    ids, queue_ids, bias = d["ids"], d["queue_ids"], d["bias"]

    def terms_local(r, q, k, temp, queue=None, symmetric=False, ids=ids, queue_ids=queue_ids, bias=bias):
        """Rank r's queries against every candidate, the terms applied as the reference does
        (`ids` None: no masks; `bias` None: no bias)."""
        qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
        rows = torch.arange(r * B, (r + 1) * B)
        cand = torch.cat([kn] + ([F.normalize(queue, dim=1)] if queue is not None else []))
        logits = qn[rows] @ cand.T / temp + (bias[: cand.shape[0]] if bias is not None else 0.0)
        if ids is not None:
            cand_ids = torch.cat([ids] + ([queue_ids] if queue is not None else []))
            cols = torch.arange(cand.shape[0])
            dup = (ids[rows, None] == cand_ids[None, :]) & (cols[None, :] != rows[:, None])
            logits = logits.masked_fill(dup, float("-inf"))
        loss = F.cross_entropy(logits, rows)
        if symmetric:
            dup_t = (ids[rows, None] == ids[None, :]) & (torch.arange(n)[None, :] != rows[:, None])
            loss = 0.5 * (loss + F.cross_entropy((kn[rows] @ qn.T / temp).masked_fill(dup_t, float("-inf")), rows))
        return loss

    dup_ids, dup_queue_ids = d["dup_ids"], d["dup_queue_ids"]

    def terms_moco_local(r, q, k, queue, temp):
        return info_nce_reference(_local(q, r), _local(k, r), temp, queue, in_batch_negatives=False,
                                  logit_bias=torch.cat([_local(bias[:n], r), bias[n:]]), key_ids=_local(ids, r),
                                  queue_ids=queue_ids)

    def clip_ref(img, txt, scale):
        return info_nce_reference(img, txt, 1.0 / scale, symmetric=True, normalize=False)

    def clip_local(r, img, txt, scale):
        tgt = torch.arange(r * B, (r + 1) * B)
        return 0.5 * (F.cross_entropy(scale * _local(img, r) @ txt.T, tgt)
                      + F.cross_entropy(scale * _local(txt, r) @ img.T, tgt))

    ntx = (lambda z1, z2: nt_xent_reference(z1, z2, T_NTX), {"z1": d["z1"], "z2": d["z2"]}, None)
    sup = (lambda feats, labels: sup_con_reference(feats, labels, T_SUP),
           {"feats": d["feats"], "labels": d["labels"]}, None)
    sym = (lambda q, k, temp: info_nce_reference(q, k, temp, symmetric=True), {"q": d["q"], "k": d["k"], "temp": temp},
           lambda r, q, k, temp: nce_local(r, q, k, temp, symmetric=True))
    clip_g = (clip_ref, {"img": d["img"], "txt": d["txt"], "scale": scale}, None)
    clip_l = (clip_ref, clip_g[1], clip_local)
    moco_value = lambda r, q, k, queue: info_nce_reference(  # noqa: E731
        _local(q, r), _local(k, r), T_NCE, queue, in_batch_negatives=False)
    sup_rare = (sup[0], {"feats": d["feats"], "labels": d["rare"]}, None)
    sup_even = (sup[0], {"feats": _even(d["feats"], world), "labels": _even(d["rare"], world)}, None)
    return {
        "nt_xent": ntx, "NTXentLoss": ntx, "sup_con": sup, "SupConLoss": sup,
        "sup_con_rare": sup_rare, "sup_con_even": sup_even,
        "info_nce_queue": (lambda q, k, queue, temp: info_nce_reference(q, k, temp, queue),
                           {"q": d["q"], "k": d["k"], "queue": d["queue"], "temp": temp},
                           lambda r, q, k, queue, temp: nce_local(r, q, k, temp, queue)),
        "info_nce_symmetric": sym,
        "info_nce_terms": (lambda q, k, queue, temp: info_nce_reference(
            q, k, temp, queue, logit_bias=bias, key_ids=ids, queue_ids=queue_ids),
            {"q": d["q"], "k": d["k"], "queue": d["queue"], "temp": temp},
            lambda r, q, k, queue, temp: terms_local(r, q, k, temp, queue)),
        "info_nce_terms_symmetric": (lambda q, k, temp: info_nce_reference(
            q, k, temp, symmetric=True, logit_bias=bias[:n], key_ids=ids),
            {"q": d["q"], "k": d["k"], "temp": temp},
            lambda r, q, k, temp: terms_local(r, q, k, temp, symmetric=True)),
        "info_nce_terms_symmetric_updated": (lambda q, k, temp: info_nce_reference(
            q, k, temp, symmetric=True, logit_bias=bias[:n], key_ids=ids),
            {"q": d["q"], "k": d["k"], "temp": temp},
            lambda r, q, k, temp: terms_local(r, q, k, temp, symmetric=True)),
        "info_nce_terms_dups_symmetric_queue": (lambda q, k, queue, temp: info_nce_reference(
            q, k, temp, queue, symmetric=True, key_ids=dup_ids, queue_ids=dup_queue_ids),
            {"q": d["q"], "k": d["k"], "queue": d["queue"], "temp": temp},
            lambda r, q, k, queue, temp: terms_local(r, q, k, temp, queue, symmetric=True, ids=dup_ids,
                                                     queue_ids=dup_queue_ids, bias=None)),
        "info_nce_terms_bias_only": (lambda q, k, queue, temp: info_nce_reference(
            q, k, temp, queue, logit_bias=bias),
            {"q": d["q"], "k": d["k"], "queue": d["queue"], "temp": temp},
            lambda r, q, k, queue, temp: terms_local(r, q, k, temp, queue, ids=None)),
        "info_nce_terms_moco": (lambda q, k, queue, temp: info_nce_reference(
            q, k, temp, queue, in_batch_negatives=False, logit_bias=bias, key_ids=ids, queue_ids=queue_ids),
            {"q": d["q"], "k": d["k"], "queue": d["queue"], "temp": temp}, terms_moco_local),
        "InfoNCELoss": (lambda q, k: info_nce_reference(q, k, T_NCE, symmetric=True), {"q": d["q"], "k": d["k"]},
                        lambda r, q, k: nce_local(r, q, k, T_NCE, symmetric=True)),
        "info_nce_hard": (lambda q, k, hard: info_nce_reference(q, k, T_NCE, hard),
                          {"q": d["q"], "k": d["k"], "hard": d["hard"]}, None),
        "info_nce_moco": (lambda q, k, queue: info_nce_reference(q, k, T_NCE, queue, in_batch_negatives=False),
                          {"q": d["q"], "k": d["k"], "queue": d["queue"]}, moco_value),
        "ClipLoss_True_True": clip_l, "ClipLoss_False_True": clip_g,
    }


REPLICATED = {"queue", "temp", "scale"}  # the same tensor on every rank (DDP averages its gradient)
TOL = dict(rtol=1e-10, atol=1e-12)


def _ring_case(case: str) -> bool:
    return not case.startswith("ClipLoss") or case.endswith("_True")  # open_clip's detached variant: all_gather


CASES = [_name(c, m) for m in MODES for c in _global(2) if m == "all_gather" or _ring_case(c)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", CASES)
def test_matches_one_process(world, case, tmp_path_factory):
    """Both modes against the same expectations: same values, same gradients."""
    ranks = _results(world, tmp_path_factory)
    fn, tensors, local_value = _global(world)[case.split("@")[0]]
    expected = _run(fn, tensors)
    for r, res in enumerate(ranks):
        got = res[case]
        want = local_value(r, **tensors) if local_value else expected["loss"]
        torch.testing.assert_close(got["loss"], want, **TOL, msg=f"{case} rank {r} loss")
    mean_loss = sum(res[case]["loss"] for res in ranks) / world
    torch.testing.assert_close(mean_loss, expected["loss"], **TOL, msg=f"{case}: mean of the ranks' losses")
    for name, grad in expected.items():
        if name == "loss":
            continue
        if name in REPLICATED:
            got = sum(res[case][name] for res in ranks) / world
        else:  # rank r's gradient of its own slice / W (what DDP's average of parameter gradients sees)
            got = torch.cat([res[case][name] / world for res in ranks])
        torch.testing.assert_close(got, grad, **TOL, msg=f"{case}: gradient of {name}")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_ddp_linear_layer_matches_one_process(world, mode, tmp_path_factory):
    ranks = _results(world, tmp_path_factory)
    torch.manual_seed(7)
    model = torch.nn.Linear(D, D, dtype=torch.float64)
    x = _data(world)["x"]
    y0, y1 = model(x).chunk(2)
    nt_xent_reference(y0, y1, T_NTX).backward()
    for r, res in enumerate(ranks):
        got = res[_name("ddp", mode)]
        torch.testing.assert_close(got["weight"], model.weight.grad, **TOL, msg=f"rank {r} weight")
        torch.testing.assert_close(got["bias"], model.bias.grad, **TOL, msg=f"rank {r} bias")


@pytest.mark.parametrize("world", [2, 3])
def test_drop_ins_match_lightly_and_open_clip_per_rank(world, tmp_path_factory):
    ranks = _results(world, tmp_path_factory)
    if "oracle_skipped" in ranks[0]:
        pytest.skip(ranks[0]["oracle_skipped"])
    for r, res in enumerate(ranks):
        # lightly returns the mean over the rank's own anchors, ours the global loss (their mean);
        # the gradients of each rank are the same.
        for name in ("z1", "z2"):
            torch.testing.assert_close(res["NTXentLoss"][name], res["lightly_NTXentLoss"][name], **TOL)
        for local_loss in (True, False):
            for with_grad in (True, False):
                ours, theirs = res[f"ClipLoss_{local_loss}_{with_grad}"], res[f"open_clip_{local_loss}_{with_grad}"]
                for key in ("loss", "img", "txt", "scale"):
                    torch.testing.assert_close(ours[key], theirs[key], **TOL,
                                               msg=f"rank {r} ClipLoss({local_loss}, {with_grad}) {key}")
    torch.testing.assert_close(sum(res["lightly_NTXentLoss"]["loss"] for res in ranks) / world,
                               ranks[0]["NTXentLoss"]["loss"], **TOL)


@pytest.mark.parametrize("world", [2, 3])
def test_memory_bank_gathers_like_lightly(world, tmp_path_factory):
    ranks = _results(world, tmp_path_factory)
    if "oracle_skipped" in ranks[0]:
        pytest.skip(ranks[0]["oracle_skipped"])
    d = _data(world)
    for r, res in enumerate(ranks):
        for step in range(2):
            for key in ("loss", "z1", "z2"):
                torch.testing.assert_close(res[f"bank_ours_{step}"][key], res[f"bank_lightly_{step}"][key], **TOL,
                                           msg=f"rank {r} step {step} {key}")
        state = res["bank_state"]
        torch.testing.assert_close(state["ours"], state["lightly"], **TOL)
        assert int(state["ours_ptr"]) == int(state["lightly_ptr"]) == 2 * world * B
        # both steps' gathered out1 rows, normalised, in rank order, the same on every rank
        torch.testing.assert_close(state["ours"][: 2 * world * B],
                                   F.normalize(torch.cat([d["z2"], d["feats"]]), dim=1), **TOL)


@pytest.mark.parametrize("world", [2, 3])
def test_unequal_batch_sizes_raise_on_every_rank(world, tmp_path_factory):
    ranks = _results(world, tmp_path_factory)
    for r, res in enumerate(ranks):
        for case in ("size_nt_xent", "size_sup_con", "size_info_nce", "size_clip", "ring_size_nt_xent",
                     "ring_size_sup_con", "ring_size_info_nce", "ring_size_clip"):
            assert res[case] is not None, f"rank {r}: {case} did not raise"
            kind, text = res[case]
            assert kind == "ValueError" and "same number of rows on every rank" in text, (r, case, text)
            assert str([B] * (world - 1) + [B + 1]) in text, text
        detached = res["ring_clip_detached"]
        assert detached is not None and detached[0] == "NotImplementedError", (r, detached)
        assert "gather_with_grad=False" in detached[1] and "ring" in detached[1], detached
        assert res["bad_group"] is not None and res["bad_group"][0] == "TypeError" and "process_group" in res["bad_group"][1]


def test_process_group_without_init_process_group_raises():
    if torch.distributed.is_initialized():
        pytest.skip("this process already has a process group")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="process_group.*not initialised"):
        from sslkernels import functional as sf

        sf.nt_xent(x, x, process_group=object())
    with pytest.raises(ValueError, match="mode"):
        sf.info_nce(x, x, mode="ring_buffer")
    # gather_distributed without a process group computes the one-process loss, as lightly's
    import sslkernels

    torch.testing.assert_close(sslkernels.nn.NTXentLoss(0.3, gather_distributed=True)(x, x + 1),
                               sf.nt_xent(x, x + 1, 0.3))


@pytest.mark.parametrize("world", [2, 3])
def test_ring_never_gathers_the_batch(world, tmp_path_factory):
    """Ring mode moves blocks of a rank's own size, point to point: the only all-gather is
    the one-int batch-size check, and no all-gather with gradient runs (it would raise)."""
    ranks = _results(world, tmp_path_factory)
    for r, res in enumerate(ranks):
        log = res["ring_comm"]
        assert log["all_gather_numel"] == 1, (r, log)
        assert log["p2p_calls"] > 0, (r, log)
        assert log["p2p_numel"] <= 2 * B * D, (r, log)  # NT-Xent's block: both views of one rank


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_ring_is_as_accurate_as_all_gather_in_half_precision(world, dtype, tmp_path_factory):
    """float16 / bfloat16 inputs: against the float64 loss on the same rounded inputs, each
    mode's loss and gradients are within twice the other's error (plus one ulp of the
    dtype): both sum their cross-rank gradient terms in float32."""
    ranks = _results(world, tmp_path_factory)
    eps = torch.finfo(dtype).eps
    for case in HALF_CASES:
        fn, tensors, _ = _global(world)[case]
        rounded = {k: v.to(dtype).double() if v.is_floating_point() and v.dim() else v for k, v in tensors.items()}
        expected = _run(fn, rounded)
        errors = {}
        for mode in MODES:
            res = [r[f"{case}@{mode}@{dtype}"] for r in ranks]
            for name, want in expected.items():
                if name == "loss" or name in REPLICATED:  # a local-anchor loss: the ranks' mean
                    got = sum(r[name].double() for r in res) / world
                else:
                    got = torch.cat([r[name].double() / world for r in res])
                errors[mode, name] = _rel_err(got, want)
        for name in expected:
            ring, gathered = errors["ring", name], errors["all_gather", name]
            msg = f"{case} {dtype} {name}: ring {ring:.2g}, all_gather {gathered:.2g}"
            assert ring <= 2 * gathered + eps, msg
            # and the all-gather path sums its cross-rank gradient terms in float32 too
            assert gathered <= 2 * ring + eps, msg
            assert max(ring, gathered) <= 4 * eps, msg  # a few roundings of the half inputs, no more


@pytest.mark.parametrize("world", [2, 3])
def test_ring_on_a_subgroup_matches_one_process(world, tmp_path_factory):
    """A process group whose ranks are not the global ranks (ranks 0 and W-1): the ring
    sends to the right peers; loss and gradients are those of the two ranks' batch."""
    ranks = _results(world, tmp_path_factory)
    members = [ranks[0]["subgroup"], ranks[world - 1]["subgroup"]]
    d = _data(world)
    sub = {n: torch.cat([_local(d[n], 0), _local(d[n], world - 1)]) for n in ("z1", "z2", "q", "k")}
    temp = torch.tensor(T_NCE, dtype=torch.float64)
    oracles = {"nt_xent": (lambda z1, z2: nt_xent_reference(z1, z2, T_NTX), {"z1": sub["z1"], "z2": sub["z2"]}),
               "info_nce": (lambda q, k, temp: info_nce_reference(q, k, temp, symmetric=True),
                            {"q": sub["q"], "k": sub["k"], "temp": temp})}
    for case, (fn, tensors) in oracles.items():
        expected = _run(fn, tensors)
        got = [m[case] for m in members]
        if case == "nt_xent":  # the global loss on both
            for g in got:
                torch.testing.assert_close(g["loss"], expected["loss"], **TOL)
        torch.testing.assert_close(sum(g["loss"] for g in got) / 2, expected["loss"], **TOL, msg=case)
        for name, grad in expected.items():
            if name == "temp":
                torch.testing.assert_close(sum(g[name] for g in got) / 2, grad, **TOL, msg=f"{case} {name}")
            elif name != "loss":
                torch.testing.assert_close(torch.cat([g[name] / 2 for g in got]), grad, **TOL, msg=f"{case} {name}")
    if world == 3:
        assert ranks[1]["subgroup"] == {}
