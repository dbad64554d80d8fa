"""The accuracy benchmark's folds: a stable split by content, held-out means as the headline,
gates on them; run end to end on a small annotated set made here."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from benchmarks import accuracy
from benchmarks.accuracy import Score, check_gates, fold_of, summarize
from tests.conftest import ASTRONAUT_FACE, astronaut_bgr_image


def test_a_photo_s_fold_follows_its_bytes_not_its_name(tmp_path: Path) -> None:
    a = tmp_path / "a.jpg"
    b = tmp_path / "renamed.jpg"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    assert fold_of(a, 5) == fold_of(b, 5)
    folds = {fold_of(_write(tmp_path / f"{i}.bin", str(i).encode()), 5) for i in range(60)}
    assert folds == {0, 1, 2, 3, 4}  # every fold gets photos


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _score(hits: int, boxes: int, small_hits: int, small: int, outside: float) -> Score:
    return Score(images=1, boxes=boxes, hits=hits, small_boxes=small, small_hits=small_hits,
                 outside_sum=outside)


def test_the_headline_is_the_held_out_folds_mean_and_tuning_folds_are_left_out() -> None:
    scores = {0: _score(10, 10, 5, 5, 0.0),  # tuned on: perfect, must not count
              1: _score(10, 10, 5, 5, 0.0),
              2: _score(8, 10, 1, 2, 0.1),
              3: _score(6, 10, 0, 0, 0.3)}  # no small faces in this fold
    r = summarize(scores, 4, {0, 1})
    assert r["held_out_folds"] == [2, 3] and r["tune_folds"] == [0, 1]
    assert r["recall"] == 0.7  # (0.8 + 0.6) / 2
    assert r["recall_small"] == 0.5  # fold 3 has none: not counted as 0
    assert r["changed_outside_gt"] == 0.2
    assert r["spread"]["recall"] == [0.6, 0.8]
    assert r["pooled"]["recall"] == 0.85  # 34 of 40, every fold
    assert check_gates({"s": r}, ["s:recall>=0.7,changed_outside_gt<=0.2"]) == []
    assert check_gates({"s": r}, ["s:recall>=0.75"]) == ["s: recall 0.7 is not >= 0.75"]
    r3 = summarize({3: scores[3]}, 4, set())
    assert check_gates({"s": r3}, ["s:recall_small>=0.5"])[0].startswith("s: no recall_small")


def test_the_benchmark_reports_every_fold_of_a_set(tmp_path: Path) -> None:
    data = tmp_path / "eval"
    set_dir = data / "faces_kaggle_facemask"
    set_dir.mkdir(parents=True)
    items = []
    base = astronaut_bgr_image()
    for i in range(4):  # the same face, four photos that differ by a few pixels
        img = base.copy()
        img[-2:, :4] = i * 40
        cv2.imwrite(str(set_dir / f"p{i}.png"), img)
        items.append({"file": f"p{i}.png",
                      "boxes": [{"category": "face", "xyxy": list(ASTRONAUT_FACE)}]})
    (set_dir / "annotations.json").write_text(json.dumps({"items": items}))
    out = tmp_path / "r.json"
    rc = accuracy.main(["--data", str(data), "--sets", "faces_kaggle_facemask", "--folds", "2",
                        "--tune-folds", "", "--json", str(out),
                        "--gate", "faces_kaggle_facemask:recall>=0.99"])
    r = json.loads(out.read_text())["faces_kaggle_facemask"]
    assert rc == 0
    assert sum(f["images"] for f in r["folds"].values()) == 4
    assert r["recall"] == 1.0 and r["pooled"]["recall"] == 1.0
    assert r["changed_outside_gt"] < 0.05
    assert np.isclose(r["images"], 4)
