"""Export a trained generator as a self-contained model folder, and load one back safely.

A model folder holds:

* ``generator.pt``: a tensor-only checkpoint (``{"format", "networks": {"generator": {kind, config,
  state_dict}, ...}, "draws"}``; with more than one draw, or a generator told the expression, also the
  ``expression_reader`` that picks between draws, and for a generator told the expression the
  ``expression_teller`` that reads in the original the expression to tell it), read with
  ``torch.load(weights_only=True)``, so loading never unpickles arbitrary objects;
* ``generator.json``: the kind and config that rebuild the network, the weights' file name and SHA-256
  (a tampered or swapped weights file is refused before it is even read), its parameter count;
* ``model_card.json``: the run's model card when there is one, else a minimal card;
* ``README.md``: how to use it, and how it was judged.

Plain PyTorch: no Ray, nothing from training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from epd_ray.artifacts import ModelSpec, RunFolder, atomic_folder
from epd_ray.checkpoints import (READERS, CheckpointError, load_checkpoint, load_deidentifier, network_record,
                                 published_payload, require_network, save_checkpoint)
from epd_ray.core.draws import BestOfDraws
from epd_ray.core.networks import UNetGenerator, count_parameters
from epd_ray.evaluate.verdicts import faces_line, targets_line, verdict_line
from epd_ray.provenance import package_versions

WEIGHTS_FILE, SPEC_FILE = ModelSpec.WEIGHTS, ModelSpec.FILE
CARD_FILE = RunFolder.CARD  # a run's model card, copied along


class DeployError(ValueError):
    """A mistake the user can fix (bad path, refused output); the CLI prints it as one line, exit 2."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_source(source: Path) -> tuple[Path, Path | None]:
    """(checkpoint file holding a generator, model card or None) for a run folder, its best/ or a file."""
    source = Path(source)
    if source.is_file():
        card = source.parent / CARD_FILE
        return source, card if card.is_file() else None
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such run folder or checkpoint file")
    for folder in (RunFolder(source).best_dir, source):
        for name in ("generator.pt", "checkpoint.pt"):
            if (folder / name).is_file():
                card = folder / CARD_FILE
                return folder / name, card if card.is_file() else None
    raise FileNotFoundError(f"{source}: holds no best/generator.pt, generator.pt or checkpoint.pt to export")


def export_model(source: Path, out: Path) -> Path:
    """Write the model folder `out` from a run folder or a (trial or generator) checkpoint; returns `out`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DeployError(f"{out}: already exists and is not an empty folder; export needs a new folder")
    checkpoint_path, card_path = resolve_source(source)
    payload = load_checkpoint(checkpoint_path)
    record = require_network(payload, "generator", checkpoint_path)
    if record.get("kind") != "generator":
        raise CheckpointError(f"{checkpoint_path}: network 'generator' is of kind {record.get('kind')!r}")
    deidentifier = load_deidentifier(payload, checkpoint_path)  # proves the records rebuild before writing
    generator, reader, teller = deidentifier.generator, deidentifier.reader, deidentifier.teller
    config = dict(generator.config)

    with atomic_folder(out) as staging:  # an empty `out` (checked above) is replaced
        save_checkpoint(staging / WEIGHTS_FILE, published_payload(
            _tensor_record(record["kind"], generator),
            _tensor_record(READERS, reader) if reader is not None else None,
            deidentifier.draws, _tensor_record(READERS, teller) if teller is not None else None))
        run_card = read_card(card_path)
        spec = ModelSpec(config=config, weights=WEIGHTS_FILE, sha256=sha256_file(staging / WEIGHTS_FILE),
                         parameters=count_parameters(generator), draws=deidentifier.draws,
                         face_margin=_card_margin(run_card),
                         input="RGB face crop, float NCHW in [-1, 1] "
                               f"({config['image_size']}x{config['image_size']} px); output the same")
        spec.save(staging)
        if card_path is not None:
            shutil.copyfile(card_path, staging / CARD_FILE)
            card = run_card or {}
        else:
            card = {
                "model": "EPD-Net generator (pix2pix U-Net)",
                "source_checkpoint": str(Path(checkpoint_path).resolve()),
                "params": payload.get("params"),
                "round": payload["round"] + 1 if isinstance(payload.get("round"), int) else None,
                "versions": package_versions(),
            }
            (staging / CARD_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")
        (staging / "README.md").write_text(_readme(config, spec) + _judged(card))
    return out


def _tensor_record(kind: str, module: torch.nn.Module) -> dict[str, Any]:
    """A network's record with its weights as plain CPU tensors, detached from any training state."""
    record = network_record(kind, module)
    return {**record, "state_dict": {k: v.detach().cpu().clone() for k, v in record["state_dict"].items()}}


def _readme(config: dict[str, Any], spec: ModelSpec) -> str:
    size, parameters = config["image_size"], spec.parameters
    notes = (f" Each face is drawn {spec.draws} times (the noise z) and the draw published is the one its expression "
             "readers read most surely as the expression read in the original." if spec.draws > 1 else "")
    if config.get("expressions"):
        notes += (" The generator is told the expression to keep: the one the emotion classifiers it carries read "
                  "in the original face.")
    if spec.face_margin is not None:
        notes += (f" It learnt faces cut with {spec.face_margin:.2f} of the detected face's side around it on every "
                  "side, and `deidentify` cuts faces so unless `--margin` says otherwise.")
    return (
        "# EPD-Net face de-identification generator\n\n"
        f"A pix2pix U-Net generator ({parameters:,} parameters, {size}x{size} px faces, ngf {config['ngf']}, "
        f"{config['norm']} norm) exported by `epd-ray export`.{notes}\n\n"
        "Use: `epd-ray deidentify THIS_FOLDER INPUT OUTPUT` (INPUT an image, a folder or a video; "
        "`--aligned` for face crops).\n\n"
        "From Python: `from epd_ray.deploy import load_model; model = load_model('THIS_FOLDER')`, a torch "
        "module from float NCHW faces in [-1, 1] to their de-identified faces.\n\n"
        f"Files: `{WEIGHTS_FILE}` (tensors only, read with `torch.load(weights_only=True)`), `{SPEC_FILE}` "
        f"(config that rebuilds the network and the weights' SHA-256), `{CARD_FILE}` (where it came from).\n"
    )


def _judged(card: dict[str, Any]) -> str:
    """The run's test verdict in words, and what it does not cover: a model folder travels without its run
    folder, and whoever deploys it should know what it was judged on before trusting it with new people."""
    said = [line for line in (verdict_line(card.get("verdict")), targets_line(card.get("targets")),
                              faces_line(card.get("verdict"))) if line]
    check = ("`epd-ray evaluate --model MODEL --data NEW --pretrained NETWORKS` judges it on a prepared set of "
             "other people (NETWORKS: the file `epd-ray pretrain --data NEW --judges-only` writes, whose judges "
             "know them).")
    if not said:
        return f"\n## How it was judged\n\nNot yet: no evaluation came with it. {check}\n"
    faces, people = (card.get("targets") or {}).get("faces"), (card.get("data") or {}).get("identities")
    split = "On the test split of the set it learnt from" + (
        f" ({faces} faces: other photographs of the {people} people it trained on)" if faces and people else "")
    scores = card.get("pretrained_scores") or {}
    probe, seen = scores.get("new_people_probe"), scores.get("emotion_evaluator")
    new = ("These figures are for the people it learnt from; it may keep fewer expressions of people it never saw"
           + (f" (an emotion classifier that learnt from the set's other people read those of people it never saw "
              f"at {probe:.2f}, against {seen:.2f} for S_e on the people it learnt)" if probe is not None and seen
              else "") + ". A generator that learnt from a few people keeps far fewer: on JAFFE, one trained on 7 "
           f"people kept 0.45-0.52 of 3 others' expressions against 0.83 of its own people's. {check}")
    return "\n## How it was judged\n\n" + f"{split}:\n\n" + "".join(f"- {line}\n" for line in said) + f"\n{new}\n"


def read_spec(model: Path) -> ModelSpec:
    """A model folder's `generator.json`; FileNotFoundError or CheckpointError naming what is wrong."""
    spec_path = Path(model) / SPEC_FILE
    if not Path(model).is_dir():
        raise FileNotFoundError(f"{model}: no such model folder")
    if not spec_path.is_file():
        raise FileNotFoundError(f"{model}: not a model folder ({SPEC_FILE} missing; make one with "
                                "`epd-ray export RUN_DIR --out MODEL_DIR`)")
    try:
        spec = ModelSpec.from_dict(json.loads(spec_path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{spec_path}: unreadable model spec ({exc})") from None
    if spec is None:
        raise CheckpointError(f"{spec_path}: not an epd-ray generator spec")
    return spec


def training_margin(model: Path) -> float | None:
    """The context the model's training faces were cut with (`prepare.Framing`), which `deidentify` cuts
    faces with unless told otherwise: a model folder's `generator.json` says it, a checkpoint file's model
    card beside it; None where neither does (a model of synthetic faces, or exported before it was kept)."""
    model = Path(model)
    if model.is_dir():
        return read_spec(model).face_margin
    return _card_margin(read_card(model.parent / CARD_FILE))


def read_card(card: Path | None) -> dict[str, Any] | None:
    """A model card's contents; None where there is none or it cannot be read (a card only describes: never a
    reason to fail)."""
    if card is None or not Path(card).is_file():
        return None
    try:
        card = json.loads(card.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return card if isinstance(card, dict) else None


def _card_margin(card: dict[str, Any] | None) -> float | None:
    return ((card or {}).get("data") or {}).get("face_margin")


def load_model(model: Path, device: torch.device | str = "cpu") -> BestOfDraws:
    """The de-identifier of a model folder (or of a checkpoint file): its generator and, with more than one
    draw or a generator told the expression, the expression readers (and the tellers of a generator told the
    expression); in eval mode; never unpickles objects.

    A weights file whose SHA-256 differs from generator.json, or whose config differs from it, or that
    is not a tensor-only epd-ray checkpoint, raises CheckpointError naming the file.
    """
    model = Path(model)
    if model.is_file():  # a checkpoint file (RUN/best/generator.pt or a trial checkpoint)
        deidentifier = load_deidentifier(load_checkpoint(model), model)
    else:
        spec = read_spec(model)
        weights = model / Path(spec.weights).name  # never follow a path out of the folder
        if not weights.is_file():
            raise CheckpointError(f"{weights}: weights file missing")
        if sha256_file(weights) != spec.sha256:
            raise CheckpointError(f"{weights}: SHA-256 does not match {SPEC_FILE}; the file was changed or "
                                  "replaced, refusing to load it")
        payload = load_checkpoint(weights)
        record = payload["networks"].get("generator")
        if (record is None or record.get("kind") != "generator" or record.get("config") != spec.config
                or payload.get("draws", 1) != spec.draws):
            raise CheckpointError(f"{weights}: network does not match {SPEC_FILE}")
        deidentifier = load_deidentifier(payload, weights)
    if not isinstance(deidentifier.generator, UNetGenerator):
        raise CheckpointError(f"{model}: network 'generator' is not a U-Net generator")
    return deidentifier.to(device).eval()

