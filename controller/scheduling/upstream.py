"""The upstream Gateway API Inference Extension scheduler, re-implemented for comparison.

Sources (kubernetes-sigs/gateway-api-inference-extension, read for this module):

- `pkg/epp/scheduling/framework/plugins/scorer/queue.go`: WaitingQueueSize only;
  score = (max - q) / (max - min) over the candidates, 1.0 for all when max = min.
- `pkg/epp/scheduling/framework/plugins/scorer/kvcache_utilization.go`:
  score = 1 - KVCacheUsagePercent.
- `pkg/epp/scheduling/framework/plugins/scorer/lora_affinity.go` (same logic in the
  later `loraaffinityscorer` package), evaluated in this order:
  1.0 if the target is in ActiveModels (the running_lora_adapters label);
  0.8 if len(ActiveModels) + len(WaitingModels) < MaxActiveModels (max_lora label);
  0.6 if the target is in WaitingModels (waiting_lora_adapters label); 0.0 otherwise.
  It is applied to every request, base-model ones included (the base model is never
  an active adapter, so they get 0.8 or 0.0 like an unseen adapter).
- `pkg/epp/scheduling/framework/plugins/picker/max_score_picker.go`: shuffle, stable
  sort by score, keep maxNumOfEndpoints (DefaultMaxNumOfEndpoints = 1 in `common.go`):
  our max-score picker with fallbacks 0 has the same outcome distribution.
- The scheduler profile sums enforceScoreRange(score) * weight (a clamp to [0, 1]; a
  no-op here, as every score below is in range for metrics in range).
- `pkg/epp/config/loader/defaults.go` and the Helm chart's `epp-config.yaml`: the
  default profile is queue-scorer weight 2, kv-cache-utilization-scorer weight 2,
  prefix-cache-scorer weight 3, and no lora-affinity scorer at all.
- Saturation detector defaults: queue depth 5, KV cache 0.8.
- `pkg/epp/backend/metrics/metrics.go`: ActiveModels, WaitingModels and
  MaxActiveModels come from one `vllm:lora_requests_info` series: the one with the
  largest value among those whose running or waiting label is non-empty.

What differs here, and why:

- lora-affinity weight 4: the comparison profile asked for (upstream ships no weight
  for it; a scorer referenced without one gets DefaultScorerWeight 1).
- No prefix-cache scorer: the scheduling request carries no prompt here, and the
  benchmark workload is about adapters, not shared prefixes.
- Filters `ready` and `subset` stand for upstream's datastore (ready pods only) and
  its subset-hint handling; there is no adapter-registered filter upstream.
- An endpoint without fresh metrics is scored here from zero figures, as upstream
  scores a pod it has not scraped yet (its Metrics struct starts zeroed).
- Label-set choice, the same as upstream's: the scorer reads the newest label set that
  names any adapter (`MetricsObservation.last_busy_running` / `last_busy_waiting`), so an
  idle pod keeps its last busy adapters as active; our own scorers read the newest set.
- The saturation check counts an endpoint with unknown metrics as not saturated;
  upstream counts stale metrics as "no capacity".
"""

from __future__ import annotations

from typing import Final

from controller.inventory import EndpointView
from controller.scheduling.columns import Columns, known_or
from controller.scheduling.types import SchedulingRequest

UPSTREAM_PROFILE: Final = """\
filters: [ready, subset]
scorers:
  - {name: upstream-queue, weight: 2}
  - {name: upstream-kv-cache, weight: 2}
  - {name: upstream-lora-affinity, weight: 4}
picker: {name: max-score, fallbacks: 0}
saturation: {queue_threshold: 5, kv_threshold: 0.8}
"""


class UpstreamQueueScorer:
    name: Final = "upstream-queue"
    kind: Final = "scorer"

    def score(
        self, request: SchedulingRequest, columns: Columns, candidates: list[int], now: float
    ) -> list[float]:
        depths = known_or(columns.gather(columns.waiting, candidates), 0, columns.all_known)
        low, high = min(depths), max(depths)
        if high == low:
            return [1.0] * len(depths)
        spread = high - low
        return [(high - depth) / spread for depth in depths]


class UpstreamKvCacheScorer:
    name: Final = "upstream-kv-cache"
    kind: Final = "scorer"

    def score(
        self, request: SchedulingRequest, columns: Columns, candidates: list[int], now: float
    ) -> list[float]:
        return known_or(columns.gather(columns.kv_free, candidates), 1.0, columns.all_known)


class UpstreamLoraAffinityScorer:
    name: Final = "upstream-lora-affinity"
    kind: Final = "scorer"

    def score(
        self, request: SchedulingRequest, columns: Columns, candidates: list[int], now: float
    ) -> list[float]:
        target, views = request.target, columns.views
        return [_affinity(views[i], target) for i in candidates]


def _affinity(view: EndpointView, target: str) -> float:
    metrics = view.metrics
    if metrics is None:
        return 0.0  # zeroed metrics: nothing active and MaxActiveModels 0
    # Upstream skips label sets with no adapter in them, so an idle pod keeps reporting the
    # adapters of its last busy moment.
    active, waiting = metrics.last_busy_running, metrics.last_busy_waiting
    if target in active:
        return 1.0
    if len(active) + len(waiting) < (metrics.max_lora or 0):
        return 0.8
    if target in waiting:
        return 0.6
    return 0.0
