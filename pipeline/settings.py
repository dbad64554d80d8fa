"""One validated settings model from a user's choices to the detectors and kernels, used by
``redact file``, media jobs and live streams alike.

:class:`RedactSettings` holds the categories, the style (method, shape, mask scale, and per
category overrides), per-category detector settings, user models, privacy zones and the
detector profiles; :meth:`RedactSettings.detector` builds its detector, and
:func:`settings_from_choices` turns an API request's or a stream definition's choices into one.

The settings file of ``redact file --config`` (and ``--set``), also a stream's ``config``: per
category settings and user-supplied detectors. TOML, for example::

    [category.faces]
    threshold = 0.2          # detection score a box needs
    method = "pixelate"      # blur | pixelate | fill
    mask_scale = 1.5

    [category.license_plates]
    period = 5               # video frames between detector calls
    scale = 1.25             # detector input size multiplier

    [[model]]                # an ONNX detector you trained (YOLO-style outputs)
    path = "tattoos.onnx"    # relative to this file
    classes = { 0 = "tattoos", 1 = "id_cards" }
    threshold = 0.4
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.gpu import env_device_default, parse_device, select_device
from engines.redact import Method, Style
from engines.registry import (
    IMAGE_PROFILE,
    VIDEO_PROFILE,
    CategorySettings,
    CompositeDetector,
    DetectorConfig,
    build_detector,
    category,
    resolve_categories,
)
from pipeline.video import VideoOptions

if TYPE_CHECKING:
    from engines.custom import CustomModelConfig

Zone = Sequence[Sequence[float]]  # polygon: frame pixels, or fractions when all are <= 1

@dataclass(frozen=True)
class RedactSettings:
    categories: tuple[str, ...] = ("faces",)
    style: Style = field(default_factory=Style)
    per_category: dict[str, CategorySettings] = field(default_factory=dict)
    custom_models: tuple[CustomModelConfig, ...] = ()
    image_detector: DetectorConfig = IMAGE_PROFILE
    video_detector: DetectorConfig = VIDEO_PROFILE
    video: VideoOptions = field(default_factory=VideoOptions)
    keep_metadata: bool = False
    zones: tuple[Zone, ...] = ()  # polygons always covered, whatever the detectors find
    # where models, kernels, decode and encode run: "auto" (a GPU when one is usable here),
    # "cpu" or "cuda" (engines.gpu)
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", parse_device(self.device))
        served = [c for m in self.custom_models for c in m.classes.values()]
        object.__setattr__(self, "categories", resolve_categories(self.categories, served))
        per: dict[str, CategorySettings] = {}
        for name, cs in self.per_category.items():
            canon = resolve_categories([name], served)[0]
            per[canon] = cs
        object.__setattr__(self, "per_category", per)
        for name in self.categories:
            # detectors whose boxes already fit (codes) or whose objects are writing come
            # with their own mask scale and shape unless the user set them for the category
            cat, cs = category(name), per.get(name, CategorySettings())
            fitted = {k: getattr(cat, k) for k in ("mask_scale", "shape")
                      if getattr(cat, k) is not None and getattr(cs, k) is None}
            if fitted:
                per[name] = dataclasses.replace(cs, **fitted)
        overrides: dict[str, Style] = {}
        for name, cs in per.items():
            if cs.method is None and cs.mask_scale is None and cs.shape is None:
                continue
            own = dataclasses.replace(
                self.style, method=cs.method or self.style.method,
                mask_scale=cs.mask_scale or self.style.mask_scale,
                shape=cs.shape or self.style.shape, overrides={})
            overrides[name] = own
            mapped = category(name).maps_to  # text-bearing categories come out as text boxes
            if mapped and mapped not in per:
                overrides.setdefault(mapped, own)
        object.__setattr__(self, "style", dataclasses.replace(self.style, overrides=overrides))

    def detector_config(self, kind: str) -> DetectorConfig:
        cfg = self.image_detector if kind == "image" else self.video_detector
        return replace(cfg, device=self.run_device())

    def run_device(self) -> str:
        """``cpu`` or ``cuda``: where this work runs (DeviceError when ``cuda`` was asked for
        and cannot run here)."""
        return select_device(self.device)

    def detector(self, kind: str) -> CompositeDetector:
        """The detector these settings ask for on ``kind`` ("image" or "video"; live streams
        use "video"). Cheap: the models underneath are the process's shared ones."""
        return build_detector(self.categories, self.detector_config(kind), self.per_category,
                              self.custom_models)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready settings, as recorded in the audit manifest."""

        def plain(v: Any) -> Any:
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, Mapping):
                return {str(k): plain(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [plain(x) for x in v]
            return v.value if isinstance(v, Enum) else v

        d: dict[str, Any] = plain(self)
        d["style"].pop("overrides", None)
        d["per_category"] = {k: {a: b for a, b in v.items() if b is not None}
                             for k, v in d["per_category"].items()}
        return d



TOP_KEYS = ("category", "model")


@dataclass
class FileConfig:
    per_category: dict[str, CategorySettings] = field(default_factory=dict)
    custom_models: list[CustomModelConfig] = field(default_factory=list)


def load_config(path: Path) -> FileConfig:
    """Read a settings file; ValueError naming the file and the key on any mistake."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read settings file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, path.parent, where=f"{path}: ")


def config_from_dict(data: Mapping[str, Any], base_dir: Path | None = None,
                     where: str = "") -> FileConfig:
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"{where}unknown section(s) {', '.join(unknown)}; "
                         f"known: {', '.join(TOP_KEYS)}")
    out = FileConfig()
    cats = data.get("category", {})
    if not isinstance(cats, Mapping):
        raise ValueError(f"{where}[category] must be a table of tables")
    for name, table in cats.items():
        if not isinstance(table, Mapping):
            raise ValueError(f"{where}[category.{name}] must be a table")
        out.per_category[str(name)] = CategorySettings.from_dict(
            table, where=f"{where}[category.{name}] ")
    models = data.get("model", [])
    if isinstance(models, Mapping):
        models = [models]
    if not isinstance(models, list):
        raise ValueError(f"{where}[[model]] must be an array of tables")
    if models:
        from engines.custom import CustomModelConfig

        for i, table in enumerate(models):
            if not isinstance(table, Mapping):
                raise ValueError(f"{where}[[model]] #{i + 1} must be a table")
            try:
                out.custom_models.append(CustomModelConfig.from_dict(table, base_dir))
            except ValueError as exc:
                raise ValueError(f"{where}[[model]] #{i + 1}: {exc}") from None
    return out


def apply_sets(per_category: dict[str, CategorySettings],
               items: Iterable[str]) -> dict[str, CategorySettings]:
    """``CATEGORY.KEY=VALUE`` overrides (``--set faces.method=pixelate``) on top of a file's."""
    out = dict(per_category)
    for item in items:
        name_key, sep, value = item.partition("=")
        name, dot, key = name_key.strip().partition(".")
        if not sep or not dot or not name or not key:
            raise ValueError(f"--set {item!r}: use CATEGORY.KEY=VALUE, e.g. faces.threshold=0.2")
        current = out.get(name, CategorySettings())
        one = CategorySettings.from_dict({key: value.strip()}, where=f"--set {item!r}: ")
        out[name] = replace(current, **{key: getattr(one, key)})
    return out


def merge_category_settings(base: CategorySettings | None,
                            over: CategorySettings) -> CategorySettings:
    """``over``'s settings where it sets them, else ``base``'s."""
    if base is None:
        return over
    given = {k: getattr(over, k) for k in CategorySettings.KEYS if getattr(over, k) is not None}
    return replace(base, **given)


def settings_from_choices(categories: Sequence[str] | None, *, method: str | None = None,
                          methods: Mapping[str, str] | None = None,
                          settings: Mapping[str, Any] | None = None,
                          config: FileConfig | None = None, zones: Sequence[Zone] = (),
                          threads: int = 0, device: str | None = None) -> RedactSettings:
    """The settings of a media job's or a live stream's choices.

    ``categories``: names or aliases (None or empty: every available one); ``method``: how
    everything is covered (default blur); ``methods``: a method per category; ``settings``:
    per-category tables as in a settings file's ``[category.NAME]`` (``{"faces":
    {"threshold": 0.2}}``); ``config``: a settings file already read (its category tables, and
    its user models, whose categories become available); ``methods`` and ``settings`` win over
    ``config``; ``device``: auto, cpu or cuda (default: REDACT_DEVICE, else auto). Raises ValueError
    (UnknownCategoryError and DeviceError among them) naming what is wrong.
    """
    cfg = config or FileConfig()
    per = dict(cfg.per_category)
    if settings is not None:
        if not isinstance(settings, Mapping):
            raise ValueError("settings: an object of category -> {setting: value}")
        for name, table in settings.items():
            if not isinstance(table, Mapping):
                raise ValueError(f"settings.{name}: an object such as {{\"threshold\": 0.3}}")
            per[str(name)] = merge_category_settings(
                per.get(str(name)), CategorySettings.from_dict(table, where=f"settings.{name}: "))
    for name, m in (methods or {}).items():
        per[name] = merge_category_settings(per.get(name), CategorySettings(
            method=Method.parse(str(m))))
    return RedactSettings(
        categories=tuple(categories or ()),
        style=Style(method=Method.parse(method or "blur")),
        per_category=per,
        custom_models=tuple(cfg.custom_models),
        zones=tuple(tuple(tuple(float(v) for v in p) for p in z) for z in zones),
        image_detector=replace(IMAGE_PROFILE, threads=threads),
        video_detector=replace(VIDEO_PROFILE, threads=threads),
        device=parse_device(device) if device else env_device_default())
