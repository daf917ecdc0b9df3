"""The demo's world as files: local PEFT adapters, and the objects a cluster would hold.

Everything lives under one state directory, so a user can `cat` it during and after the
run: `objects/` is the `--local` directory the controller, the sidecars and `loractl
canary --local` share; `adapters/` holds the adapter sources; each simulated pod gets its
own directory for its sidecar's config file and downloaded copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controller.backend.local import ENDPOINTS_ANNOTATION
from simulator.adapter_files import write_adapter

BASE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
POOL = "vllm-llama3-8b-instruct"
CONFIGMAP = "vllm-llama3-8b-instruct-adapters"
CONFIG_KEY = "configmap.yaml"
CANARY_MODEL = "food-review"
CANARY_FROM = "food-review-1"
CANARY_TO = "food-review-2"
# Model name → the adapter serving it, and its share of the workload (a popular model and a
# long tail, as LoRA traffic tends to be).
MODELS: dict[str, tuple[str, float]] = {
    CANARY_MODEL: (CANARY_FROM, 0.6),
    "sql-lora": ("sql-lora", 0.25),
    "tweet-summary": ("tweet-summary", 0.15),
}
ADAPTERS = (CANARY_FROM, CANARY_TO, "sql-lora", "tweet-summary")


@dataclass(frozen=True)
class Pod:
    """One simulated vLLM pod: its server and its sidecar, on the loopback address."""

    name: str
    vllm_port: int
    sidecar_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.vllm_port}"

    @property
    def vllm_url(self) -> str:
        return f"http://{self.address}"

    @property
    def sidecar_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar_port}"


@dataclass(frozen=True)
class Scene:
    state_dir: Path

    @property
    def objects_dir(self) -> Path:
        return self.state_dir / "objects"

    @property
    def adapters_dir(self) -> Path:
        return self.state_dir / "adapters"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def pod_dir(self, pod: Pod) -> Path:
        return self.state_dir / "pods" / pod.name

    def adapter_source(self, adapter_id: str) -> str:
        return str(self.adapters_dir / adapter_id)

    def write(self, pods: list[Pod]) -> None:
        """Adapters, objects, and each pod's sidecar config (the ConfigMap as the kubelet
        would have projected it when the pod started)."""
        for seed, adapter_id in enumerate(ADAPTERS):
            write_adapter(self.adapters_dir / adapter_id, base_model=BASE_MODEL, seed=seed)
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        config = self.adapter_config()
        for name, documents in (
            ("pool.yaml", [self.pool(pods)]),
            ("models.yaml", [self.inference_model(m, a) for m, (a, _) in MODELS.items()]),
            ("adapters.yaml", [self.configmap(config)]),
        ):
            (self.objects_dir / name).write_text(
                yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8"
            )
        for pod in pods:
            (self.pod_dir(pod) / "config").mkdir(parents=True, exist_ok=True)
            (self.pod_dir(pod) / "config" / CONFIG_KEY).write_text(config, encoding="utf-8")

    def adapter_config(self) -> str:
        """The upstream lora-syncer document: every served adapter, the canary's `to` not
        yet (the rollout adds it)."""
        served = [adapter for adapter, _ in MODELS.values()]
        document = {
            "vLLMLoRAConfig": {
                "name": CONFIGMAP,
                "defaultBaseModel": BASE_MODEL,
                "ensureExist": {
                    "models": [{"id": a, "source": self.adapter_source(a)} for a in served]
                },
            }
        }
        return yaml.safe_dump(document, sort_keys=False)

    @staticmethod
    def pool(pods: list[Pod]) -> dict[str, Any]:
        endpoints = ", ".join(f"{pod.address} sidecar={pod.sidecar_port}" for pod in pods)
        return {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": POOL, "annotations": {ENDPOINTS_ANNOTATION: endpoints}},
            "spec": {
                "selector": {"matchLabels": {"app": POOL}},
                "targetPorts": [{"number": 8000}],
                "endpointPickerRef": {"name": "loractl-picker", "port": {"number": 9002}},
            },
        }

    @staticmethod
    def inference_model(model: str, adapter: str) -> dict[str, Any]:
        return {
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "kind": "InferenceModel",
            "metadata": {"name": model},
            "spec": {
                "modelName": model,
                "criticality": "Critical",
                "poolRef": {"name": POOL},
                "targetModels": [{"name": adapter, "weight": 100}],
            },
        }

    @staticmethod
    def configmap(config: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP},
            "data": {CONFIG_KEY: config},
        }
