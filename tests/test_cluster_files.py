"""Every shipped cluster and deploy file loads, has its required fields and names real entry points.

- ``cluster/ray-cluster.yaml`` is validated against the cluster launcher's own JSON schema
  (``ray/autoscaler/ray-schema.json`` of the installed Ray).
- ``deploy/serve_config.yaml``, ``deploy/serve_config_cpu.yaml`` and the RayService's
  ``serveConfigV2`` are validated by Ray Serve's own ``ServeDeploySchema``, their ``import_path`` is
  imported and their ``args`` are validated by ``ServeArgs``; the cluster config and the RayService
  must describe the same application, and the CPU config must need no GPU.
- KubeRay manifests (no CRD schema offline) are checked field by field; the tune command they run
  must exist, parse with ``raykd.tune``'s own argument parser and pass its search-space validation
  (files resolved in the repository, which the image installs at /home/ray/raykd).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import yaml

import raykd.cluster

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ROOT = "/home/ray/raykd"


def load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def check_tune_command(command: str) -> None:
    """``python -m raykd.tune ...`` parses with the tune CLI's own parser, and its space, config and
    overrides pass the same validation the CLI runs before Ray starts."""
    from raykd.tune.__main__ import DEFAULT_SPACE, parse_args
    from raykd.tune.space import load_space

    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "raykd.tune"], command
    assert importlib.util.find_spec("raykd.tune.__main__") is not None
    args = parse_args(argv[3:])  # unknown flags exit here

    def in_repo(path: str) -> Path:
        return ROOT / path.removeprefix(IMAGE_ROOT + "/")

    space = in_repo(args.space or DEFAULT_SPACE)
    assert space.is_file(), f"{command!r} names {space}, which is not in the repository"
    load_space(space, args.overrides, base_config=in_repo(args.config) if args.config else None)


def test_cluster_launcher_yaml_passes_rays_schema_with_a_cpu_head_and_gpu_workers():
    import jsonschema
    import ray.autoscaler

    cfg = load("cluster/ray-cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head.get("resources", {}) and cfg["docker"]["head_image"].endswith("-cpu")
    assert head["resources"][raykd.cluster.TRIAL_SLOT] > 0
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and cfg["docker"]["worker_image"].endswith("-gpu")
    assert "--gpus all" in cfg["docker"]["worker_run_options"]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    assert cfg["file_mounts"]["~/raykd"] == "."
    assert any("pip install" in c and "~/raykd" in c for c in cfg["setup_commands"])
    assert f'"{raykd.cluster.TRIAL_SLOT}": 8' in " ".join(cfg["head_start_ray_commands"])


def _check_ray_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    slots = json.loads(json.loads(head["rayStartParams"]["resources"]))
    assert slots[raykd.cluster.TRIAL_SLOT] > 0
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in gpu_groups)
    workers = [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for container in [head_container, *workers]:
        assert container["image"].startswith("ghcr.io/raykd/raykd:")


def test_kuberay_raycluster_runs_the_project_image_and_records_the_tune_command():
    doc = load("cluster/kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(doc["spec"])
    check_tune_command(doc["metadata"]["annotations"]["raykd.io/tune-command"])


def test_kuberay_rayjob_runs_python_m_raykd_tune():
    doc = load("cluster/kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m raykd.tune")
    check_tune_command(spec["entrypoint"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == IMAGE_ROOT
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_dockerfile_installs_the_project_from_files_that_exist():
    text = (ROOT / "cluster/Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT}" in text and "pip install --no-cache-dir -e ." in text
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"


def _check_serve_config(cfg: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    from raykd.serve.app import DEPLOYMENT_NAME, ServeArgs, build_app

    ServeDeploySchema.model_validate(cfg)
    (app,) = cfg["applications"]
    module, attr = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    ServeArgs.model_validate(app["args"])
    assert [d["name"] for d in app["deployments"]] == [DEPLOYMENT_NAME]


def test_serve_config_is_a_valid_serve_deploy_file_for_build_app():
    _check_serve_config(load("deploy/serve_config.yaml"))


def test_cpu_serve_config_is_valid_and_runs_onnx_runtime_without_a_gpu():
    from raykd.serve.app import ServeArgs

    cfg = load("deploy/serve_config_cpu.yaml")
    _check_serve_config(cfg)
    (app,) = cfg["applications"]
    args = ServeArgs.model_validate(app["args"])
    assert (args.backend, args.device, args.num_gpus) == ("onnx", "cpu", 0)
    assert not Path(args.registry).is_absolute()  # a local path, resolved where serve run starts
    assert all(d["ray_actor_options"].get("num_gpus", 0) == 0 for d in app["deployments"])


def test_rayservice_serves_the_same_application_as_the_serve_config():
    doc = load("deploy/kuberay-rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    _check_serve_config(serve_cfg)
    assert serve_cfg == load("deploy/serve_config.yaml")
    cluster = doc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["containerPort"] for p in head["ports"]}
    assert 8000 in head_ports
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("rel", ["cluster/ray-cluster.yaml", "cluster/kuberay-raycluster.yaml",
                                 "cluster/kuberay-rayjob.yaml", "deploy/serve_config.yaml",
                                 "deploy/serve_config_cpu.yaml", "deploy/kuberay-rayservice.yaml"])
def test_every_file_is_plain_yaml_without_tabs(rel):
    text = (ROOT / rel).read_text()
    assert "\t" not in text
    assert isinstance(yaml.safe_load(text), dict)
