"""From the inventory and live traffic to the figures the rollout gates judge."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from controller.inventory import Endpoint, EndpointView
from controller.rollout.observe import adapter_config, adapter_inventory, step_traffic
from controller.rollout.spec import RolloutStatus, parse_spec
from controller.stats import TrafficStats


def view(
    address: str,
    *,
    ready: bool = True,
    registered: set[str] | None = None,
    sidecar: dict[str, str] | None = None,
) -> EndpointView:
    return EndpointView(
        Endpoint(address, pod=f"pod-{address[-1]}", ready=ready),
        metrics=None,
        registered=None if registered is None else frozenset(registered),
        sidecar_states=sidecar,
    )


def test_loaded_means_sidecar_loaded_or_listed_by_vllm_on_ready_pods() -> None:
    views = [
        view("a:1", sidecar={"v2": "loaded"}),
        view("b:2", registered={"v2"}),
        view("c:3", sidecar={"v2": "failed"}, registered=set()),
        view("d:4", ready=False, registered={"v2"}),
    ]
    inventory = adapter_inventory(views, "v2")
    assert (inventory.ready_pods, inventory.pods_with_to) == (3, 2)
    assert inventory.problems == ("pod-3: the sidecar failed to load it",)
    assert inventory.unobserved == 0


def test_pods_with_neither_vllm_nor_sidecar_figures_count_as_unobserved() -> None:
    views = [view("a:1", registered={"v2"}), view("b:2"), view("c:3", sidecar={})]
    inventory = adapter_inventory(views, "v2")
    assert (inventory.ready_pods, inventory.pods_with_to, inventory.unobserved) == (3, 1, 1)


def test_adapter_config_reports_why_it_cannot_be_read() -> None:
    assert adapter_config(None, "k") == (None, None)
    assert adapter_config({}, "k")[1] == "the ConfigMap has no key 'k'"
    _, error = adapter_config({"k": "vLLMLoRAConfig: ["}, "k")
    assert error is not None
    assert "not valid YAML" in error
    desired, error = adapter_config({"k": "vLLMLoRAConfig: {}"}, "k")
    assert error is None
    assert desired is not None


def test_step_traffic_counts_answers_since_the_step_began() -> None:
    spec = parse_spec(
        {
            "pool": "p",
            "model": "m",
            "configMap": {"name": "c"},
            "from": {"id": "v1", "source": "org/v1"},
            "to": {"id": "v2", "source": "org/v2"},
            "steps": [{"weight": 10}],
        }
    )
    stats = TrafficStats()
    stats.record("m", "v2", "a:1", 500, 0.1)
    now = datetime.now(UTC)
    status = RolloutStatus.model_validate(
        {
            "phase": "Progressing",
            "currentStep": 0,
            "stepStartedAt": (now - timedelta(seconds=5)).isoformat(),
        }
    )
    traffic = step_traffic(stats, spec, status, now)
    assert traffic is not None
    assert traffic.canary.requests == 1
    assert traffic.canary.errors == 1
    assert traffic.baseline.requests == 0
    later = RolloutStatus.model_validate(
        {"phase": "Progressing", "currentStep": 1, "stepStartedAt": now.isoformat()}
    )
    after = step_traffic(stats, spec, later, now)
    assert after is not None
    assert after.canary.requests == 0, "a new step starts a new window"
