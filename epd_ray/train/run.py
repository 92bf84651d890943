"""The driver of the pretraining stage: one Ray Train run, cached by what defines its networks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from epd_ray.checkpoints import load_checkpoint
from epd_ray.config import ConfigError, ExperimentConfig, stable_hash
from epd_ray.data.prepare import PreparedData
from epd_ray.data.shards import load_split, read_manifest
from epd_ray.data.stream import materialized_split
from epd_ray.runtime import DATA_RESERVE_CPUS, RayRuntime, sigint_guard
from epd_ray.train.pretrain import pretrain_loop
from epd_ray.train.worker import CHECKPOINT_FILE

PRETRAINED_FILE = "pretrained.pt"


def pretrained_key(exp: ExperimentConfig, prepared: PreparedData) -> str:
    """Pretrained networks depend on the data's content and their own settings only: every trial shares them."""
    model = exp.model.model_dump(mode="json", include={"ngf", "norm", "dropout", "warm_start_epochs",
                                                       "warm_start_lr"})
    verifiers = exp.verifiers.model_dump(mode="json")
    if verifiers.pop("emotion_data", None):  # its content, not where it lies
        verifiers["emotion_data_hash"] = emotion_data(exp, prepared).manifest["content_hash"]
    settings = {"verifiers": verifiers, "generator": model}
    return f"{prepared.manifest['content_hash']}-{stable_hash(settings)}"


def emotion_data(exp: ExperimentConfig, prepared: PreparedData) -> PreparedData:
    """The data set the emotion networks learn from: `verifiers.emotion_data` when set, else the faces.

    It must share the faces' size (S judges the generator's output at that size) and emotion classes.
    """
    if not exp.verifiers.emotion_data:
        return prepared
    path = Path(exp.verifiers.emotion_data)
    manifest = read_manifest(path)
    if manifest["image_size"] != prepared.manifest["image_size"]:
        raise ConfigError(f"verifiers.emotion_data: {path} holds {manifest['image_size']} px images, the faces are "
                          f"{prepared.manifest['image_size']} px; prepare it with --size "
                          f"{prepared.manifest['image_size']}")
    if manifest["emotions"] != prepared.manifest["emotions"]:
        raise ConfigError(f"verifiers.emotion_data: {path} has emotion classes {manifest['emotions']}, the faces "
                          f"{prepared.manifest['emotions']}")
    return PreparedData(path, manifest, reused=True)


def pretrain_networks(exp: ExperimentConfig, prepared: PreparedData, *, train_data: ray.data.Dataset,
                       cache_dir: Path, runtime: RayRuntime, storage_path: str, echo=print) -> Path:
    key = pretrained_key(exp, prepared)
    out = Path(cache_dir) / "pretrained" / key
    if (out / PRETRAINED_FILE).is_file():
        echo(f"pretrained networks: reusing {out}")
        return out / PRETRAINED_FILE
    workers = exp.train.num_workers
    cpus = max(exp.train.cpus_per_worker, (runtime.total_cpus - DATA_RESERVE_CPUS) / workers)
    echo(f"pretraining V (VGG-16), S (mini-Xception), evaluators V_e, S_e (ResNet-18 shape)"
         f"{' and the generator warm start' if exp.model.warm_start_epochs else ''} on "
         f"{prepared.manifest['splits']['train']['images']} images ({workers} worker(s))")
    emotions = emotion_data(exp, prepared)
    # Each training set's val split goes through the object store: workers may be on other nodes.
    datasets, val_faces = {"train": train_data}, {"train": ray.put(load_split(prepared.path, "val"))}
    if emotions is not prepared:
        echo(f"emotion networks learn from {emotions.path} ({emotions.manifest['splits']['train']['images']} images)")
        datasets["emotion_train"] = materialized_split(emotions.path, "train")
        val_faces["emotion_train"] = ray.put(load_split(emotions.path, "val"))
    trainer = TorchTrainer(
        pretrain_loop,
        train_loop_config={"verifiers": exp.verifiers.model_dump(mode="json"),
                           "model": exp.model.model_dump(mode="json"), "val_faces": val_faces,
                           "num_identities": len(prepared.manifest["identities"]),
                           "num_emotions": len(prepared.manifest["emotions"]),
                           "image_size": prepared.manifest["image_size"],
                           "train_images": prepared.manifest["splits"]["train"]["images"],
                           "emotion_train_images": emotions.manifest["splits"]["train"]["images"],
                           "cpus_per_worker": cpus, "precision": exp.train.precision,
                           "channels_last": exp.train.channels_last, "keep_shard": exp.train.keep_shard},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=exp.train.use_gpu,
                                               resources_per_worker=None if exp.train.use_gpu else {"CPU": cpus}),
        run_config=ray.train.RunConfig(name=f"pretrain-{key}", storage_path=storage_path,
                                       failure_config=ray.train.FailureConfig(max_failures=exp.train.max_failures)),
        datasets=datasets,
    )
    with sigint_guard():
        result = trainer.fit()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        shutil.copy(Path(directory) / CHECKPOINT_FILE, tmp / PRETRAINED_FILE)
    scores = load_checkpoint(tmp / PRETRAINED_FILE).get("val_score", {})
    (tmp / "val_score.json").write_text(json.dumps(scores, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    echo("pretrained networks: validation accuracy (SSIM for the generator) "
         + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f" -> {out}")
    return out / PRETRAINED_FILE
