"""The demo's processes: three simulated vLLM pods with their sidecars, the controller
with the picker in local mode, and a real Envoy in front.

Every process is a `ChildProcess` in its own process group, started here and stopped
here, whatever happens in between: `Stack` is a context manager, and its exit stops
everything still running (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from controller.extproc.envoy_config import envoy_bootstrap, envoy_process, wait_envoy_ready
from loractl.demo.scene import BASE_MODEL, CONFIG_KEY, CONFIGMAP, POOL, Pod, Scene
from loractl.processes import ChildProcess, free_port

STARTUP_TIMEOUT = 60.0  # seconds: a loaded 2-core laptop starts eight processes at once


@dataclass(frozen=True)
class Timing:
    """The simulators' latency model: slow enough that a swap is felt, fast enough that
    a minute holds thousands of requests."""

    inter_token_ms: float = 4.0
    prefill_ms_per_token: float = 0.05
    swap_in_ms: float = 40.0
    disk_load_ms: float = 120.0


@dataclass(frozen=True)
class Ports:
    envoy: int
    envoy_admin: int
    grpc: int
    grpc_health: int
    metrics: int

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(5)))


def loractl(*args: str) -> list[str]:
    return [sys.executable, "-m", "loractl", *args]


@dataclass
class Stack:
    scene: Scene
    pods: list[Pod]
    ports: Ports
    timing: Timing = field(default_factory=Timing)
    children: list[ChildProcess] = field(default_factory=list)
    controller: ChildProcess | None = None

    @classmethod
    def plan(cls, scene: Scene, pod_count: int = 3) -> Stack:
        pods = [Pod(f"vllm-{i}", free_port(), free_port()) for i in range(pod_count)]
        return cls(scene, pods, Ports.free())

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.envoy}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}"

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Everything, in dependency order, each part waited for until it answers."""
        simulators = [self._spawn(pod.name, self._simulator_argv(pod)) for pod in self.pods]
        self._wait_all(
            (sim, f"{pod.vllm_url}/health") for sim, pod in zip(simulators, self.pods, strict=True)
        )
        sidecars = [
            self._spawn(f"{pod.name}-sidecar", self._sidecar_argv(pod)) for pod in self.pods
        ]
        self.controller = self._spawn("controller", self.controller_argv())
        # Ready sidecars: every listed adapter is loaded in their pod.
        self._wait_all(
            [
                (car, f"{pod.sidecar_url}/readyz")
                for car, pod in zip(sidecars, self.pods, strict=True)
            ]
            + [(self.controller, f"{self.controller_url}/healthz")]
        )
        envoy_work = self.scene.state_dir / "envoy"
        config = envoy_bootstrap(
            self.ports.envoy,
            f"127.0.0.1:{self.ports.grpc}",
            admin_port=self.ports.envoy_admin,
            listen_host="127.0.0.1",
        )
        envoy = envoy_process(config, envoy_work, "envoy").start()
        self.children.append(envoy)
        wait_envoy_ready(envoy, self.ports.envoy_admin, STARTUP_TIMEOUT)

    def restart_controller(self) -> None:
        """Kill the controller as a crash would, and start a new one on the same files."""
        assert self.controller is not None
        self.controller.kill()
        self.children.remove(self.controller)
        self.controller = self._spawn("controller", self.controller_argv())
        self.controller.wait_until(self._routes, STARTUP_TIMEOUT, "routing requests again")

    def _routes(self) -> bool:
        """Whether a request through the gateway is answered: the picker is up and has
        read the models (until then it answers 503, as it should)."""
        body = {"model": "sql-lora", "prompt": "ping", "max_tokens": 1}
        try:
            answer = httpx.post(f"{self.gateway_url}/v1/completions", json=body, timeout=2.0)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    def stop(self) -> list[tuple[str, int, int | None]]:
        """Stops every child, the gateway first; (name, pid, exit code) of each."""
        stopped = []
        for child in reversed(self.children):
            with contextlib.suppress(Exception):  # one stubborn child must not keep the others
                code = child.stop(timeout=5.0)
                stopped.append((child.name, child.pid, code))
        self.children.clear()
        return stopped

    def controller_argv(self) -> list[str]:
        return loractl(
            "controller", "--local", str(self.scene.objects_dir), "--pool", POOL,
            "--host", "127.0.0.1", "--grpc-port", str(self.ports.grpc),
            "--grpc-health-port", str(self.ports.grpc_health),
            "--metrics-port", str(self.ports.metrics),
        )  # fmt: skip

    def _simulator_argv(self, pod: Pod) -> list[str]:
        t = self.timing
        return loractl(
            "sim", "--host", "127.0.0.1", "--port", str(pod.vllm_port),
            "--served-model-name", BASE_MODEL,
            "--max-loras", "2", "--max-cpu-loras", "4", "--allow-runtime-lora-updating",
            "--inter-token-ms", str(t.inter_token_ms),
            "--prefill-ms-per-token", str(t.prefill_ms_per_token),
            "--swap-in-ms", str(t.swap_in_ms), "--disk-load-ms", str(t.disk_load_ms),
            "--seed", pod.name.rsplit("-", 1)[-1],
        )  # fmt: skip

    def _sidecar_argv(self, pod: Pod) -> list[str]:
        pod_dir = self.scene.pod_dir(pod)
        return loractl(
            "sidecar", "--host", "127.0.0.1", "--port", str(pod.sidecar_port),
            "--config", str(pod_dir / "config" / CONFIG_KEY), "--vllm-url", pod.vllm_url,
            "--adapter-dir", str(pod_dir / "adapters"),
            "--local", str(self.scene.objects_dir),
            "--watch-configmap", f"default/{CONFIGMAP}",
            "--backoff-initial", "0.5", "--backoff-max", "5", "--vllm-poll-interval", "0.5",
        )  # fmt: skip

    def _spawn(self, name: str, argv: list[str]) -> ChildProcess:
        log_path = self.scene.logs_dir / f"{name}.log"
        child = ChildProcess(name, argv, log_path, env={"PYTHONUNBUFFERED": "1"}).start()
        self.children.append(child)
        return child

    @staticmethod
    def _wait_all(waits: Iterable[tuple[ChildProcess, str]]) -> None:
        """Waits for all at once (each in a thread); the first failure is raised."""
        pending = list(waits)
        with ThreadPoolExecutor(max_workers=len(pending)) as pool:
            futures = [pool.submit(c.wait_http_ok, url, STARTUP_TIMEOUT) for c, url in pending]
            for future in futures:
                future.result()
