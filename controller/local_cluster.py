"""What `loractl canary` and `loractl adapters` read and write with `--local DIR`.

The same surface as the CLI's `Cluster` (one namespace, read once per call) over the
directory `loractl controller --local DIR` serves from: objects come from its YAML files,
writes go through `LocalBackend`, and the pods of a pool are its `loractl.io/endpoints`
entries, each reporting its adapters through its sidecar's /status, as a Pod does through
the annotation its sidecar writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from controller.backend.local import KINDS, POOL_KIND, LocalBackend, annotated_endpoints
from controller.canary_cli import (
    ANNOTATION,
    EXIT_API,
    PODS,
    ROLLOUTS,
    CliError,
    Resource,
    RolloutRecord,
)
from controller.endpoints import pool_spec
from loractl.objectdir import ObjectDirectory

SIDECAR_TIMEOUT = 2.0  # seconds per sidecar /status


class LocalCluster:
    def __init__(self, directory: Path, namespace: str) -> None:
        self.directory = directory
        self.namespace = namespace
        self.server = str(directory)

    @property
    def flags(self) -> str:
        """How a command line names this place."""
        return f"--local {self.directory}"

    def _read(self) -> ObjectDirectory:
        if not self.directory.is_dir():
            raise CliError(f"--local {self.directory}: no such directory", EXIT_API)
        objects = ObjectDirectory(self.directory, self.namespace, KINDS)
        objects.reload()
        return objects

    def objects(self, resource: Resource, optional: bool = False) -> list[dict[str, Any]]:
        if resource == PODS:
            return self._pods()
        return [
            located.obj
            for located in self._read().of_kind(resource.kind)
            if _served_as(located.obj, resource)
        ]

    def object(self, resource: Resource, name: str) -> dict[str, Any] | None:
        located = self._read().get(resource.kind, name)
        return None if located is None or not _served_as(located.obj, resource) else located.obj

    def rollouts(self) -> list[RolloutRecord]:
        return [RolloutRecord.from_object(obj) for obj in self.objects(ROLLOUTS)]

    def rollout(self, name: str) -> RolloutRecord | None:
        obj = self.object(ROLLOUTS, name)
        return None if obj is None else RolloutRecord.from_object(obj)

    def backend(self) -> LocalBackend:
        return LocalBackend(self.directory, self.namespace)

    def failure(self, error: Exception, verb: str, resource: Resource) -> CliError:
        return CliError(
            f"could not {verb} {resource.kind} in {self.directory}: {error}; check the "
            "directory's permissions and files",
            EXIT_API,
        )

    def _pods(self) -> list[dict[str, Any]]:
        """Every pool's endpoints as Pods: labelled with what the pool selects, Ready when
        their sidecar answers, annotated with its adapter summary."""
        from controller.endpoints import POOL_V1, POOL_V1ALPHA2

        pods = []
        for located in self._read().of_kind(POOL_KIND):
            pool = located.obj
            v1 = pool.get("apiVersion") == f"{POOL_V1.group}/{POOL_V1.version}"
            api = POOL_V1 if v1 else POOL_V1ALPHA2
            labels = dict(pool_spec(api, pool).selector)
            endpoints, _ = annotated_endpoints(pool)
            for endpoint in endpoints:
                summary = None if endpoint.sidecar_url is None else _summary(endpoint.sidecar_url)
                pods.append(
                    {
                        "kind": "Pod",
                        "metadata": {
                            "name": endpoint.address,
                            "labels": labels,
                            "annotations": {} if summary is None else {ANNOTATION: summary},
                        },
                        "status": {
                            "phase": "Running",
                            "podIP": endpoint.host.strip("[]"),
                            "conditions": [
                                {"type": "Ready", "status": "False" if summary is None else "True"}
                            ],
                        },
                    }
                )
        return pods


def _summary(sidecar_url: str) -> str | None:
    """The sidecar's adapters as the Pod annotation writes them, or None when it does not
    answer."""
    try:
        response = httpx.get(f"{sidecar_url}/status", timeout=SIDECAR_TIMEOUT)
        adapters = response.raise_for_status().json()["adapters"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    return ",".join(
        f"{adapter_id}={record.get('state', '?')}"
        for adapter_id, record in sorted(adapters.items())
        if isinstance(record, Mapping)
    )


def _served_as(obj: Mapping[str, Any], resource: Resource) -> bool:
    """Whether obj is of the resource's API version: a pool file says v1 or v1alpha2."""
    api_version = f"{resource.group}/{resource.version}" if resource.group else resource.version
    return obj.get("apiVersion") == api_version
