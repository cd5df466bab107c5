"""The retry schedule of a transport: pure arithmetic, no clocks and no I/O."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RetrySchedule", "format_minutes"]


class RetrySchedule(BaseModel):
    """Attempt 1 is immediate; after failed attempt k wait `delays[min(k-1, len-1)]` minutes.

    `count` is the number of retries after the first attempt, so there are `count + 1`
    attempts in all (the seed's table: count 30 with 60,120,180 is 31 attempts, the last
    60 + 120 + 180*28 = 5220 minutes after the first).
    """

    model_config = ConfigDict(frozen=True)

    delays: list[int] = Field(min_length=1)
    count: int = Field(ge=0)

    @property
    def attempts(self) -> int:
        return self.count + 1

    def delay_after(self, attempt: int) -> timedelta | None:
        """Wait after failed attempt `attempt` (1-based); None when no retry is left."""
        if attempt < 1:
            raise ValueError(f"attempt numbers start at 1, got {attempt}")
        if attempt > self.count:
            return None
        return timedelta(minutes=self.delays[min(attempt - 1, len(self.delays) - 1)])

    def offset_of(self, attempt: int) -> timedelta:
        """Time from the first attempt to attempt `attempt`, if every wait is taken in full."""
        if not 1 <= attempt <= self.attempts:
            raise ValueError(f"attempt {attempt} is outside 1..{self.attempts}")
        total = timedelta()
        for k in range(1, attempt):
            delay = self.delay_after(k)
            assert delay is not None
            total += delay
        return total

    @property
    def give_up_after(self) -> timedelta:
        """Time from the first attempt to the last one: after it fails, the transport gives up."""
        return self.offset_of(self.attempts)

    def describe(self) -> str:
        """In the seed's words: `31 attempts, gives up 87 h 0 min after the first (...)`."""
        if self.count == 0:
            return "1 attempt, no retries"
        shown = [self.delays[min(k, len(self.delays) - 1)] for k in range(min(self.count, 4))]
        waits = ", ".join(str(d) for d in shown)
        if self.count > len(shown):
            waits += ", ..."
        return (
            f"{self.attempts} attempts, gives up {format_minutes(self.give_up_after)} "
            f"after the first ({waits})"
        )


def format_minutes(span: timedelta) -> str:
    minutes = int(span.total_seconds() // 60)
    hours, rest = divmod(minutes, 60)
    if hours == 0:
        return f"{rest} min"
    return f"{hours} h {rest} min"
