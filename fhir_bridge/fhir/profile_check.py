"""Checking a resource against one of our profiles' snapshots (R4 profiling.html, structuredefinition.html).

fhir.resources checks the base R4 structure (:func:`fhir_bridge.fhir.resources.validate`); this checks what our
profiles add, element by element of the snapshot:

* cardinality: ``min``/``max`` counted in each instance of the parent element (profiling.html#cardinality);
* ``fixed[x]`` (exactly equal) and ``pattern[x]`` (the instance holds at least the pattern's content);
* ``required`` bindings to a ValueSet of ours in ``mappings/`` (terminologies.html#required): a code, Coding
  or CodeableConcept (one of its codings) must be in the value set; other value sets are not expanded here;
* invariants: ``constraint.expression`` evaluated by fhirpathpy (FHIRPath N1, the R4 model) on each instance
  of the element, with ``%resource`` the resource; severity ``error`` fails, ``warning`` is reported;
* extensions at the top of the resource whose URL is one of our Extension profiles, against that profile.

Issues name element paths and constraint keys, never values (no patient data in messages).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fhirpathpy import evaluate
from fhirpathpy.models import models

from fhir_bridge.errors import BusinessRuleViolation
from fhir_bridge.fhir.profiles import Profiles, declared_urls
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import Terminology

_R4 = models["r4"]


@dataclass(frozen=True)
class ProfileIssue:
    """One way a resource falls short of a profile: where, which rule, how bad."""

    path: str
    message: str
    severity: Literal["error", "warning"] = "error"


def _child_values(node: Any, name: str) -> list[Any]:
    """The values of child ``name`` of ``node`` (a choice ``value[x]`` matches ``valueString`` …)."""
    if not isinstance(node, dict):
        return []
    if name.endswith("[x]"):
        stem = name[:-3]
        keys = [k for k in node if k.startswith(stem) and k[len(stem):][:1].isupper()]
    else:
        keys = [name] if name in node or f"_{name}" in node else []
    values: list[Any] = []
    for key in keys:
        value = node.get(key, node.get(f"_{key}"))
        values.extend(value if isinstance(value, list) else [value])
    return values


def _instances(resource: Resource, path: str) -> list[Any]:
    """Every instance of the element at ``path`` (``Task.output.type``) in ``resource``."""
    nodes: list[Any] = [resource]
    for name in path.split(".")[1:]:
        nodes = [value for node in nodes for value in _child_values(node, name)]
    return nodes


def _choice_value(element: Resource, prefix: str) -> tuple[str, Any] | None:
    for key, value in element.items():
        if key.startswith(prefix) and key[len(prefix):][:1].isupper():
            return key, value
    return None


def _holds(pattern: Any, value: Any) -> bool:
    """profiling.html#pattern: every element of the pattern is in the value (lists: each item matched)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(_holds(v, value.get(k)) for k, v in pattern.items())
    if isinstance(pattern, list):
        items = value if isinstance(value, list) else [value]
        return all(any(_holds(p, v) for v in items) for p in pattern)
    return bool(pattern == value)


def _codings(value: Any) -> list[tuple[str | None, str]]:
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, dict) and "coding" in value:
        return [c for item in value.get("coding") or [] for c in _codings(item)]
    if isinstance(value, dict) and isinstance(value.get("code"), str):
        return [(value.get("system"), value["code"])]
    return []


def value_set_codes(url: str, terminology: Terminology) -> set[tuple[str, str]] | None:
    """The (system, code) pairs of one of our ValueSets (compose.include of listed concepts, or of a whole
    CodeSystem of ours); None when the value set is not ours or includes what we can not expand."""
    value_set = next((r for r in terminology.resources.values()
                      if r.get("resourceType") == "ValueSet" and r.get("url") == url), None)
    if value_set is None:
        return None
    systems = {r["url"]: r for r in terminology.resources.values() if r.get("resourceType") == "CodeSystem"}
    codes: set[tuple[str, str]] = set()
    for include in value_set.get("compose", {}).get("include", []):
        system = include.get("system")
        if not system or include.get("filter") or include.get("valueSet"):
            return None
        if include.get("concept"):
            codes |= {(system, c["code"]) for c in include["concept"]}
        elif system in systems:
            codes |= {(system, code) for code in _all_codes(systems[system].get("concept", []))}
        else:
            return None
    return codes


def _all_codes(concepts: Iterable[Mapping[str, Any]]) -> set[str]:
    return {c["code"] for c in concepts} | {x for c in concepts for x in _all_codes(c.get("concept", []))}


def _truthy(result: list[Any]) -> bool:
    """FHIRPath invariant outcome: a single ``true`` passes; empty counts as passing (nothing to test)."""
    return result == [] or result == [True]


def check(resource: Resource, profile: Resource, terminology: Terminology,
          profiles: Profiles | None = None) -> list[ProfileIssue]:
    """Every issue of ``resource`` against ``profile`` (a StructureDefinition with a snapshot)."""
    issues: list[ProfileIssue] = []
    elements = profile["snapshot"]["element"]
    for element in elements:
        path = str(element["path"])
        issues += _cardinality(resource, element)
        instances = _instances(resource, path) if "." in path else [resource]
        issues += _fixed_and_pattern(path, element, instances)
        issues += _binding(path, element, instances, terminology)
        issues += _invariants(resource, path, element, instances)
    if profiles is not None:
        for extension in resource.get("extension", []) or []:
            ext_profile = profiles.by_url.get(str(extension.get("url")))
            if ext_profile is not None and ext_profile.get("type") == "Extension":
                issues += [ProfileIssue(f"{resource.get('resourceType')}.extension:{ext_profile['id']}"
                                        f"{issue.path.removeprefix('Extension')}", issue.message, issue.severity)
                           for issue in check(extension, ext_profile, terminology)]
    return issues


def _cardinality(resource: Resource, element: Resource) -> list[ProfileIssue]:
    path = str(element["path"])
    if "." not in path:
        return []
    parent, name = path.rsplit(".", 1)
    parents = _instances(resource, parent) if "." in parent else [resource]
    low, high = int(element.get("min", 0)), element.get("max", "*")
    out = []
    for node in parents:
        if not isinstance(node, dict):
            continue
        count = len(_child_values(node, name))
        if count < low:
            out.append(ProfileIssue(path, f"{path}: at least {low} expected, {count} found"))
        elif high != "*" and count > int(high):
            out.append(ProfileIssue(path, f"{path}: at most {high} allowed, {count} found"))
    return out


def _fixed_and_pattern(path: str, element: Resource, instances: list[Any]) -> list[ProfileIssue]:
    out = []
    fixed, pattern = _choice_value(element, "fixed"), _choice_value(element, "pattern")
    for value in instances:
        if fixed is not None and value != fixed[1]:
            out.append(ProfileIssue(path, f"{path}: must be the fixed value of {fixed[0]}"))
        if pattern is not None and not _holds(pattern[1], value):
            out.append(ProfileIssue(path, f"{path}: does not hold {pattern[0]}"))
    return out


def _binding(path: str, element: Resource, instances: list[Any], terminology: Terminology) -> list[ProfileIssue]:
    binding = element.get("binding") or {}
    if binding.get("strength") != "required" or not instances:
        return []
    allowed = value_set_codes(str(binding.get("valueSet")), terminology)
    if allowed is None:
        return []
    return [ProfileIssue(path, f"{path}: no code from the required value set {binding['valueSet']}")
            for value in instances if not _in(_codings(value), allowed)]


def _in(found: list[tuple[str | None, str]], allowed: set[tuple[str, str]]) -> bool:
    codes = {c for _, c in allowed}
    return any((s, c) in allowed if s is not None else c in codes for s, c in found)


def _invariants(resource: Resource, path: str, element: Resource, instances: list[Any]) -> list[ProfileIssue]:
    out = []
    for constraint in element.get("constraint", []) or []:
        expression = constraint.get("expression")
        if not expression:
            continue
        severity: Literal["error", "warning"] = "warning" if constraint.get("severity") == "warning" else "error"
        for value in instances:
            try:
                result = evaluate(value, expression, {"resource": resource, "rootResource": resource}, _R4)
            except Exception as exc:  # a FHIRPath engine error is the profile's fault: say which invariant
                raise BusinessRuleViolation(f"profile invariant {constraint.get('key')} could not be evaluated: "
                                            f"{type(exc).__name__}") from None
            if not _truthy(list(result)):
                out.append(ProfileIssue(path, f"{constraint.get('key')}: {constraint.get('human')}", severity))
    return out


def conform(resource: Resource, profiles: Profiles, terminology: Terminology) -> list[ProfileIssue]:
    """Check ``resource`` against every profile of ours it declares (``meta.profile``), or the profile of its
    type when it declares none; BusinessRuleViolation (422, STANDARDS.md §9) naming the failing paths on
    an error, the warnings returned."""
    urls = list(declared_urls(resource, profiles))
    chosen = [profiles.by_url[u] for u in urls] or [p for p in [profiles.for_type(str(resource.get("resourceType")))]
                                                  if p is not None]
    issues = [issue for profile in chosen for issue in check(resource, profile, terminology, profiles)]
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        raise BusinessRuleViolation(
            f"{resource.get('resourceType')} does not conform to {', '.join(p['id'] for p in chosen)}: "
            + "; ".join(i.message for i in errors[:5]),
            expression=sorted({i.path for i in errors})[:5])
    return [i for i in issues if i.severity == "warning"]


def describe(issues: Iterable[ProfileIssue]) -> str:
    """The issues as one JSON line (for a test's failure message)."""
    return json.dumps([{"path": i.path, "message": i.message, "severity": i.severity} for i in issues])
