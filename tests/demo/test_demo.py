"""`loractl demo --fast` as a user runs it: a subprocess, judged by its JSON summary and
by what it leaves behind (nothing running)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from loractl.demo.report import tolerance

DEMO_TIMEOUT = 110  # seconds; the demo itself must finish well inside its 2 minutes


def run_demo(state_dir: Path, *flags: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loractl",
            "demo",
            "--fast",
            "--json",
            "--state-dir",
            str(state_dir),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    failure = f"demo exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    assert done.stdout, failure
    summary: dict[str, Any] = json.loads(done.stdout)
    assert done.returncode == 0, failure
    return summary


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_clean_promotion(summary: dict[str, Any]) -> None:
    assert summary["ok"] is True
    assert summary["rollout"]["phase"] == "Promoted"
    weights = [step["weight"] for step in summary["steps"]]
    assert weights == [0, 10, 50, 100], "every step observed once, in order"
    for step in summary["steps"]:
        assert step["requests"] >= 30, f"too few requests to judge the split: {step}"
        # Recomputed here: the demo's own verdict is not taken on trust.
        assert step["tolerance_percent"] <= round(tolerance(step["weight"], step["requests"]), 1)
        assert abs(step["observed_percent"] - step["weight"]) <= step["tolerance_percent"], step
    requests = summary["requests"]
    assert requests["server_errors_outside_restarts"] == 0
    assert set(requests["served_by"]) >= {"food-review-1", "food-review-2", "sql-lora"}
    children = summary["children"]
    assert {c["name"] for c in children} >= {"controller", "envoy", "vllm-0", "vllm-0-sidecar"}
    assert [c for c in children if alive(c["pid"])] == [], "every child process is gone"


@pytest.mark.timeout(DEMO_TIMEOUT + 10)
def test_demo_promotes_the_canary_with_the_split_of_each_step(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "state")
    assert_clean_promotion(summary)
    assert summary["requests"]["server_errors"] == 0
    assert not [code for code in summary["requests"]["by_status"] if code.startswith("5")]
    assert summary["affinity"]["hit_rate"] > 0.5
    objects = tmp_path / "state" / "objects"
    rollout = (objects / "food-review-food-review-2.adapterrollout.yaml").read_text()
    assert "phase: Promoted" in rollout, "the state is in the files, for `cat`"


@pytest.mark.timeout(DEMO_TIMEOUT + 10)
def test_a_controller_killed_mid_rollout_resumes_from_the_files(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "state", "--restart-controller")
    assert_clean_promotion(summary)
    [restart] = summary["rollout"]["controller_restarts"]
    assert not alive(restart["killed_pid"])
    assert restart["weights"]["food-review-2"] == 50, "killed mid-rollout"
    started = [h["step"] for h in summary["rollout"]["history"] if h["reason"] == "StepStarted"]
    assert started == [0, 1, 2], f"each step started once, none repeated: {started}"


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_kept_demo_answers_what_it_suggests_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    demo = subprocess.Popen(
        [sys.executable, "-m", "loractl", "demo", "--fast", "--keep", "--state-dir", state],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        shown: list[str] = []
        for line in demo.stdout:
            shown.append(line)
            if line.startswith("press Ctrl-C"):
                break
        kept = "".join(shown)
        assert "press Ctrl-C" in kept, f"{kept}\n{demo.stderr.read() if demo.stderr else ''}"
        [curl] = [line for line in shown if "/v1/completions" in line]
        url = curl.split()[2]
        payload = json.loads(curl.split(" -d ", 1)[1].strip().strip("'"))
        answer = httpx.post(url, json=payload, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] in {"food-review-1", "food-review-2"}
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=30)
    finally:
        demo.kill()
        demo.wait()
    assert demo.returncode == 0, rest
    assert kept.count("canary food-review-1 -> food-review-2: Promoted") == 1
    assert "canary food-review-1" not in rest, "the summary is shown once, before the wait"
    assert rest.strip().endswith("every process was stopped")
