"""Live streams inside the service: each camera's :class:`pipeline.live.LiveStream`, published on
the service's RTSP server and to WebRTC viewers, with definitions kept on disk so they come back
after a restart, and cameras declared in a config file (``redact serve --config FILE``). A
stream's definition: ``name`` (also its RTSP path), ``source`` (an ``rtsp://`` URL, which may
carry credentials; they never appear in answers, logs or metrics; or ``"push"``: the camera
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from engines.errors import UnknownCategoryError
from engines.redact import Method
from pipeline.live import LiveOptions, LiveStream, scrub_url
from pipeline.push import PushFeed
from pipeline.record import SegmentRecorder
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

    FIELDS = ("name", "source", "categories", "method", "zones", "outputs", "settings",
              "config")

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
        spec = cls(name, source, list(cats) if isinstance(cats, list) else [],
                   Method.parse(str(data.get("method") or "blur")).value,
                   parse_zones(data.get("zones") or []), owner=owner,
                   settings={str(k): dict(v) if isinstance(v, dict) else v
                             for k, v in settings.items()}, config=config)
        spec.outputs, spec.record = parse_outputs(data.get("outputs"))
        spec.categories = list(spec.redact_settings().categories)  # validates the choices
        return spec

    def redact_settings(self, detector_threads: int = 0) -> RedactSettings:
        """The stream's redaction settings (raises StreamError naming what is wrong)."""
        try:
            cfg = load_config(Path(self.config)) if self.config else FileConfig()
            return settings_from_choices(self.categories, method=self.method,
                                         settings=self.settings, config=cfg, zones=self.zones,
                                         threads=detector_threads)
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


class StreamManager:
    """The service's streams. Start/stop with the service; the RTSP server starts with the
    first stream that wants it."""

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
        self._secret = self._load_secret()

    # persistence ----------------------------------------------------------------------------
    @property
    def _file(self) -> Path:
        return self.data_dir / "streams.json"

    def _load_secret(self) -> bytes:
        path = self.data_dir / "viewer-token.key"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(secrets.token_bytes(32))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        return path.read_bytes()

    def _save(self) -> None:
        defs = [asdict(r.spec) for r in self._streams.values() if r.spec.owner is not None]
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps(defs))
        os.chmod(tmp, 0o600)  # the sources may hold camera credentials
        os.replace(tmp, self._file)

    def start(self) -> None:
        specs: list[StreamDef] = []
        if self.config_file is not None:
            specs += load_stream_config(self.config_file)
        if self._file.exists():
            for d in json.loads(self._file.read_text()):
                try:
                    specs.append(StreamDef(**d))
                except TypeError as exc:
                    log.warning("skipping a saved stream: %s", exc)
        for spec in specs:
            try:
                self._launch(spec)
            except (StreamError, ValueError, OSError) as exc:
                log.error("stream %s not started: %s", spec.name, exc)

    def stop(self) -> None:
        with self._lock:
            running = list(self._streams.values())
            self._streams.clear()
        for r in running:
            r.live.stop(timeout=3)
            if r.recorder is not None:
                r.recorder.close()  # the open segment is finished, not lost
        if self._rtsp is not None:
            self._rtsp.close()
            self._rtsp = None

    # streams --------------------------------------------------------------------------------
    def rtsp_server(self) -> Any:
        if self._rtsp is None:
            from pipeline.rtsp_server import RtspServer

            self._rtsp = RtspServer(self.settings.rtsp_host or self.host, self.settings.rtsp_port)
        return self._rtsp

    def create(self, data: dict[str, Any], owner: str) -> Running:
        spec = StreamDef.parse(data, owner)
        r = self._launch(spec)
        with self._lock:
            self._save()
        return r

    def _launch(self, spec: StreamDef) -> Running:
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
        if feed is not None:
            r.publish = self.rtsp_server().add_publish_mount(
                spec.name, spec.name, self.publish_password(spec.id), feed)
        if "rtsp" in spec.outputs:
            r.mount = self.rtsp_server().add_mount(spec.name)
            r.mount.on_viewer = live.request_keyframe
            live.add_sink(r.mount.push)
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

    @property
    def record_dir(self) -> Path:
        return self.settings.record_dir or self.data_dir / "recordings"

    def _recorder(self, spec: StreamDef) -> SegmentRecorder:
        st = self.settings
        keep_h = spec.record.get("keep_hours", st.record_keep_hours)
        return SegmentRecorder(self.record_dir / spec.id,
                               segment_s=spec.record.get("segment_s", st.record_segment_s),
                               keep_s=keep_h * 3600 if keep_h > 0 else None,
                               max_bytes=int(spec.record.get("max_gb", st.record_max_gb) * 1e9))

    def get(self, stream_id: str, owner: str | None) -> Running | None:
        r = self._streams.get(stream_id)
        if r is None or (r.spec.owner is not None and owner is not None
                         and r.spec.owner != owner):
            return None
        return r

    def list(self, owner: str | None) -> list[Running]:
        return [r for r in self._streams.values()
                if r.spec.owner is None or owner is None or r.spec.owner == owner]

    def update(self, r: Running, data: dict[str, Any]) -> None:
        changeable = ("categories", "method", "zones", "settings")
        unknown = set(data) - set(changeable)
        if unknown:
            raise StreamError(f"only {', '.join(changeable)} can change; not "
                              f"{', '.join(sorted(unknown))}")
        old = r.spec
        merged = {"name": old.name, "source": old.source, "categories": old.categories,
                  "method": old.method, "zones": old.zones, "settings": old.settings,
                  "config": old.config, **data}
        new = StreamDef.parse(merged, owner=None)  # validates every choice before any applies
        old.categories, old.method, old.zones, old.settings = (
            new.categories, new.method, new.zones, new.settings)
        r.live.update(old.redact_settings(self.detector_threads))
        with self._lock:
            self._save()

    async def delete(self, r: Running) -> None:
        with self._lock:
            self._streams.pop(r.spec.id, None)
            self._save()
        await r.hub.close()
        if r.mount is not None or r.publish is not None:
            self.rtsp_server().remove_mount(r.spec.name)
        r.live.stop(timeout=3)
        if r.recorder is not None:
            r.recorder.close()
            # a deleted stream's recordings go with it (nothing kept that no one can reach)
            shutil.rmtree(r.recorder.directory, ignore_errors=True)

    # urls and viewer tokens -------------------------------------------------------------------
    def rtsp_url(self, r: Running) -> str | None:
        if r.mount is None:
            return None
        return f"rtsp://{self._rtsp_host()}:{self.rtsp_server().port}/{r.spec.name}"

    def _rtsp_host(self) -> str:
        return self.settings.public_rtsp_host or self.settings.rtsp_host or self.host

    def publish_password(self, stream_id: str) -> str:
        """The password a camera publishes a push stream with (stable across restarts)."""
        mac = hmac.new(self._secret, f"publish:{stream_id}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode()

    def publish_url(self, r: Running) -> str | None:
        """Where a "push" camera publishes, with its user name and password."""
        if r.publish is None:
            return None
        return (f"rtsp://{r.spec.name}:{self.publish_password(r.spec.id)}@{self._rtsp_host()}:"
                f"{self.rtsp_server().port}/{r.spec.name}/publish")

    def viewer_token(self, stream_id: str, ttl_s: int | None = None) -> tuple[str, float]:
        expires = time.time() + (ttl_s or self.settings.viewer_token_ttl_s)
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

    def describe(self, r: Running, base_url: str, with_token: bool = True) -> dict[str, Any]:
        stats = r.live.stats.as_dict()
        viewers = r.hub.viewers + (r.mount.clients if r.mount is not None else 0)
        out: dict[str, Any] = {
            "id": r.spec.id, "name": r.spec.name, "status": stats.pop("status"),
            "source": scrub_url(r.spec.source), "categories": r.spec.categories,
            "method": r.spec.method, "settings": r.spec.settings, "zones": r.spec.zones,
            "outputs": r.spec.outputs,
            "rtsp_url": self.rtsp_url(r),
            "publish_url": self.publish_url(r) if with_token else None,
            "whep_url": f"{base_url}/v1/streams/{r.spec.id}/whep"
            if "webrtc" in r.spec.outputs else None,
            "viewer_url": None,
            "created_at": r.spec.created_at,
            "stats": {**stats, "viewers": viewers},
            "recordings_url": f"{base_url}/v1/streams/{r.spec.id}/recordings"
            if r.recorder is not None else None,
        }
        if r.recorder is not None:
            rec = r.recorder.stats
            out["stats"]["recording"] = {k: rec[k] for k in (
                "recording", "segments_written", "packets_dropped", "last_error")}
        if r.publish is not None:
            out["stats"]["publisher_connected"] = r.publish.feed.publishing
        if with_token and "webrtc" in r.spec.outputs:
            token, _ = self.viewer_token(r.spec.id)
            out["viewer_url"] = f"{base_url}/viewer/{r.spec.id}?token={token}"
        return out


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
