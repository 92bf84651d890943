"""Shared fixtures. Ray is started once per test session (never `ray stop`: it would kill every Ray on
the host), on its own temp dir, exactly as the CLI starts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_runtime():
    from epd_ray.config import RayConfig
    from epd_ray.runtime import start_ray

    runtime = start_ray(RayConfig(num_cpus=2, dashboard_port=0))
    yield runtime
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_experiment():
    """The smoke preset shrunk further: real networks and real steps, seconds per stage."""
    from epd_ray.config import load_config

    return load_config("smoke", {"data.num_identities": 4, "data.variations": 3, "verifiers.epochs": 1, "model.warm_start_epochs": 1,
                                 "train.epochs": 2, "train.batch_size": 8})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_experiment):
    from epd_ray.data.prepare import prepare_dataset

    return prepare_dataset(tiny_experiment.data, tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, ray_runtime, tiny_experiment, tiny_data) -> Path:
    from epd_ray.data.stream import materialized_split
    from epd_ray.train.run import pretrain_networks

    root = tmp_path_factory.mktemp("verifiers")
    return pretrain_networks(tiny_experiment, tiny_data, train_data=materialized_split(tiny_data.path),
                              cache_dir=root / "cache", runtime=ray_runtime, storage_path=str(root / "ray"),
                              echo=lambda *_: None)
