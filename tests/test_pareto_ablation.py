"""A tiny tune in pareto mode (real Ray Tune, 2 trials x 2 rounds), then `epd-ray ablate` on it
(four real GAN runs: the tune trains with `loss.diversity`) and `epd-ray report` with the ablation table."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from epd_ray.checkpoints import load_checkpoint
from epd_ray.cli import app
from epd_ray.config import SEARCHED_KEYS
from epd_ray.evaluate.report import FIGURES

ROUNDS = 2  # the tiny experiment's 6 steps in rounds of 3
DIVERSITY = 0.5
VARIANTS = ["tuned", "without_ssim", "without_emotion", "without_diversity"]


@pytest.fixture(scope="module")
def pareto_run(ray_runtime, tiny_experiment, tiny_data, tiny_pretrained, tmp_path_factory):
    from epd_ray.experiment import run_tune

    exp = tiny_experiment.model_copy(update={
        "cache_dir": str(tiny_pretrained.parents[2]),  # the fixture's cache: verifiers are reused, not retrained
        # half a CPU per Train worker: both trials, then all four ablation runs, at once on 2 cores
        "train": tiny_experiment.train.model_copy(update={"cpus_per_worker": 0.5}),
        "loss": tiny_experiment.loss.model_copy(update={"diversity": DIVERSITY}),
        "search": tiny_experiment.search.model_copy(update={"objective": "pareto", "num_samples": 2})})
    said: list[str] = []
    run = run_tune(exp, tmp_path_factory.mktemp("pareto") / "run", prepared_dir=tiny_data.path, echo=said.append)
    return run.output, exp, said


@pytest.fixture(scope="module")
def ablated(pareto_run):
    from epd_ray.ablation import run_ablation

    output, exp, _ = pareto_run
    said: list[str] = []
    run = run_ablation(output, echo=said.append)
    return output, exp, run, said


def dominated(p: tuple[float, float], points: list[tuple[float, float]]) -> bool:
    return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)


def test_pareto_search_runs_every_trial_to_the_end_and_lists_the_front(pareto_run):
    output, exp, said = pareto_run
    assert any("no early stopping" in line for line in said)
    metrics = json.loads((output / "report" / "metrics.json").read_text())
    trials = metrics["trials"]
    assert len(trials) == 2 and metrics["search_objective"] == "pareto"
    for t in trials:  # no ASHA: both ran every round, and each counts at its last round (what Optuna was told)
        assert t["rounds"] == ROUNDS and t["metrics"]["round"] == ROUNDS, t

    pareto = json.loads((output / "pareto.json").read_text())
    assert pareto["metrics"] == ["privacy", "utility"]
    points = {t["trial_id"]: (t["metrics"]["privacy"], t["metrics"]["utility"]) for t in trials}
    expected = {tid for tid, p in points.items() if not dominated(p, list(points.values()))}
    front = pareto["trials"]
    assert {t["trial_id"] for t in front} == expected and expected
    for t in front:
        assert set(t["params"]) == set(SEARCHED_KEYS)
        assert (t["privacy"], t["utility"]) == points[t["trial_id"]]
        payload = load_checkpoint(Path(t["checkpoint"]))  # a usable checkpoint of that trial at that round
        assert payload["round"] + 1 == t["round"] == ROUNDS
        assert payload["params"] == pytest.approx(t["params"])
    assert metrics["pareto_front"] == front

    best = max(front, key=lambda t: t["objective"])
    card = json.loads((output / "best" / "model_card.json").read_text())
    assert card["trial"] == best["trial_id"] and [t["trial_id"] for t in front if t["best"]] == [best["trial_id"]]
    assert "Pareto" in card["chosen_by"]

    text = (output / "report" / "report.md").read_text()
    assert "## Pareto-optimal trials" in text
    for t in front:
        assert f"{t['privacy']:.4f} | {t['utility']:.4f} | {t['objective']:.4f}" in text


def test_tune_report_holds_every_baseline_and_figure(pareto_run):
    """What `epd-ray tune` writes is the full report: k-Same included, every figure drawn, numbers from
    metrics.json, so that `epd-ray report` right after it has nothing left to evaluate."""
    output, _, _ = pareto_run
    report = output / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"epd-net", "no_change", "blur", "pixelate", "ksame"}
    assert metrics["ksame_k"] == 10
    for name in [*FIGURES.values(), "report.md", "per_image.parquet", "samples.npz"]:
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    for judged in metrics["methods"].values():
        assert f"{judged['evaluators']['objective']:.4f}" in text
    result = CliRunner().invoke(app, ["report", str(output)])
    assert result.exit_code == 0 and "evaluating" not in result.output, result.output


def test_ablation_variants_leave_out_diversity_when_the_run_trained_without_it():
    from epd_ray.ablation import variant_params

    params = {k: 0.5 for k in SEARCHED_KEYS}
    assert list(variant_params(params, 0.0)) == VARIANTS[:3]
    variants = variant_params(params, DIVERSITY)
    assert list(variants) == VARIANTS
    assert variants["without_diversity"] == {**params, "diversity": 0.0}
    assert variants["without_ssim"] == {**params, "diversity": DIVERSITY, "phi": 0.0}


def test_ablation_retrains_four_variants_on_one_budget(ablated):
    output, exp, run, said = ablated
    card = json.loads((output / "best" / "model_card.json").read_text())
    metrics = json.loads((output / "ablation" / "metrics.json").read_text())
    assert list(metrics["methods"]) == VARIANTS
    tuned = {**{k: card["params"][k] for k in SEARCHED_KEYS}, "diversity": DIVERSITY}
    expected = {"tuned": tuned, "without_ssim": {**tuned, "phi": 0.0}, "without_emotion": {**tuned, "lambda3": 0.0},
                "without_diversity": {**tuned, "diversity": 0.0}}
    for name, params in expected.items():
        variant = metrics["variants"][name]
        assert variant["params"] == pytest.approx(params)
        assert variant["rounds_trained"] == ROUNDS and variant["judged_round"] == ROUNDS  # pareto run: last round
        payload = load_checkpoint(Path(variant["checkpoint"]))  # the ablated term really was off in training
        assert payload["params"] == pytest.approx({k: params[k] for k in SEARCHED_KEYS})
        loss = {k: v for k, v in params.items() if k != "mu"}
        assert payload["experiment"] == {**exp.to_dict(), "loss": pytest.approx(loss)}
        for judge in ("evaluators", "verifiers"):
            assert 0.0 <= metrics["methods"][name][judge]["objective"] <= 1.0
    assert metrics["mu"] == pytest.approx(tuned["mu"]) and metrics["split"] == "test"
    assert metrics["budget"]["steps"] == exp.train.steps and metrics["budget"]["seed"] == exp.train.seed
    assert metrics["budget"]["data_hash"] == card["data"]["content_hash"]
    assert metrics["budget"]["pretrained_path"] == card["pretrained_path"]  # from the cache, not retrained
    assert not any("pretraining" in line for line in said)
    table = pq.read_table(output / "ablation" / "per_image.parquet")
    assert table.num_rows == len(VARIANTS) * metrics["images"]
    assert not list(output.glob(".ablation.tmp*"))


def test_report_adds_the_ablation_tables_from_its_metrics(ablated):
    output, _, _, _ = ablated
    result = CliRunner().invoke(app, ["report", str(output)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((output / "ablation" / "metrics.json").read_text())
    text = (output / "report" / "report.md").read_text()
    assert "## Ablations" in text
    rows = [line for line in text.splitlines() if line.startswith(tuple(f"| {name} |" for name in VARIANTS))]
    assert len(rows) == 2 * len(VARIANTS)  # the judged round on the test split, then the last round on validation
    for row, (name, judged) in zip(rows[:len(VARIANTS)], metrics["methods"].items()):
        assert row.startswith(f"| {name} | {judged_weights(metrics['variants'][name]['params'])} |")
        for key in ("objective", "deid_rate", "emotion_mse", "ssim"):
            assert f"{judged['evaluators'][key]:.4f}" in row, key
    for row, (name, run) in zip(rows[len(VARIANTS):], metrics["variants"].items()):
        last = run["last_round_validation"]
        assert row.startswith(f"| {name} | {ROUNDS} |") and last["round"] == ROUNDS
        for key in ("objective", "emotion_mse", "ssim"):
            assert f"{last[key]:.4f}" in row, key
    tuned, no_emotion = (metrics["methods"][k]["evaluators"]["emotion_mse"] for k in ("tuned", "without_emotion"))
    assert f"emotion MSE: {no_emotion:.4g} against {tuned:.4g} tuned" in text
    tuned, no_diversity = (metrics["methods"][k]["parrot"]["reidentified"] for k in ("tuned", "without_diversity"))
    assert f"the parrot attack names at rank 1 (evaluators embedding): {no_diversity:.4g} against {tuned:.4g}" in text


def judged_weights(params: dict[str, float]) -> str:
    return " | ".join(f"{params[k]:.3f}" for k in ("phi", "lambda3", "diversity"))


def test_ablate_refuses_a_folder_it_cannot_use(ablated, tmp_path):
    output, _, _, _ = ablated
    broken, partial = tmp_path / "broken", tmp_path / "partial"
    for folder, card in ((broken, "{"), (partial, json.dumps({"config": {}, "params": {"phi": 0.2}}))):
        (folder / "best").mkdir(parents=True)
        (folder / "best" / "model_card.json").write_text(card)
    cases = ((tmp_path / "empty", "best/model_card.json"), (broken, "not valid JSON"), (partial, "lambda1"),
             (output, "holds an ablation already"))
    (tmp_path / "empty").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for folder, named in cases:
        result = CliRunner().invoke(app, ["ablate", str(folder)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], lines
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
