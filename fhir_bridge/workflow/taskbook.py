"""Writing the case's Task: every change is a compare-and-set on its versionId (FHIR R4 http.html#concurrency).

Two workers, or a worker and a reviewer, may act on one case at once; a change made on a stale version is
re-read and re-decided instead of overwriting the other writer's. Shared by every use case that moves a case.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from fhir_bridge.errors import PreconditionFailed
from fhir_bridge.ports import ResourceStorePort
from fhir_bridge.search_index import index_terms
from fhir_bridge.tasks import state_of, transition
from fhir_bridge.terminology import CANONICAL_BASE, Terminology

Resource = dict[str, Any]
log = structlog.get_logger("fhir_bridge.cases")
OUTPUT_TYPES = f"{CANONICAL_BASE}/CodeSystem/task-output"
_ATTEMPTS = 8


def now_instant(clock: Callable[[], datetime] | None = None) -> str:
    moment = clock() if clock else datetime.now(UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def output_type(code: str, display: str) -> Resource:
    return {"coding": [{"system": OUTPUT_TYPES, "code": code, "display": display}], "text": display}


def extension_value(resource: Resource, url: str, kind: str = "valueString") -> Any:
    for extension in resource.get("extension", []) or []:
        if extension.get("url") == url:
            return extension.get(kind)
    return None


def set_extension(resource: Resource, url: str, value: Any, kind: str = "valueString") -> None:
    others = [e for e in resource.get("extension", []) or [] if e.get("url") != url]
    resource["extension"] = [*others, {"url": url, kind: value}]


class TaskBook:
    """Reads and writes Tasks with optimistic concurrency."""

    def __init__(self, store: ResourceStorePort, terminology: Terminology,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.terminology = terminology
        self.clock = clock

    async def read(self, task_id: str) -> Resource:
        return await self.store.read("Task", task_id)

    async def move(
        self,
        task: Resource,
        status: str,
        state: str,
        *,
        reason: str | None = None,
        output: list[Resource] | None = None,
        replace_output: bool = False,
        contained: list[Resource] | None = None,
        change: Callable[[Resource], None] | None = None,
    ) -> Resource:
        """Move the Task to ``status``/``state`` (a no-op when it is there already)."""
        for _ in range(_ATTEMPTS):
            if task["status"] == status and state_of(task) == state:
                return task
            moved = transition(task, status, state, now_instant(self.clock), self.terminology, reason=reason)
            if output is not None:
                moved["output"] = output if replace_output else [*(task.get("output") or []), *output]
            if contained is not None:
                moved["contained"] = contained
            if change is not None:
                change(moved)
            try:
                return await self.store.update(moved, index=index_terms(moved), if_match=task["meta"]["versionId"])
            except PreconditionFailed:
                task = await self.read(task["id"])
        raise PreconditionFailed("the case kept changing under us; try again")

    async def edit(self, task: Resource, change: Callable[[Resource], None]) -> Resource:
        """Change a Task without moving it (owner, notes, flags), compare-and-set."""
        for _ in range(_ATTEMPTS):
            edited = {k: v for k, v in task.items()}
            change(edited)
            if edited == task:
                return task
            edited["lastModified"] = now_instant(self.clock)
            try:
                return await self.store.update(edited, index=index_terms(edited), if_match=task["meta"]["versionId"])
            except PreconditionFailed:
                task = await self.read(task["id"])
        raise PreconditionFailed("the case kept changing under us; try again")

    async def fail(self, task: Resource, reason: str) -> None:
        log.warning("case.failed", task=task["id"], reason=reason)
        current = await self.read(task["id"])
        if current["status"] in ("requested", "in-progress", "ready", "on-hold"):
            await self.move(current, "failed", "failed", reason=reason)
