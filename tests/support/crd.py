"""CRD schemas as JSON Schema, for validating objects without an API server."""

from __future__ import annotations

from typing import Any

PRESERVE_UNKNOWN = "x-kubernetes-preserve-unknown-fields"


def json_schema(node: Any, *, closed: bool = False) -> Any:
    """A CRD's OpenAPI v3 schema as JSON Schema (Draft 4, which boolean exclusiveMinimum
    needs): `nullable: true` becomes a type list, Kubernetes extensions are dropped.

    closed: an object that lists its properties rejects any other, as the API server does
    under kubectl's default strict field validation (it would otherwise drop them
    silently); one marked x-kubernetes-preserve-unknown-fields stays open."""
    if isinstance(node, list):
        return [json_schema(item, closed=closed) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {
        key: json_schema(value, closed=closed)
        for key, value in node.items()
        if not key.startswith("x-kubernetes-") and key != "nullable"
    }
    if node.get("nullable"):
        converted["type"] = [node["type"], "null"]
    if (
        closed
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get(PRESERVE_UNKNOWN)
    ):
        converted["additionalProperties"] = False
    return converted
