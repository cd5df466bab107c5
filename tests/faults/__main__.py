"""`python -m tests.faults [--scenario NAME ...] [--messages N] [--quick]`: runs the fault
scenarios and writes `bench/results/faults.json` (merged by scenario name)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from postflow.temporal import find_binary
from tests.faults.scenarios import SCENARIOS, Result, run_scenario
from tests.faults.stack import ROOT

RESULTS = ROOT / "bench" / "results" / "faults.json"


async def _time_skipping() -> WorkflowEnvironment:
    from tests.conftest import register_search_attributes

    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await register_search_attributes(env.client)
    return env


async def _run(names: list[str], quick: bool, messages: int | None) -> list[Result]:
    results = []
    env = None
    try:
        for name in names:
            if quick and SCENARIOS[name][3] and env is None:
                env = await _time_skipping()
            print(f"== {name} ({'quick' if quick else 'full'})", flush=True)
            started = time.monotonic()
            workdir = Path(tempfile.mkdtemp(prefix=f"postflow-{name}-"))
            result = await run_scenario(
                name, quick=quick, messages=messages, workdir=workdir, env=env
            )
            result.details["wall_s"] = round(time.monotonic() - started, 1)
            if result.problems:
                print(f"kept {workdir} (process logs, spool, SQLite) for a look", flush=True)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
            print(json.dumps(result.as_json(), indent=2), flush=True)
            results.append(result)
    finally:
        if env is not None:
            await env.shutdown()
    return results


def _write(results: list[Result], output: Path) -> None:
    previous = json.loads(output.read_text()) if output.exists() else {}
    table = {r["scenario"]: r for r in previous.get("scenarios", [])}
    for result in results:
        table[result.scenario] = {
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **result.as_json(),
        }
    ordered = [table[name] for name in SCENARIOS if name in table]
    data = {
        "machine": {"cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "lost_total": sum(r["lost"] for r in ordered),
        "scenarios": ordered,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    parser.add_argument("--messages", type=int, help="burst size (default: each one's own)")
    parser.add_argument("--quick", action="store_true", help="the small variants CI runs")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(_run(args.scenario or list(SCENARIOS), args.quick, args.messages))
    _write(results, args.output)
    failed = [r for r in results if r.problems or r.lost]
    for r in results:
        state = "FAILED: " + "; ".join(r.problems) if r in failed else "ok"
        print(
            f"{r.scenario:17} accepted {r.accepted:5} delivered {r.delivered:5} lost {r.lost} "
            f"duplicates {r.duplicates} drain {r.time_to_drain_s:.1f} s  {state}"
        )
    print(f"wrote {args.output}")
    sys.stdout.flush()
    # The Temporal SDK can abort at interpreter exit (sdk-python#300); results are written.
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
