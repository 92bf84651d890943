"""Evaluate a generator and the classical baselines on a held-out split, judged twice.

Main figures come from the independent evaluators V_e, S_e, which no loss ever saw; the same de-identified
images are also judged by the training verifiers V, S, for comparison with the paper (and to show how much
those flatter the generator). Every method is measured at the same mu. On real faces, dlib's recogniser
(`judges.py`) names the people and a pretrained expression reader (`expression_reader.py`) reads the
expressions beside S_e: both were trained on thousands of other people, by no part of epd-ray.

`run_evaluation` de-identifies the split once per method and returns three things: the JSON-ready metrics
(`core/metrics.py`: the paper's section IV, per judge, plus a mu sweep for the evaluators), one row per
probe per method (the per-image table), and the de-identified pixels of a few sample probes (for the
report's grid; never the originals, which a report on real data must not leak). Plain PyTorch: no Ray.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from epd_ray.artifacts import DatasetManifest, PretrainedCache, atomic_file, atomic_write_text, default_cache_dir
from epd_ray.checkpoints import CheckpointError, build_from_record, load_checkpoint, load_deidentifier
from epd_ray.config import EvaluationConfig
from epd_ray.core.baselines import gaussian_blur, k_same_pixel, no_change, pixelate
from epd_ray.core.images import to_tensor, to_uint8
from epd_ray.core.metrics import DEFAULT_MU_GRID, compute_metrics, distance_to_all, expression_confusion, mu_sweep
from epd_ray.core.precision import usable_cpus
from epd_ray.core.scoring import (GeneratorMethod, Method, class_logits, class_probabilities, deidentify_pixels,
                                  ssim_values)
from epd_ray.data.shards import SPLITS, FaceArrays, load_split, read_manifest
from epd_ray.evaluate.expression_reader import ExpressionReader, reader_metrics, reads_any
from epd_ray.evaluate.judges import (FaceRecogniser, Gallery, attack_metrics, denoise, main_judge,
                                     recogniser_metrics, uses_recogniser)
from epd_ray.evaluate.verdicts import (GENERATOR_METHOD, baseline_verdict, target_verdict, targets_line,
                                       verdict_line)

JUDGES = {"evaluators": ("identity_evaluator", "emotion_evaluator"),
          "verifiers": ("identity_verifier", "emotion_verifier")}
SWEEP_JUDGE = "evaluators"
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


def load_judges(pretrained_path: Path, device: torch.device, manifest: DatasetManifest,
                dataset_dir: Path) -> dict[str, tuple[nn.Module, nn.Module]]:
    """The judges' (identity, emotion) classifier pairs, refused when they learnt other people than the data set
    holds (the pretrained file names them; files from before it did are checked by the number of people), tell
    another number of expressions apart, or cannot read its image size: pretrained on another set. An identity
    classifier cannot name people it never learnt, and its figures on them would be noise, not privacy. Faces
    of new people are judged with networks pretrained on their own train split (`epd-ray pretrain --data DIR`)."""
    payload = load_checkpoint(pretrained_path)
    networks, learnt = payload["networks"], payload.get("identities")
    redo = (f"Judge this one with networks pretrained on it (`epd-ray pretrain --data {dataset_dir} --judges-only`, "
            "then --pretrained)")
    if learnt is not None and list(learnt) != list(manifest.identities):
        def people(names) -> str:
            return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        raise EvaluationError(f"{pretrained_path}: its identity networks learnt other people ({people(learnt)}) than "
                              f"{dataset_dir} holds ({people(manifest.identities)}): these networks were pretrained "
                              f"on another data set. {redo}")
    missing = [k for pair in JUDGES.values() for k in pair if k not in networks]
    if missing:
        raise CheckpointError(f"{pretrained_path}: holds no network {', '.join(missing)} "
                              f"(has {', '.join(networks) or 'none'}); pass the pretrained networks file")
    judges = {name: tuple(build_from_record(networks[k], pretrained_path).to(device).eval() for k in pair)
              for name, pair in JUDGES.items()}
    blank = torch.zeros(1, 3, manifest.image_size, manifest.image_size, device=device)
    wanted = {"people": len(manifest.identities), "expressions": len(manifest.emotions)}
    for pair, nets in zip(JUDGES.values(), judges.values()):
        for name, net, what in zip(pair, nets, ("people", "expressions")):
            try:
                with torch.no_grad():
                    classes = net(blank).shape[1]
            except RuntimeError:
                raise EvaluationError(f"{pretrained_path}: its {name} cannot read {dataset_dir}'s "
                                      f"{manifest.image_size} px faces. {redo}") from None
            if classes != wanted[what]:
                raise EvaluationError(
                    f"{pretrained_path}: its {name} tells {classes} {what} apart, {dataset_dir} holds "
                    f"{wanted[what]}: these networks were pretrained on another data set. {redo}")
    return judges


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


def _deidentify(method: Method | KSameMethod, faces: FaceArrays, kw: dict[str, Any]) -> np.ndarray:
    if isinstance(method, KSameMethod):
        return method.deidentify(faces, batch_size=kw["batch_size"], device=kw["device"])
    return deidentify_pixels(method, faces.pixels, **kw)


def run_evaluation(methods: dict[str, Method | KSameMethod], *, dataset_dir: Path, pretrained_path: Path, split: str,
                   mu: float, cfg: EvaluationConfig, device: torch.device | None = None, precision: str = "fp32",
                   mu_grid: Sequence[float] = DEFAULT_MU_GRID, samples: int = SAMPLES,
                   echo: Callable[[str], None] | None = None) -> Evaluation:
    """De-identify `split` once per method (and the parrot's gallery, from the train split); judge with
    every judge of `evaluate.judges`. `metrics["main_judge"]` names the one whose J the search maximised.
    `echo` gets a line per method judged: on a large split each takes minutes."""
    device = device or torch.device("cpu")
    whole = load_split(dataset_dir, split)
    faces = whole.at_most(cfg.test_probes)
    if echo is not None and len(faces) < len(whole):
        echo(f"{split} evaluation: {len(faces)} of its {len(whole)} faces, as many of every person "
             "(evaluation.test_probes)")
    manifest = DatasetManifest.load(dataset_dir)
    source = manifest.source
    main = main_judge(cfg.judge, source)
    judges = load_judges(pretrained_path, device, manifest, dataset_dir)
    kw = dict(batch_size=cfg.batch_size, device=device, precision=precision)
    originals = {name: (class_probabilities(id_net, faces.pixels, **kw),
                        class_probabilities(emo_net, faces.pixels, **kw))
                 for name, (id_net, emo_net) in judges.items()}
    train = load_split(dataset_dir, "train")
    gallery_faces = train.per_identity(cfg.gallery_per_identity)
    num_identities = len(manifest.identities)
    # the driver's evaluation has the machine to itself: dlib spreads over its cores
    recognising = (FaceRecogniser(processes=usable_cpus()) if uses_recogniser(main, source)
                   else contextlib.nullcontext())
    with recognising as recogniser:
        if recogniser is not None:
            rec_orig, found_orig = recogniser.embed(faces.pixels)
            rec_gallery = Gallery.of(lambda pixels: recogniser.embed(pixels)[0], gallery_faces, num_identities)
        # The parrot takes the main judge's embedding: the recogniser's, or the evaluator's logits.
        evaluator = judges["evaluators"][0]
        embed: Callable[[np.ndarray], np.ndarray] = (
            (lambda pixels: recogniser.embed(pixels)[0]) if main == "recogniser"
            else (lambda pixels: class_logits(evaluator, pixels, **kw).numpy()))
        if main == "recogniser":
            plain_gallery, main_orig = rec_gallery, rec_orig
        else:
            plain_gallery, main_orig = Gallery.of(embed, gallery_faces, num_identities), embed(faces.pixels)
        denoised_orig = embed(denoise(faces.pixels))
        emo_orig = originals["evaluators"][1]
        # Real faces also get an expression reader trained on thousands of other people (S_e knows only these).
        reader = (ExpressionReader(manifest.emotions).to(device)
                  if source != "synthetic" and reads_any(manifest.emotions) else None)
        if reader is not None:
            reader_orig = class_probabilities(reader, faces.pixels, **kw)
        index = sample_indices(faces.identity, samples)
        results: dict[str, Any] = {}
        sweeps: dict[str, Any] = {}
        tables: list[pa.Table] = []
        sample_pixels: dict[str, np.ndarray] = {}
        for number, (method_name, method) in enumerate(methods.items(), 1):
            started = time.time()
            deid = _deidentify(method, faces, kw)
            sample_pixels[method_name] = deid[index]
            ssim = ssim_values(faces.pixels, deid, cfg.batch_size).numpy().astype(np.float64)
            columns: dict[str, Any] = {"method": [method_name] * len(faces), "index": np.arange(len(faces)),
                                       "identity": faces.identity, "emotion": faces.emotion, "ssim": ssim}
            results[method_name] = judged = {}
            for judge_name, (id_net, emo_net) in judges.items():
                id_orig, emo_judge_orig = originals[judge_name]
                id_deid, emo_deid = (class_probabilities(id_net, deid, **kw), class_probabilities(emo_net, deid, **kw))
                judged[judge_name] = compute_metrics(
                    identity_probs_orig=id_orig, identity_probs_deid=id_deid, emotion_probs_orig=emo_judge_orig,
                    emotion_probs_deid=emo_deid, identity=faces.identity, emotion=faces.emotion,
                    ssim_per_image=ssim, mu=mu, ssim_weight=cfg.ssim_weight)
                columns.update(_per_image_columns(judge_name, id_orig, id_deid, emo_judge_orig, emo_deid,
                                                  faces.identity))
                if judge_name == SWEEP_JUDGE:
                    sweeps[method_name] = mu_sweep(id_orig, id_deid, faces.identity, mu_grid)
            emo_deid = class_probabilities(judges["evaluators"][1], deid, **kw)
            judged["evaluators"]["expression_confusion"] = expression_confusion(emo_deid, emo_orig, faces.emotion,
                                                                                len(manifest.emotions))
            shared = dict(identity=faces.identity, emotion_probs_orig=emo_orig, emotion_probs_deid=emo_deid,
                          emotion=faces.emotion, ssim=ssim, ssim_weight=cfg.ssim_weight)
            if recogniser is not None:
                rec_deid, found_deid = recogniser.embed(deid)
                judged["recogniser"] = recogniser_metrics(rec_gallery, rec_orig, rec_deid, found_orig, found_deid,
                                                          **shared)
                columns["recogniser_face_found"] = found_deid
            if reader is not None:
                reader_deid = class_probabilities(reader, deid, **kw)
                judged["reader"] = reader_metrics(reader_orig, reader_deid, faces.emotion)
                columns.update(reader_emotion_original=reader_orig.argmax(dim=1).numpy(),
                               reader_emotion_deid=reader_deid.argmax(dim=1).numpy())
            main_deid = rec_deid if main == "recogniser" else embed(deid)
            # An attacker who knows the tool runs the model on each gallery face more than once if it draws noise.
            draws = cfg.parrot_draws if isinstance(method, GeneratorMethod) else 1
            parrot_gallery = Gallery(np.mean([embed(_deidentify(method, gallery_faces, kw)) for _ in range(draws)],
                                             axis=0), gallery_faces.identity, num_identities)
            judged["parrot"] = {**attack_metrics(plain_gallery, parrot_gallery, main_orig, main_deid, **shared),
                                "embedding": main, "draws": draws}
            judged["denoised"] = {**attack_metrics(plain_gallery, plain_gallery, denoised_orig,
                                                   embed(denoise(deid)), **shared), "embedding": main}
            tables.append(pa.table(columns))
            if echo is not None:
                echo(f"{split} evaluation: {method_name} judged ({number}/{len(methods)}, {len(faces)} faces) "
                     f"in {time.time() - started:.0f} s")
    metrics = {"split": split, "images": len(faces), "split_images": len(whole), "emotions": list(manifest.emotions),
               "mu": mu, "ssim_weight": cfg.ssim_weight, "methods": results, "main_judge": main, "data_source": source,
               "gallery": {"split": "train", "images": len(gallery_faces), "per_identity": cfg.gallery_per_identity,
                           "identities": num_identities},
               "mu_sweep_judge": SWEEP_JUDGE, "mu_sweep": sweeps, "sample_index": index.tolist(),
               "inputs": {"dataset_dir": str(dataset_dir), "pretrained_path": str(pretrained_path)}}
    metrics["verdict"] = baseline_verdict(metrics)
    metrics["targets"] = target_verdict(metrics, cfg)
    per_image = pa.concat_tables(tables) if tables else pa.table({})
    return Evaluation(metrics, per_image, sample_pixels, index)


def method_settings(cfg: EvaluationConfig, methods: dict[str, Any], k: int = KSAME_K) -> dict[str, Any]:
    """The baselines' parameters, recorded next to their metrics."""
    return {"ksame_k": k if "ksame" in methods else None, "blur_sigma": cfg.blur_sigma,
            "pixelate_blocks": cfg.pixelate_blocks}


SUMMARY_JUDGES = ("evaluators", "verifiers", "recogniser", "parrot", "denoised")


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Each method under the main judge (J, privacy, utility and their parts), then rank-1 re-identification
    under every judge side by side and, on real faces, expression kept as the pretrained reader reads it,
    as the commands print them."""
    main = metrics.get("main_judge", "evaluators")
    judges = [j for j in SUMMARY_JUDGES if all(j in m for m in metrics["methods"].values())]
    reader = all("reader" in m for m in metrics["methods"].values())
    header = ["method", "J", "privacy", "utility", "kept", "SSIM", *(f"r1 {j[:6]}" for j in judges),
              *(["kept rdr"] if reader else [])]
    lines = [f"  main judge: {main}; r1: share named at rank 1 (unchanged faces: "
             + ", ".join(f"{j} {_unchanged_rank1(metrics, j):.2f}" for j in judges) + ")",
             "  " + " ".join(f"{h:>10}" for h in header)]
    for name, judged in metrics["methods"].items():
        m = judged[main]
        cells = [name[:10],
                 *(f"{m[key]:.3f}" for key in ("objective", "privacy", "utility", "expression_kept", "ssim")),
                 *(f"{judged[j]['reidentified']:.3f}" for j in judges),
                 *([f"{judged['reader']['expression_kept']:.3f}"] if reader else [])]
        lines.append("  " + " ".join(f"{c:>10}" for c in cells))
    said = (verdict_line(metrics.get("verdict")), targets_line(metrics.get("targets")))
    return lines + [line for line in said if line]


def judged_images(metrics: dict[str, Any]) -> str:
    """How many of the split's images were judged: "67", or "600 of its 1200" under `evaluation.test_probes`."""
    whole = metrics.get("split_images", metrics["images"])
    return str(metrics["images"]) if whole == metrics["images"] else f"{metrics['images']} of its {whole}"


def _unchanged_rank1(metrics: dict[str, Any], judge_name: str) -> float:
    return next(iter(metrics["methods"].values()))[judge_name]["reidentified_original"]


def write_evaluation(out: Path, evaluation: Evaluation, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """metrics.json (with `extra` merged in), per_image.parquet and samples.npz (de-identified pixels only).

    Each file is whole or absent, and metrics.json, which readers look for, is written last."""
    out = Path(out)
    paths = {"metrics": out / METRICS_FILE, "per_image": out / PER_IMAGE_FILE, "samples": out / SAMPLES_FILE}
    evaluation.metrics.update(extra or {})
    with atomic_file(paths["per_image"]) as tmp:
        pq.write_table(evaluation.per_image, tmp)
    with atomic_file(paths["samples"]) as tmp, open(tmp, "wb") as handle:  # a path would get ".npz" appended
        np.savez_compressed(handle, index=evaluation.sample_index, **evaluation.samples)
    atomic_write_text(paths["metrics"], json.dumps(evaluation.metrics, indent=2, default=str))
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


def find_pretrained(card: dict[str, Any]) -> Path | None:
    """The pretrained networks a run used: recorded in its model card, else its cache entry for the data."""
    recorded = card.get("pretrained_path")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    config, data = card.get("config") or {}, card.get("data") or {}
    if not data.get("content_hash"):
        return None
    return PretrainedCache(default_cache_dir(config.get("cache_dir"))).find(config, data["content_hash"])


def resolve_setup(model: Path | None, *, data: Path | None = None, pretrained: Path | None = None,
                  split: str = "test", mu: float | None = None, blur_sigma: float | None = None,
                  pixelate_blocks: int | None = None, judge: str | None = None, probes: int | None = None,
                  need_generator: bool = True) -> EvaluationSetup:
    """Everything `epd-ray evaluate` needs, from a run folder or checkpoint and the options that override it."""
    from epd_ray.deploy.export import read_card, resolve_source

    checkpoint, card = None, {}
    if model is not None:
        if not Path(model).exists():
            raise FileNotFoundError(f"{model}: no such run folder or checkpoint file (--model)")
        checkpoint, card_path = resolve_source(Path(model))
        card = read_card(card_path) or {}
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
              **({"pixelate_blocks": pixelate_blocks} if pixelate_blocks is not None else {}),
              **({"judge": judge} if judge is not None else {}),
              **({"test_probes": probes} if probes is not None else {})}
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
                     judge: str | None = None, probes: int | None = None, include_model: bool | None = None,
                     extra: dict[str, Any] | None = None,
                     echo: Callable[[str], None] | None = None) -> tuple[Evaluation, dict[str, Path]]:
    """`epd-ray evaluate`: the model (without --baseline) or the given baselines; write the results to `out`.

    `include_model=True` evaluates the model and the baselines together (what `epd-ray report` does);
    `extra` is merged into metrics.json (what the report keeps of a search's record).
    """
    if k < 1:
        raise EvaluationError(f"--k {k}: must be >= 1")
    include_model = not baselines if include_model is None else include_model
    methods: dict[str, Any] = {}
    setup = resolve_setup(model, data=data, pretrained=pretrained, split=split, mu=mu, blur_sigma=blur_sigma,
                          pixelate_blocks=pixelate_blocks, judge=judge, probes=probes,
                          need_generator=include_model)
    if include_model:
        deidentifier = load_deidentifier(load_checkpoint(setup.checkpoint), setup.checkpoint)
        methods[GENERATOR_METHOD] = GeneratorMethod(deidentifier, seed=setup.seed)
    methods.update(baseline_methods(setup.cfg, list(baselines), dataset_dir=setup.dataset_dir, k=k))
    evaluation = run_evaluation(methods, dataset_dir=setup.dataset_dir, pretrained_path=setup.pretrained_path,
                                split=split, mu=setup.mu, cfg=setup.cfg, echo=echo)
    extra = {"model": str(setup.checkpoint) if setup.checkpoint else None,
             "params": setup.card.get("params"), **method_settings(setup.cfg, methods, k), **(extra or {})}
    return evaluation, write_evaluation(out, evaluation, extra)
