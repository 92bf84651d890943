"""Cutting faces out, blending de-identified faces back, and tracking them across video frames.

Images here are uint8 RGB HWC numpy arrays; faces come from `epd_ray.faces` detectors as `Box`es.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from epd_ray.core.baselines import gaussian_blur
from epd_ray.core.images import to_tensor, to_uint8
from epd_ray.faces import Box, Region


def seed_for(*parts: object) -> int:
    """A stable 31-bit seed from any printable parts (the same parts give the same seed in every run)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


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

    The ellipse covers the detected box with some room (Haar boxes cut the chin and forehead), turned by the
    face's roll when the detector gave landmarks; the edge is feathered with a Gaussian of `feather` * side,
    placed so the box itself stays fully replaced where the square leaves room around it. Where it leaves
    little (a small margin), the feather narrows to fit between the box's outer tenth and the square's edge
    (the ellipse's edge 1.5 sigma from each), so the face is replaced up to a tenth of the box from its edge,
    hairline and chin, however small the margin.
    """
    s, b = region.side, region.box
    cx, cy = b.x + b.w / 2.0 - region.x0, b.y + b.h / 2.0 - region.y0
    room = s / 2.0 - 0.4 * max(b.w, b.h)  # from the box's outer tenth to the square's edge
    sigma = max(1.0, min(feather * s, room / 3.0))
    ax = min(b.w * 0.62 + sigma, s / 2.0 - 1.5 * sigma)
    ay = min(b.h * 0.72 + sigma, s / 2.0 - 1.5 * sigma)
    mask = np.zeros((s, s), np.float32)
    cv2.ellipse(mask, (int(round(cx)), int(round(cy))), (max(1, int(ax)), max(1, int(ay))), b.roll, 0, 360, 1.0, -1)
    k = 2 * int(np.ceil(3 * sigma)) + 1
    return cv2.GaussianBlur(mask, (k, k), sigma, borderType=cv2.BORDER_CONSTANT)


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


@dataclass
class Track:
    box: Box  # where the face is in the latest frame (detected, followed or predicted)
    vx: float = 0.0  # the box's motion, px per frame
    vy: float = 0.0
    last_detected: int = 0  # frame index of its latest detection
    patch: np.ndarray | None = None  # grey face patch from its latest detection, for template tracking
    scale: float = 1.0  # patch px per image px


class IoUTracker:
    """Tracks of face boxes across video frames, so that a face the detector misses is still covered.

    Detections join tracks by IoU with each track's box moved by its velocity. A track the detector did not
    find in a frame (it missed, or `detect_every` > 1 skipped that frame) is followed there: its box moved by
    its velocity, then snapped to where its face patch matches best nearby (template matching, when a frame
    is given). It keeps being covered until `hold` frames past the next detection pass after its latest
    detection, then ends. Each track gets a fixed seed, so the generator draws the same noise z for the same
    face in every frame (no flicker). `tracked_only` counts faces covered without a detection in the frame.
    """

    PATCH = 32  # template side, px: matching cost does not grow with the face's size
    MATCH = 0.6  # least normalised correlation for a template match to move the box

    def __init__(self, base_seed: int, iou_threshold: float = 0.3, hold: int = 10, detect_every: int = 1):
        self.base_seed = base_seed
        self.iou_threshold = iou_threshold
        self.expire = hold + detect_every - 1  # frames past its latest detection a track is kept
        self.tracks: dict[int, Track] = {}
        self.next_id = 0
        self.frame = -1
        self.tracked_only = 0

    def seed(self, track_id: int) -> int:
        return seed_for(self.base_seed, "track", track_id)

    def update(self, boxes: list[Box] | None, rgb: np.ndarray | None = None) -> list[tuple[Box, int]]:
        """(box, track id) of every face to cover in this frame: detections first, then followed tracks.
        `boxes` None: the detector did not run on this frame. `rgb`: the frame, for template tracking."""
        self.frame += 1
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb is not None else None
        predicted = {tid: t.box.moved(t.vx, t.vy) for tid, t in self.tracks.items()}
        pairs = sorted(((box.iou(pb), i, tid) for i, box in enumerate(boxes or [])
                        for tid, pb in predicted.items()), reverse=True)
        assigned: dict[int, int] = {}
        for iou, i, tid in pairs:
            if iou < self.iou_threshold:
                break
            if i not in assigned and tid not in assigned.values():
                assigned[i] = tid
        out, found = [], set()
        for i, box in enumerate(boxes or []):
            tid = assigned.get(i)
            if tid is None:
                tid, self.next_id = self.next_id, self.next_id + 1
                self.tracks[tid] = Track(box)
            self._move(self.tracks[tid], box)
            track = self.tracks[tid]
            track.last_detected = self.frame
            if grey is not None:
                track.patch, track.scale = self._patch(grey, box)
            out.append((box, tid))
            found.add(tid)
        for tid in [t for t in self.tracks if t not in found]:
            track = self.tracks[tid]
            if self.frame - track.last_detected > self.expire:
                del self.tracks[tid]
                continue
            self._move(track, self._follow(track, predicted[tid], grey))
            out.append((track.box, tid))
            self.tracked_only += 1
        return out

    @staticmethod
    def _move(track: Track, box: Box) -> None:
        dx = box.x + box.w / 2 - (track.box.x + track.box.w / 2)
        dy = box.y + box.h / 2 - (track.box.y + track.box.h / 2)
        track.vx, track.vy = 0.5 * track.vx + 0.5 * dx, 0.5 * track.vy + 0.5 * dy
        track.box = box

    def _patch(self, grey: np.ndarray, box: Box) -> tuple[np.ndarray | None, float]:
        """The box's grey patch scaled to PATCH px at most, and that scale; None for a box past the border."""
        scale = min(1.0, self.PATCH / max(box.w, box.h))
        if box.x < 0 or box.y < 0 or box.x + box.w > grey.shape[1] or box.y + box.h > grey.shape[0]:
            return None, 1.0
        crop = grey[box.y:box.y + box.h, box.x:box.x + box.w]
        return cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), scale

    def _follow(self, track: Track, predicted: Box, grey: np.ndarray | None) -> Box:
        """The predicted box, moved to where the track's patch matches best within half a face of it."""
        if grey is None or track.patch is None:
            return predicted
        s, reach = track.scale, max(predicted.w, predicted.h) // 2
        x0, y0 = max(0, predicted.x - reach), max(0, predicted.y - reach)
        window = grey[y0:max(y0, predicted.y + predicted.h + reach), x0:max(x0, predicted.x + predicted.w + reach)]
        window = cv2.resize(window, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1.0 else window
        ph, pw = track.patch.shape
        if window.shape[0] < ph or window.shape[1] < pw:
            return predicted
        _, best, _, (mx, my) = cv2.minMaxLoc(cv2.matchTemplate(window, track.patch, cv2.TM_CCOEFF_NORMED))
        if best < self.MATCH:
            return predicted
        return predicted.moved(x0 + mx / s - predicted.x, y0 + my / s - predicted.y)
