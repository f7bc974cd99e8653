"""A label-free representation-quality monitor for any training loop.

    monitor = sslkernels.monitor.RankMeMonitor(every=500, metrics=("rankme", "nesum"),
                                               logger=wandb.log, prefix="ssl/")
    for step, batch in enumerate(loader):
        z = model(batch)                  # [B, D] embeddings, any float dtype / device
        ...
        monitor(z)                        # None, or every 500th call a dict that was also logged

Design:

* **Ring buffer.** The first call allocates a float32 buffer of ``capacity`` rows on
  the embeddings' device; every call copies its (detached) rows in on the device
  and keeps the most recent ``capacity`` rows. Rows are stored in ring order, not
  in arrival order: the metrics are invariant to the order of rows.
* **One host sync per evaluation, none otherwise.** Non-evaluation calls only
  launch on-device copies (no ``.item()``, no ``.cpu()``, no Python branch on a
  tensor value). An evaluation computes every metric as a device tensor, stacks
  them with the count of non-finite rows, and copies that one small tensor to the
  host in :meth:`RankMeMonitor._to_host`, the only device-to-host transfer of the
  monitor. (The singular-value routine that the metrics call may synchronise on its
  own, e.g. LAPACK-backed paths; that is outside the monitor.)
* **NaN / Inf.** Each call records, on the device, which of its rows are finite and
  writes non-finite entries as 0 so the metrics never see them; the evaluation
  then raises ``ValueError`` naming ``embeddings`` (after its single sync) if any
  buffered row was not finite. Such rows leave the buffer as newer rows replace
  them, or at :meth:`RankMeMonitor.reset`.
* **Distributed.** When ``torch.distributed`` is initialised, ``max_samples`` is the
  total across ranks: each rank keeps ``ceil(max_samples / world_size)`` rows
  (fixed when its buffer is allocated). At evaluation every rank exchanges
  ``(rows held, D)`` over a CPU (gloo) group -- host integers, so the GPU stream is
  not touched -- then ``all_gather`` (or ``gather`` to rank 0 with
  ``rank_zero_only=True``) sends each rank's first ``max(rows held)`` buffer rows,
  and every receiver trims each rank's block to the rows that rank really holds
  (ranks may hold different numbers of rows). The gathered matrix is cut to
  ``max_samples`` rows. A rank whose D differs makes every rank raise ``ValueError``
  (before any large transfer, so nothing hangs). Every rank must call the monitor
  the same number of times, since evaluations are collective. If no gloo group can
  be made for the metadata (a build without gloo, or a custom ``process_group`` on
  NCCL), it travels on the device and costs one more sync.
* **Metrics.** Names from ``{"rankme", "effective_rank", "nesum", "alpha_req"}``,
  computed by :mod:`sslkernels.metrics` on the buffered rows (so a result equals
  calling e.g. :func:`sslkernels.rankme` on those rows), keyword options through
  ``metric_kwargs={"rankme": {"eps": 1e-5}}``. ``"lidar"`` needs several views per
  sample and raises ``NotImplementedError`` here: call :func:`sslkernels.lidar` on
  ``[N, Q, D]`` views yourself.

``RankMeCallback`` (defined only when ``lightning`` or ``pytorch_lightning`` imports)
wraps the monitor for Lightning's ``on_train_batch_end``.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from sslkernels._common import initialized_distributed as _dist

__all__ = ["RankMeMonitor", "METRICS"]

#: Metric names the monitor accepts (functions of :mod:`sslkernels.metrics` on ``[N, D]``).
METRICS = ("rankme", "effective_rank", "nesum", "alpha_req")


class _EmbeddingDTypeError(TypeError, ValueError):
    """Non-floating embeddings: a TypeError (wrong type of data) that is also a ValueError."""


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def _metric_fn(name: str) -> Callable:
    from sslkernels import metrics as _metrics  # at call time: metrics may land after this module
    return getattr(_metrics, name)


class RankMeMonitor:
    """Buffer embeddings across steps and evaluate RankMe-style metrics every ``every`` calls.

    Args:
        every: evaluate on every ``every``-th call (the ``every``-th, ``2 * every``-th, ...).
        max_samples: rows kept (most recent first), in total across ranks when
            ``torch.distributed`` is initialised. The RankMe paper uses 25600.
        metrics: a name or names from ``METRICS``.
        metric_kwargs: ``{metric name: {keyword: value}}`` passed to that metric,
            e.g. ``{"rankme": {"eps": 1e-5}}`` (stable-ssl's epsilon).
        logger: a callable that receives each evaluation's dict (``print``,
            ``wandb.log``, ...), on evaluation steps only.
        prefix: prepended to every key of the dict, e.g. ``"ssl/"``.
        rank_zero_only: in a distributed run, gather to rank 0 and evaluate there
            only; other ranks return None and do not log.
        distributed: gather across ranks when ``torch.distributed`` is initialised
            (False: every rank evaluates its own rows).
        process_group: the group to gather over (default: the default group).

    Calling it (or :meth:`update`) returns None, or on evaluation steps a dict
    ``{prefix + metric: float, ..., prefix + "num_samples": int, prefix + "step": int}``.
    """

    def __init__(
        self,
        every: int = 100,
        max_samples: int = 25600,
        metrics: Union[str, Sequence[str]] = ("rankme",),
        *,
        metric_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
        logger: Optional[Callable[[Dict[str, Union[float, int]]], Any]] = None,
        prefix: str = "",
        rank_zero_only: bool = False,
        distributed: bool = True,
        process_group=None,
    ) -> None:
        self.every = _check_int(every, "every", 1)
        self.max_samples = _check_int(max_samples, "max_samples", 2)
        self.metrics = self._check_metrics(metrics)
        self.metric_kwargs = self._check_metric_kwargs(metric_kwargs, self.metrics)
        if logger is not None and not callable(logger):
            raise TypeError(f"`logger` must be callable or None, got {type(logger).__name__}")
        self.logger = logger
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self.rank_zero_only = bool(rank_zero_only)
        self.distributed = bool(distributed)
        self.process_group = process_group
        self.step = 0
        self._meta_group = None
        self._free()

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_metrics(metrics) -> tuple:
        names = (metrics,) if isinstance(metrics, str) else metrics
        try:
            names = tuple(names)
        except TypeError:
            raise TypeError(f"`metrics` must be a str or a sequence of str, got {type(metrics).__name__}") from None
        if not names:
            raise ValueError(f"`metrics` is empty; choose from {list(METRICS)}")
        out = []
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"`metrics` must hold str names, got {name!r}")
            if name == "lidar":
                raise NotImplementedError(
                    "`metrics`: 'lidar' needs several augmented views per sample ([N, Q, D]), which this "
                    "monitor does not buffer; call sslkernels.lidar(views) on a held-out batch of views instead")
            if name not in METRICS:
                raise ValueError(f"`metrics`: unknown metric {name!r}; valid names are {list(METRICS)}")
            if name not in out:
                out.append(name)
        return tuple(out)

    @staticmethod
    def _check_metric_kwargs(metric_kwargs, names) -> Dict[str, Dict[str, Any]]:
        if metric_kwargs is None:
            return {}
        if not isinstance(metric_kwargs, Mapping):
            raise TypeError(f"`metric_kwargs` must be a dict of dicts, got {type(metric_kwargs).__name__}")
        out = {}
        for name, kwargs in metric_kwargs.items():
            if name not in names:
                raise ValueError(
                    f"`metric_kwargs` has options for {name!r}, which is not among the monitored "
                    f"`metrics` {list(names)}")
            if not isinstance(kwargs, Mapping):
                raise TypeError(f"`metric_kwargs[{name!r}]` must be a dict, got {type(kwargs).__name__}")
            kwargs = dict(kwargs)
            try:
                fn = _metric_fn(name)
            except (ImportError, AttributeError):  # metrics not importable yet: checked at evaluation
                fn = None
            try:
                if fn is not None:
                    inspect.signature(fn).bind(None, **kwargs)
            except TypeError as e:
                raise TypeError(f"`metric_kwargs[{name!r}]` does not fit sslkernels.{name}: {e}") from None
            out[name] = kwargs
        return out

    # ------------------------------------------------------------------ buffer

    def _free(self) -> None:
        self._buf: Optional[torch.Tensor] = None   # [capacity, D] float32
        self._ok: Optional[torch.Tensor] = None    # [capacity] bool: row was finite
        self._dim: Optional[int] = None
        self._device: Optional[torch.device] = None
        self._capacity = 0
        self._ptr = 0       # next row to write
        self._count = 0     # rows holding data (host int: known without a sync)

    @property
    def num_buffered(self) -> int:
        """Rows held by this rank's buffer."""
        return self._count

    @property
    def capacity(self) -> Optional[int]:
        """Rows this rank keeps (None before the first call)."""
        return self._capacity or None

    def _world(self) -> int:
        d = _dist() if self.distributed else None
        return d.get_world_size(self.process_group) if d is not None else 1

    def _check_embeddings(self, z) -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"`embeddings` must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"`embeddings` must be 2-D [batch, dim], got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise _EmbeddingDTypeError(
                f"`embeddings` must be a floating-point tensor (float16/bfloat16/float32/float64), got {z.dtype}")
        if z.shape[1] < 1:
            raise ValueError(f"`embeddings` has zero features (shape {tuple(z.shape)})")
        if self._buf is not None:
            if z.shape[1] != self._dim:
                raise ValueError(
                    f"`embeddings` has dim {z.shape[1]}, but this monitor buffers dim {self._dim} "
                    f"(fixed by the first call; call reset() to change it)")
            if z.device != self._device:
                raise ValueError(
                    f"`embeddings` is on {z.device}, but this monitor's buffer is on {self._device} "
                    f"(fixed by the first call; call reset() to change it)")

    def _write(self, rows: torch.Tensor, start: int) -> None:
        dst = self._buf[start:start + rows.shape[0]]
        dst.copy_(rows)                                  # casts to float32 on the device
        self._ok[start:start + rows.shape[0]] = torch.isfinite(dst).all(dim=1)
        torch.nan_to_num_(dst, nan=0.0, posinf=0.0, neginf=0.0)

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor) -> Optional[Dict[str, Union[float, int]]]:
        """Buffer ``embeddings [B, D]``; on every ``every``-th call evaluate, log and return the dict."""
        z = embeddings
        self._check_embeddings(z)
        z = z.detach()
        if self._buf is None:
            self._dim, self._device = z.shape[1], z.device
            self._capacity = max(1, -(-self.max_samples // self._world()))
            self._buf = torch.empty(self._capacity, self._dim, dtype=torch.float32, device=z.device)
            self._ok = torch.ones(self._capacity, dtype=torch.bool, device=z.device)
        cap, b = self._capacity, z.shape[0]
        if b >= cap:
            self._write(z[b - cap:], 0)
            self._ptr, self._count = 0, cap
        elif b > 0:
            first = min(b, cap - self._ptr)
            self._write(z[:first], self._ptr)
            if b > first:
                self._write(z[first:], 0)
            self._ptr = (self._ptr + b) % cap
            self._count = min(self._count + b, cap)
        self.step += 1
        if self.step % self.every:
            return None
        result = self.compute()
        if result is not None and self.logger is not None:
            self.logger(result)
        return result

    __call__ = update

    def reset(self, steps: bool = False) -> None:
        """Discard the buffered rows (and the fixed D / device); ``steps=True`` also zeroes the step counter."""
        self._free()
        if steps:
            self.step = 0

    def state_dict(self) -> Dict[str, int]:
        """The step counter (the buffered rows are transient and are not saved)."""
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(f"`state` must be a dict with a 'step' entry, got {state!r}")
        self.step = _check_int(state["step"], "state['step']", 0)

    # ------------------------------------------------------------------ evaluation

    def _to_host(self, values: torch.Tensor) -> List[float]:
        """The monitor's single device-to-host transfer (one per evaluation)."""
        return values.tolist()

    def _meta_exchange(self, d, local: List[int]) -> List[List[int]]:
        """All ranks' ``local`` host ints, without touching the accelerator stream when possible."""
        backend = d.get_backend(self.process_group)
        world = d.get_world_size(self.process_group)
        if "gloo" in backend:  # "gloo", or "cpu:gloo,cuda:nccl": CPU tensors travel on this group
            group = self.process_group
        else:
            # A CPU (gloo) twin of the default group carries the metadata. new_group() must be
            # entered by every rank of the default group, so a custom process_group (whose
            # non-members never get here) sends its metadata on the device instead.
            if self._meta_group is None:
                self._meta_group = False
                if self.process_group is None:
                    try:
                        self._meta_group = d.new_group(backend="gloo")
                    except Exception:  # noqa: BLE001  (no gloo in this build)
                        self._meta_group = False
            group = self._meta_group if self._meta_group is not False else None
        if group is None and "gloo" not in backend:  # metadata on the device: one more sync
            device = self._device or (torch.device("cuda", torch.cuda.current_device())
                                      if "nccl" in backend else torch.device("cpu"))
            t = torch.tensor(local, dtype=torch.int64, device=device)
            out = [torch.empty_like(t) for _ in range(world)]
            d.all_gather(out, t, group=self.process_group)
            return torch.stack(out).tolist()
        t = torch.tensor(local, dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(world)]
        d.all_gather(out, t, group=group)
        return [o.tolist() for o in out]

    def _gathered(self):
        """(rows [N, D] to evaluate, count of non-finite rows as a device tensor), or None off rank 0
        under ``rank_zero_only``."""
        d = _dist() if self.distributed else None
        if d is None:
            if self._count == 0:
                raise RuntimeError("RankMeMonitor.compute(): no embeddings buffered yet")
            n = self._count
            return self._buf[:n], (~self._ok[:n]).sum()
        meta = self._meta_exchange(d, [self._count, -1 if self._dim is None else self._dim, self._capacity])
        # Every rank sees the same meta, so every check below raises on all ranks alike (no hang).
        counts = [m[0] for m in meta]
        per_rank = {r: m[1] for r, m in enumerate(meta) if m[0] > 0}
        if len(set(per_rank.values())) > 1:
            raise ValueError(f"`embeddings` have different dims across ranks: {per_rank} (rank: dim)")
        if sum(counts) == 0:
            raise RuntimeError("RankMeMonitor.compute(): no embeddings buffered yet on any rank")
        dim = next(iter(per_rank.values()))
        rows = max(counts)
        capacities = [m[2] if m[2] > 0 else rows for m in meta]
        if rows > min(capacities):
            raise ValueError(
                f"ranks hold up to {rows} rows but the smallest buffer has {min(capacities)}: every rank "
                f"must create its monitor with the same `max_samples`")
        if self._buf is None:  # this rank has seen nothing yet: take part with an empty block
            device = (torch.device("cuda", torch.cuda.current_device())
                      if "nccl" in d.get_backend(self.process_group) else torch.device("cpu"))
            self._dim, self._device = dim, device
            self._capacity = max(rows, -(-self.max_samples // d.get_world_size(self.process_group)))
            self._buf = torch.zeros(self._capacity, dim, dtype=torch.float32, device=device)
            self._ok = torch.ones(self._capacity, dtype=torch.bool, device=device)
        world = d.get_world_size(self.process_group)
        rank = d.get_rank(self.process_group)
        send = self._buf[:rows]
        bad = (~self._ok[:self._count]).sum().to(torch.float32).reshape(1)
        if self.rank_zero_only:
            dst = 0 if self.process_group is None else d.get_global_rank(self.process_group, 0)
            blocks = [torch.empty(rows, dim, dtype=torch.float32, device=self._device) for _ in range(world)] \
                if rank == 0 else None
            d.gather(send, blocks, dst=dst, group=self.process_group)
            d.reduce(bad, dst=dst, group=self.process_group)
            if rank != 0:
                return None
        else:
            blocks = [torch.empty(rows, dim, dtype=torch.float32, device=self._device) for _ in range(world)]
            d.all_gather(blocks, send, group=self.process_group)
            d.all_reduce(bad, group=self.process_group)
        z = torch.cat([blk[:c] for blk, c in zip(blocks, counts) if c > 0])[:self.max_samples]
        return z, bad[0]

    @torch.no_grad()
    def compute(self) -> Optional[Dict[str, Union[float, int]]]:
        """Evaluate the metrics on the buffered rows now (collective in a distributed run; does not log).

        Returns the dict (None on ranks other than 0 with ``rank_zero_only``).
        Raises ValueError naming ``embeddings`` when a buffered row held NaN / Inf,
        RuntimeError when nothing is buffered, and lets a metric's own error through
        (e.g. ``alpha_req``'s default ``fit_range=(10, 100)`` needs min(N, D) >= 11).
        """
        got = self._gathered()
        if got is None:
            return None
        z, bad = got
        values = [_metric_fn(name)(z, **self.metric_kwargs.get(name, {})).to(torch.float64).reshape(())
                  for name in self.metrics]
        host = self._to_host(torch.stack(values + [bad.to(values[0].device, torch.float64).reshape(())]))
        num_bad = int(host[-1])
        if num_bad:
            raise ValueError(
                f"`embeddings`: {num_bad} of the {z.shape[0]} buffered rows held NaN or Inf (they were stored "
                "as zeros); fix the model, or call reset() to discard them")
        p = self.prefix
        result: Dict[str, Union[float, int]] = {p + name: float(v) for name, v in zip(self.metrics, host)}
        result[p + "num_samples"] = int(z.shape[0])
        result[p + "step"] = self.step
        return result

    def __repr__(self) -> str:
        return (f"RankMeMonitor(every={self.every}, max_samples={self.max_samples}, metrics={self.metrics}, "
                f"step={self.step}, buffered={self._count})")


# ---------------------------------------------------------------------- Lightning


def _default_extract(outputs, key: str):
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if key not in outputs:
            raise KeyError(
                f"RankMeCallback: training_step's output has no {key!r} entry (keys: {list(outputs)}); "
                "return it, or pass `embedding_key=` / `embedding_fn=`")
        return outputs[key]
    raise TypeError(
        f"RankMeCallback: cannot find embeddings in training_step's output of type {type(outputs).__name__}; "
        "return a dict with an 'embeddings' entry, or pass `embedding_fn=`")


class _RankMeCallbackLogic:
    """The Lightning callback's behaviour, free of the Lightning base class (tested without Lightning)."""

    def __init__(self, *args, embedding_key: str = "embeddings",
                 embedding_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None, **kwargs) -> None:
        super().__init__()
        if embedding_fn is not None and not callable(embedding_fn):
            raise TypeError(f"`embedding_fn` must be callable, got {type(embedding_fn).__name__}")
        self.embedding_key = embedding_key
        self.embedding_fn = embedding_fn
        self.monitor = RankMeMonitor(*args, **kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args) -> None:
        if self.embedding_fn is not None:
            z = self.embedding_fn(outputs, batch)
        else:
            z = _default_extract(outputs, self.embedding_key)
        if z is None:
            return
        result = self.monitor.update(z)
        if result is not None:
            # Values are already global (gathered by the monitor): no sync_dist.
            pl_module.log_dict({k: float(v) for k, v in result.items()},
                               rank_zero_only=self.monitor.rank_zero_only)

    def state_dict(self) -> Dict[str, int]:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.monitor.load_state_dict(state_dict)


def _make_lightning_callback(base: type) -> type:
    cls = type("RankMeCallback", (_RankMeCallbackLogic, base), {
        "__module__": __name__,
        "__doc__": """Lightning callback: feeds ``on_train_batch_end`` outputs to a :class:`RankMeMonitor`
    and logs its dict with ``pl_module.log_dict``.

    Takes :class:`RankMeMonitor`'s arguments plus ``embedding_key`` (the entry of
    ``training_step``'s output dict holding ``[B, D]`` embeddings; a tensor output is
    used as is) or ``embedding_fn(outputs, batch) -> Tensor`` (return None to skip a batch).
    """,
    })
    return cls


def _lightning_callback_base() -> Optional[type]:
    for mod in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = __import__(mod, fromlist=["Callback"])
            return module.Callback
        except Exception:  # noqa: BLE001  (not installed, or broken: no callback)
            continue
    return None


_base = _lightning_callback_base()
if _base is not None:
    RankMeCallback = _make_lightning_callback(_base)
    __all__.append("RankMeCallback")
del _base
