"""The command line as a user meets it: clear one-line errors with exit code 2, and the whole pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epd_ray.checkpoints import load_network
from epd_ray.cli import app
from epd_ray.evaluate.report import FIGURES

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"objective", "deid_rate", "switching_deid_rate", "genuine_acceptance", "emotion_preserved",
               "emotion_mse", "ssim", "cmc_misclassification"}


@pytest.mark.parametrize("args, named", [
    (["--config", "no-such-preset"], "no-such-preset"),
    (["--set", "train.epoch=3"], "train.epoch"),
    (["--set", "loss.lambda1=1.5"], "loss.lambda1"),
    (["--set", "loss.alpha=0"], "loss.alpha"),
    (["--set", "loss.alpha=1.5"], "loss.alpha"),
    (["--set", "search.space.alpha={low: 0.5, high: 2.0}"], "search.space"),
    (["--set", "nonsense"], "KEY=VALUE"),
    (["--set", "train.max_failures=-2"], "train.max_failures"),
    (["--data", "/no/such/prepared/folder"], "/no/such/prepared/folder"),
    (["--set", "data.source=folder"], "data.path"),
    (["--set", "data.source=folder", "--set", "data.path=/no/such/faces"], "/no/such/faces"),
    (["--set", "data.source=rafd", "--set", "data.path=/tmp", "--set", "data.rafd_angles=['091']"], "rafd_angles"),
    (["--set", "verifiers.emotion_data=/no/such/fer"], "/no/such/fer"),
])
def test_bad_input_is_one_line_naming_the_field_exit_2_nothing_written(tmp_path, args, named):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["tune", "--output", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("args, named", [
    (["--emotion-data", "/no/such/fer"], "/no/such/fer"),
    (["--data", "/no/such/prepared"], "/no/such/prepared"),
    (["--set", "data.source=manifest", "--set", "data.path=/no/such/labels.csv"], "/no/such/labels.csv"),
])
def test_pretrain_bad_input_is_one_line_exit_2(args, named):
    result = CliRunner().invoke(app, ["pretrain", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0]


def test_an_output_folder_holding_something_else_is_refused_untouched(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "experiment.json").write_text(json.dumps({"config_digest": "0123456789abcdef"}))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    for folder, says in ((other, "holds another experiment"), (stranger, "not empty")):
        before = sorted(p.name for p in folder.iterdir())
        result = CliRunner().invoke(app, ["tune", "--config", "smoke", "--output", str(folder)])
        assert result.exit_code == 2 and says in result.stderr and str(folder) in result.stderr
        assert sorted(p.name for p in folder.iterdir()) == before


def test_resume_needs_a_stopped_run_folder_and_nothing_else(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, says in ((["--resume", str(empty)], "not an epd-ray run folder"),
                       (["--resume", str(empty), "--set", "train.steps=3"], "give only --address")):
        result = CliRunner().invoke(app, ["tune", *args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], lines
    assert not any(empty.iterdir())


def _epd_ray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "epd_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_tune_smoke_end_to_end(tmp_path):
    """`epd-ray tune --config tune_configs/smoke.yaml` in a temp dir, as a newcomer would run it."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    run = _epd_ray("tune", "--config", str(REPO / "tune_configs" / "smoke.yaml"), "--output", str(out),
                   "--set", f"cache_dir={cache}", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "dashboard http://127.0.0.1:" in run.stdout

    card = json.loads((out / "best" / "model_card.json").read_text())
    assert {"config", "params", "test_metrics", "data", "versions"} <= set(card)
    assert card["data"]["content_hash"] and card["versions"]["ray"].startswith("2.60")
    assert set(card["params"]) == {"lambda1", "lambda2", "lambda3", "phi", "alpha", "mu"}
    generator = load_network(out / "best" / "generator.pt", "generator")
    assert generator.config["image_size"] == 32
    assert (out / "config.yaml").is_file()
    # Each trial trained in its own process; Tune kept its two best rounds by J and its latest (smoke: up to 8).
    trials = [d for d in (out / "ray" / "search").iterdir() if d.is_dir()]
    assert trials and all(1 <= len(list(d.glob("checkpoint_*/checkpoint.pt"))) <= 3 for d in trials)
    assert not list((out / "ray").glob("train-*"))  # no Ray Train run for one-worker trials

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert set(metrics["methods"]) == {"epd-net", "no_change", "blur", "pixelate", "ksame"}
    for judged in metrics["methods"].values():
        for judge in ("evaluators", "verifiers"):
            assert METRIC_KEYS <= set(judged[judge])
            assert len(judged[judge]["cmc_misclassification"]) == 5
            assert 0.0 <= judged[judge]["objective"] <= 1.0
    # With no change at all, the evaluators still recognise people: no privacy can be claimed, by any judge.
    unchanged = metrics["methods"]["no_change"]["evaluators"]
    assert unchanged["ssim"] == pytest.approx(1.0) and unchanged["emotion_mse"] == pytest.approx(0.0)
    assert set(metrics["methods"]["no_change"]) == {"evaluators", "verifiers", "parrot", "denoised"}
    assert all(j["privacy"] == 0.0 and j["objective"] == 0.0 for j in metrics["methods"]["no_change"].values())
    # Whether the model beats the baselines is said on the card and in the output, whichever way it went.
    assert card["main_judge"] == metrics["main_judge"] == "evaluators"
    assert card["beats_baselines"] == card["verdict"]["beats_baselines"] == metrics["verdict"]["beats_baselines"]
    said = "verdict: the model beats every baseline" if card["beats_baselines"] else "warning: the model does NOT beat"
    assert said in run.stdout
    # So is whether it meets the targets (it need not, on a smoke run): a miss is among the last lines.
    assert card["targets"] == metrics["targets"] and card["targets"]["judge"] == "evaluators"
    met = card["targets"]["privacy_met"] and card["targets"]["expression_met"]
    last_lines = run.stdout.split("wall time:")[-1]
    assert ("targets: met:" in run.stdout) if met else ("warning: targets missed:" in last_lines)
    exported = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "model")])
    assert exported.exit_code == 0 and "its test evaluation: " in exported.stdout  # whoever ships it is told
    # ... and whoever deploys it, from the model folder alone, with what pretraining's networks read
    readme = (tmp_path / "model" / "README.md").read_text()
    assert said in readme
    assert f"faces: SSIM {metrics['methods']['epd-net']['evaluators']['ssim']:.2f} to the unchanged face (" in readme
    assert card["pretrained_scores"]["emotion_evaluator"] > 0.0
    report = (out / "report" / "report.md").read_text()
    assert "independent evaluators" in report and "epd-net" in report and "targets" in report
    assert all((out / "report" / name).stat().st_size > 0 for name in FIGURES.values())

    # The same output again is refused (a new output reuses the cache: see the `epd-ray train` test).
    again = CliRunner().invoke(app, ["tune", "--config", "smoke", "--output", str(out), "--set", f"cache_dir={cache}"])
    assert again.exit_code == 2 and "holds this experiment" in again.stderr


def test_train_fits_one_setting_for_every_round_and_saves_it_as_tune_does(ray_runtime, tiny_tune_args, tmp_path):
    """`epd-ray train`: the config's loss weights and mu, no search and no early stopping; best/ and report/
    as `tune` leaves them. It joins the test session's cluster with `--address` (token authentication on,
    as Ray 2.59+ starts it), as `tune` does."""
    import ray

    from epd_ray.checkpoints import load_checkpoint
    from epd_ray.config import SEARCHED_KEYS, LossConfig

    out = tmp_path / "out"
    run = _epd_ray("train", *tiny_tune_args[1:], "--address", ray.get_runtime_context().gcs_address,
                   "--output", str(out), "--set", "loss.lambda2=0.5", "--set", "evaluation.mu=0.2",
                   "--set", "loss.diversity=0.5", "--set", "train.steps=9", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert ray_runtime.dashboard_url in run.stdout  # the session cluster's dashboard, not a new one
    assert "train: one setting, 9 steps in 3 rounds of 3" in run.stdout and "search:" not in run.stdout
    assert "data: reusing" in run.stdout and "pretrained networks: reusing" in run.stdout  # the session's cache

    card = json.loads((out / "best" / "model_card.json").read_text())
    searched = {k: v for k, v in LossConfig().model_dump().items() if k in SEARCHED_KEYS}
    assert card["params"] == pytest.approx({**searched, "lambda2": 0.5, "mu": 0.2})
    assert load_checkpoint(out / "best" / "checkpoint.pt")["experiment"]["loss"]["diversity"] == 0.5
    assert card["chosen_by"].startswith("one setting (`epd-ray train`)")
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["mu"] == pytest.approx(0.2)
    assert [t["rounds"] for t in metrics["trials"]] == [3]  # every round: no ASHA
    assert json.loads((out / "experiment.json").read_text())["kind"] == "epd-ray train"


@pytest.mark.slow  # 40 s; the budget's stopper and its summary are checked in test_config
def test_a_time_budget_ends_the_search_early_and_still_leaves_a_best_model_and_report(ray_runtime, tiny_tune_args,
                                                                                       tmp_path):
    """`--time-budget`: Tune's time budget (TimeBudget) ends a search that could not finish in it (8 trials of 200
    rounds, one at a time); the best reported round still becomes best/ and report/, and the summary says
    what the budget cut."""
    import ray

    out = tmp_path / "out"  # 200 rounds a trial: none can finish within the budget, however idle the machine
    started = time.monotonic()
    run = _epd_ray(*tiny_tune_args, "--address", ray.get_runtime_context().gcs_address, "--output", str(out),
                   "--time-budget", "40s", "--set", "search.num_samples=8", "--set", "search.max_concurrent=1",
                   "--set", "train.steps=600", "--set", "search.grace_period=200", cwd=tmp_path)
    wall = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "time budget: " in run.stdout and "spent before the search" in run.stdout
    note = next(line for line in run.stdout.splitlines() if line.startswith("time budget: the search ended"))
    assert "not started" in note and not note.endswith(" 0 of 8 not started")
    assert (out / "best" / "model_card.json").is_file() and (out / "report" / "metrics.json").is_file()
    trials = json.loads((out / "report" / "metrics.json").read_text())["trials"]
    assert all(t["rounds"] < 200 for t in trials) and any(t["status"] == "budget" for t in trials)
    assert wall < 40 + 120  # the budget, plus a first round past it and the evaluation on a busy machine
