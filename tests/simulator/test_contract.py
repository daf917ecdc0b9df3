"""The vLLM contract table, run against the simulator over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from simulator.adapter_files import write_adapter
from tests.contract.vllm_contract import CASES, Case, adapter_roles, check_case
from tests.support.simulators import simulator_process

BASE = "contract-base"


@pytest.fixture(scope="module")
def contract_target(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("contract")
    paths = adapter_roles(
        root / "roles",
        good=str(write_adapter(root / "good", rank=8, seed=1)),
        good2=str(write_adapter(root / "good2", rank=8, seed=2)),
        big=str(write_adapter(root / "big", rank=16, seed=3)),
    )
    process, url = simulator_process(
        root / "logs",
        "--served-model-name",
        BASE,
        "--max-lora-rank",
        "8",
        "--max-loras",
        "2",
        "--max-model-len",
        "512",
        "--time-scale",
        "0",
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"},
    )
    process.start()
    try:
        process.wait_http_ok(f"{url}/health")
        yield url, paths
    finally:
        process.stop()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_contract(case: Case, contract_target: tuple[str, dict[str, str]]) -> None:
    url, paths = contract_target
    check_case(url, case, BASE, paths)
