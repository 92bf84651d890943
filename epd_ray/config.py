"""One typed configuration for every stage.

Defaults live here and only here; YAML presets (`tune_configs/*.yaml`) fill in what differs, command-line
flags override single keys, and every run writes the resolved result next to its outputs, so a run can
always be repeated and a checkpoint always rebuilt. Unknown keys and out-of-range values are refused with
the name of the field, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from epd_ray.core.labels import CONTEMPT, EMOTIONS

PRESETS_DIR = Path(__file__).parent / "presets"
SQRT2 = math.sqrt(2.0)


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the field or file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the faces come from and how they are prepared (`data/sources.py`, `data/prepare.py`)."""

    source: Literal["synthetic", "folder", "manifest", "rafd", "fer2013"] = "synthetic"
    path: str | None = Field(None, description="folder (folder, rafd), CSV/Parquet manifest or FER2013 CSV")
    image_size: int = Field(32, ge=32, le=256)
    num_identities: int = Field(12, ge=2, le=1000, description="synthetic source: people in the set")
    variations: int = Field(10, ge=3, le=1000, description="synthetic source: images per identity and emotion")
    rafd_angles: tuple[str, ...] = Field(("090",), description="rafd: camera angles kept (000 045 090 135 180)")
    rafd_gazes: tuple[str, ...] = Field(("frontal", "left", "right"), description="rafd: gazes kept")
    face_crop: Literal["auto", "head", "square"] = Field(
        "auto", description="how each face is cut from its image: head = the square around the largest detected "
                            "face, as `epd-ray deidentify` cuts faces (full frames; an image with no face found is "
                            "rejected); square = the centred square (images that are face crops already); auto = "
                            "head for rafd and for a folder or manifest of photographs (in most of the first 32 "
                            "images the face spans under 80% of the image), square otherwise")
    face_detector: Literal["centerface", "haar"] = Field(
        "centerface", description="face detector of the head crop (rafd_detector, its old name, is read too)",
        validation_alias=AliasChoices("face_detector", "rafd_detector"))
    include_contempt: bool = Field(False, description="keep RaFD's eighth class, contemptuous")
    label_map: dict[str, str] = Field(default_factory=dict, description="the set's own emotion labels to class "
                                      "names (e.g. {mad: angry}), besides the built-in synonyms (anger, happiness...)")
    manifest_columns: dict[str, str] = Field(default_factory=dict, description="manifest source: the column of "
                                             "path, identity and emotion where it is not one of their usual names "
                                             "(e.g. {path: picture, emotion: mood})")
    max_image_pixels: int = Field(50_000_000, ge=1, description="larger images are refused undecoded (bombs)")
    seed: int = 0
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    shard_rows: int = Field(1024, ge=16)

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return str(Path(v).expanduser().resolve()) if v else v  # the same input, wherever the command runs

    @model_validator(mode="after")
    def _path_for_file_sources(self) -> "DataConfig":
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"source {self.source!r} needs data.path (its folder or file)")
        if self.source == "synthetic" and self.path:
            raise ValueError("the synthetic source takes no data.path")
        unknown = set(self.rafd_angles) - {"000", "045", "090", "135", "180"}
        if unknown:
            raise ValueError(f"rafd_angles: unknown angle(s) {sorted(unknown)} (000 045 090 135 180)")
        unknown = {g.lower() for g in self.rafd_gazes} - {"frontal", "left", "right"}
        if unknown:
            raise ValueError(f"rafd_gazes: unknown gaze(s) {sorted(unknown)} (frontal left right)")
        return self

    @field_validator("label_map")
    @classmethod
    def _known_classes(cls, v: dict[str, str]) -> dict[str, str]:
        classes = (*EMOTIONS, CONTEMPT)
        mapped = {label.strip().lower(): name.strip().lower() for label, name in v.items()}
        for label, name in mapped.items():
            if name not in classes:
                raise ValueError(f"{label!r} -> {name!r}: not a class ({', '.join(classes)})")
        return mapped

    @field_validator("manifest_columns")
    @classmethod
    def _known_roles(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - {"path", "identity", "emotion"}
        if unknown:
            raise ValueError(f"{', '.join(sorted(unknown))}: not a manifest column's role (path, identity, emotion)")
        return v

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("must be a power of two (32, 64, 128 or 256): the U-Net halves it log2(size) times")
        return v

    @field_validator("splits")
    @classmethod
    def _splits_sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("train/val/test shares must be positive and sum to 1")
        return v


class VerifiersConfig(_Strict):
    """The frozen verifiers V (VGG-16) and S (mini-Xception), and the independent evaluators V_e, S_e.

    All four train from scratch on the train split; the evaluators differ in architecture and seed from
    the verifiers, so a generator that fools V has not automatically fooled V_e. The expression pickers, when
    asked for, train beside them; no loss trains the generator against them and no metric reads them.
    """

    identity_width: float = Field(0.25, gt=0, le=1.0, description="VGG-16 channel multiplier")
    evaluator_width: int = Field(16, ge=4, le=64, description="ResNet-18 base width of the evaluators")
    steps: int = Field(300, ge=1, description="optimiser steps per network (the same updates at any data size, "
                                              "unless `min_passes` asks for more)")
    min_passes: float = Field(0.0, ge=0, description="on a large set, a classifier trains for at least this many "
                              "passes over its training images (up to `max_steps`): `steps` alone leaves it "
                              "half-learnt there (train/pretrain.classifier_steps); 0: `steps` at any size")
    max_steps: int | None = Field(None, ge=1, description="the most steps `min_passes` may give a classifier")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(5e-4, gt=0, description="identity networks (VGG-16 needs a small one from scratch)")
    emotion_lr: float = Field(2e-3, gt=0, description="emotion networks (mini-Xception: 0.90 at 5e-4, 1.00 at 2e-3)")
    augment: bool = Field(True, description="classifiers learn through random mirrors, rotations, scalings, shifts, "
                                            "blur and noise (train.pretrain.augment): on small sets they read the "
                                            "face, not the photograph")
    emotion_data: str | None = Field(None, description="a prepared emotion-labelled set (e.g. FER2013) that S, "
                                                       "S_e and the pickers learn from instead of the face set's train "
                                                       "split")
    emotion_verifiers: int = Field(1, ge=1, le=8, description="emotion verifiers S that L_CE reads through: the "
                                   "paper's one mini-Xception, or more of its shape with seeds of their own, L_CE "
                                   "then on the mean of their probabilities (not in the paper; train/gan.py): an "
                                   "expression that several S read is more often one the judges read too")
    pickers: int = Field(0, ge=0, le=8, description="expression pickers: emotion classifiers of their own seeds (S_e's "
                                                  "shape) trained beside S that pick between the model.draws draws "
                                                  "(core/draws.py); 0: S picks")
    new_people_probe: bool = Field(False, description="one more emotion classifier of S_e's shape, trained on the "
                                   "train faces of two people in three and read on the faces of the third: how "
                                   "well this set's expressions carry to people a network never saw (what a "
                                   "deployed model meets); a warning when far below S_e's figure")
    seed: int = 1

    @field_validator("emotion_data")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return str(Path(v).expanduser().resolve()) if v else v
    evaluator_seed: int = 2


class ModelConfig(_Strict):
    """Generator and discriminator shape (the paper's section III)."""

    ngf: int = Field(16, ge=4, le=128)
    ndf: int = Field(16, ge=4, le=128)
    n_layers: int = Field(3, ge=1, le=5)
    norm: Literal["batch", "instance"] = "batch"
    dropout: float = Field(0.5, ge=0, lt=1)
    median_output: bool = Field(False, description="pass the generator's output through a 3x3 median, in training "
                                                   "as in publication (not in the paper; core/networks.py)")
    draws: int = Field(1, ge=1, le=64, description="draws of the noise z per face when de-identifying (validation, "
                                                   "evaluation, deployment); the one published is the draw the "
                                                   "expression readers (verifiers.pickers, else S) read most surely as "
                                                   "the expression read in the original (core/draws.py). 1: the "
                                                   "generator alone")
    expression_input: bool = Field(False, description="tell the generator the expression to keep: one-hot channels "
                                   "beside x, the label in training, what S, its siblings and the pickers read "
                                   "in the original in publication (not in the paper; core/networks.py, "
                                   "checkpoints.expression_tellers)")
    real_pair: Literal["other_identity_same_emotion", "any_real"] = "other_identity_same_emotion"
    warm_start_steps: int = Field(750, ge=0, description="autoencoder optimiser steps before GAN training; 0: from "
                                                         "noise")
    warm_start_lr: float = Field(1e-3, gt=0)

    @model_validator(mode="after")
    def _draws_need_noise(self) -> "ModelConfig":
        if self.draws > 1 and self.dropout == 0:
            raise ValueError(f"draws {self.draws} need the noise z (dropout > 0): without it every draw is the same")
        return self


class LossConfig(_Strict):
    """Loss weights of equation 11 and the hinge margin of equation 9 (the paper's equations 1-12)."""

    lambda1: float = Field(1.0, ge=0, le=1)
    lambda2: float = Field(1.0, ge=0, le=1)
    lambda3: float = Field(1.0, ge=0, le=1)
    phi: float = Field(0.25, ge=0, le=1)
    alpha: float = Field(1.0, gt=0, le=SQRT2)
    diversity: float = Field(0.0, ge=0, le=1, description="weight of L_diversity (not in the paper; 0 is the paper): "
                             "each face is drawn twice per step and V asked to read different stand-ins in "
                             "photographs of one person (core/losses.py)")


class TrainConfig(_Strict):
    """GAN training run by Ray Train workers."""

    steps: int = Field(90, ge=1, description="optimiser steps of G (and of D) per trial, at any data size")
    report_every: int = Field(15, ge=1, description="steps per round: one validation, checkpoint and Tune report "
                                                    "(ASHA's grace_period counts rounds)")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each Train worker of a trial holds (its torch threads, "
                                   "rounded): more finish a trial sooner, fewer run more trials at once; pretraining "
                                   "shares the cores apart from it (train.run.cpu_lanes)")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = Field(True, description="channels-last memory format on GPUs; on CPU for the GAN only "
                                "(pretraining keeps NCHW there: `train.worker.use_channels_last`)")
    keep_shard: bool = Field(True, description="keep each worker's shard in memory after the first Ray Data pass "
                                               "when no random augmentation needs a new pass over the data")
    flip: bool = Field(False, description="mirror faces at random (Ray Data map_batches, every pass anew), each "
                                          "face's real pair alike")
    max_shift: int = Field(0, ge=0, le=32, description="shift faces by up to this many px at random, each face's "
                                                       "real pair alike")
    verifier_views: bool = Field(False, description="show the generator's output to V and S through the "
                                 "verifiers' own training transforms (mirror, rotation, scale, shift, blur, noise; "
                                 "new draws every step), so that the loss rewards a change of identity and an "
                                 "expression that survive them, not pixels only V and S read (not in the paper)")
    ema_half_life_steps: float = Field(15.0, ge=0, description="half-life, in steps, of the generator's weight "
                                                               "average that is scored and published (0: the raw "
                                                               "weights)")
    max_failures: int = Field(2, ge=-1, description="restarts of a trial (or of pretraining) from its latest "
                                                    "checkpoint after losing workers or nodes (-1: always, 0: never)")
    seed: int = 0


class EvaluationConfig(_Strict):
    """How results are judged: the judges, the objective J and the baselines (see `evaluate.judges`)."""

    judge: Literal["auto", "evaluators", "recogniser"] = Field(
        "auto", description="whose J the search maximises: recogniser = dlib's pretrained face recogniser (real "
                            "faces), evaluators = V_e/S_e trained here; auto: recogniser unless the data is synthetic")
    gallery_per_identity: int = Field(10, ge=1, description="train-split images per identity in the recogniser's "
                                                            "and the parrot attack's gallery")
    parrot_draws: int = Field(4, ge=1, description="how many times the parrot attack de-identifies each of its "
                              "gallery faces with the published model, naming probes by the mean of their "
                              "embeddings: a stand-in that differs from draw to draw around one per person is "
                              "found at its centre (JAFFE, one model: 0.21-0.37 of the test faces named over nine "
                              "galleries of one draw, 0.49 by the mean of four draws); the baselines draw no noise")
    val_probes: int = Field(200, ge=1, description="at most this many val-split faces (a fixed share of every "
                                                   "identity) score each round of every trial: a round's judging "
                                                   "cost stays bounded on large sets (the recogniser takes about "
                                                   "0.1 s a face of a core the trial shares); the test split's "
                                                   "bound is test_probes")
    test_probes: int = Field(600, ge=0, description="at most this many faces of the split judged after training "
                             "(the test split; a fixed share of every identity), 0: all: each face is judged with "
                             "the model and four baselines, by the recogniser three times over (on JAFFE 1.2 s a "
                             "face on 2 cores), so a large set's closing evaluation stays bounded; the 95% "
                             "intervals beside the targets say how precise the figures are")
    mu: float = Field(0.35, gt=0, le=SQRT2)
    max_reidentified: float = Field(0.3, ge=0, le=1, description="privacy target: the largest share of "
                                    "de-identified test faces that the main judge, or the parrot attack (an "
                                    "attacker who knows the tool), may still name at rank 1")
    min_expression_kept: float = Field(0.9, ge=0, le=1, description="expression target: the smallest share of "
                                       "expressions read correctly in the original (by the main judge's emotion "
                                       "reader) that must still be read correctly after de-identification")
    ssim_weight: float = Field(0.25, ge=0, le=4)
    blur_sigma: float = Field(3.0, gt=0)
    pixelate_blocks: int = Field(6, ge=1)
    batch_size: int = Field(128, ge=1)


class Range(_Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


# A time budget's shares (`search.time_budget_s`): pretraining is warned about when its estimate passes
# PRETRAIN_SHARE of the budget, and the evaluation and report keep EVALUATION_RESERVE of it (at least
# EVALUATION_RESERVE_MIN_S seconds) after the search, or, on real faces, what judging the test faces takes
# at EVALUATION_CORE_S_PER_FACE core-seconds a face (JAFFE, 2 cores: 82 s for 67 faces, the model at 32
# draws and four baselines, each judged by the recogniser, the parrot attack and the denoising attacker),
# PARROT_CORE_S_PER_DRAW for each further draw of a parrot gallery face (`evaluation.parrot_draws`: the model
# at 32 draws, then the recogniser; JAFFE, 2 cores: 63 and 70 s for 3 x 79) and RECOGNISER_CORE_S_PER_FACE
# for each original the recogniser embeds before the first method: the test faces, plain and denoised, and
# the gallery (JAFFE, 2 cores: 39 s for 67 + 67 + 79).
PRETRAIN_SHARE = 0.4
EVALUATION_RESERVE, EVALUATION_RESERVE_MIN_S = 0.1, 15.0
EVALUATION_CORE_S_PER_FACE = 2.5
PARROT_CORE_S_PER_DRAW = 0.56
RECOGNISER_CORE_S_PER_FACE = 0.37

# What `epd-ray pretrain --judges-only` leaves out: the networks that only GAN training uses (S's siblings, the
# pickers, the new-people probe, the warm start). `evaluate` needs V, S, V_e and S_e, so judging a model on a
# set of other people costs four networks, not ten; the settings differ, so `tune` never takes such a cache
# entry for its own.
JUDGES_ONLY = {"verifiers.emotion_verifiers": 1, "verifiers.pickers": 0, "verifiers.new_people_probe": False,
               "model.warm_start_steps": 0}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float | int) -> float:
    """Seconds in '90', '90s', '15m', '1.5h' (or a number); ValueError naming the accepted forms."""
    if isinstance(text, (int, float)):
        return float(text)
    value = str(text).strip().lower()
    unit = _DURATION_UNITS.get(value[-1:]) if value else None
    try:
        seconds = float(value[:-1] if unit else value) * (unit or 1)
    except ValueError:
        raise ValueError(f"{text!r}: not a duration; give seconds (90, 90s), minutes (15m) or hours (1h)") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text!r}: a duration must be a finite number of seconds >= 0")
    return seconds


SEARCHED_KEYS = ("lambda1", "lambda2", "lambda3", "phi", "alpha", "mu")
_SEARCH_BOUNDS = {"lambda1": (0, 1), "lambda2": (0, 1), "lambda3": (0, 1), "phi": (0, 1), "alpha": (1e-9, SQRT2),
                  "mu": (1e-9, SQRT2)}


class SearchConfig(_Strict):
    """Ray Tune search over the loss weights and the operating threshold mu (`tune/search.py`)."""

    objective: Literal["composite", "pareto"] = Field(
        "composite", description="composite: maximise J, ASHA stops weak trials early; pareto: maximise privacy "
                                 "and utility together (the two halves of J), every trial runs all rounds")
    num_samples: int = Field(6, ge=1)
    max_concurrent: int = Field(0, ge=0, description="0: as many as the cluster's CPUs/GPUs fit")
    seed: int = 0
    grace_period: int = Field(2, ge=1, description="rounds (train.report_every steps each) before ASHA may stop "
                                                   "a trial")
    reduction_factor: int = Field(2, ge=2)
    first_point: Literal["paper", "config", "none"] = Field(
        "paper", description="the first trial's weights: the paper's (Phi 0.25, mu 0.35, the config's lambdas and "
                             "alpha), the config's own loss weights and mu (a preset's measured point), or none")
    time_budget_s: float = Field(0, ge=0, description="wall-clock seconds for the whole command (also '90s', "
                                 "'15m', '1h'); 0: none. Pretraining is warned about past "
                                 f"{PRETRAIN_SHARE:.0%} of it, evaluation keeps a reserve, and the search ends "
                                 "in what is left (Tune's time_budget_s), keeping the best reported round")
    finish_one_trial: bool = Field(False, description="with a time budget, the search goes on past it until one "
                                   "trial has reported its last round (a trial ASHA stops leaves a better one "
                                   "running): a slower machine then ends late rather than with a half-trained model")
    space: dict[str, Range] = Field(default_factory=lambda: {
        "lambda1": Range(low=0.3, high=1.0),
        "lambda2": Range(low=0.3, high=1.0),
        "lambda3": Range(low=0.3, high=1.0),
        "phi": Range(low=0.05, high=1.0),
        "alpha": Range(low=0.5, high=SQRT2),
        # mu is the verifier's acceptance threshold. Low values are not a free lunch: J multiplies by G(mu),
        # the share of real faces still accepted, so the search settles where real faces pass and
        # de-identified ones fail. (A floor of 0.25 cut off that point: D, S and J all rose below it.)
        "mu": Range(low=0.05, high=0.6),
    })

    @field_validator("time_budget_s", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return parse_duration(v) if isinstance(v, str) else v

    @field_validator("space")
    @classmethod
    def _known_keys_in_bounds(cls, v: dict[str, Range]) -> dict[str, Range]:
        for key, rng in v.items():
            if key not in _SEARCH_BOUNDS:
                raise ValueError(f"unknown searched key {key!r}; searchable: {', '.join(SEARCHED_KEYS)}")
            lo, hi = _SEARCH_BOUNDS[key]
            if rng.low < lo or rng.high > hi + 1e-9:
                raise ValueError(f"{key} range [{rng.low}, {rng.high}] leaves [{lo:g}, {hi:.4g}]")
        return v


class RayConfig(_Strict):
    """How to reach Ray: a local cluster started for this command, or an existing one."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="local cluster only; default: all cores")
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=0, le=65535, description="0 picks a free port")
    storage_path: str | None = Field(None, description="where Ray Train/Tune write checkpoints and results: a "
                                     "folder or a pyarrow URI (s3://, gs://); default <output>/ray")
    shared_storage: bool = Field(False, description="storage_path is a folder on a file system mounted at the same "
                                 "path on every node (NFS, EFS): needed for a folder on more than one node")


class ExperimentConfig(_Strict):
    """Everything `epd-ray tune` needs; written resolved to `<output>/config.yaml`."""

    name: str = "epd-ray"
    cache_dir: str | None = Field(None, description="prepared data and verifiers; default ~/.cache/epd-ray")
    data: DataConfig = Field(default_factory=DataConfig)
    verifiers: VerifiersConfig = Field(default_factory=VerifiersConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """Content hash of the resolved config, to tell one experiment from another."""
        return stable_hash(self.to_dict())


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


# Keys older configs used (budgets in epochs, the paper-point switch): a config that still names one is told
# which key took its place.
REPLACED_KEYS = {
    "train.epochs": "train.steps (optimiser steps; train.report_every steps make a round)",
    "verifiers.epochs": "verifiers.steps (optimiser steps per network)",
    "model.warm_start_epochs": "model.warm_start_steps (optimiser steps)",
    "train.ema_half_life": "train.ema_half_life_steps (optimiser steps)",
    "search.paper_point_first": "search.first_point (paper | config | none)",
}


def _format_validation_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = f"replaced by {REPLACED_KEYS[field]}" if field in REPLACED_KEYS else "unknown key"
    return f"{origin}: {field}: {msg}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _complete_search_space(raw: dict) -> None:
    """A search space given in a file or override changes the ranges it names; the rest keep their defaults
    (all six keys are always searched), and a range given by one bound takes the other from the default."""
    search = raw.get("search")
    if not isinstance(search, dict) or not isinstance(search.get("space"), dict):
        return
    defaults = {k: r.model_dump() for k, r in SearchConfig().space.items()}
    space = {k: dict(v) for k, v in defaults.items()}
    for key, rng in search["space"].items():
        space[key] = {**defaults.get(key, {}), **rng} if isinstance(rng, dict) else rng
    search["space"] = space


DEFAULT_PRESET, REAL_FACES_PRESET = "quick", "faces"


def default_preset(data_source: str | None) -> str:
    """The preset for a command given no --config: `quick` for the built-in synthetic faces, `faces` for a
    prepared set of real faces (budgets, search ranges and judge made for them)."""
    return DEFAULT_PRESET if data_source in (None, "synthetic") else REAL_FACES_PRESET


def load_config(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Resolve a preset name or YAML path plus dotted overrides (`train.steps=300`) into a checked config.

    With no config, the `quick` preset: what a bare `epd-ray tune` runs.
    """
    config = config or DEFAULT_PRESET
    path = Path(config)
    if not path.suffix and str(config) in preset_names():
        path = PRESETS_DIR / f"{config}.yaml"
    if not path.is_file():
        raise ConfigError(f"config {config}: no such file or preset (presets: {', '.join(preset_names())})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    _complete_search_space(raw)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path))) from None


def validate_section(model: type[BaseModel], values: dict[str, Any], origin: str) -> BaseModel:
    """Validate a section (for example a trial's loss weights) with the same messages as a whole config."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def resolved_yaml(config: ExperimentConfig) -> str:
    """The whole resolved config as YAML, every field, that `load_config` reads back to the same config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
