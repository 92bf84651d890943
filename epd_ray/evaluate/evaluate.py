"""Evaluate a generator and the classical baselines on a held-out split, judged twice.

Main figures come from the independent evaluators V_e, S_e, which no loss ever saw; the same de-identified
images are also judged by the training verifiers V, S, for comparison with the paper (and to show how much
those flatter the generator). Every method is measured at the same mu.

`run_evaluation` de-identifies the split once per method and returns three things: the JSON-ready metrics
(DESIGN section 6, per judge, plus a mu sweep for the evaluators), one row per probe per method (the
per-image table), and the de-identified pixels of a few sample probes (for the report's grid; never the
originals, which a report on real data must not leak). Plain PyTorch: no Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from epd_ray.checkpoints import CheckpointError, build_from_record, load_checkpoint
from epd_ray.config import EvaluationConfig
from epd_ray.core.baselines import gaussian_blur, k_same_pixel, no_change, pixelate
from epd_ray.core.images import to_tensor, to_uint8
from epd_ray.core.metrics import DEFAULT_MU_GRID, compute_metrics, distance_to_all, mu_sweep
from epd_ray.core.scoring import Method, class_probabilities, deidentify_pixels, ssim_values
from epd_ray.data.shards import SPLITS, FaceArrays, load_split, read_manifest

JUDGES = {"evaluators": ("identity_evaluator", "emotion_evaluator"),
          "verifiers": ("identity_verifier", "emotion_verifier")}
SWEEP_JUDGE = "evaluators"
GENERATOR_METHOD = "epd-net"
KSAME_K = 10
TOP_K = 5
SAMPLES = 8
METRICS_FILE, PER_IMAGE_FILE, SAMPLES_FILE = "metrics.json", "per_image.parquet", "samples.npz"
# Names accepted by `--baseline` -> the method name used in metrics.json and reports.
BASELINE_NAMES = {"identity": "no_change", "no_change": "no_change", "blur": "blur", "pixelate": "pixelate",
                  "ksame": "ksame"}


class EvaluationError(ValueError):
    """A mistake the user can fix (missing model, data or pretrained networks, unknown baseline)."""


@dataclass(frozen=True)
class KSameMethod:
    """k-Same-Pixel: each probe becomes the mean of its k nearest faces of OTHER identities in a gallery
    (the train split). It needs the probes' identities, so it de-identifies a whole split at once."""

    dataset_dir: Path
    k: int = KSAME_K
    gallery_split: str = "train"

    def deidentify(self, faces: FaceArrays, *, batch_size: int, device: torch.device) -> np.ndarray:
        gallery = load_split(self.dataset_dir, self.gallery_split)
        out = k_same_pixel(to_tensor(faces.pixels).to(device), torch.from_numpy(faces.identity),
                           to_tensor(gallery.pixels).to(device), torch.from_numpy(gallery.identity),
                           k=self.k, chunk=batch_size)
        return to_uint8(out)


def baseline_methods(cfg: EvaluationConfig, names: Sequence[str] | None = None, *, dataset_dir: Path | None = None,
                     k: int = KSAME_K) -> dict[str, Method | KSameMethod]:
    """The classical baselines by report name; default the three that need no gallery (no k-Same)."""
    names = ["no_change", "blur", "pixelate"] if names is None else names
    table: dict[str, Any] = {"no_change": lambda: no_change,
                             "blur": lambda: partial(gaussian_blur, sigma=cfg.blur_sigma),
                             "pixelate": lambda: partial(pixelate, blocks=cfg.pixelate_blocks),
                             "ksame": lambda: KSameMethod(Path(dataset_dir), k)}
    methods = {}
    for name in names:
        if name not in BASELINE_NAMES:
            raise EvaluationError(f"unknown baseline {name!r}; choose from {', '.join(sorted(BASELINE_NAMES))}")
        canonical = BASELINE_NAMES[name]
        if canonical == "ksame" and dataset_dir is None:
            raise EvaluationError("the ksame baseline needs a data set with a train split (its gallery)")
        methods[canonical] = table[canonical]()
    return methods


def generator_method(generator: nn.Module, seed: int) -> Method:
    """The generator as published: eval mode, its dropout noise z still on, drawn from a stream of its own.

    Each call (one batch) reseeds the RNG from that stream inside `fork_rng`, so the images depend on the
    seed and the batches alone, not on what else ran first (methods, order, other evaluations), and the
    caller's RNG is left as it was.
    """
    generator.eval()
    stream = torch.Generator().manual_seed(seed)

    def deidentify(x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=stream)))
            return generator(x)

    return deidentify


def load_judges(pretrained_path: Path, device: torch.device) -> dict[str, tuple[nn.Module, nn.Module]]:
    networks = load_checkpoint(pretrained_path)["networks"]
    missing = [k for pair in JUDGES.values() for k in pair if k not in networks]
    if missing:
        raise CheckpointError(f"{pretrained_path}: holds no network {', '.join(missing)} "
                              f"(has {', '.join(networks) or 'none'}); pass the pretrained networks file")
    return {name: tuple(build_from_record(networks[k], pretrained_path).to(device) for k in pair)
            for name, pair in JUDGES.items()}


def sample_indices(identity: np.ndarray, count: int = SAMPLES) -> np.ndarray:
    """The first probe of each identity, up to `count` (then the next probes in order): fixed across runs."""
    _, first = np.unique(identity, return_index=True)
    rest = np.setdiff1d(np.arange(len(identity)), first)
    return np.sort(np.concatenate([np.sort(first), rest])[:count])


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    per_image: pa.Table
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    sample_index: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def _per_image_columns(judge_name: str, id_orig: torch.Tensor, id_deid: torch.Tensor, emo_orig: torch.Tensor,
                       emo_deid: torch.Tensor, identity: np.ndarray) -> dict[str, Any]:
    dist = distance_to_all(id_deid)
    n = len(identity)
    own = dist[np.arange(n), identity]
    others = dist.copy()
    others[np.arange(n), identity] = np.inf
    top = torch.topk(id_deid, min(TOP_K, id_deid.shape[1]), dim=1).indices.numpy()
    return {f"{judge_name}_true_identity_distance": own,
            f"{judge_name}_min_other_distance": others.min(axis=1) if dist.shape[1] > 1 else np.full(n, np.inf),
            f"{judge_name}_top5_identities": pa.array(top.tolist(), type=pa.list_(pa.int64())),
            f"{judge_name}_emotion_original": emo_orig.argmax(dim=1).numpy(),
            f"{judge_name}_emotion_deid": emo_deid.argmax(dim=1).numpy()}


def run_evaluation(methods: dict[str, Method | KSameMethod], *, dataset_dir: Path, pretrained_path: Path, split: str,
                   mu: float, cfg: EvaluationConfig, device: torch.device | None = None, precision: str = "fp32",
                   mu_grid: Sequence[float] = DEFAULT_MU_GRID, samples: int = SAMPLES) -> Evaluation:
    """De-identify `split` once per method; judge with the evaluators and the verifiers (see module doc)."""
    device = device or torch.device("cpu")
    faces = load_split(dataset_dir, split)
    judges = load_judges(pretrained_path, device)
    kw = dict(batch_size=cfg.batch_size, device=device, precision=precision)
    originals = {name: (class_probabilities(id_net, faces.pixels, **kw), class_probabilities(emo_net, faces.pixels, **kw))
                 for name, (id_net, emo_net) in judges.items()}
    index = sample_indices(faces.identity, samples)
    results: dict[str, Any] = {}
    sweeps: dict[str, Any] = {}
    tables: list[pa.Table] = []
    sample_pixels: dict[str, np.ndarray] = {}
    for method_name, method in methods.items():
        if isinstance(method, KSameMethod):
            deid = method.deidentify(faces, batch_size=cfg.batch_size, device=device)
        else:
            deid = deidentify_pixels(method, faces.pixels, **kw)
        sample_pixels[method_name] = deid[index]
        ssim = ssim_values(faces.pixels, deid, cfg.batch_size).numpy().astype(np.float64)
        columns: dict[str, Any] = {"method": [method_name] * len(faces), "index": np.arange(len(faces)),
                                   "identity": faces.identity, "emotion": faces.emotion, "ssim": ssim}
        results[method_name] = {}
        for judge_name, (id_net, emo_net) in judges.items():
            id_orig, emo_orig = originals[judge_name]
            id_deid, emo_deid = (class_probabilities(id_net, deid, **kw), class_probabilities(emo_net, deid, **kw))
            results[method_name][judge_name] = compute_metrics(
                identity_probs_orig=id_orig, identity_probs_deid=id_deid, emotion_probs_orig=emo_orig,
                emotion_probs_deid=emo_deid, identity=faces.identity, emotion=faces.emotion,
                ssim_per_image=ssim, mu=mu, ssim_weight=cfg.ssim_weight)
            columns.update(_per_image_columns(judge_name, id_orig, id_deid, emo_orig, emo_deid, faces.identity))
            if judge_name == SWEEP_JUDGE:
                sweeps[method_name] = mu_sweep(id_orig, id_deid, faces.identity, mu_grid)
        tables.append(pa.table(columns))
    metrics = {"split": split, "images": len(faces), "mu": mu, "ssim_weight": cfg.ssim_weight, "methods": results,
               "mu_sweep_judge": SWEEP_JUDGE, "mu_sweep": sweeps, "sample_index": index.tolist(),
               "inputs": {"dataset_dir": str(dataset_dir), "pretrained_path": str(pretrained_path)}}
    per_image = pa.concat_tables(tables) if tables else pa.table({})
    return Evaluation(metrics, per_image, sample_pixels, index)


def method_settings(cfg: EvaluationConfig, methods: dict[str, Any], k: int = KSAME_K) -> dict[str, Any]:
    """The baselines' parameters, recorded next to their metrics."""
    return {"ksame_k": k if "ksame" in methods else None, "blur_sigma": cfg.blur_sigma,
            "pixelate_blocks": cfg.pixelate_blocks}


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The main figures of each method (independent evaluators), as the commands print them."""
    lines = ["  " + " ".join(f"{h:>10}" for h in ["method", "J", "D", "S", "G", "E", "emoMSE", "SSIM", "CMC r1"])]
    for name, judged in metrics["methods"].items():
        e = judged["evaluators"]
        cells = [name[:10], *(f"{e[key]:.3f}" for key in ("objective", "deid_rate", "switching_deid_rate",
                                                          "genuine_acceptance", "emotion_preserved")),
                 f"{e['emotion_mse']:.4f}", f"{e['ssim']:.3f}", f"{e['cmc_misclassification'][0]:.3f}"]
        lines.append("  " + " ".join(f"{c:>10}" for c in cells))
    return lines


def write_evaluation(out: Path, evaluation: Evaluation, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """metrics.json (with `extra` merged in), per_image.parquet and samples.npz (de-identified pixels only)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / METRICS_FILE, "per_image": out / PER_IMAGE_FILE, "samples": out / SAMPLES_FILE}
    evaluation.metrics.update(extra or {})
    paths["metrics"].write_text(json.dumps(evaluation.metrics, indent=2, default=str))
    pq.write_table(evaluation.per_image, paths["per_image"])
    np.savez_compressed(paths["samples"], index=evaluation.sample_index, **evaluation.samples)
    return paths


# --------------------------------------------------------------------------------------------------
# `epd-ray evaluate`: where the model, the data and the judges are
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationSetup:
    checkpoint: Path | None
    card: dict[str, Any]
    dataset_dir: Path
    pretrained_path: Path
    mu: float
    cfg: EvaluationConfig
    seed: int


def _read_card(card_path: Path | None) -> dict[str, Any]:
    return json.loads(Path(card_path).read_text()) if card_path is not None else {}


def find_pretrained(card: dict[str, Any]) -> Path | None:
    """The pretrained networks a run used: recorded in its model card, else its cache entry for the data."""
    recorded = card.get("pretrained_path")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    config, data = card.get("config") or {}, card.get("data") or {}
    if not data.get("content_hash"):
        return None
    cache = Path(config["cache_dir"]).expanduser() if config.get("cache_dir") else Path.home() / ".cache" / "epd-ray"
    found = sorted((cache / "pretrained").glob(f"{data['content_hash']}-*/pretrained.pt"))
    if len(found) > 1:  # several verifier settings for this data: the one of this run's config
        from epd_ray.config import ExperimentConfig
        from epd_ray.data.prepare import PreparedData
        from epd_ray.train.run import pretrained_key  # imports Ray: only in this ambiguous case

        exp = ExperimentConfig.model_validate(config)
        key = pretrained_key(exp, PreparedData(Path(data.get("path", ".")), {"content_hash": data["content_hash"]}, True))
        found = [p for p in found if p.parent.name == key]
    return found[0] if len(found) == 1 else None


def resolve_setup(model: Path | None, *, data: Path | None = None, pretrained: Path | None = None,
                  split: str = "test", mu: float | None = None, blur_sigma: float | None = None,
                  pixelate_blocks: int | None = None, need_generator: bool = True) -> EvaluationSetup:
    """Everything `epd-ray evaluate` needs, from a run folder or checkpoint and the options that override it."""
    from epd_ray.deploy.export import resolve_source

    checkpoint, card = None, {}
    if model is not None:
        if not Path(model).exists():
            raise FileNotFoundError(f"{model}: no such run folder or checkpoint file (--model)")
        checkpoint, card_path = resolve_source(Path(model))
        card = _read_card(card_path)
    elif need_generator:
        raise EvaluationError("--model is needed (a run folder or a generator checkpoint) unless --baseline is given")
    if split not in SPLITS:
        raise EvaluationError(f"--split {split!r}: choose from {', '.join(SPLITS)}")
    dataset_dir = Path(data) if data is not None else (Path(card["data"]["path"]) if card.get("data", {}).get("path")
                                                        else None)
    if dataset_dir is None:
        raise EvaluationError(f"{model or 'no --model'}: no data set recorded; pass --data DIR "
                              "(a folder made by `epd-ray data prepare`)")
    read_manifest(dataset_dir)  # FileNotFoundError naming the folder when it is not a prepared data set
    pretrained_path = Path(pretrained) if pretrained is not None else find_pretrained(card)
    if pretrained_path is None:
        raise EvaluationError(f"{model or 'no --model'}: cannot find the pretrained networks; pass --pretrained FILE")
    if not pretrained_path.is_file():
        raise FileNotFoundError(f"{pretrained_path}: no such pretrained networks file (--pretrained)")
    config = card.get("config") or {}
    values = {**(config.get("evaluation") or {}),
              **({"blur_sigma": blur_sigma} if blur_sigma is not None else {}),
              **({"pixelate_blocks": pixelate_blocks} if pixelate_blocks is not None else {})}
    try:
        cfg = EvaluationConfig.model_validate(values)
    except ValueError as exc:
        raise EvaluationError(f"bad evaluation option: {str(exc).splitlines()[-1]}") from None
    mu = float(mu if mu is not None else (card.get("params") or {}).get("mu", cfg.mu))
    if not 0 < mu <= 2 ** 0.5:
        raise EvaluationError(f"--mu {mu}: must lie in (0, sqrt 2]")
    seed = int((config.get("train") or {}).get("seed", 0))
    return EvaluationSetup(checkpoint, card, dataset_dir, pretrained_path, mu, cfg, seed)


def evaluate_command(model: Path | None, out: Path, *, baselines: Sequence[str] = (), data: Path | None = None,
                     pretrained: Path | None = None, split: str = "test", mu: float | None = None,
                     blur_sigma: float | None = None, pixelate_blocks: int | None = None, k: int = KSAME_K,
                     include_model: bool | None = None) -> tuple[Evaluation, dict[str, Path]]:
    """`epd-ray evaluate`: the model (without --baseline) or the given baselines; write the results to `out`.

    `include_model=True` evaluates the model and the baselines together (what `epd-ray report` does).
    """
    if k < 1:
        raise EvaluationError(f"--k {k}: must be >= 1")
    include_model = not baselines if include_model is None else include_model
    methods: dict[str, Any] = {}
    setup = resolve_setup(model, data=data, pretrained=pretrained, split=split, mu=mu, blur_sigma=blur_sigma,
                          pixelate_blocks=pixelate_blocks, need_generator=include_model)
    if include_model:
        payload = load_checkpoint(setup.checkpoint)
        if "generator" not in payload["networks"]:
            raise CheckpointError(f"{setup.checkpoint}: holds no network 'generator' "
                                  f"(has {', '.join(payload['networks']) or 'none'})")
        generator = build_from_record(payload["networks"]["generator"], setup.checkpoint)
        methods[GENERATOR_METHOD] = generator_method(generator, seed=setup.seed)
    methods.update(baseline_methods(setup.cfg, list(baselines), dataset_dir=setup.dataset_dir, k=k))
    evaluation = run_evaluation(methods, dataset_dir=setup.dataset_dir, pretrained_path=setup.pretrained_path,
                                split=split, mu=setup.mu, cfg=setup.cfg)
    extra = {"model": str(setup.checkpoint) if setup.checkpoint else None,
             "params": setup.card.get("params"), **method_settings(setup.cfg, methods, k)}
    return evaluation, write_evaluation(out, evaluation, extra)
