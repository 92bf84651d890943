"""Face detectors on uint8 RGB HWC numpy arrays: CenterFace (default) and OpenCV's Haar cascade.

CenterFace is a small CNN (7 MB ONNX, run by OpenCV's DNN module) that finds tilted, profile, small and
partly covered faces Haar misses, and gives five landmarks per face (eyes, nose tip, mouth corners).
Its weights ship inside this package (see CENTERFACE-LICENSE.txt for where they come from) and are
checked against their digest when loaded; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

DEFAULT_CASCADE = "haarcascade_frontalface_default.xml"
CENTERFACE = Path(__file__).with_name("centerface.onnx")
CENTERFACE_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"
DETECTORS = ("centerface", "haar")
MIN_FACE = {"centerface": 16, "haar": 40}  # default smallest face side, px
# Context around a detected face, a fraction of its larger side on every side: `deidentify` cuts faces so
# and data preparation cuts faces so, so a generator trains on the framing it is given. Zero: CenterFace's box
# already runs from the hairline to the chin, and at 64 px every pixel of context is one the face loses. On
# JAFFE's frames cut with 0.25 (the face two thirds of the side) / 0 the model kept 0.79 / 0.86 of the test
# expressions (S_e), 0.30 / 0.58 as the pretrained FER-2013 reader reads them, at the same J (README).
FACE_MARGIN = 0.0
MAX_MARGIN = 2.0  # the most context a square may take (five times the face's side): more is a scene, not a face


@dataclass(frozen=True)
class Box:
    """A face rectangle in pixels (x, y: top-left corner), the detector's confidence and, when the detector
    gives them, landmarks as (x, y) points: left eye, right eye, nose tip, left and right mouth corner
    (left/right as seen in the image)."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0
    landmarks: tuple[tuple[float, float], ...] = ()

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def roll(self) -> float:
        """In-plane tilt in degrees from the line through the eyes (clockwise in image coordinates); 0 when
        there are no landmarks."""
        if len(self.landmarks) < 2:
            return 0.0
        (x0, y0), (x1, y1) = self.landmarks[:2]
        return math.degrees(math.atan2(y1 - y0, x1 - x0))

    def iou(self, other: "Box") -> float:
        ix = max(0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        iy = max(0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def moved(self, dx: float, dy: float) -> "Box":
        """The same box (landmarks too) shifted by (dx, dy) px."""
        ix, iy = int(round(dx)), int(round(dy))
        return Box(self.x + ix, self.y + iy, self.w, self.h, self.score,
                   tuple((px + ix, py + iy) for px, py in self.landmarks))


@dataclass(frozen=True)
class Region:
    """The square a face is cut from (may reach past the image border) and the face box inside it."""

    x0: int
    y0: int
    side: int
    box: Box


def face_region(box: Box, margin: float = FACE_MARGIN) -> Region:
    """A square centred on the box, `margin` of the box's larger side added on every side."""
    side = max(8, int(round(max(box.w, box.h) * (1.0 + 2.0 * margin))))
    cx, cy = box.x + box.w / 2.0, box.y + box.h / 2.0
    return Region(int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side, box)


class Detector(Protocol):
    def detect(self, rgb: np.ndarray) -> list[Box]: ...


def _largest_first(boxes: list[Box]) -> list[Box]:
    return sorted(boxes, key=lambda b: -b.area)


class HaarDetector:
    """Haar-cascade face detector: `min_face` px smallest side, `min_neighbors` (higher: fewer false
    positives, more misses), `scale_factor` (image pyramid step, > 1; smaller: slower, finds more)."""

    def __init__(self, min_face: int = MIN_FACE["haar"], min_neighbors: int = 5, scale_factor: float = 1.1,
                 cascade: Path | str | None = None):
        if min_face < 8:
            raise ValueError(f"min_face must be >= 8 px, got {min_face}")
        if min_neighbors < 0:
            raise ValueError(f"detector threshold (minNeighbors) must be >= 0, got {min_neighbors}")
        if not scale_factor > 1.0:
            raise ValueError(f"scale factor must be > 1, got {scale_factor}")
        path = Path(cascade) if cascade is not None else Path(cv2.data.haarcascades) / DEFAULT_CASCADE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such cascade file")
        self.classifier = cv2.CascadeClassifier(str(path))
        if self.classifier.empty():
            raise ValueError(f"{path}: OpenCV cannot load this cascade file")
        self.min_face = int(min_face)
        self.min_neighbors = int(min_neighbors)
        self.scale_factor = float(scale_factor)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Faces in an RGB image, largest first."""
        grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        found = self.classifier.detectMultiScale(grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                                 minSize=(self.min_face, self.min_face))
        return _largest_first([Box(int(x), int(y), int(w), int(h)) for x, y, w, h in (found if len(found) else [])])


class CenterFaceDetector:
    """CenterFace (anchor-free, one pass at the image's own resolution): faces whose centre heatmap peak
    reaches `min_score` and whose larger side is at least `min_face` px, overlaps above `nms_iou` merged."""

    OUTPUTS = ["537", "538", "539", "540"]  # heatmap, log box size, centre offset, landmarks (stride 4)
    MAX_NETS = 8

    def __init__(self, min_face: int = MIN_FACE["centerface"], min_score: float = 0.2, nms_iou: float = 0.3):
        if min_face < 8:
            raise ValueError(f"min_face must be >= 8 px, got {min_face}")
        if not 0.0 < min_score < 1.0:
            raise ValueError(f"min score must be in (0, 1), got {min_score}")
        model = CENTERFACE.read_bytes()
        if hashlib.sha256(model).hexdigest() != CENTERFACE_SHA256:
            raise ValueError(f"{CENTERFACE}: not the CenterFace weights this package ships (digest differs); "
                             "reinstall epd-ray")
        self.model = np.frombuffer(model, np.uint8)
        self.min_face = int(min_face)
        self.min_score = float(min_score)
        self.nms_iou = float(nms_iou)
        # One network per input size: OpenCV's DNN gives wrong outputs when a loaded CenterFace is fed a
        # second input size (checked with OpenCV 4.14), and loading one takes ~10 ms.
        self.nets: dict[tuple[int, int], cv2.dnn.Net] = {}

    def _net(self, shape: tuple[int, int]) -> "cv2.dnn.Net":
        net = self.nets.pop(shape, None)
        if net is None:
            net = cv2.dnn.readNetFromONNX(self.model)
            if len(self.nets) >= self.MAX_NETS:
                self.nets.pop(next(iter(self.nets)))
        self.nets[shape] = net  # most recently used last
        return net

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Faces in an RGB image, largest first, each with its score and five landmarks."""
        h, w = rgb.shape[:2]
        ph, pw = -h % 32, -w % 32  # the network halves the image 5 times: pad to a multiple of 32
        padded = cv2.copyMakeBorder(rgb, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0) if ph or pw else rgb
        net = self._net((h + ph, w + pw))
        net.setInput(np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32))
        heat, size, offset, marks = net.forward(self.OUTPUTS)
        ys, xs = np.nonzero(heat[0, 0] > self.min_score)
        if len(ys) == 0:
            return []
        scores = heat[0, 0, ys, xs]
        bh, bw = np.exp(size[0, 0, ys, xs]) * 4, np.exp(size[0, 1, ys, xs]) * 4
        x0 = np.clip((xs + offset[0, 1, ys, xs] + 0.5) * 4 - bw / 2, 0, w)
        y0 = np.clip((ys + offset[0, 0, ys, xs] + 0.5) * 4 - bh / 2, 0, h)
        x1, y1 = np.minimum(x0 + bw, w), np.minimum(y0 + bh, h)
        lx = marks[0, 1::2, ys, xs] * bw[:, None] + x0[:, None]  # (faces, 5)
        ly = marks[0, 0::2, ys, xs] * bh[:, None] + y0[:, None]
        rects = np.stack([x0, y0, x1 - x0, y1 - y0], 1)
        keep = cv2.dnn.NMSBoxes(rects.tolist(), scores.tolist(), self.min_score, self.nms_iou)
        boxes = []
        for i in np.asarray(keep, dtype=int).reshape(-1):
            bx, by = int(x0[i]), int(y0[i])
            box = Box(bx, by, int(math.ceil(x1[i])) - bx, int(math.ceil(y1[i])) - by, float(scores[i]),
                      tuple((float(px), float(py)) for px, py in zip(lx[i], ly[i])))
            if max(box.w, box.h) >= self.min_face:
                boxes.append(box)
        return _largest_first(boxes)


def make_detector(name: str = "centerface", min_face: int | None = None, min_score: float = 0.2,
                  min_neighbors: int = 5, scale_factor: float = 1.1, cascade: Path | str | None = None) -> Detector:
    """A detector by name; `min_face` None takes the detector's own default (MIN_FACE)."""
    if name not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {name!r}")
    min_face = MIN_FACE[name] if min_face is None else min_face
    if name == "haar":
        return HaarDetector(min_face, min_neighbors, scale_factor, cascade)
    if cascade is not None:
        raise ValueError("a cascade file is for the Haar detector: add --detector haar")
    return CenterFaceDetector(min_face, min_score)
