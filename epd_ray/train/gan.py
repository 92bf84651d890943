"""EPD-Net GAN training as a Ray Train worker loop (DESIGN sections 4-6).

Per batch: one discriminator step on the real pair (x, y) against the fake pair (x, G(x, z)), then one
generator step on L_G = lambda1 (L_adv + Phi L_ssim) + lambda2 L_contrastive + lambda3 L_CE through the
frozen verifiers V and S. Per epoch: rank 0 scores the generator on the validation split with the
independent evaluators (the composite objective J that the search maximises) and checkpoints G, D,
their optimisers, the epoch and the resolved config. A non-finite loss stops the trial with a recorded
reason and a finite penalty (J = 0), so the search goes on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ray.train.torch
import torch

from epd_ray.checkpoints import build_from_record, load_checkpoint, network_record
from epd_ray.config import ExperimentConfig, LossConfig
from epd_ray.core.losses import LossWeights, discriminator_loss, generator_loss
from epd_ray.core.networks import build_network
from epd_ray.core.precision import autocast
from epd_ray.core.scoring import deidentify_pixels, judge
from epd_ray.data.shards import load_split
from epd_ray.train.worker import RealPairPool, WorkerSetup, image_batches, prepare_images, report, restore, setup_worker

# What a diverged trial reports for every searched objective (J, or privacy and utility in pareto mode):
# finite (the searcher must never see NaN) and the worst possible.
PENALTY = {"objective": 0.0, "privacy": 0.0, "utility": 0.0}


def build_gan(exp: ExperimentConfig, image_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    generator = build_network("generator", image_size=image_size, ngf=exp.model.ngf, norm=exp.model.norm,
                              dropout=exp.model.dropout)
    discriminator = build_network("discriminator", ndf=exp.model.ndf, n_layers=exp.model.n_layers,
                                  norm=exp.model.norm)
    return generator, discriminator  # both initialised as pix2pix does, in their constructors


def frozen(module: torch.nn.Module, setup: WorkerSetup) -> torch.nn.Module:
    module = module.to(setup.device).eval()
    if setup.channels_last:
        module = module.to(memory_format=torch.channels_last)
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def trial_params(config: dict[str, Any]) -> tuple[LossWeights, float]:
    """The loss weights and mu of this run: the experiment's, overridden by the trial's searched values."""
    exp = ExperimentConfig.model_validate(config["experiment"])
    params = {**exp.loss.model_dump(), "mu": exp.evaluation.mu, **config.get("params", {})}
    loss = LossConfig.model_validate({k: params[k] for k in LossConfig.model_fields})
    return LossWeights(**loss.model_dump()), float(params["mu"])


class GanSteps:
    """One batch of EPD-Net training and one epoch's bookkeeping: shared by `gan_loop` and the benchmarks."""

    def __init__(self, generator, discriminator, identity_verifier, emotion_verifier, opt_g, opt_d,
                 weights: LossWeights, setup: WorkerSetup):
        self.generator, self.discriminator = generator, discriminator
        self.identity_verifier, self.emotion_verifier = identity_verifier, emotion_verifier
        self.opt_g, self.opt_d = opt_g, opt_d
        self.weights, self.setup = weights, setup
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def step(self, x: torch.Tensor, y_real: torch.Tensor, identity: torch.Tensor, emotion: torch.Tensor) -> None:
        """A discriminator step on (x, y_real) against (x, G(x, z)), then a generator step on L_G."""
        setup = self.setup
        with autocast(setup.device, setup.precision):
            fake = self.generator(x)
            loss_d = discriminator_loss(self.discriminator(x, y_real), self.discriminator(x, fake.detach()))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        with autocast(setup.device, setup.precision):
            loss_g, parts = generator_loss(
                self.discriminator(x, fake), x, fake, self.identity_verifier(fake), identity,
                self.emotion_verifier(fake), emotion, self.weights)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()

        for key, value in {"loss_d": loss_d, **{f"loss_{k}": v for k, v in parts.items()}}.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.steps += 1

    def epoch_losses(self) -> dict[str, float]:
        """Mean losses of the epoch, then reset. One host sync per epoch, not per step."""
        losses = {k: (v / max(1, self.steps)).item() for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return losses

    def checkpoint_payload(self, epoch: int, mu: float, exp: ExperimentConfig, metrics: dict) -> dict[str, Any]:
        return {
            "networks": {"generator": network_record("generator", self.generator),
                         "discriminator": network_record("discriminator", self.discriminator)},
            "optimizers": {"generator": self.opt_g.state_dict(), "discriminator": self.opt_d.state_dict()},
            "epoch": epoch,
            "params": {**{k: getattr(self.weights, k) for k in LossConfig.model_fields}, "mu": mu},
            "experiment": exp.to_dict(),
            "metrics": metrics,
        }


def validation_metrics(generator: torch.nn.Module, val, identity_evaluator, emotion_evaluator, *, mu: float,
                       exp: ExperimentConfig, setup: WorkerSetup) -> dict[str, float]:
    """J and its factors on the validation split, judged by the independent evaluators."""
    module = getattr(generator, "module", generator)
    kw = dict(batch_size=exp.evaluation.batch_size, device=setup.device, precision=setup.precision)
    deid = deidentify_pixels(module, val.pixels, **kw)
    return scalar_metrics(judge(val.pixels, deid, val.identity, val.emotion, identity_net=identity_evaluator,
                                emotion_net=emotion_evaluator, mu=mu, ssim_weight=exp.evaluation.ssim_weight, **kw))


def gan_loop(config: dict[str, Any]) -> None:
    exp = ExperimentConfig.model_validate(config["experiment"])
    weights, mu = trial_params(config)
    setup = setup_worker(exp.train.cpus_per_worker, exp.train.precision, exp.train.channels_last, exp.train.seed)
    dataset_dir = Path(config["dataset_dir"])
    image_size = config["image_size"]

    generator, discriminator = build_gan(exp, image_size)
    pretrained = load_checkpoint(Path(config["pretrained_path"]))["networks"]
    identity_verifier = frozen(build_from_record(pretrained["identity_verifier"]), setup)
    emotion_verifier = frozen(build_from_record(pretrained["emotion_verifier"]), setup)

    opt_g = torch.optim.Adam(generator.parameters(), lr=exp.train.lr, betas=(exp.train.beta1, exp.train.beta2))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=exp.train.lr, betas=(exp.train.beta1, exp.train.beta2))
    payload, start_epoch = restore()
    if payload is None and "generator" in pretrained:  # the shared warm start (see train/pretrain.py)
        generator.load_state_dict(pretrained["generator"]["state_dict"])
    if payload is not None:
        generator.load_state_dict(payload["networks"]["generator"]["state_dict"])
        discriminator.load_state_dict(payload["networks"]["discriminator"]["state_dict"])
        opt_g.load_state_dict(payload["optimizers"]["generator"])
        opt_d.load_state_dict(payload["optimizers"]["discriminator"])
    for module in (generator, discriminator):
        module.to(setup.device)
        if setup.channels_last:
            module.to(memory_format=torch.channels_last)
    generator = ray.train.torch.prepare_model(generator)
    discriminator = ray.train.torch.prepare_model(discriminator)

    pool = RealPairPool(load_split(dataset_dir, "train"), exp.model.real_pair, seed=exp.train.seed + setup.rank)
    if setup.rank == 0:
        val = load_split(dataset_dir, "val")
        identity_evaluator = frozen(build_from_record(pretrained["identity_evaluator"]), setup)
        emotion_evaluator = frozen(build_from_record(pretrained["emotion_evaluator"]), setup)

    steps = GanSteps(generator, discriminator, identity_verifier, emotion_verifier, opt_g, opt_d, weights, setup)
    for epoch in range(start_epoch, exp.train.epochs):
        generator.train()
        discriminator.train()
        for batch in image_batches(setup, exp.train.batch_size, seed=exp.train.seed * 1000 + epoch):
            y_real = prepare_images(pool.sample(batch["identity"], batch["emotion"]), setup)
            steps.step(batch["x"], y_real, batch["identity"], batch["emotion"])

        losses = steps.epoch_losses()
        diverged = not all(math.isfinite(v) for v in losses.values())
        metrics: dict[str, Any] = {"epoch": epoch + 1, "first_epoch": start_epoch + 1, **losses, "diverged": diverged,
                                   "stop_reason": "non-finite loss" if diverged else ""}
        if diverged:
            metrics.update(PENALTY)
            report(setup, metrics, None)
            return
        payload = None
        if setup.rank == 0:
            metrics.update(validation_metrics(generator, val, identity_evaluator, emotion_evaluator, mu=mu, exp=exp,
                                              setup=setup))
            payload = steps.checkpoint_payload(epoch, mu, exp, metrics)
        report(setup, metrics, payload)


def scalar_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """Flatten list-valued metrics (CMC ranks) so Tune can track every figure per epoch."""
    flat: dict[str, float] = {}
    for key, value in scores.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}_{i + 1}": float(v) for i, v in enumerate(value)})
        else:
            flat[key] = float(value)
    return flat
