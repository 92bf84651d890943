"""Deployment: export a generator as a model folder, load it safely, de-identify images, folders and videos.

Tiny random generator (32 px, ngf 4), no Ray, no training: the checks are about plumbing and safety
(what is written where, what is refused), not about how good the faces look.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
import subprocess
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from epd_ray.checkpoints import (CheckpointError, load_network, network_record, published_payload, readers_record,
                                 save_checkpoint)
from epd_ray.cli import app
from epd_ray.core.draws import BestOfDraws
from epd_ray.core.networks import EmotionVerifier, UNetGenerator
from epd_ray.core.synthetic import make_synthetic_faces
from epd_ray.deploy import DeidentifyOptions, DeployError, FaceEngine, deidentify, export_model, load_model
from epd_ray.core.images import to_tensor, to_uint8
from epd_ray.deploy.engine import draw_seeds, seeded_noise
from epd_ray.deploy.faces import IoUTracker
from epd_ray.faces import Box, HaarDetector, make_detector

FAST = DeidentifyOptions(progress=False, device="cpu", batch_size=4).__dict__


def options(**kw) -> DeidentifyOptions:
    return DeidentifyOptions(**{**FAST, **kw})


@pytest.fixture(scope="module")
def trial_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    generator = UNetGenerator(image_size=32, ngf=4)
    path = tmp_path_factory.mktemp("trial") / "checkpoint.pt"
    save_checkpoint(path, {"networks": {"generator": network_record("generator", generator)}, "round": 4,
                           "params": {"alpha": 0.5, "mu": 0.9}})
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trial_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    result = CliRunner().invoke(app, ["export", str(trial_checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """Synthetic faces the Haar cascade finds once pasted onto a plain background (checked in a test)."""
    return make_synthetic_faces(1, 1, 128, seed=0).pixels


def scene(face: np.ndarray, size: int, at: tuple[int, int] = (60, 40), shape=(240, 320)) -> np.ndarray:
    image = np.full((*shape, 3), 185, np.uint8)
    small = np.array(Image.fromarray(face).resize((size, size), Image.BILINEAR))
    x, y = at
    image[y:y + size, x:x + size] = small
    return image


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- export


def test_export_folder_holds_weights_config_card_readme(model_dir, trial_checkpoint):
    assert sorted(p.name for p in model_dir.iterdir()) == ["README.md", "generator.json", "generator.pt",
                                                          "model_card.json"]
    spec = json.loads((model_dir / "generator.json").read_text())
    assert spec["kind"] == "generator" and spec["config"]["image_size"] == 32 and spec["config"]["ngf"] == 4
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["round"] == 5 and card["params"]["alpha"] == 0.5 and "torch" in card["versions"]
    assert "epd-ray deidentify" in (model_dir / "README.md").read_text()
    # tensor-only: loads with weights_only and holds nothing but the generator
    payload = torch.load(model_dir / "generator.pt", weights_only=True)
    assert set(payload["networks"]) == {"generator"} and "optimizers" not in payload


def test_round_trip_gives_identical_outputs_for_a_fixed_seed(model_dir, trial_checkpoint, faces):
    crops = np.stack([np.array(Image.fromarray(f).resize((32, 32))) for f in faces[:5]])
    original = FaceEngine(load_network(trial_checkpoint, "generator"), device="cpu", batch_size=8)
    exported = FaceEngine(load_model(model_dir), device="cpu", batch_size=2)  # other batching, same answer
    seeds = [11, 12, 13, 14, 15]
    a, b = original(crops, seeds), exported(crops, seeds)
    assert np.array_equal(a, b)
    assert np.array_equal(exported(crops[2:3], [13]), a[2:3])  # a face's output ignores its batch neighbours
    assert not np.array_equal(exported(crops, [21, 22, 23, 24, 25]), a)  # the seed is the noise z
    deterministic = FaceEngine(load_model(model_dir), device="cpu", noise=False)
    assert np.array_equal(deterministic(crops, seeds), deterministic(crops, [1, 2, 3, 4, 5]))


def test_a_model_of_several_draws_publishes_each_face_s_surest_draw_and_travels_whole(tmp_path, faces):
    torch.manual_seed(0)
    generator, reader = UNetGenerator(image_size=32, ngf=4), EmotionVerifier()
    with torch.no_grad():
        for p in generator.parameters():  # a generator whose draws differ clearly (a fresh one's barely do)
            p.mul_(10)
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, {**published_payload(network_record("generator", generator),
                                                     network_record("emotion_verifier", reader), 4), "round": 0})
    model = export_model(checkpoint, tmp_path / "model")
    assert json.loads((model / "generator.json").read_text())["draws"] == 4
    networks = torch.load(model / "generator.pt", weights_only=True)["networks"]
    assert set(networks) == {"generator", "expression_reader"}
    reader = networks["expression_reader"]  # a checkpoint from when S alone picked: S over six views
    assert reader["kind"] == "expression_readers" and reader["config"]["views"]
    assert [m["kind"] for m in reader["config"]["members"]] == ["emotion_verifier"]
    crops = np.stack([np.array(Image.fromarray(f).resize((32, 32))) for f in faces[:5]])
    seeds = [11, 12, 13, 14, 15]
    engine = FaceEngine(load_model(model), device="cpu", batch_size=2)
    published = engine(crops, seeds)
    single = FaceEngine(generator, device="cpu")
    drawn = np.stack([single(crops, draw_seeds(seeds, k)) for k in range(4)])  # (draws, faces, ...)
    assert np.array_equal(drawn[0], single(crops, seeds))  # the first draw is the face's own seed
    # each face is one of its draws (the reader's choice between them: tests/test_networks.py), not always the first
    gap = np.abs(published[None].astype(int) - drawn.astype(int)).reshape(4, 5, -1).max(axis=2)
    assert (gap.min(axis=0) <= 1).all() and (gap[0] > 1).any()
    fresh = FaceEngine(load_model(model), device="cpu", batch_size=1)
    assert np.array_equal(fresh(crops[2:3], [13]), published[2:3])  # still independent of batch neighbours
    # A seed keeps the draw chosen when it was first seen (a video track does not switch draws between frames)
    switched = 0
    for seed in range(90, 98):
        first = engine(crops[:1], [seed])
        kept = int(np.argmin([np.abs(first.astype(int) - single(crops[:1], draw_seeds([seed], k)).astype(int)).max()
                              for k in range(4)]))
        later = engine(crops[1:2], [seed])
        assert np.abs(later.astype(int) - single(crops[1:2], draw_seeds([seed], kept)).astype(int)).max() <= 1
        switched += not np.array_equal(later, fresh(crops[1:2], [seed]))
    assert switched  # for some seeds a first look at the later face would have chosen another draw


def test_a_model_told_the_expression_travels_with_its_readers_and_tellers_and_draws_what_they_tell(tmp_path, faces):
    """A generator told the expression (`model.expression_input`) needs its readers even for one draw, and
    travels with its tellers: they read the expression in each original, once per batch, and the generator is
    told it."""
    torch.manual_seed(0)
    generator, reader = UNetGenerator(image_size=32, ngf=4, expressions=7), EmotionVerifier()
    with torch.no_grad():
        for p in generator.parameters():  # a generator whose faces differ clearly with the expression told
            p.mul_(10)
    tellers = [EmotionVerifier() for _ in range(2)]
    with torch.no_grad():
        for teller in tellers:  # they read every face as surprised, unlike the reader
            teller.head.bias.fill_(-20.0)
            teller.head.bias[6] = 20.0
    tellers = readers_record([network_record("emotion_verifier", teller) for teller in tellers], views=False)
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, {**published_payload(network_record("generator", generator),
                                                     network_record("emotion_verifier", reader), 1, tellers),
                                 "round": 0})
    model = export_model(checkpoint, tmp_path / "model")
    assert set(torch.load(model / "generator.pt", weights_only=True)["networks"]) == {
        "generator", "expression_reader", "expression_teller"}
    assert "told the expression" in (model / "README.md").read_text()
    loaded = load_model(model)
    assert len(loaded.teller.members) == 2
    crops = np.stack([np.array(Image.fromarray(f).resize((32, 32))) for f in faces[:5]])
    seeds = [11, 12, 13, 14, 15]
    reads = {"reader": [], "teller": []}
    hooks = [getattr(loaded, name).register_forward_hook(lambda _module, args, _out, name=name: reads[name].append(
        len(args[0]))) for name in reads]
    published = FaceEngine(loaded, device="cpu", batch_size=2)(crops, seeds)
    for hook in hooks:
        hook.remove()
    assert reads == {"reader": [], "teller": [2, 2, 1]}  # each batch's originals read once: one draw needs no pick
    x = to_tensor(crops)
    with torch.no_grad():
        reading = loaded.read_original(x).argmax(1)
        assert reading.tolist() == [6] * 5 and loaded.read(x).argmax(1).tolist() != [6] * 5
        with seeded_noise(loaded.generator, seeds):
            told = to_uint8(loaded.generator(x, reading))
        with seeded_noise(loaded.generator, seeds):
            other = to_uint8(loaded.generator(x, (reading + 1) % 7))
    assert np.abs(published.astype(int) - told.astype(int)).max() <= 1
    assert np.abs(published.astype(int) - other.astype(int)).max() > 1  # what it is told shows


def test_a_video_track_is_told_the_expression_read_over_its_recent_frames(faces):
    """A one-frame misreading does not change a tracked face's expression; one read in two frames running does,
    and a new track is told at once what its face is read as."""
    torch.manual_seed(0)
    generator, reader = UNetGenerator(image_size=32, ngf=4, expressions=7), EmotionVerifier().eval()
    with torch.no_grad():
        for p in generator.parameters():  # a generator whose faces differ clearly with the expression told
            p.mul_(10)
    engine = FaceEngine(BestOfDraws(generator, reader), device="cpu")
    crop = np.array(Image.fromarray(faces[0]).resize((32, 32)))[None]

    def read_as(expression: int) -> None:  # the reader reads every face as `expression`, surely
        with torch.no_grad():
            reader.head.bias.fill_(-50.0)
            reader.head.bias[expression] = 50.0

    def told(expression: int, seed: int) -> np.ndarray:
        with torch.no_grad(), seeded_noise(generator, [seed]):
            return to_uint8(generator(to_tensor(crop), torch.tensor([expression])))

    def shows(face: np.ndarray, expression: int, seed: int) -> bool:
        return np.abs(face.astype(int) - told(expression, seed).astype(int)).max() <= 1

    assert not shows(told(2, 7), 5, 7)  # the two expressions give faces apart
    read_as(2)
    assert shows(engine(crop, [7]), 2, 7)
    read_as(5)
    assert shows(engine(crop, [7]), 2, 7)  # one frame read otherwise: still the track's expression
    assert shows(engine(crop, [8]), 5, 8)  # a new track: what its face is read as
    assert shows(engine(crop, [7]), 5, 7)  # two frames running: the track follows


def test_draws_may_be_lowered_at_deployment_and_one_is_the_generator_alone(tmp_path, faces):
    """--draws trades expressions kept for speed: one draw publishes what a model of one draw publishes (the
    face's own seed), the model's own number changes nothing, and a model of one draw cannot pick."""
    torch.manual_seed(0)
    generator = UNetGenerator(image_size=32, ngf=4)
    with torch.no_grad():
        for p in generator.parameters():  # a generator whose draws differ clearly (a fresh one's barely do)
            p.mul_(10)
    several, single = tmp_path / "several.pt", tmp_path / "single.pt"
    save_checkpoint(several, published_payload(network_record("generator", generator),
                                               network_record("emotion_verifier", EmotionVerifier()), 4))
    save_checkpoint(single, published_payload(network_record("generator", generator), None, 1))
    src = tmp_path / "crops"
    src.mkdir()
    for i, face in enumerate(faces[:5]):
        Image.fromarray(np.array(Image.fromarray(face).resize((32, 32)))).save(src / f"c{i}.png")

    def run(model: Path, name: str, draws: int | None) -> list[np.ndarray]:
        deidentify(model, src, tmp_path / name, options(aligned=True, draws=draws))
        return [np.array(Image.open(tmp_path / name / f"c{i}.png")) for i in range(5)]

    own, four, one, alone = run(several, "own", None), run(several, "four", 4), run(several, "one", 1), run(
        single, "alone", None)
    assert all(np.array_equal(a, b) for a, b in zip(own, four))
    assert all(np.array_equal(a, b) for a, b in zip(one, alone))
    assert any(not np.array_equal(a, b) for a, b in zip(own, one))  # some face's surest draw is not its first
    with pytest.raises(DeployError, match=r"--draws 3: .*single\.pt was trained to draw once"):
        run(single, "three", 3)
    with pytest.raises(DeployError, match=r"--draws must be in \[1, 64\], got 0"):
        run(several, "none", 0)


def test_a_grey_photograph_gives_a_grey_face_and_a_colour_one_keeps_its_colour(tmp_path, faces):
    torch.manual_seed(0)
    generator, reader = UNetGenerator(image_size=32, ngf=4), EmotionVerifier()
    with torch.no_grad():
        for p in generator.parameters():  # a generator that draws colour (a fresh one's output is near grey)
            p.mul_(10)
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, {**published_payload(network_record("generator", generator),
                                                     network_record("emotion_verifier", reader), 3), "round": 0})
    colour = np.stack([np.array(Image.fromarray(f).resize((32, 32))) for f in faces[:3]])
    grey = np.repeat(np.array(Image.fromarray(faces[3]).resize((32, 32)).convert("L"))[None, ..., None], 3, 3)
    for model in (load_model(export_model(checkpoint, tmp_path / "model")), generator):  # 3 draws, and one
        out = FaceEngine(model, device="cpu")(np.concatenate([colour, grey]), [1, 2, 3, 4])
        assert np.array_equal(out[3, ..., 0], out[3, ..., 1]) and np.array_equal(out[3, ..., 0], out[3, ..., 2])
        assert (out[:3, ..., 0] != out[:3, ..., 1]).mean() > 0.25  # colour faces are not made grey


def test_export_of_a_run_folder_copies_its_model_card_and_says_how_it_was_judged(tmp_path, trial_checkpoint):
    """The model folder travels without its run: its README repeats the run's test verdict, says that the
    figures are for the people the model learnt from (with the new-people probe's figure when pretraining
    had one) and how to judge it on others; a model exported without an evaluation says it was not judged."""
    best = tmp_path / "run" / "best"
    best.mkdir(parents=True)
    (best / "generator.pt").write_bytes(trial_checkpoint.read_bytes())
    verdict = {"judge": "recogniser", "beats_baselines": False, "objective": 0.1, "strongest_baseline": "blur",
               "strongest_baseline_objective": 0.2, "margin": -0.1, "baselines": {"no_change": 0.0, "blur": 0.2}}
    card = {"model": "from the run", "trial": "t1", "verdict": verdict, "data": {"identities": 7},
            "pretrained_scores": {"new_people_probe": 0.61, "emotion_evaluator": 0.93}}
    (best / "model_card.json").write_text(json.dumps(card))
    out = export_model(tmp_path / "run", tmp_path / "model")
    assert json.loads((out / "model_card.json").read_text())["trial"] == "t1"
    readme = (out / "README.md").read_text()
    assert "## How it was judged" in readme and "does NOT beat the baselines" in readme
    assert "people it never saw at 0.61, against 0.93" in readme and "epd-ray evaluate --model" in readme
    plain = (export_model(trial_checkpoint, tmp_path / "plain") / "README.md").read_text()
    assert "Not yet: no evaluation came with it" in plain and "beat" not in plain


def test_deidentify_cuts_faces_with_the_margin_the_model_s_training_faces_had(tmp_path, trial_checkpoint, faces):
    """A run trained on faces with room around them (its model card says how much): the exported model
    carries that margin and `deidentify` cuts faces with it, so the generator gets the framing it learnt;
    --margin still decides (with a warning when it frames faces otherwise), and a model that does not say
    cuts at the default (the box itself)."""
    best = tmp_path / "run" / "best"
    best.mkdir(parents=True)
    (best / "generator.pt").write_bytes(trial_checkpoint.read_bytes())
    (best / "model_card.json").write_text(json.dumps({"data": {"face_margin": 0.4}}))
    model = export_model(tmp_path / "run", tmp_path / "model")
    assert json.loads((model / "generator.json").read_text())["face_margin"] == 0.4
    assert "0.40 of the detected face's side" in (model / "README.md").read_text()
    plain = export_model(trial_checkpoint, tmp_path / "plain")
    assert json.loads((plain / "generator.json").read_text())["face_margin"] is None

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(scene(faces[0], 100, at=(110, 70))).save(src / "one.png")
    changed, said, warned = {}, {}, {}
    for name, folder, margin in (("trained", model, None), ("told", model, 0.0), ("plain", plain, None)):
        summary = deidentify(folder, src, tmp_path / name, options(margin=margin))
        assert summary.faces_replaced == 1 and summary.margin == (0.4 if name == "trained" else 0.0)
        out = np.array(Image.open(tmp_path / name / "one.png")).astype(int)
        changed[name] = np.abs(out - np.array(Image.open(src / "one.png")).astype(int)).sum(axis=2) > 8
        said[name], warned[name] = "\n".join(summary.lines()), summary.warnings
    assert "margin of 0.40 of their side (as the model's training faces were)" in said["trained"]
    assert "margin of 0.00 of their side\n" in said["plain"] + "\n" and "training faces" not in said["plain"]
    assert any(w.startswith("--margin 0: the model learnt faces cut with 0.4") for w in warned["told"])
    assert warned["trained"] == [] and warned["plain"] == []
    assert changed["trained"].sum() > 1.5 * changed["plain"].sum()  # the square, and so the blend, is larger
    assert np.array_equal(changed["told"], changed["plain"])
    options(margin=2.0).check()  # as much as preparation may record for photographs taken whole
    with pytest.raises(DeployError, match=r"--margin must be in \[0, 2\], got 2.5"):
        deidentify(model, src, tmp_path / "too_much", options(margin=2.5))


def test_export_refuses_a_non_empty_folder_and_a_missing_source(tmp_path, trial_checkpoint):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(trial_checkpoint), "--out", str(tmp_path / "model")])
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "model" in result.stderr
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")])
    assert result.exit_code == 2 and "nothing" in result.stderr and not (tmp_path / "m2").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_tampered_or_foreign_weights_are_refused(tmp_path, model_dir):
    bad = tmp_path / "tampered"
    bad.mkdir()
    for p in model_dir.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    data = bytearray((bad / "generator.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "generator.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="generator.pt"):
        load_model(bad)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    result = CliRunner().invoke(app, ["deidentify", str(bad), str(tmp_path / "x.png"), str(tmp_path / "y.png")])
    assert result.exit_code == 2 and "generator.pt" in result.stderr

    class Evil:  # a pickle that would run code if unpickled
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "pwned", "ran"))

    (bad / "generator.pt").write_bytes(pickle.dumps({"format": 1, "networks": Evil()}))
    spec = json.loads((bad / "generator.json").read_text())
    spec["sha256"] = hashlib.sha256((bad / "generator.pt").read_bytes()).hexdigest()  # a consistent forgery
    (bad / "generator.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="generator.pt"):
        load_model(bad)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------- images


def test_the_bundled_detector_finds_the_test_faces(faces):
    detector = HaarDetector()
    for size in (64, 96, 128):
        boxes = detector.detect(scene(faces[0], size))
        assert len(boxes) == 1 and boxes[0].w > size // 2
    assert detector.detect(np.full((240, 320, 3), 185, np.uint8)) == []


def test_folder_of_mixed_images_summary_and_inputs_untouched(tmp_path, model_dir, faces):
    src = tmp_path / "in"
    (src / "people").mkdir(parents=True)
    Image.fromarray(scene(faces[0], 128)).save(src / "people" / "one.png")
    two = scene(faces[0], 96, at=(20, 30))
    two[120:216, 200:296] = np.array(Image.fromarray(faces[0]).resize((96, 96), Image.BILINEAR))
    Image.fromarray(two).save(src / "people" / "two.jpg", quality=95)
    Image.fromarray(np.full((80, 120, 3), 60, np.uint8)).save(src / "empty.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    (src / "notes.txt").write_text("not an image")
    before = digest(src)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["deidentify", str(model_dir), str(src), str(out), "--no-progress",
                                      "--device", "cpu", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert digest(src) == before  # no input touched
    text = result.stdout
    assert "files: 5 (3 images, 0 videos), 2 failed, 3 written" in text
    assert "faces found: 3, faces replaced: 3" in text
    assert "files with no face: 1" in text and "empty.png" in text
    assert "broken.jpg" in text and "broken.mp4" in text and "notes.txt" in text
    assert "people/two.jpg: 2 faces" in text
    assert sorted(digest(out)) == ["empty.png", "people/one.png", "people/two.jpg"]
    one_in, one_out = np.array(Image.open(src / "people" / "one.png")), np.array(Image.open(out / "people" / "one.png"))
    assert np.abs(one_in.astype(int) - one_out)[60:150, 80:170].mean() > 5  # the face is replaced
    assert np.array_equal(one_in[:, 250:], one_out[:, 250:]) and np.array_equal(one_in[200:], one_out[200:])


def test_no_face_policy_blur_copy_skip(tmp_path, model_dir):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(src / "noise.png")
    for policy in ("blur", "copy", "skip"):
        summary = deidentify(model_dir, src, tmp_path / policy, options(on_no_face=policy))
        assert summary.no_face == ["noise.png"] and summary.faces_found == 0
        written = tmp_path / policy / "noise.png"
        if policy == "skip":
            assert not written.exists() and summary.skipped == ["noise.png"] and summary.written == 0
            continue
        out = np.array(Image.open(written))
        if policy == "copy":
            assert np.array_equal(out, pixels)
        else:
            assert out.shape == pixels.shape and out.astype(float).std() < pixels.astype(float).std() / 3


def test_detector_flags_change_what_is_found(tmp_path, model_dir, faces):
    src = tmp_path / "a.png"
    Image.fromarray(scene(faces[0], 96)).save(src)
    base = ["deidentify", str(model_dir), str(src), "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, [*base, str(tmp_path / "o1.png")])
    assert result.exit_code == 0 and "faces found: 1" in result.stdout, result.output
    result = CliRunner().invoke(app, [*base, str(tmp_path / "o2.png"), "--min-face", "150"])
    assert result.exit_code == 0 and "faces found: 0" in result.stdout and "no face found in: a.png" in result.stdout
    result = CliRunner().invoke(app, [*base, str(tmp_path / "o3.png"), "--on-no-face", "maybe"])
    assert result.exit_code == 2 and "--on-no-face" in result.stderr and not (tmp_path / "o3.png").exists()


def test_output_carries_no_exif(tmp_path, model_dir, faces):
    src = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    exif[0x0131] = "secret-software"  # Software
    Image.fromarray(scene(faces[0], 128)).save(src, exif=exif.tobytes(), quality=95)
    assert Image.open(src).getexif()
    out = tmp_path / "clean.jpg"
    summary = deidentify(model_dir, src, out, options())
    assert summary.faces_replaced == 1 and summary.written == 1
    with Image.open(out) as img:
        assert not img.getexif() and "exif" not in img.info and "icc_profile" not in img.info
    assert b"CameraMaker" not in out.read_bytes() and b"secret-software" not in out.read_bytes()


def test_aligned_crops_go_straight_through_at_their_own_size(tmp_path, model_dir, faces):
    src = tmp_path / "crops"
    src.mkdir()
    for i, size in enumerate((40, 48, 75)):
        Image.fromarray(np.array(Image.fromarray(faces[0]).resize((size, size)))).save(src / f"c{i}.png")
    summary = deidentify(model_dir, src, tmp_path / "out", options(aligned=True))
    assert summary.images == 3 and summary.faces_replaced == 3 and not summary.no_face
    for i, size in enumerate((40, 48, 75)):
        a = np.array(Image.open(src / f"c{i}.png"))
        b = np.array(Image.open(tmp_path / "out" / f"c{i}.png"))
        assert b.shape == a.shape and not np.array_equal(a, b)


def test_output_may_not_overwrite_inputs(tmp_path, model_dir, faces):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(scene(faces[0], 64)).save(image)
    before = digest(tmp_path / "in")
    for output in (image, tmp_path / "in", tmp_path / "in" / "out"):
        args = ["deidentify", str(model_dir), str(image if output == image else tmp_path / "in"), str(output)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (output, result.output)
        assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "in" / "in").mkdir()  # in/in/a.png would be written to OUTPUT/in/a.png, an input, if OUTPUT = in/..
    Image.fromarray(scene(faces[0], 64)).save(tmp_path / "in" / "in" / "a.png")
    before = digest(tmp_path / "in")
    with pytest.raises(DeployError, match="input file"):
        deidentify(model_dir, tmp_path / "in", tmp_path, options())
    assert digest(tmp_path / "in") == before


# ---------------------------------------------------------------------------------------------- video


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames, fps


def test_video_keeps_frame_count_fps_and_size(tmp_path, model_dir, faces):
    frames = [scene(faces[0], 112, at=(60 + 2 * i, 40)) for i in range(12)]
    src = tmp_path / "clip.avi"
    write_video(src, frames, fps=12.0)
    warnings: list[str] = []
    summary = deidentify(model_dir, src, tmp_path / "out", options(), warn=warnings.append)
    assert summary.videos == 1 and summary.frames == 12 and not summary.failed
    out, fps = read_video(tmp_path / "out" / "clip.avi")
    assert len(out) == 12 and fps == pytest.approx(12.0) and out[0].shape == frames[0].shape
    assert summary.faces_found >= 10 and summary.faces_replaced >= 12  # missed frames coast on the track
    changed = [np.abs(o.astype(int) - f).mean() for o, f in zip(out, frames)]
    assert min(changed) > 1.0 and not warnings


def test_tracked_face_keeps_its_seed(tmp_path):
    tracker = IoUTracker(base_seed=3)
    a = tracker.update([Box(10, 10, 50, 50), Box(200, 10, 50, 50)])
    b = tracker.update([Box(205, 12, 50, 50), Box(12, 11, 50, 50)])
    assert {box.x // 100: tid for box, tid in a} == {box.x // 100: tid for box, tid in b}
    c = tracker.update([])  # a missed frame: both tracks coast on their last box
    assert sorted(t for _, t in c) == [0, 1]


def test_audio_mux_failure_is_only_a_warning(tmp_path, model_dir, faces, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    real = imageio_ffmpeg.get_ffmpeg_exe()
    fake = bin_dir / "ffmpeg"  # encodes with the real ffmpeg; fails the audio mux like an ffmpeg that cannot copy
    fake.write_text(f"#!/bin/sh\ncase \"$*\" in *'1:a?'*) echo \"$@\" >> {calls}\n"
                    f"  echo 'Could not find tag for codec' >&2; exit 1;; esac\nexec {real} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    src = tmp_path / "clip.avi"
    write_video(src, [scene(faces[0], 112) for _ in range(4)], fps=8.0)
    warnings: list[str] = []
    summary = deidentify(model_dir, src, tmp_path / "out.avi", options(), warn=warnings.append)
    assert summary.written == 1 and not summary.failed
    args = calls.read_text()
    assert "-map 1:a?" in args and "-map_metadata -1" in args and str(src) in args
    assert any("without sound" in w for w in warnings)
    assert len(read_video(tmp_path / "out.avi")[0]) == 4
    assert not list(tmp_path.glob(".out*"))  # no partial file left behind


def probe(path: Path) -> str:
    """ffmpeg's description of a media file's streams (`ffmpeg -i` prints it and exits 1: no output named)."""
    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                          text=True).stderr


class MissingDetector:
    """The real detector, blind on chosen frames (counted by calls): a detector's miss, on demand."""

    def __init__(self, blind: set[int]):
        self.inner, self.blind, self.calls = make_detector(), blind, []

    def detect(self, rgb: np.ndarray) -> list[Box]:
        self.calls.append(len(self.calls))
        return [] if self.calls[-1] in self.blind else self.inner.detect(rgb)


def face_changed(out: list[np.ndarray], frames: list[np.ndarray], xs: list[int]) -> list[float]:
    """Mean absolute change inside each frame's face square (112 px at x, y 40)."""
    return [np.abs(o[40:152, x:x + 112].astype(int) - f[40:152, x:x + 112]).mean() for o, f, x in zip(out, frames, xs)]


def test_video_track_covers_the_frames_the_detector_misses(tmp_path, model_dir, faces, monkeypatch):
    xs = [60 + 4 * i for i in range(10)]
    frames = [scene(faces[0], 112, at=(x, 40)) for x in xs]
    src = tmp_path / "clip.avi"
    write_video(src, frames, fps=10.0)
    blind = MissingDetector({3, 4, 5})
    module = importlib.import_module("epd_ray.deploy.deidentify")  # the package's `deidentify` is the function
    monkeypatch.setattr(module, "make_detector", lambda *a, **k: blind)  # `blind` as bound when called
    summary = deidentify(model_dir, src, tmp_path / "held.mp4", options(on_no_face="copy"))
    assert summary.faces_found == 7 and summary.faces_tracked == 3 and summary.faces_replaced == 10
    assert "covered by tracking alone: 3" in "\n".join(summary.lines())
    out, _ = read_video(tmp_path / "held.mp4")
    assert min(face_changed(out, frames, xs)) > 8  # every frame's face replaced, the missed ones too
    blind = MissingDetector({3, 4, 5})  # the track held one frame only: frames 4 and 5 go out as they came
    summary = deidentify(model_dir, src, tmp_path / "short.mp4", options(on_no_face="copy", track_hold=1))
    changed = face_changed(read_video(tmp_path / "short.mp4")[0], frames, xs)
    assert summary.faces_tracked == 1 and changed[3] > 8 and max(changed[4:6]) < 4
    blind = MissingDetector(set())  # detection on every third frame, tracking in between
    summary = deidentify(model_dir, src, tmp_path / "every3.mp4", options(detect_every=3))
    assert len(blind.calls) == 4 and summary.faces_tracked == 6 and summary.faces_replaced == 10
    assert min(face_changed(read_video(tmp_path / "every3.mp4")[0], frames, xs)) > 8


def test_video_is_h264_at_the_input_fps_and_size_with_its_audio(tmp_path, model_dir, faces):
    silent = tmp_path / "silent.avi"
    write_video(silent, [scene(faces[0], 112, at=(60 + 2 * i, 40)) for i in range(12)], fps=12.0)
    src = tmp_path / "talk.mkv"  # the same frames with one second of a 440 Hz tone
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(silent), "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:v", "copy", "-c:a", "pcm_s16le", "-metadata",
                    "location=+48.85+002.35/", str(src)], check=True)
    base = ["deidentify", str(model_dir), str(src), "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, [*base, str(tmp_path / "out.mp4")])
    assert result.exit_code == 0 and "covered by tracking alone" in result.stdout, result.output
    info = probe(tmp_path / "out.mp4")
    assert "Video: h264" in info and "320x240" in info and "12 fps" in info and "Audio: aac" in info, info
    assert "location" not in info  # no metadata of the input
    out, fps = read_video(tmp_path / "out.mp4")
    assert len(out) == 12 and fps == pytest.approx(12.0) and out[0].shape == (240, 320, 3)
    result = CliRunner().invoke(app, [*base, str(tmp_path / "rough.mp4"), "--crf", "45"])
    assert result.exit_code == 0 and (tmp_path / "rough.mp4").stat().st_size < (tmp_path / "out.mp4").stat().st_size
    result = CliRunner().invoke(app, [*base, str(tmp_path / "bad.mp4"), "--crf", "60"])
    assert result.exit_code == 2 and "--crf" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.25])
def test_the_blend_mask_replaces_the_face_to_near_its_box_edge_and_fades_out_before_the_square_edge(margin):
    """A face cut with little or no margin (the square on the box itself) is still replaced up to its box's
    outer tenth, hairline and chin, and the new face fades out before the edge of the square it was drawn in."""
    from epd_ray.deploy.faces import face_mask
    from epd_ray.faces import Box, face_region

    box = Box(100, 100, 150, 200)  # a face box taller than wide, as CenterFace's are
    region = face_region(box, margin)
    mask = face_mask(region)
    cx, top, bottom = box.x + box.w // 2 - region.x0, box.y - region.y0, box.y + box.h - region.y0
    assert mask[top + box.h // 10, cx] > 0.85 and mask[bottom - box.h // 10, cx] > 0.85
    assert mask[region.side // 2, region.side // 2] == pytest.approx(1.0)
    assert max(mask[0].max(), mask[-1].max(), mask[:, 0].max(), mask[:, -1].max()) < 0.15
