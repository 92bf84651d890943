"""Every file one stage hands to the next, in one Ray-free place.

* the prepared data set: a folder of Parquet shards and its manifest `dataset.json` (`read_manifest`);
* the pretrained-network cache: `<cache>/pretrained/<key>/pretrained.pt` and `val_score.json`, keyed by
  the data's content and the networks' own settings (`pretrained_key`, `PretrainedCache`);
* the run folder of `epd-ray tune`/`train`: `config.yaml`, the `experiment.json` marker, `best/` with the
  model card, `report/`, `pareto.json`, `ablation/` (`RunFolder`, `RunMarker`);
* the exported model folder: `generator.pt`, its spec `generator.json` (`ModelSpec`), `model_card.json`
  (its checks on loading live with the loader in `deploy/export.py`).

Writes go through `atomic_file`/`atomic_write_text`/`atomic_write_json` (a temporary sibling, fsync,
`os.replace`) and `atomic_folder` (a staging folder that replaces the old one only once complete; the old one
is kept until the new one is in place). Every stage (data, train, tune, evaluate, deploy) may import this
module; it imports only the config and plain Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from epd_ray.config import ExperimentConfig, resolved_yaml, stable_hash

MANIFEST = "dataset.json"
PRETRAINED_FILE = "pretrained.pt"
SCORES_FILE = "val_score.json"


def default_cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache of prepared data and pretrained networks: `cache_dir` when set, else ~/.cache/epd-ray."""
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "epd-ray"


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sibling(path: Path) -> Path:
    """A fresh hidden name next to `path` (the same file system, so `os.replace` is a rename)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """A temporary sibling of `path` to write; on success it is fsynced and renamed onto `path`, on failure
    removed. A crash mid-write leaves the previous file, never half of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's mode, like a plain write
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path | str, value: Any, *, newline: bool = False) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, default=str) + ("\n" if newline else ""))


@contextlib.contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """A staging folder next to `path` to fill; on success it takes `path`'s place (an old `path` is moved
    aside first and removed only once the new one is in place, put back if that fails); on failure the
    staging folder is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(path)
    staging.mkdir()  # the umask's mode: a shared cache stays readable to the cluster
    try:
        yield staging
        _fsync_dir(staging)
        old = None
        if path.exists() or path.is_symlink():
            old = _sibling(path)
            old.mkdir()
            os.replace(path, old / path.name)
        try:
            os.replace(staging, path)
        except BaseException:
            if old is not None:
                os.replace(old / path.name, path)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------
# the prepared data set
# --------------------------------------------------------------------------------------------------


def read_manifest(dataset_dir: Path | str) -> dict:
    """A prepared data set's `dataset.json`; FileNotFoundError naming the folder when it is not one."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{dataset_dir}: no {MANIFEST}; run `epd-ray data prepare` first")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class DatasetManifest:
    """`dataset.json`, typed: what training, evaluation and the caches read of a prepared data set. `raw` is
    the file's whole content (also the intake account, the warnings, the data config, the inputs'
    fingerprint), which `write_dataset` writes and `PreparedData.manifest` keeps as it is."""

    image_size: int
    identities: tuple[str, ...]  # identity index -> name
    emotions: tuple[str, ...]  # emotion index -> name
    num_images: int
    splits: dict[str, dict[str, Any]]  # split -> {"images": n, "per_identity_emotion": {"i/e": n}}
    shards: dict[str, list[str]]  # split -> shard files, relative to the data set's folder
    content_hash: str
    source: str = "synthetic"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DatasetManifest:
        return cls(image_size=int(raw["image_size"]), identities=tuple(raw["identities"]),
                   emotions=tuple(raw["emotions"]), num_images=int(raw["num_images"]), splits=raw["splits"],
                   shards=raw["shards"], content_hash=raw["content_hash"], source=raw.get("source", "synthetic"),
                   raw=raw)

    @classmethod
    def load(cls, dataset_dir: Path | str) -> DatasetManifest:
        return cls.from_dict(read_manifest(dataset_dir))

    def images(self, split: str) -> int:
        """How many faces `split` holds."""
        return int(self.splits[split]["images"])

    @property
    def face_margin(self) -> float | None:
        """The context its faces were cut with, as `epd-ray deidentify --margin` (`prepare.Framing`); None
        where it was not measured (synthetic faces, FER2013's rows, a set prepared before it was recorded)."""
        return (self.raw.get("intake") or {}).get("face_margin")


# --------------------------------------------------------------------------------------------------
# the pretrained-network cache
# --------------------------------------------------------------------------------------------------


PRETRAINING_VERSION = 2  # bump when pretraining's code changes what a network learns (2: strong augmentation)


def pretrained_key(exp: ExperimentConfig, content_hash: str) -> str:
    """Pretrained networks depend on the data's content and their own settings only: every trial shares them.

    `content_hash`: the faces' data set's; the emotion data set's (`verifiers.emotion_data`) is read from its
    manifest: its content counts, not where it lies.
    """
    model = exp.model.model_dump(mode="json", include={"ngf", "norm", "dropout", "warm_start_steps",
                                                       "warm_start_lr"})
    verifiers = exp.verifiers.model_dump(mode="json")
    for added, off in (("pickers", 0), ("new_people_probe", False), ("emotion_verifiers", 1)):
        if verifiers[added] == off:  # the key of caches from before the option existed
            del verifiers[added]
    if verifiers.pop("emotion_data", None):
        verifiers["emotion_data_hash"] = read_manifest(Path(exp.verifiers.emotion_data))["content_hash"]
    settings = {"verifiers": verifiers, "generator": model, "version": PRETRAINING_VERSION}
    return f"{content_hash}-{stable_hash(settings)}"


@dataclass(frozen=True)
class PretrainedCache:
    """`<cache>/pretrained/<key>/`: the pretrained networks' file and their validation scores."""

    root: Path  # the cache folder (`default_cache_dir`)

    def entry(self, key: str) -> Path:
        return Path(self.root) / "pretrained" / key

    def file(self, key: str) -> Path:
        return self.entry(key) / PRETRAINED_FILE

    def unfinished(self, key: str) -> Path:
        """Where the networks of an entry still in training wait, one checkpoint file each, so that a
        restart trains only what is missing; removed once the entry is complete."""
        return self.entry(f"{key}.unfinished")

    def scores(self, key: str) -> dict[str, float]:
        return json.loads((self.entry(key) / SCORES_FILE).read_text())

    @staticmethod
    def scores_beside(networks_file: Path | str | None) -> dict[str, float] | None:
        """The validation scores of a cache entry's networks file; None for a file from elsewhere."""
        path = Path(networks_file).parent / SCORES_FILE if networks_file else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    def find(self, config: dict[str, Any], content_hash: str) -> Path | None:
        """The networks file a run of `config` (a resolved config dict) on data `content_hash` used: the one
        entry for that data, or among several the one of this config's key; None when not there."""
        found = sorted((Path(self.root) / "pretrained").glob(f"{content_hash}-*/{PRETRAINED_FILE}"))
        if len(found) > 1:  # several verifier settings for this data: the one of this run's config
            key = pretrained_key(ExperimentConfig.model_validate(config), content_hash)
            found = [p for p in found if p.parent.name == key]
        return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunMarker:
    """`experiment.json`: which command made the run folder, for which config, data and fixed params."""

    kind: str  # "epd-ray tune" | "epd-ray train"
    config_digest: str | None
    data: str | None = None  # the prepared data folder given with --data
    params: dict[str, float] | None = None  # `epd-ray train`'s fixed setting
    started: str | None = None

    @classmethod
    def new(cls, kind: str, config_digest: str, data: str | None, params: dict[str, float] | None) -> RunMarker:
        return cls(kind, config_digest, data, params, datetime.now().isoformat(timespec="seconds"))


@dataclass(frozen=True)
class RunFolder:
    """The output folder of `epd-ray tune`/`train` and where each of its files lies."""

    path: Path
    MARKER = "experiment.json"
    CONFIG = "config.yaml"
    BEST = "best"
    CARD = "model_card.json"
    REPORT = "report"
    PARETO = "pareto.json"
    ABLATION = "ablation"
    RAY = "ray"  # Ray's storage when the config names none; Tune's experiment folder is SEARCH inside it
    SEARCH = "search"

    marker_path = property(lambda self: self.path / self.MARKER)
    config_path = property(lambda self: self.path / self.CONFIG)
    best_dir = property(lambda self: self.path / self.BEST)
    card_path = property(lambda self: self.path / self.BEST / self.CARD)
    report_dir = property(lambda self: self.path / self.REPORT)
    pareto_path = property(lambda self: self.path / self.PARETO)
    ablation_dir = property(lambda self: self.path / self.ABLATION)
    ray_dir = property(lambda self: self.path / self.RAY)
    search_dir = property(lambda self: self.path / self.RAY / self.SEARCH)

    def has_marker(self) -> bool:
        return self.marker_path.is_file()

    def read_marker(self, default_kind: str) -> RunMarker:
        """The marker; fields an older run folder lacks take their defaults (`default_kind` for the kind)."""
        held = json.loads(self.marker_path.read_text())
        return RunMarker(kind=held.get("kind", default_kind), config_digest=held.get("config_digest"),
                         data=held.get("data"), params=held.get("params"), started=held.get("started"))

    def write_config(self, exp: ExperimentConfig) -> None:
        """Every run writes its options, resolved, whole or not at all."""
        atomic_write_text(self.config_path, resolved_yaml(exp))

    def write_marker(self, marker: RunMarker) -> None:
        atomic_write_text(self.marker_path, json.dumps(asdict(marker)))

    def finished(self) -> bool:
        """The model card is written last: a run folder holding one is complete."""
        return self.card_path.is_file()

    def read_card(self) -> dict[str, Any]:
        return json.loads(self.card_path.read_text())

    def write_card(self, card: dict[str, Any]) -> None:
        atomic_write_text(self.card_path, json.dumps(card, indent=2))

    def write_pareto(self, metrics: list[str], front: list[dict[str, Any]]) -> None:
        atomic_write_json(self.pareto_path, {"metrics": list(metrics), "split": "val", "trials": front})


# --------------------------------------------------------------------------------------------------
# the exported model folder
# --------------------------------------------------------------------------------------------------

MODEL_FORMAT = "epd-ray-generator"
MODEL_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """`generator.json` of a model folder: the config that rebuilds the generator, its weights file and that
    file's SHA-256 (a swapped or changed weights file is refused before it is read), and the draws of its
    noise per face (the weights file then also holds the expression reader that picks one, as it does for a
    generator told the expression; core/draws.py)."""

    config: dict[str, Any]
    sha256: str | None
    weights: str = "generator.pt"
    parameters: int | None = None
    input: str | None = None
    draws: int = 1
    face_margin: float | None = None  # the context its training faces were cut with: `deidentify`'s default margin
    format: str = MODEL_FORMAT
    version: int = MODEL_VERSION
    kind: str = "generator"
    FILE = "generator.json"
    WEIGHTS = "generator.pt"

    @classmethod
    def from_dict(cls, raw: Any) -> ModelSpec | None:
        """The spec, or None when `raw` is not an epd-ray generator spec."""
        if not isinstance(raw, dict) or raw.get("format") != MODEL_FORMAT or raw.get("kind") != "generator" \
                or not isinstance(raw.get("config"), dict) or not isinstance(raw.get("weights"), str):
            return None
        return cls(config=raw["config"], sha256=raw.get("sha256"), weights=raw["weights"],
                   parameters=raw.get("parameters"), input=raw.get("input"), draws=raw.get("draws", 1),
                   face_margin=raw.get("face_margin"), version=raw.get("version", MODEL_VERSION))

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "kind": self.kind, "config": self.config,
                "weights": self.weights, "sha256": self.sha256, "parameters": self.parameters, "input": self.input,
                "draws": self.draws, "face_margin": self.face_margin}

    def save(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / self.FILE, self.to_dict(), newline=True)
