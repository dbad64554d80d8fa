"""Per-category settings (threshold, scale, period, method, mask scale): from a settings file,
from --set, and what they change in the pixels and in the detector schedule."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.detections import Detections
from engines.errors import UnknownCategoryError
from engines.faces import ModelInfo
from engines.redact import Method, Style
from engines.registry import (
    IMAGE_PROFILE,
    VIDEO_PROFILE,
    CategorySettings,
    CompositeDetector,
    build_detector,
)
from gateway.cli import main
from pipeline.files import Redactor, RedactSettings
from pipeline.frame import Frame
from pipeline.settings import apply_sets, config_from_dict, load_config
from pipeline.stages import RedactStage
from tests.conftest import ASTRONAUT_FACE, astronaut_bgr_image, fill_fraction, region

MAGENTA = (255, 0, 255)
GREEN = (0, 255, 0)


def imread(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    assert img is not None, path
    return img


def face_and_text_photo() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The astronaut photo with a white band of large black writing below it; the text box."""
    photo = astronaut_bgr_image()
    band = np.full((160, 512, 3), 255, np.uint8)
    cv2.putText(band, "HELLO WORLD", (20, 100), cv2.FONT_HERSHEY_SIMPLEX, 2.4, (0, 0, 0), 6)
    return np.vstack([photo, band]), (20, 512 + 40, 480, 512 + 120)


# --------------------------------------------------------------------------------------------
# what the settings change in the pixels


def test_each_category_is_covered_in_its_own_method(tmp_path: Path) -> None:
    img, text_box = face_and_text_photo()
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    cv2.imwrite(str(src), img)
    settings = RedactSettings(
        categories=("faces", "text"), style=Style(Method.FILL, fill_bgr=MAGENTA),
        per_category={"text": CategorySettings(method=Method.PIXELATE)})
    entry = Redactor(settings).redact(src, dst)
    out = imread(dst)
    assert entry["counts"].get("faces", 0) >= 1 and entry["counts"].get("text", 0) >= 1
    assert fill_fraction(region(out, ASTRONAUT_FACE), MAGENTA, tol=8) > 0.6
    text = region(out, text_box)
    assert fill_fraction(text, MAGENTA, tol=8) < 0.05  # pixelated, not filled
    assert not np.array_equal(text, region(img, text_box))  # but covered


def test_a_category_threshold_drops_that_category_only(tmp_path: Path) -> None:
    img, _ = face_and_text_photo()
    base = build_detector(("faces", "text"), IMAGE_PROFILE)
    strict = build_detector(("faces", "text"), IMAGE_PROFILE,
                            {"faces": CategorySettings(threshold=1.0)})
    a, b = base.detect(img).counts(), strict.detect(img).counts()
    assert a.get("faces", 0) >= 1 and b.get("faces", 0) == 0
    assert a.get("text", 0) == b.get("text", 0) >= 1


def test_a_category_scale_changes_the_input_size() -> None:
    img = cv2.resize(astronaut_bgr_image(), (200, 200), interpolation=cv2.INTER_AREA)
    # the astronaut's face (~40 px here) is too small for the model at a tenth of the size
    small = build_detector(("faces",), VIDEO_PROFILE, {"faces": CategorySettings(scale=0.1)})
    assert len(small.detect(img)) == 0
    assert len(build_detector(("faces",), VIDEO_PROFILE).detect(img)) >= 1


def test_mask_scale_per_category_grows_only_that_category(tmp_path: Path) -> None:
    img = astronaut_bgr_image()
    src = tmp_path / "in.png"
    cv2.imwrite(str(src), img)
    covered = []
    for ms in (1.0, 2.0):
        s = RedactSettings(categories=("faces",), style=Style(Method.FILL, fill_bgr=MAGENTA),
                           per_category={"heads": CategorySettings(mask_scale=ms)})
        Redactor(s).redact(src, tmp_path / f"out{ms}.png")
        out = imread(tmp_path / f"out{ms}.png")
        covered.append(fill_fraction(out, MAGENTA, tol=8))
    assert covered[1] > 2.5 * covered[0] > 0


def test_text_bearing_categories_take_their_style_onto_text_boxes(tmp_path: Path) -> None:
    img, text_box = face_and_text_photo()
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    cv2.imwrite(str(src), img)
    s = RedactSettings(categories=("documents",), style=Style(Method.BLUR),
                       per_category={"documents": CategorySettings(method=Method.FILL)})
    entry = Redactor(s).redact(src, dst)
    assert entry["counts"].get("text", 0) >= 1
    assert fill_fraction(region(imread(dst), text_box), (0, 0, 0), tol=8) > 0.8


# --------------------------------------------------------------------------------------------
# periods: each detector on its own schedule


class SquareDetector:
    """Finds pure-colour squares; counts its calls."""

    def __init__(self, colour: tuple[int, int, int], cat: str) -> None:
        self.colour, self.calls = colour, 0
        self.categories: tuple[str, ...] = (cat,)

    @property
    def models(self) -> list[ModelInfo]:
        return []

    def detect(self, image: np.ndarray) -> Detections:
        self.calls += 1
        ys, xs = np.nonzero((image == self.colour).all(-1))
        if not len(ys):
            return Detections.empty()
        return Detections.from_boxes([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], [0.9],
                                     self.categories[0])


class Periodic(SquareDetector):
    def __init__(self, colour: tuple[int, int, int], cat: str, period: int) -> None:
        super().__init__(colour, cat)
        self.period = period


def test_each_detector_runs_at_its_own_period_and_slow_ones_still_cover_from_frame_one() -> None:
    fast, slow = Periodic(GREEN, "faces", 2), Periodic(MAGENTA, "text", 10)
    stage = RedactStage(CompositeDetector([fast, slow]), Style(Method.FILL, fill_bgr=(0, 0, 255)),
                        period=3, lookahead=2, scene_change=0)
    assert stage.lookahead == 10  # at least the longest period
    frames = []
    for i in range(40):
        px = np.full((120, 160, 3), 90, np.uint8)
        if i >= 1:  # a magenta square appears right after the slow detector's first call
            px[40:60, 20 + i:40 + i] = MAGENTA
        px[70:90, 100:120] = GREEN
        frames.append(Frame(i, px))
    out = [f for fr in frames for f in stage.push(fr)] + stage.flush()
    assert [f.index for f in out] == list(range(40))
    assert 4 <= slow.calls <= 6 and 15 <= fast.calls <= 25
    assert stage.calls_by_lane == {"faces": fast.calls, "text": slow.calls}
    for f in out:
        assert not (f.pixels == MAGENTA).all(-1).any(), f"text square visible on {f.index}"
        assert not (f.pixels == GREEN).all(-1).any(), f"face square visible on {f.index}"


def test_video_profile_runs_the_text_detector_less_often(tmp_path: Path) -> None:
    det = build_detector(("faces", "license_plates", "text"), VIDEO_PROFILE,
                         {"text": CategorySettings(period=4)})
    periods = {"+".join(p.categories): getattr(p, "period", None) for p in det.parts}
    # faces follow --detect-every; plates and text share one text pass at the shorter period
    assert periods == {"faces": None, "license_plates+text": 4}
    assert [m.name for m in det.models].count("pp-ocrv6-det-small") == 1


# --------------------------------------------------------------------------------------------
# the settings file and --set


def test_settings_file_and_set(tmp_path: Path) -> None:
    cfg = tmp_path / "redact.toml"
    cfg.write_text('[category.faces]\nthreshold = 0.2\nmethod = "pixelation"\n'
                   '[category.license_plates]\nperiod = 5\nscale = 1.25\n')
    fc = load_config(cfg)
    assert fc.per_category["faces"] == CategorySettings(threshold=0.2, method=Method.PIXELATE)
    per = apply_sets(fc.per_category, ["faces.threshold=0.4", "text.mask_scale=1.6"])
    assert per["faces"].threshold == 0.4 and per["faces"].method is Method.PIXELATE
    assert per["text"] == CategorySettings(mask_scale=1.6)
    assert per["license_plates"] == CategorySettings(period=5, scale=1.25)


@pytest.mark.parametrize(("text", "message"), [
    ("[category.faces]\nthreshold = 2\n", "threshold 2.0 is outside"),
    ("[category.faces]\nperiod = 0\n", "period 0 is outside"),
    ("[category.faces]\nperiod = 2.5\n", "not a whole number"),
    ("[category.faces]\nmethod = 'smudge'\n", "unknown redaction method"),
    ("[category.faces]\ncolour = 'red'\n", "unknown setting"),
    ("[categories.faces]\nthreshold = 0.2\n", "unknown section"),
    ("[category]\nfaces = 3\n", "must be a table"),
    ("this is not toml", "not valid TOML"),
])
def test_bad_settings_file_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(cfg)


@pytest.mark.parametrize("item", ["faces", "faces=0.2", ".threshold=1", "faces.speed=3"])
def test_bad_set_is_refused(item: str) -> None:
    with pytest.raises(ValueError, match="--set"):
        apply_sets({}, [item])


def test_settings_for_an_unknown_category_are_refused() -> None:
    with pytest.raises(UnknownCategoryError, match="fcaes"):
        RedactSettings(per_category={"fcaes": CategorySettings(threshold=0.5)})
    assert config_from_dict({}).per_category == {}


def test_cli_applies_set_and_records_it_in_the_manifest(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    img, text_box = face_and_text_photo()
    src, dst, js = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "audit.json"
    cv2.imwrite(str(src), img)
    rc = main(["file", str(src), "-o", str(dst), "--categories", "faces,street_signs",
               "--method", "fill", "--fill-color", "255,0,255", "--set", "street_signs.method=blur",
               "--json", str(js), "--quiet"])
    assert rc == 0
    out = imread(dst)
    assert fill_fraction(region(out, ASTRONAUT_FACE), MAGENTA, tol=8) > 0.6
    assert fill_fraction(region(out, text_box), MAGENTA, tol=8) < 0.05
    m = json.loads(js.read_text())
    # writing is covered as a box unless set otherwise
    assert m["settings"]["per_category"] == {"street_signs": {"method": "blur", "shape": "box"}}
    assert m["category_mapping"] == {"street_signs": "text"}
    assert main(["file", str(src), "-o", str(dst), "--set", "faces.speed=1"]) == 2
    assert "unknown setting" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[category.faces]\nthreshold = 7\n")
    assert main(["file", str(src), "-o", str(dst), "--config", str(bad)]) == 2
    assert "threshold 7.0 is outside" in capsys.readouterr().err
