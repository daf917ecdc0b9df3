"""The sidecar against real vLLM: the simulator's scenarios, on the real engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SidecarFactory
from tests.support.real_vllm import STAGE, TinyModel, VllmServer
from tests.support.sidecar_scenarios import (
    bad_adapters_fail_with_reasons,
    incomplete_copy,
    initial_sync_then_kubelet_style_edits,
    server_restart_is_noticed_and_adapters_come_back,
    source_change_reloads_in_place,
)

pytestmark = STAGE


def test_initial_sync_edit_and_unload(
    vllm: VllmServer, start_sidecar: SidecarFactory, tiny_model: TinyModel, tmp_path: Path
) -> None:
    # Copies: four roots vLLM cannot confuse, with real weights behind each.
    a, b, c, d = (
        tiny_model.copy_adapter(f"food-review-{1 + i % 3}", tmp_path / name)
        for i, name in enumerate("abcd")
    )
    initial_sync_then_kubelet_style_edits(vllm.url, start_sidecar, a, b, c, d)


def test_source_change_reloads_and_the_completions_change(
    vllm: VllmServer, start_sidecar: SidecarFactory, tiny_model: TinyModel
) -> None:
    adapters = tiny_model.adapters
    source_change_reloads_in_place(
        vllm.url, start_sidecar, adapters["food-review-1"], adapters["food-review-2"]
    )


def test_bad_adapters_fail_with_reasons(
    vllm: VllmServer, start_sidecar: SidecarFactory, tiny_model: TinyModel, tmp_path: Path
) -> None:
    good = tiny_model.adapters["food-review-1"]
    incomplete = incomplete_copy(good, tmp_path / "incomplete")
    bad_adapters_fail_with_reasons(
        vllm.url, start_sidecar, good, tiny_model.adapters["big"], incomplete
    )


# Last in the module: it costs a full vLLM start (about a minute here).
@pytest.mark.timeout(600, func_only=True)
def test_killed_and_restarted_vllm_gets_its_adapters_back(
    vllm: VllmServer, start_sidecar: SidecarFactory, tiny_model: TinyModel
) -> None:
    adapters = tiny_model.adapters
    server_restart_is_noticed_and_adapters_come_back(
        vllm.url,
        start_sidecar,
        adapters["food-review-1"],
        adapters["food-review-2"],
        go_down=vllm.process.kill,
        come_back=vllm.restart_and_wait,
        # The sidecar polls every second; a freshly started engine's first loads take a
        # moment more than the simulator's (about 1 s here, so the margin is for load).
        within=5.0,
    )
