"""Dense optical flow between consecutive frames, quantised like dense_flow's JPEG flow frames.

The UCF-101 references read TV-L1 flow stored as grayscale JPEGs, `clip(flow, ±bound)` mapped
linearly to 0..255 (dense_flow `-b 20`). TV-L1 costs ~0.5 s per 224×224 pair on a CPU core and
needs opencv-contrib, so DIS (medium preset, ~3 ms) is the default (docs/data.md#optical-flow).
"""

from __future__ import annotations

import itertools
from typing import Literal

import cv2
import numpy as np

from mmval.data.extract import ExtractionError
from mmval.errors import UserError


def optical_flow(
    frames: np.ndarray,
    *,
    method: Literal["dis", "farneback", "tvl1"] = "dis",
    bound: float = 20.0,
) -> np.ndarray:
    """Flow of each consecutive pair of uint8 RGB frames [N, H, W, 3] as uint8 [N-1, H, W, 2].

    Channel 0 is u (x, rightwards), 1 is v (y, downwards), in pixels, computed on grayscale
    frames; each is clipped to [-bound, bound] and mapped to round(255 * (f + bound) / (2 *
    bound)), so zero motion is 128 (dense_flow's convention).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] frames, got {frames.dtype} {frames.shape}")
    if frames.shape[0] < 2:
        raise ExtractionError("need at least 2 frames for optical flow")
    if bound <= 0:
        raise ValueError(f"bound must be positive, got {bound}")
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

        def calc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return dis.calc(a, b, None)

    elif method == "farneback":

        def calc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)

    elif method == "tvl1":
        if not hasattr(cv2, "optflow"):
            raise UserError(
                "tvl1 optical flow needs opencv-contrib-python-headless; use method dis or "
                "farneback"
            )
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()

        def calc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return tvl1.calc(a, b, None)

    else:
        raise ValueError(f"unknown optical flow method {method!r}")
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    flow = np.stack([calc(a, b) for a, b in itertools.pairwise(gray)])
    clipped = np.clip(flow.astype(np.float64), -bound, bound)
    return np.rint(255.0 * (clipped + bound) / (2 * bound)).astype(np.uint8)


def flow_pair_frames(flow: np.ndarray) -> np.ndarray:
    """Quantised flow [N-1, H, W, 2] as grayscale planes [u0, v0, u1, v1, ...] [2(N-1), H, W, 1].

    This is the layout of the flow JPEG list in a shard (one grayscale JPEG per plane).
    """
    if flow.dtype != np.uint8 or flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"expected uint8 flow [N, H, W, 2], got {flow.dtype} {flow.shape}")
    n, h, w, _ = flow.shape
    return np.ascontiguousarray(flow.transpose(0, 3, 1, 2)).reshape(2 * n, h, w, 1)
