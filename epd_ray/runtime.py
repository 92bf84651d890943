"""Start or join Ray, once per command.

Local by default: a private temp dir (so a second Ray on the same host cannot be confused with ours), the
dashboard on 127.0.0.1 with its URL printed, a custom `trial_driver` resource that the driver of a trial of
several workers holds instead of a CPU (on a 2-core machine a driver holding a CPU starves its own Train
workers; a one-worker trial trains in its own process and holds that worker's CPUs), and the
state API address pinned for every worker (Train's placement-group cleaner needs it). With an address, join
that cluster; token authentication, on by default since Ray 2.59, is then asked for explicitly.

Also where Ray Train and Tune write (`storage_path`), and the rule that keeps a run on several nodes from
scattering its checkpoints over disks of their own.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs
import ray
import ray.data
import ray.train

from epd_ray.config import ConfigError, RayConfig

TRIAL_DRIVER = "trial_driver"
# CPU left free of training workers so Ray Data's read and decode tasks (fractional CPUs) always run.
DATA_RESERVE_CPUS = 0.5
# A Train worker's `report` waits until the controller polls (every 2 s by default): at a few seconds an
# epoch on a CPU, that idled the workers a third of the time. Polling a local queue 4x a second is cheap.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")}
DASHBOARD_PORT_TRIES = 3  # see start_ray


def cpus_beside_data(cpus: float) -> float:
    """What `cpus` leave training once the data's reserve is kept: never less than the reserve itself, so that
    a 1-CPU machine still trains (its data tasks then share the CPU)."""
    return max(cpus - DATA_RESERVE_CPUS, DATA_RESERVE_CPUS)


@dataclass(frozen=True)
class RayRuntime:
    dashboard_url: str | None

    @property
    def total_cpus(self) -> float:
        return float(ray.cluster_resources().get("CPU", 1))

    @property
    def total_gpus(self) -> float:
        return float(ray.cluster_resources().get("GPU", 0))

    @property
    def largest_node_cpus(self) -> float:
        """The CPUs of the biggest live node: the most one task (one process) can hold."""
        return max((float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
                   default=1.0)

    def trial_driver_resources(self) -> dict[str, float]:
        """What the driver of a trial of several workers holds: the custom resource where the cluster has it."""
        if ray.cluster_resources().get(TRIAL_DRIVER, 0) >= 1:
            return {TRIAL_DRIVER: 1}
        return {"CPU": 0.01}


def data_config(workers: int) -> ray.train.DataConfig:
    """How a Train run hands its datasets to its workers: split among several, whole to a single one.

    One worker gets the dataset itself (`ds.iterator()`) instead of a streaming split of one part: the same
    rows, without the split's coordinator actor, whose start and stop are part of every trial's fixed cost."""
    return ray.train.DataConfig(datasets_to_split="all" if workers > 1 else [])


def _free_port(host: str, preferred: int) -> int:
    """`preferred` if nothing holds it now (0: none preferred), else a port the system picks."""
    if preferred and not _taken(host, preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def start_ray(cfg: RayConfig, *, trial_drivers: int = 64, quiet: bool = True) -> RayRuntime:
    # Tune saves a search's state at least every `num_to_keep` checkpoints of a trial (tune.search.kept_checkpoints),
    # which a restored search needs in order to find the checkpoints it kept; with rounds of a few seconds Tune
    # warns of "excessive" saves each time. The driver's Tune reads this; a user's own setting wins.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return RayRuntime(dashboard_url=getattr(ctx, "dashboard_url", None))
    logging.getLogger("ray").setLevel(logging.WARNING if quiet else logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    if cfg.address:  # token auth for joining is set up by the CLI, before Ray is imported
        env = dict(TRAIN_POLL_ENV)
        if api_address := _cluster_api_server(cfg.address):
            os.environ["RAY_API_SERVER_ADDRESS"] = env["RAY_API_SERVER_ADDRESS"] = api_address
        info = ray.init(address=cfg.address, log_to_driver=not quiet, runtime_env={"env_vars": env},
                        logging_level=logging.WARNING if quiet else logging.INFO)
        return RayRuntime(dashboard_url=_url(info.dashboard_url))
    api_host = "127.0.0.1" if cfg.dashboard_host in ("0.0.0.0", "::") else cfg.dashboard_host
    # A port found free can be taken before Ray's dashboard binds it: two commands started together both find
    # 8265 free and one of them lost it seconds later, with Ray's traceback. A port taken by then is given up
    # for one the system picks; any other failure is Ray's own and is raised as it is.
    port, tries = _free_port(api_host, cfg.dashboard_port), 1
    while True:
        try:
            return _start_local(cfg, api_host, port, trial_drivers, quiet)
        except Exception:
            if tries == DASHBOARD_PORT_TRIES or not _taken(api_host, port):
                raise
        ray.shutdown()
        port, tries = _free_port(api_host, 0), tries + 1


def _start_local(cfg: RayConfig, api_host: str, port: int, trial_drivers: int, quiet: bool) -> RayRuntime:
    api_address = f"http://{api_host}:{port}"
    os.environ["RAY_API_SERVER_ADDRESS"] = api_address
    info = ray.init(
        num_cpus=cfg.num_cpus,
        resources={TRIAL_DRIVER: trial_drivers},
        include_dashboard=True,
        dashboard_host=cfg.dashboard_host,
        dashboard_port=port,
        _temp_dir=tempfile.mkdtemp(prefix="epdray-", dir="/tmp"),
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api_address, **TRAIN_POLL_ENV}},
        log_to_driver=not quiet,
        configure_logging=True,
        logging_level=logging.WARNING if quiet else logging.INFO,
    )
    return RayRuntime(dashboard_url=_url(info.dashboard_url))


def _cluster_api_server(address: str) -> str | None:
    """The joined cluster's dashboard (state API) URL, as its GCS records it, to pin for every worker.

    Without it a worker finds the state API by looking for a local Ray, which on a host running a second Ray
    may be the wrong one. Ray Client addresses (ray://) resolve their own way and are left to Ray.
    """
    if address.startswith("ray://"):
        return None
    from ray.dashboard.utils import ray_address_to_api_server_url

    return ray_address_to_api_server_url(address)


def _url(address: str | None) -> str | None:
    if not address:
        return None
    return address if address.startswith("http") else f"http://{address}"


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def is_local_path(path: str) -> bool:
    """A folder on this machine (a plain path or file://), as opposed to a pyarrow URI (s3://, gs://, ...)."""
    return urlparse(path).scheme in ("", "file")


def resolve_storage(cfg: RayConfig, default: Path) -> str:
    """Where Ray Train and Tune write checkpoints and results: `ray.storage_path`, else the folder `default`.

    Train workers upload their checkpoints to it and the driver reads them back, so on more than one node
    a folder only works on a mount every node shares; a local folder there is refused (ConfigError) unless
    `ray.shared_storage` says it is such a mount. Checked against the nodes alive when the command starts.
    """
    storage = cfg.storage_path or str(default)
    if not is_local_path(storage):
        return storage.rstrip("/")
    nodes = alive_nodes()
    if nodes > 1 and not cfg.shared_storage:
        raise ConfigError(f"ray.storage_path {storage}{'' if cfg.storage_path else ' (the default)'}: a local folder, "
                          f"but the cluster has {nodes} nodes, each with a disk of its own; use s3://..., gs://... "
                          "or a folder on a shared mount (NFS) with --set ray.shared_storage=true")
    return storage if storage.startswith("file://") else str(Path(storage).expanduser().resolve())


def storage_filesystem(storage: str) -> pyarrow.fs.FileSystem:
    """The file system of a storage path; checkpoint paths that Ray reports are paths on it."""
    return pyarrow.fs.FileSystem.from_uri(storage)[0]


@contextmanager
def sigint_guard() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt after a Ray Train or Tune `fit`, whatever those did with it.

    Both install SIGINT handlers for the duration of `fit` and leave them behind: Train's aborts its run
    (fit then fails with an actor error), Tune's saves the search's state and returns as if it had finished.
    Python writes every handled signal's number to the wakeup fd, so this learns of a Ctrl-C however it was
    handled, restores the handler it found, and raises KeyboardInterrupt in place of the stage's result.
    Off the main thread (where neither installs a handler) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    reader, writer = os.pipe()
    for fd in (reader, writer):
        os.set_blocking(fd, False)
    previous_fd = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)

    def interrupted() -> bool:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, handler)
        try:
            received = os.read(reader, 4096)
        except BlockingIOError:
            received = b""
        finally:
            os.close(reader)
            os.close(writer)
        return signal.SIGINT in received

    try:
        yield
    except BaseException as exc:
        if interrupted():
            raise KeyboardInterrupt from exc
        raise
    if interrupted():
        raise KeyboardInterrupt
