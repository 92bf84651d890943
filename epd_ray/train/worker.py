"""What every training process of epd-ray does the same way: a Ray Train worker, or a Tune trial that
trains in its own process.

Thread count, seeding, device and precision, iterating the Ray Data shard as float image batches, the
real-pair pool, and reporting with a checkpoint written by rank 0 only (every rank must report the same
number of times) to the session that runs it (`Session`: Ray Train's or Ray Tune's).
"""

from __future__ import annotations

import itertools
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import ray.tune
import torch

from epd_ray.checkpoints import load_checkpoint, save_checkpoint
from epd_ray.core.images import to_tensor
from epd_ray.core.precision import resolve_precision, threads_for
from epd_ray.data.shards import FaceArrays
from epd_ray.data.stream import JITTER_COLUMNS, jitter_pixels

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class WorkerSetup:
    rank: int
    world_size: int
    device: torch.device
    precision: str
    channels_last: bool


def use_channels_last(requested: bool, device: torch.device, *, trains_1x1_convolutions: bool) -> bool:
    """Channels-last memory on GPUs, and on CPU wherever no 1x1 convolution's weights are trained.

    On CPU, oneDNN's channels-last weight gradient of 1x1 convolutions (mini-Xception's, the ResNet's
    shortcuts) crashes the process (SIGSEGV or heap corruption) at some shapes: 64 and 128 px in fp32, or a
    last partial batch in bf16. Pretraining trains those weights, so it keeps NCHW there. The GAN trains only
    4x4 convolutions (U-Net, PatchGAN) and passes gradients through the frozen verifiers' inputs, never their
    weights; channels-last makes its step 13-15% faster on 2 CPU threads at 32 and 64 px
    (`python -m benchmarks.train_step`) and 25% on the one thread of a quick-preset trial."""
    return requested and (device.type == "cuda" or not trains_1x1_convolutions)


def setup_worker(cpus_per_worker: float, precision: str, channels_last: bool, seed: int, *,
                 train_worker: bool = True, trains_1x1_convolutions: bool = False) -> WorkerSetup:
    """A Ray Train worker's rank, world and device from Train; a process of its own (`train_worker=False`: a
    one-worker trial, a pretraining task) is rank 0 of 1, on the GPU Ray gave it if it holds one."""
    if train_worker:
        ctx = ray.train.get_context()
        rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(threads_for(cpus_per_worker))
    seed_everything(seed + rank)
    return WorkerSetup(rank, world, device, resolve_precision(precision, device),
                       use_channels_last(channels_last, device, trains_1x1_convolutions=trains_1x1_convolutions))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DATASET = "train"  # the name of the Train run's one dataset (`gan_trainer`'s datasets)
KEEP_LIMIT_BYTES = 1 << 30  # a shard's pixels kept in worker memory at most (the paper preset's is ~0.6 GB)


class ShardBatches:
    """This worker's Ray Data shard, one pass per `epoch(seed)` (or pass after pass: `forever`), as float
    NCHW batches on its device.

    The first epoch always streams from Ray Data: `stream` (a trial's own dataset iterator), by default
    this Train worker's shard (`ray.train.get_dataset_shard`). With `keep`, the rows of
    that complete pass stay in worker memory (up to KEEP_LIMIT_BYTES) and later epochs draw their batches
    from them, fully reshuffled with the epoch's seed: every Ray Data pass pays a fixed start-up (~60 ms on
    2 cores, 4% of a quick-preset epoch) that buys nothing when a pass yields the same rows again. Leave
    `keep` off when the stream draws anew on each pass (the GAN's mirror/shift augmentation in
    `map_batches`). With several workers each keeps the rows of its own first pass.
    """

    def __init__(self, setup: WorkerSetup, batch_size: int, *, keep: bool = True,
                 stream: ray.data.DataIterator | None = None):
        self.setup, self.batch_size, self.keep, self.stream = setup, batch_size, keep, stream
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
        shard = self.stream if self.stream is not None else ray.train.get_dataset_shard(DATASET)
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
            # an augmented stream's draw for each row (what RealPairPool.sample jitters the real pair by), or None
            "jitter": {k: batch[k].numpy() for k in JITTER_COLUMNS} if JITTER_COLUMNS[0] in batch else None,
        }


def prepare_images(pixels: torch.Tensor | np.ndarray, setup: WorkerSetup) -> torch.Tensor:
    """uint8 pixels to the network's float input on the worker's device, converted there: a GPU gets a quarter
    of the bytes and does the conversion (on one GPU, pretraining at 256 px was bound by converting on the one
    CPU thread its task holds)."""
    x = to_tensor(torch.as_tensor(pixels).to(setup.device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if setup.channels_last else x


@dataclass(frozen=True)
class Session:
    """Where a training process finds the checkpoint it resumes from and hands each round's metrics and
    checkpoint: Ray Train's session (a Train run's workers) or Ray Tune's (a trial training in its own process).
    Both keep the checkpoint in the run's storage and give it back after a failure or resume."""

    get_checkpoint: Callable[[], Any]  # a ray.train or ray.tune Checkpoint, or None
    hand_over: Callable[[dict[str, Any], str | None], None]  # (metrics, the local checkpoint folder or None)

    def restore(self) -> tuple[dict[str, Any] | None, int]:
        """The payload of the checkpoint to resume from (None: a fresh start) and the next round."""
        checkpoint = self.get_checkpoint()
        if checkpoint is None:
            return None, 0
        with checkpoint.as_directory() as directory:
            payload = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
        return payload, int(payload.get("round", -1)) + 1

    def report(self, setup: WorkerSetup, metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
        """Report on every rank; rank 0 alone writes and attaches the checkpoint."""
        directory = None
        if setup.rank == 0 and payload is not None:
            directory = tempfile.mkdtemp(prefix="epd-checkpoint-")
            save_checkpoint(Path(directory) / CHECKPOINT_FILE, payload)
        self.hand_over(metrics, directory)


def _train_hand_over(metrics: dict[str, Any], directory: str | None) -> None:
    # The upload to storage and the hand-over to the Train controller (which picks reports up at its poll) run in
    # Ray Train's background thread (`CheckpointUploadMode.ASYNC`), so the next round starts as soon as the file
    # is written locally; Ray deletes the local copy once it is uploaded, and keeps reports in order.
    ray.train.report(metrics, checkpoint=directory and ray.train.Checkpoint.from_directory(directory),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def _tune_hand_over(metrics: dict[str, Any], directory: str | None) -> None:
    # Tune copies the checkpoint to storage before `report` returns and leaves the local copy to its owner.
    try:
        ray.tune.report(metrics, checkpoint=directory and ray.tune.Checkpoint.from_directory(directory))
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


TRAIN_SESSION = Session(ray.train.get_checkpoint, _train_hand_over)
TUNE_SESSION = Session(ray.tune.get_checkpoint, _tune_hand_over)


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

    def sample(self, identity: torch.Tensor, emotion: torch.Tensor,
               jitter: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """Real faces for a batch; with the batch's `jitter` (the stream's draw for each x), each mirrored and
        shifted as its x was, so that D cannot tell the real pair from the fake one by their offset."""
        if self.mode == "any_real":
            idx = self.rng.integers(0, len(self.pixels), size=len(identity))
        else:
            pairs = zip(emotion.tolist(), identity.tolist())
            idx = np.array([self.rng.choice(self.candidates[pair]) for pair in pairs])
        faces = self.pixels[torch.from_numpy(idx)]
        if jitter is not None:
            faces = torch.from_numpy(jitter_pixels(faces.numpy(), jitter))
        return faces
