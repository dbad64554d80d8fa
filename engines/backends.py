"""Inference backends, found by name, and the one cache of loaded models.

A *backend* turns ONNX model bytes into a session on a device. Backends are registered by name
(:func:`register_backend`): ``onnxruntime`` on the CPU here; the GPU backends (TensorRT,
torch/CUDA) are registered by :func:`engines.gpu.enable_cuda` when the ``cuda`` device is chosen,
and every detector picks them up through :func:`load_model` without a change to the pipeline.

:func:`load_model` is the only place a model is loaded: one session per (model bytes, backend,
threads) in the process, however many detectors, file jobs and live streams use it (the
detectors themselves are cheap objects around these sessions). A model whose batch dimension is
dynamic is wrapped in a :class:`BatchedSession`, which runs the requests that callers on other
threads make at the same time as one batch (see :mod:`engines.service`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engines.arrays import device_of
from engines.errors import RedactionError

log = logging.getLogger(__name__)

# Most frames one batched run takes. On the CPU batching does not pay: with ten 640x360 streams
# sharing one service, the runs that met two frames cost more CPU per frame than two runs of
# one (python -m benchmarks.streams --find-max: 10 streams sustained batched at 2, 11 unbatched,
# as many as with one detector per stream), so CPU models run unbatched; a GPU backend sets its
# own.
CPU_MAX_BATCH = 1


class Runs(Protocol):
    def run(self, output_names: Sequence[str] | None,
            input_feed: dict[str, np.ndarray]) -> list[Any]: ...


class Session(Runs, Protocol):
    """What the detectors use of an onnxruntime ``InferenceSession``."""

    def get_inputs(self) -> Any: ...

    def get_outputs(self) -> Any: ...

    def get_modelmeta(self) -> Any: ...


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def max_batch(self) -> int: ...  # most frames one batched run takes on this backend

    @property
    def max_wait_s(self) -> float: ...  # how long a batch may wait for company

    def load(self, model_bytes: bytes, threads: int) -> Session: ...


class BackendError(RedactionError, ValueError):
    """An unknown backend or device, or one that cannot run here (the message says why)."""


_session_lock = threading.Lock()


@dataclass(frozen=True)
class OnnxRuntimeCpu:
    """onnxruntime's CPU execution provider."""

    name: str = "onnxruntime"
    device: str = "cpu"
    max_batch: int = CPU_MAX_BATCH
    max_wait_s: float = 0.0

    def load(self, model_bytes: bytes, threads: int) -> Session:
        """A session with ``threads`` intra-op threads (0 lets onnxruntime choose)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # no busy-waiting between runs: decoding and encoding threads need those cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # no memory arena: it keeps the largest pass's buffers (hundreds of MiB after a big
        # photo) for the life of the process
        opts.enable_cpu_mem_arena = False
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        with _session_lock:
            session: Session = ort.InferenceSession(model_bytes, sess_options=opts,
                                                    providers=["CPUExecutionProvider"])
        return session


_BACKENDS: dict[str, Callable[[], Backend]] = {"onnxruntime": OnnxRuntimeCpu}
_BY_DEVICE: dict[str, str] = {"cpu": "onnxruntime"}


def register_backend(name: str, factory: Callable[[], Backend], device: str) -> None:
    """Make ``factory``'s backend available as ``name``, and the one used on ``device``."""
    _BACKENDS[name] = factory
    _BY_DEVICE[device] = name


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda``: where models on ``device`` run (``auto``: a GPU when one is usable
    here, see :func:`engines.gpu.select_device`); BackendError for a device unknown or not
    usable here."""
    from engines.gpu import DeviceError, select_device

    try:
        d = select_device(device)
    except DeviceError as exc:
        raise BackendError(str(exc)) from None
    if d not in _BY_DEVICE:
        raise BackendError(f"no detector backend for device {device!r} in this install; "
                           f"available: {', '.join(['auto', *_BY_DEVICE])}")
    return d


def backend_for(device: str = "cpu") -> Backend:
    """The backend that runs models on ``device``."""
    return _BACKENDS[_BY_DEVICE[resolve_device(device)]]()


class BatchedSession:
    """A session whose ``run`` may be called from many threads at once: requests with the same
    outputs and input shapes (but for the batch) that wait together are stacked along axis 0,
    run once, and each caller gets its own rows back.

    Greedy: whoever calls while a run is in progress waits for it and then goes in the next
    batch, up to ``max_batch`` frames. ``max_wait_s`` (default 0, the CPU's: a lone caller, a
    file job, pays nothing) lets the oldest waiting request wait that long for others to fill
    its batch before it runs (worth it where a batch costs about what one frame does: GPUs).
    """

    def __init__(self, inner: Runs, max_batch: int, max_wait_s: float = 0.0) -> None:
        self.inner = inner
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self._cv = threading.Condition()
        self._queue: list[_Request] = []
        self._running = False
        self.runs = 0  # model runs made
        self.frames = 0  # frames (batch rows) run

    def __getattr__(self, name: str) -> Any:  # get_inputs, get_outputs, get_modelmeta ...
        return getattr(self.inner, name)

    def run(self, output_names: Sequence[str] | None,
            input_feed: dict[str, np.ndarray]) -> list[Any]:
        req = _Request(tuple(output_names) if output_names is not None else None, input_feed)
        with self._cv:
            self._queue.append(req)
            self._cv.notify_all()
        while True:
            with self._cv:
                while not req.done and (self._running or self._filling()):
                    self._cv.wait(self._fill_left() or None)
                if req.done:
                    return req.result()
                batch = self._take()
                self._running = True
            try:
                self._run_batch(batch)  # may be others' requests: then wait on for ours
            finally:
                with self._cv:
                    self._running = False
                    self._cv.notify_all()

    def _fill_left(self) -> float:
        """Seconds the oldest waiting request may still wait for company (with the lock)."""
        if not self.max_wait_s or not self._queue:
            return 0.0
        return max(0.0, self._queue[0].since + self.max_wait_s - time.monotonic())

    def _filling(self) -> bool:
        return (self._fill_left() > 0
                and sum(r.rows for r in self._queue) < self.max_batch)

    def _take(self) -> list[_Request]:
        """The oldest waiting request and those that can join it (called with the lock)."""
        head = self._queue[0]
        batch, rows = [head], head.rows
        for r in self._queue[1:]:
            if rows + r.rows > self.max_batch:
                break
            if r.key == head.key:
                batch.append(r)
                rows += r.rows
        for r in batch:
            self._queue.remove(r)
        return batch

    def _run_batch(self, batch: list[_Request]) -> None:
        names = batch[0].outputs
        try:
            if len(batch) == 1:
                batch[0].outputs_value = list(self.inner.run(names, batch[0].feed))
            else:
                feed = {k: stack_rows([r.feed[k] for r in batch]) for k in batch[0].feed}
                outs = [np.asarray(o) for o in self.inner.run(names, feed)]
                parts = [split_batch(o, [r.rows for r in batch]) for o in outs]
                if any(p is None for p in parts):
                    # outputs that do not carry the batch in a way we can split: run the
                    # requests one by one, and this model alone from now on
                    log.warning("a model's outputs do not split by batch row; it runs "
                                "unbatched")
                    self.max_batch = 1
                    for r in batch:
                        r.outputs_value = list(self.inner.run(names, r.feed))
                else:
                    for i, r in enumerate(batch):
                        r.outputs_value = [p[i] for p in parts if p is not None]
            self.runs += 1
            self.frames += sum(r.rows for r in batch)
        except BaseException as exc:
            for r in batch:
                r.error = exc
        finally:
            for r in batch:
                r.done = True


def stack_rows(arrays: list[Any]) -> Any:
    """Inputs of several requests as one batch along axis 0: numpy arrays, or arrays in GPU
    memory (made there by the pre-processing kernel), stacked on the GPU with torch."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.concatenate(arrays)
    import torch

    return torch.cat([torch.as_tensor(a, device="cuda") for a in arrays])


def split_batch(out: np.ndarray, rows: list[int]) -> list[np.ndarray] | None:
    """One batched output cut back into each request's part, ``rows`` frames each.

    Outputs carry the batch on their first axis (``(B, ...)``), or, as YuNet's do, keep a
    leading 1 and lay the frames' results one after another on the second axis
    (``(1, B * N, ...)``, frame-major: each frame's N rows together). None when the output
    fits neither (the caller then runs the requests one at a time).
    """
    total = sum(rows)
    bounds = np.cumsum([0, *rows])
    if out.ndim >= 1 and out.shape[0] == total:
        return [out[a:b] for a, b in itertools.pairwise(bounds)]
    if out.ndim >= 2 and out.shape[0] == 1 and out.shape[1] % total == 0:
        per = out.shape[1] // total
        return [out[:, a * per:b * per] for a, b in itertools.pairwise(bounds)]
    return None


class _Request:
    def __init__(self, outputs: tuple[str, ...] | None, feed: dict[str, np.ndarray]) -> None:
        self.outputs = outputs
        self.feed = feed
        arrays = list(feed.values())
        self.rows = int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1
        self.key = (outputs, tuple((k, tuple(v.shape[1:]), str(v.dtype), device_of(v))
                                   for k, v in feed.items()))
        self.since = time.monotonic()
        self.done = False
        self.outputs_value: list[Any] = []
        self.error: BaseException | None = None

    def result(self) -> list[Any]:
        if self.error is not None:
            raise self.error
        return self.outputs_value


@dataclass
class LoadedModel:
    """One entry of the model cache (what ``loaded_models()`` lists)."""

    sha256: str
    backend: str
    device: str
    threads: int
    session: Session


_MODELS: dict[tuple[str, str, int, bool], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def load_model(model_bytes: bytes, *, device: str = "cpu", threads: int = 0,
               batch: bool = False, shared: bool = True) -> Session:
    """The session of ``model_bytes`` on ``device``, loaded once per process.

    ``batch``: the model's first input dimension is a dynamic batch, so callers on several
    threads may share runs (:class:`BatchedSession`). ``shared=False`` loads a private session
    that no one else uses (kept for measuring the one-model-per-stream shape against this one).
    """
    be = backend_for(device)
    if not shared:
        return be.load(model_bytes, threads)
    sha = hashlib.sha256(model_bytes).hexdigest()
    key = (sha, be.name, int(threads), bool(batch))
    with _MODELS_LOCK:
        found = _MODELS.get(key)
        if found is not None:
            return found.session
        session = be.load(model_bytes, threads)
        if batch and be.max_batch > 1:
            session = BatchedSession(session, be.max_batch, be.max_wait_s)
        _MODELS[key] = LoadedModel(sha, be.name, be.device, int(threads), session)
        log.debug("model %s loaded on %s (%s)", sha[:12], be.device, be.name)
        return session


def loaded_models() -> list[LoadedModel]:
    """Every model session this process holds."""
    with _MODELS_LOCK:
        return list(_MODELS.values())
