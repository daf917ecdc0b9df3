"""The Grafana dashboard queries only metrics the code registers, and imports anywhere."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from tests.ops.exposed_metrics import families, names_in_source, series_names
from tests.ops.schemas import MANIFESTS

DASHBOARD: dict[str, Any] = json.loads(
    (MANIFESTS / "grafana" / "loractl-dashboard.json").read_text()
)
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"')
_BRACES = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")  # not the h of 1h
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are neither functions
    nor keywords, once label matchers, ranges, strings and label lists are removed."""
    bare = _LABEL_LISTS.sub(" ", _BRACES.sub(" ", _STRINGS.sub(" ", expr)))
    return {
        match.group()
        for match in _IDENTIFIER.finditer(bare)
        if match.group() not in _KEYWORDS and not bare[match.end() :].lstrip().startswith("(")
    }


def _panels() -> Iterator[dict[str, Any]]:
    for panel in DASHBOARD["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries() -> Iterator[tuple[str, str]]:
    for panel in _panels():
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_the_extractor_reads_promql() -> None:
    expr = (
        'sum by (le, target) (rate(a_bucket{code="5xx", x=~"$v"}[5m])) / ignoring(outcome) '
        "group_left sum(b_total offset 1h) or vector(0)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}


def test_every_queried_metric_is_registered_by_the_code() -> None:
    exposed = series_names()
    unknown = {
        (title, name)
        for title, expr in _queries()
        for name in metric_names(expr)
        if name not in exposed
    }
    assert unknown == set(), f"not exposed by loractl: {sorted(unknown)}"


def test_the_registries_cover_every_metric_the_code_names() -> None:
    """Guards the test above: a module that registers metrics in a registry the helper does
    not build would leave its names unchecked."""
    assert names_in_source() <= set(families())


def test_it_has_sidecar_picker_and_rollout_rows_with_panels_on_each() -> None:
    rows = [panel["title"].split(":")[0] for panel in DASHBOARD["panels"] if panel["type"] == "row"]
    assert rows == ["Sidecar", "Picker", "Rollouts"]
    queried = {name for _, expr in _queries() for name in metric_names(expr)}
    for prefix in ("loractl_sidecar_", "loractl_picker_", "loractl_rollout"):
        assert any(name.startswith(prefix) for name in queried), prefix


def test_it_imports_into_any_grafana_with_a_prometheus() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [panel["id"] for panel in _panels()]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE, panel["title"]
            assert panel["description"], panel["title"]
            assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
