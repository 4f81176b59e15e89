"""The search parameters we serve, and the index terms a stored resource answers to.

FHIR R4 search.html: token parameters match ``system|code`` and ``code``; reference parameters match
``Type/id``. Terms are computed here, in the core, so the store indexes opaque strings and needs no FHIR
knowledge. Only the parameters listed in :data:`SEARCH_PARAMS` exist; the CapabilityStatement is built from
the same table so it can not lie.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.resources import Resource

#: ``meta.tag`` system naming the tenant (platform organisation) a case belongs to; set by the bridge only
TENANT_TAG = "https://fhir-bridge.dev/fhir/CodeSystem/tenant"
#: index terms for access control, never search parameters (a client's ``_``-parameters are not criteria)
TENANT_TERM, OWNER_TERM, OUTPUT_TERM = "_tenant", "_owner", "_output"

#: ``_lastUpdated`` (search.html#lastUpdated, http.html#history "incremental sync"): answered by the store from
#: its order by ``meta.lastUpdated``, prefixes eq ge gt le lt; repeats AND, so ``ge…&_lastUpdated=lt…`` is a window
LAST_UPDATED = "_lastUpdated"
_LAST_UPDATED_DOC = ("When the resource last changed (meta.lastUpdated); prefixes eq ge gt le lt, repeat for a "
                     "window (ge…&_lastUpdated=lt…)")

#: resource type → {parameter: (type, description)}
SEARCH_PARAMS: dict[str, dict[str, tuple[str, str]]] = {
    "ServiceRequest": {
        "identifier": ("token", "A business identifier of the request"),
        "subject:identifier": ("token", "The patient's identifier (INS)"),
        "status": ("token", "Request status"),
        LAST_UPDATED: ("date", _LAST_UPDATED_DOC),
    },
    "Task": {
        "focus": ("reference", "The ServiceRequest the Task fulfils"),
        "status": ("token", "Task status"),
        "business-status": ("token", "Fine-grained case state"),
        LAST_UPDATED: ("date", _LAST_UPDATED_DOC),
    },
    "DiagnosticReport": {
        "based-on": ("reference", "The ServiceRequest the opinion answers"),
        "subject:identifier": ("token", "The patient's identifier (INS)"),
        "status": ("token", "Report status"),
        LAST_UPDATED: ("date", _LAST_UPDATED_DOC),
    },
}


def _tokens(codings: Iterable[Mapping[str, Any]]) -> list[str]:
    out: list[str] = []
    for coding in codings:
        code = coding.get("code") or coding.get("value")
        if not code:
            continue
        system = coding.get("system")
        if system:
            out.append(f"{system}|{code}")
        out.append(f"{code}")
    return out


def index_terms(resource: Resource) -> dict[str, list[str]]:
    """Every (parameter → values) a resource answers to, for the store's indexes."""
    rtype = resource.get("resourceType")
    terms: dict[str, list[str]] = {}
    if rtype == "ServiceRequest":
        terms["identifier"] = _tokens(resource.get("identifier", []) or [])
        terms["subject:identifier"] = _tokens([(resource.get("subject") or {}).get("identifier") or {}])
        terms["status"] = [str(resource.get("status", ""))]
    elif rtype == "Task":
        focus = (resource.get("focus") or {}).get("reference")
        terms["focus"] = [focus] if focus else []
        terms["status"] = [str(resource.get("status", ""))]
        terms["business-status"] = _tokens((resource.get("businessStatus") or {}).get("coding", []) or [])
    elif rtype == "DiagnosticReport":
        terms["based-on"] = [r["reference"] for r in resource.get("basedOn", []) or [] if r.get("reference")]
        terms["subject:identifier"] = _tokens([(resource.get("subject") or {}).get("identifier") or {}])
        terms["status"] = [str(resource.get("status", ""))]
    terms[TENANT_TERM] = [tenant] if (tenant := tenant_of(resource)) else []
    if rtype == "Task":
        terms[OWNER_TERM] = [str((resource.get("owner") or {}).get("reference") or "")]
        terms[OUTPUT_TERM] = [str((o.get("valueReference") or {}).get("reference") or "")
                              for o in resource.get("output", []) or []
                              if str((o.get("valueReference") or {}).get("reference") or "").startswith("Bundle/")]
    return {k: [v for v in values if v] for k, values in terms.items()}


def tenant_of(resource: Resource) -> str | None:
    """The tenant tag of a stored resource (None if it has none)."""
    for tag in (resource.get("meta") or {}).get("tag", []) or []:
        if tag.get("system") == TENANT_TAG and isinstance(tag.get("code"), str):
            return str(tag["code"])
    return None


def with_tenant(resource: Resource, tenant: str | None) -> Resource:
    """A copy of ``resource`` whose ``meta.tag`` names ``tenant`` (and no other tenant)."""
    meta = dict(resource.get("meta") or {})
    tags = [t for t in meta.get("tag", []) or [] if t.get("system") != TENANT_TAG]
    if tenant:
        tags.append({"system": TENANT_TAG, "code": tenant})
    if tags:
        meta["tag"] = tags
    else:
        meta.pop("tag", None)
    copy = dict(resource)
    if meta:
        copy["meta"] = meta
    else:
        copy.pop("meta", None)
    return copy


def parse_criteria(resource_type: str, params: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Turn query parameters into store criteria: comma = OR within a parameter, repeats = AND.

    Unknown parameters are an error rather than silently ignored (a client filtering on a patient must
    never get everyone's resources because we did not understand the filter; search.html §3.1.1.1 lets a
    server refuse them). ``_lastUpdated`` is a criterion (its repeats AND: a window); result parameters
    (``_count``, ``_offset``, ``_format``…) are left to the caller.
    """
    known = SEARCH_PARAMS.get(resource_type, {})
    criteria: dict[str, list[str]] = {}
    for name, value in params:
        if name == LAST_UPDATED and name in known:
            # date bounds AND (the store intersects them); a comma would mean OR, which a window can not say
            if "," in value or not value.strip():
                raise InvalidInput("_lastUpdated takes one date per parameter; repeat it for a window",
                                   expression=[name])
            criteria.setdefault(name, []).append(value.strip())
            continue
        if name.startswith("_"):
            continue
        if name not in known:
            raise InvalidInput(f"search parameter {name!r} is not supported on {resource_type}",
                               expression=[name])
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not values:
            raise InvalidInput(f"search parameter {name!r} has no value", expression=[name])
        if known[name][0] == "reference":
            values = [_normalise_reference(v) for v in values]
        if name in criteria:
            # R4 search.html: a repeat ANDs per resource (a resource answering to both); our index can not say
            # that, and answering a narrower or wider set would be wrong, so the query is refused.
            raise InvalidInput(f"search parameter {name!r} repeated: not supported; use one with comma-separated "
                               "values for OR", expression=[name])
        criteria[name] = values
    return criteria


def _normalise_reference(value: str) -> str:
    """``http://host/fhir/ServiceRequest/1`` or ``ServiceRequest/1/_history/2`` → ``ServiceRequest/1``."""
    value = value.split("/_history/")[0]
    parts = value.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else value
