"""`epd-ray deidentify MODEL INPUT OUTPUT`: de-identify an image, a folder of images and videos, or a video.

Full images: faces found with CenterFace (or OpenCV's Haar cascade, `detector="haar"`), each cut out as a
square with a margin, resized to the model's size, de-identified with its own noise seed, resized back and
blended in with a feathered elliptical mask turned by the face's roll. `aligned=True`: every image (or
frame) is a face crop that goes straight through.

Safety rules, checked before anything is written:
* OUTPUT may not be an input file, nor inside the input folder; no output path may be an input path;
* outputs are encoded from fresh pixel arrays, so no EXIF, GPS, ICC or text chunk of the input survives
  (EXIF orientation is applied to the pixels first, so the picture stays upright);
* every face found is replaced (past `max_faces` per image, blurred); in video a face the detector misses
  stays covered where its track moves (`track_hold` frames); an image with no face found is reported and
  handled by `on_no_face` (default `blur`: the whole image blurred);
* a corrupt or unreadable input is reported and skipped; the run goes on.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from epd_ray.checkpoints import CheckpointError
from epd_ray.deploy.batching import Batcher, Job
from epd_ray.deploy.engine import FaceEngine
from epd_ray.deploy.export import DeployError, load_model
from epd_ray.deploy.faces import blur_face, blur_image, face_region, seed_for
from epd_ray.faces import DETECTORS, Detector, make_detector

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm"}
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
    margin: float = 0.25  # added around the detected box on each side, as a fraction of its side
    on_no_face: str = "blur"  # blur | copy | skip for an image (video: the frame) with no face found
    detect_every: int = 1  # video: run the detector on every n-th frame, track faces in between
    track_hold: int = 10  # video: frames a track the detector misses stays covered (past its next detection pass)
    crf: int = 18  # video quality (x264/VP9 constant rate factor: lower is better and larger)
    batch_size: int = 16
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0  # faces' noise seeds derive from it, the file's relative name and the face (track) index
    noise: bool = True  # False: no dropout noise (a deterministic generator)
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
        if not 0.0 <= self.margin <= 1.0:
            raise DeployError(f"--margin must be in [0, 1], got {self.margin}")
        if self.batch_size < 1:
            raise DeployError(f"--batch-size must be >= 1, got {self.batch_size}")
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

    def lines(self, per_file_limit: int = 20) -> list[str]:
        """The summary as printed; faces per file too when there are at most `per_file_limit` files."""
        out = [f"files: {self.files} ({self.images} images, {self.videos} videos"
               + (f", {self.frames} frames" if self.videos else "") + f"), {len(self.failed)} failed, "
               f"{self.written} written",
               f"faces found: {self.faces_found}, faces replaced: {self.faces_replaced}"
               + (f", covered by tracking alone: {self.faces_tracked}" if self.videos else "")
               + (f", blurred past --max-faces: {self.faces_blurred}" if self.faces_blurred else ""),
               f"files with no face: {len(self.no_face)}"]
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
                "faces_tracked": self.faces_tracked, "faces_blurred": self.faces_blurred, "written": self.written, "per_file": dict(self.per_file), "no_face": list(self.no_face),
                "skipped": list(self.skipped), "failed": [list(f) for f in self.failed],
                "unsupported": list(self.unsupported), "warnings": list(self.warnings)}


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class Item:
    src: Path
    dst: Path
    rel: str
    kind: str  # "image" | "video"


def media_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "video" if suffix in VIDEO_EXTENSIONS else None


def plan(input_path: Path, output: Path) -> tuple[list[Item], list[str]]:
    """(work items, unsupported relative names); refuses any output that could overwrite an input."""
    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise FileNotFoundError(f"{input_path}: no such image, video or folder")
    src_root = input_path.resolve()
    out_resolved = output.resolve()
    items: list[Item] = []
    unsupported: list[str] = []
    if input_path.is_dir():
        if output.exists() and not output.is_dir():
            raise DeployError(f"{output}: is a file; for a folder INPUT, OUTPUT must be a folder")
        if out_resolved == src_root or src_root in out_resolved.parents:
            raise DeployError(f"{output}: is the input folder or inside it; choose an OUTPUT outside {input_path}")
        inputs = sorted(p for p in input_path.rglob("*") if p.is_file())
        for path in inputs:
            rel = path.relative_to(input_path).as_posix()
            kind = media_kind(path)
            if kind is None:
                unsupported.append(rel)
            else:
                items.append(Item(path, output / path.relative_to(input_path), rel, kind))
    else:
        kind = media_kind(input_path)
        if kind is None:
            raise DeployError(f"{input_path}: not an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) or video "
                              f"({', '.join(sorted(VIDEO_EXTENSIONS))})")
        inputs = [input_path]
        dst = output / input_path.name if output.is_dir() or (not output.exists() and not output.suffix) else output
        if media_kind(dst) != kind:
            raise DeployError(f"{output}: an {kind} input needs an {kind} OUTPUT file name or a folder")
        items.append(Item(input_path, dst, input_path.name, kind))
    input_files = {p.resolve() for p in inputs}
    for item in items:
        dst = item.dst.resolve()
        if dst in input_files or (item.dst.exists() and os.path.samefile(item.dst, item.src)):
            raise DeployError(f"{item.dst}: is an input file; refusing to overwrite inputs (choose another OUTPUT)")
    return items, unsupported


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 pixels, EXIF orientation applied; raises on a corrupt or truncated file."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return np.array(img.convert("RGB"), dtype=np.uint8)


def write_image(path: Path, rgb: np.ndarray) -> None:
    """Encode a fresh array (no metadata of any input) atomically: a temp file, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write {path.suffix} images")
    fresh = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        fresh.save(tmp, format=fmt, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _LineProgress:
    """A plain progress line on stderr when tqdm is not installed."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **_: Any):
        self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit, 0, disable

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable and (self.total is None or self.n == self.total or self.n % 10 == 0):
            of = f"/{self.total}" if self.total else ""
            print(f"\r{self.desc}: {self.n}{of} {self.unit}", end="", file=sys.stderr, flush=True)

    def set_postfix_str(self, _: str) -> None:
        pass

    def close(self) -> None:
        if not self.disable and self.n:
            print(file=sys.stderr)


@dataclass
class Context:
    options: DeidentifyOptions
    engine: FaceEngine
    detector: Detector | None
    summary: Summary
    warn: Callable[[str], None]

    def progress(self, **kwargs: Any):
        try:
            from tqdm import tqdm
        except ImportError:
            return _LineProgress(disable=not self.options.progress, **kwargs)
        return tqdm(disable=not self.options.progress, file=sys.stderr, dynamic_ncols=True, **kwargs)


def deidentify(model: Path, input_path: Path, output: Path, options: DeidentifyOptions | None = None,
               warn: Callable[[str], None] | None = None) -> Summary:
    """De-identify INPUT (image, folder or video) into OUTPUT with the model folder MODEL; returns a summary."""
    options = options or DeidentifyOptions()
    options.check()
    items, unsupported = plan(Path(input_path), Path(output))
    summary = Summary(output=Path(output), unsupported=unsupported)

    def _warn(message: str) -> None:
        if message not in summary.warnings:
            summary.warnings.append(message)
            if warn is not None:
                warn(message)

    try:
        engine = FaceEngine(load_model(model), device=options.device, precision=options.precision,
                            batch_size=options.batch_size, noise=options.noise)
        detector = None if options.aligned else make_detector(
            options.detector, options.min_face, options.min_score, options.detector_threshold, options.scale_factor,
            options.cascade)
    except ValueError as exc:
        if isinstance(exc, (DeployError, CheckpointError)):
            raise
        raise DeployError(str(exc)) from None
    ctx = Context(options, engine, detector, summary, _warn)
    batcher = Batcher(engine)
    bar = ctx.progress(total=len(items), desc="de-identifying", unit="file")
    try:
        for item in items:
            if item.kind == "video":
                batcher.flush()  # finish pending images first: one generator call pattern at a time
                _video(item, ctx)
            else:
                _image(item, ctx, batcher)
            summary.files += 1
            bar.update(1)
            bar.set_postfix_str(f"faces {summary.faces_found}")
        batcher.flush()
    finally:
        bar.close()
    return summary


def _image(item: Item, ctx: Context, batcher: Batcher) -> None:
    summary, opts = ctx.summary, ctx.options
    try:
        rgb = read_image(item.src)
    except Exception as exc:  # PIL raises several types for corrupt, truncated or foreign files
        summary.failed.append((item.rel, f"unreadable image ({type(exc).__name__}: {_first_line(exc)})"))
        return
    summary.images += 1

    def writer(replaced: int) -> Callable[[np.ndarray], None]:
        def done(image: np.ndarray) -> None:
            summary.faces_replaced += replaced
            try:
                write_image(item.dst, image)
                summary.written += 1
            except Exception as exc:
                summary.failed.append((item.rel, f"cannot write {item.dst} ({type(exc).__name__}: "
                                                 f"{_first_line(exc)})"))
        return done

    def fail(exc: Exception) -> None:
        summary.failed.append((item.rel, f"generator failed ({type(exc).__name__}: {_first_line(exc)})"))

    if opts.aligned:
        summary.per_file[item.rel] = 1
        summary.faces_found += 1
        batcher.add(Job(rgb, done=writer(1), fail=fail, aligned_seed=seed_for(opts.seed, item.rel, 0)))
        return
    try:
        boxes = ctx.detector.detect(rgb)
    except Exception as exc:  # e.g. OpenCV refusing a degenerate image
        summary.failed.append((item.rel, f"face detection failed ({type(exc).__name__}: {_first_line(exc)})"))
        return
    summary.per_file[item.rel] = len(boxes)
    summary.faces_found += len(boxes)
    if not boxes:
        summary.no_face.append(item.rel)
        if opts.on_no_face == "skip":
            summary.skipped.append(item.rel)
        else:
            writer(0)(blur_image(rgb) if opts.on_no_face == "blur" else rgb)
        return
    keep, extra = boxes[:opts.max_faces], boxes[opts.max_faces:]
    for box in extra:
        blur_face(rgb, face_region(box, opts.margin))
    summary.faces_blurred += len(extra)
    faces = [(face_region(box, opts.margin), seed_for(opts.seed, item.rel, i)) for i, box in enumerate(keep)]
    batcher.add(Job(rgb, faces, done=writer(len(faces)), fail=fail))


def _video(item: Item, ctx: Context) -> None:
    from epd_ray.deploy.video import process_video

    summary = ctx.summary
    try:
        counts = process_video(item.src, item.dst, item.rel, ctx)
    except Exception as exc:  # unreadable, unwritable or corrupt video: reported, the run goes on
        summary.failed.append((item.rel, f"video failed ({type(exc).__name__}: {_first_line(exc)})"))
        return
    summary.videos += 1
    summary.frames += counts["frames"]
    summary.faces_found += counts["faces"]
    summary.faces_replaced += counts["replaced"]
    summary.faces_tracked += counts["tracked"]
    summary.faces_blurred += counts["blurred"]
    summary.per_file[item.rel] = counts["faces"]
    if not ctx.options.aligned and counts["faces"] == 0:
        summary.no_face.append(item.rel)
    if counts.get("skipped"):
        summary.skipped.append(item.rel)
    else:
        summary.written += 1


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]
