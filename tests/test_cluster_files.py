"""The cluster deployment files (cluster/): the launcher YAML checked by Ray's own schema and config
preparation, the KubeRay manifests' structure, image tags against the installed Ray, and cluster/README.md's
commands against the files, the CLI and the config they name. Offline: no cloud call, no Ray started."""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import typer
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from epd_ray.cli import app, parse_overrides
from epd_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
README = CLUSTER / "README.md"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

SHARED = "/mnt/epd"
DASHBOARD_PORT = 8265
IMAGE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)"
                   r"(?P<accel>-gpu|-cpu|-cu\d+)?$")
GPU_ACCEL = re.compile(r"^-(gpu|cu\d+)$")
PAPER = load_config("paper")


def _runtime_constants() -> tuple[str, set[str]]:
    """TRIAL_DRIVER and the env var keys of TRAIN_POLL_ENV from epd_ray/runtime.py, read without importing
    it (importing it imports Ray Data)."""
    tree = ast.parse((REPO / "epd_ray" / "runtime.py").read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = node.value
    trial_driver = ast.literal_eval(values["TRIAL_DRIVER"])
    poll_env = values["TRAIN_POLL_ENV"]
    assert isinstance(poll_env, ast.Dict)
    return trial_driver, {ast.literal_eval(key) for key in poll_env.keys}


TRIAL_DRIVER, TRAIN_POLL_ENV_KEYS = _runtime_constants()


def _wheel_name() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return f"{re.sub(r'[-_.]+', '_', project['name']).lower()}-{project['version']}-py3-none-any.whl"


WHEEL = f"{SHARED}/wheels/{_wheel_name()}"


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def raycluster_docs() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(RAYCLUSTER.read_text()) if doc]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = [doc for doc in yaml.safe_load_all(RAYJOB.read_text()) if doc]
    assert len(docs) == 1
    return docs[0]


def _only(docs: list[dict], kind: str) -> dict:
    found = [doc for doc in docs if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _image_version(image: str) -> re.Match:
    match = IMAGE.match(image)
    assert match, f"{image}: not a rayproject/ray:<version>-py<XY>[-gpu] tag"
    return match


def _assert_image(image: str, *, gpu: bool) -> None:
    match = _image_version(image)
    assert match["version"] == ray.__version__, f"{image}: Ray {match['version']}, installed {ray.__version__}"
    assert (int(match["py"]), int(match["minor"])) >= (3, 11), f"{image}: the package needs Python >= 3.11"
    if gpu:
        assert match["accel"] and GPU_ACCEL.match(match["accel"]), f"{image}: a GPU node needs a -gpu/-cuXX image"


# ---------------------------------------------------------------------------------------------------------
# Cluster launcher: cluster/ray-cluster.yaml
# ---------------------------------------------------------------------------------------------------------


def test_launcher_config_matches_rays_schema(launcher):
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(launcher, schema)
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["head"]["resources"]["CPU"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_config_passes_rays_preparation(launcher):
    """What `ray up` does before any cloud call: merge the provider defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    # Our commands replace the AWS defaults (which would pip-install a Ray nightly wheel) ...
    assert not any("ray-wheels" in cmd for cmd in prepared["setup_commands"] + prepared["head_setup_commands"])
    # ... but keep boto3 for the head's autoscaler, which launches the EC2 workers.
    assert any("boto3" in cmd for cmd in prepared["head_setup_commands"])
    broken = copy.deepcopy(launcher)
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_launcher_head_runs_no_training_but_hosts_trial_drivers(launcher):
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"][TRIAL_DRIVER] >= 1


def test_launcher_gpu_workers_hold_a_paper_trial(launcher):
    assert PAPER.train.use_gpu
    gpu_types = {name: t for name, t in launcher["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no node type advertises a GPU"
    assert launcher["head_node_type"] not in gpu_types
    for name, node_type in gpu_types.items():
        assert node_type["max_workers"] * node_type["resources"]["GPU"] >= PAPER.train.num_workers, name
        assert node_type["max_workers"] <= launcher["max_workers"], f"{name}: capped by the global max_workers"
        assert node_type["node_config"]["InstanceType"].startswith(("g", "p")), f"{name}: not a GPU instance"


def test_launcher_has_a_cpu_type_for_data_tasks_and_trial_drivers(launcher):
    head = launcher["head_node_type"]
    cpu_types = [t for name, t in launcher["available_node_types"].items()
                 if name != head and t["resources"].get("CPU", 0) > 0 and not t["resources"].get("GPU")]
    assert cpu_types, "no CPU worker type: Ray Data's read tasks would have nowhere to run but GPU nodes"
    assert all(t["resources"].get(TRIAL_DRIVER, 0) >= 1 for t in cpu_types)
    assert any(t.get("min_workers", 0) >= 1 for t in cpu_types), "the data tasks start before any GPU node"


def test_launcher_images_carry_the_installed_ray(launcher):
    docker = launcher["docker"]
    images = [docker["image"], docker.get("head_image") or docker["image"]]
    for name, node_type in launcher["available_node_types"].items():
        if name == launcher["head_node_type"]:
            continue
        image = node_type.get("docker", {}).get("worker_image") or docker.get("worker_image") or docker["image"]
        _assert_image(image, gpu=node_type["resources"].get("GPU", 0) >= 1)
        images.append(image)
    for image in images:
        _assert_image(image, gpu=False)
    # One Python on every node: Ray refuses to mix Python minor versions in one cluster.
    assert len({_image_version(i)["py"] + "." + _image_version(i)["minor"] for i in images}) == 1


def test_launcher_dashboard_stays_on_localhost(launcher):
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert f"--dashboard-port={DASHBOARD_PORT}" in head_start
    assert "0.0.0.0" not in head_start


def test_launcher_turns_on_token_auth_everywhere(launcher):
    assert launcher["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "-e RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


def test_launcher_mounts_the_shared_volume_on_host_and_container(launcher):
    init = " ".join(launcher["initialization_commands"])
    assert re.search(rf"mount -t nfs4 .*:/ {re.escape(SHARED)}\b", init)
    assert f"-v {SHARED}:{SHARED}" in launcher["docker"]["run_options"]


def test_launcher_installs_this_packages_wheel(launcher):
    # The wheel folder, not the checkout: `ray up` hashes every file under a mounted folder (.venv too).
    assert "." not in launcher["file_mounts"].values()
    synced = [remote for remote, local in launcher["file_mounts"].items() if local == "./dist"]
    assert len(synced) == 1
    wheel = f"{synced[0].replace('~', '$HOME')}/{Path(WHEEL).name}"
    assert any(cmd.startswith("pip install") and wheel in cmd for cmd in launcher["setup_commands"])


# ---------------------------------------------------------------------------------------------------------
# KubeRay: cluster/kuberay-raycluster.yaml and cluster/kuberay-rayjob.yaml
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["RayCluster", "RayJob"])
def cluster_spec(request, raycluster_docs, rayjob) -> dict:
    if request.param == "RayCluster":
        return _only(raycluster_docs, "RayCluster")["spec"]
    return rayjob["spec"]["rayClusterSpec"]


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _gpu_groups(spec: dict) -> list[dict]:
    return [g for g in spec["workerGroupSpecs"]
            if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(g["template"]))]


def _custom_resources(params: dict) -> dict:
    """rayStartParams' resources: '"{\\"name\\": n}"' (a JSON string holding JSON, KubeRay's convention)."""
    raw = params.get("resources")
    if raw is None:
        return {}
    value = json.loads(raw)
    return json.loads(value) if isinstance(value, str) else value


def test_manifest_kinds_and_api_versions(raycluster_docs, rayjob):
    raycluster = _only(raycluster_docs, "RayCluster")
    assert raycluster["apiVersion"] == "ray.io/v1"
    pvc = _only(raycluster_docs, "PersistentVolumeClaim")
    assert pvc["apiVersion"] == "v1" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert {d["kind"] for d in raycluster_docs} == {"RayCluster", "PersistentVolumeClaim"}
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_ray_version_and_token_auth(cluster_spec):
    assert cluster_spec["rayVersion"] == ray.__version__
    assert cluster_spec["authOptions"] == {"mode": "token"}


def test_head_group_runs_no_training(cluster_spec):
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert _custom_resources(head["rayStartParams"])[TRIAL_DRIVER] >= 1
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard is reached by port-forward only"
    for container in _containers(head["template"]):
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
        _assert_image(container["image"], gpu=False)
    ports = {p["name"]: p["containerPort"] for c in _containers(head["template"]) for p in c.get("ports", [])}
    assert ports["dashboard"] == DASHBOARD_PORT


def test_gpu_worker_group_holds_a_paper_trial(cluster_spec):
    groups = _gpu_groups(cluster_spec)
    assert len(groups) == 1
    group = groups[0]
    (container,) = _containers(group["template"])
    limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
    gpus = int(limits["nvidia.com/gpu"])
    assert gpus >= 1
    # Kubernetes refuses an extended resource whose request differs from its limit.
    assert int(requests.get("nvidia.com/gpu", gpus)) == gpus
    assert group["maxReplicas"] * gpus >= PAPER.train.num_workers
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    _assert_image(container["image"], gpu=True)


def test_cpu_worker_group_hosts_trial_drivers(cluster_spec):
    gpu_names = {g["groupName"] for g in _gpu_groups(cluster_spec)}
    cpu_groups = [g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] not in gpu_names]
    assert cpu_groups and all(_custom_resources(g["rayStartParams"]).get(TRIAL_DRIVER, 0) >= 1 for g in cpu_groups)
    for group in cpu_groups:
        for container in _containers(group["template"]):
            _assert_image(container["image"], gpu=False)


def test_every_pod_mounts_the_shared_volume(cluster_spec, raycluster_docs):
    claim = _only(raycluster_docs, "PersistentVolumeClaim")["metadata"]["name"]
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for group in groups:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in _containers(group["template"]) for m in c.get("volumeMounts", [])}
        assert SHARED in mounts, group.get("groupName", "head")
        assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim


def _tune_params(argv: list[str]) -> dict:
    """Parse `epd-ray tune ...` with the real CLI (nothing runs) and resolve its config."""
    assert argv[:2] == ["epd-ray", "tune"], argv
    command = typer.main.get_command(app).commands["tune"]
    params = command.make_context("tune", argv[2:]).params
    overrides = parse_overrides(params["set_"])
    if params["address"]:
        overrides["ray.address"] = params["address"]
    params["experiment"] = load_config(params["config"], overrides)
    return params


def _assert_cluster_tune(params: dict) -> None:
    exp = params["experiment"]
    assert params["config"] == "paper" and params["address"] == "auto"
    assert str(params["output"]).startswith(f"{SHARED}/")
    assert exp.cache_dir.startswith(f"{SHARED}/") and exp.ray.storage_path.startswith(f"{SHARED}/")
    assert exp.ray.shared_storage  # a folder for storage_path on several nodes is refused without it
    assert exp.train.use_gpu


def test_rayjob_entrypoint_runs_epd_ray_tune(rayjob):
    params = _tune_params(shlex.split(rayjob["spec"]["entrypoint"]))
    _assert_cluster_tune(params)
    gpu = _gpu_groups(rayjob["spec"]["rayClusterSpec"])[0]
    gpus_per_pod = int(_containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"])
    wanted = params["experiment"].search.max_concurrent * params["experiment"].train.num_workers
    assert wanted <= gpu["maxReplicas"] * gpus_per_pod, "more concurrent trials than the GPU group can hold"


def test_rayjob_runtime_env_installs_this_packages_wheel(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert runtime_env["pip"] == [WHEEL]
    # ray.init's env vars (epd_ray/runtime.py) merge with the job's; the same key in both is an error.
    assert not set(runtime_env.get("env_vars", {})) & TRAIN_POLL_ENV_KEYS


# ---------------------------------------------------------------------------------------------------------
# cluster/README.md against the files
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


@pytest.fixture(scope="module")
def commands(readme) -> list[str]:
    """Every shell line of the README's bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert lines
    return lines


def _names_table(readme: str) -> dict[str, str]:
    section = readme.split("## Names used below", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("what", "---"):
            rows[cells[0]] = cells[1]
    return rows


def _first_code(cell: str) -> str:
    return re.findall(r"`([^`]+)`", cell)[0]


def test_readme_names_match_the_files(readme, launcher, raycluster_docs, rayjob):
    rows = _names_table(readme)
    raycluster = _only(raycluster_docs, "RayCluster")["metadata"]["name"]
    assert _first_code(rows["launcher `cluster_name`"]) == launcher["cluster_name"]
    assert _first_code(rows["KubeRay `RayCluster`"]) == raycluster
    assert f"`{raycluster}-head-svc`" in rows["KubeRay `RayCluster`"]
    assert _first_code(rows["KubeRay `RayJob`"]) == rayjob["metadata"]["name"]
    assert _first_code(rows["shared volume"]) == SHARED
    assert f"`{_only(raycluster_docs, 'PersistentVolumeClaim')['metadata']['name']}`" in rows["shared volume"]
    assert int(_first_code(rows["dashboard and Jobs API port"])) == DASHBOARD_PORT
    # The same names in the commands themselves.
    assert f"ray.io/cluster={raycluster}" in readme and f"kubectl get rayjob {rayjob['metadata']['name']}" in readme
    assert f"kubectl get secret {raycluster} " in readme and f"kubectl delete raycluster {raycluster}" in readme


def test_readme_runs_the_documented_commands_on_files_that_exist(readme, commands):
    for path in set(re.findall(r"cluster/[\w.-]+\.(?:yaml|yml|md)", readme)):
        assert (REPO / path).is_file(), path
    for required in ("ray up cluster/ray-cluster.yaml", "ray dashboard cluster/ray-cluster.yaml",
                     "ray down cluster/ray-cluster.yaml", "kubectl apply -f cluster/kuberay-raycluster.yaml",
                     "kubectl apply -f cluster/kuberay-rayjob.yaml", "ray get-auth-token --generate"):
        assert required in commands, required
    # The wheel `ray up` mounts (./dist) is built before the cluster starts.
    build = "python -m pip wheel --no-deps -w dist ."
    assert commands.index(build) < commands.index("ray up cluster/ray-cluster.yaml")


def test_readme_port_forwards_reach_the_dashboard_port(commands, raycluster_docs):
    raycluster = _only(raycluster_docs, "RayCluster")["metadata"]["name"]
    forwards = [shlex.split(c) for c in commands if c.startswith("kubectl port-forward")]
    assert len(forwards) == 2
    for argv in forwards:
        service, ports = argv[2], argv[3]
        assert service in (f"svc/{raycluster}-head-svc", "svc/$CLUSTER-head-svc"), service
        local, remote = (int(p) for p in ports.split(":"))
        assert remote == DASHBOARD_PORT and local == DASHBOARD_PORT
        assert "--address" not in argv, "kubectl port-forward must stay on 127.0.0.1"


def test_readme_job_submissions_parse_and_match_the_files(commands, rayjob):
    submits = [c for c in commands if c.startswith("ray job submit") and " --resume " not in c]
    assert len(submits) == 2
    entry = shlex.split(rayjob["spec"]["entrypoint"])
    for command in submits:
        ray_part, tune_part = command.split(" -- ", 1)
        ray_argv = shlex.split(ray_part)
        assert ray_argv[ray_argv.index("--address") + 1] == f"http://127.0.0.1:{DASHBOARD_PORT}"
        argv = shlex.split(tune_part)
        _assert_cluster_tune(_tune_params(argv))
        assert argv == entry, "README and RayJob run different searches"
        if "--runtime-env-json" in ray_argv:
            runtime_env = json.loads(ray_argv[ray_argv.index("--runtime-env-json") + 1])
            assert runtime_env == yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
        else:
            assert ray_argv[ray_argv.index("--working-dir") + 1] == "."
    assert sum("--runtime-env-json" in c for c in submits) == 1


def test_readme_resume_command_continues_the_documented_run(commands, rayjob):
    (resume,) = [c for c in commands if c.startswith("ray job submit") and " --resume " in c]
    argv = shlex.split(resume.split(" -- ", 1)[1])
    command = typer.main.get_command(app).commands["tune"]
    params = command.make_context("tune", argv[2:]).params
    run = _tune_params(shlex.split(rayjob["spec"]["entrypoint"]))
    assert argv[:2] == ["epd-ray", "tune"] and params["resume"] == run["output"]
    assert params["address"] == run["address"] and not (params["config"] or params["set_"] or params["output"])


def test_readme_wheel_matches_pyproject(readme):
    wheels = set(re.findall(r"epd_ray-[^\s\"'/]+\.whl", readme))
    assert wheels == {Path(WHEEL).name}
    assert f"{SHARED}/wheels/" in readme


def test_readme_fills_every_launcher_placeholder(commands, launcher):
    text = LAUNCHER.read_text()
    placeholders = set(re.findall(r"\b(?:ami|fs)-REPLACE[\w-]*", text))
    assert placeholders == {"ami-REPLACE-WITH-DLAMI-ID", "fs-REPLACE-WITH-EFS-ID"}
    (sed,) = [c for c in commands if c.startswith("sed -i")]
    replaced = set(re.findall(r"s/([^/]+)/", sed))
    assert placeholders | {launcher["provider"]["region"]} <= replaced
    assert sed.rstrip().endswith("cluster/ray-cluster.yaml")


def test_token_auth_commands_follow_rays_cli(commands):
    """`ray get-auth-token --generate` as the installed Ray's CLI defines it (its source, read rather than
    imported: importing the CLI costs seconds)."""
    source = (Path(ray.__file__).parent / "scripts" / "scripts.py").read_text()
    assert re.search(r'@cli\.command\(name="get-auth-token"\)\s*@click\.option\(\s*"--generate"', source)
    assert "ray get-auth-token --generate" in commands
    assert any(c.startswith("export RAY_AUTH_MODE=token") for c in commands)
