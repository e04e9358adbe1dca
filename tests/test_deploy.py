"""The Kubernetes manifests (deploy/kubernetes/) are valid objects and match the service they run.

Validity: every object, as ``kubectl apply -k`` would send it, is read into the official Kubernetes
Python client's model of its kind and written back; a field the model does not know (a typo such
as ``readinesProbe``) or a value of the wrong type is an error, not silently dropped. Agreement:
probe paths, port, settings, resources, user and writable paths are compared with what the
service, BentoML and the Dockerfile actually use, each read from its source.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip(
    "kubernetes",
    reason="the Kubernetes Python client checks the manifests: pip install -e '.[dev]'",
)
from kubernetes.client import ApiClient  # noqa: E402

from aegan_core.bundle import DEFAULT_MODEL_DIR  # noqa: E402
from aegan_serve import config  # noqa: E402
from aegan_serve.apikeys import create_key  # noqa: E402
from aegan_serve.auth import AccessSettings  # noqa: E402
from aegan_serve.config import (  # noqa: E402
    Environment,
    Limits,
    Settings,
    SettingsError,
    env_var,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
VARIANTS = {"cpu": DEPLOY, "gpu": DEPLOY / "gpu"}
SERVICE_SOURCES = ROOT / "aegan_serve"
# The variant for the internet: keys from a Secret, quotas in Redis (more than one of some kinds).
PUBLIC = DEPLOY / "public"
# Set for a pod on purpose (deploy/kubernetes/base/configmap.yaml says why); checked below.
POD_SPECIFIC = {"AEGAN_DEVICE", "AEGAN_WORKERS", "AEGAN_THREADS"}


# --- The image, as the Dockerfile builds it -------------------------------------------------------


def dockerfile() -> dict[str, Any]:
    """What the manifests must agree with: user id, working directory, BENTOML_HOME, port."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    cmd = json.loads(re.search(r"^CMD (\[.+\])$", text, re.M).group(1))
    return {
        "uid": int(re.search(r"useradd .*--uid (\d+)", text).group(1)),
        "workdir": re.search(r"^WORKDIR (\S+)$", text, re.M).group(1),
        "bentoml_home": re.search(r"\bBENTOML_HOME=(\S+)", text).group(1),
        "port": int(cmd[cmd.index("--port") + 1]),
        "expose": int(re.search(r"^EXPOSE (\d+)$", text, re.M).group(1)),
    }


# --- Rendering: the part of kustomize these kustomizations use ------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize DIRECTORY`` builds: resources (files or kustomizations),
    image names and JSON 6902 patches. Anything else fails here, so that a kustomization never
    uses a feature these tests would ignore (test_render_matches_kubectl keeps this honest)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: kustomization fields this test cannot render: {unknown}"
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in pod_spec(obj).get("containers", []) if is_workload(obj) else []:
                name, tag = re.fullmatch(r"(.+?)(:[^:/]+)?", container["image"]).groups()
                if name == image["name"]:
                    tag = f":{image['newTag']}" if "newTag" in image else tag or ""
                    container["image"] = image.get("newName", name) + tag
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        assert set(target) <= {"kind", "name"}, target
        matches = [
            obj
            for obj in objects
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]
        ]
        assert len(matches) == 1, f"patch target {target} matches {len(matches)} objects"
        for operation in yaml.safe_load(patch["patch"]):
            apply_json_patch(matches[0], operation)
    return objects


def apply_json_patch(doc: dict[str, Any], operation: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) on ``doc``, in place."""
    *parents, last = [
        part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]
    ]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op = operation["op"]
    value = copy.deepcopy(operation.get("value"))
    if op == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), value)
    elif op == "add":
        node[last] = value
    elif op in ("replace", "remove"):
        key = int(last) if isinstance(node, list) else last
        assert key in (range(len(node)) if isinstance(node, list) else node), operation["path"]
        if op == "replace":
            node[key] = value
        else:
            del node[key]
    else:
        raise AssertionError(f"JSON patch operation {op!r} is not rendered by this test")


def is_workload(obj: dict[str, Any]) -> bool:
    return obj["kind"] == "Deployment"


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def objects_of(variant: str) -> dict[str, dict[str, Any]]:
    """The rendered objects of a variant by kind (one of each kind here)."""
    objects = render(VARIANTS[variant])
    by_kind = {obj["kind"]: obj for obj in objects}
    assert len(by_kind) == len(objects), [obj["kind"] for obj in objects]
    return by_kind


# --- Strict validation with the Kubernetes client's models ----------------------------------------


def model_name(doc: dict[str, Any]) -> str:
    """The client's model class of an object: apps/v1 Deployment -> V1Deployment."""
    version = doc["apiVersion"].rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + doc["kind"]


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Why ``doc`` is not a valid object of its kind: the client's model refuses it (a missing
    required field, a value of the wrong type), or writing the model back loses or changes a
    field (the model does not know it: a misspelt or misplaced field)."""
    api = ApiClient()
    try:
        model = api._ApiClient__deserialize(doc, model_name(doc))  # what deserialize() calls
    except Exception as error:  # the client raises pydantic's ValidationError, among others
        return [f"{model_name(doc)}: {error}"]
    return differences(doc, api.sanitize_for_serialization(model), doc["kind"])


def differences(given: Any, read: Any, where: str) -> list[str]:
    if isinstance(given, dict) and isinstance(read, dict):
        found = [
            f"{where}.{key}: not a field here (unknown to the model)"
            for key in given.keys() - read.keys()
        ]
        found += [f"{where}.{key}: added by the model" for key in read.keys() - given.keys()]
        for key in given.keys() & read.keys():
            found += differences(given[key], read[key], f"{where}.{key}")
        return found
    if isinstance(given, list) and isinstance(read, list) and len(given) == len(read):
        return [
            e
            for i, (g, r) in enumerate(zip(given, read, strict=True))
            for e in differences(g, r, f"{where}[{i}]")
        ]
    if given != read or type(given) is not type(read):
        return [f"{where}: {given!r} reads back as {read!r}"]
    return []


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_a_valid_kubernetes_object(variant: str) -> None:
    objects = render(VARIANTS[variant])
    assert sorted(obj["kind"] for obj in objects) == sorted(
        ["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    )
    for obj in objects:
        assert manifest_errors(obj) == [], obj["kind"]


def test_every_manifest_file_is_in_the_kustomization() -> None:
    listed = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())["resources"]
    files = sorted(
        p.name for p in (DEPLOY / "base").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    assert sorted(listed) == files
    assert sorted(
        str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.y*ml") if p.parent.name != "base"
    ) == [
        "gpu/kustomization.yaml",
        "kustomization.yaml",
        "public/kustomization.yaml",
        "public/redis.yaml",
    ]


BROKEN = {
    "a misspelt field": (
        "readinesProbe",
        lambda c: c.update(readinesProbe=c.pop("readinessProbe")),
    ),
    "a field in the wrong place": ("ports", lambda c: c["resources"].update(ports=c["ports"])),
    "a number as a string": ("containerPort", lambda c: c["ports"][0].update(containerPort="3000")),
    "a quantity as a number": ("cpu", lambda c: c["resources"]["limits"].update(cpu=2)),
    "a missing required field": ("name", lambda c: c.pop("name")),
}


@pytest.mark.parametrize("mistake", BROKEN)
def test_the_validation_catches_a_broken_manifest(mistake: str) -> None:
    deployment = objects_of("cpu")["Deployment"]
    field, breaks = BROKEN[mistake]
    breaks(pod_spec(deployment)["containers"][0])
    errors = manifest_errors(deployment)
    assert errors and field in "\n".join(errors), errors


def test_render_matches_kubectl() -> None:
    """The renderer above builds what kubectl builds (kubectl needs no cluster for this)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer is not compared with kustomize's")
    for variant, directory in {**VARIANTS, "public": PUBLIC}.items():
        built = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
        ).stdout
        by_name = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(built)}
        ours = {(o["kind"], o["metadata"]["name"]): o for o in render(directory)}
        assert ours == by_name, variant


# --- Agreement with the service -------------------------------------------------------------------


def service_health_routes() -> dict[str, str]:
    """BentoML's health routes of the service, by name (livez, readyz), from its ASGI app."""
    from aegan_serve.service import AEGAN

    return {
        route.name: route.path
        for route in AEGAN.to_asgi().routes
        if getattr(route, "name", None) in ("livez", "readyz")
    }


def probe_problems(deployment: dict[str, Any], routes: dict[str, str], port: int) -> list[str]:
    """Probes that would not reach the service's health routes on its port."""
    container = pod_spec(deployment)["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {"startupProbe": "livez", "livenessProbe": "livez", "readinessProbe": "readyz"}
    problems = []
    for probe, route in expected.items():
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != routes[route]:
            problems.append(
                f"{probe} path {get.get('path')!r}, the service's {route} is {routes[route]!r}"
            )
        if ports.get(get.get("port"), get.get("port")) != port:
            problems.append(f"{probe} port {get.get('port')!r} is not the service's port {port}")
    return problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_reach_the_service_health_routes(variant: str) -> None:
    routes = service_health_routes()
    assert set(routes) == {"livez", "readyz"}, routes
    deployment = objects_of(variant)["Deployment"]
    assert probe_problems(deployment, routes, dockerfile()["port"]) == []

    wrong = copy.deepcopy(deployment)  # and the check sees a wrong path
    pod_spec(wrong)["containers"][0]["readinessProbe"]["httpGet"]["path"] = "/ready"
    assert probe_problems(wrong, routes, dockerfile()["port"]) != []
    swapped = copy.deepcopy(deployment)
    pod_spec(swapped)["containers"][0]["livenessProbe"]["httpGet"]["path"] = routes["readyz"]
    assert probe_problems(swapped, routes, dockerfile()["port"]) != []


def test_probe_paths_answer_200_on_the_service_with_the_pod_settings() -> None:
    from service_helpers import serve

    objects = objects_of("cpu")
    settings = dict(objects["ConfigMap"]["data"])
    del settings["AEGAN_MODEL"]  # the image's path of the shipped bundle; here the repository's
    container = pod_spec(objects["Deployment"])["containers"][0]
    paths = {
        container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    with serve(DEFAULT_MODEL_DIR, **settings) as client:
        for path in sorted(paths):
            assert client.get(path).status_code == 200, path


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_are_the_images(variant: str) -> None:
    image = dockerfile()
    objects = objects_of(variant)
    container = pod_spec(objects["Deployment"])["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [image["port"]] == [image["expose"]]
    target = objects["Service"]["spec"]["ports"][0]["targetPort"]
    assert target in {p["name"] for p in container["ports"]} | {image["port"]}
    assert "command" not in container and "args" not in container  # the image's CMD sets the port


def service_variables() -> set[str]:
    """Every AEGAN_* variable the service reads: one per field of its Environment."""
    return {env_var(name) for name in Environment.model_fields}


def test_the_service_reads_no_variable_its_environment_does_not_declare() -> None:
    """Each AEGAN_* name in the service's code is a declared field: none is read behind it."""
    named = {
        name
        for source in SERVICE_SOURCES.glob("*.py")
        for name in re.findall(r"AEGAN_[A-Z0-9_]*[A-Z0-9]", source.read_text())
    }
    assert named - service_variables() == set()
    assert len(service_variables()) == 31


def default_settings(variant: str) -> dict[str, str]:
    """Each variable's default where it does not depend on the machine, as in the image, on a
    machine where CUDA is usable (gpu) or not (cpu)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "gpu_usable", lambda options: variant == "gpu")
        defaults = Settings.from_env({"AEGAN_WORKERS": "1", "AEGAN_THREADS": "1"})
    image_model = Path(dockerfile()["workdir"]) / DEFAULT_MODEL_DIR.relative_to(ROOT)
    values = {
        "AEGAN_MODEL": str(image_model),
        "AEGAN_FP16": "1" if defaults.fp16 else "0",
        "AEGAN_BATCH_SIZE": str(defaults.batch_size),
        "AEGAN_BATCH_LATENCY_MS": str(defaults.batch_latency_ms),
        "AEGAN_MAX_QUEUE": str(defaults.max_queue),
        "AEGAN_CUDA_ALGO_SEARCH": defaults.cuda_algo_search,
        "AEGAN_CUDA_MEM_LIMIT": str(defaults.cuda_mem_limit),
        "AEGAN_CUDA_ARENA": defaults.cuda_arena,
        "AEGAN_CUDA_TF32": "1" if defaults.cuda_tf32 else "0",
        "AEGAN_GALLERY": defaults.gallery,
        "AEGAN_GALLERY_ROOT": defaults.gallery_root,
    }
    values |= {env_var(f.name): str(getattr(defaults.limits, f.name)) for f in fields(Limits)}
    access = AccessSettings.from_env({})  # keys and quotas off: their variables empty
    values |= {
        "AEGAN_API_KEYS_FILE": "",
        "AEGAN_METRICS_PUBLIC": "0",
        "AEGAN_AUTH_FAILURES_PER_MIN": str(access.quotas.auth_failures),
        "AEGAN_RATE_LIMIT_STORAGE": access.quotas.storage,
        "AEGAN_RATE_LIMIT_FAILURE": access.quotas.failure,
    }
    values |= {
        f"AEGAN_QUOTA_{budget}_{part}": ""
        for budget in ("REQUESTS", "IMAGES")
        for part in ("PER_S", "BURST")
    }
    return values


@pytest.mark.parametrize("variant", VARIANTS)
def test_settings_are_the_services_with_their_defaults(variant: str) -> None:
    objects = objects_of(variant)
    container = pod_spec(objects["Deployment"])["containers"][0]
    assert container["envFrom"] == [
        {"configMapRef": {"name": objects["ConfigMap"]["metadata"]["name"]}}
    ]
    assert "env" not in container
    data = objects["ConfigMap"]["data"]
    assert set(data) == service_variables()
    defaults = default_settings(variant)
    assert set(defaults) == service_variables() - POD_SPECIFIC
    assert {k: v for k, v in data.items() if k not in POD_SPECIFIC} == defaults
    try:
        Settings.from_env(data)
        assert not AccessSettings.from_env(data).quotas_on
    except SettingsError as error:
        pytest.fail(f"the service would not start with these settings: {error}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_resources_are_the_services_and_workers_fill_them(variant: str) -> None:
    """The pod asks for what one worker declares to BentoML (aegan_serve/service.py declares
    Settings.resources: the GPU's when CUDA is usable), the GPU as the device plugin's resource."""
    from aegan_serve.service import AEGAN, SETTINGS

    objects = objects_of(variant)
    resources = pod_spec(objects["Deployment"])["containers"][0]["resources"]
    settings = Settings.from_env(objects["ConfigMap"]["data"])
    declared = SETTINGS.resources(gpu=variant == "gpu")
    if variant == "cpu":
        assert declared == AEGAN.config["resources"]  # this machine has no usable GPU
    gpus = declared.pop("gpu", None)
    for kind in ("requests", "limits"):
        assert {k: v for k, v in resources[kind].items() if k != "nvidia.com/gpu"} == declared
    if variant == "gpu":
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert resources["limits"]["nvidia.com/gpu"] == str(gpus) == "1"
        assert (settings.device, settings.workers) == ("cuda", 1)
        assert settings.batch_size == config.GPU_BATCH_SIZE
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        assert (settings.device, settings.workers) == ("cpu", int(declared["cpu"]))
    assert settings.workers * settings.threads == int(resources["limits"]["cpu"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_as_the_images_user_without_privileges(variant: str) -> None:
    spec = pod_spec(objects_of(variant)["Deployment"])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == dockerfile()["uid"]
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = spec["containers"][0]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_paths_the_server_writes_are_writable_volumes(variant: str) -> None:
    """TMPDIR and BENTOML_HOME: what `bentoml serve` writes (docs/DEPLOY.md) on a read-only root."""
    spec = pod_spec(objects_of(variant)["Deployment"])
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    for path in ("/tmp", dockerfile()["bentoml_home"]):
        assert mounts.get(path) in empty_dirs, path


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_autoscaler_and_budget_select_the_deployment(variant: str) -> None:
    objects = objects_of(variant)
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert (
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    )
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert hpa["metrics"][0]["resource"]["target"]["type"] == "Utilization"
    assert "replicas" not in deployment["spec"]  # the autoscaler's to set
    if variant == "cpu":  # one pod can be drained while another serves
        assert hpa["minReplicas"] > objects["PodDisruptionBudget"]["spec"]["maxUnavailable"]
    else:  # one GPU is enough to start (test_the_gpu_variant_runs_on_one_plain_gpu)
        assert hpa["minReplicas"] == 1 <= hpa["maxReplicas"]


def test_the_gpu_variant_runs_on_one_plain_gpu() -> None:
    """Schedulable with the NVIDIA device plugin alone, on a cluster with a single GPU: the GPU is
    requested as a resource, no node label of GPU feature discovery is required, GPU taints are
    tolerated, the autoscaler starts at one pod and a rollout needs no second GPU. Memory covers
    the CUDA libraries."""
    objects = objects_of("gpu")
    spec = pod_spec(objects["Deployment"])
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert "nodeSelector" not in spec and "affinity" not in spec
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    memory = resources["limits"]["memory"]
    assert memory.endswith("Gi") and int(memory[:-2]) >= 4, memory
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 1
    assert objects["Deployment"]["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 0,
        "maxUnavailable": 1,
    }
    startup = spec["containers"][0]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # CUDA start and warm-up
    cpu = pod_spec(objects_of("cpu")["Deployment"])
    assert (
        "tolerations" not in cpu
        and "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    )


# --- The public variant: keys from a Secret, quotas in Redis -----------------------------------


def public_objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render(PUBLIC)}


def test_public_variant_objects_are_valid() -> None:
    objects = public_objects()
    assert set(objects) == {
        ("ConfigMap", "aegan-settings"),
        ("Deployment", "aegan"),
        ("Service", "aegan"),
        ("HorizontalPodAutoscaler", "aegan"),
        ("PodDisruptionBudget", "aegan"),
        ("Deployment", "aegan-redis"),
        ("Service", "aegan-redis"),
        ("NetworkPolicy", "aegan-redis"),
    }
    for obj in objects.values():
        assert manifest_errors(obj) == [], obj["kind"]
    assert ("Secret", "aegan-api-keys") not in objects  # made by the user: never overwritten


def test_public_variant_mounts_the_keys_secret_as_the_keys_file(tmp_path) -> None:
    objects = public_objects()
    data = objects[("ConfigMap", "aegan-settings")]["data"]
    spec = pod_spec(objects[("Deployment", "aegan")])
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "api-keys"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
    assert volume["secret"]["secretName"] == "aegan-api-keys"
    assert volume["secret"]["defaultMode"] & 0o004  # readable by the image's user (not root)
    assert mount["readOnly"] is True and "subPath" not in mount  # a subPath is never updated
    keys_file = Path(data["AEGAN_API_KEYS_FILE"])
    assert str(keys_file.parent) == mount["mountPath"] and keys_file.name == "keys.json"
    # The settings start the service, with a keys file where the Secret puts it.
    local = tmp_path / "keys.json"
    create_key(local, "someone", ["generate"])
    settings = AccessSettings.from_env({**data, "AEGAN_API_KEYS_FILE": str(local)})
    assert settings.quotas_on and settings.quotas.shared
    Settings.from_env(data)


def test_public_variant_points_the_quotas_at_its_redis() -> None:
    from urllib.parse import urlsplit

    objects = public_objects()
    url = urlsplit(objects[("ConfigMap", "aegan-settings")]["data"]["AEGAN_RATE_LIMIT_STORAGE"])
    service = objects[("Service", "aegan-redis")]
    redis = objects[("Deployment", "aegan-redis")]
    assert url.scheme == "redis" and url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"] == 6379
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    policy = objects[("NetworkPolicy", "aegan-redis")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    aegan = objects[("Deployment", "aegan")]["spec"]["template"]["metadata"]["labels"]
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() <= aegan.items()
    container = pod_spec(redis)["containers"][0]
    assert container["args"][:4] == ["--save", "", "--appendonly", "no"]  # counters, not data
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
