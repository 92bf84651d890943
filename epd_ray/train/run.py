"""The driver of the pretraining stage: a Ray task per network, side by side, cached by what defines them.

While it runs, a progress line per network about ten times over (`progress.ProgressFeed`); after it (or
on reusing the cache), each network's validation score next to chance, and a warning for a network that
is not clearly above it (`check_pretrained`). With `strict` such a network stops the command and nothing
goes into the cache. The new-people probe's figure goes next to S_e's, with a warning (never a stop) when
expressions carry poorly to people never seen (`check_new_people`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ray

from epd_ray.artifacts import (PRETRAINED_FILE, DatasetManifest, SCORES_FILE, PretrainedCache, atomic_folder,
                               pretrained_key)
from epd_ray.checkpoints import PICKER, CheckpointError, load_checkpoint, save_checkpoint
from epd_ray.config import ConfigError, ExperimentConfig, VerifiersConfig
from epd_ray.data.prepare import PreparedData
from epd_ray.data.shards import load_split
from epd_ray.runtime import RayRuntime, cpus_beside_data
from epd_ray.train.pretrain import (NEW_PEOPLE_PROBE, PretrainInputs, classifier_steps, largest_first, network_specs,
                                    new_people_faces, pretrain_task)
from epd_ray.train.progress import ProgressFeed

# The warm start's reconstruction SSIM below which GAN training starts from visibly blurred faces (the quick
# preset's reaches ~0.97; its emotion evaluator then still reads ~98% of the reconstructed expressions).
WARM_START_MIN_SSIM = 0.8


class PretrainingError(RuntimeError):
    """`--strict` and a pretrained network that cannot be trusted; the message names it and what to do."""


def clearly_above_chance(classes: int) -> float:
    """The validation accuracy a classifier of `classes` classes must reach to count as having learnt.

    Chance plus a margin of max(chance, 0.2), i.e. at least twice chance and 20 points above it (7 emotions:
    0.343; 12 people: 0.283; 67 people: 0.215), capped at half the way from chance to perfect so that a
    two-class task asks 0.75, not 1.0. Validation sets of real faces are small (tens of images), where a
    few lucky guesses move accuracy by several points: a margin, not just "above chance", keeps such luck
    from passing for a trained verifier.
    """
    chance = 1.0 / classes
    return chance + min(max(chance, 0.2), (1.0 - chance) / 2)


def check_pretrained(scores: dict[str, float], classes: dict[str, int],
                     exp: ExperimentConfig) -> tuple[list[str], list[str]]:
    """Each network's validation score next to chance (the warm start: its reconstruction SSIM), and a
    warning for each that is not clearly above chance (or reconstructs poorly). `classes`: per classifier."""
    lines, warnings = [], []
    for name, score in scores.items():
        if name not in classes:  # the generator's warm start
            lines.append(f"  {name:<19} reconstruction SSIM {score:.3f} (want >= {WARM_START_MIN_SSIM})")
            if not score >= WARM_START_MIN_SSIM:
                warnings.append(f"{name} (warm start): reconstruction SSIM {score:.3f} < {WARM_START_MIN_SSIM}: GAN "
                                f"training would start from blurred faces; give it more steps "
                                f"(model.warm_start_steps, now {exp.model.warm_start_steps}) or more data")
            continue
        chance, needed = 1.0 / classes[name], clearly_above_chance(classes[name])
        lines.append(f"  {name:<19} validation accuracy {score:.3f}, chance {chance:.3f} "
                     f"({classes[name]} classes; want >= {needed:.3f})")
        if not score >= needed:
            emotion = ("--emotion-data with a larger emotion-labelled set (e.g. FER2013), "
                       if "emotion" in name or name.startswith(PICKER) else "")
            warnings.append(f"{name}: validation accuracy {score:.3f} is not clearly above chance {chance:.3f} "
                            f"(want >= {needed:.3f}): it cannot steer or judge the GAN; give it more data, "
                            f"{emotion}or more steps (verifiers.steps, now {exp.verifiers.steps})")
    return lines, warnings


def check_new_people(probe: float, seen: float, exp: ExperimentConfig) -> tuple[str, str | None]:
    """The new-people probe's accuracy on people it never saw next to S_e's on the people it learnt, and a
    warning when the first falls below `evaluation.min_expression_kept` of the second: S and the pickers
    learnt expressions the same way, so a deployed model keeps the expressions of new people less than its
    evaluation, on other photographs of the people it trained on, says."""
    line = (f"  {NEW_PEOPLE_PROBE:<19} accuracy {probe:.3f} on people it never saw (emotion_evaluator {seen:.3f} "
            f"on people it learnt)")
    if probe >= exp.evaluation.min_expression_kept * seen:
        return line, None
    return line, (f"{NEW_PEOPLE_PROBE}: an emotion classifier that learnt from this set's other people reads the "
                  f"expressions of people it never saw at {probe:.3f}, against {seen:.3f} for S_e on the people it "
                  f"learnt: S and the pickers learn expressions the same way, so on photographs of new people the "
                  f"model keeps fewer expressions than its evaluation (other photographs of the people it trained "
                  f"on) says; give it more people, or --emotion-data with a larger emotion set (e.g. FER2013)")


def check_batch_fits(field: str, batch_size: int, images: int, workers: int) -> None:
    """Budgets count full batches: a worker whose share of the images cannot fill one would never step. The
    message names the largest batch that fits, so a small set (22 training faces) needs one more command only."""
    share = images // workers
    if share < batch_size:
        fix = f"lower it: --set {field}={share}" if share >= 2 else "use fewer workers or more images"
        raise ConfigError(f"{field}: {batch_size} is more than the {images} training image(s) give each of "
                          f"{workers} worker(s); {fix}")


def progress_line(item: dict) -> str:
    score = f"val SSIM {item['val_score']:.3f}" if item["task"] == "reconstruct" else f"val acc {item['val_score']:.3f}"
    return (f"  {item['network']:<19} step {item['step']}/{item['steps']}  loss {item['loss']:.4f}  {score}  "
            f"{item['elapsed_s']:.0f} s, ~{item['left_s']:.0f} s left")


def emotion_data(exp: ExperimentConfig, prepared: PreparedData) -> PreparedData:
    """The data set the emotion networks learn from: `verifiers.emotion_data` when set, else the faces.

    It must share the faces' size (S judges the generator's output at that size) and emotion classes.
    """
    if not exp.verifiers.emotion_data:
        return prepared
    path = Path(exp.verifiers.emotion_data)
    emotions, faces = DatasetManifest.load(path), prepared.info
    if emotions.image_size != faces.image_size:
        raise ConfigError(f"verifiers.emotion_data: {path} holds {emotions.image_size} px images, the faces are "
                          f"{faces.image_size} px; prepare it with --size {faces.image_size}")
    if emotions.emotions != faces.emotions:
        raise ConfigError(f"verifiers.emotion_data: {path} has emotion classes {list(emotions.emotions)}, the faces "
                          f"{list(faces.emotions)}")
    return PreparedData(path, emotions.raw, reused=True)


class PretrainingEstimate:
    """Progress lines through to `echo`, and once a warning when the estimated pretraining time passes `share_s`
    (the pretraining share of a time budget). The estimate takes each network's own seconds per step and, for
    the steps of networks not yet started, the slowest rate seen so far, shared among the `lanes` networks that
    train at once: the networks differ in cost (when the fastest reported first, an estimate from it alone said
    636 s of a pretraining that took 1016 s), so it is made again as each network starts. Started largest
    first (`largest_first`), the slowest report first and the estimate errs high: on JAFFE it said up to 874
    and 988 s, and 669 and 683 s went before the search."""

    def __init__(self, specs: dict[str, dict[str, Any]], share_s: float | None, echo, lanes: int = 1):
        self.total_steps = sum(spec["steps"] for spec in specs.values())  # every network's (`network_specs`)
        self.lanes = lanes
        self.rates: dict[str, tuple[float, int]] = {}  # network: (seconds per step, its steps)
        self.share_s, self.echo, self.warned = share_s, echo, share_s is None

    def estimate_s(self) -> float:
        slowest = max(rate for rate, _ in self.rates.values())
        unseen = max(0, self.total_steps - sum(steps for _, steps in self.rates.values()))
        return (sum(rate * steps for rate, steps in self.rates.values()) + slowest * unseen) / self.lanes

    def __call__(self, item: dict) -> None:
        self.echo(progress_line(item))
        if self.warned or not item["step"]:
            return
        self.rates[item["network"]] = (item["elapsed_s"] / item["step"], item["steps"])
        estimate = self.estimate_s()
        if estimate > self.share_s:
            self.warned = True
            self.echo(f"warning: pretraining may take up to ~{estimate:.0f} s, more than its share "
                      f"({self.share_s:.0f} s) of the time budget; the search gets what is left. Pretrain once "
                      "beforehand with `epd-ray pretrain` (cached, then reused), or lower verifiers.steps / "
                      "verifiers.min_passes / model.warm_start_steps")


def pretrain_networks(exp: ExperimentConfig, prepared: PreparedData, *, cache_dir: Path, runtime: RayRuntime,
                      strict: bool = False, time_share_s: float | None = None, echo=print) -> Path:
    """The pretrained networks' file in the cache, trained now unless cached; with `strict`, PretrainingError
    for a network not clearly above chance (fresh ones are then not cached). With `time_share_s`, a warning
    when pretraining is estimated to take longer."""
    faces = prepared.info
    key = pretrained_key(exp, faces.content_hash)
    cache = PretrainedCache(Path(cache_dir))
    out = cache.entry(key)
    emotions = emotion_data(exp, prepared)
    specs = network_specs(exp.verifiers, exp.model, len(faces.identities), faces.image_size, len(faces.emotions),
                          emotions_with_people=emotions is prepared)
    classes = {name: len(emotions.info.emotions if spec["task"] == "emotion" else faces.identities)
               for name, spec in specs.items() if spec["task"] != "reconstruct" and name != NEW_PEOPLE_PROBE}
    if (out / PRETRAINED_FILE).is_file():
        echo(f"pretrained networks: reusing {out}")
        judge_pretrained(cache.scores(key), classes, exp, strict=strict, echo=echo)
        return out / PRETRAINED_FILE
    for data in {prepared.path: prepared, emotions.path: emotions}.values():
        check_batch_fits("verifiers.batch_size", exp.verifiers.batch_size, data.info.images("train"), 1)
    # The splits go through the object store once (tasks may run on other nodes); the emotion networks
    # learn from the emotion-labelled set when one is given, the new-people probe from part of the people.
    faces_of = {path: (load_split(path, "train"), load_split(path, "val")) for path in {prepared.path, emotions.path}}
    if NEW_PEOPLE_PROBE in specs:
        faces_of[NEW_PEOPLE_PROBE] = new_people_faces(*faces_of[prepared.path])
        if len(faces_of[NEW_PEOPLE_PROBE][0]) < exp.verifiers.batch_size:
            echo(f"{NEW_PEOPLE_PROBE}: left out, its {len(faces_of[NEW_PEOPLE_PROBE][0])} training faces fill no "
                 f"batch of {exp.verifiers.batch_size}")
            del specs[NEW_PEOPLE_PROBE], faces_of[NEW_PEOPLE_PROBE]

    def source_of(name: str):
        """Where a network's (train, val) faces are in `faces_of`: the probe's own, else its task's data set."""
        return name if name in faces_of else (emotions if specs[name]["task"] == "emotion" else prepared).path

    for name, spec in specs.items():
        if spec["task"] != "reconstruct":
            spec["steps"] = classifier_steps(exp.verifiers, len(faces_of[source_of(name)][0]))
    unfinished = cache.unfinished(key)
    finished = finished_networks(unfinished, specs)
    todo = [name for name in largest_first(specs, faces.image_size) if name not in finished]
    lanes, cpus = pretraining_lanes(exp, runtime, len(todo))
    pickers = exp.verifiers.pickers
    siblings = exp.verifiers.emotion_verifiers - 1
    echo("pretraining V (VGG-16), S (mini-Xception)" + (f" and {siblings} more of its shape" if siblings else "")
         + ", evaluators V_e, S_e (ResNet-18 shape)"
         + (f", {pickers} expression picker(s) (ResNet-18 shape)" if pickers else "")
         + (f", the {NEW_PEOPLE_PROBE} (S_e's shape)" if NEW_PEOPLE_PROBE in specs else "")
         + f"{' and the generator warm start' if exp.model.warm_start_steps else ''} on "
         f"{faces.images('train')} images, {steps_said(specs, exp.verifiers)}"
         + (f", warm start {exp.model.warm_start_steps}" if exp.model.warm_start_steps else "")
         + f"; {lanes} at a time" + (f"; kept from an interrupted run: {', '.join(finished)}" if finished else ""))
    if emotions is not prepared:
        echo(f"emotion networks learn from {emotions.path} ({emotions.info.images('train')} images)")
    splits = {source: tuple(ray.put(split) for split in pair) for source, pair in faces_of.items()}

    with ProgressFeed(PretrainingEstimate(specs, time_share_s, echo, lanes)) as feed:
        inputs = PretrainInputs(specs, exp.verifiers.batch_size, exp.verifiers.augment, exp.train.precision,
                                exp.train.channels_last, feed.queue)
        task = pretrain_task.options(num_cpus=cpus, num_gpus=1 if exp.train.use_gpu else 0,
                                     max_retries=exp.train.max_failures)
        running = {task.remote(name, inputs, cpus, *splits[source_of(name)]): name for name in todo}
        try:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                name = running.pop(done[0])
                record, score = ray.get(done[0])
                save_checkpoint(unfinished / f"{name}.pt", {"networks": {name: record}, "val_score": {name: score}})
                finished[name] = (record, score)
        finally:  # an error or Ctrl-C: the other networks stop too, what finished stays for the next run
            for ref in running:
                ray.cancel(ref, force=True)
    with atomic_folder(out) as tmp:  # nothing half-written, nothing untrusted (a raise here), in the cache
        scores = {name: finished[name][1] for name in specs}
        # the people the identity networks tell apart, in class order: `evaluate` judges no other people with them
        save_checkpoint(tmp / PRETRAINED_FILE, {"networks": {name: finished[name][0] for name in specs},
                                                "val_score": scores, "identities": list(faces.identities)})
        (tmp / SCORES_FILE).write_text(json.dumps(scores, indent=2))
        judge_pretrained(scores, classes, exp, strict=strict, echo=echo)
    shutil.rmtree(unfinished, ignore_errors=True)
    echo(f"pretrained networks -> {out}")
    return out / PRETRAINED_FILE


def steps_said(specs: dict[str, Any], cfg: VerifiersConfig) -> str:
    """The classifiers' steps for the pretraining line: one number, or the range `verifiers.min_passes` gave."""
    steps = sorted({spec["steps"] for spec in specs.values() if spec["task"] != "reconstruct"})
    if steps == [cfg.steps]:
        return f"{cfg.steps} steps each"
    return (f"{steps[0]}{f'-{steps[-1]}' if len(steps) > 1 else ''} steps each "
            f"(verifiers.min_passes: {cfg.min_passes:g} passes over each one's training faces, steps {cfg.steps} to "
            f"{cfg.max_steps or 'any'})")


def finished_networks(unfinished: Path, specs: dict[str, Any]) -> dict[str, tuple[dict[str, Any], float]]:
    """The networks an interrupted pretraining of the same key finished: (record, validation score) by name.
    An unreadable file counts as not finished (it is trained again)."""
    finished = {}
    for name in specs:
        try:
            payload = load_checkpoint(unfinished / f"{name}.pt")
            finished[name] = (payload["networks"][name], float(payload["val_score"][name]))
        except (CheckpointError, KeyError):
            continue
    return finished


def pretraining_lanes(exp: ExperimentConfig, runtime: RayRuntime, networks: int) -> tuple[int, float]:
    """How many networks train at once and the CPUs each task holds: a GPU each with `train.use_gpu`; else
    `cpu_lanes` of the cluster's CPUs, whatever a trial's workers take (`train.cpus_per_worker`)."""
    networks = max(1, networks)
    if exp.train.use_gpu:
        return max(1, min(networks, int(runtime.total_gpus))), 1.0
    return cpu_lanes(networks, runtime.total_cpus, runtime.largest_node_cpus)


def cpu_lanes(networks: int, cpus: float, node_cpus: float) -> tuple[int, float]:
    """As many networks at once as there are whole cores, sharing the CPUs the driver's side leaves free, at most
    one node's CPUs each. Networks side by side on a thread each train more per second than fewer on more threads:
    on 2 cores, JAFFE's ten took 683 s two at a time and 895 s one at a time on two threads. So pretraining does
    not take a trial's CPUs, which may hold every core to finish one trial sooner (the `faces` preset)."""
    lanes = max(1, min(networks, int(cpus)))
    return lanes, min(cpus_beside_data(cpus) / lanes, node_cpus)


def judge_pretrained(scores: dict[str, float], classes: dict[str, int], exp: ExperimentConfig, *, strict: bool,
                     echo) -> None:
    scores = dict(scores)
    probe = scores.pop(NEW_PEOPLE_PROBE, None)
    lines, warnings = check_pretrained(scores, classes, exp)
    advice = []  # warned about, never a reason for --strict to stop
    if probe is not None:
        line, warning = check_new_people(probe, scores["emotion_evaluator"], exp)
        lines.append(line)
        advice += [warning] if warning else []
    echo("pretrained networks, validation split:")
    for line in lines:
        echo(line)
    for warning in warnings + advice:
        echo(f"warning: {warning}")
    if strict and warnings:
        raise PretrainingError(f"--strict: {len(warnings)} pretrained network(s) not to be trusted, stopping "
                               f"before GAN training (first: {warnings[0]})")
