"""Pretraining you can watch and trust: progress lines while it runs, each network judged against chance
after it, `--strict` stopping on one that has not learnt; and budgets that count optimiser steps."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

import epd_ray.data.shards as shards
from epd_ray.config import load_config
from epd_ray.core.images import to_tensor
from epd_ray.core.synthetic import make_synthetic_faces
from epd_ray.core.augment import augment
from epd_ray.train.run import check_pretrained, clearly_above_chance
from epd_ray.train.worker import ShardBatches, WorkerSetup

NETWORKS = ("identity_verifier", "emotion_verifier", "emotion_verifier_1", "identity_evaluator", "emotion_evaluator",
            "expression_picker_0", "new_people_probe", "generator")


@pytest.mark.parametrize("rows", [20, 300])
def test_a_step_budget_takes_the_same_number_of_full_batches_at_any_data_size(rows):
    """20 rows give 2 batches of 8 a pass, 300 give 37: 50 steps are 50 full batches either way, the small set
    wrapping round 25 passes, each pass a fresh shuffle of the same rows."""
    shard = ShardBatches(WorkerSetup(0, 1, torch.device("cpu"), "fp32", False), 8)
    shard.kept = {"pixels": torch.zeros(rows, 4, 4, 3, dtype=torch.uint8), "identity": torch.arange(rows),
                  "emotion": torch.zeros(rows, dtype=torch.int64)}
    batches = list(itertools.islice(shard.forever(seed=0), 50))
    assert len(batches) == 50 and all(len(b["identity"]) == 8 for b in batches)
    per_pass = rows // 8
    first, second = (torch.cat([b["identity"] for b in batches[k * per_pass:(k + 1) * per_pass]]) for k in (0, 1))
    assert len(set(first.tolist())) == per_pass * 8 and not torch.equal(first, second)


def test_more_emotion_verifiers_are_mini_xceptions_of_seeds_of_their_own():
    from epd_ray.train.pretrain import network_specs

    exp = load_config("smoke", {"verifiers.emotion_verifiers": 3})
    specs = network_specs(exp.verifiers, exp.model, 4, 32)
    siblings = [specs[f"emotion_verifier_{i}"] for i in (1, 2)]
    assert all(s["kind"] == "emotion_verifier" and s["task"] == "emotion" for s in siblings)
    assert all(s["args"] == specs["emotion_verifier"]["args"] and s["lr"] == exp.verifiers.emotion_lr for s in siblings)
    emotion_seeds = [spec["seed"] for spec in specs.values() if spec["task"] == "emotion"]
    assert len(set(emotion_seeds)) == len(emotion_seeds) == 4
    assert not any(name.startswith("emotion_verifier_") for name in network_specs(load_config("smoke").verifiers,
                                                                                  exp.model, 4, 32))


def test_the_expression_pickers_are_emotion_evaluators_of_seeds_of_their_own():
    from epd_ray.train.pretrain import network_specs

    exp = load_config("smoke", {"verifiers.pickers": 2})
    specs = network_specs(exp.verifiers, exp.model, 4, 32)
    pickers = [specs[f"expression_picker_{i}"] for i in range(2)]
    assert all(p["kind"] == "expression_picker" and p["task"] == "emotion" for p in pickers)
    assert all(p["args"] == specs["emotion_evaluator"]["args"] and p["steps"] == exp.verifiers.steps for p in pickers)
    emotion_seeds = [spec["seed"] for spec in specs.values() if spec["task"] == "emotion"]
    assert len(set(emotion_seeds)) == len(emotion_seeds) == 4  # no two emotion classifiers alike
    assert all(spec["kind"] == name for name, spec in specs.items() if not name.startswith("expression_picker"))
    assert not any(name.startswith("expression_picker") for name in network_specs(load_config("smoke").verifiers,
                                                                                  exp.model, 4, 32))


def test_pretraining_starts_the_networks_with_the_most_work_first():
    from epd_ray.train.pretrain import largest_first, network_specs

    exp = load_config("faces")
    specs = network_specs(exp.verifiers, exp.model, 10, 64)
    order = largest_first(specs, 64)
    assert sorted(order) == sorted(specs)
    resnets = {name for name, spec in specs.items() if spec["args"].get("base_width")}  # V_e, S_e, pickers, probe
    mini_xceptions = {name for name, spec in specs.items() if spec["kind"] == "emotion_verifier"}
    assert set(order[:len(resnets)]) == resnets and set(order[-len(mini_xceptions):]) == mini_xceptions
    specs["emotion_verifier"]["steps"] *= 50  # the work is the steps times a step's cost
    assert largest_first(specs, 64)[0] == "emotion_verifier"


def test_pretraining_trains_a_network_per_core_whatever_a_trial_takes():
    from epd_ray.runtime import DATA_RESERVE_CPUS
    from epd_ray.train.run import cpu_lanes

    # 2 cores: two networks side by side, one thread each, in what the data's reserve leaves
    assert cpu_lanes(10, 2.0, 2.0) == (2, (2.0 - DATA_RESERVE_CPUS) / 2)
    lanes, cpus = cpu_lanes(10, 16.0, 16.0)  # more cores than networks: every network at once, the CPUs shared
    assert lanes == 10 and lanes * cpus <= 16.0 - DATA_RESERVE_CPUS and cpus > 1
    assert cpu_lanes(2, 8.0, 2.0) == (2, 2.0)  # a task is one process: at most one node's CPUs
    assert cpu_lanes(10, 1.0, 1.0)[0] == 1


def test_pretraining_lanes_do_not_follow_the_cpus_a_trial_holds(ray_runtime):
    from epd_ray.train.run import cpu_lanes, pretraining_lanes

    # the faces preset's trial holds both of 2 cores' threads (one trial at a time); its networks still share
    faces = load_config("faces")
    one_thread = faces.model_copy(update={"train": faces.train.model_copy(update={"cpus_per_worker": 0.5})})
    lanes = cpu_lanes(10, ray_runtime.total_cpus, ray_runtime.largest_node_cpus)
    assert pretraining_lanes(faces, ray_runtime, 10) == pretraining_lanes(one_thread, ray_runtime, 10) == lanes


def test_the_new_people_probe_learns_from_two_people_in_three_and_is_read_on_all_faces_of_the_third():
    from epd_ray.data.shards import FaceArrays
    from epd_ray.train.pretrain import NEW_PEOPLE_PROBE, network_specs, new_people_faces

    exp = load_config("smoke", {"verifiers.new_people_probe": True})
    specs = network_specs(exp.verifiers, exp.model, 4, 32)
    assert specs[NEW_PEOPLE_PROBE]["args"] == specs["emotion_evaluator"]["args"]
    assert specs[NEW_PEOPLE_PROBE]["task"] == "emotion"
    assert len({spec["seed"] for spec in specs.values() if spec["task"] == "emotion"}) == 3
    # it needs people to hold out: not on 3 people, nor when the emotion networks learn from an emotion-only set
    assert NEW_PEOPLE_PROBE not in network_specs(exp.verifiers, exp.model, 3, 32)
    assert NEW_PEOPLE_PROBE not in network_specs(exp.verifiers, exp.model, 9, 32, emotions_with_people=False)
    assert NEW_PEOPLE_PROBE not in network_specs(load_config("smoke").verifiers, exp.model, 9, 32)

    def faces(identity):
        identity = np.asarray(identity)
        return FaceArrays(np.arange(len(identity))[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8),
                          identity, identity % 7)
    train, val = faces([0, 1, 2, 3, 4, 5, 2, 5, 0]), faces([2, 0, 5, 1])
    learnt, read = new_people_faces(train, val)
    assert set(learnt.identity) == {0, 1, 3, 4} and len(learnt) == 5  # every train face of those people
    assert sorted(read.identity) == [2, 2, 2, 5, 5, 5]  # their train and validation faces, none learnt from


def test_classifier_augmentation_moves_every_face_differently_but_keeps_the_face():
    """Each face of a batch gets its own draw (mirror, pose, blur, noise), stays a valid image, and stays far
    closer to its own original (or its mirror image) than to another face: what its label names is still in it."""
    torch.manual_seed(0)
    faces = to_tensor(make_synthetic_faces(3, 1, 32, seed=0).pixels[:16])
    out = augment(faces)
    assert out.shape == faces.shape and out.min() >= -1 and out.max() <= 1
    change = (out - faces).flatten(1).abs().mean(1)
    assert bool((change > 0.01).all()) and change.std() > 0.005  # each face moved, by its own amount
    own = torch.minimum((out - faces).flatten(1).norm(dim=1), (out - faces.flip(3)).flatten(1).norm(dim=1))
    other = (out - faces.roll(1, 0)).flatten(1).norm(dim=1)
    assert bool((own < other).float().mean() >= 0.8)


def test_a_shard_too_small_for_one_batch_is_an_error_not_an_endless_loop():
    shard = ShardBatches(WorkerSetup(0, 1, torch.device("cpu"), "fp32", False), 8)
    shard.kept = {"pixels": torch.zeros(5, 4, 4, 3, dtype=torch.uint8), "identity": torch.arange(5),
                  "emotion": torch.zeros(5, dtype=torch.int64)}
    with pytest.raises(RuntimeError, match="fewer than batch_size = 8 rows"):
        next(shard.forever(seed=0))


@pytest.mark.parametrize("classes, needed", [(2, 0.75), (4, 0.5), (7, 1 / 7 + 0.2), (12, 1 / 12 + 0.2),
                                             (67, 1 / 67 + 0.2)])
def test_clearly_above_chance_is_twice_chance_and_20_points_capped_halfway_to_perfect(classes, needed):
    assert clearly_above_chance(classes) == pytest.approx(needed)


def test_a_classifier_near_chance_and_a_blurry_warm_start_are_warned_about_by_name():
    exp = load_config("smoke")
    scores = {"identity_verifier": 0.98, "emotion_verifier": 0.2, "identity_evaluator": 0.3,
              "expression_picker_0": 0.25, "generator": 0.6}
    lines, warnings = check_pretrained(scores, {"identity_verifier": 6, "identity_evaluator": 6,
                                                "emotion_verifier": 7, "expression_picker_0": 7}, exp)
    assert len(lines) == 5 and "chance 0.167" in lines[0] and "reconstruction SSIM 0.600" in lines[4]
    assert [w.split(":")[0] for w in warnings] == ["emotion_verifier", "identity_evaluator", "expression_picker_0",
                                                   "generator (warm start)"]
    assert "--emotion-data" in warnings[2]  # a picker learns expressions as S does
    assert "0.200 is not clearly above chance 0.143" in warnings[0] and "--emotion-data" in warnings[0]
    assert f"verifiers.steps, now {exp.verifiers.steps}" in warnings[1] and "--emotion-data" not in warnings[1]
    assert f"model.warm_start_steps, now {exp.model.warm_start_steps}" in warnings[3]


def test_the_new_people_probe_far_below_s_e_is_warned_about_with_what_to_do():
    from epd_ray.train.run import check_new_people

    exp = load_config("smoke")  # evaluation.min_expression_kept 0.9
    line, warning = check_new_people(0.64, 0.94, exp)
    assert "accuracy 0.640 on people it never saw" in line and "0.940 on people it learnt" in line
    assert "people it never saw at 0.640, against 0.940" in warning and "--emotion-data" in warning
    assert check_new_people(0.87, 0.94, exp)[1] is None  # 0.87 >= 0.9 x 0.94


def test_pretraining_shows_progress_per_network_while_it_runs_then_the_verdict(tiny_pretraining, tiny_experiment):
    _, said = tiny_pretraining
    lines = [line for _, line in said]
    progress = {name: [(t, line) for t, line in said if re.match(rf"\s+{name}\s+step \d+/\d+  loss", line)]
                for name in NETWORKS}
    steps = tiny_experiment.verifiers.steps
    for name, rows in progress.items():
        assert rows, f"no progress line for {name}:\n" + "\n".join(lines)
        total = tiny_experiment.model.warm_start_steps if name == "generator" else steps
        assert f"step {total}/{total}" in rows[-1][1] and "left" in rows[-1][1]
        assert ("val SSIM" if name == "generator" else "val acc") in rows[-1][1]
    verdict = next(t for t, line in said if line == "pretrained networks, validation split:")
    # shown as the networks finish, not all at once when pretraining is over: the first network done was shown
    # well before the verdict (at 2 steps a network the last ones end within a second of it, sooner under load)
    assert min(rows[-1][0] for rows in progress.values()) < verdict - 0.2
    verdicts = lines[lines.index("pretrained networks, validation split:") + 1:]
    assert sum("validation accuracy" in line and "chance" in line and not line.startswith("warning")
               for line in verdicts) == 6 and any("reconstruction SSIM" in line for line in verdicts)
    assert any(line.startswith("  new_people_probe") and "on people it never saw" in line for line in verdicts)
    # 2 steps per network: the warm start cannot reconstruct faces yet, and says so
    assert any(line.startswith("warning: generator (warm start)") for line in lines)


def test_strict_stops_a_run_on_an_untrusted_network_and_leaves_nothing(tiny_tune_args, tiny_pretraining, tmp_path):
    """The tiny cache's networks had 2 steps each: `tune --strict` reusing them stops before the search,
    exit code 2, one line naming the network, and no run folder left behind."""
    from typer.testing import CliRunner

    from epd_ray.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [*tiny_tune_args, "--output", str(out), "--strict"])
    assert result.exit_code == 2, result.output
    assert "error: --strict:" in result.output and "generator (warm start)" in result.output
    assert "pretrained networks: reusing" in result.output and "search:" not in result.output
    assert not out.exists()


def test_an_interrupted_pretraining_trains_only_the_networks_it_had_not_finished(ray_runtime, tiny_experiment,
                                                                                 tiny_data, tiny_pretrained,
                                                                                 tmp_path):
    """Each network is kept as it finishes (PretrainedCache.unfinished); a new run of the same key keeps what
    is there, trains the rest side by side, then leaves one complete cache entry and nothing unfinished."""
    from epd_ray.artifacts import PretrainedCache, pretrained_key
    from epd_ray.checkpoints import load_checkpoint, save_checkpoint
    from epd_ray.train.run import pretrain_networks

    done = load_checkpoint(tiny_pretrained)
    cache = PretrainedCache(tmp_path / "cache")
    unfinished = cache.unfinished(pretrained_key(tiny_experiment, tiny_data.info.content_hash))
    kept = ("identity_evaluator", "emotion_evaluator")
    for name in kept:
        save_checkpoint(unfinished / f"{name}.pt", {"networks": {name: done["networks"][name]},
                                                    "val_score": {name: done["val_score"][name]}})
    (unfinished / "generator.pt").write_bytes(b"cut off mid-write")  # unreadable: trained again
    said: list[str] = []
    path = pretrain_networks(tiny_experiment, tiny_data, cache_dir=cache.root, runtime=ray_runtime, echo=said.append)
    trained = {name for name in NETWORKS if any(re.match(rf"\s+{name}\s+step", line) for line in said)}
    assert trained == set(NETWORKS) - set(kept)
    assert any(f"kept from an interrupted run: {', '.join(kept)}" in line for line in said)
    payload = load_checkpoint(path)
    assert list(payload["networks"]) == list(done["networks"])  # the training order, whatever finished first
    assert payload["identities"] == list(tiny_data.info.identities)  # whom V and V_e tell apart, for evaluate
    for name in kept:
        for key, tensor in done["networks"][name]["state_dict"].items():
            assert torch.equal(payload["networks"][name]["state_dict"][key], tensor)
    assert not unfinished.exists()


def test_train_network_runs_without_ray_on_faces_in_memory(monkeypatch):
    """The loop inside every pretraining task, called in-process as tests and benchmarks do: the step budget,
    about ten progress items with a validation score each, and the network handed back ready to judge. The
    progress items score a bounded share of every person's validation faces, so a large set's pretraining
    does not slow down; the last scores them all."""
    from epd_ray.train import pretrain
    from epd_ray.train.pretrain import network_specs, train_network

    monkeypatch.setattr(pretrain, "PROGRESS_VAL_FACES", 6)

    exp = load_config("smoke")
    faces = make_synthetic_faces(3, 2, 32, seed=0)
    arrays = shards.FaceArrays(faces.pixels, faces.identity, faces.emotion)
    spec = {**network_specs(exp.verifiers, exp.model, 3, 32)["emotion_verifier"], "steps": 20}
    items: list[dict] = []
    model, score = train_network("emotion_verifier", spec, arrays, arrays,
                                 WorkerSetup(0, 1, torch.device("cpu"), "fp32", False), batch_size=8,
                                 augmented=True, on_progress=items.append)
    assert [item["step"] for item in items] == list(range(2, 21, 2))
    assert not model.training and 0.0 <= score <= 1.0 and score == items[-1]["val_score"]
    assert [item["val_faces"] for item in items] == [6] * 9 + [len(arrays)]  # 2 of each of the 3 people, then all


def test_a_classifier_takes_its_steps_on_a_small_set_and_enough_to_see_each_face_min_passes_times_on_a_large_one():
    """`verifiers.steps` is a floor that does not depend on the set's size; the faces preset's `min_passes`
    adds steps once a set is large enough that the floor would show each face only a few times, up to
    `max_steps`. Presets without it keep the same steps at any size."""
    from epd_ray.train.pretrain import classifier_steps

    faces = load_config("faces").verifiers
    assert (faces.steps, faces.min_passes, faces.batch_size) == (600, 10, 32)
    assert classifier_steps(faces, 79) == classifier_steps(faces, 1900) == 600  # JAFFE, and up to 1,920 faces
    assert classifier_steps(faces, 5678) == 1775  # 10 passes of 5,678 faces at 32 a batch
    assert classifier_steps(faces, 100_000) == faces.max_steps == 2400
    quick = load_config("quick").verifiers
    assert classifier_steps(quick, 79) == classifier_steps(quick, 100_000) == quick.steps


def test_judges_only_pretrains_the_four_networks_evaluate_judges_with_under_a_key_of_their_own(
        ray_runtime, tiny_experiment, tiny_data, tmp_path):
    """Judging a model on a set of other people needs V, S, V_e and S_e trained on them, not the six networks
    only GAN training uses; the entry's key differs from a full pretraining's, so `tune` never takes it."""
    from epd_ray.artifacts import pretrained_key
    from epd_ray.checkpoints import load_checkpoint
    from epd_ray.config import JUDGES_ONLY
    from epd_ray.evaluate.evaluate import load_judges
    from epd_ray.train.run import pretrain_networks

    settings = {f"{section}.{key}": value for section in ("verifiers", "model")
                for key, value in getattr(tiny_experiment, section).model_dump().items()}
    judges = load_config("smoke", {**settings, **JUDGES_ONLY})
    said: list[str] = []
    path = pretrain_networks(judges, tiny_data, cache_dir=tmp_path / "cache", runtime=ray_runtime, echo=said.append)
    assert list(load_checkpoint(path)["networks"]) == ["identity_verifier", "emotion_verifier", "identity_evaluator",
                                                       "emotion_evaluator"]
    content = tiny_data.info.content_hash
    assert pretrained_key(judges, content) != pretrained_key(tiny_experiment, content)
    assert set(load_judges(path, torch.device("cpu"), tiny_data.info, tiny_data.path)) == {"evaluators", "verifiers"}
