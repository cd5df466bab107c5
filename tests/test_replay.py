"""Replays recorded histories with today's workflow code: a change that would break
messages already in flight fails here (see README, "Changing a workflow")."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.histories import HISTORIES
from worker import ALL_WORKFLOWS

RECORDED = sorted(HISTORIES.glob("*.json"))


def test_histories_are_recorded() -> None:
    assert len(RECORDED) >= 5, "run `make record-histories` to record the replay corpus"


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
async def test_replay(path: Path) -> None:
    data = json.loads(await asyncio.to_thread(path.read_text))
    workflow_id = f"replay-{path.stem}"
    history = WorkflowHistory.from_json(workflow_id, data)
    replayer = Replayer(workflows=ALL_WORKFLOWS, data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
