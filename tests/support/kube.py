"""Talking to the kmock Kubernetes emulator through the official client, from tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from sidecar.kube import kube_api_client


def write_kubeconfig(server: str, path: Path) -> Path:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(kubeconfig))
    return path


def use_kubeconfig(server: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> ApiClient:
    """An API client made the production way, from a kubeconfig naming `server`."""
    write_kubeconfig(server, path)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    return kube_api_client()


async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The official client blocks, and kmock serves on this very loop: call it from a thread."""
    return await asyncio.to_thread(function, *args, **kwargs)
