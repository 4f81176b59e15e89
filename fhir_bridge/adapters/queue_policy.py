"""What becomes of a failed job attempt, per kind of job, and the tally of how attempts ended.

Apart from the queue (``fhir_bridge.adapters.queue``), which moves entries between Redis keys, because this is
the decision those moves carry out, and the part a deployment tunes: ``main`` gives each kind of job its own
:class:`KindPolicy` (a delivery to a webhook that is down for hours is retried for hours, a collect job gives
up sooner, a delivery refused for good goes to the dead letters at once), and handlers raise
:class:`PermanentJobError` when trying again cannot help.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


class PermanentJobError(Exception):
    """Raised by a handler when trying again cannot help (a malformed payload, a case that no longer
    exists): the job goes straight to the dead letters instead of using up its retries."""


@dataclass(frozen=True, slots=True)
class KindPolicy:
    """Retry policy of one kind of job (overrides the queue's defaults); ``permanent``: the errors that go to the
    dead letters at once for this kind, as :class:`PermanentJobError` does for every kind."""

    max_attempts: int
    backoff_initial: float
    backoff_max: float
    permanent: tuple[type[Exception], ...] = ()

    def buries(self, attempt: int, error: Exception) -> bool:
        """Whether ``error`` ending ``attempt`` sends the job to the dead letters rather than to a retry."""
        return attempt >= self.max_attempts or isinstance(error, (PermanentJobError, *self.permanent))

    def retry_delay(self, attempt: int) -> float:
        """Seconds before the attempt after ``attempt``: exponential backoff, capped, with jitter."""
        delay: float = min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1))
        delay *= 0.5 + random.random() / 2  # jitter: the jobs failed by one outage do not all return at once
        return delay


@dataclass(slots=True)
class QueueCounters:
    """What this process's workers did, for ``/metrics``."""

    processed: int = 0
    retries: int = 0
    dead: int = 0
    reclaimed: int = 0
