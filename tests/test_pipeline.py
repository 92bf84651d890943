"""Integration: real Ray (one local cluster per session), real Parquet shards, real training steps."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer

from epd_ray.checkpoints import load_checkpoint, load_network
from epd_ray.data.stream import materialized_split
from epd_ray.train.gan import GanInputs
from epd_ray.train.run import pretrain_networks
from epd_ray.train.worker import CHECKPOINT_FILE
from epd_ray.tune.search import gan_trainer, run_trial, trial_resources

PARAMS = {"lambda1": 1.0, "lambda2": 0.8, "lambda3": 0.9, "phi": 0.25, "alpha": 1.0, "mu": 0.35}


def test_ray_data_feeds_each_worker_its_part_of_the_shards_then_workers_keep_theirs(ray_runtime, tiny_data, tmp_path):
    # Defined here so that it is pickled by value: Train workers cannot import test modules.
    def _count_shard(config):
        """Worker loop: iterate this worker's shard for one epoch and record what arrived; then three epochs
        through ShardBatches, kept (the first from Ray Data, the others from memory) and streamed."""
        from epd_ray.train.worker import ShardBatches, WorkerSetup

        shard = ray.train.get_dataset_shard("train")
        rank = ray.train.get_context().get_world_rank()
        rows, shapes, dtypes = 0, set(), set()
        for batch in shard.iter_torch_batches(batch_size=5):
            rows += len(batch["identity"])
            shapes.add(tuple(batch["pixels"].shape[1:]))
            dtypes.add(str(batch["pixels"].dtype))
        setup = WorkerSetup(rank=rank, world_size=2, device=torch.device("cpu"), precision="fp32", channels_last=False)
        epochs = {}
        for keep in (True, False):
            batches = ShardBatches(setup, 4, keep=keep)
            epochs[str(keep)] = [[(int(i), int(e), int(p.sum())) for b in batches.epoch(seed=epoch)
                                  for i, e, p in zip(b["identity"], b["emotion"], b["pixels"])] for epoch in range(3)]
            epochs[f"kept {keep}"] = None if batches.kept is None else len(batches.kept["identity"])
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(
            {"rows": rows, "shapes": sorted(shapes), "dtypes": sorted(dtypes), "epochs": epochs}))
        ray.train.report({"rows": rows})

    trainer = TorchTrainer(
        _count_shard, train_loop_config={"out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="count", storage_path=str(tmp_path / "ray")),
        datasets={"train": materialized_split(tiny_data.path)},
    )
    trainer.fit()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sum(s["rows"] for s in seen) == tiny_data.manifest["splits"]["train"]["images"]
    assert all(s["rows"] > 0 for s in seen)
    assert all(s["shapes"] == [[32, 32, 3]] and s["dtypes"] == ["torch.uint8"] for s in seen)

    for s in seen:  # ShardBatches keeps all rows of a worker's first pass (or nothing), then reshuffles them
        kept, epochs = s["epochs"]["kept True"], s["epochs"]
        assert kept == s["rows"] and epochs["kept False"] is None
        streamed, *from_memory = epochs["True"]
        for epoch in (streamed, *from_memory, *epochs["False"]):
            assert len(epoch) % 4 == 0 and len(set(map(tuple, epoch))) == len(epoch)  # full batches, no repeats
        assert all(len(epoch) == kept // 4 * 4 for epoch in from_memory)
        assert len({tuple(row) for epoch in (streamed, *from_memory) for row in epoch}) <= kept  # same rows
        assert from_memory[0] != from_memory[1]  # reshuffled with each epoch's seed


def test_an_augmented_stream_hands_each_batch_its_draws_to_jitter_the_real_pair_alike(ray_runtime, tiny_data):
    import numpy as np

    from epd_ray.data.shards import load_split
    from epd_ray.data.stream import JITTER_COLUMNS, augmented, jitter_pixels
    from epd_ray.train.worker import ShardBatches, WorkerSetup

    setup = WorkerSetup(rank=0, world_size=1, device=torch.device("cpu"), precision="fp32", channels_last=False)
    stream = augmented(materialized_split(tiny_data.path), flip=True, max_shift=2).iterator()
    batch = next(ShardBatches(setup, 8, keep=False, stream=stream).forever(seed=0))
    originals = load_split(tiny_data.path, "train")
    for row in range(8):
        draw = {k: batch["jitter"][k][row:row + 1] for k in JITTER_COLUMNS}
        same_label = np.flatnonzero((originals.identity == int(batch["identity"][row]))
                                    & (originals.emotion == int(batch["emotion"][row])))
        assert any(np.array_equal(jitter_pixels(originals.pixels[i:i + 1], draw)[0], batch["pixels"][row].numpy())
                   for i in same_label), row


def test_networks_are_pretrained_once_and_reused(ray_runtime, tiny_experiment, tiny_data, tiny_pretrained):
    payload = load_checkpoint(tiny_pretrained)
    assert set(payload["networks"]) == {"identity_verifier", "emotion_verifier", "emotion_verifier_1",
                                        "identity_evaluator", "emotion_evaluator", "expression_picker_0",
                                        "new_people_probe", "generator"}
    assert set(payload["val_score"]) == set(payload["networks"])
    assert payload["networks"]["identity_verifier"]["kind"] == "identity_verifier"
    assert payload["networks"]["emotion_verifier_1"]["kind"] == "emotion_verifier"
    assert payload["networks"]["expression_picker_0"]["kind"] == "expression_picker"
    mtime = tiny_pretrained.stat().st_mtime_ns
    said = []
    again = pretrain_networks(tiny_experiment, tiny_data, cache_dir=tiny_pretrained.parent.parent.parent,
                               runtime=ray_runtime, echo=said.append)
    assert again == tiny_pretrained and tiny_pretrained.stat().st_mtime_ns == mtime
    assert any("reusing" in line for line in said)


def test_gan_training_runs_ddp_checkpoints_every_round_and_resumes_without_the_drivers_files(
        ray_runtime, tiny_experiment, tiny_data, tiny_pretrained, tmp_path):
    """Two Train workers under DDP. Workers on other nodes cannot open the driver's files: once the driver has
    handed the data and the pretrained networks to Ray, training and resuming need neither file."""
    exp = tiny_experiment.model_copy(update={"train": tiny_experiment.train.model_copy(
        update={"num_workers": 2, "cpus_per_worker": 0.5})})
    data_dir, pretrained = tmp_path / "data", tmp_path / "pretrained.pt"
    shutil.copytree(tiny_data.path, data_dir)
    shutil.copy(tiny_pretrained, pretrained)
    train_data, inputs = materialized_split(data_dir), GanInputs.put(data_dir, pretrained)
    shutil.rmtree(data_dir)
    pretrained.unlink()

    def fit(experiment):
        return gan_trainer(experiment, PARAMS, train_data=train_data, inputs=inputs, name="gan",
                           storage_path=str(tmp_path / "ray")).fit()

    result = fit(exp)
    assert result.error is None
    # Train V2 builds metrics_dataframe from the kept checkpoints in score (J) order, not round order.
    assert sorted(result.metrics_dataframe["round"]) == [1, 2]
    assert sorted(result.metrics_dataframe["step"]) == [3, 6]
    assert result.metrics["first_round"] == 1
    assert all(math.isfinite(v) for v in result.metrics_dataframe["objective"])
    assert 0.0 <= result.metrics["objective"] <= 1.0
    with result.checkpoint.as_directory() as directory:
        payload = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
        generator = load_network(Path(directory) / CHECKPOINT_FILE, "generator")
    assert payload["round"] == 1 and payload["step"] == 6
    # 6 real optimiser updates of G, each worker's 14 of the 28 images in batches of 8: the budget wrapped
    # round the data
    assert int(payload["optimizers"]["generator"]["state"][0]["step"]) == exp.train.steps == 6
    assert set(payload["optimizers"]) == {"generator", "discriminator"}
    assert set(payload["networks"]) == {"generator", "generator_train", "discriminator"}  # average + raw
    # the experiment as trained: its loss holds the run's weights, not the config's defaults
    trained_loss = {**exp.loss.model_dump(), **{k: v for k, v in PARAMS.items() if k != "mu"}}
    assert payload["experiment"] == {**exp.to_dict(), "loss": pytest.approx(trained_loss)}
    assert payload["params"] == pytest.approx(PARAMS)
    assert generator(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)

    # Train V2 resumes a run of the same name and storage path from its latest checkpoint.
    resumed = fit(exp.model_copy(update={"train": exp.train.model_copy(update={"steps": 8})}))
    assert resumed.error is None
    assert resumed.metrics["round"] == 3 and resumed.metrics["first_round"] == 3  # not from scratch
    assert resumed.metrics["step"] == 8  # the last round is the 2 steps left of the budget
    assert set(resumed.metrics_dataframe["round"]) <= {1, 2, 3}  # the two best by J; the latest is checked below
    with resumed.checkpoint.as_directory() as directory:
        assert load_checkpoint(Path(directory) / CHECKPOINT_FILE)["round"] == 2


def test_a_diverging_trial_stops_with_a_reason_and_a_finite_penalty(ray_runtime, tiny_experiment, tiny_data,
                                                                   tiny_pretrained, tmp_path):
    """Through Tune, as the search sees it: the trial reports J = 0 and a reason, then stops."""
    exp = tiny_experiment.model_copy(update={"train": tiny_experiment.train.model_copy(update={"lr": 1e30})})
    trainable = ray.tune.with_resources(ray.tune.with_parameters(
        run_trial, experiment=exp.to_dict(), train_data=materialized_split(tiny_data.path),
        inputs=GanInputs.put(tiny_data.path, tiny_pretrained), storage_path=str(tmp_path / "ray")),
        trial_resources(exp, ray_runtime))
    grid = ray.tune.Tuner(trainable, param_space=PARAMS,
                          run_config=ray.tune.RunConfig(name="nan", storage_path=str(tmp_path / "ray"),
                                                        verbose=0)).fit()
    result = grid[0]
    assert result.error is None
    assert result.metrics["diverged"] is True and result.metrics["stop_reason"] == "non-finite loss"
    assert result.metrics["objective"] == 0.0 and math.isfinite(result.metrics["objective"])
    assert len(result.metrics_dataframe) == 1  # stopped after the first round instead of going on


def test_a_trial_never_asks_for_more_cpus_than_a_node_has(ray_runtime):
    from epd_ray.config import load_config
    from epd_ray.runtime import DATA_RESERVE_CPUS
    from epd_ray.tune.search import concurrent_trials, fit_to_cluster

    node = ray_runtime.largest_node_cpus
    faces = load_config("faces")
    assert fit_to_cluster(faces, ray_runtime, echo=pytest.fail) is faces  # 1.5 CPUs fit the session's 2
    said = []
    wide = faces.model_copy(update={"train": faces.train.model_copy(update={"cpus_per_worker": node + 1})})
    fitted = fit_to_cluster(wide, ray_runtime, echo=said.append)
    assert trial_resources(fitted, ray_runtime)["CPU"] == node - DATA_RESERVE_CPUS  # Ray can place it
    assert concurrent_trials(fitted, ray_runtime) == 1
    assert "train.cpus_per_worker" in said[0] and f"{node + 1:g}" in said[0]
