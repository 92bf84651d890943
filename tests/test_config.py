"""The typed configuration (epd_ray/config.py): presets, dotted overrides, refusals that name the field,
and the resolved config written next to a run that loads back to the same experiment."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from epd_ray.config import (
    PRESETS_DIR,
    SQRT2,
    ConfigError,
    ExperimentConfig,
    LossConfig,
    Range,
    load_config,
    preset_names,
    validate_section,
)

TUNE_CONFIGS = Path(__file__).resolve().parents[1] / "tune_configs"
QUICK_STEPS = yaml.safe_load((PRESETS_DIR / "quick.yaml").read_text())["train"]["steps"]
PRESET_FILES = sorted(TUNE_CONFIGS.glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------


def test_every_preset_file_is_a_known_preset():
    assert {p.stem for p in PRESET_FILES} == {"smoke", "quick", "paper", "faces"}
    assert preset_names() == ["faces", "paper", "quick", "smoke"]


@pytest.mark.parametrize("preset", ["smoke", "quick", "paper"])
def test_preset_loads_by_name_and_by_path_with_its_values(preset):
    by_name = load_config(preset)
    by_path = load_config(TUNE_CONFIGS / f"{preset}.yaml")
    assert isinstance(by_name, ExperimentConfig)
    assert by_name == by_path
    assert by_name.name == preset
    # every value the YAML sets is what the resolved config holds
    raw = yaml.safe_load((TUNE_CONFIGS / f"{preset}.yaml").read_text())
    resolved = by_name.to_dict()
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert resolved[section][key] == value, f"{preset}: {section}.{key}"
        else:
            assert resolved[section] == values


def test_presets_differ_where_their_files_say():
    smoke, quick, paper = load_config("smoke"), load_config("quick"), load_config("paper")
    assert (smoke.data.num_identities, quick.data.num_identities, paper.data.num_identities) == (6, 12, 67)
    assert paper.data.image_size == 256 and paper.train.use_gpu is True and paper.train.num_workers == 3
    assert smoke.model.ngf == 8 and quick.model.ngf == 16 and paper.model.ngf == 64


def test_no_config_means_the_quick_preset():
    default = load_config(None)
    assert default == load_config("quick")
    assert default.name == "quick"
    # and not merely the built-in defaults: quick sets train.steps to something else
    assert ExperimentConfig().train.steps != QUICK_STEPS
    assert default.train.steps == QUICK_STEPS
    assert load_config() == default


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == ExperimentConfig()


# ---------------------------------------------------------------------------------------------------------
# Dotted overrides
# ---------------------------------------------------------------------------------------------------------


def test_dotted_override_changes_one_key_only():
    base = load_config("quick")
    cfg = load_config("quick", {"train.steps": 3})
    assert cfg.train.steps == 3
    assert base.train.steps == QUICK_STEPS
    # the rest of the section is kept from the preset, not reset to the defaults
    assert cfg.train.batch_size == base.train.batch_size == 32
    assert cfg.train.cpus_per_worker == 0.75
    assert cfg.model_copy(update={"train": base.train}) == base


def test_override_of_a_section_the_preset_does_not_mention():
    cfg = load_config("quick", {"loss.lambda1": 0.5, "ray.dashboard_port": 0, "name": "mine"})
    assert cfg.loss.lambda1 == 0.5
    assert cfg.loss.lambda2 == 1.0
    assert cfg.ray.dashboard_port == 0
    assert cfg.name == "mine"


def test_override_below_a_plain_value_is_refused():
    with pytest.raises(ConfigError, match=r"name\.x"):
        load_config("quick", {"name.x": 1})
    with pytest.raises(ConfigError, match=r"train\.steps\.x"):
        load_config("quick", {"train.steps.x": 1})


# ---------------------------------------------------------------------------------------------------------
# Refusals name the field or the file
# ---------------------------------------------------------------------------------------------------------


BAD_OVERRIDES = [
    pytest.param({"bogus": 1}, ["bogus", "unknown key"], id="unknown-top-level-key"),
    pytest.param({"train.epoch": 3}, ["train.epoch", "unknown key"], id="unknown-nested-key"),
    pytest.param({"data.colour": "red"}, ["data.colour", "unknown key"], id="unknown-data-key"),
    pytest.param({"loss.lambda1": 1.5}, ["loss.lambda1"], id="lambda1-above-1"),
    pytest.param({"loss.lambda2": -0.1}, ["loss.lambda2"], id="lambda2-negative"),
    pytest.param({"loss.alpha": 0}, ["loss.alpha"], id="alpha-zero"),
    pytest.param({"loss.alpha": 1.5}, ["loss.alpha"], id="alpha-above-sqrt2"),
    pytest.param({"evaluation.mu": 1.5}, ["evaluation.mu"], id="mu-above-sqrt2"),
    pytest.param({"data.image_size": 48}, ["data.image_size", "power of two"], id="image-size-48"),
    pytest.param({"data.image_size": 96}, ["data.image_size", "power of two"], id="image-size-96"),
    pytest.param({"data.image_size": 512}, ["data.image_size"], id="image-size-512"),
    pytest.param({"data.splits": [0.5, 0.3, 0.3]}, ["data.splits"], id="splits-sum-1.1"),
    pytest.param({"data.splits": [0.7, 0.15, 0.1]}, ["data.splits"], id="splits-sum-0.95"),
    pytest.param({"data.splits": [1.2, -0.1, -0.1]}, ["data.splits"], id="splits-negative"),
    pytest.param({"search.space.beta": {"low": 0.1, "high": 0.5}}, ["search.space", "beta"],
                 id="search-unknown-key"),
    pytest.param({"search.space": {"mu": {"low": 0.0, "high": 0.5}}}, ["search.space", "mu"],
                 id="search-mu-below-bound"),
    pytest.param({"search.space": {"lambda1": {"low": 0.5, "high": 1.5}}}, ["search.space", "lambda1"],
                 id="search-lambda1-above-bound"),
    pytest.param({"search.space": {"alpha": {"low": 0.5, "high": 1.5}}}, ["search.space", "alpha"],
                 id="search-alpha-above-sqrt2"),
    pytest.param({"search.space": {"mu": {"low": 0.5, "high": 0.4}}}, ["search.space.mu", "low"],
                 id="search-range-reversed"),
    pytest.param({"search.space": {"mu": {"low": 0.3, "high": 0.5, "step": 0.1}}},
                 ["search.space.mu.step", "unknown key"], id="search-range-unknown-key"),
    pytest.param({"train.precision": "fp8"}, ["train.precision"], id="precision-literal"),
    pytest.param({"search.objective": "J"}, ["search.objective"], id="search-objective-literal"),
    pytest.param({"train.steps": 0}, ["train.steps"], id="steps-zero"),
    pytest.param({"train.report_every": 0}, ["train.report_every"], id="report-every-zero"),
    pytest.param({"train.epochs": 20}, ["train.epochs: replaced by train.steps"], id="old-train-epochs"),
    pytest.param({"verifiers.epochs": 20}, ["verifiers.epochs: replaced by verifiers.steps"], id="old-verifier-epochs"),
    pytest.param({"model.warm_start_epochs": 5}, ["model.warm_start_epochs: replaced by model.warm_start_steps"],
                 id="old-warm-start-epochs"),
    pytest.param({"train.ema_half_life": 1.0}, ["train.ema_half_life: replaced by train.ema_half_life_steps"],
                 id="old-ema-half-life"),
    pytest.param({"search.paper_point_first": False}, ["search.paper_point_first: replaced by search.first_point"],
                 id="old-paper-point-first"),
    pytest.param({"data.label_map": {"mad": "angri"}}, ["data.label_map", "'angri'", "angry"], id="label-map-class"),
    pytest.param({"model.draws": 4, "model.dropout": 0}, ["model", "draws 4", "dropout"], id="draws-without-noise"),
]


@pytest.mark.parametrize("overrides, expected", BAD_OVERRIDES)
def test_invalid_value_is_refused_naming_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config("quick", overrides)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert "quick.yaml" in message  # the file the config came from


def test_unknown_key_in_a_yaml_file_names_file_and_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntrain: {epoch: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "train.epoch" in str(info.value)


def test_out_of_range_value_in_a_yaml_file_names_file_and_field(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("loss: {lambda1: 1.5}\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r".*loss\.lambda1"):
        load_config(path)


def test_boundary_values_are_accepted():
    cfg = load_config("quick", {"loss.alpha": SQRT2, "loss.lambda1": 0.0, "loss.lambda3": 1.0,
                                "data.image_size": 256, "data.splits": [0.8, 0.1, 0.1],
                                "search.space": {"alpha": {"low": 0.5, "high": SQRT2}}})
    assert cfg.loss.alpha == SQRT2
    assert cfg.data.splits == (0.8, 0.1, 0.1)
    assert cfg.search.space["alpha"] == Range(low=0.5, high=SQRT2)
    assert set(cfg.search.space) == {"lambda1", "lambda2", "lambda3", "phi", "alpha", "mu"}  # the rest: defaults


def test_unknown_preset_names_it_and_lists_the_presets():
    with pytest.raises(ConfigError) as info:
        load_config("nosuchpreset")
    message = str(info.value)
    assert "nosuchpreset" in message
    for name in ("smoke", "quick", "paper"):
        assert name in message


def test_missing_yaml_path_is_refused(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(missing)


@pytest.mark.parametrize("text", ["train: {epochs: 3\n", "name: [unclosed\n", "a: b: c\n", "\tname: x\n"])
def test_invalid_yaml_names_the_file(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


def test_yaml_that_is_not_a_mapping_names_the_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- loss\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_validate_section_uses_the_same_messages():
    assert validate_section(LossConfig, {"lambda1": 0.2}, "trial 3").lambda1 == 0.2
    with pytest.raises(ConfigError) as info:
        validate_section(LossConfig, {"lambda1": 2.0}, "trial 3")
    assert str(info.value).startswith("trial 3: lambda1")
    with pytest.raises(ConfigError, match=r"trial 3: gamma: unknown key"):
        validate_section(LossConfig, {"gamma": 0.5}, "trial 3")


# ---------------------------------------------------------------------------------------------------------
# The resolved config and its digest
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["smoke", "quick", "paper"])
def test_write_resolved_round_trips(tmp_path, preset):
    from epd_ray.artifacts import RunFolder

    cfg = load_config(preset, {"data.splits": [0.8, 0.1, 0.1], "ray.address": "auto",
                               "search.space.mu": {"low": 0.3, "high": SQRT2}})
    run = RunFolder(tmp_path / "run" / "nested")  # parents are created
    run.write_config(cfg)
    path = run.config_path
    assert path.is_file()
    again = load_config(path)
    assert again == cfg
    assert again.digest() == cfg.digest()
    # the file is the full resolved config, not just what the preset set
    written = yaml.safe_load(path.read_text())
    assert written == cfg.to_dict()
    assert set(written) == set(ExperimentConfig.model_fields)


def test_a_run_written_before_rafd_detector_was_renamed_still_loads(tmp_path):
    """A run folder's config.yaml (and `--set`) may still say data.rafd_detector: it is read as
    data.face_detector, so `--resume` and `report` keep working on older runs."""
    old = load_config("quick").to_dict()
    del old["data"]["face_detector"]
    old["data"]["rafd_detector"] = "haar"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_config(path).data.face_detector == "haar"
    assert load_config("quick", {"data.rafd_detector": "haar"}).data.face_detector == "haar"


def test_digest_is_stable_and_follows_every_value():
    a = load_config("quick")
    assert re.fullmatch(r"[0-9a-f]{16}", a.digest())
    assert load_config("quick").digest() == a.digest()
    changed = {
        "train.steps": 9,
        "loss.lambda1": 0.5,
        "data.seed": 1,
        "search.space": {"mu": {"low": 0.25, "high": 0.61}},
        "ray.address": "auto",
        "name": "other",
    }
    digests = {a.digest()}
    for key, value in changed.items():
        d = load_config("quick", {key: value}).digest()
        assert d != a.digest(), key
        digests.add(d)
    assert len(digests) == len(changed) + 1
    assert load_config("smoke").digest() != a.digest()


# ---------------------------------------------------------------------------------------------------------
# Known problems
# ---------------------------------------------------------------------------------------------------------


def test_override_of_one_search_bound_keeps_the_rest_of_the_space():
    cfg = load_config("quick", {"search.space.mu.low": 0.3})
    assert cfg.search.space["mu"] == Range(low=0.3, high=0.6)
    assert set(cfg.search.space) == {"lambda1", "lambda2", "lambda3", "phi", "alpha", "mu"}


def test_a_real_face_set_gets_the_real_faces_preset_by_default():
    from epd_ray.config import default_preset

    assert default_preset(None) == default_preset("synthetic") == "quick"
    for source in ("folder", "manifest", "rafd"):
        assert default_preset(source) == "faces"
    faces = load_config("faces")
    assert faces.evaluation.judge == "auto"  # the pretrained recogniser judges real faces


def test_time_budgets_read_as_seconds_minutes_or_hours():
    from epd_ray.config import parse_duration

    assert [parse_duration(t) for t in ("90", "90s", "15m", "1h", "1.5h", 30)] == [90, 90, 900, 3600, 5400, 30]
    assert load_config("smoke", {"search.time_budget_s": "15m"}).search.time_budget_s == 900
    with pytest.raises(ConfigError, match="search.time_budget_s.*not a duration"):
        load_config("smoke", {"search.time_budget_s": "soon"})


def test_pretraining_over_its_share_of_the_budget_is_warned_about_once_with_the_slowest_networks_estimate():
    from epd_ray.train.pretrain import network_specs
    from epd_ray.train.run import PretrainingEstimate

    def specs(exp):
        return network_specs(exp.verifiers, exp.model, 4, 32)

    said: list[str] = []
    exp = load_config("smoke")  # 4 x 250 verifier steps + 300 warm-start steps
    estimate = PretrainingEstimate(specs(exp), share_s=60.0, echo=said.append)
    item = {"network": "identity_verifier", "task": "identity", "step": 25, "steps": 250, "loss": 1.0,
            "val_score": 0.5, "elapsed_s": 5.0, "left_s": 45.0}
    estimate(item)
    estimate({**item, "step": 50, "elapsed_s": 10.0})
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 1 and "~260 s" in warnings[0] and "(60 s)" in warnings[0]
    quiet: list[str] = []
    PretrainingEstimate(specs(exp), share_s=None, echo=quiet.append)(item)
    assert len(quiet) == 1 and not quiet[0].startswith("warning")
    # A slower network that starts later raises the estimate: its own rate for its steps, and the slowest
    # rate for the steps of the networks not yet seen (0.2 x 250 + 0.4 x 250 + 0.4 x 800 = 470 s).
    later: list[str] = []
    estimate = PretrainingEstimate(specs(exp), share_s=300.0, echo=later.append)
    estimate(item)
    assert not any(line.startswith("warning:") for line in later)
    estimate({**item, "network": "emotion_verifier", "elapsed_s": 10.0})
    assert "~470 s" in later[-1] and "(300 s)" in later[-1]
    # the expression pickers' steps count too: 0.2 x (6 x 250 + 300) = 360 s
    counted: list[str] = []
    PretrainingEstimate(specs(load_config("smoke", {"verifiers.pickers": 2})), share_s=60.0,
                        echo=counted.append)(item)
    assert "~360 s" in counted[-1]


def test_the_evaluation_keeps_what_judging_a_large_real_test_split_takes_and_a_share_of_the_budget_otherwise():
    from epd_ray.artifacts import DatasetManifest
    from epd_ray.config import (EVALUATION_CORE_S_PER_FACE, EVALUATION_RESERVE, PARROT_CORE_S_PER_DRAW,
                                RECOGNISER_CORE_S_PER_FACE)
    from epd_ray.core.precision import usable_cpus
    from epd_ray.experiment import evaluation_reserve

    def manifest(source: str, test: int, people: int = 2) -> DatasetManifest:
        return DatasetManifest(image_size=64, identities=tuple(f"p{i}" for i in range(people)),
                               emotions=("happy", "sad"), num_images=3 * test,
                               splits={s: {"images": test} for s in ("train", "val", "test")}, shards={},
                               content_hash="x", source=source)

    exp, budget = load_config("faces"), 1500.0
    share = EVALUATION_RESERVE * budget

    def judging(faces: int, gallery: int, draws: int = exp.evaluation.parrot_draws) -> float:
        originals = 2 * faces + gallery  # the test faces, plain and denoised, and the gallery
        return (faces * EVALUATION_CORE_S_PER_FACE + originals * RECOGNISER_CORE_S_PER_FACE
                + gallery * (draws - 1) * PARROT_CORE_S_PER_DRAW) / usable_cpus()

    assert evaluation_reserve(budget, exp, manifest("folder", 60)) == share  # a JAFFE-sized split
    capped = judging(exp.evaluation.test_probes, 2 * exp.evaluation.gallery_per_identity)
    assert evaluation_reserve(budget, exp, manifest("folder", 5000)) == pytest.approx(max(share, capped))
    whole = load_config("faces", {"evaluation.test_probes": 0})
    assert evaluation_reserve(budget, whole, manifest("folder", 5000)) == pytest.approx(
        max(share, judging(5000, 2 * exp.evaluation.gallery_per_identity)))
    # the parrot draws a gallery of every person: 67 people cost more than 2 at the same test split
    many = evaluation_reserve(budget, exp, manifest("folder", 5000, people=67))
    assert many == pytest.approx(judging(exp.evaluation.test_probes, 670)) and many > capped
    one_draw = load_config("faces", {"evaluation.parrot_draws": 1})
    assert evaluation_reserve(budget, one_draw, manifest("folder", 5000, people=67)) == pytest.approx(
        max(share, judging(exp.evaluation.test_probes, 670, draws=1)))
    assert evaluation_reserve(budget, exp, manifest("synthetic", 5000)) == share  # judged by the fast evaluators


def test_a_budget_that_ended_the_search_marks_the_cut_trials_and_counts_those_never_started():
    from epd_ray.tune import search
    from epd_ray.tune.search import TrialSummary, budget_cuts

    def trial(tid, rounds, status="ok"):
        return TrialSummary(tid, {}, rounds, {"objective": 0.1} if rounds else {}, "c" if rounds else None, status)

    trials = [trial("done", 8), trial("asha", 4), trial("cut", 3), trial("failed", 2, "error"), trial("late", 0)]
    search.COMPLETED.clear()
    search.COMPLETED.update({"done", "asha"})
    marked, note = budget_cuts(trials, planned=6, max_rounds=8, time_budget_s=30, searched=31)
    assert [t.status for t in marked] == ["ok", "ok", "budget", "error", "not started"]
    assert "1 trial(s) stopped early" in note and "2 of 6 not started" in note
    assert budget_cuts(trials, planned=6, max_rounds=8, time_budget_s=30, searched=20) == (trials, None)
    assert budget_cuts(trials, planned=6, max_rounds=8, time_budget_s=None, searched=99) == (trials, None)
    search.COMPLETED.clear()


def test_a_spent_budget_waits_for_a_first_reported_round_or_with_finish_one_trial_a_trial_trained_through():
    from epd_ray.tune import search
    from epd_ray.tune.search import OBJECTIVE, TimeBudget

    any_round, whole_trial = TimeBudget(1e-6), TimeBudget(1e-6, finish_rounds=10)
    time.sleep(0.01)
    assert not any_round.stop_all() and not whole_trial.stop_all()  # spent, but nothing to judge yet
    for stopper in (any_round, whole_trial):
        assert stopper("a", {OBJECTIVE: 0.2, "round": 4}) is False  # never stops a trial itself
    assert any_round.stop_all() and not whole_trial.stop_all()  # a round at step 600 of 1500 is not enough
    whole_trial("a", {OBJECTIVE: 0.3, "round": 10})
    assert whole_trial.stop_all()
    _, note = search.budget_cuts([], planned=2, max_rounds=10, time_budget_s=30, searched=31, finish_one_trial=True)
    assert "it waits past it for a first trial's last round" in note and "2 of 2 not started" in note


@pytest.mark.parametrize("first, expected", [("paper", {"phi": 0.25, "mu": 0.35, "alpha": 1.3}),
                                             ("config", {"phi": 0.1, "mu": 0.2, "alpha": 1.3}), ("none", None)])
def test_the_first_trial_is_the_papers_point_the_configs_own_or_none(first, expected):
    from epd_ray.tune.search import first_points

    exp = load_config("quick", {"search.first_point": first, "loss.phi": 0.1, "loss.alpha": 1.3,
                                "evaluation.mu": 0.2})
    points = first_points(exp)
    if expected is None:
        assert points == []
    else:
        assert [{k: points[0][k] for k in expected}] == [pytest.approx(expected)]


def test_a_batch_larger_than_a_workers_share_of_the_images_is_refused_with_the_batch_that_fits():
    from epd_ray.train.run import check_batch_fits

    check_batch_fits("verifiers.batch_size", 22, 22, 1)  # one full batch: fits
    with pytest.raises(ConfigError, match=r"verifiers\.batch_size: 32 is more than the 22 .*batch_size=22$"):
        check_batch_fits("verifiers.batch_size", 32, 22, 1)
    with pytest.raises(ConfigError, match=r"--set train\.batch_size=11$"):
        check_batch_fits("train.batch_size", 16, 22, 2)
    with pytest.raises(ConfigError, match="use fewer workers or more images"):
        check_batch_fits("train.batch_size", 2, 3, 2)
