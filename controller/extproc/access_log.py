"""Envoy's gRPC access log as the picker's source of request outcomes (status and latency).

The bootstrap of `envoy_config` skips the response headers on the ext_proc stream and logs
every request to this service instead: Envoy batches the entries (one gRPC message for many
requests, after they ended), which costs less than a message pair per request and keeps
the picker off the path of the answer. The picker's route id comes back in each entry's
dynamic metadata; entries without one (requests the picker refused or never saw) are not
ours to report.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from controller.extproc.outcomes import Outcomes

ROUTE_NAMESPACE = "loractl"  # dynamic metadata the picker sets and Envoy logs
ROUTE_ID_KEY = "route-id"


def entry_outcome(entry: accesslog_pb2.HTTPAccessLogEntry) -> tuple[str, int, float] | None:
    """(route id, status, seconds to the first byte of the answer), or None if not routed.

    Status 0 means no response reached Envoy (the client left, the upstream reset). The
    latency is Envoy's, from the request's start to the upstream's first byte; an answer
    Envoy made itself (no upstream byte) counts until its last byte went out.
    """
    common = entry.common_properties
    namespace = common.metadata.filter_metadata.get(ROUTE_NAMESPACE)
    if namespace is None or ROUTE_ID_KEY not in namespace.fields:
        return None
    route_id = namespace.fields[ROUTE_ID_KEY].string_value
    if common.HasField("time_to_first_upstream_rx_byte"):
        elapsed = common.time_to_first_upstream_rx_byte
    else:
        elapsed = common.time_to_last_downstream_tx_byte
    status = entry.response.response_code.value
    return route_id, status, elapsed.seconds + elapsed.nanos / 1e9


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """`StreamAccessLogs`: each Envoy worker keeps one stream open and sends batches."""

    def __init__(self, outcomes: Outcomes) -> None:
        self._outcomes = outcomes

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[
            als_pb2.StreamAccessLogsMessage, als_pb2.StreamAccessLogsResponse
        ],
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                outcome = entry_outcome(entry)
                if outcome is not None:
                    self._outcomes.answered(*outcome, "access_log")
        return als_pb2.StreamAccessLogsResponse()
