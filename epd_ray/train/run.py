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
from epd_ray.config import ExperimentConfig, stable_hash
from epd_ray.data.prepare import PreparedData
from epd_ray.data.shards import load_split
from epd_ray.runtime import DATA_RESERVE_CPUS, RayRuntime, sigint_guard
from epd_ray.train.pretrain import pretrain_loop
from epd_ray.train.worker import CHECKPOINT_FILE

PRETRAINED_FILE = "pretrained.pt"


def pretrained_key(exp: ExperimentConfig, prepared: PreparedData) -> str:
    """Pretrained networks depend on the data's content and their own settings only: every trial shares them."""
    model = exp.model.model_dump(mode="json", include={"ngf", "norm", "dropout", "warm_start_epochs",
                                                       "warm_start_lr"})
    settings = {"verifiers": exp.verifiers.model_dump(mode="json"), "generator": model}
    return f"{prepared.manifest['content_hash']}-{stable_hash(settings)}"


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
    trainer = TorchTrainer(
        pretrain_loop,
        train_loop_config={"verifiers": exp.verifiers.model_dump(mode="json"),
                           "model": exp.model.model_dump(mode="json"),
                           "val_faces": ray.put(load_split(prepared.path, "val")),  # workers may be on other nodes
                           "num_identities": len(prepared.manifest["identities"]),
                           "image_size": prepared.manifest["image_size"],
                           "train_images": prepared.manifest["splits"]["train"]["images"],
                           "cpus_per_worker": cpus, "precision": exp.train.precision,
                           "channels_last": exp.train.channels_last},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=exp.train.use_gpu,
                                               resources_per_worker=None if exp.train.use_gpu else {"CPU": cpus}),
        run_config=ray.train.RunConfig(name=f"pretrain-{key}", storage_path=storage_path,
                                       failure_config=ray.train.FailureConfig(max_failures=exp.train.max_failures)),
        datasets={"train": train_data},
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
