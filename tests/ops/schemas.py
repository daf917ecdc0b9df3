"""Offline validation of Kubernetes objects, as strict as `kubectl apply` against a cluster.

Built-in kinds: the Kubernetes OpenAPI schemas shipped by `kubernetes-validate`, strict
(unknown fields are errors, as under kubectl's default field validation), for the oldest
Kubernetes the manifests support and the newest the package knows. Custom resources: the
openAPIV3Schema of their CRD, closed the same way: loractl's own CRDs from manifests/crds,
the upstream ones from tests/ops/upstream_crds.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.support.crd import json_schema

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
CRD_DIRECTORIES = (MANIFESTS / "crds", Path(__file__).resolve().parent / "upstream_crds")
OLDEST_KUBERNETES = "1.29"
"""Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29."""
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())

Object = dict[str, Any]


def load_crds(directories: Iterable[Path] = CRD_DIRECTORIES) -> list[Object]:
    return [
        document
        for directory in directories
        for path in sorted(directory.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition"
    ]


class Validator:
    def __init__(self, crds: Iterable[Object]) -> None:
        self._custom: dict[tuple[str, str], jsonschema.Draft4Validator] = {}
        for crd in crds:
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = json_schema(version["schema"]["openAPIV3Schema"], closed=True)
                jsonschema.Draft4Validator.check_schema(schema)
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                self._custom[key] = jsonschema.Draft4Validator(schema)

    def errors(self, obj: Object) -> list[str]:
        """Every problem with the object; none when a cluster would accept it."""
        custom = self._custom.get((str(obj.get("apiVersion")), str(obj.get("kind"))))
        if custom is not None:
            return [
                f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
                for error in custom.iter_errors(obj)
            ]
        problems = []
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                return [f"no schema for {obj.get('apiVersion')} {obj.get('kind')}: add its CRD"]
            except kubernetes_validate.ValidationError as error:
                path = ".".join(map(str, error.path)) or "(root)"
                problems.append(f"Kubernetes {version}: {path}: {error.message}")
        return problems
