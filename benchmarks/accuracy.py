"""Redaction accuracy on annotated photo sets, scored by the pixels that changed.

    python -m benchmarks.accuracy --data ../shared/eval [--sets faces_kaggle_facemask]
        [--gate 'faces_kaggle_facemask:recall>=0.95,recall_small>=0.6,changed_outside_gt<=0.1']

Each set's photos are redacted with ``--method fill`` through the same code as ``redact file``
(photo profile), then scored as the evaluation sets define it: a ground-truth box counts as
redacted when at least 70% of its pixels changed by more than 24 levels in some channel;
``recall`` is over boxes with a short side of at least 10 px, ``recall_small`` over smaller
ones, ``changed_outside_gt`` is the mean share of each image's pixels changed outside every
ground-truth box. The fill colour is a saturated magenta so that a covered dark region (a
black face mask, hair) also counts as changed. Prints a table and one JSON line; exits 1 when a
``--gate`` fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.errors import UnknownCategoryError
from engines.redact import Method, Style
from pipeline.files import Redactor, RedactSettings

# evaluation set -> (our category, the category name its annotations use)
SETS: dict[str, tuple[str, str]] = {
    "faces_kaggle_facemask": ("faces", "face"),
    "plates_openalpr": ("license_plates", "license_plate"),
    "qr_xcerno30": ("qr_codes", "qr_code"),
}
FILL_BGR = (255, 0, 255)
COVER = 0.7
DIFF = 24
MIN_SIDE = 10


@dataclass
class Score:
    images: int = 0
    boxes: int = 0
    hits: int = 0
    small_boxes: int = 0
    small_hits: int = 0
    outside_sum: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images, "boxes": self.boxes, "small_boxes": self.small_boxes,
            "recall": round(self.hits / max(self.boxes, 1), 4),
            "recall_small": round(self.small_hits / max(self.small_boxes, 1), 4),
            "changed_outside_gt": round(self.outside_sum / max(self.images, 1), 4),
            "seconds_per_image": round(self.seconds / max(self.images, 1), 3),
        }


def score_image(src: Any, out: Any, boxes: list[list[float]],
                acc: Score) -> None:
    """Add one image's figures to ``acc`` (same definition as the evaluation scorer)."""
    if out is None or out.shape != src.shape:
        changed = np.zeros(src.shape[:2], bool)
    else:
        changed = np.abs(src.astype(np.int16) - out.astype(np.int16)).max(axis=2) > DIFF
    inside = np.zeros(changed.shape, bool)
    for xyxy in boxes:
        x1, y1, x2, y2 = (round(v) for v in xyxy)
        x1, y1 = max(x1, 0), max(y1, 0)
        region = changed[y1:y2, x1:x2]
        inside[y1:y2, x1:x2] = True
        hit = region.size > 0 and region.mean() >= COVER
        if min(x2 - x1, y2 - y1) >= MIN_SIDE:
            acc.boxes += 1
            acc.hits += int(hit)
        else:
            acc.small_boxes += 1
            acc.small_hits += int(hit)
    acc.outside_sum += float(changed[~inside].mean()) if (~inside).any() else 0.0
    acc.images += 1


def evaluate(set_dir: Path, category: str, gt_category: str, settings: RedactSettings,
             limit: int | None = None) -> Score:
    meta = json.loads((set_dir / "annotations.json").read_text())
    redactor = Redactor(settings)
    acc = Score()
    items = [it for it in meta["items"]
             if any(b["category"] == gt_category for b in it.get("boxes", []))]
    with tempfile.TemporaryDirectory() as tmp:
        for it in items[:limit]:
            src_path = set_dir / it["file"]
            dst = Path(tmp) / src_path.name
            t0 = time.perf_counter()
            redactor.redact(src_path, dst)
            acc.seconds += time.perf_counter() - t0
            boxes = [b["xyxy"] for b in it["boxes"] if b["category"] == gt_category]
            score_image(cv2.imread(str(src_path)), cv2.imread(str(dst)), boxes, acc)
    return acc


_GATE = re.compile(r"^(\w+)\s*(>=|<=)\s*([0-9.]+)$")


def check_gates(results: dict[str, dict[str, Any]], gates: list[str]) -> list[str]:
    """Failed gate descriptions; a gate reads ``SET:metric>=x,metric<=y``."""
    failures = []
    for gate in gates:
        name, _, conds = gate.partition(":")
        res = results.get(name)
        if res is None or "recall" not in res:
            failures.append(f"{name}: no result ({(res or {}).get('error', 'set not run')})")
            continue
        for cond in conds.split(","):
            m = _GATE.match(cond.strip())
            if not m:
                raise ValueError(f"bad gate condition {cond!r}; write metric>=x or metric<=x")
            metric, op, value = m.group(1), m.group(2), float(m.group(3))
            got = float(res[metric])
            ok = got >= value if op == ">=" else got <= value
            if not ok:
                failures.append(f"{name}: {metric} {got} is not {op} {value}")
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=Path("../shared/eval"),
                    help="folder holding the evaluation sets (default: ../shared/eval)")
    ap.add_argument("--sets", default=",".join(SETS),
                    help=f"comma-separated sets (default: {','.join(SETS)})")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images of a set")
    ap.add_argument("--gate", action="append", default=[],
                    help="fail unless SET:metric>=x[,metric<=y] holds; repeatable")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    results: dict[str, dict[str, Any]] = {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        if name not in SETS:
            ap.error(f"unknown set {name!r}; known: {', '.join(SETS)}")
        category, gt_category = SETS[name]
        try:
            settings = RedactSettings(categories=(category,),
                                      style=Style(method=Method.FILL, fill_bgr=FILL_BGR))
        except UnknownCategoryError as exc:
            results[name] = {"category": category, "error": f"unavailable: {exc}"}
            continue
        score = evaluate(args.data / name, category, gt_category, settings, args.limit)
        results[name] = {"category": category, **score.as_dict()}

    print(f"{'set':24} {'category':15} {'images':>6} {'boxes':>6} {'recall':>7} "
          f"{'r_small':>7} {'outside':>7} {'s/img':>6}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:24} {r['category']:15} {r['error'][:60]}")
            continue
        print(f"{name:24} {r['category']:15} {r['images']:6d} {r['boxes']:6d} {r['recall']:7.3f} "
              f"{r['recall_small']:7.3f} {r['changed_outside_gt']:7.3f} "
              f"{r['seconds_per_image']:6.3f}")
    print(json.dumps({"accuracy": results}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failures = check_gates(results, args.gate)
    for f in failures:
        print(f"GATE FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
