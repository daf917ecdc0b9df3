"""Envoy bootstrap tweaks that only tests need."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    manager: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"
    ][0]["typed_config"]
    return manager


def subset_hint(endpoints: list[str]) -> Callable[[dict[str, Any]], None]:
    """Test-only: set the subset hint the way a gateway does, as filter metadata before
    ext_proc (here with Envoy's set_metadata filter; a real gateway derives it per request)."""

    def tweak(config: dict[str, Any]) -> None:
        hint = {
            "name": "envoy.filters.http.set_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                "metadata": [
                    {
                        "metadata_namespace": "envoy.lb.subset_hint",
                        "value": {"x-gateway-destination-endpoint-subset": endpoints},
                    }
                ],
            },
        }
        connection_manager(config)["http_filters"].insert(0, hint)

    return tweak
