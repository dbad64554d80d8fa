"""Live streams on a Ray cluster: each stream of the database runs as a detached Ray actor, placed
by Ray with a CPU (and, for a ``cuda`` stream, a GPU) share, restarted by Ray on another node when
its node dies.

The database stays the truth. ``redact ray-streams`` (one or more processes on Ray nodes) keeps
the actors and the stream rows in step: one of them leads at a time (a lease in the store's
``leaders`` table), and each second the leader creates the actor of every stream that has none
and kills the actor of every stream deleted. After the whole cluster was lost (its head died:
every actor with it), the leader, connected again once a head is back, creates them all again
from the rows.

An actor is a :class:`gateway.stream_runner.StreamRunner` limited to its one stream: it claims
the stream in the store under a lease, runs it with this node's RTSP server and a control server
of its own, and writes where it is served (``rtsp_url``, ``control_url``) with its renewals, so
the API finds it as it finds a stream run by a ``redact worker`` (WHEP forwarded, stats, the
``rtsp_url`` on the node that serves it). Frames never go through Ray: the actor pulls its camera
and serves its players itself. A restarted actor takes its stream over from its earlier life at
once, without waiting for that life's lease to run out (Ray runs one life of a named actor at a
time).

Talking to Ray can hang when the head dies, so the reconciler runs in a child process that the
``redact ray-streams`` process watches: a child that stops reporting progress, or exits (no
cluster to connect to), is replaced after a pause.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

from gateway.settings import Settings
from gateway.store import Store
from gateway.streams import StreamSettings

log = logging.getLogger(__name__)

NAMESPACE = "redact"
ACTOR_PREFIX = "stream-"
LEADER = "ray-streams"
PASS_S = 1.0  # the leader's reconciliation pass, this often
LEADER_LEASE_S = 10.0  # another process leads once the leader has not renewed for this long
STUCK_S = 15.0  # a reconciler child that reports no progress this long is replaced
RESTART_PAUSE_S = 2.0  # between a child's end and the next child


def actor_name(stream_id: str) -> str:
    return f"{ACTOR_PREFIX}{stream_id}"


def owner_prefix(stream_id: str) -> str:
    """The start of every claim owner name of ``stream_id``'s actor, in all of its lives."""
    return f"ray:{stream_id}:"


def ray_env() -> dict[str, str]:
    """What this process passes to the actors it creates: its ``REDACT_*`` settings (database,
    storage, lease, detector threads, stream settings), less those that name this process."""
    skip = {"REDACT_WORKER_ID", "REDACT_RTSP_PORT", "REDACT_CONTROL_PORT", "REDACT_CONTROL_HOST",
            "REDACT_RTSP_HOST", "REDACT_MAX_STREAMS", "REDACT_RAY_ADDRESS"}
    return {k: v for k, v in os.environ.items() if k.startswith("REDACT_") and k not in skip}


class StreamActor:
    """One stream, run in a Ray worker process (``ray.remote`` applied by :func:`actor_class`)."""

    def __init__(self, stream_id: str, env: dict[str, str]) -> None:
        import ray

        from gateway.stream_runner import StreamRunner

        os.environ.update(env)
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        node_ip = ray.util.get_node_ip_address()
        worker_id = f"{owner_prefix(stream_id)}{socket.gethostname()}:{os.getpid()}:" \
                    f"{os.urandom(3).hex()}"
        settings = Settings(worker_id=worker_id)
        stream_settings = StreamSettings(rtsp_port=0, rtsp_host=node_ip, control_host=node_ip,
                                         control_port=0, max_streams=1)
        self.stream_id = stream_id
        self.store = Store(settings.store_target)
        self.runner = StreamRunner(settings, stream_settings, self.store, worker_id,
                                   only=stream_id, take_from=owner_prefix(stream_id))
        self.runner.start()
        self.runner.poke()

    def stop(self) -> None:
        """Stop the stream and give it back (before the actor is killed)."""
        self.runner.stop()
        self.store.close()


def actor_class() -> Any:
    import ray

    return ray.remote(max_restarts=-1, max_task_retries=0)(StreamActor)


def connect(address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                 logging_level=logging.WARNING)


def reconcile(store: Store, settings: Settings, env: dict[str, str]) -> dict[str, int]:
    """One pass: an actor for every stream row, none for a deleted one. Returns what it did."""
    import ray

    rows = {r.id: r for r in store.list_streams()}
    names = {n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)}
    cls = actor_class()
    created = removed = 0
    for sid, row in rows.items():
        if actor_name(sid) in names:
            continue
        gpus = settings.ray_stream_gpus if row.definition.get("device") == "cuda" else 0.0
        cls.options(name=actor_name(sid), lifetime="detached", get_if_exists=True,
                    num_cpus=settings.ray_stream_cpus, num_gpus=gpus).remote(sid, env)
        created += 1
        log.info("stream %s: actor created", row.name)
    for name in names:
        sid = name.removeprefix(ACTOR_PREFIX)
        if sid in rows:
            continue
        with contextlib.suppress(Exception):
            handle = ray.get_actor(name)
            with contextlib.suppress(Exception):
                ray.get(handle.stop.remote(), timeout=10)
            ray.kill(handle, no_restart=True)
        removed += 1
        log.info("stream %s: deleted, its actor removed", sid)
    return {"streams": len(rows), "created": created, "removed": removed}


def _child(settings_json: str, env: dict[str, str], beat: Any, owner: str, parent: int) -> None:
    """The reconciler: leads when it can, then a pass every second; ``beat`` is set to the
    time of its last pass (leading or not) for the parent to see it is not stuck. It ends when
    its parent (pid ``parent``) is gone."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.model_validate_json(settings_json)
    assert settings.ray_address
    store = Store(settings.store_target)
    connect(settings.ray_address)
    log.info("ray-streams %s: connected to the Ray cluster at %s", owner, settings.ray_address)
    leading = False
    while os.getppid() == parent:
        now = time.time()
        try:
            lead = store.claim_leader(LEADER, owner, now, LEADER_LEASE_S)
        except Exception as exc:
            log.warning("ray-streams: the database: %s", exc)
            lead = False
        if lead != leading:
            log.info("ray-streams %s: %s", owner, "leading" if lead else "no longer leading")
            leading = lead
        if lead:
            reconcile(store, settings, env)
        beat.value = time.time()
        time.sleep(PASS_S)


def run_ray_streams(settings: Settings) -> int:
    """``redact ray-streams``: keep a reconciler child running until SIGTERM or SIGINT; a child
    that exits or hangs is replaced. Returns the exit status."""
    if not settings.ray_address:
        log.error("redact ray-streams needs a Ray cluster: --ray-address or REDACT_RAY_ADDRESS")
        return 2
    try:
        import ray  # noqa: F401
    except ImportError:
        log.error("redact ray-streams needs Ray: pip install 'redaction-gateway[ray]'")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    owner = settings.worker_id
    ctx = multiprocessing.get_context("spawn")
    env = ray_env()
    while not stop.is_set():
        beat = ctx.Value("d", time.time())
        child = ctx.Process(target=_child, args=(settings.model_dump_json(), env, beat, owner,
                                                 os.getpid()),
                            name="ray-streams-reconciler", daemon=True)
        child.start()
        while not stop.is_set() and child.is_alive():
            if time.time() - beat.value > STUCK_S:
                log.warning("ray-streams: the reconciler made no progress for %.0f s (the Ray "
                            "head gone?): starting a new one", STUCK_S)
                break
            stop.wait(0.5)
        if child.is_alive():
            child.kill()
            child.join(5)
        elif not stop.is_set():
            log.warning("ray-streams: the reconciler ended (exit %s): starting a new one in "
                        "%.0f s", child.exitcode, RESTART_PAUSE_S)
        stop.wait(RESTART_PAUSE_S)
    with contextlib.suppress(Exception), contextlib.closing(Store(settings.store_target)) as db:
        db.release_leader(LEADER, owner)
    return 0
