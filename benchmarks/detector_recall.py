"""Face detector recall, false positives and speed: CenterFace (the default) against OpenCV's Haar cascade.

    python -m benchmarks.detector_recall                 # 8 images per condition, 4 faces each: well under a minute
    python -m benchmarks.detector_recall --images 20 --min-score 0.3

The test set is built in code from a real photograph (scikit-image's astronaut, a frontal face with known
face box): the head cut out with a soft round edge, mirrored at random, its brightness and contrast varied,
rotated in the image plane, scaled, and pasted four to an image (one per quadrant, at random places) on
crops of scikit-image's other photographs and textures (coffee, cat, rocket, brick, grass, gravel, coins,
moon, camera man). Conditions: frontal (faces 48-96 px wide), rotated by 15, 30 and 45 degrees (either
way), small (~24 px) and covered (the lower half or one side of the face under a solid patch, like a
scarf or a hand). A face's true box is the tight box of its face oval (92 x 115 px in the photograph)
rotated and scaled with it, so it is known by construction.

A face counts as found when a detection overlaps its true box with IoU >= 0.5 (each detection matches one
face at most); false positives are detections that match no face, per image; speed is detection time per
megapixel of image (640 x 480 here), measured after one warm-up call. Both detectors look for faces from
16 px up (`min_face=16`; Haar's default of 40 would rule small faces out by its setting alone).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epd_ray.faces import Box, Detector, make_detector  # noqa: E402

CANVAS = (480, 640)  # h, w
FACE = (180, 60, 92, 115)  # x, y, w, h of the face oval's box in skimage.data.astronaut()
HEAD_SIDE = 200  # the square cut around the face's centre (face, hair, neck)
BACKGROUNDS = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins", "moon", "camera")
CONDITIONS = {  # name: (face widths px, rotation degrees, covered)
    "frontal": ((48, 96), 0, False),
    "rotated 15": ((48, 96), 15, False),
    "rotated 30": ((48, 96), 30, False),
    "rotated 45": ((48, 96), 45, False),
    "small": ((22, 26), 0, False),
    "covered": ((48, 96), 0, True),
}


@dataclass
class Scene:
    image: np.ndarray  # RGB uint8
    truth: list[Box]
    condition: str


def photos() -> tuple[np.ndarray, list[np.ndarray]]:
    from skimage import data

    def rgb(image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3])

    return rgb(data.astronaut()), [rgb(getattr(data, name)()) for name in BACKGROUNDS]


def _background(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop of the photo (at least half its shorter side) stretched to the canvas."""
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.5, 1.0) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return cv2.resize(photo[y:y + side, x:x + side], CANVAS[::-1], interpolation=cv2.INTER_AREA)


def paste_face(canvas: np.ndarray, astronaut: np.ndarray, centre: tuple[float, float], width: float, angle: float,
                covered: bool, rng: np.random.Generator) -> Box:
    """Paste the astronaut's head with its face `width` px wide, turned by `angle` degrees, centred at
    `centre`; returns the face's true box."""
    fx, fy, fw, fh = FACE
    cx, cy = fx + fw / 2, fy + fh / 2
    head = astronaut[int(cy - HEAD_SIDE / 2):int(cy + HEAD_SIDE / 2), int(cx - HEAD_SIDE / 2):int(cx + HEAD_SIDE / 2)]
    head = head[:, ::-1] if rng.random() < 0.5 else head
    head = np.clip(head.astype(np.float32) * rng.uniform(0.7, 1.2) + rng.uniform(-25, 25), 0, 255)
    alpha = np.zeros((HEAD_SIDE, HEAD_SIDE), np.float32)
    cv2.circle(alpha, (HEAD_SIDE // 2, HEAD_SIDE // 2), int(HEAD_SIDE * 0.44), 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), HEAD_SIDE * 0.03)
    scale = width / fw
    # head centre -> canvas centre, rotated and scaled: one affine map for the pixels and the true box
    m = cv2.getRotationMatrix2D((HEAD_SIDE / 2, HEAD_SIDE / 2), angle, scale)
    m[:, 2] += np.array(centre) - HEAD_SIDE / 2
    size = CANVAS[::-1]
    warped = cv2.warpAffine(head, m, size, flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    a = cv2.warpAffine(alpha, m, size)[..., None]
    canvas[...] = np.clip(a * warped + (1 - a) * canvas + 0.5, 0, 255).astype(np.uint8)
    # the tight box of the face oval (semi-axes fw/2, fh/2) turned by the angle
    t = math.radians(angle)
    half_w = scale * math.hypot(fw / 2 * math.cos(t), fh / 2 * math.sin(t))
    half_h = scale * math.hypot(fw / 2 * math.sin(t), fh / 2 * math.cos(t))
    box = Box(int(round(centre[0] - half_w)), int(round(centre[1] - half_h)), int(round(2 * half_w)),
              int(round(2 * half_h)))
    if covered:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = box.x, box.y, box.x + box.w, box.y + box.h
        if rng.random() < 0.5:  # a scarf over nose tip, mouth and chin
            cv2.rectangle(canvas, (x0 - 2, int(y0 + 0.55 * box.h)), (x1 + 2, y1 + 2), colour, -1)
        else:  # a hand over one eye and cheek
            left = rng.random() < 0.5
            cv2.rectangle(canvas, (x0 - 2 if left else int(x1 - 0.4 * box.w), int(y0 + 0.25 * box.h)),
                          (int(x0 + 0.4 * box.w) if left else x1 + 2, int(y0 + 0.8 * box.h)), colour, -1)
    return box


def make_scenes(images_per_condition: int, seed: int = 0, conditions: tuple[str, ...] = tuple(CONDITIONS),
                faces_per_image: int = 4) -> list[Scene]:
    """The test set: `images_per_condition` images of each condition, `faces_per_image` faces each (one per
    cell of a 2 x 2 grid)."""
    rng = np.random.default_rng(seed)
    astronaut, backgrounds = photos()
    h, w = CANVAS
    cells = [(cx, cy) for cy in (0, 1) for cx in (0, 1)][:faces_per_image]
    scenes = []
    for condition in conditions:
        (lo, hi), angle, covered = CONDITIONS[condition]
        for _ in range(images_per_condition):
            canvas = _background(backgrounds[int(rng.integers(len(backgrounds)))], rng)
            truth = []
            for cx, cy in cells:
                width = rng.uniform(lo, hi)
                reach = HEAD_SIDE * 0.44 * width / FACE[2]  # the head's radius on the canvas
                x = rng.uniform(cx * w / 2 + reach, (cx + 1) * w / 2 - reach)
                y = rng.uniform(cy * h / 2 + reach, (cy + 1) * h / 2 - reach) if reach < h / 4 else (cy + 0.5) * h / 2
                signed = angle * (1 if rng.random() < 0.5 else -1)
                truth.append(paste_face(canvas, astronaut, (x, y), width, signed, covered, rng))
            scenes.append(Scene(canvas, truth, condition))
    return scenes


def match(found: list[Box], truth: list[Box], iou: float = 0.5) -> tuple[int, int]:
    """(true faces found, false positives): greedy one-to-one matching by IoU."""
    pairs = sorted(((f.iou(t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True)
    used_f, used_t = set(), set()
    for value, i, j in pairs:
        if value < iou:
            break
        if i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
    return len(used_t), len(found) - len(used_f)


@dataclass
class Score:
    faces: int = 0
    found: int = 0
    false: int = 0
    images: int = 0
    seconds: float = 0.0
    megapixels: float = 0.0

    @property
    def recall(self) -> float:
        return self.found / self.faces if self.faces else float("nan")


def evaluate(detector: Detector, scenes: list[Scene]) -> dict[str, Score]:
    """Scores per condition and over all ("all")."""
    detector.detect(scenes[0].image)  # warm-up
    scores: dict[str, Score] = {}
    for scene in scenes:
        start = time.perf_counter()
        found = detector.detect(scene.image)
        elapsed = time.perf_counter() - start
        hits, false = match(found, scene.truth)
        for key in (scene.condition, "all"):
            s = scores.setdefault(key, Score())
            s.faces += len(scene.truth)
            s.found += hits
            s.false += false
            s.images += 1
            s.seconds += elapsed
            s.megapixels += scene.image.shape[0] * scene.image.shape[1] / 1e6
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per condition (4 faces each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-score", type=float, default=0.2, help="CenterFace confidence threshold")
    parser.add_argument("--save", type=Path, help="write the first image of each condition here (PNG)")
    args = parser.parse_args()

    from benchmarks.machine import describe

    print(describe(with_peaks=False))
    print(f"OpenCV {cv2.__version__}")
    scenes = make_scenes(args.images, args.seed)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for scene in scenes[::args.images]:
            cv2.imwrite(str(args.save / f"{scene.condition.replace(' ', '_')}.png"),
                        cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
    print(f"\n{len(scenes)} images of {CANVAS[1]}x{CANVAS[0]}, {sum(len(s.truth) for s in scenes)} faces; "
          f"recall at IoU 0.5 (false positives per image):")
    results = {"haar": evaluate(make_detector("haar", min_face=16), scenes),
               "centerface": evaluate(make_detector("centerface", min_face=16, min_score=args.min_score), scenes)}
    print(f"{'condition':<12} " + " ".join(f"{name:>20}" for name in results))
    for condition in [*CONDITIONS, "all"]:
        cells = [f"{r[condition].recall:6.2f} ({r[condition].false / r[condition].images:5.2f} FP)" for r in
                 results.values()]
        print(f"{condition:<12} " + " ".join(f"{c:>20}" for c in cells))
    print(f"{'ms per MP':<12} " + " ".join(f"{1000 * r['all'].seconds / r['all'].megapixels:>20.0f}"
                                          for r in results.values()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
