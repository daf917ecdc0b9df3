"""LoRA residency bookkeeping, without sockets."""

from __future__ import annotations

from simulator.artifacts import AdapterArtifact
from simulator.residency import LoraResidency, SwapKind


def artifact(name: str) -> AdapterArtifact:
    return AdapterArtifact(
        path=f"/adapters/{name}", rank=8, peft_type="LORA", base_model=None, fingerprint=name
    )


def registry(max_loras: int, max_cpu_loras: int, *names: str) -> LoraResidency:
    residency = LoraResidency(max_loras, max_cpu_loras)
    for name in names:
        residency.register(name, artifact(name))
    return residency


def test_first_use_swaps_from_cpu_then_is_hot() -> None:
    residency = registry(2, 2, "a")
    assert residency.activate("a") is SwapKind.FROM_CPU
    residency.deactivate("a")
    assert residency.activate("a") is SwapKind.NONE
    assert residency.gpu_resident == ["a"]


def test_cpu_eviction_keeps_registration_and_costs_a_disk_read() -> None:
    residency = registry(1, 2, "a", "b", "c")
    assert residency.cpu_resident == ["b", "c"]
    assert set(residency.registered) == {"a", "b", "c"}
    assert residency.activate("a") is SwapKind.FROM_DISK
    assert residency.cpu_resident == ["c", "a"]


def test_pinned_slots_block_a_third_adapter_until_one_is_released() -> None:
    residency = registry(2, 4, "a", "b", "c")
    residency.activate("a")
    residency.activate("b")
    assert residency.can_activate("a")
    assert not residency.can_activate("c")
    residency.deactivate("b")
    assert residency.can_activate("c")
    assert residency.activate("c") is SwapKind.FROM_CPU
    assert sorted(residency.gpu_resident) == ["a", "c"], "b, idle, was the slot to evict"


def test_least_recently_used_idle_slot_is_evicted() -> None:
    residency = registry(2, 4, "a", "b", "c")
    for name in ("a", "b", "a"):
        residency.activate(name)
        residency.deactivate(name)
    residency.activate("c")
    assert sorted(residency.gpu_resident) == ["a", "c"]


def test_unload_while_serving_frees_the_slot_when_the_request_ends() -> None:
    residency = registry(1, 1, "a")
    residency.activate("a")
    residency.unregister("a")
    assert residency.gpu_resident == ["a"]
    residency.deactivate("a")
    assert residency.gpu_resident == []
    assert residency.can_activate("b")


def test_reload_in_place_forces_a_fresh_swap() -> None:
    residency = registry(1, 1, "a")
    residency.activate("a")
    residency.deactivate("a")
    residency.register("a", artifact("a-v2"))
    assert residency.gpu_resident == []
    assert residency.activate("a") is SwapKind.FROM_CPU
