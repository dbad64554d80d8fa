"""Flash-through benchmark: faces the normal video pipeline leaves uncovered.

For each clip the normal pipeline runs (the detector on a subset of frames, the tracker carrying
boxes in between and backward through the look-ahead buffer). The region it covered on each
frame is rebuilt from the recorded boxes by :func:`engines.redact.redact_boxes` itself (solid fill,
same shape and mask scale), so it follows the library's geometry: box grown by the mask scale
about its centre and rounded outward, with the ellipse shape only the inscribed ellipse except
for tiny boxes and boxes cut by the frame border. Then the same detector runs on *every* frame
("full effort"): a full-effort box that has less than ``--min-covered`` (90%) of its area inside
that frame's covered region was left uncovered for that frame, a flash-through.

Full effort is the reference, not ground truth: a face the detector never finds is not counted,
and a spurious full-effort box counts as a leak. Each leak is sorted by what went wrong:

- ``start``:  before the pipeline's detector first found the face (the first frames of a track:
              the box carried backward through the look-ahead missed it, or did not reach);
- ``motion``: between two frames where the pipeline's detector found the face, and the covered
              region overlaps it only in part (the carried box did not follow fast or uneven
              motion, or a change of size);
- ``gap``:    between two such frames, with nothing covering it (the detector missed the face on
              its frames in between and the track coasted out, or matched another face);
- ``end``:    after the pipeline's detector last found the face (the track coasted out, or was
              not carried, while the face was still there);
- ``never``:  the pipeline's detector never found this face on the frames it ran on: mostly
              low-score boxes that the detector finds on a few frames only, some of them false
              positives.

A "face" here is a chain of full-effort boxes linked from frame to frame; the pipeline found it on
a frame when it ran its detector there and the chain has a box there (the detector is
deterministic, so both runs see the same boxes on that frame).

Exit status 1 when the total leak share is above ``--max-leak`` or the detector calls per frame
(all clips' calls over all clips' frames) are above ``--max-calls``, so it can gate CI; 2 when a
clip cannot be read.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import av
import numpy as np

from engines.detections import iou_matrix
from engines.errors import RedactionError
from engines.redact import Method, Style, redact_boxes
from engines.registry import IMAGE_PROFILE, VIDEO_PROFILE, Detector, build_detector
from pipeline.video import VideoOptions, VideoReport, redact_video

log = logging.getLogger(__name__)

REFERENCE_THRESHOLD = IMAGE_PROFILE.threshold

KINDS = ("start", "motion", "gap", "end", "never")
CONFIDENT = 0.5  # full-effort boxes at least this sure are also counted on their own
NOTHING_COVERED = 0.05  # below this covered share a leak counts as "nothing covers it"
CHAIN_GAP = 3  # frames a full-effort face may be missing and still continue its chain
CHAIN_IOU = 0.2  # IoU, or 1 - centre distance in box sizes (under 0.6), that continues a chain


# --- geometry --------------------------------------------------------------------------------
def covered_mask(xyxy: np.ndarray, width: int, height: int, style: Style,
                 tracked: np.ndarray | None = None) -> np.ndarray:
    """Boolean (height, width) mask of the pixels that redacting ``xyxy`` with ``style`` covers.

    The boxes are redacted by :func:`engines.redact.redact_boxes` itself, with a solid fill of
    the same shape and mask scale on a black canvas, so the region follows the library's geometry
    (rectangles grown by the mask scale and rounded outward, inscribed ellipses, full rectangles
    for tiny boxes and where the frame border cuts them) whatever its version. ``tracked`` marks
    the boxes the pipeline recorded with origin "tracked".
    """
    canvas = np.zeros((height, width, 3), np.uint8)
    if len(xyxy):
        redact_boxes(canvas, np.asarray(xyxy, np.float32).reshape(-1, 4),
                     replace(style, method=Method.FILL, fill_bgr=(255, 255, 255)), tracked)
    return np.asarray(canvas[:, :, 0] > 0)


def covered_share(mask: np.ndarray, box: Sequence[float]) -> float:
    """Share of the area of ``box`` (float xyxy) inside ``mask``, pixels weighted by how much of
    each the box overlaps. A box with no area inside the frame counts as covered."""
    height, width = mask.shape
    x1, x2 = max(0.0, float(box[0])), min(float(width), float(box[2]))
    y1, y2 = max(0.0, float(box[1])), min(float(height), float(box[3]))
    if x2 <= x1 or y2 <= y1:
        return 1.0
    c0, c1 = math.floor(x1), math.ceil(x2)
    r0, r1 = math.floor(y1), math.ceil(y2)
    cols = np.arange(c0, c1, dtype=np.float64)
    rows = np.arange(r0, r1, dtype=np.float64)
    wx = np.minimum(cols + 1, x2) - np.maximum(cols, x1)
    wy = np.minimum(rows + 1, y2) - np.maximum(rows, y1)
    inside = float(wy @ mask[r0:r1, c0:c1].astype(np.float64) @ wx)
    return inside / float(wx.sum() * wy.sum())


# --- decoding as pipeline/video.py does ------------------------------------------------------
def decode_frames(path: Path) -> Iterator[np.ndarray]:
    """BGR frames of the first video stream, cropped to even width and height, in the order
    and with the indices that :func:`pipeline.video.redact_video` gives them."""
    with av.open(str(path)) as container:
        vin = container.streams.video[0]
        vin.thread_type = "AUTO"
        width = vin.codec_context.width - vin.codec_context.width % 2
        height = vin.codec_context.height - vin.codec_context.height % 2
        for packet in container.demux([vin]):
            for vf in packet.decode():
                if not isinstance(vf, av.VideoFrame):
                    continue
                pixels: np.ndarray = vf.to_ndarray(format="bgr24")
                if pixels.shape[1] != width or pixels.shape[0] != height:
                    pixels = np.ascontiguousarray(pixels[:height, :width])
                yield pixels


# --- results ---------------------------------------------------------------------------------
@dataclass
class Leak:
    frame: int
    chain: int
    xyxy: list[float]
    score: float
    covered: float
    detector_ran: bool
    speed: float  # centre motion of the face, in box widths per frame
    kind: str = ""
    since_found: int | None = None  # frames since the pipeline's detector last found the face
    until_found: int | None = None  # frames until it next found the face


@dataclass
class ClipResult:
    clip: str
    frames: int = 0
    boxes: int = 0
    uncovered: int = 0
    confident_boxes: int = 0  # full-effort boxes with a score of at least CONFIDENT
    confident_uncovered: int = 0
    detector_calls: int = 0
    kinds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    uncovered_on_detector_frames: int = 0
    pipeline_s: float = 0.0
    full_effort_s: float = 0.0
    episodes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def leak_share(self) -> float:
        return self.uncovered / self.boxes if self.boxes else 0.0

    @property
    def calls_per_frame(self) -> float:
        return self.detector_calls / self.frames if self.frames else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["leak_share"] = round(self.leak_share, 5)
        d["detector_calls_per_frame"] = round(self.calls_per_frame, 4)
        d["pipeline_s"] = round(self.pipeline_s, 2)
        d["full_effort_s"] = round(self.full_effort_s, 2)
        return d


class _Chains:
    """Links full-effort boxes of nearby frames into chains, one per face (roughly), with a
    constant-velocity guess so that fast faces stay linked."""

    def __init__(self) -> None:
        # chain -> (frame, box, velocity per frame)
        self.last: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self.next_id = 0

    def link(self, frame: int, xyxy: np.ndarray) -> list[int]:
        live = [(c, f, b, v) for c, (f, b, v) in self.last.items()
                if frame - f <= CHAIN_GAP + 1]
        ids = [-1] * len(xyxy)
        boxes = xyxy.astype(np.float64)
        if live and len(xyxy):
            sims = []
            for moved in (False, True):
                prev = np.array([b + v * (frame - f) if moved else b for _, f, b, v in live])
                sim = iou_matrix(prev.astype(np.float32), xyxy.astype(np.float32))
                pc = (prev[:, :2] + prev[:, 2:]) / 2
                dc = (boxes[:, :2] + boxes[:, 2:]) / 2
                size = np.maximum(prev[:, 2:] - prev[:, :2], 1).max(1)
                dist = np.linalg.norm(pc[:, None] - dc[None], axis=2) / size[:, None]
                sims.append(np.where(dist < 0.6, np.maximum(sim, 1.0 - dist), sim))
            sim = np.maximum(*sims)
            used: set[int] = set()
            for pi, di in zip(*np.unravel_index(np.argsort(-sim, axis=None), sim.shape),
                              strict=True):
                if sim[pi, di] < CHAIN_IOU:
                    break
                if int(pi) in used or ids[di] >= 0:
                    continue
                used.add(int(pi))
                ids[di] = live[pi][0]
        for i in range(len(ids)):
            velocity = np.zeros(4)
            if ids[i] < 0:
                ids[i] = self.next_id
                self.next_id += 1
            else:
                f, b, _ = self.last[ids[i]]
                velocity = (boxes[i] - b) / max(frame - f, 1)
            self.last[ids[i]] = (frame, boxes[i], velocity)
        return ids


def _speed(prev: tuple[int, np.ndarray, np.ndarray] | None, frame: int,
           box: np.ndarray) -> float:
    if prev is None or prev[0] >= frame:
        return 0.0
    pf, pb, _ = prev
    moved = np.linalg.norm((box[:2] + box[2:]) / 2 - (pb[:2] + pb[2:]) / 2) / (frame - pf)
    return float(moved / max(float(box[2] - box[0]), 1.0))


def classify(leak: Leak, found_on: list[int]) -> None:
    """Set ``kind``, ``since_found`` and ``until_found`` of ``leak`` from the sorted frames on
    which the pipeline's detector found its face."""
    before = [g for g in found_on if g < leak.frame]
    after = [g for g in found_on if g > leak.frame]
    leak.since_found = leak.frame - before[-1] if before else None
    leak.until_found = after[0] - leak.frame if after else None
    if not found_on:
        leak.kind = "never"
    elif not before:
        leak.kind = "start"
    elif not after:
        leak.kind = "end"
    else:
        leak.kind = "motion" if leak.covered > NOTHING_COVERED else "gap"


def measure_clip(clip: Path, detector: Detector, style: Style, options: VideoOptions,
                 min_covered: float, workdir: Path,
                 reference: Detector | None = None) -> ClipResult:
    """``detector`` is the pipeline's; ``reference`` (default: the same) runs on every frame."""
    result = ClipResult(clip.name)
    t0 = time.perf_counter()
    report: VideoReport = redact_video(clip, workdir / clip.name, detector, style, options,
                                       record_frames=True)
    result.pipeline_s = time.perf_counter() - t0
    (workdir / clip.name).unlink(missing_ok=True)
    result.detector_calls = report.detector_calls
    detail = {int(d["index"]): d for d in report.frames_detail}
    if sorted(detail) != list(range(report.frames)):
        log.warning("%s: frames_detail indices are not 0..%d", clip.name, report.frames - 1)

    chains = _Chains()
    leaks: list[Leak] = []
    found_on: dict[int, list[int]] = {}  # chain -> frames where the pipeline's detector found it
    t0 = time.perf_counter()
    frames = 0
    for index, pixels in enumerate(decode_frames(clip)):
        frames += 1
        dets = (reference or detector).detect(pixels)
        rec: dict[str, Any] = detail.get(index, {"boxes": [], "detector_ran": False})
        if index not in detail:
            log.warning("%s: frame %d was decoded here but not reported by the pipeline",
                        clip.name, index)
        pipeline_boxes = np.array([b["xyxy"] for b in rec["boxes"]], np.float64).reshape(-1, 4)
        height, width = pixels.shape[:2]
        tracked = np.array([b["origin"] == "tracked" for b in rec["boxes"]], bool)
        mask = covered_mask(pipeline_boxes, width, height, style, tracked)
        previous = dict(chains.last)
        ids = chains.link(index, dets.xyxy)
        result.boxes += len(dets)
        result.confident_boxes += int((dets.score >= CONFIDENT).sum())
        for box, score, chain in zip(dets.xyxy, dets.score, ids, strict=True):
            if rec["detector_ran"]:
                found_on.setdefault(chain, []).append(index)
            share = covered_share(mask, box)
            if share < min_covered:
                leaks.append(Leak(index, chain, [round(float(v), 1) for v in box],
                                  round(float(score), 3), round(share, 3),
                                  bool(rec["detector_ran"]),
                                  round(_speed(previous.get(chain), index, box), 3)))
    result.full_effort_s = time.perf_counter() - t0
    result.frames = frames
    if frames != report.frames:
        log.warning("%s: decoded %d frames here, the pipeline reported %d", clip.name, frames,
                    report.frames)
    for leak in leaks:
        classify(leak, found_on.get(leak.chain, []))
        result.kinds[leak.kind] += 1
    result.uncovered = len(leaks)
    result.confident_uncovered = sum(leak.score >= CONFIDENT for leak in leaks)
    result.uncovered_on_detector_frames = sum(leak.detector_ran for leak in leaks)
    result.episodes = _episodes(leaks)
    return result


def _episodes(leaks: list[Leak]) -> list[dict[str, Any]]:
    """Runs of leaks of one chain on (nearly) consecutive frames, longest first."""
    by_chain: dict[int, list[Leak]] = {}
    for leak in leaks:
        by_chain.setdefault(leak.chain, []).append(leak)
    out: list[dict[str, Any]] = []
    for chain, items in by_chain.items():
        runs: list[list[Leak]] = []
        for leak in items:
            if runs and leak.frame - runs[-1][-1].frame <= 2:
                runs[-1].append(leak)
            else:
                runs.append([leak])
        for run in runs:
            sizes = [min(r.xyxy[2] - r.xyxy[0], r.xyxy[3] - r.xyxy[1]) for r in run]
            out.append({
                "chain": chain, "first_frame": run[0].frame, "last_frame": run[-1].frame,
                "boxes": len(run), "kinds": sorted({r.kind for r in run}, key=KINDS.index),
                "min_covered": min(r.covered for r in run),
                "mean_size_px": round(float(np.mean(sizes)), 1),
                "max_speed": max(r.speed for r in run),
                "max_score": max(r.score for r in run),
                "since_found": run[0].since_found, "until_found": run[-1].until_found,
                "on_detector_frames": sum(r.detector_ran for r in run),
                "first_box": run[0].xyxy})
    out.sort(key=lambda e: (-e["boxes"], e["first_frame"]))
    return out


# --- output ----------------------------------------------------------------------------------
def format_table(results: list[ClipResult], total: ClipResult) -> str:
    head = (f"{'clip':<44} {'frames':>6} {'boxes':>6} {'uncov':>6} {'leak %':>7} "
            f"{'unc>=' + str(CONFIDENT):>9} "
            f"{'calls/f':>7}  " + " ".join(f"{k:>6}" for k in KINDS))
    lines = [head, "-" * len(head)]
    for r in [*results, total]:
        if r is total:
            lines.append("-" * len(head))
        lines.append(
            f"{r.clip[:44]:<44} {r.frames:>6} {r.boxes:>6} {r.uncovered:>6} "
            f"{100 * r.leak_share:>7.3f} {f'{r.confident_uncovered}/{r.confident_boxes}':>9} "
            f"{r.calls_per_frame:>7.3f}  "
            + " ".join(f"{r.kinds[k]:>6}" for k in KINDS))
    lines.append(f"leak % = uncovered/boxes; unc>={CONFIDENT} = uncovered/boxes among full-effort "
                 f"boxes scoring at least {CONFIDENT}; calls/f = the pipeline's detector calls "
                 "per frame; kinds: see --help")
    return "\n".join(lines)


def _ago(frames: int | None, when: str) -> str:
    return f"not {when}" if frames is None else f"{frames} frames {when}"


def format_episodes(results: list[ClipResult], limit: int) -> str:
    lines = []
    for r in results:
        if not r.episodes or limit <= 0:
            continue
        lines.append(f"{r.clip}: {len(r.episodes)} leak episodes"
                     + (f", longest {limit}:" if len(r.episodes) > limit else ":"))
        for e in r.episodes[:limit]:
            lines.append(
                f"  frames {e['first_frame']}-{e['last_frame']} ({e['boxes']} boxes) "
                f"{'+'.join(e['kinds'])}: face ~{e['mean_size_px']} px, covered >= "
                f"{e['min_covered']:.2f}, score <= {e['max_score']:.2f}, "
                f"speed <= {e['max_speed']:.2f} widths/frame, "
                f"pipeline found it {_ago(e['since_found'], 'before')}, "
                f"{_ago(e['until_found'], 'after')}, first box {e['first_box']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.leaks",
        description="Count faces the video pipeline leaves uncovered (flash-through): run the "
                    "normal pipeline, then the same detector on every frame, and report the "
                    "full-effort boxes that the pipeline's covered region misses.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clips", nargs="+", type=Path, metavar="CLIP", help="video files to measure")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.add_argument("--max-leak", type=float, default=0.005,
                   help="fail (exit 1) when uncovered/boxes over all clips is above this "
                        "(default: 0.005)")
    p.add_argument("--max-calls", type=float, default=0.5,
                   help="fail (exit 1) when detector calls per frame over all clips is above "
                        "this (default: 0.5)")
    p.add_argument("--detect-every", type=int, default=VideoOptions.period, metavar="N",
                   help="the pipeline's detector period (default: %(default)s, as `redact file`)")
    p.add_argument("--reference-threshold", type=float, default=REFERENCE_THRESHOLD,
                   help="score threshold of the full-effort detector: what counts as a face "
                        "(default: %(default)s, the threshold used for photos; the pipeline "
                        "itself detects video frames down to its own, lower threshold)")
    p.add_argument("--min-covered", type=float, default=0.9,
                   help="share of a box's area that must be covered (default: 0.9)")
    p.add_argument("--episodes", type=int, default=5, metavar="N",
                   help="print the N longest leak episodes of each clip (default: 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="log only warnings")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.detect_every < 1:
        print("leaks: --detect-every must be at least 1", file=sys.stderr)
        return 2
    missing = [str(c) for c in args.clips if not c.is_file()]
    if missing:
        print(f"leaks: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    style = Style()
    options = VideoOptions(period=args.detect_every)
    detector = build_detector(("faces",), VIDEO_PROFILE)
    reference = build_detector(("faces",), replace(
        VIDEO_PROFILE, threshold=args.reference_threshold))
    results: list[ClipResult] = []
    with tempfile.TemporaryDirectory(prefix="rg-leaks-") as tmp:
        for clip in args.clips:
            log.info("%s: running the pipeline and the full-effort detector", clip.name)
            try:
                r = measure_clip(clip, detector, style, options, args.min_covered, Path(tmp),
                                 reference)
            except (RedactionError, av.FFmpegError, OSError) as exc:
                print(f"leaks: {clip}: {exc}", file=sys.stderr)
                return 2
            log.info("%s: %d frames, %d boxes, %d uncovered, %.3f calls/frame (%.1f s + %.1f s)",
                     clip.name, r.frames, r.boxes, r.uncovered, r.calls_per_frame,
                     r.pipeline_s, r.full_effort_s)
            results.append(r)
    total = ClipResult("TOTAL")
    for r in results:
        total.frames += r.frames
        total.boxes += r.boxes
        total.uncovered += r.uncovered
        total.confident_boxes += r.confident_boxes
        total.confident_uncovered += r.confident_uncovered
        total.detector_calls += r.detector_calls
        total.uncovered_on_detector_frames += r.uncovered_on_detector_frames
        for k in KINDS:
            total.kinds[k] += r.kinds[k]
    failures = []
    if total.leak_share > args.max_leak:
        failures.append(f"leak share {total.leak_share:.4f} > {args.max_leak}")
    if total.calls_per_frame > args.max_calls:
        failures.append(f"detector calls/frame {total.calls_per_frame:.3f} > {args.max_calls}")
    print(format_table(results, total))
    episodes = format_episodes(results, args.episodes)
    if episodes:
        print()
        print(episodes)
    if total.uncovered_on_detector_frames:
        log.warning("%d uncovered boxes lie on frames where the pipeline ran the detector: the "
                    "two runs disagree (frame alignment or a nondeterministic detector)",
                    total.uncovered_on_detector_frames)
    summary: dict[str, Any] = {
        "benchmark": "leaks",
        "settings": {"detect_every": args.detect_every, "lookahead": options.lookahead,
                     "min_covered": args.min_covered, "max_leak": args.max_leak,
                     "max_calls": args.max_calls, "style": style.shape.value,
                     "mask_scale": style.mask_scale, "threshold": VIDEO_PROFILE.threshold,
                     "reference_threshold": args.reference_threshold},
        "clips": [r.to_dict() for r in results],
        "total": {k: v for k, v in total.to_dict().items() if k not in ("clip", "episodes")},
        "passed": not failures, "failures": failures,
    }
    brief = {**summary, "clips": [{k: v for k, v in c.items() if k != "episodes"}
                                  for c in summary["clips"]]}
    line = json.dumps(brief, separators=(",", ":"))  # episodes only in --json
    print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    for f in failures:
        print(f"leaks: FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
