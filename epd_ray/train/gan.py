"""EPD-Net GAN training, in a Ray Train worker loop or in a Tune trial's own process (the paper's sections
III-IV).

Per batch: one discriminator step on the real pair (x, y) against the fake pair (x, G(x, z)), then one
generator step on L_G = lambda1 (L_adv + Phi L_ssim) + lambda2 L_contrastive + lambda3 L_CE through the frozen
verifiers V and S (with `loss.diversity` > 0, each face drawn twice and + L_diversity, see core/losses.py;
with `train.verifier_views`, V and S read each draw through a random transform of core/augment.py; with
`verifiers.emotion_verifiers` > 1, S is that many mini-Xceptions read as one, the mean of their probabilities,
`checkpoints.emotion_verifiers`). The budget is `train.steps` optimiser steps in rounds of
`train.report_every` (passing over the shard as often as that takes, so a small and a large set get the same
updates). Per round: rank 0 scores the generator on the validation split under the main judge (the objective J
that the search maximises: the pretrained recogniser on real faces, the independent evaluators on synthetic
ones; see evaluate/judges.py) and checkpoints G, D, their optimisers, the round and the resolved config (its
loss the run's weights); the round is what Tune counts as one training iteration. A non-finite loss stops the
trial with a recorded reason and a finite penalty (J = 0), so the search goes on.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import ray
import ray.data
import ray.train.torch
import torch

from epd_ray.artifacts import DatasetManifest
from epd_ray.checkpoints import (build_from_record, draw_readers, emotion_verifiers, expression_tellers,
                                 load_checkpoint, network_record, published_payload)
from epd_ray.config import SEARCHED_KEYS, EvaluationConfig, ExperimentConfig, LossConfig, TrainConfig
from epd_ray.core.augment import augment
from epd_ray.core.draws import BestOfDraws
from epd_ray.core.losses import LossWeights, discriminator_loss, generator_loss
from epd_ray.core.networks import build_network, fold_batch_norms, warm_start_state
from epd_ray.core.precision import autocast, usable_cpus
from epd_ray.core.metrics import compute_metrics
from epd_ray.core.scoring import GeneratorMethod, class_probabilities, deidentify_pixels, ssim_values
from epd_ray.data.shards import load_split
from epd_ray.evaluate.judges import FaceRecogniser, Gallery, main_judge, recogniser_metrics
from epd_ray.train.worker import (TRAIN_SESSION, TUNE_SESSION, RealPairPool, Session, ShardBatches, WorkerSetup,
                                  prepare_images, setup_worker)

# What a diverged trial reports for every searched objective (J, or privacy and utility in pareto mode):
# finite (the searcher must never see NaN) and the worst possible.
PENALTY = {"objective": 0.0, "privacy": 0.0, "utility": 0.0}


@dataclass(frozen=True)
class GanInputs:
    """What GAN workers read besides their data shard, put into Ray's object store once by the driver.

    Workers on other nodes cannot open the driver's files, so the pretrained networks and the two splits a
    worker needs whole (train: the real-pair pool; val: rank 0's scoring) travel as object refs, on one
    node as on many, and every trial of a search shares the same copies.
    """

    pretrained: ray.ObjectRef  # the table of networks of pretrained.pt
    train_faces: ray.ObjectRef  # FaceArrays
    val_faces: ray.ObjectRef  # FaceArrays
    image_size: int
    emotions: int  # the data set's expression classes
    judge: str = "evaluators"  # whose J rank 0 reports each round (see evaluate.judges.main_judge)
    recogniser_gallery: Gallery | None = None  # with the recogniser: its gallery and its view of the val
    val_recognised: tuple[np.ndarray, np.ndarray] | None = None  # originals (embeddings, face found), made once

    @classmethod
    def put(cls, dataset_dir: Path, pretrained_path: Path, evaluation: EvaluationConfig | None = None, *,
            put: Callable[[Any], Any] = ray.put) -> "GanInputs":
        """The inputs of a run on `dataset_dir`; `put=lambda v: v` keeps the values themselves (in-process runs)."""
        evaluation = evaluation or EvaluationConfig()
        manifest = DatasetManifest.load(dataset_dir)
        train, val = load_split(dataset_dir, "train"), load_split(dataset_dir, "val")
        val = val.at_most(evaluation.val_probes)
        judge = main_judge(evaluation.judge, manifest.source)
        gallery = val_recognised = None
        if judge == "recogniser":
            with FaceRecogniser(processes=usable_cpus()) as recogniser:  # before the trials take the cores
                gallery = Gallery.of(lambda pixels: recogniser.embed(pixels)[0],
                                     train.per_identity(evaluation.gallery_per_identity), len(manifest.identities))
                val_recognised = recogniser.embed(val.pixels)
        return cls(pretrained=put(load_checkpoint(Path(pretrained_path))["networks"]), train_faces=put(train),
                   val_faces=put(val), image_size=manifest.image_size, emotions=len(manifest.emotions), judge=judge,
                   recogniser_gallery=gallery, val_recognised=val_recognised)


def build_generator(exp: ExperimentConfig, image_size: int, emotions: int) -> torch.nn.Module:
    """G of `exp` for faces of `image_size` px, told the expression among `emotions` classes when
    `model.expression_input`; initialised as pix2pix does, in its constructor."""
    return build_network("generator", image_size=image_size, ngf=exp.model.ngf, norm=exp.model.norm,
                         dropout=exp.model.dropout, median_output=exp.model.median_output,
                         expressions=emotions if exp.model.expression_input else 0)


def build_gan(exp: ExperimentConfig, image_size: int, emotions: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """G (`build_generator`) and D of `exp`, built in that order (the order draws their initial weights)."""
    generator = build_generator(exp, image_size, emotions)
    discriminator = build_network("discriminator", ndf=exp.model.ndf, n_layers=exp.model.n_layers,
                                  norm=exp.model.norm)
    return generator, discriminator


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return getattr(module, "module", module)


def frozen(module: torch.nn.Module, setup: WorkerSetup) -> torch.nn.Module:
    module = fold_batch_norms(module).to(setup.device)
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


def ema_decay(half_life_steps: float) -> float:
    """Per-step decay of the generator's moving average for a half-life given in steps (0: no average)."""
    return 0.5 ** (1.0 / half_life_steps) if half_life_steps > 0 else 0.0


def rounds(train: TrainConfig) -> int:
    """Rounds of `report_every` steps in the budget (the last one shorter when they do not divide)."""
    return -(-train.steps // train.report_every)


class GanSteps:
    """One batch of EPD-Net training and one round's bookkeeping: shared by `gan_loop` and the benchmarks.

    With `ema_decay` > 0 it also keeps an exponential moving average of the generator's weights
    (as stylegan does): the published generator. GAN weights swing from step to step (here J moved by
    +-0.1 between epochs), so the average is both better and a steadier thing to select on.
    """

    def __init__(self, generator, discriminator, identity_verifier, emotion_verifier, opt_g, opt_d,
                 weights: LossWeights, setup: WorkerSetup, ema_decay: float = 0.0, verifier_views: bool = False):
        self.generator, self.discriminator = generator, discriminator
        self.verifier_views = verifier_views
        self.identity_verifier, self.emotion_verifier = identity_verifier, emotion_verifier
        self.opt_g, self.opt_d = opt_g, opt_d
        self.weights, self.setup = weights, setup
        self.ema_decay = ema_decay
        self.generator_ema = copy.deepcopy(unwrap(generator)).eval().requires_grad_(False) if ema_decay else None
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    @property
    def published_generator(self) -> torch.nn.Module:
        """The generator to score, checkpoint as `generator` and deploy: the average when there is one."""
        return self.generator_ema if self.generator_ema is not None else unwrap(self.generator)

    def discriminator_step(self, x: torch.Tensor, y_real: torch.Tensor,
                           emotion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One D update on (x, y_real) against (x, G(x, z)); returns G(x, z), still attached to G, and L_D. A
        generator told the expression (`model.expression_input`) is told x's label `emotion`."""
        setup = self.setup
        with autocast(setup.device, setup.precision):
            fake = self.generator(x, emotion)
            loss_d = discriminator_loss(self.discriminator(x, y_real), self.discriminator(x, fake.detach()))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        return fake, loss_d

    def step(self, x: torch.Tensor, y_real: torch.Tensor, identity: torch.Tensor, emotion: torch.Tensor) -> None:
        """A discriminator step on (x, y_real) against (x, G(x, z)), then a generator step on L_G."""
        setup = self.setup
        if self.weights.diversity > 0:  # two draws of each face, which L_diversity asks to differ in identity
            x, y_real, identity, emotion = (torch.cat([t, t]) for t in (x, y_real, identity, emotion))
        fake, loss_d = self.discriminator_step(x, y_real, emotion)

        # D is frozen for the generator step: only the gradient to `fake` is needed, so D's weight
        # gradients (7% of the step's FLOPs) are not computed. Calling the unwrapped module keeps DDP's
        # reducer out of a pass that produces no gradients for it.
        critic = unwrap(self.discriminator).requires_grad_(False)
        with autocast(setup.device, setup.precision):
            seen = augment(fake) if self.verifier_views else fake
            loss_g, parts = generator_loss(
                critic(x, fake), x, fake, self.identity_verifier(seen), identity,
                self.emotion_verifier(seen), emotion, self.weights)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        critic.requires_grad_(True)
        if self.generator_ema is not None:
            self._update_ema()

        for key, value in {"loss_d": loss_d, **{f"loss_{k}": v for k, v in parts.items()}}.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.steps += 1

    @torch.no_grad()
    def _update_ema(self) -> None:
        source = unwrap(self.generator)
        ema_params, params = list(self.generator_ema.parameters()), list(source.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - self.ema_decay)
        for ema_buffer, buffer in zip(self.generator_ema.buffers(), source.buffers()):
            ema_buffer.copy_(buffer)

    def round_losses(self) -> dict[str, float]:
        """Mean losses of the round, then reset. One host sync per round, not per step."""
        losses = {k: (v / max(1, self.steps)).item() for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return losses

    def checkpoint_payload(self, round_: int, step: int, mu: float, exp: ExperimentConfig, metrics: dict,
                           reader: dict[str, Any], teller: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a round's checkpoint holds; `reader`: the record of the readers that pick between draws;
        `teller`: of those that read in the original the expression a told generator is told."""
        published = published_payload(network_record("generator", self.published_generator), reader,
                                      exp.model.draws, teller)
        networks = {**published["networks"], "discriminator": network_record("discriminator", self.discriminator)}
        if self.generator_ema is not None:  # the raw weights, to resume training from
            networks["generator_train"] = network_record("generator", self.generator)
        return {
            **published,
            "networks": networks,
            "optimizers": {"generator": self.opt_g.state_dict(), "discriminator": self.opt_d.state_dict()},
            "round": round_,
            "step": step,
            "params": {**{k: getattr(self.weights, k) for k in SEARCHED_KEYS if k != "mu"}, "mu": mu},
            "experiment": exp.to_dict(),
            "metrics": metrics,
        }


def validation_metrics(deidentifier: BestOfDraws, val, identity_evaluator, emotion_evaluator, *, mu: float,
                       exp: ExperimentConfig, setup: WorkerSetup, inputs: GanInputs,
                       recogniser: FaceRecogniser | None = None) -> dict[str, float]:
    """J and its factors on the validation split, under the main judge; the evaluators' figures always.

    With the recogniser as main judge its privacy, utility and J replace the evaluators' (kept as
    `evaluators_objective`); the paper's D, S, G stay the evaluators'. The generator is scored as it is
    published (eval mode: batch norm on its running statistics, the dropout noise z still on, the best of
    `model.draws` draws as `deidentifier` picks it), never in training mode, whose batch statistics would differ
    from what `evaluate` and `deidentify` see; its z are drawn as `evaluate` draws them (`GeneratorMethod`,
    seeded with `train.seed`): alike in every round, so rounds differ by the model and not by which draws
    the noise gave (drawn from the training's RNG, a JAFFE checkpoint scored J 0.669 in its round and 0.552
    under `evaluate` on the same 67 faces), and without taking numbers from the training's RNG, so how often a
    run validates does not change how it trains.
    """
    kw = dict(batch_size=exp.evaluation.batch_size, device=setup.device, precision=setup.precision)
    generator = deidentifier.generator
    was_training = generator.training
    try:
        deid = deidentify_pixels(GeneratorMethod(deidentifier, exp.train.seed), val.pixels, **kw)
    finally:
        generator.train(was_training)
    emotion = (class_probabilities(emotion_evaluator, val.pixels, **kw),
               class_probabilities(emotion_evaluator, deid, **kw))
    ssim = ssim_values(val.pixels, deid, exp.evaluation.batch_size)
    scores = compute_metrics(class_probabilities(identity_evaluator, val.pixels, **kw),
                             class_probabilities(identity_evaluator, deid, **kw), *emotion, val.identity, val.emotion,
                             ssim, mu=mu, ssim_weight=exp.evaluation.ssim_weight)
    if recogniser is not None:
        scores["evaluators_objective"] = scores["objective"]
        embedded, found = recogniser.embed(deid)
        scores.update(recogniser_metrics(inputs.recogniser_gallery, inputs.val_recognised[0], embedded,
                                         inputs.val_recognised[1], found, val.identity, *emotion, val.emotion, ssim,
                                         exp.evaluation.ssim_weight))
    return scalar_metrics(scores)


class GanRun:
    """One GAN training run, Ray-free: its networks built (from the warm start, or restored from `payload`),
    the real-pair pool, rank 0's judges; `train` then runs round after round on a batch iterator and hands
    each round's metrics and checkpoint payload to a report hook.

    `fit_gan` runs it in a Tune trial's own process (`gan_in_trial`) or in each Ray Train worker (`gan_loop`,
    with DDP's `prepare_model`), on the Ray Data batches, `ray.get` fetching the inputs, reporting to the
    session's Tune or Train; benchmarks/ray_overhead.py runs it in-process on a split held in memory
    (`GanInputs.put(..., put=lambda v: v)`, `ShardBatches.in_memory`).
    """

    def __init__(self, exp: ExperimentConfig, weights: LossWeights, mu: float, setup: WorkerSetup,
                 inputs: GanInputs, *, payload: dict[str, Any] | None = None,
                 fetch: Callable[[Any], Any] = lambda value: value,
                 prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda module: module):
        self.exp, self.mu, self.setup, self.inputs = exp, mu, setup, inputs
        generator, discriminator = build_gan(exp, inputs.image_size, inputs.emotions)
        told = bool(generator.expressions)  # read before DDP wraps it
        pretrained = fetch(inputs.pretrained)
        identity_verifier = frozen(build_from_record(pretrained["identity_verifier"]), setup)
        emotion_verifier = frozen(build_from_record(emotion_verifiers(pretrained)), setup)
        betas = (exp.train.beta1, exp.train.beta2)
        opt_g = torch.optim.Adam(generator.parameters(), lr=exp.train.lr, betas=betas)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=exp.train.lr, betas=betas)
        if payload is None and "generator" in pretrained:  # the shared warm start (see train/pretrain.py)
            generator.load_state_dict(warm_start_state(generator, pretrained["generator"]["state_dict"]))
        if payload is not None:
            networks = payload["networks"]
            generator.load_state_dict(networks.get("generator_train", networks["generator"])["state_dict"])
            discriminator.load_state_dict(payload["networks"]["discriminator"]["state_dict"])
            opt_g.load_state_dict(payload["optimizers"]["generator"])
            opt_d.load_state_dict(payload["optimizers"]["discriminator"])
        for module in (generator, discriminator):
            module.to(setup.device)
            if setup.channels_last:
                module.to(memory_format=torch.channels_last)
        generator, discriminator = prepare_model(generator), prepare_model(discriminator)

        self.pool = RealPairPool(fetch(inputs.train_faces), exp.model.real_pair, seed=exp.train.seed + setup.rank)
        # Only rank 0 scores the rounds and writes the checkpoints: the draws' readers, the tellers and the judges.
        self.judges = self.reader = self.teller = self.reader_record = self.teller_record = None
        if setup.rank == 0:
            self.reader_record = draw_readers(pretrained)  # picks between draws (core/draws.py)
            self.reader = frozen(build_from_record(self.reader_record), setup)
            self.teller_record = expression_tellers(pretrained) if told else None
            self.teller = frozen(build_from_record(self.teller_record), setup) if told else None
            self.judges = (fetch(inputs.val_faces), frozen(build_from_record(pretrained["identity_evaluator"]), setup),
                           frozen(build_from_record(pretrained["emotion_evaluator"]), setup),
                           FaceRecogniser() if inputs.recogniser_gallery is not None else None)
        self.steps = GanSteps(generator, discriminator, identity_verifier, emotion_verifier, opt_g, opt_d, weights,
                              setup, ema_decay=ema_decay(exp.train.ema_half_life_steps),
                              verifier_views=exp.train.verifier_views)
        if payload is not None and self.steps.generator_ema is not None:
            self.steps.generator_ema.load_state_dict(payload["networks"]["generator"]["state_dict"])

    def train(self, batches: Iterator[dict[str, torch.Tensor]], *, start_round: int,
              report: Callable[[dict[str, Any], dict[str, Any] | None], None],
              trained: Callable[[int], None] | None = None) -> None:
        """Rounds `start_round`.. of the budget; after each, `report(metrics, payload)` (payload: rank 0's
        checkpoint, else None). `trained(round)` is called when a round's batches are done, before scoring."""
        exp, steps, setup = self.exp, self.steps, self.setup
        for round_ in range(start_round, rounds(exp.train)):
            steps.generator.train()
            steps.discriminator.train()
            step = min(exp.train.steps, (round_ + 1) * exp.train.report_every)
            for _ in range(step - round_ * exp.train.report_every):
                batch = next(batches)
                y_real = prepare_images(self.pool.sample(batch["identity"], batch["emotion"], batch["jitter"]), setup)
                steps.step(batch["x"], y_real, batch["identity"], batch["emotion"])

            losses = steps.round_losses()
            if trained is not None:
                trained(round_)
            diverged = not all(math.isfinite(v) for v in losses.values())
            metrics: dict[str, Any] = {"round": round_ + 1, "first_round": start_round + 1, "step": step, **losses,
                                       "diverged": diverged, "stop_reason": "non-finite loss" if diverged else ""}
            if diverged:
                metrics.update(PENALTY)
                report(metrics, None)
                return
            payload = None
            if self.judges is not None:
                val, identity_evaluator, emotion_evaluator, recogniser = self.judges
                published = BestOfDraws(steps.published_generator, self.reader, exp.model.draws, self.teller)
                metrics.update(validation_metrics(published, val, identity_evaluator, emotion_evaluator, mu=self.mu,
                                                  exp=exp, setup=setup, inputs=self.inputs, recogniser=recogniser))
                payload = steps.checkpoint_payload(round_, step, self.mu, exp, metrics, self.reader_record,
                                                   self.teller_record)
            report(metrics, payload)


def gan_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (`tune.search.gan_trainer`, a run on several workers): a `GanRun` on this
    worker's shard, under DDP."""
    exp = ExperimentConfig.model_validate(config["experiment"])
    setup = setup_worker(exp.train.cpus_per_worker, exp.train.precision, exp.train.channels_last, exp.train.seed)
    fit_gan(exp, config, setup, TRAIN_SESSION, prepare_model=ray.train.torch.prepare_model)


def gan_in_trial(exp: ExperimentConfig, config: dict[str, Any], stream: ray.data.DataIterator) -> None:
    """A one-worker run in the Tune trial's own process, which holds the worker's CPUs (or GPU): the same
    `GanRun` on the trial's dataset, reporting to Tune, without a Train run's controller and worker group to
    start and stop for every trial (measured 8-9 s a trial on 2 cores; benchmarks/ray_overhead.py)."""
    setup = setup_worker(exp.train.cpus_per_worker, exp.train.precision, exp.train.channels_last, exp.train.seed,
                         train_worker=False)
    fit_gan(exp, config, setup, TUNE_SESSION, stream=stream)


def fit_gan(exp: ExperimentConfig, config: dict[str, Any], setup: WorkerSetup, session: Session, *,
            stream: ray.data.DataIterator | None = None,
            prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda module: module) -> None:
    """A run's rounds from its session's latest checkpoint (or the start) to the end of the budget."""
    weights, mu = trial_params(config)
    # The checkpoints record the loss this run trained with, the trial's weights included (an ablation's
    # `diversity` = 0 is not among the searched params that they also record).
    exp = exp.model_copy(update={"loss": LossConfig.model_validate(weights.to_dict())})
    inputs: GanInputs = config["inputs"]
    payload, start_round = session.restore()
    if payload is not None and start_round >= rounds(exp.train):
        # Resumed after its last round (the search's driver stopped before it recorded the end): its final
        # result and checkpoint once more, so that the resumed search sees the trial as it finished.
        session.report(setup, {**payload["metrics"], "replayed": True}, payload)
        return
    run = GanRun(exp, weights, mu, setup, inputs, payload=payload, fetch=ray.get, prepare_model=prepare_model)
    shard = ShardBatches(setup, exp.train.batch_size, stream=stream,
                         keep=exp.train.keep_shard and not (exp.train.flip or exp.train.max_shift))
    # A resumed run draws other passes than the first run did from where it stopped.
    run.train(shard.forever(seed=exp.train.seed * 1000 + 100 * start_round), start_round=start_round,
              report=lambda metrics, payload: session.report(setup, metrics, payload))


def scalar_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """Flatten list-valued metrics (CMC ranks) so Tune can track every figure per round."""
    flat: dict[str, float] = {}
    for key, value in scores.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}_{i + 1}": float(v) for i, v in enumerate(value)})
        else:
            flat[key] = float(value)
    return flat
