"""Envoy bootstrap tweaks and Envoy-made messages that only tests need."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import duration_pb2, struct_pb2

from controller.extproc.access_log import ROUTE_ID_KEY, ROUTE_NAMESPACE


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


def access_log_entry(
    route_id: str | None,
    status: int = 200,
    *,
    first_upstream_byte_ms: int | None = 120,
    last_downstream_byte_ms: int = 150,
) -> accesslog_pb2.HTTPAccessLogEntry:
    """What Envoy's gRPC access log says about one request, with the picker's route id."""
    logged = accesslog_pb2.HTTPAccessLogEntry()
    logged.response.response_code.value = status
    common = logged.common_properties
    if first_upstream_byte_ms is not None:
        common.time_to_first_upstream_rx_byte.CopyFrom(
            duration_pb2.Duration(nanos=first_upstream_byte_ms * 1_000_000)
        )
    common.time_to_last_downstream_tx_byte.CopyFrom(
        duration_pb2.Duration(nanos=last_downstream_byte_ms * 1_000_000)
    )
    destination = struct_pb2.Struct()
    destination.fields["x-gateway-destination-endpoint"].string_value = "10.0.0.1:8000"
    common.metadata.filter_metadata["envoy.lb"].CopyFrom(destination)
    if route_id is not None:
        route = struct_pb2.Struct()
        route.fields[ROUTE_ID_KEY].string_value = route_id
        common.metadata.filter_metadata[ROUTE_NAMESPACE].CopyFrom(route)
    return logged
