"""RankMeMonitor: ring buffer, evaluation schedule, agreement with sslkernels.metrics,
one host sync per evaluation, dtypes, errors, a real 2-process gloo group, and the
Lightning callback (its logic against a fake trainer / module; a real Trainer only
where lightning is installed)."""
from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sslkernels import monitor as monitor_module
from sslkernels.monitor import METRICS, RankMeMonitor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def metrics():
    """sslkernels.metrics, or a skip while it has not landed."""
    try:
        return importlib.import_module("sslkernels.metrics")
    except ImportError:
        pytest.skip("sslkernels.metrics does not exist yet (rankme / effective_rank / nesum / alpha_req land "
                    "with it); the monitor evaluates through it")


def _rows(n: int, d: int, start: int = 0) -> torch.Tensor:
    """Rows whose first entry identifies them (start, start+1, ...), the rest random."""
    z = torch.randn(n, d)
    z[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    return z


def _buffered(m: RankMeMonitor) -> torch.Tensor:
    return m._ring.buf[:m.num_buffered]


def _sorted_rows(z: torch.Tensor) -> torch.Tensor:
    return z[torch.argsort(z[:, 0])]


class _SyncGuard(TorchFunctionMode):
    """Records every tensor method that moves data to the host or branches on a value."""

    HOST = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.HOST or (name == "to" and any(
                isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                for a in list(args[1:]) + list((kwargs or {}).values()))):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------- ring buffer


@pytest.mark.parametrize("batch", [1, 3, 7, 10, 25])
def test_ring_buffer_keeps_the_most_recent_rows(batch):
    cap = 10
    m = RankMeMonitor(every=1000, max_samples=cap)
    seen = []
    for i in range(6):
        z = _rows(batch, 5, start=i * batch)
        seen.append(z)
        m(z)
        want = torch.cat(seen)[-cap:]
        assert m.num_buffered == min(cap, (i + 1) * batch)
        got = _buffered(m)
        assert got.dtype == torch.float32 and got.shape == (min(cap, (i + 1) * batch), 5)
        torch.testing.assert_close(_sorted_rows(got), _sorted_rows(want), rtol=0, atol=0)
    assert m.capacity == cap and m._ring.buf.shape == (cap, 5)


def test_buffer_is_allocated_once_and_detached():
    m = RankMeMonitor(every=1000, max_samples=8)
    w = torch.randn(4, 4, requires_grad=True)
    z = torch.randn(3, 4) @ w
    m(z)
    buf = m._ring.buf
    ptr = buf.data_ptr()
    for _ in range(5):
        m(torch.randn(3, 4) @ w)
    assert m._ring.buf.data_ptr() == ptr
    assert not m._ring.buf.requires_grad and m._ring.buf.grad_fn is None
    assert m._ring.buf.device == z.device


def test_empty_batch_is_a_step_without_rows():
    m = RankMeMonitor(every=1000, max_samples=8)
    m(torch.randn(3, 4))
    m(torch.randn(0, 4))
    assert m.num_buffered == 3 and m.step == 2


# ---------------------------------------------------------------------- schedule and values


def test_returns_a_dict_exactly_every_every_calls(metrics):
    m = RankMeMonitor(every=4, max_samples=64)
    results = [m(torch.randn(5, 6)) for _ in range(13)]
    steps = [i + 1 for i, r in enumerate(results) if r is not None]
    assert steps == [4, 8, 12]
    for s in steps:
        r = results[s - 1]
        assert set(r) == {"rankme", "num_samples", "step"}
        assert r["step"] == s and isinstance(r["step"], int)
        assert r["num_samples"] == min(64, 5 * s) and isinstance(r["num_samples"], int)
        assert isinstance(r["rankme"], float)


def test_every_one_evaluates_each_call(metrics):
    m = RankMeMonitor(every=1, max_samples=16)
    assert all(m(torch.randn(4, 3)) is not None for _ in range(3))


def test_values_equal_the_metric_functions_on_the_buffered_rows(metrics):
    names = ("rankme", "effective_rank", "nesum", "alpha_req")
    kw = {"rankme": {"eps": 1e-5}, "alpha_req": {"fit_range": (2, 20)}}
    m = RankMeMonitor(every=5, max_samples=257, metrics=names, metric_kwargs=kw)
    seen = []
    for i in range(10):
        z = torch.randn(61, 65) * torch.linspace(2.0, 0.01, 65)  # a decaying spectrum
        seen.append(z)
        out = m(z)
    assert out is not None and out["num_samples"] == 257 and out["step"] == 10
    rows = torch.cat(seen)[-257:]
    for name in names:
        want = float(getattr(metrics, name)(rows, **kw.get(name, {})))
        assert out[name] == pytest.approx(want, rel=1e-5, abs=1e-6), name
    # the defaults too, against the top-level names
    import sslkernels
    m2 = RankMeMonitor(every=1, max_samples=1000)
    assert m2(rows)["rankme"] == pytest.approx(float(sslkernels.rankme(rows)), rel=1e-6)


def test_compute_on_demand_reset_and_state_dict(metrics):
    m = RankMeMonitor(every=100, max_samples=50)
    with pytest.raises(RuntimeError, match="no embeddings"):
        m.compute()
    z = torch.randn(20, 8)
    assert m(z) is None
    out = m.compute()
    assert out["step"] == 1 and out["num_samples"] == 20
    assert out["rankme"] == pytest.approx(float(metrics.rankme(z)), rel=1e-6)
    assert m.state_dict() == {"step": 1}
    m.reset()
    assert m.num_buffered == 0 and m.step == 1
    m(torch.randn(4, 3))  # a new D is fine after reset
    m2 = RankMeMonitor(every=3, max_samples=50)
    m2.load_state_dict({"step": 2})
    assert m2(torch.randn(6, 3))["step"] == 3
    m2.reset(steps=True)
    assert m2.step == 0
    with pytest.raises(ValueError, match="step"):
        m2.load_state_dict({})


def test_logger_and_prefix(metrics):
    logged = []
    m = RankMeMonitor(every=2, max_samples=32, metrics=["rankme", "nesum"], logger=logged.append, prefix="ssl/")
    outs = [m(torch.randn(6, 5)) for _ in range(4)]
    assert outs[0] is None and outs[2] is None
    assert logged == [outs[1], outs[3]]
    assert set(outs[3]) == {"ssl/rankme", "ssl/nesum", "ssl/num_samples", "ssl/step"}
    assert m.compute() is not None and len(logged) == 2  # compute() does not log


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_low_and_high_precision_input(metrics, dtype):
    m = RankMeMonitor(every=3, max_samples=100, metrics=("rankme", "nesum"))
    seen = []
    for _ in range(3):
        z = torch.randn(17, 33).to(dtype)
        seen.append(z)
        out = m(z)
    assert m._ring.buf.dtype == torch.float32
    rows = torch.cat(seen).float()  # exactly what the buffer holds
    assert out["rankme"] == pytest.approx(float(metrics.rankme(rows)), rel=1e-6)
    assert out["nesum"] == pytest.approx(float(metrics.nesum(rows)), rel=1e-5)
    if dtype != torch.float64:
        assert out["rankme"] == pytest.approx(float(metrics.rankme(torch.cat(seen))), rel=1e-6)


# ---------------------------------------------------------------------- host syncs


def test_one_sync_per_evaluation_and_none_otherwise(metrics, monkeypatch):
    transfers = []
    real = RankMeMonitor._to_host

    def counting(self, values):
        transfers.append(tuple(values.shape))
        return real(self, values)

    monkeypatch.setattr(RankMeMonitor, "_to_host", counting)
    m = RankMeMonitor(every=4, max_samples=30, metrics=("rankme", "effective_rank", "nesum", "alpha_req"),
                      metric_kwargs={"alpha_req": {"fit_range": (1, 10)}})
    for step in range(1, 13):
        z = torch.randn(7, 12).half()
        if step % 4:
            with _SyncGuard() as guard:
                assert m(z) is None
            assert guard.calls == [], f"step {step}: host transfer on a non-evaluation step: {guard.calls}"
            assert len(transfers) == step // 4
        else:
            assert m(z) is not None
            assert len(transfers) == step // 4, "exactly one _to_host per evaluation"
    assert transfers == [(5,)] * 3  # four metrics + the non-finite count, one stacked tensor


def test_wrap_around_and_oversized_batches_do_not_sync():
    m = RankMeMonitor(every=1000, max_samples=10)
    with _SyncGuard() as guard:
        for b in (3, 4, 6, 25, 9, 1):
            m(torch.randn(b, 4, dtype=torch.bfloat16))
    assert guard.calls == []


@pytest.mark.gpu
def test_cuda_sync_count(metrics):
    """On a GPU, torch's own sync detector: no sync on a non-evaluation step, one per evaluation."""
    import warnings
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the CPU tests count _to_host calls instead)")
    m = RankMeMonitor(every=3, max_samples=4096, metrics=("rankme", "effective_rank", "nesum"))
    for _ in range(3):  # first evaluation: warm-up (kernel compilation)
        m(torch.randn(512, 128, device="cuda", dtype=torch.bfloat16))
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(2):
            assert m(torch.randn(512, 128, device="cuda", dtype=torch.bfloat16)) is None
        torch.cuda.set_sync_debug_mode("warn")
        z = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert m(z) is not None
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(every=0), ValueError, "`every`"),
    (dict(every=-3), ValueError, "`every`"),
    (dict(every=2.0), TypeError, "`every`"),
    (dict(every=True), TypeError, "`every`"),
    (dict(max_samples=1), ValueError, "`max_samples`"),
    (dict(max_samples=0), ValueError, "`max_samples`"),
    (dict(max_samples=None), TypeError, "`max_samples`"),
    (dict(metrics=()), ValueError, "`metrics`"),
    (dict(metrics=("rankme", "entropy")), ValueError, r"unknown metric 'entropy'.*'rankme'.*'alpha_req'"),
    (dict(metrics=("rankme", 3)), TypeError, "`metrics`"),
    (dict(metrics=("lidar",)), NotImplementedError, "lidar.*views"),
    (dict(metric_kwargs={"nesum": {}}), ValueError, "`metric_kwargs`.*nesum"),
    (dict(metric_kwargs={"rankme": 1e-5}), TypeError, r"`metric_kwargs\['rankme'\]`"),
    (dict(logger="wandb"), TypeError, "`logger`"),
    (dict(prefix=1), TypeError, "`prefix`"),
])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RankMeMonitor(**kwargs)


def test_unknown_metric_kwarg_is_caught_early(metrics):
    with pytest.raises(TypeError, match=r"`metric_kwargs\['rankme'\]`.*sslkernels.rankme"):
        RankMeMonitor(metric_kwargs={"rankme": {"epsilon": 1e-5}})


def test_metric_names_are_the_metrics_functions(metrics):
    for name in METRICS:
        assert callable(getattr(metrics, name))


def test_embedding_errors():
    m = RankMeMonitor(every=100, max_samples=10)
    with pytest.raises(ValueError, match="`embeddings` must be 2-D"):
        m(torch.randn(8))
    with pytest.raises(ValueError, match="`embeddings` must be 2-D"):
        m(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="`embeddings` must be a floating-point"):
        m(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="`embeddings`"):  # the dtype error is both kinds
        m(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="`embeddings` must be a torch.Tensor"):
        m([[1.0, 2.0]])
    with pytest.raises(ValueError, match="zero features"):
        m(torch.randn(3, 0))
    assert m.step == 0 and m.num_buffered == 0  # rejected calls change nothing
    m(torch.randn(3, 4))
    with pytest.raises(ValueError, match="`embeddings` has dim 5.*dim 4"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="`embeddings` is on meta"):
        m(torch.randn(3, 4, device="meta"))
    assert m.step == 1 and m.num_buffered == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_embeddings_raise_at_evaluation_with_one_sync(metrics, monkeypatch, bad):
    transfers = []
    real = RankMeMonitor._to_host
    monkeypatch.setattr(RankMeMonitor, "_to_host", lambda self, v: transfers.append(1) or real(self, v))
    m = RankMeMonitor(every=3, max_samples=12)
    m(torch.randn(4, 6))
    z = torch.randn(4, 6).half()
    z[2, 3] = bad
    with _SyncGuard() as guard:
        assert m(z) is None  # stored without a sync ...
    assert guard.calls == []
    with pytest.raises(ValueError, match=r"`embeddings`: 1 of the 12 buffered rows held NaN or Inf"):
        m(torch.randn(4, 6))  # ... and reported by the evaluation's single sync
    assert transfers == [1]
    assert torch.isfinite(_buffered(m)).all()  # the metrics never saw it
    # float64 values that overflow float32 are non-finite in the buffer too
    m.reset()
    m(torch.full((2, 6), 1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 of the 2 buffered rows"):
        m.compute()
    # once the bad rows are overwritten the monitor recovers
    m2 = RankMeMonitor(every=2, max_samples=4)
    m2(torch.full((4, 3), bad))
    with pytest.raises(ValueError, match="`embeddings`"):
        m2(torch.randn(1, 3))
    assert m2(torch.randn(4, 3)) is None
    assert m2.compute()["num_samples"] == 4


# ---------------------------------------------------------------------- distributed (2-process gloo)

_WORLD = 2
_DIST_TIMEOUT_S = 60


def _rank_batches(rank: int, steps: int, d: int = 16):
    """Rank r's embeddings: batches of 5 rows on rank 0 and 2 on rank 1 (different fill counts)."""
    g = torch.Generator().manual_seed(1234 + rank)
    b = 5 if rank == 0 else 2
    return [torch.randn(b, d, generator=g) * torch.linspace(1.0, 0.05, d) for _ in range(steps)]


def _dist_worker(rank: int, port: int, out_path: str) -> None:
    """Runs in a subprocess (``python tests/test_monitor.py --dist-worker ...``); writes JSON results."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=_WORLD, timeout=datetime.timedelta(seconds=20))
    res = {}
    try:
        # (a) all ranks evaluate on the gathered rows; capacity per rank = ceil(40 / 2) = 20
        m = RankMeMonitor(every=4, max_samples=40, metrics=("rankme", "nesum"))
        outs = [m(z) for z in _rank_batches(rank, 8)]
        res["capacity"] = m.capacity
        res["all"] = [o for o in outs if o is not None]
        # (b) rank 0 only
        m = RankMeMonitor(every=4, max_samples=40, rank_zero_only=True)
        logged = []
        m.logger = logged.append
        res["zero"] = [m(z) for z in _rank_batches(rank, 4)][-1]
        res["zero_logged"] = len(logged)
        # (c) a rank whose D differs: every rank raises (and nothing hangs)
        m = RankMeMonitor(every=1, max_samples=40)
        try:
            m(torch.randn(3, 16 if rank == 0 else 8))
            res["dim_error"] = None
        except ValueError as e:
            res["dim_error"] = str(e)
        # (d) NaN on rank 1 only: every rank reports it
        m = RankMeMonitor(every=2, max_samples=40)
        z = torch.randn(3, 16)
        if rank == 1:
            z[0, 0] = float("nan")
        m(z)
        try:
            m(torch.randn(3, 16))
            res["nan_error"] = None
        except ValueError as e:
            res["nan_error"] = str(e)
        # (e) a rank that has seen nothing yet still takes part
        m = RankMeMonitor(every=1000, max_samples=40)
        if rank == 0:
            m(torch.randn(6, 16))
        res["late"] = m.compute()
        # (f) the paths taken on NCCL, run on gloo by making the backend look non-gloo:
        #     metadata over a gloo twin of the default group, and on the device for a custom group
        real_backend = dist.get_backend
        dist.get_backend = lambda group=None: "fakeccl"
        try:
            m = RankMeMonitor(every=4, max_samples=40, metrics=("rankme", "nesum"))
            res["twin"] = [m(z) for z in _rank_batches(rank, 4)][-1]
            res["twin_group"] = m._gatherer.meta_group is not False
            m = RankMeMonitor(every=4, max_samples=40, metrics=("rankme", "nesum"),
                              process_group=dist.new_group([0, 1]))
            res["custom"] = [m(z) for z in _rank_batches(rank, 4)][-1]
            res["custom_group"] = m._gatherer.meta_group is not False
        finally:
            dist.get_backend = real_backend
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out_path).write_text(json.dumps(res))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_gloo_two_ranks(metrics, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, "--dist-worker", str(r), str(port),
                               str(tmp_path / f"rank{r}.json")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(_WORLD)]
    deadline = time.monotonic() + _DIST_TIMEOUT_S
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed workers did not finish in {_DIST_TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(_WORLD)]

    assert res[0]["capacity"] == res[1]["capacity"] == 20
    b0, b1 = _rank_batches(0, 8), _rank_batches(1, 8)
    for i, step in enumerate((4, 8)):
        rows = torch.cat([torch.cat(b0[:step])[-20:], torch.cat(b1[:step])[-20:]])
        assert rows.shape[0] == {4: 28, 8: 36}[step]  # rank 0 full, rank 1 not: different counts
        want = {"rankme": float(metrics.rankme(rows)), "nesum": float(metrics.nesum(rows)),
                "num_samples": rows.shape[0], "step": step}
        for r in range(_WORLD):
            got = res[r]["all"][i]
            assert got["step"] == step and got["num_samples"] == want["num_samples"]
            assert got["rankme"] == pytest.approx(want["rankme"], rel=1e-5)
            assert got["nesum"] == pytest.approx(want["nesum"], rel=1e-5)

    rows = torch.cat([torch.cat(b0[:4])[-20:], torch.cat(b1[:4])])
    assert res[0]["zero"]["rankme"] == pytest.approx(float(metrics.rankme(rows)), rel=1e-5)
    for r in range(_WORLD):
        for key in ("twin", "custom"):
            assert res[r][key] == pytest.approx(res[r]["all"][0], rel=1e-6), key
        assert (res[r]["twin_group"], res[r]["custom_group"]) == (True, False)
    assert res[1]["zero"] is None
    assert (res[0]["zero_logged"], res[1]["zero_logged"]) == (1, 0)

    for r in range(_WORLD):
        assert res[r]["dim_error"] is not None and "different dims across ranks" in res[r]["dim_error"]
        assert "`embeddings`" in res[r]["dim_error"]
        assert res[r]["nan_error"] is not None and "1 of the 12 buffered rows" in res[r]["nan_error"]
        assert res[r]["late"]["num_samples"] == 6


# ---------------------------------------------------------------------- Lightning


def _lightning_importable() -> bool:
    for mod in ("lightning.pytorch", "pytorch_lightning"):
        try:
            importlib.import_module(mod)
            return True
        except ImportError:
            continue
    return False


def test_callback_defined_exactly_when_lightning_imports():
    assert hasattr(monitor_module, "RankMeCallback") == _lightning_importable()


class _FakeCallback:
    """Stands in for lightning.pytorch.Callback (not installed here)."""

    def __init__(self):
        self.base_initialised = True


class _FakeModule:
    def __init__(self):
        self.logged = []

    def log_dict(self, values, **kwargs):
        self.logged.append((values, kwargs))


def test_callback_logic_with_a_fake_trainer(metrics):
    Callback = monitor_module._make_lightning_callback(_FakeCallback)
    assert Callback.__name__ == "RankMeCallback" and issubclass(Callback, _FakeCallback)
    cb = Callback(every=2, max_samples=64, metrics=("rankme",), prefix="train/")
    assert cb.base_initialised
    module, trainer = _FakeModule(), object()
    seen = []
    for i in range(4):
        z = torch.randn(8, 10, requires_grad=True)
        seen.append(z.detach())
        cb.on_train_batch_end(trainer, module, {"loss": z.sum(), "embeddings": z}, None, i)
    assert len(module.logged) == 2
    values, kwargs = module.logged[-1]
    assert kwargs == {"rank_zero_only": False}
    assert values["train/step"] == 4 and values["train/num_samples"] == 32
    assert values["train/rankme"] == pytest.approx(float(metrics.rankme(torch.cat(seen))), rel=1e-6)
    assert cb.state_dict() == {"step": 4}
    cb2 = Callback(every=2)
    cb2.load_state_dict(cb.state_dict())
    assert cb2.monitor.step == 4

    # a tensor output is used as is; embedding_fn picks anything, None skips the batch
    cb = Callback(every=1, max_samples=16)
    cb.on_train_batch_end(trainer, module, torch.randn(4, 3), None, 0)
    assert len(module.logged) == 3
    cb = Callback(every=1, max_samples=16, embedding_fn=lambda out, batch: batch[1] if batch else None)
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert len(module.logged) == 3
    cb.on_train_batch_end(trainer, module, None, (torch.zeros(2), torch.randn(4, 3)), 1)
    assert len(module.logged) == 4
    cb = Callback(every=1, embedding_key="proj")
    with pytest.raises(KeyError, match="'proj'"):
        cb.on_train_batch_end(trainer, module, {"embeddings": torch.randn(2, 3)}, None, 0)
    with pytest.raises(TypeError, match="embedding_fn"):
        cb.on_train_batch_end(trainer, module, [torch.randn(2, 3)], None, 0)
    with pytest.raises(ValueError, match="`every`"):
        Callback(every=0)


def test_callback_with_a_real_lightning_trainer(metrics, tmp_path):
    if not _lightning_importable():
        pytest.skip("lightning / pytorch_lightning is not installed here; the callback's logic is tested "
                    "against a fake trainer in test_callback_logic_with_a_fake_trainer")
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(6, 5)

        def training_step(self, batch, batch_idx):
            z = self.net(batch[0])
            return {"loss": z.pow(2).mean(), "embeddings": z}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(64, 6))
    cb = monitor_module.RankMeCallback(every=2, max_samples=64, prefix="ssl/")
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
    assert cb.monitor.step == 8
    assert "ssl/rankme" in trainer.callback_metrics


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--dist-worker":
    _dist_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
