"""Every manifest renders and validates, and the pieces of the example fit together.

Kustomizations are rendered by tests/ops/kustomize.py (kustomize is not installed here);
objects are validated by tests/ops/schemas.py: built-in kinds against the Kubernetes
schemas, custom resources against their CRDs.
"""

from __future__ import annotations

import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loractl.cli import build_parser
from sidecar.config import parse_config
from tests.ops.kustomize import KUSTOMIZATION, render
from tests.ops.schemas import MANIFESTS, ROOT, Validator, load_crds

Object = dict[str, Any]
IMAGE = "ghcr.io/loractl/loractl"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
BASE = MANIFESTS / "base"
EXAMPLE = MANIFESTS / "examples" / "food-review"
SIDECAR_COMPONENT = MANIFESTS / "sidecar"
APPLIED_BY_HAND = {MANIFESTS / "controller" / "example-rollout.yaml"}
"""Manifests no kustomization includes: applied on their own, when the time comes."""

VALIDATOR = Validator(load_crds())


def _kustomizations() -> list[Path]:
    return sorted(
        path.parent
        for path in MANIFESTS.rglob(KUSTOMIZATION)
        if (yaml.safe_load(path.read_text()) or {}).get("kind", "Kustomization") == "Kustomization"
    )


KUSTOMIZATIONS = _kustomizations()
RENDERED = {directory: render(directory) for directory in KUSTOMIZATIONS}


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(MANIFESTS)) for path in paths]


def _find(objects: list[Object], kind: str, name: str | None = None) -> Object:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_spec(objects: list[Object], deployment: str) -> Object:
    spec: Object = _find(objects, "Deployment", deployment)["spec"]["template"]["spec"]
    return spec


def _containers(pod: Object) -> Iterator[Object]:
    yield from pod.get("initContainers") or []
    yield from pod["containers"]


def _container(pod: Object, name: str) -> Object:
    [container] = [c for c in _containers(pod) if c["name"] == name]
    return container


def _flag(container: Object, flag: str) -> str:
    [value] = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"{flag}=")]
    return str(value)


def test_the_layout_is_there() -> None:
    assert {BASE, EXAMPLE, MANIFESTS / "controller", MANIFESTS / "crds"} <= set(KUSTOMIZATIONS)
    assert (SIDECAR_COMPONENT / KUSTOMIZATION).is_file()


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_every_rendered_object_validates(directory: Path) -> None:
    objects = RENDERED[directory].objects
    assert objects
    problems = {
        f"{obj['kind']}/{obj['metadata']['name']}": errors
        for obj in objects
        if (errors := VALIDATOR.errors(obj))
    }
    assert problems == {}


def _standalone_files() -> list[Path]:
    patches = {
        (directory / patch["path"]).resolve()
        for kustomization in MANIFESTS.rglob(KUSTOMIZATION)
        for directory in [kustomization.parent]
        for patch in (yaml.safe_load(kustomization.read_text()) or {}).get("patches") or []
    }
    return sorted(
        path
        for path in MANIFESTS.rglob("*.yaml")
        if path.name != KUSTOMIZATION and path.resolve() not in patches
    )


STANDALONE = _standalone_files()


@pytest.mark.parametrize("path", STANDALONE, ids=_ids(STANDALONE))
def test_every_manifest_file_validates_on_its_own(path: Path) -> None:
    """`kubectl apply -f FILE` works for each, patches aside."""
    for document in yaml.safe_load_all(path.read_text()):
        assert VALIDATOR.errors(document) == [], document["metadata"]["name"]


def test_every_manifest_is_used() -> None:
    used = set().union(*(rendered.files for rendered in RENDERED.values()))
    unused = {path.resolve() for path in MANIFESTS.rglob("*.yaml")} - used
    assert unused == {path.resolve() for path in APPLIED_BY_HAND}


def test_the_base_is_the_controller_with_picker_crd_and_rbac() -> None:
    objects = RENDERED[BASE].objects
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert kinds == {
        ("CustomResourceDefinition", "adapterrollouts.loractl.io"),
        ("ServiceAccount", "loractl-controller"),
        ("Role", "loractl-controller"),
        ("RoleBinding", "loractl-controller"),
        ("ClusterRole", "loractl-canary-operator"),
        ("Deployment", "loractl-controller"),
        ("Service", "loractl-picker"),
    }
    pod = _pod_spec(objects, "loractl-controller")
    assert pod["serviceAccountName"] == "loractl-controller"
    [controller] = pod["containers"]
    assert controller["args"][0] == "controller"
    # Serving the picker: no --no-picker, and its ports are published.
    assert "--no-picker" not in controller["args"]
    service = _find(objects, "Service", "loractl-picker")
    assert service["spec"]["selector"].items() <= _pod_labels(objects, "loractl-controller").items()
    port_names = {port["name"] for port in controller["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names


def _pod_labels(objects: list[Object], deployment: str) -> dict[str, str]:
    labels: dict[str, str] = _find(objects, "Deployment", deployment)["spec"]["template"][
        "metadata"
    ]["labels"]
    return labels


def test_the_sidecar_component_adds_a_native_sidecar_and_keeps_the_deployment() -> None:
    original = _pod_spec(
        list(yaml.safe_load_all((EXAMPLE / "vllm-deployment.yaml").read_text())),
        "vllm-llama3-8b-instruct",
    )
    objects = RENDERED[EXAMPLE].objects
    pod = _pod_spec(objects, "vllm-llama3-8b-instruct")
    sidecar = _container(pod, "lora-sidecar")
    assert sidecar in pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    vllm = _container(pod, "vllm")
    before = _container(original, "vllm")
    assert (vllm["image"], vllm["args"]) == (before["image"], before["args"])
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"} in vllm["env"]
    assert before["env"][0] in vllm["env"]
    # vLLM must find adapters at the paths the sidecar hands it.
    adapter_dir = _flag(sidecar, "--adapter-dir")
    mounts = {m["mountPath"]: m["name"] for m in vllm["volumeMounts"]}
    sidecar_mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert mounts[adapter_dir] == sidecar_mounts[adapter_dir]
    # The config directory is mounted whole (never subPath) from the adapter ConfigMap.
    config = Path(_flag(sidecar, "--config"))
    [config_mount] = [m for m in sidecar["volumeMounts"] if m["mountPath"] == str(config.parent)]
    assert "subPath" not in config_mount
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    configmap_name = volumes[config_mount["name"]]["configMap"]["name"]
    configmap = _find(objects, "ConfigMap", configmap_name)
    desired = parse_config(configmap["data"][config.name])
    assert desired.ensure_exist
    assert desired.problems == {}
    # --watch-configmap names that same ConfigMap, and the sidecar's Role lets it watch it.
    assert _flag(sidecar, "--watch-configmap").endswith(f"/{configmap_name}")
    role = _find(objects, "Role", "vllm-lora-sidecar")
    watched = [r for r in role["rules"] if "configmaps" in r["resources"]]
    assert [configmap_name] == watched[0]["resourceNames"]
    assert pod["serviceAccountName"] == "vllm-lora-sidecar"


def test_the_example_wires_gateway_route_pool_picker_models_and_adapters() -> None:
    objects = RENDERED[EXAMPLE].objects
    pool = _find(objects, "InferencePool")
    vllm = _container(_pod_spec(objects, "vllm-llama3-8b-instruct"), "vllm")
    controller = _container(_pod_spec(objects, "loractl-controller"), "controller")
    # Route → Gateway and → pool; pool → vLLM pods and their port; pool → picker Service.
    route = _find(objects, "HTTPRoute")
    assert route["spec"]["parentRefs"][0]["name"] == _find(objects, "Gateway")["metadata"]["name"]
    [backend] = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["group"], backend["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    assert backend["name"] == pool["metadata"]["name"] == _flag(controller, "--pool")
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector.items() <= _pod_labels(objects, "vllm-llama3-8b-instruct").items()
    assert pool["spec"]["targetPorts"] == [{"number": vllm["ports"][0]["containerPort"]}]
    picker = pool["spec"]["endpointPickerRef"]
    service = _find(objects, "Service", picker["name"])
    [grpc] = [port for port in service["spec"]["ports"] if port["port"] == picker["port"]["number"]]
    assert {"name": grpc["targetPort"], "containerPort": _flag_int(controller, "--grpc-port")} in [
        {"name": port["name"], "containerPort": port["containerPort"]}
        for port in controller["ports"]
    ]
    # Every model resolves, within this pool, to an adapter the ConfigMap loads or the base.
    config = parse_config(_find(objects, "ConfigMap")["data"]["configmap.yaml"])
    adapters = set(config.ensure_exist)
    base_models = {a.split("=", 1)[1] for a in controller["args"] if a.startswith("--base-model=")}
    for model in [o for o in objects if o["kind"] == "InferenceModel"]:
        assert model["spec"]["poolRef"]["name"] == pool["metadata"]["name"]
        targets = {t["name"] for t in model["spec"].get("targetModels") or []}
        assert (targets or {model["spec"]["modelName"]}) <= adapters | base_models


def _flag_int(container: Object, flag: str) -> int:
    """The flag's value in the container's args, else the CLI's default."""
    args = build_parser().parse_args(_expanded(container))
    return int(getattr(args, flag.lstrip("-").replace("-", "_")))


def _expanded(container: Object) -> list[str]:
    defined = {variable["name"] for variable in container.get("env") or []}
    args: list[str] = list(container["args"])
    for arg in args:
        for reference in _references(arg):
            assert reference in defined, f"$({reference}) in {arg} is not an env var"
    return args


def _references(arg: str) -> Iterator[str]:
    while "$(" in arg:
        arg = arg.split("$(", 1)[1]
        name, _, arg = arg.partition(")")
        yield name


def _loractl_containers() -> Iterator[tuple[str, Object]]:
    for directory, rendered in RENDERED.items():
        for obj in rendered.objects:
            if obj["kind"] == "Deployment":
                for container in _containers(obj["spec"]["template"]["spec"]):
                    if container["image"].startswith(f"{IMAGE}:"):
                        yield f"{directory.name}/{obj['metadata']['name']}", container


def test_loractl_containers_run_the_released_image_with_arguments_the_cli_accepts() -> None:
    containers = list(_loractl_containers())
    assert {container["name"] for _, container in containers} == {"controller", "lora-sidecar"}
    for where, container in containers:
        assert container["image"] == f"{IMAGE}:{VERSION}", where
        assert "command" not in container, f"{where}: the image's entrypoint is loractl"
        try:
            build_parser().parse_args(_expanded(container))
        except SystemExit as error:
            pytest.fail(f"{where}: loractl rejects {shlex.join(container['args'])} ({error})")


def test_the_example_rollout_moves_a_model_of_the_example() -> None:
    objects = RENDERED[EXAMPLE].objects
    [rollout] = yaml.safe_load_all((MANIFESTS / "controller" / "example-rollout.yaml").read_text())
    spec = rollout["spec"]
    assert spec["pool"] == _find(objects, "InferencePool")["metadata"]["name"]
    model = next(
        o
        for o in objects
        if o["kind"] == "InferenceModel" and o["spec"]["modelName"] == spec["model"]
    )
    assert [t["name"] for t in model["spec"]["targetModels"]] == [spec["from"]["id"]]
    configmap = _find(objects, "ConfigMap", spec["configMap"]["name"])
    config = parse_config(configmap["data"][spec["configMap"].get("key", "configmap.yaml")])
    assert spec["from"]["id"] in config.ensure_exist
    assert spec["to"]["id"] not in config.ensure_exist


# ---- the upstream schemas and the renderer have teeth ------------------------------------


@pytest.mark.parametrize(
    ("kind", "edit", "fragment"),
    [
        (
            "InferencePool",
            lambda s: s.pop("endpointPickerRef"),
            "'endpointPickerRef' is a required",
        ),
        ("InferenceModel", lambda s: s.update(criticality="High"), "is not one of"),
        ("HTTPRoute", lambda s: s.update(timeout="5m"), "Additional properties"),
        ("Gateway", lambda s: s["listeners"][0].update(port=0), "less than the minimum"),
        ("Deployment", lambda s: s["template"]["spec"].update(serviceAcount="x"), "serviceAcount"),
    ],
)
def test_the_schemas_reject_mistakes(kind: str, edit: Any, fragment: str) -> None:
    obj = yaml.safe_load(
        yaml.safe_dump(next(o for o in RENDERED[EXAMPLE].objects if o["kind"] == kind))
    )
    edit(obj["spec"])
    assert any(fragment in error for error in VALIDATOR.errors(obj)), VALIDATOR.errors(obj)
