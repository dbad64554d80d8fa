"""The settings file of ``redact file --config`` (and ``--set``): per-category settings and
user-supplied detectors.

TOML, for example::

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

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.registry import CategorySettings

if TYPE_CHECKING:
    from engines.custom import CustomModelConfig

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
