"""Spool housekeeping activities: the workflow's only way to touch a body on disk."""

from __future__ import annotations

from temporalio import activity

from postflow.spool import FsSpool

__all__ = ["SpoolActivities"]


class SpoolActivities:
    def __init__(self, spool: FsSpool) -> None:
        self._spool = spool

    @activity.defn(name="remove_body")
    async def remove_body(self, spool_key: str) -> bool:
        return self._spool.delete(spool_key)
