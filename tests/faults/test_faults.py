"""Fault scenarios in the test run: a quick variant of each kind; the full sizes are slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from tests.faults.scenarios import SCENARIOS, Result, run_scenario


def _assert_held(result: Result) -> None:
    assert result.accepted > 0, result
    assert result.lost == 0, result
    assert not result.problems, result


async def _run(name: str, quick: bool, tmp_path: Path, env: WorkflowEnvironment | None) -> Result:
    result = await run_scenario(name, quick=quick, workdir=tmp_path, env=env)
    print(result.as_json())
    return result


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if not s[3]])
async def test_quick_on_processes(name: str, tmp_path: Path) -> None:
    if name == "disk-full" and os.geteuid() != 0:
        pytest.skip("disk-full mounts a small tmpfs: needs root")
    _assert_held(await _run(name, True, tmp_path, None))


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s[3]])
async def test_quick_on_time_skipping(
    name: str, tmp_path: Path, ts_env: WorkflowEnvironment
) -> None:
    _assert_held(await _run(name, True, tmp_path, ts_env))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_full_size(name: str, tmp_path: Path) -> None:
    if name == "disk-full" and os.geteuid() != 0:
        pytest.skip("disk-full mounts a small tmpfs: needs root")
    _assert_held(await _run(name, False, tmp_path, None))
