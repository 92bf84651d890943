"""`epd-ray deidentify MODEL INPUT OUTPUT`: de-identify an image, a folder of images and videos, or a video.

Full images: faces found with CenterFace (or OpenCV's Haar cascade, `detector="haar"`), each cut out as a
square with a margin (by default the one the model's training faces were cut with, so the generator is given
the framing it learnt), resized to the model's size, de-identified with its own noise seed, resized back and
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from epd_ray.artifacts import atomic_file
from epd_ray.checkpoints import CheckpointError
from epd_ray.deploy.batching import Batcher, Job
from epd_ray.deploy.context import ON_NO_FACE, Context, DeidentifyOptions, Summary
from epd_ray.deploy.engine import FaceEngine
from epd_ray.deploy.export import DeployError, load_model, training_margin
from epd_ray.deploy.faces import blur_face, blur_image, seed_for
from epd_ray.deploy.video import process_video
from epd_ray.faces import FACE_MARGIN, face_region, make_detector

MARGIN_TOLERANCE = 0.05  # a --margin this far from the training faces' margin is warned about

__all__ = ["ON_NO_FACE", "Context", "DeidentifyOptions", "Summary", "deidentify", "plan", "read_image", "write_image"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm"}


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
    with atomic_file(path) as tmp:
        fresh.save(tmp, format=fmt, **kwargs)


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
        deidentifier = load_model(model)
        trained = training_margin(model)
        if options.margin is None:  # cut faces as the model's training faces were cut
            options = replace(options, margin=FACE_MARGIN if trained is None else trained)
            summary.margin_from_model = trained is not None
        elif trained is not None and abs(options.margin - trained) > MARGIN_TOLERANCE:
            _warn(f"--margin {options.margin:g}: the model learnt faces cut with {trained:g} of their side around "
                  "them; it is given faces framed otherwise (leave --margin out to cut them as it learnt)")
        summary.margin = options.margin
        if options.draws is not None:  # the user's trade of expressions kept for speed
            if options.draws > 1 and deidentifier.reader is None:
                raise DeployError(f"--draws {options.draws}: {model} was trained to draw once per face and carries "
                                  "no expression readers to pick between draws")
            deidentifier = deidentifier.with_draws(options.draws)
        engine = FaceEngine(deidentifier, device=options.device, precision=options.precision,
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
