"""Live streams: their definitions, and the streams one process runs.

Definitions live in the store (:mod:`gateway.store`, table ``streams``; the API keeps them, see
:mod:`gateway.stream_catalog`) and are run by workers (:mod:`gateway.stream_runner`), each of
which publishes the streams it claimed on its own RTSP server and to WebRTC viewers through
:class:`StreamManager`. Cameras can be declared in a config file (``redact serve --config
FILE``). Viewer tokens, publish passwords and the signature of requests forwarded to a worker
are derived from one secret in the data directory (:class:`StreamSecrets`), shared by every
process on it.

A stream's definition: ``name`` (also its RTSP path), ``source`` (an ``rtsp://`` URL, which
may carry credentials; they never appear in answers, logs or metrics; or ``"push"``: the camera
publishes to ``rtsp://HOST:PORT/<name>/publish`` with the user name and password of the stream's
``publish_url``), ``categories``, ``method``, ``settings`` (per-category tables as in a settings
file's ``[category.NAME]``: threshold, scale, period, method, mask_scale, shape), ``config``
(cameras file only: a settings file, as ``redact file --config``, whose ``[[model]]`` detectors
the stream may use), ``zones`` (polygons always covered) and ``outputs`` (``rtsp``, ``webrtc``,
``record``: MP4 segments in the data directory, see :mod:`pipeline.record`; as a mapping,
``"record": {"segment_s", "keep_hours", "max_gb"}`` overrides the service's recording settings
for the stream).
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import tomllib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from engines.errors import UnknownCategoryError
from engines.gpu import parse_device
from engines.redact import Method
from pipeline.live import LiveOptions, LiveStream, scrub_url
from pipeline.push import PushFeed
from pipeline.record import NAME_FORMAT, NAME_RE, Segment, SegmentRecorder, probe
from pipeline.settings import FileConfig, RedactSettings, load_config, settings_from_choices
from pipeline.webrtc import IceServer, WebRtcHub

log = logging.getLogger(__name__)

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
OUTPUTS = ("rtsp", "webrtc", "record")
DEFAULT_OUTPUTS = ("rtsp", "webrtc")
RECORD_OPTIONS = {"segment_s": (1.0, 3600.0), "keep_hours": (0.0, 24.0 * 3650),
                  "max_gb": (0.001, 1e6)}


class StreamSettings(BaseSettings):
    """Live-stream settings, from ``REDACT_*`` like the rest (``REDACT_RTSP_PORT=8554``)."""

    model_config = SettingsConfigDict(env_prefix="REDACT_", extra="ignore")

    rtsp_port: int = Field(default=8554, ge=0, le=65535)  # 0: any free port
    rtsp_host: str | None = None  # address the RTSP server listens on (default: --host)
    public_rtsp_host: str | None = None  # host name put in rtsp_url (default: the listen host)
    ice_servers: list[dict[str, Any]] = Field(default_factory=list)  # [{"urls": [...]}, ...]
    ice_advertised_host: str | None = None  # public address behind a one-to-one NAT
    viewer_token_ttl_s: int = Field(default=3600, ge=60)
    stream_delay_frames: int = Field(default=2, ge=0, le=30)
    # recording (outputs "record"): segments under record_dir/<stream id>/
    record_dir: Path | None = None  # default: <data dir>/recordings
    record_segment_s: float = Field(default=60.0, ge=1.0, le=3600.0)
    record_keep_hours: float = Field(default=24.0 * 7, ge=0.0)  # 0: keep until max_gb
    record_max_gb: float = Field(default=10.0, gt=0.0)  # per stream
    # a worker's control server, where the API forwards what needs a running stream (WHEP)
    control_host: str = "127.0.0.1"
    control_port: int = Field(default=0, ge=0, le=65535)  # 0: any free port
    max_streams: int | None = Field(default=None, ge=0)  # streams one worker runs (None: any)


class StreamError(ValueError):
    """A stream definition that cannot be used; the message says why."""


@dataclass
class StreamDef:
    name: str
    source: str
    categories: list[str]
    method: str = "blur"
    zones: list[list[list[float]]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=lambda: list(DEFAULT_OUTPUTS))
    owner: str | None = None  # API key id; None for streams from the config file
    id: str = field(default_factory=lambda: "str_" + uuid.uuid4().hex[:16])
    created_at: float = field(default_factory=time.time)
    record: dict[str, float] = field(default_factory=dict)  # per-stream recording settings
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # per category
    config: str | None = None  # a settings file (absolute path; cameras file only)
    device: str | None = None  # auto | cpu | cuda (None: REDACT_DEVICE, else auto)

    FIELDS = ("name", "source", "categories", "method", "zones", "outputs", "settings",
              "config", "device")
    STORED = (*FIELDS, "record")  # what the store keeps as the definition

    def definition(self) -> dict[str, Any]:
        """The fields the store keeps (id, owner and creation time are columns of their own)."""
        return {k: getattr(self, k) for k in self.STORED}

    @classmethod
    def stored(cls, stream_id: str, owner: str | None, created_at: float,
               definition: dict[str, Any]) -> StreamDef:
        """A definition as the store keeps it (fields it does not know are left out)."""
        known = {k: v for k, v in definition.items() if k in cls.STORED}
        return cls(**known, owner=owner, id=stream_id, created_at=created_at)

    @classmethod
    def parse(cls, data: dict[str, Any], owner: str | None,
              base_dir: Path | None = None) -> StreamDef:
        """Validated definition from user input (API body, or a cameras file's table, whose
        ``config`` path is taken relative to ``base_dir``)."""
        unknown = set(data) - set(cls.FIELDS)
        if unknown:
            raise StreamError(f"unknown field(s): {', '.join(sorted(unknown))}")
        name = str(data.get("name") or "").strip().lower()
        if not NAME.match(name):
            raise StreamError("name: 1-63 lowercase letters, digits, '-' or '_', starting with a "
                              "letter or digit (it becomes the RTSP path)")
        source = str(data.get("source") or "").strip()
        if source != "push" and not source.startswith(("rtsp://", "rtsps://")):
            raise StreamError("source: an rtsp:// URL of the camera, or \"push\" for a camera "
                              "that publishes to the gateway")
        config = None
        if data.get("config") is not None:
            if owner is not None:
                raise StreamError("config: a settings file (with your own models) can only be "
                                  "given in the cameras file of `redact serve --config`; "
                                  "use settings for per-category settings")
            path = Path(str(data["config"])).expanduser()
            config = str((base_dir / path) if base_dir and not path.is_absolute() else path)
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise StreamError("settings: an object of category -> {setting: value}, e.g. "
                              "{\"faces\": {\"threshold\": 0.2}}")
        cats = data.get("categories")
        device = None
        if data.get("device") is not None:
            try:
                device = parse_device(str(data["device"]))
            except ValueError as exc:
                raise StreamError(f"device: {exc}") from None
        spec = cls(name, source, list(cats) if isinstance(cats, list) else [],
                   Method.parse(str(data.get("method") or "blur")).value,
                   parse_zones(data.get("zones") or []), owner=owner,
                   settings={str(k): dict(v) if isinstance(v, dict) else v
                             for k, v in settings.items()}, config=config, device=device)
        spec.outputs, spec.record = parse_outputs(data.get("outputs"))
        spec.categories = list(spec.redact_settings().categories)  # validates the choices
        return spec

    def redact_settings(self, detector_threads: int = 0) -> RedactSettings:
        """The stream's redaction settings (raises StreamError naming what is wrong)."""
        try:
            cfg = load_config(Path(self.config)) if self.config else FileConfig()
            return settings_from_choices(self.categories, method=self.method,
                                         settings=self.settings, config=cfg, zones=self.zones,
                                         threads=detector_threads, device=self.device)
        except UnknownCategoryError:
            raise  # answered with the categories available
        except ValueError as exc:
            raise StreamError(str(exc)) from None


def parse_outputs(outputs: Any) -> tuple[list[str], dict[str, float]]:
    """``outputs`` as a list of names, or a mapping of name -> true/false (``record`` may map
    to its settings); returns the names and the recording settings."""
    record: dict[str, float] = {}
    if outputs is None or outputs == [] or outputs == {}:
        return list(DEFAULT_OUTPUTS), record
    if isinstance(outputs, dict):
        rec = outputs.get("record")
        if isinstance(rec, dict):
            unknown = set(rec) - set(RECORD_OPTIONS)
            if unknown:
                raise StreamError(f"outputs.record: unknown {', '.join(sorted(unknown))}; "
                                  f"available: {', '.join(RECORD_OPTIONS)}")
            for k, v in rec.items():
                lo, hi = RECORD_OPTIONS[k]
                if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                    raise StreamError(f"outputs.record.{k}: a number from {lo:g} to {hi:g}")
                record[k] = float(v)
        names = [k for k, v in outputs.items() if v]
    elif isinstance(outputs, list):
        names = outputs
    else:
        raise StreamError("outputs: a list such as [\"rtsp\", \"webrtc\", \"record\"]")
    bad = [o for o in names if o not in OUTPUTS]
    if bad:
        raise StreamError(f"outputs: unknown {', '.join(map(str, bad))}; available: "
                          f"{', '.join(OUTPUTS)}")
    return [str(o) for o in names], record


def parse_zones(zones: Any) -> list[list[list[float]]]:
    if not isinstance(zones, list):
        raise StreamError("zones: a list of polygons, each a list of [x, y] points")
    out = []
    for i, poly in enumerate(zones):
        try:
            pts = [[float(x), float(y)] for x, y in poly]
        except (TypeError, ValueError):
            raise StreamError(f"zones[{i}]: a list of [x, y] points") from None
        if len(pts) < 3 or len(pts) > 64 or any(v < 0 for p in pts for v in p):
            raise StreamError(f"zones[{i}]: 3 to 64 points, coordinates >= 0 (pixels, or "
                              "fractions of the frame when all are <= 1)")
        out.append(pts)
    return out


@dataclass
class Running:
    spec: StreamDef
    live: LiveStream
    hub: WebRtcHub
    mount: Any = None
    publish: Any = None  # the publish mount of a "push" stream
    recorder: SegmentRecorder | None = None


class StreamSecrets:
    """The data directory's stream secret (``viewer-token.key``, made on first use), shared by
    every process on the directory: viewer tokens, publish passwords, and the signature of the
    requests the API forwards to a worker's control server."""

    HEADER = "X-Redact-Control"
    MAX_SKEW_S = 60

    def __init__(self, data_dir: Path) -> None:
        self._secret = self._load(data_dir)
        self._control = hmac.new(self._secret, b"control", hashlib.sha256).digest()

    @staticmethod
    def _load(data_dir: Path) -> bytes:
        path = data_dir / "viewer-token.key"
        data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # made once, even by processes starting together: link() refuses an existing name
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
            tmp.write_bytes(secrets.token_bytes(32))
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_bytes()

    def publish_password(self, stream_id: str) -> str:
        """The password a camera publishes a push stream with (stable across restarts)."""
        mac = hmac.new(self._secret, f"publish:{stream_id}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode()

    def viewer_token(self, stream_id: str, ttl_s: int) -> tuple[str, float]:
        expires = time.time() + ttl_s
        body = f"{stream_id}.{int(expires)}"
        mac = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()[:18]
        return f"{body}.{base64.urlsafe_b64encode(mac).decode()}", expires

    def check_token(self, stream_id: str, token: str) -> bool:
        try:
            sid, exp, mac = token.rsplit(".", 2)
            expected = hmac.new(self._secret, f"{sid}.{exp}".encode(),
                                hashlib.sha256).digest()[:18]
            return (sid == stream_id and int(exp) >= time.time()
                    and hmac.compare_digest(base64.urlsafe_b64decode(mac), expected))
        except (ValueError, TypeError):
            return False

    def _control_mac(self, t: int, method: str, path: str, body: bytes) -> str:
        msg = f"{t}.{method.upper()}.{path}.".encode() + body
        return hmac.new(self._control, msg, hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str, body: bytes = b"") -> str:
        """The :attr:`HEADER` value of a request to a worker's control server."""
        t = int(time.time())
        return f"t={t},v1={self._control_mac(t, method, path, body)}"

    def verify(self, header: str, method: str, path: str, body: bytes = b"") -> bool:
        try:
            fields = dict(part.split("=", 1) for part in header.split(","))
            t = int(fields["t"])
            if abs(time.time() - t) > self.MAX_SKEW_S:
                return False
            return hmac.compare_digest(fields["v1"], self._control_mac(t, method, path, body))
        except (ValueError, KeyError):
            return False


def rtsp_publish_url(name: str, password: str, host: str, port: int) -> str:
    """Where a "push" camera publishes, with its user name and password."""
    return f"rtsp://{name}:{password}@{host}:{port}/{name}/publish"


def idle_stats() -> dict[str, Any]:
    """The statistics of a stream no worker runs yet."""
    from pipeline.live import StreamStats

    stats = StreamStats().as_dict()
    stats.pop("status")
    return {**stats, "viewers": 0}


class StreamManager:
    """The streams one process runs, each with its outputs (the RTSP server, which starts with
    the first stream that wants it; a :class:`WebRtcHub`; a recorder). A worker's
    :class:`gateway.stream_runner.StreamRunner` launches and stops them as it claims and loses
    them; standing alone, :meth:`start` runs the cameras of ``config_file``."""

    def __init__(self, data_dir: Path, host: str, settings: StreamSettings | None = None,
                 config_file: Path | None = None, detector_threads: int = 0) -> None:
        self.settings = settings or StreamSettings()
        self.detector_threads = detector_threads
        self.data_dir = data_dir
        self.host = host
        self.config_file = config_file
        self._streams: dict[str, Running] = {}
        self._lock = threading.Lock()
        self._rtsp: Any = None
        self.secrets = StreamSecrets(data_dir)

    def start(self) -> None:
        """Run the cameras of the config file (a process running streams on its own)."""
        specs = load_stream_config(self.config_file) if self.config_file is not None else []
        for spec in specs:
            try:
                self.launch(spec)
            except (StreamError, ValueError, OSError) as exc:
                log.error("stream %s not started: %s", spec.name, exc)

    def stop(self) -> None:
        with self._lock:
            running = list(self._streams.values())
            self._streams.clear()
        for r in running:
            self._halt(r)
        if self._rtsp is not None:
            self._rtsp.close()
            self._rtsp = None

    # streams --------------------------------------------------------------------------------
    def rtsp_server(self) -> Any:
        with self._lock:
            if self._rtsp is None:
                from pipeline.rtsp_server import RtspServer

                self._rtsp = RtspServer(self.settings.rtsp_host or self.host,
                                        self.settings.rtsp_port)
            return self._rtsp

    def launch(self, spec: StreamDef) -> Running:
        """Start ``spec`` with its outputs (raises StreamError naming what is wrong)."""
        with self._lock:
            if any(r.spec.name == spec.name for r in self._streams.values()):
                raise StreamError(f"a stream named {spec.name!r} exists")
        feed = PushFeed() if spec.source == "push" else None
        live = LiveStream(spec.name, spec.source, spec.redact_settings(self.detector_threads),
                          LiveOptions(delay_frames=self.settings.stream_delay_frames),
                          feed=feed)
        hub = WebRtcHub(live.request_keyframe,
                        [IceServer(s.get("urls", []), s.get("username"), s.get("credential"))
                         for s in self.settings.ice_servers],
                        self.settings.ice_advertised_host)
        r = Running(spec, live, hub)
        try:
            if feed is not None:
                r.publish = self.rtsp_server().add_publish_mount(
                    spec.name, spec.name, self.publish_password(spec.id), feed)
            if "rtsp" in spec.outputs:
                r.mount = self.rtsp_server().add_mount(spec.name)
                r.mount.on_viewer = live.request_keyframe
                live.add_sink(r.mount.push)
        except Exception:
            if r.mount is not None or r.publish is not None:
                self.rtsp_server().remove_mount(spec.name)
            raise
        if "webrtc" in spec.outputs:
            live.add_sink(hub.push)
        if "record" in spec.outputs:
            r.recorder = self._recorder(spec)
            live.add_sink(r.recorder.push)
        live.start()
        with self._lock:
            self._streams[spec.id] = r
        log.info("stream %s started from %s", spec.name, scrub_url(spec.source))
        return r

    def apply(self, r: Running, spec: StreamDef) -> None:
        """A new version of a running stream's definition: its categories, method, settings
        and zones apply from the next frame (the source and outputs are fixed at creation)."""
        settings = spec.redact_settings(self.detector_threads)
        r.spec = spec
        r.live.update(settings)

    def remove(self, r: Running, delete_recordings: bool = False) -> None:
        """Stop a stream (its WebRTC viewers must have been hung up, from the hub's event
        loop); ``delete_recordings``: its recordings go with it (a deleted stream)."""
        with self._lock:
            self._streams.pop(r.spec.id, None)
        self._halt(r)
        if delete_recordings:
            shutil.rmtree(self.record_dir / r.spec.id, ignore_errors=True)

    def _halt(self, r: Running) -> None:
        if (r.mount is not None or r.publish is not None) and self._rtsp is not None:
            self._rtsp.remove_mount(r.spec.name)
        r.live.stop(timeout=3)
        if r.recorder is not None:
            r.recorder.close()  # the open segment is finished, not lost

    @property
    def record_dir(self) -> Path:
        return record_dir(self.settings, self.data_dir)

    def _recorder(self, spec: StreamDef) -> SegmentRecorder:
        st = self.settings
        keep_h = spec.record.get("keep_hours", st.record_keep_hours)
        return SegmentRecorder(self.record_dir / spec.id,
                               segment_s=spec.record.get("segment_s", st.record_segment_s),
                               keep_s=keep_h * 3600 if keep_h > 0 else None,
                               max_bytes=int(spec.record.get("max_gb", st.record_max_gb) * 1e9))

    def get(self, stream_id: str, owner: str | None = None) -> Running | None:
        r = self._streams.get(stream_id)
        if r is None or (r.spec.owner is not None and owner is not None
                         and r.spec.owner != owner):
            return None
        return r

    def list(self, owner: str | None = None) -> list[Running]:
        return [r for r in list(self._streams.values())
                if r.spec.owner is None or owner is None or r.spec.owner == owner]

    # urls, figures and tokens -----------------------------------------------------------------
    def rtsp_url(self, r: Running) -> str | None:
        if r.mount is None:
            return None
        return f"rtsp://{self.rtsp_host}:{self.rtsp_server().port}/{r.spec.name}"

    @property
    def rtsp_host(self) -> str:
        """The host name put in RTSP URLs."""
        return self.settings.public_rtsp_host or self.settings.rtsp_host or self.host

    def publish_password(self, stream_id: str) -> str:
        return self.secrets.publish_password(stream_id)

    def publish_url(self, r: Running) -> str | None:
        if r.publish is None:
            return None
        return rtsp_publish_url(r.spec.name, self.publish_password(r.spec.id), self.rtsp_host,
                                self.rtsp_server().port)

    def viewer_token(self, stream_id: str, ttl_s: int | None = None) -> tuple[str, float]:
        return self.secrets.viewer_token(stream_id, ttl_s or self.settings.viewer_token_ttl_s)

    def check_token(self, stream_id: str, token: str) -> bool:
        return self.secrets.check_token(stream_id, token)

    def runtime(self, r: Running) -> dict[str, Any]:
        """What a worker records of a running stream for the API: where it is served (the
        RTSP URL, the server's host and port for a publish URL) and its statistics. Never the
        source's credentials, nor the publish password."""
        stats = r.live.stats.as_dict()
        status = stats.pop("status")
        stats["viewers"] = r.hub.viewers + (r.mount.clients if r.mount is not None else 0)
        if r.recorder is not None:
            rec = r.recorder.stats
            stats["recording"] = {k: rec[k] for k in (
                "recording", "segments_written", "packets_dropped", "last_error")}
        if r.publish is not None:
            stats["publisher_connected"] = r.publish.feed.publishing
        port = self._rtsp.port if self._rtsp is not None else None
        return {"status": status, "stats": stats, "rtsp_url": self.rtsp_url(r),
                "rtsp_host": self.rtsp_host, "rtsp_port": port,
                "publish": r.publish is not None}

    def describe(self, r: Running, base_url: str, with_token: bool = True) -> dict[str, Any]:
        """A running stream as the API shows it (from this process's own figures)."""
        rt = self.runtime(r)
        out = describe_definition(r.spec, base_url)
        out.update(status=rt["status"], rtsp_url=rt["rtsp_url"], stats=rt["stats"],
                   publish_url=self.publish_url(r) if with_token else None)
        if with_token and "webrtc" in r.spec.outputs:
            token, _ = self.viewer_token(r.spec.id)
            out["viewer_url"] = f"{base_url}/viewer/{r.spec.id}?token={token}"
        return out


def record_dir(settings: StreamSettings, data_dir: Path) -> Path:
    """Where recordings go: ``<this>/<stream id>/``."""
    return settings.record_dir or data_dir / "recordings"


def describe_definition(spec: StreamDef, base_url: str) -> dict[str, Any]:
    """The API's answer about a stream, without what a running worker adds (status, stats,
    RTSP and publish URLs) or the viewer link."""
    return {
        "id": spec.id, "name": spec.name, "status": "connecting",
        "source": scrub_url(spec.source), "categories": spec.categories,
        "method": spec.method, "settings": spec.settings, "zones": spec.zones,
        "device": spec.device or "auto",
        "outputs": spec.outputs, "rtsp_url": None, "publish_url": None,
        "whep_url": f"{base_url}/v1/streams/{spec.id}/whep"
        if "webrtc" in spec.outputs else None,
        "viewer_url": None,
        "created_at": spec.created_at,
        "stats": idle_stats(),
        "recordings_url": f"{base_url}/v1/streams/{spec.id}/recordings"
        if "record" in spec.outputs else None,
    }


class RecordingIndex:
    """The finished segments of a stream's recording directory, read from the files (any
    process on the data directory can list them, whichever worker records the stream);
    each file's duration is probed once."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def segments(self, directory: Path) -> list[Segment]:
        try:
            paths = [p for p in directory.iterdir() if NAME_RE.match(p.name)]
        except OSError:
            return []
        out = []
        for p in paths:
            try:
                size = p.stat().st_size
            except OSError:
                continue
            with self._lock:
                known = self._known.get(p)
            if known is None or known[0] != size:
                known = (size, probe(p) or 0.0)
                with self._lock:
                    if len(self._known) > 10_000:
                        self._known.clear()
                    self._known[p] = known
            m = NAME_RE.match(p.name)
            assert m is not None
            start = float(calendar.timegm(time.strptime(m.group(1), NAME_FORMAT)))
            out.append((start, int(m.group(2) or 0), Segment(p, start, known[1], size, None)))
        return [seg for *_, seg in sorted(out, key=lambda t: (t[0], t[1], t[2].path.name))]


def load_stream_config(path: Path) -> list[StreamDef]:
    """``[[stream]]`` tables of a TOML file, each a stream definition."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StreamError(f"{path}: {exc}") from None
    tables: Sequence[Any] = data.get("stream", [])
    out = []
    for i, t in enumerate(tables):
        try:
            spec = StreamDef.parse(dict(t), owner=None, base_dir=path.parent)
        except (StreamError, ValueError) as exc:
            raise StreamError(f"{path}: [[stream]] #{i + 1}: {exc}") from None
        spec.id = "str_" + hashlib.sha256(f"config:{spec.name}".encode()).hexdigest()[:16]
        out.append(spec)
    return out


def migrate_streams_file(store: Any, data_dir: Path) -> int:
    """Streams an older release kept in ``<data dir>/streams.json`` go into the store once (the
    file is then renamed ``streams.json.migrated``); returns how many were added. Safe to run
    from several processes at once."""
    path = data_dir / "streams.json"
    try:
        defs = json.loads(path.read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.error("%s not migrated: %s", path, exc)
        return 0
    added = 0
    for d in defs if isinstance(defs, list) else []:
        try:
            spec = StreamDef(**d)
        except TypeError as exc:
            log.warning("skipping a saved stream: %s", exc)
            continue
        if store.insert_stream(stream_id=spec.id, name=spec.name, owner=spec.owner,
                               definition=spec.definition(), now=spec.created_at):
            added += 1
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, path.with_name("streams.json.migrated"))
    log.info("%d stream(s) of %s moved into the store", added, path)
    return added
