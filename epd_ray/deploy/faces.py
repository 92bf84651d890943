"""Finding faces, cutting them out, blending de-identified faces back, and tracking them across frames.

Images here are uint8 RGB HWC numpy arrays. Detection uses OpenCV's Haar cascade (the frontal-face model
that ships inside opencv-python-headless), or a cascade file the user gives.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from epd_ray.core.baselines import gaussian_blur
from epd_ray.core.images import to_tensor, to_uint8

DEFAULT_CASCADE = "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class Box:
    """A face rectangle in pixels (x, y: top-left corner)."""

    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h

    def iou(self, other: "Box") -> float:
        ix = max(0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        iy = max(0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


def seed_for(*parts: object) -> int:
    """A stable 31-bit seed from any printable parts (the same parts give the same seed in every run)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


class FaceDetector:
    """Haar-cascade face detector: `min_face` px smallest side, `min_neighbors` (higher: fewer false
    positives, more misses), `scale_factor` (image pyramid step, > 1; smaller: slower, finds more)."""

    def __init__(self, min_face: int = 40, min_neighbors: int = 5, scale_factor: float = 1.1,
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
        boxes = [Box(int(x), int(y), int(w), int(h)) for x, y, w, h in (found if len(found) else [])]
        return sorted(boxes, key=lambda b: -b.area)


@dataclass(frozen=True)
class Region:
    """The square a face is cut from (may reach past the image border) and the face box inside it."""

    x0: int
    y0: int
    side: int
    box: Box


def face_region(box: Box, margin: float) -> Region:
    """A square centred on the box, `margin` of the box's larger side added on every side."""
    side = max(8, int(round(max(box.w, box.h) * (1.0 + 2.0 * margin))))
    cx, cy = box.x + box.w / 2.0, box.y + box.h / 2.0
    return Region(int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side, box)


def cut(image: np.ndarray, region: Region) -> np.ndarray:
    """The region's square, edge pixels repeated where it reaches past the border."""
    h, w = image.shape[:2]
    x0, y0, s = region.x0, region.y0, region.side
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x0 + s), min(h, y0 + s)
    crop = image[cy0:cy1, cx0:cx1]
    return cv2.copyMakeBorder(crop, cy0 - y0, y0 + s - cy1, cx0 - x0, x0 + s - cx1, cv2.BORDER_REPLICATE)


def resize(image: np.ndarray, side_w: int, side_h: int | None = None) -> np.ndarray:
    side_h = side_w if side_h is None else side_h
    h, w = image.shape[:2]
    if (w, h) == (side_w, side_h):
        return np.ascontiguousarray(image)
    shrink = side_w < w or side_h < h
    return cv2.resize(image, (side_w, side_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def face_mask(region: Region, feather: float = 0.08) -> np.ndarray:
    """Soft elliptical mask (float32, side x side, 1 inside the face, 0 at the square's edge).

    The ellipse covers the detected box with some room (Haar boxes cut the chin and forehead); the edge is
    feathered with a Gaussian of `feather` * side, placed so the box itself stays fully replaced.
    """
    s, b = region.side, region.box
    cx, cy = b.x + b.w / 2.0 - region.x0, b.y + b.h / 2.0 - region.y0
    sigma = max(1.0, feather * s)
    ax = min(b.w * 0.62 + sigma, s / 2.0 - 1.5 * sigma)
    ay = min(b.h * 0.72 + sigma, s / 2.0 - 1.5 * sigma)
    mask = np.zeros((s, s), np.float32)
    cv2.ellipse(mask, (int(round(cx)), int(round(cy))), (max(1, int(ax)), max(1, int(ay))), 0, 0, 360, 1.0, -1)
    k = 2 * int(np.ceil(3 * sigma)) + 1
    return cv2.GaussianBlur(mask, (k, k), sigma)


def paste(image: np.ndarray, region: Region, face: np.ndarray, mask: np.ndarray) -> None:
    """Blend `face` (side x side RGB) into `image` in place where the region overlaps it."""
    h, w = image.shape[:2]
    x0, y0, s = region.x0, region.y0, region.side
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x0 + s), min(h, y0 + s)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    sub = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    m = mask[sub][..., None]
    dst = image[cy0:cy1, cx0:cx1].astype(np.float32)
    image[cy0:cy1, cx0:cx1] = np.clip(m * face[sub].astype(np.float32) + (1.0 - m) * dst + 0.5, 0, 255).astype(np.uint8)


BLUR_WORK_SIDE = 256  # blur at this short side and scale back: same look, bounded cost on large images


def blur_image(image: np.ndarray) -> np.ndarray:
    """Strong Gaussian blur (baselines.gaussian_blur at its default sigma, side / 16) of a whole image."""
    h, w = image.shape[:2]
    scale = min(1.0, BLUR_WORK_SIDE / min(h, w))
    small = resize(image, max(1, round(w * scale)), max(1, round(h * scale)))
    blurred = to_uint8(gaussian_blur(to_tensor(small)))[0]
    return resize(blurred, w, h)


def blur_face(image: np.ndarray, region: Region) -> None:
    """Blur one face in place (soft mask), for faces found but not replaced."""
    paste(image, region, blur_image(cut(image, region)), face_mask(region))


class IoUTracker:
    """Greedy IoU tracking of face boxes across video frames.

    Each track gets a fixed seed, so the generator draws the same noise z for the same face in every
    frame (no flicker). A track missed for up to `max_missed` frames keeps its last box (and stays
    replaced), so a detector's brief miss does not show the face.
    """

    def __init__(self, base_seed: int, iou_threshold: float = 0.3, max_missed: int = 5):
        self.base_seed = base_seed
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.tracks: dict[int, tuple[Box, int]] = {}  # id -> (last box, frames missed)
        self.next_id = 0

    def seed(self, track_id: int) -> int:
        return seed_for(self.base_seed, "track", track_id)

    def update(self, boxes: list[Box]) -> list[tuple[Box, int]]:
        """(box, track id) of every face to replace in this frame: detections, then coasting tracks."""
        pairs = sorted(((box.iou(tb), i, tid) for i, box in enumerate(boxes)
                        for tid, (tb, _) in self.tracks.items()), reverse=True)
        assigned: dict[int, int] = {}
        used: set[int] = set()
        for iou, i, tid in pairs:
            if iou < self.iou_threshold:
                break
            if i in assigned or tid in used:
                continue
            assigned[i] = tid
            used.add(tid)
        out = []
        for i, box in enumerate(boxes):
            tid = assigned.get(i)
            if tid is None:
                tid, self.next_id = self.next_id, self.next_id + 1
            self.tracks[tid] = (box, 0)
            out.append((box, tid))
        for tid in list(self.tracks):
            if tid in used or any(t == tid for _, t in out):
                continue
            box, missed = self.tracks[tid]
            if missed + 1 > self.max_missed:
                del self.tracks[tid]
            else:
                self.tracks[tid] = (box, missed + 1)
                out.append((box, tid))
        return out

