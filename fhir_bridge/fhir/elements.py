"""Generic FHIR element helpers: instants, extensions, the moment of a clock.

Small pieces every layer needs and none owns: the one formatter of a FHIR ``instant`` (R4 datatypes.html#instant:
"time SHALL specified at least to the second and SHALL include a time zone"; we write UTC with ``Z``), and
reading/setting a simple extension (R4 extensibility.html: an extension is identified by its ``url``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from fhir_bridge.fhir.resources import Resource

__all__ = ["extension_value", "instant", "set_extension"]


def instant(moment: datetime, *, timespec: Literal["seconds", "milliseconds"] = "milliseconds") -> str:
    """``moment`` as a FHIR instant in UTC (``…Z``), truncated to ``timespec`` (milliseconds by default: what
    the store's versions, Tasks and AuditEvents carry; seconds for signature timestamps)."""
    if moment.tzinfo is None:  # a naive moment is taken as UTC (the clocks of the bridge are aware)
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def extension_value(resource: Resource, url: str, kind: str = "valueString") -> Any:
    """The ``kind`` value of the first extension with ``url``, or None."""
    for extension in resource.get("extension", []) or []:
        if extension.get("url") == url:
            return extension.get(kind)
    return None


def set_extension(resource: Resource, url: str, value: Any, kind: str = "valueString") -> None:
    """Replace every extension with ``url`` by one carrying ``value`` (in place)."""
    others = [e for e in resource.get("extension", []) or [] if e.get("url") != url]
    resource["extension"] = [*others, {"url": url, kind: value}]
