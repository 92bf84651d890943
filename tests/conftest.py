"""Shared fixtures. Ray is started once per test session (never `ray stop`: it would kill every Ray on
the host), on its own temp dir, exactly as the CLI starts it."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_runtime():
    from epd_ray.config import RayConfig
    from epd_ray.runtime import start_ray

    runtime = start_ray(RayConfig(num_cpus=2, dashboard_port=0))
    yield runtime
    import ray

    ray.shutdown()


# 28 training images: 2 verifier steps (batches of 16) for each network, a second emotion verifier, one
# expression picker and the new-people probe among them, 2 warm-start steps, and 6 GAN steps (batches of 8) in
# 2 rounds of 3.
TINY = {"data.num_identities": 4, "data.variations": 3, "verifiers.steps": 2, "verifiers.pickers": 1,
        "verifiers.emotion_verifiers": 2, "verifiers.new_people_probe": True, "model.warm_start_steps": 2,
        "train.steps": 6, "train.report_every": 3, "train.batch_size": 8}


@pytest.fixture(scope="session")
def tiny_experiment():
    """The smoke preset shrunk further: real networks and real steps, seconds per stage."""
    from epd_ray.config import load_config

    return load_config("smoke", TINY)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_experiment):
    from epd_ray.data.prepare import prepare_dataset

    return prepare_dataset(tiny_experiment.data, tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def tiny_pretraining(tmp_path_factory, ray_runtime, tiny_experiment, tiny_data) -> tuple[Path, list[tuple[float, str]]]:
    """The tiny experiment's pretrained networks, and what pretraining said (monotonic time, line)."""
    from epd_ray.train.run import pretrain_networks

    root = tmp_path_factory.mktemp("verifiers")
    said: list[tuple[float, str]] = []
    path = pretrain_networks(tiny_experiment, tiny_data, cache_dir=root / "cache", runtime=ray_runtime,
                             echo=lambda line: said.append((time.monotonic(), line)))
    return path, said


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_pretraining) -> Path:
    return tiny_pretraining[0]


@pytest.fixture(scope="session")
def tiny_tune_args(tiny_data, tiny_pretrained) -> list[str]:
    """`epd-ray tune` arguments for the tiny experiment that reuse the session's data and pretrained networks."""
    cache_dir = tiny_pretrained.parents[2]  # <cache>/pretrained/<key>/pretrained.pt
    # dashboard on a free port: another Ray on the host (a second test run) may hold the default 8265
    overrides = [f"{key}={value}" for key, value in {**TINY, "cache_dir": cache_dir, "ray.dashboard_port": 0}.items()]
    return ["tune", "--config", "smoke", "--data", str(tiny_data.path), *[a for o in overrides for a in ("--set", o)]]


class CliRun:
    """`python -m epd_ray ARGS` in a session of its own (as a terminal runs a command), read line by line.

    stderr goes to a file, so that Ray's warnings can never fill a pipe and stall the command.
    """

    def __init__(self, args: list[str], cwd: Path):
        self.stderr_path = cwd / f"stderr-{time.monotonic_ns()}.txt"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "epd_ray", *args], cwd=cwd, text=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                         stderr=stderr, start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, predicate, timeout: float) -> str:
        """The first new stdout line for which `predicate` holds; fails if the command ends first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"no such line within {timeout} s; output so far:\n" + "\n".join(self.lines[-40:]))
            if line is None:
                pytest.fail(f"the command ended (rc {self.proc.wait()}) first:\n" + "\n".join(self.lines[-40:])
                            + "\n" + self.stderr[-3000:])
            self.lines.append(line)
            if predicate(line):
                return line

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the command did not end in time:\n" + "\n".join(self.lines[-40:]))
        while (line := self._queue.get()) is not None:
            self.lines.append(line)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


def processes_working_in(folder: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")) == folder:
                pids.append(int(proc.name))
        except OSError:  # ended while we looked, or not ours to read
            continue
    return pids


@pytest.fixture
def epd_ray_cli(tmp_path):
    """Start `epd-ray` commands in the background, in `tmp_path`. At the end of the test every process still
    working there is killed: commands still running, and what a command killed with SIGKILL leaves of its
    local Ray (its dashboard and runtime-env agents outlive their raylet)."""
    runs: list[CliRun] = []

    def start(*args: str) -> CliRun:
        runs.append(CliRun(list(args), tmp_path))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()
    for pid in processes_working_in(tmp_path):
        os.kill(pid, 9)
