"""Ray Data stream of prepared shards into the GAN's training processes (Tune trials, Ray Train workers).

`read_parquet` reads the raw `pixels` column of the shards (no image decode: it was decoded once, at prepare
time). On a cluster of several nodes the driver reads the tables itself and hands them to Ray as blocks in its
object store instead: read tasks placed on other nodes could not open files prepared on the driver's disk.
`map_batches` turns them into uint8 arrays; a one-worker trial iterates the whole split, each Ray Train worker
its part through `ray.train.get_dataset_shard(...)`. The driver materializes the result once, before any
training process holds a CPU: every epoch and every trial then iterates blocks already in the object store
(tens of thousands of images a second) instead of re-reading files, and on a small machine no data task can
wait forever behind training workers that hold the CPUs.

Augmentation (pix2pix's mirror and jitter) is a lazy `map_batches` on top of the materialized split, so
it runs again, with new draws, on every pass: each epoch sees other flips and shifts of the same faces.
Each row carries its draw (`JITTER_COLUMNS`), so that the GAN loop mirrors and shifts the row's real pair
alike: drawn apart, real pairs were offset against each other while the fake pair (x, G(x)) never is, and
the discriminator told them apart by that alone (on JAFFE at 64 px with 4 px shifts, the generator's SSIM
to its input fell to 0.42 within 300 steps, against 0.64 with the pair jittered alike).
Its tasks take a quarter CPU each, out of the CPUs `runtime.py` keeps back from the training workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray.data

from epd_ray.artifacts import DatasetManifest
from epd_ray.data.shards import pixels_from_bytes, shard_paths
from epd_ray.runtime import alive_nodes

DATA_TASK_CPUS = 0.25


def _decode(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    return {
        "pixels": pixels_from_bytes(list(batch["pixels"]), image_size),
        "identity": batch["identity"].astype(np.int64),
        "emotion": batch["emotion"].astype(np.int64),
    }


JITTER_COLUMNS = ("mirrored", "shift_y", "shift_x")  # what `augmented` adds to each row besides its pixels


def draw_jitter(n: int, *, flip: bool, max_shift: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A mirror (probability 1/2) and a shift of up to `max_shift` px per face, as `JITTER_COLUMNS`."""
    return {"mirrored": rng.random(n) < 0.5 if flip else np.zeros(n, dtype=bool),
            "shift_y": rng.integers(-max_shift, max_shift + 1, size=n),
            "shift_x": rng.integers(-max_shift, max_shift + 1, size=n)}


def jitter_pixels(pixels: np.ndarray, jitter: dict[str, np.ndarray]) -> np.ndarray:
    """Each face mirrored and shifted as `jitter` (from `draw_jitter`) says, edges repeated."""
    out = pixels.copy()
    mirrored = np.asarray(jitter["mirrored"], dtype=bool)
    out[mirrored] = out[mirrored, :, ::-1]
    shifts = np.stack([np.asarray(jitter["shift_y"]), np.asarray(jitter["shift_x"])], axis=1).astype(np.int64)
    pad = int(np.abs(shifts).max(initial=0))
    if pad:
        height, width = pixels.shape[1:3]
        padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        for i, (dy, dx) in enumerate(pad - shifts):  # content moves down by shift_y, right by shift_x
            out[i] = padded[i, dy:dy + height, dx:dx + width]
    return out


def _augment(batch: dict[str, np.ndarray], flip: bool, max_shift: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng()  # fresh entropy per batch and pass: every epoch draws anew
    jitter = draw_jitter(len(batch["pixels"]), flip=flip, max_shift=max_shift, rng=rng)
    return {**batch, "pixels": jitter_pixels(batch["pixels"], jitter), **jitter}


def augmented(ds: ray.data.Dataset, *, flip: bool, max_shift: int) -> ray.data.Dataset:
    """`ds` with random mirror/shift applied on each pass, or `ds` itself when both are off."""
    if not flip and not max_shift:
        return ds
    return ds.map_batches(_augment, fn_kwargs={"flip": flip, "max_shift": max_shift}, batch_format="numpy",
                          num_cpus=DATA_TASK_CPUS)


def split_stream(dataset_dir: Path, split: str = "train", *, via_driver: bool = False) -> ray.data.Dataset:
    """A Ray Dataset of one split, decoded lazily: columns pixels (N, H, W, 3) uint8, identity, emotion.

    `via_driver`: the driver reads the shards and puts the tables into the object store (the files may be
    on its disk only) instead of Ray Data's read tasks reading them wherever they run.
    """
    image_size = DatasetManifest.load(dataset_dir).image_size
    paths, columns = shard_paths(dataset_dir, split), ["pixels", "identity", "emotion"]
    if via_driver:
        ds = ray.data.from_arrow([pq.read_table(path, columns=columns) for path in paths])
    else:
        ds = ray.data.read_parquet(paths, columns=columns, num_cpus=DATA_TASK_CPUS)
    return ds.map_batches(_decode, fn_kwargs={"image_size": image_size}, batch_format="numpy",
                          num_cpus=DATA_TASK_CPUS)


def materialized_split(dataset_dir: Path, split: str = "train") -> ray.data.MaterializedDataset:
    """The split read once into Ray's object store, shared by every training run of a command (read through the
    driver when the cluster has more than one node)."""
    return split_stream(dataset_dir, split, via_driver=alive_nodes() > 1).materialize()
