"""Keeps workflow histories of representative tests for the replay test.

`make record-histories` runs the tests with POSTFLOW_RECORD_HISTORIES=1; each test that
calls `keep_history` then writes `tests/histories/<name>.json`, which `test_replay.py`
replays with the current workflow code on every run.
"""

from __future__ import annotations

import os
from pathlib import Path

from temporalio.client import WorkflowHandle

HISTORIES = Path(__file__).parent / "histories"


async def keep_history(handle: WorkflowHandle, name: str) -> None:
    if os.environ.get("POSTFLOW_RECORD_HISTORIES") != "1":
        return
    history = await handle.fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    (HISTORIES / f"{name}.json").write_text(history.to_json())
