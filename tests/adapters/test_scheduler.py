"""The scheduler's Redis lease on a real redis-server, with injected clocks: every tick claimed exactly once
whatever the number of workers, a late or lagging worker never reruns a passed tick, a short outage of every
worker still runs the newest missed tick once, an older one is skipped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from fhir_bridge.adapters.scheduler import RedisScheduler
from fhir_bridge.errors import InvalidInput
from fhir_bridge.schedule import load_schedule
from tests.fakes import InMemoryQueue

T0 = datetime(2026, 11, 2, 2, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def workers(redis: Redis, queue: InMemoryQueue, cron: str, count: int, start: datetime,
            grace: float = 60) -> list[tuple[RedisScheduler, Clock]]:
    jobs = load_schedule({"overdue": cron}, "Europe/Paris")
    made = []
    for _ in range(count):
        clock = Clock(start)
        made.append((RedisScheduler(redis, queue, jobs, grace_seconds=grace, clock=clock), clock))
    return made


async def test_three_workers_claim_each_tick_once(redis_client: Redis) -> None:
    queue = InMemoryQueue()
    team = workers(redis_client, queue, "*/10 * * * * *", 3, T0 - timedelta(seconds=1))
    for second in range(0, 61):  # a minute, each worker waking at slightly different times
        for n, (scheduler, clock) in enumerate(team):
            clock.now = T0 + timedelta(seconds=second, milliseconds=137 * n)
            await scheduler.step(f"w{n}")
    ticks = [job.payload["tick"] for job in queue.enqueued]
    assert ticks == [int((T0 + timedelta(seconds=s)).timestamp() * 1000) for s in range(0, 61, 10)]
    assert {job.kind for job in queue.enqueued} == {"sync-overdue"}
    assert len({job.id for job in queue.enqueued}) == 7
    stats = await team[0][0].tick_stats()
    assert stats["overdue"] == (7, (T0 + timedelta(seconds=60)).timestamp())


async def test_a_late_or_lagging_worker_never_reruns_a_passed_tick(redis_client: Redis) -> None:
    queue = InMemoryQueue()
    [(first, clock)] = workers(redis_client, queue, "0 2 * * *", 1, T0 + timedelta(hours=1))  # 02:00 Paris
    tick = datetime(2026, 11, 2, 1, 0, tzinfo=UTC)
    clock.now = tick + timedelta(seconds=1)
    await first.step("w1")
    assert len(queue.enqueued) == 1
    [(late, _late_clock)] = workers(redis_client, queue, "0 2 * * *", 1, tick + timedelta(seconds=30))
    await late.step("w2")  # started 30 s after the tick: within the grace, but the tick is taken
    [(lagging, lag_clock)] = workers(redis_client, queue, "0 2 * * *", 1, tick + timedelta(seconds=65))
    lag_clock.now = tick + timedelta(seconds=90)
    await lagging.step("w3")
    assert len(queue.enqueued) == 1


async def test_after_an_outage_the_newest_missed_tick_runs_once_and_older_ones_never(redis_client: Redis) -> None:
    queue = InMemoryQueue()
    team = workers(redis_client, queue, "* * * * *", 2, T0 + timedelta(seconds=100), grace=60)  # every minute
    for n, (scheduler, _) in enumerate(team):
        await scheduler.step(f"w{n}")  # 02:01:40: the 02:01:00 tick is 40 s old, within the grace: run once
    assert [job.payload["tick"] for job in queue.enqueued] == [int((T0 + timedelta(minutes=1)).timestamp() * 1000)]
    [(back, _clock)] = workers(redis_client, queue, "* * * * *", 1, T0 + timedelta(minutes=10, seconds=30))
    await back.step("w9")  # 02:10:30 after everyone was down since 02:01:40: only 02:10:00 runs
    assert [job.payload["tick"] for job in queue.enqueued][1:] == [
        int((T0 + timedelta(minutes=10)).timestamp() * 1000)]


async def test_runs_are_recorded_for_operators(redis_client: Redis) -> None:
    [(scheduler, _)] = workers(redis_client, InMemoryQueue(), "* * * * *", 1, T0)
    await scheduler.record_run("overdue", 1000, "w1")
    await scheduler.record_run("overdue", 2000, "w2")
    assert await scheduler.runs("overdue") == [(1000, "w1"), (2000, "w2")]
    keys = sorted(k.decode() for k in await redis_client.keys("*"))
    assert all("{schedule}" in k for k in keys)


@pytest.mark.parametrize("expressions, zone, message", [
    ({"overdue": "61 * * * *"}, "UTC", "not a cron expression"),
    ({"overdue": "* * *"}, "UTC", "not a cron expression"),
    ({"backup": "* * * * *"}, "UTC", "not a schedulable job"),
    ({"overdue": "* * * * *"}, "Mars/Olympus", "time zone"),
])
def test_a_bad_schedule_is_refused_at_start(expressions: dict[str, str], zone: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_schedule(expressions, zone)


def test_empty_expressions_schedule_nothing() -> None:
    assert load_schedule({"refresh": "", "overdue": " ", "deliver": ""}, "UTC") == []
