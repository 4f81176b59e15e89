"""When and how long to wait before asking the source again.

Pure policy, no I/O, so it is unit-tested directly and shared by every outbound adapter:

* retry connection errors, timeouts and HTTP 408, 429, 502, 503, 504; never another 4xx (the source will
  not change its mind: a 404 stays a 404) nor another 5xx such as 500/501 (a bug at the source, not load);
* exponential backoff with "full jitter" (a uniform delay up to ``min(max, initial * 2**attempt)``), the
  scheme that spreads retries of many clients best;
* a ``Retry-After`` header (RFC 9110 §10.2.3: delay-seconds or an HTTP-date) is honoured, capped, since a
  source asking for an hour would otherwise stall a case silently.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 5
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    retry_after_cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def should_retry_status(self, status: int) -> bool:
        return status in RETRY_STATUSES

    def can_retry(self, attempt: int) -> bool:
        """``attempt`` counts the tries already made (1 after the first request)."""
        return attempt <= self.max_retries

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential delay before try number ``attempt + 1``."""
        ceiling = min(self.backoff_max, self.backoff_initial * (2 ** max(0, attempt - 1)))
        return self.rng.uniform(0, ceiling)

    def delay(self, attempt: int, retry_after: str | None, *, now: datetime | None = None) -> float:
        """The wait before the next try: the server's Retry-After when it gave one, else backoff."""
        asked = parse_retry_after(retry_after, now=now)
        if asked is not None:
            return min(asked, self.retry_after_cap)
        return self.backoff(attempt)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header, or None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())
