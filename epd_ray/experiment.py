"""`epd-ray tune` from end to end: data, verifiers, search, best checkpoint, evaluation and report.

Stages are cached by content hash (prepared data, pretrained verifiers), so a second run reuses them (as
does `epd-ray ablate`, through `training_inputs`). The output folder receives the resolved config first,
and is refused before anything is written if it holds something else. It ends up holding best/ (model,
checkpoint, model card), report/ (written by the code of `epd-ray report`: the best model and every
baseline on the test split, figures included) and, in pareto mode, pareto.json (the Pareto-optimal trials).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ray.data

from epd_ray.checkpoints import build_from_record, load_checkpoint, save_checkpoint
from epd_ray.config import ExperimentConfig, write_resolved
from epd_ray.data.prepare import PreparedData, cached_dataset
from epd_ray.data.shards import read_manifest
from epd_ray.data.stream import materialized_split
from epd_ray.evaluate.evaluate import (GENERATOR_METHOD, Evaluation, baseline_methods, generator_method,
                                       method_settings, run_evaluation, summary_lines, write_evaluation)
from epd_ray.evaluate.report import ALL_BASELINES, REPORT_DIR, build_report
from epd_ray.provenance import package_versions
from epd_ray.runtime import RayRuntime, start_ray
from epd_ray.train.run import pretrain_networks
from epd_ray.tune.search import OBJECTIVE, PARETO_METRICS, SearchOutcome, is_pareto, run_search

MARKER = "experiment.json"
PARETO_FILE = "pareto.json"


class OutputError(ValueError):
    """An output folder that cannot take this experiment; the message names it."""


@dataclass(frozen=True)
class TuneRun:
    output: Path
    best_dir: Path
    report_dir: Path
    dashboard_url: str | None
    wall_seconds: float


def default_output(exp: ExperimentConfig) -> Path:
    return Path("runs") / f"{exp.name}-{datetime.now():%Y%m%d-%H%M%S}"


def default_cache_dir(exp: ExperimentConfig) -> Path:
    return Path(exp.cache_dir).expanduser() if exp.cache_dir else Path.home() / ".cache" / "epd-ray"


def check_output(output: Path, exp: ExperimentConfig) -> None:
    """Refuse, before writing anything, a folder that holds another experiment or unrelated files."""
    if not output.exists():
        return
    if not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder")
    marker = output / MARKER
    if marker.is_file():
        held = json.loads(marker.read_text()).get("config_digest")
        if held != exp.digest():
            raise OutputError(f"{output}: holds another experiment (config {held}, this one {exp.digest()}); "
                              "choose a new --output")
        raise OutputError(f"{output}: holds this experiment already; choose a new --output to run it again")
    if any(output.iterdir()):
        raise OutputError(f"{output}: not empty and not an epd-ray experiment; choose an empty or new folder")


@dataclass(frozen=True)
class TrainingInputs:
    """What every GAN run of an experiment shares: prepared data, Ray, and the pretrained networks."""

    prepared: PreparedData
    runtime: RayRuntime
    storage_path: str
    train_data: ray.data.Dataset
    pretrained_path: Path


def training_inputs(exp: ExperimentConfig, output: Path, *, prepared_dir: Path | None = None,
                    echo=print) -> TrainingInputs:
    """Data (the given prepared folder, or the cached synthetic set), Ray, and the verifiers (cached by what
    defines them, pretrained here only when the cache lacks them)."""
    cache_dir = default_cache_dir(exp)
    if prepared_dir is not None:
        prepared = PreparedData(Path(prepared_dir), read_manifest(Path(prepared_dir)), reused=True)
    else:
        prepared = cached_dataset(exp.data, cache_dir)
    echo(f"data: {'reusing' if prepared.reused else 'prepared'} {prepared.manifest['num_images']} images "
         f"({len(prepared.manifest['identities'])} identities x 7 emotions, {prepared.manifest['image_size']} px) "
         f"-> {prepared.path}")
    runtime = start_ray(exp.ray)
    echo(f"ray: dashboard {runtime.dashboard_url or '(not available)'}")
    storage = exp.ray.storage_path or str(output / "ray")
    train_data = materialized_split(prepared.path, "train")
    pretrained_path = pretrain_networks(exp, prepared, train_data=train_data, cache_dir=cache_dir, runtime=runtime,
                                        storage_path=storage, echo=echo)
    return TrainingInputs(prepared, runtime, storage, train_data, pretrained_path)


def run_tune(exp: ExperimentConfig, output: Path, *, prepared_dir: Path | None = None, echo=print) -> TuneRun:
    started = time.time()
    output = Path(output).resolve()
    check_output(output, exp)
    output.mkdir(parents=True, exist_ok=True)
    write_resolved(exp, output / "config.yaml")
    (output / MARKER).write_text(json.dumps({"kind": "epd-ray tune", "config_digest": exp.digest(),
                                             "started": datetime.now().isoformat(timespec="seconds")}))
    echo(f"config: {output / 'config.yaml'}")

    inputs = training_inputs(exp, output, prepared_dir=prepared_dir, echo=echo)
    outcome = run_search(exp, train_data=inputs.train_data, dataset_dir=inputs.prepared.path,
                         pretrained_path=inputs.pretrained_path, image_size=inputs.prepared.manifest["image_size"],
                         runtime=inputs.runtime, storage_path=inputs.storage_path, echo=echo)
    echo(f"search: done in {outcome.wall_seconds:.0f} s; best trial {outcome.best.trial_id} "
         f"J={outcome.best.metrics['objective']:.3f} (validation)")

    best_dir = output / "best"
    evaluation = evaluate_best(exp, outcome, inputs.prepared, inputs.pretrained_path)
    write_best(best_dir, exp, outcome, inputs.prepared, evaluation.metrics)
    report_path = write_report(output, exp, outcome, evaluation)
    echo_summary(exp, outcome, evaluation.metrics, echo)
    wall = time.time() - started
    echo(f"best model: {best_dir}\nreport: {report_path}\nwall time: {wall:.0f} s")
    return TuneRun(output, best_dir, report_path.parent, inputs.runtime.dashboard_url, wall)


def evaluate_best(exp: ExperimentConfig, outcome: SearchOutcome, prepared: PreparedData,
                  pretrained_path: Path) -> Evaluation:
    """The best model and every baseline (k-Same included) on the test split, as `epd-ray report` does."""
    checkpoint = Path(outcome.best.checkpoint)
    generator = build_from_record(load_checkpoint(checkpoint)["networks"]["generator"], checkpoint)
    methods = {GENERATOR_METHOD: generator_method(generator, seed=exp.train.seed),
               **baseline_methods(exp.evaluation, ALL_BASELINES, dataset_dir=prepared.path)}
    mu = float(outcome.best.params.get("mu", exp.evaluation.mu))
    return run_evaluation(methods, dataset_dir=prepared.path, pretrained_path=pretrained_path, split="test", mu=mu,
                          cfg=exp.evaluation)


def write_best(best_dir: Path, exp: ExperimentConfig, outcome: SearchOutcome, prepared: PreparedData,
               metrics: dict[str, Any]) -> None:
    best_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(Path(outcome.best.checkpoint))
    shutil.copy(outcome.best.checkpoint, best_dir / "checkpoint.pt")
    save_checkpoint(best_dir / "generator.pt", {"networks": {"generator": checkpoint["networks"]["generator"]},
                                                "params": checkpoint["params"]})
    card = {
        "model": "EPD-Net generator (pix2pix U-Net)",
        "weights": "generator.pt (load with epd_ray.checkpoints.load_network(path, 'generator'))",
        "params": outcome.best.params,
        "trial": outcome.best.trial_id,
        "chosen_by": ("the Pareto front's highest J (privacy and utility searched)" if is_pareto(exp)
                      else "the highest J (validation)"),
        "epoch": checkpoint["epoch"] + 1,
        "source_checkpoint": outcome.best.checkpoint,
        "pretrained_path": metrics.get("inputs", {}).get("pretrained_path"),
        "validation_metrics": {k: v for k, v in outcome.best.metrics.items() if isinstance(v, (int, float))},
        "test_metrics": metrics["methods"][GENERATOR_METHOD],
        "data": {"content_hash": prepared.manifest["content_hash"], "path": str(prepared.path),
                 "image_size": prepared.manifest["image_size"], "identities": len(prepared.manifest["identities"])},
        "config": exp.to_dict(),
        "versions": package_versions(),
    }
    (best_dir / "model_card.json").write_text(json.dumps(card, indent=2))


def pareto_entries(outcome: SearchOutcome) -> list[dict[str, Any]]:
    """The Pareto-optimal trials, for the user to pick a trade-off: params, both halves of J, checkpoint."""
    return [{"trial_id": t.trial_id, "params": t.params, "epoch": t.metrics.get("epoch"),
             **{k: t.metrics.get(k) for k in (*PARETO_METRICS, OBJECTIVE)}, "checkpoint": t.checkpoint,
             "best": t.trial_id == outcome.best.trial_id} for t in outcome.front]


def write_report(output: Path, exp: ExperimentConfig, outcome: SearchOutcome, evaluation: Evaluation) -> Path:
    """report/ (metrics.json with the trials, per_image.parquet, samples, report.md and its figures), drawn by
    the same code as `epd-ray report`; in pareto mode also pareto.json, the front with its checkpoints."""
    extra = {"model": str(output / "best" / "generator.pt"), "params": outcome.best.params,
             "best_trial": outcome.best.trial_id, "search_objective": exp.search.objective,
             "trials": [asdict(t) for t in outcome.trials],
             **method_settings(exp.evaluation, evaluation.metrics["methods"])}
    if is_pareto(exp):
        front = pareto_entries(outcome)
        extra["pareto_front"] = front
        (output / PARETO_FILE).write_text(json.dumps(
            {"metrics": list(PARETO_METRICS), "split": "val", "trials": front}, indent=2, default=str))
    write_evaluation(output / REPORT_DIR, evaluation, extra)
    return build_report(output, echo=lambda *_: None)


def echo_summary(exp: ExperimentConfig, outcome: SearchOutcome, metrics: dict[str, Any], echo=print) -> None:
    echo(f"\ntrials ({'last' if is_pareto(exp) else 'best'} epoch, validation split; * on the Pareto front):")
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
    echo(f"\ntest split, independent evaluators (mu={metrics['mu']:.3f}):")
    for line in summary_lines(metrics):
        echo(line)
