"""Spool housekeeping activities: the workflow's only way to touch a stored body."""

from __future__ import annotations

from temporalio import activity

from postflow.spool import Spool

__all__ = ["SpoolActivities"]


class SpoolActivities:
    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    @activity.defn(name="remove_body")
    async def remove_body(self, spool_key: str) -> bool:
        return await self._spool.adelete(spool_key)
