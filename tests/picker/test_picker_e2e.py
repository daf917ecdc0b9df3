"""The picker as it runs: `loractl controller` + a real Envoy + three real simulators.

Pods are simulators on 127.0.0.2-4, all on one port, as in a cluster. Adapters:
food-review-1 on all three, food-review-2 only on 127.0.0.2.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loractl.processes import ChildProcess, free_port
from simulator.adapter_files import write_adapter
from tests.conftest import SimulatorFactory
from tests.support.envoy import subset_hint
from tests.support.gateway import (
    Controller,
    Envoy,
    inference_model,
    start_controller,
    start_envoy,
    sticky_by_annotation,
    write_models,
)
from tests.support.metrics import value
from tests.support.simulators import simulator_process

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
BASE = "base"
MODELS = [
    inference_model("food-review", {"food-review-1": 90, "food-review-2": 10}),
    inference_model("food-review-2"),
    inference_model("food-review-1"),
    inference_model("batch", {"food-review-1": 1}, criticality="Sheddable"),
    # What a rollout with spec.stickiness writes: this model pins by its own header.
    sticky_by_annotation(
        inference_model("food-chat", {"food-review-1": 50, "food-review-2": 50}), "X-Session"
    ),
    sticky_by_annotation(inference_model("food-typo", {"food-review-1": 1}), "x session"),
]


@dataclass
class Pool:
    sims: dict[str, str]  # address → URL
    controller: Controller
    envoy: Envoy
    children: list[ChildProcess]
    work: Path

    def served(self) -> Counter[str]:
        """Completed requests per address, from each simulator's own metrics."""
        return Counter(
            {a: int(value(u, "vllm:request_success_total")) for a, u in self.sims.items()}
        )


def complete(
    url: str, model: str, headers: dict[str, str] | None = None, **body: object
) -> httpx.Response:
    payload = {"model": model, "prompt": "How was the soup?", "max_tokens": 4, **body}
    return httpx.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=15)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    work = tmp_path_factory.mktemp("pool")
    children: list[ChildProcess] = []
    try:
        port = free_port(HOSTS[0])
        sims = {}
        for host in HOSTS:
            process, url = simulator_process(
                work / "logs",
                "--served-model-name",
                BASE,
                "--time-scale",
                "0",
                "--max-loras",
                "2",
                "--allow-runtime-lora-updating",
                host=host,
            )
            # Same port on every "pod", as behind one InferencePool target port.
            process.argv[process.argv.index("--port") + 1] = str(port)
            url = f"http://{host}:{port}"
            children.append(process.start())
            process.wait_http_ok(f"{url}/health")
            sims[f"{host}:{port}"] = url
        loads = {
            "food-review-1": list(sims.values()),
            "food-review-2": [sims[f"{HOSTS[0]}:{port}"]],
        }
        for index, (name, urls) in enumerate(loads.items()):
            path = str(write_adapter(work / "adapters" / name, seed=index))
            for url in urls:
                httpx.post(
                    f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
                )
        models = write_models(work / "models.yaml", MODELS)
        controller = start_controller(
            children,
            work,
            list(sims),
            models,
            "--base-model",
            BASE,
            "--seed",
            "7",
            "--sticky-header",
            "x-user-id",
            "--max-body-bytes",
            "65536",
        )
        controller.wait_scraped(
            {a: {"food-review-1"} for a in sims} | {f"{HOSTS[0]}:{port}": {"food-review-2"}}
        )
        envoy = start_envoy(children, work, controller.grpc_port)
        yield Pool(sims, controller, envoy, children, work)
    finally:
        for child in reversed(children):
            child.stop()


def test_requests_go_only_where_the_adapter_is_registered(pool: Pool) -> None:
    before = pool.served()
    for _ in range(20):
        answer = complete(pool.envoy.url, "food-review-2")
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "food-review-2"
    delta = pool.served() - before
    assert set(delta) == {next(iter(pool.sims))}, f"served by {delta}"


def test_weighted_split_rewrites_the_model_and_holds_within_tolerance(pool: Pool) -> None:
    served = Counter(complete(pool.envoy.url, "food-review").json()["model"] for _ in range(400))
    assert set(served) == {"food-review-1", "food-review-2"}
    # 10 % of 400: binomial sd 1.5 %; 4 points is more than 2.5 sd.
    assert 0.06 <= served["food-review-2"] / 400 <= 0.14, served


def test_sticky_header_keeps_a_user_on_one_target(pool: Pool) -> None:
    by_user = {
        user: {
            complete(pool.envoy.url, "food-review", {"x-user-id": user}).json()["model"]
            for _ in range(5)
        }
        for user in (f"user-{i}" for i in range(40))
    }
    assert all(len(targets) == 1 for targets in by_user.values()), by_user
    assert {t for targets in by_user.values() for t in targets} == {
        "food-review-1",
        "food-review-2",
    }


def test_a_model_annotated_with_a_sticky_header_pins_by_that_header(pool: Pool) -> None:
    def targets(header: str, user: str) -> set[str]:
        return {
            complete(pool.envoy.url, "food-chat", {header: user}).json()["model"] for _ in range(6)
        }

    sessions = [targets("x-session", f"session-{i}") for i in range(30)]
    assert all(len(seen) == 1 for seen in sessions), sessions
    assert set().union(*sessions) == {"food-review-1", "food-review-2"}
    # The controller's own --sticky-header does not apply to this model: it names its own.
    users = [targets("x-user-id", f"user-{i}") for i in range(10)]
    assert any(len(seen) == 2 for seen in users), users


def test_the_model_table_the_picker_routes_by_is_served_with_its_problems(pool: Pool) -> None:
    page = httpx.get(f"{pool.controller.metrics_url}/models", timeout=5).json()
    assert page["synced"] is True
    routes = {route["model"]: route for route in page["models"]}
    assert set(routes) == {"food-review", "food-review-1", "food-review-2", "batch", "food-chat",
                           "food-typo"}  # fmt: skip
    assert routes["food-review"] == {
        "model": "food-review",
        "targets": [
            {"name": "food-review-1", "weight": 90},
            {"name": "food-review-2", "weight": 10},
        ],
        "criticality": "Standard",
        "pool": "pool",
        "sticky_header": None,
        "source": "InferenceModel/default/food-review",
    }
    assert routes["batch"]["criticality"] == "Sheddable"
    assert routes["food-chat"]["sticky_header"] == "x-session"
    # A bad annotation: the model still routes, without it, and the page says why.
    assert routes["food-typo"]["sticky_header"] is None
    assert page["errors"] == [
        "InferenceModel/default/food-typo: annotation loractl.io/sticky-header 'x session' is "
        "not an HTTP header name: use letters, digits and '-', e.g. x-user-id"
    ]
    answer = complete(pool.envoy.url, "food-typo")
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "food-review-1"


def test_lora_affinity_keeps_an_adapter_on_the_pods_where_it_is_hot(pool: Pool) -> None:
    before = pool.served()
    for _ in range(30):
        assert complete(pool.envoy.url, "food-review-1").status_code == 200
    delta = pool.served() - before
    # Idle pods, equal queues: the affinity scorer must keep using the pods already holding it
    # rather than spreading (and swapping) it across the pool.
    hot = value(pool.controller.metrics_url, "loractl_picker_affinity_total", outcome="hot")
    assert hot >= 25
    assert len(delta) >= 1


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"prompt": "no model"}', 400, "no `model`"),
        (b'["a", "list"]', 400, "must be a JSON object"),
        (
            json.dumps({"model": "nobody-serves-this", "prompt": "x"}).encode(),
            404,
            "does not exist",
        ),
        (json.dumps({"model": "food-review", "prompt": "x" * 70_000}).encode(), 413, ""),
    ],
)
def test_bad_requests_get_clear_errors_through_envoy(
    pool: Pool, body: bytes, status: int, fragment: str
) -> None:
    answer = httpx.post(
        f"{pool.envoy.url}/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=15,
    )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert fragment in error["message"]
    assert error["code"] == status
    assert complete(pool.envoy.url, "food-review-1").status_code == 200, "still serving"


def test_sse_stream_passes_through(pool: Pool) -> None:
    with httpx.stream(
        "POST",
        f"{pool.envoy.url}/v1/chat/completions",
        timeout=15,
        json={
            "model": "food-review",
            "stream": True,
            "max_tokens": 6,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Rate the soup"}],
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["model"] for c in chunks} <= {"food-review-1", "food-review-2"}
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_subset_hint_limits_the_pods(pool: Pool) -> None:
    only = list(pool.sims)[1]
    envoy = start_envoy(pool.children, pool.work, pool.controller.grpc_port, subset_hint([only]))
    before = pool.served()
    for _ in range(10):
        assert complete(envoy.url, "food-review-1").status_code == 200
    assert set(pool.served() - before) == {only}
    nowhere = start_envoy(
        pool.children, pool.work, pool.controller.grpc_port, subset_hint(["127.0.0.9:1"])
    )
    answer = complete(nowhere.url, "food-review-1")
    assert answer.status_code == 503
    assert "No ready endpoint" in answer.json()["error"]["message"]


def test_picker_metrics_and_inventory(pool: Pool) -> None:
    url = pool.controller.metrics_url
    logged = value(url, "loractl_picker_outcomes_total", how="access_log")
    complete(pool.envoy.url, "food-review-1")
    # The outcome comes by Envoy's access log, a little after the answer.
    pool.controller.process.wait_until(
        lambda: value(url, "loractl_picker_outcomes_total", how="access_log") > logged,
        timeout=5,
        what="told the outcome by the access log",
    )
    assert value(url, "loractl_picker_outcomes_total", how="timed_out") == 0
    assert value(url, "loractl_picker_outcomes_pending") == 0
    assert value(url, "loractl_picker_requests_total", result="routed") > 0
    assert value(url, "loractl_picker_responses_total", code="2xx") > 0
    assert value(url, "loractl_picker_scheduling_duration_seconds_count") > 0
    assert value(url, "loractl_picker_endpoint_adapters", endpoint=next(iter(pool.sims))) == 2
    endpoints = pool.controller.inventory()["endpoints"]
    assert {e["address"] for e in endpoints} == set(pool.sims)
    assert all(e["metrics"] is not None for e in endpoints)


def test_picker_restart_while_envoy_runs(pool: Pool) -> None:
    pool.controller.process.kill()
    down = complete(pool.envoy.url, "food-review-1")
    assert down.status_code == 503, "fail-close: no picker, no routing"
    pool.controller.restart(pool.children)
    pool.controller.wait_scraped({a: {"food-review-1"} for a in pool.sims})
    assert complete(pool.envoy.url, "food-review-1").status_code == 200


def test_saturated_pool_sheds_sheddable_requests_only(
    children: list[ChildProcess], start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    # One slow pod that runs one request at a time: three requests in flight fill its queue.
    sim = start_simulator(
        "--served-model-name",
        BASE,
        "--max-num-seqs",
        "1",
        "--inter-token-ms",
        "150",
        "--allow-runtime-lora-updating",
    )
    adapter = str(write_adapter(tmp_path / "food-review-1"))
    httpx.post(
        f"{sim.url}/v1/load_lora_adapter", json={"lora_name": "food-review-1", "lora_path": adapter}
    )
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        "filters: [ready, subset, adapter-registered]\n"
        "scorers: [{name: lora-affinity, weight: 4}, {name: queue, weight: 2}]\n"
        "saturation: {queue_threshold: 0, kv_threshold: 0.9}\n"
    )
    address = sim.url.removeprefix("http://")
    controller = start_controller(
        children,
        tmp_path,
        [address],
        write_models(tmp_path / "models.yaml", MODELS),
        "--profile",
        str(profile),
    )
    controller.wait_scraped({address: {"food-review-1"}})
    envoy = start_envoy(children, tmp_path, controller.grpc_port)
    with ThreadPoolExecutor(4) as pool:
        busy = [
            pool.submit(complete, envoy.url, "food-review-1", None, max_tokens=8) for _ in range(3)
        ]
        controller.process.wait_until(
            lambda: any(
                (e["metrics"] or {}).get("waiting", 0) > 0
                for e in controller.inventory()["endpoints"]
            ),
            timeout=10,
            what="a queue on the only pod",
        )
        shed = complete(envoy.url, "batch")
        standard = pool.submit(complete, envoy.url, "food-review-1")
        assert shed.status_code == 429, shed.text
        assert "Sheddable" in shed.json()["error"]["message"]
        assert standard.result().status_code == 200, "Standard requests still queue and run"
        assert all(f.result().status_code == 200 for f in busy)
    assert value(controller.metrics_url, "loractl_picker_sheds_total", model="batch") == 1
