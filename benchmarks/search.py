"""How fast the search runs: trials per hour and time to the first reported result of `epd-ray tune`'s search.

    python -m benchmarks.search                  # REDUCED by default (4 trials x 3 rounds, tiny pretraining): ~3 min
    python -m benchmarks.search --full           # the quick preset as `epd-ray tune` runs it: ~4.5 min of search,
                                                 # plus its pretraining unless ~/.cache/epd-ray already holds it
    python -m benchmarks.search --set search.num_samples=6 --set train.steps=60

The search is `epd_ray.tune.search.run_search` itself (Optuna TPE, ASHA, one-worker trials training in their
own reused Tune processes) on data prepared by the package and materialized once; nothing is added to the
package. Its per-trial progress lines
(printed by the search's own ProgressLine callback) are time-stamped as they come out, which gives the time
to the first reported result; trials and trial-epochs come from the search's outcome.

Reference, measured in the same process run: the plain-PyTorch GAN loop of benchmarks/ray_overhead.py for two
epochs on the same data and model, which gives what the search's trial-epochs would cost run one after
another without Ray (start-up once per trial + the steady epoch per trial-epoch); and the same loop run as
many at a time as the search runs trials (separate processes, each with a trial's threads, as Optuna alone
with n_jobs would), which gives what those trial-epochs cost at the search's concurrency on these cores.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import machine  # noqa: E402
from benchmarks.ray_overhead import parse_overrides, plain_gan, prepare, quiet  # noqa: E402
from epd_ray.config import load_config  # noqa: E402
from epd_ray.train.gan import rounds  # noqa: E402

# The quick preset's round (train.report_every = 15 steps) is one pass over its 504 training images: here a
# trial-epoch is a trial-round.
REDUCED = {"search.num_samples": 4, "train.steps": 45, "search.grace_period": 1,
           "verifiers.steps": 1, "model.warm_start_steps": 1}
RESULT_LINE = re.compile(r"trial (\S+) round (\d+)/")


class StampedOutput(io.TextIOBase):
    """Stands in for stdout: prefixes each line with the seconds since `t0` and notes when result lines came."""

    def __init__(self, target, t0: float):
        self.target, self.t0, self.buffer = target, t0, ""
        self.results: list[tuple[float, str, int]] = []

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            now = time.perf_counter() - self.t0
            match = RESULT_LINE.search(line)
            if match:
                self.results.append((now, match.group(1), int(match.group(2))))
            self.target.write(f"  [{now:7.1f} s] {line}\n")
        self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="the quick preset unchanged (12 trials x 25 epochs, ASHA): long")
    parser.add_argument("--config", default="quick", help="preset or YAML (default quick)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), on top of the reduced settings unless --full")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="data and pretrained cache (default: --full the package's ~/.cache/epd-ray, "
                             "reduced a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (Ray storage of the search)")
    args = parser.parse_args(argv)

    overrides = {**({} if args.full else REDUCED), "ray.dashboard_port": 0, **parse_overrides(args.overrides)}
    exp = load_config(args.config, overrides)
    workdir = Path(tempfile.mkdtemp(prefix="epd-bench-search-"))
    cache_dir = args.cache_dir
    if cache_dir is None and args.full:
        from epd_ray.artifacts import default_cache_dir

        cache_dir = default_cache_dir(exp.cache_dir)
    started = time.perf_counter()

    print("search: trials per hour and time to the first result of the Ray Tune search "
          "(epd_ray.tune.search.run_search)")
    if args.full:
        print(f"FULL: the {args.config} preset as `epd-ray tune` runs it")
    else:
        print(f"REDUCED (pass --full for the {args.config} preset as it is): {REDUCED} -- trials per hour here are "
              f"not the preset's: fewer, shorter trials weigh each trial's start-up more")
    print(f"config {args.config} + {overrides}: {exp.search.num_samples} trials x up to {rounds(exp.train)} rounds, "
          f"ASHA grace {min(exp.search.grace_period, rounds(exp.train))}, reduction {exp.search.reduction_factor}; "
          f"{exp.data.image_size} px, ngf {exp.model.ngf}, batch {exp.train.batch_size}, "
          f"cpus_per_worker {exp.train.cpus_per_worker}; cache {cache_dir or workdir}")
    machine.print_machine("cpu" if not exp.train.use_gpu else None)
    try:
        prep = prepare(exp, workdir, cache_dir=cache_dir, echo=quiet)
        from epd_ray.runtime import start_ray
        from epd_ray.train.gan import GanInputs
        from epd_ray.tune.search import concurrent_trials, run_search

        runtime = start_ray(exp.ray)  # already up: returns the running one
        concurrency = concurrent_trials(exp, runtime)
        print("setup, not in the figures: " + ", ".join(f"{k} {v:.1f} s" for k, v in prep.stages.items()))
        print("search output, time-stamped from the start of run_search:", flush=True)
        real_stdout = sys.stdout
        t0 = time.perf_counter()
        stamped = StampedOutput(real_stdout, t0)
        sys.stdout = stamped
        try:
            outcome = run_search(exp, train_data=prep.train_data,
                                 inputs=GanInputs.put(prep.dataset_dir, prep.pretrained_path), runtime=runtime,
                                 storage_path=str(workdir / "ray"), echo=print)
        finally:
            sys.stdout = real_stdout
        search_s = time.perf_counter() - t0
        load_after_search = machine.load_average()[0]

        print("  running the reference: plain PyTorch GAN loop, 2 epochs, same data and model; alone, then "
              f"{concurrency} side by side", flush=True)
        loop = {"dataset_dir": prep.dataset_dir, "pretrained_path": prep.pretrained_path,
                "image_size": prep.image_size, "epochs": 2}
        plain = plain_gan(exp, **loop)
        side_by_side = [plain]
        if concurrency > 1:
            with ProcessPoolExecutor(concurrency, mp_context=multiprocessing.get_context("spawn")) as pool:
                side_by_side = [f.result() for f in [pool.submit(plain_gan, exp, **loop) for _ in range(concurrency)]]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    trials = outcome.trials
    trial_epochs = sum(t.rounds for t in trials)
    stopped = sum(1 for t in trials if t.status == "ok" and t.rounds < rounds(exp.train))
    statuses = {s: sum(1 for t in trials if t.status == s) for s in sorted({t.status for t in trials})}
    first = stamped.results[0][0] if stamped.results else float("nan")
    first_per_trial = {}
    for when, trial, epoch in stamped.results:
        first_per_trial.setdefault(trial, when)
    intervals: dict[str, list[float]] = {}
    last_seen: dict[str, float] = {}
    for when, trial, epoch in stamped.results:
        if trial in last_seen:
            intervals.setdefault(trial, []).append(when - last_seen[trial])
        last_seen[trial] = when
    gaps = sorted(g for trial_gaps in intervals.values() for g in trial_gaps)
    search_epoch = gaps[len(gaps) // 2] if gaps else float("nan")
    # Slot-seconds not spent in steady epochs, per trial: start-up, shutdown, scheduling. With one epoch per
    # trial there is no report-to-report time: the plain loop's epoch stands in for it.
    epoch_for_fixed = search_epoch if gaps else plain.steady_epoch_s
    per_trial_fixed = (search_s * concurrency - trial_epochs * epoch_for_fixed) / max(1, len(trials))
    sequential = len(trials) * plain.startup_s + trial_epochs * plain.steady_epoch_s
    busy_epoch = statistics.fmean(run.steady_epoch_s for run in side_by_side)
    busy_startup = statistics.fmean(run.startup_s for run in side_by_side)
    concurrent = (len(trials) * busy_startup + trial_epochs * busy_epoch) / max(1, concurrency)

    head = f"{'':<64} {'value':>12}"
    print("\n" + head)
    print("-" * len(head))
    rows = [
        ("search wall, run_search (s)", f"{search_s:.1f}"),
        ("time to the first reported result (s)", f"{first:.1f}"),
        ("  first result of each trial, median (s)",
         f"{sorted(first_per_trial.values())[len(first_per_trial) // 2]:.1f}" if first_per_trial else "-"),
        ("trials (" + ", ".join(f"{k} {v}" for k, v in statuses.items()) + f"; {stopped} stopped by ASHA)",
         f"{len(trials)}"),
        ("trials at a time", f"{concurrency}"),
        ("trial-epochs run", f"{trial_epochs}"),
        ("trials per hour", f"{len(trials) / search_s * 3600:.1f}"),
        ("trial-epochs per hour", f"{trial_epochs / search_s * 3600:.0f}"),
        ("epoch inside the search, report-to-report median (s)", f"{search_epoch:.2f}" if gaps else "-"),
        ("  over the plain loop's steady epoch", f"{search_epoch / plain.steady_epoch_s:.2f}x" if gaps else "-"),
        ("fixed cost per trial, (wall x at-a-time - epochs) / trials (s)"
         + ("" if gaps else " [plain epoch]"), f"{per_trial_fixed:.1f}"),
        ("reference: plain loop, steady epoch (s)", f"{plain.steady_epoch_s:.2f}"),
        ("reference: plain loop, start-up per trial (s)", f"{plain.startup_s:.2f}"),
        ("reference: same trial-epochs one after another (s)", f"{sequential:.1f}"),
        ("  search wall / that", f"{search_s / sequential:.2f}x"),
        (f"reference: {concurrency} plain loops side by side, steady epoch (s)", f"{busy_epoch:.2f}"),
        (f"reference: same trial-epochs, {concurrency} plain loops at a time (s)", f"{concurrent:.1f}"),
        ("  search wall / that", f"{search_s / concurrent:.2f}x"),
    ]
    for label, value in rows:
        print(f"{label:<64} {value:>12}")
    print(f"\nbest trial {outcome.best.trial_id}: J = {outcome.best.metrics.get('objective', float('nan')):.3f} "
          f"(validation){' -- reduced settings: not a meaningful score' if not args.full else ''}")
    print(f"{machine.load_line()} (1-min load right after the search {load_after_search:.2f}); "
          f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
