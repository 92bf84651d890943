"""Host a multi-node Ray cluster on this machine for tests/test_multinode.py, in a process of its own.

`ray.cluster_utils.Cluster` keeps GCS clients in the process that starts the nodes, and such a client ends
its process a minute after the head is gone; here that process is this one, not the test session. Started
with the temp dir as its argument, it prints one JSON line (the GCS address and each worker node's id and
raylet pid), then obeys lines on stdin: `remove NODE_ID` takes that node down (answering `removed`); end of
input takes every node down. The head advertises no CPU and holds the `trial_driver` slots; each worker
node has one CPU.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from ray._private import ray_constants
from ray.cluster_utils import Cluster

WORKER_NODES = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raylet_pid(node) -> int:
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def main(temp_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"trial_driver": 4}, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(), "temp_dir": temp_dir})
    try:
        workers = {}
        for _ in range(WORKER_NODES):
            node = cluster.add_node(num_cpus=1, temp_dir=temp_dir)
            workers[node.node_id] = node
        cluster.wait_for_nodes()
        print(json.dumps({"address": cluster.address, "raylets": {i: raylet_pid(n) for i, n in workers.items()}}),
              flush=True)
        for line in sys.stdin:
            command, _, node_id = line.strip().partition(" ")
            if command == "remove":
                cluster.remove_node(workers.pop(node_id))
                print("removed", flush=True)
    finally:
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node)
        cluster.remove_node(cluster.head_node)
        os._exit(0)  # at once: the GCS clients this process holds must not outlive the head by a minute


if __name__ == "__main__":
    main(sys.argv[1])
