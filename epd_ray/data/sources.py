"""Where labelled faces come from: one generator of `Item`s per source format.

A source only says which files (or CSV rows) exist and what their labels claim; it never decodes an
image. Decoding, cropping, conversion and every reject reason live in `decode.py`, and the bookkeeping
(duplicates, rejects, counts, splits, shards) in `prepare.py`, so all formats are judged the same way.

- `folder`: `<root>/<identity>/<emotion>/<image>`.
- `manifest`: a CSV or Parquet file with columns `path,identity,emotion` (or `expression`), paths relative to the file.
- `rafd`: Radboud Faces file names `Rafd{angle}_{subject}_{group}_{gender}_{emotion}_{gaze}.jpg`, with a
  choice of camera angles and gazes; contemptuous is kept out unless asked for.
- `fer2013`: the Kaggle CSV `emotion,pixels,Usage` (48x48 grey); no identities: emotion pretraining only.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from epd_ray.core.labels import CONTEMPT, EMOTIONS

# Spellings users' folders and manifests carry, to the paper's class names (FER, RaFD and JAFFE vocabularies,
# JAFFE's two-letter codes too); a set's own names go in `data.label_map`.
EMOTION_ALIASES = {
    "an": "angry", "di": "disgusted", "fe": "fearful", "ha": "happy", "sa": "sad", "su": "surprised", "ne": "neutral",
    "anger": "angry", "angry": "angry", "mad": "angry",
    "disgust": "disgusted", "disgusted": "disgusted",
    "fear": "fearful", "fearful": "fearful", "afraid": "fearful", "scared": "fearful",
    "happy": "happy", "happiness": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprised", "surprised": "surprised",
    "neutral": "neutral", "calm": "neutral",
    "contempt": CONTEMPT, "contemptuous": CONTEMPT,
}

RAFD_NAME = re.compile(r"^Rafd(?P<angle>\d{3})_(?P<subject>\d+)_(?P<group>[A-Za-z]+)_(?P<gender>[A-Za-z]+)_"
                       r"(?P<emotion>[A-Za-z]+)_(?P<gaze>[A-Za-z]+)$")
CONTEMPT_LEFT_OUT = "contemptuous left out"  # why a contemptuous face is skipped without data.include_contempt
FER_SPLITS = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FER_SIZE = 48


class DataError(ValueError):
    """Input that stops `prepare`: an unreadable source (missing root, a manifest without the needed
    columns) or, in strict mode, the first rejected file. The message names the file."""


@dataclass(frozen=True)
class Item:
    """One candidate face: a name for reports, the labels it claims, and how to get its bytes or pixels.

    `emotion` is the raw label (mapped to a class by `emotion_class`); `identity` is None for a source
    without identities (FER2013) and "" where the label is missing. `split` is set when the source fixes
    it (FER2013's Usage column); otherwise prepare splits per identity.
    """

    file: str
    identity: str | None
    emotion: str
    read: Callable[[], bytes] | None = None
    pixels: np.ndarray | None = None
    split: str | None = None


def emotion_classes(include_contempt: bool) -> tuple[str, ...]:
    return EMOTIONS + ((CONTEMPT,) if include_contempt else ())


def emotion_name(label: str, label_map: dict[str, str] | None = None) -> str:
    """The class name a label stands for (case-insensitive; the user's `label_map` first, then common
    spellings), or the label itself, lower-cased."""
    label = label.strip().lower()
    return (label_map or {}).get(label) or EMOTION_ALIASES.get(label, label)


def emotion_class(label: str, classes: tuple[str, ...], label_map: dict[str, str] | None = None) -> int | None:
    """The class index of a label (`emotion_name`); None when outside."""
    name = emotion_name(label, label_map)
    return classes.index(name) if name in classes else None


def _reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _visible_files(root: Path) -> Iterator[Path]:
    """Every file under root, sorted, skipping hidden ones (.DS_Store, ._ files, .git)."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
            yield path


def _existing_dir(root: Path, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder ({what})")
    return root


def folder_items(root: Path) -> Iterator[Item]:
    """`<root>/<identity>/<emotion>/<image>`; a file anywhere else has no labels and is reported so."""
    root = _existing_dir(root, "folder source: <root>/<identity>/<emotion>/<image>")
    for path in _visible_files(root):
        parts = path.relative_to(root).parts
        identity, emotion = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
        yield Item(str(path.relative_to(root)), identity, emotion, read=_reader(path))


# A manifest's three columns, each found by the first of its names the manifest holds (any case), unless
# `data.manifest_columns` names it: JAFFE's says expression, other sets file, subject or label.
MANIFEST_COLUMNS = {
    "path": ("path", "file", "filename", "file_name", "image", "image_path", "img"),
    "identity": ("identity", "subject", "person", "subject_id", "person_id", "id"),
    "emotion": ("emotion", "expression", "emotion_label", "label"),
}


def manifest_columns(manifest: Path, columns: Iterable[str], named: dict[str, str] | None = None) -> dict[str, str]:
    """The manifest's column for each of path, identity and emotion: the one `named` gives, else the first
    of its usual names (MANIFEST_COLUMNS) that the manifest holds; DataError naming what is missing."""
    present = {str(c).strip().lower(): c for c in columns}
    found, missing = {}, []
    for role, names in MANIFEST_COLUMNS.items():
        wanted = (named or {}).get(role)
        if wanted is not None and wanted.strip().lower() not in present:
            raise DataError(f"{manifest}: no column {wanted!r} (data.manifest_columns.{role}); its columns: "
                            f"{', '.join(map(str, columns)) or 'none'}")
        hit = present.get(wanted.strip().lower()) if wanted is not None else next(
            (present[n] for n in names if n in present), None)
        if hit is None:
            missing.append(role)
        else:
            found[role] = hit
    if missing:
        raise DataError(f"{manifest}: manifest lacks column(s) {', '.join(missing)} (looked for "
                        + "; ".join(f"{role}: {', '.join(MANIFEST_COLUMNS[role])}" for role in missing)
                        + f"; its columns: {', '.join(map(str, columns)) or 'none'}); name yours with "
                        "--columns path=COLUMN,identity=COLUMN,emotion=COLUMN")
    return found


def manifest_rows(manifest: Path) -> tuple[list[dict], list[str]]:
    """A CSV or Parquet manifest's rows and its column names."""
    if not manifest.is_file():
        raise DataError(f"{manifest}: no such manifest file")
    if manifest.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(manifest).to_pylist()
        return rows, list(rows[0]) if rows else list(pq.read_schema(manifest).names)
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        return list(reader), list(reader.fieldnames or [])


def manifest_items(manifest: Path, named: dict[str, str] | None = None) -> Iterator[Item]:
    """Rows of a CSV or Parquet manifest of a path, an identity and an emotion per image (columns found by
    `manifest_columns`); relative paths start at its folder."""
    manifest = Path(manifest)
    rows, columns = manifest_rows(manifest)
    column = manifest_columns(manifest, columns, named)
    for row in rows:
        raw = str(row[column["path"]] or "").strip()
        path = Path(raw) if Path(raw).is_absolute() else manifest.parent / raw
        identity, emotion = (str(row[column[k]] if row[column[k]] is not None else "").strip()
                             for k in ("identity", "emotion"))
        yield Item(raw or "<empty path>", identity, emotion, read=_reader(path) if raw else None)


def rafd_items(root: Path, *, angles: tuple[str, ...], gazes: tuple[str, ...], include_contempt: bool,
               skipped: dict[str, int]) -> Iterator[Item]:
    """Radboud files of the chosen angles and gazes; files left out by choice are counted in `skipped`."""
    root = _existing_dir(root, "rafd source: the folder of Rafd*.jpg files")
    for path in _visible_files(root):
        match = RAFD_NAME.match(path.stem)
        if match is None:
            yield Item(str(path.relative_to(root)), "", "", read=_reader(path))
            continue
        fields = match.groupdict()
        emotion = fields["emotion"].lower()
        reason = ("camera angle" if fields["angle"] not in angles else
                  "gaze" if fields["gaze"].lower() not in gazes else
                  CONTEMPT_LEFT_OUT if emotion == CONTEMPT and not include_contempt else "")
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        yield Item(str(path.relative_to(root)), f"rafd{int(fields['subject']):02d}", emotion, read=_reader(path))


def fer2013_items(csv_path: Path) -> Iterator[Item]:
    """Rows of the FER2013 CSV: 48x48 grey pixels as text, emotion 0-6 in the paper's order, Usage split."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such FER2013 CSV")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"emotion", "pixels"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path}: not a FER2013 CSV, lacks column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            label = (row.get("emotion") or "").strip()
            emotion = EMOTIONS[int(label)] if label.isdigit() and int(label) < len(EMOTIONS) else label
            split = FER_SPLITS.get((row.get("Usage") or "").strip())
            yield Item(f"{csv_path.name}:{line}", None, emotion, pixels=_fer_pixels(row.get("pixels") or ""),
                       split=split)


def _fer_pixels(text: str) -> np.ndarray | None:
    try:
        values = np.array(text.split(), dtype=np.int64)
    except ValueError:
        return None
    if values.size != FER_SIZE * FER_SIZE or values.min(initial=0) < 0 or values.max(initial=0) > 255:
        return None
    return values.astype(np.uint8).reshape(FER_SIZE, FER_SIZE)
