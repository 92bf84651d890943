"""Several nodes for real: a Ray cluster of four nodes on this machine (`ray.cluster_utils.Cluster`).

The head advertises no CPU (it holds the trial drivers, as in cluster/), and three worker nodes have one
CPU each, so the two Train workers of a trial with `cpus_per_worker: 1` must land on two different nodes;
the third is the spare that takes over a lost one. `epd-ray tune --address` joins it from a subprocess
with token authentication, as on a real cluster. The cluster has its own temp dir (and its own
`ray_current_cluster` file there) and is taken down node by node: `Cluster.shutdown` would also reset this
process's connection to the session's Ray, and `ray stop` would kill every Ray on the host.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile

from pathlib import Path

import pytest
from ray._private import ray_constants
from ray.cluster_utils import Cluster

EPOCH_LINE = re.compile(r"trial (\S+) epoch (\d+)/\d+")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(ray_runtime):
    # The session's local Ray turned token authentication on for this process; the nodes inherit it.
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    root = tempfile.mkdtemp(prefix="epdray-mn-", dir="/tmp")
    temp_dir = os.path.join(root, "ray")
    os.mkdir(temp_dir)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", root)  # the head writes its address for `address="auto"` to $RAY_TMPDIR/ray
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "resources": {"trial_driver": 4}, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(), "temp_dir": temp_dir})
        try:
            for _ in range(3):
                cluster.add_node(num_cpus=1, temp_dir=temp_dir)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            for node in list(cluster.worker_nodes):
                cluster.remove_node(node)
            cluster.remove_node(cluster.head_node)


def nodes_running_train_workers(cluster: Cluster) -> dict[str, object]:
    """node id -> node, for each worker node whose raylet started a Ray Train worker process (read in /proc)."""
    parents = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                parents[int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])] = proc.name
        except OSError:  # ended while we looked
            continue
    return {node.node_id: node for node in cluster.worker_nodes
            if node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid in parents}


def test_a_local_storage_path_is_refused_on_several_nodes(cluster, epd_ray_cli, tmp_path):
    out = tmp_path / "out"
    run = epd_ray_cli("tune", "--config", "smoke", "--address", cluster.address, "--output", str(out))
    assert run.finish(timeout=300) == 2, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ray.storage_path"), "\n".join(lines)
    assert re.search(r"has \d+ nodes", lines[0]) and "s3://" in lines[0] and "ray.shared_storage=true" in lines[0]
    assert not out.exists()


def test_a_trial_spans_two_nodes_and_survives_losing_one(cluster, tiny_tune_args, epd_ray_cli, tmp_path):
    out = tmp_path / "out"
    run = epd_ray_cli(*tiny_tune_args, "--address", cluster.address, "--output", str(out),
                      "--set", "search.num_samples=1", "--set", "train.epochs=4", "--set", "train.num_workers=2",
                      "--set", "train.cpus_per_worker=1", "--set", f"ray.storage_path={tmp_path / 'shared'}",
                      "--set", "ray.shared_storage=true")
    reported = int(EPOCH_LINE.search(run.wait_for(EPOCH_LINE.search, timeout=600)).group(2))
    holding = nodes_running_train_workers(cluster)
    assert len(holding) == 2, f"the two Train workers ran on nodes {list(holding)}"
    lost = next(iter(holding.values()))
    cluster.remove_node(lost)  # the node and every process on it, in the middle of the next epoch
    assert run.finish(timeout=600) == 0, run.stdout[-3000:] + run.stderr[-3000:]

    rows = [json.loads(line) for line in next((tmp_path / "shared" / "search").glob("*/result.json")).read_text()
            .splitlines()]
    epochs = [(row["epoch"], row["first_epoch"]) for row in rows]
    restarted = [i for i, (epoch, first) in enumerate(epochs) if first > 1]
    assert restarted, f"no restart from a checkpoint: {epochs}"
    last_before = epochs[restarted[0] - 1][0]
    first_after = epochs[restarted[0]][1]
    assert last_before >= reported
    assert last_before + 1 <= first_after <= last_before + 2, epochs  # at most the epoch in flight lost
    assert [e for e, _ in epochs[restarted[0]:]] == list(range(first_after, 5)), epochs
    trials = json.loads((out / "report" / "metrics.json").read_text())["trials"]
    assert len(trials) == 1 and trials[0]["status"] == "ok" and trials[0]["epochs"] == 4
    assert (out / "best" / "generator.pt").is_file()
