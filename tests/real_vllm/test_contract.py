"""The vLLM contract table, run against real vLLM: the same cases the simulator passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.contract.vllm_contract import CASES, Case, adapter_roles, check_case
from tests.support.real_vllm import BASE, STAGE, TinyModel, VllmServer

pytestmark = STAGE


@pytest.fixture(scope="module")
def roles(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    adapters = tiny_model.adapters
    return adapter_roles(
        Path(tmp_path_factory.mktemp("contract")),
        good=adapters["food-review-1"],
        good2=adapters["food-review-2"],
        big=adapters["big"],
    )


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_contract(case: Case, vllm: VllmServer, roles: dict[str, str]) -> None:
    check_case(vllm.url, case, BASE, roles)
