"""Ray's storage path rule on one node (several nodes: tests/test_multinode.py), and Ctrl-C around Ray."""

from __future__ import annotations

import os
import signal

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
