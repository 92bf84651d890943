"""Several nodes for real: a Ray cluster of four nodes on this machine (`ray.cluster_utils.Cluster`).

The head advertises no CPU (it holds the trial drivers, as in cluster/), and three worker nodes have one
CPU each, so the two Train workers of a trial with `cpus_per_worker: 1` must land on two different nodes;
the third is the spare that takes over a lost one. `epd-ray tune --address` joins it from a subprocess
with token authentication, as on a real cluster. The cluster lives in a process of its own
(tests/cluster_host.py) with its own temp dir (and its own `ray_current_cluster` file there), apart from
the session's Ray; it is taken down node by node, never with `ray stop`, which would kill every Ray on
the host.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# A four-node cluster and a node lost mid-trial: 2.5 minutes on 2 cores, kept out of CI's suite (`-m slow`).
# Train across workers runs in the suite in test_pipeline's DDP test.
pytestmark = pytest.mark.slow

EPOCH_LINE = re.compile(r"trial (\S+) round (\d+)/\d+")
HOST = Path(__file__).with_name("cluster_host.py")


@dataclass
class HostedCluster:
    address: str
    raylets: dict[str, int]  # worker node id -> its raylet's pid
    host: subprocess.Popen

    def remove(self, node_id: str) -> None:
        """Take a worker node down: its raylet and every process on it."""
        self.host.stdin.write(f"remove {node_id}\n")
        self.host.stdin.flush()
        assert self.host.stdout.readline().strip() == "removed"
        del self.raylets[node_id]

    def nodes_running_train_workers(self) -> set[str]:
        """The worker nodes whose raylet started a Ray Train worker process (found in /proc)."""
        parents = set()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                    parents.add(int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]))
            except OSError:  # ended while we looked
                continue
        return {node_id for node_id, pid in self.raylets.items() if pid in parents}


@pytest.fixture(scope="module")
def cluster(ray_runtime):
    # The session's local Ray turned token authentication on for this process; the cluster inherits it.
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    root = tempfile.mkdtemp(prefix="epdray-mn-", dir="/tmp")
    os.mkdir(os.path.join(root, "ray"))
    log = os.path.join(root, "host.log")
    with open(log, "w") as stderr:
        host = subprocess.Popen([sys.executable, str(HOST), os.path.join(root, "ray")], text=True,
                                env={**os.environ, "RAY_TMPDIR": root}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr)
    try:
        started = json.loads(host.stdout.readline() or "null")
        assert started, f"the cluster did not start (rc {host.poll()}); see {log}"
        yield HostedCluster(started["address"], started["raylets"], host)
    finally:
        host.stdin.close()
        host.wait(timeout=120)


def test_a_local_storage_path_is_refused_on_several_nodes(cluster, epd_ray_cli, tmp_path):
    out = tmp_path / "out"
    run = epd_ray_cli("tune", "--config", "smoke", "--address", cluster.address, "--output", str(out))
    assert run.finish(timeout=300) == 2, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ray.storage_path"), "\n".join(lines)
    assert re.search(r"has \d+ nodes", lines[0]) and "s3://" in lines[0] and "ray.shared_storage=true" in lines[0]
    assert not out.exists()


def test_a_trial_spans_two_nodes_and_survives_losing_one(cluster, tiny_tune_args, epd_ray_cli, tmp_path):
    out, epochs_wanted = tmp_path / "out", 6  # enough left after the first for the node loss to land mid-run
    run = epd_ray_cli(*tiny_tune_args, "--address", cluster.address, "--output", str(out), "--set",
                      "search.num_samples=1", "--set", f"train.steps={epochs_wanted * 3}",
                      "--set", "train.num_workers=2",
                      "--set", "train.cpus_per_worker=1", "--set", f"ray.storage_path={tmp_path / 'shared'}",
                      "--set", "ray.shared_storage=true")
    reported = int(EPOCH_LINE.search(run.wait_for(EPOCH_LINE.search, timeout=600)).group(2))
    holding = cluster.nodes_running_train_workers()
    assert len(holding) == 2, f"the two Train workers ran on nodes {holding}"
    cluster.remove(holding.pop())  # the node and every process on it, in the middle of the next epoch
    assert run.finish(timeout=600) == 0, run.stdout[-3000:] + run.stderr[-3000:]

    results = next((tmp_path / "shared" / "search").glob("*/result.json")).read_text().splitlines()
    epochs = [(row["round"], row["first_round"]) for row in map(json.loads, results)]
    print(f"node lost after epoch {reported} was reported; (epoch, first_epoch) reported: {epochs}")
    restarted = [i for i, (epoch, first) in enumerate(epochs) if first > 1]
    assert restarted, f"no restart from a checkpoint: {epochs}"
    last_before = epochs[restarted[0] - 1][0]
    first_after = epochs[restarted[0]][1]
    assert last_before >= reported
    assert last_before + 1 <= first_after <= last_before + 2, epochs  # at most the epoch in flight lost
    assert [e for e, _ in epochs[restarted[0]:]] == list(range(first_after, epochs_wanted + 1)), epochs
    assert "retrying from its last checkpoint" in run.stdout
    assert (f"round {first_after}/{epochs_wanted} (step {first_after * 3}/{epochs_wanted * 3}) (resumed from its "
            f"checkpoint of round {first_after - 1})") in run.stdout
    trials = json.loads((out / "report" / "metrics.json").read_text())["trials"]
    assert len(trials) == 1 and trials[0]["status"] == "ok" and trials[0]["rounds"] == epochs_wanted
    assert 0.0 <= trials[0]["metrics"]["objective"] <= 1.0
    assert (out / "best" / "generator.pt").is_file()
