"""The files one stage hands to the next (epd_ray/artifacts.py): atomic writes, the pretrained cache's key and
place, the run folder's marker as older runs wrote it."""

from __future__ import annotations

import json

import pytest

from epd_ray.artifacts import (PRETRAINED_FILE, PRETRAINING_VERSION, PretrainedCache, RunFolder, RunMarker,
                               atomic_folder, atomic_write_json, default_cache_dir, pretrained_key)
from epd_ray.checkpoints import CheckpointError, require_network
from epd_ray.config import ExperimentConfig, stable_hash


def test_atomic_write_leaves_only_the_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_atomic_folder_replaces_the_old_one_only_when_complete(tmp_path):
    out = tmp_path / "set"
    with atomic_folder(out) as staging:
        (staging / "x").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as staging:
            (staging / "x").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "x").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["set"]
    with atomic_folder(out) as staging:
        (staging / "y").write_text("new")
    assert [p.name for p in out.iterdir()] == ["y"] and [p.name for p in tmp_path.iterdir()] == ["set"]


def test_require_network_names_the_file_and_what_it_holds():
    assert require_network({"networks": {"generator": {"kind": "g"}}}, "generator", "f.pt") == {"kind": "g"}
    with pytest.raises(CheckpointError, match=r"f\.pt: holds no network 'generator' \(has identity_verifier\)"):
        require_network({"networks": {"identity_verifier": {}}}, "generator", "f.pt")


def test_pretrained_key_follows_the_settings_and_the_pretraining_version(tmp_path):
    """Networks pretrained by older code (another PRETRAINING_VERSION) are never reused for new settings."""
    exp = ExperimentConfig()
    model = exp.model.model_dump(mode="json", include={"ngf", "norm", "dropout", "warm_start_steps",
                                                       "warm_start_lr"})
    verifiers = exp.verifiers.model_dump(mode="json")
    verifiers.pop("emotion_data")
    verifiers.pop("pickers")  # without pickers or the new-people probe, the key of the caches written before
    verifiers.pop("new_people_probe")
    verifiers.pop("emotion_verifiers")  # one S, the paper's: the key of the caches written before the option
    settings = {"verifiers": verifiers, "generator": model, "version": PRETRAINING_VERSION}
    assert pretrained_key(exp, "abc") == f"abc-{stable_hash(settings)}"
    pickers = exp.model_copy(update={"verifiers": exp.verifiers.model_copy(update={"pickers": 2})})
    with_pickers = {**settings, "verifiers": {**verifiers, "pickers": 2}}
    assert pretrained_key(pickers, "abc") == f"abc-{stable_hash(with_pickers)}"
    probe = exp.model_copy(update={"verifiers": exp.verifiers.model_copy(update={"new_people_probe": True})})
    with_probe = {**settings, "verifiers": {**verifiers, "new_people_probe": True}}
    assert pretrained_key(probe, "abc") == f"abc-{stable_hash(with_probe)}"
    three = exp.model_copy(update={"verifiers": exp.verifiers.model_copy(update={"emotion_verifiers": 3})})
    with_three = {**settings, "verifiers": {**verifiers, "emotion_verifiers": 3}}
    assert pretrained_key(three, "abc") == f"abc-{stable_hash(with_three)}"
    assert pretrained_key(exp, "abc") != f"abc-{stable_hash({**settings, 'version': PRETRAINING_VERSION - 1})}"
    assert default_cache_dir(str(tmp_path)) == tmp_path


def test_pretrained_cache_finds_the_entry_of_the_run(tmp_path):
    cache = PretrainedCache(tmp_path)
    exp = ExperimentConfig()
    other = exp.model_copy(update={"verifiers": exp.verifiers.model_copy(update={"steps": exp.verifiers.steps + 1})})
    assert cache.find(exp.to_dict(), "abc") is None
    mine = cache.file(pretrained_key(exp, "abc"))
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"")
    assert cache.find(exp.to_dict(), "abc") == mine
    theirs = cache.file(pretrained_key(other, "abc"))
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"")
    assert mine.name == PRETRAINED_FILE
    assert cache.find(exp.to_dict(), "abc") == mine and cache.find(other.to_dict(), "abc") == theirs


def test_run_folder_reads_the_marker_older_runs_wrote(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "experiment.json").write_text(json.dumps({"kind": "epd-ray train", "config_digest": "d1",
                                                          "data": None, "params": {"mu": 0.5},
                                                          "started": "2026-01-01T00:00:00"}))
    assert run.read_marker("epd-ray tune") == RunMarker("epd-ray train", "d1", None, {"mu": 0.5},
                                                         "2026-01-01T00:00:00")
    (tmp_path / "experiment.json").write_text(json.dumps({"config_digest": "d0"}))  # the oldest: no kind
    assert run.read_marker("epd-ray tune").kind == "epd-ray tune"
    run.write_marker(RunMarker.new("epd-ray tune", "d2", "/data", None))
    assert run.read_marker("x").config_digest == "d2" and not run.finished()
    run.write_card({"params": {}})
    assert run.finished() and run.read_card() == {"params": {}}
