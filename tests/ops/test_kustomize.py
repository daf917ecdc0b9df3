"""The small kustomize renders what it implements like kustomize, and refuses the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.kustomize import KINDS, Unsupported, render, strategic_merge

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "vllm", "labels": {"sidecar": "yes"}},
    "spec": {
        "template": {
            "spec": {
                "containers": [
                    {"name": "vllm", "image": "v", "args": ["--a"], "env": [{"name": "A"}]},
                    {"name": "other", "image": "o"},
                ]
            }
        }
    },
}


def _write(directory: Path, files: dict[str, Any]) -> Path:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        documents = content if isinstance(content, list) else [content]
        path.write_text(yaml.safe_dump_all(documents))
    return directory


def _kustomization(kind: str = "Kustomization", **fields: Any) -> dict[str, Any]:
    return {"apiVersion": KINDS[kind], "kind": kind, **fields}


def test_strategic_merge_merges_keyed_lists_and_replaces_atomic_ones() -> None:
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [{"name": "vllm", "args": ["--b"], "env": [{"name": "B"}]}],
                    "initContainers": [{"name": "sidecar", "image": "s"}],
                }
            }
        }
    }
    merged = strategic_merge(DEPLOYMENT, patch)
    pod = merged["spec"]["template"]["spec"]
    assert pod["containers"] == [
        {"name": "vllm", "image": "v", "args": ["--b"], "env": [{"name": "A"}, {"name": "B"}]},
        {"name": "other", "image": "o"},
    ]
    assert pod["initContainers"] == [{"name": "sidecar", "image": "s"}]
    assert DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]["args"] == ["--a"]  # type: ignore[index]
    assert "labels" not in strategic_merge(DEPLOYMENT, {"metadata": {"labels": None}})["metadata"]


def test_a_component_patches_what_the_kustomization_accumulated(tmp_path: Path) -> None:
    patch = {"kind": "Deployment", "metadata": {"name": "ignored"}, "spec": {"replicas": 2}}
    _write(
        tmp_path,
        {
            "app/kustomization.yaml": _kustomization(
                resources=["deployment.yaml"], components=["../component"]
            ),
            "app/deployment.yaml": DEPLOYMENT,
            "component/kustomization.yaml": _kustomization(
                "Component",
                patches=[
                    {
                        "path": "patch.yaml",
                        "target": {"kind": "Deployment", "labelSelector": "sidecar=yes"},
                    }
                ],
            ),
            "component/patch.yaml": patch,
        },
    )
    rendered = render(tmp_path / "app")
    [deployment] = rendered.objects
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["name"] == "vllm"
    assert len(rendered.files) == 4


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({"kustomization.yaml": _kustomization(namePrefix="x-")}, "not implemented"),
        ({"kustomization.yaml": _kustomization(resources=["../outside.yaml"])}, "outside"),
        ({"kustomization.yaml": _kustomization(resources=["missing.yaml"])}, "does not exist"),
        (
            {
                "kustomization.yaml": _kustomization(resources=["d.yaml", "d.yaml"]),
                "d.yaml": DEPLOYMENT,
            },
            "defined twice",
        ),
        (
            {
                "kustomization.yaml": _kustomization(
                    resources=["d.yaml"], patches=[{"path": "p.yaml", "target": {"name": "nope"}}]
                ),
                "d.yaml": DEPLOYMENT,
                "p.yaml": {"kind": "Deployment", "metadata": {"name": "x"}},
            },
            "matches no object",
        ),
        (
            {
                "kustomization.yaml": _kustomization(
                    resources=["d.yaml"], patches=[{"path": "p.yaml", "target": {"group": "apps"}}]
                ),
                "d.yaml": DEPLOYMENT,
                "p.yaml": {"kind": "Deployment", "metadata": {"name": "x"}},
            },
            "targets by",
        ),
        (
            {
                "kustomization.yaml": _kustomization(
                    resources=["d.yaml"], patches=[{"patch": "{}"}]
                ),
                "d.yaml": DEPLOYMENT,
            },
            "only `patches",
        ),
        (
            {
                "kustomization.yaml": _kustomization(
                    resources=["d.yaml"], patches=[{"path": "p.yaml"}]
                ),
                "d.yaml": DEPLOYMENT,
                "p.yaml": {
                    "kind": "Deployment",
                    "metadata": {"name": "vllm"},
                    "spec": {"template": {"spec": {"tolerations": [{"key": "gpu"}]}}},
                },
            },
            "merge key unknown",
        ),
        (
            {
                "kustomization.yaml": _kustomization(components=["c"]),
                "c/kustomization.yaml": _kustomization(),
            },
            "expected a Component",
        ),
        (
            {
                "kustomization.yaml": _kustomization(resources=["c"]),
                "c/kustomization.yaml": _kustomization("Component"),
            },
            "expected a Kustomization",
        ),
    ],
)
def test_what_is_not_implemented_or_wrong_is_refused(
    tmp_path: Path, files: dict[str, Any], fragment: str
) -> None:
    _write(tmp_path / "root", files)
    with pytest.raises(Unsupported, match=fragment):
        render(tmp_path / "root")
