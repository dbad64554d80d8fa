"""Inside a network namespace (tests/netns.py): a camera (own process) -> ``redact serve``'s app
-> headless Chromium on the viewer page over WebRTC (WHEP). Prints one JSON line: time from page
load to the first decoded frame, whether the face is covered in a captured frame, the
gateway process's CPU with one and with three viewers, and the stream's row on the /streams
page."""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from gateway.settings import Settings
from tests.api_support import ThreadServer, free_port
from tests.conftest import fill_fraction, region
from tests.live_helpers import Camera, read_stamp

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--allow-loopback-in-peer-connection",
                 "--autoplay-policy=no-user-gesture-required",
                 "--disable-features=WebRtcHideLocalIpsWithMdns"]

FIRST_FRAME_JS = "() => { const v = document.querySelector('video'); " \
                 "return v && v.readyState >= 2 && v.currentTime > 0 && v.videoWidth > 0; }"
CAPTURE_JS = """() => { const v = document.querySelector('video');
  const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
  c.getContext('2d').drawImage(v, 0, 0); return c.toDataURL('image/png'); }"""


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    port = free_port()
    cam_proc = subprocess.Popen([sys.executable, "-m", "tests.live_helpers", str(port)],
                                stdout=subprocess.PIPE, text=True)
    assert cam_proc.stdout is not None
    cam_url = cam_proc.stdout.readline().strip()
    camera = Camera()  # the same clip, to know where the face is on each stamped frame
    os.environ["REDACT_RTSP_PORT"] = "0"
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        srv = ThreadServer(Settings(data_dir=Path(tmp), workers=1)).start()
        try:
            key = srv.key()
            with httpx.Client(base_url=srv.url, timeout=30, headers=key.headers) as c:
                s = c.post("/v1/streams", json={"name": "cam", "source": cam_url,
                                                "categories": ["faces"], "method": "fill"}).json()
                end = time.monotonic() + 20
                while c.get(f"/v1/streams/{s['id']}").json()["status"] != "live":
                    assert time.monotonic() < end, "stream never went live"
                    time.sleep(0.2)
                time.sleep(1.0)  # past the start-up placeholder
                with sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                                 args=CHROMIUM_ARGS)
                    pages = []
                    page = browser.new_page()
                    t0 = time.monotonic()
                    page.goto(s["viewer_url"])
                    page.wait_for_function(FIRST_FRAME_JS, timeout=15000, polling=20)
                    out["first_frame_s"] = round(time.monotonic() - t0, 3)
                    pages.append(page)
                    time.sleep(1.0)
                    shot = page.evaluate(CAPTURE_JS)
                    png = base64.b64decode(shot.split(",", 1)[1])
                    px = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
                    assert px is not None, "the captured frame is not a PNG"
                    n = read_stamp(px)
                    out["captured_frame"] = n
                    out["face_covered"] = round(fill_fraction(
                        region(px, camera.face(n)), (0, 0, 0), tol=40), 3)
                    # gateway CPU with one viewer, then with three
                    cpu = {}
                    for viewers in (1, 3):
                        while len(pages) < viewers:
                            p = browser.new_page()
                            p.goto(s["viewer_url"])
                            p.wait_for_function(FIRST_FRAME_JS, timeout=15000, polling=50)
                            pages.append(p)
                        time.sleep(1.0)
                        c0, w0 = _cpu(), time.monotonic()
                        time.sleep(6.0)
                        cpu[viewers] = (_cpu() - c0) / (time.monotonic() - w0)
                    st = c.get(f"/v1/streams/{s['id']}").json()["stats"]
                    out["viewers_reported"] = st["viewers"]
                    out["cpu_one_viewer"] = round(cpu[1], 3)
                    out["cpu_three_viewers"] = round(cpu[3], 3)
                    out["cpu_ratio"] = round(cpu[3] / cpu[1], 3)
                    # the streams page: the key typed in, the stream's row shown
                    listing = browser.new_page()
                    listing.goto(srv.url + "/streams")
                    listing.fill("#k", key.key)
                    listing.click("button")
                    listing.wait_for_selector("#t tbody tr", timeout=10000)
                    out["streams_page_row"] = listing.eval_on_selector_all(
                        "#t tbody tr td", "tds => tds.map(td => td.textContent)")
                    browser.close()
        finally:
            srv.stop()
            cam_proc.terminate()
            cam_proc.wait(10)
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
