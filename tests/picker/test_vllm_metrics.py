"""parse_vllm_metrics against real simulator pages and hand-written vLLM-shaped pages.

Every page is also read by a reference built on prometheus_client's full parser: the fast
line scan must agree with it wherever both apply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.inventory import MetricsObservation
from controller.vllm_metrics import (
    KV_CACHE_USAGE,
    KV_CACHE_USAGE_OLD,
    LORA_ADAPTER_LOADED,
    LORA_REQUESTS_INFO,
    RUNNING,
    WAITING,
    MetricsParseError,
    parse_vllm_metrics,
)
from tests.conftest import FAST, SimulatorFactory

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
EXPORTS = ["released vLLM", "lora_adapter_loaded"]
Labels = dict[str, str]
Sample = tuple[Labels, float]


# ---- writing pages the way prometheus_client (and so vLLM) writes them ----


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def sample_line(name: str, labels: Labels, value: float) -> str:
    if not labels:
        return f"{name} {value!r}"
    inner = ",".join(f'{key}="{escape(text)}"' for key, text in labels.items())
    return f"{name}{{{inner}}} {value!r}"


def family(name: str, kind: str, samples: Sequence[Sample]) -> str:
    lines = [f"# HELP {name} {name} help text.", f"# TYPE {name} {kind}"]
    lines += [sample_line(name, labels, value) for labels, value in samples]
    return "\n".join(lines) + "\n"


def histogram(name: str, buckets: Sequence[float], labels: Labels) -> str:
    bounds = [*(repr(float(b)) for b in buckets), "+Inf"]
    lines = [f"# HELP {name} {name} help text.", f"# TYPE {name} histogram"]
    lines += [
        sample_line(f"{name}_bucket", {**labels, "le": bound}, float(i * 3))
        for i, bound in enumerate(bounds)
    ]
    lines += [
        sample_line(f"{name}_count", labels, float(len(bounds) * 3)),
        sample_line(f"{name}_sum", labels, 1234.5),
    ]
    return "\n".join(lines) + "\n"


LATENCY = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
REQUEST_TIME = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
HISTOGRAMS = {
    "vllm:iteration_tokens_total": TOKENS,
    "vllm:time_to_first_token_seconds": LATENCY,
    "vllm:time_per_output_token_seconds": LATENCY[2:],
    "vllm:inter_token_latency_seconds": LATENCY[2:],
    "vllm:e2e_request_latency_seconds": REQUEST_TIME,
    "vllm:request_queue_time_seconds": REQUEST_TIME,
    "vllm:request_inference_time_seconds": REQUEST_TIME,
    "vllm:request_prefill_time_seconds": REQUEST_TIME,
    "vllm:request_decode_time_seconds": REQUEST_TIME,
    "vllm:request_prompt_tokens": TOKENS,
    "vllm:request_generation_tokens": TOKENS,
    "vllm:request_params_max_tokens": TOKENS,
}
HTTP_HANDLERS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def preamble() -> str:
    """What vLLM's page opens with before its own families: process and Python collectors."""
    generations = [({"generation": str(g)}, 12.0 * g) for g in range(3)]
    parts = [
        family(f"python_gc_{what}_total", "counter", generations)
        for what in ("objects_collected", "objects_uncollectable", "collections")
    ]
    parts.append(family("python_info", "gauge", [({"implementation": "CPython"}, 1.0)]))
    parts += [
        family(f"process_{what}", "gauge", [({}, 1.5e9)])
        for what in (
            "virtual_memory_bytes",
            "resident_memory_bytes",
            "start_time_seconds",
            "cpu_seconds_total",
            "open_fds",
            "max_fds",
        )
    ]
    return "".join(parts)


def http_metrics() -> str:
    """prometheus-fastapi-instrumentator's families, which vLLM also serves."""
    labels = [{"handler": h, "method": "GET", "status": "2xx"} for h in HTTP_HANDLERS]
    parts = [family("http_requests_total", "counter", [(label, 42.0) for label in labels])]
    parts += [histogram("http_request_duration_seconds", LATENCY[:12], label) for label in labels]
    return "".join(parts)


def vllm_page(
    *,
    engines: Sequence[str] = ("0",),
    running: Sequence[float] = (3.0,),
    waiting: Sequence[float] = (1.0,),
    kv_usage: Sequence[float] = (0.25,),
    kv_name: str = KV_CACHE_USAGE,
    lora_info: Sequence[tuple[str, str, float]] = (("food-review-1", "", 1.7e9),),
    max_lora: str = "4",
    loaded: Sequence[tuple[str, str, float]] | None = None,
) -> str:
    """A page shaped like vLLM's: one series per engine for the engine gauges, the picker's
    families among a dozen histograms per engine, then the HTTP families."""

    def per_engine(values: Sequence[float]) -> list[Sample]:
        pairs = zip(engines, values, strict=True)
        return [({"engine": e, "model_name": MODEL}, v) for e, v in pairs]

    info = [
        ({"max_lora": max_lora, "running_lora_adapters": r, "waiting_lora_adapters": w}, seen)
        for r, w, seen in lora_info
    ]
    engine_histograms = [
        histogram(name, buckets, {"engine": e, "model_name": MODEL})
        for name, buckets in HISTOGRAMS.items()
        for e in engines
    ]
    parts = [
        preamble(),
        *engine_histograms[: len(engine_histograms) // 2],
        family(RUNNING, "gauge", per_engine(running)),
        family(WAITING, "gauge", per_engine(waiting)),
        family(kv_name, "gauge", per_engine(kv_usage)),
        family(LORA_REQUESTS_INFO, "gauge", info),
    ]
    if loaded is not None:
        loaded_samples = [({"adapter_name": a, "level": level}, v) for a, level, v in loaded]
        parts.append(family(LORA_ADAPTER_LOADED, "gauge", loaded_samples))
    parts += [*engine_histograms[len(engine_histograms) // 2 :], http_metrics()]
    return "".join(parts)


def realistic_page(lora_label_sets: int = 40) -> str:
    """A busy pod: LoRA label sets pile up over time, as in a long-running vLLM."""
    names = [f"adapter-{i}" for i in range(8)]
    info = [
        (",".join(names[i % 8 : i % 8 + 2]), names[(i + 3) % 8], 1.7e9 + i)
        for i in range(lora_label_sets)
    ]
    return vllm_page(lora_info=info, loaded=[(n, "cpu", 1.0) for n in names])


# ---- the reference reading, on prometheus_client's full parser ----


def reference(text: str) -> MetricsObservation:
    by_name: dict[str, list[Sample]] = {}
    declared = set()
    for metric in text_string_to_metric_families(text):
        declared.add(metric.name)
        for sample in metric.samples:
            by_name.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    kv = by_name.get(KV_CACHE_USAGE) or by_name[KV_CACHE_USAGE_OLD]
    info = [s for s in by_name.get(LORA_REQUESTS_INFO, []) if not math.isnan(s[1])]
    newest = max(info, key=lambda s: s[1])[0] if info else {}
    busy = [
        s for s in info if s[0].get("running_lora_adapters") or s[0].get("waiting_lora_adapters")
    ]
    last_busy = max(busy, key=lambda s: s[1])[0] if busy else {}
    loaded = by_name.get(LORA_ADAPTER_LOADED, [])
    present = LORA_ADAPTER_LOADED in declared

    def level(which: str) -> frozenset[str] | None:
        names = (s[0]["adapter_name"] for s in loaded if s[0]["level"] == which and s[1] == 1)
        return frozenset(names) if present else None

    def adapters(key: str, labels: dict[str, str] = newest) -> frozenset[str]:
        return frozenset(n for n in labels.get(key, "").split(",") if n)

    return MetricsObservation(
        running=round(sum(v for _, v in by_name[RUNNING])),
        waiting=round(sum(v for _, v in by_name[WAITING])),
        kv_cache_usage=sum(v for _, v in kv) / len(kv),
        max_lora=int(newest["max_lora"]) if "max_lora" in newest else None,
        running_adapters=adapters("running_lora_adapters"),
        waiting_adapters=adapters("waiting_lora_adapters"),
        gpu_adapters=level("gpu"),
        cpu_adapters=level("cpu"),
        last_busy_running=adapters("running_lora_adapters", last_busy),
        last_busy_waiting=adapters("waiting_lora_adapters", last_busy),
    )


def parsed(text: str) -> MetricsObservation:
    """The fast parse, checked against the reference."""
    observation = parse_vllm_metrics(text)
    assert observation == reference(text)
    return observation


# ---- real simulator pages ----


def load(client: httpx.Client, name: str, path: str) -> None:
    response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    assert response.status_code == 200, response.text


def complete(url: str, model: str) -> int:
    body = {"model": model, "prompt": "How was the soup?", "max_tokens": 5}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30.0).status_code


def scrape(url: str) -> MetricsObservation:
    return parsed(httpx.get(f"{url}/metrics", timeout=5.0).text)


def scrape_until(url: str, holds: Callable[[MetricsObservation], bool]) -> MetricsObservation:
    deadline = time.monotonic() + 5.0
    while not holds(observation := scrape(url)):
        assert time.monotonic() < deadline, f"never held; last: {observation}"
    return observation


@pytest.mark.parametrize("export_loaded", [False, True], ids=EXPORTS)
def test_a_fresh_simulator(start_simulator: SimulatorFactory, export_loaded: bool) -> None:
    flags = ("--export-lora-loaded",) if export_loaded else ()
    sim = start_simulator(*FAST, "--max-loras", "2", *flags)
    observation = scrape(sim.url)
    assert observation == MetricsObservation(
        running=0,
        waiting=0,
        kv_cache_usage=0.0,
        max_lora=None,
        running_adapters=frozenset(),
        waiting_adapters=frozenset(),
        # Exported but empty is "nothing loaded", not "unknown".
        gpu_adapters=frozenset() if export_loaded else None,
        cpu_adapters=frozenset() if export_loaded else None,
    )


@pytest.mark.parametrize("export_loaded", [False, True], ids=EXPORTS)
def test_a_simulator_after_traffic(
    start_simulator: SimulatorFactory, adapters: Callable[..., str], export_loaded: bool
) -> None:
    flags = ("--export-lora-loaded",) if export_loaded else ()
    sim = start_simulator(*FAST, "--max-loras", "2", "--max-cpu-loras", "3", *flags)
    with sim.client() as client:
        for name in ("a", "b", "c"):
            load(client, name, adapters(name))
    for name in ("a", "b", "c", "a"):
        assert complete(sim.url, name) == 200
    observation = scrape(sim.url)
    # Old label sets stay on the page; the newest one says nothing is in flight now.
    assert observation.max_lora == 2
    assert observation.running_adapters == observation.waiting_adapters == frozenset()
    if export_loaded:
        assert observation.gpu_adapters == frozenset(
            {"c", "a"}
        )  # two slots, least recently used left
        assert observation.cpu_adapters == frozenset({"a", "b", "c"})
    else:
        assert observation.gpu_adapters is observation.cpu_adapters is None


def test_a_simulator_with_requests_in_flight_and_waiting(
    start_simulator: SimulatorFactory, adapters: Callable[..., str]
) -> None:
    # One slot and slow tokens: the second adapter's request waits for the first to finish.
    sim = start_simulator("--max-loras", "1", "--inter-token-ms", "200", "--export-lora-loaded")
    with sim.client() as client:
        for name in ("a", "b"):
            load(client, name, adapters(name))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(complete, sim.url, "a")
        scrape_until(sim.url, lambda o: o.running == 1)
        second = pool.submit(complete, sim.url, "b")
        busy = scrape_until(sim.url, lambda o: o.waiting == 1)
        assert [first.result(), second.result()] == [200, 200]
    # vLLM 0.32 names every adapter with a request in flight in both labels; only the
    # residency metric tells which one holds the slot.
    assert busy.running_adapters == busy.waiting_adapters == frozenset({"a", "b"})
    assert busy.gpu_adapters == frozenset({"a"})
    assert busy.kv_cache_usage > 0


# ---- vLLM-shaped pages ----


def test_a_realistic_page() -> None:
    observation = parsed(realistic_page())
    assert observation.running == 3
    assert observation.waiting == 1
    assert observation.max_lora == 4
    # The newest of 40 label sets (the last one written here).
    assert observation.running_adapters == frozenset({"adapter-7"})
    assert observation.waiting_adapters == frozenset({"adapter-2"})
    assert observation.cpu_adapters == frozenset(f"adapter-{i}" for i in range(8))
    assert observation.gpu_adapters == frozenset()


def test_the_newest_label_set_wins_wherever_it_stands() -> None:
    text = vllm_page(
        lora_info=[
            ("a", "", 1_700_000_005.0),
            ("a,b", "c,d", 1_700_000_009.5),  # newest, in the middle
            ("", "", 1_700_000_001.0),
            ("b", "", float("nan")),
        ]
    )
    observation = parsed(text)
    assert observation.running_adapters == frozenset({"a", "b"})
    assert observation.waiting_adapters == frozenset({"c", "d"})


def test_an_idle_pod_still_reports_its_last_busy_label_set() -> None:
    # What the upstream picker reads: label sets naming no adapter are skipped.
    text = vllm_page(lora_info=[("a", "b", 1_700_000_005.0), ("", "", 1_700_000_009.0)])
    observation = parsed(text)
    assert observation.running_adapters == frozenset()
    assert observation.last_busy_running == frozenset({"a"})
    assert observation.last_busy_waiting == frozenset({"b"})


def test_an_empty_label_value_means_no_adapter() -> None:
    observation = parsed(vllm_page(lora_info=[("", "", 1.7e9)]))
    assert observation.running_adapters == observation.waiting_adapters == frozenset()
    assert observation.max_lora == 4


def test_without_lora_requests_info_max_lora_is_unknown() -> None:
    observation = parsed(vllm_page(lora_info=[]))
    assert observation.max_lora is None
    assert observation.running_adapters == frozenset()


def test_several_engines_are_summed_and_their_cache_use_averaged() -> None:
    text = vllm_page(
        engines=("0", "1", "2"), running=(2, 5, 0), waiting=(1, 0, 3), kv_usage=(0.2, 0.6, 0.1)
    )
    observation = parsed(text)
    assert (observation.running, observation.waiting) == (7, 4)
    assert observation.kv_cache_usage == pytest.approx(0.3)


def test_the_older_cache_usage_name() -> None:
    observation = parsed(vllm_page(kv_name=KV_CACHE_USAGE_OLD, kv_usage=(0.75,)))
    assert observation.kv_cache_usage == 0.75


def test_the_new_cache_usage_name_wins_when_both_are_exported() -> None:
    text = vllm_page(kv_usage=(0.5,)) + family(KV_CACHE_USAGE_OLD, "gauge", [({}, 0.9)])
    assert parsed(text).kv_cache_usage == 0.5


def test_lora_adapter_loaded_counts_only_value_one_at_known_levels() -> None:
    loaded = [
        ("a", "gpu", 1.0),
        ("a", "cpu", 1.0),
        ("b", "cpu", 1.0),
        ("c", "gpu", 0.0),
        ("d", "disk", 1.0),
    ]
    observation = parsed(vllm_page(loaded=loaded))
    assert observation.gpu_adapters == frozenset({"a"})
    assert observation.cpu_adapters == frozenset({"a", "b"})


def test_escaped_and_odd_label_values() -> None:
    running = 'we"ird}name,back\\slash'
    text = vllm_page(lora_info=[(running, "x\ny", 1.7e9)])
    observation = parsed(text)
    assert observation.running_adapters == {'we"ird}name', "back\\slash"}
    assert observation.waiting_adapters == frozenset({"x\ny"})


def test_timestamps_unlabelled_samples_and_look_alike_names() -> None:
    text = (
        "vllm:num_requests_running_total 99\n"  # a longer name that starts the same
        "vllm:num_requests_running 2 1700000000000\n"
        "vllm:num_requests_waiting\t1\n"
        'vllm:gpu_cache_usage_perc{engine="0"} 0.5 1700000000000\n'
        'vllm:lora_requests_info{max_lora="1",running_lora_adapters="a",'
        'waiting_lora_adapters=""} 1.7e9'
    )  # no trailing newline either
    observation = parse_vllm_metrics(text)
    assert (observation.running, observation.waiting, observation.kv_cache_usage) == (2, 1, 0.5)
    assert observation.running_adapters == frozenset({"a"})
    assert observation.max_lora == 1


def sidecar_like_page() -> str:
    """Prometheus text, but not vLLM's."""
    return family("lora_syncer_adapter_status", "gauge", [({"adapter": "a"}, 1.0)])


def running_line_as(line: str) -> str:
    """A vLLM page whose one running sample line is replaced."""
    original = sample_line(RUNNING, {"engine": "0", "model_name": MODEL}, 3.0)
    page = vllm_page()
    assert original in page
    return page.replace(original, line)


NOT_VLLM = {
    "empty": ("", RUNNING),
    "html": ("<html><body>502 Bad Gateway</body></html>", RUNNING),
    "json": ('{"object": "error", "message": "nope"}', RUNNING),
    "other exporter": (sidecar_like_page(), RUNNING),
    "no waiting": (family(RUNNING, "gauge", [({}, 1.0)]), WAITING),
    "no cache usage": (
        family(RUNNING, "gauge", [({}, 1)]) + family(WAITING, "gauge", [({}, 0)]),
        KV_CACHE_USAGE,
    ),
    "unclosed labels": (running_line_as(f'{RUNNING}{{engine="0" 3.0'), "malformed"),
    "nan count": (running_line_as(f"{RUNNING} NaN"), "nan"),
    "bad value": (running_line_as(f"{RUNNING} three"), "malformed"),
    "extra fields": (running_line_as(f"{RUNNING} 3.0 1700000000000 extra"), "malformed"),
    "no value": (running_line_as(f'{RUNNING}{{engine="0"}}'), "malformed"),
    "bad max_lora": (vllm_page(max_lora="four"), "max_lora='four'"),
}


@pytest.mark.parametrize(("text", "complaint"), NOT_VLLM.values(), ids=NOT_VLLM.keys())
def test_what_is_not_a_vllm_page_is_refused_clearly(text: str, complaint: str) -> None:
    with pytest.raises(MetricsParseError, match=complaint) as caught:
        parse_vllm_metrics(text)
    assert isinstance(caught.value, ValueError)


def test_a_realistic_page_is_realistic() -> None:
    """Guards the benchmark's premise: the page is as big as a busy vLLM's."""
    text = realistic_page()
    assert len(text) > 40_000
    assert text.count("\n") > 400
