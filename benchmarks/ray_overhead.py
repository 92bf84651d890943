"""What Ray Train costs: an epoch of EPD-Net GAN training in a TorchTrainer (one worker) against the same loop
in plain PyTorch, on the same data, in the same process run.

    python -m benchmarks.ray_overhead                       # quick preset's data and model, 6 epochs: ~1-2 min
    python -m benchmarks.ray_overhead --epochs 8
    python -m benchmarks.ray_overhead --set data.image_size=64 --set train.batch_size=16

Ray side: the real `epd_ray.tune.search.gan_trainer` (the TorchTrainer that a trial of several workers fits;
one-worker trials train in their own Tune process and skip this cost: benchmarks/search.py measures them)
on a data set made by `epd_ray.data.prepare.prepare_dataset` and materialized with `materialized_split`, with
networks from `epd_ray.train.run.pretrain_networks` at tiny settings (1 verifier epoch, 1 warm-start epoch:
speed does not depend on how well they were trained). Nothing is added to the package: the steady epoch is
measured from outside, as (wall of an N-epoch fit - wall of a 1-epoch fit) / (N - 1); what is left of the
1-epoch fit is the fixed cost (worker start-up, model load, shutdown). The controller-side report times
(a `ray.train.UserCallback`, passed through gan_trainer's `callbacks`) are printed beside it as a check,
and so are the times of the run's start and stop steps (`PhaseTimes`, on Train V2's controller and worker
group hooks, which RunConfig passes callbacks other than UserCallbacks on to): controller start, worker
group start (placement group, worker processes, their imports, the torch process group), training start,
first report (model load, the first Ray Data pass, a round), shutdown. Start-up + shutdown per trial is
fit start to training start plus last report to fit end.

Plain side: the same loop (`epd_ray.train.gan.GanRun`: networks, losses, precision, channels_last, real-pair
pool, per-round validation scoring under the main judge) with this process's torch threads, iterating the
same split held in memory (`ShardBatches.in_memory`), each round's checkpoint written to disk. Steady epoch: the
mean of epochs 2..N; start-up: building and loading the networks plus the first epoch's excess.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray.train  # noqa: E402

from benchmarks import machine  # noqa: E402
from epd_ray.checkpoints import save_checkpoint  # noqa: E402
from epd_ray.config import ExperimentConfig, load_config  # noqa: E402
from epd_ray.core.precision import resolve_precision, threads_for  # noqa: E402
from epd_ray.train.gan import GanInputs, GanRun, trial_params  # noqa: E402
from epd_ray.train.worker import (  # noqa: E402
    CHECKPOINT_FILE,
    ShardBatches,
    WorkerSetup,
    seed_everything,
    use_channels_last,
)

# Pretraining that only has to produce networks of the right shape, fast.
TINY_PRETRAINING = {"verifiers.steps": 1, "model.warm_start_steps": 1}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair}: expected KEY=VALUE, for example train.batch_size=16")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def quiet(*_args, **_kwargs) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# The plain-PyTorch loop: gan_loop without Ray (also the reference of benchmarks/search.py)
# --------------------------------------------------------------------------------------------------


@dataclass
class PlainRun:
    ready_s: float  # build, load, pools: before the first batch
    epochs_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)  # the batches of each epoch
    steps_per_epoch: int = 0
    threads: int = 1
    precision: str = "fp32"
    last_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def steady_epoch_s(self) -> float:
        rest = self.epochs_s[1:] or self.epochs_s
        return statistics.fmean(rest)

    @property
    def startup_s(self) -> float:
        return self.ready_s + max(0.0, self.epochs_s[0] - self.steady_epoch_s)


def plain_gan(exp: ExperimentConfig, *, dataset_dir: Path, pretrained_path: Path, image_size: int, epochs: int,
              params: dict[str, float] | None = None) -> PlainRun:
    """`epd_ray.train.gan.GanRun`, the loop every Ray Train worker runs, for one worker in this process: the
    split held in memory instead of a Ray Data shard, rounds of one pass, each checkpoint written to disk."""
    started = time.perf_counter()
    device = torch.device("cuda" if exp.train.use_gpu and torch.cuda.is_available() else "cpu")
    threads_before = torch.get_num_threads()
    threads = threads_for(exp.train.cpus_per_worker)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    seed_everything(exp.train.seed)
    setup = WorkerSetup(0, 1, device, resolve_precision(exp.train.precision, device),
                        use_channels_last(exp.train.channels_last, device, trains_1x1_convolutions=False))
    checkpoint_dir = Path(tempfile.mkdtemp(prefix="epd-plain-"))
    try:
        inputs = GanInputs.put(dataset_dir, pretrained_path, exp.evaluation, put=lambda value: value)
        per_pass = len(inputs.train_faces) // exp.train.batch_size
        exp = ExperimentConfig.model_validate({**exp.to_dict(), "train": {
            **exp.train.model_dump(), "steps": epochs * per_pass, "report_every": per_pass}})
        weights, mu = trial_params({"experiment": exp.to_dict(), "params": params or {}})
        gan = GanRun(exp, weights, mu, setup, inputs)
        run = PlainRun(ready_s=time.perf_counter() - started, threads=threads, precision=setup.precision,
                       steps_per_epoch=per_pass)
        mark = time.perf_counter()

        def trained(_round: int) -> None:
            run.train_s.append(time.perf_counter() - mark)

        def report(metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
            nonlocal mark
            if payload is not None:
                save_checkpoint(checkpoint_dir / CHECKPOINT_FILE, payload)
            run.last_metrics = metrics
            run.epochs_s.append(time.perf_counter() - mark)
            mark = time.perf_counter()

        batches = ShardBatches.in_memory(setup, exp.train.batch_size, inputs.train_faces)
        gan.train(batches.forever(seed=exp.train.seed * 1000), start_round=0, report=report, trained=trained)
        return run
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        torch.set_num_threads(threads_before)


# --------------------------------------------------------------------------------------------------
# The Ray side
# --------------------------------------------------------------------------------------------------


class ReportTimes(ray.train.UserCallback):
    """Appends `time.time() epoch` per report to a file (runs on the Train controller, same host)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(f"{time.time():.6f} {metrics[0].get('epoch', -1) if metrics else -1}\n")


try:  # Train V2's own execution hooks: RunConfig passes callbacks that are not UserCallbacks on to them
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
except ImportError:  # another Ray: no phase breakdown
    ControllerCallback = WorkerGroupCallback = object

# Train V2's hook -> the step of the run it marks, in order.
HOOKS = {"after_controller_start": "controller started", "before_worker_group_start": "worker group: starting",
         "after_worker_group_start": "worker group: started", "after_worker_group_training_start": "training started",
         "before_worker_group_shutdown": "worker group: shutting down",
         "after_worker_group_shutdown": "worker group: shut down"}
PHASES = tuple(HOOKS.values())


class PhaseTimes(ControllerCallback, WorkerGroupCallback):
    """Appends `time.time() phase` at each start/stop step of a Train run (controller actor, same host):
    where the fixed seconds of a run go. Measurement only: nothing of it is in the package."""

    def __init__(self, path: str):
        self.path = path

    def _mark(self, phase: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{time.time():.6f}\t{phase}\n")


def _marker(phase: str):
    def hook(self, *_args, **_kwargs) -> None:
        self._mark(phase)
    return hook


for _hook, _phase in HOOKS.items():
    setattr(PhaseTimes, _hook, _marker(_phase))


def phase_lines(started: float, wall: float, phases: list[tuple[float, str]], reports: list[float]) -> list[str]:
    """Seconds between the run's steps: fit start, the controller's and worker group's steps, the first and
    last reports, fit end (what is missing, e.g. with another Ray, is left out)."""
    marks = sorted([(started, "fit() called"), *phases, (started + wall, "fit() returned")]
                   + ([(reports[0], "first report"), (reports[-1], "last report")] if reports else []))
    return [f"  {b_name:<28} +{b - a:6.2f} s  (after {a_name})"
            for (a, a_name), (b, b_name) in zip(marks, marks[1:])]


@dataclass
class RayFit:
    epochs: int
    wall_s: float
    started: float
    report_times: list[float]
    last_metrics: dict[str, Any]
    phases: list[tuple[float, str]] = field(default_factory=list)

    @property
    def fixed_s(self) -> float:
        """Start-up (fit start to the training function's start) + shutdown (last report to fit end)."""
        marks = dict((name, t) for t, name in self.phases)
        if PHASES[3] not in marks or not self.report_times:
            return float("nan")
        return (marks[PHASES[3]] - self.started) + (self.started + self.wall_s - self.report_times[-1])

    @property
    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.report_times, self.report_times[1:])]


def ray_fit(exp: ExperimentConfig, *, epochs: int, train_images: int, train_data, inputs, storage: Path,
            name: str) -> RayFit:
    """`epochs` passes over the data, as rounds of one pass each (the plain loop's epochs)."""
    from epd_ray.tune.search import gan_trainer

    times_file = storage / f"{name}.times"
    per_pass = train_images // exp.train.batch_size
    run_exp = ExperimentConfig.model_validate({**exp.to_dict(), "train": {
        **exp.train.model_dump(), "steps": epochs * per_pass, "report_every": per_pass}})
    trainer = gan_trainer(run_exp, {}, train_data=train_data, inputs=inputs, name=name, storage_path=str(storage),
                          callbacks=[ReportTimes(str(times_file)), PhaseTimes(str(storage / f"{name}.phases"))])
    started = time.time()
    result = trainer.fit()
    wall = time.time() - started
    if result.error:
        raise RuntimeError(f"the Ray fit {name} failed: {result.error}")
    lines = times_file.read_text().split() if times_file.exists() else []
    stamps = [float(t) for t in lines[0::2]]
    phases_file = storage / f"{name}.phases"
    phases = ([(float(t), phase) for t, phase in (line.split("\t", 1) for line in phases_file.read_text().splitlines())]
              if phases_file.exists() else [])
    return RayFit(epochs, wall, started, stamps, dict(result.metrics or {}), phases)


# --------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    exp: ExperimentConfig
    dataset_dir: Path
    image_size: int
    train_images: int
    train_data: Any
    pretrained_path: Path
    stages: dict[str, float]


def prepare(exp: ExperimentConfig, workdir: Path, cache_dir: Path | None = None, echo=print) -> Prepared:
    """Ray up, the data prepared and materialized, networks pretrained: timed, and never part of a ratio."""
    from epd_ray.data.prepare import cached_dataset, prepare_dataset
    from epd_ray.data.stream import materialized_split
    from epd_ray.runtime import start_ray
    from epd_ray.train.run import pretrain_networks

    stages: dict[str, float] = {}
    t = time.perf_counter()
    runtime = start_ray(exp.ray)
    stages["ray start"] = time.perf_counter() - t
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset execution plans in the tables
    t = time.perf_counter()
    prepared = (cached_dataset(exp.data, cache_dir) if cache_dir is not None
                else prepare_dataset(exp.data, workdir / "data"))
    stages["data prepare" + (" (cached)" if prepared.reused else "")] = time.perf_counter() - t
    t = time.perf_counter()
    train_data = materialized_split(prepared.path, "train")
    stages["materialize train split"] = time.perf_counter() - t
    t = time.perf_counter()
    pretrained = pretrain_networks(exp, prepared, cache_dir=cache_dir or workdir / "cache", runtime=runtime,
                                   echo=echo)
    stages["pretraining"] = time.perf_counter() - t
    return Prepared(exp, prepared.path, prepared.manifest["image_size"],
                    prepared.manifest["splits"]["train"]["images"], train_data, pretrained, stages)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quick", help="preset or YAML (default quick: what `epd-ray tune` trains)")
    parser.add_argument("--epochs", type=int, default=6, help="N: epochs of the long fits (>= 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.batch_size=16 (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, checkpoints, Ray storage)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2")
    if __name__ != "__main__":  # imported (python -m benchmarks): ship the callback class by value
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    overrides = {**TINY_PRETRAINING, "ray.dashboard_port": 0, **parse_overrides(args.overrides)}
    exp = load_config(args.config, overrides)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="epd-bench-ray-"))

    print("ray_overhead: GAN epochs in a Ray Train TorchTrainer (1 worker) against the same loop in plain PyTorch")
    print(f"config {args.config} + {overrides}: {exp.data.image_size} px, ngf {exp.model.ngf}, ndf {exp.model.ndf}, "
          f"batch {exp.train.batch_size}, cpus_per_worker {exp.train.cpus_per_worker} "
          f"(torch threads {threads_for(exp.train.cpus_per_worker)}), precision {exp.train.precision}; "
          f"N = {args.epochs} epochs; work folder {workdir}")
    machine.print_machine("cpu" if not exp.train.use_gpu else None)
    try:
        prep = prepare(exp, workdir, echo=quiet)
        storage = workdir / "ray"
        storage.mkdir(parents=True, exist_ok=True)
        from epd_ray.train.gan import GanInputs

        common = dict(train_data=prep.train_data, inputs=GanInputs.put(prep.dataset_dir, prep.pretrained_path),
                      storage=storage, train_images=prep.train_images)
        # Interleaved, so a burst of other load does not land on one side only.
        print("  running: Ray 1-epoch fit", flush=True)
        one = ray_fit(exp, epochs=1, name="overhead-1", **common)
        print(f"  running: plain PyTorch, {args.epochs} epochs", flush=True)
        plain = plain_gan(exp, dataset_dir=prep.dataset_dir, pretrained_path=prep.pretrained_path,
                          image_size=prep.image_size, epochs=args.epochs)
        print(f"  running: Ray {args.epochs}-epoch fit", flush=True)
        many = ray_fit(exp, epochs=args.epochs, name=f"overhead-{args.epochs}", **common)
        load_end = machine.load_average()[0]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    ray_epoch = (many.wall_s - one.wall_s) / (args.epochs - 1)
    ray_fixed = one.wall_s - ray_epoch
    interval = statistics.median(many.intervals) if many.intervals else float("nan")
    first_report = (many.report_times[0] - many.started) if many.report_times else float("nan")
    after_last = (many.started + many.wall_s - many.report_times[-1]) if many.report_times else float("nan")
    plain_eval = statistics.fmean(e - t for e, t in zip(plain.epochs_s[1:], plain.train_s[1:]))
    plain_train = statistics.fmean(plain.train_s[1:])

    print("\nsetup, not in any ratio: " + ", ".join(f"{k} {v:.1f} s" for k, v in prep.stages.items())
          + f" ({prep.train_images} training images, {plain.steps_per_epoch} steps of {exp.train.batch_size} "
            f"per epoch, precision {plain.precision}, {plain.threads} torch thread(s) on both sides)")
    head = f"{'':<54} {'plain PyTorch':>14} {'Ray TorchTrainer':>17} {'Ray / plain':>12}"
    print("\n" + head)
    print("-" * len(head))
    rows = [
        ("steady epoch (s), Ray: (wall N - wall 1) / (N - 1)", plain.steady_epoch_s, ray_epoch),
        ("steady epoch (s), Ray: report-to-report median", plain.steady_epoch_s, interval),
        ("  of which batches (s)", plain_train, None),
        ("  of which validation scoring + checkpoint (s)", plain_eval, None),
        ("start-up + shutdown, fixed per run (s)", plain.startup_s, ray_fixed),
        (f"{args.epochs}-epoch run, wall (s)", plain.ready_s + sum(plain.epochs_s), many.wall_s),
        ("1-epoch run, wall (s)", plain.ready_s + plain.epochs_s[0], one.wall_s),
        ("steps per second, steady", plain.steps_per_epoch / plain.steady_epoch_s,
         plain.steps_per_epoch / ray_epoch),
    ]
    for label, a, b in rows:
        ratio = f"{b / a:>11.2f}x" if b is not None and a > 0 else f"{'':>12}"
        cell_b = f"{b:>17.2f}" if b is not None else f"{'-':>17}"
        print(f"{label:<54} {a:>14.2f} {cell_b} {ratio}")
    print(f"\nRay, controller-side report times ({args.epochs}-epoch fit): fit start to first report "
          f"{first_report:.1f} s, report-to-report median {interval:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in many.intervals)}), last report to fit end {after_last:.1f} s")
    print(f"\nwhere a Train run's fixed seconds go ({args.epochs}-epoch fit; training started = the workers' "
          f"training function called, after worker processes, imports, torch process group and dataset shards):")
    for line in phase_lines(many.started, many.wall_s, many.phases, many.report_times):
        print(line)
    print(f"start-up + shutdown per trial (fit start to training start, plus last report to fit end): "
          f"{many.fixed_s:.1f} s ({args.epochs}-epoch fit), {one.fixed_s:.1f} s (1-epoch fit); target <= 5 s; "
          f"plain PyTorch start-up {plain.startup_s:.1f} s")
    print(f"Ray's extra time per epoch: {ray_epoch - plain.steady_epoch_s:+.2f} s by the wall difference, "
          f"{interval - plain.steady_epoch_s:+.2f} s by the report times (the two fits' fixed costs differ by "
          f"a second or so between runs, which the difference divides by N - 1 = {args.epochs - 1})")
    print(f"sanity, last epoch's losses (same seeds, different shuffles: close, not necessarily equal): L_G plain "
          f"{plain.last_metrics.get('loss_total', float('nan')):.4f}, "
          f"Ray {many.last_metrics.get('loss_total', float('nan')):.4f}; "
          f"L_D plain {plain.last_metrics.get('loss_d', float('nan')):.4f}, "
          f"Ray {many.last_metrics.get('loss_d', float('nan')):.4f}")
    print(f"{machine.load_line()} (1-min load at the end of the fits {load_end:.2f}); "
          f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
