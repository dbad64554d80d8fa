"""Redaction accuracy on annotated photo sets, scored by the pixels that changed.

    python -m benchmarks.accuracy --data ../shared/eval [--sets faces_kaggle_facemask]
        [--folds 5 [--tune-folds 0,1]]
        [--gate 'faces_kaggle_facemask:recall>=0.95,recall_small>=0.6,changed_outside_gt<=0.1']

Each set's photos are redacted with ``--method fill`` through the same code as ``redact file``
(photo profile), then scored as the evaluation sets define it: a ground-truth box counts as
redacted when at least 70% of its pixels changed by more than 24 levels in some channel;
``recall`` is over boxes with a short side of at least 10 px, ``recall_small`` over smaller
ones, ``changed_outside_gt`` is the mean share of each image's pixels changed outside every
ground-truth box. The fill colour is a saturated magenta so that a covered dark region (a
black face mask, hair) also counts as changed. Prints a table and one JSON line; exits 1 when a
``--gate`` fails.

``--folds K`` splits each set into K folds by a hash of each photo's bytes (stable, whatever the
file names or order), scores every fold, and reports as the set's figures the mean over the
held-out folds: every fold but the ``--tune-folds`` (default 0 and 1), the ones settings may be
tuned on. The figures of every fold, the spread (min and max over the held-out folds) and the
whole set pooled are listed too; gates apply to the held-out means.
"""

from __future__ import annotations

import argparse
import hashlib
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
            "recall_small": (round(self.small_hits / self.small_boxes, 4)
                             if self.small_boxes else None),
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


def fold_of(path: Path, folds: int) -> int:
    """The fold of a photo: a hash of its bytes, so the split holds whatever its name."""
    digest = hashlib.sha256(path.read_bytes()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def evaluate(set_dir: Path, category: str, gt_category: str, settings: RedactSettings,
             limit: int | None = None, folds: int = 1,
             only_folds: set[int] | None = None) -> dict[int, Score]:
    """Each fold's figures (one fold, 0, without a split); ``only_folds``: score those alone."""
    meta = json.loads((set_dir / "annotations.json").read_text())
    redactor = Redactor(settings)
    scores: dict[int, Score] = {}
    items = [it for it in meta["items"]
             if any(b["category"] == gt_category for b in it.get("boxes", []))]
    with tempfile.TemporaryDirectory() as tmp:
        for it in items[:limit]:
            src_path = set_dir / it["file"]
            fold = fold_of(src_path, folds) if folds > 1 else 0
            if only_folds is not None and fold not in only_folds:
                continue
            acc = scores.setdefault(fold, Score())
            dst = Path(tmp) / src_path.name
            t0 = time.perf_counter()
            redactor.redact(src_path, dst)
            acc.seconds += time.perf_counter() - t0
            boxes = [b["xyxy"] for b in it["boxes"] if b["category"] == gt_category]
            score_image(cv2.imread(str(src_path)), cv2.imread(str(dst)), boxes, acc)
    return scores


METRICS = ("recall", "recall_small", "changed_outside_gt")


def pooled(scores: list[Score]) -> Score:
    total = Score()
    for sc in scores:
        for k in ("images", "boxes", "hits", "small_boxes", "small_hits", "outside_sum",
                  "seconds"):
            setattr(total, k, getattr(total, k) + getattr(sc, k))
    return total


def summarize(scores: dict[int, Score], folds: int, tune: set[int]) -> dict[str, Any]:
    """A set's figures: with folds, the held-out folds' mean as the headline, each fold, the
    spread and the pooled set; without, the set's figures."""
    if folds <= 1:
        return pooled(list(scores.values())).as_dict()
    per = {i: scores[i].as_dict() for i in sorted(scores)}
    held = [i for i in per if i not in tune]
    out: dict[str, Any] = {}
    if held:
        out["spread"] = {}
        for m in METRICS:
            vals = [per[i][m] for i in held if per[i][m] is not None]
            out[m] = round(float(np.mean(vals)), 4) if vals else None
            out["spread"][m] = [min(vals), max(vals)] if vals else None
    base = pooled([scores[i] for i in held]) if held else Score()
    out.update(images=base.images, boxes=base.boxes, small_boxes=base.small_boxes,
               seconds_per_image=round(base.seconds / max(base.images, 1), 3),
               held_out_folds=held, tune_folds=sorted(i for i in per if i in tune),
               folds=per, pooled=pooled(list(scores.values())).as_dict())
    return out


def _num(v: float | None) -> str:
    return f"{v:7.3f}" if v is not None else f"{'-':>7}"


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
            if res.get(metric) is None:
                failures.append(f"{name}: no {metric} (no such boxes were scored)")
                continue
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
    ap.add_argument("--folds", type=int, default=1,
                    help="split each set into this many folds by file hash and report the "
                         "held-out folds' mean (default 1: no split)")
    ap.add_argument("--tune-folds", default="0,1",
                    help="with --folds: the folds settings may be tuned on, left out of the "
                         "headline figures (default 0,1)")
    ap.add_argument("--only-folds", default=None,
                    help="with --folds: score these folds alone (e.g. the tuning folds while "
                         "tuning)")
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
        tune = {int(v) for v in args.tune_folds.split(",") if v.strip()}
        only = ({int(v) for v in args.only_folds.split(",") if v.strip()}
                if args.only_folds else None)
        if only is not None:
            tune -= only  # the folds asked for are the ones reported
        scores = evaluate(args.data / name, category, gt_category, settings, args.limit,
                          args.folds, only)
        results[name] = {"category": category, **summarize(scores, args.folds, tune)}

    print(f"{'set':24} {'category':15} {'images':>6} {'boxes':>6} {'recall':>7} "
          f"{'r_small':>7} {'outside':>7} {'s/img':>6}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:24} {r['category']:15} {r['error'][:60]}")
            continue
        label = "held-out mean" if "folds" in r else ""
        print(f"{name:24} {r['category']:15} {r['images']:6d} {r['boxes']:6d} "
              f"{_num(r['recall'])} {_num(r['recall_small'])} {_num(r['changed_outside_gt'])} "
              f"{r['seconds_per_image']:6.3f} {label}")
        for i, f in r.get("folds", {}).items():
            tag = "tune" if i in r["tune_folds"] else "held-out"
            print(f"  fold {i} ({tag:8}) {'':6} {f['images']:6d} {f['boxes']:6d} "
                  f"{_num(f['recall'])} {_num(f['recall_small'])} "
                  f"{_num(f['changed_outside_gt'])}")
        if r.get("spread"):
            print("  held-out spread: " + ", ".join(
                f"{m} {v[0]:.3f}-{v[1]:.3f}" for m, v in r["spread"].items() if v))
    print(json.dumps({"accuracy": results}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failures = check_gates(results, args.gate)
    for f in failures:
        print(f"GATE FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
