"""Verifier and evaluator pretraining as a Ray Train worker loop.

Four classifiers train from scratch on the train split, one after the other: the identity verifier V
(VGG-16) and emotion verifier S (mini-Xception) that the GAN loss uses, and the independent evaluators
V_e and S_e (ResNet-18 shape, other seeds) that only ever measure. After each network the loop reports a
checkpoint holding every network finished so far, so a restarted run skips what is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from epd_ray.checkpoints import build_from_record, network_record
from epd_ray.config import VerifiersConfig
from epd_ray.core.labels import NUM_EMOTIONS
from epd_ray.core.networks import build_network
from epd_ray.core.precision import autocast
from epd_ray.data.shards import load_split
from epd_ray.train.worker import WorkerSetup, image_batches, prepare_images, report, restore, setup_worker

LABEL_OF = {"identity_verifier": "identity", "emotion_verifier": "emotion",
            "identity_evaluator": "identity", "emotion_evaluator": "emotion"}


def network_specs(cfg: VerifiersConfig, num_identities: int, image_size: int) -> dict[str, dict[str, Any]]:
    """Constructor arguments and seed of the four classifiers, in training order."""
    return {
        "identity_verifier": {"args": {"num_identities": num_identities, "image_size": image_size,
                                       "width": cfg.identity_width}, "seed": cfg.seed},
        "emotion_verifier": {"args": {"num_emotions": NUM_EMOTIONS}, "seed": cfg.seed + 1},
        "identity_evaluator": {"args": {"num_classes": num_identities, "base_width": cfg.evaluator_width},
                               "seed": cfg.evaluator_seed},
        "emotion_evaluator": {"args": {"num_classes": NUM_EMOTIONS, "base_width": cfg.evaluator_width,
                                       "grey": True}, "seed": cfg.evaluator_seed + 1},
    }


def augment(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Small random translation and brightness/contrast jitter, so classifiers learn cues, not pixels."""
    if max_shift:
        dx, dy = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    n = x.shape[0]
    gain = 1 + 0.15 * (torch.rand(n, 1, 1, 1, device=x.device) - 0.5) * 2
    bias = 0.1 * (torch.rand(n, 1, 1, 1, device=x.device) - 0.5) * 2
    return (x * gain + bias).clamp(-1, 1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, setup: WorkerSetup,
             batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        with autocast(setup.device, setup.precision):
            logits = model(x[start:start + batch_size])
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
    return correct / max(1, len(x))


def pretrain_loop(config: dict[str, Any]) -> None:
    cfg = VerifiersConfig.model_validate(config["verifiers"])
    setup = setup_worker(config["cpus_per_worker"], config["precision"], config["channels_last"], cfg.seed)
    dataset_dir = Path(config["dataset_dir"])
    specs = network_specs(cfg, config["num_identities"], config["image_size"])

    payload, _ = restore()
    finished: dict[str, Any] = dict(payload["networks"]) if payload else {}
    accuracies: dict[str, float] = dict(payload.get("val_accuracy", {})) if payload else {}

    val = load_split(dataset_dir, "val") if setup.rank == 0 else None
    val_x = prepare_images(val.pixels, setup) if val is not None else None
    max_shift = max(1, config["image_size"] // 16) if cfg.augment else 0

    for name, spec in specs.items():
        if name in finished:
            build_from_record(finished[name])  # a corrupt record fails here, not later in the GAN
            continue
        torch.manual_seed(spec["seed"] + setup.rank)
        model = build_network(name, **spec["args"]).to(setup.device)
        if setup.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = ray.train.torch.prepare_model(model)
        optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
        steps_per_epoch = max(1, config["train_images"] // (setup.world_size * cfg.batch_size))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.lr,
                                                        total_steps=(steps_per_epoch + 2) * cfg.epochs)
        for epoch in range(cfg.epochs):
            model.train()
            total = torch.zeros((), device=setup.device)
            steps = 0
            for batch in image_batches(setup, cfg.batch_size, seed=spec["seed"] * 1000 + epoch):
                x = augment(batch["x"], max_shift)
                with autocast(setup.device, setup.precision):
                    loss = F.cross_entropy(model(x), batch[LABEL_OF[name]])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
                total += loss.detach()
                steps += 1
            metrics = {"network": name, "epoch": epoch, "loss": (total / max(1, steps)).item()}
            last = epoch == cfg.epochs - 1
            if last:
                finished[name] = network_record(name, model)
                if val is not None:
                    labels = torch.from_numpy(getattr(val, LABEL_OF[name])).to(setup.device)
                    accuracies[name] = accuracy(model, val_x, labels, setup)
                metrics["val_accuracy"] = accuracies.get(name, float("nan"))
            report(setup, metrics, {"networks": finished, "val_accuracy": accuracies} if last else None)
