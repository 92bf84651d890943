"""`epd-ray ablate RUN_DIR`: the paper's ablations of a tuned run, trained with one budget, judged one way.

GAN runs from the run's best parameters (`best/model_card.json`): `tuned` (those parameters),
`without_ssim` (Phi = 0) and `without_emotion` (lambda3 = 0: no emotion verifier in the loss, PPGAN-like), and
when the run trained with `loss.diversity` (the term epd-ray adds to the paper's loss), `without_diversity`
(diversity = 0: the paper's loss), which shows what that term buys against the parrot attack.
All share the run's budget: its resolved config (steps, batch size, learning rates, model size,
seed), its prepared data and its pretrained verifiers and generator warm start, taken from the cache
(pretrained again only if the cache lost them, by the same seeded code).

The tuned model is retrained here, not taken from `best/`: `best/` is a trial's round picked among all
trials of a search (which ASHA may have cut short), so its budget and selection are not those of the other
runs. Retrained by the same code with the same seed, the runs differ in the ablated term only.

The runs are trials of one Ray Tune experiment (a grid over the variants: no search, no early stopping),
so they run side by side as the search's trials do, and train as they do (`run_trial`); each is judged at the
round the run's search would have judged it (`summarise`: highest validation J, or the last round in pareto
mode). Evaluation is the report's: the test split, the tuned mu for all, the independent evaluators
(main figures) and the training verifiers. The results go to RUN_DIR/ablation/ (metrics.json,
per_image.parquet, samples.npz), written whole or not at all; `epd-ray report RUN_DIR` then adds the ablation
table.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ray.tune

from epd_ray.artifacts import MANIFEST, RunFolder, atomic_folder
from epd_ray.checkpoints import load_checkpoint, load_deidentifier
from epd_ray.config import SEARCHED_KEYS, ExperimentConfig, validate_section
from epd_ray.core.scoring import GeneratorMethod
from epd_ray.evaluate.evaluate import run_evaluation, summary_lines, write_evaluation
from epd_ray.evaluate.report import ABLATION_DIR, LAST_EPOCH_COLUMNS
from epd_ray.experiment import data_and_networks, fetch_checkpoint
from epd_ray.runtime import resolve_storage, start_ray, storage_filesystem
from epd_ray.train.gan import GanInputs
from epd_ray.tune.search import (budget, concurrent_trials, fit_to_cluster, is_pareto, run_trial, summarise,
                                 trains_in_trial, trial_resources, trial_run_config)

# variant -> what it changes in the tuned loss weights
VARIANTS: dict[str, dict[str, float]] = {"tuned": {}, "without_ssim": {"phi": 0.0}, "without_emotion": {"lambda3": 0.0},
                                         "without_diversity": {"diversity": 0.0}}
# The paper's Table I (emotion MSE) for the same three: EPD-Net, without SSIM, PPGAN.
PAPER_EMOTION_MSE = {"tuned": 0.0099, "without_ssim": 0.0241, "without_emotion": 0.0257}


class AblationError(ValueError):
    """A run folder that cannot be ablated; the message names it."""


@dataclass(frozen=True)
class AblationRun:
    out: Path
    metrics: dict[str, Any]
    wall_seconds: float


def read_tuned_run(run_dir: Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The run's resolved config and model card, refused before anything starts when unusable."""
    card_path = RunFolder(run_dir).card_path
    if not card_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no best/model_card.json here; ablate the folder of an `epd-ray tune` run")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise AblationError(f"{card_path}: not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise AblationError(f"{card_path}: not a model card (a JSON object expected)")
    exp = validate_section(ExperimentConfig, card.get("config") or {}, f"{card_path} config")
    missing = [k for k in SEARCHED_KEYS if k not in (card.get("params") or {})]
    if missing:
        raise AblationError(f"{card_path}: params lack {', '.join(missing)}")
    if not (card.get("data") or {}).get("content_hash"):
        raise AblationError(f"{card_path}: records no data content hash")
    if (run_dir / ABLATION_DIR).exists():
        raise AblationError(f"{run_dir / ABLATION_DIR}: holds an ablation already; remove it to run again")
    return exp, card


def variant_params(params: dict[str, float], diversity: float) -> dict[str, dict[str, float]]:
    """Each variant's loss weights and mu: the tuned ones (`params`, and the run's `loss.diversity`), one term
    off. `without_diversity` only when the run had that term on: otherwise it would repeat `tuned`."""
    tuned = {**{k: float(params[k]) for k in SEARCHED_KEYS}, "diversity": float(diversity)}
    return {name: {**tuned, **change} for name, change in VARIANTS.items()
            if diversity > 0 or name != "without_diversity"}


def train_variant(config: dict[str, Any], *, variants: dict[str, dict[str, float]], **trial_inputs: Any) -> None:
    """Tune function trainable: the search's trial, with the loss weights of one variant."""
    run_trial(variants[config["variant"]], **trial_inputs)


def run_ablation(run_dir: Path, *, address: str | None = None, echo=print) -> AblationRun:
    started = time.time()
    run_dir = Path(run_dir).resolve()
    exp, card = read_tuned_run(run_dir)
    if address:
        exp = exp.model_copy(update={"ray": exp.ray.model_copy(update={"address": address})})
    recorded = Path((card.get("data") or {}).get("path", ""))
    runtime = start_ray(exp.ray)
    storage = resolve_storage(exp.ray, RunFolder(run_dir).ray_dir)
    inputs = data_and_networks(exp, runtime=runtime, storage_path=storage, echo=echo,
                               prepared_dir=recorded if (recorded / MANIFEST).is_file() else None)
    data_hash = inputs.prepared.info.content_hash
    if data_hash != card["data"]["content_hash"]:
        raise AblationError(f"{inputs.prepared.path}: data content {data_hash} is not the run's "
                            f"({card['data']['content_hash']}); the ablation must train on the same faces")

    exp = fit_to_cluster(exp, inputs.runtime, echo)
    variants = variant_params(card["params"], exp.loss.diversity)
    echo(f"ablation: {', '.join(variants)}; {budget(exp.train)} each on "
         f"{inputs.prepared.info.images('train')} training images, seed {exp.train.seed}")
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(train_variant, variants=variants, experiment=exp.to_dict(),
                                 train_data=inputs.train_data, storage_path=storage,
                                 inputs=GanInputs.put(inputs.prepared.path, inputs.pretrained_path, exp.evaluation)),
        trial_resources(exp, inputs.runtime))
    grid = ray.tune.Tuner(
        trainable, param_space={"variant": ray.tune.grid_search(list(variants))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent_trials(exp, inputs.runtime, len(variants)),
                                        reuse_actors=trains_in_trial(exp)),
        run_config=trial_run_config(exp, f"ablation-{datetime.now():%Y%m%d-%H%M%S}", storage),
    ).fit()

    runs: dict[str, dict[str, Any]] = {}
    methods = {}
    fetched = Path(tempfile.mkdtemp(prefix="epd-ablation-"))
    for result in grid:
        name = result.config["variant"]
        trial = summarise(result, storage_filesystem(storage), last_round=is_pareto(exp))
        if trial.checkpoint is None:
            raise RuntimeError(f"ablation run {name} left no checkpoint; see {result.path}")
        local = fetch_checkpoint(storage, trial.checkpoint, fetched / f"{name}.pt")
        methods[name] = GeneratorMethod(load_deidentifier(load_checkpoint(local), trial.checkpoint),
                                        seed=exp.train.seed)
        runs[name] = {"params": variants[name], "trial_id": trial.trial_id, "status": trial.status,
                      "rounds_trained": trial.rounds, "judged_round": trial.metrics.get("round"),
                      "checkpoint": trial.checkpoint,
                      "validation": {k: trial.metrics.get(k) for k in ("objective", "privacy", "utility")},
                      "last_round_validation": {k: (result.metrics or {}).get(k)
                                                for k in ("round", *LAST_EPOCH_COLUMNS)}}
    methods = {name: methods[name] for name in variants}  # the table's order, not the finishing order
    shutil.rmtree(fetched, ignore_errors=True)

    evaluation = run_evaluation(methods, dataset_dir=inputs.prepared.path, pretrained_path=inputs.pretrained_path,
                                split="test", mu=variants["tuned"]["mu"], cfg=exp.evaluation, echo=echo)
    extra = {"run": str(run_dir), "variants": {name: runs[name] for name in variants},
             "judged_at": "last round" if is_pareto(exp) else "highest-validation-J round",
             "budget": {"steps": exp.train.steps, "report_every": exp.train.report_every,
                        "batch_size": exp.train.batch_size, "lr": exp.train.lr,
                        "seed": exp.train.seed, "data_hash": data_hash,
                        "train_images": inputs.prepared.info.images("train"),
                        "pretrained_path": str(inputs.pretrained_path)},
             "paper_emotion_mse": PAPER_EMOTION_MSE, "tune_experiment": grid.experiment_path}
    out = RunFolder(run_dir).ablation_dir
    with atomic_folder(out) as staging:
        write_evaluation(staging, evaluation, extra)
    echo(f"\ntest split, independent evaluators (mu={evaluation.metrics['mu']:.3f}):")
    for line in summary_lines(evaluation.metrics):
        echo(line)
    return AblationRun(out, evaluation.metrics, time.time() - started)
