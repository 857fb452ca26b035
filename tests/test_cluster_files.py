"""Every shipped cluster and deploy file loads, has its required fields and names real entry points.

- ``cluster/ray-cluster.yaml`` is validated against the cluster launcher's own JSON schema
  (``ray/autoscaler/ray-schema.json`` of the installed Ray).
- ``deploy/serve_config.yaml``, ``deploy/serve_config_cpu.yaml`` and the RayService's
  ``serveConfigV2`` are validated by Ray Serve's own ``ServeDeploySchema``, their ``import_path`` is
  imported and their ``args`` are validated by ``ServeArgs``; the cluster config and the RayService
  must describe the same application, and the CPU config must need no GPU.
- KubeRay manifests are validated against the OpenAPI v3 schemas of KubeRay's CRDs, vendored in
  ``tests/schemas/kuberay/`` (release and commit in its README), with unknown fields refused as
  ``kubectl apply`` does; then checked field by field. The tune command they run must exist, parse
  with ``raykd.tune``'s own argument parser and pass its search-space validation (files resolved in
  the repository, which the image installs at /home/ray/raykd).
- Secure by default: every cluster file turns Ray token authentication on (``authOptions`` in the
  KubeRay manifests, ``RAY_AUTH_MODE=token`` and a token on every node of the launcher), and no
  file exposes GCS (6379), the dashboard (8265) or the Ray client port (10001) beyond the cluster
  network.
- Hardened: every KubeRay pod template (head, worker groups, a RayJob's submitter, the autoscaler
  sidecar) runs restricted as the image's ``ray`` user; each KubeRay file ends with a
  ``networking.k8s.io/v1`` NetworkPolicy (checked against the API's NetworkPolicy fields, unknown
  ones refused) that selects every pod of its cluster, admits every port from the cluster's own
  pods, the dashboard (and Serve's port) from the KubeRay operator where it calls them, port 8000
  from the ingress namespace for the RayService, and denies other ingress. The RayService runs two
  Serve replicas that fit on the workers it keeps, with GCS fault tolerance on an external Redis.
  The launcher names its own security group (SSH from a stated CIDR; Ray's default group opens
  SSH to 0.0.0.0/0) and instance profiles whose IAM policies (``cluster/iam/``) hold no wildcard
  action and touch S3 in the run bucket only; it gives every node the Serve API key.
- Every YAML file in ``cluster/`` and ``deploy/`` is validated by one of these schemas, and every
  JSON file in ``cluster/iam/`` is an IAM policy checked here (a test fails for a new file nobody
  validates); the Dockerfile and ``.dockerignore`` are checked too.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import importlib
import importlib.util
import ipaddress
import json
import math
import re
import shlex
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

import raykd.cluster

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ROOT = "/home/ray/raykd"
KUBERAY_SCHEMAS = ROOT / "tests/schemas/kuberay"
KUBERAY_RELEASE = ("v1.7.0", "59d663aeec13760646da3db9c1cf8cfe883e30b7")
KUBERAY_SCHEMA_SHA256 = {
    "RayCluster": "b71a02806a7c9eccf6cc4b71c299c6720c520858ac116ba3446c75f1502c9dc7",
    "RayJob": "70a3d9fe06b37c29a8b8dcefcfd3c99864fd11a95289edc7c1472060432d3816",
    "RayService": "9b16fafa752351c31f2fa1878e3f0919ba3536b2857648dc21858c6f0f7215d2",
}
# Every YAML file shipped in cluster/ and deploy/, with the schema that validates it.
KUBERAY_MANIFESTS = {"cluster/kuberay-raycluster.yaml": "RayCluster",
                     "cluster/kuberay-rayjob.yaml": "RayJob",
                     "deploy/kuberay-rayservice.yaml": "RayService"}
LAUNCHER_FILES = ["cluster/ray-cluster.yaml"]
SERVE_CONFIGS = ["deploy/serve_config.yaml", "deploy/serve_config_cpu.yaml"]
# The launcher's IAM policies (trust policy of both roles, the head's and the workers' permissions).
IAM_POLICIES = ["cluster/iam/ec2-trust-policy.json", "cluster/iam/raykd-head-policy.json",
                "cluster/iam/raykd-worker-policy.json"]
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard, Ray client: never outside the cluster network
SERVE_PORT = 8000
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# The rayproject image's user: ray (uid 1000), primary group users (gid 100, no "ray" group);
# cluster/Dockerfile copies the project as ray:users.
RAY_UID, RAY_GID = 1000, 100
NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace
INGRESS_NAMESPACE = "ingress-nginx"              # the one users adapt to their ingress controller
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}  # the KubeRay Helm chart's
# What the KubeRay operator (v1.7.0) calls on a cluster's pods: a RayJob's dashboard (job status),
# a RayService's dashboard (serveConfigV2) and Serve proxy (/-/healthz); nothing for a RayCluster.
OPERATOR_PORTS = {"RayCluster": set(), "RayJob": {8265}, "RayService": {8265, SERVE_PORT}}
RUN_BUCKET = "raykd-runs"  # the IAM policies' placeholder bucket


def load_all(rel: str) -> list:
    return list(yaml.safe_load_all((ROOT / rel).read_text()))


def load(rel: str) -> dict:
    """The file's first object: the whole file, or a KubeRay file's Ray object (its
    NetworkPolicy follows as a second document)."""
    return load_all(rel)[0]


def check_tune_command(command: str) -> None:
    """``python -m raykd.tune ...`` parses with the tune CLI's own parser, and its space, config and
    overrides pass the same validation the CLI runs before Ray starts."""
    from raykd.tune.__main__ import DEFAULT_SPACE, parse_args
    from raykd.tune.space_file import load_space

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
    for node_setup in ("head_setup_commands", "worker_setup_commands"):
        commands = cfg["setup_commands"] + cfg[node_setup]
        assert any("pip install" in c and "-e ~/raykd" in c for c in commands), node_setup
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
    assert not Path(args.family).is_absolute()  # a local path, resolved where serve run starts
    assert all(d["ray_actor_options"].get("num_gpus", 0) == 0 for d in app["deployments"])


def _without_replica_counts(cfg: dict) -> dict:
    out = copy.deepcopy(cfg)
    for app in out["applications"]:
        for deployment in app.get("deployments", []):
            deployment.pop("num_replicas", None)
    return out


def test_rayservice_serves_the_same_application_as_the_serve_config():
    doc = load("deploy/kuberay-rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    _check_serve_config(serve_cfg)
    # the same application; the RayService may run more replicas (it runs two, checked below)
    assert _without_replica_counts(serve_cfg) == _without_replica_counts(load("deploy/serve_config.yaml"))
    cluster = doc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["containerPort"] for p in head["ports"]}
    assert 8000 in head_ports
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("rel", sorted([*LAUNCHER_FILES, *KUBERAY_MANIFESTS, *SERVE_CONFIGS]))
def test_every_file_is_plain_yaml_without_tabs(rel):
    text = (ROOT / rel).read_text()
    assert "\t" not in text
    docs = list(yaml.safe_load_all(text))
    assert docs and all(isinstance(d, dict) for d in docs)



# --- every shipped file validated against a real schema ------------------------------------------


def test_every_yaml_file_in_cluster_and_deploy_is_validated_against_a_schema():
    """A new YAML file in cluster/ or deploy/, or JSON file in cluster/iam/, must be added to one of
    the validated lists."""
    shipped = {p.relative_to(ROOT).as_posix() for d in ("cluster", "deploy") for p in (ROOT / d).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    yaml_files = {f for f in shipped if f.endswith((".yaml", ".yml"))}
    assert yaml_files == {*LAUNCHER_FILES, *KUBERAY_MANIFESTS, *SERVE_CONFIGS}
    assert {f for f in shipped if f.endswith(".json")} == set(IAM_POLICIES)
    assert shipped - yaml_files - set(IAM_POLICIES) == {"cluster/Dockerfile"}


@functools.cache
def kuberay_schema(kind: str) -> tuple[str, dict]:
    """(sha256 of the JSON, the openAPIV3Schema of ``kind``'s v1 CRD version) as vendored."""
    data = gzip.decompress((KUBERAY_SCHEMAS / f"{kind.lower()}.v1.schema.json.gz").read_bytes())
    return hashlib.sha256(data).hexdigest(), json.loads(data)


def _refuse_unknown_fields(schema: dict) -> dict:
    """The schema with unknown fields refused where Kubernetes refuses them: ``kubectl apply``
    validates strictly by default, so an object listing ``properties`` (without
    ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields``) takes no other key."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _refuse_unknown_fields(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _refuse_unknown_fields(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_refuse_unknown_fields(sub) for sub in out[key]]
    return out


@functools.cache
def kuberay_validator(kind: str):
    import jsonschema

    # OpenAPI v3.0 schema objects follow JSON Schema draft 4 (boolean exclusiveMinimum, ...);
    # the x-kubernetes-* extensions are ignored, CEL rules are handled by _cel_guarded_paths.
    return jsonschema.Draft4Validator(_refuse_unknown_fields(kuberay_schema(kind)[1]))


def _cel_guarded_paths(schema: dict, path: tuple = ()):
    """Paths of the fields that carry ``x-kubernetes-validations`` (CEL), which jsonschema skips."""
    if "x-kubernetes-validations" in schema:
        yield path
    for name, sub in schema.get("properties", {}).items():
        yield from _cel_guarded_paths(sub, (*path, name))
    if isinstance(schema.get("items"), dict):
        yield from _cel_guarded_paths(schema["items"], (*path, "*"))


def _is_set(doc, path: tuple) -> bool:
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "*":
        return isinstance(doc, list) and any(_is_set(item, rest) for item in doc)
    return isinstance(doc, dict) and head in doc and _is_set(doc[head], rest)


def _schema_errors(kind: str, doc: dict) -> list[str]:
    errors = sorted(kuberay_validator(kind).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def test_vendored_kuberay_schemas_are_the_recorded_release():
    note = (KUBERAY_SCHEMAS / "README.md").read_text()
    tag, commit = KUBERAY_RELEASE
    assert f"`{tag}`" in note and commit in note
    for kind, digest in KUBERAY_SCHEMA_SHA256.items():
        sha, schema = kuberay_schema(kind)
        assert sha == digest and digest in note, f"{kind}: vendored schema differs from the README's record"
        assert set(schema["properties"]) >= {"apiVersion", "kind", "metadata", "spec"}


@pytest.mark.parametrize("rel, kind", sorted(KUBERAY_MANIFESTS.items()))
def test_kuberay_manifest_passes_its_crd_schema(rel, kind):
    doc, *others = load_all(rel)
    # the Ray object, then its NetworkPolicy (validated below), which `kubectl apply -f` applies too
    assert [d["kind"] for d in others] == ["NetworkPolicy"], f"{rel}: the Ray object and one NetworkPolicy"
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    assert not _schema_errors(kind, doc), "\n".join(_schema_errors(kind, doc))
    # CEL rules are not evaluated offline: the manifests stay off the fields they guard.
    guarded = [p for p in _cel_guarded_paths(kuberay_schema(kind)[1]) if _is_set(doc, p)]
    assert not guarded, f"{rel} sets CEL-validated fields {guarded}; check them by hand"


@pytest.mark.parametrize("mutate", [
    lambda spec: spec.__setitem__("authOption", {"mode": "token"}),            # misspelt field
    lambda spec: spec["authOptions"].__setitem__("mode", "on"),                # outside the enum
    lambda spec: spec["workerGroupSpecs"][0].__setitem__("replicas", "one"),   # wrong type
    lambda spec: spec["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__(
        "volumeMount", []),                                                    # typo in the pod spec
    lambda spec: spec["headGroupSpec"].pop("template"),                        # required field
], ids=["unknown-field", "enum", "type", "pod-spec-typo", "required"])
def test_kuberay_schema_validation_catches_broken_manifests(mutate):
    doc = load("cluster/kuberay-raycluster.yaml")
    mutate(doc["spec"])
    assert _schema_errors("RayCluster", doc)


# --- secure by default ---------------------------------------------------------------------------


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _ray_cluster_spec(rel: str) -> dict:
    return _cluster_spec(load(rel))


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def test_ray_reads_the_auth_settings_the_files_use():
    """The variable and token file the cluster files rely on are the installed Ray's."""
    from ray._private.authentication.authentication_token_setup import (
        AUTH_MODE_ENV_VAR,
        _get_default_token_path,
    )

    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    assert _get_default_token_path() == Path.home() / ".ray" / "auth_token"


@pytest.mark.parametrize("rel", sorted(KUBERAY_MANIFESTS))
def test_kuberay_manifests_turn_token_authentication_on(rel):
    spec = _ray_cluster_spec(rel)
    auth = spec["authOptions"]
    assert auth["mode"] == "token"  # KubeRay reads an unset mode as "disabled"
    secret = auth["secretName"]
    assert not auth.get("enableK8sTokenAuth")  # not supported by KubeRay for RayJob/RayService
    # KubeRay refuses token mode below Ray 2.52.0.
    assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52, 0)
    # The file says how to create the Secret KubeRay reads the token from (key auth_token).
    assert f"kubectl create secret generic {secret} --from-literal=auth_token=" in (ROOT / rel).read_text()
    # Nothing overrides the variables KubeRay injects.
    for pod in _pod_specs(spec):
        for container in pod["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, rel


@pytest.mark.parametrize("rel", sorted(KUBERAY_MANIFESTS))
def test_kuberay_manifests_keep_ray_ports_inside_the_cluster(rel):
    doc = load(rel)
    spec = _ray_cluster_spec(rel)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    if doc["kind"] == "RayService":  # the serve service follows the head's type unless set
        assert doc["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    for pod in _pod_specs(spec):
        assert not pod.get("hostNetwork", False)
        for container in pod["containers"]:
            for port in container.get("ports", []):
                assert not (port["containerPort"] in RAY_PORTS and "hostPort" in port), (rel, port)
    # "kubectl port-forward" is how the file says to reach the dashboard.
    assert re.search(r"kubectl port-forward svc/\S+-head-svc 8265", (ROOT / rel).read_text())


@pytest.mark.parametrize("rel", sorted([*LAUNCHER_FILES, *KUBERAY_MANIFESTS, *SERVE_CONFIGS]))
def test_no_shipped_service_exposes_ray_ports_outside_the_cluster(rel):
    for doc in yaml.safe_load_all((ROOT / rel).read_text()):
        if not (isinstance(doc, dict) and doc.get("kind") == "Service"):
            continue
        if doc.get("spec", {}).get("type") in ("LoadBalancer", "NodePort"):
            ports = {p.get("targetPort", p.get("port")) for p in doc["spec"].get("ports", [])}
            assert not ports & RAY_PORTS, f"{rel}: {doc['metadata']['name']} exposes {ports & RAY_PORTS}"


def _launcher() -> dict:
    return load("cluster/ray-cluster.yaml")


def _ray_start_env(command: str) -> dict[str, str]:
    """The ``VAR=value`` words a launcher command puts before ``ray start``."""
    words = shlex.split(command)
    at = words.index("ray")
    assert words[at + 1] == "start", command
    assert all("=" in w for w in words[:at]), command
    return dict(w.split("=", 1) for w in words[:at])


def test_cluster_launcher_turns_token_authentication_on_on_every_node():
    cfg = _launcher()
    # Every process in the containers (ray start, autoscaler, `ray exec` drivers) sees the mode ...
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    # ... and so does `ray start` itself, with or without docker.
    commands = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 2 and all(_ray_start_env(c).get("RAY_AUTH_MODE") == "token" for c in starts)
    # The token reaches every node where Ray looks for it by default (file_mounts go to all nodes).
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in (ROOT / "cluster/ray-cluster.yaml").read_text()


def test_cluster_launcher_keeps_the_dashboard_on_the_head_and_ray_ports_private():
    cfg = _launcher()
    head = " ".join(cfg["head_start_ray_commands"])
    host = re.search(r"--dashboard-host[= ](\S+)", head)
    assert host is None or host.group(1) in ("127.0.0.1", "localhost"), head
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))
        opened = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        assert not (public and any(p in opened for p in RAY_PORTS)), rule
    options = [*cfg["docker"].get("run_options", []), *cfg["docker"].get("head_run_options", []),
               *cfg["docker"].get("worker_run_options", [])]
    assert not any(re.search(r"(^|\s)(-p|--publish)(\s|=|$)", o) for o in options)
    assert "ray dashboard cluster/ray-cluster.yaml" in (ROOT / "cluster/ray-cluster.yaml").read_text()


def _header_commands(rel: str) -> list[str]:
    """Shell lines of a file's leading comment block, backslash continuations joined."""
    header = []
    for line in (ROOT / rel).read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:])
    return [line.strip() for line in re.sub(r"\\\n", " ", "\n".join(header)).splitlines()]


def test_cluster_launcher_recipe_runs_tune_on_the_running_cluster():
    """`ray exec ... python -m raykd.tune` must join the cluster `ray up` started (--address auto);
    without an address raykd would start its own one-node Ray inside the head container."""
    from raykd.tune.__main__ import parse_args

    (exec_line,) = [c for c in _header_commands("cluster/ray-cluster.yaml") if c.startswith("ray exec ")]
    argv = shlex.split(exec_line)
    assert argv[2] == "cluster/ray-cluster.yaml"
    (tune,) = [part.strip() for part in argv[3].split("&&") if "raykd.tune" in part]
    check_tune_command(tune)
    assert parse_args(shlex.split(tune)[3:]).address == "auto"


def _torch_pins() -> list[str]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return sorted(d for d in deps if d.split("==")[0] in ("torch", "torchvision"))


def _rays_default_amis() -> set[str]:
    """DEFAULT_AMI of the installed Ray's AWS provider, read from its source (importing the
    module needs boto3, which raykd does not install)."""
    import ast

    import ray.autoscaler

    source = (Path(ray.autoscaler.__file__).parent / "_private/aws/config.py").read_text()
    for node in ast.parse(source).body:
        names = [getattr(target, "id", None) for target in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and names == ["DEFAULT_AMI"]:
            return set(ast.literal_eval(node.value).values())
    raise AssertionError("DEFAULT_AMI not found in Ray's AWS provider")


def test_cluster_launcher_uses_a_current_gpu_ami_not_rays_default():
    default_amis = _rays_default_amis()
    assert default_amis
    dlami = (r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
             r"base-oss-nvidia-driver-gpu-ubuntu-(22|24)\.04/latest/ami-id")
    for name, node_type in _launcher()["available_node_types"].items():
        ami = node_type["node_config"].get("ImageId", "")
        # Unset or "latest_dlami" means Ray's Ubuntu 18.04 DLAMI, too old for torch's CUDA 13 wheels.
        assert ami and ami.lower() != "latest_dlami" and ami not in default_amis, name
        assert re.fullmatch(dlami, ami) or re.fullmatch(r"ami-[0-9a-f]{8,17}", ami), (name, ami)


def test_cluster_launcher_head_installs_cpu_torch_wheels_pinned_like_pyproject():
    cfg = _launcher()
    head = cfg["setup_commands"] + cfg["head_setup_commands"]
    cpu = [i for i, c in enumerate(head) if CPU_TORCH_INDEX in c]
    project = [i for i, c in enumerate(head) if "-e ~/raykd" in c]
    assert cpu and project and cpu[0] < project[0]  # CPU torch first, so the project keeps it
    argv = shlex.split(head[cpu[0]])
    assert argv[argv.index("--index-url") + 1] == CPU_TORCH_INDEX
    assert sorted(a for a in argv if "==" in a) == _torch_pins()
    assert not any(CPU_TORCH_INDEX in c for c in cfg["setup_commands"] + cfg["worker_setup_commands"])


def test_dockerfile_builds_the_cpu_image_without_cuda_wheels():
    text = (ROOT / "cluster/Dockerfile").read_text()
    assert re.search(r'^ARG TORCH_INDEX_URL=""$', text, re.MULTILINE)
    run = text[text.index('if [ -n "${TORCH_INDEX_URL}" ]'):]
    assert run.index('--index-url "${TORCH_INDEX_URL}"') < run.index("pip install --no-cache-dir -e .")
    # the pins it installs are pyproject.toml's (its grep pattern, run here)
    pattern = re.search(r"grep -oE '([^']+)' pyproject\.toml", run).group(1)
    pins = [m.group(0).strip('"') for m in re.finditer(pattern, (ROOT / "pyproject.toml").read_text())]
    assert sorted(pins) == _torch_pins()
    builds = [c for c in _header_commands("cluster/Dockerfile") if c.startswith("docker build ")]
    by_tag = {shlex.split(c)[shlex.split(c).index("-t") + 1]: shlex.split(c) for c in builds}
    cpu, gpu = by_tag["ghcr.io/raykd/raykd:0.1.0-cpu"], by_tag["ghcr.io/raykd/raykd:0.1.0-gpu"]
    assert "BASE=rayproject/ray:2.60.0-py311-cpu" in cpu and f"TORCH_INDEX_URL={CPU_TORCH_INDEX}" in cpu
    assert not any(a.startswith("TORCH_INDEX_URL=") for a in gpu)
    # the images the manifests run are the ones documented here
    for rel in KUBERAY_MANIFESTS:
        for image in re.findall(r"image: (\S+)", (ROOT / rel).read_text()):
            assert image in by_tag, (rel, image)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern matches the path or one of its parent folders."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch(prefix, c) for prefix in prefixes for c in candidates):
            return True
    return False


def test_dockerignore_keeps_environments_data_results_and_secrets_out_of_the_build_context():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    for path in [".git/HEAD", ".venv/bin/python", "data/isic/x.jpg", "runs/a/best/model.onnx",
                 "outputs/x", "raykd/__pycache__/x.pyc", ".pytest_cache/v", ".ruff_cache/x",
                 "raykd.egg-info/PKG-INFO", ".ray/auth_token", ".env"]:
        assert _dockerignored(path, patterns), path
    # nothing the Dockerfile copies is filtered out
    text = (ROOT / "cluster/Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                files = [ROOT / src] if (ROOT / src).is_file() else [
                    f for f in (ROOT / src).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    assert not _dockerignored(rel, patterns), f".dockerignore drops {rel} (image needs it)"


# --- hardened: restricted pods, network policies, availability, launcher network and IAM ----------


def _pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template of a KubeRay object by role: head, worker groups, a RayJob's submitter."""
    spec = _cluster_spec(doc)
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({f"worker {g['groupName']}": g["template"] for g in spec.get("workerGroupSpecs", [])})
    if "submitterPodTemplate" in doc["spec"]:
        templates["submitter"] = doc["spec"]["submitterPodTemplate"]
    return templates


def _check_restricted_container(context: dict, where) -> None:
    assert context.get("allowPrivilegeEscalation") is False, where
    assert context.get("capabilities") == {"drop": ["ALL"]}, where  # none added back
    assert context.get("runAsNonRoot") is True, where
    assert not context.get("privileged", False), where
    assert context.get("runAsUser", RAY_UID) == RAY_UID, where
    # Ray writes /tmp/ray (and /dev/shm): the root filesystem stays writable.
    assert not context.get("readOnlyRootFilesystem", False), where


@pytest.mark.parametrize("rel", sorted(KUBERAY_MANIFESTS))
def test_every_pod_runs_restricted_as_the_images_ray_user(rel):
    doc = load(rel)
    for role, template in _pod_templates(doc).items():
        pod = template["spec"]
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, (rel, role)
        assert (context.get("runAsUser"), context.get("runAsGroup"), context.get("fsGroup")) == (
            RAY_UID, RAY_GID, RAY_GID), (rel, role)
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, (rel, role)
        assert not any(pod.get(k, False) for k in ("hostNetwork", "hostPID", "hostIPC")), (rel, role)
        containers = [*pod.get("initContainers", []), *pod["containers"]]
        for container in containers:
            _check_restricted_container(container.get("securityContext", {}), (rel, role, container["name"]))
    spec = _cluster_spec(doc)
    if spec.get("enableInTreeAutoscaling"):  # the autoscaler sidecar KubeRay adds to the head pod
        _check_restricted_container(spec.get("autoscalerOptions", {}).get("securityContext", {}),
                                    (rel, "autoscaler"))
    assert "COPY --chown=ray:users " in (ROOT / "cluster/Dockerfile").read_text()  # uid/gid above


# networking.k8s.io/v1 NetworkPolicy, the fields of the Kubernetes API reference (unknown ones refused).
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": _LABELS,
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"], "properties": {
            "key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
            "values": {"type": "array", "items": {"type": "string"}}}}}}}
_PEER = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "podSelector": _SELECTOR, "namespaceSelector": _SELECTOR,
    "ipBlock": {"type": "object", "additionalProperties": False, "required": ["cidr"], "properties": {
        "cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}}}
_PORT = {"type": "object", "additionalProperties": False, "properties": {
    "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": {"type": ["integer", "string"]},
    "endPort": {"type": "integer"}}}
NETWORK_POLICY_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"enum": ["networking.k8s.io/v1"]}, "kind": {"enum": ["NetworkPolicy"]},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS,
            "annotations": _LABELS}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["podSelector"], "properties": {
            "podSelector": _SELECTOR,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "from": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}},
            "egress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "to": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}}}}}}}}


def _network_policy(rel: str) -> dict:
    (policy,) = [d for d in load_all(rel) if d.get("kind") == "NetworkPolicy"]
    return policy


def _network_policy_errors(policy: dict) -> list[str]:
    import jsonschema

    errors = jsonschema.Draft4Validator(NETWORK_POLICY_SCHEMA).iter_errors(policy)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


@pytest.mark.parametrize("rel", sorted(KUBERAY_MANIFESTS))
def test_network_policy_passes_the_networking_v1_fields(rel):
    errors = _network_policy_errors(_network_policy(rel))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("mutate", [
    lambda spec: spec.__setitem__("podSelecter", {}),                              # misspelt field
    lambda spec: spec["ingress"][0].__setitem__("form", []),                       # typo in a rule
    lambda spec: spec.__setitem__("policyTypes", ["ingress"]),                     # outside the enum
    lambda spec: spec["ingress"][0]["from"][0]["podSelector"].__setitem__("matchLabel", {}),
], ids=["unknown-field", "rule-typo", "enum", "selector-typo"])
def test_network_policy_validation_catches_broken_policies(mutate):
    policy = _network_policy("cluster/kuberay-raycluster.yaml")
    mutate(policy["spec"])
    assert _network_policy_errors(policy)


def _pod_labels(doc: dict, template: dict) -> dict:
    """The labels a pod of ``template`` carries: the template's own, and for a RayCluster the
    ``ray.io/cluster`` label KubeRay adds (a RayJob's or RayService's cluster is named
    ``<name>-<random>``, so theirs is not known in the file)."""
    labels = dict(template.get("metadata", {}).get("labels", {}))
    if doc["kind"] == "RayCluster":
        labels["ray.io/cluster"] = doc["metadata"]["name"]
    return labels


@pytest.mark.parametrize("rel", sorted(KUBERAY_MANIFESTS))
def test_network_policy_selects_every_pod_of_its_cluster_and_denies_other_ingress(rel):
    doc, policy = load(rel), _network_policy(rel)
    selector = policy["spec"]["podSelector"]
    assert set(selector) == {"matchLabels"}, rel
    # a label naming this cluster, not every pod of the namespace
    assert set(selector["matchLabels"].items()) & {("ray.io/cluster", doc["metadata"]["name"]),
                                                   ("raykd.io/cluster", doc["metadata"]["name"])}, rel
    for role, template in _pod_templates(doc).items():
        assert selector["matchLabels"].items() <= _pod_labels(doc, template).items(), (rel, role)
    # with Ingress in policyTypes, what no rule admits is denied
    assert "Ingress" in policy["spec"]["policyTypes"], rel


def _peer_kind(peer: dict, cluster_selector: dict) -> str:
    """``cluster`` (the policy's own pods), ``operator`` (the KubeRay operator's pods in one
    namespace) or ``ingress`` (the ingress controller's namespace); anything else fails."""
    if peer == {"podSelector": cluster_selector}:
        return "cluster"
    namespace = peer.get("namespaceSelector", {})
    assert set(namespace) == {"matchLabels"} and set(namespace["matchLabels"]) == {NAMESPACE_LABEL}, peer
    if peer.get("podSelector") == {"matchLabels": OPERATOR_POD_LABELS} and set(peer) == {
            "namespaceSelector", "podSelector"}:
        return "operator"
    assert peer == {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: INGRESS_NAMESPACE}}}, peer
    return "ingress"


def _admitted_ports(policy: dict) -> dict[str, set | None]:
    """The ports each kind of peer may reach (None: every port)."""
    admitted: dict[str, set | None] = {}
    for rule in policy["spec"].get("ingress", []):
        assert rule.get("from"), f"a rule without `from` admits every source: {rule}"
        for port in rule.get("ports", []):
            assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port, port
        ports = {p["port"] for p in rule["ports"]} if "ports" in rule else None
        for peer in rule["from"]:
            kind = _peer_kind(peer, policy["spec"]["podSelector"])
            before = admitted.get(kind, set())
            admitted[kind] = None if before is None or ports is None else before | ports
    return admitted


@pytest.mark.parametrize("rel", sorted(KUBERAY_MANIFESTS))
def test_network_policy_admits_ray_ports_from_the_cluster_and_serve_from_the_ingress_only(rel):
    doc, policy = load(rel), _network_policy(rel)
    admitted = _admitted_ports(policy)
    assert admitted.get("cluster", set()) is None, rel  # every port between the cluster's own pods
    # the operator reaches what it calls (else RayJob/RayService hang), nothing more
    assert admitted.get("operator", set()) == OPERATOR_PORTS[doc["kind"]], rel
    serving = doc["kind"] == "RayService"
    assert admitted.get("ingress", set()) == ({SERVE_PORT} if serving else set()), rel
    text = (ROOT / rel).read_text()
    assert "your ingress namespace" in text if serving else True
    if OPERATOR_PORTS[doc["kind"]]:
        assert "the operator's namespace" in text, rel


def _quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity ("4", "500m", 2) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _replicas_per_pod(group: dict, need_cpus: float, need_gpus: float) -> int:
    """How many replicas needing (CPUs, GPUs) fit on one pod of ``group``, by the Ray resources
    KubeRay gives it (num-cpus/num-gpus in rayStartParams, else the container limits)."""
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    have = {"cpu": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
            "gpu": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    fits = [math.floor(have[k] / need) for k, need in (("cpu", need_cpus), ("gpu", need_gpus)) if need]
    return min(fits) if fits else 0


def test_rayservice_runs_two_replicas_that_fit_on_the_pods_it_keeps():
    doc = load("deploy/kuberay-rayservice.yaml")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    cluster = doc["spec"]["rayClusterConfig"]
    for deployment in app["deployments"]:
        autoscaling = deployment.get("autoscaling_config")
        replicas = autoscaling["min_replicas"] if autoscaling else deployment["num_replicas"]
        assert replicas >= 2, deployment["name"]  # one replica lost, one still serves
        options = deployment.get("ray_actor_options", {})
        need = (options.get("num_cpus", 1), options.get("num_gpus", 0))  # Serve's defaults
        head = _replicas_per_pod(cluster["headGroupSpec"], *need)
        # worker pods always up: minReplicas (no autoscaler runs below it), and `replicas` as set
        workers = sum(_replicas_per_pod(g, *need) * min(g["replicas"], g.get("minReplicas", 0))
                      for g in cluster["workerGroupSpecs"])
        assert head + workers >= replicas, (deployment["name"], head, workers)


def test_rayservice_head_is_fault_tolerant_with_an_external_redis():
    doc = load("deploy/kuberay-rayservice.yaml")
    cluster = doc["spec"]["rayClusterConfig"]
    ft = cluster["gcsFaultToleranceOptions"]
    host, _, port = ft["redisAddress"].removeprefix("redis://").rpartition(":")
    assert host and port.isdigit(), ft["redisAddress"]
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]  # from a Secret, never a literal value
    assert set(ft["redisPassword"]) == {"valueFrom"}
    text = (ROOT / "deploy/kuberay-rayservice.yaml").read_text()
    assert f"kubectl create secret generic {ref['name']} --from-literal={ref['key']}=" in text
    # KubeRay refuses the older ways next to gcsFaultToleranceOptions
    assert "ray.io/ft-enabled" not in doc["metadata"].get("annotations", {})
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not {e["name"] for e in head.get("env", [])} & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"}
    assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cluster_launcher_lets_ssh_in_from_a_stated_cidr_only():
    cfg = _launcher()
    # Ray adds provider.security_group's rules to its own group's 0.0.0.0/0 SSH rule: not used.
    assert "IpPermissions" not in cfg["provider"].get("security_group", {})
    # Every node type names the cluster's group, so Ray creates none of its own.
    groups = [t["node_config"].get("SecurityGroupIds") for t in cfg["available_node_types"].values()]
    assert groups[0] and all(g == groups[0] for g in groups), groups
    rules = [shlex.split(c, comments=True) for c in _header_commands("cluster/ray-cluster.yaml")
             if c.startswith("aws ec2 authorize-security-group-ingress ")]
    ssh = [r for r in rules if "--port" in r]
    assert len(rules) == 2 and len(ssh) == 1, rules
    (ssh,) = ssh
    assert (_flag(ssh, "--protocol"), _flag(ssh, "--port")) == ("tcp", "22")
    cidr = ipaddress.ip_network(_flag(ssh, "--cidr"))
    assert cidr.prefixlen >= 8, cidr  # a network you name, never 0.0.0.0/0
    (nodes,) = [r for r in rules if r is not ssh]
    assert _flag(nodes, "--source-group") == _flag(nodes, "--group-id")  # node to node only
    assert "your office/VPN CIDR" in (ROOT / "cluster/ray-cluster.yaml").read_text()


def _iam(rel: str) -> dict:
    return json.loads((ROOT / rel).read_text())


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _actions(policy: dict) -> set[str]:
    return {a for s in policy["Statement"] for a in _as_list(s["Action"])}


@pytest.mark.parametrize("rel", IAM_POLICIES)
def test_iam_policy_is_json_without_wildcard_actions_or_s3_resources(rel):
    policy = _iam(rel)
    assert policy["Version"] == "2012-10-17"
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and not {"NotAction", "NotResource"} & set(statement)
        actions = _as_list(statement["Action"])
        assert not [a for a in actions if "*" in a], (rel, statement)
        resources = _as_list(statement.get("Resource", []))
        if any(a.startswith("s3:") for a in actions):
            assert resources and set(resources) <= {f"arn:aws:s3:::{RUN_BUCKET}",
                                                    f"arn:aws:s3:::{RUN_BUCKET}/*"}, (rel, statement)
        if "*" in resources:  # only for the calls that take no resource ARN
            assert all(a.startswith("ec2:Describe") for a in actions), (rel, statement)


def test_cluster_launcher_runs_head_and_workers_under_their_own_instance_profiles():
    cfg = _launcher()
    types = cfg["available_node_types"]
    profile = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in types.items()}
    head_profile = profile.pop(cfg["head_node_type"])
    assert (head_profile, set(profile.values())) == ("raykd-head", {"raykd-worker"})
    head, worker = _iam("cluster/iam/raykd-head-policy.json"), _iam("cluster/iam/raykd-worker-policy.json")
    # the calls of Ray's AWS node provider, run by the head's autoscaler
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
            "ec2:DescribeInstanceTypes"} <= _actions(head)
    (passrole,) = [s for s in head["Statement"] if "iam:PassRole" in _as_list(s["Action"])]
    assert _as_list(passrole["Resource"]) == ["arn:aws:iam::*:role/raykd-worker"]  # the worker role only
    for statement in head["Statement"]:
        if {"ec2:TerminateInstances", "ec2:RunInstances"} & set(_as_list(statement["Action"])):
            resources = _as_list(statement["Resource"])
            if any(":instance/" in r for r in resources):  # this cluster's instances only
                assert "raykd" in json.dumps(statement.get("Condition", {})), statement
    # the AMI's SSM parameter, which EC2 resolves for the head's launches
    ssm = {r for s in head["Statement"] if "ssm:GetParameters" in _as_list(s["Action"])
           for r in _as_list(s["Resource"])}
    for t in types.values():
        parameter = t["node_config"]["ImageId"].removeprefix("resolve:ssm:")
        assert t["node_config"]["ImageId"] == parameter or any(r.endswith(f":parameter{parameter}") for r in ssm)
    assert {a.split(":")[0] for a in _actions(worker)} == {"s3"}  # workers: the bucket, nothing else
    trust = _iam("cluster/iam/ec2-trust-policy.json")
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]


def test_cluster_launcher_gives_every_node_the_serve_api_key_from_a_local_file():
    cfg = _launcher()
    text = (ROOT / "cluster/ray-cluster.yaml").read_text()
    # like the token: copied from your machine to every node, never in the file
    assert cfg["file_mounts"]["~/.raykd/api_key"] == "~/.raykd/api_key"
    assert "openssl rand -hex 32 >~/.raykd/api_key" in text
    commands = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 2
    for command in starts:  # every Ray worker process inherits `ray start`'s environment
        assert _ray_start_env(command)["RAYKD_API_KEY"] == "$(cat ~/.raykd/api_key)", command
