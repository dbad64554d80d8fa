"""Hardware decode and encode on the ``cuda`` device, with the software path as the fallback.

- Decode: NVDEC through PyAV's CUDA hwaccel. On a machine without a usable NVIDIA driver
  ``av.open(..., hwaccel=...)`` raises ``av.error.PermissionError`` despite the software fallback
  flag: the file is then opened again for the CPU decoder, and the run says why. Frames come
  back to system memory and are uploaded once to the GPU as NV12 (:func:`frame_pixels`), so the
  look-ahead holds copies of its own (a bounded number, the pipeline's queues and look-ahead)
  and never a decoder surface.
- Encode: NVENC (``h264_nvenc``) where the card has one (probed once per process by opening the
  encoder: an H100 has NVDEC but no NVENC), else libx264 on the CPU.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import av
import numpy as np

from engines.arrays import to_host

log = logging.getLogger(__name__)

NVENC = "h264_nvenc"


def open_input(src: Path | str, device: str, **kwargs: Any) -> tuple[Any, str]:
    """``av.open(src)`` for decoding on ``device``, and what decodes: ``"nvdec"`` (CUDA
    hwaccel), or ``"cpu"`` (with the reason NVDEC was not used, on the cuda device)."""
    if device == "cuda":
        from av.codec.hwaccel import HWAccel

        try:
            container = av.open(str(src), hwaccel=HWAccel("cuda", allow_software_fallback=True),
                                **kwargs)
            return container, "nvdec"
        except (av.FFmpegError, OSError) as exc:
            reason = f"cpu (NVDEC unavailable: {exc.strerror or exc})"
            log.info("%s", reason)
            return av.open(str(src), **kwargs), reason
    return av.open(str(src), **kwargs), "cpu"


def frame_pixels(vf: Any, device: str, width: int, height: int) -> Any:
    """A decoded frame's pixels where ``device`` works on them: host BGR (H, W, 3) on the CPU,
    an NV12 :class:`engines.cuda_kernels.DeviceImage` on the GPU; cut to ``width`` x ``height``
    (even sides for 4:2:0 output)."""
    if device == "cuda":
        from engines.cuda_kernels import DeviceImage

        if vf.format.name == "nv12" and vf.width == width and vf.height == height:
            nv12 = vf.to_ndarray()  # (H * 3/2, W): Y rows, then interleaved U, V rows
            return DeviceImage.from_nv12_planes(
                np.ascontiguousarray(nv12[:height]),
                np.ascontiguousarray(nv12[height:]).reshape(height // 2, width // 2, 2))
        bgr = vf.to_ndarray(format="bgr24")
        return DeviceImage.from_bgr(np.ascontiguousarray(bgr[:height, :width]))
    pixels = vf.to_ndarray(format="bgr24")
    if pixels.shape[1] != width or pixels.shape[0] != height:
        pixels = np.ascontiguousarray(pixels[:height, :width])
    return pixels


def encoder_frame(pixels: Any) -> Any:
    """The ``av.VideoFrame`` an encoder takes for a redacted frame's pixels (NV12 straight from
    the GPU planes, BGR from a host array)."""
    to_nv12 = getattr(pixels, "to_nv12_host", None)
    if callable(to_nv12):
        return av.VideoFrame.from_ndarray(to_nv12(), format="nv12")
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(to_host(pixels)), format="bgr24")


@cache
def nvenc_available() -> bool:
    """Whether this machine's GPU has an NVENC encoder that opens (probed once)."""
    try:
        cc = av.codec.CodecContext.create(NVENC, "w")
        assert isinstance(cc, av.VideoCodecContext)
        cc.width, cc.height, cc.pix_fmt = 256, 144, "yuv420p"
        cc.time_base = Fraction(1, 30)
        cc.open()
        return True
    except (av.FFmpegError, OSError, ValueError) as exc:
        log.info("no NVENC here: %s", exc)
        return False


def video_codec(device: str, default: str = "libx264") -> str:
    """The H.264 encoder for ``device``: NVENC on a GPU that has one, else ``default``."""
    if device == "cuda" and default == "libx264" and nvenc_available():
        return NVENC
    return default
