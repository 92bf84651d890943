"""Drivers that fit the Train worker loops: verifier pretraining (cached) and one GAN training run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from epd_ray.checkpoints import load_checkpoint
from epd_ray.config import ExperimentConfig, stable_hash
from epd_ray.data.prepare import PreparedData
from epd_ray.runtime import DATA_RESERVE_CPUS, RayRuntime
from epd_ray.train.pretrain import pretrain_loop
from epd_ray.train.worker import CHECKPOINT_FILE

VERIFIERS_FILE = "verifiers.pt"


def verifiers_key(exp: ExperimentConfig, prepared: PreparedData) -> str:
    """Verifiers depend on the data's content and their own settings only, so every trial shares them."""
    return f"{prepared.manifest['content_hash']}-{stable_hash(exp.verifiers.model_dump(mode='json'))}"


def pretrain_verifiers(exp: ExperimentConfig, prepared: PreparedData, *, train_data: ray.data.Dataset,
                       cache_dir: Path, runtime: RayRuntime, storage_path: str, echo=print) -> Path:
    key = verifiers_key(exp, prepared)
    out = Path(cache_dir) / "verifiers" / key
    if (out / VERIFIERS_FILE).is_file():
        echo(f"verifiers: reusing {out}")
        return out / VERIFIERS_FILE
    workers = exp.train.num_workers
    cpus = max(exp.train.cpus_per_worker, (runtime.total_cpus - DATA_RESERVE_CPUS) / workers)
    echo(f"verifiers: training V (VGG-16), S (mini-Xception) and evaluators V_e, S_e on "
         f"{prepared.manifest['splits']['train']['images']} images ({workers} worker(s))")
    trainer = TorchTrainer(
        pretrain_loop,
        train_loop_config={"verifiers": exp.verifiers.model_dump(mode="json"), "dataset_dir": str(prepared.path),
                           "num_identities": len(prepared.manifest["identities"]),
                           "image_size": prepared.manifest["image_size"],
                           "train_images": prepared.manifest["splits"]["train"]["images"],
                           "cpus_per_worker": cpus, "precision": exp.train.precision,
                           "channels_last": exp.train.channels_last},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=exp.train.use_gpu,
                                               resources_per_worker=None if exp.train.use_gpu else {"CPU": cpus}),
        run_config=ray.train.RunConfig(name=f"pretrain-{key}", storage_path=storage_path),
        datasets={"train": train_data},
    )
    result = trainer.fit()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        shutil.copy(Path(directory) / CHECKPOINT_FILE, tmp / VERIFIERS_FILE)
    accuracies = load_checkpoint(tmp / VERIFIERS_FILE).get("val_accuracy", {})
    (tmp / "accuracy.json").write_text(json.dumps(accuracies, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    echo("verifiers: val accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accuracies.items()) + f" -> {out}")
    return out / VERIFIERS_FILE
