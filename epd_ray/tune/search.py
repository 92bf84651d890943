"""The search: Ray Tune with Optuna (TPE) over lambda1-3, Phi, alpha and mu.

Two objectives (`search.objective`). `composite`: maximise J, with ASHA stopping weak trials on J per
round (`train.report_every` optimiser steps); a trial counts at its best-J round. `pareto`: maximise privacy
and utility (the two halves of J, `core.metrics.judged_metrics`) together
(Optuna's multi-objective TPE); ASHA takes one metric, and stopping on J would cut exactly the trials at
the ends of the front (high utility and low privacy, or the reverse), so every trial runs all its rounds,
counts at its last round (the result Optuna is told) and keeps its latest checkpoints. The best model is
then the front's trial with the highest J.

Each trial is a Tune function trainable. A trial of one worker (`train.num_workers` 1, every CPU preset)
trains in its own process, which holds that worker's CPUs or GPU, and reports to Tune with its checkpoints
(`gan_in_trial`): a Ray Train run would add its controller and worker group, 8-9 s to start and stop per
trial on 2 cores, for nothing a single process needs. A trial of several workers builds and fits its own
Ray Train `TorchTrainer` (the Train V2 pattern), with a stable Train run name from the trial id; Train
reports reach Tune through `TuneReportCallback`, which also passes each checkpoint's path. Its driver holds
the custom `trial_driver` resource, not a CPU, so every CPU goes to the Train workers and to the data
tasks. All trials share the same prepared data and pretrained verifiers.

Faults: a failed trial is retried by Tune (`train.max_failures` times) from its latest checkpoint (a
several-worker trial's Train run, found by name, continues from its own). A search whose driver was stopped
resumes from the saved Tune state (`Tuner.restore`): finished trials are kept, unfinished and failed ones
run again under their old trial id, and so continue from their latest checkpoint too. ASHA therefore counts
rounds as the trial reports them, which survive such restarts, not Tune's training iterations, which start again from 1.
A driver stopped with Ctrl-C saves that state as it ends; one killed outright leaves the state Tune last
saved, which it does at least every second checkpoint of a trial (`kept_checkpoints` keeps two): a trial may
then train its last round or two again, and one that had just finished may run its last rounds again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs
import ray.data
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import TimeoutStopper

from epd_ray.artifacts import RunFolder
from epd_ray.config import SEARCHED_KEYS, ExperimentConfig, TrainConfig
from epd_ray.core.metrics import pareto_front
from epd_ray.data.stream import augmented
from epd_ray.runtime import (DATA_RESERVE_CPUS, RayRuntime, cpus_beside_data, data_config, sigint_guard,
                             storage_filesystem)
from epd_ray.train.gan import GanInputs, gan_in_trial, gan_loop, rounds
from epd_ray.train.worker import CHECKPOINT_FILE, DATASET

OBJECTIVE = "objective"
PARETO_METRICS = ("privacy", "utility")
SEARCH_NAME = RunFolder.SEARCH  # the Tune experiment's folder under the storage path
PAPER_POINT = {"phi": 0.25, "mu": 0.35}


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    params: dict[str, float]
    rounds: int
    metrics: dict[str, Any]  # at the trial's best round
    checkpoint: str | None  # the checkpoint file, a path on the storage path's file system
    status: str


@dataclass(frozen=True)
class SearchOutcome:
    trials: list[TrialSummary]
    best: TrialSummary
    experiment_path: str
    wall_seconds: float
    front: list[TrialSummary]  # the Pareto-optimal trials (privacy against utility), in trial order
    budget_note: str | None = None  # what a time budget cut, when it cut something


def scaling_config(exp: ExperimentConfig) -> ray.train.ScalingConfig:
    resources = None if exp.train.use_gpu else {"CPU": exp.train.cpus_per_worker}
    return ray.train.ScalingConfig(num_workers=exp.train.num_workers, use_gpu=exp.train.use_gpu,
                                   resources_per_worker=resources)


def fit_to_cluster(exp: ExperimentConfig, runtime: RayRuntime, echo=print) -> ExperimentConfig:
    """`exp` with a trial's worker holding no more CPUs than a node of this cluster has: Ray would never place
    more, and the search would wait forever (the `faces` preset's 1.5 on a 1-CPU machine). It then holds what
    the node leaves the data's reserve."""
    node = runtime.largest_node_cpus
    if exp.train.use_gpu or exp.train.cpus_per_worker <= node:
        return exp
    cpus = cpus_beside_data(node)
    echo(f"train.cpus_per_worker {exp.train.cpus_per_worker:g} is more than the largest node of this cluster has "
         f"({node:g} CPU{'' if node == 1 else 's'}): a trial's workers hold {cpus:g} each")
    return exp.model_copy(update={"train": exp.train.model_copy(update={"cpus_per_worker": cpus})})


def concurrent_trials(exp: ExperimentConfig, runtime: RayRuntime, trials: int | None = None) -> int:
    """As many of `trials` (default the search's) as the cluster's CPUs (or GPUs) hold at once, keeping CPU
    for the data tasks."""
    if exp.search.max_concurrent:
        return exp.search.max_concurrent
    if exp.train.use_gpu:
        fit = runtime.total_gpus // exp.train.num_workers
    else:
        fit = (runtime.total_cpus - DATA_RESERVE_CPUS) // (exp.train.num_workers * exp.train.cpus_per_worker)
    return int(max(1, min(fit, trials or exp.search.num_samples)))


def search_space(exp: ExperimentConfig) -> dict[str, Any]:
    """Flat keys (OptunaSearch ignores nested dicts in points_to_evaluate)."""
    return {key: ray.tune.uniform(rng.low, rng.high) for key, rng in exp.search.space.items()}


def first_points(exp: ExperimentConfig) -> list[dict[str, float]]:
    """`search.first_point`: the paper's setting (Phi = 0.25, mu = 0.35, the config's lambdas and alpha) or the
    config's loss weights and mu, clipped to the ranges; none."""
    if exp.search.first_point == "none":
        return []
    base = {**exp.loss.model_dump(), "mu": exp.evaluation.mu,
            **(PAPER_POINT if exp.search.first_point == "paper" else {})}
    return [{key: min(max(base[key], rng.low), rng.high) for key, rng in exp.search.space.items()}]


def is_pareto(exp: ExperimentConfig) -> bool:
    return exp.search.objective == "pareto"


def kept_checkpoints(exp: ExperimentConfig, kind=ray.train.CheckpointConfig):
    """The checkpoints a trial may be judged at, kept by its Train run (`kind` ray.train's) or by Tune (a
    trial training in its own process: ray.tune's): the two best by J, or in pareto mode the two latest (both
    also keep the latest, to resume from)."""
    if is_pareto(exp):
        return kind(num_to_keep=2)
    return kind(num_to_keep=2, checkpoint_score_attribute=OBJECTIVE, checkpoint_score_order="max")


def trains_in_trial(exp: ExperimentConfig) -> bool:
    """A trial of one worker trains in the trial's own process (see the module's docstring)."""
    return exp.train.num_workers == 1


def trial_resources(exp: ExperimentConfig, runtime: RayRuntime) -> dict[str, float]:
    """What a trial's process holds: its one worker's CPUs (and GPU) when it trains itself, else only the
    driver's token (`RayRuntime.trial_driver_resources`), its Train run's workers holding the rest."""
    if trains_in_trial(exp):
        return {"CPU": exp.train.cpus_per_worker, **({"GPU": 1} if exp.train.use_gpu else {})}
    return runtime.trial_driver_resources()


def gan_trainer(exp: ExperimentConfig, params: dict[str, float], *, train_data: ray.data.Dataset, inputs: GanInputs,
                name: str, storage_path: str, callbacks: list | None = None,
                max_failures: int | None = None) -> TorchTrainer:
    """A GAN training run on Ray Train: what a trial of several workers fits (a search's, `epd-ray train`'s
    one, `epd-ray ablate`'s).

    It keeps the checkpoints its trial may be judged at (`kept_checkpoints`). It restarts its workers from its
    latest checkpoint up to `max_failures` times (default `train.max_failures`) after losing some.
    """
    return TorchTrainer(
        gan_loop,
        train_loop_config={"experiment": exp.to_dict(), "params": params, "inputs": inputs},
        scaling_config=scaling_config(exp),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks, checkpoint_config=kept_checkpoints(exp),
            failure_config=ray.train.FailureConfig(
                max_failures=exp.train.max_failures if max_failures is None else max_failures),
        ),
        datasets={DATASET: augmented(train_data, flip=exp.train.flip, max_shift=exp.train.max_shift)},
        dataset_config=data_config(exp.train.num_workers),
    )


def budget(train: TrainConfig) -> str:
    """A training budget as the progress and summary lines state it."""
    return f"{train.steps} steps in {rounds(train)} rounds of {train.report_every}"


def trial_run_config(exp: ExperimentConfig, name: str, storage_path: str, *, stop=None) -> ray.tune.RunConfig:
    """What every Tuner of `run_trial` runs with (the search's, the ablation's): the progress lines, the
    checkpoints a trial training in its own process keeps (`kept_checkpoints`), and Tune's retries of a failed
    trial (`train.max_failures`, which `run_trial` leaves to Tune)."""
    return ray.tune.RunConfig(name=name, storage_path=storage_path, verbose=0, stop=stop,
                              callbacks=[ProgressLine(exp.train)],
                              checkpoint_config=kept_checkpoints(exp, ray.tune.CheckpointConfig),
                              failure_config=ray.tune.FailureConfig(max_failures=exp.train.max_failures))


def run_trial(params: dict[str, float], *, experiment: dict, train_data: ray.data.Dataset, inputs: GanInputs,
              storage_path: str) -> None:
    exp = ExperimentConfig.model_validate(experiment)
    if trains_in_trial(exp):
        gan_in_trial(exp, {"experiment": experiment, "params": params, "inputs": inputs},
                     augmented(train_data, flip=exp.train.flip, max_shift=exp.train.max_shift).iterator())
        return
    trial_id = ray.tune.get_context().get_trial_id()
    # No Train-level restarts inside a trial: when Tune stops a trial (ASHA, or at its last round) it ends the
    # trial's process (never reused for such trials: `tune_settings`), and a Train controller on its way down
    # would take its workers' deaths for a failure, start a new worker group and leave that group's placement
    # group (CPUs, GPUs) held for good. Tune retries the failed trial instead (`train.max_failures` times), and
    # the Train run resumes by name.
    trainer = gan_trainer(exp, params, train_data=train_data, inputs=inputs, name=f"train-{trial_id}",
                          storage_path=storage_path, callbacks=[TuneReportCallback()], max_failures=0)
    trainer.fit()


class TimeBudget(TimeoutStopper):
    """Tune's own time budget (the TimeoutStopper that `TuneConfig.time_budget_s` makes, same clock, same
    saved state on restore), which ends the search only once some trial has reported a round: the round that
    brings a checkpoint to judge. Without it a budget spent on a slow or busy machine before the first round
    would end the search with no model at all.

    With `finish_rounds`, only a trial's last round counts (ASHA stops a trial for a better one, which goes
    on): on a 2-core machine 1.8x slower than the one the faces preset was measured on, pretraining left the
    search 334 s, both trials stopped at step 600 of 1500 and dlib still named half of JAFFE's test faces
    (0.10 when trained through)."""

    def __init__(self, timeout: float, finish_rounds: int | None = None):
        super().__init__(timeout)
        self.finish_rounds = finish_rounds
        self.reported = False

    def __call__(self, trial_id, result):
        last = self.finish_rounds is None or result.get("round", 0) >= self.finish_rounds
        self.reported = self.reported or (OBJECTIVE in result and last)
        return False

    def stop_all(self):
        return super().stop_all() and self.reported


# Trials completed (all rounds, or stopped by ASHA) in this driver's search. Kept here, not on the callback:
# Tune pickles its callbacks with the experiment and a restored search brings back its own copies.
COMPLETED: set[str] = set()


class ProgressLine(ray.tune.Callback):
    """One line per trial per round, instead of Tune's full tables.

    Tune pickles its callbacks with the experiment state, so this holds no output function of its own.
    """

    def __init__(self, train: TrainConfig):
        self.rounds, self.steps = rounds(train), train.steps

    @staticmethod
    def echo(line: str) -> None:
        print(line, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if OBJECTIVE not in result:
            return
        done = (f"round {result.get('round', '?')}/{self.rounds} (step {result.get('step', '?')}/{self.steps})"
                f"{self.restart_note(result)}")
        self.echo(f"  trial {trial.trial_id} {done}  "
                  f"J={result[OBJECTIVE]:.3f} D={result.get('deid_rate', float('nan')):.2f} "
                  f"S={result.get('switching_deid_rate', float('nan')):.2f} "
                  f"E={result.get('emotion_preserved', float('nan')):.2f} "
                  f"SSIM={result.get('ssim', float('nan')):.2f} "
                  f"privacy={result.get('privacy', float('nan')):.2f} "
                  f"utility={result.get('utility', float('nan')):.2f}")

    @staticmethod
    def restart_note(result: dict) -> str:
        """What a result after a restart is: a round trained from a checkpoint, or a finished trial's last."""
        if result.get("replayed"):
            return " (finished before the stop)"
        first = result.get("first_round", 1)
        if first > 1 and result.get("round") == first:
            return f" (resumed from its checkpoint of round {first - 1})"
        return ""

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Tune calls this for trials that ran all their rounds or that ASHA stopped, not for those that a
        # time budget ends (TuneController stops those without it): what is not in here was cut.
        COMPLETED.add(trial.trial_id)
        self.echo(f"  trial {trial.trial_id} finished")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.echo(f"  trial {trial.trial_id} failed (see {trial.local_path}); retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.echo(f"  trial {trial.trial_id} FAILED: see {trial.local_path}")


def tune_settings(exp: ExperimentConfig, concurrency: int) -> ray.tune.TuneConfig:
    """Composite: one metric, ASHA on it (counted in rounds, so a trial resumed from a checkpoint keeps its
    rung). Pareto: the two metrics go to OptunaSearch itself (Tune's own metric/mode take one metric only,
    so they stay unset) and Tune's default FIFO scheduler runs every trial to the end. Either way a one-worker
    trial reuses a finished one's process: a new one costs ~2 s of start-up and imports on 2 cores
    (benchmarks/search.py: 7.3 -> 5.2 s of fixed cost per trial). A trial of several workers must not: when
    ASHA stops it, its process is still inside its Train run's `fit`, and a new trial given that process
    would fail to start."""
    first = first_points(exp) or None
    if is_pareto(exp):
        return ray.tune.TuneConfig(
            num_samples=exp.search.num_samples, max_concurrent_trials=concurrency,
            reuse_actors=trains_in_trial(exp),
            search_alg=OptunaSearch(metric=list(PARETO_METRICS), mode=["max"] * len(PARETO_METRICS),
                                    points_to_evaluate=first, seed=exp.search.seed))
    return ray.tune.TuneConfig(
        metric=OBJECTIVE, mode="max", num_samples=exp.search.num_samples, max_concurrent_trials=concurrency,
        reuse_actors=trains_in_trial(exp),
        search_alg=OptunaSearch(points_to_evaluate=first, seed=exp.search.seed),
        scheduler=ASHAScheduler(time_attr="round", max_t=rounds(exp.train),
                                grace_period=min(exp.search.grace_period, rounds(exp.train)),
                                reduction_factor=exp.search.reduction_factor),
    )


def fixed_params(exp: ExperimentConfig) -> dict[str, float]:
    """`epd-ray train`'s one setting: the config's loss weights (`loss.*`) and threshold (`evaluation.mu`)."""
    return {**exp.loss.model_dump(), "mu": exp.evaluation.mu}


def run_search(exp: ExperimentConfig, *, train_data: ray.data.Dataset, inputs: GanInputs, runtime: RayRuntime,
               storage_path: str, resume: bool = False, fixed: dict[str, float] | None = None,
               time_budget_s: float | None = None, echo=print) -> SearchOutcome:
    """Run the search, or with `resume` continue the one saved under `storage_path` (a new one if none is).

    With `fixed` params there is no search: one trial trains that setting for every round (`epd-ray train`),
    through the same trainable, checkpoints, progress lines, resume and summary as a search's trials.
    With `time_budget_s`, Tune ends a new search after that many seconds, or at the first reported round if
    none came by then (with `search.finish_one_trial`, a first trial's last round; `TimeBudget`; a restored
    search keeps the budget left when it was saved): no trial starts after it, running ones stop, and the
    best is picked among the rounds reported by then.
    """
    started = time.time()
    exp = fit_to_cluster(exp, runtime, echo)
    waits_for = rounds(exp.train) if exp.search.finish_one_trial else None
    concurrency = 1 if fixed else concurrent_trials(exp, runtime)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, experiment=exp.to_dict(), train_data=train_data, inputs=inputs,
                                 storage_path=storage_path),
        trial_resources(exp, runtime),
    )
    saved = f"{storage_path}/{SEARCH_NAME}"
    if resume and ray.tune.Tuner.can_restore(saved):
        echo(f"search: resuming {saved}: finished trials kept, the others continue from their checkpoints")
        tuner = ray.tune.Tuner.restore(saved, trainable, resume_unfinished=True, restart_errored=True)
    else:
        if fixed:
            echo(f"train: one setting, {budget(exp.train)}: "
                 + ", ".join(f"{k}={v:.3g}" for k, v in fixed.items()))
        else:
            stopping = ("no early stopping (pareto: privacy and utility)" if is_pareto(exp)
                        else f"ASHA grace {exp.search.grace_period}")
            echo(f"search: {exp.search.num_samples} trials, {concurrency} at a time, "
                 f"{budget(exp.train)} each, {stopping}"
                 + (f", ends within {time_budget_s:.0f} s" if time_budget_s else "")
                 + (" or when a first trial has trained all its steps, if later"
                    if time_budget_s and waits_for else ""))
        tuner = ray.tune.Tuner(
            trainable,
            param_space=dict(fixed) if fixed else search_space(exp),
            tune_config=ray.tune.TuneConfig(num_samples=1) if fixed else tune_settings(exp, concurrency),
            run_config=trial_run_config(exp, SEARCH_NAME, storage_path,
                                        stop=TimeBudget(time_budget_s, waits_for) if time_budget_s else None),
        )
    COMPLETED.clear()
    searching = time.time()
    with sigint_guard():
        grid = tuner.fit()
    filesystem = storage_filesystem(storage_path)
    trials = [summarise(result, filesystem, last_round=is_pareto(exp)) for result in grid]
    searched = time.time() - searching
    trials, note = budget_cuts(trials, 1 if fixed else exp.search.num_samples, rounds(exp.train), time_budget_s,
                               searched, finish_one_trial=exp.search.finish_one_trial)
    scored = [t for t in trials if t.checkpoint is not None]
    if not scored:
        raise RuntimeError(f"no trial produced a checkpoint; see {grid.experiment_path}"
                           + (f" ({note}: give a larger --time-budget)" if note else ""))
    front = pareto_trials(scored)
    best = max(front if is_pareto(exp) else scored, key=lambda t: t.metrics.get(OBJECTIVE, -math.inf))
    return SearchOutcome(trials, best, grid.experiment_path, time.time() - started, front, note)


def budget_cuts(trials: list[TrialSummary], planned: int, max_rounds: int, time_budget_s: float | None,
                searched: float, *, finish_one_trial: bool = False) -> tuple[list[TrialSummary], str | None]:
    """Trials a time budget stopped marked 'budget' (or 'not started', created but cut before a round), and a
    line saying what it cut (None if nothing).

    Stopped: reported some rounds, not all, and neither finished nor stopped by ASHA (`COMPLETED`) nor
    failed. Not started: the planned trials with no reported round (never created, or cut before one)."""
    if not time_budget_s or searched < time_budget_s:
        return trials, None
    marked = [replace(t, status="budget") if (t.status == "ok" and 0 < t.rounds < max_rounds
                                              and t.trial_id not in COMPLETED)
              else replace(t, status="not started") if (t.status == "ok" and t.rounds == 0) else t for t in trials]
    stopped = sum(t.status == "budget" for t in marked)
    not_started = planned - sum(t.rounds > 0 or t.status == "error" for t in marked)
    if not stopped and not not_started:
        return marked, None
    waited = "a first trial's last round" if finish_one_trial else "a first reported round"
    return marked, (f"time budget: the search ended after {searched:.0f} s (its budget {time_budget_s:.0f} s; "
                    f"it waits past it for {waited}): {stopped} trial(s) stopped "
                    f"early (status 'budget', judged at their reported rounds), {not_started} of {planned} "
                    f"not started")


def pareto_trials(trials: list[TrialSummary]) -> list[TrialSummary]:
    """The trials whose (privacy, utility) no other trial beats in both."""
    points = [tuple(float(t.metrics.get(k, 0.0)) for k in PARETO_METRICS) for t in trials]
    return [t for t, optimal in zip(trials, pareto_front(points)) if optimal]


def summarise(result: ray.tune.Result, filesystem: pyarrow.fs.FileSystem, *, last_round: bool = False) -> TrialSummary:
    """A trial at the round it is judged at: its highest-J round, or with `last_round` its last one (what a
    multi-objective Optuna is told); where that round's checkpoint is gone, the next in that order that kept one."""
    frame: pd.DataFrame | None = result.metrics_dataframe
    params = {k: float(v) for k, v in (result.config or {}).items() if k in SEARCHED_KEYS}
    trial_id = str((result.metrics or {}).get("trial_id", Path(result.path).name))
    status = "error" if result.error else "ok"
    if frame is None or OBJECTIVE not in frame or frame.empty:
        return TrialSummary(trial_id, params, 0, {}, None, status)
    if "checkpoint_path" not in frame and "checkpoint_dir_name" in frame:  # kept by Tune: in the trial's folder
        # A trial restored from an older checkpoint than it had reached numbers its folders from there again:
        # a folder holds what the last row naming it reported, and earlier rows naming it are stale.
        named = frame["checkpoint_dir_name"].notna()
        frame = frame[~(named & frame.duplicated("checkpoint_dir_name", keep="last"))]
        frame = frame.assign(checkpoint_path=[f"{result.path}/{name}" if isinstance(name, str) else None
                                              for name in frame["checkpoint_dir_name"]])
    frame = frame.sort_values("round" if last_round else OBJECTIVE, ascending=False, kind="stable")
    row, checkpoint = frame.iloc[0], None
    if "checkpoint_path" in frame:
        for _, candidate in frame.iterrows():
            path = candidate.get("checkpoint_path")
            if isinstance(path, str) and filesystem.get_file_info(f"{path}/{CHECKPOINT_FILE}").is_file:
                row, checkpoint = candidate, f"{path}/{CHECKPOINT_FILE}"
                break
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    if bool(metrics.get("diverged")):
        status = "diverged"
    return TrialSummary(trial_id, params, int(frame["round"].max()), metrics, checkpoint, status)
