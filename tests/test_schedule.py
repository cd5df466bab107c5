from datetime import timedelta

import pytest

from postflow.schedule import RetrySchedule


def test_seed_table_87_hours() -> None:
    schedule = RetrySchedule(delays=[60, 120, 180], count=30)
    assert schedule.attempts == 31
    assert schedule.delay_after(1) == timedelta(minutes=60)
    assert schedule.delay_after(2) == timedelta(minutes=120)
    assert schedule.delay_after(3) == timedelta(minutes=180)
    assert schedule.delay_after(30) == timedelta(minutes=180)
    assert schedule.delay_after(31) is None
    assert schedule.give_up_after == timedelta(minutes=60 + 120 + 180 * 28)
    assert schedule.give_up_after == timedelta(hours=87)
    assert schedule.describe() == (
        "31 attempts, gives up 87 h 0 min after the first (60, 120, 180, 180, ...)"
    )


def test_single_delay_repeats() -> None:
    schedule = RetrySchedule(delays=[15], count=4)
    assert [schedule.delay_after(k) for k in range(1, 6)] == [timedelta(minutes=15)] * 4 + [None]
    assert schedule.give_up_after == timedelta(minutes=60)


def test_count_zero_means_one_attempt() -> None:
    schedule = RetrySchedule(delays=[60], count=0)
    assert schedule.attempts == 1
    assert schedule.delay_after(1) is None
    assert schedule.give_up_after == timedelta(0)
    assert schedule.describe() == "1 attempt, no retries"


def test_list_longer_than_count_is_cut() -> None:
    schedule = RetrySchedule(delays=[1, 2, 3, 4, 5], count=2)
    assert schedule.attempts == 3
    assert schedule.offset_of(3) == timedelta(minutes=3)
    assert schedule.delay_after(3) is None
    assert schedule.describe() == "3 attempts, gives up 0 h 3 min after the first (1, 2)".replace(
        "0 h ", ""
    )


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(ValueError):
        RetrySchedule(delays=[1], count=1).delay_after(0)
    with pytest.raises(ValueError):
        RetrySchedule(delays=[1], count=1).offset_of(3)
