"""Images per second delivered to a training loop: epd-ray's Ray Data stream against a plain DataLoader.

    python -m benchmarks.ingest                        # 64 px, ~4,000 train images, 3 epochs each: ~1-2 min
    python -m benchmarks.ingest --size 128 --epochs 4 --no-augment

Both sides deliver the same train split, as float NCHW batches in [-1, 1] of the same batch size, with the
same augmentation (random mirror and shift, drawn anew each epoch), in the same process run:

- Ray Data (epd-ray's path): Parquet shards from `prepare_dataset`, read and decoded once by
  `materialized_split`, augmented by `augmented(...)` (a lazy `map_batches` on CPU tasks), consumed inside a
  Ray Train worker by `epd_ray.train.worker.ShardBatches`, as training does: `get_dataset_shard(...)
  .iter_torch_batches` with a local shuffle buffer each epoch, or with `--no-augment` (nothing new to draw
  per pass) one pass kept in worker memory. The one-off read + decode is timed apart.
- Baseline: a `torch.utils.data.DataLoader` (shuffle, one loader worker per core) over the same images as PNG
  files, decoded by PIL in `__getitem__` (a hand-written pix2pix loader), same augmentation per image.

Each side's first epoch is reported apart (warm-up); images/s is the mean over the later epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import machine  # noqa: E402
from epd_ray.config import DataConfig, RayConfig  # noqa: E402
from epd_ray.core.images import to_tensor  # noqa: E402
from epd_ray.data.stream import augment_pixels  # noqa: E402
from epd_ray.train.worker import DATASET, ShardBatches, WorkerSetup  # noqa: E402


class PngFaces(torch.utils.data.Dataset):
    """The baseline: one PNG file per face, decoded and augmented per item."""

    def __init__(self, files: list[Path], labels: np.ndarray, flip: bool, max_shift: int):
        self.files, self.labels, self.flip, self.max_shift = files, labels, flip, max_shift

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        pixels = np.asarray(Image.open(self.files[i]).convert("RGB"))[None]
        pixels = augment_pixels(pixels, flip=self.flip, max_shift=self.max_shift, rng=np.random.default_rng())
        return torch.from_numpy(np.ascontiguousarray(pixels[0])), int(self.labels[i])


def dataloader_epochs(files: list[Path], labels: np.ndarray, *, batch_size: int, epochs: int, flip: bool,
                      max_shift: int, workers: int) -> list[tuple[int, float]]:
    loader = torch.utils.data.DataLoader(PngFaces(files, labels, flip, max_shift), batch_size=batch_size,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    out = []
    for _ in range(epochs):
        started, images = time.perf_counter(), 0
        for pixels, _ in loader:
            x = to_tensor(pixels)
            images += x.shape[0]
        out.append((images, time.perf_counter() - started))
    return out


def ray_epochs(train_data, *, batch_size: int, epochs: int, keep: bool, storage: Path) -> list[tuple[int, float]]:
    """Epochs through a Ray Train worker, timed inside it (the worker's view is what training sees)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def loop(config):
        setup = WorkerSetup(rank=0, world_size=1, device=torch.device("cpu"), precision="fp32", channels_last=False)
        batches = ShardBatches(setup, config["batch_size"], keep=config["keep"])
        times = []
        for epoch in range(config["epochs"]):
            started, images = time.perf_counter(), 0
            for batch in batches.epoch(seed=epoch):
                images += batch["x"].shape[0]
            times.append((images, time.perf_counter() - started))
        Path(config["out"]).write_text(json.dumps(times))  # (Train V2 keeps metrics only with checkpoints)
        ray.train.report({})

    out = storage / "times.json"
    trainer = TorchTrainer(loop, train_loop_config={"epochs": epochs, "batch_size": batch_size, "keep": keep,
                                                             "out": str(out)},
                           scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name="ingest", storage_path=str(storage)),
                           datasets={DATASET: train_data})
    storage.mkdir(parents=True, exist_ok=True)
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"the Ray ingest run failed: {result.error}")
    return [tuple(t) for t in json.loads(out.read_text())]


def rate(epochs: list[tuple[int, float]]) -> float:
    later = epochs[1:] or epochs
    return sum(n for n, _ in later) / sum(s for _, s in later)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image size, px (default 64)")
    parser.add_argument("--identities", type=int, default=40, help="synthetic identities (x 7 emotions x variations)")
    parser.add_argument("--variations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per side (the first is warm-up)")
    parser.add_argument("--no-augment", action="store_true", help="no mirror/shift on either side")
    args = parser.parse_args(argv)
    flip, max_shift = (False, 0) if args.no_augment else (True, max(1, args.size // 16))

    import logging

    import pyarrow.parquet as pq

    from epd_ray.data.prepare import prepare_dataset
    from epd_ray.data.shards import shard_paths
    from epd_ray.data.stream import augmented, materialized_split
    from epd_ray.runtime import start_ray

    workdir = Path(tempfile.mkdtemp(prefix="epd-bench-ingest-"))
    print("ingest: images/s delivered to a training loop, Ray Data stream vs DataLoader over PNG files")
    machine.print_machine("cpu")
    try:
        t = time.perf_counter()
        prepared = prepare_dataset(DataConfig(image_size=args.size, num_identities=args.identities,
                                              variations=args.variations), workdir / "data")
        prepare_s = time.perf_counter() - t
        files, labels = [], []
        png_dir = workdir / "png"
        png_dir.mkdir()
        for shard in shard_paths(prepared.path, "train"):
            table = pq.read_table(shard, columns=["image", "identity"])
            for image, identity in zip(table.column("image").to_pylist(), table.column("identity").to_pylist()):
                files.append(png_dir / f"{len(files):06d}.png")
                files[-1].write_bytes(image)
                labels.append(identity)
        n = len(files)
        print(f"{n} train images, {args.size} px, batch {args.batch}, augmentation "
              f"{'mirror + shift <= %d px' % max_shift if flip else 'off'}, {args.epochs} epochs per side "
              f"(prepare: {prepare_s:.1f} s)")

        start_ray(RayConfig(num_cpus=machine.usable_cpus(), dashboard_port=0))
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        t = time.perf_counter()
        train_data = materialized_split(prepared.path, "train")
        materialize_s = time.perf_counter() - t
        ray_side = ray_epochs(augmented(train_data, flip=flip, max_shift=max_shift), batch_size=args.batch,
                              epochs=args.epochs, keep=not flip, storage=workdir / "ray")
        workers = machine.usable_cpus()
        loader_side = dataloader_epochs(files, np.array(labels), batch_size=args.batch, epochs=args.epochs,
                                        flip=flip, max_shift=max_shift, workers=workers)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def row(name: str, epochs: list[tuple[int, float]], once: str) -> str:
        first = epochs[0][0] / epochs[0][1]
        return f"| {name} | {rate(epochs):,.0f} | {first:,.0f} | {once} |"

    print()
    print("| pipeline | images/s (epochs 2..N) | first epoch images/s | one-off cost |")
    print("|---|---|---|---|")
    print(row(f"Ray Data: materialized Parquet{' + map_batches augment' if flip else ''}, in a Train worker", ray_side,
              f"read + decode once {materialize_s:.1f} s ({n / materialize_s:,.0f} images/s)"))
    print(row(f"DataLoader over PNG files ({workers} loader workers)", loader_side, "none"))
    print(f"\nratio Ray Data / DataLoader: {rate(ray_side) / rate(loader_side):.2f}x   ({machine.load_line()})")


if __name__ == "__main__":
    main()
