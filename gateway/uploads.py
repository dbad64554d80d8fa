"""Receiving an upload: the multipart body is parsed as it streams in, the file part goes
straight to a temporary file and the size cap is enforced on the way (413 without reading or
holding the rest), then the content is inspected (kind by probing, declared dimensions before
any pixel is decoded, a first frame or the image decoded).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import av
from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from engines.errors import MediaError
from gateway.errors import ApiError
from pipeline.files import VIDEO_EXTENSIONS, probe_kind
from pipeline.video import is_video_container

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

FORM_OVERHEAD_BYTES = 1024 * 1024  # room for the form's other fields and part headers
IMAGE_EXT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp"}
DECODE_CHECK_MAX_PIXELS = 16_000_000  # PNG/WebP larger than this are checked, not decoded
FIRST_FRAME_PACKETS = 300  # a video must give a frame within this many packets
MAX_FILENAME = 200


@dataclass
class Upload:
    """A received multipart form: text fields (repeatable) and the file part, on disk."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    path: Path | None = None
    filename: str = ""
    size: int = 0

    def values(self, *names: str) -> list[str]:
        """Every value of the given field names, comma-separated ones split."""
        out: list[str] = []
        for n in names:
            for v in self.fields.get(n, []):
                out.extend(p.strip() for p in v.split(",") if p.strip())
        return out

    def first(self, *names: str) -> str | None:
        for n in names:
            for v in self.fields.get(n, []):
                if v.strip():
                    return v.strip()
        return None

    def discard(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None


@dataclass(frozen=True)
class Inspected:
    """What the content of an upload is."""

    kind: str  # "image" or "video"
    ext: str  # the extension the job's files get (from the content, not the name)
    width: int
    height: int
    seconds: float  # video duration (0 for images)


def safe_filename(raw: str) -> str:
    """A display name from a client's file name: the last path part, printable, bounded.
    It is only ever shown, never used as a path."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    name = "".join(c for c in name if c.isprintable() and c not in '"<>|:*?')
    name = re.sub(r"\s+", " ", name).strip(" .")
    return name[:MAX_FILENAME] or "upload"


class _Receiver:
    """python-multipart callbacks writing the ``file`` part to disk and keeping text fields."""

    def __init__(self, upload: Upload, tmp_dir: Path, max_file_bytes: int, max_fields: int,
                 max_field_bytes: int) -> None:
        self.upload = upload
        self.tmp_dir = tmp_dir
        self.max_file_bytes = max_file_bytes
        self.max_fields = max_fields
        self.max_field_bytes = max_field_bytes
        self.error: ApiError | None = None
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part_name: str | None = None
        self._is_file = False
        self._value = bytearray()
        self._file: IO[bytes] | None = None
        self._fields = 0

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self.part_begin, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished}

    def fail(self, error: ApiError) -> None:
        if self.error is None:
            self.error = error

    def part_begin(self) -> None:
        self._headers = {}
        self._part_name = None
        self._is_file = False
        self._value = bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name, self._header_value = b"", b""

    def headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition",
                                                                     b""))
        name = params.get(b"name")
        if disposition != b"form-data" or name is None:
            self.fail(ApiError(400, "malformed_request",
                               "a form part has no Content-Disposition name"))
            return
        self._part_name = name.decode("utf-8", "replace")
        if self._part_name == "file":
            if self.upload.path is not None or self._file is not None:
                self.fail(ApiError(400, "too_many_files", "send one file per request"))
                return
            self._is_file = True
            self.upload.filename = safe_filename(
                params.get(b"filename", b"").decode("utf-8", "replace"))
            path = self.tmp_dir / f"upload-{secrets.token_hex(8)}"
            self._file = open(path, "wb")  # noqa: SIM115 - closed in part_end / close
            self.upload.path = path
        else:
            self._fields += 1
            if self._fields > self.max_fields:
                self.fail(ApiError(400, "too_many_fields",
                                   f"more than {self.max_fields} form fields"))

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        n = end - start
        if self._is_file and self._file is not None:
            self.upload.size += n
            if self.upload.size > self.max_file_bytes:
                self.fail(ApiError(413, "file_too_large",
                                   f"the file is larger than this plan's upload limit of "
                                   f"{self.max_file_bytes} bytes"))
                return
            self._file.write(data[start:end])
        elif self._part_name is not None:
            if len(self._value) + n > self.max_field_bytes:
                self.fail(ApiError(400, "field_too_large",
                                   f"form field {self._part_name[:40]!r} is longer than "
                                   f"{self.max_field_bytes} bytes"))
                return
            self._value += data[start:end]

    def part_end(self) -> None:
        if self._is_file:
            self.close()
        elif self._part_name is not None and self.error is None:
            try:
                text = self._value.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(ApiError(400, "malformed_request",
                                   f"form field {self._part_name[:40]!r} is not UTF-8"))
                return
            self.upload.fields.setdefault(self._part_name, []).append(text)
        self._is_file = False
        self._part_name = None

    def close(self) -> None:
        """Close the file part (flushed to disk later, off the event loop: see _sync)."""
        if self._file is not None:
            f, self._file = self._file, None
            f.close()


def _sync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


async def receive_upload(request: Request, tmp_dir: Path, max_file_bytes: int, max_fields: int,
                         max_field_bytes: int) -> Upload:
    """Read a ``multipart/form-data`` body as it streams; ApiError (400, 413, 415) on a bad one.

    The whole body is never held: the file part is written to ``tmp_dir`` chunk by chunk, and
    a declared or counted size over ``max_file_bytes`` stops reading at once. The file is
    flushed to disk (fsync) before this returns.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type",
                       "send the file as multipart/form-data with a 'file' part")
    max_body = max_file_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, "malformed_request", "invalid Content-Length") from None
        if length > max_body:
            raise ApiError(413, "file_too_large",
                           f"the request ({length} bytes) is larger than this plan's upload "
                           f"limit of {max_file_bytes} bytes")
    upload = Upload()
    receiver = _Receiver(upload, tmp_dir, max_file_bytes, max_fields, max_field_bytes)
    try:
        parser = MultipartParser(boundary, receiver.callbacks(), max_header_count=16)
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body:
                receiver.fail(ApiError(413, "file_too_large",
                                       f"the request is larger than this plan's upload limit "
                                       f"of {max_file_bytes} bytes"))
            if receiver.error is None:
                parser.write(chunk)
            if receiver.error is not None:
                raise receiver.error
        parser.finalize()
        if receiver.error is not None:
            raise receiver.error
    except FormParserError as exc:
        upload.discard()
        raise ApiError(400, "malformed_request", f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        upload.discard()
        raise ApiError(400, "client_disconnected", "the upload was cut off") from None
    except BaseException:
        upload.discard()
        raise
    finally:
        receiver.close()
    if receiver._is_file:  # the body ended inside the file part
        upload.discard()
        raise ApiError(400, "malformed_request", "the multipart body ends inside the file part")
    if upload.path is not None:
        try:  # on disk before anything is accepted, without holding up other requests
            await run_in_threadpool(_sync, upload.path)
        except BaseException:
            upload.discard()
            raise
    return upload


def inspect_upload(path: Path, filename: str, max_image_pixels: int,
                   max_video_pixels: int) -> Inspected:
    """Judge an uploaded file by its content; ApiError 400 when it cannot be redacted.

    Declared image dimensions are read from the header and checked before anything is
    decoded; images are then decoded (JPEG at 1/8 scale), videos until their first frame.
    """
    if path.stat().st_size == 0:
        raise ApiError(400, "empty_file", "the file is empty")
    image_format = _check_image_header(path, max_image_pixels)
    try:
        kind = probe_kind(path)
    except MediaError:
        raise ApiError(400, "unsupported_media",
                       "not a supported image (JPEG, PNG, WebP) or video (MP4, MOV, MKV, "
                       "WebM, AVI, TS)") from None
    if kind == "image":
        w, h = _check_image_decodes(path, image_format)
        return Inspected("image", IMAGE_EXT.get(image_format or "", ".jpg"), w, h, 0.0)
    return _inspect_video(path, filename, max_video_pixels)


def _check_image_header(path: Path, max_pixels: int) -> str | None:
    """The image format when ``path`` is an image; 400 when its declared size is too large."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
    except Image.DecompressionBombError:
        raise ApiError(400, "image_too_large",
                       f"the image's declared size exceeds {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        return None
    if w * h > max_pixels:
        raise ApiError(400, "image_too_large",
                       f"the image is {w}x{h}, more than {max_pixels} pixels")
    if w <= 0 or h <= 0:
        raise ApiError(400, "unsupported_media", "the image has no pixels")
    return fmt


def _check_image_decodes(path: Path, fmt: str | None) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            w, h = im.size
            if fmt in ("JPEG", "MPO"):
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
            elif w * h <= DECODE_CHECK_MAX_PIXELS:
                im.load()
            else:
                im.verify()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ApiError(400, "unsupported_media",
                       f"the image cannot be decoded: {exc}"[:300]) from None
    return w, h


def _video_ext(format_name: str, filename: str) -> str:
    family = format_name.split(",")[0]
    suffix = Path(filename).suffix.lower()
    if family == "mov":
        return suffix if suffix in (".mp4", ".mov", ".m4v") else ".mp4"
    if family == "matroska":
        return suffix if suffix in (".mkv", ".webm") else ".mkv"
    if family == "avi":
        return ".avi"
    if family == "mpegts":
        return ".ts"
    return suffix if suffix in VIDEO_EXTENSIONS else ".mp4"


def _inspect_video(path: Path, filename: str, max_pixels: int) -> Inspected:
    try:
        with av.open(str(path)) as c:
            if not c.streams.video or not is_video_container(c.format.name):
                raise ApiError(400, "unsupported_media", "no video stream")
            vs = c.streams.video[0]
            w, h = vs.codec_context.width, vs.codec_context.height
            if w <= 0 or h <= 0:
                raise ApiError(400, "unsupported_media", "the video has no frame size")
            if w * h > max_pixels:
                raise ApiError(400, "video_too_large",
                               f"the video is {w}x{h}, more than {max_pixels} pixels a frame")
            seconds = 0.0
            if c.duration:
                seconds = c.duration / 1_000_000
            elif vs.duration and vs.time_base:
                seconds = float(vs.duration * vs.time_base)
            got_frame = False
            last_pts = 0.0
            for i, packet in enumerate(c.demux(vs)):
                if packet.pts is not None and packet.time_base:
                    last_pts = max(last_pts, float(packet.pts * packet.time_base))
                if not got_frame:
                    got_frame = bool(packet.decode())
                    if not got_frame and i >= FIRST_FRAME_PACKETS:
                        break
                elif seconds > 0:
                    break
            if not got_frame:
                raise ApiError(400, "unsupported_media", "no video frame could be decoded")
            fmt = c.format.name
    except ApiError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise ApiError(400, "unsupported_media",
                       f"the video cannot be decoded: {exc}"[:300]) from None
    return Inspected("video", _video_ext(fmt, filename), w, h, max(seconds, last_pts))
