"""Parquet shards of labelled faces, and `dataset.json` that describes them.

A row holds the encoded image (so the original can be recovered) and the raw `pixels` at the training
size, so training never decodes an image twice. This module is plain pyarrow: the Ray Data stream in
`stream.py` and the in-process loaders of evaluation and deployment read the same files.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from epd_ray.artifacts import MANIFEST, DatasetManifest, atomic_folder, read_manifest  # noqa: F401 (read_manifest: re-exported)

SPLITS = ("train", "val", "test")

SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("pixels", pa.binary()),
    ("identity", pa.int64()),
    ("identity_name", pa.string()),
    ("emotion", pa.int64()),
    ("emotion_name", pa.string()),
    ("split", pa.string()),
    ("source", pa.string()),
])


@dataclass(frozen=True)
class FaceArrays:
    """One split in memory: uint8 pixels (N, H, W, 3) and integer labels."""

    pixels: np.ndarray
    identity: np.ndarray
    emotion: np.ndarray

    def __len__(self) -> int:
        return len(self.identity)

    def take(self, indices: np.ndarray) -> "FaceArrays":
        """The faces at `indices`, with their labels."""
        return FaceArrays(self.pixels[indices], self.identity[indices], self.emotion[indices])

    def per_identity(self, count: int, seed: int = 0) -> "FaceArrays":
        """Up to `count` faces of every identity (seeded), in their order here: the recogniser's gallery and
        the validation probes, whose cost stays bounded on large sets while every person is in them."""
        rng = np.random.default_rng(seed)
        chosen = [rng.permutation(np.flatnonzero(self.identity == ident))[:count] for ident in np.unique(self.identity)]
        return self.take(np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64))

    def at_most(self, count: int) -> "FaceArrays":
        """All faces if they are `count` or fewer (or `count` is 0), else as many of every identity as `count`
        allows, at least one each: a split judged within a bounded cost with every person in it."""
        if not count or len(self) <= count:
            return self
        return self.per_identity(max(1, count // len(np.unique(self.identity))))


def split_per_identity(identity: np.ndarray, emotion: np.ndarray, shares: tuple[float, float, float],
                       seed: int) -> np.ndarray:
    """Closed-set split: every identity appears in train, val and test, images split per identity.

    Stratified by emotion inside each identity, so every split sees every expression of every person;
    each image lands in exactly one split. An expression with fewer than 3 images of a person stays in
    train, unless none of that person's expressions has 3: then those images are split as one group (the
    second image of an expression first, so each expression keeps one in train), so that a person with
    3 images or more is in val and test whatever their spread over expressions (real sets often have 1-2
    per person and expression).
    """
    rng = np.random.default_rng(seed)
    split = np.empty(len(identity), dtype=object)

    def assign(idx: np.ndarray) -> None:
        n_val, n_test = _held_out_counts(len(idx), shares)
        split[idx[: len(idx) - n_val - n_test]] = "train"
        split[idx[len(idx) - n_val - n_test: len(idx) - n_test]] = "val"
        split[idx[len(idx) - n_test:]] = "test"

    for ident in np.unique(identity):
        firsts, seconds = [], []
        for emo in np.unique(emotion[identity == ident]):
            idx = np.flatnonzero((identity == ident) & (emotion == emo))
            idx = idx[rng.permutation(len(idx))]
            assign(idx)
            if len(idx) < 3:
                firsts.append(idx[0])
                seconds.extend(idx[1:])
        if not (split[identity == ident] == "val").any():
            assign(np.array(firsts + [seconds[i] for i in rng.permutation(len(seconds))], dtype=np.int64))
    return split.astype(str)


def _held_out_counts(n: int, shares: tuple[float, float, float]) -> tuple[int, int]:
    """Images of one (identity, emotion) group for val and test: at least one each, and at least one left
    for train; a group of fewer than 3 stays whole in train."""
    if n < 3:
        return 0, 0
    n_val, n_test = max(1, round(n * shares[1])), max(1, round(n * shares[2]))
    while n_val + n_test > n - 1:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def content_hash(pixels: np.ndarray, identity: np.ndarray, emotion: np.ndarray, split: np.ndarray) -> str:
    """Hash of what training sees, independent of Parquet's encoding details."""
    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(pixels), identity.astype(np.int64), emotion.astype(np.int64)):
        h.update(arr.tobytes())
    h.update("\n".join(split).encode())
    return h.hexdigest()[:16]


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(out_dir: Path, *, pixels: np.ndarray, identity: np.ndarray, identity_names: list[str],
                  emotion: np.ndarray, emotion_names: tuple[str, ...], split: np.ndarray, source: list[str],
                  shard_rows: int, extra: dict, extra_files: dict[str, str] | None = None) -> dict:
    """Write shards and `dataset.json` atomically: into a temporary folder renamed when complete.

    An interrupted run therefore leaves nothing that looks finished at `out_dir`.
    """
    with atomic_folder(out_dir) as tmp:
        (tmp / "shards").mkdir()
        files: dict[str, list[str]] = {}
        for name in SPLITS:
            idx = np.flatnonzero(split == name)
            files[name] = []
            for shard_no, start in enumerate(range(0, len(idx), shard_rows)):
                rows = idx[start:start + shard_rows]
                table = pa.table({
                    "image": [encode_png(pixels[i]) for i in rows],
                    "pixels": [pixels[i].tobytes() for i in rows],
                    "identity": identity[rows].astype(np.int64),
                    "identity_name": [identity_names[identity[i]] if identity[i] >= 0 else "" for i in rows],
                    "emotion": emotion[rows].astype(np.int64),
                    "emotion_name": [emotion_names[emotion[i]] for i in rows],
                    "split": [name] * len(rows),
                    "source": [source[i] for i in rows],
                }, schema=SCHEMA)
                rel = f"shards/{name}-{shard_no:05d}.parquet"
                pq.write_table(table, tmp / rel)
                files[name].append(rel)
        counts = {name: {"images": int((split == name).sum()),
                         "per_identity_emotion": _counts(identity[split == name], emotion[split == name])}
                  for name in SPLITS}
        manifest = {
            "format": 1,
            "image_size": int(pixels.shape[1]),
            "identities": list(identity_names),
            "emotions": list(emotion_names),
            "num_images": int(len(identity)),
            "splits": counts,
            "shards": files,
            "content_hash": content_hash(pixels, identity, emotion, split),
            **extra,
        }
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _counts(identity: np.ndarray, emotion: np.ndarray) -> dict[str, int]:
    pairs, n = np.unique(np.stack([identity, emotion], 1), axis=0, return_counts=True) if len(identity) else ([], [])
    return {f"{i}/{e}": int(c) for (i, e), c in zip(pairs, n)}


def shard_paths(dataset_dir: Path, split: str) -> list[str]:
    return [str(Path(dataset_dir) / rel) for rel in DatasetManifest.load(dataset_dir).shards[split]]


def pixels_from_bytes(column, image_size: int) -> np.ndarray:
    """Raw `pixels` cells back to a (N, H, W, 3) uint8 array, without copying each cell twice."""
    flat = np.frombuffer(bytearray(b"".join(column)), dtype=np.uint8)  # writable: torch wants that
    return flat.reshape(len(column), image_size, image_size, 3)


def load_split(dataset_dir: Path, split: str) -> FaceArrays:
    """A whole split in memory (evaluation, the real-pair pool, baselines): small enough by design."""
    manifest = DatasetManifest.load(dataset_dir)
    table = pa.concat_tables([pq.read_table(p, columns=["pixels", "identity", "emotion"])
                              for p in shard_paths(dataset_dir, split)])
    return FaceArrays(
        pixels=pixels_from_bytes(table.column("pixels").to_pylist(), manifest.image_size),
        identity=table.column("identity").to_numpy().astype(np.int64),
        emotion=table.column("emotion").to_numpy().astype(np.int64),
    )
