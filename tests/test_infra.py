"""infra/ is validated here, since its images cannot be pulled on this machine: the compose file parses
with `docker-compose config`, the core Kubernetes objects pass kubernetes-validate (strict), the KubeRay
objects pass the KubeRay schema kept in infra/k8s/schemas (their pod templates pass kubernetes-validate),
both overlays render and validate, every MOEFLOW_* variable the manifests set is a real setting (and the
settings a cluster needs are all set), and no secret is inline."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import IN_CI
from moeflow.platform.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
K8S_VERSION = "1.33.0"
# the settings a cluster configuration must set (the embedded defaults are single-machine)
CLUSTER_REQUIRED = {"MOEFLOW_S3_ENDPOINT", "MOEFLOW_S3_BUCKET", "MOEFLOW_S3_ACCESS_KEY", "MOEFLOW_S3_SECRET_KEY",
                    "MOEFLOW_CATALOG_URL", "MOEFLOW_MLFLOW_TRACKING_URI", "MOEFLOW_PREFECT_API_URL",
                    "MOEFLOW_RAY_ADDRESS"}


def _known_variables() -> set[str]:
    from moeflow.platform.serve.app import API_KEYS_ENV

    return {f"MOEFLOW_{name.upper()}" for name in Settings.model_fields} | {API_KEYS_ENV}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (Debian: apt-get install -y {name})"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _base_objects() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in _docs(K8S / "base" / name)]


def _json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 replace/add/remove (what the overlays use), so overlays are rendered and validated."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = int(parts[-1]) if isinstance(parent, list) else parts[-1]
        if op["op"] == "remove":
            del parent[last]
        elif op["op"] in ("replace", "add"):
            if op["op"] == "replace":
                parent[last]  # noqa: B018 - replace needs an existing target (KeyError/IndexError otherwise)
            if isinstance(parent, list) and op["op"] == "add":
                parent.insert(last, op["value"])
            else:
                parent[last] = op["value"]
        else:
            raise ValueError(f"unsupported op {op['op']}")
    return doc


def _render(overlay: str) -> list[dict]:
    folder = K8S / "overlays" / overlay
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base"]
    objects = _base_objects()
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matches = [i for i, o in enumerate(objects) if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        assert len(matches) == 1, f"{overlay}: patch {patch['path']} matches {len(matches)} objects"
        objects[matches[0]] = _json_patch(objects[matches[0]], yaml.safe_load((folder / patch["path"]).read_text()))
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}
    for obj in objects:
        for container in _containers(obj):
            container["image"] = images.get(container["image"], container["image"])
    return objects


def _pod_templates(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    if obj["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else []
    if obj["kind"] == "RayService":
        cluster = spec["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    return [spec["template"]] if "template" in spec else []


def _containers(obj: dict) -> list[dict]:
    return [c for t in _pod_templates(obj) for c in t["spec"]["containers"]]


def _kuberay_validator():
    import jsonschema

    schema = json.loads((K8S / "schemas" / "kuberay-v1.json").read_text())

    def validate(obj: dict) -> None:
        kind_schema = {**schema["kinds"][obj["kind"]], "$defs": schema["$defs"]}
        jsonschema.Draft202012Validator(kind_schema).validate(obj)

    return validate


def _validate_objects(objects: list[dict]) -> None:
    import kubernetes_validate

    kuberay = _kuberay_validator()
    for obj in objects:
        if obj["apiVersion"].startswith("ray.io/"):
            kuberay(obj)
            for template in _pod_templates(obj):  # corev1.PodTemplateSpec: Kubernetes' own schema
                wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                kubernetes_validate.validate(wrapper, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- compose
def test_compose_config_parses_with_docker_compose():
    tool = _tool("docker-compose")
    out = subprocess.run([tool, "-f", str(INFRA / "compose.yaml"), "--profile", "gpu", "config"],
                         capture_output=True, text=True, timeout=60, cwd=INFRA)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    services = config["services"]
    assert set(services) == {"postgres", "s3", "init", "prefect", "worker", "mlflow", "ray-head", "ray-worker",
                             "ray-worker-gpu", "dashboard", "gateway"}
    for name, svc in services.items():
        if name != "init":
            assert "healthcheck" in svc or name.startswith("ray-worker"), f"{name} has no health check"
    assert services["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "postgresql+psycopg://" in " ".join(services["mlflow"]["command"])  # MLflow on PostgreSQL
    assert "--serve-artifacts" in " ".join(services["mlflow"]["command"])
    worker_env = services["worker"]["environment"]
    assert worker_env["MOEFLOW_S3_ENDPOINT"] == "s3:8333" and worker_env["MOEFLOW_RAY_ADDRESS"] == "ray-head:6379"
    assert {"postgres-data", "s3-data"} <= set(config["volumes"])


def test_compose_config_rejects_a_broken_file(tmp_path):
    """The check bites: a service that depends on one that does not exist is refused."""
    tool = _tool("docker-compose")
    broken = INFRA / ".compose-broken-test.yaml"
    broken.write_text((INFRA / "compose.yaml").read_text().replace("  s3:\n    image", "  s3:\n    imagee", 1))
    try:
        out = subprocess.run([tool, "-f", str(broken), "config"], capture_output=True, text=True, timeout=60, cwd=INFRA)
    finally:
        broken.unlink()
    assert out.returncode != 0 and "imagee" in out.stderr


# ---------------------------------------------------------------- kubernetes
def test_base_objects_validate():
    objects = _base_objects()
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("RayCluster", "moeflow"), ("RayJob", "moeflow-pretrain"), ("Deployment", "prefect"),
            ("Deployment", "prefect-worker"), ("Deployment", "mlflow"), ("StatefulSet", "postgres"),
            ("StatefulSet", "s3"), ("Deployment", "dashboard"), ("RayService", "moeflow-serve")} <= kinds
    _validate_objects(objects)
    groups = {g["groupName"]: g for g in next(o for o in objects if o["kind"] == "RayCluster")["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("overlay", ["local", "production"])
def test_overlays_render_and_validate(overlay):
    objects = _render(overlay)
    _validate_objects(objects)
    cluster = next(o for o in objects if o["kind"] == "RayCluster")
    groups = [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]]
    assert groups == (["cpu"] if overlay == "local" else ["cpu", "gpu"])
    images = {c["image"] for o in objects for c in _containers(o)}
    assert not any(i in ("moeflow", "moeflow-cuda") for i in images), images  # every image was pinned


def test_kuberay_schema_catches_mistakes():
    import jsonschema

    validate = _kuberay_validator()
    cluster = next(o for o in _base_objects() if o["kind"] == "RayCluster")
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["groupname"] = bad["spec"]["workerGroupSpecs"][0].pop("groupName")
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # rayStartParams are strings
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    job = next(o for o in _base_objects() if o["kind"] == "RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["submissionMode"] = "K8sMode"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


def _serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.mark.parametrize("overlay", [None, "local", "production"])
def test_rayservice_serve_config_builds_with_rays_schema_and_moeflows_builders(overlay):
    """serveConfigV2 passes Ray Serve's own schema; every application's builder imports and builds with its
    args (the pydantic configs check them); model apps are named as the gateway looks them up, and the
    route table serves exactly the deployed versions."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from moeflow.platform.serve.app import GATEWAY_APP, app_name
    from moeflow.platform.serve.routing import RouteTable

    objects = _base_objects() if overlay is None else _render(overlay)
    service = next(o for o in objects if o["kind"] == "RayService")
    config = _serve_config(service)
    ServeDeploySchema.model_validate(config)
    built, deployed = {}, set()
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        built[app["name"]] = getattr(importlib.import_module(module), attr)(app["args"])
        if attr == "model_app":
            assert app["name"] == app_name(app["args"]["name"], app["args"]["version"])
            assert app["route_prefix"] is None, "model versions are reached through the gateway only"
            deployed.add((app["args"]["name"], app["args"]["version"]))
    gateway = next(a for a in config["applications"] if a["name"] == GATEWAY_APP)
    assert gateway["route_prefix"] == "/"
    routes = RouteTable.model_validate(gateway["args"]["routes"])
    assert {(n, v) for n, vs in routes.versions.items() for v in vs} == deployed
    assert routes.resolve("moeflow-tiny").version in {v for _, v in deployed}
    gpu_args = [a["args"].get("num_gpus", 0) for a in config["applications"] if a["import_path"].endswith(":model_app")]
    assert all(g == (0 if overlay == "local" else 1) for g in gpu_args), gpu_args


def test_rayservice_checks_catch_mistakes():
    import jsonschema
    from pydantic import ValidationError

    from moeflow.platform.serve.app import gateway_app, model_app

    validate = _kuberay_validator()
    service = next(o for o in _base_objects() if o["kind"] == "RayService")
    bad = copy.deepcopy(service)
    bad["spec"]["serveConfigv2"] = bad["spec"].pop("serveConfigV2")
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = copy.deepcopy(service)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    apps = {a["name"]: a for a in _serve_config(service)["applications"]}
    model = next(a for a in apps.values() if a["import_path"].endswith(":model_app"))
    with pytest.raises(ValidationError):
        model_app({**model["args"], "engine": {"max_batchh": 8}})
    gateway = apps["moeflow-gateway"]["args"]
    with pytest.raises(ValidationError, match="not served"):
        gateway_app({**gateway, "routes": {**gateway["routes"], "aliases": {"moeflow-tiny": {"production": "9"}}}})
    with pytest.raises(ValueError, match="unknown args"):
        gateway_app({**gateway, "replicas": 2})


def test_kubernetes_validate_catches_a_bad_pod_template():
    import kubernetes_validate

    deployment = copy.deepcopy(next(o for o in _base_objects() if o["metadata"]["name"] == "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["port"] = 5000  # not a field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- settings
def _k8s_variables(objects: list[dict]) -> dict[str, str]:
    """MOEFLOW_* name -> how it is set ('value', 'secret', 'configmap')."""
    found: dict[str, str] = {}
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "moeflow-settings":
            found.update({k: "configmap" for k in obj["data"]})
        for c in _containers(obj):
            for env in c.get("env", []):
                how = "secret" if "secretKeyRef" in env.get("valueFrom", {}) else "value"
                found[env["name"]] = how
    return {k: v for k, v in found.items() if k.startswith("MOEFLOW_")}


def _compose_variables() -> set[str]:
    names = {line.split("=", 1)[0] for line in (INFRA / ".env").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    text = (INFRA / "compose.yaml").read_text()
    names |= set(re.findall(r"\b(MOEFLOW_[A-Z0-9_]+)\b", text))
    return {n for n in names if n.startswith("MOEFLOW_")}


def test_every_moeflow_variable_is_a_setting_and_the_required_ones_are_set():
    known = _known_variables()
    k8s = _k8s_variables(_base_objects())
    compose = _compose_variables() - {"MOEFLOW_IMAGE", "MOEFLOW_CUDA_IMAGE", "MOEFLOW_SERVE_MODEL"}  # compose's own
    assert not set(k8s) - known, f"k8s sets unknown settings: {sorted(set(k8s) - known)}"
    assert not compose - known, f"compose sets unknown settings: {sorted(compose - known)}"
    assert not CLUSTER_REQUIRED - set(k8s), sorted(CLUSTER_REQUIRED - set(k8s))
    assert not CLUSTER_REQUIRED - compose, sorted(CLUSTER_REQUIRED - compose)
    # the reverse check has teeth: a made-up name is not a setting
    assert "MOEFLOW_S3_ENDPOINTS" not in known


def test_compose_images_variables_are_not_settings():
    """MOEFLOW_IMAGE & co. configure compose only; they must never collide with a real setting."""
    known = _known_variables()
    assert not {"MOEFLOW_IMAGE", "MOEFLOW_CUDA_IMAGE", "MOEFLOW_SERVE_MODEL"} & known


def test_secrets_are_referenced_never_inline():
    objects = _base_objects()
    assert not [o for o in objects if o["kind"] == "Secret"]
    k8s = _k8s_variables(objects)
    for name in ("MOEFLOW_S3_ACCESS_KEY", "MOEFLOW_S3_SECRET_KEY", "MOEFLOW_CATALOG_URL"):
        assert k8s[name] == "secret", name
    for obj in objects:
        for c in _containers(obj):
            for env in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|ACCESS_KEY|API_KEYS", env["name"]):
                    assert "valueFrom" in env, f"{obj['metadata']['name']}: {env['name']} is inline"
        if obj["kind"] == "ConfigMap":
            for key, value in obj.get("data", {}).items():
                assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY", key), key
                assert "://" not in value or "@" not in value, f"credentials in a URL: {key}"


def test_dockerfile_installs_from_constraints():
    text = (INFRA / "Dockerfile").read_text()
    assert "constraints.txt" in text and "ARG BASE" in text and "ARG TORCH_INDEX" in text
    torch_pin = next(ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln.startswith("torch=="))
    assert "grep '^torch=='" in text and torch_pin  # torch from the variant's index, at the pinned version


# ---------------------------------------------------------------- the dashboard's start command
def _dashboard_flags(command: list[str]) -> list[str]:
    """The Streamlit flags after ``python -m moeflow.dashboard.server`` (the module ``moeflow up`` runs:
    it imports the pages' heavy dependencies before Streamlit binds the port, so a passing health check
    means a fast first visit)."""
    assert command[:3] == ["python", "-m", "moeflow.dashboard.server"], command
    assert "streamlit" not in " ".join(command[3:]).replace("--", ""), command  # no `streamlit run`
    return command[3:]


def test_infra_starts_the_dashboard_like_moeflow_up():
    from moeflow.platform.services import services

    local = services(Settings(dashboard_port=8501))["dashboard"].command
    local_flags = dict(zip(local[3::2], local[4::2]))  # python -m moeflow.dashboard.server --flag value ...
    assert local[1:3] == ["-m", "moeflow.dashboard.server"]
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]["dashboard"]
    deployment = next(o for o in _base_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == "dashboard")
    for command in (compose["command"], _containers(deployment)[0]["command"]):
        flags = dict(zip(*[iter(_dashboard_flags(command))] * 2))
        assert flags == {**local_flags, "--server.address": "0.0.0.0"}, flags  # the same flags, any interface
        assert flags["--server.port"] == "8501"
