"""Face detection (`epd_ray.faces`): CenterFace against Haar on faces built from a real photograph.

The test set is `benchmarks.detector_recall`'s (scikit-image's astronaut rotated, scaled, pasted on other
photographs, true boxes known by construction), at a size that runs in seconds.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from skimage import data

from benchmarks.detector_recall import evaluate, make_scenes
from epd_ray.faces import CenterFaceDetector, make_detector


@pytest.fixture(scope="module")
def centerface() -> CenterFaceDetector:
    return CenterFaceDetector()


def test_centerface_finds_rotated_and_small_faces_haar_misses(centerface):
    scenes = make_scenes(1, conditions=("rotated 30", "rotated 45")) + make_scenes(3, conditions=("small",))
    haar = evaluate(make_detector("haar", min_face=16), scenes)
    new = evaluate(make_detector("centerface", min_face=16), scenes)
    rotated = {name: (s["rotated 30"].found + s["rotated 45"].found) / (s["rotated 30"].faces + s["rotated 45"].faces)
               for name, s in (("haar", haar), ("centerface", new))}
    assert rotated["centerface"] >= 0.75 and rotated["centerface"] > rotated["haar"], rotated
    assert new["small"].recall >= 0.75 and new["small"].recall > haar["small"].recall, (new["small"], haar["small"])
    assert new["all"].false / new["all"].images <= 1.0


def test_centerface_gives_a_scored_box_with_landmarks_whatever_the_input_sizes(centerface):
    photo = data.astronaut()
    first = centerface.detect(photo)
    assert len(first) == 1 and first[0].score > 0.8 and len(first[0].landmarks) == 5
    box = first[0]
    (lx, ly), (rx, ry) = box.landmarks[:2]
    assert box.x < lx < rx < box.x + box.w and box.y < ly < box.y + box.h / 2  # the eyes, in the upper half
    assert abs(box.roll) < 10
    # OpenCV's DNN answers wrongly when one loaded network is fed another input size: each size gets its own
    assert centerface.detect(np.full((240, 320, 3), 185, np.uint8)) == []
    assert centerface.detect(data.coffee()) == []
    assert centerface.detect(photo) == first
    turned = centerface.detect(np.ascontiguousarray(np.rot90(photo)))  # a face lying on its side: roll ~ +-90
    assert len(turned) == 1 and 60 < abs(turned[0].roll) < 120


def test_bad_detector_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="detector must be one of centerface, haar"):
        make_detector("yolo")
    with pytest.raises(ValueError, match="--detector haar"):
        make_detector("centerface", cascade="faces.xml")
    with pytest.raises(ValueError, match="min score"):
        make_detector("centerface", min_score=1.5)


def test_detection_imports_neither_ray_nor_deployment():
    code = ("import sys, epd_ray.faces, epd_ray.data.prepare; "
            "print(sorted(m for m in ('ray', 'torch', 'epd_ray.deploy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
