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


def test_the_tally_sees_a_lost_message_and_a_duplicate() -> None:
    """The scenarios' bookkeeping can fail: a 250 missing at the sink is lost, two copies
    are a duplicate, a 451 that arrived anyway is counted apart."""
    from tests.faults.client import Outcome
    from tests.faults.scenarios import tally
    from tests.faults.sink import Delivery, RecordingSink

    sink = RecordingSink()
    for message_id in ("<a>", "<b>", "<b>", "<c>"):
        sink.deliveries.append(Delivery(message_id, "s@x", ["r@y"], b"", 1, 0.0))
    outcomes = [
        Outcome("<a>", "r@y", code=250),
        Outcome("<b>", "r@y", code=250),
        Outcome("<c>", "r@y", code=451),
        Outcome("<d>", "r@y", code=250),
    ]
    result = Result("unit", "quick")
    tally(result, outcomes, sink)
    assert (result.accepted, result.delivered, result.lost, result.duplicates) == (3, 2, 1, 1)
    assert result.details["delivered_without_250"] == 1
    assert result.problems == ["1 accepted message(s) lost: ['<d>']"]
