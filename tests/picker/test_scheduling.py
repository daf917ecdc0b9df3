"""The scheduling pipeline: each plugin alone, the pipeline, profiles, and the upstream profile."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import pytest

from controller.inventory import EndpointView
from controller.scheduling.columns import Columns
from controller.scheduling.filters import (
    AdapterRegisteredFilter,
    ReadyFilter,
    SaturationThresholds,
    SubsetFilter,
    saturated,
)
from controller.scheduling.pickers import MaxScorePicker
from controller.scheduling.pipeline import Filter, Pipeline, Scorer
from controller.scheduling.profile import (
    DEFAULT_PROFILE,
    UPSTREAM_PROFILE,
    ProfileError,
    load_profile,
    plugin_names,
)
from controller.scheduling.residency import ResidencyTracker
from controller.scheduling.scorers import (
    AFFINITY_SCORES,
    NEUTRAL,
    PINNED_SCORE,
    InFlightScorer,
    KvCacheScorer,
    LoraAffinityScorer,
    QueueScorer,
    RunningRequestsScorer,
    relative_load,
)
from controller.scheduling.types import TOTAL, Affinity, Criticality, SchedulingRequest
from controller.scheduling.upstream import (
    UpstreamKvCacheScorer,
    UpstreamLoraAffinityScorer,
    UpstreamQueueScorer,
)
from tests.picker.test_residency import blind_view, make_view, metrics

A, B, C, D = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"
E, F = "10.0.0.5:8000", "10.0.0.6:8000"


def adapter_request(
    target: str = "a",
    *,
    criticality: Criticality = Criticality.STANDARD,
    subset: frozenset[str] | None = None,
) -> SchedulingRequest:
    return SchedulingRequest(
        model=target, target=target, is_adapter=True, criticality=criticality, subset=subset
    )


BASE_REQUEST = SchedulingRequest(model="base", target="base", is_adapter=False)


def addresses(views: list[EndpointView]) -> list[str]:
    return [view.address for view in views]


def columns_of(views: list[EndpointView]) -> Columns:
    columns = Columns()
    columns.update(views)
    return columns


def filtered(
    step: Filter, request: SchedulingRequest, views: list[EndpointView]
) -> list[EndpointView]:
    """The views `step` keeps when every endpoint is a candidate."""
    columns = columns_of(views)
    return [views[i] for i in step.filter(request, columns, columns.everyone)]


def keeps_all(step: Filter, request: SchedulingRequest, views: list[EndpointView]) -> bool:
    """Whether `step` hands back its candidate list itself, as filters do when keeping all."""
    columns = columns_of(views)
    return step.filter(request, columns, columns.everyone) is columns.everyone


def scored(
    scorer: Scorer,
    request: SchedulingRequest,
    views: list[EndpointView],
    now: float,
    candidates: list[int] | None = None,
) -> list[float]:
    """`scorer`'s scores for `candidates` (indices into `views`; default: every view)."""
    columns = columns_of(views)
    return scorer.score(
        request, columns, columns.everyone if candidates is None else candidates, now
    )


# --- filters -------------------------------------------------------------------------


def test_ready_filter_drops_unready_endpoints() -> None:
    views = [make_view(A), make_view(B, ready=False), make_view(C)]
    assert addresses(filtered(ReadyFilter(), adapter_request(), views)) == [A, C]


def test_subset_filter_keeps_only_the_hint_in_input_order() -> None:
    views = [make_view(A), make_view(B), make_view(C)]
    assert keeps_all(SubsetFilter(), adapter_request(), views)
    hinted = adapter_request(subset=frozenset({C, A, "10.9.9.9:8000"}))
    assert addresses(filtered(SubsetFilter(), hinted, views)) == [A, C]


def test_adapter_registered_filter_prefers_known_registration() -> None:
    views = [
        make_view(A, registered=["b"]),  # known missing
        make_view(B, registered=None),  # unknown
        make_view(C, registered=["a"]),  # listed by vLLM
        make_view(D, registered=["b"], sidecar={"a": "loaded"}),  # loaded, not listed yet
    ]
    assert addresses(filtered(AdapterRegisteredFilter(), adapter_request(), views)) == [C, D]


def test_adapter_registered_filter_falls_back_to_unknown_then_to_all() -> None:
    step = AdapterRegisteredFilter()
    missing = make_view(A, registered=["b"])
    failed = make_view(C, registered=None, sidecar={"a": "failed"})
    unknown = make_view(B, registered=None)
    assert addresses(filtered(step, adapter_request(), [missing, unknown, failed])) == [B]
    # Nobody has it: a backend's own 404 beats a 503 from an empty candidate list.
    nowhere = [missing, failed]
    assert filtered(step, adapter_request(), nowhere) == nowhere


def test_adapter_registered_filter_reads_only_its_candidates() -> None:
    views = [make_view(A, registered=["a"]), make_view(B, registered=["b"]), make_view(C)]
    columns = columns_of(views)
    step = AdapterRegisteredFilter()
    assert step.filter(adapter_request(), columns, columns.everyone) == [0, 2]
    assert step.filter(adapter_request(), columns, [1, 2]) == [2]
    # A new registration at one position is seen by the next decision.
    columns.update([views[0], make_view(B, registered=["a"]), views[2]])
    assert step.filter(adapter_request(), columns, columns.everyone) is columns.everyone


def test_adapter_registered_filter_passes_base_requests_and_full_pools_through() -> None:
    step = AdapterRegisteredFilter()
    views = [make_view(A, registered=["b"]), make_view(B)]
    assert keeps_all(step, BASE_REQUEST, views)
    everywhere = [make_view(A), make_view(B)]
    assert keeps_all(step, adapter_request(), everywhere)


def test_saturated_only_when_every_endpoint_is_over_a_threshold() -> None:
    limits = SaturationThresholds(queue_threshold=5, kv_threshold=0.8)
    queued = make_view(A, observed=metrics(queue=6))
    full = make_view(B, observed=metrics(kv=0.9))
    calm = make_view(C, observed=metrics(queue=5, kv=0.8))
    assert saturated([queued, full], limits)
    assert not saturated([queued, full, calm], limits)
    assert not saturated([queued, blind_view(D)], limits)  # unknown is not evidence
    assert not saturated([], limits)


# --- scorers -------------------------------------------------------------------------


def test_lora_affinity_scores_follow_residency() -> None:
    residency = ResidencyTracker()
    residency.record_assignment(B, "a", 0.0)
    residency.record_assignment(D, "b", 0.0, max_lora=1)
    views = [
        make_view(A, observed=metrics(running=["a"])),
        make_view(B),  # idle, but we sent a there
        make_view(C),  # a free slot
        make_view(D, observed=metrics(max_lora=1)),  # full: b idle in the only slot
        make_view(E, observed=metrics(max_lora=1, running=["b"])),  # full and pinned by b
        make_view(F, registered=["b"]),
    ]
    scores = scored(LoraAffinityScorer(residency), adapter_request(), views, 1.0)
    assert scores == [1.0, 1.0, 0.8, 0.4, PINNED_SCORE, 0.0]
    assert scored(LoraAffinityScorer(residency), BASE_REQUEST, views, 1.0) == [1.0] * 6
    # Pinned is scored apart but reported as cold: the request still evicts b, later.
    assert residency.classify(views[4], "a", 1.0) is Affinity.COLD


def test_a_pinned_endpoint_scores_cold_again_once_a_slot_has_no_request() -> None:
    scorer = LoraAffinityScorer(ResidencyTracker())
    busy = [make_view(A, observed=metrics(max_lora=2, running=["b", "c"]))]
    assert scored(scorer, adapter_request(), busy, 0.0) == [PINNED_SCORE]
    drained = [make_view(A, observed=metrics(max_lora=2, running=["b"]))]  # c idle in a slot
    assert scored(scorer, adapter_request(), drained, 1.0) == [AFFINITY_SCORES[Affinity.COLD]]


def test_relative_load_halves_at_scale_above_the_least_loaded() -> None:
    assert relative_load([0, 2, 6], 2.0) == [1.0, 0.5, 0.25]
    assert relative_load([3, 5], 2.0) == [1.0, 0.5]
    assert relative_load([4, 4], 2.0) == [1.0, 1.0]
    assert relative_load([None, 1, 3], 2.0) == [NEUTRAL, 1.0, 0.5]
    assert relative_load([None, None], 2.0) == [NEUTRAL, NEUTRAL]
    assert relative_load([5, 1, 9, 3], 4.0, all_known=True) == [0.5, 1.0, 1 / 3, 2 / 3]


def test_queue_scorer_reads_waiting_requests() -> None:
    views = [
        make_view(A, observed=metrics(queue=0, requests=50)),
        make_view(B, observed=metrics(queue=2)),
        blind_view(C),
    ]
    assert scored(QueueScorer(scale=2.0), adapter_request(), views, 0.0) == [1.0, 0.5, NEUTRAL]
    # Relative to the least loaded candidate, not to every endpoint.
    assert scored(QueueScorer(scale=2.0), adapter_request(), views, 0.0, candidates=[1]) == [1.0]


def test_running_requests_scorer_reads_running_requests() -> None:
    views = [make_view(A, observed=metrics(requests=8, queue=9)), make_view(B)]
    assert scored(RunningRequestsScorer(scale=8.0), adapter_request(), views, 0.0) == [0.5, 1.0]


def test_in_flight_scorer_counts_the_requests_sent_since_the_last_scrape() -> None:
    views = [make_view(A, observed=metrics(requests=3, queue=1)), make_view(B), blind_view(C)]
    columns = columns_of(views)
    for _ in range(4):
        columns.record_sent(1)
    scorer = InFlightScorer(scale=4.0)
    assert scorer.score(adapter_request(), columns, columns.everyone, 0.0) == [1.0, 1.0, NEUTRAL]
    columns.record_sent(1)
    assert scorer.score(adapter_request(), columns, [0, 1], 0.0) == [1.0, 0.8]


def test_requests_sent_count_until_the_next_metrics_of_that_endpoint() -> None:
    observed = metrics(requests=2)
    columns = columns_of([make_view(A, observed=observed), make_view(B)])
    columns.record_sent(0)
    columns.record_sent(0)
    columns.record_sent(1)
    # A new model list is a new view with the same metrics: the scrape has not seen them.
    columns.update([make_view(A, observed=observed, registered=["a"]), make_view(B)])
    assert columns.sent == [2, 0]
    columns.update([make_view(A, observed=metrics(requests=4)), blind_view(B)])
    assert columns.sent == [0, 0]


def test_decisions_between_two_scrapes_spread_over_equal_endpoints() -> None:
    pipeline = load_profile({"scorers": ["in-flight"], "picker": "max-score"}, rng=random.Random(7))
    views = [make_view(A), make_view(B), make_view(C), make_view(D)]
    chosen = [
        pipeline.schedule(BASE_REQUEST, views, now=0.0).endpoints[0].address for _ in range(8)
    ]
    assert sorted(chosen[:4]) == sorted(chosen[4:]) == [A, B, C, D]


@pytest.mark.parametrize("scorer", [QueueScorer, RunningRequestsScorer, InFlightScorer])
def test_load_scorers_refuse_a_scale_of_zero(scorer: Callable[..., Scorer]) -> None:
    with pytest.raises(ValueError, match="scale"):
        scorer(scale=0.0)


def test_kv_cache_scorer_prefers_free_cache() -> None:
    views = [make_view(A, observed=metrics(kv=0.25)), blind_view(B)]
    assert scored(KvCacheScorer(), adapter_request(), views, 0.0) == [0.75, NEUTRAL]


# --- picker --------------------------------------------------------------------------


def test_max_score_picks_best_first_then_fallbacks() -> None:
    picker = MaxScorePicker(fallbacks=2, rng=random.Random(0))
    assert picker.pick([0.1, 0.9, 0.5, 0.7]) == [1, 3, 2]
    assert picker.pick([0.3, 0.2]) == [0, 1]
    assert MaxScorePicker().pick([0.1, 0.9, 0.5]) == [1]
    with pytest.raises(ValueError, match="fallbacks"):
        MaxScorePicker(fallbacks=-1)


def test_max_score_breaks_ties_at_random_and_reproducibly_with_a_seed() -> None:
    totals = [1.0, 2.0, 2.0, 2.0, 0.5]
    first = MaxScorePicker(fallbacks=1, rng=random.Random(7))
    again = MaxScorePicker(fallbacks=1, rng=random.Random(7))
    draws = [first.pick(totals) for _ in range(300)]
    assert draws == [again.pick(totals) for _ in range(300)]
    assert all(len(set(d)) == 2 and set(d) <= {1, 2, 3} for d in draws)
    counts = Counter(d[0] for d in draws)
    assert set(counts) == {1, 2, 3}
    assert min(counts.values()) > 60  # about 100 each
    assert len({tuple(d) for d in draws}) == 6  # every ordered pair of the three


def test_max_score_ties_below_the_returned_prefix_are_not_drawn() -> None:
    picker = MaxScorePicker(fallbacks=1, rng=random.Random(1))
    assert {tuple(picker.pick([0.2, 0.9, 0.8, 0.2])) for _ in range(20)} == {(1, 2)}
    # A tie straddling the end of the prefix: the best first, one of the two runners-up.
    straddling = {tuple(picker.pick([0.5, 0.9, 0.5])) for _ in range(50)}
    assert straddling == {(1, 0), (1, 2)}


# --- pipeline ------------------------------------------------------------------------


def ours(seed: int = 0) -> Pipeline:
    return load_profile(DEFAULT_PROFILE, rng=random.Random(seed))


def test_schedule_prefers_the_endpoint_holding_the_adapter() -> None:
    pipeline = ours()
    views = [make_view(A), make_view(B, observed=metrics(running=["a"])), make_view(C)]
    result = pipeline.schedule(adapter_request(), views, now=0.0)
    assert addresses(result.endpoints)[0] == B
    assert len(result.endpoints) == 3  # the best and two fallbacks
    assert result.affinity is Affinity.HOT
    assert set(result.scores) == set(addresses(result.endpoints))
    assert result.scores[B] == {
        "lora-affinity": 1.0, "queue": 1.0, "kv-cache": 1.0, "in-flight": 1.0, TOTAL: 10.0
    }  # fmt: skip


def test_schedule_prefers_the_hot_endpoint_with_fewer_requests_in_flight() -> None:
    pipeline = ours()
    views = [
        make_view(A, observed=metrics(running=["a"], requests=7)),  # a full batch, no queue
        make_view(B, observed=metrics(running=["a"], requests=2)),
        make_view(C, observed=metrics(running=["b", "c", "d", "e"], requests=4)),  # pinned
    ]
    assert addresses(pipeline.schedule(adapter_request(), views, now=0.0).endpoints) == [B, A, C]


def test_schedule_remembers_its_assignment_so_the_adapter_stays_put() -> None:
    pipeline = ours()

    def scraped() -> list[EndpointView]:  # idle again: the scrape shows the request done
        return [make_view(A), make_view(B), make_view(C)]

    first = pipeline.schedule(adapter_request(), scraped(), now=0.0)
    assert first.affinity is Affinity.WARM
    chosen = first.endpoints[0].address
    for step in range(1, 10):
        again = pipeline.schedule(adapter_request(), scraped(), now=float(step))
        assert again.endpoints[0].address == chosen
        assert again.affinity is Affinity.HOT


def test_schedule_leaves_a_hot_endpoint_whose_queue_grew() -> None:
    pipeline = ours()
    views = [
        make_view(A, observed=metrics(running=["a"], queue=3)),
        make_view(B, observed=metrics(queue=0)),
    ]
    result = pipeline.schedule(adapter_request(), views, now=0.0)
    assert addresses(result.endpoints) == [B, A]
    assert result.affinity is Affinity.WARM


def test_schedule_base_request_and_empty_candidates() -> None:
    pipeline = ours()
    result = pipeline.schedule(BASE_REQUEST, [make_view(A)], now=0.0)
    assert result.affinity is Affinity.BASE
    assert addresses(result.endpoints) == [A]
    nobody = pipeline.schedule(adapter_request(), [make_view(A, ready=False)], now=0.0)
    assert nobody.endpoints == []
    assert nobody.affinity is Affinity.MISSING
    assert pipeline.schedule(BASE_REQUEST, [], now=0.0).affinity is Affinity.BASE


def test_schedule_reads_the_clock_when_not_given_one() -> None:
    result = ours().schedule(adapter_request(), [make_view(A)])
    assert result.affinity is Affinity.WARM


def constant(name: str, value: float) -> Scorer:
    class Constant:
        kind: Final = "scorer"

        def __init__(self) -> None:
            self.name = name

        def score(
            self, request: SchedulingRequest, columns: Columns, candidates: list[int], now: float
        ) -> list[float]:
            return [value] * len(candidates)

    return Constant()


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 5])
def test_weighted_sum_with_any_number_of_scorers(count: int) -> None:
    scorers = [(constant(f"s{i}", 0.5), float(i + 1)) for i in range(count)]
    pipeline = Pipeline([], scorers, MaxScorePicker(), ResidencyTracker())
    result = pipeline.schedule(BASE_REQUEST, [make_view(A)], now=0.0)
    expected = 0.5 * sum(range(1, count + 1))
    assert result.scores[A][TOTAL] == pytest.approx(expected)


def test_pipeline_refuses_ambiguous_scorer_names() -> None:
    for names in (["queue", "queue"], ["total"]):
        scorers = [(constant(name, 1.0), 1.0) for name in names]
        with pytest.raises(ValueError, match="unique"):
            Pipeline([], scorers, MaxScorePicker(), ResidencyTracker())


def test_should_shed_only_sheddable_requests_on_a_saturated_reachable_pool() -> None:
    pipeline = ours()
    busy = make_view(A, observed=metrics(queue=9))
    calm_unready = make_view(B, ready=False)
    calm = make_view(C)
    sheddable = adapter_request(criticality=Criticality.SHEDDABLE)
    assert pipeline.should_shed(sheddable, [busy, calm_unready])
    assert not pipeline.should_shed(adapter_request(), [busy, calm_unready])
    assert not pipeline.should_shed(sheddable, [busy, calm])
    hinted = adapter_request(criticality=Criticality.SHEDDABLE, subset=frozenset({A}))
    assert pipeline.should_shed(hinted, [busy, calm])


# --- profiles ------------------------------------------------------------------------


def test_default_profile_builds_our_pipeline() -> None:
    pipeline = ours()
    assert [f.name for f in pipeline.filters] == ["ready", "subset", "adapter-registered"]
    names = [s.name for s in pipeline.scorers]
    assert names == ["lora-affinity", "queue", "kv-cache", "in-flight"]
    assert pipeline.weights == (4.0, 2.0, 2.0, 2.0)
    assert isinstance(pipeline.picker, MaxScorePicker)
    assert pipeline.picker.fallbacks == 2
    assert pipeline.saturation == SaturationThresholds(queue_threshold=5, kv_threshold=0.8)
    assert pipeline.residency.default_max_lora == 4
    assert pipeline.residency.idle_seconds == 300.0


def test_profile_parameters_and_defaults() -> None:
    pipeline = load_profile(
        {
            "scorers": [{"name": "queue", "scale": 4}, {"name": "running-requests", "weight": 0}],
            "picker": "max-score",
            "residency": {"default_max_lora": 2, "idle_seconds": 60},
        }
    )
    assert pipeline.filters == ()
    assert pipeline.weights == (1.0, 0.0)
    views = [make_view(A, observed=metrics(queue=4)), make_view(B)]
    assert scored(pipeline.scorers[0], BASE_REQUEST, views, 0.0) == [0.5, 1.0]
    assert pipeline.residency.default_max_lora == 2
    assert load_profile({}).saturation == SaturationThresholds()


def test_plugin_names_list_the_registry() -> None:
    assert plugin_names("filter") == ["adapter-registered", "ready", "subset"]
    assert "upstream-lora-affinity" in plugin_names("scorer")
    assert plugin_names("picker") == ["max-score"]


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("filters: [ready", "not valid YAML"),
        ("- ready", "must be a mapping"),
        ("scorer: []", "unknown key 'scorer'; valid keys: filters, scorers, picker"),
        ("filters: ready", "filters: expected a list"),
        ("filters: [redy]", "filters[0]: unknown filter 'redy'; valid filters: adapter-regis"),
        ("filters: [queue]", "filters[0]: 'queue' is a scorer, not a filter"),
        ("filters: [{nme: ready}]", "filters[0]: expected a filter name, got None"),
        ("filters: [{name: ready, x: 1}]", "filters[0] (ready): unknown key 'x'; valid keys: name"),
        ("scorers: [5]", "scorers[0]: expected a scorer name or a mapping, got 5"),
        ("scorers: [{name: ready}]", "scorers[0]: 'ready' is a filter, not a scorer"),
        ("scorers: [{name: queue, weight: -1}]", "scorers[0].weight: expected a number >= 0"),
        ("scorers: [{name: queue, weight: yes}]", "scorers[0].weight: expected a number"),
        ("scorers: [{name: queue, weight: .inf}]", "scorers[0].weight: expected a number"),
        (
            "scorers: [{name: queue, scael: 2}]",
            "unknown key 'scael'; valid keys: name, weight, scale",
        ),
        ("scorers: [{name: queue, scale: 0}]", "scorers[0] (queue).scale: expected a positive"),
        (
            "scorers: [queue, {name: in-flight, scale: -4}]",
            "scorers[1] (in-flight).scale: expected a positive",
        ),
        (
            "scorers: [{name: in-flight, weight: 2, scael: 4}]",
            "scorers[0] (in-flight): unknown key 'scael'; valid keys: name, weight, scale",
        ),
        ("scorers: [{name: queue}, {name: queue}]", "scorers: 'queue' is listed twice"),
        ("picker: {name: max-score, fallbacks: -1}", "fallbacks: expected an integer >= 0"),
        ("picker: {name: max-score, fallbacks: 1.5}", "fallbacks: expected an integer >= 0"),
        ("picker: best", "picker: unknown picker 'best'; valid pickers: max-score"),
        ("saturation: {kv_threshold: 1.5}", "saturation.kv_threshold: expected at most 1"),
        ("saturation: {queue: 5}", "saturation: unknown key 'queue'"),
        ("saturation: 5", "saturation: expected a mapping, got 5"),
        ("residency: {default_max_lora: 0}", "residency.default_max_lora: expected an integer"),
        ("residency: {idle_seconds: 0}", "residency.idle_seconds: expected a positive number"),
    ],
)
def test_profile_errors_say_where_and_what_is_valid(profile: str, message: str) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile(profile)
    assert message in str(caught.value)


# --- upstream ------------------------------------------------------------------------


def test_upstream_lora_affinity_uses_only_lora_requests_info() -> None:
    views = [
        make_view(A, observed=metrics(max_lora=2, running=["a", "b"])),  # active
        make_view(B, observed=metrics(max_lora=2, running=["b"])),  # a free slot
        make_view(C, observed=metrics(max_lora=2, running=["b"], waiting=["a"])),  # queued
        make_view(D, observed=metrics(max_lora=2, running=["b", "c"])),  # full
        make_view("10.0.0.5:8000", observed=metrics(max_lora=None)),  # max_lora unknown
        blind_view("10.0.0.6:8000"),  # never scraped: zeroed metrics
    ]
    scores = scored(UpstreamLoraAffinityScorer(), adapter_request(), views, 0.0)
    assert scores == [1.0, 0.8, 0.6, 0.0, 0.0, 0.0]
    # Base-model requests are scored too, as an adapter nobody runs.
    assert scored(UpstreamLoraAffinityScorer(), BASE_REQUEST, views[:2], 0.0) == [0.0, 0.8]


def test_upstream_lora_affinity_remembers_the_last_busy_label_set() -> None:
    idle = replace(metrics(max_lora=2), last_busy_running=frozenset({"a", "b"}))
    scores = scored(
        UpstreamLoraAffinityScorer(), adapter_request(), [make_view(A, observed=idle)], 0.0
    )
    assert scores == [1.0]


def test_upstream_queue_is_min_max_normalised() -> None:
    scorer = UpstreamQueueScorer()
    views = [
        make_view(A, observed=metrics(queue=1)),
        make_view(B, observed=metrics(queue=3)),
        make_view(C, observed=metrics(queue=2)),
        blind_view(D),  # zero waiting, as a zeroed Metrics struct
    ]
    assert scored(scorer, adapter_request(), views, 0.0) == [2 / 3, 0.0, 1 / 3, 1.0]
    assert scored(scorer, adapter_request(), views, 0.0, candidates=[0]) == [1.0]


def test_upstream_kv_cache_is_one_minus_usage() -> None:
    views = [make_view(A, observed=metrics(kv=0.25)), blind_view(B)]
    assert scored(UpstreamKvCacheScorer(), adapter_request(), views, 0.0) == [0.75, 1.0]


def upstream(seed: int = 0) -> Pipeline:
    return load_profile(UPSTREAM_PROFILE, rng=random.Random(seed))


def test_upstream_profile_shape() -> None:
    pipeline = upstream()
    assert [f.name for f in pipeline.filters] == ["ready", "subset"]
    names = [s.name for s in pipeline.scorers]
    assert names == ["upstream-queue", "upstream-kv-cache", "upstream-lora-affinity"]
    assert pipeline.weights == (2.0, 2.0, 4.0)
    result = pipeline.schedule(adapter_request(), [make_view(A), make_view(B)], now=0.0)
    assert len(result.endpoints) == 1  # maxNumOfEndpoints defaults to 1 upstream


def first_two_choices(pipeline: Pipeline) -> tuple[str, str]:
    views = [make_view(A), make_view(B)]  # both idle, with free slots
    first = pipeline.schedule(adapter_request(), views, now=0.0)
    second = pipeline.schedule(adapter_request(), views, now=1.0)
    return first.endpoints[0].address, second.endpoints[0].address


def test_upstream_forgets_an_idle_adapter_that_ours_remembers() -> None:
    assert all(a == b for a, b in (first_two_choices(ours(seed)) for seed in range(40)))
    # Upstream sees two idle pods with free slots: a coin toss each time.
    assert not all(a == b for a, b in (first_two_choices(upstream(seed)) for seed in range(40)))


def test_ours_leaves_a_queueing_hot_pod_for_a_free_slot_but_not_to_evict() -> None:
    queueing_hot = make_view(A, observed=metrics(running=["a"], queue=1))
    free_slot = make_view(B, observed=metrics(queue=0))
    full = make_view(B, observed=metrics(running=["b", "c", "d", "e"], queue=0))
    # One waiting request outweighs the small cost of filling a free slot...
    assert (
        addresses(ours().schedule(adapter_request(), [queueing_hot, free_slot], 0.0).endpoints)[0]
        == B
    )
    # ...but not the eviction of another adapter that its users would pay to bring back.
    assert (
        addresses(ours().schedule(adapter_request(), [queueing_hot, full], 0.0).endpoints)[0] == A
    )
    assert addresses(
        upstream().schedule(adapter_request(), [queueing_hot, free_slot], 0.0).endpoints
    ) == [B]


def test_upstream_routes_to_a_pod_without_the_adapter() -> None:
    views = [make_view(A, registered=["b"], observed=metrics(max_lora=1))]
    result = upstream().schedule(adapter_request(), views, 0.0)
    assert addresses(result.endpoints) == [A]
    assert result.affinity is Affinity.MISSING


def test_profiles_accept_a_parsed_mapping() -> None:
    document: dict[str, Any] = {"filters": ["ready"], "scorers": ["kv-cache"]}
    pipeline = load_profile(document)
    assert [s.name for s in pipeline.scorers] == ["kv-cache"]
    assert pipeline.weights == (1.0,)  # upstream's default weight too
