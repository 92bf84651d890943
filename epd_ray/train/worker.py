"""What every Ray Train worker loop of epd-ray does the same way.

Thread count, seeding, device and precision, iterating the Ray Data shard as float image batches, the
real-pair pool, and reporting with a checkpoint written by rank 0 only (every rank must call
`ray.train.report` the same number of times).
"""

from __future__ import annotations

import itertools
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray.train
import ray.train.torch
import torch

from epd_ray.checkpoints import load_checkpoint, save_checkpoint
from epd_ray.core.images import to_tensor
from epd_ray.core.precision import resolve_precision, threads_for
from epd_ray.data.shards import FaceArrays
from epd_ray.data.stream import augment_pixels

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class WorkerSetup:
    rank: int
    world_size: int
    device: torch.device
    precision: str
    channels_last: bool


def use_channels_last(requested: bool, device: torch.device) -> bool:
    """Channels-last memory only on GPUs. On CPU, oneDNN's channels-last weight gradient of 1x1 convolutions
    (mini-Xception's, the ResNet's shortcuts) crashes the process (SIGSEGV or heap corruption) at some
    shapes: 64 and 128 px in fp32, or a last partial batch in bf16; and it gains nothing measurable there."""
    return requested and device.type == "cuda"


def setup_worker(cpus_per_worker: float, precision: str, channels_last: bool, seed: int) -> WorkerSetup:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(threads_for(cpus_per_worker))
    seed_everything(seed + rank)
    return WorkerSetup(rank, world, device, resolve_precision(precision, device),
                       use_channels_last(channels_last, device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DATASET = "train"  # the name of the Train run's one dataset (`gan_trainer`'s datasets)
KEEP_LIMIT_BYTES = 1 << 30  # a shard's pixels kept in worker memory at most (the paper preset's is ~0.6 GB)


class ShardBatches:
    """This worker's Ray Data shard, one pass per `epoch(seed)` (or pass after pass: `forever`), as float
    NCHW batches on its device.

    The first epoch always streams from Ray Data (`ray.train.get_dataset_shard`). With `keep`, the rows of
    that complete pass stay in worker memory (up to KEEP_LIMIT_BYTES) and later epochs draw their batches
    from them, fully reshuffled with the epoch's seed: every Ray Data pass pays a fixed start-up (~60 ms on
    2 cores, 4% of a quick-preset epoch) that buys nothing when a pass yields the same rows again. Leave
    `keep` off when the stream draws anew on each pass (the GAN's mirror/shift augmentation in
    `map_batches`). With several workers each keeps the rows of its own first pass.
    """

    def __init__(self, setup: WorkerSetup, batch_size: int, *, keep: bool = True):
        self.setup, self.batch_size, self.keep = setup, batch_size, keep
        self.kept: dict[str, torch.Tensor] | None = None

    @classmethod
    def in_memory(cls, setup: WorkerSetup, batch_size: int, faces: FaceArrays) -> ShardBatches:
        """Batches from a split held in memory, drawn as a kept shard's later passes are (no Ray Data)."""
        batches = cls(setup, batch_size)
        batches.kept = {"pixels": torch.from_numpy(faces.pixels), "identity": torch.from_numpy(faces.identity),
                        "emotion": torch.from_numpy(faces.emotion)}
        return batches

    def forever(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches without end, pass after pass over the shard (pass n shuffled with `seed + n`): budgets are
        counted in optimiser steps, so a loop takes as many batches as its steps and a small set wraps around."""
        for n in itertools.count():
            empty = True
            for batch in self.epoch(seed + n):
                empty = False
                yield batch
            if empty:
                raise RuntimeError(f"the {DATASET!r} shard of this worker holds fewer than batch_size = "
                                   f"{self.batch_size} rows: lower the batch size or use fewer workers")

    def epoch(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        if self.kept is not None:
            order = torch.randperm(len(self.kept["identity"]), generator=torch.Generator().manual_seed(seed))
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield self._on_device({k: v[order[start:start + self.batch_size]] for k, v in self.kept.items()})
            return
        parts: list[dict[str, torch.Tensor]] = []
        size = 0
        shard = ray.train.get_dataset_shard(DATASET)
        for batch in shard.iter_torch_batches(batch_size=self.batch_size, local_shuffle_buffer_size=4 * self.batch_size,
                                              local_shuffle_seed=seed, drop_last=False):
            if self.keep:
                parts.append({k: batch[k] for k in ("pixels", "identity", "emotion")})
                size += batch["pixels"].nbytes
                if size > KEEP_LIMIT_BYTES:  # too big to keep: stream every epoch, and stop collecting for good
                    self.keep, parts = False, []
            if len(batch["identity"]) == self.batch_size:  # the last, partial batch is not trained on
                yield self._on_device(batch)
        if parts:
            self.kept = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "pixels": batch["pixels"],
            "x": prepare_images(batch["pixels"], self.setup),
            "identity": batch["identity"].to(self.setup.device),
            "emotion": batch["emotion"].to(self.setup.device),
        }


def prepare_images(pixels: torch.Tensor | np.ndarray, setup: WorkerSetup) -> torch.Tensor:
    x = to_tensor(pixels).to(setup.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if setup.channels_last else x


def restore() -> tuple[dict[str, Any] | None, int]:
    """The payload of the checkpoint Ray Train hands back after a failure or resume, and the next round."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, 0
    with checkpoint.as_directory() as directory:
        payload = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
    return payload, int(payload.get("round", -1)) + 1


def report(setup: WorkerSetup, metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
    """Report on every rank; rank 0 alone writes and attaches the checkpoint.

    The upload to storage and the hand-over to the Train controller (which picks reports up at its poll)
    run in Ray Train's background thread (`CheckpointUploadMode.ASYNC`), so the next epoch starts as soon
    as the checkpoint file is written locally; Ray deletes the local copy once it is uploaded, and keeps
    reports in order.
    """
    checkpoint = None
    if setup.rank == 0 and payload is not None:
        directory = tempfile.mkdtemp(prefix="epd-checkpoint-")
        save_checkpoint(Path(directory) / CHECKPOINT_FILE, payload)
        checkpoint = ray.train.Checkpoint.from_directory(directory)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


class RealPairPool:
    """Real faces for the discriminator's real pair (x, y) (the paper's section III).

    With `other_identity_same_emotion`, y is a real face of another person with x's expression, which
    teaches D "a real face that keeps the expression", not "a copy of x". Held in memory once per worker.
    Where a real data set has an expression shown by one person only, y falls back to another person with
    any expression, then to any face: training goes on instead of failing on the first such batch.
    """

    def __init__(self, faces: FaceArrays, mode: str, seed: int):
        self.pixels = torch.from_numpy(np.ascontiguousarray(faces.pixels))
        self.mode = mode
        self.rng = np.random.default_rng(seed)
        self.candidates: dict[tuple[int, int], np.ndarray] = {}
        everyone = np.arange(len(faces.identity))
        for emo in np.unique(faces.emotion):
            for ident in np.unique(faces.identity):
                for idx in (np.flatnonzero((faces.emotion == emo) & (faces.identity != ident)),
                            np.flatnonzero(faces.identity != ident), everyone):
                    if len(idx):
                        self.candidates[(int(emo), int(ident))] = idx
                        break

    def sample(self, identity: torch.Tensor, emotion: torch.Tensor, *, flip: bool = False,
               max_shift: int = 0) -> torch.Tensor:
        """Real faces for a batch; mirrored/shifted like the stream's x, so D cannot tell real from fake by
        augmentation alone."""
        if self.mode == "any_real":
            idx = self.rng.integers(0, len(self.pixels), size=len(identity))
        else:
            pairs = zip(emotion.tolist(), identity.tolist())
            idx = np.array([self.rng.choice(self.candidates[pair]) for pair in pairs])
        faces = self.pixels[torch.from_numpy(idx)]
        if flip or max_shift:
            faces = torch.from_numpy(augment_pixels(faces.numpy(), flip=flip, max_shift=max_shift, rng=self.rng))
        return faces
