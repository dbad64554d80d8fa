"""The `redact` command, run in-process through gateway.cli.main."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.models import YUNET
from gateway.cli import main
from tests.conftest import (
    ASTRONAUT_FACE_CORE,
    astronaut_bgr_image,
    detail,
    moving_face_clip,
    read_video,
    region,
    write_video,
)


def write_photo(path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(astronaut_bgr_image()[:, :, ::-1])).save(path,
                                                                                  format=fmt)
    return path


def write_clip(path: Path, n: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, moving_face_clip(n=n).frames, audio="aac")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def face_detail(path: Path) -> float:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return detail(region(np.ascontiguousarray(rgb[:, :, ::-1]), ASTRONAUT_FACE_CORE))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """in/ holding photos and a video at several depths, plus files to be skipped."""
    root = tmp_path / "in"
    write_photo(root / "a.jpg", "JPEG")
    write_photo(root / "sub" / "B.PNG", "PNG")
    write_photo(root / "sub" / "deeper" / "c.webp", "WEBP")
    write_clip(root / "sub" / "clip.mp4")
    write_photo(root / ".hidden.jpg", "JPEG")
    (root / "notes.txt").write_text("not media")
    return root


def test_directory_keeps_relative_paths_names_and_extensions(
        tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["file", str(tree), "-o", str(out)]) == 0
    assert files_under(out) == ["a.jpg", "sub/B.PNG", "sub/clip.mp4", "sub/deeper/c.webp"]
    for name, fmt in (("a.jpg", "JPEG"), ("sub/B.PNG", "PNG"), ("sub/deeper/c.webp", "WEBP")):
        with Image.open(out / name) as im:
            assert im.format == fmt and im.size == (512, 512)
        assert face_detail(out / name) < 0.3 * face_detail(tree / name)
    clip = read_video(out / "sub" / "clip.mp4")
    assert len(clip.frames) == 10 and clip.audio_packets == read_video(
        tree / "sub" / "clip.mp4").audio_packets
    err = capsys.readouterr().err
    assert "covered" in err and "clip.mp4" in err
    assert ".hidden" not in err and "notes.txt" not in err


def test_several_inputs_and_single_file_output(tmp_path: Path) -> None:
    a = write_photo(tmp_path / "in" / "a.jpg", "JPEG")
    b = write_photo(tmp_path / "other" / "b.png", "PNG")
    assert main(["file", str(a), str(b), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert files_under(tmp_path / "out") == ["a.jpg", "b.png"]
    single = tmp_path / "renamed" / "redacted.jpg"
    assert main(["file", str(a), "-o", str(single), "-q"]) == 0
    assert files_under(tmp_path / "renamed") == ["redacted.jpg"]
    with Image.open(single) as im:
        assert im.format == "JPEG"


def test_json_manifest(tree: Path, tmp_path: Path) -> None:
    out, manifest_path = tmp_path / "out", tmp_path / "audit" / "run.json"
    rc = main(["file", str(tree), "-o", str(out), "--json", str(manifest_path),
               "--method", "pixelate", "--detect-every", "2", "-q"])
    assert rc == 0
    m = json.loads(manifest_path.read_text())
    assert m["manifest_version"] == 1
    s = m["settings"]
    assert s["categories"] == ["faces"]
    assert s["style"]["method"] == "pixelate" and s["style"]["mask_scale"] == 1.3
    assert s["video"]["period"] == 2 and s["keep_metadata"] is False
    assert s["image_detector"]["scales"] == [1.0, 2.0, 3.0]

    files = {f["input"]: f for f in m["files"]}
    assert set(files) == {"a.jpg", "B.PNG", "c.webp", "clip.mp4"}
    digest = hashlib.sha256(YUNET.resolve().read_bytes()).hexdigest()
    for f in files.values():
        assert [(x["name"], x["sha256"]) for x in f["models"]] == [("yunet-2023mar", digest)]
        assert f["output"] == f["input"]
    photo = files["a.jpg"]
    assert photo["kind"] == "image" and photo["format"] == "jpeg"
    assert photo["counts"]["faces"] == len(photo["boxes"]) >= 1
    assert all(b["category"] == "faces" and len(b["xyxy"]) == 4 for b in photo["boxes"])

    video = files["clip.mp4"]
    assert video["kind"] == "video" and video["frames"] == 10
    detail_rows = video["frames_detail"]
    # every 2nd frame (every frame while the new track is unsure), and always the last one
    ran = [r["index"] for r in detail_rows if r["detector_ran"]]
    assert ran[0] == 0 and ran[-1] == 9 and video["detector_calls"] == len(ran)
    assert all(b - a <= 2 for a, b in itertools.pairwise(ran))
    assert [r["index"] for r in detail_rows] == list(range(10))
    assert [r["time_s"] for r in detail_rows] == [pytest.approx(i / 25) for i in range(10)]
    assert all(r["boxes"] for r in detail_rows), "the face is on every frame"
    assert video["counts"]["faces"] == sum(len(r["boxes"]) for r in detail_rows)
    assert video["audio_packets"] > 0

    total = sum(f["counts"].get("faces", 0) for f in files.values())
    assert m["counts"] == {"faces": total}


@pytest.mark.parametrize("categories", ["wheels", "faces,wheels", "heads,licence"])
def test_unknown_category_exits_2_and_lists_the_available(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], categories: str) -> None:
    a = write_photo(tmp_path / "a.jpg", "JPEG")
    rc = main(["file", str(a), "-o", str(tmp_path / "out"), "--categories", categories])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown category" in err and "available: faces" in err
    assert not (tmp_path / "out").exists()


def test_known_category_without_a_detector_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_photo(tmp_path / "a.jpg", "JPEG")
    rc = main(["file", str(a), "-o", str(tmp_path / "out"), "--categories", "faces,tattoos"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'tattoos' is not available" in err and "available: faces" in err
    assert not (tmp_path / "out").exists()


def test_category_alias_is_accepted(tmp_path: Path) -> None:
    a = write_photo(tmp_path / "a.png", "PNG")
    assert main(["file", str(a), "-o", str(tmp_path / "o.png"), "--categories", "heads",
                 "-q"]) == 0
    assert face_detail(tmp_path / "o.png") < 0.3 * face_detail(a)


@pytest.mark.parametrize("bad", [["--mask-scale", "9"], ["--fill-color", "1,2"],
                                 ["--detect-every", "0"], ["--method", "smear"]])
def test_bad_arguments_exit_2(tmp_path: Path, bad: list[str]) -> None:
    a = write_photo(tmp_path / "a.jpg", "JPEG")
    try:  # argparse exits by itself; settings checks return the status
        rc = main(["file", str(a), "-o", str(tmp_path / "out"), *bad])
    except SystemExit as exc:
        rc = exc.code  # type: ignore[assignment]
    assert rc == 2
    assert not (tmp_path / "out").exists()


def test_corrupt_input_exits_1_others_still_processed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "in"
    write_photo(root / "a.jpg", "JPEG")
    (root / "broken.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 40_000, np.uint8).tobytes())
    write_clip(root / "z.mp4", n=6)
    out = tmp_path / "out"
    manifest_path = tmp_path / "m.json"
    rc = main(["file", str(root), "-o", str(out), "--json", str(manifest_path)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "broken.mp4" in err and "not a supported image" in err
    assert "1 of 3 inputs failed" in err
    assert files_under(out) == ["a.jpg", "z.mp4"]
    m = json.loads(manifest_path.read_text())
    assert sorted(f["input"] for f in m["files"]) == ["a.jpg", "z.mp4"]


def test_corrupt_photo_exits_1_others_still_processed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "in"
    (root / "a_broken.jpg").parent.mkdir(parents=True)
    (root / "a_broken.jpg").write_bytes(
        np.random.default_rng(0).integers(0, 256, 40_000, np.uint8).tobytes())
    write_photo(root / "b.png", "PNG")
    rc = main(["file", str(root), "-o", str(tmp_path / "out")])
    assert rc == 1
    assert "a_broken.jpg" in capsys.readouterr().err
    assert files_under(tmp_path / "out") == ["b.png"]


def test_missing_input_and_overwrite_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["file", str(tmp_path / "nope.jpg"), "-o", str(tmp_path / "o.jpg")]) == 1
    assert "no such file" in capsys.readouterr().err
    a = write_photo(tmp_path / "a.jpg", "JPEG")
    before = a.read_bytes()
    assert main(["file", str(a), "-o", str(a)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert a.read_bytes() == before


def test_categories_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["categories"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("faces")
    assert "heads" in text and "available" in text and "yunet" in text


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: redact" in capsys.readouterr().out


def test_face_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_photo(tmp_path / "a.png", "PNG")
    rc = main(["file", str(a), "-o", str(tmp_path / "x.png"), "--face-model-path",
               str(tmp_path / "missing.onnx")])
    assert rc == 1
    assert "missing.onnx" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    # a copy of the packaged model works the same, and the manifest names that file
    model = tmp_path / "models" / "my-yunet.onnx"
    model.parent.mkdir()
    model.write_bytes(YUNET.resolve().read_bytes())
    rc = main(["file", str(a), "-o", str(tmp_path / "y.png"), "--face-model-path", str(model),
               "--json", str(tmp_path / "m.json"), "-q"])
    assert rc == 0
    assert face_detail(tmp_path / "y.png") < 0.3 * face_detail(a)
    (entry,) = json.loads((tmp_path / "m.json").read_text())["files"]
    assert entry["models"][0]["path"] == "my-yunet.onnx"
    assert entry["models"][0]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
