"""What one `epd-ray deidentify` call carries through its images and videos: the options, the running
summary, and the context (engine, detector, progress) that `deidentify.py` and `video.py` both use.

Its own module so that the video code needs nothing from `deidentify.py`, which calls it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from epd_ray.deploy.engine import FaceEngine
from epd_ray.deploy.export import DeployError
from epd_ray.faces import DETECTORS, MAX_MARGIN, Detector

ON_NO_FACE = ("blur", "copy", "skip")


@dataclass
class DeidentifyOptions:
    aligned: bool = False  # inputs are face crops: the whole image goes through the generator
    detector: str = "centerface"  # centerface | haar
    min_face: int | None = None  # smallest face side the detector looks for, px (None: 16 centerface, 40 haar)
    max_faces: int = 20  # faces replaced per image/frame (largest first); the rest are blurred
    min_score: float = 0.2  # CenterFace confidence a face needs: lower finds more faces and more false ones
    detector_threshold: int = 5  # Haar minNeighbors: higher finds fewer faces and fewer false ones
    scale_factor: float = 1.1  # Haar image pyramid step
    cascade: Path | None = None  # a user-given OpenCV cascade XML instead of the bundled frontal-face one
    # added around the detected box on each side, as a fraction of its side; None: the margin the model's
    # training faces were cut with (`export.training_margin`), else FACE_MARGIN
    margin: float | None = None
    on_no_face: str = "blur"  # blur | copy | skip for an image (video: the frame) with no face found
    detect_every: int = 1  # video: run the detector on every n-th frame, track faces in between
    track_hold: int = 10  # video: frames a track the detector misses stays covered (past its next detection pass)
    crf: int = 18  # video quality (x264/VP9 constant rate factor: lower is better and larger)
    batch_size: int = 16
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0  # faces' noise seeds derive from it, the file's relative name and the face (track) index
    noise: bool = True  # False: no dropout noise (a deterministic generator)
    draws: int | None = None  # draws of z per face instead of the model's own (core/draws.py): fewer are faster
    progress: bool = True

    def check(self) -> None:
        if self.on_no_face not in ON_NO_FACE:
            raise DeployError(f"--on-no-face must be one of {', '.join(ON_NO_FACE)}, got {self.on_no_face!r}")
        if self.max_faces < 1:
            raise DeployError(f"--max-faces must be >= 1, got {self.max_faces}")
        if self.detector not in DETECTORS:
            raise DeployError(f"--detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        if self.min_face is not None and self.min_face < 8:
            raise DeployError(f"--min-face must be >= 8 px, got {self.min_face}")
        if not 0.0 < self.min_score < 1.0:
            raise DeployError(f"--min-score must be in (0, 1), got {self.min_score}")
        if self.detect_every < 1:
            raise DeployError(f"--detect-every must be >= 1, got {self.detect_every}")
        if self.track_hold < 0:
            raise DeployError(f"--track-hold must be >= 0, got {self.track_hold}")
        if not 0 <= self.crf <= 51:
            raise DeployError(f"--crf must be in [0, 51], got {self.crf}")
        if self.detector_threshold < 0:
            raise DeployError(f"--detector-threshold must be >= 0, got {self.detector_threshold}")
        if not self.scale_factor > 1.0:
            raise DeployError(f"--scale-factor must be > 1, got {self.scale_factor}")
        if self.margin is not None and not 0.0 <= self.margin <= MAX_MARGIN:
            raise DeployError(f"--margin must be in [0, {MAX_MARGIN:g}], got {self.margin}")
        if self.batch_size < 1:
            raise DeployError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.draws is not None and not 1 <= self.draws <= 64:
            raise DeployError(f"--draws must be in [1, 64], got {self.draws}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise DeployError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise DeployError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class Summary:
    output: Path
    files: int = 0  # images and videos tried (a file that failed counts once, also in `failed`)
    images: int = 0
    videos: int = 0
    frames: int = 0
    faces_found: int = 0
    faces_replaced: int = 0
    faces_tracked: int = 0  # video: faces covered in frames where the detector did not find them (tracking alone)
    faces_blurred: int = 0  # faces past max_faces, blurred
    written: int = 0
    per_file: dict[str, int] = field(default_factory=dict)  # relative name -> faces found (video: detections)
    no_face: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # written nowhere (on_no_face=skip)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative name, reason)
    unsupported: list[str] = field(default_factory=list)  # files in the folder that are not images or videos
    warnings: list[str] = field(default_factory=list)
    margin: float | None = None  # the margin faces were cut with
    margin_from_model: bool = False  # ... as the model's training faces were (not --margin, not the default)

    def lines(self, per_file_limit: int = 20) -> list[str]:
        """The summary as printed; faces per file too when there are at most `per_file_limit` files."""
        out = [f"files: {self.files} ({self.images} images, {self.videos} videos"
               + (f", {self.frames} frames" if self.videos else "") + f"), {len(self.failed)} failed, "
               f"{self.written} written",
               f"faces found: {self.faces_found}, faces replaced: {self.faces_replaced}"
               + (f", covered by tracking alone: {self.faces_tracked}" if self.videos else "")
               + (f", blurred past --max-faces: {self.faces_blurred}" if self.faces_blurred else "")]
        if self.margin is not None and self.faces_found:
            out.append(f"faces cut with a margin of {self.margin:.2f} of their side"
                       + (" (as the model's training faces were)" if self.margin_from_model else ""))
        out.append(f"files with no face: {len(self.no_face)}")
        if 0 < len(self.per_file) <= per_file_limit:
            out += [f"  {rel}: {n} face{'s' if n != 1 else ''}" for rel, n in self.per_file.items()]
        if self.no_face:
            out.append("  no face found in: " + _listing(self.no_face))
        if self.skipped:
            out.append("  not written (--on-no-face skip): " + _listing(self.skipped))
        for rel, reason in self.failed:
            out.append(f"  failed: {rel}: {reason}")
        if self.unsupported:
            out.append(f"  ignored {len(self.unsupported)} files that are not images or videos: "
                       + _listing(self.unsupported))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "files": self.files, "images": self.images, "videos": self.videos,
                "frames": self.frames, "faces_found": self.faces_found, "faces_replaced": self.faces_replaced,
                "faces_tracked": self.faces_tracked, "faces_blurred": self.faces_blurred, "written": self.written,
                "per_file": dict(self.per_file), "no_face": list(self.no_face),
                "skipped": list(self.skipped), "failed": [list(f) for f in self.failed],
                "unsupported": list(self.unsupported), "warnings": list(self.warnings), "margin": self.margin}


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class Context:
    options: DeidentifyOptions
    engine: FaceEngine
    detector: Detector | None
    summary: Summary
    warn: Callable[[str], None]

    def progress(self, **kwargs: Any) -> tqdm:
        return tqdm(disable=not self.options.progress, file=sys.stderr, dynamic_ncols=True, **kwargs)
