"""Pretraining: the verifiers, the evaluators and the generator's warm start, each a Ray task.

Every network trains from scratch on the train split: the identity verifier V (VGG-16) and emotion verifier S
(mini-Xception) that the GAN loss uses, and S's siblings when asked for (`verifiers.emotion_verifiers`: more
mini-Xceptions of seeds of their own, which L_CE reads with S); the independent evaluators V_e and S_e
(ResNet-18 shape, other seeds) that only ever measure; the expression pickers when asked for
(`verifiers.pickers`: emotion classifiers of S_e's shape and seeds of their own, which pick between the noise
z's draws, core/draws.py); when asked for, the new-people probe (S_e's shape, learnt from two people in three
and read on the third: how far the set's expressions carry to people never seen); and, unless switched off,
the generator's warm start, an autoencoder pass (L1 + SSIM reconstruction) from which every trial's GAN
training begins. On a CPU budget of a few hundred GAN steps per trial, a generator starting from noise never
learns to draw a face; starting from a reconstruction, the paper's losses only have to move identity away.

The networks are independent, so each is one Ray task (`pretrain_task`) and they train side by side
as far as the machine or cluster holds them: on 2 cores two single-thread networks at a time do more
work than one network on two threads (small convolutions scale poorly across threads), and on a GPU
cluster each network takes a GPU. The task is a thin Ray edge around `train_network`, the Ray-free loop
that tests and benchmarks call in-process; the driver (`train/run.py`) keeps each finished network, so a
restart trains only what is missing.

Budgets are optimiser steps (`verifiers.steps`, `model.warm_start_steps`), not epochs: a network takes
that many batches, passing over a small set as often as it takes, so 150 images get the updates they need;
with `verifiers.min_passes` a classifier on a large set takes more, enough to see each face that many times
(`classifier_steps`). About ten times per network the task sends the driver a progress item (step, loss,
validation score, time) through `progress.send`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import ray
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from ray.util.queue import Queue

from epd_ray.checkpoints import EMOTION_VERIFIER, PICKER, network_record
from epd_ray.config import ModelConfig, VerifiersConfig
from epd_ray.core.augment import augment
from epd_ray.core.labels import NUM_EMOTIONS
from epd_ray.core.losses import ssim_loss, ssim_per_image
from epd_ray.core.networks import build_network
from epd_ray.core.precision import autocast
from epd_ray.data.shards import FaceArrays
from epd_ray.train.progress import send
from epd_ray.train.worker import ShardBatches, WorkerSetup, prepare_images, setup_worker

PROGRESS_LINES = 10  # progress items (each with a validation pass) per network
# Validation faces a progress line scores (as many of every person); the last line scores the whole split.
# On 8,094 images a whole pass (1,208 faces) took 3-4 s per network on one thread, ten of them per network.
PROGRESS_VAL_FACES = 500


NEW_PEOPLE_PROBE = "new_people_probe"
PROBE_MIN_PEOPLE = 4  # the probe learns from two people in three: fewer than 3 left to learn from is no test


def held_out_people(identity: np.ndarray) -> np.ndarray:
    """Which faces belong to the people the new-people probe never sees: every third person (index 2, 5, ...)."""
    return identity % 3 == 2


def new_people_faces(train: FaceArrays, val: FaceArrays) -> tuple[FaceArrays, FaceArrays]:
    """The probe's faces: the train faces of two people in three to learn from, and every train and
    validation face of the others (never learnt from, so all of them measure it) to be read."""
    unseen = np.concatenate([held_out_people(train.identity), held_out_people(val.identity)])
    both = FaceArrays(np.concatenate([train.pixels, val.pixels]), np.concatenate([train.identity, val.identity]),
                      np.concatenate([train.emotion, val.emotion]))
    return train.take(np.flatnonzero(~held_out_people(train.identity))), both.take(np.flatnonzero(unseen))


def classifier_steps(cfg: VerifiersConfig, train_images: int) -> int:
    """A classifier's optimiser steps: `cfg.steps`, or, on a set large enough, `cfg.min_passes` passes over its
    `train_images` (at most `cfg.max_steps`). Steps alone suit small sets, which epochs starve; a fixed count
    starves large ones instead: on 8,094 images (5,678 training faces) S read 0.80 of the validation
    expressions after 600 steps (3.4 passes) and 0.97 after 1,800, where JAFFE's 79 training faces took it to
    0.87 in 600."""
    passes = math.ceil(cfg.min_passes * train_images / cfg.batch_size)
    return max(cfg.steps, min(passes, cfg.max_steps or passes))


def network_specs(cfg: VerifiersConfig, model: ModelConfig, num_identities: int,
                  image_size: int, num_emotions: int = NUM_EMOTIONS, *,
                  emotions_with_people: bool = True) -> dict[str, dict[str, Any]]:
    """Kind, constructor arguments, task, seed and steps of every pretrained network, in training order (the
    classifiers' `verifiers.steps`, which `train/run.py` raises by `classifier_steps` once it knows how many
    faces each learns from). `emotions_with_people`: the emotion networks learn from the faces, whose people
    the new-people probe can hold out (an emotion-only set such as FER2013 names no people)."""
    specs = {
        "identity_verifier": {"args": {"num_identities": num_identities, "image_size": image_size,
                                       "width": cfg.identity_width}, "task": "identity", "seed": cfg.seed},
        "emotion_verifier": {"args": {"num_emotions": num_emotions}, "task": "emotion", "seed": cfg.seed + 1},
        "identity_evaluator": {"args": {"num_classes": num_identities, "base_width": cfg.evaluator_width},
                               "task": "identity", "seed": cfg.evaluator_seed},
        "emotion_evaluator": {"args": {"num_classes": num_emotions, "base_width": cfg.evaluator_width,
                                       "grey": True}, "task": "emotion", "seed": cfg.evaluator_seed + 1},
    }
    for i in range(1, cfg.emotion_verifiers):  # S's shape, seeds of their own (checkpoints.emotion_verifiers)
        specs[f"{EMOTION_VERIFIER}_{i}"] = {"kind": EMOTION_VERIFIER, "args": dict(specs[EMOTION_VERIFIER]["args"]),
                                            "task": "emotion", "seed": cfg.seed + 100 + i}
    for i in range(cfg.pickers):  # S_e's shape, seeds of their own (core/draws.py)
        specs[f"{PICKER}_{i}"] = {"kind": PICKER, "args": dict(specs["emotion_evaluator"]["args"]),
                                  "task": "emotion", "seed": cfg.evaluator_seed + 20 + i}
    if cfg.new_people_probe and emotions_with_people and num_identities >= PROBE_MIN_PEOPLE:
        specs[NEW_PEOPLE_PROBE] = {"kind": "emotion_evaluator", "args": dict(specs["emotion_evaluator"]["args"]),
                                   "task": "emotion", "seed": cfg.evaluator_seed + 40}
    for name, spec in specs.items():
        spec.setdefault("kind", name)
        spec.update(steps=cfg.steps, lr=cfg.emotion_lr if spec["task"] == "emotion" else cfg.lr)
    if model.warm_start_steps:  # model.median_output has no weights: one warm start serves with or without it
        specs["generator"] = {"kind": "generator", "args": {"image_size": image_size, "ngf": model.ngf,
                                                            "norm": model.norm, "dropout": model.dropout},
                              "task": "reconstruct", "seed": cfg.seed + 2, "steps": model.warm_start_steps,
                              "lr": model.warm_start_lr}
    return specs


def largest_first(specs: dict[str, dict[str, Any]], image_size: int) -> list[str]:
    """The networks of `specs` in the order to start them: the most work first (the FLOPs of a forward pass on
    one face, times the steps). With fewer lanes than networks, one long network started last keeps a lane
    busy while the others stand idle; on JAFFE (2 lanes, 10 networks) the training order ended with the
    new-people probe (177 s) beside the warm start (131 s), and 706 s went before the search, against 669 s
    largest first."""
    def work(name: str) -> float:
        spec = specs[name]
        with torch.device("meta"), FlopCounterMode(display=False) as flops:
            build_network(spec["kind"], **spec["args"])(torch.zeros(1, 3, image_size, image_size))
        return flops.get_total_flops() * spec["steps"]
    return sorted(specs, key=work, reverse=True)


@torch.no_grad()
def validation_score(model: torch.nn.Module, task: str, x: torch.Tensor, faces, setup: WorkerSetup,
                     batch_size: int = 256) -> float:
    """Accuracy of a classifier, or mean SSIM of the generator's reconstructions."""
    model.eval()
    total = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        with autocast(setup.device, setup.precision):
            out = model(xb)
        if task == "reconstruct":
            total += ssim_per_image(xb.float(), out.float().clamp(-1, 1)).sum().item()
        else:
            labels = torch.from_numpy(getattr(faces, task)[start:start + batch_size]).to(setup.device)
            total += (out.argmax(1) == labels).sum().item()
    return total / max(1, len(x))


def task_loss(model: torch.nn.Module, task: str, batch: dict[str, torch.Tensor], setup: WorkerSetup,
              augmented: bool) -> torch.Tensor:
    """Cross-entropy on the label for classifiers; L1 + SSIM reconstruction for the generator's warm start."""
    if task == "reconstruct":
        x = batch["x"]
        with autocast(setup.device, setup.precision):
            y = model(x)
        return (y.float() - x).abs().mean() + ssim_loss(x, y.float())
    with autocast(setup.device, setup.precision):
        return F.cross_entropy(model(augment(batch["x"]) if augmented else batch["x"]), batch[task])


@dataclass(frozen=True)
class PretrainInputs:
    """What every pretraining task is given besides its faces: every network's spec (`network_specs`), how
    batches are drawn, and the driver's progress feed."""

    specs: dict[str, dict[str, Any]]
    batch_size: int
    augment: bool
    precision: str
    channels_last: bool
    progress: Queue | None


def train_network(name: str, spec: dict[str, Any], train: FaceArrays, val: FaceArrays, setup: WorkerSetup, *,
                  batch_size: int, augmented: bool,
                  on_progress: Callable[[dict[str, Any]], None] = lambda item: None) -> tuple[torch.nn.Module, float]:
    """Network `name` trained for `spec["steps"]` batches of `train` (one-cycle AdamW); returns it (in eval
    mode) and its validation score on `val`, which `on_progress` also gets about ten times on the way (on at
    most PROGRESS_VAL_FACES of them until the last)."""
    torch.manual_seed(spec["seed"])
    model = build_network(spec["kind"], **spec["args"]).to(setup.device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=1e-4)
    total = spec["steps"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=spec["lr"], total_steps=total)
    every = max(1, math.ceil(total / PROGRESS_LINES))  # 1,775 steps: lines at 178 ... 1602, then 1775
    batches = ShardBatches.in_memory(setup, batch_size, train).forever(seed=spec["seed"] * 1000)
    probe = val.at_most(PROGRESS_VAL_FACES)
    probe_x = prepare_images(probe.pixels, setup)
    started, window, taken, score = time.monotonic(), torch.zeros((), device=setup.device), 0, math.nan
    model.train()
    for step in range(1, total + 1):
        loss = task_loss(model, spec["task"], next(batches), setup, augmented)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        window += loss.detach()
        taken += 1
        if step % every and step < total:
            continue
        mean_loss = (window / taken).item()  # one host sync per progress line, not per step
        window, taken = torch.zeros((), device=setup.device), 0
        judged, judged_x = (val, prepare_images(val.pixels, setup)) if step == total else (probe, probe_x)
        score = validation_score(model, spec["task"], judged_x, judged, setup)
        model.train()
        elapsed = time.monotonic() - started
        on_progress({"network": name, "task": spec["task"], "step": step, "steps": total, "loss": mean_loss,
                     "val_score": score, "val_faces": len(judged), "elapsed_s": elapsed,
                     "left_s": elapsed / step * (total - step)})
    return model.eval(), score


@ray.remote
def pretrain_task(name: str, inputs: PretrainInputs, cpus: float, train: FaceArrays,
                  val: FaceArrays) -> tuple[dict[str, Any], float]:
    """Network `name` on the worker Ray gave this task (a GPU when it holds one, else `cpus` torch threads):
    its checkpoint record and validation score.

    The driver passes `train` and `val` as object refs, which Ray fetches before the task starts (tasks may
    run on nodes that cannot open the driver's files). A task that called `ray.get` itself would hand its
    CPUs back while it waits, and Ray would start more networks at once than the cores hold."""
    spec = inputs.specs[name]
    setup = setup_worker(cpus, inputs.precision, inputs.channels_last, spec["seed"], train_worker=False,
                         trains_1x1_convolutions=True)
    model, score = train_network(name, spec, train, val, setup, batch_size=inputs.batch_size,
                                 augmented=inputs.augment, on_progress=lambda item: send(inputs.progress, item))
    return network_record(spec["kind"], model), score
