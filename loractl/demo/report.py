"""What the demo saw, as figures: the split per canary step, the live view, the summary.

Pure functions of recorded data: the answers the client got, the canary weights read from
the InferenceModel over time, counters scraped from the processes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loractl.demo.workload import Answer

SETTLE = 0.5  # seconds after a weight change before answers count for the new step
MIN_TOLERANCE = 3.0  # percentage points


@dataclass(frozen=True)
class WeightChange:
    at: float  # monotonic, when the demo read the new weight in the InferenceModel
    weight: int  # percent on the canary's `to`


@dataclass(frozen=True)
class StepSplit:
    weight: int
    requests: int
    to_requests: int
    observed_percent: float
    tolerance_percent: float

    @property
    def within_tolerance(self) -> bool:
        return abs(self.observed_percent - self.weight) <= self.tolerance_percent


def tolerance(weight: int, requests: int) -> float:
    """Four standard deviations of a binomial share, at least MIN_TOLERANCE points: a
    correct picker stays inside it but for a 1-in-15,000 fluke."""
    if requests == 0:
        return 100.0
    p = weight / 100
    return max(MIN_TOLERANCE, 400 * math.sqrt(p * (1 - p) / requests))


def step_splits(
    answers: Iterable[Answer], changes: Sequence[WeightChange], model: str, to: str
) -> list[StepSplit]:
    """For each weight in force, the share of the model's successful answers served by
    `to`. Answers sent within SETTLE either side of a change are left out: the picker reads
    the new weight a moment before or after the demo does."""
    periods = [
        (
            change.at + SETTLE,
            changes[i + 1].at - SETTLE if i + 1 < len(changes) else math.inf,
            change.weight,
        )
        for i, change in enumerate(changes)
    ]
    counts = [Counter[bool]() for _ in periods]
    for answer in answers:
        if answer.model != model or answer.status != 200:
            continue
        for (start, end, _), counter in zip(periods, counts, strict=True):
            if start <= answer.at < end:
                counter[answer.served_by == to] += 1
    splits = []
    for (_, _, weight), counter in zip(periods, counts, strict=True):
        total = counter[True] + counter[False]
        observed = 100 * counter[True] / total if total else 0.0
        splits.append(
            StepSplit(
                weight, total, counter[True], round(observed, 1), round(tolerance(weight, total), 1)
            )
        )
    return splits


def counter_total(metrics_text: str, name: str, by: str | None = None) -> dict[str, float]:
    """Sum of a counter's samples in a /metrics page, per value of label `by` (or "")."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_total":
                key = "" if by is None else sample.labels.get(by, "")
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def status_counts(answers: Iterable[Answer]) -> dict[str, int]:
    counts = Counter(str(a.status) if a.status else "no answer" for a in answers)
    return dict(sorted(counts.items()))


def served_counts(answers: Iterable[Answer]) -> dict[str, int]:
    return dict(sorted(Counter(a.served_by for a in answers if a.status == 200).items()))


def server_errors(answers: Iterable[Answer]) -> int:
    return sum(1 for a in answers if a.status >= 500 or a.status == 0)


def live_line(
    elapsed: float,
    phase: str,
    weights: Mapping[str, int],
    recent: Sequence[Answer],
    window: float,
    loaded: Mapping[str, Sequence[str]],
) -> str:
    """One refresh of the live view: where the rollout is, the last seconds' traffic per
    adapter, errors, and what each pod has loaded."""
    rate = len(recent) / window if window > 0 else 0.0
    served = served_counts(recent)
    errors = server_errors(recent)
    split = "  ".join(f"{target} {weight}%" for target, weight in weights.items()) or "-"
    traffic = "  ".join(f"{target}: {count}" for target, count in served.items()) or "-"
    pods = "  ".join(f"{pod}: {','.join(ids) or '-'}" for pod, ids in loaded.items())
    return (
        f"[{elapsed:5.1f}s] {phase:<12} weights {split}\n"
        f"         traffic {rate:5.0f} req/s  {traffic}  5xx {errors}\n"
        f"         loaded  {pods}"
    )


def summary_text(summary: Mapping[str, Any]) -> str:
    lines = [
        "",
        f"canary {summary['rollout']['from']} -> {summary['rollout']['to']}: "
        f"{summary['rollout']['phase']} in {summary['duration_seconds']:.0f}s",
        "",
        "    step   weight   requests   on new   observed   tolerance",
    ]
    for i, step in enumerate(summary["steps"]):
        mark = "ok" if step["within_tolerance"] else "OFF"
        name = str(i) if i else "before"
        lines.append(
            f"  {name:>6}   {step['weight']:>5}%   {step['requests']:>8}   {step['to_requests']:>6}"
            f"   {step['observed_percent']:>7.1f}%   ±{step['tolerance_percent']:.1f}  {mark}"
        )
    requests = summary["requests"]
    affinity = summary["affinity"]
    lines += [
        "",
        f"  requests  {requests['total']} ({_pairs(requests['by_status'])}); "
        f"5xx or no answer: {requests['server_errors']}",
        f"  served by {_pairs(requests['served_by'])}",
        f"  affinity  {affinity['hit_rate']:.0%} of picks found the adapter hot "
        f"({', '.join(f'{k}: {v:.0f}' for k, v in affinity['outcomes'].items())})",
        f"  swaps     {summary['swaps']:.0f} adapter moves into GPU slots across the pods",
        "",
        f"  state     {summary['state_dir']}  (objects/: the YAMLs; logs/: every process)",
    ]
    return "\n".join(lines) + "\n"


def _pairs(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in counts.items())


def splits_json(splits: Iterable[StepSplit]) -> list[dict[str, Any]]:
    return [{**asdict(s), "within_tolerance": s.within_tolerance} for s in splits]
