"""`epd-ray tune` from end to end: data, verifiers, search, best checkpoint, evaluation and report.

Stages are cached by content hash (prepared data, pretrained verifiers), so a second run reuses them. The
output folder receives the resolved config first, and is refused before anything is written if it holds
something else or if Ray's storage path cannot serve the cluster (see `runtime.resolve_storage`).

A run stopped part-way (Ctrl-C, a killed driver, a lost head) is continued with `epd-ray tune --resume
OUTPUT`: the same config, data and storage path, cached stages reused, the search restored from its saved
state and each unfinished trial continued from its last checkpoint.

It ends up holding best/ (model, checkpoint, model card), report/ (written by the code of `epd-ray
report`: the best model and every baseline on the test split, figures included) and, in pareto mode,
pareto.json (the Pareto-optimal trials). `epd-ray pretrain` and `epd-ray ablate` share its first stages
(`data_and_networks`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.fs

from epd_ray.artifacts import (DatasetManifest, PretrainedCache, RunFolder, RunMarker, atomic_write_text,
                              default_cache_dir)
from epd_ray.checkpoints import READER, TELLER, load_checkpoint, load_deidentifier, published_payload, save_checkpoint
from epd_ray.config import (EVALUATION_CORE_S_PER_FACE, EVALUATION_RESERVE, EVALUATION_RESERVE_MIN_S,
                            PARROT_CORE_S_PER_DRAW, PRETRAIN_SHARE, RECOGNISER_CORE_S_PER_FACE, ExperimentConfig,
                            load_config)
from epd_ray.core.precision import usable_cpus
from epd_ray.core.scoring import GeneratorMethod
from epd_ray.data.prepare import PreparedData, cached_dataset
from epd_ray.data.shards import read_manifest
from epd_ray.data.stream import materialized_split
from epd_ray.evaluate.evaluate import (Evaluation, baseline_methods, method_settings, run_evaluation, summary_lines,
                                       write_evaluation)
from epd_ray.evaluate.judges import main_judge, uses_recogniser
from epd_ray.evaluate.report import ALL_BASELINES, build_report, trial_history
from epd_ray.evaluate.verdicts import GENERATOR_METHOD, targets_line, verdict_line
from epd_ray.provenance import package_versions
from epd_ray.runtime import RayRuntime, resolve_storage, start_ray, storage_filesystem
from epd_ray.train.gan import GanInputs
from epd_ray.train.run import PretrainingError, check_batch_fits, pretrain_networks
from epd_ray.tune.search import OBJECTIVE, PARETO_METRICS, SearchOutcome, is_pareto, run_search

MARKER = RunFolder.MARKER
TUNE, TRAIN = "epd-ray tune", "epd-ray train"  # the commands that make a run folder
PARETO_FILE = RunFolder.PARETO


class OutputError(ValueError):
    """An output folder that cannot take this experiment; the message names it."""


class Interrupted(Exception):
    """Ctrl-C stopped a command; the message says how to go on from what it kept."""


@dataclass(frozen=True)
class TuneRun:
    output: Path
    best_dir: Path
    report_dir: Path
    dashboard_url: str | None
    wall_seconds: float


def default_output(exp: ExperimentConfig) -> Path:
    return Path("runs") / f"{exp.name}-{datetime.now():%Y%m%d-%H%M%S}"


def resume_command(output: Path, address: str | None) -> str:
    """The command that continues the run in `output`: `epd-ray train` or `tune`, whichever started it."""
    run = RunFolder(output)
    kind = run.read_marker(TUNE).kind if run.has_marker() else TUNE
    return f"{kind} --resume {output}" + (f" --address {address}" if address else "")


def check_output(output: Path, exp: ExperimentConfig) -> None:
    """Refuse, before writing anything, a folder that holds another experiment or unrelated files."""
    if not output.exists():
        return
    if not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder")
    run = RunFolder(output)
    if run.has_marker():
        held = run.read_marker(TUNE).config_digest
        if held != exp.digest():
            raise OutputError(f"{output}: holds another experiment (config {held}, this one {exp.digest()}); "
                              "choose a new --output")
        if not finished(output):
            raise OutputError(f"{output}: holds this experiment, unfinished; continue it with "
                              f"`{resume_command(output, exp.ray.address)}` or choose a new --output")
        raise OutputError(f"{output}: holds this experiment already; choose a new --output to run it again")
    if any(output.iterdir()):
        raise OutputError(f"{output}: not empty and not an epd-ray experiment; choose an empty or new folder")


def finished(output: Path) -> bool:
    return RunFolder(output).finished()


def check_inputs(exp: ExperimentConfig, prepared_dir: Path | None) -> None:
    """Input folders and files that must exist, checked before anything is written."""
    if prepared_dir is not None:
        read_manifest(Path(prepared_dir))  # FileNotFoundError naming the folder
    elif exp.data.path and not Path(exp.data.path).exists():
        raise FileNotFoundError(f"data.path: {exp.data.path} does not exist")
    if exp.verifiers.emotion_data:
        read_manifest(Path(exp.verifiers.emotion_data))


@dataclass(frozen=True)
class Stages:
    """What every training command needs first: the data, Ray, the materialized train split, the networks."""

    prepared: PreparedData
    runtime: RayRuntime
    train_data: Any  # the materialized train split (None: `epd-ray pretrain`, which trains no GAN)
    pretrained_path: Path


def data_and_networks(exp: ExperimentConfig, *, runtime: RayRuntime, prepared_dir: Path | None,
                      storage_path: str | None = None, strict: bool = False, pretrain_share_s: float | None = None,
                      gan_data: bool = True, echo=print) -> Stages:
    """Prepared data (given, or the cached synthetic/source set), the pretrained verifiers/evaluators (cached
    by content hash; with `strict`, PretrainingError when one is not clearly above chance), and with `gan_data`
    the train split read once into the object store for GAN training (after pretraining, which does not
    stream it; None without)."""
    cache_dir = default_cache_dir(exp.cache_dir)
    if prepared_dir is not None:
        prepared = PreparedData(Path(prepared_dir), read_manifest(Path(prepared_dir)), reused=True)
    else:
        prepared = cached_dataset(exp.data, cache_dir, echo=lambda line: echo(f"data: {line}"))
    m = prepared.info
    echo(f"data: {'reusing' if prepared.reused else 'prepared'} {m.num_images} images "
         f"({len(m.identities)} identities x {len(m.emotions)} emotions, {m.image_size} px) -> {prepared.path}")
    echo(f"ray: dashboard {runtime.dashboard_url or '(not available)'}"
         + (f"; storage {storage_path}" if storage_path else ""))
    check_batch_fits("train.batch_size", exp.train.batch_size, m.images("train"), exp.train.num_workers)
    pretrained_path = pretrain_networks(exp, prepared, cache_dir=cache_dir, runtime=runtime, strict=strict,
                                        time_share_s=pretrain_share_s, echo=echo)
    train_data = materialized_split(prepared.path, "train") if gan_data else None
    return Stages(prepared, runtime, train_data, pretrained_path)


def run_pretrain(exp: ExperimentConfig, *, prepared_dir: Path | None = None, strict: bool = False,
                 echo=print) -> Path:
    """`epd-ray pretrain`: the verifiers, evaluators and warm start into the cache that `tune` reuses."""
    check_inputs(exp, prepared_dir)
    runtime = start_ray(exp.ray)
    try:
        return data_and_networks(exp, runtime=runtime, prepared_dir=prepared_dir, strict=strict, gan_data=False,
                                 echo=echo).pretrained_path
    except KeyboardInterrupt:  # each network is kept as it finishes (PretrainedCache.unfinished)
        raise Interrupted("interrupted: the networks that had finished are kept in the cache; the same command "
                          "trains only the others") from None


def run_tune(exp: ExperimentConfig, output: Path, *, prepared_dir: Path | None = None,
             fixed: dict[str, float] | None = None, strict: bool = False, echo=print) -> TuneRun:
    """`epd-ray tune`: every stage, the search, the best model and its report. With `fixed` params,
    `epd-ray train`: the same stages and outputs for one setting trained for every round, no search.
    With `strict`, a pretrained network not clearly above chance stops it and the run folder is removed."""
    started = time.time()
    output = Path(output).resolve()
    check_inputs(exp, prepared_dir)
    check_output(output, exp)
    runtime = start_ray(exp.ray)
    storage = resolve_storage(exp.ray, RunFolder(output).ray_dir)
    output.mkdir(parents=True, exist_ok=True)
    run = RunFolder(output)
    run.write_config(exp)
    run.write_marker(RunMarker.new(TRAIN if fixed else TUNE, exp.digest(),
                                   str(Path(prepared_dir).resolve()) if prepared_dir else None, fixed))
    echo(f"config: {run.config_path}")
    try:
        return _interruptible(output, exp, lambda: _search_and_report(exp, output, prepared_dir, runtime, storage,
                                                                      started, resume=False, fixed=fixed,
                                                                      strict=strict, echo=echo))
    except PretrainingError:
        shutil.rmtree(output)  # check_output let only a new or empty folder through: nothing of the user's
        raise


def resume_tune(output: Path, *, address: str | None = None, echo=print) -> TuneRun:
    """Continue a run folder's experiment where it stopped, with the config and data it started with."""
    started = time.time()
    output = Path(output).resolve()
    run = RunFolder(output)
    if not run.has_marker():
        raise OutputError(f"{output}: not an epd-ray run folder (no {MARKER}); nothing to resume")
    if run.finished():
        raise OutputError(f"{output}: this experiment finished already; its best model is in {run.best_dir}")
    exp = load_config(run.config_path, {"ray.address": address} if address else None)
    marker = run.read_marker(TUNE)
    recorded, fixed = marker.data, marker.params
    prepared_dir = Path(recorded) if recorded else None
    check_inputs(exp, prepared_dir)
    runtime = start_ray(exp.ray)
    storage = resolve_storage(exp.ray, RunFolder(output).ray_dir)
    echo(f"resuming: {output} (config {run.config_path})")
    return _interruptible(output, exp, lambda: _search_and_report(exp, output, prepared_dir, runtime, storage,
                                                                  started, resume=True, fixed=fixed, strict=False,
                                                                  echo=echo))


def _interruptible(output: Path, exp: ExperimentConfig, run):
    try:
        return run()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: the search's state and each trial's last finished round are saved; "
                          f"resume with: {resume_command(output, exp.ray.address)}") from None


def _search_and_report(exp: ExperimentConfig, output: Path, prepared_dir: Path | None, runtime: RayRuntime,
                       storage: str, started: float, *, resume: bool, fixed: dict[str, float] | None,
                       strict: bool, echo) -> TuneRun:
    budget = exp.search.time_budget_s or None
    stages = data_and_networks(exp, runtime=runtime, prepared_dir=prepared_dir, storage_path=storage, strict=strict,
                               pretrain_share_s=budget and budget * PRETRAIN_SHARE, echo=echo)
    prepared, pretrained_path = stages.prepared, stages.pretrained_path
    outcome = run_search(exp, train_data=stages.train_data,
                         inputs=GanInputs.put(prepared.path, pretrained_path, exp.evaluation),
                         runtime=runtime, storage_path=storage, resume=resume, fixed=fixed,
                         time_budget_s=budget and search_time_budget(
                             budget, time.time() - started, evaluation_reserve(budget, exp, prepared.info), echo),
                         echo=echo)
    echo(f"{'train' if fixed else 'search'}: done in {outcome.wall_seconds:.0f} s; best trial {outcome.best.trial_id} "
         f"J={outcome.best.metrics['objective']:.3f} (validation)")

    best_dir = RunFolder(output).best_dir
    checkpoint = fetch_checkpoint(storage, outcome.best.checkpoint, best_dir / "checkpoint.pt")
    evaluation = evaluate_best(exp, outcome, checkpoint, prepared, pretrained_path, echo)
    report_path = write_report(output, exp, outcome, evaluation)
    # last: its model card marks the run finished
    write_best(best_dir, exp, outcome, prepared, evaluation.metrics, searched=not fixed)
    echo_summary(exp, outcome, evaluation.metrics, echo)
    wall = time.time() - started
    echo(f"best model: {best_dir}\nreport: {report_path}\nwall time: {wall:.0f} s")
    # the last lines a user reads say again what falls short
    if not evaluation.metrics["verdict"]["beats_baselines"]:
        echo(verdict_line(evaluation.metrics["verdict"]))
    targets = evaluation.metrics["targets"]
    if not (targets["privacy_met"] and targets["expression_met"]):
        echo(targets_line(targets))
    return TuneRun(output, best_dir, report_path.parent, runtime.dashboard_url, wall)


def evaluation_reserve(budget: float, exp: ExperimentConfig, manifest: DatasetManifest) -> float:
    """Seconds the closing evaluation keeps of a whole-command time budget: a share of it, or on real faces
    what embedding the originals, judging the test faces (at most `evaluation.test_probes`) and drawing the
    parrot's gallery (`evaluation.gallery_per_identity` faces of every person, `evaluation.parrot_draws`
    times) is expected to take on these cores."""
    reserve = max(EVALUATION_RESERVE * budget, EVALUATION_RESERVE_MIN_S)
    if not uses_recogniser(main_judge(exp.evaluation.judge, manifest.source), manifest.source):
        return reserve
    faces = manifest.images("test")
    faces = min(faces, exp.evaluation.test_probes) if exp.evaluation.test_probes else faces
    gallery = min(manifest.images("train"), len(manifest.identities) * exp.evaluation.gallery_per_identity)
    core_s = (faces * EVALUATION_CORE_S_PER_FACE + (2 * faces + gallery) * RECOGNISER_CORE_S_PER_FACE
              + gallery * (exp.evaluation.parrot_draws - 1) * PARROT_CORE_S_PER_DRAW)
    return max(reserve, core_s / usable_cpus())


def search_time_budget(budget: float, spent: float, reserve: float, echo=print) -> float:
    """The search's share of a whole-command time budget: what is left after `spent` seconds, less the
    evaluation's `reserve`; at least that reserve, so that a budget spent already still trains a round or so."""
    left = budget - spent - reserve
    if left < reserve:
        echo(f"time budget: {spent:.0f} s of {budget:.0f} s spent before the search and {reserve:.0f} s kept for the "
             f"evaluation and report; the search gets {reserve:.0f} s anyway (the run will end late)")
        return reserve
    echo(f"time budget: {spent:.0f} s of {budget:.0f} s spent before the search; it gets {left:.0f} s, "
         f"{reserve:.0f} s are kept for the evaluation and report")
    return left


def fetch_checkpoint(storage: str, path: str, dest: Path) -> Path:
    """Copy a checkpoint file from Ray's storage (a folder or an object store) to `dest` on this machine."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(path, str(dest), source_filesystem=storage_filesystem(storage),
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return dest


def evaluate_best(exp: ExperimentConfig, outcome: SearchOutcome, checkpoint: Path, prepared: PreparedData,
                  pretrained_path: Path, echo=print) -> Evaluation:
    """The best model and every baseline (k-Same included) on the test split, as `epd-ray report` does."""
    deidentifier = load_deidentifier(load_checkpoint(checkpoint), checkpoint)
    methods = {GENERATOR_METHOD: GeneratorMethod(deidentifier, seed=exp.train.seed),
               **baseline_methods(exp.evaluation, ALL_BASELINES, dataset_dir=prepared.path)}
    mu = float(outcome.best.params.get("mu", exp.evaluation.mu))
    return run_evaluation(methods, dataset_dir=prepared.path, pretrained_path=pretrained_path, split="test", mu=mu,
                          cfg=exp.evaluation, echo=echo)


def chosen_by(exp: ExperimentConfig, searched: bool) -> str:
    if not searched:
        return f"one setting (`epd-ray train`) at its {'last' if is_pareto(exp) else 'highest-J (validation)'} round"
    return ("the Pareto front's highest J (privacy and utility searched)" if is_pareto(exp)
            else "the highest J (validation)")


def write_best(best_dir: Path, exp: ExperimentConfig, outcome: SearchOutcome, prepared: PreparedData,
               metrics: dict[str, Any], *, searched: bool = True) -> None:
    """The best generator and its model card next to the trial checkpoint that `fetch_checkpoint` copied."""
    checkpoint = load_checkpoint(best_dir / "checkpoint.pt")
    networks = checkpoint["networks"]
    save_checkpoint(best_dir / "generator.pt", {
        **published_payload(networks["generator"], networks.get(READER), checkpoint.get("draws", 1),
                            networks.get(TELLER)),
        "params": checkpoint["params"]})
    card = {
        "model": "EPD-Net generator (pix2pix U-Net)",
        "weights": "generator.pt (the generator and, with draws > 1 or a generator told the expression, the "
                   "expression readers that pick between its draws and the ones that read in the original the "
                   "expression it is told; load with epd_ray.deploy.load_model(path))",
        "params": outcome.best.params,
        "trial": outcome.best.trial_id,
        "chosen_by": chosen_by(exp, searched),
        "round": checkpoint["round"] + 1,
        "step": checkpoint["step"],
        "source_checkpoint": outcome.best.checkpoint,
        "pretrained_path": metrics.get("inputs", {}).get("pretrained_path"),
        "pretrained_scores": PretrainedCache.scores_beside(metrics.get("inputs", {}).get("pretrained_path")),
        "validation_metrics": {k: v for k, v in outcome.best.metrics.items() if isinstance(v, (int, float))},
        "main_judge": metrics["main_judge"],
        "beats_baselines": metrics["verdict"]["beats_baselines"],
        "verdict": metrics["verdict"],
        "targets": metrics["targets"],
        "test_metrics": metrics["methods"][GENERATOR_METHOD],
        "data": {"content_hash": prepared.info.content_hash, "path": str(prepared.path),
                 "image_size": prepared.info.image_size, "identities": len(prepared.info.identities),
                 "face_margin": prepared.info.face_margin},
        "config": exp.to_dict(),
        "versions": package_versions(),
    }
    atomic_write_text(best_dir / RunFolder.CARD, json.dumps(card, indent=2))


def pareto_entries(outcome: SearchOutcome) -> list[dict[str, Any]]:
    """The Pareto-optimal trials, for the user to pick a trade-off: params, both halves of J, checkpoint."""
    return [{"trial_id": t.trial_id, "params": t.params, "round": t.metrics.get("round"),
             **{k: t.metrics.get(k) for k in (*PARETO_METRICS, OBJECTIVE)}, "checkpoint": t.checkpoint,
             "best": t.trial_id == outcome.best.trial_id} for t in outcome.front]


def write_report(output: Path, exp: ExperimentConfig, outcome: SearchOutcome, evaluation: Evaluation) -> Path:
    """report/ (metrics.json with the trials, per_image.parquet, samples, report.md and its figures), drawn by
    the same code as `epd-ray report`; in pareto mode also pareto.json, the front with its checkpoints."""
    run = RunFolder(output)
    extra = {"model": str(run.best_dir / "generator.pt"), "params": outcome.best.params,
             "best_trial": outcome.best.trial_id, "search_objective": exp.search.objective,
             "trials": [asdict(t) for t in outcome.trials],
             **method_settings(exp.evaluation, evaluation.metrics["methods"])}
    if run.search_dir.is_dir():  # Ray's storage on this machine: every round of every trial, for the report
        extra["trial_history"] = trial_history(run.search_dir)
    if is_pareto(exp):
        front = pareto_entries(outcome)
        extra["pareto_front"] = front
        run.write_pareto(list(PARETO_METRICS), front)
    write_evaluation(run.report_dir, evaluation, extra)
    return build_report(output, echo=lambda *_: None)


def echo_summary(exp: ExperimentConfig, outcome: SearchOutcome, metrics: dict[str, Any], echo=print) -> None:
    echo(f"\ntrials ({'last' if is_pareto(exp) else 'best'} round, validation split; * on the Pareto front):")
    keys = sorted({k for t in outcome.trials for k in t.params})
    columns = ("objective", "privacy", "utility", "deid_rate", "emotion_preserved", "ssim")
    echo("  " + " ".join(f"{h:>9}" for h in ["trial", "status", *keys, "J", "privacy", "utility", "D", "E", "SSIM"]))
    front = {t.trial_id for t in outcome.front}
    for t in sorted(outcome.trials, key=lambda t: -t.metrics.get("objective", -1)):
        m = t.metrics
        row = [("*" if t.trial_id in front else "") + t.trial_id[-8:], t.status,
               *(f"{t.params.get(k, float('nan')):.3f}" for k in keys),
               *(f"{m.get(k, float('nan')):.3f}" for k in columns)]
        echo("  " + " ".join(f"{c:>9}" for c in row))
    if outcome.budget_note:
        echo(outcome.budget_note)
    echo(f"\ntest split, every judge (mu={metrics['mu']:.3f} for the paper's figures):")
    for line in summary_lines(metrics):
        echo(line)
