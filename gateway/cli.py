"""The ``redact`` command: ``file``, ``categories``, ``serve``, ``worker`` and ``keys``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import add_file_parser, list_categories

PLANS = ("free", "starter", "pro", "scale")


def _settings(args: argparse.Namespace, **more: Any) -> Any:
    """Service settings from the environment, with the options given on the command line."""
    from gateway.settings import Settings

    given = {k: v for k, v in {"data_dir": getattr(args, "data_dir", None),
                               "database_url": getattr(args, "database", None),
                               "storage": getattr(args, "storage", None), **more}.items()
             if v is not None}
    return Settings(**given)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = _settings(args, host=args.host, port=args.port, workers=args.workers,
                         embedded_worker=False if args.no_worker else None)
    level = "debug" if args.verbose else settings.log_level
    logging.getLogger().setLevel(level.upper())
    sys.stderr.write(f"redact serve: http://{settings.host}:{settings.port} (docs at /docs), "
                     f"{_where(settings)}\n")
    if not settings.embedded_worker:
        sys.stderr.write("redact serve: API only; jobs, webhooks and live streams are run by "
                         "`redact worker` processes on the same data directory\n")
    stream_settings = _stream_settings(args)
    if settings.embedded_worker:
        rtsp_host = stream_settings.rtsp_host or settings.host
        sys.stderr.write(f"redact serve: live streams on rtsp://{rtsp_host}:"
                         f"{stream_settings.rtsp_port}/<name>\n")
    uvicorn.run(create_app(settings, args.config, stream_settings), host=settings.host,
                port=settings.port, log_level=level, timeout_graceful_shutdown=10)
    return 0


def _stream_settings(args: argparse.Namespace) -> Any:
    """Live-stream settings from the environment, with the options given on the command line."""
    from gateway.streams import StreamSettings

    given = {"rtsp_port": args.rtsp_port, "ice_advertised_host": args.advertise_host,
             "control_host": getattr(args, "control_host", None),
             "control_port": getattr(args, "control_port", None),
             "max_streams": getattr(args, "max_streams", None)}
    return StreamSettings(**{k: v for k, v in given.items() if v is not None})


def run_worker(args: argparse.Namespace) -> int:
    from gateway.worker import run_worker as run

    settings = _settings(args, workers=args.workers)
    level = "debug" if args.verbose else settings.log_level
    logging.getLogger().setLevel(level.upper())
    stream_settings = _stream_settings(args)
    rtsp_host = stream_settings.rtsp_host or settings.host
    sys.stderr.write(f"redact worker {settings.worker_id}: {_where(settings)}, "
                     f"{settings.workers} job slot(s), live streams on rtsp://{rtsp_host}:"
                     f"{stream_settings.rtsp_port or '<any free port>'}/<name>\n")
    return run(settings, stream_settings)


def run_ray_streams(args: argparse.Namespace) -> int:
    from gateway.ray_streams import run_ray_streams as run

    settings = _settings(args, ray_address=args.ray_address)
    level = "debug" if args.verbose else settings.log_level
    logging.getLogger().setLevel(level.upper())
    sys.stderr.write(f"redact ray-streams {settings.worker_id}: {_where(settings)}, Ray "
                     f"cluster {settings.ray_address or '(none given)'}\n")
    return run(settings)


def _where(settings: Any) -> str:
    """Where a process keeps its state, for its first line."""
    from gateway.database import display_name

    if settings.database_url is None and settings.storage is None:
        return f"data in {settings.data_dir}"
    return (f"database {display_name(settings.store_target)}, files in "
            f"{settings.storage_dir}")


def _store(args: argparse.Namespace) -> Any:
    from gateway.store import Store

    return Store(_settings(args).store_target)


def run_keys_create(args: argparse.Namespace) -> int:
    rec, key = _store(args).create_key(args.name, args.plan)
    print(json.dumps({"id": rec.id, "key": key, "webhook_secret": rec.webhook_secret,
                      "plan": rec.plan, "name": rec.name}))
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    for rec in _store(args).list_keys():
        if rec.revoked_at is not None and not args.all:
            continue
        print(json.dumps({"id": rec.id, "name": rec.name, "plan": rec.plan,
                          "key_prefix": rec.key_prefix, "created_at": rec.created_at,
                          "revoked": rec.revoked_at is not None}))
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    if _store(args).revoke_key(args.key_id):
        print(json.dumps({"id": args.key_id, "revoked": True}))
        return 0
    sys.stderr.write(f"redact keys revoke: no live key {args.key_id!r}\n")
    return 1


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="where jobs and streams run unless they ask otherwise: cuda (an NVIDIA "
                        "GPU, with the [gpu] extra), cpu, or auto: cuda when a usable GPU is "
                        "here (default: $REDACT_DEVICE, else auto)")


def _apply_device(args: argparse.Namespace) -> None:
    """--device becomes the process's default device (engines.gpu reads REDACT_DEVICE);
    cuda that cannot run here stops the command with the reason."""
    device = getattr(args, "device", None)
    if device:
        os.environ["REDACT_DEVICE"] = device
    from engines.gpu import env_device_default, select_device

    select_device(env_device_default())


def _data_dir_option(p: argparse.ArgumentParser, files: bool = True) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="service data directory (default: $REDACT_DATA_DIR, else "
                        "~/.local/share/redact): the SQLite database and, unless --storage, "
                        "the job files")
    p.add_argument("--database", default=None, metavar="URL",
                   help="a PostgreSQL database shared by API replicas and workers on many "
                        "machines, as postgresql://user:password@host:port/name (default: "
                        "$REDACT_DATABASE_URL, else the SQLite file in the data directory); "
                        "needs the [postgres] extra")
    if files:
        p.add_argument("--storage", type=Path, default=None, metavar="DIR",
                       help="directory for uploads, outputs, recordings and the viewer-token "
                            "key, which every API replica and worker must reach at the same "
                            "path (a shared file system) (default: $REDACT_STORAGE, else the "
                            "data directory)")


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the REST API (and, by default, a worker)",
                       description="Run the REST API (docs at /docs) and, unless --no-worker, "
                                   "one worker in the same process: media jobs, webhook "
                                   "deliveries, expiry, live streams. More workers can run "
                                   "beside it as "
                                   "`redact worker` processes on the same data directory, or on "
                                   "other machines sharing --database and --storage. "
                                   "Every setting can also be given as an environment variable "
                                   "REDACT_<NAME>, e.g. REDACT_DATA_DIR.")
    p.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: 8000)")
    p.add_argument("--workers", type=int, default=None,
                   help="jobs the in-process worker redacts at the same time (default: 2)")
    p.add_argument("--no-worker", action="store_true",
                   help="run the API alone (also REDACT_EMBEDDED_WORKER=0): jobs and live "
                        "streams wait for `redact worker` processes, and /readyz is ready only "
                        "while one is alive")
    _stream_options(p)
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML file of cameras started with the service: [[stream]] tables "
                        "with name, source (an rtsp:// URL or \"push\"), categories, method, "
                        "settings (per-category tables: threshold, scale, period, method, "
                        "mask_scale, shape), config (a settings file, as `redact file "
                        "--config`, whose [[model]] detectors the camera may use), zones, "
                        "outputs (rtsp, webrtc, record), device (auto, cpu, cuda)")
    _device_option(p)
    _data_dir_option(p)
    p.set_defaults(func=run_serve)


def _stream_options(p: argparse.ArgumentParser, worker: bool = False) -> None:
    p.add_argument("--rtsp-port", type=int, default=None,
                   help="port of this process's RTSP server for the live streams it runs "
                        "(default: 8554, or $REDACT_RTSP_PORT; 0: any free port)")
    p.add_argument("--advertise-host", default=None, metavar="ADDRESS",
                   help="public address WebRTC viewers reach this machine at, behind a "
                        "one-to-one NAT (default: $REDACT_ICE_ADVERTISED_HOST; STUN/TURN "
                        "servers: $REDACT_ICE_SERVERS)")
    if not worker:
        return
    p.add_argument("--max-streams", type=int, default=None, metavar="N",
                   help="live streams this worker runs at most (default: any number, or "
                        "$REDACT_MAX_STREAMS; 0: none)")
    p.add_argument("--control-host", default=None, metavar="ADDRESS",
                   help="address of the control server the API forwards WHEP offers to "
                        "(default: 127.0.0.1, or $REDACT_CONTROL_HOST); it takes only requests "
                        "signed with the data directory's secret")
    p.add_argument("--control-port", type=int, default=None,
                   help="its port (default: 0, any free port, or $REDACT_CONTROL_PORT)")


def add_worker_parser(sub: Any) -> None:
    p = sub.add_parser(
        "worker", help="run media jobs, webhook deliveries and live streams without the API",
        description="Run the data plane without the API: media-job workers, webhook "
                    "deliveries, expiry of old results, the models, and live streams with "
                    "their RTSP, WebRTC and recording outputs, on the database and files of the "
                    "data directory that `redact serve` (e.g. with --no-worker) also uses, or on "
                    "a PostgreSQL database (--database) and a shared directory (--storage). "
                    "Several workers may run at once, on this machine or others sharing them: "
                    "each job, webhook attempt and live stream is claimed under a "
                    "lease (REDACT_LEASE_S, default 12 s) renewed while it runs, so work a "
                    "killed worker held is taken over by another once the lease runs out, and a "
                    "result is published once. Each worker serves the streams it runs on its "
                    "own RTSP server. Stops cleanly on SIGTERM or Ctrl-C (a job still running "
                    "and every stream are handed back). With REDACT_RAY_ADDRESS set, live "
                    "streams are left to Ray (`redact ray-streams`). Settings as for `redact "
                    "serve`: "
                    "REDACT_<NAME> environment variables.")
    p.add_argument("--workers", type=int, default=None,
                   help="jobs redacted at the same time (default: 2, or $REDACT_WORKERS)")
    _stream_options(p, worker=True)
    _device_option(p)
    _data_dir_option(p)
    p.set_defaults(func=run_worker)


def add_ray_streams_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ray-streams", help="keep the live streams running as actors on a Ray cluster",
        description="Keep every live stream of the database running as a detached actor on a "
                    "Ray cluster (placed by Ray with REDACT_RAY_STREAM_CPUS CPUs each, and "
                    "REDACT_RAY_STREAM_GPUS of a GPU for a cuda stream; restarted by Ray on "
                    "another node when its node dies), and remove the actors of deleted "
                    "streams. Run it on one or more Ray nodes: one leads at a time, chosen "
                    "through the database. After the cluster is lost, the streams are created "
                    "again from the database once a head is back. Workers and API processes "
                    "given the same REDACT_RAY_ADDRESS leave the streams to the actors. Needs "
                    "the [ray] and [postgres] extras.")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the cluster's address, host:port of its head, or auto for this "
                        "node's (default: $REDACT_RAY_ADDRESS)")
    _data_dir_option(p)
    p.set_defaults(func=run_ray_streams)


def add_keys_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys",
                       description="API keys of the REST API (stored hashed in the data dir).")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    c = ks.add_parser("create", help="create a key; prints JSON with the key (shown once)")
    c.add_argument("--name", required=True, help="who or what uses the key")
    c.add_argument("--plan", default="free", choices=PLANS, help="plan (default: free)")
    _data_dir_option(c, files=False)
    c.set_defaults(func=run_keys_create)
    ls = ks.add_parser("list", help="list keys as JSON lines (never the keys themselves)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    _data_dir_option(ls, files=False)
    ls.set_defaults(func=run_keys_list)
    r = ks.add_parser("revoke", help="revoke a key by its id")
    r.add_argument("key_id", help="the key's id (key_...)")
    _data_dir_option(r, files=False)
    r.set_defaults(func=run_keys_revoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redact",
        description="Self-hosted redaction of faces, plates, text and codes in photos and "
                    "videos, from the command line or a REST API.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_file_parser(sub)
    cats = sub.add_parser("categories", help="list the categories, their models and licences")
    cats.set_defaults(func=list_categories)
    add_serve_parser(sub)
    add_worker_parser(sub)
    add_ray_streams_parser(sub)
    add_keys_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING
    if args.verbose:
        level = logging.DEBUG
    elif getattr(args, "command", None) in ("serve", "worker", "ray-streams"):
        level = logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "command", None) in ("serve", "worker"):
        try:
            _apply_device(args)
        except ValueError as exc:
            print(f"redact {args.command}: {exc}", file=sys.stderr)
            return 2
    from pydantic import ValidationError

    from gateway.database import DatabaseUnavailable

    try:
        return int(args.func(args))
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            print(f"redact {args.command}: invalid setting {field} "
                  f"(REDACT_{field.upper()}): {err['msg']}", file=sys.stderr)
        return 2
    except DatabaseUnavailable as exc:
        print(f"redact {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
