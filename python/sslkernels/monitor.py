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
  (fixed when its buffer is allocated). An evaluation gathers every rank's rows
  (:class:`sslkernels.distributed.RowGatherer` says how, metadata on a CPU group)
  and cuts them to ``max_samples``. A rank whose D differs makes every rank raise
  ``ValueError`` before any large transfer, so nothing hangs. Every rank must call
  the monitor the same number of times, since evaluations are collective.
* **Metrics.** Names from ``{"rankme", "effective_rank", "nesum", "alpha_req"}``,
  computed by :mod:`sslkernels.metrics` on the buffered rows (so a result equals
  calling e.g. :func:`sslkernels.rankme` on those rows), keyword options through
  ``metric_kwargs={"rankme": {"eps": 1e-5}}``. ``"lidar"`` needs several views per
  sample and raises ``NotImplementedError`` here: call :func:`sslkernels.lidar` on
  ``[N, Q, D]`` views yourself.

``RankMeCallback`` (defined only when ``lightning`` or ``pytorch_lightning`` imports,
looked up on first access of ``sslkernels.monitor.RankMeCallback``, so ``import
sslkernels`` never imports Lightning) wraps the monitor for Lightning's
``on_train_batch_end``.

Where the parts live: argument checks in :mod:`sslkernels._validation`, the device
ring buffer here (:class:`RowRing`), the cross-rank gathering in
:class:`sslkernels.distributed.RowGatherer`, the metrics in :mod:`sslkernels.metrics`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from sslkernels import metrics as _metrics
from sslkernels._common import initialized_distributed as _dist
from sslkernels._validation import check_int, check_metric_kwargs, check_metric_names, check_monitor_embeddings
from sslkernels.distributed import RowGatherer

_ALL = ["RankMeMonitor", "RowRing", "METRICS"]

#: Metric names the monitor accepts (functions of :mod:`sslkernels.metrics` on ``[N, D]``).
METRICS = _metrics.MONITOR_METRICS


class RowRing:
    """The most recent ``capacity`` rows of a stream of ``[B, D]`` batches, in a float32
    buffer on the batches' device, filled by on-device copies only (no host sync).

    Rows are kept in ring order, not arrival order (the metrics do not depend on the
    order of rows). Each write records on the device which rows were finite and stores
    non-finite entries as 0. ``count`` (a host int) is known without a sync.
    """

    def __init__(self) -> None:
        self.buf: Optional[torch.Tensor] = None   # [capacity, D] float32
        self.ok: Optional[torch.Tensor] = None    # [capacity] bool: row was finite
        self.dim: Optional[int] = None
        self.device: Optional[torch.device] = None
        self.capacity = 0
        self.ptr = 0       # next row to write
        self.count = 0     # rows holding data

    @property
    def allocated(self) -> bool:
        return self.buf is not None

    def allocate(self, dim: int, device: torch.device, capacity: int, fill=torch.empty) -> None:
        self.dim, self.device, self.capacity = dim, device, capacity
        self.buf = fill(capacity, dim, dtype=torch.float32, device=device)
        self.ok = torch.ones(capacity, dtype=torch.bool, device=device)

    def _write(self, rows: torch.Tensor, start: int) -> None:
        dst = self.buf[start:start + rows.shape[0]]
        dst.copy_(rows)                                  # casts to float32 on the device
        self.ok[start:start + rows.shape[0]] = torch.isfinite(dst).all(dim=1)
        torch.nan_to_num_(dst, nan=0.0, posinf=0.0, neginf=0.0)

    def append(self, z: torch.Tensor) -> None:
        """Keep the rows of ``z [B, D]`` (detached), dropping the oldest beyond capacity."""
        cap, b = self.capacity, z.shape[0]
        if b >= cap:
            self._write(z[b - cap:], 0)
            self.ptr, self.count = 0, cap
        elif b > 0:
            first = min(b, cap - self.ptr)
            self._write(z[:first], self.ptr)
            if b > first:
                self._write(z[first:], 0)
            self.ptr = (self.ptr + b) % cap
            self.count = min(self.count + b, cap)

    def rows(self) -> torch.Tensor:
        return self.buf[:self.count]

    def num_nonfinite(self) -> torch.Tensor:
        """Rows written with a NaN / Inf, as a device tensor (no sync)."""
        return (~self.ok[:self.count]).sum()


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
        self.every = check_int(every, "every", 1)
        self.max_samples = check_int(max_samples, "max_samples", 2)
        self.metrics = check_metric_names(metrics, METRICS)
        self.metric_kwargs = check_metric_kwargs(metric_kwargs, self.metrics, _metrics)
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
        self._gatherer = RowGatherer(process_group)
        self._ring = RowRing()

    @property
    def num_buffered(self) -> int:
        """Rows held by this rank's buffer."""
        return self._ring.count

    @property
    def capacity(self) -> Optional[int]:
        """Rows this rank keeps (None before the first call)."""
        return self._ring.capacity or None

    def _world(self) -> int:
        d = _dist() if self.distributed else None
        return d.get_world_size(self.process_group) if d is not None else 1

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor) -> Optional[Dict[str, Union[float, int]]]:
        """Buffer ``embeddings [B, D]``; on every ``every``-th call evaluate, log and return the dict."""
        ring = self._ring
        check_monitor_embeddings(embeddings, ring.dim if ring.allocated else None, ring.device)
        z = embeddings.detach()
        if not ring.allocated:
            ring.allocate(z.shape[1], z.device, max(1, -(-self.max_samples // self._world())))
        ring.append(z)
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
        self._ring = RowRing()
        if steps:
            self.step = 0

    def state_dict(self) -> Dict[str, int]:
        """The step counter (the buffered rows are transient and are not saved)."""
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(f"`state` must be a dict with a 'step' entry, got {state!r}")
        self.step = check_int(state["step"], "state['step']", 0)

    # ------------------------------------------------------------------ evaluation

    def _to_host(self, values: torch.Tensor) -> List[float]:
        """The monitor's single device-to-host transfer (one per evaluation)."""
        return values.tolist()

    def _gathered(self):
        """(rows [N, D] to evaluate, count of non-finite rows as a device tensor), or None off rank 0
        under ``rank_zero_only``."""
        d = _dist() if self.distributed else None
        if d is None:
            if self._ring.count == 0:
                raise RuntimeError("RankMeMonitor.compute(): no embeddings buffered yet")
            return self._ring.rows(), self._ring.num_nonfinite()
        return self._gatherer.gather(d, self._ring, self.max_samples, self.rank_zero_only)

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
        values = _metrics.evaluate(z, self.metrics, self.metric_kwargs)
        host = self._to_host(torch.cat([values, bad.to(values.device, torch.float64).reshape(1)]))
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
                f"step={self.step}, buffered={self._ring.count})")


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


def __getattr__(name: str):
    """``RankMeCallback`` and ``__all__`` on first access: Lightning is probed then, never
    at ``import sslkernels``."""
    if name == "RankMeCallback":
        base = _lightning_callback_base()
        if base is None:
            raise AttributeError(
                "sslkernels.monitor.RankMeCallback needs `lightning` or `pytorch_lightning` installed")
        callback = _make_lightning_callback(base)
        globals()["RankMeCallback"] = callback
        return callback
    if name == "__all__":
        return _ALL + (["RankMeCallback"] if _lightning_callback_base() is not None else [])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
