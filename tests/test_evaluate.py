"""`epd-ray evaluate` and `epd-ray report` on a tiny data set with tiny (untrained) networks: no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from epd_ray.artifacts import DatasetManifest
from epd_ray.checkpoints import network_record, save_checkpoint
from epd_ray.cli import app
from epd_ray.config import DataConfig
from epd_ray.core.labels import EMOTIONS, NUM_EMOTIONS
from epd_ray.core.networks import build_network
from epd_ray.core.synthetic import make_synthetic_faces
from epd_ray.data.prepare import prepare_dataset
from epd_ray.data.shards import load_split
from epd_ray.evaluate.evaluate import load_judges
from epd_ray.evaluate.report import FIGURES, GRID_PAD, ORIGINAL_ROW, reader_table

JUDGE_KEYS = {"cmc_misclassification", "emotion_mse", "emotion_preserved", "ssim", "objective", "privacy", "utility",
              "expression_kept", "reidentified", "reidentified_original"}
PAPER_KEYS = {"deid_rate", "switching_deid_rate", "genuine_acceptance", "paper_objective"}
PER_IMAGE_COLUMNS = {"method", "index", "identity", "emotion", "ssim"} | {
    f"{j}_{c}" for j in ("evaluators", "verifiers")
    for c in ("true_identity_distance", "min_other_distance", "top5_identities", "emotion_original", "emotion_deid")}
IDS = 4


def save_judges(path: Path, identities: int, names: list[str] | None = None) -> Path:
    """A pretrained-networks file with untrained judges that tell `identities` people apart (`names`: whom,
    as pretraining records it)."""
    nets = {"identity_verifier": build_network("identity_verifier", num_identities=identities, image_size=32,
                                               width=0.125),
            "emotion_verifier": build_network("emotion_verifier"),
            "identity_evaluator": build_network("identity_evaluator", num_classes=identities, base_width=4,
                                                blocks=(1, 1)),
            "emotion_evaluator": build_network("emotion_evaluator", num_classes=NUM_EMOTIONS, base_width=4,
                                               blocks=(1, 1), grey=True)}
    save_checkpoint(path, {"networks": {name: network_record(name, net) for name, net in nets.items()},
                           **({"identities": names} if names is not None else {})})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared tiny data set, a pretrained-networks file and a generator checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    data = prepare_dataset(DataConfig(num_identities=IDS, variations=3, image_size=32), root / "data").path
    torch.manual_seed(0)
    pretrained = save_judges(root / "pretrained.pt", IDS)
    generator = root / "generator.pt"
    save_checkpoint(generator, {"networks": {"generator": network_record(
        "generator", build_network("generator", image_size=32, ngf=4))}})
    return {"root": root, "data": data, "pretrained": pretrained, "generator": generator,
            "test_images": len(load_split(data, "test"))}


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def common(world) -> list[str]:
    return ["--data", world["data"], "--pretrained", world["pretrained"]]


@pytest.fixture(scope="module")
def model_eval(world):
    out = world["root"] / "model_eval"
    result = invoke("evaluate", "--model", world["generator"], *common(world), "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def check_outputs(out: Path, methods: set[str], n: int,
                  judges=("evaluators", "verifiers", "parrot", "denoised")) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == methods and metrics["images"] == n
    for judged in metrics["methods"].values():
        assert set(judged) == set(judges)
        for name, m in judged.items():
            assert JUDGE_KEYS <= set(m) and len(m["cmc_misclassification"]) == 5 and m["num_probes"] == n
            assert PAPER_KEYS <= set(m) or name in ("parrot", "denoised", "recogniser")
    assert set(metrics["mu_sweep"]) == methods
    table = pq.read_table(out / "per_image.parquet")
    assert table.num_rows == n * len(methods) and PER_IMAGE_COLUMNS <= set(table.column_names)
    assert all(len(t) == min(5, IDS) for t in table.column("evaluators_top5_identities").to_pylist())
    return metrics


def test_evaluate_checkpoint_writes_metrics_and_per_image(world, model_eval):
    metrics = check_outputs(model_eval, {"epd-net"}, world["test_images"])
    # The targets are the model's own figures against the configured limits, whichever way they went.
    targets, model = metrics["targets"], metrics["methods"]["epd-net"]
    assert targets["reidentified"] == {"evaluators": model["evaluators"]["reidentified"],
                                       "parrot": model["parrot"]["reidentified"],
                                       "denoised": model["denoised"]["reidentified"]}
    assert targets["expression_met"] == (model["evaluators"]["expression_kept"] >= targets["min_expression_kept"])
    assert targets["reader_expression_kept"] is None  # synthetic faces: no pretrained reader


@pytest.mark.parametrize("baseline, name", [("identity", "no_change"), ("blur", "blur"), ("pixelate", "pixelate"),
                                            ("ksame", "ksame")])
def test_evaluate_each_baseline(world, baseline, name):
    out = world["root"] / f"baseline_{baseline}"
    result = invoke("evaluate", "--baseline", baseline, *common(world), "--out", out, "--k", "3",
                    "--blur-sigma", "2", "--pixelate-blocks", "4", "--mu", "0.5")
    assert result.exit_code == 0, result.output
    metrics = check_outputs(out, {name}, world["test_images"])
    assert metrics["mu"] == 0.5
    if name == "no_change":
        ev = metrics["methods"][name]["evaluators"]
        assert ev["ssim"] == pytest.approx(1.0) and ev["emotion_mse"] == 0.0 and ev["cmc_misclassification"][4] <= ev[
            "cmc_misclassification"][0]
        for judged in metrics["methods"][name].values():  # doing nothing hides nobody, under every judge
            assert judged["privacy"] == 0.0 and judged["objective"] == 0.0


def test_a_capped_evaluation_judges_as_many_faces_of_every_person_and_says_how_many_of_the_split(world):
    out = world["root"] / "capped"
    result = invoke("evaluate", "--model", world["generator"], *common(world), "--probes", IDS, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = check_outputs(out, {"epd-net"}, IDS)
    assert metrics["split_images"] == world["test_images"] > IDS
    table = pq.read_table(out / "per_image.parquet").to_pandas()
    assert sorted(table.identity) == list(range(IDS))  # one face of every person
    assert f"{IDS} of its {world['test_images']} faces" in result.output


def test_mu_sweep_is_monotonic(model_eval):
    sweep = json.loads((model_eval / "metrics.json").read_text())["mu_sweep"]["epd-net"]
    assert sweep["mu"] == sorted(sweep["mu"]) and len(sweep["mu"]) > 10
    for key, sign in (("deid_rate", -1), ("switching_deid_rate", -1), ("genuine_acceptance", 1)):
        steps = np.diff(sweep[key]) * sign
        assert (steps >= -1e-12).all(), key


@pytest.fixture(scope="module")
def fake_run(world):
    """What `epd-ray tune` leaves: best/ with a model card, report/metrics.json with the trials."""
    run = world["root"] / "run"
    (run / "best").mkdir(parents=True)
    (run / "report").mkdir()
    (run / "best" / "generator.pt").write_bytes(world["generator"].read_bytes())
    card = {"params": {"mu": 0.4}, "pretrained_path": str(world["pretrained"]),
            "data": {"path": str(world["data"])}, "config": {"train": {"seed": 0}}}
    (run / "best" / "model_card.json").write_text(json.dumps(card))
    trials = [{"trial_id": f"t{i}", "status": "ok", "rounds": 2, "params": {"mu": 0.4, "phi": 0.1 * i},
               "metrics": {"objective": p * u, "privacy": p, "utility": u, "deid_rate": p, "emotion_preserved": u,
                           "ssim": 0.5, "time_total_s": 10.0 * i}}
              for i, (p, u) in enumerate([(0.2, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1)])]
    (run / "report" / "metrics.json").write_text(json.dumps({"mu": 0.4, "trials": trials, "best_trial": "t1"}))
    return run


def grid_tiles(path: Path, rows: int, cols: int, side: int) -> list[list[np.ndarray]]:
    img = np.asarray(Image.open(path).convert("RGB"))
    step = side + GRID_PAD
    assert img.shape[:2] == (GRID_PAD + rows * step, GRID_PAD + cols * step)
    return [[img[GRID_PAD + r * step:GRID_PAD + r * step + side, GRID_PAD + c * step:GRID_PAD + c * step + side]
             for c in range(cols)] for r in range(rows)]


def test_report_files_numbers_and_no_originals(world, fake_run):
    result = invoke("report", fake_run)
    assert result.exit_code == 0, result.output
    report_dir = fake_run / "report"
    for name in [*FIGURES.values(), "report.md", "metrics.json", "per_image.parquet"]:
        assert (report_dir / name).is_file() and (report_dir / name).stat().st_size > 0, name
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"epd-net", "no_change", "blur", "pixelate", "ksame"}
    assert metrics["mu"] == 0.4 and len(metrics["trials"]) == 4 and metrics["best_trial"] == "t1"
    text = (report_dir / "report.md").read_text()
    for judged in metrics["methods"].values():
        for judge in ("evaluators", "verifiers"):
            m = judged[judge]
            for key in ("objective", "deid_rate", "switching_deid_rate", "emotion_mse", "ssim"):
                assert f"{m[key]:.4f}" in text, key
            assert " | ".join(f"{v:.4f}" for v in m["cmc_misclassification"]) in text
    for name in FIGURES.values():
        assert f"]({name})" in text
    model = metrics["methods"]["epd-net"]["evaluators"]
    counts = np.array(model["expression_confusion"])  # rows: the expressions S_e reads right unchanged
    assert counts.shape == (len(metrics["emotions"]),) * 2
    assert counts.sum() == round(model["emotion_accuracy_original"] * metrics["images"])
    assert np.trace(counts) / counts.sum() == pytest.approx(model["expression_kept"])
    assert "## Expressions kept, one by one" in text
    for i, (name, row) in enumerate(zip(metrics["emotions"], counts)):
        assert (f"| {name} | {row[i]} of {row.sum()} " if row.sum() else f"| {name} | - |") in text

    originals = load_split(world["data"], "test").pixels[metrics["sample_index"]]
    scale = -(-96 // 32)
    rows = ["epd-net", "blur", "pixelate", "ksame"]
    assert f"Rows, top to bottom: {', '.join(rows)}." in text
    tiles = grid_tiles(report_dir / "samples.png", len(rows), len(originals), 32 * scale)
    big = [o.repeat(scale, 0).repeat(scale, 1) for o in originals]
    assert not any(np.array_equal(tile, b) for row in tiles for tile, b in zip(row, big))

    written = (report_dir / "metrics.json").stat().st_mtime_ns
    result = invoke("report", fake_run, "--show-originals")
    assert result.exit_code == 0, result.output
    assert (report_dir / "metrics.json").stat().st_mtime_ns == written  # complete now: read, never rewritten
    text = (report_dir / "report.md").read_text()
    assert f"Rows, top to bottom: {ORIGINAL_ROW}, epd-net, no_change, blur" in text
    tiles = grid_tiles(report_dir / "samples.png", len(rows) + 2, len(originals), 32 * scale)
    assert all(np.array_equal(tile, b) for tile, b in zip(tiles[0], big))


@pytest.mark.parametrize("args, named", [
    (["--model", "/no/such/run", "--out", "{out}"], "/no/such/run"),
    (["--baseline", "swirl", "--data", "{data}", "--pretrained", "{pretrained}", "--out", "{out}"], "swirl"),
    (["--model", "{generator}", "--out", "{out}"], "--data"),
    (["--model", "{generator}", "--data", "{data}", "--out", "{out}"], "--pretrained"),
    (["--model", "{generator}", "--data", "{data}", "--pretrained", "/no/such/file.pt", "--out", "{out}"],
     "/no/such/file.pt"),
    (["--model", "{generator}", "--data", "/no/such/data", "--pretrained", "{pretrained}", "--out", "{out}"],
     "/no/such/data"),
    (["--model", "{generator}", "--data", "{data}", "--pretrained", "{pretrained}", "--split", "dev",
      "--out", "{out}"], "dev"),
    (["--model", "{data}/dataset.json", "--data", "{data}", "--pretrained", "{pretrained}", "--out", "{out}"],
     "dataset.json"),
])
def test_evaluate_bad_input_is_one_line_exit_2(world, tmp_path, args, named):
    values = {"out": tmp_path / "out", "data": world["data"], "pretrained": world["pretrained"],
              "generator": world["generator"]}
    result = invoke("evaluate", *[a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_judges_pretrained_on_other_people_are_refused_naming_the_file_and_what_to_do(world, tmp_path):
    """An identity evaluator that learnt other people would give noise, not privacy, on this set's faces."""
    others = save_judges(tmp_path / "others.pt", IDS + 1)
    result = invoke("evaluate", "--model", world["generator"], "--data", world["data"], "--pretrained", others,
                    "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(others) in lines[0] and f"{IDS + 1} people" in lines[0], lines
    assert "epd-ray pretrain --data" in lines[0] and not (tmp_path / "out").exists()
    # as many people, but others: the file names whom its networks learnt, and they are not these
    strangers = save_judges(tmp_path / "strangers.pt", IDS, names=["ann", "bob", "cy", "dee"])
    result = invoke("evaluate", "--model", world["generator"], "--data", world["data"], "--pretrained", strangers,
                    "--out", tmp_path / "out")
    assert result.exit_code == 2 and "learnt other people (ann, bob, cy, dee)" in result.stderr, result.output
    manifest = DatasetManifest.load(world["data"])
    own = save_judges(tmp_path / "own.pt", IDS, names=list(manifest.identities))
    assert set(load_judges(own, torch.device("cpu"), manifest, world["data"])) == {"evaluators", "verifiers"}


def test_report_of_missing_run_is_one_line_exit_2(tmp_path):
    result = invoke("report", tmp_path / "nothing")
    assert result.exit_code == 2 and "nothing" in result.stderr and result.stderr.startswith("error:")


def test_generator_noise_depends_on_its_seed_not_on_what_ran_before():
    from epd_ray.core.scoring import GeneratorMethod

    torch.manual_seed(0)
    generator = build_network("generator", image_size=32, ngf=8)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    first = GeneratorMethod(generator, seed=3)(x)
    torch.rand(1000)  # another method, or another evaluation, drew from the global RNG in between
    state = torch.get_rng_state()
    again = GeneratorMethod(generator, seed=3)(x)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert not torch.equal(first, GeneratorMethod(generator, seed=4)(x))  # z is on: the seed matters


def test_the_parrot_runs_a_model_that_draws_noise_on_its_gallery_parrot_draws_times_and_a_baseline_once(world):
    """An attacker who holds the model de-identifies each gallery face several times and names probes by the
    mean of those embeddings: a stand-in that varies from draw to draw is found at its centre (on JAFFE, one
    model's test faces: 0.21-0.37 named over nine galleries of one draw, 0.49 by a mean of four). A baseline
    gives the same faces every time."""
    from epd_ray.config import EvaluationConfig
    from epd_ray.core.baselines import gaussian_blur
    from epd_ray.core.scoring import GeneratorMethod
    from epd_ray.evaluate.evaluate import run_evaluation

    class Counted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.generator, self.calls = build_network("generator", image_size=32, ngf=4), []

        def forward(self, x):
            self.calls.append(len(x))
            return self.generator(x)

    blur_calls = []

    def blur(x):
        blur_calls.append(len(x))
        return gaussian_blur(x, 2.0)

    model = Counted()
    metrics = run_evaluation({"epd-net": GeneratorMethod(model, seed=0), "blur": blur}, dataset_dir=world["data"],
                             pretrained_path=world["pretrained"], split="test", mu=0.35,
                             cfg=EvaluationConfig(parrot_draws=3)).metrics
    gallery = len(load_split(world["data"], "train").per_identity(EvaluationConfig().gallery_per_identity))
    assert model.calls == [world["test_images"]] + [gallery] * 3
    assert blur_calls == [world["test_images"], gallery]
    assert metrics["methods"]["epd-net"]["parrot"]["draws"] == 3 and metrics["methods"]["blur"]["parrot"]["draws"] == 1


def test_real_faces_are_judged_by_the_recogniser_and_read_by_the_pretrained_expression_reader(world, model_eval,
                                                                                               tmp_path):
    """A folder of face images is a real set to epd-ray: the pretrained recogniser is the main judge (its
    embedding feeds the parrot and the denoiser) and, next to S_e, the FER-2013 reader reads every method's
    faces, in metrics.json, per_image.parquet, the printed summary and the report. Doing nothing scores 0
    under every judge and changes none of the reader's readings. (That blurring costs the recogniser the
    person: tests/test_judges.py, on a real face.)"""
    faces = make_synthetic_faces(IDS, 3, 32, seed=5)
    for i, (pixels, ident, emo) in enumerate(zip(faces.pixels, faces.identity, faces.emotion)):
        folder = tmp_path / "faces" / f"p{ident}" / EMOTIONS[emo]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    data = prepare_dataset(DataConfig(source="folder", path=str(tmp_path / "faces"), image_size=32),
                           tmp_path / "data").path
    out = tmp_path / "eval"
    result = invoke("evaluate", "--baseline", "identity", "--baseline", "blur", "--data", data,
                    "--pretrained", world["pretrained"], "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for judged in metrics["methods"].values():
        assert set(judged["reader"]) == {"read_original", "read", "expression_kept", "expression_confusion"}
    judged = metrics["methods"]["no_change"]
    assert metrics["main_judge"] == "recogniser" == judged["parrot"]["embedding"] == judged["denoised"]["embedding"]
    for name in ("evaluators", "verifiers", "recogniser", "parrot", "denoised"):
        assert judged[name]["privacy"] == 0.0 and judged[name]["objective"] == 0.0, name
    rec = judged["recogniser"]
    assert rec["reidentified"] == rec["reidentified_original"] > 0.5  # dlib tells the synthetic people apart
    assert {"verified", "verified_original", "face_found", "face_found_original"} <= set(rec)
    assert "r1 recogn" in result.output
    unchanged = judged["reader"]
    assert unchanged["read"] == unchanged["read_original"]
    table = pq.read_table(out / "per_image.parquet").to_pandas()
    same = table[table.method == "no_change"]
    assert (same.reader_emotion_original == same.reader_emotion_deid).all()
    assert "kept rdr" in result.output
    assert "expression kept (reader)" in "\n".join(reader_table(metrics))
    assert reader_table(json.loads((model_eval / "metrics.json").read_text())) == []  # synthetic: no reader
