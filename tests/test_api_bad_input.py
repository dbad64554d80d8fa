"""Bad input of many kinds never gives a 5xx and leaves the server healthy.

Each case is sent to a real server; rejected ones must be a 4xx with the JSON error shape, and
accepted ones (content that is fine whatever its name or declared type) must end completed or
failed, never stuck or crashed.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.api_support import (
    ApiKeyInfo,
    ThreadServer,
    api_settings,
    error_of,
    face_clip_bytes,
    jpeg_bytes,
    png_bytes,
    png_declaring,
    started,
    wait_job,
)

FACES = {"categories[]": "faces"}
RNG = np.random.default_rng(7)


@dataclass(frozen=True)
class Case:
    send: Callable[[httpx.Client, ApiKeyInfo, Path], httpx.Response]
    expect: tuple[int, ...]  # allowed statuses
    code: str | None = None  # expected error code


def _file(name: str, data: bytes | Callable[[Path], bytes], ctype: str = "application/octet-stream",
          fields: dict[str, str] | None = None) -> Callable[
              [httpx.Client, ApiKeyInfo, Path], httpx.Response]:
    def send(c: httpx.Client, k: ApiKeyInfo, tmp: Path) -> httpx.Response:
        payload = data(tmp) if callable(data) else data
        return c.post("/v1/media", headers=k.headers, files={"file": (name, payload, ctype)},
                      data=FACES if fields is None else fields)
    return send


def _raw(body: bytes, ctype: str) -> Callable[[httpx.Client, ApiKeyInfo, Path], httpx.Response]:
    def send(c: httpx.Client, k: ApiKeyInfo, tmp: Path) -> httpx.Response:
        return c.post("/v1/media", headers={**k.headers, "Content-Type": ctype}, content=body)
    return send


def _clip(tmp: Path, suffix: str = ".mp4") -> bytes:
    data, _ = face_clip_bytes(tmp, n=12, name=f"c{suffix}")
    return data


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt_middle(data: bytes, share: float = 0.3) -> bytes:
    b = bytearray(data)
    start, n = int(len(b) * 0.35), int(len(b) * share)
    b[start:start + n] = RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(b)


def _jpeg_dims(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF marker is rewritten to declare ``width`` x ``height``."""
    data = bytearray(jpeg_bytes())
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def _pil(fmt: str, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _audio_only(tmp: Path, name: str) -> bytes:
    path = tmp / name
    with av.open(str(path), "w") as out:
        a = out.add_stream("aac", rate=48000)
        assert isinstance(a, av.AudioStream)
        a.layout = "mono"
        for i in range(10):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
            f.sample_rate, f.pts = 48000, i * 1024
            out.mux(a.encode(f))
        out.mux(a.encode(None))
    return path.read_bytes()


def _multipart(*parts: bytes, end: bool = True) -> bytes:
    body = b"".join(b"--BB\r\n" + p + b"\r\n" for p in parts)
    return body + (b"--BB--\r\n" if end else b"")


_JPEG_PART = (b'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
              + jpeg_bytes(quality=50))
_MP = "multipart/form-data; boundary=BB"
ACCEPTED_OR_400 = (202, 400)

CASES: dict[str, Case] = {
    "zero bytes .jpg": Case(_file("a.jpg", b""), (400,), "empty_file"),
    "zero bytes .mp4": Case(_file("a.mp4", b"", "video/mp4"), (400,), "empty_file"),
    "random bytes .mp4": Case(_file("a.mp4", RNG.bytes(50_000), "video/mp4"), (400,),
                              "unsupported_media"),
    "random bytes .jpg": Case(_file("a.jpg", RNG.bytes(5_000), "image/jpeg"), (400,),
                              "unsupported_media"),
    "text named .png": Case(_file("a.png", b"just some text\n" * 100), (400,),
                            "unsupported_media"),
    "svg named .jpg": Case(_file("a.jpg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'), (400,),
                           "unsupported_media"),
    "html named .jpg": Case(_file("a.jpg", b"<html><body>hi</body></html>"), (400,),
                            "unsupported_media"),
    "pdf": Case(_file("a.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"), (400,),
                "unsupported_media"),
    "zip named .mp4": Case(_file("a.mp4", b"PK\x03\x04" + RNG.bytes(2000)), (400,),
                           "unsupported_media"),
    "truncated jpeg": Case(_file("a.jpg", _half(jpeg_bytes())), (400,), "unsupported_media"),
    "jpeg header only": Case(_file("a.jpg", jpeg_bytes()[:300]), (400,), "unsupported_media"),
    "corrupt jpeg middle": Case(_file("a.jpg", _corrupt_middle(jpeg_bytes(), 0.05)),
                                ACCEPTED_OR_400),
    "truncated png": Case(_file("a.png", _half(png_bytes())), (400,), "unsupported_media"),
    "gif": Case(_file("a.gif", _pil("GIF")), (400,), "unsupported_media"),
    "bmp named .jpg": Case(_file("a.jpg", _pil("BMP")), (400,), "unsupported_media"),
    "tiff": Case(_file("a.tiff", _pil("TIFF")), (400,), "unsupported_media"),
    "huge png 100000x100000": Case(_file("a.png", png_declaring(100_000, 100_000)), (400,),
                                   "image_too_large"),
    "huge png 9000x9000": Case(_file("a.png", png_declaring(9_000, 9_000)), (400,),
                               "image_too_large"),
    "huge jpeg 65000x65000": Case(_file("a.jpg", _jpeg_dims(65_000, 65_000)), (400,),
                                  "image_too_large"),
    "truncated mp4": Case(_file("a.mp4", lambda t: _half(_clip(t))), (400,),
                          "unsupported_media"),
    "mp4 tail only": Case(_file("a.mp4", lambda t: _clip(t)[len(_clip(t)) // 2:]), (400,),
                          "unsupported_media"),
    "mp4 header only": Case(_file("a.mp4", lambda t: _clip(t)[:100]), (400,),
                            "unsupported_media"),
    "corrupt mp4 middle": Case(_file("a.mp4", lambda t: _corrupt_middle(_clip(t))),
                               ACCEPTED_OR_400),
    "truncated mkv": Case(_file("a.mkv", lambda t: _clip(t, ".mkv")[:3000]), ACCEPTED_OR_400),
    "audio-only m4a named .mp4": Case(_file("a.mp4", lambda t: _audio_only(t, "a.m4a")),
                                      (400,), "unsupported_media"),
    "audio-only mkv": Case(_file("a.mkv", lambda t: _audio_only(t, "a.mka")), (400,),
                           "unsupported_media"),
    "jpeg sent as video/mp4": Case(_file("a.jpg", jpeg_bytes(), "video/mp4"), (202,)),
    "jpeg named .mp4": Case(_file("a.mp4", jpeg_bytes()), (202,)),
    "png named .txt": Case(_file("notes.txt", png_bytes()), (202,)),
    "mp4 named .jpg": Case(_file("a.jpg", lambda t: _clip(t), "image/jpeg"), (202,)),
    "path traversal name": Case(_file("../../../../etc/passwd", jpeg_bytes()), (202,)),
    "windows path name": Case(_file("C:\\Windows\\System32\\evil.jpg", jpeg_bytes()), (202,)),
    "control characters in name": Case(_file("a\x01\x7fb\t.jpg", jpeg_bytes()), (202,)),
    "300-character name": Case(_file("n" * 300 + ".jpg", jpeg_bytes()), (202,)),
    "5000-character name": Case(_file("n" * 5000 + ".jpg", jpeg_bytes()), (400,),
                                "malformed_request"),  # a part header over 4 KB
    "1x1 png": Case(_file("dot.png", _pil("PNG", size=1)), (202,)),
    "json body": Case(_raw(b'{"file": "x"}', "application/json"), (415,),
                      "unsupported_media_type"),
    "urlencoded body": Case(_raw(b"file=abc", "application/x-www-form-urlencoded"), (415,),
                            "unsupported_media_type"),
    "multipart without boundary": Case(_raw(b"abc", "multipart/form-data"), (415,),
                                       "unsupported_media_type"),
    "no file part": Case(_raw(_multipart(
        b'Content-Disposition: form-data; name="categories[]"\r\n\r\nfaces'), _MP), (400,),
        "missing_file"),
    "two file parts": Case(_raw(_multipart(_JPEG_PART, _JPEG_PART), _MP), (400,),
                           "too_many_files"),
    "multipart cut off in the file": Case(_raw(b"--BB\r\n" + _JPEG_PART[:2000], _MP), (400,)),
    "garbage multipart": Case(_raw(RNG.bytes(4000), _MP), (400,)),
    "empty multipart body": Case(_raw(b"", _MP), (400,)),
    "part without a name": Case(_raw(_multipart(
        b'Content-Disposition: form-data; filename="a.jpg"\r\n\r\n' + jpeg_bytes()), _MP),
        (400,), "malformed_request"),
    "field of 20 KB": Case(_file("a.jpg", jpeg_bytes(), fields={"categories[]": "f" * 20_000}),
                           (400,), "field_too_large"),
    "100 fields": Case(_file("a.jpg", jpeg_bytes(),
                             fields={f"x{i}": "1" for i in range(100)}), (400,),
                       "too_many_fields"),
    "non-UTF-8 field": Case(_raw(_multipart(
        b'Content-Disposition: form-data; name="method"\r\n\r\n\xff\xfe', _JPEG_PART), _MP),
        (400,), "malformed_request"),
    "webhook url garbage": Case(_file("a.jpg", jpeg_bytes(),
                                      fields={"webhook_url": "http://exa mple:port/"}),
                                (400,), "invalid_webhook_url"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    yield from started(api_settings(tmp_path_factory.mktemp("bad")))


@pytest.fixture(scope="module")
def key(server: ThreadServer) -> ApiKeyInfo:
    return server.key("scale")


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_there_are_at_least_30_kinds() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_never_a_server_error(name: str, client: httpx.Client, key: ApiKeyInfo,
                                           tmp_path: Path) -> None:
    case = CASES[name]
    r = case.send(client, key, tmp_path)
    assert r.status_code < 500, r.text
    assert r.status_code in case.expect, r.text
    if r.status_code >= 400:
        code = error_of(r)
        if case.code:
            assert code == case.code, r.text
        return
    job = wait_job(client, key, r.json()["id"])
    assert job["status"] in ("completed", "failed")
    if job["status"] == "failed":
        assert job["error"]["code"] and job["error"]["message"]
        assert job["error"]["code"] != "internal_error", job
    name_shown = job["filename"]
    assert "/" not in name_shown and "\\" not in name_shown and len(name_shown) <= 200
    assert all(ch.isprintable() for ch in name_shown)


def test_server_is_healthy_after_the_bad_inputs(server: ThreadServer, client: httpx.Client,
                                                key: ApiKeyInfo) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert list((server.settings.data_dir / "tmp").iterdir()) == []
    outside = [p for p in server.settings.data_dir.parent.rglob("passwd*")]
    assert outside == []
    metrics = client.get("/metrics").text
    assert 'redact_uploads_total{outcome="error"}' not in metrics
    assert 'outcome="internal_error"' not in metrics
    r = client.post("/v1/media", headers=key.headers, data=FACES,
                    files={"file": ("ok.jpg", jpeg_bytes(), "image/jpeg")})
    assert r.status_code == 202
    assert wait_job(client, key, r.json()["id"])["detections"] == {"faces": 1}
