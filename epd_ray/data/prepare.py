"""`epd-ray data prepare`: a source of labelled faces to Parquet shards, cached by what defines them.

The cache key is the hash of the data section of the config, so a second run with the same data settings
reuses the shards instead of rendering or decoding again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from epd_ray.config import DataConfig, stable_hash
from epd_ray.core.labels import EMOTIONS
from epd_ray.core.synthetic import make_synthetic_faces
from epd_ray.data.shards import MANIFEST, read_manifest, split_per_identity, write_dataset


@dataclass(frozen=True)
class PreparedData:
    path: Path
    manifest: dict
    reused: bool


def dataset_key(data: DataConfig) -> str:
    return f"{data.source}-{data.image_size}px-{stable_hash(data.model_dump(mode='json'))}"


def cached_dataset(data: DataConfig, cache_dir: Path) -> PreparedData:
    """The prepared data set for these settings in the shared cache, prepared on first use."""
    return prepare_dataset(data, Path(cache_dir) / "data" / dataset_key(data))


def prepare_dataset(data: DataConfig, out: Path) -> PreparedData:
    """Prepare into `out`; a folder already prepared with the same settings is reused as it is."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("config") == data.model_dump(mode="json"):
            return PreparedData(out, manifest, reused=True)
    faces = make_synthetic_faces(data.num_identities, data.variations, data.image_size, seed=data.seed)
    split = split_per_identity(faces.identity, faces.emotion, data.splits, seed=data.seed)
    manifest = write_dataset(
        out, pixels=faces.pixels, identity=faces.identity, identity_names=faces.identity_names,
        emotion=faces.emotion, emotion_names=EMOTIONS, split=split, source=faces.source,
        shard_rows=data.shard_rows, extra={"source": data.source, "config": data.model_dump(mode="json")},
    )
    return PreparedData(out, manifest, reused=False)
