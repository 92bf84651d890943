"""`epd-ray data prepare`: a source of labelled faces to Parquet shards, cached by what defines them.

Every candidate from a source (`sources.py`) is either accepted as a training-size RGB face or rejected
with a reason (`decode.py`); nothing is dropped silently. Rejected files are listed in `rejects.csv`
(file, reason, detail), converted ones (grey, palette, RGBA, CMYK, 16-bit) counted, files left out by a
choice (RaFD angles and gazes, contemptuous) counted apart, and `dataset.json` carries all those counts.
With `strict` the first rejected file stops the run with its name and nothing is written.

A prepared folder is reused when the data settings and the inputs (names, sizes and modification times of
the files) are unchanged; it is written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from epd_ray.artifacts import DatasetManifest
from epd_ray.config import DataConfig, stable_hash
from epd_ray.core.labels import CONTEMPT
from epd_ray.core.synthetic import make_synthetic_faces
from epd_ray.data import sources
from epd_ray.data.sources import DataError
from epd_ray.data.decode import (DUPLICATE, MISSING, NO_FACE, UNDECODABLE, UNKNOWN_LABEL, UNLABELLED, Face,
                                 Rejected, decode_face, read_rgb, square_crop)
from epd_ray.data.shards import MANIFEST, SPLITS, read_manifest, split_per_identity, write_dataset
from epd_ray.faces import FACE_MARGIN, MAX_MARGIN, Box, Detector, face_region, make_detector

REJECTS_FILE = "rejects.csv"
NO_IDENTITY = -1  # FER2013 rows: an emotion label and no person


@dataclass(frozen=True)
class PreparedData:
    path: Path
    manifest: dict  # dataset.json as written; `info` reads it typed
    reused: bool

    @property
    def info(self) -> DatasetManifest:
        return DatasetManifest.from_dict(self.manifest)


@dataclass(frozen=True)
class Framing:
    """How every face of a set is cut from its image, and the context that leaves around the face: what a
    model trained on the set expects `epd-ray deidentify` to cut (its `--margin`)."""

    face_crop: str  # "head" or "square"
    margin: float | None  # around the detected box, a fraction of its larger side on every side
    #                       (`faces.face_region`'s margin); None where no face was measured
    why: str = ""  # where `data.face_crop=auto` chose the head crop for a folder or manifest, the line that says why


@dataclass
class Intake:
    """What came in: accepted faces with their labels, and an account of everything else."""

    framing: Framing  # how every face was cut from its image
    pixels: list[np.ndarray] = field(default_factory=list)
    identity: list[str] = field(default_factory=list)
    emotion: list[int] = field(default_factory=list)
    split: list[str | None] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"accepted": len(self.pixels), "rejected": dict(Counter(r for _, r, _ in self.rejects)),
                "converted": dict(self.converted), "skipped": dict(self.skipped),
                "face_crop": self.framing.face_crop, "face_margin": self.framing.margin}


# What a prepared folder holds beyond its settings and inputs: a folder of another version is prepared again
# (2: faces under DETECT_MIN_SIDE looked for enlarged, and the framing's margin recorded in `intake`).
PREPARATION_VERSION = 2


def dataset_key(data: DataConfig) -> str:
    """The cache folder's name: the settings, the framing faces are cut with (`faces.FACE_MARGIN`) and the
    preparation's version."""
    settings = {**data.model_dump(mode="json"), "margin": FACE_MARGIN, "version": PREPARATION_VERSION}
    return f"{data.source}-{data.image_size}px-{stable_hash(settings)}"


def cached_dataset(data: DataConfig, cache_dir: Path, *, echo: Callable[[str], None] = print) -> PreparedData:
    """The prepared data set for these settings in the shared cache, prepared on first use."""
    return prepare_dataset(data, Path(cache_dir) / "data" / dataset_key(data), echo=echo)


def input_fingerprint(data: DataConfig) -> str:
    """Names, sizes and modification times of the input files: a changed file means preparing again."""
    if data.source == "synthetic":
        return ""
    root = Path(data.path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    h = hashlib.sha256()
    for path in files:
        stat = path.stat()
        h.update(f"{path.relative_to(root) if path != root else path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                 .encode())
    if data.source == "manifest" and root.is_file():  # the images it points to count too
        for item in sources.manifest_items(root, data.manifest_columns):
            target = Path(item.file) if Path(item.file).is_absolute() else root.parent / item.file
            if target.is_file():
                stat = target.stat()
                h.update(f"{item.file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def prepare_dataset(data: DataConfig, out: Path, *, strict: bool = False,
                    echo: Callable[[str], None] = print) -> PreparedData:
    """Prepare into `out`; a folder already prepared from the same settings and inputs is reused as it is."""
    out = Path(out)
    fingerprint = input_fingerprint(data)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("config") == data.model_dump(mode="json") and manifest.get("inputs", "") == fingerprint \
                and manifest.get("preparation", 1) == PREPARATION_VERSION:
            return PreparedData(out, manifest, reused=True)
    extra = {"source": data.source, "config": data.model_dump(mode="json"), "inputs": fingerprint,
             "preparation": PREPARATION_VERSION}
    if data.source == "synthetic":
        faces = make_synthetic_faces(data.num_identities, data.variations, data.image_size, seed=data.seed)
        split = split_per_identity(faces.identity, faces.emotion, data.splits, seed=data.seed)
        manifest = write_dataset(
            out, pixels=faces.pixels, identity=faces.identity, identity_names=faces.identity_names,
            emotion=faces.emotion, emotion_names=sources.EMOTIONS, split=split, source=faces.source,
            shard_rows=data.shard_rows, extra=extra)
        return PreparedData(out, manifest, reused=False)

    classes = sources.emotion_classes(data.include_contempt)
    if data.source == "manifest":
        column = sources.manifest_columns(Path(data.path), sources.manifest_rows(Path(data.path))[1],
                                          data.manifest_columns)
        if any(role != name for role, name in column.items()):
            echo("manifest columns: " + ", ".join(f"{role} from {name!r}" for role, name in column.items()))
    framing = chosen_framing(data)
    if framing.why:
        echo(framing.why)
    intake = take_in(data, classes, framing, strict=strict)
    if not intake.pixels:
        raise DataError(f"{data.path}: no usable face among {len(intake.rejects)} file(s); "
                        f"rejected: {intake.summary()['rejected'] or 'none'}")
    identity_names = sorted({name for name in intake.identity if name is not None})
    identity = np.array([identity_names.index(n) if n is not None else NO_IDENTITY for n in intake.identity],
                        dtype=np.int64)
    emotion = np.array(intake.emotion, dtype=np.int64)
    split, warnings = assign_splits(identity, emotion, intake.split, data, identity_names, classes)
    for line in warnings:
        echo(f"warning: {line}")
    manifest = write_dataset(
        out, pixels=np.stack(intake.pixels), identity=identity, identity_names=identity_names, emotion=emotion,
        emotion_names=classes, split=split, source=intake.source, shard_rows=data.shard_rows,
        extra={**extra, "intake": intake.summary(), "warnings": warnings},
        extra_files={REJECTS_FILE: rejects_csv(intake.rejects)})
    return PreparedData(out, manifest, reused=False)


def items_of(data: DataConfig, skipped: dict[str, int]) -> Iterable[sources.Item]:
    try:
        if data.source == "folder":
            return sources.folder_items(Path(data.path))
        if data.source == "manifest":
            return sources.manifest_items(Path(data.path), data.manifest_columns)
        if data.source == "rafd":
            return sources.rafd_items(Path(data.path), angles=data.rafd_angles, gazes=data.rafd_gazes,
                                      include_contempt=data.include_contempt, skipped=skipped)
        return sources.fer2013_items(Path(data.path))
    except sources.SourceError as exc:
        raise DataError(str(exc)) from None


def take_in(data: DataConfig, classes: tuple[str, ...], framing: Framing, *, strict: bool) -> Intake:
    """Judge every candidate once: accepted with its labels, or rejected with file and reason. Every face is
    cut from its image as `framing` says (see `chosen_framing`)."""
    intake = Intake(framing=framing)
    first_of: dict[str, str] = {}  # content digest -> first file with those bytes
    crop = (functools.partial(head_crop, detector=head_detector(data), rafd_frame=data.source == "rafd",
                              min_side=data.image_size) if framing.face_crop == "head" else square_crop)
    for item in items_of(data, intake.skipped):
        if CONTEMPT not in classes and sources.emotion_name(item.emotion, data.label_map) == CONTEMPT:
            # the eighth class, as RaFD's own layout leaves it out (data.include_contempt keeps it)
            intake.skipped[sources.CONTEMPT_LEFT_OUT] = intake.skipped.get(sources.CONTEMPT_LEFT_OUT, 0) + 1
            continue
        try:
            emotion, face, digest = judge_item(item, data, classes, crop)
            if digest in first_of:
                raise Rejected(DUPLICATE, f"same content as {first_of[digest]}")
        except Rejected as exc:
            if strict:
                raise DataError(f"{item.file}: {exc} (--strict stops at the first rejected file)") from None
            intake.rejects.append((item.file, exc.reason, exc.detail))
            continue
        first_of[digest] = item.file
        intake.pixels.append(face.pixels)
        intake.identity.append(item.identity)
        intake.emotion.append(emotion)
        intake.split.append(item.split)
        intake.source.append(item.file)
        if face.converted_from:
            intake.converted[face.converted_from] += 1
    return intake


def judge_item(item: sources.Item, data: DataConfig, classes: tuple[str, ...], crop) -> tuple[int, Face, str]:
    """Labels first (cheap), then the bytes: (emotion class, face, content digest) or `Rejected`."""
    if item.identity == "" or not item.emotion.strip():
        raise Rejected(UNLABELLED, "no identity/emotion for it (expected <root>/<identity>/<emotion>/<file>)"
                       if data.source == "folder" else "empty identity or emotion")
    emotion = sources.emotion_class(item.emotion, classes, data.label_map)
    if emotion is None:
        raise Rejected(UNKNOWN_LABEL, f"emotion {item.emotion!r} (classes: {', '.join(classes)}; name its class "
                                      f"with --label-map {item.emotion.strip().lower()}=CLASS)")
    if item.pixels is not None or item.read is None:  # a CSV row of pixels (FER2013)
        if item.pixels is None:
            raise Rejected(UNDECODABLE, "pixels are not 48x48 values in 0-255")
        image = Image.fromarray(item.pixels, "L").convert("RGB").resize((data.image_size, data.image_size),
                                                                        Image.Resampling.BICUBIC)
        digest = hashlib.sha256(item.pixels.tobytes()).hexdigest()
        return emotion, Face(np.asarray(image, dtype=np.uint8).copy(), "grey"), digest
    try:
        raw = item.read()
    except FileNotFoundError:
        raise Rejected(MISSING, "listed but not found") from None
    except IsADirectoryError:
        raise Rejected(MISSING, "is a folder, not a file") from None
    face = decode_face(raw, data.image_size, max_pixels=data.max_image_pixels, crop=crop)
    return emotion, face, hashlib.sha256(raw).hexdigest()


DETECT_SIDE = 384  # faces are looked for on a copy of at most this shorter side: the same cost for any camera
DETECT_MIN_SIDE = 128  # ... and at least this one: CenterFace's box shrinks on small faces
PHOTOGRAPH_SAMPLE = 32  # images of a folder or manifest whose faces choose the crop (data.face_crop=auto)
# A face spanning less of the image's shorter side: a photograph, not a face crop. The square `face_region` cuts
# spans 0.60-0.74 of JAFFE's head-and-shoulders frames, 0.96-0.97 (median) of its face crops (64 and 128 px) and
# 0.89-1.0 of the 64 px crops this preparation writes (each measured at DETECT_MIN_SIDE at least).
PHOTOGRAPH_FACE_SHARE = 0.8
RAFD_FACE = (0.42, 0.5, 0.42)  # where RaFD's frontal camera puts the face: side and centre x / width, centre y / height


def head_detector(data: DataConfig) -> Detector:
    return make_detector(data.face_detector, min_face=24)


def largest_face(image: Image.Image, detector: Detector) -> Box | None:
    """The largest face whose width is at least an eighth of the image's shorter side, in the image's pixels.
    It is looked for on a copy of shorter side DETECT_SIDE at most: a face that large is still 48 px wide
    there, and a 12-megapixel photograph costs what a small one does. A small image (a face crop) is
    enlarged to DETECT_MIN_SIDE first: CenterFace draws a face under ~100 px a tenth smaller than the same
    face larger (JAFFE's 64 px crops: 0.875 of the side against 0.96-0.97 at 128 and 256 px), and a model is
    deployed on faces in photographs, where they are larger."""
    width, height = image.size
    short = min(width, height)
    scale = min(DETECT_SIDE, max(DETECT_MIN_SIDE, short)) / short
    probe = image if scale == 1.0 else image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                    Image.Resampling.BILINEAR)
    boxes = [b for b in detector.detect(np.asarray(probe)) if b.w >= min(probe.size) // 8]
    if not boxes:
        return None
    box = max(boxes, key=lambda b: b.area)
    return Box(round(box.x / scale), round(box.y / scale), round(box.w / scale), round(box.h / scale), box.score)


def head_crop(image: Image.Image, detector: Detector, rafd_frame: bool = False, min_side: int = 0) -> Image.Image:
    """The face in a full frame: the square `epd-ray deidentify` cuts around the largest detected face
    (`largest_face`; `faces.face_region`), so the generator trains on the framing it will be given; moved
    inside the frame where it would cross the border, and grown to `min_side` (the training size) around a
    face smaller than that, which would otherwise be rejected as too small. With no face found, a RaFD frame
    falls back to a fixed box where RaFD's frontal camera puts the face (RAFD_FACE); any other image is
    rejected."""
    width, height = image.size
    box = largest_face(image, detector)
    if box is None and rafd_frame:
        side, x, y = round(RAFD_FACE[0] * width), round(RAFD_FACE[1] * width), round(RAFD_FACE[2] * height)
        box = Box(x - side // 2, y - side // 2, side, side)
    if box is None:
        raise Rejected(NO_FACE, f"{type(detector).__name__} found none of width at least {min(width, height) // 8} "
                                "px (data.face_crop=square takes the image as it is)")
    region = face_region(box)
    side, cx, cy = min(max(region.side, min_side), width, height), box.x + box.w / 2, box.y + box.h / 2
    left = int(min(max(0, cx - side / 2), width - side))
    top = int(min(max(0, cy - side / 2), height - side))
    return image.crop((left, top, left + side, top + side))


def chosen_framing(data: DataConfig) -> Framing:
    """How every face of the set is cut from its image, "head" or "square", and the margin that leaves.

    `auto` cuts RaFD's full frames to the face and takes FER2013's crops whole. A folder or manifest may
    hold face crops or photographs of people: in the first PHOTOGRAPH_SAMPLE images the square `deidentify`
    would cut is measured against the image's shorter side, and when most of the faces found (in most of
    the images) span less than PHOTOGRAPH_FACE_SHARE of it, the images are photographs and every face is
    cut out. Taken whole, a RaFD frame's face would be about 20 px wide at 64 px; JAFFE's head-and-shoulders
    frames (the face two thirds of the side) are cut too, and face crops (the face the whole side) are not.

    A head crop leaves `faces.FACE_MARGIN`; an image taken whole leaves what its face box does not span, the
    median over the sampled images (`whole_image_margin`).
    """
    if data.face_crop == "head" or (data.face_crop == "auto" and data.source == "rafd"):
        return Framing("head", FACE_MARGIN)
    if data.source == "fer2013":  # rows of 48x48 pixels, face crops already
        return Framing("square", None)
    shares = sampled_face_shares(data)
    found = [share for share in shares if share is not None]
    small = sum(share * (1.0 + 2.0 * FACE_MARGIN) < PHOTOGRAPH_FACE_SHARE for share in found)
    if data.face_crop == "square" or len(found) * 2 <= len(shares) or small * 2 <= len(found):
        return Framing("square", whole_image_margin(found))
    return Framing("head", FACE_MARGIN, (
        f"in {small} of the {len(shares)} images sampled the face spans less than {PHOTOGRAPH_FACE_SHARE:.0%} of the "
        "image: these are photographs, and every face is cut out as `epd-ray deidentify` cuts faces "
        "(data.face_crop=auto; data.face_crop=square takes each image whole)"))


def sampled_face_shares(data: DataConfig) -> list[float | None]:
    """For each of the first PHOTOGRAPH_SAMPLE images that can be read: the largest face box's larger side
    over the image's shorter side, None where no face is found."""
    detector, shares = head_detector(data), []
    for item in items_of(data, {}):
        if len(shares) == PHOTOGRAPH_SAMPLE:
            break
        try:
            image, _ = read_rgb(item.read(), data.max_image_pixels) if item.read else (None, "")
        except (Rejected, OSError):  # judged, and listed, when the set is taken in
            continue
        if image is not None:
            box = largest_face(image, detector)
            shares.append(max(box.w, box.h) / min(image.size) if box else None)
    return shares


def whole_image_margin(shares: list[float]) -> float | None:
    """The margin (`faces.face_region`'s) at which the square cut around a face is the whole image, for
    images whose face box spans `shares` of the shorter side: the median image's, within [0, MAX_MARGIN]
    (what `deidentify --margin` accepts)."""
    if not shares:
        return None
    return round(min(MAX_MARGIN, max(0.0, (1.0 / float(np.median(shares)) - 1.0) / 2.0)), 3)


def assign_splits(identity: np.ndarray, emotion: np.ndarray, fixed: list[str | None], data: DataConfig,
                  identity_names: list[str], classes: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """Per-identity closed-set splits (every person in every split); a source's own split (FER2013 Usage) is kept.

    Returns the split of every image and a warning for each class too thin to appear in every split.
    """
    if identity_names:
        split = split_per_identity(identity, emotion, data.splits, seed=data.seed)
        warnings = []
        for ident, name in enumerate(identity_names):
            for emo in np.unique(emotion[identity == ident]):
                n = int(((identity == ident) & (emotion == emo)).sum())
                if n < 3:
                    warnings.append(f"identity {name!r}, emotion {classes[emo]!r}: {n} image(s), too few to appear in "
                                    "train, val and test (a class needs 3)")
            missing = [s for s in SPLITS if not ((identity == ident) & (split == s)).any()]
            if missing:
                warnings.append(f"identity {name!r} has no image in {'/'.join(missing)}: "
                                "the closed-set metrics cannot judge it there")
        return split, warnings
    rng = np.random.default_rng(data.seed)
    draw = rng.choice(SPLITS, size=len(fixed), p=np.array(data.splits))
    split = np.array([s if s is not None else d for s, d in zip(fixed, draw)])
    warnings = [f"split {s!r} is empty" for s in SPLITS if not (split == s).any()]
    return split, warnings


def rejects_csv(rejects: list[tuple[str, str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "reason", "detail"])
    writer.writerows(rejects)
    return buf.getvalue()


def summary_line(prepared: PreparedData) -> str:
    """What `prepare` prints at the end: accepted and rejected per reason, conversions, what was left out."""
    m = prepared.manifest
    counts = ", ".join(f"{s} {m['splits'][s]['images']}" for s in SPLITS)
    line = (f"{'reused' if prepared.reused else 'prepared'} {m['num_images']} images ({counts}), "
            f"content hash {m['content_hash']} -> {prepared.path}")
    intake = m.get("intake")
    if intake:
        rejected = sum(intake["rejected"].values())
        parts = [f"accepted {intake['accepted']}", f"rejected {rejected}"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(intake['rejected'].items()))}; see "
                    f"{Path(prepared.path) / REJECTS_FILE})" if rejected else "")]
        if intake.get("face_crop") == "head":
            parts.append("each face cut out on its detected box")
        elif intake.get("face_margin") is not None:
            parts.append(f"each image taken whole, {intake['face_margin']:.2f} of the face's side around it")
        if intake["converted"]:
            parts.append("converted to RGB " + ", ".join(f"{k}: {v}" for k, v in sorted(intake["converted"].items())))
        if intake["skipped"]:
            parts.append("left out by choice " + ", ".join(f"{k}: {v}" for k, v in sorted(intake["skipped"].items())))
        line += "\n" + "; ".join(parts)
    return line

