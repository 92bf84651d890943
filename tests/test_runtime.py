"""Ray's storage path rule on one node (several nodes: tests/test_multinode.py), Ctrl-C around Ray, and local
Rays started side by side."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from epd_ray.config import RayConfig
from epd_ray.runtime import alive_nodes, is_local_path, resolve_storage, sigint_guard


def test_storage_is_a_local_folder_on_one_node_and_uris_pass_untouched(ray_runtime, tmp_path, monkeypatch):
    assert alive_nodes() == 1
    assert resolve_storage(RayConfig(), tmp_path / "run" / "ray") == str(tmp_path / "run" / "ray")
    monkeypatch.chdir(tmp_path)
    assert resolve_storage(RayConfig(storage_path="rel/ray"), tmp_path) == str(tmp_path / "rel" / "ray")
    for uri in ("s3://bucket/epd-ray", "gs://bucket/epd-ray/", "file:///mnt/epd/ray"):
        assert resolve_storage(RayConfig(storage_path=uri), tmp_path) == uri.rstrip("/")
    assert [is_local_path(p) for p in ("/mnt/epd", "rel", "file:///x", "s3://b/x", "hdfs://n/x")] == \
        [True, True, True, False, False]


def test_ctrl_c_swallowed_by_a_ray_handler_still_interrupts(monkeypatch):
    """Tune's handler takes SIGINT, saves its state and lets `fit` return: the guard raises afterwards."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with sigint_guard():
            signal.signal(signal.SIGINT, lambda *_: None)  # what Tune and Train leave installed
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with sigint_guard():  # no Ctrl-C, no interruption
        signal.signal(signal.SIGINT, lambda *_: None)
    assert signal.getsignal(signal.SIGINT) is before


RAY_ON_PORT = """
import sys
from epd_ray.config import RayConfig
from epd_ray.runtime import start_ray
print(start_ray(RayConfig(num_cpus=1, dashboard_port=int(sys.argv[1]))).dashboard_url, flush=True)
sys.stdin.read()  # Ray stays up, holding its dashboard's port, until the test is done with both
"""


@pytest.mark.slow  # two local Rays starting side by side, one of them twice: 40-90 s on 2 cores
def test_two_commands_started_together_each_get_a_dashboard():
    """Both find the dashboard port free and start Ray on it; the one whose dashboard finds it taken a few
    seconds later starts on a port the system picks, instead of failing with Ray's traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # each its own Ray, as a terminal's
    commands = [subprocess.Popen([sys.executable, "-c", RAY_ON_PORT, str(port)], env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(2)]
    urls = {command.stdout.readline().strip() for command in commands}
    outputs = [command.communicate(timeout=120) for command in commands]  # stdin closed: both shut down
    assert [command.returncode for command in commands] == [0, 0], "\n".join(err[-2000:] for _, err in outputs)
    assert len(urls) == 2 and f"http://127.0.0.1:{port}" in urls, urls
