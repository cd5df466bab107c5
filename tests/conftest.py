"""Session-wide servers: Temporal's time-skipping test server and a dev server, each once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    StartWorkflowInput,
    WorkflowHandle,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from postflow import search
from postflow.config import Config, parse_config
from postflow.constants import SEARCH_ATTRIBUTES
from postflow.temporal import find_binary
from tests.s3server import s3_server, s3_spool_settings  # noqa: F401 - one SeaweedFS per session
from worker import build_workers


class _StartTracker(Interceptor):
    """Remembers every workflow started through a test client, by task queue."""

    def __init__(self) -> None:
        self.started: dict[str, list[tuple[str, str | None]]] = {}

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        tracker = self

        class _Outbound(OutboundInterceptor):
            async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle:
                handle = await super().start_workflow(input)
                tracker.started.setdefault(input.task_queue, []).append(
                    (input.id, handle.result_run_id)
                )
                return handle

        return _Outbound(next)


_TRACKER = _StartTracker()


@pytest.fixture(scope="session")
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    """Time-skipping server: 87 hours of retries run in milliseconds."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
        interceptors=[_TRACKER],
    )
    await register_search_attributes(env.client)
    yield env
    await env.shutdown()


async def register_search_attributes(client: Client) -> None:
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest

    kinds = {
        "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
        "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
        "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
        "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
        "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
    }
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=client.namespace,
            search_attributes={n: kinds[k] for n, k in SEARCH_ATTRIBUTES.items()},
        )
    )


async def start_dev_env() -> WorkflowEnvironment:
    """The same dev server `postflow up` runs, in memory, with Postflow's search attributes."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=search.all_keys(),
        dev_server_extra_args=["--log-level", "error"],
    )


@pytest.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_env()
    yield env
    await env.shutdown()


def make_config(tmp_path: Path, **sections: object) -> Config:
    data: dict[str, object] = {
        "spool": {"path": str(tmp_path / "spool")},
        "smtp": {"helo_name": "postflow.test", "connect_timeout": "5s"},
    }
    data.update(sections)
    # In-process tests keep Temporal's sandbox on: it catches non-deterministic workflow
    # code that production (sandbox off, for speed) would only meet on replay.
    worker = dict(data.get("worker") or {})  # type: ignore[call-overload]
    worker.setdefault("workflow_sandbox", True)
    data["worker"] = worker
    return parse_config(data)


@asynccontextmanager
async def running_worker(client: Client, config: Config) -> AsyncIterator[str]:
    """A worker on a fresh task queue; yields the queue name for the workflows to start on."""
    queue = f"test-{uuid.uuid4().hex[:10]}"
    workers: list[Worker] = build_workers(client, config, task_queues=[queue])
    async with workers[0]:
        try:
            yield queue
        finally:
            await _terminate_leftovers(client, queue)


async def _terminate_leftovers(client: Client, queue: str) -> None:
    """A workflow left running after its worker stops (a report a test did not await, or a
    test that failed half-way) would freeze time skipping for every later test: let it
    finish while its worker still runs, and terminate it only if it does not."""
    for workflow_id, run_id in _TRACKER.started.pop(queue, []):
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        try:
            await asyncio.wait_for(handle.result(), timeout=10)
        except Exception:
            try:
                await handle.terminate("test finished; its worker is stopping")
            except RPCError:
                pass
