"""Face detectors on onnxruntime: YuNet (fast, default), YuNetPhoto (YuNet fitted for
multi-pass photo redaction) and CenterFace (high recall).

Each takes a BGR uint8 image (H, W, 3) and return :class:`Detections` in that image's pixels.
Each runs at one or more input scales: ``scales`` multiplies the image size before the model sees
it (2.0 doubles it, so faces half as large are found), and the results of every scale are merged
by non-maximum suppression.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.arrays import device_of, to_host
from engines.backends import backend_for, load_model
from engines.detections import Detections, nms
from engines.models import CENTERFACE, YUNET, ModelSpec, dynamic_onnx_bytes, sha256_file

CATEGORY = "faces"
_STRIDE_ALIGN = 32
DEFAULT_MAX_INPUT_PIXELS = 3840 * 2160  # a pass never feeds the model more than this
UPSCALED_PASS_MAX_FACE_PX = 160  # model-input pixels; larger boxes of enlarged passes are dropped


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    sha256: str
    license: str


def effective_scales(shape: tuple[int, ...], scales: Sequence[float],
                     max_input_pixels: int) -> list[float]:
    """The scales actually run on an image of ``shape``: each capped so that the model input
    stays within ``max_input_pixels``, and near-duplicates (within 10%) run once."""
    h, w = shape[:2]
    cap = math.sqrt(max_input_pixels / max(h * w, 1))
    out: list[float] = []
    for s in sorted(min(float(s), cap) for s in scales):
        if not out or s > out[-1] * 1.1:
            out.append(s)
    return out


def _letterbox(image: np.ndarray, scale: float) -> tuple[np.ndarray, float, float]:
    """Resize by ``scale`` then pad right/bottom to multiples of 32. Returns image, sx, sy."""
    h, w = image.shape[:2]
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = image if (nw, nh) == (w, h) else cv2.resize(
        image, (nw, nh), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
    pw = -(-nw // _STRIDE_ALIGN) * _STRIDE_ALIGN
    ph = -(-nh // _STRIDE_ALIGN) * _STRIDE_ALIGN
    if (pw, ph) != (nw, nh):
        resized = cv2.copyMakeBorder(resized, 0, ph - nh, 0, pw - nw, cv2.BORDER_CONSTANT, value=0)
    return resized, nw / w, nh / h


class _OnnxFaceModel:
    """Shared plumbing, safe to call from several threads. The model is loaded through
    :func:`engines.backends.load_model` (once per process and device) with a dynamic batch, so
    frames from several streams may share one run."""

    spec: ModelSpec
    input_name: str

    def __init__(self, threshold: float, scales: Sequence[float], model_path: str | None,
                 threads: int, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
                 nms_iou: float = 0.3, device: str = "cpu", shared: bool = True) -> None:
        if not scales or min(scales) <= 0:
            raise ValueError("input scales must be a non-empty list of positive numbers")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"detection threshold {threshold} is outside (0, 1)")
        self.threshold = float(threshold)
        self.scales = tuple(float(s) for s in scales)
        self.max_input_pixels = int(max_input_pixels)
        self.nms_iou = nms_iou
        self.path: Path = self.spec.resolve(model_path)
        self._session = load_model(
            dynamic_onnx_bytes(self.path, {self.input_name: ["B", 3, "H", "W"]}),
            device=device, threads=threads, batch=True, shared=shared)
        # the model runs on the GPU: inputs made there are fed without a copy
        self._feeds_device = backend_for(device).device == "cuda"

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.spec.name, self.path.name, sha256_file(self.path), self.spec.license)

    # True where _detect_scaled makes its input from a frame in GPU memory on the GPU
    takes_device_frames = False

    def detect(self, image: np.ndarray) -> Detections:
        if not self.takes_device_frames and device_of(image) != "cpu":
            image = to_host(image)
        boxes, scores = [], []
        passes = effective_scales(image.shape, self.scales, self.max_input_pixels)
        for scale in passes:
            enlarged = scale > passes[0] * 1.1
            b, s = self._detect_scaled(image, scale, self._pass_threshold(enlarged))
            if enlarged and len(b):
                # an enlarged pass is there for small faces; a large box in it is a texture
                # blown up to face size (badges, patterns), and the first pass sees large faces
                small = (b[:, 2:] - b[:, :2]).min(1) * scale <= UPSCALED_PASS_MAX_FACE_PX
                small &= self._enlarged_keep(b, s)
                b, s = b[small], s[small]
            boxes.append(b)
            scores.append(s)
        xyxy = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
        score = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        if len(passes) > 1 and len(xyxy):
            keep = nms(xyxy, score, self.nms_iou)
            xyxy, score = xyxy[keep], score[keep]
        h, w = image.shape[:2]
        xyxy = np.clip(xyxy, 0, [w, h, w, h]).astype(np.float32)
        ok = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        return Detections.from_boxes(xyxy[ok], score[ok], CATEGORY)

    def _pass_threshold(self, enlarged: bool) -> float:
        """The score a box of one pass needs; ``enlarged`` for the passes above the first."""
        return self.threshold

    def _enlarged_keep(self, xyxy: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Which boxes (image pixels) of an enlarged pass that passed
        :meth:`_pass_threshold` to keep; all by default."""
        return np.ones(len(score), bool)

    def _run(self, blob: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        return list(self._session.run(outputs, {self.input_name: blob}))

    def _letterbox_on_device(self, image: Any, scale: float) -> tuple[Any, float, float, int]:
        """:func:`_letterbox` of a frame in GPU memory, as one kernel there
        (:func:`engines.cuda_kernels.letterbox_planar`): the input (1, 3, H, W) float32, left
        on the GPU for a GPU model or copied back for a CPU one, and sx, sy, padded width."""
        from engines.cuda_kernels import letterbox_planar

        h, w = image.shape[:2]
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        pw = -(-nw // _STRIDE_ALIGN) * _STRIDE_ALIGN
        ph = -(-nh // _STRIDE_ALIGN) * _STRIDE_ALIGN
        blob = letterbox_planar(image, pw, ph, scale, scale)
        if not self._feeds_device:
            blob = np.asarray(blob.copy_to_host())
        return blob, nw / w, nh / h, pw

    def _detect_scaled(self, image: np.ndarray, scale: float,
                       threshold: float) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class YuNet(_OnnxFaceModel):
    """YuNet 2023mar: anchor-free, strides 8/16/32; finds faces from about 10 px at scale 1."""

    spec = YUNET
    input_name = "input"
    _strides = (8, 16, 32)
    # YuNet's box runs from the brow to about the mouth and stops short of the chin, most of
    # all on masked faces; move its top edge down 5% and its bottom edge down 10% of the box
    # height so the covered region reaches the chin (measured on annotated photos).
    _top_shift = 0.05
    _bottom_shift = 0.10

    def __init__(self, threshold: float = 0.5, scales: Sequence[float] = (1.0,),
                 model_path: str | None = None, threads: int = 0,
                 max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS, device: str = "cpu",
                 shared: bool = True) -> None:
        super().__init__(threshold, scales, model_path, threads, max_input_pixels,
                         device=device, shared=shared)
        self._outputs = [f"{k}_{s}" for s in self._strides for k in ("cls", "obj", "bbox")]

    takes_device_frames = True

    def _detect_scaled(self, image: np.ndarray, scale: float,
                       threshold: float) -> tuple[np.ndarray, np.ndarray]:
        if device_of(image) == "cpu":
            padded, sx, sy = _letterbox(image, scale)
            pw = padded.shape[1]
            blob: Any = padded.transpose(2, 0, 1)[None].astype(np.float32)
        else:
            blob, sx, sy, pw = self._letterbox_on_device(image, scale)
        out = self._run(blob, self._outputs)
        boxes, scores = [], []
        for i, stride in enumerate(self._strides):
            cls, obj, bbox = out[3 * i][0, :, 0], out[3 * i + 1][0, :, 0], out[3 * i + 2][0]
            score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
            idx = np.nonzero(score >= threshold)[0]
            if not idx.size:
                continue
            cols = pw // stride
            row, col = idx // cols, idx % cols
            b = bbox[idx]
            cx = (col + b[:, 0]) * stride
            cy = (row + b[:, 1]) * stride
            bw = np.exp(b[:, 2]) * stride
            bh = np.exp(b[:, 3]) * stride
            boxes.append(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1))
            scores.append(score[idx])
        if not boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        xyxy = np.concatenate(boxes).astype(np.float32)
        sc = np.concatenate(scores).astype(np.float32)
        keep = nms(xyxy, sc, self.nms_iou)
        xyxy = xyxy[keep]
        h = xyxy[:, 3] - xyxy[:, 1]
        xyxy[:, 1] += self._top_shift * h
        xyxy[:, 3] += self._bottom_shift * h
        return xyxy / np.array([sx, sy, sx, sy], np.float32), sc[keep]


class YuNetPhoto(YuNet):
    """YuNet fitted for photos, where several passes run and small faces matter most.

    Same model and passes as :class:`YuNet`, these differences, each measured on the annotated
    faces photo set (street and crowd scenes, most faces masked, many under 16 px):

    - the enlarged passes (there for small faces) accept a box at 2/3 of ``threshold`` (0.2
      for 0.3), and one under ``TINY_BOX_PX`` on its short side (image pixels) at half of it
      (0.15): a small face scores lower, the smaller the lower, and those passes drop boxes
      larger than ``UPSCALED_PASS_MAX_FACE_PX`` anyway, so the extra boxes are small (tuning
      folds of that set: recall_small +0.030, recall unchanged, 0.002 more of the image
      changed outside faces);
    - the box moves down by 15% of its height instead of being stretched (top +5%, bottom
      +10%): the stretched box's top lies, at the median, 15% of the face height above the
      annotated top while its bottom is at the chin, so the move takes 10% off the forehead and
      adds 5% below the chin (on that set: 0.008 less of the image changed outside faces,
      recall +0.002);
    - boxes under ``SMALL_BOX_PX`` on their short side grow by ``SMALL_BOX_PAD_PX`` on every
      side: their edges are off by about a pixel (the model sees them at stride 8 after an
      enlargement), which at 12 px is a tenth of the face;
    - boxes of ``LARGE_BOX_PX`` or more on their short side keep ``LARGE_BOX_HEIGHT`` of their
      height, about their centre: there the moved box is, at the median, about 10% taller than
      the annotated face (its width is right) and the ellipse grown by the mask scale covers
      it with room to spare, so the cut takes forehead and neck off the redacted area (tuning
      folds: 0.011 less of the image changed outside faces, recall unchanged).

    The single-pass video path keeps :class:`YuNet`.
    """

    _top_shift = 0.15
    _bottom_shift = 0.15
    ENLARGED_THRESHOLD_RATIO = 2 / 3
    TINY_THRESHOLD_RATIO = 1 / 2
    TINY_BOX_PX = 12.0
    LARGE_BOX_PX = 40.0
    LARGE_BOX_HEIGHT = 0.9
    SMALL_BOX_PX = 25.0
    SMALL_BOX_PAD_PX = 1.0

    def __init__(self, threshold: float = 0.3, scales: Sequence[float] = (1.0, 2.0, 3.0),
                 model_path: str | None = None, threads: int = 0,
                 max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS, device: str = "cpu",
                 shared: bool = True) -> None:
        super().__init__(threshold, scales, model_path, threads, max_input_pixels,
                         device=device, shared=shared)

    def _pass_threshold(self, enlarged: bool) -> float:
        if not enlarged:
            return self.threshold
        return self.threshold * min(self.ENLARGED_THRESHOLD_RATIO, self.TINY_THRESHOLD_RATIO)

    def _enlarged_keep(self, xyxy: np.ndarray, score: np.ndarray) -> np.ndarray:
        tiny = (xyxy[:, 2:] - xyxy[:, :2]).min(1) < self.TINY_BOX_PX
        ratio = np.where(tiny, self.TINY_THRESHOLD_RATIO, self.ENLARGED_THRESHOLD_RATIO)
        return score >= self.threshold * ratio

    def detect(self, image: np.ndarray) -> Detections:
        found = super().detect(image)
        if not len(found):
            return found
        xyxy = found.xyxy.copy()
        side = (xyxy[:, 2:] - xyxy[:, :2]).min(1)
        small = side < self.SMALL_BOX_PX
        pad = self.SMALL_BOX_PAD_PX
        xyxy[small] += np.array([-pad, -pad, pad, pad], np.float32)
        large = side >= self.LARGE_BOX_PX
        if large.any():
            cy = (xyxy[large, 1] + xyxy[large, 3]) / 2
            half = (xyxy[large, 3] - xyxy[large, 1]) * (self.LARGE_BOX_HEIGHT / 2)
            xyxy[large, 1], xyxy[large, 3] = cy - half, cy + half
        h, w = image.shape[:2]
        xyxy = np.clip(xyxy, 0, [w, h, w, h]).astype(np.float32)
        return Detections.from_boxes(xyxy, found.score, CATEGORY)


class CenterFace(_OnnxFaceModel):
    """CenterFace: a centre heat map at stride 4; finds more small and side-on faces, slower."""

    spec = CENTERFACE
    input_name = "input.1"

    def __init__(self, threshold: float = 0.4, scales: Sequence[float] = (1.0,),
                 model_path: str | None = None, threads: int = 0,
                 max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS, device: str = "cpu",
                 shared: bool = True) -> None:
        super().__init__(threshold, scales, model_path, threads, max_input_pixels,
                         device=device, shared=shared)

    def _detect_scaled(self, image: np.ndarray, scale: float,
                       threshold: float) -> tuple[np.ndarray, np.ndarray]:
        padded, sx, sy = _letterbox(image, scale)
        blob = padded[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)  # RGB
        heat, size, offset = self._run(blob, ["537", "538", "539"])
        heat = heat[0, 0]
        ys, xs = np.nonzero(heat >= threshold)
        if not ys.size:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        bh = np.exp(size[0, 0, ys, xs]) * 4
        bw = np.exp(size[0, 1, ys, xs]) * 4
        cy = (ys + offset[0, 0, ys, xs] + 0.5) * 4
        cx = (xs + offset[0, 1, ys, xs] + 0.5) * 4
        xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(np.float32)
        sc = heat[ys, xs].astype(np.float32)
        keep = nms(xyxy, sc, self.nms_iou)
        return xyxy[keep] / np.array([sx, sy, sx, sy], np.float32), sc[keep]
