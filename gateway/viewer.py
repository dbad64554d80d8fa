"""The viewer page: plain HTML and JavaScript that plays a stream over WebRTC (WHEP) and shows
its statistics. No build step, no external script."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__ - redaction gateway</title>
<style>
 body { margin: 0; background: #111; color: #ddd; font: 14px system-ui, sans-serif; }
 header { padding: 8px 12px; display: flex; gap: 16px; align-items: baseline; }
 h1 { font-size: 16px; margin: 0; }
 video { display: block; width: 100%; max-height: calc(100vh - 80px); background: #000; }
 #stats { padding: 6px 12px; color: #aaa; }
 .bad { color: #f77; }
</style>
</head>
<body>
<header><h1>__TITLE__</h1><span id="state">connecting...</span></header>
<video id="video" autoplay muted playsinline></video>
<div id="stats"></div>
<script>
const CONFIG = __CONFIG__;
const video = document.getElementById("video");
const state = document.getElementById("state");
const stats = document.getElementById("stats");
let pc = null, session = null, retry = 1000;

function q(url) { return url + "?token=" + encodeURIComponent(CONFIG.token); }

async function connect() {
  pc = new RTCPeerConnection({ iceServers: CONFIG.iceServers });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (e) => { video.srcObject = e.streams[0] || new MediaStream([e.track]); };
  pc.onconnectionstatechange = () => {
    state.textContent = pc.connectionState;
    if (pc.connectionState === "failed" || pc.connectionState === "disconnected") reconnect();
  };
  await pc.setLocalDescription(await pc.createOffer());
  // no trickle ICE: wait for the candidates, but not for the slowest of them (complete, or
  // 250 ms after the first host candidate, or 2 s at most)
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    const t = setTimeout(done, 2000);
    const finish = () => { clearTimeout(t); done(); };
    pc.onicecandidate = (e) => { if (e.candidate) setTimeout(finish, 250); else finish(); };
    pc.onicegatheringstatechange = () => {
      if (pc.iceGatheringState === "complete") finish();
    };
  });
  const r = await fetch(q(CONFIG.whep), { method: "POST",
    headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp });
  if (r.status !== 201) throw new Error("WHEP answered " + r.status);
  session = r.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
  retry = 1000;
}

function reconnect() {
  if (pc) { pc.close(); pc = null; }
  state.textContent = "reconnecting...";
  setTimeout(() => connect().catch(fail), retry);
  retry = Math.min(retry * 2, 10000);
}

function fail(e) { state.textContent = String(e); state.className = "bad"; reconnect(); }

async function poll() {
  try {
    const r = await fetch(q(CONFIG.stats));
    if (r.ok) {
      const d = await r.json(), s = d.stats;
      stats.textContent = `${d.status} - in ${s.input_fps} fps, out ${s.output_fps} fps, ` +
        `latency p50 ${s.latency_ms_p50} ms / p95 ${s.latency_ms_p95} ms, ` +
        `${s.frames_redacted} frames redacted, ` +
        `${s.detector_calls_per_frame} detector calls/frame, ` +
        `${s.reconnects} reconnects, ${s.viewers} viewers`;
    }
  } catch (e) { /* the page keeps playing */ }
  setTimeout(poll, 2000);
}

window.addEventListener("beforeunload", () => {
  if (session) fetch(q(session), { method: "DELETE", keepalive: true });
});
connect().catch(fail);
poll();
</script>
</body>
</html>
"""


def viewer_page(name: str, whep_path: str, stats_path: str, token: str,
                ice_servers: Sequence[dict[str, Any]] = ()) -> str:
    """The viewer page; ``ice_servers`` (the service's STUN/TURN servers, as RTCIceServer
    dictionaries) are given to the browser too, so a viewer behind NAT can use them."""
    config = json.dumps({"whep": whep_path, "stats": stats_path, "token": token,
                         "iceServers": list(ice_servers)})
    # the JSON goes inside a <script>: keep "</" out of it
    config = config.replace("</", "<\\/")
    return _PAGE.replace("__TITLE__", html.escape(name)).replace("__CONFIG__", config)


STREAMS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Streams - redaction gateway</title>
<style>
 body { margin: 0; padding: 12px; background: #111; color: #ddd; font: 14px system-ui, sans-serif; }
 table { border-collapse: collapse; margin-top: 12px; }
 td, th { padding: 4px 10px; border-bottom: 1px solid #333; text-align: left; }
 a { color: #8cf; } input { width: 28em; }
</style>
</head>
<body>
<h1>Live streams</h1>
<form id="f"><label>API key <input id="k" type="password" autocomplete="off"></label>
<button>Show</button></form>
<table id="t" hidden><thead><tr><th>name</th><th>status</th><th>in / out fps</th>
<th>latency p50</th><th>viewers</th><th>watch</th><th>RTSP</th><th>source</th><th>recording</th>
</tr></thead><tbody></tbody></table>
<p id="e"></p>
<script>
const f = document.getElementById("f"), k = document.getElementById("k");
const t = document.getElementById("t"), e = document.getElementById("e");
k.value = sessionStorage.getItem("redact-key") || "";
function cell(row, text, href) {
  const td = row.insertCell();
  if (href) { const a = document.createElement("a"); a.href = href; a.textContent = text;
    td.appendChild(a); } else { td.textContent = text; }
}
async function load() {
  const r = await fetch("/v1/streams", { headers: { Authorization: "Bearer " + k.value } });
  if (!r.ok) { e.textContent = (await r.json()).error.message; t.hidden = true; return; }
  e.textContent = "";
  const body = t.tBodies[0]; body.innerHTML = "";
  for (const s of (await r.json()).data) {
    const row = body.insertRow(), st = s.stats;
    cell(row, s.name); cell(row, s.status);
    cell(row, st.input_fps + " / " + st.output_fps);
    cell(row, st.latency_ms_p50 === null ? "-" : st.latency_ms_p50 + " ms");
    cell(row, String(st.viewers));
    cell(row, s.viewer_url ? "viewer" : "-", s.viewer_url);
    cell(row, s.rtsp_url || "-");
    // a push stream shows where its camera publishes (the key holder sees the password)
    cell(row, s.publish_url || s.source);
    const rec = st.recording;
    cell(row, rec ? (rec.recording ? "on" : "off") + ", " + rec.segments_written + " segments" +
         (rec.last_error ? " (" + rec.last_error + ")" : "") : "-");
  }
  t.hidden = false;
}
f.onsubmit = (ev) => {
  ev.preventDefault(); sessionStorage.setItem("redact-key", k.value); load();
};
if (k.value) load();
setInterval(() => { if (!t.hidden) load(); }, 3000);
</script>
</body>
</html>
"""
