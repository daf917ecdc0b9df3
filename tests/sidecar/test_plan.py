"""Reconcile planning rules, without sockets."""

from __future__ import annotations

from sidecar.config import AdapterSpec, DesiredState
from sidecar.plan import Adopt, Load, Unload, plan
from sidecar.sources import HuggingFaceSource, LocalSource
from sidecar.status import AdapterRecord, AdapterState

ADAPTER_DIR = "/adapters"
SHA = "0123456789abcdef0123456789abcdef01234567"


def local(adapter_id: str, path: str | None = None) -> AdapterSpec:
    return AdapterSpec(adapter_id, LocalSource(path or f"/data/{adapter_id}"), None)


def desired(
    *specs: AdapterSpec, absent: tuple[str, ...] = (), problems: dict[str, str] | None = None
) -> DesiredState:
    return DesiredState(
        name=None, host="localhost", port=8000, default_base_model=None,
        ensure_exist={s.id: s for s in specs}, ensure_not_exist=frozenset(absent),
        problems=problems or {},
    )  # fmt: skip


def loaded(spec: AdapterSpec, path: str | None = None) -> AdapterRecord:
    return AdapterRecord(
        spec.id, desired=True, state=AdapterState.LOADED, source=spec.source_key,
        loaded_source=spec.source_key, loaded_path=path or getattr(spec.source, "path", None),
    )  # fmt: skip


def run(
    state: DesiredState,
    registered: dict[str, str],
    records: dict[str, AdapterRecord] | None = None,
    busy: frozenset[str] = frozenset(),
    now: float = 100.0,
    prune: bool = False,
) -> list[object]:
    result = plan(state, registered, records or {}, busy, now, prune=prune, adapter_dir=ADAPTER_DIR)
    return list(result.actions)


def test_initial_sync_loads_missing_and_unloads_unwanted() -> None:
    a, b = local("a"), local("b")
    actions = run(desired(a, b, absent=("old", "never")), {"b": "/data/b", "old": "/x"})
    assert actions == [Load(a, inplace=False, reason="not registered"), Adopt(b, "/data/b"),
                       Unload("old", "listed in ensureNotExist")]  # fmt: skip


def test_in_sync_means_nothing_to_do() -> None:
    a = local("a")
    assert run(desired(a), {"a": "/data/a"}, {"a": loaded(a)}) == []


def test_source_change_reloads_in_place() -> None:
    old, new = local("a", "/data/a-v1"), local("a", "/data/a-v2")
    actions = run(desired(new), {"a": "/data/a-v1"}, {"a": loaded(old)})
    assert actions == [Load(new, inplace=True, reason="source changed from file:///data/a-v1")]


def test_lost_after_vllm_restart_is_re_registered() -> None:
    a = local("a")
    actions = run(desired(a), {}, {"a": loaded(a)})
    assert actions == [Load(a, inplace=False, reason="re-register: vLLM lost it")]


def test_registered_from_elsewhere_is_replaced_in_place() -> None:
    a = local("a")
    actions = run(desired(a), {"a": "/somewhere/else"})
    assert actions == [
        Load(a, inplace=True, reason="registered from another path (/somewhere/else)")
    ]


def test_hf_adoption_after_sidecar_restart() -> None:
    floating = AdapterSpec("h", HuggingFaceSource("org/h"), None)
    pinned = AdapterSpec("p", HuggingFaceSource("org/p", SHA), None)
    other_pin = AdapterSpec("q", HuggingFaceSource("org/q", SHA), None)
    registered = {
        "h": f"{ADAPTER_DIR}/h/{'f' * 40}",
        "p": f"{ADAPTER_DIR}/p/{SHA}",
        "q": f"{ADAPTER_DIR}/q/{'e' * 40}",
    }
    actions = run(desired(floating, pinned, other_pin), registered)
    assert actions[0] == Adopt(floating, registered["h"])
    assert actions[1] == Adopt(pinned, registered["p"])
    assert isinstance(actions[2], Load)
    assert actions[2].inplace


def test_busy_adapters_are_left_to_their_running_operation() -> None:
    a = local("a")
    assert run(desired(a, absent=("b",)), {"b": "/x"}, busy=frozenset({"a", "b"})) == []


def test_backoff_holds_only_the_failing_adapter() -> None:
    bad, good = local("bad"), local("good")
    failing = AdapterRecord("bad", desired=True, state=AdapterState.FAILED, retry_at=150.0)
    result = plan(desired(bad, good), {}, {"bad": failing}, frozenset(), 100.0,
                  prune=False, adapter_dir=ADAPTER_DIR)  # fmt: skip
    assert result.actions == [Load(good, inplace=False, reason="not registered")]
    assert result.backing_off == {"bad": 150.0}
    later = plan(desired(bad, good), {}, {"bad": failing}, frozenset(), 151.0,
                 prune=False, adapter_dir=ADAPTER_DIR)  # fmt: skip
    assert Load(bad, inplace=False, reason="not registered") in later.actions


def test_unlisted_adapters_are_left_alone_unless_pruning() -> None:
    a = local("a")
    registered = {"a": "/data/a", "stranger": "/x", "conflicted": "/y"}
    state = desired(a, problems={"conflicted": "in both lists"})
    records = {"a": loaded(a)}
    assert run(state, registered, records) == []
    assert run(state, registered, records, prune=True) == [Unload("stranger", "pruned")]


def test_problem_ids_are_never_touched() -> None:
    state = desired(problems={"x": "listed in both"})
    assert run(state, {"x": "/x"}, prune=True) == []
