"""A search (or pretraining) stopped part-way, through the command line as a user stops it: Ctrl-C, or the
driver killed.

Each test runs `epd-ray tune` in a subprocess on the tiny experiment (the session's data and pretrained
networks reused, the session's Ray cluster joined), stops it once a trial has reported, and checks what
`epd-ray tune --resume OUTPUT` needs: the Tune state and each trial's checkpoints, then the resumed run itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

EPOCH_LINE = re.compile(r"trial (\S+) round (\d+)/\d+ \(step \d+/\d+\)"
                        r"( \(resumed from its checkpoint of round (\d+)\)| \(finished before the stop\))?")
FINISHED_LINE = re.compile(r"trial (\S+) finished")
PROGRESS_LINE = re.compile(r"^\s+\w+\s+step \d+/\d+ ")


@pytest.fixture
def session_address(ray_runtime) -> str:
    """The test session's cluster, which the stopped and the resumed driver join (as drivers on a cluster do):
    a killed driver takes its trials down with it, the cluster and what it stored stay."""
    import ray

    return ray.get_runtime_context().gcs_address


def trial_checkpoints(output: Path, trial_id: str) -> list[Path]:
    """A one-worker trial's checkpoints, kept by Tune in the trial's folder of the search."""
    return sorted((output / "ray" / "search").glob(f"*_{trial_id}_*/checkpoint_*/checkpoint.pt"))


def test_ctrl_c_stops_cleanly_with_one_line_on_how_to_resume(session_address, tiny_tune_args, epd_ray_cli, tmp_path):
    import ray.tune

    out = tmp_path / "out"
    run = epd_ray_cli(*tiny_tune_args, "--address", session_address, "--output", str(out),
                      "--set", "search.num_samples=1", "--set", "train.steps=12")
    trial_id = EPOCH_LINE.search(run.wait_for(EPOCH_LINE.search, timeout=300)).group(1)
    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    rc = run.finish(timeout=120)

    assert rc == 130, run.stdout[-2000:] + run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and last.endswith(
        f"resume with: epd-ray tune --resume {out} --address {session_address}"), last
    assert ray.tune.Tuner.can_restore(str(out / "ray" / "search"))
    assert trial_checkpoints(out, trial_id), "the trial that reported has no checkpoint"
    assert not (out / "best").exists()


@pytest.mark.slow  # 40 s, its own local Ray (`pretrain` joins none); what it keeps: test_pretraining's interrupted run
def test_ctrl_c_in_pretraining_stops_it_with_one_line_on_going_on(tiny_data, epd_ray_cli, tmp_path):
    """Pretraining a real set takes many minutes and users stop it: the shell's status for Ctrl-C and one line
    on what was kept and how to go on. Here pretraining runs its own local Ray, as a user's does."""
    cache = tmp_path / "cache"
    run = epd_ray_cli("pretrain", "--config", "smoke", "--data", str(tiny_data.path), "--set", f"cache_dir={cache}",
                      "--set", "verifiers.steps=1000", "--set", "ray.dashboard_port=0")
    run.wait_for(PROGRESS_LINE.search, timeout=300)
    os.killpg(run.proc.pid, signal.SIGINT)
    rc = run.finish(timeout=120)

    assert rc == 130, run.stdout[-2000:] + run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and "the same command trains only the others" in last, last
    assert not list(cache.glob("pretrained/*/pretrained.pt")), "an interrupted pretraining left a complete entry"


def epoch_lines(lines: list[str]) -> list[tuple[str, int, str]]:
    """(trial, epoch, the note after a restart: '', 'resumed from ... round N' or 'finished before the stop')."""
    matches = [m for m in map(EPOCH_LINE.search, lines) if m]
    return [(m.group(1), int(m.group(2)), (m.group(3) or "").strip(" ()")) for m in matches]


@pytest.mark.slow  # 60 s; the Ctrl-C test above resumes a stopped search in the suite
def test_a_search_killed_with_sigkill_resumes_keeping_finished_trials(session_address, tiny_tune_args, epd_ray_cli,
                                                                     tmp_path):
    out = tmp_path / "out"
    args = [*tiny_tune_args, "--address", session_address, "--output", str(out), "--set", "search.num_samples=3",
            "--set", "train.steps=9", "--set", "search.grace_period=3"]  # no early stopping: 3 rounds each
    run = epd_ray_cli(*args)
    done = FINISHED_LINE.search(run.wait_for(FINISHED_LINE.search, timeout=600)).group(1)
    run.proc.send_signal(signal.SIGKILL)
    run.finish(timeout=60)
    before: dict[str, int] = {}
    for trial_id, epoch, _ in epoch_lines(run.lines):
        before[trial_id] = max(epoch, before.get(trial_id, 0))
    assert before[done] == 3

    again = epd_ray_cli("tune", "--resume", str(out), "--address", session_address)
    assert again.finish(timeout=600) == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "search: resuming" in again.stdout
    resumed = epoch_lines(again.lines)
    print(f"SIGKILL after trial {done} finished; epochs reported before: {before}; after --resume: {resumed}")
    # Every trial continues from a checkpoint the killed driver's saved state knew: it trains again at most the
    # two rounds since Tune last saved that state (at every second checkpoint of a trial), the one in flight
    # lost too; the finished trial likewise, unless its result is replayed as it was.
    for trial_id, last_reported in before.items():
        rows = [(epoch, note) for t, epoch, note in resumed if t == trial_id]
        if rows and rows[0][1] != "finished before the stop":
            first_epoch, note = rows[0]
            assert note == (f"resumed from its checkpoint of round {first_epoch - 1}" if first_epoch > 1 else ""), \
                (trial_id, rows)
            assert last_reported - 1 <= first_epoch <= last_reported + 2, (trial_id, last_reported, rows)
            assert rows[-1][0] == 3, (trial_id, rows)  # and runs to its end
    trials = json.loads((out / "report" / "metrics.json").read_text())["trials"]
    assert len(trials) == 3 and all(t["status"] == "ok" for t in trials), trials
    assert json.loads((out / "best" / "model_card.json").read_text())["trial"] in {t["trial_id"] for t in trials}


def test_a_restored_trials_reused_checkpoint_folders_are_judged_by_what_they_hold_now(tmp_path):
    """A trial restored from an older checkpoint than it had reached numbers its folders from there again
    (Tune's saved state lagged the killed driver): checkpoint_000001 held round 2 at J 0.9, then round 2 again
    at J 0.3. The trial is judged at round 1 (J 0.5), whose folder still holds it, never at the stale J 0.9."""
    import pandas as pd
    import pyarrow.fs
    import ray.tune

    from epd_ray.tune.search import summarise

    for name in ("checkpoint_000000", "checkpoint_000001"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(b"weights")
    frame = pd.DataFrame({"round": [1, 2, 2], "objective": [0.5, 0.9, 0.3], "trial_id": "t1",
                          "checkpoint_dir_name": ["checkpoint_000000", "checkpoint_000001", "checkpoint_000001"]})
    result = ray.tune.Result(metrics=frame.iloc[-1].to_dict(), checkpoint=None, error=None, path=str(tmp_path),
                             metrics_dataframe=frame)
    trial = summarise(result, pyarrow.fs.LocalFileSystem())
    assert trial.metrics["objective"] == 0.5 and trial.metrics["round"] == 1
    assert trial.checkpoint == f"{tmp_path}/checkpoint_000000/checkpoint.pt"
    assert trial.rounds == 2
