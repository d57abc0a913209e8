"""The files for real clusters, validated here, run there:

- cluster/aws-gpu.yaml against the JSON schema shipped inside the `ray` package
  (ray/autoscaler/ray-schema.json) and Ray's own launcher config checks;
- cluster/kuberay-rayjob.yaml for the fields KubeRay's RayJob and RayCluster CRDs require;
- cluster/runtime_env.yaml through Ray's RuntimeEnv validation;
- every `python workflow.py ...` command they run parses with the real command line.

    .venv/bin/python -m pytest -q tests/test_cluster_manifests.py
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

import workflow
from pipelines import config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _train_config(command: str) -> config.TrainConfig:
    """Parse a `python workflow.py train ...` command as workflow.py would."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "workflow.py", "train"], argv[:3]
    args = workflow.build_parser().parse_args(argv[2:])
    return config.load(config.TrainConfig, args)


# --------------------------------------------------------------------------- launcher
@pytest.fixture(scope="module")
def launcher() -> dict:
    return _yaml("aws-gpu.yaml")


def test_ray_ships_the_launcher_schema():
    assert SCHEMA.is_file(), f"{SCHEMA} missing from the installed ray package"
    schema = json.loads(SCHEMA.read_text())
    assert {"cluster_name", "provider"} <= set(schema["required"])


def test_launcher_yaml_validates_against_rays_schema(launcher):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(launcher, schema)
    # Ray's own checks too, after it fills in the AWS defaults as `ray up` does.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))


@pytest.mark.parametrize("mutate", [
    lambda c: c.pop("provider"),
    lambda c: c["available_node_types"]["gpu_worker"].update(gpus=4),  # not a field
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=-1),
    lambda c: c.update(setup_commands="pip install ."),  # must be a list
])
def test_the_schema_check_rejects_broken_launcher_configs(launcher, mutate):
    broken = copy.deepcopy(launcher)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


def test_launcher_shape_one_cloud_cpu_head_gpu_workers_shared_storage(launcher):
    assert launcher["provider"]["type"] == "aws"
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert not head["resources"].get("GPU")
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # no GPU family
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    # The project travels to every node and is installed there.
    (remote, local), = launcher["file_mounts"].items()
    assert local == "."
    assert any("pip install" in c and remote in c for c in launcher["setup_commands"])
    assert {".venv", "data", "checkpoints", "mlruns"} <= set(launcher["rsync_exclude"])
    # Shared storage: NFS mounted on the host and passed into the container.
    assert any("mount -t nfs4" in c and "/mnt/data" in c
               for c in launcher["initialization_commands"])
    assert "-v /mnt/data:/mnt/data" in launcher["docker"]["run_options"]
    # Ray version of the images = the version these files were tested with.
    for key in ("image", "head_image"):
        assert f"rayproject/ray:{ray.__version__}-" in launcher["docker"][key]
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reach it through `ray dashboard`
    assert "--serve-artifacts" in head_start and "mlflow server" in head_start


# --------------------------------------------------------------------------- KubeRay
@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _yaml("kuberay-rayjob.yaml")


def _containers(group: dict) -> list[dict]:
    containers = group["template"]["spec"]["containers"]
    assert containers, "a pod template needs at least one container"
    for c in containers:
        assert c.get("name") and c.get("image"), c
    return containers


def _volumes_resolve(group: dict) -> None:
    spec = group["template"]["spec"]
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes, f"volumeMount {mount['name']!r} has no volume"


def _start_params(group: dict) -> None:
    # map[string]string in the CRD: `num-cpus: 0` (an int) would be rejected by the API.
    params = group["rayStartParams"]
    assert isinstance(params, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), params


def test_rayjob_has_the_fields_kuberay_requires(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert DNS_1123.match(rayjob["metadata"]["name"])
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode",
                                                        "InteractiveMode")
    assert isinstance(spec.get("activeDeadlineSeconds", 1), int)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__

    head = cluster["headGroupSpec"]
    _start_params(head)
    _volumes_resolve(head)
    for c in _containers(head):
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
        assert ray.__version__ in c["image"]

    groups = cluster["workerGroupSpecs"]
    assert groups
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names)
    for g in groups:
        assert all(isinstance(g[k], int) for k in ("minReplicas", "maxReplicas", "replicas"))
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _start_params(g)
        _volumes_resolve(g)
        for c in _containers(g):
            res = c["resources"]
            gpus = res["limits"]["nvidia.com/gpu"]
            assert int(gpus) >= 1
            # Extended resources: Kubernetes requires requests == limits when both are set.
            assert str(res.get("requests", {}).get("nvidia.com/gpu", gpus)) == str(gpus)
            assert ray.__version__ in c["image"]


def test_rayjob_runs_the_workflow_with_the_tracking_server(rayjob):
    spec = rayjob["spec"]
    cfg = _train_config(spec["entrypoint"])
    assert cfg.run.gpu and cfg.run.workers >= 2
    assert cfg.data.data.startswith("/") and cfg.run.storage.startswith("/")  # shared PVC
    gpus = sum(int(g["replicas"]) * int(c["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["rayClusterSpec"]["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"])
    assert cfg.run.workers <= gpus  # every worker gets its GPU
    mounts = {m["mountPath"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
              for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
    assert any(cfg.data.data.startswith(p.rstrip("/") + "/") for p in mounts)

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the runtime env
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")


# --------------------------------------------------------------------------- runtime env
def test_runtime_env_file_is_valid_and_points_at_the_tracking_server():
    env = _yaml("runtime_env.yaml")
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert {".venv/", "/data/", "checkpoints/", "mlruns/"} <= set(env["excludes"])


def test_launcher_job_command_parses():
    """The `ray job submit ... -- python workflow.py train ...` line in the launcher's header."""
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    header = " ".join(line.lstrip("#").strip().rstrip("\\")
                      for line in text.splitlines()[:20] if line.startswith("#"))
    command = header.split(" -- ", 1)[1].split(" ray down")[0]
    cfg = _train_config(command)
    assert cfg.run.gpu and cfg.data.data == "/mnt/data/imagenet-shards"
