"""Prepared data (epd_ray/data/shards.py, epd_ray/data/prepare.py): Parquet shards + dataset.json, the
closed-set split, content hash, reuse of a prepared folder and atomic writes. No Ray here."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import epd_ray.data.shards as shards
from epd_ray.config import DataConfig
from epd_ray.core.labels import EMOTIONS, NUM_EMOTIONS
from epd_ray.core.synthetic import make_synthetic_faces
from epd_ray.data.prepare import cached_dataset, dataset_key, prepare_dataset
from epd_ray.data.shards import (
    MANIFEST,
    SPLITS,
    content_hash,
    load_split,
    read_manifest,
    shard_paths,
    split_per_identity,
)

COLUMNS = ["image", "pixels", "identity", "identity_name", "emotion", "emotion_name", "split", "source"]
SMALL = DataConfig(num_identities=4, variations=4, image_size=32)
N_IMAGES = 4 * NUM_EMOTIONS * 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_dataset(SMALL, tmp_path_factory.mktemp("prepared") / "out")


@pytest.fixture(scope="module")
def rows(prepared):
    """Every shard of every split, read with plain pyarrow: {split: list of row dicts}."""
    out = {}
    for split in SPLITS:
        out[split] = []
        for path in shard_paths(prepared.path, split):
            out[split].extend(pq.read_table(path).to_pylist())
    return out


@pytest.fixture(scope="module")
def faces():
    return make_synthetic_faces(SMALL.num_identities, SMALL.variations, SMALL.image_size, seed=SMALL.seed)


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------------------------------
# What is written
# ---------------------------------------------------------------------------------------------------------


def test_prepare_writes_manifest_and_shards(prepared):
    assert prepared.reused is False
    assert (prepared.path / MANIFEST).is_file()
    manifest = json.loads((prepared.path / MANIFEST).read_text())
    assert manifest == prepared.manifest == read_manifest(prepared.path)
    assert manifest["format"] == 1
    assert manifest["image_size"] == 32
    assert manifest["num_images"] == N_IMAGES
    assert manifest["emotions"] == list(EMOTIONS)
    assert len(manifest["identities"]) == 4
    assert manifest["source"] == "synthetic"
    assert manifest["config"] == SMALL.model_dump(mode="json")
    on_disk = {str(p.relative_to(prepared.path)) for p in prepared.path.rglob("*.parquet")}
    listed = {rel for split in SPLITS for rel in manifest["shards"][split]}
    assert on_disk == listed
    for split in SPLITS:
        assert manifest["shards"][split], split
        assert all(rel.startswith(f"shards/{split}-") for rel in manifest["shards"][split])


def test_shards_have_the_documented_columns(prepared):
    for split in SPLITS:
        for path in shard_paths(prepared.path, split):
            schema = pq.read_schema(path)
            assert schema.names == COLUMNS
            assert str(schema.field("identity").type) == "int64"
            assert str(schema.field("emotion").type) == "int64"
            assert str(schema.field("image").type) == "binary"
            assert str(schema.field("pixels").type) == "binary"


def test_rows_hold_consistent_labels_and_their_split(prepared, rows):
    names = prepared.manifest["identities"]
    for split, split_rows in rows.items():
        for row in split_rows:
            assert row["split"] == split
            assert row["identity_name"] == names[row["identity"]]
            assert row["emotion_name"] == EMOTIONS[row["emotion"]]
            assert len(row["pixels"]) == 32 * 32 * 3


def test_rows_are_the_rendered_faces(rows, faces):
    by_source = {s: i for i, s in enumerate(faces.source)}
    for split_rows in rows.values():
        for row in split_rows:
            i = by_source[row["source"]]
            assert row["identity"] == faces.identity[i]
            assert row["emotion"] == faces.emotion[i]
            assert row["pixels"] == faces.pixels[i].tobytes()


def test_png_decodes_to_exactly_the_pixels(rows):
    for split_rows in rows.values():
        for row in split_rows:
            img = Image.open(io.BytesIO(row["image"]))
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            decoded = np.asarray(img)
            raw = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(32, 32, 3)
            np.testing.assert_array_equal(decoded, raw)


def test_splits_are_closed_set_and_disjoint(rows, faces):
    for split in SPLITS:
        assert {r["identity"] for r in rows[split]} == set(range(4)), split
        # stratified by emotion too: every (identity, emotion) pair in every split
        assert {(r["identity"], r["emotion"]) for r in rows[split]} == {
            (i, e) for i in range(4) for e in range(NUM_EMOTIONS)}, split
    sources = [r["source"] for split in SPLITS for r in rows[split]]
    assert len(sources) == len(set(sources)) == N_IMAGES  # each image in exactly one split
    assert set(sources) == set(faces.source)


def test_manifest_counts_match_the_rows(prepared, rows):
    splits = prepared.manifest["splits"]
    assert sum(splits[s]["images"] for s in SPLITS) == N_IMAGES
    # 4 images per (identity, emotion) with shares 0.7/0.15/0.15: 2 train, 1 val, 1 test
    assert [splits[s]["images"] for s in SPLITS] == [56, 28, 28]
    for split in SPLITS:
        assert splits[split]["images"] == len(rows[split])
        counted = Counter(f"{r['identity']}/{r['emotion']}" for r in rows[split])
        assert splits[split]["per_identity_emotion"] == dict(counted)


def test_load_split_matches_the_shards(prepared, rows):
    for split in SPLITS:
        arrays = load_split(prepared.path, split)
        assert len(arrays) == len(rows[split])
        assert arrays.pixels.shape == (len(rows[split]), 32, 32, 3) and arrays.pixels.dtype == np.uint8
        assert arrays.identity.dtype == np.int64 and arrays.emotion.dtype == np.int64
        np.testing.assert_array_equal(arrays.identity, [r["identity"] for r in rows[split]])
        np.testing.assert_array_equal(arrays.emotion, [r["emotion"] for r in rows[split]])
        expected = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(32, 32, 3) for r in rows[split]])
        np.testing.assert_array_equal(arrays.pixels, expected)


def test_load_split_concatenates_several_shards(tmp_path):
    data = DataConfig(num_identities=4, variations=4, image_size=32, shard_rows=16)
    out = prepare_dataset(data, tmp_path / "out")
    assert len(out.manifest["shards"]["train"]) == 4  # 56 rows in shards of 16
    assert len(out.manifest["shards"]["val"]) == 2
    train = load_split(out.path, "train")
    assert len(train) == 56
    sizes = [pq.read_metadata(p).num_rows for p in shard_paths(out.path, "train")]
    assert sizes == [16, 16, 16, 8]


def test_per_identity_takes_every_person_at_most_count_times_and_repeats_itself():
    identity = np.array([0] * 7 + [1] * 2 + [2] * 5)
    faces = shards.FaceArrays(np.arange(len(identity))[:, None, None, None].astype(np.uint8), identity,
                              np.arange(len(identity)) % NUM_EMOTIONS)
    chosen = faces.per_identity(3)
    assert Counter(chosen.identity.tolist()) == {0: 3, 1: 2, 2: 3}
    np.testing.assert_array_equal(chosen.identity, identity[chosen.pixels[:, 0, 0, 0]])  # labels travel along
    np.testing.assert_array_equal(chosen.pixels, faces.per_identity(3).pixels)
    assert not np.array_equal(chosen.pixels, faces.per_identity(3, seed=1).pixels)


def test_read_manifest_of_an_unprepared_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="data prepare"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Content hash and reuse
# ---------------------------------------------------------------------------------------------------------


def test_content_hash_is_stable_and_follows_the_seed(tmp_path, prepared, faces):
    again = prepare_dataset(SMALL, tmp_path / "elsewhere")
    assert again.reused is False
    assert again.manifest["content_hash"] == prepared.manifest["content_hash"]
    split = split_per_identity(faces.identity, faces.emotion, SMALL.splits, seed=SMALL.seed)
    assert prepared.manifest["content_hash"] == content_hash(faces.pixels, faces.identity, faces.emotion, split)
    other = prepare_dataset(SMALL.model_copy(update={"seed": 1}), tmp_path / "seed1")
    assert other.manifest["content_hash"] != prepared.manifest["content_hash"]


def test_content_hash_sees_pixels_labels_and_split(faces):
    split = split_per_identity(faces.identity, faces.emotion, SMALL.splits, seed=0)
    base = content_hash(faces.pixels, faces.identity, faces.emotion, split)
    pixels = faces.pixels.copy()
    pixels[0, 0, 0, 0] ^= 1
    assert content_hash(pixels, faces.identity, faces.emotion, split) != base
    emotion = faces.emotion.copy()
    emotion[0] = (emotion[0] + 1) % NUM_EMOTIONS
    assert content_hash(faces.pixels, faces.identity, emotion, split) != base
    moved = split.copy()
    moved[np.flatnonzero(split == "train")[0]] = "val"
    assert content_hash(faces.pixels, faces.identity, faces.emotion, moved) != base


def test_same_config_in_same_folder_is_reused_untouched(tmp_path):
    out = tmp_path / "out"
    first = prepare_dataset(SMALL, out)
    before = _snapshot(out)
    inode = out.stat().st_ino
    second = prepare_dataset(SMALL, out)
    assert second.reused is True
    assert second.path == out
    assert second.manifest == first.manifest
    assert _snapshot(out) == before
    assert out.stat().st_ino == inode


def test_a_folder_an_older_preparation_wrote_is_prepared_again(tmp_path):
    """Same settings and inputs, but written before the preparation recorded what it now records (the
    framing's margin): reusing it would hand training a manifest without it."""
    out = tmp_path / "out"
    prepare_dataset(SMALL, out)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["preparation"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    again = prepare_dataset(SMALL, out)
    assert again.reused is False and read_manifest(out)["preparation"] == again.manifest["preparation"]
    assert prepare_dataset(SMALL, out).reused is True


def test_different_config_in_same_folder_is_rewritten(tmp_path):
    out = tmp_path / "out"
    first = prepare_dataset(SMALL, out)
    changed = SMALL.model_copy(update={"seed": 3, "shard_rows": 16})
    second = prepare_dataset(changed, out)
    assert second.reused is False
    assert second.manifest["content_hash"] != first.manifest["content_hash"]
    on_disk = read_manifest(out)
    assert on_disk["config"] == changed.model_dump(mode="json")
    assert on_disk["content_hash"] == second.manifest["content_hash"]
    # no shard of the old layout is left behind
    listed = {rel for split in SPLITS for rel in on_disk["shards"][split]}
    assert {str(p.relative_to(out)) for p in out.rglob("*.parquet")} == listed
    assert len(listed) > 3
    # and a third call with the new config reuses it
    assert prepare_dataset(changed, out).reused is True


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------


def test_success_leaves_no_temporary_folder(tmp_path):
    parent = tmp_path / "parent"
    prepare_dataset(SMALL, parent / "out")
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
    # and a rewrite with another config does not leave one either
    prepare_dataset(SMALL.model_copy(update={"seed": 5}), parent / "out")
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


def _fail_on_call(monkeypatch, n: int) -> list[int]:
    real = shards.encode_png
    calls = []

    def flaky(pixels):
        calls.append(1)
        if len(calls) == n:
            raise OSError("disk full (injected)")
        return real(pixels)

    monkeypatch.setattr(shards, "encode_png", flaky)
    return calls


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    calls = _fail_on_call(monkeypatch, 5)
    with pytest.raises(OSError, match="injected"):
        prepare_dataset(SMALL, parent / "out")
    assert len(calls) == 5  # the failure did happen mid-write
    assert not (parent / "out").exists()
    assert [p.name for p in parent.iterdir()] == []


def test_failure_while_rewriting_keeps_the_previous_set(tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    first = prepare_dataset(SMALL, parent / "out")
    before = _snapshot(parent / "out")
    _fail_on_call(monkeypatch, 40)  # mid-way through the train shard of the new set
    with pytest.raises(OSError, match="injected"):
        prepare_dataset(SMALL.model_copy(update={"seed": 7}), parent / "out")
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
    assert _snapshot(parent / "out") == before
    assert read_manifest(parent / "out") == first.manifest


def test_interrupt_mid_write_also_cleans_up(tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    real = shards.encode_png

    calls = []

    def interrupted(pixels):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(pixels)

    monkeypatch.setattr(shards, "encode_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(SMALL, parent / "out")
    assert [p.name for p in parent.iterdir()] == []


# ---------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------


def test_cached_dataset_lives_under_cache_data_key(tmp_path):
    cache = tmp_path / "cache"
    got = cached_dataset(SMALL, cache)
    assert got.path == cache / "data" / dataset_key(SMALL)
    assert (got.path / MANIFEST).is_file()
    assert dataset_key(SMALL).startswith("synthetic-32px-")
    assert got.reused is False
    assert cached_dataset(SMALL, str(cache)).reused is True
    other = SMALL.model_copy(update={"seed": 2})
    assert dataset_key(other) != dataset_key(SMALL)
    assert dataset_key(SMALL.model_copy()) == dataset_key(SMALL)
    assert cached_dataset(other, cache).path == cache / "data" / dataset_key(other)
    assert sorted(p.name for p in (cache / "data").iterdir()) == sorted([dataset_key(SMALL), dataset_key(other)])


# ---------------------------------------------------------------------------------------------------------
# split_per_identity
# ---------------------------------------------------------------------------------------------------------


def test_small_groups_go_to_train():
    identity = np.array([0, 0, 1, 1, 1, 1, 1, 2])
    emotion = np.array([3, 3, 0, 0, 0, 0, 0, 5])
    split = split_per_identity(identity, emotion, (0.7, 0.15, 0.15), seed=0)
    assert list(split[:2]) == ["train", "train"]
    assert split[7] == "train"
    assert sorted(split[2:7]) == ["test", "train", "train", "train", "val"]


def test_group_of_two_all_in_train_whatever_the_shares():
    split = split_per_identity(np.zeros(2, int), np.zeros(2, int), (0.2, 0.4, 0.4), seed=1)
    assert list(split) == ["train", "train"]


def test_group_of_three_splits_one_each():
    split = split_per_identity(np.zeros(3, int), np.zeros(3, int), (0.7, 0.15, 0.15), seed=0)
    assert sorted(split) == ["test", "train", "val"]


def test_split_is_seeded_and_stratified():
    identity = np.repeat(np.arange(5), NUM_EMOTIONS * 10)
    emotion = np.tile(np.repeat(np.arange(NUM_EMOTIONS), 10), 5)
    a = split_per_identity(identity, emotion, (0.7, 0.15, 0.15), seed=0)
    assert np.array_equal(a, split_per_identity(identity, emotion, (0.7, 0.15, 0.15), seed=0))
    assert not np.array_equal(a, split_per_identity(identity, emotion, (0.7, 0.15, 0.15), seed=1))
    for ident in range(5):
        for emo in range(NUM_EMOTIONS):
            group = a[(identity == ident) & (emotion == emo)]
            assert Counter(group) == {"train": 6, "val": 2, "test": 2}, Counter(group)


def test_every_group_of_three_or_more_keeps_each_split():
    DataConfig(variations=4, splits=(0.2, 0.4, 0.4))  # a config the validator accepts
    split = split_per_identity(np.zeros(4, int), np.zeros(4, int), (0.2, 0.4, 0.4), seed=0)
    assert set(split) == {"train", "val", "test"}, list(split)
