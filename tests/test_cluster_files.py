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
- Every YAML file in ``cluster/`` and ``deploy/`` is validated by one of these schemas (a test
  fails for a new file nobody validates); the Dockerfile and ``.dockerignore`` are checked too.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import importlib.util
import json
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
RAY_PORTS = {6379, 8265, 10001}  # GCS, dashboard, Ray client: never outside the cluster network
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


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


@pytest.mark.parametrize("rel", sorted([*LAUNCHER_FILES, *KUBERAY_MANIFESTS, *SERVE_CONFIGS]))
def test_every_file_is_plain_yaml_without_tabs(rel):
    text = (ROOT / rel).read_text()
    assert "\t" not in text
    assert isinstance(yaml.safe_load(text), dict)



# --- every shipped file validated against a real schema ------------------------------------------


def test_every_yaml_file_in_cluster_and_deploy_is_validated_against_a_schema():
    """A new YAML file in cluster/ or deploy/ must be added to one of the validated lists."""
    shipped = {p.relative_to(ROOT).as_posix() for d in ("cluster", "deploy") for p in (ROOT / d).iterdir()
               if p.is_file()}
    yaml_files = {f for f in shipped if f.endswith((".yaml", ".yml"))}
    assert yaml_files == {*LAUNCHER_FILES, *KUBERAY_MANIFESTS, *SERVE_CONFIGS}
    assert shipped - yaml_files == {"cluster/Dockerfile"}


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
    docs = list(yaml.safe_load_all((ROOT / rel).read_text()))
    assert len(docs) == 1, f"{rel}: one object per file"
    (doc,) = docs
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


def _ray_cluster_spec(rel: str) -> dict:
    doc = load(rel)
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


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


def test_cluster_launcher_turns_token_authentication_on_on_every_node():
    cfg = _launcher()
    # Every process in the containers (ray start, autoscaler, `ray exec` drivers) sees the mode ...
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    # ... and so does `ray start` itself, with or without docker.
    commands = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start ") for c in starts)
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
